"""The rollout engine: continuous batching over a slot KV cache, with lossless speculative decoding.

One `generate` call:
1. queues every (prompt, sample) pair; a slot freed by a finished sequence is refilled at once;
2. prefills newly admitted prompts in one packed forward, each distinct prompt once, and copies
   its cache rows into its siblings' slots (a GRPO group shares one prefill), also into those of
   siblings admitted later, from a sibling still decoding, with the prompt's logits kept;
3. decodes: before every step the strategy (off, or a drafter with depth and width) is chosen,
   by the adaptive policy (spec "auto") or fixed; the drafts of all live sequences are scored
   in one forward with tree attention masks, verified (speculative.py), and the KV cache is
   compacted so that the accepted path sits where plain decoding would have written it. Under
   "auto", a few sequences per step also get a draft that is not verified, scored by the tokens
   they emit next (trials.py): the policy's acceptance rates without verification's cost.
   On a GPU, decode and verification steps replay CUDA graphs (cuda_graphs.py), and the host's
   bookkeeping that a step's tokens do not wait for (scoring and opening free trials) runs
   between the step's launch and the read of its tokens, while the device computes. The
   drafters index the tokens lazily, when a draft or a trial reads them (drafters.py).

Every sequence draws its randomness from its own stream (seeded by seed, prompt and sample
index), one uniform per emitted position, so that with point-mass drafters (n-gram, history)
the output is token for token what plain sampling gives, whatever the batch composition or
the drafting strategy (up to floating-point ties): speculation changes the speed, never the samples.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from remesh.model.attention import AttnContext
from remesh.model.llama import RMSNorm
from remesh.rollout.adaptive import OFF, AdaptivePolicy, OverheadBudget, Strategy, levels_judged, parse_strategy
from remesh.rollout.cuda_graphs import StepGraphs, bucket
from remesh.rollout.drafters import Drafter, HistoryDrafter, ModelDrafter, NGramDrafter, SeqView
from remesh.rollout.kernels import TunedLinears
from remesh.rollout.sampling import SamplingParams, inverse_cdf, sample, target_logprobs
from remesh.rollout.speculative import Draft, tree_mask, verify, verify_drawn
from remesh.rollout.trials import Trial, Trials


@dataclass
class Rollout:
    prompt_index: int  # index into the prompts list
    sample_index: int  # 0..n-1
    prompt_ids: list[int]
    response_ids: list[int]  # includes the stop token when finish_reason == "stop"
    logprobs: list[float]  # behaviour log-prob of each response token
    finish_reason: str  # "stop" | "length"


def greedy(params: SamplingParams) -> SamplingParams:
    """A copy of `params` that decodes greedily, one sample per prompt."""
    import dataclasses

    return dataclasses.replace(params, greedy=True, n=1)


@dataclass
class StepRecord:
    live: int  # sequences in the step
    strategy: str
    emitted: int  # tokens emitted by the step
    seconds: float


@dataclass
class GenerationStats:
    sequences: int = 0
    tokens: int = 0  # emitted by this engine in the call (a migrated sequence's, where decoded)
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    calibration_seconds: float = 0.0
    # host time of the adaptive machinery (choices, free trials) charged to its budgets: all of it
    # on a CPU; on a GPU, trials that ended while the device still computed the step are left out
    policy_seconds: float = 0.0
    # those trials' host time (a GPU): hidden behind the device's work (a trial that overlapped it
    # only in part is charged in full, above)
    policy_hidden_seconds: float = 0.0
    steps: list[StepRecord] = field(default_factory=list)
    # strategy family ("ngram", "historyx2", ...) -> [accepted, offered] per depth, of the
    # drafts verified and of the free trials' drafts (scored by the tokens emitted, trials.py)
    acceptance: dict[str, list[list[int]]] = field(default_factory=dict)
    trials: dict[str, list[list[int]]] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def acceptance_by_position(self, trials: bool = False) -> dict[str, list[float]]:
        table = self.trials if trials else self.acceptance
        return {k: [round(a / o, 3) if o else 0.0 for a, o in v] for k, v in table.items()}

    def count_acceptance(self, drafter: str, width: int, offered: int, accepted: int, trial: bool = False) -> None:
        """One draft's outcome (offered 0: the drafter had nothing, a miss at depth 1)."""
        key = drafter + (f"x{width}" if width > 1 else "")
        table = (self.trials if trial else self.acceptance).setdefault(key, [])
        for i in range(levels_judged(offered, accepted)):
            while len(table) <= i:
                table.append([0, 0])
            table[i][1] += 1
            table[i][0] += int(accepted > i)

    def decode_counts(self) -> dict[str, int]:
        """This call's decode steps as totals that add up over calls and engines: sequence-steps
        (one sequence in one step), the tokens they emitted, steps, and the steps that verified a
        draft."""
        return {"seq_steps": sum(s.live for s in self.steps), "emitted": sum(s.emitted for s in self.steps),
                "steps": len(self.steps), "spec_steps": sum(s.strategy != "off" for s in self.steps)}

    @property
    def tokens_per_seq_step(self) -> float:
        return tokens_per_seq_step(self.decode_counts())

    def strategy_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.steps:
            out[s.strategy] = out.get(s.strategy, 0) + 1
        return out

    def summary(self) -> dict:
        counts = self.decode_counts()
        return {"sequences": self.sequences, "tokens": self.tokens, "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.tokens_per_s, 2), "steps": counts["steps"],
                # the decode steps' tokens (not the prefills' first ones) per decode step
                "tokens_per_step": round(counts["emitted"] / max(counts["steps"], 1), 2),
                "tokens_per_seq_step": round(tokens_per_seq_step(counts), 3),
                "prefill_seconds": round(self.prefill_seconds, 3),
                "calibration_seconds": round(self.calibration_seconds, 3),
                "policy_seconds": round(self.policy_seconds, 3),
                "policy_hidden_seconds": round(self.policy_hidden_seconds, 3),
                "acceptance_by_position": self.acceptance_by_position(),
                "trial_acceptance_by_position": self.acceptance_by_position(trials=True),
                "strategies": self.strategy_counts()}

    def timeline(self, phases: int = 8) -> list[str]:
        """The strategies chosen over time, in up to `phases` equal runs of steps."""
        n = len(self.steps)
        lines = []
        for k in range(min(phases, n)):
            a, b = k * n // min(phases, n), (k + 1) * n // min(phases, n)
            counts: dict[str, int] = {}
            for s in self.steps[a:b]:
                counts[s.strategy] = counts.get(s.strategy, 0) + 1
            lines.append(f"steps {a}-{b - 1}: live {self.steps[a].live}..{self.steps[b - 1].live}, "
                         + ", ".join(f"{s} x{c}" for s, c in sorted(counts.items(), key=lambda kv: -kv[1])))
        return lines


