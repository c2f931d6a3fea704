"""Read Llama-architecture GGUF files (llama.cpp format), dequantised with the `gguf` package.

GGUF stores q/k projection rows permuted for llama.cpp's interleaved RoPE; `_unpermute` puts
them back into the rotate-half order the model (and HF) use. The tokenizer is rebuilt from
the GGUF metadata by transformers' own GGUF tokenizer converter.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from remesh.model.llama import ModelArgs

# GGUF tensor name -> remesh parameter name
_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "attn_q.bias": "attention.wq.bias",
    "attn_k.bias": "attention.wk.bias",
    "attn_v.bias": "attention.wv.bias",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


class GGUFError(ValueError):
    pass


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise GGUFError(f"{reader.data.filename}: missing metadata {key!r}")
        return default
    return f.contents()


def _unpermute(w: Tensor, n_heads: int) -> Tensor:
    """Inverse of llama.cpp's permute of q/k rows (per head: interleaved pairs -> two halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str | Path) -> tuple[ModelArgs, dict[str, Tensor]]:
    """ModelArgs and fp32 state dict (remesh names) of a Llama-architecture GGUF file."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:  # "GGUF magic invalid" and the like name no file
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from None
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "mistral"):
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (llama, qwen2, mistral)")
    n_heads = int(_field(reader, f"{arch}.attention.head_count"))
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_heads))
    if f"{arch}.attention.sliding_window_pattern" in reader.fields:  # windowed on some layers only
        raise GGUFError(f"{path}: a sliding window on some layers only ({arch}.attention.sliding_window_pattern) "
                        f"is not supported; remesh windows all layers or none")
    state: dict[str, Tensor] = {}
    for t in reader.tensors:
        m = _BLOCK.match(t.name)
        key = m.group(2) if m else t.name
        if key == "rope_freqs.weight":  # Llama-3.1 style: scaling factors baked into a tensor
            raise GGUFError(f"{path}: rope scaling stored as 'rope_freqs.weight' is not supported; "
                            f"convert the original HF checkpoint instead")
        if key not in _NAMES:
            raise GGUFError(f"{path}: unexpected tensor {t.name!r}")
        name = f"layers.{m.group(1)}.{_NAMES[key]}" if m else _NAMES[key]
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(np.array(data, dtype=np.float32))  # a copy: the reader maps the file read-only
        if arch == "llama" and key in ("attn_q.weight", "attn_q.bias"):
            w = _unpermute(w, n_heads)
        elif arch == "llama" and key in ("attn_k.weight", "attn_k.bias"):
            w = _unpermute(w, n_kv)
        state[name] = w
    dim = int(_field(reader, f"{arch}.embedding_length"))
    vocab = state["tok_embeddings.weight"].shape[0]
    extra = {"model_type": arch}
    for ours, key in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                      ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        if key in reader.fields:
            extra[ours] = int(_field(reader, key))
    args = ModelArgs(
        vocab_size=vocab, dim=dim, n_layers=int(_field(reader, f"{arch}.block_count")), n_heads=n_heads,
        n_kv_heads=n_kv, ffn_dim=int(_field(reader, f"{arch}.feed_forward_length")),
        head_dim=int(_field(reader, f"{arch}.rope.dimension_count", dim // n_heads)),
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch), max_seq_len=int(_field(reader, f"{arch}.context_length")),
        tie_embeddings="output.weight" not in state, qkv_bias="layers.0.attention.wq.bias" in state,
        sliding_window=int(w) if (w := _field(reader, f"{arch}.attention.sliding_window", 0)) else None,
        extra=extra,
    )
    return args, state


def _rope_scaling(reader, arch: str) -> dict | None:
    """The HF form of the file's RoPE scaling: linear position interpolation (also in older
    files' `rope.scale_linear`), or none; other kinds (YaRN, LongRoPE) are refused rather than
    read as unscaled."""
    kind = str(_field(reader, f"{arch}.rope.scaling.type", "none"))
    if kind == "none":
        old_factor = float(_field(reader, f"{arch}.rope.scale_linear", 1.0))
        return None if old_factor == 1.0 else {"rope_type": "linear", "factor": old_factor}
    if kind != "linear":
        raise GGUFError(f"{reader.data.filename}: rope scaling {kind!r} ({arch}.rope.scaling.type) is not supported "
                        f"(supported: linear); convert the original HF checkpoint instead")
    return {"rope_type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}


def gguf_tokenizer(path: str | Path):
    """A transformers fast tokenizer rebuilt from the GGUF metadata (vocab, merges, chat template)."""
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def convert_gguf_to_hf(path: str | Path, out_dir: str | Path) -> Path:
    """Write an HF folder (config, safetensors, tokenizer) for a GGUF file."""
    from remesh.checkpoint.hf import save_hf
    from remesh.model.llama import Transformer

    args, state = read_gguf(path)
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, strict=not args.tie_embeddings, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return save_hf(model, out_dir, tokenizer=gguf_tokenizer(path))
