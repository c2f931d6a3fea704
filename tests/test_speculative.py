"""Speculative decoding: the acceptance rules by hand, exactness of the output distribution
(chi-square against the target's exact distribution), and the engine's speculative paths."""

from __future__ import annotations

import math

import pytest
import torch

from remesh.model import AttnContext
from remesh.rollout import RolloutEngine, SamplingParams, greedy, target_logprobs
from remesh.rollout import speculative
from remesh.rollout.adaptive import (OFF, AcceptanceStats, AdaptivePolicy, OverheadBudget, StepTimeModel, Strategy,
                                    levels_judged, parse_strategy)
from remesh.rollout.drafters import Drafter, HistoryDrafter, NGramDrafter, SeqView, first_layers
from remesh.rollout.sampling import inverse_cdf
from remesh.rollout.speculative import Draft, matched_depth, tree_mask, verify, verify_drawn
from remesh.rollout.trials import Trial, Trials
from tests.models import tiny_model
from tests.test_sampler import PROMPTS, peaky_model


def logp_rows(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows).log()


# 1. the acceptance rules by hand ------------------------------------------------------------


def test_point_mass_chain_accepts_when_the_target_draws_the_draft():
    p = [0.5, 0.3, 0.2]
    logp = logp_rows(p, [0.1, 0.1, 0.8])  # root, then the draft node
    draft = Draft.chain([1])
    # u = 0.6 falls in token 1's CDF interval [0.5, 0.8): accepted; bonus from the leaf with u = 0.85
    v = verify(logp, draft, torch.tensor([0.6, 0.85]))
    assert v.path == [1] and v.tokens == [1, 2]
    assert v.logprobs == pytest.approx([math.log(0.3), math.log(0.8)])
    # u = 0.1 draws token 0: the draft is rejected and token 0 emitted
    v = verify(logp, draft, torch.tensor([0.1, 0.85]))
    assert v.path == [] and v.tokens == [0] and v.logprobs == pytest.approx([math.log(0.5)])


def test_point_mass_tree_accepts_the_matching_branch():
    logp = logp_rows([0.5, 0.3, 0.2], [1 / 3] * 3, [0.9, 0.05, 0.05], [0.2, 0.2, 0.6])
    # root -> {token 2 (node 1), token 0 (node 2)}; node 2 -> token 1 (node 3)
    draft = Draft([2, 0, 1], [0, 0, 2])
    v = verify(logp, draft, torch.tensor([0.2, 0.25, 0.5]))  # root draws 0 -> node 2; node 2 draws 0 != 1
    assert v.path == [2] and v.tokens == [0, 0]
    assert v.logprobs == pytest.approx([math.log(0.5), math.log(0.9)])


def test_sampled_draft_rule_min_p_over_q_then_residual():
    p, q = [0.5, 0.5], [0.9, 0.1]
    logp = logp_rows(p, [0.5, 0.5])
    draft = Draft.chain([0], q=torch.tensor([q]))
    accepted, n = 0, 4000
    gen = torch.Generator().manual_seed(0)
    for _ in range(n):
        v = verify(logp, draft, torch.rand(2, generator=gen), gen)
        if v.path:
            accepted += 1
        else:  # the residual max(0, p - q) = [0, 0.4] holds token 1 only
            assert v.tokens == [1]
    assert accepted / n == pytest.approx(0.5 / 0.9, abs=0.03)


def test_tree_mask_and_draft_validation():
    d = Draft([7, 8, 9], [0, 0, 1])
    m = tree_mask([d, Draft.chain([4])], 3)
    assert m[0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    assert m[1].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]  # padding: self only
    assert d.depths() == [0, 1, 1, 2]
    with pytest.raises(ValueError, match="parents must come first"):
        Draft([1, 2], [0, 2])


def test_matched_depth_by_hand():
    # root -> {5 (node 1) -> 6 (node 2)}, {7 (node 3) -> 8 (node 4)}
    d = Draft([5, 6, 7, 8], [0, 1, 0, 3])
    assert [matched_depth(d, e) for e in ([7, 8, 9], [5, 9], [5, 6], [9, 5], [], [7])] == [2, 1, 2, 0, 0, 1]


