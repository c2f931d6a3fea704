"""Sample migration: the move and cache-or-recompute decisions by hand, engines handing
sequences to each other in one process, and data-parallel instances on gloo ranks. Moving a
sequence never changes its tokens: each sequence draws from its own random stream."""

from __future__ import annotations

import pytest
import torch

from remesh.plan.layout import Layout, ShardSpec
from remesh.rollout import RolloutEngine, SamplingParams
from remesh.rollout.migration import Link, Move, plan_moves, send_cache
from remesh.runtime.groups import ProcessGroups
from remesh.runtime.launch import spawn
from remesh.runtime.migration import MigratingGenerator
from remesh.runtime.parallelize import build_local_model
from tests.models import tiny_model

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14], [15, 16, 17], [18, 19, 20, 21, 22, 23], [24, 25]]


def test_plan_moves_by_hand():
    assert plan_moves([6, 0]) == [Move(0, 1, 3)]
    # 11 over 3: targets 4, 3, 4 (the extra ones stay with the heaviest, 7 and 4)
    assert plan_moves([7, 0, 4]) == [Move(0, 1, 3)]
    # 8 over 3: targets 3, 3, 2; the surplus of 5 feeds the larger deficit first
    assert plan_moves([8, 0, 0]) == [Move(0, 1, 3), Move(0, 2, 2)]
    # two givers, two takers: 9, 7, 1, 3 -> 5 each
    assert plan_moves([9, 7, 1, 3]) == [Move(0, 2, 4), Move(1, 3, 2)]
    assert plan_moves([3, 2]) == []
    assert plan_moves([4, 0], min_gap=5) == []
    assert plan_moves([0, 0, 0]) == []
    with pytest.raises(ValueError, match="min_gap"):
        plan_moves([1, 2], min_gap=0)


def test_plan_moves_never_unbalances():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        loads = torch.randint(0, 20, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        after = list(loads)
        for m in plan_moves(loads):
            assert m.count > 0 and m.src != m.dst
            after[m.src] -= m.count
            after[m.dst] += m.count
        assert sum(after) == sum(loads) and min(after) >= 0
        assert max(after) - min(after) <= 1


def test_send_cache_by_hand():
    link = Link(bytes_per_s=1e9, latency_s=1e-4)
    # 100 tokens x 1000 B: 1e-4 + 1e-4 = 2e-4 s to send
    assert send_cache(100, 1000, link, recompute_seconds=1e-3)
    assert not send_cache(100, 1000, link, recompute_seconds=1e-4)
    assert not send_cache(100, 1000, Link(1e6, 0.0), recompute_seconds=1e-2)  # 0.1 s on a slow link
    assert not send_cache(0, 1000, link, recompute_seconds=1.0)  # a queued sequence has no cache


def _expected(model, params, spec="off"):
    return RolloutEngine(model, spec=spec, calibrate=False).generate(PROMPTS, params)


def _key(rollouts):
    return [(r.prompt_index, r.sample_index, r.response_ids, r.finish_reason) for r in rollouts]


@pytest.mark.parametrize("with_cache", [True, False])
@pytest.mark.parametrize("greedy", [True, False])
def test_engines_hand_over_sequences(with_cache, greedy):
    """Engine A starts six prompts with two slots, engine B one; mid-way A releases its queued
    and decoding sequences to B. Together they return what one engine returns."""
    model = tiny_model("llama")
    params = SamplingParams(greedy=greedy, temperature=1.0, max_new_tokens=12, n=1 if greedy else 2, seed=5)
    expected = _expected(model, params)
    a = RolloutEngine(model, max_batch=2, calibrate=False)
    b = RolloutEngine(model, max_batch=4, calibrate=False)
    keys_a, keys_b = [0, 1, 2, 3, 4, 5], [6]
    a.begin(PROMPTS[:6], params, keys_a, reserve=(14, 6))
    b.begin(PROMPTS[6:], params, keys_b, reserve=(14, 6))
    for _ in range(4):
        a.advance()
    while b.advance():
        pass
    count = a.unfinished - 1  # every queued one and one of the two decoding
    moved = a.release(count, lambda n: with_cache)
    decoding = [m for m in moved if m.response]
    assert len(moved) == count and len(decoding) == 1
    assert all((m.kv is not None) == with_cache for m in decoding)
    b.adopt(moved)
    while a.advance() | b.advance():
        pass
    got_a, got_b = a.collect(), b.collect()
    assert len(got_b) == count + params.n  # B finished A's sequences
    # each engine counts the tokens it decoded: the moved one's first tokens where it started
    started = sum(len(m.response) for m in decoding)
    assert started > 0
    assert a.stats.tokens == sum(len(r.response_ids) for r in got_a) + started
    assert b.stats.tokens == sum(len(r.response_ids) for r in got_b) - started
    merged = sorted(got_a + got_b, key=lambda r: (r.prompt_index, r.sample_index))
    assert _key(merged) == _key(expected)
    for r, e in zip(merged, expected):
        torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(e.logprobs), rtol=1e-4, atol=1e-5)


