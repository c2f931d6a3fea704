"""From an RL config to a searched plan: the workload the config describes, the search, the
report `remesh plan` prints, and the timeline chart."""

from __future__ import annotations

from pathlib import Path

from remesh.config import ConfigError
from remesh.dataflow.graph import graph_for
from remesh.planner.cluster import Cluster
from remesh.planner.estimator import Estimator, Workload
from remesh.planner.search import SearchResult, search
from remesh.planner.simulate import Timeline
from remesh.rl.config import RLConfig


def workload_from_config(cfg: RLConfig, gen_len: float | None = None, gen_len_max: int | None = None) -> Workload:
    """The iteration `cfg` describes: models from their checkpoints' configs, prompt lengths
    from the prompt rows the run keeps (tokenised as it will), generated lengths up to
    rollout.max_new_tokens unless measured ones are given."""
    from remesh.checkpoint import load_tokenizer, resolve_model_path
    from remesh.rl.roles import role_args, role_dtype
    from remesh.rl.trainer import load_prompts

    graph = graph_for(cfg.algo.name, reference=bool(cfg.kl.coef or cfg.kl.target))
    models = role_args(cfg, graph)
    if not cfg.reward.model:
        models.pop("reward", None)  # rule-based: no model
    tok = load_tokenizer(resolve_model_path(cfg.actor.path, "actor.path"))
    prompts = load_prompts(cfg, tok, report_skips=False)  # the rows the run trains on
    lengths = [len(p.prompt_ids) for p in prompts]
    r = cfg.rollout
    return Workload(graph=graph, models=models, dtype=cfg.actor.dtype, prompts=cfg.trainer.prompts_per_iter,
                    n_samples=r.n_samples, prompt_len=sum(lengths) / len(lengths), prompt_len_max=max(lengths),
                    gen_len=float(gen_len if gen_len is not None else r.max_new_tokens),
                    gen_len_max=int(gen_len_max if gen_len_max is not None else r.max_new_tokens),
                    micro_batch_tokens=cfg.trainer.micro_batch_tokens, ppo_epochs=cfg.algo.ppo_epochs,
                    mini_batches=cfg.algo.mini_batches, max_batch=r.max_batch, migrate=r.migrate_every > 0,
                    shared_prompts=cfg.trainer.share_prompts,
                    role_dtypes={r: str(role_dtype(cfg, r)).removeprefix("torch.") for r in models},
                    zero=tuple(role for role, o in (("actor", cfg.actor_optim), ("critic", cfg.critic_optim)) if o.zero))


def cluster_for(spec: str, device: str = "auto", option: str = "cluster") -> Cluster:
    """The cluster `spec` names: a cluster YAML, a shipped cluster's name, or local:N (this machine
    as N processes on `device`, whose profile is re-timed first: still true?). ConfigError
    naming `option`, the setting that gave `spec`, if not."""
    from remesh.planner.cluster import local_cluster
    from remesh.planner.profile import check_drift

    try:
        if not spec.startswith("local:"):
            return Cluster.load(spec)
        n = spec.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"local:N needs N >= 1 processes, got {spec!r}")
        cluster = local_cluster(int(n), device=device)
    except ValueError as e:
        raise ConfigError(f"{option}: {e}") from None
    check_drift(cluster.profile, cluster.profile.device)
    return cluster


def plan_for_config(cfg: RLConfig, cluster: Cluster, budget_s: float = 10.0, seed: int = 0,
                    max_steps: int | None = None) -> tuple[SearchResult, Estimator]:
    est = Estimator(workload_from_config(cfg), cluster)
    return search(est, budget_s=budget_s, seed=seed, max_steps=max_steps), est


def report(result: SearchResult, cluster: Cluster) -> str:
    best = result.best
    lines = [f"cluster: {cluster.describe()}",
             f"search: {result.steps} proposals, {result.distinct} distinct plans estimated, {result.seconds:.1f} s",
             "", "plan (one line):", f"  {best.plan.one_line()}", "", "plan (YAML):"]
    lines += ["  " + line for line in best.plan.to_yaml().splitlines()]
    lines += ["", f"estimated iteration time: {best.seconds:.3f} s",
              "per-device peak memory (estimated): " + ", ".join(
                  f"{r}: {m.total / 2**30:.2f} GiB" for r, m in sorted(best.memory.items())),
              "", "heuristic plans (best uniform strategy each):"]
    for name, e in result.heuristics.items():
        if e is None:
            lines.append(f"  {name:9s}: does not fit")
        else:
            lines.append(f"  {name:9s}: {e.seconds:.3f} s ({e.seconds / best.seconds:.2f}x the searched plan), "
                         f"peak {e.peak_memory / 2**30:.2f} GiB  {e.plan.one_line()}")
    return "\n".join(lines)


def plot_timeline(timeline: Timeline, path: str | Path, title: str = "") -> Path:
    """A Gantt chart: one row per device, a bar per task (calls by name, reallocations hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({r for t in timeline.tasks for r in t.ranks})
    names = sorted({t.name for t in timeline.tasks if t.kind == "compute"})
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(ranks) + 1.6))
    for t in timeline.tasks:
        if t.end - t.start <= 0:
            continue
        for r in t.ranks:
            if t.kind == "compute":
                ax.barh(r, t.end - t.start, left=t.start, color=colors[t.name], edgecolor="black", linewidth=0.3)
                if t.end - t.start > 0.06 * timeline.total:
                    ax.text((t.start + t.end) / 2, r, t.name, ha="center", va="center", fontsize=7)
            else:
                ax.barh(r, t.end - t.start, left=t.start, color="lightgrey", hatch="//" if t.kind == "realloc" else "..",
                        edgecolor="grey", linewidth=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[n]) for n in names]
    handles += [plt.Rectangle((0, 0), 1, 1, facecolor="lightgrey", hatch="//", edgecolor="grey"),
                plt.Rectangle((0, 0), 1, 1, facecolor="lightgrey", hatch="..", edgecolor="grey")]
    ax.legend(handles, names + ["reallocation", "data transfer"], loc="upper left", bbox_to_anchor=(1.01, 1.0),
              fontsize=8, frameon=False)
    ax.set_yticks(ranks)
    ax.set_yticklabels([f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("seconds (estimated)")
    ax.set_title(title or f"one iteration: {timeline.total:.2f} s")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
