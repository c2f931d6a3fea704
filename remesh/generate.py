"""`remesh generate`: sample responses for a prompts file with the rollout engine, write JSONL,
and print what the speculative decoding did (tokens/s, acceptance by position, strategies)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class GenerateArgs:
    model: str  # HF folder, .gguf file or "default"
    prompts: str  # JSONL with a "prompt" field per row (chat-templated when the tokenizer has one)
    out: str = "generations.jsonl"
    spec: str = "auto"
    draft_model: str | None = None  # HF folder, or self:N
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    max_new_tokens: int = 64
    n: int = 1
    seed: int = 0
    max_batch: int = 64
    max_prompt_len: int = 512
    dtype: str = "float32"
    device: str = "auto"


def check_args(a: GenerateArgs) -> None:
    """Everything that can be checked before the model loads and sampling starts: a mistake found
    after it would lose the samples (ValueError naming the option)."""
    from remesh.config import FieldError, check_output_file
    from remesh.rollout.adaptive import check_speculation
    from remesh.rollout.drafters import self_draft_layers
    from remesh.rollout.sampling import SamplingParams

    try:
        SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, greedy=a.greedy,
                       max_new_tokens=a.max_new_tokens, n=a.n)
    except FieldError as e:
        raise ValueError(f"--{e.field.replace('_', '-')}: {e}") from None
    if a.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {a.max_batch}")
    if a.max_prompt_len < 1:
        raise ValueError(f"--max-prompt-len must be >= 1, got {a.max_prompt_len}")
    if wrong := check_speculation(a.spec, a.draft_model is not None):
        raise ValueError(f"--{wrong[0].replace('_', '-')}: {wrong[1]}")
    if a.draft_model is not None:
        try:
            layers = self_draft_layers(a.draft_model)
        except ValueError as e:
            raise ValueError(f"--draft-model: {e}") from None
        if layers is None and a.draft_model != "default" and not Path(a.draft_model).exists():
            raise ValueError(f"--draft-model: {a.draft_model} does not exist")
    out, prompts = Path(a.out), Path(a.prompts)
    if out.exists() and prompts.exists() and out.resolve() == prompts.resolve():
        raise ValueError(f"--out {a.out}: is the prompts file; the generations would overwrite it")
    check_output_file(out, "--out")


def run_generate(a: GenerateArgs) -> dict:
    from remesh.checkpoint import load_hf, load_tokenizer, resolve_model_path
    from remesh.data.datasets import load_prompt_dataset
    from remesh.rollout import RolloutEngine, SamplingParams
    from remesh.rollout.drafters import load_draft_model
    from remesh.rollout.sampling import stop_token_ids
    from remesh.train.trainer import pick_device

    check_args(a)
    device = pick_device(a.device, "--device")
    folder = resolve_model_path(a.model, "model")
    tokenizer = load_tokenizer(folder)
    # the prompts (a bad row, a missing file) before the weights load
    prompts, _ = load_prompt_dataset(a.prompts, tokenizer, max_prompt_len=a.max_prompt_len,
                                     limit_option="--max-prompt-len")
    model = load_hf(folder, head="lm", dtype=getattr(torch, a.dtype), device=device).requires_grad_(False)
    draft = load_draft_model(a.draft_model, model, getattr(torch, a.dtype), "--draft-model")
    stop = stop_token_ids(tokenizer.eos_token_id, model.args.extra.get("eos_token_id"))
    params = SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, greedy=a.greedy,
                            max_new_tokens=a.max_new_tokens, n=a.n, seed=a.seed, stop_token_ids=stop)
    engine = RolloutEngine(model, spec=a.spec, draft_model=draft, max_batch=a.max_batch)
    rollouts = engine.generate([p.prompt_ids for p in prompts], params, progress=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # written whole, then renamed over the file (a symlink's target): a failed write keeps the old one
    target = out.resolve()
    partial = target.with_name(target.name + ".partial")
    try:
        with open(partial, "w") as f:
            for r in rollouts:
                f.write(json.dumps({"prompt_index": r.prompt_index, "sample_index": r.sample_index,
                                    "prompt": prompts[r.prompt_index].prompt, "response": tokenizer.decode(
                                        r.response_ids, skip_special_tokens=True),
                                    "response_ids": r.response_ids, "logprobs": r.logprobs,
                                    "finish_reason": r.finish_reason}) + "\n")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    st = engine.stats
    summary = st.summary()
    print(f"remesh: {st.sequences} sequences, {st.tokens} tokens in {st.seconds:.2f} s "
          f"({st.tokens_per_s:.1f} tokens/s, {summary['tokens_per_step']} tokens per decode step, "
          f"{summary['tokens_per_seq_step']:.2f} per sequence: 1 without speculation) -> {out}")
    for name, rates in summary["acceptance_by_position"].items():
        print(f"remesh: acceptance by position, {name}: " + " ".join(f"{x:.2f}" for x in rates))
    for name, rates in summary["trial_acceptance_by_position"].items():  # auto's unverified drafts
        print(f"remesh: acceptance by position in free trials, {name}: " + " ".join(f"{x:.2f}" for x in rates))
    if st.policy_seconds or st.policy_hidden_seconds:
        print(f"remesh: choosing strategies and free trials took {st.policy_seconds:.3f} s "
              f"({st.policy_seconds / st.seconds:.1%} of the call)"
              + (f", and {st.policy_hidden_seconds:.3f} s more hidden behind the device's work"
                 if st.policy_hidden_seconds else ""))
    print("remesh: strategies over time:")
    for line in st.timeline():
        print(f"  {line}")
    return summary