def random_point_mass_cases(seed: int, count: int = 300):
    """(draft, target log-probs, uniforms): random trees of 1-6 nodes over a 3-token vocabulary
    (small, so that drafts are often accepted)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        n = int(torch.randint(1, 7, (), generator=gen))
        parents = [int(torch.randint(0, i + 1, (), generator=gen)) for i in range(n)]
        draft = Draft(torch.randint(0, 3, (n,), generator=gen).tolist(), parents)
        yield draft, torch.randn(n + 1, 3, generator=gen).log_softmax(-1), torch.rand(n + 1, generator=gen)


def test_matched_depth_of_the_emitted_tokens_is_what_verification_accepts():
    """A free trial scores a draft by the tokens plain decoding emits: for point-mass drafts the
    accepted depth is the depth of the path spelling them, whatever p and the uniforms."""
    for draft, logp, u in random_point_mass_cases(0):
        v = verify(logp, draft, u)
        assert matched_depth(draft, v.tokens) == len(v.path)


def test_verify_from_each_nodes_draw_by_hand_and_equal_to_verify():
    # root -> {5 (node 1) -> 6 (node 2)}, {7 (node 3)}; draws at root, 1, 2, 3
    d = Draft([5, 6, 7], [0, 1, 0])
    v = verify_drawn([5, 9, 4, 8], [-0.1, -0.2, -0.3, -0.4], d)
    assert (v.path, v.tokens, v.logprobs) == ([1], [5, 9], [-0.1, -0.2])
    v = verify_drawn([7, 9, 4, 8], [-0.1, -0.2, -0.3, -0.4], d)
    assert (v.path, v.tokens, v.logprobs) == ([3], [7, 8], [-0.1, -0.4])
    with pytest.raises(ValueError, match="point-mass"):
        verify_drawn([0], [0.0], Draft.chain([1], torch.ones(1, 4) / 4))
    # what the engine does on the device: every node drawn with the uniform of its depth
    for draft, logp, u in random_point_mass_cases(1):
        drawn = inverse_cdf(logp.exp(), u[torch.tensor(draft.depths())])
        got = verify_drawn(drawn.tolist(), logp.gather(1, drawn[:, None]).squeeze(1).tolist(), draft)
        want = verify(logp, draft, u)
        assert (got.path, got.tokens, got.logprobs) == (want.path, want.tokens, want.logprobs)


# 2. exactness: the first 3 tokens' joint distribution equals the target's ----------------------

V = 6
PROMPT = [1, 4, 2]


def exact_joint(model, params: SamplingParams) -> torch.Tensor:
    """P(t1, t2, t3 | PROMPT) under the sampling distribution, by enumerating every prefix."""
    seqs = [PROMPT + [a, b] for a in range(V) for b in range(V)]
    with torch.no_grad():
        h = model(torch.tensor([t for s in seqs for t in s]), torch.arange(len(PROMPT) + 2).repeat(len(seqs)),
                  AttnContext.packed([len(s) for s in seqs]))
        lp = target_logprobs(model.logits(h), params).view(len(seqs), len(PROMPT) + 2, V)
    p1 = lp[0, len(PROMPT) - 1].exp()  # [V]
    p2 = lp[::V, len(PROMPT)].exp()  # [V (t1), V (t2)]
    p3 = lp[:, len(PROMPT) + 1].exp().view(V, V, V)  # [t1, t2, t3]
    return p1[:, None, None] * p2[:, :, None] * p3


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test, cells with expected count < 5 pooled into one."""
    n = counts.sum()
    expected = probs.flatten().double() * n
    counts = counts.flatten().double()
    small = expected < 5
    exp_cells = torch.cat([expected[~small], expected[small].sum()[None]])
    obs_cells = torch.cat([counts[~small], counts[small].sum()[None]])
    keep = exp_cells > 0
    stat = float(((obs_cells[keep] - exp_cells[keep]) ** 2 / exp_cells[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def sampled_joint(engine: RolloutEngine, params: SamplingParams) -> torch.Tensor:
    counts = torch.zeros(V, V, V)
    for r in engine.generate([PROMPT], params):
        counts[tuple(r.response_ids[:3])] += 1
    return counts


def spec_models():
    target = tiny_model("llama", vocab_size=V, seed=0)
    draft = tiny_model("llama", vocab_size=V, seed=5)  # deliberately different
    with torch.no_grad():
        target.output.weight.mul_(5.0)  # far from uniform, so that draft and target disagree
        draft.output.weight.mul_(5.0)
    return target.eval(), draft.eval()


SETTINGS = {"t1": dict(temperature=1.0), "t0.7-top_p0.9": dict(temperature=0.7, top_p=0.9)}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("spec", ["model:3", "model:2x3", "off"], ids=["chain", "tree", "plain"])
def test_speculative_output_distribution_is_the_targets(spec, setting):
    target, draft = spec_models()
    params = SamplingParams(max_new_tokens=3, n=6000, seed=11, **SETTINGS[setting])
    engine = RolloutEngine(target, spec=spec, draft_model=draft, max_batch=6000)
    counts = sampled_joint(engine, params)
    exact = exact_joint(target, params)
    assert chi_square_pvalue(counts, exact) > 1e-3
    if spec != "off":  # the drafts were really used, and really differ from the target
        acc = engine.stats.acceptance_by_position()
        assert 0.05 < next(iter(acc.values()))[0] < 0.95


def test_lossy_rule_fails_the_same_check(monkeypatch):
    """Control: resampling from p instead of the residual max(0, p - q) after a rejection is the
    classic bug; the chi-square check above must catch it."""
    monkeypatch.setattr(speculative, "residual", lambda p, q: p.clone())
    target, draft = spec_models()
    params = SamplingParams(max_new_tokens=3, n=6000, seed=11, temperature=1.0)
    counts = sampled_joint(RolloutEngine(target, spec="model:3", draft_model=draft, max_batch=6000), params)
    assert chi_square_pvalue(counts, exact_joint(target, params)) < 1e-6


# 3. the engine's speculative paths -----------------------------------------------------------

SPECS = ["ngram:3", "history:3x2", "model:3", "model:2x2", "auto"]


@pytest.mark.parametrize("spec", SPECS)
def test_greedy_speculative_equals_greedy_plain(spec):
    model = peaky_model("llama").eval()
    params = greedy(SamplingParams(max_new_tokens=12))
    plain = RolloutEngine(model).generate(PROMPTS, params)
    fast = RolloutEngine(model, spec=spec, draft_model=first_layers(model, 1), max_batch=3).generate(PROMPTS, params)
    assert [r.response_ids for r in fast] == [r.response_ids for r in plain]
    assert [r.logprobs for r in fast] == [[0.0] * 12] * len(PROMPTS)


@pytest.mark.parametrize("spec", ["ngram:3", "history:2x3", "model:2x2", "auto"])
def test_point_mass_speculation_gives_plain_samples(spec):
    """Each sequence draws one uniform per position, so point-mass drafts leave the samples as they
    are; the batch size does not change them either (continuous batching)."""
    model = peaky_model("llama").eval()
    params = SamplingParams(max_new_tokens=10, n=3, seed=3, temperature=0.8, top_p=0.9)
    plain = RolloutEngine(model).generate(PROMPTS, params)
    if spec == "auto":  # auto may pick the stochastic model chain: use point-mass drafters only
        fast = RolloutEngine(model, spec=spec, max_batch=5).generate(PROMPTS, params)
    else:
        fast = RolloutEngine(model, spec=spec, draft_model=first_layers(model, 1), max_batch=5).generate(
            PROMPTS, params)
    assert [r.response_ids for r in fast] == [r.response_ids for r in plain]
    torch.testing.assert_close(torch.tensor([x for r in fast for x in r.logprobs]),
                               torch.tensor([x for r in plain for x in r.logprobs]), atol=1e-5, rtol=0)


# a sliding window (4) shorter than the contexts: a tree node's window ends at its depth, not its index
@pytest.mark.parametrize("spec,window", [("model:3", None), ("history:3x2", None), ("model:2x2", 4),
                                         ("history:3x2", 4)])
def test_speculative_logprobs_match_teacher_forcing(spec, window):
    model = tiny_model("mistral", sliding_window=window) if window else tiny_model("llama")
    params = SamplingParams(temperature=0.7, max_new_tokens=8, n=2, seed=1)
    rollouts = RolloutEngine(model, spec=spec, draft_model=first_layers(model, 1)).generate(PROMPTS, params)
    seqs = [r.prompt_ids + r.response_ids for r in rollouts]
    with torch.no_grad():
        h = model(torch.tensor([t for s in seqs for t in s]), torch.cat([torch.arange(len(s)) for s in seqs]),
                  AttnContext.packed([len(s) for s in seqs]))
        idx, targets, start = [], [], 0
        for r, s in zip(rollouts, seqs):
            idx += range(start + len(r.prompt_ids) - 1, start + len(s) - 1)
            targets += r.response_ids
            start += len(s)
        ref = model.token_logprobs(h[idx], torch.tensor(targets), temperature=0.7)
    torch.testing.assert_close(torch.tensor([x for r in rollouts for x in r.logprobs]), ref, atol=1e-4, rtol=0)


def test_sampled_draft_chains_depend_on_the_calls_seed_only():
    """The draft model samples its chains from a generator seeded by the call's seed: the same
    call gives the same rollouts on a fresh engine and after other calls."""
    model = tiny_model("llama")
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=2, seed=2)
    fresh = RolloutEngine(model, spec="model:3", draft_model=first_layers(model, 1)).generate(PROMPTS, params)
    used = RolloutEngine(model, spec="model:3", draft_model=first_layers(model, 1))
    used.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=8, seed=7))
    again = used.generate(PROMPTS, params)
    assert [r.response_ids for r in again] == [r.response_ids for r in fresh]


def test_a_draft_model_of_a_larger_vocabulary_is_refused():
    model = tiny_model("llama", vocab_size=97)
    with pytest.raises(ValueError, match="vocabulary has 101 tokens, the policy's 97"):
        RolloutEngine(model, spec="model:3", draft_model=tiny_model("llama", vocab_size=101))


