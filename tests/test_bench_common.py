"""The benchmarks' shared output: strict JSON."""

from __future__ import annotations

import json

from bench.common import _finite_or_null


def test_unmeasured_figures_are_written_as_null():
    result = _finite_or_null({"speedup": float("nan"), "rows": [1.5, float("inf"), (2, float("-inf"))], "name": "x"})
    assert result == {"speedup": None, "rows": [1.5, None, [2, None]], "name": "x"}
    json.dumps(result, allow_nan=False)  # raises on a NaN token
