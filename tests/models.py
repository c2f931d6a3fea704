"""Tiny random models of each supported family, shared by the tests."""

from __future__ import annotations

import torch

from remesh.model import ModelArgs, Transformer

FAMILIES = {
    # Llama 3 with grouped-query attention and Llama-3 rope scaling
    "llama": dict(n_heads=4, n_kv_heads=2, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                  extra={"model_type": "llama"}),
    # Qwen2: bias on q/k/v, tied embeddings
    "qwen2": dict(n_heads=4, n_kv_heads=2, qkv_bias=True, tie_embeddings=True, rope_theta=1000000.0,
                  extra={"model_type": "qwen2"}),
    # Mistral: GQA, untied
    "mistral": dict(n_heads=4, n_kv_heads=1, extra={"model_type": "mistral"}),
}


def tiny_args(family: str = "llama", vocab_size: int = 97, dim: int = 64, n_layers: int = 2, ffn_dim: int = 96,
              **overrides) -> ModelArgs:
    kw = dict(vocab_size=vocab_size, dim=dim, n_layers=n_layers, ffn_dim=ffn_dim, max_seq_len=256, norm_eps=1e-6)
    kw.update(FAMILIES[family])
    kw.update(overrides)
    return ModelArgs(**kw)


def tiny_model(family: str = "llama", seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_args(family, **overrides))
    # non-trivial norms and biases so that parity tests exercise them
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(std=0.1)
    return model
