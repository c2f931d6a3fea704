"""Decode and verification steps replayed as CUDA graphs.

A decode step of a small model is hundreds of small kernels (SmolLM2-135M: 30 layers of norms,
projections, rotary embeddings, attention), each a few microseconds of GPU work behind a launch
that costs more than that from Python. Captured once into a CUDA graph, the step is one launch
(gpt-fast gets there with torch.compile). A graph replays fixed shapes on fixed buffers, so:
- a step of b sequences with n tokens each runs the graph of (B, n), B the smallest bucket >= b;
  rows b..B-1 are padding that writes into the cache's scratch slot, which no sequence owns;
- the forward is `AttnContext.graph_safe`'s: lengths, slots and the tree mask are device tensors
  refilled in place before each replay, and attention covers a fixed number C of cache
  positions, masked. C is a power of two (at least `min_context` and an eighth of the cache's
  length, at most its length) that holds the step's longest context, so a graph is keyed
  (B, n, C), with at most 4 values of C: attention and the gather of the slots' rows cost
  about what the contexts need, not the whole cache's length (on SmolLM2 at batch 1, a quarter
  of the step's kernel time was attention over the whole cache);
  the graphs of one (B, n) share their logits buffer, so more of them cost little memory;
- a shape waits for its capture. Its steps meanwhile replay the smallest graph captured for more
  sequences or a longer context with the same n (a stand-in: more padding, a step 0.4-1.5 ms
  slower on an H100 at one context, still a fraction of an eager step's launches), or run
  eagerly if none. A
  capture costs 0.06-0.14 s (SmolLM2-135M, H100), so it is paid for a shape that will be used
  often enough: after `capture_after` uses (default 2) if it runs eagerly or on a stand-in of
  more than STAND_IN_SPAN times its (batch x context) meanwhile, after `stand_in_after`
  (default 64, STAND_IN_USES) if it has a stand-in that close. Rare shapes of
  probes and short-lived strategies never pay one, and uses count across calls while the cache
  is kept. (When covered shapes were captured on their third use, auto captured 24 graphs at
  batch 16 over the bench's four calls, its calibration's among them, and off 5:
  rollout_cuda_T0.7_lengthmix.json, session 22);
- graphs belong to one KV cache and die with it (`RolloutEngine(keep_cache=)` says whether the
  engine keeps its cache from one call to the next).

`capture=False` runs the same padded, graph-safe forward eagerly: the CPU tests prove with it
everything but the capture itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from remesh.model.attention import AttnContext, KVCache

# uses a shape that a captured graph can stand in for waits for its own capture: a stand-in
# costs a step 0.4-1.5 ms more than the shape's own graph (an H100 replaying SmolLM2-135M's
# batch-16 graph for 4 or 1 sequences, bench/step_graphs.py), a capture 0.06-0.14 s: the
# capture pays for itself after some 40-350 uses. Only for a stand-in of at most STAND_IN_SPAN
# times the shape's (batch bucket x context bucket): those costs were measured at 4x the rows, and
# a calibration graph (16 rows, the cache's whole length) standing in for a step of one sequence
# at a short context would cost more than that
STAND_IN_USES = 64
STAND_IN_SPAN = 4


def bucket(b: int, limit: int) -> int:
    """The smallest power of two >= b, at most `limit` (a step never holds more than `limit`)."""
    return min(1 << max(b - 1, 0).bit_length(), limit)


def context_bucket(context: int, smallest: int, limit: int) -> int:
    """Cache positions a graph of a step whose longest context (cached plus new tokens) is
    `context` attends to: the smallest power of two >= it, at least `smallest`, at most `limit`."""
    return min(max(bucket(context, limit), smallest), limit)


@dataclass
class _Graph:
    inputs: Tensor  # ids [B * n], positions [B * n], slots [B], cache_lens [B], back to back: one copy fills them
    mask: Tensor | None  # [B, n, n] among the new tokens (n > 1)
    logits: Tensor  # [B * n, vocab], the output (shared by the graphs of one (B, n))
    graph: torch.cuda.CUDAGraph | None
    filled: int = 0  # real rows of the last step: rows beyond the next step's must be reset to padding

    def split(self, big_b: int, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.inputs.split([big_b * n, big_b * n, big_b, big_b])


class StepGraphs:
    """Replays `model`'s cache steps of shape (batch bucket, tokens per sequence, context bucket)
    as CUDA graphs over `cache`, whose slot `scratch_slot` padding rows may overwrite."""

    def __init__(self, model: nn.Module, cache: KVCache, scratch_slot: int, max_batch: int, capture: bool = True,
                 capture_after: int = 2, min_context: int = 64, counted_elsewhere: Callable[[], float] | None = None,
                 stand_in_after: int = STAND_IN_USES):
        if not 0 <= scratch_slot < cache.n_slots:
            raise ValueError(f"scratch slot {scratch_slot} is not a slot of a {cache.n_slots}-slot cache")
        self.model, self.cache, self.scratch, self.max_batch = model, cache, scratch_slot, max_batch
        self.capture, self.min_context = capture and cache.k.is_cuda, min_context
        self.capture_after, self.stand_in_after = capture_after, stand_in_after
        self.graphs: dict[tuple[int, int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None  # one memory pool for every graph
        self._outputs: dict[tuple[int, int], Tensor] = {}  # (B, n) -> the logits buffer its graphs fill
        self._uses: dict[tuple[int, int, int], int] = {}
        self.captures = 0
        self.capture_seconds = 0.0  # warm-ups and captures: one-time work inside the steps that did it
        # seconds so far of one-time work that a warm-up may do but that is counted elsewhere (the
        # engine's projection layout timings, kernels.py): left out of `capture_seconds`
        self.counted_elsewhere = counted_elsewhere or (lambda: 0.0)
        self.eager_runs = 0  # steps left to the eager forward because their shape was not captured yet
        self.stand_in_runs = 0  # steps that replayed a larger shape's graph while theirs was not captured yet
        # steps that ran otherwise than their shape will for long: eagerly, or on a stand-in
        # farther than STAND_IN_SPAN, each a few uses before the shape's capture
        self.provisional_runs = 0

    def logits_bytes(self) -> int:
        """Bytes of the logits buffers the graphs write (their memory pool's activations not counted)."""
        return sum(t.nbytes for t in self._outputs.values())

    def key(self, b: int, n: int, context: int) -> tuple[int, int, int]:
        """The graph of a step of `b` sequences, `n` new tokens each, the longest context (cached
        plus new tokens) `context`. Contexts come in at most 4 buckets (none below an eighth of
        the cache): every bucket is one more capture of each (batch, tokens) shape per call."""
        smallest = max(self.min_context, self.cache.max_len // 8)
        return bucket(b, self.max_batch), n, context_bucket(context, smallest, self.cache.max_len)

    def route(self, b: int, n: int, context: int, now: bool = False) -> tuple[int, int, int] | None:
        """The graph a step of `b` sequences, `n` tokens each and longest context `context` is to
        replay through `logits`: its own (existing, or captured by this use if due; `now`: at
        once), else a stand-in (the smallest existing graph of the same n covering the step), else
        None: run eagerly. Each call counts as a use of its own shape; a shape with a close
        stand-in is due later than one without."""
        key = self.key(b, n, context)
        if key in self.graphs:
            return key
        uses = self._uses[key] = self._uses.get(key, 0) + 1
        covering = [k for k in self.graphs if k[1] == n and k[0] >= key[0] and k[2] >= key[2]]
        stand_in = min(covering, key=lambda k: k[0] * k[2]) if covering else None
        close = stand_in is not None and stand_in[0] * stand_in[2] <= STAND_IN_SPAN * key[0] * key[2]
        if now or uses > (self.stand_in_after if close else self.capture_after):
            return key
        self.provisional_runs += not close
        if stand_in is not None:
            self.stand_in_runs += 1
        else:
            self.eager_runs += 1
        return stand_in

    def logits(self, ids: list[int], positions: list[int], slots: list[int], cache_lens: list[int],
               mask: Tensor | None = None, graph: tuple[int, int, int] | None = None) -> Tensor:
        """The step's logits [b * n, vocab]: `ids` and `positions` (b * n, n tokens per sequence,
        sequence-major), each sequence's cache `slots` and `cache_lens`, `mask` [b, n, n] on the
        device or None (causal; plain decoding has n == 1). Same contract as the eager forward
        with `AttnContext.with_cache`. `graph`: the one to replay (`route`), else the step's own
        (captured now if it has none)."""
        b = len(slots)
        n = len(ids) // b
        key = graph or self.key(b, n, max(cache_lens) + n)
        g = self.graphs.get(key) or self._build(*key)
        big_b = key[0]
        pad_tokens, pad_rows = [0] * (big_b - b) * n, big_b - b
        # padding rows: the scratch slot from position 0
        g.inputs.copy_(torch.tensor(ids + pad_tokens + positions + pad_tokens + slots + [self.scratch] * pad_rows
                                    + cache_lens + [0] * pad_rows))
        if g.mask is not None:
            g.mask[:b].copy_(mask)
            if g.filled > b:  # earlier real rows become padding: each token attends to itself
                g.mask[b:g.filled] = torch.eye(n, dtype=torch.bool, device=g.mask.device)
        g.filled = b
        if g.graph is not None:
            g.graph.replay()
        else:
            g.logits = self._forward(g, big_b, n, key[2])
        return g.logits[:b * n]

    def _build(self, big_b: int, n: int, context: int) -> _Graph:
        device = self.cache.k.device
        inputs = torch.zeros(2 * big_b * n + 2 * big_b, dtype=torch.long, device=device)
        g = _Graph(inputs=inputs, logits=None, graph=None,  # type: ignore[arg-type]
                   mask=torch.eye(n, dtype=torch.bool, device=device).repeat(big_b, 1, 1) if n > 1 else None)
        g.split(big_b, n)[2].fill_(self.scratch)
        if self.capture:
            t0, elsewhere = time.perf_counter(), self.counted_elsewhere()
            # warm up on a side stream (allocator, cuBLAS workspaces), as capture requires; the
            # buffers hold padding only, so these runs write nothing but the scratch slot
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    out = self._forward(g, big_b, n, context)
            torch.cuda.current_stream(device).wait_stream(stream)
            g.logits = self._outputs.get((big_b, n))
            if g.logits is None:  # allocated outside the graphs, whose own logits are then transient
                g.logits = self._outputs[big_b, n] = torch.empty_like(out)
            del out
            g.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g.graph, pool=self.pool):
                g.logits.copy_(self._forward(g, big_b, n, context))
            self.captures += 1
            torch.cuda.synchronize(device)
            self.capture_seconds += time.perf_counter() - t0 - (self.counted_elsewhere() - elsewhere)
        self.graphs[big_b, n, context] = g
        return g

    def _forward(self, g: _Graph, big_b: int, n: int, context: int) -> Tensor:
        ids, positions, slots, cache_lens = g.split(big_b, n)
        ctx = AttnContext.graph_safe(self.cache, slots, cache_lens, n, g.mask, context_len=context)
        return self.model.logits(self.model(ids, positions, ctx))
