"""Decode-step projections: the faster of two layouts of the same product, per shape.

A decode step multiplies a few rows (one per live sequence) by every weight matrix. A BLAS picks
its kernel by shape, and for some row counts nn.Linear's `x @ W.T` runs far slower than the same
product taken as `(W @ x.T).T`:
- CPU (this 2-core machine, 2 threads): at 16 rows, 1.9-2.6x slower for every SmolLM2-135M
  projection and its LM head, while at 4 rows the first layout wins for some of them. A single
  row is the extreme case: MKL takes `x @ W.T` and `W @ x.T` alike down its matrix-vector path,
  and reads SmolLM2-135M's weights from memory at 10-12 GB/s, while the two-column product of
  the row taken twice reads them at ~28 GB/s (a batch-1 decode step's projections: 46 -> 19 ms).
- GPU (H100, fp32 cuBLAS): SmolLM2-135M's key/value projection (576 -> 192) at 8-16 rows takes
  54 us as `x @ W.T` and 8 us transposed; 60 of them a step made a plain decode step of 8-16
  sequences 7.0-7.5 ms against 4.5 ms for one of 24 rows (bench/step_graphs.py, session 22).
- CPU again: some row counts are slow in both layouts, slower than the next power of two. At
  15 rows SmolLM2-135M's MLP projections took 286-292 us against 189-194 us at 16 rows, its LM
  head 20.9 against 13.1 ms (the faster layout each, timed in cache, session 28); a draining
  batch steps through every row count. So a CPU shape is also timed with its rows padded (zero
  rows) to the next power of two, the extra rows' outputs dropped.
`TunedLinears` times the layouts the first time it meets a (rows, in, out, dtypes, device,
threads) shape and keeps the fastest. They differ only in the kernels' floating-point rounding.
"""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_ROWS = 64  # beyond, nn.Linear's layout is the BLAS's well-trodden path
MIN_WEIGHT = 1 << 16  # smaller matrices: a few microseconds either way, not worth the timing
# On a GPU the transposed layout must be this much faster alone: its column-major output costs
# its consumers more there (H100, SmolLM2 at batch 4: q/o projections 8.1 us transposed against
# 9.6, yet the steps were 5% slower with them; the key/value projections at 8-16 rows, 8 against
# 54 us, made steps 1.2-1.3x faster; bench/kernels.py --device cuda, session 22)
GPU_CLEAR_WIN = 0.5


class GemmLayout(NamedTuple):
    """How a decode-step projection runs: nn.Linear's `x @ W.T` or `(W @ x.T).T`, on the rows as
    they are or padded with zero rows up to `rows`."""

    transposed: bool
    rows: int


def run_layout(x: Tensor, weight: Tensor, bias: Tensor | None, layout: GemmLayout) -> Tensor:
    """F.linear(x, weight, bias) in `layout`."""
    m = x.shape[0]
    if layout.rows > m:
        x = F.pad(x, (0, 0, 0, layout.rows - m))
    out = transposed_linear(x, weight, bias) if layout.transposed else F.linear(x, weight, bias)
    return out[:m] if layout.rows > m else out


def padded_rows(rows: int) -> int:
    """The row count a CPU product of `rows` rows is also timed at: the next power of two."""
    return 1 << (rows - 1).bit_length()