@dataclass
class MovedSeq:
    """An unfinished sequence on its way from one engine to another (sample migration)."""

    prompt_index: int
    sample_index: int
    prompt: list[int]
    response: list[int]  # so far; the last token is not in the cache yet
    logprobs: list[float]
    kv: tuple[Tensor, Tensor] | None = None  # its cache rows [layers, kv heads, tokens, head dim], or recompute


class _Seq:
    __slots__ = ("seq_id", "prompt_index", "sample_index", "prompt", "response", "logprobs", "reason", "slot",
                 "cache_len", "uniforms", "kv", "tokens", "_view")

    def __init__(self, seq_id: int, prompt_index: int, sample_index: int, prompt: list[int], uniforms: Tensor,
                 response: list[int], logprobs: list[float], kv: tuple[Tensor, Tensor] | None):
        self.seq_id, self.prompt_index, self.sample_index = seq_id, prompt_index, sample_index
        self.prompt = prompt
        self.response = list(response)
        self.logprobs = list(logprobs)
        self.reason: str | None = None
        self.slot = -1
        self.cache_len = 0  # tokens in the cache; the last response token is not yet
        self.uniforms = uniforms  # one per response position
        self.kv = kv  # cache rows brought by a migrated sequence, until it is admitted
        self.tokens = prompt + self.response  # kept in step with `response` (`append`)
        self._view: SeqView | None = None

    def append(self, token: int, logprob: float) -> None:
        self.response.append(token)
        self.tokens.append(token)
        self.logprobs.append(logprob)

    def view(self) -> SeqView:
        """What the drafters read: made once per slot, its token list shared with the sequence
        (a fresh copy for every sequence, every step, was a few microseconds each)."""
        if self._view is None or self._view.slot != self.slot:
            self._view = SeqView(self.seq_id, self.slot, tuple(self.prompt), self.tokens, len(self.prompt),
                                 self.response)
        return self._view


@dataclass
class _Run:
    """The state of one generate call."""

    params: SamplingParams
    device: torch.device
    max_nodes: int
    free: list[int]  # cache slots
    bar: Any
    was_training: bool
    queue: deque[_Seq] = field(default_factory=deque)
    live: list[_Seq] = field(default_factory=list)
    done: list[_Seq] = field(default_factory=list)
    next_id: int = 0
    t0: float = field(default_factory=time.perf_counter)
    # prompt -> its first-token logits, while samples of it wait in the queue: once the batch is
    # full, samples are admitted one or two at a time, and a sample admitted after its siblings
    # copies a live sibling's prompt rows rather than prefilling the prompt again
    prompt_logits: dict[int, Tensor] = field(default_factory=dict)


CALIBRATION_MAX_TOKENS = 1024
NO_FULL_COLLECTIONS = 2 ** 30  # gc threshold2 during a call: young-generation collections only
# keep_cache=None keeps a GPU cache (and its graphs) between calls if it takes at most this share
# of the device's memory: a larger one is worth more to the training that runs in between
KEEP_CACHE_SHARE = 1 / 16


def _stream_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    return (seed * 0x9E3779B1 + prompt_index * 0x85EBCA77 + sample_index * 0xC2B2AE3D + 1) % (2 ** 63)


