"""The sampling distribution (pure functions) and the batched KV-cache sampler."""

from __future__ import annotations

import math

import pytest
import torch

from remesh.model import AttnContext
from remesh.rollout import Rollout, SamplingParams, generate, greedy, sample, target_logprobs
from remesh.rollout.sampling import CDF_BLOCK, _inverse_cdf_blocks, _inverse_cdf_rows, inverse_cdf, stop_token_ids
from tests.models import tiny_model

VOCAB = 97
PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [12, 2], [33, 71, 8, 19], [50]]


def peaky_model(family: str = "llama", **overrides):
    """A tiny model whose next-token distribution is far from uniform, so that greedy argmaxes
    are well separated and sampled tokens repeat."""
    model = tiny_model(family, **overrides)
    with torch.no_grad():
        model.output.weight.mul_(20.0)
    return model


# 1. target_logprobs by hand ------------------------------------------------------------------

def test_target_logprobs_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = target_logprobs(logits, SamplingParams(top_k=2)).exp()[0]
    z = math.e**2 + math.e
    torch.testing.assert_close(probs, torch.tensor([math.e**2 / z, math.e / z, 0.0, 0.0]))
    assert torch.isinf(target_logprobs(logits, SamplingParams(top_k=2))[0, 2:]).all()
    # top_k >= vocab and top_k = 0 are both "off"
    full = logits.log_softmax(-1)
    torch.testing.assert_close(target_logprobs(logits, SamplingParams(top_k=4)), full)
    torch.testing.assert_close(target_logprobs(logits, SamplingParams(top_k=0)), full)


def test_target_logprobs_top_p():
    p = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]])
    logits = p.log()
    # sorted 0.5, 0.3, 0.1, ...: 0.5 < 0.6, 0.8 >= 0.6 -> keep {1, 3}
    out = target_logprobs(logits, SamplingParams(top_p=0.6)).exp()
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.625, 0.0, 0.375, 0.0]]))
    # a tiny top_p keeps the top token only; top_p = 0.85 adds the 0.1 token
    out = target_logprobs(logits, SamplingParams(top_p=0.01)).exp()
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]]))
    out = target_logprobs(logits, SamplingParams(top_p=0.85)).exp()
    torch.testing.assert_close(out, torch.tensor([[1 / 9, 5 / 9, 0.0, 3 / 9, 0.0]]))
    # top-k first, then top-p over the renormalised top-k distribution
    out = target_logprobs(logits, SamplingParams(top_k=3, top_p=0.6)).exp()  # 5/9, 3/9, 1/9 -> keep 2
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.625, 0.0, 0.375, 0.0]]))


def test_target_logprobs_temperature_and_greedy():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.3, -0.2, 0.9, 0.1]])
    torch.testing.assert_close(target_logprobs(logits, SamplingParams(temperature=0.5)),
                               (2 * logits).log_softmax(-1))
    g = target_logprobs(logits, SamplingParams(greedy=True))
    assert g.dtype == torch.float32
    assert g[0, 0] == 0 and g[1, 2] == 0
    assert torch.isinf(g).sum() == 6
    assert target_logprobs(logits.bfloat16(), SamplingParams()).dtype == torch.float32


def test_sampling_params_validation():
    for kw, field in [(dict(temperature=0.0), "temperature"), (dict(temperature=float("inf")), "temperature"),
                      (dict(temperature=float("nan")), "temperature"), (dict(top_p=0.0), "top_p"),
                      (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(n=0), "n"),
                      (dict(max_new_tokens=0), "max_new_tokens")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kw)
    SamplingParams(temperature=0.0, greedy=True)  # fine: temperature is unused
    g = greedy(SamplingParams(n=4, temperature=0.7, seed=3))
    assert g.greedy and g.n == 1 and g.temperature == 0.7 and g.seed == 3


# 2. sample() ------------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.7, top_k=4),
                                    SamplingParams(top_p=0.7)], ids=["plain", "top_k", "top_p"])
def test_sample_frequencies_match_target(params):
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.8, 0.0, -1.5]])
    draws = 20000
    target = target_logprobs(logits, params)
    gen = torch.Generator().manual_seed(0)
    tokens, logprobs = sample(logits.expand(draws, -1), params, generator=gen)
    freq = torch.bincount(tokens, minlength=6).float() / draws
    p = target.exp()[0]
    assert (freq[p == 0] == 0).all()  # removed tokens are never drawn
    # 5 standard deviations of a binomial frequency
    assert (freq - p).abs().le(5 * (p * (1 - p) / draws).sqrt() + 1e-6).all(), (freq, p)
    torch.testing.assert_close(logprobs, target[0, tokens])
    # the same seed draws the same tokens
    again, _ = sample(logits.expand(draws, -1), params, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)


