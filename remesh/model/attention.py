"""Attention over packed variable-length sequences, with an optional slot-based KV cache.

A batch is the concatenation of B sequences ("packed"): tokens have shape [T] and an
`AttnContext` says where each sequence starts (`cu_seqlens`). No compute is spent on padding,
except in one GPU prefill case below, where padding costs less than the calls it saves.

Five paths, chosen per call:
- fresh sequences, no cache: causal attention within each sequence (flash varlen on CUDA,
  one batched SDPA call when all lengths are equal, else one SDPA call per sequence);
- fresh sequences of which some continue another sequence of the batch (`prefix_of`: the
  samples of one prompt packed after a single copy of it): such a sequence attends to all of
  its prefix's tokens, then causally to its own;
- with a KV cache: each sequence appends its new tokens' keys/values to its cache slot, then
  attends to its cached prefix plus its new tokens (prefill, decode and draft verification); on
  a GPU without the varlen kernel (fp32), a prefill of prompts of different lengths is one SDPA
  call padded to the longest where that padding is cheap;
- a custom mask among the new tokens (tree drafts): every sequence then has the same number
  of new tokens and `mask[b, i, j]` says whether new token i may attend to new token j;
- graph-safe decoding (`AttnContext.graph_safe`): the cache path with every per-step quantity
  (slots, cached lengths, tree mask) in tensors and a fixed number of cache positions attended
  under a mask, so that one CUDA graph replays any step of its shape (rollout/cuda_graphs.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # flash-attention varlen kernel, CUDA only (torch >= 2.10)
    from torch.nn.attention.varlen import varlen_attn as _cuda_varlen_attn
except ImportError:  # pragma: no cover - depends on the torch build
    _cuda_varlen_attn = None


@dataclass
class KVCache:
    """Keys and values of every layer for `n_slots` sequences of up to `max_len` tokens.

    Layout [n_layers, n_slots, n_kv_heads, max_len, head_dim]: a run of slots sliced along
    dim 1 is already in SDPA's [batch, heads, seq, dim] layout, so decoding reads it in place.
    """

    k: Tensor
    v: Tensor

    @classmethod
    def allocate(cls, n_layers: int, n_slots: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> KVCache:
        shape = (n_layers, n_slots, n_kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]


@dataclass
class AttnContext:
    """Where each sequence of a packed batch starts, and how it uses the KV cache.

    Built once per forward and shared by every layer. Python-side lengths are kept next to the
    tensors so that no layer has to synchronise with the device to read them.
    """

    seqlens: list[int]  # new tokens per sequence
    cu_seqlens: Tensor  # [B+1] int32, cumulative `seqlens`
    cache: KVCache | None = None
    slots: Tensor | None = None  # [B] cache slot of each sequence
    cache_lens: list[int] | None = None  # tokens already cached per sequence (before the new ones)
    mask: Tensor | None = None  # [B, q, q] bool among new tokens; None means causal
    # per sequence, the index of an earlier sequence of the batch that it continues (its positions
    # follow on), or -1; a prefix continues nothing itself
    prefix_of: list[int] | None = None
    sliding_window: int | None = None  # set by the model from its config
    # derived once: cache write index of every new token, and context length per sequence
    _write_slot: Tensor | None = None
    _write_pos: Tensor | None = None
    # when the slots are a contiguous run (in any order): its first slot, and the order that sorts
    # the sequences by slot (None: already sorted); decoding then reads the cache as a view
    _run_start: int | None = None
    _run_order: Tensor | None = None
    _slot_list: list[int] | None = None  # `slots` on the host: a ragged step reads them without a device sync
    _decode_mask: tuple[int, Tensor] | None = None  # (rep, mask) of `decode_mask`
    _padded: tuple[Tensor, Tensor, Tensor] | None = None  # (rows, columns, mask) of `padded_layout`
    # graph-safe decoding: [B] cached tokens per sequence as a tensor (`cache_lens` is None), and
    # every sequence attends to the first `graph_context` cache positions, masked
    cache_lens_t: Tensor | None = None
    graph_context: int | None = None

    @classmethod
    def packed(cls, seqlens: list[int], device: torch.device | str = "cpu",
               prefix_of: list[int] | None = None) -> AttnContext:
        cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(seqlens, dtype=torch.int32).cumsum(0)
        if prefix_of is not None:
            if len(prefix_of) != len(seqlens):
                raise ValueError(f"prefix_of has {len(prefix_of)} entries for {len(seqlens)} sequences")
            for i, p in enumerate(prefix_of):
                if p >= i or (p >= 0 and prefix_of[p] >= 0):
                    raise ValueError(f"sequence {i}: prefix_of {p} must be an earlier sequence that has no prefix")
            if max(prefix_of, default=-1) < 0:
                prefix_of = None
        return cls(seqlens=list(seqlens), cu_seqlens=cu.to(device), prefix_of=prefix_of)

    @classmethod
    def with_cache(cls, cache: KVCache, slots: list[int] | Tensor, cache_lens: list[int], seqlens: list[int],
                   mask: Tensor | None = None) -> AttnContext:
        device = cache.k.device
        ctx = cls.packed(seqlens, device)
        ctx.cache = cache
        ctx.slots = torch.as_tensor(slots, dtype=torch.long, device=device)
        ctx.cache_lens = list(cache_lens)
        ctx.mask = mask
        if mask is not None and len(set(seqlens)) != 1:
            raise ValueError("a custom attention mask needs the same number of new tokens in every sequence")
        for n, start in zip(seqlens, cache_lens):
            if start + n > cache.max_len:
                raise ValueError(f"KV cache overflow: {start} cached + {n} new tokens > max_len {cache.max_len}")
        slot_list = ctx._slot_list = [int(x) for x in slots]
        if slot_list and max(slot_list) - min(slot_list) + 1 == len(set(slot_list)) == len(slot_list):
            ctx._run_start = min(slot_list)
            if slot_list != sorted(slot_list):
                ctx._run_order = torch.tensor(sorted(range(len(slot_list)), key=slot_list.__getitem__), device=device)
        # the output's size given: else the device is asked for it (a sync on a GPU)
        ctx._write_slot = torch.repeat_interleave(ctx.slots, torch.tensor(seqlens, device=device),
                                                  output_size=sum(seqlens))
        ctx._write_pos = torch.cat([torch.arange(s, s + n, device=device) for s, n in zip(cache_lens, seqlens)])
        return ctx

    @classmethod
    def graph_safe(cls, cache: KVCache, slots: Tensor, cache_lens: Tensor, n: int,
                   mask: Tensor | None = None, context_len: int | None = None) -> AttnContext:
        """A decode or verification step (`n` new tokens per sequence, `mask` [B, n, n] among them
        or causal) whose forward reads nothing from the host: no shape or index depends on the
        lengths, which live in `cache_lens` [B] on the device, so a CUDA graph captured with
        these tensors replays any step of the same B and n after they are refilled in place.
        Attention covers the first `context_len` cache positions (default: all), which must hold
        every sequence's cached and new tokens."""
        b, device = slots.shape[0], cache.k.device
        context_len = cache.max_len if context_len is None else context_len
        if not n <= context_len <= cache.max_len:
            raise ValueError(f"context_len {context_len}: must be within {n}..{cache.max_len} (the cache's length)")
        ctx = cls(seqlens=[n] * b, cu_seqlens=torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=device),
                  cache=cache, slots=slots, mask=mask, cache_lens_t=cache_lens, graph_context=context_len)
        offsets = torch.arange(n, device=device)
        ctx._write_slot = slots[:, None].expand(b, n).reshape(-1)
        ctx._write_pos = (cache_lens[:, None] + offsets).reshape(-1)
        return ctx

    def decode_mask(self, rep: int) -> Tensor:
        """The KV-cache attention mask, [B, 1, rep * n, context] for `rep` query heads per kv head
        (rows head-major, as the grouped queries are laid out); built once per forward, shared by
        every layer."""
        if self._decode_mask is None or self._decode_mask[0] != rep:
            n = self.seqlens[0]
            mask = _cache_mask(self, n, self.context_len, self.cache.k.device)
            self._decode_mask = (rep, mask.repeat(1, 1, rep, 1) if rep > 1 and n > 1 else mask)
        return self._decode_mask[1]

    def padded_layout(self) -> tuple[Tensor, Tensor, Tensor]:
        """The sequences as rows of a [B, longest] grid, for one SDPA call over all of them: each
        packed token's row and column, and the [B, 1, longest, longest] mask, causal within each
        row's own length (and its sliding window). Built once per forward, shared by every layer."""
        if self._padded is None:
            device, n = self.cu_seqlens.device, self.max_seqlen
            lens = torch.tensor(self.seqlens, device=device)
            rows = torch.repeat_interleave(torch.arange(len(self.seqlens), device=device), lens,
                                           output_size=self.num_tokens)
            cols = torch.arange(self.num_tokens, device=device) - self.cu_seqlens[:-1].long()[rows]
            allowed = _window_mask(n, n, self.sliding_window or n, device)  # causal, within the window
            real = torch.arange(n, device=device) < lens[:, None]  # [B, n]
            # a padding query (its output is dropped) sees every real key of its row, so that no
            # row of the mask is empty (which some kernels turn into NaNs)
            mask = torch.where(real[:, :, None], allowed[None], True) & real[:, None, :]
            self._padded = (rows, cols, mask[:, None])
        return self._padded

    @property
    def context_len(self) -> int:
        """Cache positions a cache step's attention covers: up to its longest sequence's end, or,
        graph-safe, the fixed count it was built with (the lengths are on the device)."""
        if self.graph_context is not None:
            return self.graph_context
        return max(s + n for s, n in zip(self.cache_lens, self.seqlens))

    @property
    def max_seqlen(self) -> int:
        return max(self.seqlens)

    @property
    def num_tokens(self) -> int:
        return sum(self.seqlens)


