"""Dataflow graphs of each algorithm, and the one-process executor's dependency order."""

from __future__ import annotations

import pytest

from remesh.dataflow.executor import OneProcessExecutor
from remesh.dataflow.graph import MFC, DataflowGraph, graph_for


def test_ppo_graph_levels():
    """PPO: actor_gen -> {ref_inf, rew_inf, critic_inf} -> {actor_train, critic_train}."""
    levels = [[m.name for m in lv] for lv in graph_for("ppo").levels()]
    assert levels == [["actor_gen"], ["ref_inf", "rew_inf", "critic_inf"], ["actor_train", "critic_train"]]


def test_remax_graph_has_no_critic_and_a_greedy_call():
    g = graph_for("remax")
    assert g.roles == ["actor", "ref", "reward"]
    greedy = next(m for m in g.mfcs if m.name == "actor_greedy")
    assert greedy.option("greedy") is True and greedy.call == "generate"
    rew = next(m for m in g.mfcs if m.name == "rew_inf")
    assert set(rew.inputs) == {"responses", "greedy_responses"}
    assert g.describe() == "{actor_gen, actor_greedy} -> {ref_inf, rew_inf} -> actor_train"


@pytest.mark.parametrize("algo", ["grpo", "rloo", "reinforce_pp"])
def test_group_graphs_have_no_critic(algo):
    assert "critic" not in graph_for(algo).roles


def test_invalid_graphs_are_rejected():
    a = MFC("a", "actor", "generate", ("prompts",), ("x",))
    with pytest.raises(ValueError, match="needs 'y'"):
        DataflowGraph("t", [a, MFC("b", "ref", "inference", ("y",), ("z",))])
    with pytest.raises(ValueError, match="produced by both"):
        DataflowGraph("t", [a, MFC("b", "ref", "inference", ("x",), ("x",))])
    with pytest.raises(ValueError, match="cycle"):
        DataflowGraph("t", [MFC("a", "actor", "generate", ("y",), ("x",)),
                            MFC("b", "ref", "inference", ("x",), ("y",))])
    with pytest.raises(ValueError, match="unknown algorithm"):
        graph_for("dpo")


def test_executor_runs_in_dependency_order_and_passes_named_data():
    calls = []

    def handler(mfc, inputs):
        calls.append(mfc.name)
        return {k: f"{mfc.name}({','.join(sorted(inputs))})" for k in mfc.outputs}

    g = graph_for("ppo")
    ex = OneProcessExecutor(g, {(m.role, m.call): handler for m in g.mfcs})
    data, times = ex.run({"prompts": "p"})
    assert calls.index("actor_gen") < calls.index("ref_inf") < calls.index("actor_train")
    assert data["values"] == "critic_inf(responses)"
    assert set(times) == {m.name for m in g.mfcs}
    with pytest.raises(ValueError, match="no handler"):
        OneProcessExecutor(g, {})


@pytest.mark.parametrize("algo", ["ppo", "remax", "grpo"])
def test_graph_without_reference_drops_ref_inf(algo):
    """With no KL term the graph has no ref role and no train MFC waits for ref_logp."""
    g = graph_for(algo, reference=False)
    assert "ref" not in g.roles
    assert all("ref_logp" not in m.inputs for m in g.mfcs)
    assert [m.name for m in g.levels()[0]] == [m.name for m in graph_for(algo).levels()[0]]
