"""The `remesh` command. Subcommands take a YAML config and dotted overrides:

    remesh sft configs/sft_demo.yaml optim.lr=1e-5 data.max_prompt_len=256
    remesh rm configs/rm_demo.yaml
    remesh train configs/remax_demo.yaml       # RL: PPO, ReMax, GRPO, RLOO, REINFORCE++
    remesh train configs/sft_demo.yaml          # picks the trainer from the config's `kind`
    remesh convert model.gguf out_dir/          # GGUF or HF folder -> HF folder
    remesh generate default data/demo/prompts.jsonl --spec auto --n 4   # rollout engine
    remesh profile --name my-machine                                    # hardware profile (JSON)
    remesh plan configs/ppo.yaml --cluster h100-16x8                    # search an execution plan
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from remesh.config import ConfigError, check_output_file, load_config, read_yaml


def _run_configs() -> dict[str, type]:
    from remesh.rl.config import RLConfig
    from remesh.train.configs import RMConfig, SFTConfig

    return {"sft": SFTConfig, "rm": RMConfig, "rl": RLConfig}


def _run(kind: str, config: str | None, overrides: list[str]) -> None:
    cfg = load_config(_run_configs()[kind], config, overrides)
    if kind == "rl":
        from remesh.rl.trainer import train_rl

        result = train_rl(cfg)
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 reports
            return
        print(f"remesh: rl ({cfg.algo.name}) finished after {result.iterations} iterations")
        print(f"remesh: final actor  {result.final_model}")
        print(f"remesh: metrics      {result.metrics_file}")
        if result.reward_curve:
            print(f"remesh: reward curve {result.reward_curve}")
        return
    if kind == "sft":
        from remesh.train.sft import train_sft as train
    else:
        from remesh.train.rm import train_rm as train
    result = train(cfg)
    print(f"remesh: {kind} finished after {result.steps} steps; "
          + ", ".join(f"{k} {v:.4g}" for k, v in result.eval_metrics.items()))
    print(f"remesh: final model  {result.final_model}")
    print(f"remesh: metrics      {result.metrics_file} (TensorBoard: {result.output_dir / 'tensorboard'})")


def _declared_kind(config: str, overrides: list[str]) -> str | None:
    """The `kind` an override or the config file sets, if any."""
    kind = None
    for o in overrides:
        if o.startswith("kind="):
            kind = o.split("=", 1)[1]
    if kind is None:
        if not Path(config).is_file():
            raise ConfigError(f"{config}: no such config file")
        kind = read_yaml(config).get("kind")
    return kind


def _kind_of(config: str, overrides: list[str]) -> str:
    kinds = _run_configs()
    kind = _declared_kind(config, overrides)
    if kind not in kinds:
        raise ConfigError(f"{config}: 'kind' must be one of {', '.join(kinds)} (got {kind!r})")
    return kind


def _convert(src: str, dst: str, dtype: str, shard_gb: float, overwrite: bool = False) -> None:
    import torch

    from remesh.checkpoint import load_hf, load_tokenizer, resolve_model_path, save_hf
    from remesh.checkpoint.gguf import convert_gguf_to_hf

    if not shard_gb > 0:
        raise ConfigError(f"--shard-gb: must be positive, got {shard_gb}")
    if Path(dst).exists() and not Path(dst).is_dir():
        raise ConfigError(f"convert: destination {dst} is a file; give a folder")
    if Path(dst).is_dir() and any(Path(dst).iterdir()) and not overwrite:  # its files would be replaced
        raise ConfigError(f"convert: destination {dst} is not empty; give a new folder, or --overwrite to write into it")
    if src.endswith(".gguf") and dtype == "float32" and shard_gb >= 2:
        out = convert_gguf_to_hf(src, dst)
    else:
        folder = resolve_model_path(src, "convert source")
        model = load_hf(folder)
        out = save_hf(model, dst, load_tokenizer(folder), max_shard_bytes=int(shard_gb * 1024**3),
                      dtype=getattr(torch, dtype))
    print(f"remesh: wrote HF checkpoint {out}")


def _profile(args: argparse.Namespace) -> None:
    import torch

    from remesh.planner.profile import measure_profile, user_profiles_dir
    from remesh.train.trainer import pick_device

    # options checked before minutes of measuring, whose result is only written at the end
    device = pick_device(args.device, "--device")
    for option, value in (("--threads", args.threads), ("--passes", args.passes)):
        if value < 1:
            raise ConfigError(f"{option}: must be >= 1, got {value}")
    out = Path(args.out) if args.out else user_profiles_dir() / f"{args.name}.json"
    check_output_file(out, "--out")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    profile = measure_profile(args.name, str(device), passes=args.passes)
    out = profile.save(out)
    print(f"remesh: profile {profile.name} ({profile.source}) written to {out}"
          + ("" if args.out else "; local plans on this processor use it"))


def _plan(args: argparse.Namespace) -> None:
    """Without options, the search `plan=search` would run: planner.cluster (or this machine as
    trainer.nproc processes), planner.steps proposals, planner.seed."""
    from remesh.planner.planning import cluster_for, plan_for_config, plot_timeline, report
    from remesh.rl.config import RLConfig

    if _declared_kind(args.config, args.overrides) not in (None, "rl"):  # an RL config may leave kind out
        raise ConfigError(f"{args.config}: remesh plan needs an RL config (kind: rl)")
    if args.budget is not None and not args.budget > 0:
        raise ConfigError(f"--budget: must be positive (seconds), got {args.budget}")
    timeline = _figure_path(args.timeline, "--timeline")
    cfg = load_config(RLConfig, args.config, args.overrides)
    p = cfg.planner
    spec, option = ((args.cluster, "--cluster") if args.cluster else
                    (p.cluster, "planner.cluster") if p.cluster else (f"local:{cfg.trainer.nproc}", "trainer.nproc"))
    cluster = cluster_for(spec, cfg.trainer.device, option)
    if option == "planner.cluster" and cluster.world != cfg.trainer.nproc:
        print(f"remesh: note: plan=search runs on {spec} only with {cluster.world} ranks (torchrun), "
              f"not trainer.nproc={cfg.trainer.nproc}", file=sys.stderr)
    seed = p.seed if args.seed is None else args.seed
    if args.budget is None:
        result, _ = plan_for_config(cfg, cluster, seed=seed, max_steps=p.steps)
    else:
        result, _ = plan_for_config(cfg, cluster, budget_s=args.budget, seed=seed)
    print(report(result, cluster))
    png = plot_timeline(result.best.timeline, timeline,
                        f"{cfg.algo.name} on {cluster.name}: {result.best.seconds:.2f} s per iteration (estimated)")
    print(f"\ntimeline: {png}")


def _figure_path(path: str, option: str) -> Path:
    """Where a figure goes: a file whose suffix matplotlib can write (none: .png)."""
    from matplotlib.backend_bases import FigureCanvasBase

    p = Path(path)
    check_output_file(p, option)
    if not p.suffix:
        return p.with_suffix(".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if p.suffix[1:].lower() not in formats:
        raise ConfigError(f"{option} {path}: cannot draw a {p.suffix} file (use one of {', '.join(sorted(formats))})")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="remesh", description="RLHF training with execution plans and fast rollouts.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("sft", "supervised fine-tuning"), ("rm", "reward-model training"),
                        ("rl", "RL (PPO, ReMax, GRPO, RLOO, REINFORCE++)"),
                        ("train", "run the experiment a config describes (its `kind`)")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help="YAML config file")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5")
    c = sub.add_parser("convert", help="convert a checkpoint (GGUF or HF folder, or 'default') into an HF folder")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--shard-gb", type=float, default=2.0, help="max safetensors shard size in GiB")
    c.add_argument("--overwrite", action="store_true", help="write into a destination folder that holds files")
    g = sub.add_parser("generate", help="sample responses with the rollout engine (speculative decoding)")
    g.add_argument("model", help="HF folder, .gguf file or 'default'")
    g.add_argument("prompts", help="JSONL file with a 'prompt' field per row")
    g.add_argument("--out", default="generations.jsonl")
    g.add_argument("--spec", default="auto", help="off | auto | ngram:K | history:KxW | model:K[xW]")
    g.add_argument("--draft-model", help="for --spec model:K: an HF folder, or self:N (the model's first N layers)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--greedy", action="store_true")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-batch", type=int, default=64)
    g.add_argument("--max-prompt-len", type=int, default=512, help="longer prompts are an error (tokens)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto")
    pr = sub.add_parser("profile", help="measure this machine for the planner's estimator (JSON profile)")
    pr.add_argument("--name", default="local")
    pr.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    pr.add_argument("--threads", type=int, default=1,
                    help="CPU threads per process while measuring (a local plan gives each rank cores / ranks)")
    pr.add_argument("--passes", type=int, default=3,
                    help="measure everything this many times, interleaved, and keep each value's median")
    pr.add_argument("--out", help="output JSON (default: NAME.json in ~/.cache/remesh/profiles, where local "
                                      "plans on this processor find it)")
    pl = sub.add_parser("plan", help="search an execution plan for an RL config on a cluster")
    pl.add_argument("config", help="RL config YAML")
    pl.add_argument("overrides", nargs="*", help="dotted overrides")
    pl.add_argument("--cluster", help="cluster YAML, a shipped cluster name, or local:N (this machine, N processes); "
                                      "default: the config's planner.cluster, else local:trainer.nproc")
    pl.add_argument("--budget", type=float,
                    help="search for this many seconds (default: the config's planner.steps proposals, as plan=search)")
    pl.add_argument("--seed", type=int, help="default: the config's planner.seed")
    pl.add_argument("--timeline", default="plan_timeline.png", help="where to draw the plan's timeline")
    return p


def _generate(args: argparse.Namespace) -> None:
    from remesh.generate import GenerateArgs, run_generate

    fields = GenerateArgs.__dataclass_fields__
    try:
        run_generate(GenerateArgs(**{k: v for k, v in vars(args).items() if k in fields}))
    except ValueError as e:  # bad sampling or speculation options
        raise ConfigError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides after an option (`remesh plan CONFIG --cluster X plan=colocated`) are left over
    # by argparse, which takes positionals only before the options (intermixed parsing cannot
    # go with subcommands)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from remesh.checkpoint.gguf import GGUFError
    from remesh.checkpoint.hf import CheckpointError
    from remesh.data import DataError
    from remesh.planner.search import NoPlanFits

    try:
        if args.command in ("sft", "rm", "rl"):
            if args.config and (declared := _declared_kind(args.config, args.overrides)) in _run_configs().keys() - {args.command}:
                # else the other kind's first key is reported unknown, which hides the mix-up
                raise ConfigError(f"{args.config}: a kind: {declared} config; run it with `remesh {declared}` "
                                  f"(or `remesh train`), not `remesh {args.command}`")
            _run(args.command, args.config, args.overrides)
        elif args.command == "train":
            _run(_kind_of(args.config, args.overrides), args.config, args.overrides)
        elif args.command == "convert":
            _convert(args.src, args.dst, args.dtype, args.shard_gb, args.overwrite)
        elif args.command == "generate":
            _generate(args)
        elif args.command == "profile":
            _profile(args)
        elif args.command == "plan":
            _plan(args)
    except (ConfigError, DataError, CheckpointError, GGUFError, NoPlanFits, FileNotFoundError) as e:
        print(f"remesh: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:  # not about a path the user gave (a lost connection, a full disk...)
            raise
        print(f"remesh: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
