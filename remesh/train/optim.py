"""AdamW and the warmup + decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from remesh.train.configs import OptimConfig


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Factor on the peak lr before optimizer step `step` (0-based): linear warmup, then decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def warmup_outlasts_run(cfg: OptimConfig, total_steps: int, name: str) -> str | None:
    """A warning if the warmup is longer than the run, whose learning rate then never reaches
    its peak (`name`: the optimizer's config section); None otherwise."""
    if cfg.warmup_steps <= total_steps:
        return None
    return (f"remesh: warning: {name}.warmup_steps={cfg.warmup_steps} is more than the run's {total_steps} optimizer "
            f"steps: the learning rate never reaches {name}.lr (at most {total_steps / cfg.warmup_steps:.2g} of it)")


def build_optimizer(model: nn.Module, cfg: OptimConfig, dp_group: dist.ProcessGroup | None = None
                    ) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms and biases (1-D parameters). With `cfg.zero` and a
    data-parallel group, its state is sharded over the group (torch's ZeroRedundancyOptimizer:
    every rank must call `step`, after the gradients are summed over the group)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # torch's fused kernel updates each tensor in one pass, in place: on this CPU a 135M-parameter
    # step takes 0.12 s against 0.43-0.52 s for the default per-tensor loop, which also allocates
    # each update's square-root and quotient (two copies of the largest tensor)
    fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
    if cfg.zero and dp_group is not None:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, process_group=dp_group, lr=cfg.lr,
                                       betas=cfg.betas, eps=cfg.eps, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, cfg))
