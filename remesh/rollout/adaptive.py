"""Workload-aware choice of the drafting strategy, made before every decode step.

goodput(strategy) = expected tokens emitted per sequence x live sequences / predicted step time

- the step time is the verifier's forward (a function of the tokens it processes: live
  sequences x (1 + draft nodes), read off `StepTimeModel`, calibrated on the running device
  and updated after every step) plus the drafter's own time (measured per drafter);
- the expected tokens are 1 + sum_k prod_{i<=k} alpha_i, where alpha_i is the drafter's
  online acceptance rate at depth i given that depth i - 1 was accepted (`AcceptanceStats`).

With many live sequences the verifier is compute-bound and each draft token costs nearly a
full token, so "off" wins; as sequences finish (the long tail), extra tokens per sequence
become almost free and longer drafts win.

The acceptance rates of point-mass drafters (n-gram, history) come from free trials as well
as from the drafts verified: a few sequences per step get a draft that is not verified but
scored against the tokens they emit (trials.py). Other drafters (a draft model) are probed: now
and then one is used for a step whatever its prediction.

The predicted time leaves out costs that no model of the forward sees (building tree masks,
the per-sequence verification walk, cache compaction, sampling). So each step's wall time,
less the bookkeeping every strategy pays alike (the engine's catch-up), is compared with the
time predicted for it, and the median of the last few ratios, kept per drafter ("off"
included) and per live-batch size class, scales that drafter's predicted times:
a systematic error is corrected after a few steps, for every depth and width at once, and one
stalled step does not condemn a drafter. Only the time is corrected: the acceptance rates are
observed directly, so a misjudged acceptance does not linger in the correction of a drafter that
is then never chosen again to revise it.
"""

from __future__ import annotations

import bisect
import statistics
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Strategy:
    drafter: str | None = None  # None: no speculation
    depth: int = 0
    width: int = 1

    def __str__(self) -> str:
        if self.drafter is None:
            return "off"
        return f"{self.drafter}:{self.depth}" + (f"x{self.width}" if self.width > 1 else "")


OFF = Strategy()


def parse_strategy(text: str) -> Strategy:
    """'off', 'ngram:4', 'history:4x2', 'model:3' -> Strategy (the drafter name is checked by the engine)."""
    text = text.strip()
    if text == "off":
        return OFF
    name, _, shape = text.partition(":")
    try:
        depth_s, _, width_s = shape.partition("x")
        depth, width = int(depth_s), int(width_s or 1)
    except ValueError:
        raise ValueError(f"speculation {text!r}: expected off, auto or DRAFTER:DEPTH[xWIDTH], e.g. ngram:4 "
                         "or history:4x2") from None
    if not name or depth < 1 or width < 1:
        raise ValueError(f"speculation {text!r}: depth and width must be >= 1")
    return Strategy(name, depth, width)


DRAFTERS = ("ngram", "history", "model")  # what the engine builds; "model" needs a draft model


def check_speculation(spec: str, draft_model: bool) -> tuple[str, str] | None:
    """What the engine would refuse once the models are loaded, for a run's config or options:
    None if `spec` and the presence of a draft model go together, else which of the two is
    wrong ("spec" or "draft_model"), with ValueError's message. A draft model serves `auto` and
    `model:K[xW]` only: under another strategy it would be loaded and never run."""
    spec = spec.strip()
    try:
        drafter = None if spec == "auto" else parse_strategy(spec).drafter
    except ValueError as e:
        return "spec", str(e)
    if drafter is not None and drafter not in DRAFTERS:
        return "spec", f"speculation {spec!r}: unknown drafter {drafter!r} (known: {', '.join(DRAFTERS)})"
    if drafter == "model" and not draft_model:
        return "spec", f"speculation {spec!r} needs a draft model"
    if draft_model and spec != "auto" and drafter != "model":
        return "draft_model", (f"a draft model is used by speculation 'auto' or 'model:K', not {spec!r} "
                               "(drop the draft model, or change the speculation)")
    return None


