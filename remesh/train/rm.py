"""Reward-model training: Bradley-Terry pairwise loss, -log sigmoid(r(chosen) - r(rejected)).

The reward of a sequence is the value head at its last token (`reward.scorer.sequence_rewards`,
as RL scores it). A pair's two sequences always share a micro-batch, so the pairwise loss is
formed inside one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from remesh.data import PreferenceExample, load_preference_dataset
from remesh.reward.scorer import sequence_rewards
from remesh.train.configs import RMConfig
from remesh.train.trainer import TrainResult, run_training


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Per-pair -log sigmoid(r_c - r_r) (numerically stable)."""
    return -F.logsigmoid(chosen - rejected)


@dataclass
class RMTask:
    cfg: RMConfig
    head: str = "value"

    def load(self, path: str, tokenizer: Any):
        d = self.cfg.data
        return load_preference_dataset(path, tokenizer, max_prompt_len=d.max_prompt_len, max_len=d.max_len,
                                       skip_bad_rows=d.skip_bad_rows)

    def length(self, example: PreferenceExample) -> int:
        return len(example.chosen_ids) + len(example.rejected_ids)

    def units(self, examples: Sequence[PreferenceExample]) -> int:
        return len(examples)

    def micro_batch(self, model: nn.Module, examples: Sequence[PreferenceExample],
                    device: torch.device) -> tuple[Tensor, dict]:
        seqs = [s for e in examples for s in (e.chosen_ids, e.rejected_ids)]
        rewards = sequence_rewards(model, seqs, device)
        chosen, rejected = rewards[0::2], rewards[1::2]
        loss = bradley_terry_loss(chosen, rejected).sum()
        margin = (chosen - rejected).detach()
        return loss, {"loss": loss.item(), "correct": float((margin > 0).sum()), "margin": float(margin.sum()),
                      "pairs": float(len(examples))}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["pairs"], 1.0)
        return {"loss": sums["loss"] / n, "accuracy": sums["correct"] / n, "margin": sums["margin"] / n}


def train_rm(cfg: RMConfig) -> TrainResult:
    return run_training(cfg, RMTask(cfg))
