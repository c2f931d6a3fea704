"""Shared helpers for the benchmarks in bench/.

Convention for every bench/*.py: print a small human-readable table, then end with ONE line of
JSON holding the headline figures, the machine it ran on and a "details" object, and write the
same object to bench/results/<name>.json (`finish` does both).

Timing: `interleaved_times` runs the systems under comparison in turn, repetition by repetition,
so that background load on a shared machine hits all of them alike; compare medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The options every benchmark takes: --quick (fewer reps, smaller batches) and --device."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fewer repetitions and smaller batches (smoke run)")
    p.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16 autocast)")
    if extra is not None:
        extra(p)
    return p.parse_args()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Where a result was measured: host, CPU, cores, torch version, device (GPU name on CUDA)."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleaved_times(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1,
                      device: str | torch.device = "cpu") -> dict[str, list[float]]:
    """Seconds per call of each function, `reps` times each, in turn (a, b, a, b, ...) after
    `warmup` untimed calls of each. Returns {name: [seconds, ...]}."""
    sync = synchronizer(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(reps):
        # alternate the order too, so neither system always runs first after the other's cache traffic
        order = list(fns.items()) if r % 2 == 0 else list(reversed(fns.items()))
        for name, fn in order:
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> float:
    """(max - min) / median: how noisy a set of repetitions was."""
    m = statistics.median(xs)
    return (max(xs) - min(xs)) / m if m else float("nan")


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    def fmt(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        return str(x)

    cells = [[fmt(x) for x in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def finish(name: str, headline: dict[str, Any], details: dict[str, Any], device: str | torch.device = "cpu",
           **extra: Any) -> dict[str, Any]:
    """Write {headline..., machine, details} to bench/results/<name>.json and print it as the
    last line of output (one line of JSON)."""
    result = {**headline, "machine": machine_info(device), **extra, "details": details}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    return result