def test_adopt_rejects_a_prompt_longer_than_the_reserve():
    model = tiny_model("llama")
    params = SamplingParams(greedy=True, max_new_tokens=4)
    with pytest.raises(ValueError, match="transfer"):
        MigratingGenerator(Layout((0, 1), 2, 1), None, transfer="kv")
    a, b = RolloutEngine(model, calibrate=False), RolloutEngine(model, calibrate=False)
    a.begin([[1] * 60], params, [0])
    b.begin([[2, 3]], params, [1])
    with pytest.raises(ValueError, match="reserve"):
        b.adopt(a.release(1, lambda n: False))


def _dp_worker(rank: int, world: int, tp: int, spec: str, greedy: bool, transfer: str):
    """Instance 0 decodes six prompts at once, instance 1 one: two of instance 0's decoding
    sequences move to instance 1 at the first load exchange."""
    full_model = tiny_model("llama")
    layout = Layout(tuple(range(world)), world // tp, tp)
    groups = ProcessGroups.for_layouts([layout])
    if tp > 1:
        full = {n: p.detach().clone() for n, p in full_model.named_parameters()}
        shards = ShardSpec(full_model.args).shard_state(full, layout, rank)
        model = build_local_model(full_model.args, layout, rank, {n: t.clone() for n, t in shards.items()},
                                  tp_group=groups.get(layout.tp_group(rank)))
    else:
        model = full_model
    params = SamplingParams(greedy=greedy, temperature=1.0, max_new_tokens=16, n=1, seed=2)
    dp = layout.coord(rank)[1]
    keys = [0, 1, 2, 3, 4, 5] if dp == 0 else [6]
    engine = RolloutEngine(model, spec=spec, max_batch=8, calibrate=False)
    gen = MigratingGenerator(layout, groups, every=2, transfer=transfer)
    out = gen.generate(engine, [PROMPTS[k] for k in keys], params, keys, reserve=(7, 6))
    return _key(out), gen.stats.moves, gen.stats.with_cache, gen.stats.recomputed, engine.stats.tokens


@pytest.mark.timeout(240)
@pytest.mark.parametrize("tp,spec,greedy,transfer", [(1, "off", True, "cache"), (1, "ngram:3", False, "recompute"),
                                                     (2, "off", True, "auto")],
                         ids=["d2-greedy-cache", "d2-sampled-spec-recompute", "d2t2-greedy-auto"])
def test_instances_move_work_to_the_idle_one(tp, spec, greedy, transfer):
    world = 2 * tp
    results = spawn(_dp_worker, world, args=(tp, spec, greedy, transfer), timeout_s=200)
    params = SamplingParams(greedy=greedy, temperature=1.0, max_new_tokens=16, n=1, seed=2)
    expected = _key(_expected(tiny_model("llama"), params))
    layout = Layout(tuple(range(world)), 2, tp)
    for rank, (got, moves, with_cache, recomputed, _) in enumerate(results):
        dp = layout.coord(rank)[1]
        share = [0, 1, 2, 3, 4, 5] if dp == 0 else [6]
        assert got == [e for e in expected if e[0] in share], f"rank {rank}"
        # the first exchange: loads 6, 1 -> 4, 3 (later, the instance that received may lag and give back)
        assert moves[:2] == [(1, 0, 1), (1, 0, 1)], f"rank {rank}: {moves}"
        assert with_cache + recomputed == len(moves)
        if transfer != "auto":
            assert (with_cache if transfer == "cache" else recomputed) == len(moves)
    # each token was emitted by one instance, and the idle one emitted more than its own prompt's response
    decoded = [results[layout.rank_at(0, dp, 0)][4] for dp in (0, 1)]
    assert sum(decoded) == sum(len(e[2]) for e in expected)
    assert decoded[1] > sum(len(e[2]) for e in expected if e[0] == 6)
