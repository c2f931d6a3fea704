"""Data transfer between MFCs on different meshes.

An MFC's outputs are per-sample items (a response, its log-probs, a score), held by each data-
parallel replica of the producer for the samples it processed: on the replica's first tensor-
parallel rank of its last pipeline stage (where outputs appear). The consumer's replicas get
the samples re-balanced by tokens (longest first onto the least loaded replica), and every rank
of a consumer replica receives its replica's samples (tp peers and pipeline stages all need
them). Only the producer's and consumer's ranks take part, so MFCs on other meshes go on
concurrently. Sends are blocking, issued in one global order on every rank, which cannot
deadlock: the earliest unfinished pair always has both sides ready.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from remesh.plan.layout import Layout
from remesh.runtime.groups import ProcessGroups


def balance_by_tokens(lengths: dict[int, int], parts: int) -> list[list[int]]:
    """Sample ids split into `parts` lists of nearly equal total length (LPT: longest first onto
    the least loaded part, ties by part index); each list in increasing id order."""
    loads = [0] * parts
    out: list[list[int]] = [[] for _ in range(parts)]
    for sid in sorted(lengths, key=lambda s: (-lengths[s], s)):
        k = min(range(parts), key=lambda i: (loads[i], i))
        out[k].append(sid)
        loads[k] += lengths[sid]
    return [sorted(x) for x in out]


def balance_units(units: list[list[int]], cost: Callable[[list[int]], float], parts: int) -> list[list[int]]:
    """`balance_by_tokens` over units of ids that go together (the samples of one prompt, which
    share its tokens in a packed forward), each at `cost(unit)`, when there are at least `parts`
    units; else over their ids one by one. A unit is known by its smallest id (ties go to the
    lower); each part's ids in increasing order."""
    if len(units) < parts:
        units = [[i] for unit in units for i in unit]
    by_first = {min(unit): unit for unit in units}
    split = balance_by_tokens({k: cost(unit) for k, unit in by_first.items()}, parts)
    return [sorted(i for k in part for i in by_first[k]) for part in split]


def balance_groups(lengths: dict[int, int], parts: int, group_size: int = 1) -> list[list[int]]:
    """`balance_units` over groups of `group_size` consecutive ids, each costing its lengths' sum."""
    groups: dict[int, list[int]] = {}
    for sid in sorted(lengths):
        groups.setdefault(sid // group_size, []).append(sid)
    return balance_units(list(groups.values()), lambda ids: sum(lengths[s] for s in ids), parts)


def holder_rank(layout: Layout, dp: int) -> int:
    """The rank that holds a producer replica's outputs."""
    return layout.rank_at(layout.pp - 1, dp, 0)


def object_device() -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None


def redistribute(items: dict[int, Any] | None, lengths: dict[int, int] | None, src: Layout, dst: Layout,
                 groups: ProcessGroups, replicate: bool = False, group_size: int = 1) -> dict[int, Any]:
    """Collective over the ranks of src and dst. `items`/`lengths`: on a holder rank of src, its
    replica's samples and their token counts (None elsewhere). Returns, on every rank of dst,
    the samples of its replica, by id ({} on ranks outside dst); with `replicate`, every rank
    of dst gets every sample. Ids `group_size` apart from a multiple of it stay on one replica
    where there are enough groups (`balance_groups`)."""
    rank = dist.get_rank()
    if rank not in src.ranks and rank not in dst.ranks:
        return {}
    holders = {holder_rank(src, d) for d in range(src.dp)}
    if rank in holders and (items is None or lengths is None or items.keys() != lengths.keys()):
        raise ValueError(f"rank {rank} holds producer outputs under {src}: pass its items and their lengths")
    device = object_device()
    if replicate and set(src.ranks) == set(dst.ranks) and src.size > 1:
        # every rank wants every sample and already holds a share: one all-gather, where the
        # pairwise sends below take a message per (holder, receiver) pair, one after another
        gathered = [None] * src.size
        dist.all_gather_object(gathered, items if rank in holders else None, group=groups.get(src.ranks))
        return dict(sorted((sid, item) for part in gathered if part for sid, item in part.items()))
    # 1. every src rank learns which holder has which sample and how long it is
    info = {s: (lengths if rank == s else None) for s in holders}
    if rank in src.ranks and src.size > 1:
        gathered: list[Any] = [None] * src.size
        dist.all_gather_object(gathered, lengths if rank in holders else None, group=groups.get(src.ranks))
        info = {r: g for r, g in zip(src.ranks, gathered) if r in holders}
    # 2. the src leader tells dst ranks outside src the same
    leader = src.ranks[0]
    for r in dst.ranks:
        if r in src.ranks:
            continue
        box = [info]
        if rank == leader:
            dist.send_object_list(box, dst=r, device=device)
        elif rank == r:
            dist.recv_object_list(box, src=leader, device=device)
            info = box[0]
    all_lengths = {sid: n for part in info.values() for sid, n in part.items()}
    holder_of = {sid: h for h, part in info.items() for sid in part}
    assignment = [sorted(all_lengths)] * dst.dp if replicate else balance_groups(all_lengths, dst.dp, group_size)
    # 3. samples to their consumer ranks, one message per (holder, receiver) pair
    received: dict[int, Any] = {}
    for r in sorted(dst.ranks):
        wanted = assignment[dst.coord(r)[1]]
        for h in sorted(holders):
            ids = [sid for sid in wanted if holder_of[sid] == h]
            if not ids:
                continue
            if h == r:
                if rank == r:
                    received.update({sid: items[sid] for sid in ids})
            elif rank == h:
                dist.send_object_list([{sid: items[sid] for sid in ids}], dst=r, device=device)
            elif rank == r:
                box = [None]
                dist.recv_object_list(box, src=h, device=device)
                received.update(box[0])
    return dict(sorted(received.items()))
