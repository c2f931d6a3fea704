"""The planner's pieces against hand-computed cases: FLOPs and parameters of a layer, GEMM rate
interpolation, memory of a layout, reallocation totals, a two-MFC timeline (and core sharing),
cluster-spec errors, the search against the heuristics, and the no-plan-fits error."""

from __future__ import annotations

import dataclasses
import math
import os
import warnings

import pytest
import torch

from remesh.dataflow.graph import MFC, DataflowGraph, graph_for
from remesh.plan.layout import Layout, ShardSpec
from remesh.plan.plan import parse_plan, validate
from remesh.planner.cluster import Cluster, parse_bytes
from remesh.planner.estimator import (Estimator, Workload, _transfer_totals, kv_bytes_per_token, layer_flops,
                                      layer_linears, layer_params, zero_shares)
from remesh.planner.profile import (COLD_BYTES, HardwareProfile, LinkCost, _median_comm, _median_values,
                                    check_drift, cold_copies, drift_ratio, time_reference_layer)
from remesh.planner.search import NoPlanFits, search
from remesh.planner.simulate import simulate
from remesh.runtime.realloc import DIRECT_MIN_BYTES, MessageRules, transfer_plan
from tests.models import tiny_args

A = tiny_args("llama", vocab_size=96)  # dim 64, 4 heads of 16, 2 kv heads, ffn 96, 2 layers, vocab 96


def _profile(**over) -> HardwareProfile:
    """A made-up device: 1 GFLOP/s everywhere, 1 GB/s memory, no fixed costs."""
    kw = dict(name="toy", device="cpu", source="test", threads=1,
              gemm={"float32": [[1, 64, 64, 1e9, 1e9], [4096, 64, 64, 1e9, 1e9]]},
              attention_flops_per_s={"float32": 1e9}, mem_bytes_per_s=1e9, layer_overhead_s=0.0,
              train_layer_overhead_s=0.0, step_overhead_s=0.0, seq_overhead_s=0.0, call_overhead_s=0.0,
              comm={"gloo": {"p2p": LinkCost(0.0, 1e12)}})
    kw.update(over)
    return HardwareProfile(**kw)


def _cluster(devices: int = 2, memory: float = 1e12, cores: int | None = None, **profile) -> Cluster:
    return Cluster("toy", 1, devices, memory, _profile(**profile), "gloo", LinkCost(0.0, 1e15), None, cores)


def _workload(graph: DataflowGraph, **over) -> Workload:
    kw = dict(graph=graph, models={r: A for r in graph.roles if r != "reward"}, dtype="float32", prompts=4,
              n_samples=1, prompt_len=10, prompt_len_max=12, gen_len=8, gen_len_max=8, micro_batch_tokens=4096)
    kw.update(over)
    return Workload(**kw)


def test_layer_counts_by_hand():
    # q 64x64, k and v 64x32, o 64x64, w1 and w3 64x96, w2 96x64
    assert layer_linears(A, 1) == [(64, 64), (64, 32), (64, 32), (64, 64), (64, 96), (64, 96), (96, 64)]
    assert layer_params(A) == 30720 + 128 == (A.num_params() - 96 * 64 * 2 - 64) // 2
    # 10 tokens over 20 positions: 2 * 10 * 30720 + 4 * 10 * 20 * 16 * 4 heads
    assert layer_flops(A, 10, 20) == 614400 + 51200
    assert layer_flops(A, 10, 20, tp=2) == 307200 + 25600
    assert kv_bytes_per_token(A, tp=1, bytes_per_el=4) == 2 * 2 * 2 * 16 * 4  # k and v, 2 layers, 2 kv heads
    assert kv_bytes_per_token(A, tp=2, bytes_per_el=2) == 2 * 2 * 1 * 16 * 2


