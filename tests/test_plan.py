"""Execution plans and layouts: parsing, validation errors, heuristic plans, and the
reallocation transfer plan's exactness (pure; the multi-process execution is in test_realloc)."""

from __future__ import annotations

import random

import pytest
import torch

from remesh.dataflow.graph import graph_for
from remesh.plan.layout import Layout, ShardSpec, format_ranks, parse_ranks
from remesh.plan.plan import heuristic_plan, load_plan, parse_plan, plan_from_dict, static_memory, validate
from remesh.runtime.realloc import transfer_plan
from tests.models import tiny_args


def test_layout_parse_and_coordinates():
    lay = Layout.parse("d2t2@4-7")
    assert (lay.ranks, lay.dp, lay.tp, lay.pp) == ((4, 5, 6, 7), 2, 2, 1)
    assert str(lay) == "d2t2@4-7"
    # tp innermost, pp outermost
    lay = Layout.parse("d2t2p2@0-7")
    assert lay.coord(0) == (0, 0, 0) and lay.coord(1) == (0, 0, 1) and lay.coord(2) == (0, 1, 0)
    assert lay.coord(4) == (1, 0, 0) and lay.coord(7) == (1, 1, 1)
    assert lay.tp_group(5) == (4, 5) and lay.dp_group(5) == (5, 7) and lay.pp_group(5) == (1, 5)
    assert Layout.parse("d4@0-3").dp == 4 and Layout.parse("t2@0-3").dp == 2  # dp fills the mesh
    assert Layout.parse("p2m4@0,1").micro_batches == 4
    assert parse_ranks("0,2,4-5") == (0, 2, 4, 5) and format_ranks((0, 1, 2, 3, 6)) == "0-3,6"


@pytest.mark.parametrize("text, message", [
    ("d3t2@0-3", "d3 x t2 x p1 = 6 ranks, but the mesh has 4"),
    ("t3@0-3", "t3 x p1 does not divide the 4 ranks"),
    ("x2@0-1", "expected e.g. d2t2p1@0-3"),
    ("d2@3-1", "runs backwards"),
    ("d2@0,0", "appears twice"),
    # process groups order their ranks by number: a mesh listed otherwise is refused
    ("t2@1,0", "layout d1t2@1,0: list its ranks in ascending order"),
    ("d2@2-3,0-1", "list its ranks in ascending order"),
    ("d2", "no ranks"),
])
def test_layout_errors(text, message):
    with pytest.raises(ValueError, match=message):
        Layout.parse(text)


def test_plan_one_line_and_yaml_round_trip(tmp_path):
    text = "actor_gen=d4t1@0-3 actor_train=d2t2@0-3 ref_inf=d2t1@4-5 rew_inf=d2t1@4-5 critic_inf=d1t2@6-7 " \
           "critic_train=d1t2@6-7"
    plan = parse_plan(text)
    assert plan.world_size == 8 and plan.one_line() == text
    f = tmp_path / "plan.yaml"
    f.write_text(plan.to_yaml())
    assert load_plan(f) == plan
    d = plan_from_dict({"mfcs": {"actor_gen": {"ranks": "0-3", "tp": 2}, "actor_train": "d4@0-3"}})
    assert d.layouts["actor_gen"] == Layout((0, 1, 2, 3), 2, 2)
    assert plan.mfcs_on(6) == ["critic_inf", "critic_train"]


def test_plan_yaml_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"plan.mfcs.actor_gen: unknown key\(s\) \['tensor'\]"):
        plan_from_dict({"mfcs": {"actor_gen": {"ranks": "0-1", "tensor": 2}}})
    with pytest.raises(ValueError, match="plan.mfcs.actor_gen: missing 'ranks'"):
        plan_from_dict({"mfcs": {"actor_gen": {"dp": 2}}})
    f = tmp_path / "bad.yaml"
    f.write_text("mfcs: {actor_gen: d3@0-1}\n")
    with pytest.raises(ValueError, match=rf"{f}.mfcs.actor_gen: .*d3 x t1 x p1 = 3 ranks"):
        load_plan(f)
    f.write_text("world_size: 2\nmfcs: {actor_gen: [d2\n")
    with pytest.raises(ValueError, match=rf"{f}:3: invalid YAML"):  # read as config files are: the line
        load_plan(f)


def _ppo_models(**kw):
    args = tiny_args("llama", **kw)  # 4 heads, 2 kv heads, 2 layers, ffn 96, vocab 97
    critic = tiny_args("llama", head="value", **kw)
    return {"actor": args, "ref": args, "reward": critic, "critic": critic}


def test_validate_accepts_the_issue_example_plan():
    graph = graph_for("ppo")
    plan = parse_plan("actor_gen=d4@0-3 actor_train=d2t2@0-3 ref_inf=d2@4-5 rew_inf=d2@4-5 critic_inf=d1t2@6-7 "
                      "critic_train=d1t2@6-7")
    assert validate(plan, graph, _ppo_models(vocab_size=96), world_size=8) is plan


