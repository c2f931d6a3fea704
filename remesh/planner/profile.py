"""Hardware profile: what the estimator needs to know about one kind of device, measured.

`measure_profile` times, on the running machine, with remesh's own code where it matters:
- matrix multiplies over a grid of shapes (m tokens x k x n) per dtype -> achieved FLOP/s;
- attention (prefill and decode shapes) -> achieved FLOP/s, and memory bandwidth (a copy);
- the fixed costs of remesh's code paths, on a tiny model where arithmetic is negligible:
  one layer's forward, backward and optimizer update, one engine decode step and each
  sequence's share of it (sampling, bookkeeping);
- point-to-point, all-reduce and all-gather on 2 local processes of the device's backend,
  fitted as latency + bytes / bandwidth;
- on a CPU, how much processes running decode steps and train steps slow each other: 2 and
  then 4 of them on two cores.
Saved as JSON (`HardwareProfile.save/load`); `profiles/` ships the profiles of the machines it
was measured on and a datasheet profile of the H100 (marked as such: not measured).
`remesh profile` saves into the user's cache (`user_profiles_dir`), where `local_profile` finds
it: the planner of a local run takes the profile of the processor it runs on.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"

# small m densely: decode batches, where a CPU BLAS's rate jumps between kernels (this machine's
# LM head, [m, 256] x [256, 49152]: 9.5 GFLOP/s at m = 4, 12.6 at 8, 40 at 16)
GEMM_M = (1, 2, 4, 8, 12, 16, 32, 64, 256, 1024, 4096)
# projections of small and large layers, and LM heads of 16k to 150k vocabularies (large n)
GEMM_KN = ((256, 256), (256, 1024), (1024, 256), (1024, 1024), (2048, 2048), (256, 16384), (1024, 16384),
           (256, 65536), (1024, 65536))
CPU_GEMM_MAX_MACS = 1 << 34  # larger multiplies take seconds on a CPU, at the rate of the largest measured
COLD_BYTES = 128 << 20  # weights timed in turn, beyond the last-level cache (48 MiB here, 50 MiB on an H100)
COMM_BYTES = (1 << 10, 1 << 16, 1 << 20, 1 << 23)
COMM_ROUNDS = 7


@dataclass
class LinkCost:
    """seconds(bytes) = latency_s + bytes / bytes_per_s."""

    latency_s: float
    bytes_per_s: float

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


@dataclass
class HardwareProfile:
    name: str
    device: str  # "cpu" or "cuda"
    source: str  # how it was obtained: "measured on <host> ..." or "datasheet: ..."
    threads: int  # CPU threads per rank when measured (1 for GPUs)
    gemm: dict[str, list[list[float]]]  # dtype -> [[m, k, n, forward flops/s, forward+backward flops/s], ...]
    attention_flops_per_s: dict[str, float]  # dtype -> achieved by SDPA on prefill-sized shapes
    mem_bytes_per_s: float  # device memory bandwidth (a large copy: bytes read + written)
    layer_overhead_s: float  # fixed cost of one decoder layer's forward (kernel launches, Python)
    train_layer_overhead_s: float  # fixed cost of one layer's forward + backward + optimizer update
    step_overhead_s: float  # fixed cost of one engine decode step (head, sampling, bookkeeping)
    seq_overhead_s: float  # per sequence in a decode step
    call_overhead_s: float  # fixed cost of one inference micro-batch (packing, Python)
    # what a real layer costs beyond its projections and attention (norms, RoPE, SwiGLU, residuals,
    # KV-cache writes), per token and model-dim unit, in a forward and in a forward + backward
    # per element of a [rows, vocabulary] logits block: log-probs of targets (forward; forward and
    # backward, logits recomputed in backward as model/logprobs.py does), and sampling one token
    logprob_s_per_el: float = 0.0
    train_logprob_s_per_el: float = 0.0
    sample_s_per_el: float = 0.0
    # the same for the vocabulary-parallel log-probs of a tp > 1 head (runtime/parallelize.py:
    # exponentials kept for backward, max / sum / target all-reduces); 0: not measured, the
    # tp = 1 costs stand in
    tp_logprob_s_per_el: float = 0.0
    tp_train_logprob_s_per_el: float = 0.0
    # an optimizer step per parameter (AdamW + global-norm clipping + zeroing the grads), and the
    # dense gradient of an embedding table per element (zeroed, then rows added), per micro-batch
    adam_s_per_param: float = 0.0
    embedding_grad_s_per_el: float = 0.0
    layer_s_per_token_dim: float = 0.0  # packed forward (prefill, inference)
    decode_layer_s_per_token_dim: float = 0.0  # decode over the KV cache (gathering each slot's rows)
    train_layer_s_per_token_dim: float = 0.0
    # CPU processes slowing each other, measured on model-shaped work (decode steps, a train
    # step): per other busy core of the node (shared memory bandwidth and caches), two processes
    # computing at once each take (1 + contention) x as long as one alone; twice as many
    # processes as cores take 2 (1 + contention) (1 + timeshare) x (context switches evicting
    # each other's cache, migrations between cores, uneven shares)
    contention: float = 0.0
    timeshare: float = 0.0
    train_call_overhead_s: float = 0.0  # fixed cost of one train micro-batch (loss, packing, Python)
    # building a layout's model around reallocated tensors (runtime/parallelize.build_local_model)
    build_model_s: float = 0.0
    build_layer_s: float = 0.0
    reference_layer: dict = field(default_factory=dict)  # the measured layer and its raw times
    processor: str = ""  # the CPU model or GPU name it was measured on (`processor_name`)
    comm: dict[str, dict[str, LinkCost]] = field(default_factory=dict)  # backend -> op -> cost, 2 ranks, 1 node

    # ------------------------------------------------------------------ queries
    def gemm_flops_per_s(self, m: float, k: int, n: int, dtype: str, train: bool = False) -> float:
        """Achieved FLOP/s of x[m, k] @ w[n, k].T (forward), or of its forward + backward: at
        the measured (k, n) closest in log-space, interpolated in log m between the measured
        m (beyond the grid, the nearest edge: rates saturate for large shapes)."""
        table = self.gemm.get(dtype) or self.gemm["float32"]
        col = 4 if train else 3
        kn = min({(r[1], r[2]) for r in table},
                 key=lambda g: math.log2(k / g[0]) ** 2 + math.log2(n / g[1]) ** 2)
        pts = sorted((r[0], r[col]) for r in table if (r[1], r[2]) == kn)
        m = max(float(m), 1.0)
        if m <= pts[0][0]:
            return pts[0][1]
        for (m0, r0), (m1, r1) in zip(pts, pts[1:]):
            if m <= m1:
                f = math.log(m / m0) / math.log(m1 / m0)
                return math.exp(math.log(r0) + f * (math.log(r1) - math.log(r0)))
        return pts[-1][1]

    def gemm_seconds(self, m: float, k: int, n: int, dtype: str, bytes_per_el: int, train: bool = False) -> float:
        """Time of one projection (forward, or forward + backward): the compute at the achieved
        rate, or reading the weights and activations at the memory bandwidth if that is longer."""
        flops = (6.0 if train else 2.0) * m * k * n
        compute = flops / self.gemm_flops_per_s(m, k, n, dtype, train)
        memory = (3 if train else 1) * (k * n + m * (k + n)) * bytes_per_el / self.mem_bytes_per_s
        return max(compute, memory)

    def link(self, backend: str, op: str = "p2p") -> LinkCost:
        if backend not in self.comm:
            raise KeyError(f"profile {self.name!r} has no {backend} measurements (has: {sorted(self.comm)})")
        return self.comm[backend][op]

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> HardwareProfile:
        path = Path(path)
        if not path.exists() and (PROFILES_DIR / f"{path}.json").exists():
            path = PROFILES_DIR / f"{path}.json"  # a shipped profile by name
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            shipped = sorted(p.stem for p in PROFILES_DIR.glob("*.json"))
            raise FileNotFoundError(f"profile {str(path)!r} not found (shipped: {', '.join(shipped)}; "
                                    f"measure one with `remesh profile`)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON profile ({e})") from None
        try:
            data["comm"] = {b: {op: LinkCost(**c) for op, c in ops.items()} for b, ops in data.get("comm", {}).items()}
            return cls(**data)
        except TypeError as e:
            raise ValueError(f"{path}: not a remesh hardware profile ({e})") from None


# ---------------------------------------------------------------------- measurement
def user_profiles_dir() -> Path:
    from remesh.checkpoint.default import cache_dir

    return cache_dir() / "profiles"


def local_profile(device: str = "cpu") -> str:
    """Path of the profile for this machine's processor (or GPU): one measured here by `remesh
    profile` (the newest), else a shipped one of the same processor, else the shipped `cpu-local`
    (GPUs: `h100-datasheet`) with a warning that its rates belong to another device."""
    import warnings

    here, kind = processor_name(device), torch.device(device).type
    mine = sorted(user_profiles_dir().glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in [*mine, *sorted(PROFILES_DIR.glob("*.json"))]:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # not a profile: HardwareProfile.load names the problem when it is asked for
        if data.get("device") == kind and data.get("processor") == here:
            return str(path)
    cuda = kind == "cuda"
    fallback = PROFILES_DIR / ("h100-datasheet.json" if cuda else "cpu-local.json")
    warnings.warn(f"no hardware profile of this processor ({here}): the estimates use {fallback.stem} "
                  f"({json.loads(fallback.read_text())['source']}), and can be off by 2x. `remesh profile"
                  f"{' --device cuda' if cuda else ''}` (minutes) measures this one; local plans then use it",
                  stacklevel=2)
    return str(fallback)