def test_a_draft_model_of_a_smaller_vocabulary_drafts_exactly():
    """A sibling checkpoint's embedding may be padded less than the policy's: its q has no mass
    on the policy's last tokens, and the samples are still the target's (the check above)."""
    target, _ = spec_models()
    draft = tiny_model("llama", vocab_size=V - 2, seed=5)
    params = SamplingParams(max_new_tokens=3, n=6000, seed=11, temperature=1.0)
    engine = RolloutEngine(target, spec="model:3", draft_model=draft.eval(), max_batch=6000)
    assert chi_square_pvalue(sampled_joint(engine, params), exact_joint(target, params)) > 1e-3
    assert 0.05 < engine.stats.acceptance_by_position()["model"][0] < 0.95


class ChainDrafter(Drafter):
    """Always proposes the chain 1, 2, 3, ... (as deep as asked), counting its nodes."""

    name, free_trials = "ngram", True

    def __init__(self):
        self.proposed = 0

    def propose(self, seqs, depth, width):
        self.proposed += depth * len(seqs)
        return [Draft(list(range(1, depth + 1)), list(range(depth))) for _ in seqs]


@pytest.mark.parametrize("auto", [False, True])
def test_drafts_cut_away_by_the_length_limit_are_not_counted_as_misses(auto):
    """With one token left a sequence can take no draft: the engine drops it, and neither a verified
    step nor a free trial counts the drafter's proposal as a miss (it says nothing of its rate)."""
    model = peaky_model("llama").eval()
    engine = RolloutEngine(model, spec="auto" if auto else "ngram:3", max_batch=6, calibrate=False,
                           overhead_budget=None)
    engine.drafters["ngram"] = drafter = ChainDrafter()
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=2, seed=1))
    assert drafter.proposed > 0  # the drafter did propose, and every draft was cut to nothing
    assert engine.stats.acceptance == {} and engine.stats.trials == {}
    assert "ngram" not in engine.policy.acceptance.by_position()


class HalfRightDrafter(Drafter):
    """Proposes the true greedy continuation for prompts of even length, a wrong chain for the
    others: sequences then advance at different paces and reach the length limit apart."""

    name, free_trials = "ngram", True

    def __init__(self, truth: dict[tuple[int, ...], list[int]]):
        self.truth = truth

    def propose(self, seqs, depth, width):
        out = []
        for s in seqs:
            future = self.truth[s.group][len(s.response):][:depth] if s.prompt_len % 2 == 0 else []
            chain = future or [1] * depth
            out.append(Draft(chain, list(range(len(chain)))))
        return out


def test_a_step_counts_the_drafts_of_sequences_with_room_only():
    """In a step where some sequences have room for a draft and others have one token left, only
    the former's drafts are counted (the latter's are cut away: no evidence on the drafter)."""
    model = peaky_model("llama").eval()
    params = greedy(SamplingParams(max_new_tokens=6))
    plain = RolloutEngine(model).generate(PROMPTS, params)
    engine = RolloutEngine(model, spec="ngram:3", max_batch=2, calibrate=False)
    engine.drafters["ngram"] = HalfRightDrafter({tuple(r.prompt_ids): r.response_ids for r in plain})
    with_room, mixed, step = [], [], engine._step

    def counted_step(live, strategy, params, device):
        room = [params.max_new_tokens - len(s.response) - 1 >= 1 for s in live]
        if any(room):  # else no draft is left: a plain step
            with_room.append(sum(room))
            mixed.append(not all(room))
        return step(live, strategy, params, device)

    engine._step = counted_step
    assert [r.response_ids for r in engine.generate(PROMPTS, params)] == [r.response_ids for r in plain]
    assert any(mixed)
    assert engine.stats.acceptance["ngram"][0][1] == sum(with_room)


class OracleDrafter(Drafter):
    """Proposes a wrong token first and the true greedy token second at the root, then the true
    continuation under the second branch: the accepted path is never node 1, 2, 3, ..., so the
    engine must move the accepted keys/values into place."""

    name = "oracle"

    def __init__(self, truth: dict[tuple[int, ...], list[int]]):
        self.truth = truth

    def propose(self, seqs, depth, width):
        out = []
        for s in seqs:
            future = self.truth[s.group][len(s.tokens) - s.prompt_len:][:depth]
            if not future:
                out.append(Draft.empty())
                continue
            wrong = (future[0] + 1) % 97
            out.append(Draft([wrong] + future, [0, 0] + list(range(2, len(future) + 1))))
        return out


def test_tree_acceptance_off_the_first_branch_compacts_the_cache():
    model = peaky_model("llama").eval()
    params = greedy(SamplingParams(max_new_tokens=12))
    plain = RolloutEngine(model).generate(PROMPTS, params)
    truth = {tuple(r.prompt_ids): r.response_ids for r in plain}
    engine = RolloutEngine(model, spec="history:3")
    engine.drafters["oracle"] = OracleDrafter(truth)
    engine.fixed = Strategy("oracle", 3, 2)
    out = engine.generate(PROMPTS, params)
    assert [r.response_ids for r in out] == [r.response_ids for r in plain]
    assert engine.stats.acceptance_by_position()["oraclex2"][:3] == [1.0, 1.0, 1.0]
    assert len(engine.stats.steps) <= 4  # 12 tokens, 4 per step (3 accepted + 1 bonus)


# 4. drafters ---------------------------------------------------------------------------------


def test_ngram_keys_are_unique_over_every_n_and_built_incrementally():
    """A key per n-gram, distinct across lengths (a leading token 0 still counts); the index
    of a growing sequence, synced in pieces, holds every n-gram up to max_n at its end position."""
    from remesh.rollout.drafters import _Group, ngram_key

    assert ngram_key([5]) != ngram_key([0, 5]) != ngram_key([0, 0, 5])
    assert ngram_key([1, 2]) == 2 * 2 ** 32 + 3
    g = _Group(max_n=3)
    tokens = [4, 0, 4]
    sid = g.add(tokens)
    assert not g.index  # lazy: nothing is indexed before a sync
    g.sync()
    tokens += [0, 7]  # the sequence grows; the group holds it by reference
    g.sync()
    want: dict[int, list[tuple[int, int]]] = {}
    for end in range(len(tokens)):
        for n in range(1, min(3, end + 1) + 1):
            want.setdefault(ngram_key(tokens[end - n + 1:end + 1]), []).append((sid, end))
    assert dict(g.index) == want and g.index[ngram_key([4, 0])] == [(sid, 1), (sid, 3)]


def _index_of(g) -> dict[int, list[tuple[int, int]]]:
    """What `_Group.index` should hold for the group's sequences: every n-gram at its end."""
    from remesh.rollout.drafters import ngram_key

    want: dict[int, list[tuple[int, int]]] = {}
    for sid in sorted(g.seqs):
        seq = g.seqs[sid]
        for end in range(len(seq)):
            for n in range(1, min(g.max_n, end + 1) + 1):
                want.setdefault(ngram_key(seq[end - n + 1:end + 1]), []).append((sid, end))
    return want


@pytest.mark.parametrize("synced", [(), (0,), (0, 1, 2)])
def test_a_group_forgets_its_oldest_response_and_its_index_entries(synced):
    """Whether a forgotten response was indexed (a sync before its successors came) or not."""
    from remesh.rollout.drafters import _Group

    g = _Group(max_n=3)
    for i, tokens in enumerate(([4, 0, 4, 0], [0, 4, 9], [9, 9, 4, 0])):
        sid = g.add(tokens)
        if i in synced:
            g.sync()
        g.retire(sid, keep=2)
    assert sorted(g.seqs) == [1, 2] and g.finished == [1, 2]
    g.sync()
    assert dict(g.index) == _index_of(g)


