"""Starting and ending a job's processes, with bounded failure.

`init_distributed` joins the process group of a job started by torchrun (one node or several
through its rendezvous) or by `spawn`: gloo on CPU, NCCL on GPU, and a timeout on every
collective so that a peer that died makes the others fail instead of hang.

`spawn` runs a function on N local processes (tests, benchmarks, a laptop): it returns every
rank's result, and when a rank raises or dies it stops the others and raises
`DistributedJobError` naming the rank and its error, within a bounded time.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import tempfile
import threading
import time
import traceback
import warnings
from multiprocessing import connection as mp_connection
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class DistributedJobError(RuntimeError):
    """A rank of the job raised, died or ran past the job's time limit."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


def default_backend(device: str | torch.device = "cpu") -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(backend: str | None = None, timeout_s: float = 120.0) -> tuple[int, int]:
    """Join the job's process group from the environment (torchrun's RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); returns (rank, world_size). Idempotent."""
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"not started by torchrun (no {', '.join(missing)} in the environment): "
                               f"launch with `torchrun --nproc-per-node N -m remesh.cli ...`")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """End this rank once the process that launched it is gone. A launcher killed by a signal
    (SIGTERM, SIGKILL) runs none of `spawn`'s cleanup. torch's spawn has the kernel send its
    children SIGINT when their parent dies, but a job started in the background (`cmd &`,
    nohup) ignores SIGINT, and its ranks inherit that: they went on with a whole RL run, for
    nobody."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="remesh-parent-watch", daemon=True).start()


def _worker(rank: int, fn: Callable, world_size: int, port: int, backend: str, collective_timeout_s: float,
            out_dir: str, parent_pid: int, args: tuple) -> None:
    _exit_with_parent(parent_pid)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        init_distributed(backend, collective_timeout_s)
        result = fn(rank, world_size, *args)
        # written whole or not at all: a result file on disk means fn returned
        torch.save(result, Path(out_dir) / f"rank{rank}.pt.tmp")
        os.replace(Path(out_dir) / f"rank{rank}.pt.tmp", Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()
    except BaseException:
        # written before this process exits, so before its peers see their connections close
        (Path(out_dir) / f"error{rank}.txt").write_text(f"{time.time()}\n{traceback.format_exc()}")
        os._exit(1)  # skip the process group's teardown, which may block on dead peers


def spawn(fn: Callable[..., Any], world_size: int, args: tuple = (), backend: str = "gloo",
          timeout_s: float | None = 300.0, collective_timeout_s: float = 60.0) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` new processes joined in one process
    group; return the results in rank order. `fn` must be importable (module level).

    Bounded failure: when a rank raises or exits, the others are stopped at once and
    DistributedJobError names the first rank that failed (a peer's lost connection is a
    consequence, not the cause) with its traceback; a job still running after `timeout_s` is
    stopped and reported the same way (None: no limit; a rank waiting on a hung peer still
    fails after `collective_timeout_s`). If the launching process itself is killed, which skips
    this cleanup, its ranks notice within a second and exit.

    A rank that dies after its function returned (torch's process-group teardown at exit has
    been seen to abort, 'terminate called without an active exception') has done its work: its
    result counts, with a warning naming it."""
    with tempfile.TemporaryDirectory(prefix="remesh-spawn-") as out_dir:
        ctx = mp.start_processes(_worker, args=(fn, world_size, free_port(), backend, collective_timeout_s, out_dir,
                                                os.getpid(), args),
                                 nprocs=world_size, join=False, start_method="spawn")
        procs = ctx.processes
        running = {p.sentinel: r for r, p in enumerate(procs)}
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else math.inf)
        try:
            while running:
                left = deadline - time.monotonic()
                if left <= 0:
                    alive = sorted(running.values())
                    raise DistributedJobError(f"job ran past its {timeout_s:.0f} s limit; ranks still running: {alive}",
                                              rank=alive[0])
                ready = mp_connection.wait(list(running), timeout=min(left, 1.0))
                failed = []
                for sentinel in ready:
                    r = running.pop(sentinel)
                    procs[r].join()
                    code = procs[r].exitcode
                    if code != 0 and (Path(out_dir) / f"rank{r}.pt").exists():
                        warnings.warn(f"rank {r} exited with code {code} after returning its result "
                                      f"(in its process teardown); the result stands", RuntimeWarning, stacklevel=2)
                    elif code != 0:
                        failed.append(r)
                if failed:
                    raise _job_error(failed, procs, Path(out_dir))
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _job_error(failed: list[int], procs: list, out_dir: Path) -> DistributedJobError:
    """The root cause among ranks that exited together: the earliest recorded error, or a rank
    that died without recording one (killed, os._exit, segfault)."""
    errors = {}
    for r in failed:
        f = out_dir / f"error{r}.txt"
        if f.exists():
            stamp, _, text = f.read_text().partition("\n")
            errors[r] = (float(stamp), text)
    died = [r for r in failed if r not in errors]
    if died:
        r = died[0]
        return DistributedJobError(f"rank {r} died (exit code {procs[r].exitcode})", rank=r)
    r = min(errors, key=lambda k: errors[k][0])
    return DistributedJobError(f"rank {r} raised:\n{errors[r][1]}", rank=r)
