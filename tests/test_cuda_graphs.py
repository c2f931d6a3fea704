"""Decode and verification steps as CUDA graphs: the graph-safe forward (padded buckets, lengths
on the device, the whole cache attended under a mask) equals the eager one, logits and cache;
the engine's outputs do not change with it. On a CPU the graphs run eagerly (capture=False),
which proves everything but the capture; the CUDA test captures them."""

from __future__ import annotations

import itertools

import pytest
import torch

from remesh.model import AttnContext
from remesh.rollout import RolloutEngine, SamplingParams, greedy
from remesh.rollout import engine as engine_module
from remesh.rollout.cuda_graphs import StepGraphs, bucket, context_bucket
from remesh.rollout.drafters import first_layers
from remesh.rollout.speculative import Draft, tree_mask
from tests.models import tiny_model
from tests.test_sampler import PROMPTS, peaky_model


def test_bucket_is_the_next_power_of_two_up_to_the_limit():
    assert [bucket(b, 6) for b in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 4, 6, 6]
    assert bucket(33, 64) == 64


def test_context_bucket_is_the_next_power_of_two_within_smallest_and_the_cache_length():
    assert [context_bucket(c, 8, 40) for c in (1, 8, 9, 16, 17, 33, 40)] == [8, 8, 16, 16, 32, 40, 40]


def _filled_cache(model, n_slots: int, lens: list[int], max_len: int = 32):
    """A cache whose slots 0..len(lens)-1 hold random prompts of `lens` tokens."""
    device = next(model.parameters()).device
    cache = model.new_kv_cache(n_slots, max_len, device=device)
    g = torch.Generator().manual_seed(1)
    for slot, n in enumerate(lens):
        ids = torch.randint(0, model.args.vocab_size, (n,), generator=g).to(device)
        model(ids, torch.arange(n, device=device), AttnContext.with_cache(cache, [slot], [0], [n]))
    return cache


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_graph_safe_steps_equal_eager_steps(family):
    model = tiny_model(family).eval()
    lens = [5, 9, 3, 7]
    eager = _filled_cache(model, 5, lens)
    graphed = _filled_cache(model, 5, lens)
    # contexts of 8 positions and more: the steps below attend to 8, 16 and 32 of the cache's 32
    steps = StepGraphs(model, graphed, scratch_slot=4, max_batch=4, capture=False, min_context=8)
    torch.manual_seed(0)
    with torch.inference_mode():
        # plain decode of 3 sequences in slots out of order (bucket 4: one padding row), then 2
        # (the third row turns to padding), then one of a sequence whose context is at most 8,
        # then a tree step of 2 nodes over two sequences
        for slots in ([2, 0, 3], [1, 3], [2]):
            ids = torch.randint(0, model.args.vocab_size, (len(slots),)).tolist()
            cl = [lens[s] for s in slots]
            want = model.logits(model(torch.tensor(ids), torch.tensor(cl), AttnContext.with_cache(eager, slots, cl, [1] * len(slots))))
            got = steps.logits(ids, cl, slots, cl)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            for s in slots:
                lens[s] += 1
        drafts = [Draft([7, 8], [0, 0]), Draft([9, 10], [0, 1])]  # a 2-wide tree and a chain
        slots, n = [0, 2], 3
        cl = [lens[s] for s in slots]
        ids = [1, 7, 8, 2, 9, 10]
        pos = [cl[0], cl[0] + 1, cl[0] + 1, cl[1], cl[1] + 1, cl[1] + 2]
        mask = tree_mask(drafts, 2)
        want = model.logits(model(torch.tensor(ids), torch.tensor(pos), AttnContext.with_cache(eager, slots, cl, [n] * 2, mask=mask)))
        got = steps.logits(ids, pos, slots, cl, mask)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert set(steps.graphs) == {(4, 1, 8), (2, 1, 16), (1, 1, 8), (2, 3, 16)}
    assert steps.graphs[2, 1, 16].logits is not steps.graphs[2, 3, 16].logits
    # a context beyond the cache's half: attention over all of it
    slots, cl = [1], [lens[1] + 20]
    graphed.k[:, 1, :, lens[1]:cl[0]] = eager.k[:, 1, :, lens[1]:cl[0]] = torch.randn_like(eager.k[:, 1, :, :20])
    graphed.v[:, 1, :, lens[1]:cl[0]] = eager.v[:, 1, :, lens[1]:cl[0]] = torch.randn_like(eager.v[:, 1, :, :20])
    with torch.inference_mode():
        want = model.logits(model(torch.tensor([5]), torch.tensor(cl), AttnContext.with_cache(eager, slots, cl, [1])))
        torch.testing.assert_close(steps.logits([5], cl, slots, cl), want, atol=1e-5, rtol=1e-5)
    assert (1, 1, 32) in steps.graphs
    # every sequence's cache rows are the eager ones; only the scratch slot differs
    torch.testing.assert_close(graphed.k[:, :4], eager.k[:, :4], atol=1e-6, rtol=0)
    torch.testing.assert_close(graphed.v[:, :4], eager.v[:, :4], atol=1e-6, rtol=0)


