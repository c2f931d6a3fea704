"""One-process executor: runs a dataflow graph's MFCs in dependency order.

Handlers are registered per (role, call type); each takes the MFC and its named inputs and
returns its named outputs. The executor only moves named data between calls and times them,
so the same graph can later be placed on device meshes by an execution plan.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from remesh.dataflow.graph import MFC, DataflowGraph

Handler = Callable[[MFC, dict[str, Any]], dict[str, Any]]


class OneProcessExecutor:
    def __init__(self, graph: DataflowGraph, handlers: dict[tuple[str, str], Handler]):
        missing = {(m.role, m.call) for m in graph.mfcs} - handlers.keys()
        if missing:
            raise ValueError(f"{graph.algo}: no handler for {sorted(missing)}")
        self.graph = graph
        self.handlers = handlers
        self.order = graph.topological_order()

    def run(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
        """Run every MFC once; return all named data and each MFC's wall time (seconds)."""
        data = dict(inputs)
        times: dict[str, float] = {}
        for mfc in self.order:
            t0 = time.perf_counter()
            out = self.handlers[(mfc.role, mfc.call)](mfc, {k: data[k] for k in mfc.inputs})
            times[mfc.name] = time.perf_counter() - t0
            missing = set(mfc.outputs) - out.keys()
            if missing:
                raise RuntimeError(f"MFC {mfc.name} did not produce {sorted(missing)}")
            data.update({k: out[k] for k in mfc.outputs})
        return data, times