def test_a_retired_sequence_is_kept_as_a_copy():
    """The engine hands a finished response's list to its caller, who may change it."""
    from remesh.rollout.drafters import _Group

    g = _Group(max_n=2)
    response = [3, 4, 5]
    g.retire(g.add(response), keep=4)
    response.append(6)
    g.sync()
    assert g.seqs[0] == [3, 4, 5] and dict(g.index) == _index_of(g)


@pytest.mark.parametrize("hides_host_work", [False, True])
@pytest.mark.parametrize("spec, budget", [("history:2x2", None), ("auto", None), ("auto", 0.0)])
def test_the_history_holds_every_finished_response_once(monkeypatch, spec, budget, hides_host_work):
    """Whatever the order of the bookkeeping (a GPU's: deferred to the next step's launch), the
    history drafter ends a call with each finished response whole, indexed once, and no
    sequence left running; also the responses no draft or trial read (budget 0: one choice
    and one round of trials in the whole call)."""
    from remesh.rollout import engine as engine_module

    monkeypatch.setattr(engine_module, "_hides_host_work", lambda device: hides_host_work)
    model = peaky_model("llama").eval()
    engine = RolloutEngine(model, spec=spec, max_batch=3, calibrate=False, overhead_budget=budget)
    rollouts = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, n=2, seed=4))
    history = engine.drafters["history"]
    assert not history._running
    for prompt in PROMPTS:
        g = history._groups[tuple(prompt)]
        assert sorted(g.seqs.values()) == sorted(r.response_ids for r in rollouts if r.prompt_ids == prompt)
        g.sync()  # what the call left unindexed (a response that ended after its group's last lookup)
        assert {k: sorted(v) for k, v in g.index.items()} == _index_of(g)  # (running siblings interleave)


def test_forward_seconds_times_a_step_over_the_kept_cache():
    model = peaky_model("llama").eval()
    engine = RolloutEngine(model, spec="off", max_batch=2, calibrate=False, keep_cache=True)
    engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=3, seed=0))
    assert 0 < engine.forward_seconds(reps=5) < 1
    with pytest.raises(ValueError, match="keep_cache=True"):
        RolloutEngine(model, spec="off").forward_seconds()
    with pytest.raises(ValueError, match="reps"):
        engine.forward_seconds(reps=0)


def view(tokens, prompt_len, seq_id=0, group=(1,)):
    return SeqView(seq_id, 0, tuple(group), list(tokens), prompt_len, list(tokens[prompt_len:]))


def test_ngram_prompt_lookup():
    d = NGramDrafter(max_n=2)
    # trailing bigram (5, 6) occurred before, followed by 7 8 9
    draft = d.propose([view([5, 6, 7, 8, 9, 3, 5, 6], 3)], depth=3, width=1)[0]
    assert draft.tokens == [7, 8, 9] and draft.parents == [0, 1, 2]
    assert len(d.propose([view([1, 2, 3], 2, seq_id=1)], 3, 1)[0]) == 0  # nothing to look up


def test_drafters_read_the_growing_token_lists_they_were_given():
    """No per-token notification: a proposal sees what the engine appended since the last one,
    the sequence's own tokens and its running siblings'."""
    d = NGramDrafter(max_n=2)
    s = view([5, 6, 7, 1], 2)
    assert len(d.propose([s], depth=2, width=1)[0]) == 0  # (7, 1) and 1 occur nowhere earlier
    s.tokens.extend([5, 6])
    s.response.extend([5, 6])
    assert d.propose([s], depth=2, width=1)[0].tokens == [7, 1]

    h = HistoryDrafter(max_n=2)
    a, b = view([9, 1, 2], 1, seq_id=0, group=(9,)), view([9, 1], 1, seq_id=1, group=(9,))
    h.propose([a, b], depth=3, width=1)  # both registered
    a.tokens.extend([3, 4])
    a.response.extend([3, 4])
    assert h.propose([b], depth=3, width=1)[0].tokens == [2, 3, 4]


def test_the_history_keeps_responses_it_never_read_and_those_of_a_call_cut_short():
    d = HistoryDrafter(max_n=2)
    d.finish(view([9, 1, 2, 3], 1, seq_id=0, group=(9,)))  # never proposed for
    cut = view([9, 1, 2, 5], 1, seq_id=1, group=(9,))
    d.sync([cut])  # running when the call ends early
    d.stop()
    g = d._groups[(9,)]
    assert sorted(g.seqs.values()) == [[1, 2, 3], [1, 2, 5]] and not d._running
    cut.response.append(6)  # the engine's list: the history kept a copy
    assert g.seqs[1] == [1, 2, 5]
    assert sorted(d.propose([view([9, 1, 2], 1, seq_id=2, group=(9,))], depth=1, width=2)[0].tokens) == [3, 5]


def test_history_drafts_follow_a_running_sibling_before_an_earlier_epoch():
    """Where the history's continuations tie, the most recent wins: a running sibling's, not an
    earlier epoch's response that the group indexes at the same first lookup."""
    d = HistoryDrafter(max_n=2)
    d.remember([9], [1, 2, 3])
    sibling, me = view([9, 1, 2, 5], 1, seq_id=0, group=(9,)), view([9, 1, 2], 1, seq_id=1, group=(9,))
    d.sync([sibling, me])
    assert d.propose([me], depth=1, width=1)[0].tokens == [5]
    assert d.propose([me], depth=1, width=2)[0].tokens == [5, 3]


def test_history_drafter_uses_earlier_rollouts_and_builds_trees():
    d = HistoryDrafter(max_n=2)
    prompt = [9, 9]
    for sid, resp in enumerate([[1, 2, 3, 4], [1, 2, 5, 6], [1, 2, 5, 7]]):  # an earlier epoch's rollouts
        s = view(prompt + resp, 2, seq_id=sid, group=prompt)
        d.sync([s])
        d.finish(s)
    d.start(4, 64)  # a new generate call keeps the history
    draft = d.propose([view(prompt + [1, 2], 2, seq_id=0, group=prompt)], depth=2, width=2)[0]
    # after (1, 2): "5" twice (most recent 5 7), "3" once -> two branches, most frequent first
    assert draft.tokens == [5, 7, 3, 4] and draft.parents == [0, 1, 0, 3]
    other = d.propose([view([8] + [1, 2], 1, seq_id=1, group=(8,))], depth=2, width=2)[0]
    assert len(other) == 0  # another prompt has no history


# 5. the adaptive policy ----------------------------------------------------------------------


def test_step_time_model_interpolates_and_extrapolates():
    m = StepTimeModel()
    m.observe(10, 1.0)
    m.observe(30, 2.0)
    assert m.predict(20) == pytest.approx(1.5)
    assert m.predict(50) == pytest.approx(3.0)  # last slope
    assert m.predict(5) == pytest.approx(1.0)  # never cheaper than the smallest measured


