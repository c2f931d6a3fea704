"""Rollout engine throughput: plain decoding, each fixed drafting strategy, and adaptive, on the
default model, for several batch sizes, on a long-tailed workload with a previous epoch's
rollouts in the history drafter.

Workload: the first B demo prompts (chat-templated), one sample each (--n: B / n prompts, n
samples each, as GRPO draws them), temperature 1.0 (as RL samples), natural EOS up to
--max-new-tokens, so response lengths spread widely and the batch drains into a long tail. Before timing, every engine generates one epoch (seed 0), untimed: its
rollouts fill the engine's history drafter, and the engine does its one-time work (step-time
calibration, a kernel tuning at each batch shape it meets; the engines share one tuner), as in
an RL run's first iteration. Round r then samples with seed 1 + r, and its rollouts join the
engine's history (RL revisits prompts every epoch). All strategies use point-mass drafters, so
they generate the same tokens, up to floating-point ties (the fraction of sequences identical
to plain decoding is recorded): only the speed differs.

Per batch size: tokens/s of every strategy (median over rounds, interleaved), and the long-tail
phase (steps with at most B/4 live sequences): adaptive vs plain tokens/s there, each pooled
over the rounds (all their tail tokens over all their tail seconds).

At batch 1, plain decoding's achieved memory bandwidth (gpt-fast's measure: the weights one
step reads over the median step time) against the device's copy bandwidth measured in the same
run and, on a known GPU, its datasheet figure; and the same for the step's forward alone (the
graph's replay on a GPU), without sampling and the engine's own work.

The engines keep their KV cache between calls (`keep_cache`), so a CUDA graph captured in one
round is replayed in the next, as a generation service would, and as an RL run does (the
engine's default on a GPU, for a cache of at most 1/16 of its memory). --drop-cache drops it
after every call, as an RL run with `rollout.keep_cache: false` does: every call captures its
graphs again.
The details say how many graphs each engine captured inside the timed rounds, and in how many
seconds (`timed_captures`, `timed_capture_s`: the rounds' tokens/s include them), each
strategy's share of its last call in prefill, and the last call's steps of off and auto
([live sequences, strategy, tokens emitted, ms]).

Headline (JSON): adaptive_vs_best_fixed_min, adaptive_vs_plain_min (min over batch sizes),
longtail_speedup (adaptive / plain over the long-tail phase, median over the batch sizes >= 4
where both reached it), and batch1_bandwidth_fraction (of the datasheet on a known GPU, else of
the copy bandwidth; with batch 1 among the sizes).

On a GPU the steps replay CUDA graphs (cuda_graphs.py) unless --no-cuda-graphs; results go to
bench/results/rollout[_cuda][_eager][_bf16]...json.

    python bench/rollout.py [--quick] [--device cuda] [--model default|PATH] [--sizes 1,4,16,64] [--max-new-tokens 48] [--reps 2]
                            [--temperature 1.0] [--length-mix] [--n 1] [--dtype fp32|bf16] [--no-cuda-graphs]
                            [--drop-cache] [--profile]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS_DIR, demo_prompts, finish, median, parse_args, print_table  # noqa: E402
from remesh.checkpoint import load_hf, load_tokenizer, resolve_model_path  # noqa: E402
from remesh.rollout import RolloutEngine, SamplingParams  # noqa: E402
from remesh.rollout.kernels import TunedLinears  # noqa: E402
from remesh.rollout.sampling import stop_token_ids  # noqa: E402

FIXED = ("ngram:2", "ngram:4", "history:2", "history:4", "history:4x2")
# datasheet memory bandwidth (bytes/s) by the GPU's name: the limit a batch-1 decode step is held to
DATASHEET_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def weight_bytes_per_decode(model: torch.nn.Module) -> int:
    """Bytes of weights one batch-1 decode step reads: every parameter once (a tied head's
    matrix counts once, read by the head), less an untied embedding table, of which a step reads
    one row. gpt-fast's measure, without the KV cache: a lower bound on the step's traffic."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.tok_embeddings.weight
    tied = model.output is not None and model.output.weight is emb
    return total - (0 if tied else emb.numel() * emb.element_size())


