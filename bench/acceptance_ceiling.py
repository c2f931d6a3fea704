"""How often could any drafter that needs no training be accepted on the rollout benchmark's
workload? An upper bound, measured on the target's own distributions.

Plain decoding samples B responses (as bench/rollout.py: demo prompts, temperature, natural
EOS); a teacher-forced forward then gives the target distribution p at every response
position. A point-mass draft token x is accepted with probability p(x), so:
- no point-mass drafter (n-gram, history, ...) beats the target's own argmax: E[max p];
- a root of W point-mass candidates is accepted at most with the top-W mass;
- an oracle chain of the argmax tokens, depth D, adds at most sum_j prod_{i<j} max p at the
  next positions (along the sampled path: an approximation) tokens per step;
- a draft model q (here the policy's first N layers, `--spec model:K --draft-model self:N`)
  has its sampled token accepted with probability sum_x min(p(x), q(x)).
- `--bf16-draft`: the same for a bf16 copy of the whole (fp32) policy, a draft nearly as good
  as the target; what it would cost is its plain decode step at batch 1 against the policy's
  (the engine's own steps, median, the two interleaved), as a draft step is such a step.
Compare with the acceptance the drafters reach in bench/rollout.py.

    python bench/acceptance_ceiling.py [--model default|PATH] [--batch 16] [--max-new-tokens 128]
                                       [--temperature 1.0] [--length-mix] [--self-layers 10,20,25,28]
                                       [--bf16-draft]
"""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import demo_prompts, finish, parse_args, print_table  # noqa: E402
from remesh.checkpoint import load_hf, load_tokenizer, resolve_model_path  # noqa: E402
from remesh.model import AttnContext  # noqa: E402
from remesh.rollout import RolloutEngine, SamplingParams  # noqa: E402
from remesh.rollout.drafters import first_layers  # noqa: E402
from remesh.rollout.sampling import stop_token_ids, target_logprobs  # noqa: E402

CHAIN_DEPTH = 8


def response_probs(model: torch.nn.Module, prompt: list[int], response: list[int], params: SamplingParams) -> torch.Tensor:
    """[len(response), V]: the sampling distribution at each response position, teacher-forced."""
    ids = torch.tensor(prompt + response)
    logits = model.logits(model(ids, torch.arange(len(ids)), AttnContext.packed([len(ids)])))
    return target_logprobs(logits[len(prompt) - 1:-1], params).exp()


def oracle_chain(max_p: list[float], depth: int) -> list[float]:
    """Per position t: sum over j = 1..depth of prod_{i < j} max_p[t + i] (the chain stops at the
    response's end)."""
    out = []
    for t in range(len(max_p)):
        reach, total = 1.0, 0.0
        for m in max_p[t:t + depth]:
            reach *= m
            total += reach
        out.append(total)
    return out


