"""Training-step throughput of remesh's model vs transformers, forward + backward.

remesh runs a *packed* batch (sequences concatenated, no padding, `AttnContext.packed`) and its
chunked `token_logprobs` loss; transformers runs the same sequences the usual way: a right-padded
batch through `AutoModelForCausalLM` (attn_implementation="sdpa") with an attention_mask and
labels = -100 on padding, i.e. its standard causal-LM loss. Both losses are the mean negative
log-likelihood of every next token inside each sequence, and are checked to agree (identical
weights) before timing.

Models: a ~10M-parameter Llama config (random weights, written with save_hf and read back by
transformers) and SmolLM2-135M (the cached default model, read by both).
Batches: lengths uniform in 32..512 ("var") and all 256 ("equal").
Throughput counts real (unpadded) tokens for both systems, so the ratio is a ratio of step times.

Headline (135M model): packed_speedup_vs_transformers (var lengths) and
equal_len_ratio_vs_transformers (equal lengths), remesh tokens/s over transformers tokens/s.

    python bench/model.py [--quick] [--device cuda] [--models 10m,135m] [--profile]
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import finish, interleaved_times, parse_args, print_table  # noqa: E402
from remesh.checkpoint.default import resolve_model_path  # noqa: E402
from remesh.checkpoint.hf import load_hf, save_hf  # noqa: E402
from remesh.data.packing import pack_sequences, shifted_targets, target_loss_mask  # noqa: E402
from remesh.model import AttnContext, ModelArgs, Transformer  # noqa: E402

MIN_LEN, MAX_LEN, EQUAL_LEN = 32, 512, 256

SMALL_ARGS = dict(vocab_size=8192, dim=256, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=768, max_seq_len=1024,
                  norm_eps=1e-5, rope_theta=10000.0, extra={"model_type": "llama"})


def load_pair(name: str, device: str, tmp: Path):
    """(remesh model, transformers model) with identical fp32 weights."""
    from transformers import AutoModelForCausalLM

    if name == "10m":
        torch.manual_seed(0)
        ours = Transformer(ModelArgs(**SMALL_ARGS))
        with torch.no_grad():  # non-trivial norm weights, so that the parity check exercises them
            for pname, p in ours.named_parameters():
                if pname.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
        path = save_hf(ours, tmp / "small")
    else:
        path = resolve_model_path("default")
        ours = load_hf(path, dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sdpa", dtype=torch.float32)
    assert theirs.config._attn_implementation == "sdpa", theirs.config._attn_implementation
    ours, theirs = ours.to(device).train(), theirs.to(device).train()
    return ours, theirs


def make_batch(lengths: list[int], vocab: int, device: str, seed: int):
    """The same sequences in remesh's packed form and transformers' right-padded form."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    # remesh: packed tokens, per-sequence positions, next-token targets where one exists
    packed = pack_sequences(seqs)
    targets, _ = shifted_targets(packed)
    idx = target_loss_mask(packed).nonzero().squeeze(1)
    ours = dict(tokens=packed.tokens.to(device), positions=packed.positions.to(device), seqlens=list(lengths),
                idx=idx.to(device), targets=targets[idx].to(device))
    # transformers: right padding, attention_mask, labels -100 on padding (it shifts them itself)
    b, L = len(seqs), max(lengths)
    ids = torch.full((b, L), 2, dtype=torch.long)
    mask = torch.zeros((b, L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    theirs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
    return ours, theirs


def autocast(device: str):
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def ours_loss(model: Transformer, b: dict, device: str) -> torch.Tensor:
    with autocast(device):
        ctx = AttnContext.packed(b["seqlens"], device)
        h = model(b["tokens"], b["positions"], ctx)
        logp = model.token_logprobs(h[b["idx"]], b["targets"])
        return -logp.mean()


def theirs_loss(model, b: dict, device: str) -> torch.Tensor:
    with autocast(device):
        return model(**b, use_cache=False).loss


def step_fns(ours, theirs, bo: dict, bt: dict, device: str):
    def ours_step():
        ours.zero_grad(set_to_none=True)
        ours_loss(ours, bo, device).backward()

    def theirs_step():
        theirs.zero_grad(set_to_none=True)
        theirs_loss(theirs, bt, device).backward()

    return {"remesh": ours_step, "transformers": theirs_step}


def check_parity(ours, theirs, bo: dict, bt: dict, device: str) -> dict:
    """Losses and one gradient of both systems on the same batch and weights."""
    fns = step_fns(ours, theirs, bo, bt, device)
    with torch.no_grad():
        lo, lt = ours_loss(ours, bo, device).item(), theirs_loss(theirs, bt, device).item()
    fns["remesh"]()
    fns["transformers"]()
    go = ours.layers["0"].attention.wq.weight.grad
    gt = theirs.model.layers[0].self_attn.q_proj.weight.grad
    grad_rel = ((go - gt).norm() / gt.norm()).item()
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)
    tol = 1e-4 if torch.device(device).type == "cpu" else 2e-2  # bf16 autocast on CUDA
    ok = abs(lo - lt) <= tol * max(1.0, abs(lt))
    return {"loss_remesh": lo, "loss_transformers": lt, "abs_diff": abs(lo - lt), "wq0_grad_rel_diff": grad_rel,
            "tolerance": tol, "ok": ok}


def profile_step(fn, label: str, device: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
    key = "self_cuda_time_total" if torch.device(device).type == "cuda" else "self_cpu_time_total"
    print(f"\n--- profile: {label} ---")
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=48))


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--models", default="10m,135m", help="comma-separated: 10m, 135m"),
        p.add_argument("--reps", type=int, default=0, help="timed repetitions (default 7, quick 3)"),
        p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step of each")))
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    reps = args.reps or (3 if args.quick else 7)
    warmup = 1 if args.quick else 2
    gpu = torch.device(device).type == "cuda"
    # sequences per batch: each CPU step takes seconds at these sizes; a GPU takes far more
    n_seqs = {"10m": 16, "135m": 8}
    if args.quick:
        n_seqs = {k: v // 2 for k, v in n_seqs.items()}
    if gpu:
        n_seqs = {k: v * 8 for k, v in n_seqs.items()}

    rows, details = [], {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            ours, theirs = load_pair(name, device, Path(tmp))
            vocab = ours.args.vocab_size
            g = torch.Generator().manual_seed(1234)
            var_lens = torch.randint(MIN_LEN, MAX_LEN + 1, (n_seqs[name],), generator=g).tolist()
            batches = {"var": var_lens, "equal": [EQUAL_LEN] * n_seqs[name]}
            det = {"params": sum(p.numel() for p in ours.parameters()), "sequences": n_seqs[name]}
            for kind, lens in batches.items():
                bo, bt = make_batch(lens, vocab, device, seed=len(lens) * 7 + len(kind))
                if kind == "var":
                    torch.manual_seed(0)
                    det["parity"] = check_parity(ours, theirs, bo, bt, device)
                    if not det["parity"]["ok"]:
                        raise SystemExit(f"{name}: losses disagree: {det['parity']}")
                fns = step_fns(ours, theirs, bo, bt, device)
                if args.profile:
                    for label, fn in fns.items():
                        fn()
                        profile_step(fn, f"{name} {kind} {label}", device)
                t = interleaved_times(fns, reps=reps, warmup=warmup, device=device)
                n_tok, n_pad = sum(lens), len(lens) * max(lens)
                tps = {k: n_tok / t.median_s(k) for k in fns}
                ratio = tps["remesh"] / tps["transformers"]
                det[kind] = {
                    "lengths": lens, "tokens": n_tok, "padded_tokens": n_pad,
                    "remesh_tok_s": tps["remesh"], "transformers_tok_s": tps["transformers"], "ratio": ratio,
                    "paired_ratio": t.paired_ratio("remesh", "transformers"),
                    "remesh_spread": t.spread("remesh"), "transformers_spread": t.spread("transformers"),
                    **t.summary(),
                }
                print(f"[{time.perf_counter() - t_start:.0f}s] {name} {kind}: remesh {tps['remesh']:.0f} tok/s, "
                      f"transformers {tps['transformers']:.0f} tok/s, {ratio:.2f}x "
                      f"({len(t.used())}/{t.rounds} rounds used)", file=sys.stderr, flush=True)
                rows.append([name, kind, len(lens), n_tok, f"{n_tok / n_pad:.2f}", t.median_s("remesh"),
                             t.median_s("transformers"), tps["remesh"], tps["transformers"], f"{ratio:.2f}x",
                             f"{det[kind]['paired_ratio']:.2f}x", f"{len(t.used())}/{t.rounds}"])
            details[name] = det
            del ours, theirs

    print(f"\nforward+backward, {'bf16 autocast' if gpu else 'fp32'} on {device}, median of {reps}+ interleaved reps "
          f"(after {warmup} warm-up), tokens/s over real tokens")
    print_table(["model", "lengths", "seqs", "tokens", "fill", "remesh s", "hf s", "remesh tok/s", "hf tok/s",
                 "remesh/hf", "paired", "reps used"], rows)
    print("fill: real/padded tokens; remesh/hf: ratio of median tokens/s; paired: median of per-round ratios; "
          "reps used: rounds without other processes busy on the machine / rounds run")
    for name, det in details.items():
        p = det["parity"]
        print(f"parity {name}: loss remesh {p['loss_remesh']:.6f} transformers {p['loss_transformers']:.6f} "
              f"(|diff| {p['abs_diff']:.1e}), wq grad rel diff {p['wq0_grad_rel_diff']:.1e}")
    head = details.get("135m") or next(iter(details.values()))
    headline = {"packed_speedup_vs_transformers": round(head["var"]["ratio"], 3),
                "equal_len_ratio_vs_transformers": round(head["equal"]["ratio"], 3)}
    finish("model", headline, details, device=device, headline_model="135m" if "135m" in details else
           next(iter(details)), quick=args.quick, reps=reps, warmup=warmup,
           dtype="bf16-autocast" if gpu else "fp32", wall_s=round(time.perf_counter() - t_start, 1))


if __name__ == "__main__":
    main()
