"""Parameter reallocation of the default 135M model between layouts, against the raw
point-to-point bandwidth of the same backend, measured in the same run.

For every layout pair, on 4 processes (gloo on CPU):
- realloc: `reallocate` as the RL runtime calls it every iteration: shards a rank already holds
  whole taken without a copy (alias_local), the rest refilled into the previous iteration's
  target tensors (transfer plan, bucketed isend/irecv, unpack into target shards);
- cold: the first iteration's move, which allocates its target tensors (fresh memory: the
  kernel maps and zeroes every page on first touch);
- raw: the same traffic matrix (every sender -> receiver pair of the plan, the same bytes) as one
  contiguous buffer per pair, posted at once: what the backend moves with no slicing, packing or
  unpacking, i.e. the bandwidth a reallocation could at best reach with this traffic.
Both are timed as the slowest rank's wall time, alternated, median of --reps. Also the plain
one-pair bandwidth (rank 0 -> 1, one 64 MiB message) for reference.

Headline: realloc_bw_fraction = median over pairs of raw time / realloc time (1.0: as fast as
the backend's raw transfers), with the minimum and the cold moves' median beside it.

    python bench/realloc.py [--quick] [--reps 5]
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import finish, median, parse_args, print_table  # noqa: E402
from remesh.checkpoint import load_hf, resolve_model_path  # noqa: E402
from remesh.plan.layout import Layout, ShardSpec  # noqa: E402
from remesh.runtime.launch import spawn  # noqa: E402
from remesh.runtime.realloc import reallocate, transfer_plan  # noqa: E402

# 135M: 9 heads (3 kv), 30 layers: tp in {1, 3}, pp in {1, 2, 3, 5, ...}
PAIRS = [
    ("d2@0-1", "d2@2-3"),  # replicas to a disjoint mesh (training -> generation instances)
    ("d1p2@0-1", "d2@2-3"),  # pipeline stages to replicas
    ("d4@0-3", "d1p2@0-1"),  # overlapping: every rank already holds what it needs
    ("t3@0-2", "d1@3"),  # gather tensor shards onto one rank
    ("d1@3", "t3@0-2"),  # scatter to tensor shards
    ("d2p2@0-3", "d4@0-3"),  # same mesh, pipeline to data parallel
    ("t3@1-3", "d1p2@0-1"),
]
QUICK_PAIRS = PAIRS[:2] + PAIRS[3:4]


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _raw(traffic: dict[tuple[int, int], int], rank: int) -> float:
    """One contiguous fp32 buffer per (sender, receiver) pair, all posted at once."""
    bufs = {pair: torch.ones(n) for pair, n in traffic.items() if rank in pair}
    dist.barrier()
    t0 = time.perf_counter()
    ops = [dist.isend(b, dst) if src == rank else dist.irecv(b, src) for (src, dst), b in bufs.items()]
    for op in ops:
        op.wait()
    return _slowest(time.perf_counter() - t0)


def _worker(rank: int, world: int, folder: str, pairs: list[tuple[str, str]], reps: int) -> dict:
    model = load_hf(folder, head="lm")
    full = {n: p.detach() for n, p in model.named_parameters()}
    spec = ShardSpec(model.args)
    # plain one-pair bandwidth, for reference
    one_pair = []
    for _ in range(reps):
        one_pair.append(_raw({(0, 1): 16 * 2**20}, rank) if world > 1 else float("nan"))
    out = {"one_pair_gib_s": (64 / 1024) / median(one_pair), "pairs": {}}
    for src_text, dst_text in pairs:
        src, dst = Layout.parse(src_text), Layout.parse(dst_text)
        plan = transfer_plan(spec, src, dst)
        traffic: dict[tuple[int, int], int] = defaultdict(int)
        for t in plan:
            if t.src != t.dst:
                traffic[(t.src, t.dst)] += t.numel
        shards = {n: v.clone() for n, v in spec.shard_state(full, src, rank).items()} if rank in src.ranks else None
        cold_s, realloc_s, raw_s = [], [], []
        for _ in range(reps):
            dist.barrier()
            got, stats = reallocate(spec, src, dst, shards, plan=plan, alias_local=True)  # first iteration
            cold_s.append(_slowest(stats.seconds))
            dist.barrier()
            got, stats = reallocate(spec, src, dst, shards, plan=plan, alias_local=True, out=got)  # later ones
            realloc_s.append(_slowest(stats.seconds))
            raw_s.append(_raw(traffic, rank) if traffic else float("nan"))
        for n, v in got.items():  # the move is exact
            assert torch.equal(v, spec.shard_state(full, dst, rank)[n]), n
        sent = stats.bytes_sent
        out["pairs"][f"{src} -> {dst}"] = {
            "bytes_sent": sent, "bytes_local": stats.bytes_local, "messages_rank0": stats.messages,
            "realloc_s": median(realloc_s), "raw_s": median(raw_s),
            "realloc_gib_s": sent / median(realloc_s) / 2**30 if sent else None,
            "raw_gib_s": sent / median(raw_s) / 2**30 if sent else None,
            "fraction": median(raw_s) / median(realloc_s) if sent else None,
            "cold_s": median(cold_s),
            "fraction_cold": median(raw_s) / median(cold_s) if sent else None,
            "realloc_s_all": realloc_s, "cold_s_all": cold_s, "raw_s_all": raw_s}
        del got
    return out


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: p.add_argument("--reps", type=int, default=0))
    reps = args.reps or (2 if args.quick else 5)
    pairs = QUICK_PAIRS if args.quick else PAIRS
    folder = str(resolve_model_path("default"))
    t0 = time.perf_counter()
    res = spawn(_worker, 4, args=(folder, pairs, reps), timeout_s=1800, collective_timeout_s=600)[0]
    rows = []
    for name, d in res["pairs"].items():
        rows.append([name, d["bytes_sent"] / 2**20, d["realloc_s"] * 1e3, d["cold_s"] * 1e3,
                     d["raw_s"] * 1e3 if d["bytes_sent"] else 0, d["realloc_gib_s"] or 0, d["raw_gib_s"] or 0,
                     d["fraction"] or 0, d["fraction_cold"] or 0])
    print_table(["layouts", "MiB sent", "realloc ms", "cold ms", "raw ms", "realloc GiB/s", "raw GiB/s", "fraction",
                 "cold fraction"], rows)
    pairs = [d for d in res["pairs"].values() if d["fraction"] is not None]
    headline = {"realloc_bw_fraction": round(median([d["fraction"] for d in pairs]), 3),
                "realloc_bw_fraction_min": round(min(d["fraction"] for d in pairs), 3),
                "realloc_bw_fraction_cold": round(median([d["fraction_cold"] for d in pairs]), 3)}
    finish("realloc" + ("_quick" if args.quick else ""), headline, res, backend="gloo", world_size=4, reps=reps,
           model="SmolLM2-135M-Instruct fp32", one_pair_gib_s=round(res["one_pair_gib_s"], 3),
           wall_s=round(time.perf_counter() - t0, 1))


if __name__ == "__main__":
    main()
