"""Checkpoints: HF folders (config.json + safetensors), GGUF files, and the embedded default model."""

from remesh.checkpoint.default import DEFAULT_MODEL, resolve_model_path
from remesh.checkpoint.hf import CheckpointError, load_hf, load_tokenizer, save_hf

__all__ = ["DEFAULT_MODEL", "CheckpointError", "load_hf", "load_tokenizer", "resolve_model_path", "save_hf"]