def test_a_scratch_slot_outside_the_cache_is_refused():
    model = tiny_model().eval()
    with pytest.raises(ValueError, match="scratch slot 4"):
        StepGraphs(model, model.new_kv_cache(4, 16), scratch_slot=4, max_batch=4)


def test_a_shape_waits_for_its_capture_eagerly_or_on_a_larger_graph():
    """Until its capture is due, a step runs eagerly, or replays the smallest existing graph of
    its token count that covers its batch and context, with the same logits."""
    model = tiny_model().eval()
    cache = _filled_cache(model, 5, [5, 9, 3, 7])
    eager = _filled_cache(model, 5, [5, 9, 3, 7])
    steps = StepGraphs(model, cache, scratch_slot=4, max_batch=4, capture_after=2, min_context=4)
    with torch.inference_mode():
        assert [steps.route(3, 1, 9) for _ in range(3)] == [None, None, (4, 1, 16)]  # due at its third use
        steps.logits([1, 2, 3], [5, 9, 3], [0, 1, 2], [5, 9, 3], graph=(4, 1, 16))
        assert steps.route(4, 1, 12) == (4, 1, 16)  # the same buckets: built
        assert steps.route(4, 1, 2) == (4, 1, 16)  # a shorter context, not due: a stand-in
        assert steps.route(2, 3, 9) is None  # no graph of 3 tokens per sequence
        assert steps.route(2, 5, 9, now=True) == (2, 5, 16)
        graph = steps.route(1, 1, 4)  # a smaller batch and context: a stand-in
        assert graph == (4, 1, 16) and (steps.eager_runs, steps.stand_in_runs, steps.provisional_runs) == (3, 2, 4)
        # slot 2's next token at position 3 (which the step above wrote too): as the eager forward
        want = model.logits(model(torch.tensor([7]), torch.tensor([3]), AttnContext.with_cache(eager, [2], [3], [1])))
        torch.testing.assert_close(steps.logits([7], [3], [2], [3], graph=graph), want, atol=1e-5, rtol=1e-5)


def test_a_shape_with_a_close_stand_in_waits_longer_for_its_capture():
    """A close stand-in costs a step little and a capture tens of steps: a shape covered by a
    graph of at most STAND_IN_SPAN times its (batch x context) is due after `stand_in_after`
    uses; one that runs eagerly or on a far larger graph meanwhile, after `capture_after`. Only
    the latter's steps are provisional (left out of the engine's step-time model)."""
    model = tiny_model().eval()
    cache = _filled_cache(model, 5, [5, 9, 3, 7])
    steps = StepGraphs(model, cache, scratch_slot=4, max_batch=4, capture_after=2, stand_in_after=5, min_context=4)
    with torch.inference_mode():
        assert steps.route(4, 1, 12, now=True) == (4, 1, 16)
        steps.logits([1, 2, 3, 4], [5, 9, 3, 7], [0, 1, 2, 3], [5, 9, 3, 7], graph=(4, 1, 16))
        assert [steps.route(2, 1, 16) for _ in range(6)] == [(4, 1, 16)] * 5 + [(2, 1, 16)]  # 2x: close
        assert steps.provisional_runs == 0
        assert [steps.route(1, 1, 4) for _ in range(3)] == [(4, 1, 16)] * 2 + [(1, 1, 4)]  # 16x: far
        assert [steps.route(1, 1, 20) for _ in range(3)] == [None, None, (1, 1, 32)]  # no graph this long
        assert (steps.stand_in_runs, steps.eager_runs, steps.provisional_runs) == (7, 2, 4)