def test_step_time_model_ignores_a_stalled_step():
    """The median of the last observations per size: one 4x stall does not move the estimate,
    a lasting change does within a few steps."""
    m = StepTimeModel(window=5)
    for s in (1.0, 1.1, 0.9, 4.0):
        m.observe(16, s)
    assert m.predict(16) == pytest.approx(1.05)  # median of 0.9, 1.0, 1.1, 4.0
    for _ in range(3):
        m.observe(16, 2.0)
    assert m.predict(16) == pytest.approx(2.0)  # the last five: 0.9, 4.0, 2.0, 2.0, 2.0


def test_step_time_model_never_predicts_more_tokens_faster():
    """Medians 0.10, 0.13, 0.12, 0.11 s at 16, 17, 32, 34 tokens (noise): 17-34 pooled to their
    mean, 0.12 s, so 34 tokens cost no less than 17; a new point inside the run joins the pool."""
    m = StepTimeModel()
    for t, s in [(16, 0.10), (17, 0.13), (32, 0.12), (34, 0.11), (64, 0.2)]:
        m.observe(t, s)
    assert [m.predict(t) for t in (16, 17, 32, 34, 64)] == pytest.approx([0.10, 0.12, 0.12, 0.12, 0.2])
    assert m.predict(48) == pytest.approx(0.12 + (0.2 - 0.12) * 14 / 30)  # interpolated on the fit
    m.observe(20, 0.125)
    assert m.predict(20) == pytest.approx((0.13 + 0.125 + 0.12 + 0.11) / 4)


def test_step_time_model_drops_a_stale_point_between_fresh_ones():
    """A count not observed in the last `max_age` observations goes where fresher counts lie on
    both sides (interpolated from them); below or above every fresh count it stays."""
    m = StepTimeModel(max_age=3)
    for t, s in [(1, 0.1), (16, 0.9), (32, 0.4), (64, 0.8)]:
        m.observe(t, s)
    assert m.predict(16) == pytest.approx(0.65)  # 0.9 and 0.4 pooled (`_fitted`)
    for t, s in [(8, 0.2), (32, 0.4), (8, 0.2)]:  # 1 and 16 now stale: 16 lies between 8 and 32
        m.observe(t, s)
    assert [t for t, _ in m.points()] == [1, 8, 32, 64]
    assert m.predict(16) == pytest.approx(0.2 + 0.2 * 8 / 24)
    assert StepTimeModel(max_age=None).max_age is None  # kept forever, as before


def run_policy_at_64(max_age: int | None, steps: int = 40) -> list[Strategy]:
    """A policy whose plain step at 64 tokens was measured at twice its time (a passing load),
    then steps on a quiet device at 64 live sequences, plain steps at 32 between them. A one-token
    draft at 64 is verified over 128 tokens, whose point the drafting steps refresh and which the
    stale 64 pools with: drafting looks no dearer than decoding plainly, at 10% acceptance."""
    def device(tokens: int) -> float:
        return 0.03 + 0.003 * tokens

    policy = AdaptivePolicy(drafters={"history": 1}, depths=(1,), widths=(1,), explore_every=10 ** 9,
                            step_time=StepTimeModel(max_age=max_age),
                            acceptance=AcceptanceStats(prior=0.1, prior_weight=0.0))
    for t in (1, 2, 4, 8, 16, 32, 64, 128):
        policy.step_time.observe(t, device(t) * (2 if t == 64 else 1))
    chosen = []
    for _ in range(steps):
        for batch in (64, 32):
            s = policy.choose(batch)
            tokens = batch * (1 + policy.nodes(s))
            policy.step_time.observe(tokens, device(tokens))
            policy.observe_step(s, batch, device(tokens))
            if batch == 64:
                chosen.append(s)
    return chosen


def test_a_plain_step_measured_slow_is_not_believed_forever():
    """Kept forever, the stale point keeps the policy drafting at 64 at a loss (plain steps at 64,
    the only ones that would correct it, never come); once it is `max_age` observations old it
    is interpolated from fresh points, plain decoding wins, and its next step refreshes it."""
    kept = run_policy_at_64(max_age=None)
    assert set(kept) == {Strategy("history", 1, 1)}
    aged = run_policy_at_64(max_age=16)
    assert aged[0] == Strategy("history", 1, 1)
    first_plain = aged.index(OFF)
    assert first_plain <= 9 and set(aged[first_plain:]) == {OFF}


def test_expected_accepted_tokens():
    s = AcceptanceStats(prior=0.5, prior_weight=0.0, min_rate=0.0)
    for accepted in (2, 2, 1, 0):  # depth-3 drafts
        s.observe("ngram", 1, 3, accepted)
    # alpha1 = 3/4, alpha2 = 2/3 (of the 3 that reached depth 2), alpha3 = 0/2
    assert s.alphas("ngram", 1, 3) == pytest.approx([0.75, 2 / 3, 0.0])
    assert s.expected_accepted("ngram", 1, 3) == pytest.approx(0.75 + 0.5)


def test_a_drafts_outcome_judges_the_depths_accepted_and_the_first_rejected():
    assert levels_judged(offered=4, accepted=2) == 3  # depths 1, 2 accepted; 3 rejected; 4 never reached
    assert levels_judged(offered=4, accepted=4) == 4  # all accepted: no depth 5 was offered
    assert levels_judged(offered=3, accepted=0) == 1
    assert levels_judged(offered=0, accepted=0) == 1  # no proposal: a miss at depth 1


def test_policy_speculates_in_the_long_tail_and_not_at_large_batch():
    policy = AdaptivePolicy(drafters={"ngram": 1}, depths=(1, 2, 4), widths=(1,))
    for t, s in [(1, 0.1), (3, 0.1), (8, 0.15), (64, 0.8), (320, 4.0)]:  # flat while memory-bound, then linear
        policy.step_time.observe(t, s)
    for _ in range(50):
        policy.acceptance.observe("ngram", 1, 4, 2)  # alpha = 1, 1, 0, 0
    assert policy.choose(1) == Strategy("ngram", 2, 1)  # 3 tokens for the price of one
    assert policy.choose(64) == Strategy()  # compute-bound: drafts cost as much as they bring


def test_policy_choice_is_the_candidate_of_largest_goodput():
    """`choose` computes goodputs group by group; it must pick what the per-strategy formula
    ranks first, if that beats plain decoding by `min_gain`, whatever the rates, times, draft
    costs and corrections."""
    gen = torch.Generator().manual_seed(0)
    chosen = {True: 0, False: 0}  # off, a draft
    for trial in range(40):
        policy = AdaptivePolicy(drafters={"ngram": 4, "history": 4, "model": 2}, node_count={},
                                explore_every=10 ** 9)
        for t in (1, 2, 4, 8, 16, 64, 256, 1024):
            policy.step_time.observe(t, 0.01 * (1 + t * float(torch.rand((), generator=gen)) / 64))
        for name, width in (("ngram", 1), ("ngram", 2), ("history", 1), ("history", 4), ("model", 1)):
            for _ in range(int(torch.randint(0, 30, (), generator=gen))):
                depth = int(torch.randint(1, 9, (), generator=gen))
                hit = float(torch.rand((), generator=gen)) < trial / 40  # from all misses to mostly hits
                policy.acceptance.observe(name, width, depth, int(torch.randint(0, depth + 1, (), generator=gen)) * hit)
            policy.observe_draft(Strategy(name, 2, width), 1e-4 * float(torch.rand((), generator=gen)), 4)
            policy.observe_step(Strategy(name, 2, width), 4, 0.02 * float(torch.rand((), generator=gen)) + 1e-3)
        policy.observe_step(OFF, 3, 0.02 * float(torch.rand((), generator=gen)) + 1e-3)
        for batch in (1, 3, 16, 64):
            want = max(policy.candidates()[1:], key=lambda c: policy.goodput(c, batch))
            if not policy.goodput(want, batch) > policy.min_gain * policy.goodput(OFF, batch):
                want = OFF
            assert policy.choose(batch) == want, (trial, batch)
            chosen[want == OFF] += 1
    assert min(chosen.values()) >= 20, chosen  # both outcomes, many times