def test_packed_tokens_follow_shared_prompts():
    graph = graph_for("grpo")
    train, ref = (next(m for m in graph.mfcs if m.name == name) for name in ("actor_train", "ref_inf"))
    w = _workload(graph, n_samples=4)  # 4 prompts of 10 tokens x 4 samples of 8 tokens
    assert w.packed_tokens(ref, 1, 10, 8) == 4 * 10 + 16 * 8
    assert w.packed_tokens(train, 2, 10, 8) == 2 * 10 + 8 * 8  # two whole prompts per replica
    assert w.packed_tokens(train, 8, 10, 8) == 2 * (10 + 8)  # fewer prompts than replicas: samples split
    assert _workload(graph, n_samples=4, shared_prompts=False).packed_tokens(ref, 1, 10, 8) == 16 * 18
    # mini-batches draw samples at random: a train call counts no sharing, inference still does
    w = _workload(graph, n_samples=4, mini_batches=2)
    assert w.packed_tokens(train, 1, 10, 8) == 16 * 18 and w.packed_tokens(ref, 1, 10, 8) == 168


def test_tensor_parallel_collectives_by_hand():
    graph = graph_for("grpo", reference=False)

    def forward(latency: float, train: bool, head_rows: int) -> float:
        cluster = Cluster("toy", 1, 2, 1e12, _profile(), "gloo", LinkCost(latency, 1e15), None, None)
        est = Estimator(_workload(graph), cluster)
        return est._forward(A, Layout.parse("d1t2@0-1"), 10, 10, 1, head_tokens=head_rows, train=train)

    # an all-reduce on 2 ranks costs two link latencies (a ring's two passes); per layer 2 in a
    # forward and 4 with the backward, the vocabulary-parallel embedding's 1, the log-probs' 3
    # (max, sum, target logit) and in backward the head's input gradient
    assert forward(1.0, False, 0) - forward(0.0, False, 0) == pytest.approx(2 * (A.n_layers * 2 + 1))
    assert forward(1.0, False, 4) - forward(0.0, False, 4) == pytest.approx(2 * (A.n_layers * 2 + 1 + 3))
    assert forward(1.0, True, 4) - forward(0.0, True, 4) == pytest.approx(2 * (A.n_layers * 4 + 1 + 3 + 1))


def test_vocabulary_parallel_head_has_its_own_elementwise_cost():
    graph = graph_for("grpo", reference=False)

    def head(tp: int, train: bool, **costs) -> float:
        est = Estimator(_workload(graph), _cluster(**costs))
        return est._head(A, tp, 10, train=train)

    measured = dict(logprob_s_per_el=1e-6, train_logprob_s_per_el=2e-6, tp_logprob_s_per_el=3e-6,
                    tp_train_logprob_s_per_el=5e-6)
    # 10 rows: each rank's slice of the vocabulary of 96 is 48, at the tp costs; without them
    # (an older profile) the tp = 1 costs stand in
    for train, tp1, tp2 in ((False, 1e-6, 3e-6), (True, 2e-6, 5e-6)):
        gemm = head(2, train)  # no elementwise costs: the GEMM alone
        assert head(2, train, **measured) - gemm == pytest.approx(10 * 48 * tp2)
        assert head(2, train, logprob_s_per_el=1e-6, train_logprob_s_per_el=2e-6) - gemm == pytest.approx(10 * 48 * tp1)
        assert head(1, train, **measured) - head(1, train) == pytest.approx(10 * 96 * tp1)


def test_gemm_rate_interpolates_in_log_m():
    p = _profile(gemm={"float32": [[1, 64, 64, 1e9, 1e9], [4, 64, 64, 4e9, 2e9], [16, 64, 64, 4e9, 4e9]]})
    assert p.gemm_flops_per_s(2, 64, 64, "float32") == pytest.approx(2e9)  # halfway in log m
    assert p.gemm_flops_per_s(64, 64, 64, "float32") == pytest.approx(4e9)  # beyond the grid: the edge
    assert p.gemm_flops_per_s(4, 64, 64, "float32", train=True) == pytest.approx(2e9)
    # 2 * 4 * 64 * 64 FLOPs at 4 GFLOP/s, vs (64*64 + 4*128) * 4 bytes at 1 GB/s: memory-bound
    assert p.gemm_seconds(4, 64, 64, "float32", 4) == pytest.approx((4096 + 512) * 4 / 1e9)


