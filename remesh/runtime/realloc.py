"""Parameter reallocation: move a model from one layout to another (ReaL's core mechanism).

`transfer_plan` is pure: from the model's shard spec and the source and target layouts, it
lists which source rank sends which slice of which parameter to which target rank. A piece a
target rank already holds is copied locally; otherwise the sender is chosen among the source
replicas that hold it (dp replicas, tp peers of a replicated parameter, both stages of a tied
embedding) as the one that has sent the fewest bytes so far, so that sending is spread over
every replica instead of falling on dp rank 0. Every rank computes the same plan.

`reallocate` executes it with torch.distributed point-to-point, in rounds of at most
`bucket_bytes` per peer, every round's sends and receives posted together. A large piece that
is contiguous on at least one side travels as its own message, sent from the source tensor or
received into the target tensor where it is contiguous there (whole tensors and dim-0 slices:
no copy at all; a tensor-parallel row split: one copy, on its strided side); the small pieces
of the round are packed into one flat message per peer and unpacked on arrival. Packing and
strided pieces go through one staging buffer per peer, reused from round to round. It returns
the target shards and the bytes, time and bandwidth of the move.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from remesh.plan.layout import Layout, ShardSpec


ROUND_BYTES = 64 * 2**20  # per peer and round
DIRECT_MIN_BYTES = 2**20  # contiguous pieces this large travel as their own messages, without a copy


@dataclass(frozen=True)
class Transfer:
    src: int  # global rank that sends
    dst: int  # global rank that receives
    name: str  # parameter
    dim: int  # the dim the slices are taken along
    src_start: int  # offsets into the sender's local shard
    dst_start: int  # offsets into the receiver's local shard
    length: int
    numel: int  # elements moved


@dataclass
class ReallocStats:
    bytes_sent: int  # over the network (pieces between different ranks), whole job
    bytes_local: int  # kept within a rank (copied or aliased), whole job
    seconds: float  # this rank's wall time, collective entry to exit
    messages: int  # messages this rank sent
    bytes_aliased: int = 0  # of this rank's target, taken as its source tensors without a copy

    @property
    def bandwidth(self) -> float:
        """Network bytes of the whole job per second of this rank's wall time."""
        return self.bytes_sent / self.seconds if self.seconds > 0 else 0.0

    def describe(self, src: Layout, dst: Layout) -> str:
        local = f"{self.bytes_local / 2**20:.1f} MiB kept on their ranks"
        if self.bytes_aliased:
            local += f" ({self.bytes_aliased / 2**20:.1f} MiB here without a copy)"
        sent = (f"{self.bytes_sent / 2**20:.1f} MiB sent at {self.bandwidth / 2**30:.2f} GiB/s" if self.bytes_sent
                else "nothing sent")
        return f"realloc {src} -> {dst}: {sent}, {local}, {self.seconds * 1e3:.1f} ms"


