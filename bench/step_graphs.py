"""Device time of the rollout engine's step graphs by shape (GPU): nn.Linear's projections
against the tuned layouts (rollout/kernels.py), side by side.

SmolLM2-135M (fp32). For B sequences of n new tokens each (a plain decode step is n = 1; a
verification step of d draft nodes, n = 1 + d), every sequence with --context cached tokens, the
step graph (cuda_graphs.py) is captured once per layout and replayed: the median of --reps
replays, each timed from the host around a synchronised replay. This is the step-time model's
input without the engine's own work: how the verifier's time grows with the tokens it holds.

Headline (JSON): the largest and smallest ratio nn.Linear / tuned over the shapes.

    python bench/step_graphs.py --device cuda [--batches 1,2,4,8,16] [--tokens 1,2,3,5,9,17] [--context 100] [--reps 50]
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import finish, median, parse_args, print_table  # noqa: E402
from remesh.checkpoint import load_hf, resolve_model_path  # noqa: E402
from remesh.rollout.cuda_graphs import StepGraphs  # noqa: E402
from remesh.rollout.kernels import TunedLinears  # noqa: E402


def replay_ms(graphs: StepGraphs, b: int, n: int, context: int, reps: int) -> float:
    """Median milliseconds of one replay of the (b, n) step graph (captured by this call)."""
    device = graphs.cache.k.device
    mask = torch.ones(n, n, dtype=torch.bool, device=device).tril().expand(b, n, n) if n > 1 else None
    key = graphs.route(b, n, context + n, now=True)
    graphs.logits([5] * (b * n), [context + i for _ in range(b) for i in range(n)], list(range(b)), [context] * b,
                  mask, key)
    graph = graphs.graphs[key].graph
    times = []
    for _ in range(reps):
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return median(times) * 1e3


def main() -> None:
    def options(p):
        p.add_argument("--batches", default="1,2,4,8,16")
        p.add_argument("--tokens", default="1,2,3,5,9,17", help="new tokens per sequence (1 + draft nodes)")
        p.add_argument("--context", type=int, default=100, help="cached tokens per sequence")
        p.add_argument("--reps", type=int, default=50)

    args = parse_args(__doc__.splitlines()[0], options)
    device = torch.device(args.device)
    if device.type != "cuda":
        raise SystemExit("bench/step_graphs.py times CUDA graphs: run it with --device cuda")
    batches, tokens = [int(x) for x in args.batches.split(",")], [int(x) for x in args.tokens.split(",")]
    model = load_hf(resolve_model_path("default"), device=device).requires_grad_(False).eval()
    max_b = max(batches)
    layouts = {"nn.Linear": contextlib.nullcontext, "tuned": lambda: TunedLinears().applied(model)}
    ms: dict[str, dict[str, float]] = {}
    for name, applied in layouts.items():
        # a cache and graphs per layout: each layout's graphs captured with its own kernels
        cache = model.new_kv_cache(max_b + 1, args.context + max(tokens) + 1)
        graphs = StepGraphs(model, cache, max_b, max_b, capture_after=0)
        with torch.inference_mode(), applied():
            ms[name] = {f"{b}x{n}": replay_ms(graphs, b, n, args.context, args.reps) for b in batches for n in tokens}
        del graphs, cache
    ratios = {k: ms["nn.Linear"][k] / ms["tuned"][k] for k in ms["tuned"]}
    print_table(["B", *[f"n={n}" for n in tokens]],
                [[b, *[f"{ms['nn.Linear'][f'{b}x{n}']:.2f} / {ms['tuned'][f'{b}x{n}']:.2f}" for n in tokens]]
                 for b in batches])
    print("(milliseconds per replay: nn.Linear's layout / tuned layouts)")
    finish("step_graphs_cuda", {"linear_vs_tuned_max": round(max(ratios.values()), 3),
                                "linear_vs_tuned_min": round(min(ratios.values()), 3)},
           {"replay_ms": ms, "linear_vs_tuned": ratios}, device=device, context=args.context, reps=args.reps)


if __name__ == "__main__":
    main()