@pytest.mark.parametrize("draw", [_inverse_cdf_blocks, _inverse_cdf_rows])
def test_inverse_cdf_across_blocks(draw):
    """Mass 1, 2, 1 (unnormalised) at tokens 5, B + 7 and 2B + 1 of a vocabulary of 2B + 3 (B =
    CDF_BLOCK, the last block partial): u * total = 4u picks the first token whose running mass
    exceeds it; zero-mass tokens are never drawn, not even at u = 1 (outside [0, 1): rounding's
    worst case, which the one-level rule settles)."""
    b = CDF_BLOCK
    probs = torch.zeros(1, 2 * b + 3)
    probs[0, [5, b + 7, 2 * b + 1]] = torch.tensor([1.0, 2.0, 1.0])
    for u, token in [(0.0, 5), (0.1, 5), (0.25, b + 7), (0.74, b + 7), (0.75, 2 * b + 1), (0.99999994, 2 * b + 1),
                     (1.0, 2 * b + 1)]:
        assert int(draw(probs, torch.tensor([u]))) == token, u


def test_inverse_cdf_equals_the_one_level_rule():
    """Random rows, a third of their tokens removed (as top-k / top-p do), a vocabulary that is
    not a multiple of the block: the same tokens as one fp64 cumulative sum over each row."""
    gen = torch.Generator().manual_seed(0)
    probs = torch.randn(300, 1000, generator=gen).mul(3).softmax(-1)
    probs = probs.masked_fill(torch.rand(300, 1000, generator=gen) < 0.33, 0.0)
    u = torch.rand(300, generator=gen)
    u[:3] = torch.tensor([0.0, 0.5, 0.99999994])
    assert torch.equal(inverse_cdf(probs, u), _inverse_cdf_blocks(probs, u))  # on a CPU
    assert torch.equal(_inverse_cdf_blocks(probs, u), _inverse_cdf_rows(probs, u))


def test_sample_greedy():
    logits = torch.randn(5, VOCAB)
    tokens, logprobs = sample(logits, SamplingParams(greedy=True))
    assert torch.equal(tokens, logits.argmax(-1))
    assert (logprobs == 0).all()


# 3. greedy generation --------------------------------------------------------------------------

def naive_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Rerun the whole prefix each step and take the argmax."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            h = model(torch.tensor(seq), torch.arange(len(seq)), AttnContext.packed([len(seq)]))
            seq.append(int(model.logits(h[-1:]).argmax(-1)))
    return seq[len(prompt):]


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("qwen2", {}), ("mistral", {"sliding_window": 4})],
                         ids=["llama", "qwen2", "mistral-window"])
def test_greedy_matches_naive_loop_and_batching(family, overrides):
    model = peaky_model(family, **overrides).eval()
    params = greedy(SamplingParams(max_new_tokens=6))
    batched = generate(model, PROMPTS, params)
    assert [(r.prompt_index, r.sample_index) for r in batched] == [(i, 0) for i in range(len(PROMPTS))]
    for r, prompt in zip(batched, PROMPTS):
        assert r.prompt_ids == prompt and r.finish_reason == "length" and len(r.response_ids) == 6
        assert r.response_ids == naive_greedy(model, prompt, 6)
        assert r.logprobs == [0.0] * 6
        alone = generate(model, [prompt], params)[0]
        assert alone.response_ids == r.response_ids
    # chunks smaller than the batch give the same rollouts
    chunked = generate(model, PROMPTS, params, max_batch=3)
    assert [r.response_ids for r in chunked] == [r.response_ids for r in batched]


# 4. behaviour log-probs == teacher-forced training path ---------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_match_teacher_forcing(temperature):
    model = tiny_model("llama")
    model.train()
    params = SamplingParams(temperature=temperature, max_new_tokens=5, n=2, seed=1)
    rollouts = generate(model, PROMPTS, params, max_batch=3)  # a group split across chunks too
    assert model.training  # restored
    seqs = [r.prompt_ids + r.response_ids for r in rollouts]
    tokens = torch.tensor([t for s in seqs for t in s])
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    with torch.no_grad():
        h = model(tokens, positions, AttnContext.packed([len(s) for s in seqs]))
        idx, targets, start = [], [], 0
        for r, s in zip(rollouts, seqs):
            p = len(r.prompt_ids)
            idx += range(start + p - 1, start + len(s) - 1)
            targets += r.response_ids
            start += len(s)
        ref = model.token_logprobs(h[idx], torch.tensor(targets), temperature=temperature)
    got = torch.tensor([lp for r in rollouts for lp in r.logprobs])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