def test_policy_drafts_only_for_a_gain_beyond_its_margin():
    """Steps of 1 and 2 tokens cost the same (predicted): a chain of one draft token is worth
    1 + alpha tokens a step. At alpha 0.04 that is under the 5% margin: plain decoding."""
    def choice(alpha: float) -> Strategy:
        policy = AdaptivePolicy(drafters={"ngram": 1}, depths=(1,), widths=(1,), explore_every=10 ** 9,
                                acceptance=AcceptanceStats(prior=alpha, prior_weight=0.0))
        for t in (1, 2):
            policy.step_time.observe(t, 0.1)
        return policy.choose(1)

    assert choice(0.04) == OFF
    assert choice(0.06) == Strategy("ngram", 1, 1)


def test_a_correction_not_refreshed_is_forgotten():
    """Plain steps at 3-4 live sequences took twice their predicted time, then the policy drafted
    there for `correction_ttl` steps: plain decoding's 0.5 is forgotten (1.0), so plain decoding
    gets tried again, and its next step starts a new median instead of joining the old ones."""
    policy = AdaptivePolicy(drafters={"ngram": 1}, depths=(2,), widths=(1,), correction_ttl=8)
    for t, sec in [(1, 0.1), (64, 0.8)]:
        policy.step_time.observe(t, sec)
    for _ in range(3):
        policy.observe_step(OFF, 4, 2 * policy.predicted_seconds(OFF, 4))
    assert policy.correction("off", 2) == pytest.approx(0.5)
    for _ in range(8):
        policy.choose(4)
    assert policy.correction("off", 2) == 1.0
    policy.observe_step(OFF, 4, policy.predicted_seconds(OFF, 4) / 0.8)
    assert policy.correction("off", 2) == pytest.approx(0.8)


def test_untried_drafter_takes_plain_decodings_correction():
    """At a batch size class where plain steps took twice their predicted time and the drafter
    never ran, its predicted time is scaled as plain decoding's, not taken at face value; a
    drafter run there keeps its own."""
    policy = AdaptivePolicy(drafters={"ngram": 1}, depths=(2,), widths=(1,))
    for t, sec in [(1, 0.1), (64, 0.8)]:
        policy.step_time.observe(t, sec)
    spec = Strategy("ngram", 2, 1)
    policy.observe_step(OFF, 4, 2 * policy.predicted_seconds(OFF, 4))
    size_class = 2  # 3-4 live sequences
    assert policy.correction("ngram", size_class) == policy.correction("off", size_class) == pytest.approx(0.5)
    assert policy.goodput(spec, 4) == pytest.approx(policy.predicted_goodput(spec, 4) * 0.5)
    assert policy.correction("ngram", 0) == 1.0  # nothing measured at batch 1
    policy.observe_step(spec, 4, policy.predicted_seconds(spec, 4))
    assert policy.correction("ngram", size_class) == pytest.approx(1.0)


def test_parse_strategy_errors():
    assert str(parse_strategy("history:4x2")) == "history:4x2"
    with pytest.raises(ValueError, match="DRAFTER:DEPTH"):
        parse_strategy("ngram")
    with pytest.raises(ValueError, match="unknown drafter 'model'.*draft model"):
        RolloutEngine(tiny_model("llama"), spec="model:3")


def test_trial_outcome_waits_for_a_mismatch_the_full_depth_or_the_end():
    t = Trial("ngram", 1, Draft.chain([5, 6, 7]), start=2)  # guesses response[2:5]
    assert t.depth == 3
    assert t.outcome([1, 1], False) is None  # nothing emitted since
    assert t.outcome([1, 1, 5], False) is None  # still on the draft
    assert t.outcome([1, 1, 5, 9], False) == 1  # a miss at depth 2
    assert t.outcome([1, 1, 5, 6, 7], False) == 3  # the whole draft
    assert t.outcome([1, 1, 5, 6], True) == 2  # the sequence ended on the draft


def test_policy_does_not_probe_drafters_that_free_trials_measure():
    def probes(trialed: frozenset) -> int:
        policy = AdaptivePolicy(drafters={"ngram": 1}, depths=(2,), widths=(1,), explore_every=8, trialed=trialed)
        for t, sec in [(1, 0.1), (64, 6.4)]:  # linear: drafts never pay
            policy.step_time.observe(t, sec)
        for _ in range(50):
            policy.acceptance.observe("ngram", 1, 2, 0)
        return sum(policy.choose(2) != OFF for _ in range(40))

    assert probes(frozenset()) == 5
    assert probes(frozenset({"ngram"})) == 0


@pytest.mark.parametrize("hides_host_work", [False, True])
def test_free_trials_measure_acceptance_while_decoding_plainly(monkeypatch, hides_host_work):
    """Forced to decode plainly, auto still learns its point-mass drafters' acceptance, from
    drafts scored by the tokens emitted and never verified; the rates are those that verifying
    the same drafter gives on the same samples. Also with the trials opened and scored between a
    step's launch and the read of its tokens (as on a GPU)."""
    from remesh.rollout import engine as engine_module

    monkeypatch.setattr(engine_module, "_hides_host_work", lambda device: hides_host_work)
    model = peaky_model("llama").eval()  # sampled tokens repeat: prompt lookup is often right
    params = SamplingParams(max_new_tokens=48, n=2, seed=5, temperature=1.0)
    engine = RolloutEngine(model, spec="auto", max_batch=6, calibrate=False, overhead_budget=None)
    engine.policy.choose = lambda batch: OFF
    engine.trials.per_step = 6  # every sequence without an open trial gets one, every step
    plain = engine.generate(PROMPTS, params)
    assert set(engine.stats.strategy_counts()) == {"off"} and engine.stats.acceptance == {}
    assert not engine.trials.open  # every trial was scored or dropped with its sequence
    trials = engine.stats.trials
    assert {"ngram", "ngramx2", "ngramx4", "history", "historyx2", "historyx4"} <= set(trials)
    assert engine.policy.acceptance.alphas("ngram", 1, 1) != [engine.policy.acceptance.prior]
    verified = RolloutEngine(model, spec="ngram:8", max_batch=6)
    assert [r.response_ids for r in verified.generate(PROMPTS, params)] == [r.response_ids for r in plain]
    (trial_hits, trial_n), (hits, n) = trials["ngram"][0], verified.stats.acceptance["ngram"][0]
    assert trial_n >= 30 and n >= 30
    assert trial_hits / trial_n == pytest.approx(hits / n, abs=0.1)  # here 6/48 and 33/336