@pytest.mark.parametrize("text, world, message", [
    ("actor_gen=d2@0-1 actor_train=d2@0-1 ref_inf=d2@0-1 rew_inf=d2@0-1 critic_inf=d2@0-1 critic_train=d2@2-3",
     2, "critic_train=d2t1@2-3: rank\\(s\\) 2-3 out of range"),
    ("actor_gen=d2@0-1 actor_train=t2@0-1 ref_inf=d2@0-1 rew_inf=d2@0-1 critic_inf=d2@0-1 critic_train=d2@0-1",
     2, "actor_train=d1t2@0-1: vocabulary \\(97\\) not divisible by tp=2"),
    ("actor_gen=d2@0-1 actor_train=d2@0-1 ref_inf=d2@0-1 rew_inf=d2@0-1 critic_inf=d2@0-1 critic_train=d2@0-1 "
     "actor_gen_x=d2@0-1", 2, "has no MFC 'actor_gen_x' \\(did you mean 'actor_gen'\\?\\)"),
    ("actor_gen=d2@0-1 actor_train=d2@0-1", 2, "no layout for ref_inf, rew_inf, critic_inf, critic_train"),
    ("actor_gen=d2@0-1 actor_train=d1p2@0-1 ref_inf=d2@0-1 rew_inf=d2@0-1 critic_inf=d2@0-1 critic_train=t2@0-1",
     2, "critic_train=d1t2@0-1: vocabulary"),
])
def test_validate_errors(text, world, message):
    with pytest.raises(ValueError, match=message):
        validate(parse_plan(text, world), graph_for("ppo"), _ppo_models(), world_size=world)


def test_validate_heads_and_layers_divisibility():
    models = _ppo_models(vocab_size=96, n_layers=3)
    graph = graph_for("remax")
    base = "actor_gen=d2@0-1 ref_inf=d2@0-1 rew_inf=d2@0-1 actor_greedy=d2@0-1 "
    with pytest.raises(ValueError, match="actor_train=d1t1p2@0-1: 3 layers not divisible by pp=2"):
        validate(parse_plan(base + "actor_train=p2@0-1"), graph, models, 2)
    with pytest.raises(ValueError, match="kv heads \\(2\\) not divisible by tp=4"):
        validate(parse_plan(base.replace("d2@0-1", "d4@0-3") + "actor_train=t4@0-3"), graph,
                 {**models, "actor": tiny_args("llama", vocab_size=96, n_heads=4)}, 4)


def test_validate_memory_names_the_rank_and_what_it_needs():
    graph = graph_for("remax")
    models = _ppo_models(vocab_size=96)
    plan = heuristic_plan("colocated", graph, 2)
    validate(plan, graph, models, 2, device_memory=2**30)
    with pytest.raises(ValueError, match=r"rank 0 needs .* GiB for parameters, gradients and optimizer state alone "
                                         r"\(MFCs actor_gen, actor_greedy, ref_inf, rew_inf, actor_train\)"):
        validate(plan, graph, models, 2, device_memory=100_000)


def test_static_memory_shards_adam_state_over_dp_only_under_zero():
    graph = graph_for("remax")
    models = _ppo_models(vocab_size=96)
    plan = heuristic_plan("colocated", graph, 2)
    assert plan.layouts["actor_train"] == Layout((0, 1), 2)
    specs = {m.role: ShardSpec(models[m.role]) for m in graph.mfcs}
    plain = static_memory(plan, graph, specs, {"actor"})
    zero = static_memory(plan, graph, specs, {"actor"}, zero=frozenset({"actor"}))
    actor = specs["actor"].local_bytes(plan.layouts["actor_train"], 0)  # fp32: the moments are 2x this
    assert plain[0] - zero[0] == plain[1] - zero[1] == 2 * actor // 2  # half of each rank's two moments


def test_adam_state_is_counted_in_the_parameters_dtype():
    """torch's AdamW keeps its moments in the parameters' dtype: in bf16, everything a rank holds
    (parameters, gradients, moments, frozen models) is half the fp32 figure."""
    graph = graph_for("remax")
    models = _ppo_models(vocab_size=96)
    plan = heuristic_plan("colocated", graph, 2)
    fp32 = static_memory(plan, graph, {m.role: ShardSpec(models[m.role]) for m in graph.mfcs}, {"actor"})
    bf16 = static_memory(plan, graph, {m.role: ShardSpec(models[m.role], torch.bfloat16) for m in graph.mfcs},
                         {"actor"})
    assert {r: 2 * b for r, b in bf16.items()} == fp32