# 5. stopping, n samples, reproducibility -------------------------------------------------------

def test_stop_token_ids_join_tokenizer_and_config_eos():
    assert stop_token_ids(2, [7, 2]) == (2, 7)  # a chat model's config lists its turn end too
    assert stop_token_ids(None, 5) == (5,)
    assert stop_token_ids(3, None) == (3,)


def test_stop_token_and_length():
    model = peaky_model("llama")
    free = generate(model, PROMPTS[:2], greedy(SamplingParams(max_new_tokens=6)))
    stop_tok = free[0].response_ids[2]
    stopped = generate(model, PROMPTS[:2], greedy(SamplingParams(max_new_tokens=6, stop_token_ids=(stop_tok,))))
    first = free[0].response_ids.index(stop_tok)
    assert stopped[0].finish_reason == "stop"
    assert stopped[0].response_ids == free[0].response_ids[:first + 1]  # the stop token is included
    assert len(stopped[0].logprobs) == first + 1
    # the other sequence is unaffected by its neighbour finishing early
    if stop_tok not in free[1].response_ids:
        assert stopped[1].response_ids == free[1].response_ids and stopped[1].finish_reason == "length"
    one = generate(model, PROMPTS[:1], SamplingParams(max_new_tokens=1))[0]
    assert len(one.response_ids) == 1 and one.finish_reason == "length"


def test_n_samples_share_prefill_differ_and_reproduce():
    model = tiny_model("llama")
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=3, seed=7)
    rollouts = generate(model, PROMPTS, params)
    assert all(isinstance(r, Rollout) for r in rollouts)
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == \
        [(i, j) for i in range(len(PROMPTS)) for j in range(3)]
    for i, prompt in enumerate(PROMPTS):
        group = rollouts[3 * i:3 * i + 3]
        assert all(r.prompt_ids == prompt for r in group)
        assert len({tuple(r.response_ids) for r in group}) == 3  # near-uniform model: they differ
    again = generate(model, PROMPTS, params)
    assert [(r.response_ids, r.logprobs) for r in again] == [(r.response_ids, r.logprobs) for r in rollouts]
    other = generate(model, PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=8, n=3, seed=8))
    assert [r.response_ids for r in other] != [r.response_ids for r in rollouts]


def test_prefill_runs_once_per_prompt(monkeypatch):
    """One ragged prefill forward with each distinct prompt once, then one-token decode steps."""
    model = tiny_model("llama")
    calls = []
    forward = type(model).forward

    def spy(self, tokens, positions, ctx):
        calls.append(list(ctx.seqlens))
        return forward(self, tokens, positions, ctx)

    monkeypatch.setattr(type(model), "forward", spy)
    generate(model, PROMPTS[:2], SamplingParams(max_new_tokens=3, n=4))
    assert calls[0] == [len(PROMPTS[0]), len(PROMPTS[1])]
    assert calls[1:] == [[1] * 8, [1] * 8]


def test_a_sample_admitted_after_its_siblings_copies_their_prompt_rows(monkeypatch):
    """Once the batch is full, samples join one or two at a time, as slots free: one whose
    sibling still decodes copies that sibling's prompt rows and samples its first token from the
    logits kept from the prompt's prefill. Each prompt is prefilled once here, and the rollouts
    are those of a batch that holds every sample at once."""
    model = tiny_model("llama")
    # a third of the vocabulary stops a sample: lengths spread, so slots free one at a time
    params = SamplingParams(max_new_tokens=8, n=6, seed=5, stop_token_ids=tuple(range(0, VOCAB, 3)))
    whole = generate(model, PROMPTS[:2], params, max_batch=12)
    prefills = []
    forward = type(model).forward

    def spy(self, tokens, positions, ctx):
        if max(ctx.seqlens) > 1:
            prefills.append(list(ctx.seqlens))
        return forward(self, tokens, positions, ctx)

    monkeypatch.setattr(type(model), "forward", spy)
    narrow = generate(model, PROMPTS[:2], params, max_batch=4)
    assert sorted(n for call in prefills for n in call) == sorted(len(p) for p in PROMPTS[:2])
    assert [(r.prompt_index, r.sample_index, r.response_ids) for r in narrow] == [
        (r.prompt_index, r.sample_index, r.response_ids) for r in whole]
    torch.testing.assert_close(torch.tensor([x for r in narrow for x in r.logprobs]),
                               torch.tensor([x for r in whole for x in r.logprobs]), atol=1e-5, rtol=0)


