"""Drafters: cheap guesses of the next tokens, verified losslessly by the target (speculative.py).

None needs training:
- `NGramDrafter` (prompt lookup): continues the sequence's own text after the last earlier
  occurrence of its trailing n-gram;
- `HistoryDrafter`: the same lookup over a group's shared history: earlier rollouts of the
  same prompt (RL revisits prompts every epoch) and the sibling samples being generated next
  to it (GRPO/RLOO draw several per prompt). Branches where the history disagrees become a tree;
- `ModelDrafter`: a small model with the same tokenizer, or the policy's own first layers
  (`first_layers`), with its own KV cache; it samples a chain (q is kept for the acceptance
  test) or proposes its top-w tokens at the root.

The engine talks to a drafter through `SeqView`s, whose token lists are the engine's own and
grow as the sequences decode: it calls `propose` (after `sync`, which brings the drafter's
indexes up to the tokens so far) and `finish` when a sequence ends. The lookup drafters index
lazily, at `sync`: a step that reads no drafter (plain decoding, most of auto's steps where
drafts do not pay) pays nothing for them.
"""

from __future__ import annotations

import copy
from collections import OrderedDict, defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from remesh.config import ConfigError
from remesh.model.attention import AttnContext
from remesh.rollout.sampling import SamplingParams, target_logprobs
from remesh.rollout.speculative import Draft


@dataclass
class SeqView:
    """What a drafter may read of one running sequence."""

    seq_id: int  # unique within one generate call
    slot: int  # KV-cache slot (ModelDrafter mirrors the engine's slots)
    group: tuple[int, ...]  # the prompt's token ids: samples and epochs of one prompt share it
    # the engine's lists, growing as the sequence decodes: read (and held until `finish`), never changed
    tokens: list[int]  # prompt + response so far (the last one not yet in the target's cache)
    prompt_len: int
    response: list[int]  # tokens[prompt_len:], as its own list


class Drafter:
    name = "drafter"
    # True: proposals are point masses looked up from the tokens alone (no device work, no state
    # that `propose` advances), so an unverified draft can be scored by plain decoding (trials.py)
    free_trials = False

    def propose(self, seqs: list[SeqView], depth: int, width: int) -> list[Draft]:
        raise NotImplementedError

    def max_nodes(self, depth: int, width: int) -> int:
        """Upper bound of a draft's size for this shape (the verifier's tokens per sequence - 1)."""
        return depth * width

    def sync(self, seqs: list[SeqView]) -> None:
        """Bring what the drafter knows of `seqs` (and of their groups) up to their tokens now.
        `propose` needs it first; the engine calls it apart, so that a drafter's timed proposals
        are its lookups alone, not the indexing of tokens emitted while it was not asked."""

    def finish(self, seq: SeqView) -> None:
        """`seq` ended; its tokens are final."""

    def start(self, n_slots: int, max_len: int) -> None:
        """A generate call begins with this many slots."""

    def stop(self) -> None:
        """The generate call ended: free what only that call needed."""


def _continuations(index: dict[int, list[tuple[int, int]]], seqs: dict[int, list[int]],
                   tokens: list[int], exclude: tuple[int, int] | None, max_n: int, depth: int, width: int,
                   max_matches: int = 32) -> Draft:
    """Look up the longest trailing n-gram of `tokens` (n <= max_n) in `index` (n-gram -> (seq, end)),
    and build a draft tree from what followed its most recent occurrences: up to `width`
    distinct first tokens (most frequent first), each continued by the most recent continuation."""
    for n in range(min(max_n, len(tokens)), 0, -1):
        hits = index.get(ngram_key(tokens[-n:]))
        if not hits:
            continue
        conts: list[list[int]] = []
        for sid, end in reversed(hits[-max_matches:]):  # most recent first
            if (sid, end) == exclude:
                continue
            cont = seqs[sid][end + 1:end + 1 + depth]
            if cont:
                conts.append(cont)
        if not conts:
            continue
        counts: dict[int, int] = defaultdict(int)
        for c in conts:
            counts[c[0]] += 1
        firsts = sorted(counts, key=lambda t: -counts[t])[:width]  # stable: ties keep recency order
        out = Draft.empty()
        for f in firsts:
            branch = next(c for c in conts if c[0] == f)
            parent = 0
            for t in branch:
                out.tokens.append(t)
                out.parents.append(parent)
                parent = len(out.tokens)
        return out
    return Draft.empty()


