"""Metrics sinks: JSONL always, TensorBoard and Weights & Biases when configured."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from remesh.train.state import write_text_whole


class MetricsLogger:
    def __init__(self, output_dir: Path, tensorboard: bool = True, wandb_project: str | None = None,
                 run_config: dict[str, Any] | None = None, resume_step: int | None = None):
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        # a resumed run continues the file as if it had never stopped; the rows it keeps are
        # written whole before it goes on, so a resumed run killed early loses none of them
        kept = _lines_up_to(self.path, resume_step) if resume_step is not None else []
        write_text_whole(self.path, "".join(kept))
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run hides the killed run's events after its checkpoint, as metrics.jsonl drops them
            purge = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=purge)
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("trainer.wandb_project is set but wandb is not installed: pip install wandb") from e
            self._wandb = wandb.init(project=wandb_project, config=run_config, dir=str(output_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), step)
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _lines_up_to(path: Path, step: int) -> list[str]:
    """Complete lines of an earlier run up to `step`; later ones (and a line torn by a kill) go."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if line.endswith("\n") and row.get("step", 0) <= step:
            kept.append(line)
    return kept


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
