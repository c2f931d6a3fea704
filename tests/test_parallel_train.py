"""Under a layout, on gloo: a training step (dp gradient sum, tp shards, global-norm clipping,
AdamW) equals the one-process step; data moves between meshes re-balanced by tokens."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from remesh.model.attention import AttnContext
from remesh.plan.layout import Layout, ShardSpec
from remesh.runtime.data import balance_by_tokens, balance_groups, holder_rank, redistribute
from remesh.runtime.grads import clip_grad_norm, sync_gradients
from remesh.runtime.groups import ProcessGroups
from remesh.runtime.launch import spawn
from remesh.runtime.parallelize import build_local_model
from tests.models import tiny_model

SEQS = [7, 3, 11, 5]  # lengths of the mini-batch's sequences
MAX_NORM = 0.05  # small: clipping is active
# Adam moves an element by ~lr * g / (|g| + eps): at torch's eps (1e-8) a gradient that is ~0
# moves by up to lr on summation-order noise alone, which differs between CPUs (AVX2, AVX-512);
# at 1e-4 that noise moves it by ~1e-7, and every other element still moves by ~lr
ADAM_EPS = 1e-4


def _sequences():
    g = torch.Generator().manual_seed(5)
    return [(torch.randint(0, 96, (n,), generator=g), torch.randint(0, 96, (n,), generator=g),
             torch.randn(n, generator=g)) for n in SEQS]


def _loss(model, seqs):
    tokens = torch.cat([s[0] for s in seqs])
    positions = torch.cat([torch.arange(len(s[0])) for s in seqs])
    hidden = model(tokens, positions, AttnContext.packed([len(s[0]) for s in seqs]))
    logp = model.token_logprobs(hidden, torch.cat([s[1] for s in seqs]))
    return (logp * torch.cat([s[2] for s in seqs])).sum() / sum(SEQS)  # global units, as the trainer does


def _one_process_step():
    model = tiny_model("qwen2", vocab_size=96)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=ADAM_EPS)
    _loss(model, _sequences()).backward()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
    opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}, norm


def _layout_step(rank: int, layout: Layout, groups: ProcessGroups):
    full_model = tiny_model("qwen2", vocab_size=96)
    spec = ShardSpec(full_model.args)
    full = {n: p.detach().clone() for n, p in full_model.named_parameters()}
    shards = {n: t.clone() for n, t in spec.shard_state(full, layout, rank).items()}
    tp_group = groups.get(layout.tp_group(rank))
    model = build_local_model(full_model.args, layout, rank, shards, tp_group=tp_group)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=ADAM_EPS)
    seqs = _sequences()
    share = balance_by_tokens(dict(enumerate(SEQS)), layout.dp)[layout.coord(rank)[1]]
    _loss(model, [seqs[i] for i in share]).backward()
    # 4 KiB buckets: the embedding and head (24 KiB) are summed in place, the rest in several buckets
    sync_gradients(model, groups.get(layout.dp_group(rank)), bucket_bytes=4096)
    norm = clip_grad_norm(model, MAX_NORM, spec, layout, rank, tp_group, groups.get(layout.pp_group(rank)))
    opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norm


def _worker(rank: int, world: int):
    layouts = [Layout.parse("d2@0-1"), Layout.parse("t2@1-2"), Layout.parse("d3@0-2"), Layout.parse("d2@0,2")]
    groups = ProcessGroups.for_layouts(layouts)
    out = {}
    for layout in layouts[:2]:
        out[str(layout)] = _layout_step(rank, layout, groups) if rank in layout.ranks else None
    # data: produced by d2@0-1 (holders 0 and 1), consumed by d3@0-2
    produced = {0: {0: "a" * 9, 2: "c" * 2}, 1: {1: "b" * 4, 3: "d" * 6, 4: "e" * 1}}
    mine = produced.get(rank)
    lengths = {sid: len(v) for sid, v in mine.items()} if mine else None
    out["d3"] = redistribute(mine, lengths, layouts[0], layouts[2], groups)
    # a train call's inputs: every consumer rank gets every sample, on the producer's own ranks
    # (one all-gather) and on others (pairwise sends)
    out["same"] = redistribute(mine, lengths, layouts[0], layouts[0], groups, replicate=True)
    out["wider"] = redistribute(mine, lengths, layouts[0], layouts[2], groups, replicate=True)
    # produced by t2@1-2 (holder: rank 1, tp rank 0), consumed by d2@0,2 (rank 1 not in it)
    mine = {i: f"s{i}" for i in range(5)} if rank == holder_rank(layouts[1], 0) else None
    out["d2"] = redistribute(mine, {i: i + 1 for i in range(5)} if mine else None, layouts[1], layouts[3], groups)
    dist.barrier()
    return out


@pytest.mark.timeout(200)
def test_train_step_under_layouts_and_data_transfer():
    full, norm = _one_process_step()
    spec = ShardSpec(tiny_model("qwen2", vocab_size=96).args)
    results = spawn(_worker, 3, timeout_s=180)
    for text in ("d2t1@0-1", "d1t2@1-2"):
        layout = Layout.parse(text)
        for rank in layout.ranks:
            params, r_norm = results[rank][text]
            assert abs(r_norm - norm) < 1e-5 * norm, (text, rank, r_norm, norm)
            expected = spec.shard_state(full, layout, rank)
            assert params.keys() == expected.keys()
            for n, p in params.items():
                torch.testing.assert_close(p, expected[n], atol=1e-5, rtol=1e-5, msg=lambda m: f"{text} {n}: {m}")
    # lengths 9, 4, 2, 6, 1 over three replicas, longest first: {0}, {3, 4}, {1, 2}
    assert results[0]["d3"] == {0: "a" * 9}
    assert results[1]["d3"] == {3: "d" * 6, 4: "e"}
    assert results[2]["d3"] == {1: "b" * 4, 2: "cc"}
    everything = {0: "a" * 9, 1: "b" * 4, 2: "cc", 3: "d" * 6, 4: "e"}
    assert results[0]["same"] == results[1]["same"] == everything and results[2]["same"] == {}
    assert all(results[r]["wider"] == everything for r in range(3))
    assert list(results[0]["same"]) == sorted(everything)
    # lengths 1..5 over two replicas: {4, 1, 0} (5+2+1) and {3, 2} (4+3)
    assert results[0]["d2"] == {0: "s0", 1: "s1", 4: "s4"} and results[2]["d2"] == {2: "s2", 3: "s3"}
    assert results[1]["d2"] == {}


def test_balance_by_tokens_hand_example():
    assert balance_by_tokens({0: 10, 1: 1, 2: 6, 3: 5, 4: 2}, 2) == [[0, 4], [1, 2, 3]]  # 12 vs 12
    assert balance_by_tokens({0: 3}, 2) == [[0], []]


def test_balance_groups_keeps_a_prompts_samples_together():
    # 3 prompts x 2 samples (ids p * 2 + j): groups 0 (10 + 1), 1 (6 + 5), 2 (2 + 2)
    lengths = {0: 10, 1: 1, 2: 6, 3: 5, 4: 2, 5: 2}
    assert balance_groups(lengths, 2, group_size=2) == [[0, 1, 4, 5], [2, 3]]  # 15 vs 11
    assert balance_groups(lengths, 4, group_size=2) == balance_by_tokens(lengths, 4)  # fewer groups than parts
    assert balance_groups(lengths, 2) == balance_by_tokens(lengths, 2)


def _pp_worker(rank: int, world: int):
    from remesh.runtime.pipeline import MicroBatch, PipelineStage, sync_tied_embedding

    layout = Layout.parse("p2m2@0-1")
    groups = ProcessGroups.for_layouts([layout])
    full_model = tiny_model("qwen2", vocab_size=96)  # tied: the head on stage 1 is the embedding of stage 0
    spec = ShardSpec(full_model.args)
    full = {n: p.detach().clone() for n, p in full_model.named_parameters()}
    shards = {n: t.clone() for n, t in spec.shard_state(full, layout, rank).items()}
    model = build_local_model(full_model.args, layout, rank, shards)
    stage = PipelineStage(model, layout, rank, dim=full_model.args.dim)
    seqs = _sequences()
    parts = [[0, 1], [2, 3]]
    mbs = [MicroBatch(torch.cat([seqs[i][0] for i in p]), torch.cat([torch.arange(SEQS[i]) for i in p]),
                      [SEQS[i] for i in p]) for p in parts]
    targets = [torch.cat([seqs[i][1] for i in p]) for p in parts]
    weights = [torch.cat([seqs[i][2] for i in p]) for p in parts]
    with torch.no_grad():
        logp = stage.forward(mbs, lambda h, i: model.token_logprobs(h, targets[i]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=ADAM_EPS)
    loss = stage.train_step(mbs, lambda h, i: (model.token_logprobs(h, targets[i]) * weights[i]).sum() / sum(SEQS))
    sync_tied_embedding(model, spec, layout, rank, groups)
    norm = clip_grad_norm(model, MAX_NORM, spec, layout, rank, None, groups.get(layout.pp_group(rank)))
    opt.step()
    return {spec.canonical(n): p.detach().clone() for n, p in model.named_parameters()}, norm, logp, loss


@pytest.mark.timeout(200)
def test_pipeline_forward_and_1f1b_train_step_equal_one_process():
    full, norm = _one_process_step()
    model = tiny_model("qwen2", vocab_size=96)
    seqs = _sequences()
    with torch.no_grad():
        expected_logp = [model.token_logprobs(model(torch.cat([seqs[i][0] for i in p]),
                                                    torch.cat([torch.arange(SEQS[i]) for i in p]),
                                                    AttnContext.packed([SEQS[i] for i in p])),
                                              torch.cat([seqs[i][1] for i in p])) for p in ([0, 1], [2, 3])]
        expected_loss = float(_loss(model, seqs))
    spec = ShardSpec(model.args)
    layout = Layout.parse("p2m2@0-1")
    results = spawn(_pp_worker, 2, timeout_s=180)
    assert results[0][2] == [] and results[0][3] == 0.0  # the first stage has no outputs
    for got, want in zip(results[1][2], expected_logp):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert abs(results[1][3] - expected_loss) < 1e-5
    for rank, (params, r_norm, _, _) in enumerate(results):
        assert abs(r_norm - norm) < 1e-5 * norm, (rank, r_norm, norm)
        expected = spec.shard_state(full, layout, rank)
        assert params.keys() == expected.keys()
        for n, p in params.items():  # tolerance: see ADAM_EPS
            torch.testing.assert_close(p, expected[n], atol=1e-5, rtol=1e-5, msg=lambda m: f"stage {rank} {n}: {m}")
