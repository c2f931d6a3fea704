"""Applying a layout to the model from outside: one rank's pipeline stage, tensor-parallel shards.

`build_local_model` turns a rank's local shards (from `ShardSpec.shard_state` or a
reallocation) into a runnable `Transformer`: the layers of its pipeline stage only (the model
keeps global layer ids), and, when tp > 1, Megatron's tensor parallelism:

- column-parallel projections (wq, wk, wv, w1, w3) hold a slice of the output features; their
  input's gradient is summed over the tp group in backward (`_CopyToTP`), once per block (the
  attention's and the feed-forward's input, marked by a forward pre-hook), not per projection;
- row-parallel projections (wo, w2) hold a slice of the input features; their partial outputs
  are summed over the tp group in forward (`_reduce_from_tp`), the bias added once after;
- the embedding holds a slice of the vocabulary: ids outside it give zeros, summed over tp;
- the LM head holds a slice of the vocabulary: log-probs are computed without gathering full
  logits (max, sum of exponentials and the target's logit reduced over tp); sampling gathers.

The model code itself is unchanged: head counts come from weight shapes, so attention runs on
the local heads.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from remesh.model.llama import ModelArgs, Transformer, rope_inv_freq
from remesh.plan.layout import Layout, ShardSpec

_COLUMN = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
_ROW = ("attention.wo", "feed_forward.w2")


class _CopyToTP(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the tp group (the input was used by
    every rank's column shard)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    """Forward sums partial results over the tp group; backward passes the gradient through."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


class _ShardedLinear(nn.Module):
    """A linear layer's tensor-parallel shard: `weight` and `bias` under nn.Linear's names, so
    the rank's state dict keeps the model's parameter names."""

    def __init__(self, weight: Tensor, bias: Tensor | None, group: dist.ProcessGroup):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.group = group


class ColumnParallelLinear(_ShardedLinear):
    """Its input must come through `_CopyToTP` (`_mark_block_input` does it once for all the
    projections of a block that share it)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def _mark_block_input(group: dist.ProcessGroup):
    """A forward pre-hook for a block whose column-parallel projections share its input (q, k
    and v; w1 and w3): the input's gradient is summed over tp in one all-reduce, where marking
    it in each projection would take one per projection (5 per layer instead of 2)."""
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (_CopyToTP.apply(args[0], group), *args[1:])
    return hook


class RowParallelLinear(_ShardedLinear):
    def forward(self, x: Tensor) -> Tensor:
        out = _ReduceFromTP.apply(F.linear(x, self.weight), self.group)
        return out + self.bias if self.bias is not None else out


class VocabParallelEmbedding(nn.Module):
    def __init__(self, weight: Tensor, start: int, group: dist.ProcessGroup):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.start, self.group = start, group

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return _ReduceFromTP.apply(out.masked_fill(outside[:, None], 0.0), self.group)


class _VocabParallelLogprob(torch.autograd.Function):
    """log softmax(logits)[target] with logits split over the vocabulary across the tp group."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, start: int, group: dist.ProcessGroup) -> Tensor:
        logits = logits.float()
        vmax = logits.max(dim=-1).values
        dist.all_reduce(vmax, op=dist.ReduceOp.MAX, group=group)
        exp = (logits - vmax[:, None]).exp_()  # in place: one block beside the logits, not two
        total = exp.sum(dim=-1)
        dist.all_reduce(total, group=group)
        local = targets - start
        inside = (local >= 0) & (local < logits.shape[-1])
        target_logit = logits.gather(1, local.clamp(0, logits.shape[-1] - 1)[:, None]).squeeze(1) * inside
        dist.all_reduce(target_logit, group=group)
        ctx.save_for_backward(exp, total, local, inside)
        return target_logit - vmax - total.log()

    @staticmethod
    def backward(ctx, g: Tensor):
        exp, total, local, inside = ctx.saved_tensors
        # d/dlogits of log p = onehot - softmax, in the saved exponentials' storage: one pass, no
        # new vocabulary-wide block (a second backward through this graph is refused by autograd)
        grad = exp.mul_((-g / total)[:, None])
        rows = inside.nonzero().squeeze(1)
        grad[rows, local[rows]] += g[rows]
        return grad, None, None, None