class NGramDrafter(Drafter):
    """Prompt lookup: the continuation of the trailing n-gram's last earlier occurrence in the
    sequence itself (prompt and response), from an index of its n-grams brought up to date at
    each `sync`."""

    name = "ngram"
    free_trials = True

    def __init__(self, max_n: int = 3):
        self.max_n = max_n
        self._index: dict[int, _Group] = {}  # seq_id -> index of its own tokens

    def start(self, n_slots: int, max_len: int) -> None:
        self._index.clear()

    def _own(self, s: SeqView) -> _Group:
        g = self._index.get(s.seq_id)
        if g is None:
            g = self._index[s.seq_id] = _Group(self.max_n)
            g.add(s.tokens)
        return g

    def sync(self, seqs: list[SeqView]) -> None:
        for s in seqs:
            self._own(s).sync()

    def propose(self, seqs: list[SeqView], depth: int, width: int) -> list[Draft]:
        out = []
        for s in seqs:
            g = self._own(s)
            g.sync()
            out.append(_continuations(g.index, g.seqs, s.tokens, None, self.max_n, depth, width))
        return out

    def finish(self, seq: SeqView) -> None:
        self._index.pop(seq.seq_id, None)


class HistoryDrafter(Drafter):
    """N-gram lookup over each prompt's history: its earlier rollouts (kept across generate
    calls, up to `keep_per_group` per prompt and `max_groups` prompts) and its running siblings."""

    name = "history"
    free_trials = True

    def __init__(self, max_n: int = 4, keep_per_group: int = 16, max_groups: int = 4096):
        self.max_n, self.keep, self.max_groups = max_n, keep_per_group, max_groups
        self._groups: OrderedDict[tuple[int, ...], _Group] = OrderedDict()
        self._running: dict[int, tuple[_Group, int]] = {}  # seq_id -> (group, id in the group)

    def _group(self, key: tuple[int, ...]) -> _Group:
        g = self._groups.get(key)
        if g is None:
            g = self._groups[key] = _Group(self.max_n)
            while len(self._groups) > self.max_groups:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        return g

    def start(self, n_slots: int, max_len: int) -> None:
        self.stop()

    def stop(self) -> None:
        # a call that ended early (an exception) leaves sequences running: keep what they wrote,
        # as copies, so that no group holds the engine's lists or grows them forever
        for seq_id in list(self._running):
            g, sid = self._running.pop(seq_id)
            g.retire(sid, self.keep)

    def _register(self, s: SeqView) -> tuple[_Group, int]:
        entry = self._running.get(s.seq_id)
        if entry is None:
            g = self._group(s.group)
            entry = self._running[s.seq_id] = (g, g.add(s.response))
        return entry

    def sync(self, seqs: list[SeqView]) -> None:
        self._synced(seqs)

    def _synced(self, seqs: list[SeqView]) -> list[tuple[_Group, int]]:
        """`seqs`' (group, id), each group indexed up to date once (a group of many samples would
        otherwise walk its running siblings once per sample)."""
        entries = [self._register(s) for s in seqs]
        for g in {id(g): g for g, _ in entries}.values():
            g.sync()
        return entries

    def propose(self, seqs: list[SeqView], depth: int, width: int) -> list[Draft]:
        out = []
        for s, (g, sid) in zip(seqs, self._synced(seqs)):
            resp = s.response
            # look up the response's tail; fall back to the prompt's tail for the first tokens
            query = resp if resp else s.tokens[-self.max_n:]
            own_end = (sid, len(resp) - 1) if resp else None
            out.append(_continuations(g.index, g.seqs, query, own_end, self.max_n, depth, width))
        return out

    def remember(self, prompt: list[int], response: list[int]) -> None:
        """Add a finished response of `prompt` to its history (e.g. rollouts of a previous run)."""
        g = self._group(tuple(prompt))
        g.retire(g.add(response), self.keep)

    def finish(self, seq: SeqView) -> None:
        g, sid = self._register(seq)  # one that no draft or trial read joins the history all the same
        del self._running[seq.seq_id]
        g.retire(sid, self.keep)