def _graphed(monkeypatch):
    """Make engines run their steps through StepGraphs on this device (eagerly on a CPU)."""
    monkeypatch.setattr(RolloutEngine, "_use_graphs", lambda self, device: self.cuda_graphs)


def test_a_close_stand_ins_step_feeds_the_step_time_model_and_a_provisional_one_does_not(monkeypatch):
    """A close stand-in serves its shape for dozens of steps, so its time is what choosing that
    shape costs now; an eager step, or one on a far larger graph, comes a few uses before the
    shape's capture and would teach the policy a time its steps will not take."""
    _graphed(monkeypatch)
    engine = RolloutEngine(tiny_model().eval(), spec="auto", max_batch=4, calibrate=False, keep_cache=True)
    engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=2))
    fed = []
    monkeypatch.setattr(engine.policy.step_time, "observe", lambda tokens, seconds: fed.append(tokens))
    graphs = engine.graphs
    before = engine._setups()
    graphs.stand_in_runs += 1  # what `route` counts for a step on a close stand-in
    assert engine._observe_time(7, 0.01, before) == 0.0 and fed == [7]
    before = engine._setups()
    graphs.stand_in_runs += 1  # and for one on a far stand-in
    graphs.provisional_runs += 1
    assert engine._observe_time(9, 0.01, before) is None and fed == [7]


@pytest.mark.parametrize("spec", ["off", "history:2x2", "model:2", "auto"])
@pytest.mark.parametrize("draw_every_node", [False, True])
def test_engine_outputs_do_not_change_with_graph_steps(monkeypatch, spec, draw_every_node):
    """Graph steps, verification drawing every node's token at once, and the host's bookkeeping
    done between a step's launch and the read of its tokens (all three as on a GPU) leave the
    samples and log-probs as the eager engine gives them."""
    model = peaky_model("llama").eval()
    # auto with point-mass drafters only: its choices follow timings, and a stochastic draft
    # model's acceptance would then change the samples
    draft = first_layers(model, 1) if spec.startswith("model") else None
    params = SamplingParams(max_new_tokens=10, n=3, seed=3, temperature=0.8, top_p=0.9)
    plain = RolloutEngine(model, spec=spec, draft_model=draft, max_batch=5, cuda_graphs=False)
    want = [plain.generate(PROMPTS, params) for _ in range(2)]  # the second with history
    _graphed(monkeypatch)
    monkeypatch.setattr(engine_module, "_draws_every_node", lambda device: draw_every_node)
    monkeypatch.setattr(engine_module, "_hides_host_work", lambda device: draw_every_node)
    engine = RolloutEngine(model, spec=spec, draft_model=draft, max_batch=5)
    got = [engine.generate(PROMPTS, params) for _ in range(2)]
    for g, w in zip(got, want):
        assert [r.response_ids for r in g] == [r.response_ids for r in w]
        torch.testing.assert_close(torch.tensor([x for r in g for x in r.logprobs]),
                                   torch.tensor([x for r in w for x in r.logprobs]), atol=1e-5, rtol=0)
    assert engine.graphs is None  # they go with the call's cache
    g = greedy(params)
    assert [r.response_ids for r in engine.generate(PROMPTS, g)] == [r.response_ids for r in plain.generate(PROMPTS, g)]
    kept = RolloutEngine(model, spec=spec, draft_model=draft, max_batch=5, keep_cache=True)
    first = kept.generate(PROMPTS, params)
    graphs = kept.graphs
    assert graphs is not None and graphs.graphs  # plain decoding's shapes were due their graphs
    assert [r.response_ids for r in first] == [r.response_ids for r in want[0]]
    kept.generate(PROMPTS, params)
    assert kept.graphs is graphs  # the next call replays them
    # draft nodes padded to a power of two: a few shapes, each captured once (auto's calibration
    # times the same shapes)
    assert {n for _, n, _ in {*graphs.graphs, *graphs._uses}} <= {1, 2, 3, 5, 9, 17}
    if spec == "auto":  # calibrated at the cache's full length: its graphs can stand in at any context
        assert (1, 1, kept.cache.max_len) in graphs.graphs and (4, 1, kept.cache.max_len) in graphs.graphs


