"""Execution-plan search: simulated annealing (MCMC with Metropolis acceptance) over plans.

The state is one layout per MFC. A move either gives one MFC a random candidate layout, or
gives it the layout of another call of the same role (which removes a reallocation). The cost
of a plan is its simulated iteration time (simulate.py), infinite when some rank's peak memory
exceeds the device memory. Worse plans are accepted with probability exp(-relative increase /
temperature), the temperature falling over the time budget; the best plan seen is returned,
with the heuristic plans (colocated and split, each with its best uniform strategy) estimated
the same way for comparison. Deterministic for a seed and a step budget.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

from remesh.dataflow.graph import MFC
from remesh.plan.layout import Layout
from remesh.plan.plan import HEURISTICS, ExecutionPlan, heuristic_plan
from remesh.planner.estimator import Estimator, MemoryBreakdown
from remesh.planner.simulate import Timeline, simulate


@dataclass(frozen=True)
class SearchSpace:
    """What plans may use. The default keeps to what the estimator has been checked against on
    this runtime (bench/estimator.py): no pipeline stages (the runtime runs them, but their
    estimates are unvalidated). Simulations of larger clusters widen it."""

    max_pp: int = 1


RUNTIME = SearchSpace()
SIMULATION = SearchSpace(max_pp=16)


@dataclass
class Estimate:
    plan: ExecutionPlan
    seconds: float  # simulated iteration time (inf: does not fit)
    memory: dict[int, MemoryBreakdown]
    timeline: Timeline

    @property
    def peak_memory(self) -> float:
        return max(m.total for m in self.memory.values())

    @property
    def fits(self) -> bool:
        return math.isfinite(self.seconds)


@dataclass
class SearchResult:
    best: Estimate
    heuristics: dict[str, Estimate | None]  # name -> best-tuned heuristic plan (None: none fits)
    steps: int  # proposals
    distinct: int  # distinct plans estimated
    seconds: float  # search wall time
    history: list[float] = field(default_factory=list)  # best cost after each improvement


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tp_options(est: Estimator, role: str) -> list[int]:
    a = est.workload.models.get(role)
    limit = est.cluster.devices_per_node  # tensor parallelism stays inside a node
    if a is None:
        return [1]
    return [t for t in _divisors(limit) if all(x % t == 0 for x in (a.n_heads, a.n_kv_heads, a.ffn_dim, a.vocab_size))]


def candidates(mfc: MFC, est: Estimator, space: SearchSpace = RUNTIME) -> list[Layout]:
    """Every layout the MFC may take on this cluster: a contiguous mesh (aligned to its size on
    large clusters), dp x tp x pp = mesh size, tp dividing heads / kv heads / ffn / vocabulary and
    within a node, pp dividing the layers (none for generation), micro-batches pp or 2pp."""
    world = est.cluster.world
    a = est.workload.models.get(mfc.role)
    tps = tp_options(est, mfc.role)
    pps = [1] if mfc.call == "generate" or a is None else [p for p in _divisors(a.n_layers) if p <= space.max_pp]
    sizes = list(range(1, world + 1)) if world <= 8 else [s for s in _divisors(world) if s & (s - 1) == 0 or s == world]
    out = []
    for size in sizes:
        starts = range(0, world - size + 1) if world <= 8 else range(0, world - size + 1, size)
        for start in starts:
            ranks = tuple(range(start, start + size))
            for tp in tps:
                for pp in pps:
                    if size % (tp * pp):
                        continue
                    for m in ([1] if pp == 1 else [pp, 2 * pp]):
                        out.append(Layout(ranks, size // (tp * pp), tp, pp, m))
    return out


def estimate(layouts: dict[str, Layout], est: Estimator) -> Estimate:
    """A plan's memory and simulated timeline; its time is infinite when it does not fit."""
    memory = est.memory(layouts)
    tl = simulate(layouts, est)
    return Estimate(ExecutionPlan(est.cluster.world, dict(layouts)), tl.total if _within(memory, est) else math.inf,
                    memory, tl)


def heuristic_layouts(est: Estimator, space: SearchSpace = RUNTIME) -> dict[str, list[dict[str, Layout]]]:
    """colocated and split, each with every uniform (tp, pp) strategy the models allow."""
    graph, world = est.workload.graph, est.cluster.world
    roles = {m.role for m in graph.mfcs if m.role in est.workload.models}
    tps = sorted(set.intersection(*(set(tp_options(est, r)) for r in roles))) if roles else [1]
    layers = math.gcd(*(est.workload.models[r].n_layers for r in roles)) if roles else 1
    return {name: [dict(heuristic_plan(name, graph, world, tp, pp).layouts)
                   for tp in tps for pp in _divisors(layers) if pp <= space.max_pp]
            for name in HEURISTICS}


