"""The planner on ReaL's settings, simulated: LLaMA-2 7B / 13B, CodeLlama-34B and LLaMA-2 70B
as actor, reference, critic and reward model (PPO), on 8 to 128 H100s, 512 prompts of 128
tokens per iteration with 128 / 384 / 896 generated tokens, and a long-context case (1024 +
1024 tokens). For each: the searched plan's estimated iteration time next to the best
colocated and split plans' (each with its best uniform tp x pp strategy), and the search time.

Nothing runs on a GPU here: the H100 profile is a datasheet profile with assumed efficiencies
(remesh/planner/profiles/h100-datasheet.json), so the absolute times are estimates of an
estimate; the ratios between plans are what the table is for. The ReaL paper reports, for its
own system and search (abstract of arXiv 2406.14088): up to 3.58x over baseline systems and
81% on average over heuristic Megatron-style plans in the long-context setting.

    python bench/real_settings.py [--quick] [--budget 30]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import finish, parse_args, print_table  # noqa: E402
from remesh.dataflow.graph import graph_for  # noqa: E402
from remesh.model.llama import ModelArgs  # noqa: E402
from remesh.planner.cluster import Cluster  # noqa: E402
from remesh.planner.estimator import Estimator, Workload  # noqa: E402
from remesh.planner.search import SIMULATION, NoPlanFits, search  # noqa: E402

LLAMA = {
    "7B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824),
    "34B": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, ffn_dim=22016),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672),
}
GPUS = {"7B": 8, "13B": 16, "34B": 32, "70B": 64}


def cluster(gpus: int) -> Cluster:
    nodes = max(1, gpus // 8)
    return Cluster.from_dict({"nodes": nodes, "devices_per_node": min(8, gpus), "device_memory": "80GiB",
                              "profile": "h100-datasheet", "backend": "nccl",
                              "inter_node": {"bandwidth": "50GB/s", "latency": "10us"}}, f"h100-{nodes}x{min(8, gpus)}")


def workload(size: str, prompt: int, gen: int) -> Workload:
    lm = ModelArgs(vocab_size=32000, max_seq_len=4096, **LLAMA[size])
    value = ModelArgs(vocab_size=32000, max_seq_len=4096, head="value", **LLAMA[size])
    return Workload(graph=graph_for("ppo"), models={"actor": lm, "ref": lm, "critic": value, "reward": value},
                    dtype="bfloat16", prompts=512, n_samples=1, prompt_len=prompt, prompt_len_max=prompt,
                    gen_len=gen, gen_len_max=gen, micro_batch_tokens=4096, ppo_epochs=1, mini_batches=4,
                    max_batch=128, migrate=True)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: p.add_argument("--budget", type=float, default=30.0))
    cases = [(s, GPUS[s], 128, g) for s in ("7B", "13B", "34B", "70B") for g in (128, 384, 896)]
    cases += [("70B", 128, 128, g) for g in (128, 384, 896)]
    cases += [("7B", 8, 1024, 1024), ("70B", 128, 1024, 1024)]
    if args.quick:
        cases = [("7B", 8, 128, 128), ("70B", 128, 128, 384)]
    rows, details = [], []
    t0 = time.perf_counter()
    for size, gpus, prompt, gen in cases:
        est = Estimator(workload(size, prompt, gen), cluster(gpus))
        try:
            result = search(est, budget_s=args.budget, seed=0, space=SIMULATION)
        except NoPlanFits as e:
            rows.append([size, gpus, f"{prompt}+{gen}", "does not fit", "", "", "", ""])
            details.append({"model": size, "gpus": gpus, "prompt": prompt, "gen": gen, "error": str(e)})
            continue
        h = {k: (e.seconds if e else float("nan")) for k, e in result.heuristics.items()}
        best_h = min((v for v in h.values() if v == v), default=float("nan"))
        rows.append([size, gpus, f"{prompt}+{gen}", result.best.seconds, h["colocated"], h["split"],
                     best_h / result.best.seconds, result.seconds])
        details.append({"model": size, "gpus": gpus, "prompt": prompt, "gen": gen,
                        "searched_s": result.best.seconds, "searched_plan": result.best.plan.one_line(),
                        "heuristics_s": h, "heuristic_plans": {k: e.plan.one_line() for k, e in result.heuristics.items() if e},
                        "speedup_vs_best_heuristic": best_h / result.best.seconds,
                        "search_s": result.seconds, "distinct_plans": result.distinct,
                        "peak_memory_gib": result.best.peak_memory / 2**30})
        print(f"{size} on {gpus}: searched {result.best.seconds:.1f} s, colocated {h['colocated']:.1f} s, "
              f"split {h['split']:.1f} s ({result.seconds:.0f} s search)", flush=True)
    print_table(["model", "GPUs", "prompt+gen", "searched s", "colocated s", "split s", "x best heuristic", "search s"],
                rows)
    speedups = [d["speedup_vs_best_heuristic"] for d in details if "speedup_vs_best_heuristic" in d]
    finish("real_settings" + ("_quick" if args.quick else ""),
           {"speedup_vs_best_heuristic_min": round(min(speedups), 3),
            "speedup_vs_best_heuristic_max": round(max(speedups), 3),
            "search_s_max": round(max(d["search_s"] for d in details if "search_s" in d), 1)},
           {"cases": details}, budget_s=args.budget, profile="h100-datasheet (not measured)",
           wall_s=round(time.perf_counter() - t0, 1))


if __name__ == "__main__":
    main()
