"""Gradients of a model trained under a layout: data-parallel summation and the global norm.

With each data-parallel replica computing its share of a mini-batch's loss (each divided by the
mini-batch's global unit count, as the one-process trainer does), `sync_gradients` sums the
replicas' gradients: the update equals the one-process update. `clip_grad_norm` computes the
norm of the whole model's gradient from local shards: tensor-parallel shards add their squares
across the tp group, parameters that tp replicates count once, pipeline stages add theirs, and a
tied embedding held by the first and the last stage counts once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from remesh.plan.layout import Layout, ShardSpec


BUCKET_BYTES = 32 * 2**20


def sync_gradients(model: nn.Module, dp_group: dist.ProcessGroup | None, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum every parameter's gradient over the data-parallel group. Gradients of at least
    `bucket_bytes` are summed in place; smaller ones are packed into flat buckets of about that
    size: a few collectives instead of one per tensor, and at most one bucket of extra memory
    (one flat copy of every gradient doubled the gradients' memory at the step's peak)."""
    if dp_group is None:
        return
    bucket: list[torch.Tensor] = []
    filled = 0
    # one flat buffer serves every bucket of the call: on a CPU each fresh 32 MiB tensor is a
    # fresh mmap, page-faulted in again (SmolLM2-135M's sum took 2x its all-reduce time so)
    staging = torch.empty(0)

    def flush() -> None:
        nonlocal filled, staging
        if len(bucket) == 1:
            dist.all_reduce(bucket[0], group=dp_group)
        elif bucket:
            n = sum(g.numel() for g in bucket)
            if staging.numel() < n or staging.dtype != bucket[0].dtype or staging.device != bucket[0].device:
                staging = torch.empty(n, dtype=bucket[0].dtype, device=bucket[0].device)
            flat = torch.cat([g.reshape(-1) for g in bucket], out=staging[:n])
            dist.all_reduce(flat, group=dp_group)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        bucket.clear()
        filled = 0

    for p in model.parameters():
        g = p.grad
        if g is None:
            continue
        nbytes = g.numel() * g.element_size()
        if nbytes >= bucket_bytes and g.is_contiguous():
            dist.all_reduce(g, group=dp_group)
            continue
        bucket.append(g)
        filled += nbytes
        if filled >= bucket_bytes:
            flush()
    flush()


def clip_grad_norm(model: nn.Module, max_norm: float, spec: ShardSpec, layout: Layout, rank: int,
                   tp_group: dist.ProcessGroup | None, pp_group: dist.ProcessGroup | None) -> float:
    """Scale gradients so that the whole model's gradient norm is at most `max_norm` (inf: no
    clipping); returns the norm before clipping, identical on every rank of the layout."""
    stage, _, tp_rank = layout.coord(rank)
    device = next(model.parameters()).device  # collectives on the backend's device (NCCL: CUDA)
    sharded, replicated = [], []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        info = spec.param(name, layout.pp)
        if stage != info.stages[0]:  # a tied embedding's last-stage copy (its gradient already summed)
            continue
        if info.tp_dim is not None:
            sharded.append(p.grad)
        elif tp_rank == 0:  # the same on every tp rank: count it once
            replicated.append(p.grad)
    # squared norms (torch's foreach norms per tensor), summed in float64 across shards and stages
    total = torch.zeros((), dtype=torch.float64, device=device)
    for grads in (sharded, replicated):
        if grads:
            total += torch.nn.utils.get_total_norm(grads, 2.0).double().square()
    for group in (tp_group, pp_group):
        if group is not None:
            dist.all_reduce(total, group=group)
    norm = total.sqrt()
    if max_norm != float("inf"):
        torch.nn.utils.clip_grads_with_norm_([p for p in model.parameters() if p.grad is not None], max_norm, norm)
    return float(norm)
