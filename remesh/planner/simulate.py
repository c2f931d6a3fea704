"""One RL iteration's timeline under a plan, simulated the way the runtime executes it.

Every rank runs, in the same global order (rl/planned.py), the tasks that involve it: for each
level of the graph, first every call's data transfer and reallocation (collectives over the
ranks concerned), then every call's execution. A task starts when all of its ranks have
finished their earlier tasks, so calls on disjoint meshes overlap and a rank shared by two
calls runs them one after the other. On a CPU node whose devices (processes) outnumber its
cores, running compute tasks share the cores: each advances at cores / busy devices, slowed by
the profile's measured contention and time-sharing costs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from remesh.dataflow.graph import EXTERNAL_INPUTS
from remesh.plan.layout import Layout, format_ranks
from remesh.planner.estimator import Estimator


@dataclass
class Task:
    name: str
    kind: str  # "compute", "realloc", "data"
    ranks: tuple[int, ...]
    seconds: float  # at full speed
    start: float = -1.0
    end: float = -1.0


@dataclass
class Timeline:
    tasks: list[Task]
    total: float
    busy: dict[int, float] = field(default_factory=dict)  # compute seconds per rank

    def describe(self) -> list[str]:
        return [f"{t.start:9.3f} -> {t.end:9.3f} s  {t.kind:8s} {t.name} on {_ranks(t.ranks)}"
                for t in sorted(self.tasks, key=lambda t: (t.start, t.name))]


def _ranks(ranks: tuple[int, ...]) -> str:
    return format_ranks(tuple(sorted(ranks)))


def iteration_tasks(layouts: dict[str, Layout], est: Estimator) -> list[Task]:
    """The runtime's tasks in its global order."""
    w = est.workload
    graph = w.graph
    train = {m.role: layouts[m.name] for m in graph.mfcs if m.call == "train_step"}
    built: set[tuple[str, Layout]] = set()
    tasks: list[Task] = []
    for level in graph.levels():
        for m in level:
            layout = layouts[m.name]
            producers = {graph.producer(k).name: graph.producer(k) for k in m.inputs if k not in EXTERNAL_INPUTS}
            for p, producer in sorted(producers.items()):
                src = layouts[p]
                ranks = tuple(sorted(set(src.ranks) | set(layout.ranks)))
                nbytes = w.sequences(producer) * (w.prompt_len + w.gen_len) * 8  # token ids, floats per token
                link = est.cluster.link(ranks)
                # object sends: one per receiving rank, the samples pickled
                seconds = len(layout.ranks) * link.latency_s + nbytes / link.bytes_per_s
                tasks.append(Task(f"{p}->{m.name}", "data", ranks, seconds))
            if m.role in train and train[m.role] != layout and (m.role, layout) not in built:
                built.add((m.role, layout))
                src = train[m.role]
                tasks.append(Task(f"realloc {m.role} {src}->{layout}", "realloc",
                                  tuple(sorted(set(src.ranks) | set(layout.ranks))),
                                  est.realloc_seconds(m.role, src, layout)))
        for m in level:
            tasks.append(Task(m.name, "compute", layouts[m.name].ranks, est.mfc_seconds(m, layouts[m.name])))
    return tasks


def simulate(layouts: dict[str, Layout], est: Estimator) -> Timeline:
    tasks = iteration_tasks(layouts, est)
    cluster = est.cluster
    queues: dict[int, list[int]] = {r: [] for r in range(cluster.world)}
    for i, t in enumerate(tasks):
        for r in t.ranks:
            queues[r].append(i)
    heads = {r: 0 for r in queues}  # index into each rank's queue
    remaining = {i: t.seconds for i, t in enumerate(tasks)}
    running: set[int] = set()
    done = 0
    now = 0.0
    while done < len(tasks):
        for i, t in enumerate(tasks):  # start every task whose ranks are all at it
            if t.start < 0 and all(heads[r] < len(queues[r]) and queues[r][heads[r]] == i for r in t.ranks):
                t.start = now
                running.add(i)
        if not running:
            raise RuntimeError("simulation stalled: the task order is inconsistent")  # a bug, not an input error
        rates = _rates(tasks, running, cluster)
        dt = min(remaining[i] / rates[i] for i in running)
        now += dt
        for i in list(running):
            remaining[i] -= rates[i] * dt
            if remaining[i] <= 1e-12 * max(1.0, tasks[i].seconds):
                tasks[i].end = now
                running.discard(i)
                done += 1
                for r in tasks[i].ranks:
                    heads[r] += 1
    busy: dict[int, float] = {r: 0.0 for r in queues}
    for t in tasks:
        if t.kind == "compute":
            for r in t.ranks:
                busy[r] += t.end - t.start
    return Timeline(tasks, now, busy)


def _rates(tasks: list[Task], running: set[int], cluster) -> dict[int, float]:
    """Speed of each running task: on a CPU node, the cores shared among its busy devices,
    slowed by the measured contention of each other busy core, and, where busy devices outnumber
    the cores, by the measured cost of time-sharing one (up to twice as many: every core shared)."""
    if cluster.cores_per_node is None:
        return {i: 1.0 for i in running}
    busy: dict[int, int] = {}
    for i in running:
        if tasks[i].kind == "compute":
            for r in tasks[i].ranks:
                n = cluster.node_of(r)
                busy[n] = busy.get(n, 0) + 1
    out = {}
    cores, p = cluster.cores_per_node, cluster.profile

    def rate(b: int) -> float:
        shared = min(1.0, max(0, b - cores) / cores)  # the fraction of cores running two or more
        return min(1.0, cores / b) / ((1 + p.contention * (min(b, cores) - 1)) * (1 + p.timeshare * shared))

    for i in running:
        t = tasks[i]
        out[i] = 1.0 if t.kind != "compute" else min(rate(busy[cluster.node_of(r)]) for r in t.ranks)
    return out
