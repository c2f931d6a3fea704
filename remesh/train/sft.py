"""Supervised fine-tuning: next-token NLL on response (assistant) tokens only."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from remesh.data import SFTExample, load_sft_dataset, pack_sequences, shifted_targets, target_loss_mask
from remesh.model import AttnContext
from remesh.train.configs import SFTConfig
from remesh.train.trainer import TrainResult, run_training


@dataclass
class SFTTask:
    cfg: SFTConfig
    head: str = "lm"

    def load(self, path: str, tokenizer: Any):
        d = self.cfg.data
        return load_sft_dataset(path, tokenizer, max_prompt_len=d.max_prompt_len, max_len=d.max_len,
                                skip_bad_rows=d.skip_bad_rows)

    def length(self, example: SFTExample) -> int:
        return len(example.input_ids)

    def units(self, examples: Sequence[SFTExample]) -> int:
        return sum(sum(e.loss_mask[1:]) for e in examples)  # trained target tokens

    def micro_batch(self, model: nn.Module, examples: Sequence[SFTExample], device: torch.device) -> tuple[Tensor, dict]:
        batch = pack_sequences([e.input_ids for e in examples], [e.loss_mask for e in examples]).to(device)
        hidden = model(batch.tokens, batch.positions, AttnContext.packed(batch.seq_lens(), device))
        targets, _ = shifted_targets(batch)
        idx = target_loss_mask(batch).nonzero().squeeze(1)  # the LM head runs on trained positions only
        logp = model.token_logprobs(hidden[idx], targets[idx], chunk_tokens=self.cfg.model.logprob_chunk_tokens)
        nll = -logp.sum()
        return nll, {"nll": nll.item(), "tokens": float(idx.numel())}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        loss = sums["nll"] / max(sums["tokens"], 1.0)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "target_tokens": sums["tokens"]}


def train_sft(cfg: SFTConfig) -> TrainResult:
    return run_training(cfg, SFTTask(cfg))
