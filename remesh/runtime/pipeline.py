"""Pipeline parallelism: one rank's stage of a layout, run over micro-batches.

`PipelineStage.forward` streams micro-batches through the stages (inference: ref, reward and
critic calls). `PipelineStage.train_step` runs the 1F1B schedule: each stage does
(pp - stage - 1) warm-up forwards, then alternates one forward and one backward, then drains
the remaining backwards, so that at most pp micro-batches' activations are alive per stage.
Activations go forward and their gradients backward with point-to-point messages. Sends are
non-blocking (a stage sending a gradient back while its predecessor sends the next activation
forward must not wait on each other); receives block, and every message's shape is known to
both sides from the micro-batch, which every stage holds.

The hidden states between stages are [tokens, dim] of the packed micro-batch, so no padding
crosses the wire either.

`PipelineModel` presents one replica's stages as one model to code that runs a forward and
then a head on some rows (the rollout engine, reward scoring): every stage runs that code alike;
a forward passes the hidden states stage to stage, and the head's output (logits or values) is
computed on the last stage and broadcast to the others. In generation every stage drives the
same engine (same sequences, slots and agreed drafting strategy, each stage with its own
layers' KV cache) and samples exactly the tokens the last stage samples (per-sequence streams).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from remesh.model.attention import AttnContext
from remesh.plan.layout import Layout, ShardSpec
from remesh.runtime.groups import ProcessGroups


@dataclass
class MicroBatch:
    tokens: Tensor  # [T] packed sequences
    positions: Tensor  # [T]
    seqlens: list[int]
    prefix_of: list[int] | None = None  # shared prompts (remesh/rl/batch.py)


def stage_links(layout: Layout, rank: int) -> tuple[int, int | None, int | None, int]:
    """`rank`'s stage, and the ranks of the previous and the next stage of its replica at its tp
    index (None at the ends), and of the last stage."""
    stage, dp, tp = layout.coord(rank)
    prev = layout.rank_at(stage - 1, dp, tp) if stage > 0 else None
    nxt = layout.rank_at(stage + 1, dp, tp) if stage < layout.pp - 1 else None
    return stage, prev, nxt, layout.rank_at(layout.pp - 1, dp, tp)


class PipelineStage:
    def __init__(self, model: nn.Module, layout: Layout, rank: int, dim: int, dtype: torch.dtype = torch.float32):
        self.model, self.layout, self.dim, self.dtype = model, layout, dim, dtype
        self.stage, self.prev, self.next, _ = stage_links(layout, rank)
        self.first, self.last = self.prev is None, self.next is None
        self.device = next(model.parameters()).device
        self._sends: list[tuple[Any, Tensor]] = []

    def _send(self, t: Tensor, dst: int) -> None:
        t = t.detach().contiguous()
        self._sends.append((dist.isend(t, dst), t))  # the buffer lives until the send completes

    def _recv(self, n_tokens: int, src: int) -> Tensor:
        buf = torch.empty(n_tokens, self.dim, dtype=self.dtype, device=self.device)
        dist.recv(buf, src)
        return buf

    def _flush(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()

    def _forward(self, mb: MicroBatch, requires_grad: bool) -> tuple[Tensor | None, Tensor]:
        ctx = AttnContext.packed(mb.seqlens, self.device, mb.prefix_of)
        if self.first:
            x = None
            h = self.model(mb.tokens.to(self.device), mb.positions.to(self.device), ctx)
        else:
            x = self._recv(len(mb.tokens), self.prev).requires_grad_(requires_grad)
            h = self.model(x, mb.positions.to(self.device), ctx)
        if not self.last:
            self._send(h, self.next)
        return x, h

    def forward(self, micro_batches: list[MicroBatch], head: Callable[[Tensor, int], Any]) -> list[Any]:
        """Every micro-batch through the pipeline; on the last stage, `head(hidden, i)` of each
        (e.g. log-probs or values) in order; [] on the other stages."""
        outs = []
        try:
            for i, mb in enumerate(micro_batches):
                _, h = self._forward(mb, requires_grad=False)
                if self.last:
                    outs.append(head(h, i))
        finally:
            self._flush()
        return outs

    def train_step(self, micro_batches: list[MicroBatch], loss_fn: Callable[[Tensor, int], Tensor]) -> float:
        """Forward and backward of every micro-batch (1F1B); gradients accumulate in the stage's
        parameters. `loss_fn(hidden, i)`, called on the last stage, returns micro-batch i's loss,
        already scaled so that the micro-batch losses add up to the step's loss. Returns that
        sum on the last stage, 0.0 on the others."""
        n = len(micro_batches)
        warmup = min(self.layout.pp - self.stage - 1, n)
        live: deque[tuple[Tensor | None, Tensor]] = deque()
        total = 0.0

        def forward(i: int) -> None:
            nonlocal total
            x, h = self._forward(micro_batches[i], requires_grad=True)
            if self.last:
                loss = loss_fn(h, i)
                total += float(loss.detach())
                live.append((x, loss))
            else:
                live.append((x, h))

        def backward() -> None:
            x, out = live.popleft()
            if self.last:
                out.backward()
            else:
                out.backward(self._recv(out.shape[0], self.next))
            if not self.first:
                self._send(x.grad, self.prev)

        try:
            for i in range(warmup):
                forward(i)
            for i in range(warmup, n):
                forward(i)
                backward()
            while live:
                backward()
        finally:
            self._flush()
        return total


class PipelineModel(nn.Module):
    """One data-parallel replica's pipeline stages, seen as one model by the code every stage runs."""

    def __init__(self, stage_model: nn.Module, layout: Layout, rank: int, pp_group: dist.ProcessGroup):
        super().__init__()
        self.stage_model = stage_model  # a submodule: parameters() and train()/eval() reach it
        self.args = stage_model.args
        self.stage, self.prev, self.next, self.last_rank = stage_links(layout, rank)
        self.first, self.last = self.prev is None, self.next is None
        self.group = pp_group

    def forward(self, tokens: Tensor, positions: Tensor, ctx: AttnContext) -> Tensor:
        """This stage's hidden states [T, dim]; only the last stage's are the model's output
        (the others' are only good for their row count, which `logits` takes)."""
        if self.first:
            h = self.stage_model(tokens, positions, ctx)
        else:
            ref = next(self.stage_model.parameters())
            h = torch.empty(tokens.shape[0], self.args.dim, dtype=ref.dtype, device=ref.device)
            dist.recv(h, self.prev)
            h = self.stage_model(h, positions, ctx)
        if not self.last:
            dist.send(h.contiguous(), self.next)
        return h

    def _from_last(self, head: Callable[[Tensor], Tensor], hidden: Tensor, width: int | None) -> Tensor:
        """fp32 head output of the rows of `hidden`, computed on the last stage, the same on every stage."""
        if self.last:
            out = head(hidden).float().contiguous()
        else:
            shape = (hidden.shape[0],) if width is None else (hidden.shape[0], width)
            out = torch.empty(shape, device=hidden.device)
        dist.broadcast(out, self.last_rank, group=self.group)
        return out

    def logits(self, hidden: Tensor) -> Tensor:
        return self._from_last(self.stage_model.logits, hidden, self.args.vocab_size)

    def values(self, hidden: Tensor) -> Tensor:
        return self._from_last(self.stage_model.values, hidden, None)

    def new_kv_cache(self, *args: Any, **kwargs: Any):
        return self.stage_model.new_kv_cache(*args, **kwargs)


def sync_tied_embedding(model: nn.Module, spec: ShardSpec, layout: Layout, rank: int, groups: ProcessGroups) -> None:
    """A tied LM head lives on the last stage as a copy of the first stage's embedding: after
    backward, the two copies' gradients are summed so that both take the same step."""
    args = spec.args
    if not (args.tie_embeddings and args.head == "lm") or layout.pp == 1:
        return
    stage, dp, tp = layout.coord(rank)
    if stage not in (0, layout.pp - 1):
        return
    weight = model.tok_embeddings.weight if stage == 0 else model.output.weight
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    group = groups.get((layout.rank_at(0, dp, tp), layout.rank_at(layout.pp - 1, dp, tp)))
    dist.all_reduce(weight.grad, group=group)