class StepTimeModel:
    """Seconds of one verifier forward as a function of the tokens it processes.

    Keeps the median of the last `window` observations per token count and interpolates
    linearly between them (extrapolating with the last segment's slope), so it follows whatever
    shape the device has: flat while weight reads dominate, then linear in the tokens. A median,
    not a moving average: one step stalled by the machine (here a 4x outlier now and then)
    would otherwise make its size look slow for many steps, and speculation fast by contrast.
    The medians are made non-decreasing in the tokens before use (`_fitted`).

    A token count not observed in the last `max_age` observations is dropped where fresher ones
    lie on both sides, and predicted from them like any count never observed. Only a step of
    that many tokens refreshes its point, and the policy's own choice can stop those steps: a
    plain step's point at B live sequences measured slow by a passing load made drafting at B
    look no dearer than decoding plainly, since the draft's point at 2B tokens, refreshed by the
    drafting steps, was pooled with it (`_fitted`); the policy then drafted at B, and no plain
    step at B came to correct it, for good (tests: test_a_plain_step_measured_slow_is_not_believed_forever).
    """

    def __init__(self, window: int = 5, max_age: int | None = 256):
        self.window = window
        self.max_age = max_age
        self._t: list[int] = []
        self._s: list[float] = []  # the median of _obs at each token count
        self._obs: list[list[float]] = []
        self._seen: list[int] = []  # `_clock` at each token count's last observation
        self._clock = 0  # observations so far
        self._fit: list[float] | None = None  # `_fitted`, until the next observation

    def _fitted(self) -> list[float]:
        """The medians, non-decreasing in the tokens (pool adjacent violators: a decreasing run
        becomes its mean). A forward over more tokens is not faster, but the medians of
        neighbouring sizes, each of a few noisy steps, can say so: on the CPU a step of 34
        tokens was predicted faster than one of 17, and a draft then looked cheaper than none."""
        if self._fit is None:
            runs: list[tuple[float, int]] = []  # (mean, points)
            for s in self._s:
                mean, n = s, 1
                while runs and runs[-1][0] > mean:
                    m, k = runs.pop()
                    mean, n = (m * k + mean * n) / (k + n), k + n
                runs.append((mean, n))
            self._fit = [m for m, n in runs for _ in range(n)]
        return self._fit

    def observe(self, tokens: int, seconds: float) -> None:
        self._clock += 1
        i = bisect.bisect_left(self._t, tokens)
        if i == len(self._t) or self._t[i] != tokens:
            self._t.insert(i, tokens)
            self._s.insert(i, seconds)
            self._obs.insert(i, [])
            self._seen.insert(i, 0)
        obs = self._obs[i]
        obs.append(seconds)
        del obs[:-self.window]
        self._s[i] = statistics.median(obs)
        self._seen[i] = self._clock
        self._fit = None
        if self.max_age is not None:
            self._drop_stale()

    def _drop_stale(self) -> None:
        """Forget the token counts not observed in the last `max_age` observations that lie
        between fresher ones: they are interpolated from those. Stale points below or above every
        fresh one stay: they are all there is to go on there (a short call's steps, or a tail of
        few tokens, would otherwise leave a large batch extrapolated from a flat slope)."""
        horizon = self._clock - self.max_age
        fresh = [i for i, seen in enumerate(self._seen) if seen >= horizon]
        # runs every step: one pass, and none stale between the first and last fresh is the usual case
        if len(fresh) < 2 or fresh[-1] - fresh[0] + 1 == len(fresh):
            return
        keep = [*range(fresh[0]), *fresh, *range(fresh[-1] + 1, len(self._t))]
        for name in ("_t", "_s", "_obs", "_seen"):
            kept = getattr(self, name)
            setattr(self, name, [kept[i] for i in keep])

    def points(self) -> list[tuple[int, float]]:
        """(tokens, seconds) pairs: what another rank needs to predict with this model."""
        return list(zip(self._t, self._s))

    @classmethod
    def from_points(cls, points: list[tuple[int, float]]) -> StepTimeModel:
        model = cls()
        for tokens, seconds in sorted(points):
            model.observe(tokens, seconds)
        return model

    @property
    def calibrated(self) -> bool:
        return len(self._t) >= 2

    def predict(self, tokens: int) -> float:
        t, s = self._t, self._fitted()
        if not t:
            return float(tokens)  # uncalibrated: proportional to tokens
        if len(t) == 1:
            return s[0] * max(1.0, tokens / t[0])
        i = bisect.bisect_left(t, tokens)
        if i < len(t) and t[i] == tokens:
            return s[i]
        if i == 0:  # below the smallest point: no cheaper than it
            return s[0]
        if i == len(t):
            i -= 1
        lo, hi = i - 1, i
        slope = max(0.0, (s[hi] - s[lo]) / (t[hi] - t[lo]))
        return max(s[lo], s[lo] + slope * (tokens - t[lo]))