def test_memory_of_a_layout_by_hand():
    graph = graph_for("grpo", reference=False)  # actor_gen, rew_inf (rule: no model), actor_train
    est = Estimator(_workload(graph, n_samples=2, migrate=False), _cluster(devices=2))
    n = A.num_params()
    plan = parse_plan("actor_gen=d1@0 rew_inf=d2@0-1 actor_train=d2@0-1", 2).layouts
    mem = est.memory(plan)
    for r in (0, 1):  # full replicas: parameters and two Adam moments (fp32) stay resident
        assert mem[r].params == n * 4 and mem[r].optimizer == 2 * n * 4
    # training's activations, before any gradient exists: per rank 2 prompts of 12
    # tokens, each packed once before its 2 responses of 8 (shared prompts), 56 tokens in one
    # micro-batch; saved per token and layer (5 * 64 + 8 heads * 16 + 4 * 96) * 4 bytes, one
    # layer's live tensors (4 * 64 + 4 * 16 + 3 * 96) * 4, and the head's logits (their
    # log-sum-exp taken in place) on the 4 * 8 response rows, fp32, untied vocabulary of 96
    acts = 3328 * 2 * 56 + 2432 * 56 + 32 * 96 * 4
    train = next(m for m in graph.mfcs if m.name == "actor_train")
    assert est.transient_bytes(train, plan["actor_train"])[0] == acts
    # the peak is the end of the backward, above them: every gradient, and the dp gradient sum's
    # one bucket (the whole model, under 32 MiB)
    assert acts < 2 * n * 4
    assert (mem[0].transient, mem[0].grads, mem[0].transient_mfc) == (n * 4, n * 4, "actor_train")
    # with micro-batches of 40 tokens a step accumulates two: the second one's activations come
    # on top of the first one's gradients (the end of the backward, gradients and the embedding
    # table's new gradient, 96 x 64, is lower)
    est40 = Estimator(_workload(graph, n_samples=2, migrate=False, micro_batch_tokens=40), _cluster(devices=2))
    acts40 = 3328 * 2 * 40 + 2432 * 40 + 32 * 96 * 4
    assert est40.call_peak(train, plan["actor_train"], 0) == (acts40, n * 4)
    assert acts40 > 96 * 64 * 4
    assert mem[0].copies == 0  # the generation copy on rank 0 is the training copy's tensors
    # tensor parallel training: each rank holds its shard (as ShardSpec counts it)
    plan = parse_plan("actor_gen=d1@0 rew_inf=d2@0-1 actor_train=d1t2@0-1", 2).layouts
    mem = est.memory(plan)
    local = ShardSpec(A).local_bytes(Layout((0, 1), 1, 2), 0)
    assert mem[0].params == local
    # generation needs the whole model on rank 0: a copy of all but the norms, which tp replicates
    # (rank 0 holds them whole: aliased): 2 per layer and the final one, 64 each
    assert mem[0].copies == (n - (2 * 2 + 1) * 64) * 4
    # generation's KV cache: 8 sequences (4 prompts x 2) x (12 + 8 + 1) positions on the one instance
    assert mem[0].transient >= 8 * 21 * kv_bytes_per_token(A, 1, 4)
    # ZeRO-1 over 2 replicas: matrices largest first onto the least loaded rank (eight of 96x64 or
    # 64x96, four of 64x64, four of 64x32: half each), then the five norms of 64 (3 to rank 0)
    assert zero_shares([(4, 4), (2, 3), (10,), (3,)], 2) == [16 + 3, 6 + 10]
    est = Estimator(_workload(graph, n_samples=2, migrate=False, zero=("actor",)), _cluster(devices=2))
    mem = est.memory(parse_plan("actor_gen=d1@0 rew_inf=d2@0-1 actor_train=d2@0-1", 2).layouts)
    half = 4 * 6144 + 2 * 4096 + 2 * 2048
    assert (mem[0].optimizer, mem[1].optimizer) == (2 * (half + 3 * 64) * 4, 2 * (half + 2 * 64) * 4)
    assert mem[0].params == n * 4  # parameters and gradients stay whole
    # in bf16, the moments too are bf16 (torch's AdamW keeps them in the parameters' dtype)
    est = Estimator(_workload(graph, n_samples=2, migrate=False, dtype="bfloat16"), _cluster(devices=2))
    mem = est.memory(parse_plan("actor_gen=d1@0 rew_inf=d2@0-1 actor_train=d2@0-1", 2).layouts)
    assert mem[0].params == n * 2 and mem[0].optimizer == 2 * n * 2