def test_generate_rejects_empty_prompt():
    with pytest.raises(ValueError, match="prompt 1"):
        generate(tiny_model("llama"), [[1, 2], []], SamplingParams())


# 6. decode projections in their faster layout (rollout/kernels.py) -----------------------------

def test_tuned_linears_compute_the_same_product_and_remember_each_shape():
    import torch.nn.functional as F

    from remesh.rollout.kernels import TunedLinears

    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 512)  # 64k weights: large enough to be tuned
    small = torch.nn.Linear(128, 8)
    x = torch.randn(16, 128)
    with torch.no_grad():
        ref = F.linear(x, layer.weight, layer.bias)
    model = torch.nn.Sequential(layer, small)
    threads = torch.get_num_threads()
    for force in (True, False, None):
        tuned = TunedLinears(force=force)
        with torch.inference_mode(), tuned.applied(model):
            out = layer(x)
            one = layer(x[:1])  # one row: tuned too (transposed, it runs as two)
            small(x)  # a small matrix: not tuned
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(one, ref[:1], rtol=1e-5, atol=1e-5)
        assert list(tuned.choices) == [(16, 512, 128, torch.float32, torch.float32, "cpu", threads),
                                       (1, 512, 128, torch.float32, torch.float32, "cpu", threads)]
        if force is not None:
            assert set(tuned.choices.values()) == {(force, 16), (force, 1)}
        assert "forward" not in layer.__dict__  # restored after the call
    with tuned.applied(model):  # a training forward is never tuned
        layer(x).sum().backward()
    assert len(tuned.choices) == 2 and layer.weight.grad is not None
    other = torch.nn.Linear(128, 512)
    with tuned.applied(model), tuned.applied(other):  # two models' contexts, nested: both restored
        assert "forward" in layer.__dict__ and "forward" in other.__dict__
    assert "forward" not in layer.__dict__ and "forward" not in other.__dict__


@pytest.mark.parametrize("pad", [True, False])
def test_a_cpu_product_may_run_with_its_rows_padded_to_the_next_power_of_two(monkeypatch, pad):
    """Where 3 rows run slower than 4 (made so here: every unpadded product sleeps), the 3-row
    shape runs padded with a zero row, whose output is dropped: the same product. With
    pad=False only the unpadded layouts are timed."""
    import time as time_module

    import torch.nn.functional as F

    from remesh.rollout import kernels

    run = kernels.run_layout

    def slow_unpadded(x, weight, bias, layout):
        if layout.rows == x.shape[0]:
            time_module.sleep(0.003)
        return run(x, weight, bias, layout)

    monkeypatch.setattr(kernels, "run_layout", slow_unpadded)
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(128, 512), torch.randn(3, 128)
    tuned = kernels.TunedLinears(pad=pad)
    with torch.inference_mode(), tuned.applied(layer):
        out = layer(x)
    (layout,) = tuned.choices.values()
    assert layout.rows == (4 if pad else 3)
    assert out.shape == (3, 512)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_one_row_timings_of_a_model_larger_than_the_cache_read_its_other_weights_first(monkeypatch):
    """A step reads every weight of a model larger than the cache from memory: a one-row shape
    is timed after the model's other weights (twice the cache's size) are read, evicting it;
    nothing is allocated for it. A model that fits keeps in-cache timing."""
    from remesh.rollout import kernels

    torch.manual_seed(0)
    layers = [torch.nn.Linear(128, 512) for _ in range(4)]  # 256 KiB of weights each
    model = torch.nn.Sequential(*layers)
    tuned = kernels.TunedLinears()
    with tuned.applied(model):
        monkeypatch.setattr(kernels, "last_level_cache_bytes", lambda: 300 << 10)  # holds one layer
        evict = tuned._evictor(layers[0].weight)
        read = []
        monkeypatch.setattr(torch.Tensor, "sum", lambda self, *a, **k: read.append(self))
        evict()
        assert [id(w) for w in read] == [id(layers[1].weight), id(layers[2].weight), id(layers[3].weight)]
        monkeypatch.undo()
        monkeypatch.setattr(kernels, "last_level_cache_bytes", lambda: 4 << 20)  # holds them all
        assert tuned._evictor(layers[0].weight) is None
        calls = []
        monkeypatch.setattr(kernels, "last_level_cache_bytes", lambda: 300 << 10)
        monkeypatch.setattr(kernels.TunedLinears, "_evictor", lambda self, w: lambda: calls.append(w))
        with torch.inference_mode():
            layers[0](torch.randn(4, 128))  # several rows: timed in cache
            assert calls == []
            layers[0](torch.randn(1, 128))
        assert len(calls) == 2 * tuned.reps  # before every timed run of both layouts