def levels_judged(offered: int, accepted: int) -> int:
    """How many depths one draft's outcome says something about: those accepted and the first
    rejected one, within the depth offered (offered 0: the drafter had nothing, a miss at depth 1)."""
    return min(accepted + 1, max(offered, 1))


@dataclass
class AcceptanceStats:
    """alpha[i]: P(draft token at depth i + 1 accepted | its parent was), per (drafter, width),
    as a running mean that forgets slowly (the policy and the history change during RL).

    The prior is pessimistic (0): free trials and probes do the exploring, so a drafter is
    chosen on evidence, and a level that no draft has reached yet promises nothing. With an
    optimistic prior (0.5 at every level, from before the trials) a drafter whose first level had
    missed a few times still looked worth a deep draft where a deep draft costs about a plain step
    (at batch 1): E = a1 (1 + 0.5 + 0.25 + ...) ~ 2 a1 extra tokens on no evidence."""

    prior: float = 0.0
    prior_weight: float = 2.0
    min_rate: float = 0.02  # learning rate floor: about the last 50 observations count
    _rate: dict[tuple[str, int], list[list[float]]] = field(default_factory=dict)

    def alphas(self, drafter: str, width: int, depth: int) -> list[float]:
        table = self._rate.get((drafter, width), [])
        return [table[i][0] if i < len(table) else self._prior(drafter, width, i) for i in range(depth)]

    def _prior(self, drafter: str, width: int, level: int) -> float:
        """Before a (drafter, width) has been tried at a level: `prior`, or, for a tree, what the
        drafter's chains have shown there, as if each of the `width` candidates were an
        independent chance, 1 - (1 - alpha_chain)^width. A drafter whose chains miss is then not
        tried again at every new width, each probe a full step of wasted verification."""
        chain = self._rate.get((drafter, 1), [])
        if width == 1 or level >= len(chain):
            return self.prior
        return 1.0 - (1.0 - chain[level][0]) ** width

    def observe(self, drafter: str, width: int, offered_depth: int, accepted: int) -> None:
        """One sequence's verification: its draft reached `offered_depth` (0: the drafter had no
        proposal, counted as a miss at depth 1) and the first `accepted` levels were accepted."""
        table = self._rate.setdefault((drafter, width), [])
        for i in range(levels_judged(offered_depth, accepted)):
            while len(table) <= i:
                table.append([self._prior(drafter, width, len(table)), self.prior_weight])
            hit = 1.0 if accepted > i else 0.0
            entry = table[i]
            entry[1] += 1
            entry[0] += max(1.0 / entry[1], self.min_rate) * (hit - entry[0])

    def expected_accepted(self, drafter: str, width: int, depth: int) -> float:
        total, reach = 0.0, 1.0
        for a in self.alphas(drafter, width, depth):
            reach *= a
            total += reach
        return total

    def by_position(self) -> dict[str, list[float]]:
        return {f"{d}" + (f"x{w}" if w > 1 else ""): [round(e[0], 3) for e in t] for (d, w), t in self._rate.items()}


@dataclass
class OverheadBudget:
    """The host time the adaptive machinery (weighing the candidates, opening free trials) may
    take, as a fraction of the decoding time: a token bucket that every step fills with
    `fraction` of its seconds (holding at most `window` steps' worth) and that the machinery's
    measured time drains; the machinery runs while the bucket is not in debt (the engine keeps
    one bucket for choices, one for trials). Where steps are long it never binds (this CPU,
    SmolLM2: a choice and the trials take 0.1-0.3% of a step); where they are short it spaces
    them out (an H100 replaying graphs: ~4 ms a step, of which the same 0.1-0.3 ms of Python
    would be 3-7%) and the last choice stands in between. There the trials run while the device
    computes the step, and only those it waited for are charged (`RolloutEngine._catch_up`).
    `fraction=None`: no limit."""

    fraction: float | None = 0.005
    window: int = 8
    _credit: float = 0.0

    def allows(self) -> bool:
        return self.fraction is None or self._credit >= 0.0

    def spend(self, seconds: float) -> None:
        self._credit -= seconds

    def earn(self, step_seconds: float) -> None:
        if self.fraction is not None:
            gain = self.fraction * step_seconds
            self._credit = min(self._credit + gain, self.window * gain)