def test_roles_held_in_another_dtype_are_counted_and_timed_in_it():
    # a bf16 actor beside an fp32 critic and reward model (rl/roles.py's role_dtype)
    graph = graph_for("ppo", reference=False)
    n = A.num_params()
    plan = parse_plan("actor_gen=d1@0 rew_inf=d1@1 critic_inf=d1@1 actor_train=d1@0 critic_train=d1@1", 2).layouts
    models = {r: A for r in graph.roles}
    # bf16 GEMMs and attention 8x as fast as fp32: each call's time tells which dtype it ran in
    rates = dict(gemm={"float32": [[1, 64, 64, 1e9, 1e9], [4096, 64, 64, 1e9, 1e9]],
                       "bfloat16": [[1, 64, 64, 8e9, 8e9], [4096, 64, 64, 8e9, 8e9]]},
                 attention_flops_per_s={"float32": 1e9, "bfloat16": 8e9}, mem_bytes_per_s=1e12)
    mixed = Estimator(_workload(graph, models=models, dtype="bfloat16",
                                role_dtypes={"critic": "float32", "reward": "float32"}), _cluster(devices=2, **rates))
    mem = mixed.memory(plan)
    assert (mem[0].params, mem[0].optimizer) == (n * 2, 2 * n * 2)  # the actor: bf16
    assert (mem[1].params, mem[1].optimizer, mem[1].frozen) == (n * 4, 2 * n * 4, n * 4)  # critic, reward: fp32
    # each call is timed as the all-fp32 or all-bf16 estimate times it
    fp32 = Estimator(_workload(graph, models=models, dtype="float32"), _cluster(devices=2, **rates))
    bf16 = Estimator(_workload(graph, models=models, dtype="bfloat16"), _cluster(devices=2, **rates))
    for m in graph.mfcs:
        same, other = (fp32, bf16) if m.role in ("critic", "reward") else (bf16, fp32)
        assert mixed.mfc_seconds(m, plan[m.name]) == same.mfc_seconds(m, plan[m.name]), m.name
        assert same.mfc_seconds(m, plan[m.name]) != other.mfc_seconds(m, plan[m.name]), m.name
    assert mixed.realloc_seconds("critic", plan["critic_train"], Layout((0, 1), 2)) == \
        fp32.realloc_seconds("critic", plan["critic_train"], Layout((0, 1), 2))


def test_a_pipelined_generation_caches_its_stage_layers_only():
    graph = graph_for("grpo", reference=False)
    est = Estimator(_workload(graph, n_samples=2, migrate=False), _cluster(devices=2))
    gen = next(m for m in graph.mfcs if m.call == "generate")
    whole, staged = est.transient_bytes(gen, Layout((0,))), est.transient_bytes(gen, Layout((0, 1), pp=2))
    # 8 sequences (4 prompts x 2) of (12 + 8 + 1) positions; a stage caches one of the 2 layers
    assert whole - staged == 8 * 21 * kv_bytes_per_token(A, 1, 4, layers=1)


def test_reallocation_totals_from_a_reduced_model_match_the_full_plan():
    args = dataclasses.replace(A, n_layers=4)
    src, dst = Layout((0, 1, 2, 3), 1, 2, 2), Layout((0, 1, 2, 3), 2, 1, 2)
    sent, recv, _, local, staging = _transfer_totals(args, "float32", src, dst)
    plan = transfer_plan(ShardSpec(args), src, dst)
    rules = MessageRules(ShardSpec(args), src, dst, DIRECT_MIN_BYTES)
    for r in range(4):
        assert sent.get(r, 0) == sum(t.numel * 4 for t in plan if t.src == r and t.dst != r)
        assert recv.get(r, 0) == sum(t.numel * 4 for t in plan if t.dst == r and t.src != r)
        assert local.get(r, 0) == sum(t.numel * 4 for t in plan if t.dst == r and t.src == r)
        # one round per peer here: the staging buffers hold every staged piece
        assert staging.get(r, 0) == sum(t.numel * 4 for t in plan if r in rules.staged_on(t)) > 0


