"""Execution plans: every MFC of an algorithm's dataflow graph gets its own layout (a device mesh
and a dp/tp/pp strategy, see layout.py).

Two forms, both round-trip:
- one line: `actor_gen=d4@0-3 actor_train=d2t2@0-3 ref_inf=d2@4-5 rew_inf=d2@4-5`
- YAML: `{world_size: 8, mfcs: {actor_gen: d4@0-3, actor_train: {ranks: 0-3, dp: 2, tp: 2}}}`

`validate` rejects a plan before any process group exists: a missing or unknown MFC, ranks out of
range, degrees that do not multiply to the mesh size, heads or layers not divisible by tp or
pp, and a layout whose static memory (parameters, gradients, optimizer state) does not fit.
`colocated` and `split` are the named heuristic plans the search is compared with.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from remesh.config import read_yaml
from remesh.dataflow.graph import DataflowGraph
from remesh.model.llama import ModelArgs
from remesh.plan.layout import Layout, ShardSpec, format_ranks, parse_ranks

HEURISTICS = ("colocated", "split")
ADAM_STATE_FACTOR = 2  # AdamW keeps two moments per parameter, in the parameter's dtype (torch's)


@dataclass(frozen=True)
class ExecutionPlan:
    world_size: int
    layouts: dict[str, Layout]  # MFC name -> layout

    def __str__(self) -> str:
        return self.one_line()

    def one_line(self) -> str:
        return " ".join(f"{name}={layout}" for name, layout in self.layouts.items())

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "mfcs": {n: str(l) for n, l in self.layouts.items()}}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def mfcs_on(self, rank: int) -> list[str]:
        return [n for n, l in self.layouts.items() if rank in l.ranks]

    def groups(self) -> list[tuple[int, ...]]:
        """Every process group the plan's MFCs use (meshes and their tp/dp/pp groups), in one
        deterministic order: all ranks create them up front, in the same order."""
        out: set[tuple[int, ...]] = set()
        for layout in self.layouts.values():
            out.add(tuple(sorted(layout.ranks)))
            out.update(layout.groups())
        return sorted(g for g in out if len(g) > 1)


def parse_plan(text: str, world_size: int | None = None) -> ExecutionPlan:
    """The one-line form. `world_size` defaults to the highest rank named + 1."""
    layouts: dict[str, Layout] = {}
    for item in text.split():
        name, eq, spec = item.partition("=")
        if not eq or not name or not spec:
            close = difflib.get_close_matches(item, HEURISTICS + ("search",), n=1)
            hint = f"; or did you mean the plan '{close[0]}'?" if close else ""
            raise ValueError(f"plan item {item!r}: expected mfc=layout, e.g. actor_gen=d2t1@0-1{hint}")
        if name in layouts:
            raise ValueError(f"plan: {name} is given twice")
        try:
            layouts[name] = Layout.parse(spec)
        except ValueError as e:
            raise ValueError(f"plan: {name}: {e}") from None
    if not layouts:
        raise ValueError("plan: empty")
    return ExecutionPlan(world_size or 1 + max(max(l.ranks) for l in layouts.values()), layouts)


def plan_from_dict(d: Any, where: str = "plan") -> ExecutionPlan:
    if not isinstance(d, dict) or "mfcs" not in d:
        raise ValueError(f"{where}: expected a mapping with 'mfcs' (and optionally 'world_size')")
    unknown = set(d) - {"world_size", "mfcs"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} (valid: world_size, mfcs)")
    if not isinstance(d["mfcs"], dict) or not d["mfcs"]:
        raise ValueError(f"{where}.mfcs: expected a mapping of MFC name to layout")
    layouts = {}
    for name, spec in d["mfcs"].items():
        field = f"{where}.mfcs.{name}"
        try:
            if isinstance(spec, str):
                layouts[name] = Layout.parse(spec)
            elif isinstance(spec, dict):
                bad = set(spec) - {"ranks", "dp", "tp", "pp", "micro_batches"}
                if bad:
                    raise ValueError(f"unknown key(s) {sorted(bad)} (valid: ranks, dp, tp, pp, micro_batches)")
                if "ranks" not in spec:
                    raise ValueError("missing 'ranks'")
                ranks = parse_ranks(str(spec["ranks"]))
                tp, pp = int(spec.get("tp", 1)), int(spec.get("pp", 1))
                dp = int(spec.get("dp", max(1, len(ranks) // (tp * pp))))
                layouts[name] = Layout(ranks, dp, tp, pp, int(spec.get("micro_batches", 1)))
            else:
                raise ValueError(f"expected a layout string or mapping, got {type(spec).__name__}")
        except ValueError as e:
            raise ValueError(f"{field}: {e}") from None
    world = d.get("world_size") or 1 + max(max(l.ranks) for l in layouts.values())
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"{where}.world_size: expected a positive integer, got {world!r}")
    return ExecutionPlan(world, layouts)


def load_plan(path: str | Path) -> ExecutionPlan:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"plan file {path}: no such file")
    return plan_from_dict(read_yaml(str(path)), where=str(path))  # bad bytes or YAML: the file and line


def heuristic_plan(name: str, graph: DataflowGraph, world_size: int, tp: int = 1, pp: int = 1) -> ExecutionPlan:
    """`colocated`: every MFC on all ranks with one strategy (DeepSpeed-Chat, verl's hybrid
    engine). `split`: generation on the first half of the ranks, everything else on the second
    (OpenRLHF's separate generation engines); one rank: same as colocated. Every call takes `tp`
    and `pp` where its mesh allows (generation no pipeline stages)."""
    if name not in HEURISTICS:
        raise ValueError(f"unknown heuristic plan {name!r} (valid: {', '.join(HEURISTICS)})")
    everyone = tuple(range(world_size))
    half = world_size // 2
    layouts = {}
    for m in graph.mfcs:
        if name == "colocated" or world_size == 1:
            ranks, t = everyone, tp
        else:
            ranks = everyone[:half] if m.call == "generate" else everyone[half:]
            t = tp if len(ranks) % tp == 0 else 1
        p = pp if m.call != "generate" and len(ranks) % (t * pp) == 0 else 1
        layouts[m.name] = Layout(ranks, len(ranks) // (t * p), t, p, p)
    return ExecutionPlan(world_size, layouts)


def resolve_plan(spec: str, graph: DataflowGraph, world_size: int) -> ExecutionPlan:
    """A heuristic name, a YAML file, or the one-line form."""
    spec = spec.strip()
    if spec in HEURISTICS:
        return heuristic_plan(spec, graph, world_size)
    if spec.endswith((".yaml", ".yml")):
        plan = load_plan(spec)
    else:
        plan = parse_plan(spec, world_size)
    return plan


def static_memory(plan: ExecutionPlan, graph: DataflowGraph, specs: dict[str, ShardSpec],
                  trainable: set[str], zero: frozenset[str] = frozenset()) -> dict[int, int]:
    """A lower bound on the bytes per rank that a plan keeps resident, activations and KV caches
    not included: each trainable role's training copy (parameters, gradients, and Adam moments,
    sharded over dp for the roles in `zero`, as ZeRO-1 does) on its train MFC's ranks, plus the
    largest other-layout copy on the rank, plus frozen roles' copies. The runtime keeps every
    other-layout copy (their buffers are refilled each iteration); the planner's estimator
    counts them all, less the shards they alias, which this check does not work out. Roles
    without a spec hold no weights (a rule-based reward)."""
    per_rank = {r: 0 for r in range(plan.world_size)}
    transient = {r: 0 for r in range(plan.world_size)}
    train_layout = {m.role: plan.layouts[m.name] for m in graph.mfcs if m.call == "train_step"}
    for role, layout in train_layout.items():
        spec = specs[role]
        for r in layout.ranks:
            params = spec.local_bytes(layout, r)
            per_rank[r] += 2 * params + ADAM_STATE_FACTOR * params // (layout.dp if role in zero else 1)
    frozen_seen: set[tuple[str, int]] = set()
    for m in graph.mfcs:
        if m.role not in specs:
            continue
        layout, spec = plan.layouts[m.name], specs[m.role]
        for r in layout.ranks:
            copy = spec.local_bytes(layout, r)
            if m.role in trainable:
                if train_layout.get(m.role) != layout:
                    transient[r] = max(transient[r], copy)
            elif (m.role, r) not in frozen_seen:  # a frozen model stays resident where it runs
                frozen_seen.add((m.role, r))
                per_rank[r] += copy
    return {r: per_rank[r] + transient[r] for r in per_rank}


def validate(plan: ExecutionPlan, graph: DataflowGraph, models: dict[str, ModelArgs], world_size: int,
             device_memory: int | None = None, dtypes: dict[str, Any] | None = None,
             zero: frozenset[str] = frozenset(), weightless: frozenset[str] = frozenset()) -> ExecutionPlan:
    """Raise ValueError naming the MFC and what is wrong; return the plan when it is valid.
    `models`: role -> architecture its layouts must shard; `device_memory`: bytes per rank (None:
    not checked); `dtypes`: role -> the dtype its weights are held in (default fp32); `zero`: the
    roles whose Adam state is sharded over their train call's dp ranks; `weightless`: roles that
    hold no weights (a rule-based reward), left out of the memory check."""
    names = [m.name for m in graph.mfcs]
    for name in plan.layouts:
        if name not in names:
            hint = difflib.get_close_matches(name, names, n=1)
            raise ValueError(f"plan: {graph.algo} has no MFC {name!r}"
                             + (f" (did you mean {hint[0]!r}?)" if hint else f" (its MFCs: {', '.join(names)})"))
    missing = [n for n in names if n not in plan.layouts]
    if missing:
        raise ValueError(f"plan: no layout for {', '.join(missing)} ({graph.algo} needs {', '.join(names)})")
    if plan.world_size != world_size:
        raise ValueError(f"plan: written for {plan.world_size} ranks, but the job has {world_size}")
    specs = {}
    for m in graph.mfcs:
        layout = plan.layouts[m.name]
        bad = [r for r in layout.ranks if not 0 <= r < world_size]
        if bad:
            raise ValueError(f"plan: {m.name}={layout}: rank(s) {format_ranks(tuple(bad))} out of range "
                             f"(world size {world_size}: ranks 0-{world_size - 1})")
        if m.role not in specs:
            kw = {"dtype": dtypes[m.role]} if dtypes and m.role in dtypes else {}
            specs[m.role] = ShardSpec(models[m.role], **kw)
        specs[m.role].check(layout, what=f"plan: {m.name}={layout}")
    if device_memory is not None:
        trainable = {m.role for m in graph.mfcs if m.call == "train_step"}
        held = {role: spec for role, spec in specs.items() if role not in weightless}
        need = static_memory(plan, graph, held, trainable, zero)
        worst = max(need, key=need.get)
        if need[worst] > device_memory:
            raise ValueError(f"plan: rank {worst} needs {need[worst] / 2**30:.2f} GiB for parameters, gradients "
                             f"and optimizer state alone (MFCs {', '.join(plan.mfcs_on(worst))}), more than the "
                             f"{device_memory / 2**30:.2f} GiB per device")
    return plan