def step_ratio(draft: torch.nn.Module, model: torch.nn.Module, prompt: list[int], params: SamplingParams,
               rounds: int = 4) -> float:
    """Median plain decode step of `draft` over `model`'s, one prompt, each in its own engine
    (its kernel layouts tuned in a first, untimed call), calls interleaved."""
    engines = [RolloutEngine(m, max_batch=1, spec="off") for m in (draft, model)]
    steps: list[list[float]] = [[], []]
    for r in range(rounds + 1):
        for i, e in enumerate(engines):
            e.generate([prompt], params)
            if r:
                steps[i] += [s.seconds for s in e.stats.steps]
    return statistics.median(steps[0]) / statistics.median(steps[1])


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--model", default="default"),
        p.add_argument("--batch", type=int, default=16),
        p.add_argument("--max-new-tokens", type=int, default=128),
        p.add_argument("--temperature", type=float, default=1.0),
        p.add_argument("--length-mix", action="store_true"),
        p.add_argument("--self-layers", default="10,20,25,28"),
        p.add_argument("--bf16-draft", action="store_true")))
    folder = resolve_model_path(args.model)
    tok = load_tokenizer(folder)
    model = load_hf(folder, head="lm").requires_grad_(False).eval()
    stop = stop_token_ids(tok.eos_token_id, model.args.extra.get("eos_token_id"))
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=1,
                            stop_token_ids=stop)
    rollouts = RolloutEngine(model, max_batch=args.batch, spec="off").generate(
        demo_prompts(tok, length_mix=args.length_mix)[:args.batch], params)
    self_layers = [int(x) for x in args.self_layers.split(",") if x]
    drafts = {f"self:{n}": first_layers(model, n) for n in self_layers}
    if args.bf16_draft:
        drafts["bf16"] = copy.deepcopy(model).to(torch.bfloat16)
    max_p, top2, top4, chain = [], [], [], []
    sampled_accept: dict[str, list[float]] = {n: [] for n in drafts}
    argmax_accept: dict[str, list[float]] = {n: [] for n in drafts}
    with torch.inference_mode():
        for r in rollouts:
            p = response_probs(model, r.prompt_ids, r.response_ids, params)
            top = p.topk(4, dim=-1).values
            max_p += top[:, 0].tolist()
            top2 += top[:, :2].sum(-1).tolist()
            top4 += top.sum(-1).tolist()
            chain += oracle_chain(top[:, 0].tolist(), CHAIN_DEPTH)
            for n, d in drafts.items():
                q = response_probs(d, r.prompt_ids, r.response_ids, params).float()
                sampled_accept[n] += torch.minimum(p, q).sum(-1).tolist()
                argmax_accept[n] += p.gather(1, q.argmax(-1, keepdim=True)).squeeze(1).tolist()
    mean = statistics.mean
    headline = {"argmax_acceptance": round(mean(max_p), 3), "top2_acceptance": round(mean(top2), 3),
                "top4_acceptance": round(mean(top4), 3),
                f"oracle_chain{CHAIN_DEPTH}_tokens_per_step": round(1 + mean(chain), 3)}
    rows = [["target argmax (best point mass)", mean(max_p)], ["target top-2 tree root", mean(top2)],
            ["target top-4 tree root", mean(top4)]]
    rows += [[f"{n} sampled (sum min(p, q))", mean(sampled_accept[n])] for n in drafts]
    rows += [[f"{n} argmax", mean(argmax_accept[n])] for n in drafts]
    print_table(["first draft token", "acceptance"], rows)
    print(f"an oracle argmax chain of depth {CHAIN_DEPTH}: at most {1 + mean(chain):.2f} tokens per step "
          f"(plain decoding: 1), over {len(max_p)} positions", flush=True)
    details = {"positions": len(max_p),
               "self_draft_sampled_acceptance": {n: round(mean(v), 3) for n, v in sampled_accept.items()},
               "self_draft_argmax_acceptance": {n: round(mean(v), 3) for n, v in argmax_accept.items()},
               "response_len_median": statistics.median(len(r.response_ids) for r in rollouts)}
    if args.bf16_draft:
        longest = max(rollouts, key=lambda r: len(r.response_ids))
        details["bf16_step_vs_fp32_step"] = step_ratio(drafts["bf16"], model, longest.prompt_ids, params)
        print(f"a bf16 copy's decode step at batch 1 takes {details['bf16_step_vs_fp32_step']:.2f} of the fp32 "
              "policy's", flush=True)
    name = ("acceptance_ceiling" + ("_lengthmix" if args.length_mix else "")
            + ("" if args.temperature == 1.0 else f"_T{args.temperature:g}")
            + ("" if args.model == "default" else f"_{Path(args.model).name}")
            + ("_bf16draft" if args.bf16_draft else ""))
    finish(name, headline, details, model=args.model, batch=args.batch, max_new_tokens=args.max_new_tokens,
           temperature=args.temperature, length_mix=args.length_mix)


if __name__ == "__main__":
    main()
