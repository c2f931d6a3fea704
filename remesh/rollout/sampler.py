"""The simple batched KV-cache sampler the RL loop generates with.

For each chunk of up to `max_batch` sequences (prompt i, sample j), in (i, j) order:
1. allocate a KV cache with one slot per sequence, long enough for the chunk's longest prompt
   plus `max_new_tokens`;
2. prefill every distinct prompt of the chunk ONCE, in one ragged forward, into the slot of its
   first sample, then copy those cache rows into its sibling slots (a GRPO group shares the
   prefill) and sample each sibling's first token from the shared last-position logits;
3. decode: each step feeds one token per unfinished sequence (finished ones cost nothing) and
   samples the next, until a stop token or `max_new_tokens`.

A later continuous-batching speculative engine replaces this; `generate` is the interface.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from remesh.model.attention import AttnContext
from remesh.rollout.sampling import SamplingParams, sample


@dataclass
class Rollout:
    prompt_index: int  # index into the prompts list
    sample_index: int  # 0..n-1
    prompt_ids: list[int]
    response_ids: list[int]  # includes the stop token when finish_reason == "stop"
    logprobs: list[float]  # behaviour log-prob of each response token
    finish_reason: str  # "stop" | "length"


def greedy(params: SamplingParams) -> SamplingParams:
    """A copy of `params` that decodes greedily, one sample per prompt."""
    return dataclasses.replace(params, greedy=True, n=1)


def generate(model, prompts: list[list[int]], params: SamplingParams, device: torch.device | str | None = None,
             max_batch: int = 64) -> list[Rollout]:
    """Sample `params.n` responses per prompt. Returns the rollouts ordered by
    (prompt_index, sample_index). `device` (default: the model's) holds the cache and the RNG;
    the model must already be there. Reproducible for a given `params.seed` and `max_batch`."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    prompts = [[int(t) for t in p] for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    seqs = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
    out: list[Rollout] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(seqs), max_batch):
                out.extend(_generate_chunk(model, prompts, seqs[start:start + max_batch], params, device, generator))
    finally:
        model.train(was_training)
    return out


def _generate_chunk(model, prompts: list[list[int]], seqs: list[tuple[int, int]], params: SamplingParams,
                    device: torch.device, generator: torch.Generator) -> list[Rollout]:
    n_seq = len(seqs)
    prompt_lens = [len(prompts[i]) for i, _ in seqs]
    cache = model.new_kv_cache(n_seq, max(prompt_lens) + params.max_new_tokens, device=device)

    # prefill: each distinct prompt once, into the slot of its first sequence in this chunk
    first_slot: dict[int, int] = {}
    for slot, (i, _) in enumerate(seqs):
        first_slot.setdefault(i, slot)
    uniq = list(first_slot)  # prompt indices, in order
    lens = [len(prompts[i]) for i in uniq]
    tokens = torch.tensor([t for i in uniq for t in prompts[i]], dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    ctx = AttnContext.with_cache(cache, [first_slot[i] for i in uniq], [0] * len(uniq), lens)
    h = model(tokens, positions, ctx)
    last = ctx.cu_seqlens[1:].long() - 1
    logits = model.logits(h[last])  # [U, V]
    row = {i: r for r, i in enumerate(uniq)}
    src = [first_slot[i] for i, _ in seqs]
    siblings = [s for s in range(n_seq) if src[s] != s]
    if siblings:  # share the prefill: copy cache rows into the other samples' slots
        dst_t = torch.tensor(siblings, device=device)
        src_t = torch.tensor([src[s] for s in siblings], device=device)
        width = max(lens)
        cache.k[:, dst_t, :, :width] = cache.k[:, src_t, :, :width]
        cache.v[:, dst_t, :, :width] = cache.v[:, src_t, :, :width]
    logits = logits[torch.tensor([row[i] for i, _ in seqs], device=device)]  # [n_seq, V]

    stop = set(params.stop_token_ids)
    responses: list[list[int]] = [[] for _ in range(n_seq)]
    logps: list[list[float]] = [[] for _ in range(n_seq)]
    reasons: list[str | None] = [None] * n_seq
    active = list(range(n_seq))
    while True:
        tok, lp = sample(logits, params, generator)
        still = []
        for s, t, l in zip(active, tok.tolist(), lp.tolist()):
            responses[s].append(t)
            logps[s].append(l)
            if t in stop:
                reasons[s] = "stop"
            elif len(responses[s]) >= params.max_new_tokens:
                reasons[s] = "length"
            else:
                still.append(s)
        if not still:
            break
        if len(still) != len(active):  # keep the sampled tokens of the unfinished sequences only
            keep = [k for k, s in enumerate(active) if reasons[s] is None]
            tok = tok[torch.tensor(keep, device=device)]
        active = still
        # the new token of each unfinished sequence sits right after its cached prefix
        cache_lens = [prompt_lens[s] + len(responses[s]) - 1 for s in active]
        ctx = AttnContext.with_cache(cache, active, cache_lens, [1] * len(active))
        h = model(tok, torch.tensor(cache_lens, device=device), ctx)
        logits = model.logits(h)

    return [Rollout(prompt_index=i, sample_index=j, prompt_ids=list(prompts[i]), response_ids=responses[s],
                    logprobs=logps[s], finish_reason=reasons[s]) for s, (i, j) in enumerate(seqs)]
