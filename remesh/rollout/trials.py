"""Free acceptance trials: how deep a point-mass drafter's draft would have been accepted,
scored against the tokens decoding emits anyway, without verifying it.

With point-mass drafters (n-gram, history) verification accepts exactly the draft path that
spells the tokens the target samples with the sequence's own uniforms (`matched_depth`), and
those are the tokens the sequence emits whatever the strategy. So a draft proposed before a
step and compared with what the sequence emits over the next steps is a sample of the drafter's
acceptance, for the price of a lookup. The adaptive policy keeps such drafters' statistics
current while it decodes plainly, instead of probing them with verification steps: a probe is
a forward over every live sequence's draft (at 16 live sequences on a CPU, ~1.5 plain steps)
and, at a batch shape not met before, a kernel tuning too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from remesh.rollout.adaptive import Strategy
from remesh.rollout.speculative import Draft, matched_depth


@dataclass(frozen=True)
class Trial:
    drafter: str
    width: int
    draft: Draft
    start: int  # the sequence's response length when proposed: node 1 guesses response[start]

    @property
    def depth(self) -> int:
        return max(self.draft.depths())

    def outcome(self, response: list[int], finished: bool) -> int | None:
        """The accepted depth, once known: after the first mismatch, at the draft's full depth,
        or when the sequence ends; None while the emitted tokens still follow the draft."""
        emitted = response[self.start:]
        depth = matched_depth(self.draft, emitted)
        if depth < len(emitted) or depth >= self.depth or finished:
            return depth
        return None


@dataclass
class Trials:
    """Open trials, at most one per sequence. Each step opens trials of one (drafter, width,
    depth) shape, the shapes taken in turn, for up to `per_step` sequences without one, the
    sequences taken in turn: the cost per step is bounded, whatever the batch."""

    shapes: list[tuple[str, int, int]]  # (drafter, width, depth): the deepest draft of each kind tried
    per_step: int = 4
    open: dict[int, Trial] = field(default_factory=dict)  # seq_id -> its open trial
    _turn: int = 0

    def next(self, seq_ids: list[int], verified: Strategy) -> tuple[tuple[str, int, int], list[int]] | None:
        """The shape to try this step and the sequences (indices into `seq_ids`) to try it on;
        None if there are none. Not a shape that the step's own drafts (`verified`) measure
        already: the same drafter and width, no deeper. A deeper one still runs: the verified
        drafts say nothing of the levels past their depth, which would then keep their prior
        and hold the choice at the depth it has."""
        shapes = [s for s in self.shapes
                  if (s[0], s[1]) != (verified.drafter, verified.width) or s[2] > verified.depth]
        free = [i for i, sid in enumerate(seq_ids) if sid not in self.open]
        if not shapes or not free:
            return None
        self._turn += 1
        start = self._turn * self.per_step % len(free)
        picked = (free[start:] + free[:start])[:self.per_step]
        return shapes[self._turn % len(shapes)], picked
