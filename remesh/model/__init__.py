"""The Llama-family model: packed-sequence transformer, attention with KV cache, chunked log-probs."""

from remesh.model.attention import AttnContext, KVCache
from remesh.model.llama import ModelArgs, Transformer
from remesh.model.logprobs import token_logprobs

__all__ = ["AttnContext", "KVCache", "ModelArgs", "Transformer", "token_logprobs"]