def transfer_plan(spec: ShardSpec, src: Layout, dst: Layout) -> list[Transfer]:
    """Every piece every target rank needs, each from exactly one source rank."""
    spec.check(src, f"source layout {src}")
    spec.check(dst, f"target layout {dst}")
    sent: dict[int, int] = defaultdict(int)  # bytes each source rank has been given to send
    out: list[Transfer] = []
    src_params = {p.name: p for p in spec.params(src.pp)}
    for q in spec.params(dst.pp):
        p = src_params[q.name]
        # source ranks by the slice they hold; several hold each slice (replicas)
        holders: dict[tuple[int, int], list[int]] = defaultdict(list)
        for s in src.ranks:
            have = spec.local_slice(p, src, s)
            if have is not None:
                holders[have[1:]].append(s)
        for r in dst.ranks:
            want = spec.local_slice(q, dst, r)
            if want is None:
                continue
            dim, a, b = want
            # cover [a, b) with the source slices, left to right
            pos = a
            for (sa, sb), ranks in sorted(holders.items()):
                lo, hi = max(a, sa), min(b, sb)
                if lo >= hi or lo != pos:
                    continue
                numel = (hi - lo) * (p.numel // p.shape[dim])
                sender = r if r in ranks else min(ranks, key=lambda s: (sent[s], (s - r) % (1 << 20)))
                if sender != r:
                    sent[sender] += numel
                out.append(Transfer(sender, r, q.name, dim, lo - sa, lo - a, hi - lo, numel))
                pos = hi
            if pos != b:  # cannot happen for layouts of the same spec; guards future specs
                raise AssertionError(f"{q.name}: target rank {r} slice [{a}, {b}) not covered (reached {pos})")
    return out


def _pieces(plan: list[Transfer], rank: int) -> tuple[dict[int, list[Transfer]], dict[int, list[Transfer]], list[Transfer]]:
    sends, recvs, local = defaultdict(list), defaultdict(list), []
    for t in plan:
        if t.src == rank and t.dst == rank:
            local.append(t)
        elif t.src == rank:
            sends[t.dst].append(t)
        elif t.dst == rank:
            recvs[t.src].append(t)
    return sends, recvs, local


def _contiguous(shape: tuple[int, ...], dim: int, length: int) -> bool:
    """Whether narrowing a contiguous tensor of `shape` along `dim` leaves it contiguous."""
    outer = 1
    for n in shape[:dim]:
        outer *= n
    return outer == 1 or length == shape[dim]


def _buckets(pieces: list[Transfer], max_numel: int) -> list[list[Transfer]]:
    """Consecutive pieces, each bucket at most `max_numel` elements (a larger piece alone)."""
    out, cur, n = [], [], 0
    for t in pieces:
        if cur and n + t.numel > max_numel:
            out.append(cur)
            cur, n = [], 0
        cur.append(t)
        n += t.numel
    if cur:
        out.append(cur)
    return out


class MessageRules:
    """How a move's pieces travel: a large piece contiguous on at least one side is its own
    message, sent from or received into the tensor itself on that side (one copy at most, on the
    strided side); the others are packed into one flat message per peer and round."""

    def __init__(self, spec: ShardSpec, src: Layout, dst: Layout, direct_min_bytes: int):
        self.spec, self.layouts = spec, {"src": src, "dst": dst}
        self.min_numel = direct_min_bytes / spec.element_size
        self._shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}  # by (side, stage, tp index) and (side, rank)

    def shapes(self, side: str, rank: int) -> dict[str, tuple[int, ...]]:
        """The rank's local shapes on `side`: those of its (stage, tp index), computed once each
        (the planner asks for every rank of 128-device layouts)."""
        if (side, rank) not in self._shapes:
            layout = self.layouts[side]
            stage, _, tp_index = layout.coord(rank)
            key = (side, stage, tp_index)
            if key not in self._shapes:
                self._shapes[key] = self.spec.local_shapes(layout, rank)
            self._shapes[(side, rank)] = self._shapes[key]
        return self._shapes[(side, rank)]

    def contiguous(self, t: Transfer, side: str) -> bool:
        return _contiguous(self.shapes(side, t.src if side == "src" else t.dst)[t.name], t.dim, t.length)

    def own_message(self, t: Transfer) -> bool:
        return t.numel >= self.min_numel and (self.contiguous(t, "src") or self.contiguous(t, "dst"))

    def staged(self, t: Transfer, side: str) -> bool:
        """Whether `t` goes through `side`'s staging buffer: packed, or its own message but strided there."""
        return not self.own_message(t) or not self.contiguous(t, side)

    def split(self, pieces: list[Transfer], side: str) -> tuple[list[Transfer], list[Transfer], int]:
        """A peer's pieces of a round: packed, own messages, and the staging elements they need
        on `side`."""
        packed, own = [], []
        for t in pieces:
            (own if self.own_message(t) else packed).append(t)
        return packed, own, sum(t.numel for t in pieces if self.staged(t, side))

    def staged_on(self, t: Transfer) -> tuple[int, ...]:
        """The ranks whose staging buffers `t` goes through (none when it is its own message,
        contiguous on both sides). A peer's buffer is its largest round's need: at most the sum
        of its staged pieces, and exactly that when they fit one round (the planner counts it)."""
        if t.src == t.dst:
            return ()
        return tuple(r for side, r in (("src", t.src), ("dst", t.dst)) if self.staged(t, side))


def _staging_needs(buckets: dict[int, list[list[Transfer]]], rules: MessageRules, side: str) -> dict[int, int]:
    """Staging elements per peer: its largest round's need."""
    return {peer: max(rules.split(b, side)[2] for b in rounds) for peer, rounds in buckets.items()}


