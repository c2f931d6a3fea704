"""Parameter reallocation on gloo (4 CPU processes), and bounded failure of a distributed job."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from remesh.plan.layout import Layout, ShardSpec
from remesh.runtime.launch import DistributedJobError, spawn
from remesh.runtime.realloc import reallocate, transfer_plan
from tests.models import tiny_model
from tests.test_plan import _random_layout


def _realloc_random_pairs(rank: int, world: int, family: str, pairs: int) -> list[str]:
    model = tiny_model(family, vocab_size=96)  # same seed on every rank: the full parameters
    full = {n: p.detach() for n, p in model.named_parameters()}
    spec = ShardSpec(model.args)
    rng = random.Random(1)
    checked = []
    for i in range(pairs):
        src, dst = _random_layout(rng, world), _random_layout(rng, world)
        shards = {n: t.clone() for n, t in spec.shard_state(full, src, rank).items()} if rank in src.ranks else None
        # a small bucket forces several rounds; every other pair sends contiguous pieces directly
        out, stats = reallocate(spec, src, dst, shards, bucket_bytes=4096, direct_min_bytes=0 if i % 2 else 2**20,
                                alias_local=i % 3 == 0)
        if i % 3 == 0 and shards is not None:  # a whole shard kept on its rank is the source tensor itself
            kept = [n for n, t in out.items() if n in shards and t.shape == shards[n].shape
                    and torch.equal(t, shards[n]) and t.data_ptr() == shards[n].data_ptr()]
            assert stats.bytes_aliased == sum(out[n].numel() for n in kept) * 4
        expected = spec.shard_state(full, dst, rank) if rank in dst.ranks else {}
        assert out.keys() == expected.keys(), (src, dst)
        for n, t in out.items():
            assert torch.equal(t, expected[n]), (str(src), str(dst), n)  # bitwise
        plan_bytes = sum(t.numel for t in transfer_plan(spec, src, dst) if t.src != t.dst) * 4
        assert stats.bytes_sent == plan_bytes
        # the next iteration: the source changed in place (an optimizer step), the move refills the
        # previous targets in place (the same tensors), aliased shards stay the source tensors
        if shards is not None:
            for t in shards.values():
                t.mul_(-2.0)
        again, _ = reallocate(spec, src, dst, shards, bucket_bytes=4096, alias_local=i % 3 == 0, out=out)
        expected = spec.shard_state({n: -2.0 * t for n, t in full.items()}, dst, rank) if rank in dst.ranks else {}
        for n, t in again.items():
            assert t is out[n] and torch.equal(t, expected[n]), (str(src), str(dst), n)
        checked.append(f"{src}->{dst}")
    return checked


@pytest.mark.timeout(240)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_reallocation_is_bitwise_exact_for_random_layout_pairs(family):
    results = spawn(_realloc_random_pairs, 4, args=(family, 12), timeout_s=200)
    assert results[0] == results[3] and len(results[0]) == 12
    # the pairs cover overlapping and disjoint meshes, and tp / pp changes
    pairs = [p.split("->") for p in results[0]]
    layouts = [(Layout.parse(a), Layout.parse(b)) for a, b in pairs]
    assert any(not set(a.ranks) & set(b.ranks) for a, b in layouts)
    assert any(set(a.ranks) & set(b.ranks) for a, b in layouts)
    assert any(a.tp != b.tp for a, b in layouts) and any(a.pp != b.pp for a, b in layouts)


def _move_bf16_shards_by_an_fp32_spec(rank: int, world: int) -> None:
    model = tiny_model("llama", vocab_size=96)
    spec = ShardSpec(model.args)  # fp32
    src, dst = Layout((0, 1), tp=2), Layout((0, 1), dp=2)
    shards = {n: t.to(torch.bfloat16) for n, t in spec.shard_state(dict(model.named_parameters()), src, rank).items()}
    reallocate(spec, src, dst, shards)


def test_shards_of_another_dtype_than_the_spec_are_refused():
    """The move's buffers are the spec's dtype: bf16 shards (a bf16 critic moved as the fp32
    actor's spec once did) are an error naming both dtypes, not values arriving as garbage."""
    with pytest.raises(DistributedJobError, match="is torch.bfloat16, the move's spec says torch.float32"):
        spawn(_move_bf16_shards_by_an_fp32_spec, 2, timeout_s=90, collective_timeout_s=30)


def _raise_mid_iteration(rank: int, world: int) -> None:
    dist.barrier()
    if rank == 1:
        raise RuntimeError("reward function failed on sample 7")
    dist.barrier()  # the others wait here for rank 1, which never comes


def _die_mid_iteration(rank: int, world: int) -> None:
    dist.barrier()
    if rank == 2:
        os._exit(3)
    dist.barrier()


@pytest.mark.timeout(120)
def test_a_rank_that_raises_ends_the_job_with_its_error():
    t0 = time.monotonic()
    with pytest.raises(DistributedJobError, match="rank 1 raised:(.|\n)*reward function failed on sample 7") as e:
        spawn(_raise_mid_iteration, 3, timeout_s=90, collective_timeout_s=60)
    assert e.value.rank == 1
    assert time.monotonic() - t0 < 60  # the others are stopped at once, not after a collective timeout


@pytest.mark.timeout(120)
def test_a_rank_that_dies_ends_the_job():
    with pytest.raises(DistributedJobError, match="rank 2 died \\(exit code 3\\)"):
        spawn(_die_mid_iteration, 3, timeout_s=90, collective_timeout_s=60)


def _abort_at_exit(rank: int, world: int) -> int:
    import atexit
    import os

    if rank == 1:
        atexit.register(os.abort)  # as torch's teardown has done once its work was finished
    dist.barrier()
    return rank * 10


@pytest.mark.timeout(120)
def test_a_rank_that_dies_in_teardown_after_returning_keeps_its_result():
    with pytest.warns(RuntimeWarning, match="rank 1 exited with code -6 after returning its result"):
        assert spawn(_abort_at_exit, 2, timeout_s=90, collective_timeout_s=60) == [0, 10]


def _late_rank(rank: int, world: int, late_s: float) -> int:
    if rank == 1:
        time.sleep(late_s)  # another mesh's long generation, say
    dist.barrier()
    return rank


@pytest.mark.timeout(120)
def test_collective_timeout_bounds_a_wait_and_the_job_has_no_limit_of_its_own():
    assert spawn(_late_rank, 2, args=(2.0,), timeout_s=None, collective_timeout_s=30) == [0, 1]
    t0 = time.monotonic()
    with pytest.raises(DistributedJobError, match="rank 0"):
        spawn(_late_rank, 2, args=(20.0,), timeout_s=None, collective_timeout_s=2)
    assert time.monotonic() - t0 < 15  # rank 0 gave up after 2 s, and the job with it


def _sleep_rank(rank: int, world: int, pid_dir: str) -> None:
    (Path(pid_dir) / f"{rank}.pid").write_text(str(os.getpid()))
    time.sleep(100)


def _launch_sleepers(pid_dir: str) -> None:  # the launcher process that the test below kills
    spawn(_sleep_rank, 2, args=(pid_dir,), timeout_s=None, collective_timeout_s=60)


def _running(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "State:\tZ" not in status.read_text()  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads process states from /proc")
@pytest.mark.timeout(120)
def test_ranks_end_when_their_launcher_is_killed(tmp_path):
    """A killed launcher runs no cleanup: its ranks must notice and stop, not run the job alone.
    Started as a background job is (`cmd &`, nohup): SIGINT ignored, which the ranks inherit, so
    torch's own guard (SIGINT to a child whose parent died) does nothing."""
    root = Path(__file__).resolve().parent.parent
    launcher = subprocess.Popen([sys.executable, "-c", f"from tests.test_realloc import _launch_sleepers; "
                                 f"_launch_sleepers({str(tmp_path)!r})"], cwd=root,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 90
        while len(list(tmp_path.glob("*.pid"))) < 2:
            assert time.monotonic() < deadline and launcher.poll() is None, "the ranks did not start"
            time.sleep(0.2)
        pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.monotonic() + 15
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [pid for pid in pids if _running(pid)]
    for pid in alive:
        os.kill(pid, 9)
    assert not alive, f"ranks {alive} outlived their launcher"


def _staging_peaks(rank: int, world: int, pairs: list[tuple[str, str]]) -> list[int]:
    from remesh.runtime.memory import PeakTensorMemory

    model = tiny_model("llama", vocab_size=4096, dim=128)  # a 2 MiB embedding travels as its own message
    full = {n: p.detach() for n, p in model.named_parameters()}
    spec = ShardSpec(model.args)
    extra = []
    first_src, first_dst = Layout.parse(pairs[0][0]), Layout.parse(pairs[0][1])
    reallocate(spec, first_src, first_dst,  # first p2p calls allocate once
               spec.shard_state(full, first_src, rank) if rank in first_src.ranks else None)
    for s, d in pairs:
        src, dst = Layout.parse(s), Layout.parse(d)
        shards = spec.shard_state(full, src, rank) if rank in src.ranks else None
        with PeakTensorMemory() as m:
            before = m.live
            out, _ = reallocate(spec, src, dst, shards)
            targets = sum(t.untyped_storage().nbytes() for t in out.values())
        extra.append(m.max_peak - before - targets)  # beyond the source and target shards
    return extra


@pytest.mark.timeout(120)
def test_staging_memory_is_what_the_planner_counts():
    from remesh.planner.estimator import _transfer_totals

    pairs = [("d2@0-1", "d1@2"), ("d1@0", "t2@1-2"), ("t2@0-1", "d3@0-2"), ("p2@0-1", "d1t2@1-2")]
    measured = spawn(_staging_peaks, 3, args=(pairs,), timeout_s=100)
    args = tiny_model("llama", vocab_size=4096, dim=128).args
    for i, (s, d) in enumerate(pairs):
        counted = _transfer_totals(args, "float32", Layout.parse(s), Layout.parse(d))[4]
        for rank in range(3):
            assert measured[rank][i] == counted.get(rank, 0), (s, d, rank)
    assert measured[2][0] > 0 and measured[0][1] > 0  # the packed layers, received and sent
