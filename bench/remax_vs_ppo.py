"""ReMax vs PPO in remesh: peak memory and time per iteration, same model, prompts and batch.

The ReMax paper (Li et al., 2023) reports ~46-50% less GPU memory than PPO and up to 2.2x faster
training (7B models on A100s, with a learned reward model). This benchmark measures the two
algorithms as remesh implements them, side by side in one run:

- model: the embedded default SmolLM2-135M-Instruct (`actor.path=default`); PPO's critic is the
  same backbone with a scalar value head (its initial weights are the actor's). fp32 on CPU;
  `--device cuda`: fp32 weights, bf16 autocast (remesh's `mixed_precision=auto`).
- same prompts (data/demo/prompts.jsonl, in the same order: iteration i of both uses the same
  prompts), `prompts_per_iter` (8; 64 on CUDA), `max_new_tokens` (32), temperature 1, top-p 1.
- the same rule reward, VADER sentiment of the response (`reward.terms=[{name: vader_sentiment}]`):
  no reward model, so that the reward costs both the same (and is cheap); KL penalty in the reward
  (k1, coef 0.05) for both, so both run the reference model.
- one optimizer step per rollout for both: PPO with `ppo_epochs=1, mini_batches=1` (one actor and
  one critic step); ReMax takes one actor step.
- fixed-length responses (default): both decode exactly `max_new_tokens` tokens for every sample,
  greedy ones included, so the work does not depend on when the model happens to stop. remesh has
  no config key that ignores EOS, so the benchmark subclasses `RLTrainer` and returns no stop ids
  from `_stop_ids` (`bench.common.rl_trainer`; remesh itself is unchanged). `--natural-eos` keeps
  the stop tokens; the measured mean response lengths are reported either way.

What one iteration runs (remesh's dataflow graphs):
  ReMax: actor_gen (sampled) + actor_greedy (greedy baseline) -> ref_inf, rew_inf -> actor_train
  PPO:   actor_gen -> ref_inf, rew_inf, critic_inf -> actor_train, critic_train

Each algorithm runs in its own fresh worker subprocess (spawned), driven by this process one
iteration at a time, alternating ReMax and PPO (ABBA...), after one warm-up iteration each.

Time: median of the trainer's own `time/iteration` metric over the timed iterations (rounds in
which other processes kept more than 0.3 cores busy are left out when enough clean rounds exist;
see bench/common.py), plus the median of each MFC's `time/<mfc>`.

Peak memory:
- CPU: peak resident set size of the worker (VmHWM from /proc/self/status) at the end, minus its
  RSS measured right after its imports (torch, transformers, remesh), before any model is loaded.
  It therefore holds the weights of every model, gradients, AdamW state, activations, KV cache
  and allocator slack. (remesh memory-maps safetensors, so the RSS right after loading is small:
  weights become resident when first used; the JSON keeps it as loaded_rss_minus_base_bytes.)
- CUDA: torch.cuda.max_memory_allocated() over the worker's whole life (weights, gradients,
  optimizer state and activations, as the paper reports), plus max_memory_reserved.

Headline: remax_peak_mem_ratio and remax_iter_time_ratio (ReMax / PPO; below 1: ReMax uses less).

    python bench/remax_vs_ppo.py [--quick] [--device cuda] [--prompts 8] [--max-new-tokens 32] [--reps 7]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (WorkerProcess, finish, interleaved_times, parse_args, peak_rss_bytes,  # noqa: E402
                          print_table, rl_trainer, rss_bytes)
from remesh.config import load_config  # noqa: E402
from remesh.rl.config import RLConfig  # noqa: E402
import remesh.rl.trainer  # noqa: E402,F401  (imported before the baseline RSS is taken)

PROMPTS = Path(__file__).resolve().parent.parent / "data" / "demo" / "prompts.jsonl"
ALGOS = ("remax", "ppo")
GIB = 1024 ** 3


def overrides(algo: str, device: str, prompts: int, max_new_tokens: int, out_dir: str) -> list[str]:
    gpu = torch.device(device).type == "cuda"
    return [
        f"algo.name={algo}", "algo.ppo_epochs=1", "algo.mini_batches=1",
        "actor.path=default", "actor.dtype=float32",
        "actor_optim.lr=1e-6", "actor_optim.schedule=constant",
        "critic_optim.lr=5e-6", "critic_optim.schedule=constant",
        "kl.coef=0.05", "kl.estimator=k1", "kl.mode=reward",
        "reward.terms=[{name: vader_sentiment}]",
        "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.top_k=0", "rollout.n_samples=1",
        f"rollout.max_new_tokens={max_new_tokens}", "rollout.max_batch=256",
        f"data.train={PROMPTS}", "data.max_prompt_len=128",
        f"trainer.prompts_per_iter={prompts}", "trainer.iterations=1000", "trainer.micro_batch_tokens=16384",
        f"trainer.device={device}", "trainer.mixed_precision=" + ("auto" if gpu else "'off'"),
        f"trainer.output_dir={out_dir}", "trainer.progress=false", "trainer.tensorboard=false",
        "trainer.plot=false", "trainer.show_samples=0", "trainer.seed=0",
    ]


# ---------------------------------------------------------------- worker (one per algorithm)

class AlgoSide:
    """One algorithm's trainer, built in a fresh spawned process (`bench.common.WorkerProcess`)."""

    def __init__(self, algo: str, device: str, prompts: int, max_new_tokens: int, fixed_length: bool):
        self.base_rss = rss_bytes()  # imports done (this module imported torch, transformers, remesh), no model yet
        self.gpu = torch.device(device).type == "cuda"
        self._tmp = tempfile.TemporaryDirectory()
        cfg = load_config(RLConfig, None, overrides(algo, device, prompts, max_new_tokens, self._tmp.name))
        t0 = time.perf_counter()
        self.trainer = trainer = rl_trainer(cfg, fixed_length)
        self.info = {"pid": os.getpid(), "base_rss": self.base_rss, "loaded_rss": rss_bytes(),
                     "load_s": time.perf_counter() - t0, "roles": trainer.graph.roles, "graph": trainer.graph.describe(),
                     "params": {r: sum(p.numel() for p in m.parameters())
                                for r, m in (("actor", trainer.actor), ("ref", trainer.ref), ("critic", trainer.critic))
                                if m is not None}}
        if self.gpu:
            torch.cuda.synchronize()
            self.info["loaded_cuda_alloc"] = torch.cuda.memory_allocated()

    def iterate(self) -> dict[str, float]:
        metrics = self.trainer.iterate()
        if self.gpu:
            torch.cuda.synchronize()
        return metrics

    def memory(self) -> dict[str, int]:
        mem = {"base_rss": self.base_rss, "peak_rss": peak_rss_bytes(), "rss": rss_bytes()}
        if self.gpu:
            mem.update(cuda_max_alloc=torch.cuda.max_memory_allocated(),
                       cuda_max_reserved=torch.cuda.max_memory_reserved())
        return mem


