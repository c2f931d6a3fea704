"""Runtime estimator: time and peak memory of every MFC under any layout, and of reallocations.

The arithmetic is counted per layer (FLOPs and bytes of each projection on one tensor-parallel
rank, attention over the context) and turned into seconds with the hardware profile's achieved
rates (`HardwareProfile.gemm_seconds`: the measured GEMM rate for that shape, or the memory
bandwidth when reading the weights takes longer), plus the profile's measured fixed costs of
remesh's own code paths (per layer, per decode step, per sequence, per micro-batch).
Communication is counted too: two all-reduces per layer forward under tensor parallelism (four
with backward), the logits gather for sampling, the data-parallel gradient all-reduce, pipeline
sends and bubbles, and reallocations from their actual transfer plans.

It models what remesh's runtime does (rl/planned.py): generation without speculation (plain
decoding is the estimate's baseline; drafting only makes it faster), all trainable copies in
other layouts kept until the end of the iteration, full Adam state on every dp rank (1/dp of it
with ZeRO-1), a reallocation's staging buffers on top of what is resident. Memory is tensor
bytes, as a GPU's allocator counts them (max_memory_allocated; runtime/memory.py measures the
same on a CPU); the allocator's cache, the process's own footprint (a CUDA context, the
interpreter) and a generate call's KV cache kept on a GPU between iterations (at most 1/16 of
its memory, `rollout.keep_cache`) come on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from remesh.dataflow.graph import MFC, DataflowGraph
from remesh.model.llama import ModelArgs
from remesh.model.logprobs import default_chunk_tokens
from remesh.plan.layout import Layout, ShardSpec
from remesh.planner.cluster import Cluster
from remesh.planner.profile import HardwareProfile, LinkCost
from remesh.runtime.grads import BUCKET_BYTES

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DATA_BYTES_PER_TOKEN = 64  # int64 ids and a handful of fp32 per-token values, with slack


@dataclass(frozen=True)
class Workload:
    """What one RL iteration computes, independent of where."""

    graph: DataflowGraph
    models: dict[str, ModelArgs]  # role -> architecture (roles with a model)
    dtype: str  # parameters and activations: float32 or bfloat16
    prompts: int  # per iteration
    n_samples: int  # responses per prompt (greedy calls: 1)
    prompt_len: float  # mean prompt tokens
    prompt_len_max: int
    gen_len: float  # mean generated tokens
    gen_len_max: int
    micro_batch_tokens: int
    ppo_epochs: int = 1
    mini_batches: int = 1
    max_batch: int = 64  # engine slots per generation instance
    migrate: bool = True  # sample migration evens out generation instances
    max_draft_nodes: int = 0  # extra cache positions per sequence (speculation)
    zero: tuple[str, ...] = ()  # trainable roles whose Adam state is sharded over dp (ZeRO-1)
    shared_prompts: bool = True  # a prompt's samples share one copy of it in a packed forward
    role_dtypes: dict[str, str] = field(default_factory=dict)  # roles held in another dtype than `dtype`

    def sequences(self, mfc: MFC) -> int:
        return self.prompts if mfc.option("greedy", False) else self.prompts * self.n_samples

    def packed_tokens(self, mfc: MFC, dp: int, prompt_len: float, gen_len: float) -> float:
        """Tokens that one of `dp` replicas packs for a training or inference call (rl/batch.py):
        one copy of each prompt for its samples, when the prompts are spread over the replicas
        (and a train call takes them in one mini-batch: mini-batches draw samples at random)."""
        seqs = self.sequences(mfc) / dp
        n = 1 if mfc.option("greedy", False) else self.n_samples
        whole = mfc.call != "train_step" or self.mini_batches == 1
        shared = self.shared_prompts and n > 1 and self.prompts >= dp and whole
        return (seqs / n if shared else seqs) * prompt_len + seqs * gen_len

    @property
    def bytes_per_el(self) -> int:
        return BYTES[self.dtype]

    def dtype_of(self, role: str) -> str:
        return self.role_dtypes.get(role, self.dtype)

    def bytes_of(self, role: str) -> int:
        return BYTES[self.dtype_of(role)]


# ---------------------------------------------------------------------- per-layer counts
def layer_linears(a: ModelArgs, tp: int) -> list[tuple[int, int]]:
    """(k, n) of every projection of one layer on one tensor-parallel rank: q, k, v, o, w1, w3, w2."""
    q, kv = a.n_heads * a.head_dim // tp, a.n_kv_heads * a.head_dim // tp
    f = a.ffn_dim // tp
    return [(a.dim, q), (a.dim, kv), (a.dim, kv), (q, a.dim), (a.dim, f), (a.dim, f), (f, a.dim)]


def layer_params(a: ModelArgs, tp: int = 1) -> int:
    """Parameters of one layer on one tp rank (norms replicated)."""
    return sum(k * n for k, n in layer_linears(a, tp)) + 2 * a.dim


def layer_flops(a: ModelArgs, tokens: int, ctx: float, tp: int = 1) -> float:
    """Forward FLOPs of one layer on one tp rank for `tokens` new tokens attending to `ctx`
    positions each on average: 2 per multiply-add of the projections, 4 * ctx * head_dim per
    head and token for scores and weighted values."""
    linear = sum(2.0 * tokens * k * n for k, n in layer_linears(a, tp))
    attention = 4.0 * tokens * ctx * a.head_dim * (a.n_heads // tp)
    return linear + attention


def kv_bytes_per_token(a: ModelArgs, tp: int, bytes_per_el: int, layers: int | None = None) -> int:
    return 2 * (a.n_layers if layers is None else layers) * (a.n_kv_heads // tp) * a.head_dim * bytes_per_el


def _allreduce(cost: LinkCost, n: int, nbytes: float) -> float:
    """All-reduce over n ranks, from the cost of one measured on 2 ranks (a ring: n - 1 steps
    of latency, 2 (n - 1) / n of the bytes through each rank's link, which is 1 at n = 2)."""
    return 0.0 if n <= 1 else (n - 1) * cost.latency_s + (n - 1) / n * 2 * nbytes / cost.bytes_per_s


def zero_shares(shapes: list[tuple[int, ...]], dp: int) -> list[int]:
    """Parameters whose Adam state each dp rank keeps under ZeRO-1, partitioned as torch's
    ZeroRedundancyOptimizer does: per parameter group (matrices, then vectors and norms), largest
    first onto the least loaded rank."""
    totals = [0] * dp
    for group in ([s for s in shapes if len(s) >= 2], [s for s in shapes if len(s) < 2]):
        for n in sorted((math.prod(s) for s in group), reverse=True):
            k = min(range(dp), key=lambda i: (totals[i], i))
            totals[k] += n
    return totals


def _allgather(cost: LinkCost, n: int, total_bytes: float) -> float:
    """All-gather of `total_bytes` over n ranks, from the cost of one measured on 2 ranks."""
    return 0.0 if n <= 1 else (n - 1) * cost.latency_s + (n - 1) / n * 2 * total_bytes / cost.bytes_per_s


@dataclass
class MemoryBreakdown:
    """Bytes on one rank."""

    params: float = 0.0
    grads: float = 0.0  # held from a train call's backward to its step (set to None after it)
    optimizer: float = 0.0
    copies: float = 0.0  # other-layout copies of trainable models built this iteration
    frozen: float = 0.0  # reference / reward models resident where they run
    data: float = 0.0  # the iteration's per-token tensors (ids, log-probs, rewards, advantages, masks)
    transient: float = 0.0  # the largest call's activations, KV cache and logits
    transient_mfc: str = ""

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.copies + self.frozen + self.data + self.transient


@dataclass
class Estimator:
    workload: Workload
    cluster: Cluster
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def profile(self) -> HardwareProfile:
        return self.cluster.profile

    # ------------------------------------------------------------------ building blocks
    def _gemms(self, m: float, shapes: list[tuple[int, int]], train: bool = False) -> float:
        w = self.workload
        return sum(self.profile.gemm_seconds(max(m, 1.0), k, n, w.dtype, w.bytes_per_el, train) for k, n in shapes)

    def _attention(self, a: ModelArgs, tokens: float, ctx: float, seqs: float, tp: int) -> float:
        """Scores and weighted values: FLOPs at the profile's attention rate, or reading the
        cached keys and values (decode) at the memory bandwidth."""
        p, w = self.profile, self.workload
        flops = 4.0 * tokens * ctx * a.head_dim * (a.n_heads // tp)
        rate = p.attention_flops_per_s.get(w.dtype) or p.attention_flops_per_s["float32"]
        kv = seqs * ctx * 2 * (a.n_kv_heads // tp) * a.head_dim * w.bytes_per_el
        return max(flops / rate, kv / p.mem_bytes_per_s)

    def _forward(self, a: ModelArgs, layout: Layout, tokens: float, ctx: float, seqs: float,
                 head_tokens: float, train: bool = False, decode: bool = False) -> float:
        """One stage's forward (with `train`: forward + backward) over `tokens` (one micro-batch
        on one rank), head included on the last stage: projections, attention, the measured
        per-layer costs, and tensor-parallel all-reduces (two per layer each way)."""
        p, w = self.profile, self.workload
        tp, layers = layout.tp, a.n_layers // layout.pp
        link = self.cluster.collective("all_reduce", layout.tp_group(layout.ranks[0]))
        passes = 3.0 if train else 1.0
        fixed = p.train_layer_overhead_s if train else p.layer_overhead_s
        residual = (p.train_layer_s_per_token_dim if train else
                    p.decode_layer_s_per_token_dim if decode else p.layer_s_per_token_dim)
        per_layer = (self._gemms(tokens, layer_linears(a, tp), train) + passes * self._attention(a, tokens, ctx, seqs, tp)
                     + fixed + residual * tokens * a.dim
                     + (4 if train else 2) * _allreduce(link, tp, tokens * a.dim * w.bytes_per_el))
        ends = 0.0
        if tp > 1:  # the vocabulary-parallel embedding sums its ranks' lookups (runtime/parallelize.py)
            ends = _allreduce(link, tp, tokens * a.dim * w.bytes_per_el)
            if head_tokens and a.head == "lm":  # log-probs: a max, a sum and the target logit per row;
                # in backward, the head's input gradient
                ends += 3 * _allreduce(link, tp, head_tokens * 4)
                ends += _allreduce(link, tp, head_tokens * a.dim * w.bytes_per_el) if train else 0.0
        return layers * per_layer + ends + (self._head(a, tp, head_tokens, train) if head_tokens else 0.0)

    def _head(self, a: ModelArgs, tp: int, rows: float, train: bool = False, sample: bool = False) -> float:
        """The LM head on `rows` hidden states: its GEMM (in training, forward and backward, plus
        the forward again for the rows beyond the last chunk, which model/logprobs.py recomputes in
        backward; the vocab-parallel head keeps its logits) and the elementwise work over the
        vocabulary: log-probs, or sampling (generation). A value head is one dot product per row."""
        p = self.profile
        if a.head != "lm":
            return self._gemms(rows, [(a.dim, 1)], train)
        n = a.vocab_size // tp
        recomputed = max(0.0, rows - default_chunk_tokens(a.vocab_size)) / rows if train and tp == 1 and rows else 0.0
        gemm = self._gemms(rows, [(a.dim, n)], train) * (1 + recomputed / 3)
        per_el = p.train_logprob_s_per_el if train else p.logprob_s_per_el
        if tp > 1:  # the vocabulary-parallel log-probs, where the profile measured them
            per_el = (p.tp_train_logprob_s_per_el if train else p.tp_logprob_s_per_el) or per_el
        if sample:
            per_el = p.sample_s_per_el
        return gemm + per_el * rows * (a.vocab_size if sample else n)

    # ------------------------------------------------------------------ MFC time
    def mfc_seconds(self, mfc: MFC, layout: Layout) -> float:
        key = ("t", mfc.name, layout)
        if key not in self._cache:
            self._cache[key] = self._mfc_seconds(mfc, layout)
        return self._cache[key]

    def _in_dtype_of(self, role: str) -> Estimator:
        """This estimator, computing in `role`'s dtype (a critic or reward model may be held in
        another dtype than the actor)."""
        dtype = self.workload.dtype_of(role)
        if dtype == self.workload.dtype:
            return self
        key = ("dtype", dtype)
        if key not in self._cache:
            self._cache[key] = Estimator(replace(self.workload, dtype=dtype), self.cluster)
        return self._cache[key]

    def _mfc_seconds(self, mfc: MFC, layout: Layout) -> float:
        w = self.workload
        a = w.models.get(mfc.role)
        if a is None:  # a rule-based reward: no model, negligible next to the model calls
            return 0.0
        if w.dtype_of(mfc.role) != w.dtype:
            return self._in_dtype_of(mfc.role)._mfc_seconds(mfc, layout)
        seqs = w.sequences(mfc) / layout.dp
        if mfc.call == "generate":
            return self._generate_seconds(a, layout, seqs)
        tokens = w.packed_tokens(mfc, layout.dp, w.prompt_len, w.gen_len)
        ctx = (w.prompt_len + w.gen_len) / 2
        head_fraction = seqs * w.gen_len / tokens  # the head runs on the response tokens only
        if mfc.call == "inference":
            return self._pipelined(a, layout, tokens, ctx, seqs, head_fraction=head_fraction)
        # train_step: epochs x mini-batches, each forward + backward (2x forward) over this rank's share
        steps = w.ppo_epochs * w.mini_batches
        per_step = self._pipelined(a, layout, tokens / w.mini_batches, ctx, seqs / w.mini_batches,
                                   head_fraction=head_fraction, train=True)
        params = self._local_params(mfc.role, layout)
        grad_bytes = params * w.bytes_per_el
        # dp gradient sum (runtime/grads.py): the grads packed into one buffer, all-reduced, copied back
        # AdamW on the parameters this rank updates; global-norm clipping: a read of every gradient
        # for the norm, a read and a write to scale them
        update = (self._optimizer_params(mfc.role, layout) * self.profile.adam_s_per_param
                  + 3 * grad_bytes / self.profile.mem_bytes_per_s)
        if layout.dp > 1:
            group = layout.dp_group(layout.ranks[0])
            cost = self.cluster.collective("all_reduce", group)
            update += _allreduce(cost, layout.dp, grad_bytes) + 4 * grad_bytes / self.profile.mem_bytes_per_s
            if mfc.role in w.zero:  # each rank broadcasts the parameters it updated, one tensor at a time
                gather = self.cluster.collective("all_gather", group)
                tensors = len(_spec(self.workload.models[mfc.role], w.dtype).params(layout.pp))
                update += _allgather(gather, layout.dp, grad_bytes) + tensors * gather.latency_s
        return steps * (per_step + update)

    def _pipelined(self, a: ModelArgs, layout: Layout, tokens: float, ctx: float, seqs: float, head_fraction: float,
                   train: bool = False) -> float:
        """Micro-batches of `micro_batch_tokens` through pp stages: (micro-batches + pp - 1)
        stage times (the pipeline fills and drains), plus activation sends between stages."""
        w = self.workload
        n_mb = max(layout.micro_batches, math.ceil(tokens / w.micro_batch_tokens)) if tokens else 1
        t_mb, s_mb = tokens / n_mb, seqs / n_mb
        stage = self._forward(a, layout, t_mb, ctx, s_mb, head_tokens=t_mb * head_fraction, train=train)
        stage += self.profile.train_call_overhead_s if train else self.profile.call_overhead_s
        if train:  # the embedding's dense gradient, on the first stage
            stage += self.profile.embedding_grad_s_per_el * a.vocab_size // layout.tp * a.dim
        sends = 0.0
        if layout.pp > 1:
            link = self.cluster.link(layout.pp_group(layout.ranks[0]))
            sends = (2 if train else 1) * link.seconds(t_mb * a.dim * w.bytes_per_el)
        return (n_mb + layout.pp - 1) * (stage + sends)

    def _generate_seconds(self, a: ModelArgs, layout: Layout, seqs: float) -> float:
        """Prefill (once per prompt, shared by its samples), then decode steps: as many as the
        longest response needs, or as the slots take to work through the queue, with the
        generated tokens spread over them."""
        w, p = self.workload, self.profile
        prompts = seqs / w.n_samples if w.n_samples > 1 else seqs
        prefill = (self._forward(a, layout, prompts * w.prompt_len, w.prompt_len / 2, prompts, head_tokens=0)
                   + self._head(a, layout.tp, seqs, sample=True))
        slots = min(w.max_batch, max(1, math.ceil(seqs)))
        tokens = seqs * w.gen_len
        steps = max(w.gen_len_max, tokens / slots)
        active = tokens / steps
        ctx = w.prompt_len + w.gen_len / 2
        tp_link = self.cluster.collective("all_gather", layout.tp_group(layout.ranks[0]))
        step = (self._forward(a, layout, active, ctx, active, head_tokens=0, decode=True) + p.step_overhead_s
                + self._head(a, layout.tp, active, sample=True)
                + active * p.seq_overhead_s + _allgather(tp_link, layout.tp, active * a.vocab_size * 4))
        return prefill + steps * step

    # ------------------------------------------------------------------ reallocation
    def realloc_seconds(self, role: str, src: Layout, dst: Layout) -> float:
        """From the transfer plan: the busiest rank's bytes over its link (sends and receives
        overlap), one latency per message, and local copies at the memory bandwidth; then the
        target ranks build their stage's model around the tensors."""
        if src == dst:
            return 0.0
        sent, recv, msgs, local, _ = self._transfer_totals(role, src, dst)
        link = self.cluster.link(src.ranks, dst.ranks)
        busiest = max((max(sent.get(r, 0), recv.get(r, 0)) / link.bytes_per_s + msgs.get(r, 0) * link.latency_s
                       for r in set(src.ranks) | set(dst.ranks)), default=0.0)
        copies = max(local.values(), default=0) / self.profile.mem_bytes_per_s
        p = self.profile
        build = p.build_model_s + p.build_layer_s * self.workload.models[role].n_layers / dst.pp
        return busiest + copies + build

    def _transfer_totals(self, role: str, src: Layout, dst: Layout):
        key = ("x", role, src, dst)
        if key not in self._cache:
            self._cache[key] = _transfer_totals(self.workload.models[role], self.workload.dtype_of(role), src, dst)
        return self._cache[key]

    # ------------------------------------------------------------------ memory
    def _local_params(self, role: str, layout: Layout, rank: int | None = None) -> int:
        """Parameters on `rank` (default: the most loaded rank: the last pipeline stage)."""
        a = self.workload.models[role]
        key = ("p", role, layout.tp, layout.pp)
        if key not in self._cache:
            spec = _spec(a, self.workload.dtype_of(role))
            per_stage = [0] * layout.pp
            for p in spec.params(layout.pp):
                n = p.numel // (layout.tp if p.tp_dim is not None else 1)
                for s in p.stages:
                    per_stage[s] += n
            self._cache[key] = per_stage
        per_stage = self._cache[key]
        if rank is None:
            return max(per_stage)
        return per_stage[layout.coord(rank)[0]]

    def _optimizer_params(self, role: str, layout: Layout, rank: int | None = None) -> int:
        """Parameters whose Adam state `rank` keeps (default: the most loaded rank)."""
        if role not in self.workload.zero or layout.dp == 1:
            return self._local_params(role, layout, rank)
        key = ("zero", role, layout)
        if key not in self._cache:
            spec = _spec(self.workload.models[role], self.workload.dtype_of(role))
            self._cache[key] = {r: zero_shares(list(spec.local_shapes(layout, r).values()),
                                               layout.dp)[layout.coord(r)[1]] for r in layout.ranks}
        shares = self._cache[key]
        return max(shares.values()) if rank is None else shares[rank]

    def transient_bytes(self, mfc: MFC, layout: Layout) -> float | tuple[float, float]:
        """Activations, KV cache and logits of one call on its most loaded rank; for a train
        call, (activations at their peak, the embedding gradient's temporaries at the end of the
        backward): `call_peak` adds the gradients to each."""
        w = self.workload
        a = w.models.get(mfc.role)
        if a is None:
            return 0.0
        b = w.bytes_of(mfc.role)
        seqs = math.ceil(w.sequences(mfc) / layout.dp)
        if mfc.call == "generate":
            # slots for every sequence that may land on the instance (migration reserves the batch);
            # a pipeline stage caches its own layers only
            slots = min(w.max_batch, w.sequences(mfc) if w.migrate and layout.dp > 1 else seqs)
            max_len = w.prompt_len_max + w.gen_len_max + w.max_draft_nodes + 1
            cache = slots * max_len * kv_bytes_per_token(a, layout.tp, b, layers=a.n_layers // layout.pp)
            # sampling each slot's verified positions (a prefill: each prompt's last one), per
            # vocabulary entry: the fp32 logits, log-probs and probabilities, and the inverse
            # CDF's fp64 copy and cumulative sum (rollout/sampling.py; top-p's sort is as large)
            logits = slots * (1 + w.max_draft_nodes) * a.vocab_size * 32
            prefill = w.prompts / layout.dp * w.prompt_len_max * (a.dim * 4 + a.ffn_dim * 3 // layout.tp) * b
            return cache + logits + prefill
        tokens = min(w.micro_batch_tokens, math.ceil(w.packed_tokens(mfc, layout.dp, w.prompt_len_max, w.gen_len_max)))
        layers = a.n_layers // layout.pp
        # one layer's live tensors in a forward: residual, norm, q/k/v, attention out, 3 ffn-wide
        live = tokens * (4 * a.dim + 2 * a.n_kv_heads * a.head_dim // layout.tp + 3 * a.ffn_dim // layout.tp) * b
        # the head runs on the response tokens only (the positions that predict them): fp32 logits,
        # their log-sum-exp taken in place (model/logprobs.py); the vocab-parallel head keeps its
        # exponentials beside them (runtime/parallelize.py)
        head_rows = min(tokens, seqs * w.gen_len_max)
        vocab = a.vocab_size // layout.tp if a.head == "lm" else 1
        head = head_rows * vocab * 4 * (2 if layout.tp > 1 else 1)
        if mfc.call == "inference":
            return live + head
        # saved for backward, per layer and token: norm in/out, q, k, v, attention out,
        # o-proj in, ffn in, w1 out, w3 out, silu out, product (w2 in)
        saved = tokens * (5 * a.dim + (a.n_heads + 2 * a.n_kv_heads) * a.head_dim // layout.tp
                          + 4 * a.ffn_dim // layout.tp) * b
        in_flight = layout.pp if layout.pp > 1 else 1  # 1F1B: up to pp micro-batches in flight on stage 0
        # backward starts from one [rows, vocabulary] fp32 block (model/logprobs.py keeps the
        # last chunk's softmax; the vocab-parallel head keeps its softmax and makes its gradient)
        held = head_rows * vocab * 4 * (3 if layout.tp > 1 else 1)
        # the embedding table's gradient arrives as a new tensor before it is accumulated. A tied
        # table (one stage) gets two: the head's, computed at the start of backward and held to
        # its end, and the lookup's at the end, summed into a third
        table = a.vocab_size // layout.tp * a.dim * b
        tied = a.tie_embeddings and a.head == "lm" and layout.pp == 1
        acts = saved * layers * in_flight + max(live + head, held + (table if tied else 0))
        # then the dp gradient sum packs the small gradients into one bucket at a time
        bucket = min(BUCKET_BYTES, self._local_params(mfc.role, layout) * b) if layout.dp > 1 else 0
        return acts, max(table * (2 if tied else 1), bucket)

    def call_peak(self, mfc: MFC, layout: Layout, rank: int) -> tuple[float, float]:
        """(transient bytes, gradient bytes) on `rank` at the call's peak, beyond what stays
        resident. A train call's gradients exist from its backward to its optimizer step (the
        fused AdamW updates in place, then they are set to None): its peak is either the
        activations (over the gradients of earlier micro-batches when a step accumulates
        several) or the end of the backward, with every gradient and the table's temporaries."""
        t = self.transient_bytes(mfc, layout)
        if mfc.call != "train_step" or mfc.role not in self.workload.models:
            return t, 0.0
        w = self.workload
        acts, end = t
        grads = self._local_params(mfc.role, layout, rank) * w.bytes_of(mfc.role)
        tokens = w.packed_tokens(mfc, layout.dp, w.prompt_len_max, w.gen_len_max) / w.mini_batches
        accumulating = layout.pp > 1 or tokens > w.micro_batch_tokens
        return max((acts, grads if accumulating else 0.0), (end, grads), key=sum)

    def memory(self, plan_layouts: dict[str, Layout]) -> dict[int, MemoryBreakdown]:
        """Peak bytes per rank under a plan (the runtime's lifetimes; see the module docstring)."""
        w = self.workload
        out = {r: MemoryBreakdown() for r in range(self.cluster.world)}
        train = {m.role: plan_layouts[m.name] for m in w.graph.mfcs if m.call == "train_step"}
        for role, layout in train.items():
            for r in layout.ranks:
                out[r].params += self._local_params(role, layout, r) * w.bytes_of(role)
                # torch's AdamW keeps its two moments in the parameters' dtype
                out[r].optimizer += 2 * self._optimizer_params(role, layout, r) * w.bytes_of(role)
        seen: set[tuple[str, Layout, int]] = set()
        for m in w.graph.mfcs:
            layout = plan_layouts[m.name]
            if m.role not in w.models:
                continue
            for r in layout.ranks:
                if (m.role, layout, r) in seen:
                    continue
                seen.add((m.role, layout, r))
                if m.role in train:
                    if train[m.role] != layout:
                        out[r].copies += self._copy_bytes(m.role, train[m.role], layout, r)
                else:
                    out[r].frozen += self._local_params(m.role, layout, r) * w.bytes_of(m.role)
        # every generated sequence's per-token data, as if all of it were on every rank (kilobytes)
        tokens = sum(w.sequences(m) for m in w.graph.mfcs if m.call == "generate") * (w.prompt_len_max + w.gen_len_max)
        for r in out:
            out[r].data = tokens * DATA_BYTES_PER_TOKEN
        for m in w.graph.mfcs:
            layout = plan_layouts[m.name]
            for r in layout.ranks:
                t, grads = self.call_peak(m, layout, r)
                if t + grads > out[r].transient + out[r].grads:
                    out[r].transient, out[r].grads, out[r].transient_mfc = t, grads, m.name
        # a reallocation's staging buffers, over what is resident then (the target copy included);
        # they stage at most the rank's source and target shards, so the transfer plan is only
        # worked out where that much would be the rank's largest transient
        for role, layout in {(m.role, plan_layouts[m.name]) for m in w.graph.mfcs if m.role in train}:
            src = train[role]
            if layout == src:
                continue
            for r in set(src.ranks) | set(layout.ranks):
                bound = sum(self._local_params(role, x, r) for x in (src, layout) if r in x.ranks) * w.bytes_of(role)
                if bound <= out[r].transient + out[r].grads:
                    continue
                nbytes = self._transfer_totals(role, src, layout)[4].get(r, 0.0)
                if nbytes > out[r].transient + out[r].grads:
                    out[r].transient, out[r].grads = nbytes, 0.0
                    out[r].transient_mfc = f"realloc {role} {src}->{layout}"
        return out

    def call_memory(self, plan_layouts: dict[str, Layout], name: str, rank: int) -> float:
        """Bytes on `rank` while the call `name` runs: what stays resident, plus its transient
        (with a train call's gradients)."""
        m = self.memory(plan_layouts)[rank]
        mfc = next(x for x in self.workload.graph.mfcs if x.name == name)
        return m.total - m.transient - m.grads + sum(self.call_peak(mfc, plan_layouts[name], rank))

    def _copy_bytes(self, role: str, src: Layout, dst: Layout, rank: int) -> float:
        """A copy's bytes on `rank`, less the shards it takes whole from the training copy there.
        Computed on a model with one layer per (source stage, target stage) class and scaled
        (layers of one class are sliced alike), once per pair of coordinates."""
        a = self.workload.models[role]
        s_coord = src.coord(rank) if rank in src.ranks else None
        # what a rank holds depends on its stage and tp index only, not on its dp index
        key = ("c", role, src.tp, src.pp, dst.tp, dst.pp, s_coord and (s_coord[0], s_coord[2]),
               dst.coord(rank)[0], dst.coord(rank)[2])
        if key not in self._cache:
            import dataclasses

            classes = math.lcm(src.pp, dst.pp)
            spec = _spec(dataclasses.replace(a, n_layers=classes), self.workload.dtype_of(role))
            scale = a.n_layers // classes
            src_params = {p.name: p for p in spec.params(src.pp)}
            total = 0
            for p in spec.params(dst.pp):
                want = spec.local_slice(p, dst, rank)
                if want is None:
                    continue
                have = spec.local_slice(src_params[p.name], src, rank) if s_coord is not None else None
                if have != want:
                    total += p.numel // p.shape[want[0]] * (want[2] - want[1]) * (scale if p.name.startswith("layers.") else 1)
            self._cache[key] = total * self.workload.bytes_of(role)
        return self._cache[key]


_SPECS: dict[tuple[str, str], ShardSpec] = {}


def _spec(a: ModelArgs, dtype: str) -> ShardSpec:
    """Shard specs by architecture (a meta-device model each: cached)."""
    import torch

    key = (repr(a), dtype)
    if key not in _SPECS:
        _SPECS[key] = ShardSpec(a, getattr(torch, dtype))
    return _SPECS[key]


def _transfer_totals(a: ModelArgs, dtype: str, src: Layout, dst: Layout):
    """Per-rank network bytes sent and received, messages, local copy bytes and staging buffer
    bytes of a reallocation, from the transfer plan. The plan is computed on a model with one layer per
    (source stage, target stage) class and scaled: layers in one class move identically."""
    import dataclasses

    from remesh.runtime.realloc import DIRECT_MIN_BYTES, ROUND_BYTES, MessageRules, transfer_plan

    classes = math.lcm(src.pp, dst.pp)
    reduced = dataclasses.replace(a, n_layers=classes)
    scale_layers = a.n_layers // classes
    bytes_per = BYTES[dtype]
    sent: dict[int, float] = {}
    recv: dict[int, float] = {}
    msgs: dict[int, int] = {}
    local: dict[int, float] = {}
    peers: set[tuple[int, int]] = set()
    staged: dict[int, float] = {}  # bytes through each rank's staging buffers, and the largest piece
    largest: dict[int, float] = {}
    spec = _spec(reduced, dtype)
    rules = MessageRules(spec, src, dst, DIRECT_MIN_BYTES)
    for t in transfer_plan(spec, src, dst):
        k = scale_layers if t.name.startswith("layers.") else 1
        nbytes = t.numel * bytes_per * k
        for r in rules.staged_on(t):
            staged[r] = staged.get(r, 0) + nbytes
            largest[r] = max(largest.get(r, 0), t.numel * bytes_per)
        if t.src == t.dst:
            local[t.dst] = local.get(t.dst, 0) + nbytes
        else:
            sent[t.src] = sent.get(t.src, 0) + nbytes
            recv[t.dst] = recv.get(t.dst, 0) + nbytes
            peers.add((t.src, t.dst))
            if t.numel * bytes_per >= DIRECT_MIN_BYTES:  # sent as their own messages; the rest packed per peer
                msgs[t.src] = msgs.get(t.src, 0) + k
    for s, _ in peers:
        msgs[s] = msgs.get(s, 0) + 1
    # staging: each peer's buffer holds its largest round, so the sum of the staged pieces is
    # exact when every peer's fit one round and an upper bound always; a round is at most
    # ROUND_BYTES, or one piece larger than that
    n_peers = {r: len({p for pair in peers if r in pair for p in pair} - {r}) for r in staged}
    staging = {r: min(b, n_peers[r] * max(ROUND_BYTES, largest[r])) for r, b in staged.items()}
    return sent, recv, msgs, local, staging
