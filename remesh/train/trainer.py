"""The one-process training loop shared by SFT and reward-model training.

A `Task` says what an example is and how a micro-batch of them turns into a loss; the loop
owns everything else: data order, token-budget micro-batches with gradient accumulation,
AdamW + schedule, clipping, mixed precision, eval, metrics, checkpoints and exact resume.

Data order is a pure function of (seed, epoch), so a resumed run needs only the step counter
to continue with the same batches.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from torch import Tensor, nn

from remesh.checkpoint import load_hf, load_tokenizer, resolve_model_path, save_hf
from remesh.config import ConfigError, config_to_dict
from remesh.data import balanced_micro_batches, split_eval
from remesh.train.metrics import MetricsLogger
from remesh.train.optim import build_optimizer, build_scheduler, warmup_outlasts_run
from remesh.train.state import (STATE_DIR, begin_outputs, claim_output_dir, load_trainer_state, prune_checkpoints,
                                resolve_resume, save_trainer_state)


class Task(Protocol):
    head: str  # "lm" or "value"

    def load(self, path: str, tokenizer: Any) -> tuple[list, Any]:
        """Examples of a data file and the SkipReport of rows dropped."""

    def length(self, example: Any) -> int:
        """Tokens the example occupies in a micro-batch."""

    def units(self, examples: Sequence[Any]) -> int:
        """What the step's loss is averaged over (target tokens, pairs)."""

    def micro_batch(self, model: nn.Module, examples: Sequence[Any], device: torch.device) -> tuple[Tensor, dict]:
        """Summed loss over the micro-batch and summed statistics (floats) for metrics."""

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Turn summed statistics of a step or an eval pass into reported metrics."""


@dataclass
class TrainResult:
    output_dir: Path
    final_model: Path
    metrics_file: Path
    steps: int
    eval_metrics: dict[str, float]


def pick_device(name: str, option: str = "trainer.device") -> torch.device:
    """`name` as a device this machine has ("auto": cuda if available, else cpu); ConfigError
    naming `option` otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{option}: unknown device {name!r} (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{option}: {name!r}, but this machine has no CUDA device (torch {torch.__version__})")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{option}: {name!r}, but this machine has {count} CUDA device(s)")
    return device


