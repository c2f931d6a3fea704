"""Layouts applied to the model on gloo: tensor- and pipeline-stage models built from local
shards give the one-process forward, log-probs, gradients and greedy generation."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from remesh.model.attention import AttnContext
from remesh.plan.layout import Layout, ShardSpec
from remesh.rollout import RolloutEngine, SamplingParams
from remesh.runtime.launch import spawn
from remesh.runtime.parallelize import build_local_model
from tests.models import tiny_model

LENGTHS = [5, 9]


def _batch(vocab: int):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (sum(LENGTHS),), generator=g)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    targets = torch.randint(0, vocab, (sum(LENGTHS),), generator=g)
    weights = torch.randn(sum(LENGTHS), generator=g)
    return tokens, positions, targets, weights


def _one_process(family: str):
    model = tiny_model(family, vocab_size=96)
    tokens, positions, targets, weights = _batch(96)
    hidden = model(tokens, positions, AttnContext.packed(LENGTHS))
    logp = model.token_logprobs(hidden, targets)
    (logp * weights).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    params = SamplingParams(greedy=True, max_new_tokens=6)
    with torch.no_grad():
        out = RolloutEngine(model, calibrate=False).generate([[1, 2, 3], [4, 5, 6, 7, 8]], params)
    return model.logits(hidden).detach(), logp.detach(), grads, [r.response_ids for r in out]


def _tp_rank(rank: int, world: int, family: str):
    full_model = tiny_model(family, vocab_size=96)
    full = {n: p.detach().clone() for n, p in full_model.named_parameters()}
    layout = Layout(tuple(range(world)), 1, world)
    spec = ShardSpec(full_model.args)
    shards = {n: t.clone() for n, t in spec.shard_state(full, layout, rank).items()}
    model = build_local_model(full_model.args, layout, rank, shards, tp_group=dist.group.WORLD)
    tokens, positions, targets, weights = _batch(96)
    hidden = model(tokens, positions, AttnContext.packed(LENGTHS))
    logp = model.token_logprobs(hidden, targets)
    (logp * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        out = RolloutEngine(model, calibrate=False).generate([[1, 2, 3], [4, 5, 6, 7, 8]],
                                                             SamplingParams(greedy=True, max_new_tokens=6))
    return model.logits(hidden).detach(), logp.detach(), grads, [r.response_ids for r in out]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: tied embeddings, q/k/v biases
def test_tensor_parallel_matches_one_process(family):
    logits, logp, grads, greedy = _one_process(family)
    spec = ShardSpec(tiny_model(family, vocab_size=96).args)
    layout = Layout((0, 1), 1, 2)
    for rank, (r_logits, r_logp, r_grads, r_greedy) in enumerate(spawn(_tp_rank, 2, args=(family,), timeout_s=150)):
        torch.testing.assert_close(r_logits, logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r_logp, logp, atol=1e-5, rtol=1e-5)
        expected = spec.shard_state(grads, layout, rank)
        assert r_grads.keys() == expected.keys() - ({"output.weight"} if family == "qwen2" else set())
        for n, g in r_grads.items():
            torch.testing.assert_close(g, expected[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
        assert r_greedy == greedy
