"""Sample migration: one generate call as 2 data-parallel instances (gloo ranks), with and
without moving unfinished samples between them, on the default model.

Workload: the first B length-mix demo prompts (one word / one sentence / a paragraph, in turn),
split between the instances by prompt tokens as a plan does, one sample each, temperature 1.0,
EOS or --max-new-tokens: the instances' response lengths differ, so without migration one
instance idles while the other finishes its long tail. Each rank uses one thread (2 ranks on
this 2-core machine). Rounds alternate the order of the two modes; the outputs of both modes
are checked to be identical.

Headline (JSON): migration_speedup = median call time without / with migration (the call
ends when the slower instance ends), and idle_frac_off / idle_frac_on: the instances' mean
share of the call spent waiting.

    python bench/migration.py [--quick] [--batch 16] [--max-new-tokens 128] [--reps 3] [--every 8]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import demo_prompts, finish, median, parse_args, print_table  # noqa: E402
from remesh.checkpoint import load_hf, load_tokenizer, resolve_model_path  # noqa: E402
from remesh.plan.layout import Layout  # noqa: E402
from remesh.rollout import RolloutEngine, SamplingParams  # noqa: E402
from remesh.runtime.data import balance_by_tokens  # noqa: E402
from remesh.runtime.groups import ProcessGroups  # noqa: E402
from remesh.runtime.launch import spawn  # noqa: E402
from remesh.runtime.migration import MigratingGenerator  # noqa: E402


def _rank(rank: int, world: int, batch: int, max_new_tokens: int, reps: int, every: int) -> dict:
    torch.set_num_threads(1)
    folder = resolve_model_path("default")
    tok = load_tokenizer(folder)
    model = load_hf(folder, head="lm").requires_grad_(False).eval()
    prompts = demo_prompts(tok, length_mix=True)[:batch]
    eos = model.args.extra.get("eos_token_id")
    stop = tuple(sorted({tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}))
    layout = Layout(tuple(range(world)), world)
    groups = ProcessGroups.for_layouts([layout])
    keys = balance_by_tokens({i: len(p) for i, p in enumerate(prompts)}, world)[rank]
    mine = [prompts[k] for k in keys]
    engine = RolloutEngine(model, spec="off", max_batch=batch)
    gen = MigratingGenerator(layout, groups, every=every)
    out = {"off": [], "on": [], "busy_off": [], "busy_on": [], "moves": [], "same": True, "lengths": []}
    for r in range(reps):
        params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=1 + r, stop_token_ids=stop)
        results = {}
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
            dist.barrier()
            t0 = time.perf_counter()
            if mode == "off":
                results[mode] = engine.generate(mine, params, prompt_keys=keys)
            else:
                results[mode] = gen.generate(engine, mine, params, keys, reserve=(batch, max(len(p) for p in prompts)))
            busy = engine.stats.seconds  # this instance's own engine time
            dist.barrier()  # the call ends when both instances are done
            out[mode].append(time.perf_counter() - t0)
            out[f"busy_{mode}"].append(busy)
        out["moves"].append(len(gen.stats.moves))
        out["same"] &= [x.response_ids for x in results["off"]] == [x.response_ids for x in results["on"]]
        out["lengths"] += [len(x.response_ids) for x in results["off"]]
    return out


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--batch", type=int, default=0),
        p.add_argument("--max-new-tokens", type=int, default=0),
        p.add_argument("--every", type=int, default=8),
        p.add_argument("--reps", type=int, default=0)))
    batch = args.batch or (8 if args.quick else 16)
    max_new = args.max_new_tokens or (64 if args.quick else 128)
    reps = args.reps or (1 if args.quick else 3)
    t_start = time.perf_counter()
    ranks = spawn(_rank, 2, args=(batch, max_new, reps, args.every), timeout_s=3600, collective_timeout_s=1800)
    call = {m: [max(r[m][i] for r in ranks) for i in range(reps)] for m in ("off", "on")}
    idle = {m: median([sum(1 - r[f"busy_{m}"][i] / call[m][i] for r in ranks) / len(ranks) for i in range(reps)])
            for m in ("off", "on")}
    speedup = median(call["off"]) / median(call["on"])
    print_table(["mode", "call s (median)", "idle frac", "per-rep s"],
                [[m, median(call[m]), idle[m], " ".join(f"{x:.1f}" for x in call[m])] for m in ("off", "on")])
    lengths = [n for r in ranks for n in r["lengths"]]
    finish("migration" + ("_quick" if args.quick else ""),
           {"migration_speedup": round(speedup, 3), "idle_frac_off": round(idle["off"], 3),
            "idle_frac_on": round(idle["on"], 3)},
           {"call_seconds": call, "moves_per_call": ranks[0]["moves"], "outputs_identical": all(r["same"] for r in ranks),
            "response_len": {"min": min(lengths), "median": median(lengths), "max": max(lengths)}},
           batch=batch, max_new_tokens=max_new, reps=reps, every=args.every, world=2, threads_per_rank=1,
           wall_s=round(time.perf_counter() - t_start, 1))


if __name__ == "__main__":
    main()