def datasheet_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in DATASHEET_BYTES_PER_S.items() if key in name), None)


def tail_rate(engine: RolloutEngine, batch: int) -> tuple[int, float]:
    """(tokens, seconds) of the decode steps with at most batch / 4 live sequences."""
    steps = [s for s in engine.stats.steps if s.live <= max(1, batch // 4)]
    return sum(s.emitted for s in steps), sum(s.seconds for s in steps)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--sizes", default=""),
        p.add_argument("--model", default="default",
                       help="an HF folder (e.g. an RL run's final actor) or .gguf; default: the embedded SmolLM2"),
        p.add_argument("--max-new-tokens", type=int, default=48),
        p.add_argument("--temperature", type=float, default=1.0),
        p.add_argument("--length-mix", action="store_true",
                       help="ask for answers of one word, one sentence or a paragraph in turn: a wide spread of "
                            "response lengths, so that the batch drains into a long tail"),
        p.add_argument("--n", type=int, default=1,
                       help="samples per prompt (a GRPO group): a batch of B sequences is B / n prompts, and the "
                            "history drafter also drafts from each sequence's running siblings"),
        p.add_argument("--reps", type=int, default=0, help="timed rounds (default 2, quick 1)"),
        p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32"),
        p.add_argument("--no-cuda-graphs", action="store_true", help="on a GPU, run the steps eagerly"),
        p.add_argument("--drop-cache", action="store_true",
                       help="drop each engine's KV cache (and its CUDA graphs) after every call"),
        p.add_argument("--profile", action="store_true",
                       help="after the timed rounds, one more call of off and of auto under torch.profiler (their "
                            "top ops, and on a GPU how much of the call kept it busy) and one under cProfile (host "
                            "time by Python function), tables in bench/results/profiles/")))
    device = torch.device(args.device)
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else ([1, 8, 32] if args.quick else [1, 4, 16, 64])
    if args.n > 1 and not args.sizes:
        sizes = [b for b in sizes if b >= args.n]
    if args.n < 1 or any(b % args.n for b in sizes):
        raise SystemExit(f"--n {args.n}: every batch size (--sizes {','.join(map(str, sizes))}) must be a multiple of it")
    reps = args.reps or (1 if args.quick else 2)
    folder = resolve_model_path(args.model)
    tok = load_tokenizer(folder)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = load_hf(folder, head="lm", dtype=dtype, device=device).requires_grad_(False).eval()
    prompts = demo_prompts(tok, length_mix=args.length_mix)
    stop = stop_token_ids(tok.eos_token_id, model.args.extra.get("eos_token_id"))
    names = ["off", *FIXED, "auto"]
    graphs = device.type == "cuda" and not args.no_cuda_graphs
    name = result_name(args, device, graphs)
    t_start = time.perf_counter()
    per_size = {}
    for b in sizes:
        batch = prompts[:b // args.n]
        params = lambda seed: SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=seed,  # noqa: E731
                                             n=args.n,
                                             stop_token_ids=stop)
        engines = {n: RolloutEngine(model, spec=n, max_batch=b, cuda_graphs=not args.no_cuda_graphs, keep_cache=True)
                   for n in names}
        gemms = TunedLinears()
        for e in engines.values():
            # one kernel tuner: a shape runs in the same layout under every strategy, so that
            # a noisy timing that picked a slower layout for one engine does not pass for a
            # difference between strategies
            e.gemms = gemms
            # the previous epoch, untimed: it fills the engine's history drafter, and does what an
            # engine does once in an RL run (calibration, a kernel tuning per new batch shape)
            e.generate(batch, params(0))
        # graphs captured inside the timed rounds (the rounds' tokens/s include them): [count, seconds]
        timed = {n: [0, 0.0] for n in names}
        seen = {n: (e.graphs, e.graphs.captures, e.graphs.capture_seconds) if e.graphs is not None else (None, 0, 0.0)
                for n, e in engines.items()}  # each engine's graphs and their counts after its last call

        def after_call(n: str, e: RolloutEngine) -> None:
            g = e.graphs
            if g is not None:
                before = seen[n][1:] if seen[n][0] is g else (0, 0.0)  # new graphs count from 0
                timed[n][0] += g.captures - before[0]
                timed[n][1] += g.capture_seconds - before[1]
                seen[n] = (g, g.captures, g.capture_seconds)
            if args.drop_cache:
                e.drop_cache()

        if args.drop_cache:
            for e in engines.values():
                e.drop_cache()
        tps = {n: [] for n in names}
        tail = {n: [0, 0.0] for n in names}  # tokens and seconds of long-tail steps, pooled over rounds
        plain_steps: list[float] = []  # seconds of plain decoding's steps at batch 1
        lengths, identical = [], []
        for r in range(reps):
            outs = {}
            order = names if r % 2 == 0 else names[::-1]
            for n in order:
                outs[n] = engines[n].generate(batch, params(1 + r))
                after_call(n, engines[n])
                st = engines[n].stats
                tps[n].append(st.tokens / (st.seconds - st.calibration_seconds))
                tokens, secs = tail_rate(engines[n], b)
                tail[n][0] += tokens
                tail[n][1] += secs
                if n == "off" and b == 1:
                    plain_steps += [s.seconds for s in st.steps if s.strategy == "off"]
            ref = [o.response_ids for o in outs["off"]]
            # identical up to floating-point ties (a uniform within ~1e-6 of a CDF boundary)
            identical.append(min(sum(a.response_ids == r for a, r in zip(outs[n], ref)) / len(ref) for n in names))
            lengths = [len(x) for x in ref]
        med = {n: median(v) for n, v in tps.items()}
        # a round may not reach the tail (or reach it in one step): pooled, one such round does
        # not void the figure
        tail_tps = {n: tok / secs if secs > 0 else float("nan") for n, (tok, secs) in tail.items()}
        best_fixed = max(med[n] for n in ("off", *FIXED))
        auto_st = engines["auto"].stats
        per_size[b] = {"tokens_per_s": med, "tokens_per_s_all": tps, "tail_tokens_per_s": tail_tps,
                       "adaptive_vs_best_fixed": med["auto"] / best_fixed, "adaptive_vs_plain": med["auto"] / med["off"],
                       "best_fixed": max(("off", *FIXED), key=lambda n: med[n]),
                       "longtail_speedup": tail_tps["auto"] / tail_tps["off"],
                       "identical_to_plain_frac_min": min(identical),
                       "response_len": {"min": min(lengths), "median": median(lengths), "max": max(lengths)},
                       "auto_strategies": auto_st.strategy_counts(),
                       "auto_timeline": auto_st.timeline(),
                       # the last call's share of auto's time spent choosing strategies and on free trials
                       "auto_policy_frac": auto_st.policy_seconds / auto_st.seconds,
                       # and the free trials' time hidden behind the device's (a GPU), which cost nothing
                       "auto_policy_hidden_frac": auto_st.policy_hidden_seconds / auto_st.seconds,
                       # trial drafts scored (one per sequence; those dropped at a retirement are not)
                       "auto_trial_drafts_scored_per_step":
                           sum(t[0][1] for t in auto_st.trials.values()) / max(len(auto_st.steps), 1),
                       # the last graphs' counts (with --drop-cache, none: each went with its call),
                       # and the captures inside the timed rounds, which their tokens/s include
                       "cuda_graphs": {n: {**({"shapes": len(e.graphs.graphs), "captures": e.graphs.captures,
                                              "eager_runs": e.graphs.eager_runs,
                                              "stand_in_runs": e.graphs.stand_in_runs,
                                              "provisional_runs": e.graphs.provisional_runs}
                                             if e.graphs is not None else {}),
                                           "timed_captures": timed[n][0], "timed_capture_s": round(timed[n][1], 3)}
                                       for n, e in engines.items() if graphs},
                       # the last call's share in prefill (and recomputed contexts), per strategy
                       "prefill_frac": {n: e.stats.prefill_seconds / e.stats.seconds for n, e in engines.items()},
                       # the last call's decode steps of plain decoding and of auto: [live, strategy, tokens, ms]
                       "steps": {n: [[r.live, r.strategy, r.emitted, round(r.seconds * 1e3, 3)]
                                     for r in engines[n].stats.steps] for n in ("off", "auto")},
                       "acceptance_by_position": auto_st.acceptance_by_position(),
                       "trial_acceptance_by_position": auto_st.acceptance_by_position(trials=True)}
        print(f"batch {b}: " + ", ".join(f"{n} {med[n]:.1f}" for n in names) + " tokens/s", flush=True)
        if plain_steps:
            per_size[b]["bandwidth"] = bw = bandwidth(model, plain_steps, device)
            if args.drop_cache:  # forward_seconds needs the cache of a call
                engines["off"].generate(batch, params(0))
            bw["forward_s_median"] = fwd = engines["off"].forward_seconds()
            bw["forward_fraction_of_datasheet"] = (bw["weight_bytes"] / fwd / bw["datasheet_bytes_per_s"]
                                                   if bw["datasheet_bytes_per_s"] else None)
            print(f"batch 1, plain decoding: {bw['step_s_median'] * 1e3:.1f} ms a step (median of {len(plain_steps)}), "
                  f"{bw['achieved_bytes_per_s'] / 1e9:.1f} GB/s of weights read: {bw['fraction_of_copy']:.2f} of this "
                  f"device's copy bandwidth ({bw['copy_bytes_per_s'] / 1e9:.1f} GB/s)"
                  + (f", {bw['fraction_of_datasheet']:.2f} of its datasheet's" if bw["fraction_of_datasheet"] else ""),
                  flush=True)
            print(f"batch 1, the forward alone: {fwd * 1e3:.2f} ms, {bw['weight_bytes'] / fwd / 1e9:.1f} GB/s", flush=True)
        if args.profile:
            prof = per_size[b]["profile"] = {
                n: profile_call(engines[n], batch, params(1 + reps), device, RESULTS_DIR / "profiles" / f"{name}_b{b}_{n}.txt")
                for n in ("off", "auto")}
            per_size[b]["host_profile"] = {
                n: host_profile_call(engines[n], batch, params(1), RESULTS_DIR / "profiles" / f"{name}_b{b}_{n}_host.txt")
                for n in ("off", "auto")}
            print(f"batch {b}, profiled: " + ", ".join(
                f"{n} {p['wall_s']:.2f} s for {p['steps']} steps" + (f", device busy {p['device_busy_frac']:.0%}"
                                                                     if p["device_busy_frac"] is not None else "")
                + f" ({p['table']})" for n, p in prof.items()), flush=True)

    print_table(["batch", *names, "auto/best", "auto/off", "tail auto/off"],
                [[b, *[d["tokens_per_s"][n] for n in names], d["adaptive_vs_best_fixed"], d["adaptive_vs_plain"],
                  d["longtail_speedup"]] for b, d in per_size.items()])
    tails = [d["longtail_speedup"] for b, d in per_size.items() if b >= 4 and d["longtail_speedup"] == d["longtail_speedup"]]
    tails = tails or [d["longtail_speedup"] for d in per_size.values()]
    headline = {"adaptive_vs_best_fixed_min": round(min(d["adaptive_vs_best_fixed"] for d in per_size.values()), 3),
                "adaptive_vs_plain_min": round(min(d["adaptive_vs_plain"] for d in per_size.values()), 3),
                "longtail_speedup": round(median(tails), 3)}
    if 1 in per_size:
        bw = per_size[1]["bandwidth"]
        headline["batch1_bandwidth_fraction"] = round(bw["fraction_of_datasheet"] or bw["fraction_of_copy"], 3)
    finish(name, headline, {str(b): d for b, d in per_size.items()},
           device=device, model=args.model, samples_per_prompt=args.n, quick=args.quick, reps=reps, sizes=sizes, max_new_tokens=args.max_new_tokens,
           temperature=args.temperature, length_mix=args.length_mix, dtype=args.dtype, cuda_graphs=graphs, wall_s=round(time.perf_counter() - t_start, 1))