def test_reallocation_time_by_hand():
    """d1@0 -> d2@0-1 of the 2-layer model: rank 0 sends everything to rank 1 in one message (a
    link of 1 GB/s and 1 ms a message) and copies its own at the memory bandwidth (1 GB/s); then
    each target builds its model."""
    graph = graph_for("ppo")
    cluster = Cluster("toy", 1, 2, 1e12, _profile(build_model_s=0.5, build_layer_s=0.25), "gloo", LinkCost(1e-3, 1e9),
                      None, None)
    est = Estimator(_workload(graph), cluster)
    src, dst = Layout((0,)), Layout((0, 1), 2)
    nbytes = A.num_params() * 4
    sent, recv, msgs, local, _ = _transfer_totals(A, "float32", src, dst)
    assert sent == {0: nbytes} and recv == {1: nbytes} and msgs == {0: 1} and local == {0: nbytes}
    want = nbytes / 1e9 + 1e-3 + nbytes / 1e9 + 0.5 + 0.25 * 2  # the busiest link, the local copy, the build
    assert est.realloc_seconds("actor", src, dst) == pytest.approx(want)
    assert est.realloc_seconds("actor", src, src) == 0.0


class _Fixed(Estimator):
    """Calls and reallocations of given durations."""

    def __init__(self, workload, cluster, seconds: dict[str, float], realloc: float = 0.0):
        super().__init__(workload, cluster)
        self.seconds, self.realloc = seconds, realloc

    def mfc_seconds(self, mfc, layout):
        return self.seconds[mfc.name]

    def realloc_seconds(self, role, src, dst):
        return 0.0 if src == dst else self.realloc


GEN = MFC("actor_gen", "actor", "generate", ("prompts",), ("responses",))
TRAIN = MFC("actor_train", "actor", "train_step", ("responses",), ("actor_stats",))
GREEDY = MFC("actor_greedy", "actor", "generate", ("prompts",), ("greedy_responses",), (("greedy", True),))


def test_two_mfc_timeline_by_hand():
    graph = DataflowGraph("two", [GEN, TRAIN])
    est = _Fixed(_workload(graph), _cluster(2), {"actor_gen": 3.0, "actor_train": 2.0}, realloc=0.5)
    tl = simulate(parse_plan("actor_gen=d1@0 actor_train=d1@1", 2).layouts, est)
    spans = {t.name: (t.start, t.end) for t in tl.tasks}
    # reallocate the actor from its training layout (rank 1) to rank 0, generate, then train
    assert spans["realloc actor d1t1@1->d1t1@0"] == pytest.approx((0.0, 0.5))
    assert spans["actor_gen"] == pytest.approx((0.5, 3.5))
    assert spans["actor_train"] == pytest.approx((3.5, 5.5))
    assert tl.total == pytest.approx(5.5)
    # on the same ranks there is nothing to reallocate
    tl = simulate(parse_plan("actor_gen=d2@0-1 actor_train=d2@0-1", 2).layouts, est)
    assert tl.total == pytest.approx(5.0)


def test_concurrent_calls_share_the_cores():
    """Two generations on two ranks of a one-core node: both at half speed until the shorter
    (1 s of work) ends at 2 s, then the longer alone: 3 - 1 = 2 s more."""
    graph = DataflowGraph("two", [GEN, GREEDY])
    layouts = parse_plan("actor_gen=d1@0 actor_greedy=d1@1", 2).layouts
    est = _Fixed(_workload(graph), _cluster(2, cores=1), {"actor_gen": 3.0, "actor_greedy": 1.0})
    tl = simulate(layouts, est)
    spans = {t.name: (t.start, t.end) for t in tl.tasks}
    assert spans["actor_greedy"] == pytest.approx((0.0, 2.0))
    assert spans["actor_gen"] == pytest.approx((0.0, 4.0))
    # time-sharing one core costs 25% more: both at 1 / (2 x 1.25) speed until 2.5 s, then 2 s alone
    shared = _Fixed(_workload(graph), _cluster(2, cores=1, timeshare=0.25), est.seconds)
    assert simulate(layouts, shared).total == pytest.approx(4.5)
    # with two cores each runs alone; measured contention slows both while both run
    assert simulate(layouts, _Fixed(_workload(graph), _cluster(2, cores=2), est.seconds)).total == pytest.approx(3.0)
    slow = _Fixed(_workload(graph), _cluster(2, cores=2, contention=0.5), est.seconds)
    assert simulate(layouts, slow).total == pytest.approx(1.5 + 2.0)  # 1 s at 2/3 speed, then 2 s alone