# ---------------------------------------------------------------- main

def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--prompts", type=int, default=0, help="prompts per iteration (default 8; 64 on CUDA)"),
        p.add_argument("--max-new-tokens", type=int, default=32),
        p.add_argument("--reps", type=int, default=0, help="timed iterations of each (default 7, quick 2)"),
        p.add_argument("--natural-eos", action="store_true", help="stop responses at EOS (default: fixed length)")))
    device = args.device
    gpu = torch.device(device).type == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    prompts = args.prompts or ((64 if gpu else 8) // (2 if args.quick else 1))
    reps = args.reps or (2 if args.quick else 7)
    fixed = not args.natural_eos
    t_start = time.perf_counter()

    # load one at a time, so that the two loads do not compete for the cores
    workers = {algo: WorkerProcess(AlgoSide, algo, device, prompts, args.max_new_tokens, fixed, name=f"bench-{algo}",
                                 threads=args.threads) for algo in ALGOS}
    try:
        metrics: dict[str, list[dict]] = {a: [] for a in ALGOS}

        def iterate(algo: str):
            def fn() -> dict:
                m = workers[algo].call("iterate")
                metrics[algo].append(m)
                return m
            return fn

        t = interleaved_times({a: iterate(a) for a in ALGOS}, reps=reps, warmup=1, device="cpu", max_extra=3,
                              own_pids=[w.proc.pid for w in workers.values()],
                              measure={a: (lambda m, wall: m["time/iteration"]) for a in ALGOS})
        mem = {a: w.call("memory") for a, w in workers.items()}
    finally:
        for w in workers.values():
            w.stop()

    used = t.used()
    details: dict[str, Any] = {}
    for algo in ALGOS:
        timed = metrics[algo][1:]  # after the warm-up iteration
        ms = [timed[i] for i in used]
        mfc_keys = sorted({k for m in ms for k in m if k.startswith("time/") and k != "time/iteration"})
        info, m = workers[algo].info, mem[algo]
        d = {
            "graph": info["graph"], "roles": info["roles"], "params": info["params"], "load_s": info["load_s"],
            "iter_s_median": t.median_s(algo), "iter_s_spread": t.spread(algo),
            "mfc_s_median": {k[5:]: statistics.median(x[k] for x in ms) for k in mfc_keys},
            "response_len_mean": statistics.mean(x["response/len_mean"] for x in timed),
            "stop_frac_mean": statistics.mean(x["response/stop_frac"] for x in timed),
            "gen_tokens_per_s_median": statistics.median(x["perf/gen_tokens_per_s"] for x in ms),
            "reward_mean": statistics.mean(x["reward/mean"] for x in timed),
            "memory": {
                "base_rss_bytes": m["base_rss"], "loaded_rss_bytes": info["loaded_rss"], "peak_rss_bytes": m["peak_rss"],
                "peak_rss_minus_base_bytes": m["peak_rss"] - m["base_rss"],
                "loaded_rss_minus_base_bytes": info["loaded_rss"] - m["base_rss"],
            },
        }
        if "reward/greedy_mean" in timed[0]:
            d["greedy_reward_mean"] = statistics.mean(x["reward/greedy_mean"] for x in timed)
        if gpu:
            d["memory"].update(cuda_max_allocated_bytes=m["cuda_max_alloc"], cuda_max_reserved_bytes=m["cuda_max_reserved"],
                               cuda_loaded_allocated_bytes=info["loaded_cuda_alloc"])
        details[algo] = d

    peak_key = "cuda_max_allocated_bytes" if gpu else "peak_rss_minus_base_bytes"
    peak = {a: details[a]["memory"][peak_key] for a in ALGOS}
    mem_ratio = peak["remax"] / peak["ppo"]
    time_ratio = t.median_s("remax") / t.median_s("ppo")
    details["paired_time_ratio"] = 1 / t.paired_ratio("remax", "ppo")  # median over rounds of remax/ppo
    details["timing"] = t.summary()
    details["memory_definition"] = (
        "CUDA: torch.cuda.max_memory_allocated over the worker's life (weights, grads, optimizer state, "
        "activations)" if gpu else
        "CPU: worker's peak RSS (VmHWM) minus its RSS right after imports, before any model was loaded")
    details["paper_claim"] = "ReMax paper: ~46-50% less GPU memory than PPO (ratio ~0.50-0.54), up to 2.2x faster"

    mfc_names = ["actor_gen", "actor_greedy", "ref_inf", "rew_inf", "critic_inf", "actor_train", "critic_train"]
    print(f"\nReMax vs PPO in remesh: SmolLM2-135M, {'bf16 autocast' if gpu else 'fp32'} on {device}, "
          f"{prompts} prompts x {args.max_new_tokens} new tokens "
          f"({'fixed length' if fixed else 'natural EOS'}), one optimizer step per rollout, "
          f"median of {len(used)} interleaved iterations (after 1 warm-up)")
    print_table(["algo", "models", "peak GiB", "iter s"] + [f"{n} s" for n in mfc_names] + ["resp len"],
                [[a, "+".join(details[a]["params"]), peak[a] / GIB, details[a]["iter_s_median"]]
                 + [details[a]["mfc_s_median"].get(n, "-") for n in mfc_names]
                 + [f"{details[a]['response_len_mean']:.1f}"] for a in ALGOS])
    print(f"ReMax / PPO: peak memory {mem_ratio:.3f} ({(1 - mem_ratio) * 100:.0f}% less), "
          f"time per iteration {time_ratio:.3f} (paired {details['paired_time_ratio']:.3f}; "
          f"ReMax's speed-up over PPO {1 / time_ratio:.2f}x)")
    print(f"memory: {details['memory_definition']}")

    headline = {"remax_peak_mem_ratio": round(mem_ratio, 3), "remax_iter_time_ratio": round(time_ratio, 3)}
    finish("remax_vs_ppo", headline, details, device=device, quick=args.quick, reps=reps, warmup=1,
           prompts_per_iter=prompts, max_new_tokens=args.max_new_tokens, fixed_length=fixed,
           dtype="bf16-autocast" if gpu else "fp32", threads=args.threads or torch.get_num_threads(),
           wall_s=round(time.perf_counter() - t_start, 1))


if __name__ == "__main__":
    main()