def transposed_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) computed as (weight @ x.T).T: a transposed (column-major) view,
    not copied; the consumers (element-wise ops, the next projection, `unflatten` into heads)
    take it as it is, and a copy costs as much as a small projection. One row goes as two (itself
    twice), so that the BLAS runs a GEMM, not its slower matrix-vector kernel."""
    if x.shape[0] == 1:
        out = torch.mm(weight, torch.cat((x, x)).t())[:, :1].t()
    else:
        out = torch.mm(weight, x.t()).t()
    # the bias in the product's dtype, as F.linear's under autocast (a bf16 product + an fp32 bias
    # would be fp32)
    return out + bias.to(out.dtype) if bias is not None else out


def beats_plain(plain_seconds: float, other_seconds: float, device_type: str) -> bool:
    """Whether a layout other than nn.Linear's is taken, from both times alone: a clear win only
    (ties keep nn.Linear's layout), on a GPU a 2x one (`GPU_CLEAR_WIN`)."""
    return other_seconds < (GPU_CLEAR_WIN if device_type == "cuda" else 0.9) * plain_seconds


def tunable(rows: int, weight: Tensor) -> bool:
    """Whether a decode step's multiply of `rows` rows by `weight` is tuned (a CPU or CUDA weight
    of at least MIN_WEIGHT elements, 1..MAX_ROWS rows): the profile measures these the same way."""
    return weight.device.type in ("cpu", "cuda") and weight.numel() >= MIN_WEIGHT and 1 <= rows <= MAX_ROWS


@functools.cache
def last_level_cache_bytes() -> int:
    """The size of the CPU's largest cache (Linux sysfs); 32 MiB where it cannot be read."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        if text[:-1].isdigit() and text[-1] in "KM":
            sizes.append(int(text[:-1]) << (10 if text[-1] == "K" else 20))
    return max(sizes, default=32 << 20)


class TunedLinears:
    """`with tuned.applied(model):` around a decode step: the model's nn.Linear layers (of
    at least MIN_WEIGHT elements), called without autograd on 1..MAX_ROWS rows, take the layout
    measured fastest for their shape (`choices`: shape -> True for the transposed one). One
    instance per engine; the choices persist across steps. `force`: always the transposed
    (True) or nn.Linear's (False) layout, unpadded, without timing. `pad`: whether a CPU shape's
    padded rows are timed too.

    A step of a model larger than the last-level cache reads every weight from memory, while a
    timing loop reads it from cache. For one-row products that misleads most: timed in cache,
    SmolLM2-135M's keep nn.Linear's layout for 3 of 5 shapes that run 2-3x faster transposed
    from memory (a batch-1 step: 38.6 ms as tuned in cache, 31 ms from memory). So a one-row
    shape of such a model is timed after reading the model's other weights, twice the cache's
    size, as the step before it would have: the weight is evicted and nothing is allocated.
    Products of several rows are still timed in cache: evicting there picked faster layouts too
    (batch-8 steps 65 instead of 83 ms), but each new row count's tuning then costs ~0.1 s
    more, paid inside early steps (docs/BENCHMARKS.md, CPU decode kernels).

    On a GPU each layout's time is that of its kernels replayed as a CUDA graph (`gpu_seconds`),
    as the decode steps run them: timed from the host, a kernel of a few microseconds measures
    its launch. A shape is tuned when first met outside a graph capture (the engine warms every
    step graph up before capturing it); met inside one, it runs nn.Linear's layout untimed."""

    def __init__(self, reps: int = 3, force: bool | None = None, pad: bool = True):
        self.reps, self.force, self.pad = reps, force, pad
        self._weights: dict[nn.Linear, tuple[Tensor, Tensor | None]] = {}  # `applied`'s, for its duration
        self.choices: dict[tuple, GemmLayout] = {}
        # seconds spent timing shapes: a step that timed one took that much longer than its kind
        # of step takes, and the engine takes it out of the step's time for its step-time model
        self.tuning_seconds = 0.0
        self._model: nn.Module | None = None  # the model `_layers` was found in
        self._layers: list[tuple[nn.Linear, functools.partial]] = []

    @contextlib.contextmanager
    def applied(self, model: nn.Module, weights: dict[nn.Linear, tuple[Tensor, Tensor | None]] | None = None
                ) -> Iterator[None]:
        """`weights`: a layer's (weight, bias) to multiply by instead of its own (the engine's
        low-precision copies under autocast)."""
        # an instance attribute `forward` shadows nn.Linear.forward for the step's duration only:
        # a training forward on the same model after the call is untouched. The layers are found
        # once per model, and set through __dict__ (nn.Module.__setattr__'s checks cost ~1 ms a
        # step on a 135M model): entering costs a step microseconds, not milliseconds
        if model is not self._model:
            self._model = model
            self._layers = [(m, functools.partial(self._forward, m)) for m in model.modules()
                            if type(m) is nn.Linear and "forward" not in m.__dict__]
        layers = self._layers  # this model's, even if a nested context switches the cache
        outer, self._weights = self._weights, weights or {}
        for m, forward in layers:
            m.__dict__["forward"] = forward
        try:
            yield
        finally:
            self._weights = outer
            for m, _ in layers:
                m.__dict__.pop("forward", None)

    def _forward(self, layer: nn.Linear, x: Tensor) -> Tensor:
        weight, bias = self._weights.get(layer) or (layer.weight, layer.bias)
        return self.linear(x, weight, bias)

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """F.linear(x, weight, bias), in the faster layout where the shape is tuned."""
        if x.dim() != 2 or not tunable(x.shape[0], weight) or torch.is_grad_enabled():
            return F.linear(x, weight, bias)
        key = (x.shape[0], *weight.shape, x.dtype, weight.dtype, x.device.type, torch.get_num_threads())
        layout = self.choices.get(key)
        if layout is None:
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                return F.linear(x, weight, bias)  # nothing can be timed while a graph is captured
            t0 = time.perf_counter()
            layout = self.choices[key] = (GemmLayout(self.force, x.shape[0]) if self.force is not None
                                          else self._fastest(x, weight))
            self.tuning_seconds += time.perf_counter() - t0
        return run_layout(x, weight, bias, layout)

    def _evictor(self, weight: Tensor) -> Callable[[], None] | None:
        """Reads the model's other tuned weights, twice the last-level cache's size of them, so
        that `weight` is read from memory next, as in a step; None if the model fits in cache."""
        others = [m.weight for m, _ in self._layers if m.weight is not weight and tunable(1, m.weight)]
        cache = last_level_cache_bytes()
        if sum(w.nbytes for w in others) + weight.nbytes <= cache:
            return None
        picked, total = [], 0
        for w in others:
            if total >= 2 * cache:
                break
            picked.append(w)
            total += w.nbytes

        def evict() -> None:
            for w in picked:
                w.sum()
        return evict

    def _fastest(self, x: Tensor, weight: Tensor) -> GemmLayout:
        m = x.shape[0]
        plain, flipped = GemmLayout(False, m), GemmLayout(True, m)
        if x.is_cuda:  # graphs replay fixed shapes: padding is the engine's business there (`bucket`)
            times = {c: gpu_seconds(lambda c=c: run_layout(x, weight, None, c), x.device, reps=self.reps)
                     for c in (plain, flipped)}
            return flipped if beats_plain(times[plain], times[flipped], "cuda") else plain
        evict = self._evictor(weight) if m == 1 else None

        def best(fn) -> float:
            fn()  # warm-up
            times = []
            for _ in range(self.reps):
                if evict is not None:
                    evict()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times)

        candidates = [plain, flipped]
        if self.pad and (padded := padded_rows(m)) > m:
            candidates += [GemmLayout(False, padded), GemmLayout(True, padded)]
        times = {c: best(lambda c=c: run_layout(x, weight, None, c)) for c in candidates}
        fastest = min(times, key=times.__getitem__)
        return fastest if beats_plain(times[plain], times[fastest], "cpu") else plain


def gpu_seconds(fn: Callable[[], object], device: torch.device, calls: int = 16, reps: int = 3) -> float:
    """Device time of one call of `fn`: `calls` calls captured as one CUDA graph, replayed `reps`
    times (the least). Outside a capture only."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up, as capture requires (cuBLAS workspaces)
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return min(times)
