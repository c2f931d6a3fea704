"""Training state on disk without pickle: tensors in safetensors, the rest in JSON.

A checkpoint folder `step_000120/` holds the model in HF format plus `trainer_state/` with the
optimizer (tensors + param-group JSON), scheduler, progress counters and RNG states, which is
everything a resumed run needs to continue bitwise as if it had never stopped. A checkpoint
written under an execution plan keeps each rank's optimizer shard, scheduler and RNG in
`trainer_state/rank<r>/<role>/`, and its `state.json` names the plan it fits.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from remesh.config import ConfigError, dump_config

STATE_DIR = "trainer_state"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def optimizer_to_files(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            key = f"{idx}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))


def optimizer_from_files(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    meta = json.loads((folder / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in {**load_file(str(folder / "optimizer.safetensors")), **meta["scalars"]}.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {"python": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, s, g = meta["python"]
    random.setstate((v, tuple(s), g))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))


def save_trainer_state(folder: Path, optimizer: torch.optim.Optimizer, scheduler: Any,
                       progress: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    optimizer_to_files(optimizer, folder)
    tensors, meta = rng_state()
    save_file(tensors, str(folder / "rng.safetensors"))
    # state.json marks the checkpoint complete, so it appears atomically and last
    _write_state(folder, {"progress": progress, "scheduler": scheduler.state_dict(), "rng": meta})


def _write_state(folder: Path, state: dict[str, Any]) -> None:
    write_text_whole(folder / "state.json", json.dumps(state, indent=1))


def write_text_whole(path: Path, text: str) -> None:
    """`path` (a symlink's target) holding `text`, whole or not at all: written beside it, then
    renamed over it."""
    target = path.resolve()
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, target)


def load_trainer_state(folder: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG; return the progress counters."""
    meta = json.loads((folder / "state.json").read_text())
    optimizer_from_files(optimizer, folder)
    scheduler.load_state_dict(meta["scheduler"])
    set_rng_state(load_file(str(folder / "rng.safetensors")), meta["rng"])
    return meta["progress"]


# what runs write into their output folder and `begin_outputs` removes (config.yaml, which
# every run rewrites as it starts, is left: the name may be the user's own)
RUN_OUTPUTS = ("checkpoints", "final", "metrics.jsonl", "tensorboard", "plan.yaml", "plan_search.txt",
               "plan_timeline.png", "reward_curve.png", "samples.json")


def claim_output_dir(output_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Before any work: may a run write into `output_dir` (ConfigError if not)? A fresh run into
    a folder holding an earlier run would mix with it: the earlier run's step checkpoints have
    higher step numbers than the new ones, so keep_checkpoints prunes each new one as it is
    written and `resume=latest` picks the old run, and the earlier metrics are replaced. Such a
    folder is refused unless the run continues that run (resumes from a checkpoint of this
    folder), or `overwrite` is set: the run's first write (`begin_outputs`, once its config has
    been checked and its models built) then removes the earlier run."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"trainer.output_dir: {output_dir} is a file, not a folder")
    if resume == "latest" or (resume and _inside(Path(resume), output_dir)):
        if overwrite:
            raise ConfigError(f"trainer.overwrite=true would remove the run that trainer.resume={resume} continues: "
                              f"set one of them")
        if resume != "latest" and (m := _STEP_DIR.match(Path(resume).name)):
            # they belong to the continuation this resume abandons: after a kill, resume=latest
            # would pick them, and keep_checkpoints would prune the new run's in their favour
            later = [p.name for p in step_checkpoints(output_dir) if int(_STEP_DIR.match(p.name)[1]) > int(m[1])]
            if later:
                raise ConfigError(f"trainer.resume={resume}: {output_dir} holds later checkpoints of that run "
                                  f"({', '.join(later)}), which the resumed run would mix with: remove them first, "
                                  f"or continue from the last (trainer.resume=latest)")
        return
    held = earlier_run(output_dir)
    if held and not overwrite:
        fixes = ["write elsewhere (another trainer.output_dir)", "replace it (trainer.overwrite=true)"]
        if step_checkpoints(output_dir) and not resume:
            fixes.insert(0, "continue it (trainer.resume=latest)")
        raise ConfigError(f"trainer.output_dir: {output_dir} holds {'another' if resume else 'an earlier'} run "
                          f"({', '.join(held)}): {', '.join(fixes[:-1])} or {fixes[-1]}")


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies under it, as written or with links resolved (a
    symlinked checkpoints/ stays the folder's own)."""
    return (Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))
            or path.resolve().is_relative_to(folder.resolve()))


def begin_outputs(output_dir: Path, cfg: Any, overwrite: bool) -> None:
    """A run's first write into `output_dir`: with `overwrite` (`trainer.overwrite`), an earlier
    run's outputs removed (RUN_OUTPUTS only); the folder made, and the run's config saved as
    config.yaml. Called after the run's models (under a plan, every rank's) are built, so that a
    run that fails before removes nothing."""
    if overwrite:
        _remove_earlier_run(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, output_dir / "config.yaml")


def _remove_earlier_run(output_dir: Path) -> None:
    if not (held := earlier_run(output_dir)):
        return
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    print(f"remesh: trainer.overwrite: removed the earlier run in {output_dir} ({', '.join(held)})", flush=True)


def earlier_run(output_dir: Path) -> list[str]:
    """What `output_dir` holds of an earlier run: logged metrics, step checkpoints (whole or
    torn), a final model."""
    held = []
    metrics = output_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        held.append("metrics.jsonl")
    root = output_dir / "checkpoints"
    if steps := sum(1 for p in root.iterdir() if _STEP_DIR.match(p.name)) if root.is_dir() else 0:
        held.append(f"{steps} step checkpoint{'s' if steps > 1 else ''}")
    if (output_dir / "final").exists():
        held.append("final/")
    return held


def step_checkpoints(output_dir: Path) -> list[Path]:
    """Complete step checkpoints in `output_dir/checkpoints`, oldest first."""
    root = output_dir / "checkpoints"
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
             and (p / STATE_DIR / "state.json").exists()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, output_dir: Path) -> Path:
    if resume == "latest":
        found = step_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"trainer.resume=latest: no checkpoint in {output_dir / 'checkpoints'}")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_DIR / "state.json").exists():
        raise FileNotFoundError(f"trainer.resume={resume}: not a remesh checkpoint (no {STATE_DIR}/state.json)")
    return path


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    for old in step_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def role_folder(checkpoint: Path, role: str) -> Path:
    """Where a trained role's model sits in a checkpoint: the actor at its top, the critic in
    `critic/`."""
    return checkpoint if role == "actor" else checkpoint / role


def save_planned_state(folder: Path, progress: dict[str, Any], plan: str, world: int) -> None:
    """Mark a checkpoint written under an execution plan complete (rank 0, once every rank has
    written its part to `folder/rank<r>/`): its progress, and the plan a resume must run under."""
    _write_state(folder, {"progress": progress, "plan": {"plan": plan, "world": world}})


def checkpoint_plan(checkpoint: Path) -> dict[str, Any] | None:
    """{"plan": one-line plan, "world": ranks} of a checkpoint written under an execution plan;
    None for one written by one process."""
    return json.loads((checkpoint / STATE_DIR / "state.json").read_text()).get("plan")


def checkpoint_progress(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_DIR / "state.json").read_text())["progress"]
