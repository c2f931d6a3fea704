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


@dataclass
class PackedMicroBatch:
    """Samples `idx` of a Responses packed for one forward: the model's inputs, and which packed
    positions predict which response token (row `where[0]`, column `where[1]` of [n, T])."""
    tokens: Tensor  # [L] prompt + response tokens, packed
    positions: Tensor  # [L]
    seq_lens: list[int]
    predict: Tensor  # packed positions that predict a response token
    targets: Tensor  # the tokens they predict
    where: tuple[Tensor, Tensor]
    shape: tuple[int, int]  # (len(idx), longest response of the whole Responses)


def pack_micro_batch(responses: Responses, idx: Sequence[int], device: torch.device) -> PackedMicroBatch:
    batch = pack_sequences(responses.sequences(idx))
    cu = batch.cu_seqlens.tolist()
    pos, rows, cols = _response_positions(responses, idx, cu)
    batch = batch.to(device)
    pos = pos.to(device)
    return PackedMicroBatch(batch.tokens, batch.positions, batch.seq_lens(), pos, batch.tokens[pos + 1],
                            (rows.to(device), cols.to(device)), (len(idx), responses.max_len))


def logprobs_head(model: nn.Module, hidden: Tensor, mb: PackedMicroBatch, temperature: float = 1.0,
                  chunk_tokens: int | None = None) -> Tensor:
    """The packed forward's hidden states -> log p(response token), [n, T] fp32."""
    lp = model.token_logprobs(hidden[mb.predict], mb.targets, temperature, chunk_tokens)
    return scatter_rows(lp, mb.where, *mb.shape)


def values_head(critic: nn.Module, hidden: Tensor, mb: PackedMicroBatch) -> Tensor:
    """The packed forward's hidden states -> value of the state before each response token, [n, T]."""
    return scatter_rows(critic.values(hidden[mb.predict]), mb.where, *mb.shape)


def forward_packed(model: nn.Module, mb: PackedMicroBatch) -> Tensor:
    return model(mb.tokens, mb.positions, AttnContext.packed(mb.seq_lens, mb.tokens.device))


def scatter_rows(values: Tensor, where: tuple[Tensor, Tensor], n_rows: int, width: int) -> Tensor:
    out = values.new_zeros(n_rows, width)
    return out.index_put((where[0], where[1]), values)


def micro_batches(responses: Responses, idx: Sequence[int], token_budget: int) -> list[list[int]]:
    """Token-budget micro-batches over the samples `idx` (lists of sample indices)."""
    all_lengths = responses.lengths()
    lengths = [all_lengths[i] for i in idx]
    return [[idx[k] for k in mb] for mb in balanced_micro_batches(lengths, token_budget)]