_KEY_BASE = 1 << 32  # token ids are below it


def ngram_key(tokens: list[int]) -> int:
    """The n-gram index's key of `tokens`: its ids + 1 as the digits of a base-2^32 number, unique
    over every n (no digit is 0) and cheaper to build and hash than a tuple."""
    key = 0
    for t in tokens:
        key = key * _KEY_BASE + t + 1
    return key


class _Group:
    """Token sequences (one prompt's responses, or one sequence's own tokens) and an index of their
    n-grams (`ngram_key` -> [(seq id, end position)]), built lazily: a running sequence is held
    by reference, its list growing as it decodes, and `sync` indexes what was appended since the
    last one. A group no drafter looks up is never indexed, and a plain step pays nothing."""

    def __init__(self, max_n: int):
        self.max_n = max_n
        self.seqs: dict[int, list[int]] = {}
        self.index: dict[int, list[tuple[int, int]]] = defaultdict(list)
        # sid -> keys of the n-grams ending at its last indexed token, n = 1, 2, ...
        self._tails: dict[int, list[int]] = {}
        self._indexed: dict[int, int] = {}  # sid -> how many of its tokens the index holds
        self._growing: set[int] = set()  # running sequences: `sync` looks at them every time
        self._unsynced: set[int] = set()  # finished ones not indexed to their end yet
        self.finished: list[int] = []
        self._next = 0

    def add(self, tokens: list[int]) -> int:
        """A running sequence, by reference: indexed as it grows, at each `sync`. Returns its id."""
        sid = self._next
        self._next += 1
        self.seqs[sid], self._tails[sid], self._indexed[sid] = tokens, [], 0
        self._growing.add(sid)
        return sid

    def sync(self) -> None:
        # finished sequences first: a lookup takes the most recently indexed occurrence as the most
        # recent, and the running ones wrote their tokens last
        if self._unsynced:
            for sid in sorted(self._unsynced):
                self._index_tokens(sid)
            self._unsynced.clear()
        for sid in sorted(self._growing):  # in start order, not by the ids' hashes
            if self._indexed[sid] < len(self.seqs[sid]):
                self._index_tokens(sid)

    def _index_tokens(self, sid: int) -> None:
        # this runs for every token of every sequence looked up: each n-gram's key from the one
        # before it (one multiply-add), and one (sid, end) tuple for all n
        seq, index, tail, shorter = self.seqs[sid], self.index, self._tails[sid], self.max_n - 1
        for end in range(self._indexed[sid], len(seq)):
            t = seq[end] + 1
            hit = (sid, end)
            tail = [t] + [k * _KEY_BASE + t for k in tail[:shorter]]
            for k in tail:
                index[k].append(hit)
        self._tails[sid], self._indexed[sid] = tail, len(seq)

    def retire(self, sid: int, keep: int) -> None:
        """`sid` has ended: kept as a copy (the engine hands its list to the caller), and the
        oldest finished sequence beyond `keep` forgotten with its index entries."""
        seq = self.seqs[sid] = list(self.seqs[sid])
        self._growing.discard(sid)
        if self._indexed[sid] < len(seq):
            self._unsynced.add(sid)
        self.finished.append(sid)
        if len(self.finished) > keep:
            old = self.finished.pop(0)
            dead, indexed = self.seqs.pop(old), self._indexed.pop(old)
            del self._tails[old]
            self._unsynced.discard(old)
            # each distinct n-gram filtered once: per occurrence, a frequent one would rescan its
            # list as often as it occurs (quadratic in the response's length)
            keys = {ngram_key(dead[end - n + 1:end + 1]) for end in range(indexed)
                    for n in range(1, min(self.max_n, end + 1) + 1)}
            for key in keys:
                hits = [h for h in self.index[key] if h[0] != old]
                if hits:
                    self.index[key] = hits
                else:
                    del self.index[key]