def test_a_kept_cache_and_its_graphs_serve_the_model_tensors_they_were_built_for(monkeypatch):
    """Kept across calls while the model's tensors are updated in place (an optimizer step: the
    graphs read the new values), rebuilt when they move to new storage or another model comes:
    a graph replays the addresses it was captured with, and the cache has the model's dtype."""
    _graphed(monkeypatch)
    model = tiny_model("llama").eval()
    params = SamplingParams(max_new_tokens=8, n=2, seed=4)

    def fresh(m):
        return [r.response_ids for r in RolloutEngine(m, max_batch=4, cuda_graphs=False, calibrate=False)
                .generate(PROMPTS, params)]

    kept = RolloutEngine(model, max_batch=4, calibrate=False, keep_cache=True)
    kept.generate(PROMPTS, params)
    graphs, cache = kept.graphs, kept.cache
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    assert [r.response_ids for r in kept.generate(PROMPTS, params)] == fresh(model)
    assert kept.graphs is graphs and kept.cache is cache
    model.double()
    assert [r.response_ids for r in kept.generate(PROMPTS, params)] == fresh(model)
    assert kept.graphs is not graphs and kept.cache.k.dtype == torch.float64
    graphs = kept.graphs
    kept.model = other = tiny_model("llama").eval()
    assert [r.response_ids for r in kept.generate(PROMPTS, params)] == fresh(other)
    assert kept.graphs is not graphs and kept.graphs.model is other


def test_under_autocast_graph_steps_read_the_engines_own_low_precision_weights(monkeypatch):
    """Autocast caches its casts of trainable weights until its context exits, so a graph
    captured in one call would read freed copies in the next. The engine's steps read its own
    copies in autocast's dtype instead, refreshed in place at each call: the graphs stay, an
    update in place reaches them, and the samples are the eager engine's under autocast."""
    _graphed(monkeypatch)
    model = peaky_model("llama").eval()
    params = SamplingParams(max_new_tokens=6, n=2, seed=1, temperature=0.8)
    kept = RolloutEngine(model, max_batch=4, calibrate=False, keep_cache=True)
    linear = next(m for m in model.modules() if type(m) is torch.nn.Linear)
    graphs = None
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = kept.generate(PROMPTS, params)
            want = RolloutEngine(model, max_batch=4, calibrate=False, cuda_graphs=False).generate(PROMPTS, params)
        assert [r.response_ids for r in got] == [r.response_ids for r in want]
        torch.testing.assert_close(torch.tensor([x for r in got for x in r.logprobs]),
                                   torch.tensor([x for r in want for x in r.logprobs]), atol=2e-2, rtol=0)
        assert kept.graphs is (graphs or kept.graphs) and kept._low_autocast == ("cpu", torch.bfloat16)
        graphs = kept.graphs
        assert torch.equal(kept._low[linear][0], linear.weight.to(torch.bfloat16))
        with torch.no_grad():  # an optimizer step's kind of update: in place
            for p in model.parameters():
                p.mul_(0.9)
    kept._low[linear][0].zero_()  # the steps' projections multiply by the copies, autocast caching nothing
    with torch.inference_mode(), kept._kernels():
        assert not linear(torch.randn(2, linear.in_features)).any() and not torch.is_autocast_cache_enabled()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="generate again"):
        with torch.autocast("cpu", enabled=False):  # another autocast state than the call's
            kept.forward_seconds(reps=1)
    kept.generate(PROMPTS, params)  # out of autocast: the cache and graphs are rebuilt, without copies
    assert kept.graphs is not graphs and not kept._low