def test_cluster_spec_errors(tmp_path):
    def load(text: str):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        return Cluster.load(path)

    c = load("nodes: 2\ndevices_per_node: 8\ndevice_memory: 80GiB\nprofile: h100-datasheet\n"
             "inter_node: {bandwidth: 50GB/s, latency: 10us}\n")
    assert c.world == 16 and c.device_memory == 80 * 2**30 and c.inter_node.latency_s == pytest.approx(1e-5)
    assert c.link((0, 1)) is c.intra_node and c.link((0, 8)) is c.inter_node
    with pytest.raises(ValueError, match="missing field 'device_memory'"):
        load("nodes: 1\ndevices_per_node: 2\nprofile: cpu-local\n")
    with pytest.raises(ValueError, match="device_memory: expected a size"):
        load("nodes: 1\ndevices_per_node: 2\ndevice_memory: lots\nprofile: cpu-local\n")
    with pytest.raises(ValueError, match="unknown field.*gpus"):
        load("nodes: 1\ndevices_per_node: 2\ndevice_memory: 8GB\nprofile: cpu-local\ngpus: 2\n")
    with pytest.raises(ValueError, match="2 nodes need an inter_node link"):
        load("nodes: 2\ndevices_per_node: 2\ndevice_memory: 8GB\nprofile: cpu-local\n")
    with pytest.raises(ValueError, match="devices_per_node must be a positive integer"):
        load("nodes: 1\ndevices_per_node: 0\ndevice_memory: 8GB\nprofile: cpu-local\n")
    with pytest.raises(ValueError, match="profile.*not found.*shipped"):
        load("nodes: 1\ndevices_per_node: 2\ndevice_memory: 8GB\nprofile: nowhere\n")
    with pytest.raises(ValueError, match="no such file or shipped cluster"):
        Cluster.load(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"c\.yaml:3: invalid YAML"):
        load("nodes: 1\ndevices_per_node: [2\n")
    with pytest.raises(ValueError, match=f"{tmp_path}: cannot read config file"):  # a folder
        Cluster.load(tmp_path)
    assert parse_bytes("1.5GiB", "x") == 1.5 * 2**30 and parse_bytes("24GB", "x") == 24e9


def test_search_is_no_worse_than_the_heuristics_and_valid():
    graph = graph_for("ppo")
    est = Estimator(_workload(graph, models={r: A for r in ("actor", "ref", "critic")}), _real_local(4))
    result = search(est, max_steps=400, seed=0)
    for h in result.heuristics.values():
        assert h is not None and result.best.seconds <= h.seconds + 1e-12
    models = {"actor": A, "ref": A, "critic": dataclasses.replace(A, head="value"), "reward": A}
    validate(result.best.plan, graph, models, 4)
    again = search(est, max_steps=400, seed=0)  # a step budget is deterministic
    assert again.best.plan == result.best.plan


def _real_local(devices: int) -> Cluster:
    """The shipped profile of this machine, as `devices` processes with ample memory."""
    return Cluster.from_dict({"nodes": 1, "devices_per_node": devices, "device_memory": "64GiB",
                              "profile": "cpu-local", "cores_per_node": 2})


def test_no_plan_fits_names_the_smallest_cluster():
    # 64 sequences' KV cache and activations dominate: more data-parallel devices divide them
    graph = graph_for("grpo", reference=False)
    work = _workload(graph, models={"actor": A}, prompts=64, prompt_len=200, prompt_len_max=200, gen_len=200,
                     gen_len_max=200, migrate=False)

    def cluster(memory: str) -> Cluster:
        return Cluster.from_dict({"nodes": 1, "devices_per_node": 8, "device_memory": memory,
                                  "profile": "cpu-local", "cores_per_node": 8})

    est = Estimator(work, cluster("8MiB"))
    with pytest.raises(NoPlanFits, match=r"no execution plan fits 1 devices of 8 MiB .*smallest cluster that "
                                         r"would fit: \d+ node\(s\) x 1 devices of 8 MiB") as info:
        search(dataclasses.replace(est, cluster=dataclasses.replace(est.cluster, nodes=1, devices_per_node=1)),
               max_steps=50)
    assert info.value.smallest
    # a model too large for any number of such devices: the memory it would need
    big = dataclasses.replace(A, dim=512, n_heads=8, n_kv_heads=8, ffn_dim=2048, n_layers=8, vocab_size=32000)
    est = Estimator(_workload(graph, models={"actor": big}), cluster("100MiB"))
    with pytest.raises(NoPlanFits, match=r"more devices of 100 MiB do not help .* at least \d+ MiB"):
        search(est, max_steps=50)


