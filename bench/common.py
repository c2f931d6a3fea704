"""Shared helpers for the benchmarks in bench/.

Convention for every bench/*.py: print a small human-readable table, then end with ONE line of
JSON holding the headline figures, the machine it ran on and a "details" object, and write the
same object to bench/results/<name>.json (`finish` does both).

Timing: `interleaved_times` runs the systems under comparison in turn, repetition by repetition,
so that background load on a shared machine hits all of them alike, and notes for every call how
many cores other processes kept busy meanwhile (from /proc), so that rounds disturbed by a
concurrent job can be left out of the medians (and made up for by extra rounds). A system that
runs in a worker subprocess names its pid in `own_pids`, so that its CPU time counts as its own.
A training loop that only calls back (a transformers/TRL `Trainer`) is driven one step at a time
by `LoopStepper`, so that it can be interleaved too. `WorkerProcess` builds an object in a fresh
spawned process and calls its methods from here: a system timed there keeps its own heap, so it
does not take over (and page-fault into) memory the other system just freed. Memory:
`rss_bytes` / `peak_rss_bytes`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import socket
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The options every benchmark takes: --quick (fewer reps, smaller batches) and --device."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fewer repetitions and smaller batches (smoke run)")
    p.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16 autocast)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (default: torch's, one per core). On a small shared machine "
                        "another busy process slows multi-threaded CPU kernels by an order of magnitude "
                        "(OpenMP threads wait for each other); --threads 1 is far less sensitive to that")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return args


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Where a result was measured: host, CPU, cores, torch version, device (GPU name on CUDA)."""
    from remesh.planner.profile import processor_name  # what profiles record: a result and its profile compare

    device = torch.device(device)
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu": processor_name("cpu"),
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


