"""The models of an RL run's roles (actor, ref, critic, reward): where each starts from, its
architecture and the dtype its weights are held in. Read by the planned trainer, which builds
them, and by the planner and plan checks, which size them."""

from __future__ import annotations

import torch

from remesh.checkpoint import resolve_model_path
from remesh.checkpoint.hf import load_hf_config
from remesh.dataflow.graph import DataflowGraph
from remesh.model.llama import ModelArgs
from remesh.rl.config import RLConfig


def role_dtype(cfg: RLConfig, role: str) -> torch.dtype:
    """The dtype a role's weights are held (and reallocated) in."""
    if role in ("actor", "ref"):
        return getattr(torch, cfg.actor.dtype)
    if role == "critic":
        return getattr(torch, (cfg.critic or cfg.actor).dtype)
    return torch.float32


def role_source(cfg: RLConfig, role: str) -> tuple[str, str, torch.dtype]:
    """(checkpoint folder, head, dtype) a role's model starts from."""
    if role in ("actor", "ref"):
        folder, head = resolve_model_path(cfg.actor.path, "actor.path"), "lm"
    elif role == "critic":
        folder = resolve_model_path((cfg.critic or cfg.actor).path, "critic.path" if cfg.critic else "actor.path")
        head = "value"
    else:
        folder, head = resolve_model_path(cfg.reward.model, "reward.model"), "value"
    return str(folder), head, role_dtype(cfg, role)


def role_args(cfg: RLConfig, graph: DataflowGraph) -> dict[str, ModelArgs]:
    """The architecture of every role of the graph (a rule-based reward has no model: it gets
    the actor's, against which its layouts are validated)."""
    args = {r: load_hf_config(*role_source(cfg, r)[:2]) for r in graph.roles if r != "reward" or cfg.reward.model}
    args.setdefault("reward", args["actor"])
    return args
