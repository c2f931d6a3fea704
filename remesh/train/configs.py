"""Typed configs of training runs (SFT and reward model), loaded by `remesh.config.load_config`.

Every run config has a `kind`, which `remesh train CONFIG` uses to pick the trainer.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Literal

from remesh.config import FieldError, require_at_least, require_positive


@dataclass
class ModelConfig:
    path: str = "default"  # HF folder, .gguf file, or "default" (embedded SmolLM2-135M-Instruct)
    dtype: Literal["float32", "bfloat16"] = "float32"  # parameter (and optimizer state) dtype
    logprob_chunk_tokens: int = 0  # tokens per chunk of full-vocabulary logits; 0: 512 MiB of fp32 logits

    def __post_init__(self) -> None:
        require_at_least(self, 0, "logprob_chunk_tokens")


@dataclass
class DataConfig:
    train: str = "data/demo/sft.jsonl"
    eval: str | None = None  # a separate eval file; otherwise `eval_fraction` of `train` is held out
    eval_fraction: float = 0.05
    max_prompt_len: int = 256
    max_len: int = 512
    skip_bad_rows: bool = False  # drop malformed rows (and report them) instead of failing

    def __post_init__(self) -> None:
        if not 0 <= self.eval_fraction < 1:
            raise FieldError("eval_fraction", f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        require_at_least(self, 1, "max_prompt_len", "max_len")
        if self.max_prompt_len > self.max_len:
            raise ValueError(f"max_prompt_len ({self.max_prompt_len}) exceeds max_len ({self.max_len})")


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    min_lr_ratio: float = 0.1  # final lr / lr for cosine and linear decay
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # ZeRO-1: under an execution plan, each data-parallel rank of a train call keeps the Adam state
    # of 1/dp of the parameters and broadcasts the ones it updates (no effect on one process)
    zero: bool = False

    def __post_init__(self) -> None:
        require_positive(self, "lr", "eps")
        require_at_least(self, 0, "weight_decay", "warmup_steps", "grad_clip")
        if not 0 <= self.min_lr_ratio <= 1:
            raise FieldError("min_lr_ratio", f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not all(0 <= b < 1 for b in self.betas):
            raise FieldError("betas", f"betas must each be in [0, 1), got {list(self.betas)}")


def check_wandb(trainer: Any) -> None:
    """For a trainer config's ``__post_init__``: a W&B project needs wandb (an optional extra),
    known at load time rather than once the run has started writing."""
    if trainer.wandb_project and importlib.util.find_spec("wandb") is None:
        raise FieldError("wandb_project", "wandb_project is set but wandb is not installed: pip install wandb")


@dataclass
class TrainerConfig:
    output_dir: str = "runs/sft"
    seed: int = 0
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule spans them)
    batch_size: int = 16  # sequences (or preference pairs) per optimizer step
    micro_batch_tokens: int = 4096  # token budget of one forward/backward; gradients accumulate over them
    eval_every: int = 50  # steps; 0 disables periodic eval (a final eval still runs)
    save_every: int = 0  # steps between checkpoints; 0: only the final model
    keep_checkpoints: int = 2  # most recent step checkpoints kept on disk; 0: all
    log_every: int = 1
    resume: str | None = None  # a checkpoint folder, or "latest" in output_dir
    overwrite: bool = False  # a fresh run into an output_dir holding an earlier run removes it (else: refused)
    mixed_precision: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 autocast on CUDA when supported
    device: str = "auto"  # auto: cuda if available, else cpu
    tensorboard: bool = True
    wandb_project: str | None = None  # log to Weights & Biases when set (needs `pip install wandb`)
    progress: bool = True

    def __post_init__(self) -> None:
        require_at_least(self, 1, "batch_size", "micro_batch_tokens", "epochs", "max_steps", "log_every")
        require_at_least(self, 0, "eval_every", "save_every", "keep_checkpoints")
        check_wandb(self)


@dataclass
class SFTConfig:
    kind: Literal["sft"] = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, warmup_steps=5))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class RMConfig:
    """Reward model: the backbone of `model.path` with a scalar head, Bradley-Terry loss on pairs."""

    kind: Literal["rm"] = "rm"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(train="data/demo/preferences.jsonl"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=5))
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(output_dir="runs/rm", batch_size=8))

