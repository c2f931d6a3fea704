"""Sampling parameters and the distribution a token is drawn from, as pure functions.

`target_logprobs` is the single definition of "the distribution we sample from" (temperature,
then top-k, then top-p, renormalised). `sample` draws from exactly that distribution, so the
log-prob it returns is the behaviour log-prob of the drawn token; speculative decoding reuses
`target_logprobs` for its acceptance test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    greedy: bool = False
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1  # samples per prompt
    seed: int = 0

    def __post_init__(self) -> None:
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 unless greedy, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def target_logprobs(logits: Tensor, params: SamplingParams) -> Tensor:
    """logits [B, V] -> fp32 [B, V] log-probabilities of the sampling distribution; tokens that
    cannot be drawn get -inf. Greedy is a point mass on the argmax."""
    x = logits.float()
    if params.greedy:
        out = torch.full_like(x, float("-inf"))
        return out.scatter_(1, x.argmax(dim=-1, keepdim=True), 0.0)
    if params.temperature != 1.0:
        x = x / params.temperature
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab:  # exactly the k largest, even with ties
        keep = torch.zeros_like(x, dtype=torch.bool).scatter_(1, x.topk(params.top_k, dim=-1).indices, True)
        x = x.masked_fill(~keep, float("-inf"))
    if params.top_p < 1.0:
        # smallest set of most probable tokens with cumulative probability >= top_p: a token is
        # kept when the mass strictly before it is still < top_p (so the top token always is)
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs
        drop_sorted = before >= params.top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x.log_softmax(dim=-1)


def inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """One token per row of (unnormalised) probs [B, V] from uniforms u [B] in [0, 1): the first
    token whose cumulative mass exceeds u * total. Tokens with zero mass are never drawn."""
    cdf = probs.double().cumsum(dim=-1)  # fp64: the sum over a large vocabulary drifts in fp32
    idx = torch.searchsorted(cdf, (u.to(cdf.device, cdf.dtype) * cdf[:, -1])[:, None], right=True).squeeze(1)
    idx = idx.clamp_max(probs.shape[-1] - 1)
    bad = probs.gather(1, idx[:, None]).squeeze(1) <= 0  # rounding at u ~ 1: take the last live token
    if bool(bad.any()):
        last_live = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
        idx = torch.where(bad, last_live, idx)
    return idx


def sample(logits: Tensor, params: SamplingParams, uniforms: Tensor | None = None,
           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw one token per row of logits [B, V] -> (tokens [B] int64, fp32 log-probs [B] of each
    drawn token under `target_logprobs`). Row b uses `uniforms[b]` (inverse CDF), or a fresh
    uniform from `generator`; the engine passes each sequence's own uniform for the position."""
    logp = target_logprobs(logits, params)
    if params.greedy:
        tokens = logp.argmax(dim=-1)
    else:
        if uniforms is None:
            uniforms = torch.rand(logp.shape[0], generator=generator, device=logp.device)
        tokens = inverse_cdf(logp.exp(), uniforms)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)
