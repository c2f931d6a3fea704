"""Sample migration between data-parallel generation instances (RLHFSpec): the pure decisions.

Which sequences move where (`plan_moves`), and for each moved sequence whether its KV cache
travels or the receiver recomputes it (`send_cache`). The distributed protocol that applies
them is `remesh/runtime/migration.py`; the engine's side is `RolloutEngine.release/adopt`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Move:
    src: int  # data-parallel instance giving sequences
    dst: int  # instance receiving them
    count: int


def plan_moves(loads: list[int], min_gap: int = 2) -> list[Move]:
    """Moves that even out the instances' unfinished sequences, when the most and least loaded
    differ by `min_gap` or more: every instance ends with floor or ceil of the mean (the extra
    ones stay with the most loaded, which then give the fewest), the largest surplus feeding the
    largest deficit first. Nothing moves twice. Deterministic (ties by index), so every rank
    derives the same moves.

    Why even counts help: an instance's decode step costs more the more sequences it holds
    (linearly on a CPU; on a GPU through the speculation depth: the adaptive policy drafts
    deeper for a small batch), and the iteration waits for the slowest instance."""
    if min_gap < 1:
        raise ValueError(f"min_gap must be >= 1, got {min_gap}")
    if len(loads) < 2 or max(loads) - min(loads) < min_gap:
        return []
    q, r = divmod(sum(loads), len(loads))
    heaviest = sorted(range(len(loads)), key=lambda i: (-loads[i], i))
    target = [q + (i in heaviest[:r]) for i in range(len(loads))]
    surplus = sorted(([i, loads[i] - target[i]] for i in range(len(loads)) if loads[i] > target[i]),
                     key=lambda x: (-x[1], x[0]))
    deficit = sorted(([i, target[i] - loads[i]] for i in range(len(loads)) if loads[i] < target[i]),
                     key=lambda x: (-x[1], x[0]))
    moves = []
    while surplus and deficit:
        (src, give), (dst, take) = surplus[0], deficit[0]
        k = min(give, take)
        moves.append(Move(src, dst, k))
        surplus[0][1] -= k
        deficit[0][1] -= k
        if surplus[0][1] == 0:
            surplus.pop(0)
        if deficit[0][1] == 0:
            deficit.pop(0)
    return moves


@dataclass(frozen=True)
class Link:
    """A point-to-point link between two instances: seconds = latency + bytes / bandwidth."""

    bytes_per_s: float
    latency_s: float

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


def send_cache(cached_tokens: int, kv_bytes_per_token: int, link: Link, recompute_seconds: float) -> bool:
    """True when sending a sequence's KV cache (`cached_tokens` positions) is expected to be
    faster than recomputing its context on the receiver (one forward over those tokens)."""
    if cached_tokens <= 0:
        return False
    return link.seconds(cached_tokens * kv_bytes_per_token) < recompute_seconds