def first_layers(model: nn.Module, n_layers: int) -> nn.Module:
    """The policy's own first `n_layers` layers, final norm and head: a draft model that shares
    the policy's weights (no extra memory for parameters, always in sync after updates)."""
    total = len(model.layers)
    if not 1 <= n_layers < total:
        raise ValueError(f"a self-draft needs 1 <= n_layers < {total}, got {n_layers}")
    draft = copy.copy(model)  # shallow: shares every parameter tensor
    draft._modules = dict(model._modules)
    draft.layers = nn.ModuleDict({k: v for k, v in list(model.layers.items())[:n_layers]})
    draft.args = copy.copy(model.args)
    draft.args.n_layers = n_layers
    return draft


def self_draft_layers(spec: str) -> int | None:
    """N of a draft-model spec self:N, None for a checkpoint; ValueError for a malformed self:."""
    if not spec.startswith("self:"):
        return None
    if not spec[5:].isdigit() or int(spec[5:]) < 1:
        raise ValueError(f"draft model {spec!r}: expected self:N with N >= 1 layers, or a checkpoint")
    return int(spec[5:])


def load_draft_model(spec: str | None, policy: nn.Module, dtype: torch.dtype,
                     option: str = "draft model") -> nn.Module | None:
    """The "model" drafter's model from its spec: None, self:N (the policy's first N layers) or a
    checkpoint (HF folder, .gguf or "default"), loaded frozen next to the policy. Errors start
    with `option`, the config key or flag the spec came from."""
    if spec is None:
        return None
    layers = self_draft_layers(spec)
    if layers is not None:  # shares the policy's weights, so it follows every update
        try:
            return first_layers(policy, layers)
        except ValueError as e:  # N beyond the policy's layers: known only now
            raise ConfigError(f"{option}: {spec}: {e}") from None
    from remesh.checkpoint import load_hf, resolve_model_path

    device = next(policy.parameters()).device
    return load_hf(resolve_model_path(spec, option), head="lm", dtype=dtype, device=device).requires_grad_(False)


