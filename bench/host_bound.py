"""The rollout engine where its steps are host-bound, as on a GPU replaying CUDA graphs, measured
on a CPU: plain decoding, fixed strategies and adaptive, tokens/s side by side.

On a GPU a decode step of a small model takes a few milliseconds whatever its tokens, so the
engine's Python (choosing a strategy, free trials, the drafters' indexes) is a visible share of
it, and a draft costs little more than a plain step. A tiny random model on one CPU thread has
both properties: a step of a few milliseconds, nearly flat in the tokens. Its logits are scaled
up so that sampled tokens repeat and drafts are accepted (at batch 1, fixed drafting beats plain
decoding), and two stop tokens give response lengths a long tail. This is no substitute for
the GPU table (bench/rollout.py --device cuda); it checks, between GPU runs, what auto's own
work costs against plain decoding where drafting does not pay (batch 16) and what it finds
where it does (batch 1). `--auto-budgets 0.02,0.005` adds auto engines with those overhead
budgets (`RolloutEngine(overhead_budget=)`), "auto@0.02" etc., run side by side with the rest.

Per batch size, `rounds` interleaved calls per strategy after one untimed call (it fills the
history and calibrates): the median tokens/s, and auto's step time against plain decoding's
paired round by round (median and quartiles of the ratio).

    python bench/host_bound.py [--quick] [--sizes 1,4,16] [--rounds 11] [--auto-budgets 0.02,0.005]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import finish, median, parse_args, print_table  # noqa: E402
from remesh.model import ModelArgs, Transformer  # noqa: E402
from remesh.rollout import RolloutEngine, SamplingParams  # noqa: E402
from remesh.rollout.kernels import TunedLinears  # noqa: E402

STRATEGIES = ("off", "ngram:2", "history:2", "history:4x2", "auto")


def host_bound_model() -> Transformer:
    """4 layers of width 128 over 512 tokens; logits x 20, so that sampling repeats itself."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=512, dim=128, n_layers=4, ffn_dim=256, n_heads=4, n_kv_heads=2,
                                  max_seq_len=512, norm_eps=1e-6))
    with torch.no_grad():
        model.output.weight.mul_(20.0)
    return model.requires_grad_(False).eval()


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--sizes", default=""),
        p.add_argument("--rounds", type=int, default=0, help="timed calls per strategy (default 11, quick 3)"),
        p.add_argument("--auto-budgets", default="", help="extra auto engines with these overhead budgets")))
    if args.device != "cpu":
        raise SystemExit(f"--device {args.device}: bench/host_bound.py is a CPU proxy of a GPU's host-bound steps; "
                         "on a GPU run bench/rollout.py --device cuda")
    if args.threads == 0:
        torch.set_num_threads(1)  # one thread: less noise, and host-bound like a GPU's host
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else ([1, 16] if args.quick else [1, 4, 16])
    rounds = args.rounds or (3 if args.quick else 11)
    budgets = {f"auto@{x}": float(x) for x in args.auto_budgets.split(",") if x}
    names = (*STRATEGIES, *budgets)
    model = host_bound_model()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (int(torch.randint(4, 30, (1,), generator=g)),), generator=g).tolist()
               for _ in range(max(sizes))]
    t_start = time.perf_counter()
    per_size = {}
    for b in sizes:
        params = lambda seed: SamplingParams(max_new_tokens=96, seed=seed, stop_token_ids=(7, 11))  # noqa: E731
        engines = {n: RolloutEngine(model, spec=n, max_batch=b, keep_cache=True) for n in STRATEGIES}
        engines |= {n: RolloutEngine(model, spec="auto", max_batch=b, keep_cache=True, overhead_budget=x)
                    for n, x in budgets.items()}
        gemms = TunedLinears()
        for e in engines.values():
            e.gemms = gemms  # one projection layout per shape for all (as bench/rollout.py): a noisy
            e.generate(prompts[:b], params(0))  # timing must not pass for a difference between strategies
        tps = {n: [] for n in names}
        step_s = {n: [] for n in names}  # mean decode step per call
        policy = []
        for r in range(rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                engines[n].generate(prompts[:b], params(1 + r))
                st = engines[n].stats
                tps[n].append(st.tokens / (st.seconds - st.calibration_seconds))
                step_s[n].append(statistics.mean(s.seconds for s in st.steps))
                if n == "auto":
                    policy.append(st.policy_seconds / st.seconds)
        med = {n: median(v) for n, v in tps.items()}
        best = max((n for n in STRATEGIES if n != "auto"), key=med.__getitem__)
        paired = [a / o for a, o in zip(step_s["auto"], step_s["off"])]
        quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
        per_size[b] = {"tokens_per_s": med, "tokens_per_s_all": tps, "best_fixed": best,
                       "adaptive_vs_best_fixed": med["auto"] / med[best], "adaptive_vs_plain": med["auto"] / med["off"],
                       "auto_step_vs_plain_step": {"median": median(paired), "q1": quartiles[0], "q3": quartiles[2]},
                       "auto_policy_frac": median(policy), "auto_strategies": engines["auto"].stats.strategy_counts(),
                       "plain_step_ms": 1e3 * median(step_s["off"]),
                       "auto_budgets_vs_plain": {n: med[n] / med["off"] for n in budgets}}
        print(f"batch {b}: " + ", ".join(f"{n} {med[n]:.0f}" for n in names) + " tokens/s", flush=True)
    print_table(["batch", *names, "auto/best", "auto/off", "plain step ms", "auto step / plain (q1-q3)"],
                [[b, *[d["tokens_per_s"][n] for n in names], d["adaptive_vs_best_fixed"], d["adaptive_vs_plain"],
                  d["plain_step_ms"], "{median:.3f} ({q1:.3f}-{q3:.3f})".format(**d["auto_step_vs_plain_step"])]
                 for b, d in per_size.items()])
    headline = {"adaptive_vs_best_fixed_min": round(min(d["adaptive_vs_best_fixed"] for d in per_size.values()), 3),
                "adaptive_vs_plain_min": round(min(d["adaptive_vs_plain"] for d in per_size.values()), 3)}
    name = "host_bound" + ("_quick" if args.quick else "") + ("_budgets" if budgets else "")
    finish(name, headline, {str(b): d for b, d in per_size.items()}, rounds=rounds, sizes=sizes,
           auto_budgets=list(budgets.values()), threads=torch.get_num_threads(),
           wall_s=round(time.perf_counter() - t_start, 1))


if __name__ == "__main__":
    main()