def attend(q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, layer_id: int, scale: float) -> Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] of the new tokens -> attention output [T, Hq, D]."""
    if ctx.cache is not None:
        return _attend_with_cache(q, k, v, ctx, layer_id, scale)
    if ctx.prefix_of is not None:
        return _attend_prefixed(q, k, v, ctx, scale)
    if ctx.mask is not None:
        b, n = len(ctx.seqlens), ctx.seqlens[0]
        out = _sdpa(q.view(b, n, *q.shape[1:]), k.view(b, n, *k.shape[1:]), v.view(b, n, *v.shape[1:]),
                    ctx.mask[:, None], scale)
        return out.reshape(q.shape)
    return _attend_fresh(q, k, v, ctx, scale)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, causal: bool = False) -> Tensor:
    """[B, S, H, D] in, [B, S, H, D] out; grouped-query heads are expanded by SDPA itself."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=causal, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _window_mask(n_q: int, n_k: int, window: int, device: torch.device) -> Tensor:
    """Causal mask of the last n_q queries over n_k keys, each seeing at most `window` keys."""
    qpos = torch.arange(n_k - n_q, n_k, device=device)[:, None]
    kpos = torch.arange(n_k, device=device)[None, :]
    return (kpos <= qpos) & (kpos > qpos - window)