# 6. remesh generate --------------------------------------------------------------------------


def test_generate_command_writes_jsonl_and_summary(tmp_path, capsys):
    import json

    from remesh.checkpoint import save_hf
    from remesh.cli import main
    from tests.tiny_tokenizer import tiny_tokenizer

    tok = tiny_tokenizer(tmp_path / "tok")
    save_hf(tiny_model("llama", vocab_size=len(tok)), tmp_path / "model", tok)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"item {i} is"}) + "\n" for i in range(3)))
    out = tmp_path / "gen.jsonl"
    assert main(["generate", str(tmp_path / "model"), str(tmp_path / "p.jsonl"), "--out", str(out), "--n", "2",
                 "--max-new-tokens", "6", "--spec", "history:2x2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(i, j) for i in range(3) for j in range(2)]
    assert all(len(r["response_ids"]) == len(r["logprobs"]) <= 6 and isinstance(r["response"], str) for r in rows)
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "strategies over time" in printed
    per_seq = float(printed.split(" per sequence: 1 without speculation")[0].rsplit(", ", 1)[1])
    assert 1.0 <= per_seq <= 3.0  # history:2x2 emits 1 to 3 tokens a sequence-step
    assert main(["generate", str(tmp_path / "model"), str(tmp_path / "p.jsonl"), "--spec", "model:3"]) == 2
    assert "--spec: speculation 'model:3' needs a draft model" in capsys.readouterr().err
    # more layers than the policy has: known once it loads, and still one line naming the option
    assert main(["generate", str(tmp_path / "model"), str(tmp_path / "p.jsonl"), "--spec", "model:3",
                 "--draft-model", "self:99"]) == 2
    assert "--draft-model: self:99: a self-draft needs 1 <= n_layers <" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.partial"))


def test_generate_checks_its_options_before_loading_the_model(tmp_path, capsys):
    """A mistake found after sampling would lose the samples: each is refused before the model
    loads (its path here does not exist), and no file is touched."""
    from remesh.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    (tmp_path / "afile").write_text("x")
    cases = [
        (["--out", str(prompts)], "is the prompts file; the generations would overwrite it"),
        (["--out", str(tmp_path)], "is a folder; give a file name"),
        (["--out", str(tmp_path / "afile" / "g.jsonl")], "afile is a file, not a folder"),
        (["--spec", "off", "--draft-model", "self:2"],
         "--draft-model: a draft model is used by speculation 'auto' or 'model:K'"),
        (["--draft-model", "self:x"], "--draft-model: draft model 'self:x': expected self:N with N >= 1 layers"),
        (["--draft-model", str(tmp_path / "nowhere")], "nowhere does not exist"),
        (["--spec", "ngarm:3"], "--spec: speculation 'ngarm:3': unknown drafter 'ngarm' (known: ngram, history"),
        (["--top-p", "1.5"], "--top-p: top_p must be in (0, 1]"),
        (["--max-prompt-len", "0"], "--max-prompt-len must be >= 1"),
        (["--device", "nowhere"], "--device: unknown device 'nowhere'"),
    ]
    for extra, expected in cases:
        assert main(["generate", str(tmp_path / "no_model"), str(prompts), *extra]) == 2, extra
        assert expected in capsys.readouterr().err, extra
    assert prompts.read_text() == '{"prompt": "hi"}\n' and (tmp_path / "afile").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "p.jsonl"]


def test_policy_corrects_its_predicted_step_times_by_the_steps_realised():
    policy = AdaptivePolicy(drafters={"ngram": 1}, depths=(2,), widths=(1,), explore_every=10**6)
    for t, s in [(1, 0.1), (3, 0.1), (64, 0.8)]:  # memory-bound at small batch: drafts look free
        policy.step_time.observe(t, s)
    for _ in range(50):
        policy.acceptance.observe("ngram", 1, 2, 2)  # every draft accepted: 3 tokens per step predicted
    spec = Strategy("ngram", 2, 1)
    assert policy.choose(1) == spec
    emitted = 1 + policy.acceptance.expected_accepted("ngram", 1, 2)  # ~2.9 (the prior fades)
    assert policy.predicted_goodput(spec, 1) == pytest.approx(emitted / 0.1) and emitted > 2.8
    # but such a step really takes 0.5 s (costs no model of the forward sees): its time is
    # scaled by 0.1 / 0.5, whatever it emitted, while plain steps take their predicted 0.1 s
    policy.observe_step(spec, 1, 0.5)
    assert policy.goodput(spec, 1) == pytest.approx(emitted / 0.5)
    assert policy.choose(1) == OFF
    policy.observe_step(OFF, 1, 0.1)
    assert policy.choose(1) == OFF
    # the median of the last steps: one stalled plain step (4x) does not move the correction
    for seconds in (0.1, 0.1, 0.4):
        policy.observe_step(OFF, 1, seconds)
    assert policy.goodput(OFF, 1) == pytest.approx(1 / 0.1)
    # another batch size class keeps its own correction
    assert policy.goodput(spec, 64) == policy.predicted_goodput(spec, 64)


def test_tree_acceptance_prior_comes_from_the_chains():
    """An untried width starts from the drafter's chain rates, 1 - (1 - alpha)^width (hand
    computed), not from the optimistic prior: a drafter that misses is not probed again at
    every width."""
    s = AcceptanceStats(prior=0.5, prior_weight=0.0, min_rate=0.0)
    for accepted in (2, 1, 0, 0):  # depth-2 chains: alpha1 = 2/4, alpha2 = 1/2
        s.observe("ngram", 1, 2, accepted)
    assert s.alphas("ngram", 2, 3) == pytest.approx([1 - 0.5 ** 2, 1 - 0.5 ** 2, 0.5])  # level 3: never seen
    assert s.alphas("history", 4, 1) == pytest.approx([0.5])  # no chains seen: the prior
    s.prior_weight = 2.0  # the tree's own first observation (a miss) moves it from there
    s.observe("ngram", 2, 1, 0)
    assert s.alphas("ngram", 2, 1) == pytest.approx([(1 - 0.5 ** 2) * 2 / 3])


def test_probes_are_spaced_in_proportion_to_the_live_batch():
    """A probe verifies drafts for every live sequence: every explore_every steps up to
    explore_batch live sequences, 4x as far apart at 4x that batch."""
    def probes(batch: int, steps: int) -> list[int]:
        policy = AdaptivePolicy(drafters={"ngram": 1}, depths=(2,), widths=(1,), explore_every=8, explore_batch=4)
        for t, sec in [(1, 0.1), (64, 6.4)]:  # linear: drafts never pay, every other choice is off
            policy.step_time.observe(t, sec)
        for _ in range(50):
            policy.acceptance.observe("ngram", 1, 2, 0)
        return [i for i in range(1, steps + 1) if policy.choose(batch) != OFF]

    assert probes(2, 40) == probes(4, 40) == [8, 16, 24, 32, 40]
    assert probes(16, 100) == [32, 64, 96]


def test_overhead_budget_by_hand():
    """A token bucket: each step earns fraction x its seconds (at most `window` steps' worth),
    the machinery spends what it took, and may run while the bucket is not in debt."""
    budget = OverheadBudget(fraction=0.1, window=2)
    assert budget.allows()  # the first step chooses
    budget.spend(150e-6)
    assert not budget.allows()
    budget.earn(1e-3)  # +100 us: -50 us
    assert not budget.allows()
    budget.earn(1e-3)  # +100 us: 50 us
    assert budget.allows()
    for _ in range(10):
        budget.earn(1e-3)
    assert budget._credit == pytest.approx(200e-6)  # two steps' worth at most
    unlimited = OverheadBudget(fraction=None)
    unlimited.spend(1.0)
    unlimited.earn(1e-3)
    assert unlimited.allows()


def test_repeat_gives_the_last_choice_on_merit_not_a_probe():
    policy = AdaptivePolicy(drafters={"ngram": 1, "model": 1}, depths=(2,), widths=(1,), explore_every=2,
                            trialed=frozenset({"ngram"}))
    policy.step_time.observe(1, 0.01)
    policy.step_time.observe(64, 0.011)  # flat: a draft that is accepted pays
    for _ in range(20):
        policy.acceptance.observe("ngram", 1, 2, 2)
    assert policy.choose(4) == Strategy("ngram", 2, 1)
    assert policy.choose(4) == Strategy("model", 2, 1)  # a probe of the draft model
    assert policy.repeat(4) == Strategy("ngram", 2, 1)
    assert policy._steps == 3 and policy._predicted[:2] == (Strategy("ngram", 2, 1), 4)


@pytest.mark.parametrize("budget", [None, 0.0])
def test_the_engine_weighs_strategies_and_opens_trials_within_its_overhead_budget(monkeypatch, budget):
    """Unlimited, the policy chooses before every decode step and trials open in every step; with
    no budget at all, the first step's choice and trials spend it (half each), and the choice
    stands for the rest of the call."""
    model = peaky_model("llama").eval()
    engine = RolloutEngine(model, spec="auto", max_batch=6, calibrate=False, overhead_budget=budget)
    choose, trials = engine.policy.choose, engine._open_trials
    calls = {"choose": 0, "trials": 0}
    monkeypatch.setattr(engine.policy, "choose", lambda b: calls.__setitem__("choose", calls["choose"] + 1) or choose(b))
    monkeypatch.setattr(engine, "_open_trials",
                        lambda *a: calls.__setitem__("trials", calls["trials"] + 1) or trials(*a))
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, n=2, seed=1))
    steps = len(engine.stats.steps)
    assert steps > 5
    if budget is None:
        assert calls == {"choose": steps, "trials": steps}
    else:
        assert calls == {"choose": 1, "trials": 1}
        assert set(engine.stats.strategy_counts()) == {"off"}  # nothing learnt in time: the first choice stands
    assert engine.stats.policy_seconds > 0