def _proc_ticks(pid: int | str) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _all_cpus_ticks() -> list[int]:
    """/proc/stat's first line: user, nice, system, idle, iowait, irq, softirq, steal ticks."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def _cpu_ticks(own_pids: Sequence[int] = ()) -> tuple[int, int, int]:
    """(all CPUs' total ticks, all CPUs' busy ticks, ticks of this process and of `own_pids`) from
    /proc; zeros elsewhere."""
    try:
        vals = _all_cpus_ticks()
        own = _proc_ticks("self") + sum(_proc_ticks(p) for p in own_pids)
        return sum(vals), sum(vals) - vals[3] - vals[4], own
    except (OSError, ValueError, IndexError):
        return 0, 0, 0


def steal_ticks() -> tuple[int, int]:
    """(all CPUs' total ticks, ticks the hypervisor gave to other machines) from /proc/stat."""
    try:
        vals = _all_cpus_ticks()
        return sum(vals), vals[7]
    except (OSError, ValueError, IndexError):
        return 0, 0


def steal_fraction(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share of this VM's CPU time taken by the host for other machines between two readings:
    on a shared host, a slow spell that no process inside the VM shows."""
    total, steal = after[0] - before[0], after[1] - before[1]
    return steal / total if total > 0 else float("nan")


def foreign_cores(before: tuple[int, int, int], after: tuple[int, int, int]) -> float:
    """Average number of cores other processes kept busy between two `_cpu_ticks()` readings
    (0 on an otherwise idle machine; NaN where /proc is not available)."""
    total, busy, own = (a - b for a, b in zip(after, before))
    ncpu = os.cpu_count() or 1
    if total <= 0:
        return float("nan")
    return max(0.0, (busy - own) / (total / ncpu))


@dataclass
class Timings:
    """Seconds per call of each system, rep by rep, and how busy the rest of the machine was."""

    times: dict[str, list[float]]
    foreign: dict[str, list[float]]  # cores used by other processes during each call
    max_foreign: float

    @property
    def rounds(self) -> int:
        return len(next(iter(self.times.values())))

    def clean(self) -> list[int]:
        """Rounds in which no call shared the machine with more than `max_foreign` busy cores."""
        return [i for i in range(self.rounds)
                if all(not f[i] > self.max_foreign for f in self.foreign.values())]  # NaN counts as clean

    def used(self, min_rounds: int = 3) -> list[int]:
        """The clean rounds if there are at least `min_rounds` of them, else all rounds."""
        c = self.clean()
        return c if len(c) >= min_rounds else list(range(self.rounds))

    def median_s(self, name: str) -> float:
        return statistics.median(self.times[name][i] for i in self.used())

    def spread(self, name: str) -> float:
        return spread([self.times[name][i] for i in self.used()])

    def paired_ratio(self, num: str, den: str) -> float:
        """Median over rounds of times[den] / times[num], i.e. num's speed relative to den's measured
        side by side (round by round), which cancels load shared by both calls of a round."""
        return statistics.median(self.times[den][i] / self.times[num][i] for i in self.used())

    def summary(self) -> dict[str, Any]:
        return {"times_s": self.times, "foreign_cores": {k: [round(x, 2) for x in v] for k, v in self.foreign.items()},
                "rounds": self.rounds, "clean_rounds": len(self.clean()), "used_rounds": self.used(),
                "max_foreign_cores": self.max_foreign}


def interleaved_times(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1,
                      device: str | torch.device = "cpu", max_foreign: float = 0.3,
                      max_extra: int | None = None, own_pids: Sequence[int] = (),
                      measure: dict[str, Callable[[Any, float], float]] | None = None) -> Timings:
    """Time each function `reps` times, in turn (a, b, b, a, a, b, ...), after `warmup` untimed
    calls of each. A round where other processes kept more than `max_foreign` cores busy during
    some call is noted, and extra rounds (up to `max_extra`, default `reps`) are run until `reps`
    clean rounds are in; medians then use the clean rounds (see `Timings.used`).

    `own_pids`: worker subprocesses whose CPU time is the benchmark's own, not foreign load.
    `measure[name](result, wall_s) -> seconds`: what is recorded for a call of `name` (default: its
    wall time), e.g. the time a worker measured itself, without the round trip to it."""
    sync = synchronizer(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync()
    max_extra = reps if max_extra is None else max_extra
    t = Timings({name: [] for name in fns}, {name: [] for name in fns}, max_foreign)
    r = 0
    while r < reps or (len(t.clean()) < reps and r < reps + max_extra):
        # alternate the order, so that neither system always runs right after the other
        order = list(fns.items()) if r % 2 == 0 else list(reversed(fns.items()))
        for name, fn in order:
            sync()
            c0, t0 = _cpu_ticks(own_pids), time.perf_counter()
            out = fn()
            sync()
            wall = time.perf_counter() - t0
            t.foreign[name].append(foreign_cores(c0, _cpu_ticks(own_pids)))
            t.times[name].append(measure[name](out, wall) if measure and name in measure else wall)
        r += 1
    return t


class LoopStepper:
    """Drives a training loop that only calls back (e.g. a transformers/TRL `Trainer`, whose
    `train()` calls `on_step_end` after every optimizer step) one step at a time, so that it can be
    timed interleaved with another system: `step()` lets the loop run until its next step ends.

    `run_loop(hook)` must run the loop and call `hook()` at the end of every step; `hook()` blocks
    until the next `step()` (or `close()`) and returns True when the loop should stop. The loop runs
    in a worker thread, but never at the same time as the caller: `step()` waits for it.
    """

    def __init__(self, run_loop: Callable[[Callable[[], bool]], Any]):
        self._run_loop = run_loop
        self._go = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self._stop = False
        self._error: BaseException | None = None
        self._finished = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    def _hook(self) -> bool:
        self._done.release()
        self._go.acquire()
        return self._stop

    def _main(self) -> None:
        try:
            self._run_loop(self._hook)
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
            self._error = e
        finally:
            self._finished = True
            self._done.release()

    def step(self) -> None:
        """Run the loop until the end of its next step (the first call also runs its set-up)."""
        if self._finished:
            raise RuntimeError(f"the training loop ended after {self.steps} steps") from self._error
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="LoopStepper", daemon=True)
            self._thread.start()
        else:
            self._go.release()
        self._done.acquire()
        if self._finished:
            raise RuntimeError(f"the training loop ended after {self.steps} steps") from self._error
        self.steps += 1

    def close(self, timeout: float | None = 600) -> None:
        """Ask the loop to stop after the step it is in, and wait for it to finish."""
        if self._thread is None or self._finished:
            return
        self._stop = True
        self._go.release()
        self._thread.join(timeout)
        if self._error is not None:
            raise RuntimeError("the training loop failed while stopping") from self._error


def rl_trainer(cfg: Any, fixed_length: bool = False) -> Any:
    """remesh's `RLTrainer(cfg)`; with `fixed_length`, one whose sampler ignores EOS, so that every
    response (sampled or greedy) is exactly `rollout.max_new_tokens` long and the work per iteration
    does not depend on when the model happens to stop. remesh has no config key for this: the
    override returns no stop ids from `RLTrainer._stop_ids` (benchmark-only; remesh is unchanged)."""
    from remesh.rl.trainer import RLTrainer

    if not fixed_length:
        return RLTrainer(cfg)
    if not callable(getattr(RLTrainer, "_stop_ids", None)):
        raise SystemExit("bench: RLTrainer._stop_ids is gone; update bench.common.rl_trainer's fixed-length override")

    class FixedLengthRLTrainer(RLTrainer):
        def _stop_ids(self) -> list[int]:
            return []

    return FixedLengthRLTrainer(cfg)


def rss_bytes() -> int:
    """Resident set size of this process now (VmRSS)."""
    return _proc_status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        return _proc_status_kb("VmHWM") * 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])  # "VmHWM:   123456 kB"
    raise KeyError(key)


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
    last line of output (one line of JSON). A figure that could not be measured (NaN, inf) is
    written as null: strict JSON, which a NaN token is not."""
    result = _finite_or_null({**headline, "machine": machine_info(device), **extra, "details": details})
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(json.dumps(result, allow_nan=False), flush=True)
    return result


def _finite_or_null(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_null(v) for v in x]
    return x


def demo_prompts(tokenizer: Any, length_mix: bool = False) -> list[list[int]]:
    """The demo prompts' token ids (chat-templated). `length_mix`: each prompt asks, in turn,
    for one word, one sentence or a detailed paragraph: a wide spread of response lengths."""
    import tempfile

    from remesh.data.datasets import load_prompt_dataset

    source = Path(__file__).resolve().parent.parent / "data" / "demo" / "prompts.jsonl"
    if length_mix:
        asks = (" Answer in one word.", " Answer in one sentence.", " Answer in a detailed paragraph.")
        rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
        source = Path(tempfile.mkdtemp()) / "prompts.jsonl"
        source.write_text("".join(json.dumps({**r, "prompt": r["prompt"] + asks[i % 3]}) + "\n"
                                  for i, r in enumerate(rows)))
    return [p.prompt_ids for p in load_prompt_dataset(source, tokenizer, max_prompt_len=256)[0]]


class WorkerProcess:
    """`build(*args)` constructed in a fresh spawned process; `call(method, *args)` runs one of its
    methods there and returns the result (both pickled). `build` must be importable (a module-level
    function or class; a script's own works under its `if __name__ == "__main__":` guard). The
    object's `info` attribute, if any, is returned once it is built (`self.info`)."""

    def __init__(self, build: Callable[..., Any], *args: Any, name: str, threads: int = 0):
        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, build, args, threads), name=name, daemon=True)
        self.proc.start()
        self.info = self._reply()

    def _reply(self) -> Any:
        status, payload = self.conn.recv()
        if status != "ok":
            raise SystemExit(f"worker {self.name} failed:\n{payload}")
        return payload

    def call(self, method: str, *args: Any) -> Any:
        self.conn.send((method, args))
        return self._reply()

    def stop(self) -> None:
        try:
            if self.proc.is_alive():
                self.call("stop")
        finally:
            self.proc.join(30)


def _serve(conn, build: Callable[..., Any], args: tuple, threads: int) -> None:
    try:
        if threads > 0:
            torch.set_num_threads(threads)
        obj = build(*args)
        conn.send(("ok", getattr(obj, "info", None)))
        while True:
            method, call_args = conn.recv()
            if method == "stop":
                conn.send(("ok", None))
                return
            conn.send(("ok", getattr(obj, method)(*call_args)))
    except BaseException:  # noqa: BLE001 (reported to the caller, which raises)
        conn.send(("error", traceback.format_exc()))