def test_gemm_rates_are_timed_over_weights_larger_than_the_cache():
    small, large = torch.zeros(576, 576), torch.zeros(6144, 6144)
    copies = cold_copies(small)
    assert copies[0] is small and sum(c.nbytes for c in copies) >= COLD_BYTES > 40 << 20
    assert len({c.data_ptr() for c in copies}) == len(copies)
    assert cold_copies(large) == [large]  # already beyond the cache


def test_link_costs_are_medians_over_passes():
    passes = [{"gloo": {"all_reduce": LinkCost(l, b)}} for l, b in ((1e-3, 9e8), (2e-3, 7e8), (5e-4, 1e9))]
    assert _median_comm(passes) == {"gloo": {"all_reduce": LinkCost(1e-3, 9e8)}}


def test_profile_passes_reduce_to_medians_nested_records_included():
    passes = [{"layer_s": t, "reference_layer": {"dim": 576, "decode_s": t * 2, "note": "x"}} for t in (3.0, 1.0, 2.0)]
    assert _median_values(passes) == {"layer_s": 2.0, "reference_layer": {"dim": 576, "decode_s": 4.0, "note": "x"}}


def test_shipped_profiles_load():
    cpu = HardwareProfile.load("cpu-local")
    assert cpu.device == "cpu" and cpu.gemm["float32"] and "gloo" in cpu.comm
    h100 = HardwareProfile.load("h100-datasheet")
    assert h100.source.startswith("datasheet") and math.isfinite(h100.gemm_flops_per_s(4096, 8192, 8192, "bfloat16"))


def test_local_profile_is_the_processors_own(tmp_path, monkeypatch):
    """A local cluster takes a profile measured on the processor it runs on: the user's own
    (`remesh profile` saves into the cache), else a shipped one, else cpu-local with a warning."""
    from remesh.planner import profile as prof
    from remesh.planner.cluster import local_cluster

    monkeypatch.setenv("REMESH_CACHE", str(tmp_path))
    monkeypatch.setattr(prof, "processor_name", lambda device="cpu": "Toy CPU 9000")
    with pytest.warns(UserWarning, match=r"no hardware profile of this processor \(Toy CPU 9000\).*remesh profile"):
        assert local_cluster(2).profile.name == "cpu-local"
    other = _profile(name="elsewhere", processor="Another CPU")
    other.save(prof.user_profiles_dir() / "elsewhere.json")
    (prof.user_profiles_dir() / "notes.json").write_text("{not json")  # not a profile: passed over
    mine = _profile(name="mine", processor="Toy CPU 9000")
    mine.save(prof.user_profiles_dir() / "mine.json")
    cluster = local_cluster(2)
    assert cluster.profile.name == "mine" and cluster.profile.processor == "Toy CPU 9000"
    shipped = HardwareProfile.load("cpu-local")
    monkeypatch.setattr(prof, "processor_name", lambda device="cpu": shipped.processor)
    assert shipped.processor and local_cluster(2).profile.name == "cpu-local"


