"""The rollout engine's decode kernels (rollout/kernels.py) on and off, side by side.

SmolLM2-135M (fp32), plain decoding (spec off), B prompts of the demo set, one sample each,
temperature 1.0 with EOS ignored for a fixed --max-new-tokens: the same work in every engine.
With --length-mix, the long-tail prompts of bench/rollout.py and their natural EOS instead: the
batch drains through every row count (the same samples in every engine, up to rounding).
"off" is the same engine with its projections left in nn.Linear's layout, "unpadded" one whose
tuner never pads a product's rows to the next power of two (kernels.py). Whole generate calls,
interleaved (`interleaved_times`, rounds disturbed by other processes re-run), median per batch
size, with the engine's threads (--threads, default torch's). With --device cuda the engines
keep their KV cache and CUDA graphs between calls: the untimed warm-up call captures them (and
times the layouts), the timed calls replay them.

Headline (JSON): tuned_speedup_min / tuned_speedup_max over batch sizes (off / tuned seconds),
padding_speedup_min / padding_speedup_max (unpadded / tuned seconds). Odd batch sizes (3,7,15)
show the padding; at powers of two it never applies.

    python bench/kernels.py [--quick] [--device cuda] [--sizes 1,4,16,32] [--max-new-tokens 32] [--reps 3] [--threads 2]
                            [--length-mix]
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import demo_prompts, finish, interleaved_times, parse_args, print_table  # noqa: E402
from remesh.checkpoint import load_hf, load_tokenizer, resolve_model_path  # noqa: E402
from remesh.rollout import RolloutEngine, SamplingParams  # noqa: E402
from remesh.rollout.kernels import TunedLinears  # noqa: E402
from remesh.rollout.sampling import stop_token_ids  # noqa: E402


def main() -> None:
    def options(p):
        p.add_argument("--sizes", default="1,4,16,32")
        p.add_argument("--max-new-tokens", type=int, default=32)
        p.add_argument("--reps", type=int, default=3)
        p.add_argument("--length-mix", action="store_true",
                       help="long-tail prompts with their natural EOS (the batch drains) rather than fixed lengths")

    args = parse_args(__doc__.splitlines()[0], options)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes, args.reps, args.max_new_tokens = [4], 2, 8
    device = torch.device(args.device)
    folder = resolve_model_path("default")
    model = load_hf(folder, device=device).eval()
    tok = load_tokenizer(folder)
    prompts = demo_prompts(tok, length_mix=args.length_mix)
    stop = stop_token_ids(tok.eos_token_id, model.args.extra.get("eos_token_id")) if args.length_mix else ()
    params = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0, stop_token_ids=stop)
    rows, details, speedups, padding = [], {}, [], []
    for b in sizes:
        batch = (prompts * (b // len(prompts) + 1))[:b]
        tuned = RolloutEngine(model, max_batch=b, calibrate=False, keep_cache=True)
        off = RolloutEngine(model, max_batch=b, calibrate=False, keep_cache=True)
        off.gemms.applied = lambda *_: contextlib.nullcontext()  # nn.Linear's layout throughout
        unpadded = RolloutEngine(model, max_batch=b, calibrate=False, keep_cache=True)
        unpadded.gemms = TunedLinears(pad=False)
        t = interleaved_times({"off": lambda: off.generate(batch, params),
                               "unpadded": lambda: unpadded.generate(batch, params),
                               "tuned": lambda: tuned.generate(batch, params)}, reps=args.reps, device=device)
        speedup = t.median_s("off") / t.median_s("tuned")
        speedups.append(speedup)
        padding.append(t.median_s("unpadded") / t.median_s("tuned"))
        chosen = tuned.gemms.choices
        transposed = sum(c.transposed for c in chosen.values())
        padded = sum(c.rows > key[0] for key, c in chosen.items())
        rows.append([b, t.median_s("off"), t.median_s("unpadded"), t.median_s("tuned"), speedup, padding[-1],
                     f"{transposed}/{len(chosen)}", f"{padded}/{len(chosen)}"])
        details[str(b)] = {**t.summary(), "speedup": speedup, "paired_speedup": t.paired_ratio("tuned", "off"),
                           "padding_speedup": padding[-1],
                           "paired_padding_speedup": t.paired_ratio("tuned", "unpadded"),
                           "choices": {str(k[:3]): c._asdict() for k, c in tuned.gemms.choices.items()}}
        print(f"batch {b}: off {t.median_s('off'):.2f} s, unpadded {t.median_s('unpadded'):.2f} s, "
              f"tuned {t.median_s('tuned'):.2f} s ({speedup:.2f}x)", flush=True)
    print_table(["batch", "off s", "unpadded s", "tuned s", "speedup", "padding speedup", "shapes transposed",
                 "shapes padded"], rows)
    finish("kernels" + ("_cuda" if device.type == "cuda" else "") + ("_lengthmix" if args.length_mix else "")
           + ("_quick" if args.quick else ""),
           {"tuned_speedup_min": round(min(speedups), 3), "tuned_speedup_max": round(max(speedups), 3),
            "padding_speedup_min": round(min(padding), 3), "padding_speedup_max": round(max(padding), 3)},
           details, device=device, max_new_tokens=args.max_new_tokens, length_mix=args.length_mix)


if __name__ == "__main__":
    main()