class VocabParallelHead(nn.Module):
    """The LM head's vocabulary slice. Called on hidden states it returns full logits
    (gathered: sampling needs the whole distribution); `token_logprobs` never gathers."""

    def __init__(self, weight: Tensor | nn.Parameter, start: int, vocab: int, group: dist.ProcessGroup):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.start, self.vocab, self.group = start, vocab, group

    def forward(self, hidden: Tensor) -> Tensor:
        local = F.linear(hidden, self.weight)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def token_logprobs(self, hidden: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
        logits = F.linear(_CopyToTP.apply(hidden, self.group), self.weight)
        if temperature != 1.0:
            logits = logits / temperature
        return _VocabParallelLogprob.apply(logits, targets, self.start, self.group)


def build_local_model(args: ModelArgs, layout: Layout, rank: int, shards: dict[str, Tensor],
                      tp_group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu") -> Transformer:
    """The rank's part of the model under `layout`, holding `shards` (as parameters, no copy)."""
    spec = ShardSpec(args)
    stage, _, t = layout.coord(rank)
    expected = spec.local_shapes(layout, rank)
    got = {n: tuple(v.shape) for n, v in shards.items()}
    if got != expected:
        wrong = sorted(set(got.items()) ^ set(expected.items()))[:3]
        raise ValueError(f"shards for rank {rank} under {layout} do not match the layout: {wrong} ...")
    if layout.tp > 1 and tp_group is None:
        raise ValueError(f"layout {layout} has tp={layout.tp}: pass the rank's tp process group")
    with torch.device("meta"):
        model = Transformer(copy.deepcopy(args))
    keep = {str(i) for i in spec.stage_layers(layout.pp, stage)}
    model.layers = nn.ModuleDict({k: v for k, v in model.layers.items() if k in keep})
    first, last = stage == 0, stage == layout.pp - 1
    tied = args.tie_embeddings and args.head == "lm"
    if not first and not (tied and last):
        model.tok_embeddings = None
    if not last:
        model.norm, model.output, model.score = None, None, None
    state = dict(shards)
    if layout.tp > 1:
        for block in model.layers.values():
            for path in (*_COLUMN, *_ROW):
                owner, name = path.split(".")
                prefix = f"layers.{block.attention.layer_id}.{path}"
                w, b = state.pop(f"{prefix}.weight"), state.pop(f"{prefix}.bias", None)
                kind = ColumnParallelLinear if path in _COLUMN else RowParallelLinear
                setattr(getattr(block, owner), name, kind(w, b, tp_group))
            for sub in (block.attention, block.feed_forward):
                sub.register_forward_pre_hook(_mark_block_input(tp_group))
        vocab_start = t * (args.vocab_size // layout.tp)
        if model.tok_embeddings is not None:
            model.tok_embeddings = VocabParallelEmbedding(state.pop("tok_embeddings.weight"), vocab_start, tp_group)
        if last and args.head == "lm":
            weight = model.tok_embeddings.weight if tied else state.pop("output.weight")
            model.output = VocabParallelHead(weight, vocab_start, args.vocab_size, tp_group)
    model.load_state_dict(state, strict=False, assign=True)
    if tied and last and layout.tp == 1:  # assign=True replaced the embedding: re-tie the head
        model.output.weight = model.tok_embeddings.weight
    if not first and model.tok_embeddings is not None:  # the last stage of a tied model: head only
        model.tok_embeddings = None
    model.register_buffer("inv_freq", rope_inv_freq(args).to(device), persistent=False)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise ValueError(f"rank {rank} under {layout}: no shard for {leftover[:3]}")
    return model.to(device)