def test_under_autocast_graphs_of_a_model_the_copies_cannot_cover_go_with_the_call(monkeypatch):
    """A trainable fp32 weight outside exact nn.Linear layers (a tensor-parallel shard's) is
    cast by autocast and cached until its context exits: such a model keeps autocast's cache
    (casting afresh in every step would cost more), and its graphs go with the call."""
    class ShardLike(torch.nn.Linear):
        pass

    _graphed(monkeypatch)
    model = peaky_model("llama").eval()
    wq = next(m for m in model.modules() if type(m) is torch.nn.Linear)
    wq.__class__ = ShardLike
    params = SamplingParams(max_new_tokens=6, n=2, seed=1, temperature=0.8)
    kept = RolloutEngine(model, max_batch=4, calibrate=False, keep_cache=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = kept.generate(PROMPTS, params)
        want = RolloutEngine(model, max_batch=4, calibrate=False, cuda_graphs=False).generate(PROMPTS, params)
    assert [r.response_ids for r in got] == [r.response_ids for r in want]
    assert not kept._low and kept.graphs is None and kept.cache is not None
    wq.requires_grad_(False)  # frozen: autocast casts it afresh in every forward, caching nothing
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept.generate(PROMPTS, params)
    assert kept._low and kept.graphs is not None


def test_by_default_a_cpu_cache_goes_with_its_call(monkeypatch):
    _graphed(monkeypatch)
    engine = RolloutEngine(tiny_model("llama").eval(), max_batch=4, calibrate=False)
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=4))
    assert engine.cache is None and engine.graphs is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kept_graphs_replay_the_weights_of_an_optimizer_step():
    """By default a small GPU cache stays, with its graphs: the next call captures nothing new,
    and replays read the parameters as the optimizer updated them in place; parameters given
    new storage make the engine capture again."""
    model = tiny_model("llama", n_layers=3).cuda()
    params = SamplingParams(max_new_tokens=16, n=2, seed=5)
    prompts = [[3, 4, 5, 6, 3, 4, 5], [9, 8, 7], [1, 2, 1, 2, 1, 2, 1, 2], [11, 12, 13, 14]]
    engine = RolloutEngine(model, max_batch=6, calibrate=False)

    def eager():
        return RolloutEngine(model, max_batch=6, calibrate=False, cuda_graphs=False).generate(prompts, params)

    def ids(rollouts):
        return [r.response_ids for r in rollouts]

    assert ids(engine.generate(prompts, params)) == ids(eager())
    graphs = engine.graphs
    captures = graphs.captures
    assert captures >= 1
    engine.generate(prompts, params)
    assert engine.graphs is graphs and graphs.captures == captures
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)

    def train_step():  # updates every parameter in place
        model.train()
        tokens, positions = torch.tensor([1, 2, 3], device="cuda"), torch.arange(3, device="cuda")
        model.logits(model(tokens, positions, AttnContext.packed([3], device="cuda"))).sum().backward()
        opt.step()
        opt.zero_grad()

    train_step()
    got = engine.generate(prompts, params)
    assert engine.graphs is graphs and graphs.captures == captures
    want = eager()
    assert ids(got) == ids(want)
    torch.testing.assert_close(torch.tensor([x for r in got for x in r.logprobs]),
                               torch.tensor([x for r in want for x in r.logprobs]), atol=1e-4, rtol=0)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    assert ids(engine.generate(prompts, params)) == ids(eager())
    assert engine.graphs is not graphs and engine.graphs.captures >= 1
    # under autocast (an fp32 actor generating in bf16, the RL default on a GPU) graphs read
    # autocast's weight copies: after an optimizer step the log-probs must still be the new
    # weights', as teacher forcing in fp32 computes them (to bf16's precision)
    graphs = None
    for _ in range(2):
        train_step()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = engine.generate(prompts, params)
        assert engine.graphs is not None and engine._low  # read the engine's bf16 copies, kept
        if graphs is not None:  # the second call replays the first one's graphs
            assert engine.graphs is graphs and graphs.captures == captures
        graphs, captures = engine.graphs, engine.graphs.captures
        seqs = [r.prompt_ids + r.response_ids for r in got]
        with torch.no_grad():
            h = model(torch.tensor([t for q in seqs for t in q], device="cuda"),
                      torch.cat([torch.arange(len(q), device="cuda") for q in seqs]),
                      AttnContext.packed([len(q) for q in seqs], device="cuda"))
            starts = itertools.accumulate((len(q) for q in seqs), initial=0)
            at = [start + len(r.prompt_ids) - 1 + i for r, start in zip(got, starts)
                  for i in range(len(r.response_ids))]
            ref = model.token_logprobs(h[at], torch.tensor([t for r in got for t in r.response_ids], device="cuda"))
        got_lp = torch.tensor([x for r in got for x in r.logprobs])
        torch.testing.assert_close(got_lp, ref.float().cpu(), atol=0.1, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec", ["off", "history:2x2"])
def test_captured_cuda_graphs_replay_the_eager_steps(spec):
    model = tiny_model("llama", n_layers=3).cuda().eval()
    params = SamplingParams(max_new_tokens=16, n=2, seed=5, temperature=1.0)
    prompts = [[3, 4, 5, 6, 3, 4, 5], [9, 8, 7], [1, 2, 1, 2, 1, 2, 1, 2], [11, 12, 13, 14]]
    eager = RolloutEngine(model, spec=spec, max_batch=6, cuda_graphs=False, calibrate=False)
    graphed = RolloutEngine(model, spec=spec, max_batch=6, calibrate=False, keep_cache=False)  # captured every call
    kept = RolloutEngine(model, spec=spec, max_batch=6, calibrate=False, keep_cache=True)
    for _ in range(2):
        assert [r.response_ids for r in kept.generate(prompts, params)] == [r.response_ids for r in eager.generate(prompts, params)]
    assert kept.graphs.captures >= 1
    for _ in range(2):
        want, got = eager.generate(prompts, params), graphed.generate(prompts, params)
        assert [r.response_ids for r in got] == [r.response_ids for r in want]
        torch.testing.assert_close(torch.tensor([x for r in got for x in r.logprobs]),
                                   torch.tensor([x for r in want for x in r.logprobs]), atol=1e-4, rtol=0)
    assert graphed.graphs is None
    engine = RolloutEngine(model, spec=spec, max_batch=6, calibrate=False)
    engine.begin(prompts, params)
    while engine.advance():
        pass
    assert engine.graphs.captures >= 1 and all(g.graph is not None for g in engine.graphs.graphs.values())
    engine.collect()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampled_draft_chains_are_verified_on_a_gpu():
    """A draft model's sampled chain carries q on the device, while verification reads p on the
    host: a rejection's residual max(0, p - q) needs both in one place."""
    model = tiny_model("llama", n_layers=3).cuda().eval()
    engine = RolloutEngine(model, spec="model:2", draft_model=first_layers(model, 1), max_batch=6, calibrate=False)
    rollouts = engine.generate([[3, 4, 5, 6], [9, 8, 7]], SamplingParams(max_new_tokens=16, n=2, seed=5))
    assert [len(r.response_ids) for r in rollouts] == [16] * 4
    assert engine.stats.acceptance_by_position()["model"][0] < 1.0  # rejections happened


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_graphs_of_several_context_buckets_share_their_logits_buffer():
    """Captured at once, graphs of one (batch, tokens) at contexts 8, 16, 32 and 64 write one
    logits buffer, replayed in any order, each equal to the eager step; a stand-in too."""
    model = tiny_model("llama", n_layers=2).cuda().eval()
    lens = [5, 20, 40, 3]
    eager, graphed = (_filled_cache(model, 5, lens, max_len=64) for _ in range(2))
    steps = StepGraphs(model, graphed, scratch_slot=4, max_batch=4, capture_after=0, min_context=8)
    with torch.inference_mode():
        for slots in ([3], [0], [1], [2], [3, 1], [0]):  # contexts 4, 6, 21, 41, 25, 7
            cl = [lens[x] for x in slots]
            ids = [7 + x for x in slots]
            want = model.logits(model(torch.tensor(ids, device="cuda"), torch.tensor(cl, device="cuda"),
                                      AttnContext.with_cache(eager, slots, cl, [1] * len(slots))))
            torch.testing.assert_close(steps.logits(ids, cl, slots, cl), want, atol=1e-4, rtol=1e-4)
            for x in slots:
                lens[x] += 1
        assert {k for k in steps.graphs if k[:2] == (1, 1)} == {(1, 1, 8), (1, 1, 32), (1, 1, 64)}
        assert steps.captures == len(steps.graphs) and all(g.graph is not None for g in steps.graphs.values())
        assert steps.graphs[1, 1, 8].logits.data_ptr() == steps.graphs[1, 1, 64].logits.data_ptr()
        stand_in = StepGraphs(model, graphed, scratch_slot=4, max_batch=4, capture_after=2, min_context=8)
        stand_in.logits([1, 2], [lens[0], lens[1]], [0, 1], [lens[0], lens[1]])  # captures (2, 1, 32)
        key = stand_in.route(1, 1, lens[3] + 1)
        assert key == (2, 1, 32) and stand_in.stand_in_runs == 1
        cl = [lens[3]]
        want = model.logits(model(torch.tensor([9], device="cuda"), torch.tensor(cl, device="cuda"),
                                  AttnContext.with_cache(eager, [3], cl, [1])))
        torch.testing.assert_close(stand_in.logits([9], cl, [3], cl, graph=key), want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capture_seconds_leave_out_work_counted_elsewhere():
    """Layout timings done in a capture's warm-up are the tuner's seconds, not the capture's:
    else the engine would take them out of the step's time twice."""
    import time

    model = tiny_model("llama", n_layers=2).cuda().eval()
    lens = [5, 7]
    cache = _filled_cache(model, 3, lens, max_len=64)
    clock = [0.0]
    forward = model.forward

    def tuned_forward(*args, **kwargs):  # 50 ms of "tuning" in every forward, on the other clock
        time.sleep(0.05)
        clock[0] += 0.05
        return forward(*args, **kwargs)

    model.forward = tuned_forward
    steps = StepGraphs(model, cache, scratch_slot=2, max_batch=2, capture_after=0, counted_elsewhere=lambda: clock[0])
    t0 = time.perf_counter()
    with torch.inference_mode():
        steps.logits([1, 2], lens, [0, 1], lens)
    elapsed = time.perf_counter() - t0
    assert steps.captures == 1 and clock[0] >= 0.15  # two warm-ups and the capture
    assert 0.0 < steps.capture_seconds <= elapsed - clock[0] + 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_still_running_tells_a_busy_gpu_from_an_idle_one():
    """The engine's test of whether host work (free trials) hid behind a launched step."""
    device = torch.device("cuda")
    assert engine_module._still_running(torch.device("cpu")) is None
    x = torch.randn(4096, 4096, device=device)
    torch.cuda.synchronize(device)
    for _ in range(20):  # tens of milliseconds of queued work
        x = (x @ x).tanh_()
    running = engine_module._still_running(device)
    assert running()
    torch.cuda.synchronize(device)
    assert not running()
