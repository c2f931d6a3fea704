"""Token-budget micro-batching and packing of variable-length sequences.

The model runs on *packed* batches: several sequences concatenated into one flat token stream
with no padding, described by cumulative lengths (``cu_seqlens``, as flash-attention's varlen
kernels take them). Positions restart at 0 for every sequence.

Loss convention (what trainers use): the logits at position t predict ``tokens[t+1]``, which
only exists inside the same sequence. `shifted_targets` gives those targets plus a `valid` mask
(False at each sequence's last token), and `target_loss_mask` additionally applies the batch's
per-token ``loss_mask`` (which marks *target* tokens) shifted left by one, so that
``logprobs[t] = log_softmax(logits[t])[targets[t]]`` is trained on exactly where
``target_loss_mask(batch)[t]`` is True.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

__all__ = ["balanced_micro_batches", "PackedBatch", "pack_sequences", "shifted_targets", "target_loss_mask"]


def balanced_micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Partition item indices into micro-batches whose token sums are <= token_budget.

    Uses max(ceil(total / budget), 1) bins to start with, then places items longest first into
    the least-loaded bin that still fits, opening a new bin when none does. This keeps the
    number of micro-batches near the minimum and their token counts balanced (so data-parallel
    ranks / gradient-accumulation steps do similar work). Deterministic: ties go to the lower
    index / earlier bin. Indices inside a bin are in original order; bins in creation order.
    Raises ValueError for an item longer than the budget (it could never fit).
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"item {i} has negative length {n}")
        if n > token_budget:
            raise ValueError(f"item {i} has {n} tokens, more than the micro-batch token budget {token_budget}")
    if not lengths:
        return []
    n_bins = max(1, math.ceil(sum(lengths) / token_budget))
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    # Min-heap of (load, bin index) gives the least-loaded bin; if it doesn't fit, no bin does.
    heap = [(0, b) for b in range(n_bins)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, b = heap[0]
        if load + lengths[i] <= token_budget:
            heapq.heapreplace(heap, (load + lengths[i], b))
        else:
            b = len(bins)
            bins.append([])
            heapq.heappush(heap, (lengths[i], b))
        bins[b].append(i)
    return [sorted(b) for b in bins]


@dataclass
class PackedBatch:
    """Sequences concatenated without padding.

    tokens, positions: [T] int64; cu_seqlens: [B+1] int32 (0, len0, len0+len1, ...);
    loss_mask: optional [T] bool, True where tokens[t] is a trained *target* (predicted from
    position t-1); always False at each sequence's first token.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    loss_mask: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    def seq_lens(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return replace(
            self, tokens=mv(self.tokens), positions=mv(self.positions), cu_seqlens=mv(self.cu_seqlens), loss_mask=mv(self.loss_mask)
        )


def pack_sequences(seqs: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[bool]] | None = None) -> PackedBatch:
    """Concatenate token sequences into a PackedBatch (on CPU). loss_masks[i][j] marks token j of
    sequence i as a trained target; it is forced False at each sequence's first token, which has
    no preceding position to predict it from."""
    if not seqs:
        raise ValueError("pack_sequences needs at least one sequence")
    lens = [len(s) for s in seqs]
    if min(lens) == 0:
        raise ValueError(f"sequence {lens.index(0)} is empty")
    if loss_masks is not None:
        if len(loss_masks) != len(seqs):
            raise ValueError(f"{len(loss_masks)} loss masks for {len(seqs)} sequences")
        for i, (s, m) in enumerate(zip(seqs, loss_masks)):
            if len(m) != len(s):
                raise ValueError(f"sequence {i}: loss mask has {len(m)} entries for {len(s)} tokens")
    tokens = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    positions = torch.cat([torch.arange(n, dtype=torch.long) for n in lens])
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
    mask = None
    if loss_masks is not None:
        mask = torch.tensor([bool(x) for m in loss_masks for x in m], dtype=torch.bool)
        mask[cu[:-1].long()] = False
    return PackedBatch(tokens, positions, cu, max(lens), mask)


def _last_token_mask(batch: PackedBatch) -> torch.Tensor:
    last = torch.zeros(batch.num_tokens, dtype=torch.bool, device=batch.tokens.device)
    last[batch.cu_seqlens[1:].long() - 1] = True
    return last


def shifted_targets(batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets [T], valid [T]): targets[t] = tokens[t+1] where t+1 is in the same sequence
    (valid[t] True); at each sequence's last token valid is False and targets[t] is 0 (a safe
    index for gather; mask it out)."""
    valid = ~_last_token_mask(batch)
    targets = torch.roll(batch.tokens, -1) * valid
    return targets, valid


def target_loss_mask(batch: PackedBatch) -> torch.Tensor:
    """[T] bool: True at position t when predicting tokens[t+1] is trained on, i.e.
    valid[t] & loss_mask[t+1]. Without a loss_mask every valid target is trained on."""
    valid = ~_last_token_mask(batch)
    if batch.loss_mask is None:
        return valid
    return valid & torch.roll(batch.loss_mask, -1)