@dataclass
class AdaptivePolicy:
    """Chooses the strategy of maximum predicted goodput among the candidates."""

    drafters: dict[str, int]  # drafter name -> max width it supports (1: chains only)
    node_count: dict[str, object] = field(default_factory=dict)  # name -> fn(depth, width) -> nodes
    depths: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    widths: tuple[int, ...] = (1, 2, 4)
    # drafters whose acceptance free trials measure (trials.py): never probed
    trialed: frozenset[str] = frozenset()
    # steps between probes of the least recently used other drafter, with up to `explore_batch`
    # live sequences; beyond, spaced in proportion to the live batch: a probe verifies drafts for
    # every live sequence, so it costs in proportion to them (at 16 live on a CPU, probes every 32
    # steps cost auto 7% against plain decoding), while the tail, where probing pays, keeps the pace
    explore_every: int = 32
    explore_batch: int = 4
    _last_probe: int = 0
    step_time: StepTimeModel = field(default_factory=StepTimeModel)
    acceptance: AcceptanceStats = field(default_factory=AcceptanceStats)
    _draft_cost: dict[str, float] = field(default_factory=dict)  # seconds per sequence per depth level
    _last_used: dict[str, int] = field(default_factory=dict)
    _steps: int = 0
    correction_window: int = 5
    # a correction not refreshed for this many steps is forgotten: else plain decoding's, once
    # low by chance, would keep the policy drafting, and no plain step would ever correct it
    correction_ttl: int = 64
    # (drafter, batch class) -> the last predicted / realised step times, their median, and the
    # step of the last one
    _ratios: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    _correction: dict[tuple[str, int], tuple[float, int]] = field(default_factory=dict)
    _predicted: tuple[Strategy, int, float] | None = None  # the last choice and its predicted seconds
    _last_best: Strategy = OFF  # the last choice on the candidates' merits (not a probe): `repeat`
    _candidate_groups: dict[tuple[str, int], list[tuple[Strategy, int]]] | None = None

    max_nodes: int = 16  # draft tokens per sequence at most (bounds the verifier's work and the cache)
    # a draft must promise this much more goodput than plain decoding: predicted step times on a
    # shared machine are no better than that, and below it a choice is as likely a loss as a gain
    min_gain: float = 1.05

    def candidates(self) -> list[Strategy]:
        return [OFF] + [s for group in self._groups().values() for s, _ in group]

    def _groups(self) -> dict[tuple[str, int], list[tuple[Strategy, int]]]:
        """The speculative candidates by (drafter, width), depths ascending, with their node
        counts: fixed by the configuration, built once (`choose` runs before every step)."""
        if self._candidate_groups is None:
            groups: dict[tuple[str, int], list[tuple[Strategy, int]]] = {}
            for name, max_width in self.drafters.items():
                for w in self.widths:
                    if w <= max_width:
                        group = [(s, self.nodes(s)) for d in self.depths if self.nodes(s := Strategy(name, d, w)) <= self.max_nodes]
                        if group:
                            groups[name, w] = group
            self._candidate_groups = groups
        return self._candidate_groups

    def nodes(self, s: Strategy) -> int:
        if s.drafter is None:
            return 0
        fn = self.node_count.get(s.drafter)
        return fn(s.depth, s.width) if fn else s.depth * s.width

    def predicted_seconds(self, s: Strategy, batch: int) -> float:
        """One step's time with `batch` live sequences: the verifier's forward and the drafting."""
        if s.drafter is None:
            return self.step_time.predict(batch)
        return (self.step_time.predict(batch * (1 + self.nodes(s)))
                + self._draft_cost.get(s.drafter, 0.0) * batch * s.depth)

    def predicted_goodput(self, s: Strategy, batch: int) -> float:
        """Tokens per second with `batch` live sequences, from the step-time and acceptance models."""
        emitted = 1.0 if s.drafter is None else 1.0 + self.acceptance.expected_accepted(s.drafter, s.width, s.depth)
        return batch * emitted / max(self.predicted_seconds(s, batch), 1e-9)

    def goodput(self, s: Strategy, batch: int) -> float:
        """The prediction, its time scaled by how the drafter's steps at this batch size class
        took against their predicted time (`correction`)."""
        return self.predicted_goodput(s, batch) * self.correction(s.drafter or "off", _batch_class(batch))

    def correction(self, drafter: str, size_class: int) -> float:
        """Predicted / realised time of the drafter's last steps at this batch size class
        (median), if one ran there in the last `correction_ttl` steps. A drafter without one
        takes plain decoding's: the costs that no model of the forward sees (sampling, emitting,
        the engine's bookkeeping) are every strategy's, so at 1.0 an untried drafter looked
        faster than plain decoding's measured steps by all of them (on the CPU at 16 live
        sequences: 0.64, and auto drafted at 3% acceptance). Plain decoding without one: 1.0."""
        for key in ((drafter, size_class), ("off", size_class)):
            c = self._correction.get(key)
            if c is not None and self._steps - c[1] < self.correction_ttl:
                return c[0]
        return 1.0

    def observe_step(self, s: Strategy, batch: int, seconds: float) -> None:
        """A finished step's wall time, against the time predicted for it."""
        if seconds <= 0:
            return
        last = self._predicted
        predicted = last[2] if last is not None and last[:2] == (s, batch) else self.predicted_seconds(s, batch)
        key = (s.drafter or "off", _batch_class(batch))
        last_seen = self._correction.get(key, (0.0, self._steps))[1]
        ratios = self._ratios.setdefault(key, [])
        if self._steps - last_seen >= self.correction_ttl:  # forgotten: start afresh
            ratios.clear()
        ratios.append(predicted / seconds)
        del ratios[:-self.correction_window]
        self._correction[key] = (statistics.median(ratios), self._steps)

    def choose(self, batch: int) -> Strategy:
        self._steps += 1
        probed = [n for n in self.drafters if n not in self.trialed]
        if probed and self._steps - self._last_probe >= self.explore_every * max(1.0, batch / self.explore_batch):
            self._last_probe = self._steps
            stale = min(probed, key=lambda n: self._last_used.get(n, -1))
            best = Strategy(stale, 2, 1)
        else:
            best = self._last_best = self._best(batch)
        self._predicted = (best, batch, self.predicted_seconds(best, batch))  # before this step updates the models
        return best

    def repeat(self, batch: int) -> Strategy:
        """A step without weighing the candidates (`OverheadBudget`): the last choice on their
        merits again, now with `batch` live sequences."""
        self._steps += 1
        self._predicted = (self._last_best, batch, self.predicted_seconds(self._last_best, batch))
        return self._last_best

    def _best(self, batch: int) -> Strategy:
        """The candidate of largest `goodput` (the first of equals, in `candidates` order), if
        it beats plain decoding's by `min_gain`; computed group by group: one pass over a
        drafter's acceptance rates serves all its depths, and a group stops at the depth its
        drafts are no longer accepted (deeper ones only cost more: predicted step times never
        fall with the tokens)."""
        best, best_goodput = OFF, self.goodput(OFF, batch) * self.min_gain
        size_class = _batch_class(batch)
        verify_seconds: dict[int, float] = {}  # by draft nodes: the groups share them
        for (name, width), group in self._groups().items():
            correction = self.correction(name, size_class)
            draft_cost = self._draft_cost.get(name, 0.0) * batch
            expected, reach, level = 0.0, 1.0, 0
            alphas = self.acceptance.alphas(name, width, group[-1][0].depth)
            for s, nodes in group:
                while level < s.depth:
                    reach *= alphas[level]
                    expected += reach
                    level += 1
                forward = verify_seconds.get(nodes)
                if forward is None:
                    forward = verify_seconds[nodes] = self.step_time.predict(batch * (1 + nodes))
                # `goodput`'s formula, inline: a call per candidate made a choice 10% slower
                goodput = batch * (1.0 + expected) / max(forward + draft_cost * s.depth, 1e-9) * correction
                if goodput > best_goodput:
                    best, best_goodput = s, goodput
                if reach == 0.0:
                    break
        return best

    def observe_draft(self, s: Strategy, seconds: float, batch: int) -> None:
        """A drafter's measured time for one step: kept as seconds per sequence per depth level."""
        self._last_used[s.drafter] = self._steps
        per = seconds / max(batch * s.depth, 1)
        old = self._draft_cost.get(s.drafter)
        self._draft_cost[s.drafter] = per if old is None else old + 0.3 * (per - old)


def _batch_class(batch: int) -> int:
    """1, 2, 3-4, 5-8, ...: live-batch sizes whose steps behave alike share a correction."""
    return max(batch - 1, 0).bit_length()
