"""The benchmarks' shared pieces: strict JSON output, the bytes a decode step reads."""

from __future__ import annotations

import json

from bench.common import _finite_or_null


def test_unmeasured_figures_are_written_as_null():
    result = _finite_or_null({"speedup": float("nan"), "rows": [1.5, float("inf"), (2, float("-inf"))], "name": "x"})
    assert result == {"speedup": None, "rows": [1.5, None, [2, None]], "name": "x"}
    json.dumps(result, allow_nan=False)  # raises on a NaN token


def test_a_decode_step_reads_every_weight_once_but_an_untied_embedding_table():
    from bench.rollout import weight_bytes_per_decode
    from tests.models import tiny_model

    untied, tied = tiny_model("llama", vocab_size=97), tiny_model("qwen2", vocab_size=97)
    blocks = sum(p.numel() for n, p in untied.named_parameters() if n.startswith("layers.")) * 4
    # untied: the blocks, the final norm and the head (97 x 64); the embedding table is looked up, not read
    assert weight_bytes_per_decode(untied) == blocks + (64 + 97 * 64) * 4
    tied_blocks = sum(p.numel() for n, p in tied.named_parameters() if n.startswith("layers.")) * 4
    assert weight_bytes_per_decode(tied) == tied_blocks + (64 + 97 * 64) * 4  # the shared matrix, read by the head
