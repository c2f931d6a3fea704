"""Generation as several data-parallel instances that hand unfinished samples to each other.

Every rank of the generate call's mesh runs its instance's engine in rounds of a few steps.
After each round the ranks exchange their instances' unfinished counts and step-time models
(one all-gather over the mesh); every rank then derives the same moves (`plan_moves`), and a
giving instance's ranks send sequences to the receiving instance's ranks of the same tensor-
parallel index, each with its shard of the KV cache or without it (`send_cache`: link time vs
the receiver's predicted time to recompute the context). Decisions use only gathered values,
never a rank's own timings, so tensor-parallel peers always agree. An instance that ran out of
work keeps joining the rounds and receives work; the call ends when no instance has any.
Finished samples are sent back to the instance that owns their prompt, so the caller gets
what `RolloutEngine.generate` gives: migration changes where a sample is decoded, never what.
After a move the adaptive policy sees the new batch size at its next step and re-chooses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from remesh.plan.layout import Layout
from remesh.rollout.adaptive import StepTimeModel
from remesh.rollout.engine import MovedSeq, Rollout, RolloutEngine
from remesh.rollout.migration import Link, Move, plan_moves, send_cache
from remesh.rollout.sampling import SamplingParams
from remesh.runtime.data import object_device
from remesh.runtime.groups import ProcessGroups


@dataclass
class MigrationStats:
    rounds: int = 0
    moves: list[tuple[int, int, int]] = field(default_factory=list)  # (round, src, dst) per moved sequence
    with_cache: int = 0  # moved with their KV cache (in the moves this rank took part in)
    recomputed: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0  # spent in moves and load exchanges
    link: Link | None = None

    def describe(self) -> str:
        link = f", link {self.link.bytes_per_s / 1e9:.2f} GB/s {self.link.latency_s * 1e6:.0f} us" if self.link else ""
        return (f"{self.rounds} rounds, {len(self.moves)} sequences moved ({self.with_cache} with KV cache, "
                f"{self.recomputed} recomputed, {self.bytes_sent / 2**20:.2f} MiB), {self.seconds:.3f}s{link}")


class MigratingGenerator:
    """Drives one data-parallel generation instance's engine on this rank. Collective over
    `layout.ranks` (pp must be 1); reuse it across calls: the link is measured once."""

    def __init__(self, layout: Layout, groups: ProcessGroups, every: int = 8, min_gap: int = 2,
                 transfer: str = "auto"):
        """`every`: engine steps between load exchanges; `transfer`: "auto" (the cost model),
        "cache" or "recompute" (always that)."""
        if transfer not in ("auto", "cache", "recompute"):
            raise ValueError(f"transfer must be auto, cache or recompute, got {transfer!r}")
        if layout.pp != 1:
            raise ValueError(f"generation under {layout}: pipeline stages cannot hold a KV cache slot per sequence")
        if every < 1:
            raise ValueError(f"migration rounds need >= 1 step, got every={every}")
        self.layout, self.groups, self.every, self.min_gap, self.transfer = layout, groups, every, min_gap, transfer
        self.rank = dist.get_rank()
        _, self.dp, self.tp = layout.coord(self.rank)
        self.link: Link | None = None
        self.stats = MigrationStats()

    def generate(self, engine: RolloutEngine, prompts: list[list[int]], params: SamplingParams,
                 prompt_keys: list[int], reserve: tuple[int, int]) -> list[Rollout]:
        """This instance's rollouts of `prompts` (its share of the batch, keyed by `prompt_keys`),
        exactly as `engine.generate` would return them. `reserve` = (sequences per instance at
        most, longest prompt of the batch): the cache room adopted sequences may need."""
        if self.link is None:
            self.link = self._measure_link()
        self.stats = MigrationStats(link=self.link)
        mesh = self.groups.get(self.layout.ranks)
        engine.begin(prompts, params, prompt_keys, reserve=reserve)
        try:
            while True:
                for _ in range(self.every):
                    if not engine.advance():
                        break
                t0 = time.perf_counter()
                info: list = [None] * self.layout.size
                dist.all_gather_object(info, (self.dp, self.tp, engine.unfinished, engine.policy.step_time.points()),
                                       group=mesh)
                first = {dp: (n, pts) for dp, tp, n, pts in info if tp == 0}
                loads = [first[d][0] for d in range(self.layout.dp)]
                if sum(loads) == 0:
                    self.stats.seconds += time.perf_counter() - t0
                    break
                self.stats.rounds += 1
                for move in plan_moves(loads, self.min_gap):
                    self._apply(engine, move, StepTimeModel.from_points(first[move.dst][1]))
                self.stats.seconds += time.perf_counter() - t0
        finally:
            mine = engine.collect()
        return self._send_home(mine, set(prompt_keys))

    def _apply(self, engine: RolloutEngine, move: Move, receiver_time: StepTimeModel) -> None:
        self.stats.moves += [(self.stats.rounds, move.src, move.dst)] * move.count  # every rank counts every move
        peer_of = {move.src: self.layout.rank_at(0, move.dst, self.tp), move.dst: self.layout.rank_at(0, move.src, self.tp)}
        if self.dp not in peer_of:
            return
        device = object_device()
        cache = engine.cache
        per_token = 2 * cache.k.shape[0] * cache.k.shape[2] * cache.k.shape[4] * cache.k.element_size()
        if self.dp == move.src:
            if self.transfer == "auto":
                choose = lambda n: send_cache(n, per_token, self.link, receiver_time.predict(n))  # noqa: E731
            else:
                choose = lambda n: self.transfer == "cache"  # noqa: E731
            moved = engine.release(move.count, choose)
            head = [MovedSeq(m.prompt_index, m.sample_index, m.prompt, m.response, m.logprobs,
                             None if m.kv is None else m.kv[0].shape) for m in moved]  # kv: its shape only
            dist.send_object_list([head], dst=peer_of[move.src], device=device)
            for m in moved:
                if m.kv is not None:
                    flat = torch.cat([m.kv[0].reshape(-1), m.kv[1].reshape(-1)]).to(cache.k.device)
                    dist.send(flat, dst=peer_of[move.src])
                    self.stats.bytes_sent += flat.numel() * flat.element_size()
        else:
            box: list = [None]
            dist.recv_object_list(box, src=peer_of[move.dst], device=device)
            moved = box[0]
            for m in moved:
                if m.kv is not None:
                    shape = tuple(m.kv)
                    flat = torch.empty(2 * shape[0] * shape[1] * shape[2] * shape[3], dtype=cache.k.dtype,
                                       device=cache.k.device)
                    dist.recv(flat, src=peer_of[move.dst])
                    k, v = flat.view(2, *shape).unbind(0)
                    m.kv = (k, v)
            engine.adopt(moved)
        self.stats.with_cache += sum(m.kv is not None for m in moved)
        self.stats.recomputed += sum(m.kv is None and bool(m.response) for m in moved)

    def _send_home(self, mine: list[Rollout], keys: set[int]) -> list[Rollout]:
        """Every instance gets the finished samples of its own prompts back (over the dp group
        of this tp index: every tp peer holds the same rollouts)."""
        group = self.groups.get(self.layout.dp_group(self.rank))
        if group is None:
            return mine
        gathered: list = [None] * self.layout.dp
        dist.all_gather_object(gathered, [r for r in mine if r.prompt_index not in keys], group=group)
        back = [r for part in gathered for r in part if r.prompt_index in keys]
        out = [r for r in mine if r.prompt_index in keys] + back
        return sorted(out, key=lambda r: (r.prompt_index, r.sample_index))

    def _measure_link(self, reps: int = 3) -> Link:
        """Latency and bandwidth between instance 0 and 1 (ping-pong of 8 bytes and 4 MiB), taken
        by every rank from instance 0's first rank so that all decide alike."""
        a, b = self.layout.rank_at(0, 0, 0), self.layout.rank_at(0, 1, 0)
        device = object_device() or torch.device("cpu")
        best = {}
        if self.rank in (a, b):
            peer = b if self.rank == a else a
            for n in (2, 2**20):
                buf = torch.zeros(n, dtype=torch.float32, device=device)
                best[n] = float("inf")
                for _ in range(reps):
                    t0 = time.perf_counter()
                    if self.rank == a:
                        dist.send(buf, dst=peer)
                        dist.recv(buf, src=peer)
                    else:
                        dist.recv(buf, src=peer)
                        dist.send(buf, dst=peer)
                    best[n] = min(best[n], (time.perf_counter() - t0) / 2)
        measured = None
        if self.rank == a:
            latency = best[2]
            measured = Link(bytes_per_s=4 * 2**20 / max(best[2**20] - latency, 1e-9), latency_s=latency)
        box = [measured]
        group = self.groups.get(self.layout.ranks)
        dist.broadcast_object_list(box, src=a, group=group, device=object_device())
        return box[0]