def test_validate_counts_each_role_in_its_dtype_and_no_weights_for_a_rule_reward():
    graph = graph_for("remax")
    models = _ppo_models(vocab_size=96)
    plan = heuristic_plan("colocated", graph, 2)
    dtypes = {"actor": torch.bfloat16, "ref": torch.bfloat16, "reward": torch.float32}  # rl/roles.py's role_dtype
    specs = {r: ShardSpec(models[r], d) for r, d in dtypes.items()}
    need = max(static_memory(plan, graph, specs, {"actor"}).values())
    validate(plan, graph, models, 2, device_memory=need, dtypes=dtypes)
    with pytest.raises(ValueError, match="rank 0 needs"):
        validate(plan, graph, models, 2, device_memory=need - 1, dtypes=dtypes)
    # a rule-based reward holds no model: the plan fits without room for one
    rule = need - specs["reward"].local_bytes(plan.layouts["rew_inf"], 0)
    assert max(static_memory(plan, graph, {r: specs[r] for r in ("actor", "ref")}, {"actor"}).values()) == rule
    validate(plan, graph, models, 2, device_memory=rule, dtypes=dtypes, weightless=frozenset({"reward"}))
    with pytest.raises(ValueError, match="rank 0 needs"):
        validate(plan, graph, models, 2, device_memory=rule, dtypes=dtypes)

def test_heuristic_plans():
    graph = graph_for("ppo")
    col = heuristic_plan("colocated", graph, 4)
    assert {str(l) for l in col.layouts.values()} == {"d4t1@0-3"}
    split = heuristic_plan("split", graph, 4)
    assert str(split.layouts["actor_gen"]) == "d2t1@0-1" and str(split.layouts["actor_train"]) == "d2t1@2-3"
    assert heuristic_plan("split", graph, 1).layouts["actor_gen"] == Layout((0,), 1, 1)
    with pytest.raises(ValueError, match="unknown heuristic plan 'other'"):
        heuristic_plan("other", graph, 4)


# ---- the transfer plan -----------------------------------------------------------------------

def _random_layout(rng: random.Random, world: int) -> Layout:
    size = rng.choice([s for s in (1, 2, 3, 4) if s <= world])
    ranks = tuple(sorted(rng.sample(range(world), size)))
    tp = rng.choice([t for t in (1, 2) if size % t == 0])
    pp = rng.choice([p for p in (1, 2) if (size // tp) % p == 0])
    return Layout(ranks, size // (tp * pp), tp, pp)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: tied embeddings, q/k/v biases
def test_transfer_plan_sends_each_byte_to_each_destination_once(family):
    spec = ShardSpec(tiny_args(family, vocab_size=96))
    rng = random.Random(0)
    for _ in range(40):
        src, dst = _random_layout(rng, 4), _random_layout(rng, 4)
        plan = transfer_plan(spec, src, dst)
        covered: dict[tuple[int, str], list[tuple[int, int]]] = {}
        for t in plan:
            have = spec.local_slice(spec.param(t.name, src.pp), src, t.src)
            assert have is not None and t.src_start + t.length <= have[2] - have[1]  # the sender holds it
            covered.setdefault((t.dst, t.name), []).append((t.dst_start, t.dst_start + t.length))
        for r in dst.ranks:  # every target shard tiled exactly once
            for name, shape in spec.local_shapes(dst, r).items():
                p = spec.param(name, dst.pp)
                dim = p.tp_dim if p.tp_dim is not None else 0
                spans = sorted(covered.pop((r, name)))
                assert spans[0][0] == 0 and spans[-1][1] == shape[dim], (src, dst, r, name, spans)
                assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), (src, dst, r, name, spans)
        assert not covered  # nothing sent to a rank that does not hold it


def test_transfer_plan_is_local_when_layouts_agree_and_spreads_senders():
    spec = ShardSpec(tiny_args("llama", vocab_size=96))
    lay = Layout((0, 1, 2, 3), 2, 2)
    assert all(t.src == t.dst for t in transfer_plan(spec, lay, lay))
    # four replicas send to four new ranks: every replica sends, none sends more than twice the mean
    plan = transfer_plan(spec, Layout((0, 1, 2, 3), 4, 1), Layout((4, 5, 6, 7), 4, 1))
    sent = {r: sum(t.numel for t in plan if t.src == r) for r in range(4)}
    assert min(sent.values()) > 0 and max(sent.values()) < 2 * sum(sent.values()) / 4
    assert sum(sent.values()) == 4 * sum(p.numel for p in spec.params(1))


def test_shard_state_matches_local_shapes():
    args = tiny_args("qwen2", vocab_size=96)
    spec = ShardSpec(args)
    from remesh.model.llama import Transformer

    full = Transformer(args).state_dict()
    lay = Layout((0, 1, 2, 3), 1, 2, 2)
    for r in lay.ranks:
        shards = spec.shard_state(full, lay, r)
        assert {n: tuple(t.shape) for n, t in shards.items()} == spec.local_shapes(lay, r)
    # tied embedding: on the first and the last stage
    assert "tok_embeddings.weight" in spec.shard_state(full, lay, 3)
    assert torch.equal(spec.shard_state(full, lay, 1)["layers.0.attention.wo.weight"],
                       full["layers.0.attention.wo.weight"][:, 32:])