def processor_name(device: str | torch.device = "cpu") -> str:
    """What a profile's rates belong to: the GPU's name, or the CPU's model (shared VMs of one
    name can land on different processors from one day to the next, at rates 2x apart)."""
    import platform

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time(fn, device: torch.device, reps: int = 5, min_s: float = 0.02) -> float:
    """Median seconds of fn(), each sample repeating fn until min_s has passed."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    samples = []
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            sync()
            if time.perf_counter() - t0 >= min_s:
                break
        samples.append((time.perf_counter() - t0) / n)
    return sorted(samples)[len(samples) // 2]


def _dtypes(device: torch.device) -> list[torch.dtype]:
    """fp32, and bf16 where it is the training dtype (GPUs); CPU runs train in fp32."""
    return [torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]


def cold_copies(w: torch.Tensor, total_bytes: int = COLD_BYTES) -> list[torch.Tensor]:
    """`w` and as many random tensors of its shape as make `total_bytes` together: timed in
    turn, each is read from memory, not from a cache that the others have since evicted it from."""
    return [w] + [torch.randn_like(w) for _ in range(-(-total_bytes // w.nbytes) - 1)]


def measure_gemm(device: torch.device, progress=None) -> dict[str, list[list[float]]]:
    """Forward and forward + backward rates of nn.Linear-shaped multiplies over the grid (the
    forward of a decode-sized multiply: in the layout the engine would take, `beats_plain`;
    the forward with its weights read from memory, as in a model's forward)."""
    from remesh.rollout.kernels import beats_plain, transposed_linear, tunable

    out: dict[str, list[list[float]]] = {}
    for dtype in _dtypes(device):
        rows = []
        for m in GEMM_M:
            for k, n in GEMM_KN:
                if device.type == "cpu" and m * k * n > CPU_GEMM_MAX_MACS:
                    if progress:
                        progress()
                    continue
                x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
                w = torch.randn(n, k, device=device, dtype=dtype, requires_grad=True)  # x @ w.T
                grad = torch.ones(m, n, device=device, dtype=dtype)
                # a forward reads each layer's weights once, from memory: one weight timed in a
                # loop would be read from cache (2-3x faster here for decode-sized multiplies),
                # so the forward cycles through distinct copies larger than any cache together
                weights = cold_copies(w.detach())
                turn = itertools.count()
                with torch.no_grad():
                    fwd = _time(lambda: torch.nn.functional.linear(x, weights[next(turn) % len(weights)]), device)
                    if tunable(m, w):  # the rollout engine takes the transposed layout of these on a clear win
                        flipped = _time(lambda: transposed_linear(x, weights[next(turn) % len(weights)]), device)
                        fwd = flipped if beats_plain(fwd, flipped, device.type) else fwd
                both = _time(lambda: torch.autograd.backward(torch.nn.functional.linear(x, w), grad), device)
                x.grad = w.grad = None
                rows.append([m, k, n, 2.0 * m * k * n / fwd, 6.0 * m * k * n / both])
                if progress:
                    progress()
        out[str(dtype).removeprefix("torch.")] = rows
    return out


def measure_attention(device: torch.device) -> dict[str, float]:
    out = {}
    for dtype in _dtypes(device):
        heads, hd, seq = 8, 64, 512
        q = torch.randn(1, heads, seq, hd, device=device, dtype=dtype)
        t = _time(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True), device)
        out[str(dtype).removeprefix("torch.")] = 2.0 * heads * seq * seq * hd / t  # causal: half of 4*s^2*d
    return out


