"""remesh vs TRL 1.16: time per iteration of the same GRPO and the same RLOO workload.

One iteration = generate a group of responses per prompt, score them, one optimizer step.

The same in both systems:
- model: SmolLM2-135M-Instruct (`remesh.checkpoint.resolve_model_path("default")`, the HF folder
  both load; TRL gets an `AutoModelForCausalLM` (sdpa attention) built from it), fp32 on CPU;
  `--device cuda`: fp32 weights with bf16 autocast in both (remesh `mixed_precision=auto`, TRL
  `bf16=True`).
- prompts: data/demo/prompts.jsonl, rendered with the tokenizer's chat template (one user turn,
  generation prompt) in both; the token ids are checked to be identical. Step i of both systems
  uses the same prompts: TRL's dataset is remesh's prompt order for its iterations 0, 1, ...,
  with `shuffle_dataset=False`.
- batch: `--prompts` (4) prompts x `--group` (4) samples per step; temperature 1, top-p 1, top-k 0.
- responses: exactly `--max-new-tokens` (32) tokens (default): TRL with
  `generation_kwargs={"min_new_tokens": N}` (EOS cannot be sampled before N tokens), remesh
  through `bench.common.rl_trainer(fixed_length=True)` (its sampler ignores stop tokens; remesh
  has no config key for it). `--natural-eos` lets both stop at EOS; the measured mean response
  lengths are reported either way.
- one optimizer step per rollout: TRL `num_iterations=1`, `steps_per_generation=1`,
  `gradient_accumulation_steps=1`, `per_device_train_batch_size = prompts x group`; remesh
  `algo.ppo_epochs=1, mini_batches=1` and a micro-batch budget that holds the whole batch.
- KL: off in both (`--beta 0`, TRL `beta=0.0`, remesh `kl.coef=0`). With `--beta B > 0`: GRPO
  puts B x k3 KL in the loss (both), RLOO puts B x summed k1 KL in the reward (both).
- reward: remesh's built-in `vader_sentiment` (VADER compound of the decoded response); TRL calls
  the very same Python function through a thin wrapper.
- AdamW, lr 1e-6 constant, betas (0.9, 0.95), no weight decay, grad-norm clip 1.0; no gradient
  checkpointing (TRL's default is on: turned off, remesh has none). Each system keeps its own
  AdamW implementation (TRL: transformers' default `adamw_torch_fused`; remesh: torch's foreach).

Not the same, by design of the systems (reported, not equalised): with beta=0 neither loads a
reference model; TRL's RLOO runs a no-grad forward of the policy for the old log-probs (remesh
takes them from the sampler). TRL generates with `model.generate` on left-padded prompts repeated
`group` times; remesh's engine prefills each prompt once per group. TRL's training forward runs
prompt + completion for every sample; remesh packs each group's completions after one copy of
their prompt (`trainer.share_prompts`, remesh/rl/batch.py). remesh's GRPO/RLOO losses are token-mean PPO-clip;
TRL GRPO `loss_type="dapo"` (token mean), TRL RLOO a sequence-level ratio (same cost).

Timing: one step at a time, alternating remesh and TRL; the two never run at the same time.
TRL runs in this process (`Trainer.train()` in a thread driven by `bench.common.LoopStepper`
through a `TrainerCallback.on_step_end`), remesh in a spawned worker process
(`bench.common.WorkerProcess`), each with its own heap, as a user runs either: when both ran in
one process, each system's step took over memory the other had just freed and page-faulted it
back in, which on this VM slowed remesh's generation by ~1.5 s per step. A TRL step is timed
from the moment it is released until its next `on_step_end` (data loading, generation, scoring,
loss, backward, optimizer step and the trainer's per-step bookkeeping); a remesh step is one
`RLTrainer.iterate()` call, timed here around the request to the worker (its round trip, a
millisecond, included). Median over the timed steps after one warm-up step each; rounds with
other processes busy on the machine are left out when enough clean ones exist (bench/common.py).
Per-phase times: remesh's `time/<mfc>` metrics; TRL's `model.generate` and
`_generate_and_score_completions` (rollout = generation + extra forwards + reward + advantages),
the rest of the step being training.

Headline: grpo_speedup_vs_trl and rloo_speedup_vs_trl = TRL time / remesh time per iteration.

    python bench/vs_trl.py [--quick] [--device cuda] [--algos grpo,rloo] [--prompts 4] [--group 4]
                           [--max-new-tokens 32] [--reps 4] [--beta 0] [--natural-eos] [--profile]
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (LoopStepper, WorkerProcess, finish, interleaved_times, parse_args,  # noqa: E402
                          print_table, rl_trainer)
from remesh.checkpoint import resolve_model_path  # noqa: E402
from remesh.config import load_config  # noqa: E402
from remesh.reward import vader_sentiment  # noqa: E402
from remesh.rl.config import RLConfig  # noqa: E402

PROMPTS = Path(__file__).resolve().parent.parent / "data" / "demo" / "prompts.jsonl"
LR = 1e-6
MAX_EXTRA = 2  # extra rounds at most when other processes disturbed some (keeps a full run near 10 min)


# ---------------------------------------------------------------- remesh

def remesh_config(algo: str, device: str, prompts: int, group: int, max_new_tokens: int, beta: float,
                  out_dir: str) -> RLConfig:
    gpu = torch.device(device).type == "cuda"
    kl = (["kl.estimator=k3", "kl.mode=loss"] if algo == "grpo" else ["kl.estimator=k1", "kl.mode=reward"])
    return load_config(RLConfig, None, [
        f"algo.name={algo}", "algo.ppo_epochs=1", "algo.mini_batches=1", "algo.loss_agg=token_mean",
        "actor.path=default", "actor.dtype=float32",
        f"actor_optim.lr={LR}", "actor_optim.schedule=constant", "actor_optim.warmup_steps=0",
        "actor_optim.weight_decay=0.0", "actor_optim.grad_clip=1.0",
        f"kl.coef={beta}", *kl,
        "reward.terms=[{name: vader_sentiment}]",
        "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.top_k=0", f"rollout.n_samples={group}",
        f"rollout.max_new_tokens={max_new_tokens}", "rollout.max_batch=1024",
        f"data.train={PROMPTS}", "data.max_prompt_len=128",
        f"trainer.prompts_per_iter={prompts}", "trainer.iterations=1000", "trainer.micro_batch_tokens=65536",
        f"trainer.device={device}", "trainer.mixed_precision=" + ("auto" if gpu else "'off'"),
        f"trainer.output_dir={out_dir}", "trainer.progress=false", "trainer.tensorboard=false",
        "trainer.plot=false", "trainer.show_samples=0", "trainer.seed=0",
    ])


# ---------------------------------------------------------------- TRL

class TRLProbe:
    """Per-step phase times and response lengths of a TRL trainer (wrapped methods)."""

    def __init__(self):
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def timed(self, name: str, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.current[name] += time.perf_counter() - t0
        return wrapper

    def end_step(self) -> None:
        self.steps.append(dict(self.current))
        self.current = defaultdict(float)


def make_trl_reward(probe: TRLProbe):
    def vader_reward(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        """remesh.reward.vader_sentiment on each decoded completion (TRL's calling convention)."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        if completion_ids is not None:
            probe.current["response_tokens"] += sum(len(ids) for ids in completion_ids)
            probe.current["responses"] += len(completion_ids)
        return [vader_sentiment("", t, None, {}) for t in texts]
    return vader_reward


def trl_trainer(algo: str, model_path: Path, rows: list[str], device: str, prompts: int, group: int,
                max_new_tokens: int, beta: float, max_steps: int, out_dir: str, fixed_length: bool,
                probe: TRLProbe):
    """(TRL trainer, step-end callback) for `rows` (prompt texts, in step order)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    gpu = torch.device(device).type == "cuda"
    Config, Trainer = (GRPOConfig, GRPOTrainer) if algo == "grpo" else (RLOOConfig, RLOOTrainer)
    common = dict(
        output_dir=out_dir, report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no",
        disable_tqdm=True, use_cpu=not gpu, bf16=gpu, fp16=False, gradient_checkpointing=False,
        seed=0, dataloader_num_workers=0, dataloader_pin_memory=gpu, max_steps=max_steps,
        per_device_train_batch_size=prompts * group, gradient_accumulation_steps=1, steps_per_generation=1,
        num_iterations=1, num_generations=group, max_completion_length=max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, beta=beta, shuffle_dataset=False,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
        generation_kwargs={"min_new_tokens": max_new_tokens} if fixed_length else None,
        log_completions=False,
    )
    if algo == "grpo":
        common.update(loss_type="dapo", scale_rewards="group")
    args = Config(**common)
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in rows]})

    class StepEnd(TrainerCallback):
        hook = None

        def on_step_end(self, args, state, control, **kwargs):
            probe.end_step()
            if self.hook is not None and self.hook():
                control.should_training_stop = True

    cb = StepEnd()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, reward_funcs=make_trl_reward(probe), args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[cb])
    for c in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(c)
    # phase probes: generation, and the whole rollout (generation, extra forwards, rewards, advantages)
    trainer._generate_and_score_completions = probe.timed("rollout", trainer._generate_and_score_completions)
    trainer.model.generate = probe.timed("generate", trainer.model.generate)
    return trainer, cb


def trl_prompt_ids(tokenizer, text: str) -> list[int]:
    """How TRL renders a conversational prompt (GRPOTrainer._tokenize_prompts)."""
    out = tokenizer.apply_chat_template(conversation=[[{"role": "user", "content": text}]], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)
    return list(out["input_ids"][0])


# ---------------------------------------------------------------- profiling

def profile_remesh(trainer, label: str) -> dict[str, Any]:
    """cProfile of one remesh iteration: the top functions by cumulative time."""
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    m = trainer.iterate()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(30)
    print(f"\n--- cProfile: remesh {label}, one iteration ({m['time/iteration']:.2f} s) ---")
    print("\n".join(s.getvalue().splitlines()[:60]))
    return {k: v for k, v in m.items() if k.startswith("time/")}


# ---------------------------------------------------------------- main

class RemeshSide:
    """remesh's trainer, built in its own process (`WorkerProcess`): one iteration per call."""

    def __init__(self, algo: str, device: str, prompts: int, group: int, max_new_tokens: int, beta: float,
                 fixed: bool, max_steps: int):
        torch.manual_seed(0)
        self._tmp = tempfile.TemporaryDirectory()
        self.trainer = rl_trainer(remesh_config(algo, device, prompts, group, max_new_tokens, beta,
                                                f"{self._tmp.name}/remesh"), fixed)
        self.gpu = torch.device(device).type == "cuda"
        self.info = {"batches": [[(p.prompt, p.prompt_ids) for p in self.trainer.prompt_batch(i)]
                                 for i in range(max_steps)]}

    def iterate(self) -> dict[str, float]:
        m = self.trainer.iterate()
        if self.gpu:
            torch.cuda.synchronize()
        return m

    def profile(self, label: str) -> dict[str, Any]:
        return profile_remesh(self.trainer, label)


def run_algo(algo: str, a, device: str, reps: int, model_path: Path) -> dict[str, Any]:
    fixed = not a.natural_eos
    max_steps = 1 + reps + MAX_EXTRA + 2  # warm-up, timed rounds, extra rounds for disturbed ones, slack
    ours = WorkerProcess(RemeshSide, algo, device, a.prompts, a.group, a.max_new_tokens, a.beta, fixed, max_steps,
                         name=f"remesh-{algo}", threads=torch.get_num_threads())
    try:
        batches = ours.info["batches"]  # [(prompt text, prompt ids)] per step
        return _run_against_trl(algo, a, device, reps, model_path, ours, batches, fixed, max_steps)
    finally:
        ours.stop()
        gc.collect()  # the TRL trainer of this algorithm, before the next one loads


def _run_against_trl(algo: str, a, device: str, reps: int, model_path: Path, ours: WorkerProcess,
                     batches: list[list[tuple[str, list[int]]]], fixed: bool, max_steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        rows = [text for batch in batches for text, _ in batch]
        probe = TRLProbe()
        theirs, cb = trl_trainer(algo, model_path, rows, device, a.prompts, a.group, a.max_new_tokens, a.beta,
                                 max_steps, f"{tmp}/trl", fixed, probe)
        same_prompts = all(trl_prompt_ids(theirs.processing_class, text) == list(ids)
                           for batch in batches for text, ids in batch)
        if not same_prompts:
            print(f"warning: {algo}: TRL's chat-template rendering differs from remesh's for some prompt",
                  file=sys.stderr)

        def run_loop(hook):
            cb.hook = hook
            theirs.train()

        stepper = LoopStepper(run_loop)
        ours_metrics: list[dict] = []

        def ours_step():
            ours_metrics.append(ours.call("iterate"))

        try:
            t = interleaved_times({"remesh": ours_step, "trl": stepper.step}, reps=reps, warmup=1, device=device,
                                  max_extra=MAX_EXTRA, own_pids=[ours.proc.pid])
        finally:
            stepper.close()
        prof = ours.call("profile", algo) if a.profile else None

        used = t.used()
        ms = [ours_metrics[1 + i] for i in used]
        ps = [probe.steps[1 + i] for i in used]  # probe.steps[k]: TRL step k (0 = warm-up)
        timed_ps = probe.steps[1:1 + t.rounds]
        mfc = sorted(k for k in ms[0] if k.startswith("time/") and k != "time/iteration")
        trl_step = [t.times["trl"][i] for i in used]
        d = {
            "remesh_iter_s": t.median_s("remesh"), "trl_iter_s": t.median_s("trl"),
            "speedup": t.median_s("trl") / t.median_s("remesh"), "paired_speedup": t.paired_ratio("remesh", "trl"),
            "remesh_spread": t.spread("remesh"), "trl_spread": t.spread("trl"),
            "remesh_phase_s": {k[5:]: statistics.median(m[k] for m in ms) for k in mfc},
            "trl_phase_s": {
                "generate": statistics.median(p.get("generate", 0.0) for p in ps),
                "rollout": statistics.median(p.get("rollout", 0.0) for p in ps),
                "train_and_rest": statistics.median(s - p.get("rollout", 0.0) for s, p in zip(trl_step, ps)),
            },
            "remesh_response_len_mean": statistics.mean(m["response/len_mean"] for m in ours_metrics[1:]),
            "trl_response_len_mean": (sum(p.get("response_tokens", 0) for p in timed_ps)
                                      / max(1, sum(p.get("responses", 0) for p in timed_ps))),
            "remesh_gen_tokens_per_s": statistics.median(m["perf/gen_tokens_per_s"] for m in ms),
            "remesh_reward_mean": statistics.mean(m["reward/mean"] for m in ours_metrics[1:]),
            "prompt_ids_identical": same_prompts,
            "prompt_tokens_per_step": [sum(len(ids) for _, ids in b) for b in batches[:1 + t.rounds]],
            "trl_steps_run": stepper.steps,
            **t.summary(),
        }
        if prof is not None:
            d["profiled_iteration_s"] = prof
        return d


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--algos", default="grpo,rloo"),
        p.add_argument("--prompts", type=int, default=0, help="prompts per step (default 4; 32 on CUDA)"),
        p.add_argument("--group", type=int, default=4, help="samples per prompt"),
        p.add_argument("--max-new-tokens", type=int, default=32),
        p.add_argument("--reps", type=int, default=0, help="timed steps of each (default 4, quick 2)"),
        p.add_argument("--beta", type=float, default=0.0, help="KL coefficient in both (default 0: no KL)"),
        p.add_argument("--natural-eos", action="store_true", help="stop responses at EOS (default: fixed length)"),
        p.add_argument("--profile", action="store_true", help="cProfile one extra remesh iteration per algorithm")))
    device = args.device
    gpu = torch.device(device).type == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    args.prompts = args.prompts or ((32 if gpu else 4) // (2 if args.quick else 1))
    reps = args.reps or (2 if args.quick else 4)
    import trl

    model_path = resolve_model_path("default")
    t_start = time.perf_counter()
    details: dict[str, Any] = {"trl": trl.__version__, "model_path": str(model_path)}
    rows = []
    for algo in args.algos.split(","):
        d = run_algo(algo, args, device, reps, model_path)
        details[algo] = d
        rp, tp = d["remesh_phase_s"], d["trl_phase_s"]
        rows.append([algo, d["remesh_iter_s"], d["trl_iter_s"], f"{d['speedup']:.2f}x", f"{d['paired_speedup']:.2f}x",
                     rp.get("actor_gen", float("nan")), tp["generate"],
                     rp.get("ref_inf", 0.0) + rp.get("rew_inf", 0.0), tp["rollout"] - tp["generate"],
                     rp.get("actor_train", float("nan")), tp["train_and_rest"],
                     f"{d['remesh_response_len_mean']:.1f}/{d['trl_response_len_mean']:.1f}",
                     f"{len(d['used_rounds'])}/{d['rounds']}"])
        print(f"[{time.perf_counter() - t_start:.0f}s] {algo}: remesh {d['remesh_iter_s']:.2f} s, "
              f"TRL {d['trl_iter_s']:.2f} s per step, {d['speedup']:.2f}x", file=sys.stderr, flush=True)

    print(f"\nremesh vs TRL {trl.__version__}: SmolLM2-135M, {'bf16 autocast' if gpu else 'fp32'} on {device}, "
          f"{args.prompts} prompts x {args.group} samples x {args.max_new_tokens} new tokens "
          f"({'fixed length' if not args.natural_eos else 'natural EOS'}), beta={args.beta}, one optimizer step per "
          f"rollout; median of {reps}+ interleaved steps after 1 warm-up (seconds)")
    print_table(["algo", "remesh s", "TRL s", "speedup", "paired", "remesh gen", "TRL gen", "remesh ref+rew",
                 "TRL score+fwd", "remesh train", "TRL train+rest", "resp len r/t", "reps used"], rows)
    print("speedup: TRL / remesh median step time; paired: median of per-round ratios; TRL score+fwd: rollout "
          "minus generate (old/ref log-prob forwards, reward, advantages); TRL train+rest: step minus rollout")
    headline = {f"{algo}_speedup_vs_trl": round(details[algo]["speedup"], 3) for algo in args.algos.split(",")}
    finish("vs_trl", headline, details, device=device, quick=args.quick, reps=reps, warmup=1,
           prompts_per_step=args.prompts, group=args.group, max_new_tokens=args.max_new_tokens, beta=args.beta,
           fixed_length=not args.natural_eos, dtype="bf16-autocast" if gpu else "fp32", threads=torch.get_num_threads(),
           wall_s=round(time.perf_counter() - t_start, 1))


if __name__ == "__main__":
    main()