def reallocate(spec: ShardSpec, src: Layout, dst: Layout, shards: dict[str, Tensor] | None,
               plan: list[Transfer] | None = None, group: dist.ProcessGroup | None = None,
               bucket_bytes: int = ROUND_BYTES, device: torch.device | str = "cpu",
               direct_min_bytes: int = DIRECT_MIN_BYTES, out: dict[str, Tensor] | None = None,
               alias_local: bool = False) -> tuple[dict[str, Tensor], ReallocStats]:
    """Collective over every rank of src and dst (and only those need to call it).

    `shards`: this rank's source shards (None when it is not in the source mesh). Returns this
    rank's target shards ({} when it is not in the target mesh) and the move's statistics.
    `out`: target shards of an earlier move between the same layouts, refilled in place (no
    allocation, no first touch of fresh memory: the RL runtime moves the same layouts every iteration).
    `alias_local`: a target shard that is exactly a source shard on the same rank is returned as
    that tensor, not copied (for a read-only copy used before the source next changes).
    `group`: the process group whose ranks the layouts name (default: the world)."""
    rank = dist.get_rank(group) if group is not None else dist.get_rank()
    plan = transfer_plan(spec, src, dst) if plan is None else plan
    if rank in src.ranks and shards is None:
        raise ValueError(f"rank {rank} is in the source mesh {src} but has no source shards")
    # the buffers are the spec's dtype: another dtype's bytes would arrive as garbage, silently
    if shards and (wrong := next(((n, t.dtype) for n, t in shards.items() if t.dtype != spec.dtype), None)):
        raise ValueError(f"reallocate: rank {rank}'s shard {wrong[0]} is {wrong[1]}, the move's spec says {spec.dtype}")
    dtype = spec.dtype
    max_numel = max(1, bucket_bytes // spec.element_size)
    t0 = time.perf_counter()
    shapes = spec.local_shapes(dst, rank) if rank in dst.ranks else {}
    if out is not None:
        got = {n: tuple(t.shape) for n, t in out.items()}
        if got != shapes:
            raise ValueError(f"reallocate: the given target tensors do not match {dst} on rank {rank}")
    sends, recvs, local = _pieces(plan, rank)
    aliased: dict[str, Tensor] = {}
    if alias_local and rank in dst.ranks:
        aliased = {t.name: shards[t.name] for t in local if t.src_start == t.dst_start == 0
                   and tuple(shards[t.name].shape) == shapes[t.name] and t.length == shapes[t.name][t.dim]}
        local = [t for t in local if t.name not in aliased]
    reuse, own = out or {}, shards or {}

    def target(n: str, shape: tuple[int, ...]) -> Tensor:
        if n in aliased:
            return aliased[n]
        if n in reuse and reuse[n] is not own.get(n):  # never refill a source tensor aliased last time
            return reuse[n]
        return torch.empty(shape, dtype=dtype, device=device)

    out = {n: target(n, shape) for n, shape in shapes.items()}
    for t in local:
        out[t.name].narrow(t.dim, t.dst_start, t.length).copy_(shards[t.name].narrow(t.dim, t.src_start, t.length))
    send_buckets = {peer: _buckets(v, max_numel) for peer, v in sends.items()}
    recv_buckets = {peer: _buckets(v, max_numel) for peer, v in recvs.items()}
    rounds = max([len(b) for b in (*send_buckets.values(), *recv_buckets.values())], default=0)
    messages = 0

    def peer_rank(r: int) -> int:  # point-to-point calls take global ranks
        return dist.get_global_rank(group, r) if group is not None else r

    rules = MessageRules(spec, src, dst, direct_min_bytes)
    # staging for packed and strided pieces: one buffer per peer and direction, as large as the
    # peer's largest round, reused round to round
    send_stage = {peer: torch.empty(n, dtype=dtype, device=device)
                  for peer, n in _staging_needs(send_buckets, rules, "src").items()}
    recv_stage = {peer: torch.empty(n, dtype=dtype, device=device)
                  for peer, n in _staging_needs(recv_buckets, rules, "dst").items()}

    for k in range(rounds):
        ops, unpack, keep = [], [], []  # keep: send buffers stay alive until their wait
        for peer, buckets in send_buckets.items():
            if k >= len(buckets):
                continue
            packed, own, _ = rules.split(buckets[k], "src")
            buf = send_stage[peer]
            messages_out, offset = [], 0
            if packed:
                for t in packed:
                    piece = shards[t.name].narrow(t.dim, t.src_start, t.length)
                    buf[offset:offset + t.numel].view(piece.shape).copy_(piece)
                    offset += t.numel
                messages_out.append(buf[:offset])
            for t in own:
                piece = shards[t.name].narrow(t.dim, t.src_start, t.length)
                if not rules.contiguous(t, "src"):
                    piece = buf[offset:offset + t.numel].view(piece.shape).copy_(piece)
                    offset += t.numel
                messages_out.append(piece)
            for tag, v in enumerate(messages_out):
                keep.append(v.to(device))
                ops.append(dist.isend(keep[-1], peer_rank(peer), group=group, tag=tag))
                messages += 1
        for peer, buckets in recv_buckets.items():
            if k >= len(buckets):
                continue
            packed, own, _ = rules.split(buckets[k], "dst")
            buf = recv_stage[peer]
            messages_in, offset = [], 0
            if packed:
                offset = sum(t.numel for t in packed)
                messages_in.append(buf[:offset])
                unpack.append((buf[:offset], packed))
            for t in own:
                target = out[t.name].narrow(t.dim, t.dst_start, t.length)
                if rules.contiguous(t, "dst"):
                    messages_in.append(target)
                else:
                    messages_in.append(buf[offset:offset + t.numel])
                    unpack.append((buf[offset:offset + t.numel], [t]))
                    offset += t.numel
            for tag, v in enumerate(messages_in):
                ops.append(dist.irecv(v, peer_rank(peer), group=group, tag=tag))
        for op in ops:
            op.wait()
        for flat, pieces in unpack:
            offset = 0
            for t in pieces:
                target = out[t.name].narrow(t.dim, t.dst_start, t.length)
                target.copy_(flat[offset:offset + t.numel].view(target.shape))
                offset += t.numel
    if device != "cpu" and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    size = spec.element_size
    stats = ReallocStats(bytes_sent=sum(t.numel for t in plan if t.src != t.dst) * size,
                         bytes_local=sum(t.numel for t in plan if t.src == t.dst) * size,
                         bytes_aliased=sum(t.numel() for t in aliased.values()) * size,
                         seconds=seconds, messages=messages)
    return out, stats