class RolloutEngine:
    """Generates with `model`. `spec`: "off", "auto" (adaptive) or a fixed strategy such as
    "ngram:4", "history:4x2" or "model:3" (the last needs `draft_model`). The engine keeps the
    drafters' history and the policy's statistics across calls, as RL needs. `cuda_graphs`: on a
    GPU, replay decode and verification steps as CUDA graphs. `keep_cache`: keep the KV cache
    (and its graphs) from one call to the next, so that the next call captures no graph again;
    False: it goes with the call, for the memory an RL iteration's training needs; None (the
    default): kept on a GPU if it and the graphs' logits take at most KEEP_CACHE_SHARE of the
    device's memory. What is kept is dropped when the model's tensors change storage or the
    autocast state changes (`_built_for`). Under autocast, graph steps read the engine's own
    copies of the linear layers' weights in autocast's dtype (`_low`), not autocast's cached
    casts, which die with its context.
    `overhead_budget`: under "auto", the fraction of the decoding time that choosing strategies
    and free trials may take, half each (`OverheadBudget`; None: no limit)."""

    def __init__(self, model: nn.Module, spec: str = "off", draft_model: nn.Module | None = None,
                 max_batch: int = 64, calibrate: bool = True,
                 agree: Callable[[Strategy], Strategy] | None = None, cuda_graphs: bool = True,
                 keep_cache: bool | None = None, overhead_budget: float | None = 0.01):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        # agree: makes the ranks that run one model together (tensor parallel) take the same
        # strategy each step, e.g. the first rank's, broadcast: timings differ between ranks
        self.model, self.max_batch, self.calibrate, self.agree = model, max_batch, calibrate, agree
        self.cuda_graphs, self.keep_cache = cuda_graphs, keep_cache
        self._gc_threshold: tuple[int, ...] | None = None  # the collector's, until `collect` restores it
        self.graphs: StepGraphs | None = None  # the running call's, over its cache
        self.gemms = TunedLinears()  # each decode projection in its faster layout
        self.drafters: dict[str, Drafter] = {"ngram": NGramDrafter(), "history": HistoryDrafter()}
        if draft_model is not None:
            # the same tokenizer, the embedding perhaps padded less (a smaller sibling checkpoint)
            if draft_model.args.vocab_size > model.args.vocab_size:
                raise ValueError(f"draft model: its vocabulary has {draft_model.args.vocab_size} tokens, the policy's "
                                 f"{model.args.vocab_size}: the model drafter needs the policy's tokenizer "
                                 "(rollout.draft_model, --draft-model)")
            self.drafters["model"] = ModelDrafter(draft_model, vocab_size=model.args.vocab_size)
        self.spec = spec.strip()
        self.fixed: Strategy | None = None
        if self.spec != "auto":
            self.fixed = parse_strategy(self.spec)
            if self.fixed.drafter is not None and self.fixed.drafter not in self.drafters:
                hint = " (give a draft model)" if self.fixed.drafter == "model" else ""
                raise ValueError(f"speculation {spec!r}: unknown drafter {self.fixed.drafter!r}{hint}; "
                                 f"known: {', '.join(self.drafters)}")
            # only the drafter in use: a fixed strategy never reads the others
            self.drafters = {n: d for n, d in self.drafters.items() if n == self.fixed.drafter}
        self.policy = AdaptivePolicy(
            drafters={n: 2 if n == "model" else 4 for n in self.drafters},  # widest tree per drafter
            node_count={n: d.max_nodes for n, d in self.drafters.items()},
            trialed=frozenset(n for n, d in self.drafters.items() if d.free_trials))
        deepest: dict[tuple[str, int], int] = {}  # the trials' shapes: each kind's deepest candidate
        for c in self.policy.candidates():
            if c.drafter in self.policy.trialed:
                deepest[c.drafter, c.width] = max(c.depth, deepest.get((c.drafter, c.width), 0))
        self.trials = Trials([(n, w, d) for (n, w), d in deepest.items()])
        # separate halves: in one account, choosing (first in a step) would leave the trials
        # nothing whenever a step's credit covers about one choice, and auto would stop learning
        half = None if overhead_budget is None else overhead_budget / 2
        self.choice_budget, self.trial_budget = OverheadBudget(half), OverheadBudget(half)
        self.cache = None
        self._cache_built_for: tuple = ()  # what the kept cache and graphs serve (`_built_for`)
        # under autocast, with graphs (`_refresh_low`): each nn.Linear's (weight, bias) in
        # autocast's dtype, which the steps multiply by, and (device type, dtype) of that autocast;
        # or, where such copies cannot cover the weights autocast caches, graphs that read its
        # cache and so go with the call
        self._low: dict[nn.Linear, tuple[Tensor, Tensor | None]] = {}
        self._low_autocast: tuple[str, torch.dtype] | None = None
        self._graphs_read_autocast_cache = False
        self.stats = GenerationStats()
        self._pending: list[_Seq] = []  # sequences that emitted tokens the open trials have not seen (`_flush`)

    # ---------------------------------------------------------------- public
    def generate(self, prompts: list[list[int]], params: SamplingParams, progress: bool = False,
                 prompt_keys: list[int] | None = None) -> list[Rollout]:
        """Sample `params.n` responses per prompt; rollouts ordered by (prompt_index, sample_index).
        The result depends on `params.seed` only, not on `max_batch` or the drafting strategy
        (up to floating-point ties). `prompt_keys` (default 0..N-1) are the prompts' indices in
        the whole batch: they seed the sequences' random streams and become `prompt_index`, so
        that data-parallel instances, each given part of a batch, sample what one would."""
        self.begin(prompts, params, prompt_keys, progress)
        try:
            while self.advance():
                pass
        finally:
            rollouts = self.collect()
        return rollouts

    def begin(self, prompts: list[list[int]], params: SamplingParams, prompt_keys: list[int] | None = None,
              progress: bool = False, reserve: tuple[int, int] | None = None) -> None:
        """Start a generate call to be driven by `advance` and ended by `collect` (sample migration
        drives several engines this way). `reserve` = (sequences, longest prompt): size the KV
        cache for sequences that may join later (`adopt`), not only for these prompts."""
        prompts = [[int(t) for t in p] for p in prompts]
        keys = list(range(len(prompts))) if prompt_keys is None else [int(k) for k in prompt_keys]
        if len(keys) != len(prompts) or len(set(keys)) != len(keys):
            raise ValueError(f"prompt_keys: need {len(prompts)} distinct keys, got {prompt_keys}")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
        device = next(self.model.parameters()).device
        n_seqs = len(prompts) * params.n
        longest = max((len(p) for p in prompts), default=1)
        if reserve is not None:
            n_seqs, longest = max(n_seqs, reserve[0]), max(longest, reserve[1])
        n_slots = max(1, min(self.max_batch, n_seqs))
        max_nodes = self._max_nodes()
        graphs = self._use_graphs(device)
        built_for = self._built_for(device)
        if built_for != self._cache_built_for:
            self.drop_cache()
            self._cache_built_for = built_for
        # with graphs, one more slot than sequences: the padding rows' scratch space
        self._ensure_cache(n_slots + graphs, longest + params.max_new_tokens + max_nodes + 1, device)
        if not graphs:
            self.graphs = None
        elif self.graphs is None or self.graphs.cache is not self.cache:
            self.graphs = StepGraphs(self.model, self.cache, self.cache.n_slots - 1, self.cache.n_slots - 1,
                                     counted_elsewhere=lambda: self.gemms.tuning_seconds)
        self._refresh_low(device)
        for d in self.drafters.values():
            if isinstance(d, ModelDrafter):  # before `start`, which seeds its sampling from them
                d.set_params(params)
            d.start(n_slots, self.cache.max_len)
        self.generator = torch.Generator().manual_seed(params.seed + 104729)  # extra uniforms of p/q tests
        self.stats = GenerationStats(sequences=len(prompts) * params.n)
        self.trials.open.clear()  # sequence ids restart with every call
        self._pending = []
        run = self._run = _Run(params, device, max_nodes, free=list(range(n_slots - 1, -1, -1)),
                               bar=_progress(len(prompts) * params.n) if progress else None,
                               was_training=self.model.training)
        for i, p in enumerate(prompts):
            for j in range(params.n):
                run.queue.append(self._new_seq(keys[i], j, p, [], []))
        self.model.eval()
        if prompts and self.fixed is None and self.calibrate and not self.policy.step_time.calibrated:
            with torch.inference_mode(), self._kernels():
                self._calibrate(n_slots, max_nodes, device)
        # A full garbage collection walks every tracked object: ~300k once torch and transformers
        # are imported, 130 ms here, dozens of GPU decode steps, and the call's own allocations
        # (the drafters' indexes) set one off every few calls. Until `collect`, only the young
        # generations are collected. Last in `begin`, so that nothing fails before `collect`.
        self._gc_threshold = gc.get_threshold()
        gc.set_threshold(*self._gc_threshold[:2], NO_FULL_COLLECTIONS)

    def advance(self) -> bool:
        """One engine step (a prefill of newly admitted sequences, or a decode step); False when
        nothing is left to do."""
        run = self._run
        if not (run.queue or run.live):
            return False
        with torch.inference_mode(), self._kernels():
            admitted: list[_Seq] = []
            while run.queue and run.free:
                s = run.queue.popleft()
                s.slot = run.free.pop()
                admitted.append(s)
            if admitted:
                self._admit(admitted)
                run.live.extend(admitted)
            else:
                strategy = self.fixed if self.fixed is not None else self._choose(len(run.live))
                if self.agree is not None and self.fixed is None:
                    strategy = self.agree(strategy)
                self._step(run.live, strategy, run.params, run.device)
        for s in [s for s in run.live if s.reason is not None]:
            self._retire(s)
            run.done.append(s)
            if run.bar is not None:
                run.bar.update(1)
                run.bar.set_postfix(tok_s=f"{self.stats.tokens / (time.perf_counter() - run.t0):.1f}",
                                    live=len(run.live))
        return bool(run.queue or run.live)

    def collect(self) -> list[Rollout]:
        """End the call: the rollouts of the sequences that finished here, in (prompt, sample) order."""
        run = self._run
        if self._gc_threshold is not None:
            # unless another engine's call began meanwhile and is still running: its collect restores
            if gc.get_threshold()[2] == NO_FULL_COLLECTIONS:
                gc.set_threshold(*self._gc_threshold)
            self._gc_threshold = None
        self.model.train(run.was_training)
        self._flush()
        if not self._keeps_cache():
            self.drop_cache()
        elif self._graphs_read_autocast_cache:
            self.graphs = None
        for d in self.drafters.values():
            d.stop()
        if run.bar is not None:
            run.bar.close()
        self.stats.seconds = time.perf_counter() - run.t0
        run.done.sort(key=lambda s: (s.prompt_index, s.sample_index))
        return [Rollout(s.prompt_index, s.sample_index, list(s.prompt), s.response, s.logprobs, s.reason)
                for s in run.done]

    def drop_cache(self) -> None:
        """Free the KV cache, its graphs and the weights' low-precision copies now, between calls:
        the next call allocates and captures again (what `keep_cache=False` does after every call)."""
        self.cache = self.graphs = None
        self._low, self._low_autocast = {}, None

    def forward_seconds(self, reps: int = 50) -> float:
        """Median seconds of a batch-1 decode step's forward alone, as the steps run it (their
        CUDA graph's replay, or eagerly with the tuned CPU kernels), over the cache kept from the
        last call: what a step's achieved bandwidth is computed from. Between calls only: it
        writes the first position of slot 0. The first fifth of the runs warm up."""
        if self.cache is None:
            raise ValueError("forward_seconds needs the KV cache of a finished call: "
                             "RolloutEngine(keep_cache=True), then generate")
        if self._built_for(self.cache.k.device) != self._cache_built_for:
            raise ValueError("forward_seconds: the model's tensors or the autocast state changed since the last "
                             "call; generate again first")
        if reps < 1:
            raise ValueError(f"forward_seconds: reps must be >= 1, got {reps}")
        device = self.cache.k.device
        times = []
        with torch.inference_mode(), self._kernels():
            for _ in range(reps):
                t = time.perf_counter()
                self._forward([0], [0], [0], [0], None, capture=True)
                _sync(device)
                times.append(time.perf_counter() - t)
        return statistics.median(times[reps // 5:])

    @property
    def unfinished(self) -> int:
        """Sequences of the running call not finished yet (queued or decoding)."""
        return len(self._run.queue) + len(self._run.live)

    def release(self, count: int, send_cache: Callable[[int], bool]) -> list[MovedSeq]:
        """Take up to `count` unfinished sequences out of this engine (sample migration): queued
        ones first (nothing to move but the prompt), then the decoding ones with the shortest
        context. `send_cache(cached_tokens)` decides, per decoding sequence, whether its KV-cache
        rows travel with it or the receiver recomputes them."""
        run = self._run
        out: list[MovedSeq] = []
        while run.queue and len(out) < count:
            s = run.queue.pop()
            out.append(MovedSeq(s.prompt_index, s.sample_index, s.prompt, s.response, s.logprobs, s.kv))
        for s in sorted(run.live, key=lambda s: s.cache_len)[:count - len(out)]:
            kv = None
            if send_cache(s.cache_len):
                kv = (self.cache.k[:, s.slot, :, :s.cache_len].clone(), self.cache.v[:, s.slot, :, :s.cache_len].clone())
            self._retire(s)
            out.append(MovedSeq(s.prompt_index, s.sample_index, s.prompt, s.response, s.logprobs, kv))
        self.stats.sequences -= len(out)
        return out

    def adopt(self, moved: list[MovedSeq]) -> None:
        """Continue sequences released by another engine running the same call (same sampling
        parameters and seed): they join the queue and continue exactly as they would have there."""
        run = self._run
        for m in reversed(moved):  # at the queue's head, in their order: they were started first
            need = len(m.prompt) + run.params.max_new_tokens + run.max_nodes + 1
            if need > self.cache.max_len:
                raise ValueError(f"adopted sequence (prompt {m.prompt_index}) needs {need} cache positions, the cache "
                                 f"has {self.cache.max_len}: begin(..., reserve=) with the longest prompt of the batch")
            run.queue.appendleft(self._new_seq(m.prompt_index, m.sample_index, m.prompt, m.response, m.logprobs, m.kv))
        self.stats.sequences += len(moved)

    # ---------------------------------------------------------------- internals
    def _new_seq(self, key: int, sample: int, prompt: list[int], response: list[int], logprobs: list[float],
                 kv: tuple[Tensor, Tensor] | None = None) -> _Seq:
        run = self._run
        g = torch.Generator().manual_seed(_stream_seed(run.params.seed, key, sample))
        s = _Seq(run.next_id, key, sample, prompt, torch.rand(run.params.max_new_tokens, generator=g), response,
                 logprobs, kv)
        run.next_id += 1
        return s

    def _choose(self, batch: int) -> Strategy:
        """The policy's choice, or its last one again while the choices' budget is in debt."""
        if not self.choice_budget.allows():
            return self.policy.repeat(batch)
        t0 = time.perf_counter()
        strategy = self.policy.choose(batch)
        self._spend(self.choice_budget, time.perf_counter() - t0)
        return strategy

    def _spend(self, budget: OverheadBudget, seconds: float) -> None:
        budget.spend(seconds)
        self.stats.policy_seconds += seconds

    def _retire(self, s: _Seq) -> None:
        """`s` leaves the batch (finished or released): free its slot and the drafters' state."""
        self._flush()
        self._run.live.remove(s)
        self._run.free.append(s.slot)
        self.trials.open.pop(s.seq_id, None)
        for d in self.drafters.values():
            d.finish(s.view())

    def _admit(self, seqs: list[_Seq]) -> None:
        """Fill the cache of newly admitted sequences: prefill new ones (and sample their first
        token); restore migrated ones from their cache rows or by recomputing their context."""
        fresh = [s for s in seqs if not s.response]
        moved = [s for s in seqs if s.response]
        if fresh:
            self._prefill(fresh, self._run.params, self._run.device)
        restored = [s for s in moved if s.kv is not None]
        recompute = [s for s in moved if s.kv is None]
        for s in restored:
            k, v = s.kv
            s.cache_len = k.shape[2]
            self.cache.k[:, s.slot, :, :s.cache_len] = k.to(self.cache.k.device)
            self.cache.v[:, s.slot, :, :s.cache_len] = v.to(self.cache.v.device)
            s.kv = None
        if recompute:
            t0, before = time.perf_counter(), self._setups()
            contexts = [s.prompt + s.response[:-1] for s in recompute]
            self._fill([s.slot for s in recompute], contexts)
            for s, c in zip(recompute, contexts):
                s.cache_len = len(c)
            _sync(self._run.device)
            self._observe_time(sum(map(len, contexts)), time.perf_counter() - t0, before)
            self.stats.prefill_seconds += time.perf_counter() - t0

    def _setups(self) -> tuple[int, float]:
        """One-time work so far: (steps run otherwise than their shape will for long while it
        waits for its CUDA graph, `StepGraphs.provisional_runs`; seconds spent timing projection
        layouts (kernels.py) and capturing graphs)."""
        g = self.graphs
        return (g.provisional_runs if g is not None else 0,
                self.gemms.tuning_seconds + (g.capture_seconds if g is not None else 0.0))

    def _keeps_cache(self) -> bool:
        if self.keep_cache is not None:
            return self.keep_cache
        # a GPU's graphs cost their captures again in every call that has no cache to replay them
        # on (session 22, H100: 0.06-0.14 s each, ~5 a call of plain decoding at batch 16); where
        # the cache is larger, the training that follows an RL call needs the memory more
        k = self.cache.k if self.cache is not None else None
        if k is None or not k.is_cuda:
            return False
        held = (2 * k.nbytes + (self.graphs.logits_bytes() if self.graphs is not None else 0)
                + sum(t.nbytes for pair in self._low.values() for t in pair if t is not None))
        return held <= KEEP_CACHE_SHARE * torch.cuda.get_device_properties(k.device).total_memory

    def _built_for(self, device: torch.device) -> tuple:
        """What a kept cache and its graphs serve: the model and its tensors' storage, which a
        graph replays the addresses of (a dtype change, a reallocation or another model moves
        them; an update in place, an optimizer step's, does not, and the graphs read the new
        values), and the autocast state, which sets the kernels and the cache's use."""
        return _storage(self.model), _autocast_dtype(device)

    def _use_graphs(self, device: torch.device) -> bool:
        return self.cuda_graphs and device.type == "cuda"

    def _observe_time(self, tokens: int, seconds: float, before: tuple[int, float]) -> float | None:
        """Feed a forward's time to the step-time model, less the one-time setup done inside it
        since `before` (`_setups()`: the first step at a new shape times kernel layouts on a
        CPU, captures a graph on a GPU), which would teach the model that this size is slow and
        speculation fast by contrast. Left out entirely if it ran eagerly, or on a far larger
        shape's graph, while its shape waits for a graph: the graph's steps will not take its
        time. A step that replayed a close stand-in is fed: those serve a shape for dozens of
        uses (STAND_IN_USES), at a cost bounded by STAND_IN_SPAN.
        Returns the setup seconds taken out, or None if left out. (Once, such steps were left
        out whole; then a strategy met a new row count at every step as the batch drained, and
        none of its steps was fed.)"""
        eager, setup = self._setups()
        extra = setup - before[1]
        if eager != before[0] or seconds - extra <= 0:
            return None
        self.policy.step_time.observe(tokens, seconds - extra)
        return extra

    def _max_nodes(self) -> int:
        if self.fixed is not None:
            if self.fixed.drafter is None:
                return 0
            return self.drafters[self.fixed.drafter].max_nodes(self.fixed.depth, self.fixed.width)
        return max(self.policy.nodes(s) for s in self.policy.candidates())

    @contextlib.contextmanager
    def _kernels(self):
        """The steps' projections in their faster layouts (`TunedLinears`; on a CPU or a GPU), by
        the low-precision copies of the weights where there are (`_refresh_low`)."""
        with self.gemms.applied(self.model, self._low), contextlib.ExitStack() as stack:
            if self._low_autocast is not None:
                device_type, dtype = self._low_autocast
                stack.enter_context(torch.autocast(device_type, dtype=dtype, cache_enabled=False))
            yield

    def _refresh_low(self, device: torch.device) -> None:
        """Under autocast a forward casts the weights; autocast caches the casts of trainable fp32
        ones until its context exits, so a graph captured in one call would read freed copies in
        the next. With graphs, the engine keeps its own copy of each nn.Linear's weight and bias in
        autocast's dtype, refreshed in place at every call (the cast autocast would make: the same
        numbers), and runs its steps with autocast's cache off: the graphs read these copies and
        outlive the call, and an optimizer step's update reaches them at the next call. A model
        with trainable fp32 weights elsewhere (a tensor-parallel shard's) keeps autocast's cache:
        casting those afresh in every step would cost more weight traffic than its captures, so
        its graphs go with the call."""
        dtype = _autocast_dtype(device)
        copies = self.graphs is not None and dtype not in (None, torch.float32)
        self._graphs_read_autocast_cache = copies and not _linear_copies_cover(self.model)
        if not copies or self._graphs_read_autocast_cache:
            self._low, self._low_autocast = {}, None
            return
        if not self._low:
            self._low = {m: (torch.empty_like(m.weight, dtype=dtype),
                             None if m.bias is None else torch.empty_like(m.bias, dtype=dtype))
                         for m in self.model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32}
        self._low_autocast = (device.type, dtype)
        with torch.no_grad():
            for m, (weight, bias) in self._low.items():
                weight.copy_(m.weight)
                if bias is not None:
                    bias.copy_(m.bias)

    def _ensure_cache(self, n_slots: int, max_len: int, device: torch.device) -> None:
        c = self.cache
        if c is None or c.n_slots < n_slots or c.max_len < max_len or c.k.device != device:
            del c
            self.cache = self.graphs = None  # freed first: a kept cache is not held twice
            self.cache = self.model.new_kv_cache(n_slots, max_len, device=device)

    def _calibrate(self, n_slots: int, max_nodes: int, device: torch.device) -> None:
        """Time verifier forwards of 1 .. n_slots x (1 + max_nodes) tokens: the step-time model's
        starting points (every real step refines it)."""
        t0 = time.perf_counter()
        # up to 1024 tokens (beyond, the model extrapolates linearly and real steps correct it)
        total = min(n_slots * (1 + max_nodes), CALIBRATION_MAX_TOKENS)
        sizes = sorted({min(2 ** k, total) for k in range(total.bit_length() + 1)} | {min(n_slots, total)})
        for tokens in sizes:
            b = min(n_slots, tokens)
            per = max(1, tokens // b)
            if self.graphs is not None and per > 1:  # the tokens per sequence that graph steps run
                per = 1 + bucket(per - 1, max_nodes)
            # with graphs, at the cache's full length: the graphs captured here then cover steps at
            # any context, standing in while those steps' own shapes wait for theirs (STAND_IN_USES)
            start = self.cache.max_len - per if self.graphs is not None else 0
            best = float("inf")
            # as the steps will run: eagerly, or by a graph (captured by the first run, not timed)
            for _ in range(2 if tokens <= 256 or self.graphs is not None else 1):
                t = time.perf_counter()
                self._forward([0] * (b * per), list(range(start, start + per)) * b, list(range(b)), [start] * b, None,
                              capture=True)
                _sync(device)
                best = min(best, time.perf_counter() - t)
            self.policy.step_time.observe(b * per, best)
        self.stats.calibration_seconds = time.perf_counter() - t0

    def _forward(self, ids: list[int], positions: list[int], slots: list[int], cache_lens: list[int],
                 mask: Tensor | None, capture: bool = False) -> Tensor:
        """Logits [b * n, vocab] of a cache step (n tokens per sequence, `mask` [b, n, n] among
        them or causal), by a CUDA graph when its shape has one (or is due one; `capture`: now),
        else eagerly."""
        b, device = len(slots), self.cache.k.device
        n = len(ids) // b
        graph = self.graphs.route(b, n, max(cache_lens) + n, now=capture) if self.graphs is not None else None
        if graph is not None:
            if mask is None and n > 1:
                mask = torch.ones(n, n, dtype=torch.bool, device=device).tril().expand(b, n, n)
            return self.graphs.logits(ids, positions, slots, cache_lens, mask, graph)
        ctx = AttnContext.with_cache(self.cache, slots, cache_lens, [n] * b, mask=mask)
        return self.model.logits(self.model(torch.tensor(ids, device=device), torch.tensor(positions, device=device),
                                            ctx))

    def _prefill(self, seqs: list[_Seq], params: SamplingParams, device: torch.device) -> None:
        t0, before = time.perf_counter(), self._setups()
        run = self._run
        # the prompt's rows: from a live sibling's slot (its logits kept), else one prefill per prompt
        source: dict[int, _Seq] = {s.prompt_index: s for s in run.live if s.prompt_index in run.prompt_logits}
        heads = []
        for s in seqs:
            if s.prompt_index not in source:
                source[s.prompt_index] = s
                heads.append(s)
        lens = [len(s.prompt) for s in heads]
        if heads:
            logits = self.model.logits(self._fill([s.slot for s in heads], [s.prompt for s in heads]))
            for r, s in enumerate(heads):
                run.prompt_logits[s.prompt_index] = logits[r]
        copies = [s for s in seqs if source[s.prompt_index] is not s]
        if copies:  # share the prefill: copy the cache rows into the other samples' slots
            dst = torch.tensor([s.slot for s in copies], device=device)
            src = torch.tensor([source[s.prompt_index].slot for s in copies], device=device)
            width = max(len(s.prompt) for s in copies)
            self.cache.k[:, dst, :, :width] = self.cache.k[:, src, :, :width]
            self.cache.v[:, dst, :, :width] = self.cache.v[:, src, :, :width]
        logits = torch.stack([run.prompt_logits[s.prompt_index] for s in seqs])
        waiting = {q.prompt_index for q in run.queue}
        for p in {s.prompt_index for s in seqs} - waiting:  # no sample of it left to admit
            del run.prompt_logits[p]
        tok, lp = sample(logits, params, torch.stack([s.uniforms[0] for s in seqs]))
        for s, t, l in zip(seqs, tok.tolist(), lp.tolist()):
            s.cache_len = len(s.prompt)
            self._emit(s, [t], [l], params)
        if heads:  # also the cost of recomputing a context
            self._observe_time(sum(lens), time.perf_counter() - t0, before)
        self.stats.prefill_seconds += time.perf_counter() - t0

    def _fill(self, slots: list[int], contexts: list[list[int]]) -> Tensor:
        """Write the keys and values of `contexts` into `slots` from position 0, in one packed
        forward; returns the hidden state at each context's last token."""
        device = self.cache.k.device
        lens = [len(c) for c in contexts]
        ctx = AttnContext.with_cache(self.cache, slots, [0] * len(slots), lens)
        h = self.model(torch.tensor([t for c in contexts for t in c], device=device),
                       torch.cat([torch.arange(n, device=device) for n in lens]), ctx)
        return h[ctx.cu_seqlens[1:].long() - 1]

    def _emit(self, s: _Seq, tokens: list[int], logprobs: list[float], params: SamplingParams) -> int:
        """Append emitted tokens up to a stop token or the length limit; returns how many were kept."""
        kept = 0
        for t, lp in zip(tokens, logprobs):
            s.append(t, lp)
            kept += 1
            if t in params.stop_token_ids:
                s.reason = "stop"
                break
            if len(s.response) >= params.max_new_tokens:
                s.reason = "length"
                break
        if s.seq_id in self.trials.open:  # scored at `_flush`
            self._pending.append(s)
        self.stats.tokens += kept
        return kept

    def _flush(self) -> None:
        """Score the open trials against the tokens emitted since the last flush. Deferred from
        `_emit` so that on a GPU it runs while the device computes the next step (`_catch_up`);
        done before a sequence's retirement drops its trial."""
        for s in self._pending:
            trial = self.trials.open.get(s.seq_id)
            if trial is not None and (depth := trial.outcome(s.response, s.reason is not None)) is not None:
                del self.trials.open[s.seq_id]
                self._record_acceptance(trial.drafter, trial.width, trial.depth, depth, trial=True)
        self._pending.clear()

    def _catch_up(self, live: list[_Seq], strategy: Strategy, params: SamplingParams,
                  launched_on: torch.device | None = None) -> None:
        """The host's work that this step's tokens do not wait for: scoring the open trials with
        the last step's tokens, and new free trials (within their budget). On a GPU it runs
        between launching the step and reading its tokens (`launched_on`), hidden behind the
        device's work (the next tokens cannot be known before, so nothing else can overlap).
        Trials that end while the device still computes cost the step nothing: they are not
        charged to their budget, which would otherwise hold them back as if they did (a lookup
        over a group's history not yet indexed takes a millisecond or so)."""
        self._flush()
        if self.fixed is None and self.trial_budget.allows():
            # marked after the launch (the flush queued nothing on the device), and only when trials run
            still_running = _still_running(launched_on) if launched_on is not None else None
            t = time.perf_counter()
            self._open_trials(live, strategy, params)
            seconds = time.perf_counter() - t
            if still_running is not None and still_running():
                self.stats.policy_hidden_seconds += seconds
            else:
                self._spend(self.trial_budget, seconds)

    def _open_trials(self, live: list[_Seq], strategy: Strategy, params: SamplingParams) -> None:
        """Unverified drafts for a few sequences: the tokens they emit next score them (trials.py)."""
        picked = self.trials.next([s.seq_id for s in live], verified=strategy)
        if picked is None:
            return
        (name, width, depth), rows = picked
        views = [live[i].view() for i in rows]
        self.drafters[name].sync(views)  # indexing: in the trials' time (charged unless hidden), not the lookups'
        t0 = time.perf_counter()
        drafts = self.drafters[name].propose(views, depth, width)
        self.policy.observe_draft(Strategy(name, depth, width), time.perf_counter() - t0, len(rows))
        for i, d in zip(rows, drafts):
            s = live[i]
            pruned = _within_budget(d, s, params)
            if len(pruned):
                self.trials.open[s.seq_id] = Trial(name, width, pruned, len(s.response))
            elif not len(d):  # the drafter had nothing (a draft cut away by the length limit says nothing of it)
                self._record_acceptance(name, width, 0, 0, trial=True)

    def _step(self, live: list[_Seq], strategy: Strategy, params: SamplingParams, device: torch.device) -> None:
        t0 = time.perf_counter()
        before = self._setups()
        drafts: list[Draft] | None = None
        draft_s = sync_s = 0.0
        if strategy.drafter is not None:
            drafter, views = self.drafters[strategy.drafter], [s.view() for s in live]
            # indexing the tokens emitted since the drafter was last read: bookkeeping, neither in
            # the drafter's cost per draft token nor in the time the step is judged by, both of
            # which would then swing with how long the drafter had been idle
            drafter.sync(views)
            t_draft = time.perf_counter()
            sync_s = t_draft - t0
            proposed = drafter.propose(views, strategy.depth, strategy.width)
            drafts = [_within_budget(d, s, params) for d, s in zip(proposed, live)]  # deeper nodes: wasted work
            draft_s = time.perf_counter() - t_draft
            # a draft cut to nothing by the length limit is no evidence on the drafter's acceptance
            judged = [len(d) > 0 or not len(p) for d, p in zip(drafts, proposed)]
            if not any(len(d) for d in drafts):  # nothing proposed: a plain step, counted as misses
                for _ in range(sum(judged)):
                    self._record_acceptance(strategy.drafter, strategy.width, 0, 0)
                drafts = None
        overlap = _hides_host_work(device)
        catch_up_s = 0.0  # where it adds to the step (a CPU); on a GPU it hides behind the device
        if not overlap:
            t = time.perf_counter()
            self._catch_up(live, strategy, params)
            catch_up_s = time.perf_counter() - t
        t1 = time.perf_counter()
        n_nodes = max(len(d) for d in drafts) if drafts else 0
        if drafts and self.graphs is not None:
            # graphs: padded to a power of two (within the cache's room), so that steps come in a
            # few shapes, each captured once, rather than one per node count met
            n_nodes = bucket(n_nodes, self._run.max_nodes)
        n = 1 + n_nodes
        b = len(live)
        cache_lens = [s.cache_len for s in live]
        slots = [s.slot for s in live]
        if drafts is None:
            u = torch.stack([s.uniforms[len(s.response)] for s in live]).to(device)  # before: a copy waits
            logits = self._forward([s.response[-1] for s in live], cache_lens, slots, cache_lens, None)
            tok, lp = sample(logits, params, u)
            if overlap:
                self._catch_up(live, strategy, params, launched_on=device)
            emitted = 0
            for s, t, l in zip(live, tok.tolist(), lp.tolist()):
                s.cache_len += 1
                emitted += self._emit(s, [t], [l], params)
        else:
            # each node's depth, root first; padding nodes sit at the root's position
            depths = [d.depths() + [0] * (n_nodes - len(d)) for d in drafts]
            ids, pos = [], []
            for s, d, ds in zip(live, drafts, depths):
                ids += [s.response[-1]] + d.tokens + [0] * (n_nodes - len(d))
                pos += [s.cache_len + x for x in ds]
            # point masses: every node's token drawn at once where the logits are, with the uniform
            # of its depth; two numbers per node reach the host, not a vocabulary row
            draw_all = _draws_every_node(device) and all(d.q is None for d in drafts)
            if draw_all:
                u = torch.stack([s.uniforms[len(s.response) + x] for s, ds in zip(live, depths) for x in ds]).to(device)
            logits = self._forward(ids, pos, slots, cache_lens, tree_mask(drafts, n_nodes, device))
            logp = target_logprobs(logits, params)
            if draw_all:
                drawn = inverse_cdf(logp.exp(), u)
                drawn_lp = logp.gather(1, drawn[:, None]).squeeze(1)
                if overlap:
                    self._catch_up(live, strategy, params, launched_on=device)
                rows = zip(drawn.view(b, n).tolist(), drawn_lp.view(b, n).tolist())
                verified = [verify_drawn(t, lp, d) for (t, lp), d in zip(rows, drafts)]
            else:
                if overlap:
                    self._catch_up(live, strategy, params, launched_on=device)
                logp = logp.view(b, n, -1).cpu()
                sampled = [d for d in drafts if d.q is not None]
                if sampled:  # a draft model's q, on its device, meets p on the host: one copy for all
                    on_host = torch.cat([d.q for d in sampled]).cpu().split([len(d.q) for d in sampled])
                    for d, q in zip(sampled, on_host):
                        d.q = q
                verified = [verify(lp_rows, d, s.uniforms[len(s.response):], self.generator)
                            for s, d, lp_rows in zip(live, drafts, logp)]
            moves: list[tuple[int, int, int]] = []  # (slot, from, to) cache positions of accepted nodes
            emitted = 0
            for s, ds, v, judge in zip(live, depths, verified, judged):
                for k, node in enumerate(v.path, start=1):
                    if node != k:
                        moves.append((s.slot, s.cache_len + node, s.cache_len + k))
                if judge:
                    self._record_acceptance(strategy.drafter, strategy.width, max(ds), len(v.path))
                s.cache_len += 1 + len(v.path)
                emitted += self._emit(s, v.tokens, v.logprobs, params)
            if moves:
                slot, src, dst = (torch.tensor(x, device=device) for x in zip(*moves))
                self.cache.k[:, slot, :, dst] = self.cache.k[:, slot, :, src]
                self.cache.v[:, slot, :, dst] = self.cache.v[:, slot, :, src]
        _sync(device)
        verify_s = time.perf_counter() - t1
        used = strategy if drafts is not None else OFF
        setup = self._observe_time(b * n, verify_s, before)
        if strategy.drafter is not None:  # its cost counts even when it proposed nothing
            self.policy.observe_draft(strategy, draft_s, b)
        seconds = time.perf_counter() - t0
        if self.fixed is None:
            if setup is not None:
                # judged without the bookkeeping that every strategy pays alike: a fixed cost in a
                # ratio would weigh on short (plain) steps more than on long (drafting) ones, and
                # where steps are host-bound it tilted the choice toward drafts that lose
                self.policy.observe_step(used, b, seconds - setup - catch_up_s - sync_s)
            decoding = max(0.0, seconds - (self._setups()[1] - before[1]))  # less captures, tunings
            self.choice_budget.earn(decoding)
            self.trial_budget.earn(decoding)
        self.stats.steps.append(StepRecord(b, str(used), emitted, seconds))

    def _record_acceptance(self, drafter: str, width: int, offered: int, accepted: int, trial: bool = False) -> None:
        """One draft's outcome (verified, or a free trial's), into the policy's running rates and
        this call's counts."""
        self.policy.acceptance.observe(drafter, width, offered, accepted)
        self.stats.count_acceptance(drafter, width, offered, accepted, trial)


def tokens_per_seq_step(counts: dict[str, int]) -> float:
    """Tokens a sequence emitted per decode step, from `GenerationStats.decode_counts` (of one
    call, or summed over several): 1.0 without speculation, 0 before any step."""
    return counts["emitted"] / counts["seq_steps"] if counts["seq_steps"] else 0.0


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on `device`'s kind, None where it is off."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _linear_copies_cover(model: nn.Module) -> bool:
    """Whether every trainable fp32 weight that autocast may cast (and cache) is an exact
    nn.Linear's, which the engine copies: the others here are embeddings' and norms', which
    autocast does not cast."""
    for m in model.modules():
        if any(p.requires_grad and p.dtype == torch.float32 for p in m.parameters(recurse=False)):
            if not (type(m) is nn.Linear or isinstance(m, (nn.Embedding, RMSNorm))):
                return False
    return True


def _storage(model: nn.Module) -> tuple:
    """The model and the storage of its tensors, whose addresses a captured graph replays."""
    return id(model), tuple((t.data_ptr(), t.dtype, t.shape) for t in (*model.parameters(), *model.buffers()))


def _within_budget(d: Draft, s: _Seq, params: SamplingParams) -> Draft:
    """`d` without the nodes `s` could not emit: a step emits at most its remaining budget of
    tokens, the one drawn at the root and the accepted nodes (one per depth)."""
    return _prune(d, params.max_new_tokens - len(s.response) - 1)


def _prune(d: Draft, max_depth: int) -> Draft:
    """Drop the draft nodes deeper than `max_depth`."""
    if not len(d):
        return d
    depths = d.depths()
    if max(depths) <= max_depth:
        return d
    keep = [i for i in range(1, len(d) + 1) if depths[i] <= max_depth]
    new_index = {0: 0, **{old: new for new, old in enumerate(keep, start=1)}}
    q = d.q[[i - 1 for i in keep]] if d.q is not None and keep else None
    return Draft([d.tokens[i - 1] for i in keep], [new_index[d.parents[i - 1]] for i in keep], q)


def _draws_every_node(device: torch.device) -> bool:
    """Whether verification draws a token at every draft node in one batched call (a GPU: cheap
    there, and the host then reads two numbers per node instead of a vocabulary row), or only
    at the nodes its walk reaches (a CPU: a draw is a pass over the vocabulary, and a wide tree
    has many nodes the walk never reaches)."""
    return device.type != "cpu"


def _hides_host_work(device: torch.device) -> bool:
    """Whether the device computes a step while the host goes on (a GPU: kernels are queued), so
    that host work the step's tokens do not wait for is best done between its launch and the
    read of its tokens (`RolloutEngine._catch_up`); a CPU computes each op as it is called."""
    return device.type != "cpu"


def _still_running(device: torch.device) -> Callable[[], bool] | None:
    """On a GPU, a test of whether the work queued on it so far is still running (an event
    recorded now, queried later); None where that cannot be told (a CPU computes as it goes)."""
    if device.type != "cuda":
        return None
    mark = torch.cuda.Event()
    mark.record(torch.cuda.current_stream(device))  # the engine's device, whichever is current
    return lambda: not mark.query()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate", unit="seq", dynamic_ncols=True)


def generate(model: nn.Module, prompts: list[list[int]], params: SamplingParams, device=None, max_batch: int = 64,
             spec: str = "off") -> list[Rollout]:
    """One-shot generation (a fresh engine; keep a `RolloutEngine` to reuse history and calibration)."""
    if device is not None and torch.device(device) != next(model.parameters()).device:
        raise ValueError(f"the model is on {next(model.parameters()).device}, not on {device}")
    return RolloutEngine(model, spec=spec, max_batch=max_batch, calibrate=False).generate(prompts, params)