def _attend_fresh(q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, scale: float) -> Tensor:
    window = ctx.sliding_window if ctx.sliding_window and ctx.max_seqlen > ctx.sliding_window else None
    # flash attention's kernels take fp16 and bf16 only: an fp32 forward on a GPU (the rollout
    # engine's default) goes through SDPA below
    if _varlen_applies(q):
        # and inputs whose last dimension is contiguous: a decode projection taken transposed
        # (rollout/kernels.py) gives a column-major view
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        n = ctx.max_seqlen
        win = (window - 1, 0) if window else (-1, 0)
        return _cuda_varlen_attn(q, k, v, ctx.cu_seqlens, ctx.cu_seqlens, n, n, scale=scale, window_size=win,
                                 enable_gqa=q.shape[1] != k.shape[1])
    if window is None and len(set(ctx.seqlens)) == 1:  # equal lengths: one batched call
        b, n = len(ctx.seqlens), ctx.seqlens[0]
        out = _sdpa(q.view(b, n, *q.shape[1:]), k.view(b, n, *k.shape[1:]), v.view(b, n, *v.shape[1:]), None,
                    scale, causal=True)
        return out.reshape(q.shape)
    outs, start = [], 0
    for n in ctx.seqlens:
        sl = slice(start, start + n)
        mask = _window_mask(n, n, window, q.device)[None, None] if window and n > window else None
        outs.append(_sdpa(q[None, sl], k[None, sl], v[None, sl], mask, scale, causal=mask is None)[0])
        start += n
    return torch.cat(outs)