class ModelDrafter(Drafter):
    """A draft model with its own KV cache, slot for slot with the engine's. `width` > 1 proposes
    the draft's top-`width` tokens at the root (point masses) and continues the best one greedily;
    `width` == 1 samples a chain from the draft's own sampling distribution (q kept)."""

    name = "model"

    def __init__(self, model: nn.Module, params: SamplingParams | None = None, name: str = "model",
                 vocab_size: int | None = None):
        self.model, self.name = model, name
        self.vocab_size = vocab_size  # the target's: q is padded with zeros to it (no mass where the draft has no row)
        self.params = params or SamplingParams()
        self.generator: torch.Generator | None = None
        self.cache = None
        self._fed: dict[int, list[int]] = {}  # slot -> tokens whose K/V are in the draft cache
        # slot -> how many of them the sequence is known to share: its tokens when last drafted
        # from (it only appends), so only the drafted tail past them is compared again
        self._agreed: dict[int, int] = {}

    def max_nodes(self, depth: int, width: int) -> int:
        return depth + width - 1

    def start(self, n_slots: int, max_len: int) -> None:
        ref = next(self.model.parameters())
        if self.cache is None or self.cache.n_slots < n_slots or self.cache.max_len < max_len:
            self.cache = self.model.new_kv_cache(n_slots, max_len, device=ref.device)
        self._fed, self._agreed = {}, {}
        self.generator = torch.Generator(device=ref.device)
        self.generator.manual_seed(self.params.seed + 7919)

    def stop(self) -> None:
        self.cache = None

    def set_params(self, params: SamplingParams) -> None:
        self.params = params

    def _forward(self, slots: list[int], chunks: list[list[int]]) -> Tensor:
        """Feed each slot its chunk of new tokens; return the logits at each chunk's last token."""
        device = self.cache.k.device
        starts = [len(self._fed[s]) for s in slots]
        ctx = AttnContext.with_cache(self.cache, slots, starts, [len(c) for c in chunks])
        tokens = torch.tensor([t for c in chunks for t in c], device=device)
        # a token beyond a smaller draft vocabulary (a padding row the policy sampled): any stand-in
        # keeps the draft exact, only less likely to be accepted
        tokens = tokens.clamp_max(self.model.args.vocab_size - 1)
        positions = torch.cat([torch.arange(s, s + len(c), device=device) for s, c in zip(starts, chunks)])
        h = self.model(tokens, positions, ctx)
        for s, c in zip(slots, chunks):
            self._fed[s].extend(c)
        return self.model.logits(h[ctx.cu_seqlens[1:].long() - 1])

    @torch.inference_mode()
    def propose(self, seqs: list[SeqView], depth: int, width: int) -> list[Draft]:
        slots = [s.slot for s in seqs]
        chunks = []
        for s in seqs:  # roll the draft cache back to what still agrees with the sequence, feed the rest
            fed = self._fed.setdefault(s.slot, [])
            limit = min(len(fed), len(s.tokens) - 1)
            keep = min(self._agreed.get(s.slot, 0), limit)
            while keep < limit and fed[keep] == s.tokens[keep]:
                keep += 1
            del fed[keep:]
            chunks.append(s.tokens[keep:])
            self._agreed[s.slot] = len(s.tokens)
        logits = self._forward(slots, chunks)
        drafts = [Draft.empty() for _ in seqs]
        qs: list[list[Tensor]] = [[] for _ in seqs]
        chain_params = self.params if width == 1 else SamplingParams(greedy=True)
        for step in range(depth):
            logp = target_logprobs(logits, chain_params)
            if step == 0 and width > 1:  # root: the draft's top-w tokens, point masses
                top = target_logprobs(logits, self.params).topk(width, dim=-1).indices.tolist()
                for d, cands in zip(drafts, top):
                    d.tokens.extend(cands)
                    d.parents.extend([0] * len(cands))
                nxt = [c[0] for c in top]
            else:
                if chain_params.greedy:
                    nxt = logp.argmax(dim=-1).tolist()
                else:
                    probs = logp.exp()
                    nxt = torch.multinomial(probs, 1, generator=self.generator).squeeze(1).tolist()
                    for b in range(len(seqs)):
                        qs[b].append(probs[b])
                for d, t in zip(drafts, nxt):
                    # a chain hangs off its previous token; with a wide root, off the top candidate (node 1)
                    d.parents.append(1 if width > 1 and step == 1 else len(d.tokens))
                    d.tokens.append(t)
            if step + 1 < depth:
                logits = self._forward(slots, [[t] for t in nxt])
        if width == 1 and not chain_params.greedy:
            for d, q in zip(drafts, qs):
                q = torch.stack(q)
                d.q = F.pad(q, (0, self.vocab_size - q.shape[-1])) if self.vocab_size else q
        return drafts

    def finish(self, seq: SeqView) -> None:
        self._fed.pop(seq.slot, None)
        self._agreed.pop(seq.slot, None)