def test_local_cluster_on_a_gpu_machine_takes_its_gpus(tmp_path, monkeypatch):
    """Where CUDA is available the ranks run on the GPUs over NCCL: so does the local cluster,
    with the GPU's own profile, else the H100 datasheet's with a warning; no core sharing."""
    from types import SimpleNamespace

    from remesh.planner import profile as prof
    from remesh.planner.cluster import local_cluster

    monkeypatch.setenv("REMESH_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(prof, "processor_name", lambda device="cpu": "NVIDIA Toy" if str(device) == "cuda" else "Toy CPU")
    with pytest.warns(UserWarning, match=r"\(NVIDIA Toy\).*h100-datasheet.*remesh profile --device cuda"):
        cluster = local_cluster(2)
    assert (cluster.profile.name, cluster.backend, cluster.cores_per_node) == ("h100-datasheet", "nccl", None)
    assert cluster.device_memory == 80 * 2**30
    _profile(name="toy-gpu", device="cuda", processor="NVIDIA Toy", comm={"nccl": {"p2p": LinkCost(0.0, 1e11)}}).save(
        prof.user_profiles_dir() / "toy-gpu.json")
    assert local_cluster(2).profile.name == "toy-gpu"
    with pytest.raises(ValueError, match="4 processes on GPUs, but this machine has 2 CUDA device.*trainer.nproc"):
        local_cluster(4)  # one GPU per rank
    # a run whose trainer.device is cpu runs CPU processes there: so does its cluster
    cpu = local_cluster(2, device="cpu", profile="cpu-local")
    assert (cpu.backend, cpu.cores_per_node) == ("gloo", os.cpu_count() or 1)
    with pytest.raises(ValueError, match="a local cluster needs at least 1 process, got 0"):
        local_cluster(0, device="cpu", profile="cpu-local")  # not a division by zero


def test_drift_ratio_is_over_the_summed_reference_times():
    recorded = {"dim": 576, "decode_16x64_s": 1.0, "prefill_512_s": 2.0, "train_512_s": 4.0}
    # (1.5 + 2 + 2) / (1 + 2 + 4): the long training step weighs most
    assert drift_ratio(recorded, {"decode_16x64_s": 1.5, "prefill_512_s": 2.0, "train_512_s": 2.0}) == pytest.approx(5.5 / 7)
    assert drift_ratio(recorded, {"decode_16x64_s": 1.3, "prefill_512_s": 2.6, "train_512_s": 5.2}) == pytest.approx(1.3)
    assert drift_ratio({"train_512_s": 2.0}, {"decode_16x64_s": 9.0, "train_512_s": 3.0}) == 1.5  # recorded ones only
    assert drift_ratio({}, {"decode_16x64_s": 1.0}) is None


def test_check_drift_warns_when_the_machine_no_longer_matches_its_profile(monkeypatch):
    import remesh.planner.profile as profile_module

    recorded = {"decode_16x64_s": 0.01, "prefill_512_s": 0.1, "train_512_s": 0.3}
    profile = _profile(reference_layer=recorded)
    slower = {k: v * 1.3 for k, v in recorded.items()}  # beyond the 1.25x tolerance
    monkeypatch.setattr(profile_module, "time_reference_layer", lambda device, reps=5: slower)
    with pytest.warns(UserWarning, match=r"1\.30x as long as when profile toy was measured.*remesh profile"):
        assert check_drift(profile) == pytest.approx(1.3)
    monkeypatch.setattr(profile_module, "time_reference_layer", lambda device, reps=5: {k: v * 1.2 for k, v in recorded.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_drift(profile) == pytest.approx(1.2)
        assert check_drift(_profile()) is None  # a datasheet profile records no reference layer
        assert check_drift(profile, "meta") is None  # another device kind than the profile's


def test_reference_layer_times_are_positive_and_ordered():
    torch.set_num_threads(1)
    t = time_reference_layer(torch.device("cpu"), reps=1)
    assert 0 < t["decode_16x64_s"] < t["prefill_512_s"] < t["train_512_s"]


def test_profile_command_checks_its_options_before_measuring(tmp_path, monkeypatch, capsys):
    """Measuring takes minutes and its result is written at the end: a bad option is refused first."""
    import remesh.planner.profile as profile_module
    from remesh.cli import main

    monkeypatch.setattr(profile_module, "measure_profile", lambda *a, **k: pytest.fail("measured"))
    for argv, expected in [(["--out", str(tmp_path)], "is a folder; give a file name"),
                           (["--device", "bogus"], "--device: unknown device 'bogus'"),
                           (["--threads", "0"], "--threads: must be >= 1, got 0"),
                           (["--passes", "0"], "--passes: must be >= 1, got 0")]:
        assert main(["profile", *argv]) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (argv, lines)