def _varlen_applies(q: Tensor) -> bool:
    return q.is_cuda and _cuda_varlen_attn is not None and q.dtype in (torch.float16, torch.bfloat16)


# On a GPU without the varlen kernel (fp32), one SDPA call per prompt per layer costs a prefill far
# more in launches than padding does in work: prompts of different lengths go through one padded
# call (`_attend_padded`) where its masked square at most quadruples their causal triangles' work,
# and its scores (which SDPA's math kernel materialises, [B, heads, n, n]) stay under 2^26. Off a
# GPU a call costs little, and a masked call computes blocks that a causal one skips: per prompt.
_PAD_WORK_MAX, _PAD_SCORES_MAX = 4, 1 << 26


def _pads_prefill(q: Tensor, seqlens: list[int]) -> bool:
    return q.is_cuda and not _varlen_applies(q) and _pads_cheaply(seqlens, q.shape[1])


def _pads_cheaply(seqlens: list[int], heads: int) -> bool:
    """Whether sequences of these lengths (not all equal) go through one padded SDPA call."""
    b, n = len(seqlens), max(seqlens)
    causal_work = sum(m * (m + 1) // 2 for m in seqlens)
    return len(set(seqlens)) > 1 and b * n * n <= _PAD_WORK_MAX * causal_work and b * heads * n * n <= _PAD_SCORES_MAX


def _attend_padded(q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, scale: float) -> Tensor:
    """Sequences of different lengths in one SDPA call, padded to the longest (`padded_layout`)."""
    rows, cols, mask = ctx.padded_layout()
    b, n = len(ctx.seqlens), ctx.max_seqlen

    def grid(x: Tensor) -> Tensor:
        return x.new_zeros(b, n, *x.shape[1:]).index_put_((rows, cols), x)

    return _sdpa(grid(q), grid(k), grid(v), mask, scale)[rows, cols]


def _attend_prefixed(q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, scale: float) -> Tensor:
    """Each sequence attends to its prefix's keys (if it has one), then causally to its own.
    Sequences of the same prefix and length go through one SDPA call, as a batch."""
    starts = [0, *itertools.accumulate(ctx.seqlens)]
    batches: dict[tuple[int, int], list[int]] = {}
    for i, (n, p) in enumerate(zip(ctx.seqlens, ctx.prefix_of)):
        batches.setdefault((p, n), []).append(i)
    pieces: list[Tensor] = [q[:0]] * len(ctx.seqlens)
    for (p, n), members in batches.items():
        qs, ks, vs = (torch.stack([x[starts[i]:starts[i] + n] for i in members]) for x in (q, k, v))
        if p >= 0:  # the prefix's keys and values first, shared by every member
            span = slice(starts[p], starts[p + 1])
            ks = torch.cat([k[span].expand(len(members), -1, -1, -1), ks], dim=1)
            vs = torch.cat([v[span].expand(len(members), -1, -1, -1), vs], dim=1)
        n_keys = ks.shape[1]
        window = ctx.sliding_window if ctx.sliding_window and n_keys > ctx.sliding_window else None
        mask = _window_mask(n, n_keys, window or n_keys, q.device)[None, None] if p >= 0 or window else None
        out = _sdpa(qs, ks, vs, mask, scale, causal=mask is None)
        for j, i in enumerate(members):
            pieces[i] = out[j]
    return torch.cat(pieces)


def _attend_with_cache(q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, layer_id: int, scale: float) -> Tensor:
    cache = ctx.cache
    kc, vc = cache.k[layer_id], cache.v[layer_id]  # [S, Hkv, M, D]
    # one scatter per layer writes every new token's key/value into its slot
    kc[ctx._write_slot, :, ctx._write_pos] = k.to(kc.dtype)
    vc[ctx._write_slot, :, ctx._write_pos] = v.to(vc.dtype)
    if ctx.cache_lens is not None and not any(ctx.cache_lens) and ctx.mask is None:
        # a fill from position 0 (a prefill): the new tokens are each sequence's whole context, so
        # attention is the packed forward's (one varlen call on a GPU), with no reads of the cache
        # and none of the per-sequence calls below, each of which waits for the device (its slot)
        if _pads_prefill(q, ctx.seqlens):
            return _attend_padded(q, k, v, ctx, scale)  # one call, not one per prompt per layer
        return _attend_fresh(q, k, v, ctx, scale)
    if len(set(ctx.seqlens)) == 1:
        # decode / draft verification: every sequence has n new tokens, contexts differ in length
        b, n, ctx_len = len(ctx.seqlens), ctx.seqlens[0], ctx.context_len
        hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
        rep = hq // hkv
        # grouped-query heads as rows of their kv head: q [B, Hkv, rep * n, D] against the cache's
        # [B, Hkv, C, D] as it is (enable_gqa would expand the keys and values rep times)
        queries = q.view(b, n, hkv, rep, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, rep * n, d)
        mask = ctx.decode_mask(rep)
        order = ctx._run_order
        if ctx._run_start is not None:  # the slots are a contiguous run: read the cache in place
            keys = kc[ctx._run_start:ctx._run_start + b, :, :ctx_len]
            vals = vc[ctx._run_start:ctx._run_start + b, :, :ctx_len]
            if order is not None:  # queries and masks in slot order
                queries, mask = queries[order], mask[order]
        else:  # gather each sequence's rows (a copy of its whole context, every layer)
            keys, vals, order = kc[ctx.slots, :, :ctx_len], vc[ctx.slots, :, :ctx_len], None
        out = F.scaled_dot_product_attention(queries, keys.to(q.dtype), vals.to(q.dtype), attn_mask=mask, scale=scale)
        if order is not None:
            out = torch.empty_like(out).index_copy_(0, order, out)  # back to the batch's order
        return out.unflatten(2, (rep, n)).permute(0, 3, 1, 2, 4).reshape(q.shape)
    # ragged prefill: one call per sequence over its own prefix
    outs, start = [], 0
    ends = [s + n for s, n in zip(ctx.cache_lens, ctx.seqlens)]
    for i, (n, end) in enumerate(zip(ctx.seqlens, ends)):
        slot = ctx._slot_list[i]
        keys, vals = kc[slot, :, :end][None].to(q.dtype), vc[slot, :, :end][None].to(q.dtype)
        mask = _window_mask(n, end, ctx.sliding_window or end, q.device)[None, None]
        out = F.scaled_dot_product_attention(q[None, start:start + n].transpose(1, 2), keys, vals, attn_mask=mask,
                                             scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        outs.append(out.transpose(1, 2)[0])
        start += n
    return torch.cat(outs)


def _cache_mask(ctx: AttnContext, n: int, ctx_len: int, device: torch.device) -> Tensor:
    """[B, 1, n, ctx_len] bool: the cached prefix, then causal (or `ctx.mask`) among new tokens."""
    starts = (ctx.cache_lens_t if ctx.cache_lens_t is not None
              else torch.tensor(ctx.cache_lens, device=device))[:, None, None]  # [B, 1, 1]
    kpos = torch.arange(ctx_len, device=device)[None, None, :]  # [1, 1, C]
    qidx = torch.arange(n, device=device)[None, :, None]  # [1, n, 1]
    rel = kpos - starts  # key index relative to the first new token
    if ctx.mask is None:
        allowed = rel <= qidx
        qpos, kpos = qidx, rel  # positions relative to the first new token
    else:
        inside = (rel >= 0) & (rel < n)
        gathered = torch.gather(ctx.mask, 2, rel.clamp(0, n - 1).expand(-1, n, -1))
        allowed = (rel < 0) | (inside & gathered)
        if ctx.sliding_window:  # a tree's node sits at its depth (ancestors below it), not at its index
            depth = ctx.mask.sum(-1) - 1  # [B, n]
            qpos = depth[:, :, None]
            kpos = torch.where(inside, torch.gather(depth, 1, rel.clamp(0, n - 1)[:, 0])[:, None], rel)
    if ctx.sliding_window:
        allowed &= kpos > qpos - ctx.sliding_window
    return allowed[:, None]