def _within(memory: dict[int, MemoryBreakdown], est: Estimator) -> bool:
    return all(m.total <= est.cluster.device_memory for m in memory.values())


def _fits(layouts: dict[str, Layout], est: Estimator) -> bool:
    return _within(est.memory(layouts), est)


def heuristic_estimates(est: Estimator, space: SearchSpace = RUNTIME) -> dict[str, Estimate | None]:
    """colocated and split, each with the uniform (tp, pp) strategy that estimates fastest."""
    out: dict[str, Estimate | None] = {}
    for name, options in heuristic_layouts(est, space).items():
        best = None
        for layouts in options:
            if not _fits(layouts, est):
                continue
            e = estimate(layouts, est)
            if best is None or e.seconds < best.seconds:
                best = e
        out[name] = best
    return out


def search(est: Estimator, budget_s: float = 10.0, max_steps: int | None = None, seed: int = 0,
           space: SearchSpace = RUNTIME) -> SearchResult:
    """The fastest plan found within `budget_s` seconds (or `max_steps` proposals: deterministic).
    `space`: what plans may use (default: what the RL runtime runs)."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    graph = est.workload.graph
    mfcs = list(graph.mfcs)
    cands = {m.name: candidates(m, est, space) for m in mfcs}
    heur = heuristic_estimates(est, space)
    cache: dict[tuple, float] = {}

    def cost(layouts: dict[str, Layout]) -> float:
        key = tuple(layouts[m.name] for m in mfcs)
        if key not in cache:
            cache[key] = simulate(layouts, est).total if _fits(layouts, est) else math.inf
        return cache[key]

    starts = [dict((m.name, h.plan.layouts[m.name]) for m in mfcs) for h in heur.values() if h is not None]
    current = min(starts, key=cost) if starts else {m.name: rng.choice(cands[m.name]) for m in mfcs}
    cur_cost = cost(current)
    best, best_cost = dict(current), cur_cost
    history = [best_cost]
    steps = 0
    t_hi, t_lo = 0.1, 0.002
    while True:
        elapsed = time.perf_counter() - t0
        if max_steps is not None:
            if steps >= max_steps:
                break
            frac = steps / max_steps
        else:
            if elapsed >= budget_s:
                break
            frac = elapsed / budget_s
        steps += 1
        temp = t_hi * (t_lo / t_hi) ** frac
        m = rng.choice(mfcs)
        proposal = dict(current)
        same_role = [o for o in mfcs if o.role == m.role and o.name != m.name]
        if same_role and rng.random() < 0.3:
            layout = current[rng.choice(same_role).name]
            if layout not in cands[m.name]:
                continue
            proposal[m.name] = layout
        else:
            proposal[m.name] = rng.choice(cands[m.name])
        new_cost = cost(proposal)
        if not math.isfinite(new_cost):
            continue
        if (new_cost <= cur_cost or not math.isfinite(cur_cost)
                or rng.random() < math.exp(-(new_cost - cur_cost) / (temp * cur_cost))):
            current, cur_cost = proposal, new_cost
            if cur_cost < best_cost:
                best, best_cost = dict(current), cur_cost
                history.append(best_cost)
    if not math.isfinite(best_cost):
        raise NoPlanFits(est, space)
    return SearchResult(estimate(best, est), heur, steps, len(cache), time.perf_counter() - t0, history)


class NoPlanFits(ValueError):
    """No plan of the search space fits the cluster's device memory."""

    def __init__(self, est: Estimator, space: SearchSpace = RUNTIME):
        self.smallest = smallest_fitting_cluster(est, space)
        size = _size(est.cluster.device_memory)
        if self.smallest:
            need = "the smallest cluster that would fit: " + self.smallest
        else:
            least = min(max(m.total for m in est.memory(layouts).values())
                        for options in heuristic_layouts(est, space).values() for layouts in options)
            need = f"more devices of {size} do not help (up to 128 nodes tried); it needs devices of at least {_size(least)}"
        super().__init__(f"no execution plan fits {est.cluster.world} devices of {size} for this workload ({need})")


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def smallest_fitting_cluster(est: Estimator, space: SearchSpace = RUNTIME) -> str | None:
    """The fewest devices (nodes of the same size and memory) on which some heuristic plan fits
    in memory; None if up to 128 nodes do not suffice."""
    import dataclasses

    base = est.cluster
    for nodes in [1, 2, 4, 8, 16, 32, 64, 128]:
        for per in (range(1, base.devices_per_node + 1) if nodes == 1 else [base.devices_per_node]):
            cluster = dataclasses.replace(base, nodes=nodes, devices_per_node=per,
                                          inter_node=base.inter_node or base.intra_node)
            trial = Estimator(est.workload, cluster)
            if any(_fits(layouts, trial) for options in heuristic_layouts(trial, space).values()
                   for layouts in options):
                return f"{nodes} node(s) x {per} devices of {_size(base.device_memory)}"
    return None
