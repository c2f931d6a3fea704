"""One decoder-only transformer for the Llama family: Llama 2/3, Mistral, Qwen2, SmolLM2.

The model knows nothing of parallelism. Its structure is what lets parallelism be applied from
outside, as torchtitan does:
- every projection is its own nn.Linear (wq/wk/wv/wo, w1/w2/w3), so tensor-parallel styles
  can shard them column- or row-wise; head counts are read from the (possibly sharded)
  weight shapes at run time, never from the config;
- layers live in a ModuleDict keyed by their global index, and `tok_embeddings`, `norm` and
  `output` may be set to None, so a pipeline stage is this model with the other layers removed;
- each layer keeps its global `layer_id`, the index into the KV cache.
It runs on packed variable-length sequences (see attention.py) for training and inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from remesh.model.attention import AttnContext, KVCache, attend
from remesh.model.logprobs import token_logprobs


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF form: {"rope_type": "llama3" | "linear", ...}
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False  # Llama's attention_bias also biases o_proj
    sliding_window: int | None = None  # Mistral v0.1
    head: Literal["lm", "value"] = "lm"  # "value": scalar head for critic and reward models
    extra: dict[str, Any] = field(default_factory=dict)  # HF config keys kept for writing back

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    def num_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        per_layer = attn + 3 * self.dim * self.ffn_dim + 2 * self.dim
        embed = self.vocab_size * self.dim
        head = 0 if self.tie_embeddings else (embed if self.head == "lm" else self.dim)
        return self.n_layers * per_layer + embed + head + self.dim


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """Inverse frequencies of rotary embeddings, with Llama-3 or linear scaling as in HF."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return torch.where(medium, smoothed, scaled).float()
    raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (HF layout). x [T, H, D]; cos/sin [T, 1, D] (`Transformer.rope`)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32 as HF does, so bf16 runs match it
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: AttnContext) -> Tensor:
        t, d = x.shape[0], self.head_dim
        # -1: local heads after TP sharding; unflatten, not view: a decode step's projections may
        # come out transposed (rollout/kernels.py), and this splits them without a copy
        q = apply_rope(self.wq(x).unflatten(-1, (-1, d)), cos, sin)
        k = apply_rope(self.wk(x).unflatten(-1, (-1, d)), cos, sin)
        v = self.wv(x).unflatten(-1, (-1, d))
        out = attend(q, k, v, ctx, self.layer_id, scale=d**-0.5)
        return self.wo(out.reshape(t, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: AttnContext) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, ctx)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """Packed-sequence decoder. `forward` returns final hidden states [T, dim]; the heads
    (`logits`, `token_logprobs`, `values`) turn them into what the caller needs, so that a
    trainer never materialises full-vocabulary logits unless it asks for them."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args, i) for i in range(args.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(args.dim, args.norm_eps)
        self.output: nn.Linear | None = None
        self.score: nn.Linear | None = None  # value head; HF's *ForSequenceClassification name
        if args.head == "lm":
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
            if args.tie_embeddings:
                self.output.weight = self.tok_embeddings.weight
        else:
            self.score = nn.Linear(args.dim, 1, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        for name, p in self.named_parameters():
            if p.is_meta:  # no values to set; torch's meta initialisers would cost 3/4 of a model's build
                continue
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std)

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [T, 1, head_dim]: shaped once per forward for every layer's heads."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, tokens: Tensor, positions: Tensor, ctx: AttnContext) -> Tensor:
        """tokens [T] (or hidden [T, dim] on a pipeline stage without embeddings) -> hidden [T, dim]."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        ctx.sliding_window = self.args.sliding_window
        cos, sin = self.rope(positions, h.dtype if not torch.is_autocast_enabled(h.device.type) else
                             torch.get_autocast_dtype(h.device.type))
        for layer in self.layers.values():
            h = layer(h, cos, sin, ctx)
        return self.norm(h) if self.norm is not None else h

    def logits(self, hidden: Tensor) -> Tensor:
        return self.output(hidden)

    def token_logprobs(self, hidden: Tensor, targets: Tensor, temperature: float = 1.0,
                       chunk_tokens: int | None = None) -> Tensor:
        """fp32 log p(targets[t] | position t) for hidden [N, dim], chunked over the vocabulary.
        A head that computes its own (a vocabulary-parallel one) is asked instead."""
        if hasattr(self.output, "token_logprobs"):
            return self.output.token_logprobs(hidden, targets, temperature)
        return token_logprobs(hidden, self.output.weight, targets, temperature, chunk_tokens)

    def values(self, hidden: Tensor) -> Tensor:
        return self.score(hidden).squeeze(-1).float()

    def new_kv_cache(self, n_slots: int, max_len: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> KVCache:
        ref = next(self.parameters())
        a = self.args
        # kv heads from the weights: a tensor-parallel shard holds fewer than the config says;
        # indexed by global layer id, so a pipeline stage's layers keep their own rows
        layer = next(iter(self.layers.values()))
        kv_heads = layer.attention.wk.weight.shape[0] // a.head_dim
        return KVCache.allocate(a.n_layers, n_slots, max_len, kv_heads, a.head_dim, dtype or ref.dtype,
                                device or ref.device)