def test_another_layout_is_taken_on_a_clear_win_only():
    from remesh.rollout.kernels import beats_plain

    assert beats_plain(10.0, 8.9, "cpu") and not beats_plain(10.0, 9.1, "cpu")  # CPU: 0.9
    assert beats_plain(10.0, 4.9, "cuda") and not beats_plain(10.0, 8.0, "cuda")  # GPU: 0.5


def test_transposed_linear_keeps_the_products_dtype_under_autocast():
    """As F.linear under autocast: a bf16 product plus an fp32 bias stays bf16 (else the keys and
    values of a layer with biases would be fp32 against bf16 queries)."""
    import torch.nn.functional as F

    from remesh.rollout.kernels import transposed_linear

    x, w, b = torch.randn(3, 16), torch.randn(8, 16), torch.randn(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.linear(x, w, b)
        for rows in (x, x[:1]):
            got = transposed_linear(rows, w, b)
            assert got.dtype == want.dtype == torch.bfloat16
            torch.testing.assert_close(got, want[:len(rows)], atol=5e-2, rtol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_tuned_linears_on_a_gpu_time_outside_captures_only():
    """On a GPU a shape is timed (its layouts' kernels replayed as graphs) when first met
    outside a capture; met inside one, nn.Linear's layout runs, untimed and not remembered."""
    import torch.nn.functional as F

    from remesh.rollout.kernels import TunedLinears, gpu_seconds

    torch.manual_seed(0)
    layer = torch.nn.Linear(576, 192, bias=False).cuda()
    x = torch.randn(8, 576, device="cuda")
    tuned = TunedLinears()
    with torch.inference_mode(), tuned.applied(layer):
        out = layer(x)
        assert list(tuned.choices) == [(8, 192, 576, torch.float32, torch.float32, "cuda", torch.get_num_threads())]
        torch.testing.assert_close(out, F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
        graph, y = torch.cuda.CUDAGraph(), torch.randn(4, 576, device="cuda")
        with torch.cuda.graph(graph):
            captured = layer(y)
        graph.replay()
        torch.testing.assert_close(captured, F.linear(y, layer.weight), rtol=1e-5, atol=1e-5)
    assert len(tuned.choices) == 1  # the 4-row shape met in the capture was not timed
    assert 0 < gpu_seconds(lambda: F.linear(x, layer.weight), x.device) < 1e-2


def test_engine_with_transposed_projections_gives_the_same_greedy_tokens():
    from remesh.rollout import RolloutEngine
    from remesh.rollout.kernels import TunedLinears

    model = peaky_model("llama", dim=128, vocab_size=640).eval()  # a 640 x 128 head: tuned
    params = greedy(SamplingParams(max_new_tokens=6))
    plain = RolloutEngine(model, max_batch=4, calibrate=False)
    plain.gemms = TunedLinears(force=False)
    flipped = RolloutEngine(model, max_batch=4, calibrate=False)
    flipped.gemms = TunedLinears(force=True)
    a, b = plain.generate(PROMPTS, params), flipped.generate(PROMPTS, params)
    assert [r.response_ids for r in a] == [r.response_ids for r in b]
    assert any(c.transposed for c in flipped.gemms.choices.values())  # the head did run transposed


def test_no_full_garbage_collection_runs_during_a_call():
    """A full collection walks everything torch imported and stalls a step by ~100 ms: during a
    call only the young generations are collected; the collector's thresholds come back after,
    also when two engines' calls overlap."""
    import gc

    from remesh.rollout import RolloutEngine
    from remesh.rollout.engine import NO_FULL_COLLECTIONS

    before = gc.get_threshold()
    a, b = RolloutEngine(tiny_model().eval()), RolloutEngine(tiny_model().eval())
    params = SamplingParams(max_new_tokens=4)
    a.begin(PROMPTS, params)
    assert gc.get_threshold() == (*before[:2], NO_FULL_COLLECTIONS)
    b.begin(PROMPTS, params)  # overlapping calls: a's collect brings the thresholds back, b's leaves them
    for engine in (a, b):
        while engine.advance():
            pass
        engine.collect()
        assert gc.get_threshold() == before
    a.generate(PROMPTS, params)
    assert gc.get_threshold() == before
