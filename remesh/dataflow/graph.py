"""The dataflow graph of an RLHF algorithm: model function calls (MFCs) on model roles.

An MFC is one call (generate, inference or train_step) on one role (actor, critic, ref,
reward), with named inputs and outputs. The graph is plain data: it says nothing about
devices or how a call is executed. The one-process executor walks it in dependency order;
execution plans (a later layer) give every MFC its own device mesh and parallel strategy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["actor", "critic", "ref", "reward"]
CallType = Literal["generate", "inference", "train_step"]
ROLES: tuple[str, ...] = ("actor", "critic", "ref", "reward")
EXTERNAL_INPUTS = ("prompts",)  # what the data loader provides to every iteration


@dataclass(frozen=True)
class MFC:
    name: str
    role: Role
    call: CallType
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    options: tuple[tuple[str, Any], ...] = ()  # e.g. (("greedy", True),): hashable, so MFCs can key dicts

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)


@dataclass
class DataflowGraph:
    algo: str
    mfcs: list[MFC] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def roles(self) -> list[str]:
        return [r for r in ROLES if any(m.role == r for m in self.mfcs)]

    def producer(self, key: str) -> MFC | None:
        return next((m for m in self.mfcs if key in m.outputs), None)

    def dependencies(self, mfc: MFC) -> list[MFC]:
        deps = []
        for key in mfc.inputs:
            p = self.producer(key)
            if p is not None and p not in deps:
                deps.append(p)
        return deps

    def validate(self) -> None:
        names = [m.name for m in self.mfcs]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.algo}: duplicate MFC names in {names}")
        produced: dict[str, str] = {}
        for m in self.mfcs:
            if m.role not in ROLES:
                raise ValueError(f"{self.algo}: MFC {m.name} has unknown role {m.role!r}")
            for key in m.outputs:
                if key in produced:
                    raise ValueError(f"{self.algo}: {key!r} is produced by both {produced[key]} and {m.name}")
                produced[key] = m.name
        for m in self.mfcs:
            for key in m.inputs:
                if key not in produced and key not in EXTERNAL_INPUTS:
                    raise ValueError(f"{self.algo}: MFC {m.name} needs {key!r}, which no MFC produces")
        self.levels()  # raises on a cycle

    def levels(self) -> list[list[MFC]]:
        """MFCs grouped by dependency depth: those in one level may run concurrently."""
        done: set[str] = set()
        levels: list[list[MFC]] = []
        remaining = list(self.mfcs)
        while remaining:
            ready = [m for m in remaining if all(d.name in done for d in self.dependencies(m))]
            if not ready:
                raise ValueError(f"{self.algo}: cycle among {[m.name for m in remaining]}")
            levels.append(ready)
            done.update(m.name for m in ready)
            remaining = [m for m in remaining if m.name not in done]
        return levels

    def topological_order(self) -> list[MFC]:
        return [m for level in self.levels() for m in level]

    def describe(self) -> str:
        return " -> ".join("{" + ", ".join(m.name for m in level) + "}" if len(level) > 1 else level[0].name
                           for level in self.levels())


def _mfc(name: str, role: Role, call: CallType, inputs: tuple[str, ...], outputs: tuple[str, ...],
         **options: Any) -> MFC:
    return MFC(name, role, call, inputs, outputs, tuple(sorted(options.items())))


def ppo_graph() -> DataflowGraph:
    sample = ("responses",)
    train_in = ("responses", "behaviour_logp", "ref_logp", "scores", "values")
    return DataflowGraph("ppo", [
        _mfc("actor_gen", "actor", "generate", ("prompts",), ("responses", "behaviour_logp")),
        _mfc("ref_inf", "ref", "inference", sample, ("ref_logp",)),
        _mfc("rew_inf", "reward", "inference", sample, ("scores",)),
        _mfc("critic_inf", "critic", "inference", sample, ("values",)),
        _mfc("actor_train", "actor", "train_step", train_in, ("actor_stats",)),
        _mfc("critic_train", "critic", "train_step", train_in, ("critic_stats",)),
    ])


def remax_graph() -> DataflowGraph:
    """Sampled and greedy responses; the greedy response's reward is the baseline. No critic."""
    return DataflowGraph("remax", [
        _mfc("actor_gen", "actor", "generate", ("prompts",), ("responses", "behaviour_logp")),
        _mfc("actor_greedy", "actor", "generate", ("prompts",), ("greedy_responses",), greedy=True),
        _mfc("ref_inf", "ref", "inference", ("responses",), ("ref_logp",)),
        _mfc("rew_inf", "reward", "inference", ("responses", "greedy_responses"), ("scores", "greedy_scores")),
        _mfc("actor_train", "actor", "train_step",
             ("responses", "behaviour_logp", "ref_logp", "scores", "greedy_scores"), ("actor_stats",)),
    ])


def group_graph(algo: str) -> DataflowGraph:
    """GRPO, RLOO, REINFORCE++: n samples per prompt, rewards and reference only. No critic."""
    return DataflowGraph(algo, [
        _mfc("actor_gen", "actor", "generate", ("prompts",), ("responses", "behaviour_logp")),
        _mfc("ref_inf", "ref", "inference", ("responses",), ("ref_logp",)),
        _mfc("rew_inf", "reward", "inference", ("responses",), ("scores",)),
        _mfc("actor_train", "actor", "train_step", ("responses", "behaviour_logp", "ref_logp", "scores"),
             ("actor_stats",)),
    ])


GRAPHS = {
    "ppo": ppo_graph,
    "remax": remax_graph,
    "grpo": lambda: group_graph("grpo"),
    "rloo": lambda: group_graph("rloo"),
    "reinforce_pp": lambda: group_graph("reinforce_pp"),
}


def without_reference(graph: DataflowGraph) -> DataflowGraph:
    """The graph with no reference model: for runs without a KL term, ref_inf is pure waste."""
    mfcs = [MFC(m.name, m.role, m.call, tuple(k for k in m.inputs if k != "ref_logp"), m.outputs, m.options)
            for m in graph.mfcs if m.role != "ref"]
    return DataflowGraph(graph.algo, mfcs)


def graph_for(algo: str, reference: bool = True) -> DataflowGraph:
    if algo not in GRAPHS:
        raise ValueError(f"unknown algorithm {algo!r} (valid: {', '.join(GRAPHS)})")
    graph = GRAPHS[algo]()
    return graph if reference else without_reference(graph)