def measure_memory_bandwidth(device: torch.device) -> float:
    x = torch.empty(1 << 25, dtype=torch.float32, device=device)  # 128 MiB
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / _time(lambda: y.copy_(x), device)


def measure_vocab_costs(device: torch.device) -> dict[str, float]:
    """What a [rows, vocabulary] block costs beyond its GEMM: the elementwise work of the
    log-probs (model/logprobs.py, which recomputes the logits in backward) and of sampling."""
    from remesh.model.logprobs import token_logprobs
    from remesh.rollout.sampling import SamplingParams, sample

    rows, vocab, dim = 256, 16384, 64
    h = torch.randn(rows, dim, device=device, requires_grad=True)
    w = torch.randn(vocab, dim, device=device, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), device=device)
    gemm_f = _time(lambda: (h @ w.T).detach(), device)
    with torch.no_grad():
        fwd = _time(lambda: token_logprobs(h, w, targets), device)
    both = _time(lambda: token_logprobs(h, w, targets).sum().backward(), device)
    h.grad = w.grad = None
    logits = torch.randn(16, vocab, device=device)
    u = torch.rand(16, device=device)
    samp = _time(lambda: sample(logits, SamplingParams(temperature=1.0), u), device)
    from remesh.train.configs import OptimConfig
    from remesh.train.optim import build_optimizer

    params = torch.nn.ParameterList([torch.randn(1 << 20, 2, device=device) for _ in range(8)])
    opt = build_optimizer(params, OptimConfig(lr=1e-9))  # the trainers' AdamW (fused where torch has it)

    def step():
        for q in params:
            q.grad = torch.ones_like(q)
        torch.nn.utils.clip_grad_norm_(params.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    adam = _time(step, device) / (16 << 20)
    emb = torch.nn.Embedding(vocab, dim).to(device)
    ids = torch.randint(0, vocab, (rows,), device=device)
    emb_t = _time(lambda: emb(ids).sum().backward(), device) / (vocab * dim)
    return {"adam_s_per_param": adam, "embedding_grad_s_per_el": emb_t,
            "logprob_s_per_el": max(fwd - gemm_f, 0.0) / (rows * vocab),
            "train_logprob_s_per_el": max(both - 3 * gemm_f, 0.0) / (rows * vocab),  # one chunk: no recompute
            "sample_s_per_el": samp / (16 * vocab), **_vocab_parallel_costs(device)}


def _vocab_parallel_costs(device: torch.device) -> dict[str, float]:
    """Per element of a logits block, the vocabulary-parallel log-probs forward, and forward +
    backward, in a one-rank gloo group of this process (its all-reduces cost next to nothing:
    the links are measured apart). Nothing on a GPU, or inside a running job."""
    import tempfile

    import torch.distributed as dist

    from remesh.runtime.parallelize import _VocabParallelLogprob

    if device.type != "cpu" or dist.is_initialized():
        return {}
    rows, vocab = 256, 16384
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", store=dist.FileStore(f"{tmp}/store", 1), rank=0, world_size=1)
        try:
            group = dist.group.WORLD
            logits = torch.randn(rows, vocab, device=device, requires_grad=True)
            targets = torch.randint(0, vocab, (rows,), device=device)

            def train():
                logits.grad = None  # the backward's block becomes the gradient, as in a model
                _VocabParallelLogprob.apply(logits, targets, 0, group).sum().backward()

            with torch.no_grad():
                fwd = _time(lambda: _VocabParallelLogprob.apply(logits, targets, 0, group), device)
            both = _time(train, device)
        finally:
            dist.destroy_process_group()
    return {"tp_logprob_s_per_el": max(fwd, 0.0) / (rows * vocab),
            "tp_train_logprob_s_per_el": max(both, 0.0) / (rows * vocab)}


def measure_overheads(device: torch.device) -> dict[str, float]:
    """Fixed costs of remesh's code paths, on a model too small for arithmetic to matter."""
    from remesh.model.attention import AttnContext
    from remesh.model.llama import ModelArgs, Transformer
    from remesh.rollout import RolloutEngine, SamplingParams

    def model(layers: int) -> Transformer:
        torch.manual_seed(0)
        args = ModelArgs(vocab_size=64, dim=32, n_layers=layers, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=512)
        return Transformer(args).to(device)

    m1, m3 = model(1), model(3)
    ids = torch.zeros(4, dtype=torch.long, device=device)
    pos = torch.arange(4, device=device)
    with torch.inference_mode():
        f1 = _time(lambda: m1(ids, pos, AttnContext.packed([4], device)), device)
        f3 = _time(lambda: m3(ids, pos, AttnContext.packed([4], device)), device)
    layer = max((f3 - f1) / 2, 1e-7)

    def train_step(m: Transformer, opt: torch.optim.Optimizer) -> None:
        h = m(ids, pos, AttnContext.packed([4], device))
        m.token_logprobs(h, ids).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from remesh.train.configs import OptimConfig
    from remesh.train.optim import build_optimizer

    o1, o3 = build_optimizer(m1, OptimConfig(lr=1e-9)), build_optimizer(m3, OptimConfig(lr=1e-9))
    t1, t3 = _time(lambda: train_step(m1, o1), device), _time(lambda: train_step(m3, o3), device)
    train_layer = max((t3 - t1) / 2, 1e-7)
    call = max(t1 - train_layer, 1e-7)  # what a one-layer train step costs beyond its layer

    # engine decode steps at two batch sizes: fixed + per-sequence cost, minus the layer's share
    steps = {}
    for batch in (1, 16):
        engine = RolloutEngine(m1, max_batch=batch, calibrate=False)
        params = SamplingParams(temperature=1.0, max_new_tokens=64, seed=0)
        engine.generate([[1, 2, 3]] * batch, params)
        engine.generate([[1, 2, 3]] * batch, params)
        decode = sorted(s.seconds for s in engine.stats.steps)
        steps[batch] = decode[len(decode) // 2]
    per_seq = max((steps[16] - steps[1]) / 15, 0.0)
    step = max(steps[1] - per_seq - layer, 1e-7)

    # a reallocation ends by building the target layout's model around the received tensors
    from remesh.plan.layout import Layout, ShardSpec
    from remesh.runtime.parallelize import build_local_model

    def build(layers: int):
        args = ModelArgs(vocab_size=64, dim=32, n_layers=layers, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=512)
        layout = Layout((0,))
        shards = {n: torch.zeros(shape, device=device) for n, shape in ShardSpec(args).local_shapes(layout, 0).items()}
        return lambda: build_local_model(args, layout, 0, shards, device=device)

    b1, b3 = _time(build(1), device), _time(build(3), device)
    build_layer = max((b3 - b1) / 2, 0.0)
    return {"layer_overhead_s": layer, "train_layer_overhead_s": train_layer, "step_overhead_s": step,
            "seq_overhead_s": per_seq, "call_overhead_s": call, "build_layer_s": build_layer,
            "build_model_s": max(b1 - build_layer, 0.0)}


REFERENCE_LAYER = dict(dim=576, n_heads=9, n_kv_heads=3, ffn_dim=1536)  # SmolLM2-135M's layer
# its workloads: decode of 16 sequences over 64 cached positions, prefill and training of 512 tokens
REF_DECODE_SEQS, REF_DECODE_CTX, REF_TOKENS = 16, 64, 512


def time_reference_layer(device: torch.device, reps: int = 5) -> dict[str, float]:
    """Seconds of one real layer (4 minus 2 layers of a reference model, halved) in decode (16
    sequences, 64 cached positions, as the engine runs it), prefill (512 tokens) and training
    (512 tokens, forward + backward); each the median of `reps` samples."""
    from remesh.model.attention import AttnContext
    from remesh.model.llama import ModelArgs, Transformer
    from remesh.rollout.kernels import TunedLinears

    def model(layers: int) -> Transformer:
        torch.manual_seed(0)
        return Transformer(ModelArgs(vocab_size=256, n_layers=layers, max_seq_len=1024, **REFERENCE_LAYER)).to(device)

    m2, m4 = model(2), model(4)
    b, ctx_len, prefill = REF_DECODE_SEQS, REF_DECODE_CTX, REF_TOKENS

    def decode(m: Transformer):
        cache = m.new_kv_cache(b, ctx_len + 1)
        ids = torch.zeros(b, dtype=torch.long, device=device)
        pos = torch.full((b,), ctx_len, device=device)
        return lambda: m(ids, pos, AttnContext.with_cache(cache, list(range(b)), [ctx_len] * b, [1] * b))

    def forward(m: Transformer):
        ids = torch.zeros(prefill, dtype=torch.long, device=device)
        pos = torch.arange(prefill, device=device) % 128
        return lambda: m(ids, pos, AttnContext.packed([128] * (prefill // 128), device))

    def train(m: Transformer):
        ids = torch.zeros(prefill, dtype=torch.long, device=device)
        pos = torch.arange(prefill, device=device) % 128

        def step():
            m(ids, pos, AttnContext.packed([128] * (prefill // 128), device)).sum().backward()
        return step

    tuned = TunedLinears()  # decode as the engine runs it: its projections in the faster layout
    with torch.inference_mode():
        with tuned.applied(m4), tuned.applied(m2):
            t_decode = (_time(decode(m4), device, reps) - _time(decode(m2), device, reps)) / 2
        t_prefill = (_time(forward(m4), device, reps) - _time(forward(m2), device, reps)) / 2
    t_train = (_time(train(m4), device, reps) - _time(train(m2), device, reps)) / 2
    return {"decode_16x64_s": t_decode, "prefill_512_s": t_prefill, "train_512_s": t_train}


def drift_ratio(recorded: dict, now: dict[str, float]) -> float | None:
    """How many times as long (> 1: slower) this machine takes now for the reference layer as when
    a profile recorded it: summed over decode, prefill and training, so that the longest, least
    noisy timings weigh most (one of them alone moves by 15-40% from run to run on a shared VM;
    the sum by about 10%). None without a record."""
    keys = [k for k in now if recorded.get(k, 0) > 0 and now[k] > 0]
    return sum(now[k] for k in keys) / sum(recorded[k] for k in keys) if keys else None


def check_drift(profile: HardwareProfile, device: str | torch.device = "cpu", tolerance: float = 0.25) -> float | None:
    """Re-time the profile's reference layer (a few seconds on a CPU) and warn when this machine now runs
    it more than `tolerance` slower or faster than when the profile was measured: the same
    machine name can land on a different host, or a busy one, and the estimates move with it.
    Returns the ratio (None: the profile holds no reference times, e.g. a datasheet one)."""
    import warnings

    if not profile.reference_layer or torch.device(device).type != profile.device:
        return None
    threads = torch.get_num_threads()
    torch.set_num_threads(profile.threads)  # as the profile was measured
    try:
        ratio = drift_ratio(profile.reference_layer, time_reference_layer(torch.device(device), reps=3))
    finally:
        torch.set_num_threads(threads)
    if ratio is not None and abs(math.log(ratio)) > math.log(1 + tolerance):
        warnings.warn(f"this machine runs the reference layer {ratio:.2f}x as long as when profile {profile.name} "
                      f"was measured ({profile.source}): its time estimates are off by about as much. "
                      f"`remesh profile` (minutes) re-measures it", stacklevel=2)
    return ratio


def measure_layer_residuals(profile: HardwareProfile, device: torch.device) -> dict:
    """Time a real layer (`time_reference_layer`); what the profile's GEMM and attention rates
    do not explain, beyond the fixed per-layer cost, is charged per token and model-dim unit."""
    from remesh.model.llama import ModelArgs
    from remesh.planner.estimator import layer_linears

    a = ModelArgs(vocab_size=256, n_layers=1, max_seq_len=1024, **REFERENCE_LAYER)
    b, ctx_len, prefill = REF_DECODE_SEQS, REF_DECODE_CTX, REF_TOKENS
    times = time_reference_layer(device)
    t_decode, t_prefill, t_train = times["decode_16x64_s"], times["prefill_512_s"], times["train_512_s"]
    dtype = "float32"

    def explained(tokens: int, ctx: float, seqs: int, train: bool) -> float:
        gemm = sum(profile.gemm_seconds(tokens, k, n, dtype, 4, train) for k, n in layer_linears(a, 1))
        flops = 4.0 * tokens * ctx * a.head_dim * a.n_heads
        attn = max(flops / profile.attention_flops_per_s[dtype], seqs * ctx * 2 * a.n_kv_heads * a.head_dim * 4
                   / profile.mem_bytes_per_s)
        return gemm + (3 if train else 1) * attn

    per_decode = (t_decode - explained(b, ctx_len, b, False) - profile.layer_overhead_s) / (b * a.dim)
    per_prefill = (t_prefill - explained(prefill, 64, 4, False) - profile.layer_overhead_s) / (prefill * a.dim)
    per_train = (t_train - explained(prefill, 64, 4, True) - profile.train_layer_overhead_s) / (prefill * a.dim)
    return {"layer_s_per_token_dim": max(0.0, per_prefill), "decode_layer_s_per_token_dim": max(0.0, per_decode),
            "train_layer_s_per_token_dim": max(0.0, per_train),
            "reference_layer": {**REFERENCE_LAYER, **times, "residual_decode": per_decode,
                                "residual_prefill": per_prefill}}


def calibrate_code_paths(profile: HardwareProfile, device: torch.device) -> dict:
    """Run remesh's own decode step and train micro-batch on a small model with a real-sized
    vocabulary, and charge what the estimate from the rates above does not explain to the fixed
    costs: per decode step and per sequence in it (fitted over two batch sizes), per inference
    and per train micro-batch."""
    import dataclasses

    from remesh.model.attention import AttnContext
    from remesh.model.llama import ModelArgs, Transformer
    from remesh.planner.cluster import Cluster
    from remesh.planner.estimator import Estimator, Workload
    from remesh.rollout import RolloutEngine, SamplingParams

    torch.manual_seed(0)
    args = ModelArgs(vocab_size=16384, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=768, max_seq_len=1024)
    model = Transformer(args).to(device)
    bare = dataclasses.replace(profile, step_overhead_s=0.0, seq_overhead_s=0.0, call_overhead_s=0.0,
                               train_call_overhead_s=0.0)
    work = Workload(graph=None, models={"actor": args}, dtype="float32", prompts=1, n_samples=1, prompt_len=20,
                    prompt_len_max=20, gen_len=24, gen_len_max=24, micro_batch_tokens=4096)
    est = Estimator(work, Cluster("calibration", 1, 1, 1e12, bare, "gloo", LinkCost(1e-5, 1e9), None))
    from remesh.plan.layout import Layout

    one = Layout((0,))
    residual = {}
    for b in (2, 16):
        engine = RolloutEngine(model, max_batch=b, calibrate=False)
        params = SamplingParams(temperature=1.0, max_new_tokens=24, seed=0)
        prompts = [list(range(1, 21))] * b
        engine.generate(prompts, params)
        engine.generate(prompts, params)
        steps = sorted(x.seconds for x in engine.stats.steps)
        predicted = (est._forward(args, one, b, 32, b, head_tokens=0, decode=True) + est._head(args, 1, b, sample=True))
        residual[b] = steps[len(steps) // 2] - predicted
    per_seq = max((residual[16] - residual[2]) / 14, 0.0)
    step = max(residual[2] - 2 * per_seq, 0.0)

    seqs, length, response = 4, 128, 64
    ids = torch.randint(0, args.vocab_size, (seqs * length,), device=device)
    pos = torch.arange(length, device=device).repeat(seqs)
    rows = torch.cat([torch.arange(i * length + length - response, (i + 1) * length) for i in range(seqs)])

    def micro(train: bool):
        h = model(ids, pos, AttnContext.packed([length] * seqs, device))
        lp = model.token_logprobs(h[rows], ids[rows])
        if train:
            lp.sum().backward()

    with torch.no_grad():
        t_inf = _time(lambda: micro(False), device)
    t_train = _time(lambda: micro(True), device)
    model.zero_grad(set_to_none=True)
    tokens = seqs * length
    predicted_inf = est._forward(args, one, tokens, length / 2, seqs, head_tokens=seqs * response)
    predicted_train = (est._forward(args, one, tokens, length / 2, seqs, head_tokens=seqs * response, train=True)
                       + profile.embedding_grad_s_per_el * args.vocab_size * args.dim)
    return {"step_overhead_s": step, "seq_overhead_s": per_seq, "call_overhead_s": max(t_inf - predicted_inf, 0.0),
            "train_call_overhead_s": max(t_train - predicted_train, 0.0)}


def _comm_rank(rank: int, world: int, device_type: str) -> dict[str, dict[str, list[float]]]:
    import torch.distributed as dist

    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    out: dict[str, dict[str, list[float]]] = {"p2p": {}, "all_reduce": {}, "all_gather": {}}
    buffers = {}
    for nbytes in COMM_BYTES:
        x = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
        buffers[nbytes] = (x, [torch.empty_like(x) for _ in range(world)])

    def p2p(x: torch.Tensor) -> None:
        if rank == 0:
            dist.send(x, 1)
            dist.recv(x, 1)
        else:
            dist.recv(x, 0)
            dist.send(x, 0)

    samples: dict[tuple[str, int], list[float]] = {}
    # every (op, size) once per round, rounds interleaved, medians: a slow spell of the shared
    # host then moves one sample of each instead of every sample of one (one pass measured
    # all-reduce bandwidth 2.6x apart in two profiles taken an hour apart)
    for _ in range(COMM_ROUNDS):
        for nbytes, (x, parts) in buffers.items():
            iters = 20 if nbytes <= 1 << 16 else 5  # the same count on both ranks: collectives must pair up
            for op, fn, scale in (("p2p", lambda: p2p(x), 0.5), ("all_reduce", lambda: dist.all_reduce(x), 1.0),
                                  ("all_gather", lambda: dist.all_gather(parts, x), 1.0)):
                fn()
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                samples.setdefault((op, nbytes), []).append((time.perf_counter() - t0) / iters * scale)
    for (op, nbytes), times in samples.items():
        out[op][str(nbytes)] = [statistics.median(times)]
    return out


def _fit(points: dict[str, list[float]]) -> LinkCost:
    """latency + bytes / bandwidth through the smallest and largest measured sizes."""
    sizes = sorted(int(s) for s in points)
    lo, hi = sizes[0], sizes[-1]
    t_lo, t_hi = points[str(lo)][0], points[str(hi)][0]
    bw = (hi - lo) / max(t_hi - t_lo, 1e-12)
    return LinkCost(latency_s=max(t_lo - lo / bw, 1e-7), bytes_per_s=bw)


def measure_comm(device_type: str) -> dict[str, dict[str, LinkCost]]:
    """Link costs per collective of the device's backend, between 2 local processes."""
    from remesh.runtime.launch import default_backend, spawn

    backend = default_backend(device_type)
    if device_type == "cuda" and torch.cuda.device_count() < 2:
        return {}  # one process per GPU: nothing to measure between two
    ranks = spawn(_comm_rank, 2, args=(device_type,), backend=backend, timeout_s=600)
    return {backend: {op: _fit(points) for op, points in ranks[0].items()}}


def _sharing_rank(rank: int, world: int) -> dict[str, float]:
    """Model-shaped work on two cores, each busy rank alone in turn and then all at once: first
    ranks 0-1 (a core each), then all four (two per core, floating between them as the
    scheduler places them); per workload, the slowest rank's together / alone (a data-parallel
    call waits for its slowest rank)."""
    import os

    import torch.distributed as dist

    from remesh.model.attention import AttnContext
    from remesh.model.llama import ModelArgs, Transformer
    from remesh.rollout import RolloutEngine, SamplingParams
    from remesh.train.configs import OptimConfig
    from remesh.train.optim import build_optimizer

    cores = 2
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # a real-sized vocabulary: its head streams 108 MiB of weights each decode step, as a real
    # model's does, more than any last-level cache (a small matrix reused from cache measures
    # the processes evicting each other's working set instead)
    model = Transformer(ModelArgs(vocab_size=49152, n_layers=2, max_seq_len=256, **REFERENCE_LAYER))
    engine = RolloutEngine(model, max_batch=4, calibrate=False)
    prompts = [list(range(1 + i, 33 + i)) for i in range(4)]
    opt = build_optimizer(model, OptimConfig(lr=1e-9))
    ids = torch.arange(256) % 1000
    pos = torch.arange(256) % 128

    def decode() -> None:
        engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=16, seed=0))

    def train() -> None:
        h = model(ids, pos, AttnContext.packed([128, 128]))
        model.token_logprobs(h, ids).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    factor = {}
    for busy in (cores, world):
        factors = []
        for fn in (decode, train):
            fn()
            alone, together = [], []
            for _ in range(5):  # interleaved, medians: a neighbour's burst on a shared host moves single samples
                for who in range(busy):
                    dist.barrier()
                    if rank == who:
                        alone.append(timed(fn))
                dist.barrier()
                if rank < busy:
                    together.append(timed(fn))
            mine = statistics.median(together) / statistics.median(alone) if rank < busy else 0.0
            every: list[float] = [0.0] * world
            dist.all_gather_object(every, mine)
            factors.append(max(every))
        factor[busy] = statistics.mean(factors)
    # the simulator's model (planner/simulate.py): b busy processes on c cores each take
    # max(1, b / c) x (1 + contention x (min(b, c) - 1)) x (1 + timeshare x min(1, (b - c) / c)) as long
    # as alone
    contention = max(0.0, factor[cores] - 1)
    return {"contention": contention, "timeshare": max(0.0, factor[world] / (world / cores * (1 + contention)) - 1)}


def measure_sharing(device_type: str) -> dict[str, float]:
    """How CPU processes slow each other (`HardwareProfile.contention`, `.timeshare`), measured
    on two of the machine's cores with two and four processes: 0 on GPUs, where each process
    has its own device."""
    import os

    from remesh.runtime.launch import spawn

    if device_type != "cpu" or not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        return {"contention": 0.0, "timeshare": 0.0}
    return spawn(_sharing_rank, 4, timeout_s=600)[0]


def _median_comm(passes: list[dict[str, dict[str, LinkCost]]]) -> dict[str, dict[str, LinkCost]]:
    """Per backend and op, the median latency and bandwidth over the passes."""
    return {b: {op: LinkCost(statistics.median(p[b][op].latency_s for p in passes),
                             statistics.median(p[b][op].bytes_per_s for p in passes)) for op in ops}
            for b, ops in passes[0].items()}


def _median_rows(passes: list[dict[str, list[list[float]]]]) -> dict[str, list[list[float]]]:
    """Per shape, the median rate over the passes."""
    out = {}
    for dtype, rows in passes[0].items():
        out[dtype] = [row[:3] + [statistics.median(p[dtype][i][c] for p in passes) for c in (3, 4)]
                      for i, row in enumerate(rows)]
    return out


def _median_values(passes: list[dict]) -> dict:
    """Per key, the median over the passes, nested dicts (the reference layer's raw record) key by
    key, so that the record agrees with the fitted values beside it."""
    out = {}
    for key, first in passes[0].items():
        if isinstance(first, dict):
            out[key] = _median_values([p[key] for p in passes])
        elif isinstance(first, (int, float)):
            out[key] = statistics.median(p[key] for p in passes)
        else:
            out[key] = first
    return out


def measure_profile(name: str, device: str = "cpu", progress: bool = True, passes: int = 3) -> HardwareProfile:
    """Each measurement is taken in `passes` interleaved passes and the median kept: on a shared
    machine the rates drift by tens of percent over minutes, and one pass can land in a slow spell."""
    import socket

    dev = torch.device(device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=passes * (len(GEMM_M) * len(GEMM_KN) * len(_dtypes(dev)) + 4) + 2, desc="profile",
                   unit="test")
    tick = (lambda: bar.update(1)) if bar else None
    runs = []
    for _ in range(passes):
        gemm = measure_gemm(dev, tick)
        scalars = {"attention_flops_per_s": measure_attention(dev), "mem_bytes_per_s": measure_memory_bandwidth(dev)}
        tick and tick()
        scalars.update(measure_overheads(dev))
        tick and tick()
        scalars.update(measure_vocab_costs(dev))
        tick and tick()
        runs.append((gemm, scalars))
    gemm = _median_rows([g for g, _ in runs])
    scalars = _median_values([sc for _, sc in runs])  # attention_flops_per_s: per dtype
    comms, sharing = [], []
    for _ in range(passes):
        comms.append(measure_comm(dev.type))
        sharing.append(measure_sharing(dev.type))
        tick and tick()
    comm = _median_comm(comms)
    what = processor_name(dev)
    profile = HardwareProfile(
        name=name, device=dev.type, threads=torch.get_num_threads() if dev.type == "cpu" else 1,
        source=f"measured on {socket.gethostname()} ({what}), torch {torch.__version__}, "
               f"{time.strftime('%Y-%m-%d')}, median of {passes} passes",
        gemm=gemm, comm=comm, processor=what, **_median_values(sharing), **scalars)
    # the fits below charge what the rates leave unexplained: each against the median profile
    for fit in (measure_layer_residuals, calibrate_code_paths):
        for key, value in _median_values([fit(profile, dev) for _ in range(passes)]).items():
            setattr(profile, key, value)
        tick and tick()
    if bar:
        bar.close()
    return profile
