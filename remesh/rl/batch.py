"""Responses of one rollout, and the per-token quantities the RL math needs on them.

The model runs on packed prompt+response sequences; the algorithms work on padded
[B, T] response tensors (T = longest response). This module moves between the two: for
response token t of sample b, the packed position predicting it is prompt_len - 1 + t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from remesh.data import balanced_micro_batches, pack_sequences
from remesh.model import AttnContext


@dataclass
class Responses:
    prompt_index: list[int]  # index of each sample's prompt in the iteration's prompt list
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    finish_reason: list[str]

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def max_len(self) -> int:
        return max((len(r) for r in self.response_ids), default=0)

    def lengths(self) -> list[int]:
        return [len(p) + len(r) for p, r in zip(self.prompt_ids, self.response_ids)]

    def sequences(self, idx: Sequence[int] | None = None) -> list[list[int]]:
        idx = range(len(self)) if idx is None else idx
        return [self.prompt_ids[i] + self.response_ids[i] for i in idx]

    def mask(self, device: torch.device | str = "cpu") -> Tensor:
        """[B, T] float: 1 on response tokens."""
        m = torch.zeros(len(self), self.max_len, device=device)
        for b, r in enumerate(self.response_ids):
            m[b, :len(r)] = 1.0
        return m

    def pad(self, rows: Sequence[Sequence[float]], device: torch.device | str = "cpu") -> Tensor:
        """Per-token lists (one per sample) -> [B, T] fp32, zeros after each response."""
        out = torch.zeros(len(self), self.max_len, device=device)
        for b, row in enumerate(rows):
            out[b, :len(row)] = torch.as_tensor(row, dtype=torch.float32)
        return out


def _response_positions(responses: Responses, idx: Sequence[int], cu: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Packed positions predicting each response token, with (row, column) in the padded layout."""
    pos, rows, cols = [], [], []
    for j, i in enumerate(idx):
        p, r = len(responses.prompt_ids[i]), len(responses.response_ids[i])
        pos.append(torch.arange(cu[j] + p - 1, cu[j] + p - 1 + r))
        rows.append(torch.full((r,), j))
        cols.append(torch.arange(r))
    return torch.cat(pos), torch.cat(rows), torch.cat(cols)


def micro_batch_hidden(model: nn.Module, responses: Responses, idx: Sequence[int],
                       device: torch.device) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """Hidden states at the positions predicting response tokens, those tokens, and where they go in [b, T]."""
    batch = pack_sequences(responses.sequences(idx))
    cu = batch.cu_seqlens.tolist()
    pos, rows, cols = _response_positions(responses, idx, cu)
    batch = batch.to(device)
    hidden = model(batch.tokens, batch.positions, AttnContext.packed(batch.seq_lens(), device))
    pos = pos.to(device)
    return hidden[pos], batch.tokens[pos + 1], (rows.to(device), cols.to(device))


def scatter_rows(values: Tensor, where: tuple[Tensor, Tensor], n_rows: int, width: int) -> Tensor:
    out = values.new_zeros(n_rows, width)
    return out.index_put((where[0], where[1]), values)


def micro_logprobs(model: nn.Module, responses: Responses, idx: Sequence[int], device: torch.device,
                   temperature: float = 1.0, chunk_tokens: int | None = None) -> Tensor:
    """log p(response token) for the samples `idx`, [len(idx), T] fp32 (differentiable)."""
    h, targets, where = micro_batch_hidden(model, responses, idx, device)
    lp = model.token_logprobs(h, targets, temperature, chunk_tokens)
    return scatter_rows(lp, where, len(idx), responses.max_len)


def micro_values(critic: nn.Module, responses: Responses, idx: Sequence[int], device: torch.device) -> Tensor:
    """Critic value of the state before each response token, [len(idx), T] fp32 (differentiable)."""
    h, _, where = micro_batch_hidden(critic, responses, idx, device)
    return scatter_rows(critic.values(h), where, len(idx), responses.max_len)


def micro_batches(responses: Responses, idx: Sequence[int], token_budget: int) -> list[list[int]]:
    """Token-budget micro-batches over the samples `idx` (lists of sample indices)."""
    all_lengths = responses.lengths()
    lengths = [all_lengths[i] for i in idx]
    return [[idx[k] for k in mb] for mb in balanced_micro_batches(lengths, token_budget)]


@torch.no_grad()
def all_logprobs(model: nn.Module, responses: Responses, device: torch.device, token_budget: int,
                 temperature: float = 1.0, chunk_tokens: int | None = None) -> Tensor:
    out = torch.zeros(len(responses), responses.max_len, device=device)
    for mb in micro_batches(responses, list(range(len(responses))), token_budget):
        out[mb] = micro_logprobs(model, responses, mb, device, temperature, chunk_tokens)
    return out


@torch.no_grad()
def all_values(critic: nn.Module, responses: Responses, device: torch.device, token_budget: int) -> Tensor:
    out = torch.zeros(len(responses), responses.max_len, device=device)
    for mb in micro_batches(responses, list(range(len(responses))), token_budget):
        out[mb] = micro_values(critic, responses, mb, device)
    return out