def autocast_context(mode: str, device: torch.device):
    use_bf16 = mode == "bf16" or (mode == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def run_training(cfg: Any, task: Task) -> TrainResult:
    tc = cfg.trainer
    device = pick_device(tc.device)
    out = Path(tc.output_dir)
    claim_output_dir(out, tc.resume, tc.overwrite)
    torch.manual_seed(tc.seed)

    resume_dir = resolve_resume(tc.resume, out) if tc.resume else None
    source = resume_dir or resolve_model_path(cfg.model.path, "model.path")
    tokenizer = load_tokenizer(source)
    dtype = getattr(torch, cfg.model.dtype)
    model = load_hf(source, head=task.head, dtype=dtype, device=device)

    train, report = task.load(cfg.data.train, tokenizer)
    if report.skipped:
        print(f"remesh: {report.summary()}")
    if cfg.data.eval:
        eval_set, eval_report = task.load(cfg.data.eval, tokenizer)
        if eval_report.skipped:
            print(f"remesh: {eval_report.summary()}")
    else:
        train, eval_set = split_eval(train, cfg.data.eval_fraction, tc.seed)
    # an example that no micro-batch holds would stop the run at its first step, after the output
    # folder (and, under overwrite, the earlier run) has gone
    longest = max(map(task.length, [*train, *eval_set]), default=0)
    if longest > tc.micro_batch_tokens:
        raise ConfigError(f"trainer.micro_batch_tokens: {tc.micro_batch_tokens} cannot hold the longest example "
                          f"({longest} tokens{' as a pair' if task.head == 'value' else ''}): raise it to at "
                          f"least {longest}, or lower data.max_len")

    steps_per_epoch = math.ceil(len(train) / tc.batch_size)
    total = steps_per_epoch * tc.epochs
    if tc.max_steps is not None:
        total = min(total, tc.max_steps)
    if warning := warmup_outlasts_run(cfg.optim, total, "optim"):
        print(warning)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, total, cfg.optim)
    start = 0
    if resume_dir is not None:
        start = load_trainer_state(resume_dir / STATE_DIR, optimizer, scheduler)["step"]
        print(f"remesh: resumed from {resume_dir} at step {start}")

    begin_outputs(out, cfg, tc.overwrite)
    logger = MetricsLogger(out, tc.tensorboard, tc.wandb_project, config_to_dict(cfg),
                           resume_step=start if resume_dir is not None else None)
    amp = autocast_context(tc.mixed_precision, device)
    params = [p for p in model.parameters() if p.requires_grad]

    def evaluate() -> dict[str, float]:
        model.eval()
        sums: dict[str, float] = defaultdict(float)
        with torch.no_grad():
            for mb in balanced_micro_batches([task.length(e) for e in eval_set], tc.micro_batch_tokens):
                with amp():
                    _, stats = task.micro_batch(model, [eval_set[i] for i in mb], device)
                for k, v in stats.items():
                    sums[k] += v
        model.train()
        return {f"eval/{k}": v for k, v in task.metrics(sums).items()}

    def save_checkpoint(step: int) -> Path:
        folder = out / "checkpoints" / f"step_{step:06d}"
        save_hf(model, folder, tokenizer)
        save_trainer_state(folder / STATE_DIR, optimizer, scheduler, {"step": step})  # written last: marks complete
        prune_checkpoints(out, tc.keep_checkpoints)
        return folder

    bar = _progress(total, start, tc.progress, task.head)
    model.train()
    for step in range(start, total):
        epoch, index = divmod(step, steps_per_epoch)
        order = epoch_order(len(train), tc.seed, epoch)
        batch = [train[i] for i in order[index * tc.batch_size:(index + 1) * tc.batch_size]]
        units = task.units(batch)
        t0 = time.perf_counter()
        sums: dict[str, float] = defaultdict(float)
        n_tokens = 0
        for mb in balanced_micro_batches([task.length(e) for e in batch], tc.micro_batch_tokens):
            examples = [batch[i] for i in mb]
            n_tokens += sum(task.length(e) for e in examples)
            with amp():
                loss_sum, stats = task.micro_batch(model, examples, device)
            (loss_sum / units).backward()
            for k, v in stats.items():
                sums[k] += v
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc_clip(cfg.optim.grad_clip))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        metrics = {f"train/{k}": v for k, v in task.metrics(sums).items()}
        metrics.update({"train/lr": lr, "train/grad_norm": float(grad_norm), "perf/tokens_per_s": n_tokens / dt,
                        "perf/step_s": dt, "train/epoch": epoch + index / steps_per_epoch})
        done = step + 1
        evaluated = bool(tc.eval_every and eval_set and done % tc.eval_every == 0 and done < total)
        if evaluated:
            metrics.update(evaluate())
        if evaluated or done % tc.log_every == 0 or done == total:  # an eval is logged whatever log_every says
            logger.log(done, metrics)
        if tc.save_every and done % tc.save_every == 0 and done < total:
            save_checkpoint(done)
        bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", tok_s=f"{n_tokens / dt:.0f}", refresh=False)
        bar.update(1)
    bar.close()

    final_eval = evaluate() if eval_set else {}
    if final_eval:
        logger.log(total, final_eval)
    logger.close()
    final = out / "final"
    save_hf(model, final, tokenizer)
    return TrainResult(out, final, logger.path, total, final_eval)


def tc_clip(grad_clip: float) -> float:
    return grad_clip if grad_clip > 0 else math.inf  # inf: report the norm, clip nothing


def _progress(total: int, start: int, enabled: bool, head: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True,
                desc="rm" if head == "value" else "sft")
