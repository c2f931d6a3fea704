"""Responses of one rollout, and the per-token quantities the RL math needs on them.

The model runs on packed sequences; the algorithms work on padded [B, T] response tensors
(T = longest response). This module moves between the two.

Packing shares prompts: the samples of one prompt in a micro-batch (a GRPO/RLOO group) are
packed as one copy of the prompt followed by each response, every response attending to that
prompt (`AttnContext.prefix_of`). The prompt's tokens then go through the model once per
group instead of once per sample: the same log-probs and gradients for fewer tokens (on
bench/vs_trl.py's GRPO workload, 4 prompts of ~44 tokens x 4 samples of 32 tokens, 690 tokens
instead of 1224). Response token 0 of every sample is predicted from the prompt's last position,
token t > 0 from the response's own position t - 1. A sample alone in its micro-batch, or with
`share_prompts=False`, is packed as prompt + response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from remesh.data import balanced_micro_batches
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


def prompt_groups(responses: Responses, idx: Sequence[int], share_prompts: bool = True) -> list[list[int]]:
    """`idx` as the units a packed forward shares a prompt over: the samples of each prompt (in
    order of first appearance), or one unit per sample without `share_prompts`."""
    if not share_prompts:
        return [[i] for i in idx]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in idx:  # keyed by the tokens themselves: equal prompts share whatever their index
        groups.setdefault(tuple(responses.prompt_ids[i]), []).append(i)
    return list(groups.values())


def packed_tokens(responses: Responses, group: Sequence[int]) -> int:
    """Tokens of `group` packed with one copy of its (common) prompt."""
    return len(responses.prompt_ids[group[0]]) + sum(len(responses.response_ids[i]) for i in group)


@dataclass
class PackedMicroBatch:
    """Samples `idx` of a Responses packed for one forward: the model's inputs, and which packed
    positions predict which response token (row `where[0]`, column `where[1]` of [n, T])."""
    tokens: Tensor  # [L] prompts and responses, packed
    positions: Tensor  # [L]
    seq_lens: list[int]
    predict: Tensor  # packed positions that predict a response token
    targets: Tensor  # the tokens they predict
    where: tuple[Tensor, Tensor]
    shape: tuple[int, int]  # (len(idx), longest response of the whole Responses)
    prefix_of: list[int] | None = None  # per packed sequence: the shared prompt it follows, or -1

    def context(self) -> AttnContext:
        return AttnContext.packed(self.seq_lens, self.tokens.device, self.prefix_of)


def pack_micro_batch(responses: Responses, idx: Sequence[int], device: torch.device,
                     share_prompts: bool = True) -> PackedMicroBatch:
    row = {i: j for j, i in enumerate(idx)}
    segments: list[list[int]] = []
    positions: list[Tensor] = []
    prefix_of: list[int] = []
    none = torch.zeros(0, dtype=torch.long)  # keeps every cat below defined
    predict, targets, rows, cols = [none], [none], [none], [none]
    start = 0

    def add(tokens: list[int], first_position: int, prefix: int) -> int:
        nonlocal start
        segments.append(tokens)
        positions.append(torch.arange(first_position, first_position + len(tokens)))
        prefix_of.append(prefix)
        start += len(tokens)
        return start - len(tokens)

    for group in prompt_groups(responses, idx, share_prompts):
        prompt = responses.prompt_ids[group[0]]
        p = len(prompt)
        if len(group) == 1:
            i = group[0]
            response = responses.response_ids[i]
            s = add(prompt + response, 0, -1)
            predict.append(torch.arange(s + p - 1, s + p - 1 + len(response)))
        else:
            prompt_segment = len(segments)
            last = add(prompt, 0, -1) + p - 1
            for i in group:
                response = responses.response_ids[i]
                if not response:
                    continue
                s = add(response, p, prompt_segment)
                predict.append(torch.tensor([last, *range(s, s + len(response) - 1)]))
        for i in group:
            r = len(responses.response_ids[i])
            targets.append(torch.tensor(responses.response_ids[i], dtype=torch.long))
            rows.append(torch.full((r,), row[i]))
            cols.append(torch.arange(r))
    return PackedMicroBatch(torch.tensor([t for s in segments for t in s], device=device),
                            torch.cat(positions).to(device), [len(s) for s in segments],
                            torch.cat(predict).to(device), torch.cat(targets).to(device),
                            (torch.cat(rows).to(device), torch.cat(cols).to(device)),
                            (len(idx), responses.max_len), prefix_of if max(prefix_of) >= 0 else None)


def logprobs_head(model: nn.Module, hidden: Tensor, mb: PackedMicroBatch, temperature: float = 1.0,
                  chunk_tokens: int | None = None) -> Tensor:
    """The packed forward's hidden states -> log p(response token), [n, T] fp32."""
    lp = model.token_logprobs(hidden[mb.predict], mb.targets, temperature, chunk_tokens)
    return scatter_rows(lp, mb.where, *mb.shape)


def values_head(critic: nn.Module, hidden: Tensor, mb: PackedMicroBatch) -> Tensor:
    """The packed forward's hidden states -> value of the state before each response token, [n, T]."""
    return scatter_rows(critic.values(hidden[mb.predict]), mb.where, *mb.shape)


def forward_packed(model: nn.Module, mb: PackedMicroBatch) -> Tensor:
    return model(mb.tokens, mb.positions, mb.context())


def scatter_rows(values: Tensor, where: tuple[Tensor, Tensor], n_rows: int, width: int) -> Tensor:
    out = values.new_zeros(n_rows, width)
    return out.index_put((where[0], where[1]), values)


def micro_batches(responses: Responses, idx: Sequence[int], token_budget: int,
                  share_prompts: bool = True) -> list[list[int]]:
    """Token-budget micro-batches over the samples `idx` (lists of sample indices). The samples of
    one prompt stay together where their packed tokens fit the budget, so that they share it."""
    units = []
    for group in prompt_groups(responses, idx, share_prompts):
        fits = len(group) == 1 or packed_tokens(responses, group) <= token_budget
        units += [group] if fits else [[i] for i in group]
    bins = balanced_micro_batches([packed_tokens(responses, u) for u in units], token_budget)
    order = {i: k for k, i in enumerate(idx)}
    return [sorted((i for k in b for i in units[k]), key=order.__getitem__) for b in bins]
