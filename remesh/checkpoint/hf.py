"""HF-format checkpoints: config.json + safetensors (sharded), tokenizer files kept.

This adapter is the only place that knows HF parameter names; the model stays HF-agnostic.
Configs are read and written through transformers' own config classes, so every config
spelling transformers accepts (rope_scaling or rope_parameters, ...) is accepted here too.
Only safetensors are loaded: remesh never unpickles a checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from remesh.model.llama import ModelArgs, Transformer, rope_inv_freq

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
_ARCH = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}

# (HF name pattern, remesh name pattern); {i} is the layer index
_NAME_MAP = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("score.weight", "score.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    ("model.layers.{i}.self_attn.q_proj.{p}", "layers.{i}.attention.wq.{p}"),
    ("model.layers.{i}.self_attn.k_proj.{p}", "layers.{i}.attention.wk.{p}"),
    ("model.layers.{i}.self_attn.v_proj.{p}", "layers.{i}.attention.wv.{p}"),
    ("model.layers.{i}.self_attn.o_proj.{p}", "layers.{i}.attention.wo.{p}"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.feed_forward.w1.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.feed_forward.w2.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.feed_forward.w3.weight"),
]


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
                      + "$")


_TO_REMESH = [(_compile(hf), rm) for hf, rm in _NAME_MAP]
_TO_HF = [(_compile(rm), hf) for hf, rm in _NAME_MAP]


def _rename(name: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in table:
        m = pattern.match(name)
        if m:
            return target.format(**m.groupdict())
    return None


def hf_to_remesh_name(name: str) -> str | None:
    return _rename(name, _TO_REMESH)


def remesh_to_hf_name(name: str) -> str:
    hf = _rename(name, _TO_HF)
    if hf is None:
        raise KeyError(f"no HF name for parameter {name!r}")
    return hf


class CheckpointError(ValueError):
    pass


def args_from_hf_config(config: Any, head: str | None = None) -> ModelArgs:
    """ModelArgs from a transformers PretrainedConfig of a supported family."""
    mtype = config.model_type
    if mtype not in SUPPORTED_TYPES:
        raise CheckpointError(f"model_type {mtype!r} is not supported (supported: {', '.join(SUPPORTED_TYPES)})")
    if getattr(config, "mlp_bias", False):
        raise CheckpointError("mlp_bias=True is not supported")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = rope.pop("rope_theta", getattr(config, "rope_theta", 10000.0))
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = {}
    window = _sliding_window(config)
    archs = getattr(config, "architectures", None) or []
    if head is None:
        head = "value" if any(a.endswith("ForSequenceClassification") for a in archs) else "lm"
    attention_bias = getattr(config, "attention_bias", False)
    return ModelArgs(
        vocab_size=config.vocab_size, dim=config.hidden_size, n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads or config.num_attention_heads,
        ffn_dim=config.intermediate_size, head_dim=getattr(config, "head_dim", None) or 0,
        norm_eps=config.rms_norm_eps, rope_theta=float(theta), rope_scaling=rope or None,
        max_seq_len=config.max_position_embeddings, tie_embeddings=bool(config.tie_word_embeddings),
        qkv_bias=mtype == "qwen2" or attention_bias, o_bias=mtype != "qwen2" and attention_bias,
        sliding_window=window, head=head,
        extra={"model_type": mtype, **{k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                       if getattr(config, k, None) is not None}},
    )


def _sliding_window(config: Any) -> int | None:
    """The one attention window remesh applies to every layer, or None. Qwen2 windows only the
    layers from `max_window_layers` on (transformers spells it out as `layer_types`); a model
    that windows some layers but not others is refused rather than windowed throughout."""
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None)
    if kinds is None and config.model_type == "qwen2":
        start = getattr(config, "max_window_layers", 0) if getattr(config, "use_sliding_window", False) else None
        kinds = ["sliding_attention" if start is not None and i >= start else "full_attention"
                 for i in range(config.num_hidden_layers)]
    if kinds is None:
        return window
    if len(set(kinds)) > 1:
        windowed = [i for i, k in enumerate(kinds) if k == "sliding_attention"]
        raise CheckpointError(f"sliding_window: only layers {windowed[0]}-{windowed[-1]} of {len(kinds)} are windowed "
                              f"(layer_types / max_window_layers); remesh windows all layers or none")
    return window if kinds and kinds[0] == "sliding_attention" else None


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype = torch.float32):
    """A transformers config object for `args` (ForCausalLM, or ForSequenceClassification for a value head)."""
    from transformers import AutoConfig

    mtype = args.extra.get("model_type", "llama")
    if args.qkv_bias and not args.o_bias and mtype != "qwen2":
        mtype = "qwen2"  # only Qwen2 has bias on q/k/v but not o
    kwargs: dict[str, Any] = dict(
        vocab_size=args.vocab_size, hidden_size=args.dim, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, intermediate_size=args.ffn_dim,
        head_dim=args.head_dim, rms_norm_eps=args.norm_eps, max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=args.tie_embeddings, rope_theta=args.rope_theta,
        rope_scaling=dict(args.rope_scaling) if args.rope_scaling else None,
        **{k: args.extra[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in args.extra},
    )
    if mtype == "llama":
        kwargs["attention_bias"] = args.o_bias
    if mtype in ("mistral", "qwen2"):
        kwargs["sliding_window"] = args.sliding_window
        if mtype == "qwen2":  # windowed from layer 0: every layer, as remesh attends
            kwargs.update(use_sliding_window=args.sliding_window is not None, max_window_layers=0)
    config = AutoConfig.for_model(mtype, **kwargs)
    if args.head == "value":
        config.architectures = [f"{_ARCH[mtype]}ForSequenceClassification"]
        config.num_labels = 1
    else:
        config.architectures = [f"{_ARCH[mtype]}ForCausalLM"]
    config.dtype = dtype
    return config


def _safetensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    hint = f" (found {', '.join(pickled)}: remesh never unpickles checkpoints; re-save them as safetensors)" \
        if pickled else ""
    raise CheckpointError(f"{path}: no safetensors weights{hint}")


def read_hf_state(path: str | Path) -> dict[str, Tensor]:
    """All tensors of an HF checkpoint folder, under remesh names (unknown names are an error)."""
    path = Path(path)
    state: dict[str, Tensor] = {}
    for file in _safetensor_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    ours = hf_to_remesh_name(name)
                    if ours is None:
                        raise CheckpointError(f"{file}: unexpected tensor {name!r}")
                    state[ours] = f.get_tensor(name)
        except SafetensorError as e:  # truncated or corrupt: the file, not a Rust traceback
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    return state


def load_hf_config(path: str | Path, head: str | None = None) -> ModelArgs:
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: not an HF checkpoint folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError, OSError) as e:  # e.g. a model_type transformers does not know
        raise CheckpointError(f"{path}: cannot read config.json ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    return args_from_hf_config(config, head)


def load_hf(path: str | Path, head: str | None = None, dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu") -> Transformer:
    """Build the model from an HF folder. `head="value"` on a causal-LM checkpoint keeps the
    backbone and starts a fresh zero value head (how reward models and critics begin)."""
    args = load_hf_config(path, head)
    state = read_hf_state(path)
    with torch.device("meta"):
        model = Transformer(args)
    if args.head == "value":
        state.pop("output.weight", None)
        state.setdefault("score.weight", torch.zeros(1, args.dim))
    elif args.tie_embeddings:
        state.pop("output.weight", None)
    expected = {k for k in model.state_dict() if not (args.tie_embeddings and k == "output.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the config: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if args.tie_embeddings and model.output is not None:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_inv_freq(args)  # buffers are not in the checkpoint; the meta one is replaced
    return model.to(device)


def save_hf(model: Transformer, path: str | Path, tokenizer: Any = None, max_shard_bytes: int = 2 * 1024**3,
            dtype: torch.dtype | None = None) -> Path:
    """Write config.json, safetensors shards (+ index when sharded) and the tokenizer files."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    args = model.args
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "output.weight" and args.tie_embeddings:
            continue
        t = t.detach().to("cpu")
        tensors[remesh_to_hf_name(name)] = (t.to(dtype) if dtype else t).contiguous()
    store_dtype = dtype or next(iter(tensors.values())).dtype
    hf_config_from_args(args, store_dtype).save_pretrained(str(path))
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for old in path.glob("model*.safetensors*"):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def load_tokenizer(path: str | Path):
    """transformers' AutoTokenizer from a checkpoint folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers' own messages are long; keep ours one line
        raise CheckpointError(f"{path}: cannot load a tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from e