def result_name(args, device: torch.device, graphs: bool) -> str:
    """bench/results/<name>.json: rollout[_cuda][_eager][_bf16][_T..][_lengthmix][_nN][_dropcache][_model][_quick]."""
    return ("rollout" + ("" if device.type == "cpu" else f"_{device.type}") + ("_eager" if device.type == "cuda" and not graphs else "")
            + ("" if args.dtype == "fp32" else f"_{args.dtype}") + ("" if args.temperature == 1.0 else f"_T{args.temperature:g}")
            + ("_lengthmix" if args.length_mix else "") + (f"_n{args.n}" if args.n > 1 else "")
            + ("_dropcache" if args.drop_cache else "")
            + ("" if args.model == "default" else f"_{Path(args.model).name}") + ("_quick" if args.quick else ""))


def profile_call(engine: RolloutEngine, prompts: list[list[int]], params: SamplingParams, device: torch.device,
                 path: Path) -> dict:
    """One generate call under torch.profiler: its top ops (by self device time on a GPU, else
    self CPU time) written to `path`; its wall time and, on a GPU, the kernels' total time (the
    rest of the wall is the device waiting for the host)."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        engine.generate(prompts, params)
    events = prof.key_averages()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(events.table(sort_by="self_device_time_total" if gpu else "self_cpu_time_total", row_limit=30))
    wall = engine.stats.seconds
    busy = sum(e.self_device_time_total for e in events) / 1e6 if gpu else None
    return {"wall_s": wall, "steps": len(engine.stats.steps), "device_busy_s": busy,
            "device_busy_frac": busy / wall if gpu else None, "table": str(path.relative_to(RESULTS_DIR.parent.parent))}


def host_profile_call(engine: RolloutEngine, prompts: list[list[int]], params: SamplingParams, path: Path) -> dict:
    """One generate call under cProfile: the host's time by Python function (most own time
    first) to `path`, to find what one strategy's steps spend beyond another's."""
    import cProfile
    import io
    import pstats

    with cProfile.Profile() as prof:
        engine.generate(prompts, params)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(40)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.getvalue())
    st = engine.stats
    return {"wall_s": st.seconds, "steps": len(st.steps), "policy_s": st.policy_seconds,
            "policy_hidden_s": st.policy_hidden_seconds,
            "table": str(path.relative_to(RESULTS_DIR.parent.parent))}


def bandwidth(model: torch.nn.Module, step_seconds: list[float], device: torch.device) -> dict:
    """Achieved weight-read bandwidth of batch-1 decode steps (median step), against the device's
    copy bandwidth measured now (profile.measure_memory_bandwidth) and, on a known GPU, its
    datasheet figure."""
    from remesh.planner.profile import measure_memory_bandwidth

    step, weights = median(step_seconds), weight_bytes_per_decode(model)
    achieved = weights / step
    copy = measure_memory_bandwidth(device)
    sheet = datasheet_bandwidth(device)
    return {"weight_bytes": weights, "step_s_median": step, "steps": len(step_seconds),
            "achieved_bytes_per_s": achieved, "copy_bytes_per_s": copy, "fraction_of_copy": achieved / copy,
            "datasheet_bytes_per_s": sheet, "fraction_of_datasheet": achieved / sheet if sheet else None}


if __name__ == "__main__":
    main()