def test_trials_skip_the_shape_the_step_verifies_unless_deeper():
    """While the step verifies history:2x2 drafts, a history x2 trial to depth 4 still runs (it
    measures levels 3 and 4, which the verified drafts never reach); at history:4x2 it does not."""
    shapes = [("history", 2, 4), ("ngram", 1, 4)]

    def tried(verified: Strategy) -> set[tuple[str, int, int]]:
        trials = Trials(list(shapes))
        return {trials.next([0], verified)[0] for _ in range(4)}

    assert tried(Strategy("history", 2, 2)) == set(shapes)
    assert tried(Strategy("history", 4, 2)) == {("ngram", 1, 4)}
    assert tried(Strategy("history", 8, 1)) == set(shapes)  # another width: another shape
    assert tried(OFF) == set(shapes)


@pytest.mark.parametrize("device_still_running", [False, True])
def test_trials_hidden_behind_the_device_are_not_charged_to_their_budget(monkeypatch, device_still_running):
    """On a GPU the trials open between a step's launch and the read of its tokens. Those done
    while the device still computes the step cost nothing: with no budget at all they still
    open every step, and their time is counted apart. Those the device waited for are charged,
    and with no budget open once."""
    from remesh.rollout import engine as engine_module

    monkeypatch.setattr(engine_module, "_hides_host_work", lambda device: True)
    made, asked = [], []  # trials opened so far when the device's event is made (after the launch, only for
    # trials: before them) and when it is asked (after them)

    def still_running(device):
        made.append(len(opened))
        return lambda: asked.append(len(opened)) or device_still_running

    monkeypatch.setattr(engine_module, "_still_running", still_running)
    model = peaky_model("llama").eval()
    engine = RolloutEngine(model, spec="auto", max_batch=6, calibrate=False, overhead_budget=0.0)
    trials, opened = engine._open_trials, []
    monkeypatch.setattr(engine, "_open_trials", lambda *a: opened.append(1) or trials(*a))
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, n=2, seed=1))
    steps = len(engine.stats.steps)
    assert steps > 5
    if device_still_running:
        assert len(opened) == steps and engine.stats.policy_hidden_seconds > 0
        assert engine.trial_budget.allows()
    else:
        assert len(opened) == 1 and engine.stats.policy_hidden_seconds == 0
    assert made == list(range(len(opened))) and asked == list(range(1, len(opened) + 1))


def test_bookkeeping_every_strategy_pays_is_left_out_of_the_time_a_step_is_judged_by(monkeypatch):
    """On a CPU the drafters' and trials' catch-up adds to every step alike: the policy's
    correction compares strategies without it (a fixed cost in a predicted / realised ratio
    would favour long steps), while the call's statistics keep the wall time."""
    import time as time_module

    model = tiny_model().eval()
    engine = RolloutEngine(model, spec="auto", calibrate=False)
    catch_up = engine._catch_up
    # the bookkeeping's cost dwarfs a tiny model's step even on a loaded machine (where one took 0.1 s)
    monkeypatch.setattr(engine, "_catch_up", lambda *a: time_module.sleep(0.3) or catch_up(*a))
    judged = []
    monkeypatch.setattr(engine.policy, "observe_step", lambda s, b, seconds: judged.append(seconds))
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=4))
    assert judged and max(judged) < 0.25
    assert min(s.seconds for s in engine.stats.steps) >= 0.3


def test_one_time_setup_inside_a_step_is_taken_out_of_its_observed_time(monkeypatch):
    """A step that also timed kernel layouts (or captured a graph) feeds the step-time model and
    the policy's correction its time less that setup, not nothing: a strategy meeting a new row
    count at every step as the batch drains is still corrected."""
    import time as time_module

    model = tiny_model().eval()
    engine = RolloutEngine(model, spec="auto", calibrate=False)
    forward, calls = model.forward, []

    def forward_with_setup(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # one step pays a 0.3 s setup
            time_module.sleep(0.3)
            engine.gemms.tuning_seconds += 0.3
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward_with_setup)
    observed, steps = [], []
    monkeypatch.setattr(engine.policy.step_time, "observe", lambda tokens, s: observed.append(s))
    monkeypatch.setattr(engine.policy, "observe_step", lambda s, b, seconds: steps.append(seconds))
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=6))
    assert len(observed) == len(calls)  # every forward fed, the one with the setup too
    assert max(observed) < 0.2 and max(steps) < 0.2
    assert max(s.seconds for s in engine.stats.steps) >= 0.3 or engine.stats.prefill_seconds >= 0.3  # stats keep wall time
