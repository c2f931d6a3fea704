"""RL under an execution plan, on every rank of a torch.distributed job (ReaL's runtime).

Every rank walks the algorithm's graph in the same order and takes part only in what concerns
it, so MFCs on disjoint meshes run concurrently. For each MFC:

1. its inputs move from their producers' meshes (`runtime/data.py`): an inference or generate
   call gets its data-parallel replica's share, balanced by tokens; a train call gets the whole
   batch on every rank (advantages need group and batch statistics), and each data-parallel
   rank then computes its token-balanced share of every mini-batch;
2. the role's parameters are put into the MFC's layout: trainable roles keep their training
   copy in the train call's layout (the optimizer owns it) and are reallocated into another
   layout before a call that needs one (`runtime/realloc.py`); the copy lives to the end of the
   iteration, and its tensors are refilled in place by the next iteration's move; frozen roles
   (ref, reward) are built once in their call's layout;
3. the one-process trainer's handler runs on the local model and data (the RL math is the same
   code); gradients are summed over dp and clipped by the global norm (`runtime/grads.py`).

Generation seeds every sequence by its prompt's index in the whole batch, so a plan samples
what one process samples. At the end of an iteration, the ranks exchange their statistics, so
metrics and the KL controller are identical everywhere; rank 0 logs them.

Pipeline stages (pp > 1): inference streams micro-batches through the stages, training runs
the 1F1B schedule (`runtime/pipeline.py`), both with the one-process trainer's heads and losses
evaluated on the last stage; generation and reward scoring run their code on every stage of a
replica (`PipelineModel`). Sample migration is off for a generate call with pp > 1. With
`optim.zero`, a train call's optimizer state is sharded over its dp ranks (ZeRO-1).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from remesh.checkpoint import load_hf, load_tokenizer, resolve_model_path, save_hf
from remesh.config import ConfigError, config_to_dict
from remesh.dataflow.graph import EXTERNAL_INPUTS, MFC, graph_for
from remesh.model.llama import Transformer
from remesh.plan.layout import Layout, ShardSpec
from remesh.plan.plan import ExecutionPlan, resolve_plan, validate
from remesh.reward import build_reward_fn
from remesh.reward.rules import ROW_CHECKED_TERMS
from remesh.reward.scorer import rule_reward
from remesh.rl.batch import PackedMicroBatch, Responses, packed_tokens, prompt_groups
from remesh.rl.config import RLConfig
from remesh.rl.roles import role_args, role_dtype, role_source
from remesh.rl.trainer import RLResult, RLTrainer, load_prompts, plot_reward_curve, rollout_metrics, speculation_metrics
from remesh.rollout import Rollout, RolloutEngine, SamplingParams
from remesh.runtime.data import balance_by_tokens, balance_units, holder_rank, object_device, redistribute
from remesh.runtime.grads import clip_grad_norm, sync_gradients
from remesh.runtime.groups import ProcessGroups
from remesh.runtime.launch import default_backend, init_distributed, spawn
from remesh.runtime.migration import MigratingGenerator
from remesh.runtime.parallelize import build_local_model
from remesh.runtime.pipeline import MicroBatch, PipelineModel, PipelineStage, sync_tied_embedding
from remesh.runtime.realloc import ReallocStats, reallocate
from remesh.train.metrics import MetricsLogger
from remesh.train.optim import build_optimizer, build_scheduler
from remesh.train.state import (STATE_DIR, begin_outputs, checkpoint_plan, checkpoint_progress, load_trainer_state,
                                prune_checkpoints, resolve_resume, role_folder, save_planned_state, save_trainer_state)
from remesh.train.trainer import pick_device, tc_clip

if TYPE_CHECKING:
    from remesh.planner.simulate import Timeline

_RESPONSE_KEYS = ("responses", "greedy_responses")
_TOKEN_KEYS = ("behaviour_logp", "ref_logp", "values")  # per response token
_SCALAR_KEYS = ("scores", "greedy_scores")  # per sample


class PlannedRLTrainer(RLTrainer):
    def __init__(self, cfg: RLConfig, plan: ExecutionPlan, search: SearchOutputs | None = None):
        """`plan`: validated by `check_plan` for this world size; `search`: the report and
        timeline of the search that found it, which rank 0 writes with the run's outputs."""
        self.search = search
        if not dist.is_initialized():
            raise RuntimeError("a planned run needs torch.distributed: start it with torchrun or `remesh train ... "
                               "trainer.nproc=N`")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._setup_common(cfg)
        self.plan = plan
        self._setup_models()
        if self.resume_dir is not None:
            self._restore()

    # ---- setup ---------------------------------------------------------------------------------
    def _setup_models(self) -> None:
        cfg = self.cfg
        self.args = role_args(cfg, self.graph)
        self._all_realloc_logs: list[str] = []
        self.groups = ProcessGroups.for_layouts(list(self.plan.layouts.values()))
        # each role in its own dtype: a move's buffers are the spec's (a bf16 actor beside an fp32 critic)
        self.specs = {r: ShardSpec(a, role_dtype(cfg, r)) for r, a in self.args.items()}
        self.train_layout = {m.role: self.plan.layouts[m.name] for m in self.graph.mfcs if m.call == "train_step"}
        self.models: dict[tuple[str, Layout], Transformer] = {}  # (role, layout) -> this rank's local model
        self.engines: dict[Layout, RolloutEngine] = {}
        self.migrators: dict[Layout, MigratingGenerator] = {}
        self.realloc_log: list[str] = []
        self._built: set[tuple[str, Layout]] = set()  # other-layout copies made this iteration
        # their tensors, refilled in place by the next iteration's move: no allocation and no first
        # touch of fresh memory. No extra peak: a copy lives to the end of its iteration anyway
        self._copy_tensors: dict[tuple[str, Layout], dict[str, Tensor]] = {}
        full: dict[str, dict[str, Tensor]] = {}

        def build(role: str, layout: Layout) -> Transformer:
            if role not in full:
                path, head, dtype = role_source(cfg, role)
                if self.resume_dir is not None and role in self.train_layout:  # trained roles go on from the checkpoint
                    path = str(role_folder(self.resume_dir, role))
                full[role] = {n: p.detach() for n, p in load_hf(path, head=head, dtype=dtype).named_parameters()}
            shards = {n: t.clone() for n, t in self.specs[role].shard_state(full[role], layout, self.rank).items()}
            tp_group = self.groups.get(layout.tp_group(self.rank))
            return build_local_model(self.args[role], layout, self.rank, shards, tp_group, self.device)

        self.actor = self.critic = self.ref = None
        self._notes: list[str] = []
        for role, layout in self.train_layout.items():
            if self.rank in layout.ranks:
                model = build(role, layout)
                self.models[(role, layout)] = model
                opt_cfg = cfg.actor_optim if role == "actor" else cfg.critic_optim
                opt = build_optimizer(model, opt_cfg, self.groups.get(layout.dp_group(self.rank)))
                if hasattr(opt, "optim"):  # ZeRO-1: this rank updates (and keeps Adam state for) its part
                    mine = sum(p.numel() for g in opt.optim.param_groups for p in g["params"])
                    total = sum(p.numel() for p in model.parameters())
                    self._notes.append(f"{role} optimizer: ZeRO-1 over dp={layout.dp}, Adam state of "
                                       f"{mine:,} of this rank's {total:,} parameters on rank {self.rank}")
                setattr(self, role, model)
                setattr(self, f"{role}_opt", opt)
                setattr(self, f"{role}_sched", build_scheduler(opt, self.total_steps, opt_cfg))
        for m in self.graph.mfcs:
            lay = self.plan.layouts[m.name]
            if m.role in ("ref", "reward") and self.rank in lay.ranks and (m.role, lay) not in self.models:
                if m.role == "reward":  # the reward function scores with the rank's part of the model
                    model = None
                    if cfg.reward.model:
                        model = build(m.role, lay).requires_grad_(False).eval()
                        if lay.pp > 1:
                            model = PipelineModel(model, lay, self.rank, self.groups.get(lay.pp_group(self.rank)))
                    self.models[(m.role, lay)] = model
                    self.reward_fn = build_reward_fn(cfg.reward, self.device, model=model,
                                                     policy_tokenizer=self.tokenizer)
                else:
                    self.models[(m.role, lay)] = build(m.role, lay).requires_grad_(False).eval()
        full.clear()
        self.store: dict[str, dict[int, Any]] = {}  # key -> sample id -> item, on holder ranks

    # ---- per MFC -------------------------------------------------------------------------------
    def _model_for(self, mfc: MFC, layout: Layout) -> Transformer | None:
        """The role's model in `layout` on this rank, reallocating a trainable role's training
        copy when the layouts differ (collective over both meshes; None on other ranks)."""
        role = mfc.role
        src = self.train_layout[role]
        # the same decision on every rank (a rank outside `layout` must still send its part)
        if layout == src or (role, layout) in self._built:
            return self.models.get((role, layout)) if self.rank in layout.ranks else None
        self._built.add((role, layout))
        spec = self.specs[role]
        shards = _shards(self.models[(role, src)], spec) if self.rank in src.ranks else None
        # read-only copy, used before the training copy next changes: shards it holds whole are aliased
        out, stats = reallocate(spec, src, layout, shards, group=None, device=self.device, alias_local=True,
                                out=self._copy_tensors.get((role, layout)))
        self._log_realloc(role, src, layout, stats)
        if self.rank not in layout.ranks:
            return None
        self._copy_tensors[(role, layout)] = out
        model = build_local_model(self.args[role], layout, self.rank, out, self.groups.get(layout.tp_group(self.rank)),
                                  self.device).requires_grad_(False)
        self.models[(role, layout)] = model
        return model

    def _log_realloc(self, role: str, src: Layout, dst: Layout, stats: ReallocStats) -> None:
        if self.rank == min(dst.ranks):  # a target rank: its statistics include what it aliased
            self.realloc_log.append(f"{role}: {stats.describe(src, dst)}")

    def _gather_inputs(self, mfc: MFC, layout: Layout) -> dict[int, dict[str, Any]] | None:
        """This rank's samples of the MFC's inputs, by producer key set; collective over the
        producers' and the MFC's meshes."""
        by_producer: dict[str, list[str]] = {}
        for key in mfc.inputs:
            if key in EXTERNAL_INPUTS:
                continue
            by_producer.setdefault(self.graph.producer(key).name, []).append(key)
        samples: dict[str, dict[int, dict[str, Any]]] = {"sampled": {}, "greedy": {}}
        groups: dict[tuple[str, str], list[str]] = {}  # (producer, sample space) -> keys
        for producer, keys in by_producer.items():
            for key in keys:
                groups.setdefault((producer, "greedy" if key.startswith("greedy") else "sampled"), []).append(key)
        for (producer, space), keys in sorted(groups.items()):
            src = self.plan.layouts[producer]
            items = lengths = None
            if self.rank in {holder_rank(src, d) for d in range(src.dp)}:
                items = {sid: {k: self.store[k][sid] for k in keys} for sid in self.store[keys[0]]}
                lengths = {sid: self._length(sid, space) for sid in items}
            # a prompt's samples (ids p * n + j) stay together, to share the prompt in the forward
            n = self.cfg.rollout.n_samples if space == "sampled" and self.cfg.trainer.share_prompts else 1
            got = redistribute(items, lengths, src, layout, self.groups, replicate=mfc.call == "train_step",
                               group_size=n)
            for sid, item in got.items():
                samples[space].setdefault(sid, {}).update(item)
        return {k: v for k, v in samples.items() if v} if self.rank in layout.ranks else None

    def _length(self, sid: int, space: str) -> int:
        key = "greedy_responses" if space == "greedy" else "responses"
        r = self.store.get(key, {}).get(sid)
        return len(r["prompt_ids"]) + len(r["response_ids"]) if r else 1

    def _batch_inputs(self, mfc: MFC, samples: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
        """Per-sample items -> the batch form the handlers take (Responses, padded [B, T])."""
        inputs: dict[str, Any] = {}
        for space in ("sampled", "greedy"):  # sampled first: its Responses pad the token keys
            if space not in samples:
                continue
            items = samples[space]
            ids = sorted(items)
            rkey = "greedy_responses" if space == "greedy" else "responses"
            first = items[ids[0]]
            if rkey in first:
                inputs[rkey] = Responses([items[i][rkey]["prompt_index"] for i in ids],
                                         [items[i][rkey]["prompt_ids"] for i in ids],
                                         [items[i][rkey]["response_ids"] for i in ids],
                                         [items[i][rkey]["finish_reason"] for i in ids])
            resp = inputs.get(rkey) or inputs.get("responses")
            for key in first:
                if key in _TOKEN_KEYS:
                    inputs[key] = resp.pad([items[i][key] for i in ids], self.device)
                elif key in _SCALAR_KEYS:
                    inputs[key] = torch.tensor([items[i][key] for i in ids], device=self.device)
            inputs[f"_ids_{space}"] = ids
        return inputs

    def _store_outputs(self, mfc: MFC, out: dict[str, Any], inputs: dict[str, Any]) -> None:
        n = 1 if mfc.option("greedy", False) else self.cfg.rollout.n_samples
        for key, value in out.items():
            if key in _RESPONSE_KEYS:
                resp: Responses = value
                seen: dict[int, int] = {}
                ids = []
                for p in resp.prompt_index:  # samples of a prompt are consecutive, in sample order
                    ids.append(p * n + seen.get(p, 0))
                    seen[p] = seen.get(p, 0) + 1
                inputs[f"_ids_{'greedy' if key.startswith('greedy') else 'sampled'}"] = ids
                self.store[key] = {sid: {"prompt_index": resp.prompt_index[j], "prompt_ids": resp.prompt_ids[j],
                                         "response_ids": resp.response_ids[j], "finish_reason": resp.finish_reason[j]}
                                   for j, sid in enumerate(ids)}
        for key, value in out.items():
            space = "greedy" if key.startswith("greedy") else "sampled"
            if key in _TOKEN_KEYS:  # trimmed to each response's length
                ids = inputs[f"_ids_{space}"]
                resp = out.get("responses") or inputs["responses"]
                self.store[key] = {sid: value[j, :len(resp.response_ids[j])].tolist() for j, sid in enumerate(ids)}
            elif key in _SCALAR_KEYS:
                self.store[key] = {sid: float(v) for sid, v in zip(inputs[f"_ids_{space}"], value.tolist())}
            elif key.endswith("_stats"):
                self.store[key] = {0: value}

    def _prepare(self, mfc: MFC) -> tuple[Any, Transformer | None]:
        """Inputs and parameters of a call, in its layout (collectives over the meshes involved)."""
        layout = self.plan.layouts[mfc.name]
        samples = self._gather_inputs(mfc, layout)
        model = self._model_for(mfc, layout) if mfc.role in self.train_layout else None
        return samples, model

    def _execute(self, mfc: MFC, samples: Any, model: Transformer | None) -> float:
        layout = self.plan.layouts[mfc.name]
        if self.rank not in layout.ranks:
            return 0.0
        t0 = time.perf_counter()
        self._layout, self._dp_rank = layout, layout.coord(self.rank)[1]
        inputs = self._batch_inputs(mfc, samples or {})
        if mfc.call == "generate":
            share = balance_by_tokens({i: len(p.prompt_ids) for i, p in enumerate(self.batch_prompts)},
                                      layout.dp)[self._dp_rank]
            inputs = {"prompts": [self.batch_prompts[i] for i in share], "prompt_keys": share}
            if layout.pp > 1:  # every stage drives the engine; logits come from the last stage
                model = PipelineModel(model, layout, self.rank, self.groups.get(layout.pp_group(self.rank)))
            # a model rebuilt every iteration (a reallocated copy, a pipeline wrapper) would find
            # nothing kept that it could use: its cache goes with each call
            rebuilt = layout != self.train_layout[mfc.role] or layout.pp > 1
            self.engine = self.engines.get(layout) or RolloutEngine(
                model, spec=self.cfg.rollout.spec, max_batch=self.cfg.rollout.max_batch,
                keep_cache=False if rebuilt else self.cfg.rollout.keep_cache, agree=self._replica_agreement(layout))
            self.engine.model = model
            self.engines[layout] = self.engine
        elif mfc.role == "ref":
            self.ref = self.models[("ref", layout)]
        elif mfc.role == "critic" and mfc.call == "inference":
            self.critic = model
        handler = self._handlers()[(mfc.role, mfc.call)]
        gen_tokens = self._gen_tokens
        out = handler(mfc, {k: v for k, v in inputs.items() if not k.startswith("_")} if mfc.call != "generate"
                      else inputs)
        if mfc.role == "critic" and mfc.call == "inference":
            self.critic = self.models.get(("critic", self.train_layout["critic"]))
        holder = self.rank == holder_rank(layout, self._dp_rank)
        if not holder:  # a replica's tp peers and stages generate the same tokens: counted once
            self._gen_tokens = gen_tokens
            self._spec_stats.pop(mfc.name, None)
        if holder or mfc.call == "train_step":
            self._store_outputs(mfc, out, inputs)
        if mfc.call == "train_step" and self.rank == layout.ranks[0]:
            self._train_batch = inputs  # the whole batch: metrics are computed from it
        return time.perf_counter() - t0

    def _rollouts(self, mfc: MFC, prompts: list[list[int]], params: SamplingParams,
                  keys: list[int] | None) -> list[Rollout]:
        layout = self.plan.layouts[mfc.name]
        every = self.cfg.rollout.migrate_every
        if layout.dp == 1 or every == 0 or layout.pp > 1:
            return self.engine.generate(prompts, params, prompt_keys=keys)
        gen = self.migrators.get(layout)
        if gen is None:
            gen = self.migrators[layout] = MigratingGenerator(layout, self.groups, every,
                                                              transfer=self.cfg.rollout.migrate_transfer)
        batch = [p.prompt_ids for p in self.batch_prompts]
        out = gen.generate(self.engine, prompts, params, keys,
                           reserve=(len(batch) * params.n, max(len(p) for p in batch)))
        if self.rank == layout.ranks[0]:
            self.realloc_log.append(f"{mfc.name} sample migration: {gen.stats.describe()}")
        return out

    def _replica_agreement(self, layout: Layout):
        """A replica's tensor-parallel peers and pipeline stages decode in lockstep: each step they
        take the strategy their first rank chose (the adaptive policy's timings differ between ranks)."""
        ranks = layout.replica_group(self.rank)
        group = self.groups.get(ranks)
        if group is None:
            return None
        first = ranks[0]

        def agree(strategy):
            box = [strategy]
            dist.broadcast_object_list(box, src=first, group=group, device=object_device())
            return box[0]

        return agree

    # ---- hooks of the one-process trainer: data parallelism inside a train call ----------------
    def _share(self, resp: Responses, idx: list[int]) -> list[int]:
        units = prompt_groups(resp, idx, self.cfg.trainer.share_prompts)
        return balance_units(units, lambda u: packed_tokens(resp, u), self._layout.dp)[self._dp_rank]

    def _reduce_sums(self, sums: dict[str, float], mismatch: Tensor) -> tuple[dict[str, float], float, float]:
        """Over dp, then over the stages: only the last stage computed losses and log-probs."""
        lay = self._layout
        if lay.coord(self.rank)[0] != lay.pp - 1:
            mismatch = mismatch[:0]
        keys = [k for k in sums if k != "grad_norm"]  # the norm is already global
        t = torch.tensor([sums[k] for k in keys] + [float(mismatch.sum()), float(mismatch.numel())],
                         dtype=torch.float64, device=self.device)
        mx = torch.tensor([float(mismatch.max()) if mismatch.numel() else 0.0], dtype=torch.float64,
                          device=self.device)
        for ranks in (lay.dp_group(self.rank), lay.pp_group(self.rank)):
            group = self.groups.get(ranks)
            if group is not None:
                dist.all_reduce(t, group=group)
                dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
        out = dict(sums)
        out.update({k: float(v) for k, v in zip(keys, t[:len(keys)])})
        return out, float(mx), float(t[-2] / max(float(t[-1]), 1.0))

    def _optimizer_step(self, model, opt, sched, grad_clip) -> float:
        layout = self._layout
        role = "actor" if model is self.actor else "critic"
        sync_gradients(model, self.groups.get(layout.dp_group(self.rank)))
        sync_tied_embedding(model, self.specs[role], layout, self.rank, self.groups)
        norm = clip_grad_norm(model, tc_clip(grad_clip), self.specs[role], layout, self.rank,
                              self.groups.get(layout.tp_group(self.rank)), self.groups.get(layout.pp_group(self.rank)))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return norm

    # ---- pipeline stages: micro-batches streamed through them, heads on the last stage -----------
    def _stage(self, model: Transformer, packed: list[PackedMicroBatch]) -> tuple[PipelineStage, list[MicroBatch]]:
        stage = PipelineStage(model, self._layout, self.rank, model.args.dim, next(model.parameters()).dtype)
        return stage, [MicroBatch(p.tokens, p.positions, p.seq_lens, p.prefix_of) for p in packed]

    def _run_forward(self, model, packed, head):
        if self._layout.pp == 1:
            return super()._run_forward(model, packed, head)
        stage, mbs = self._stage(model, packed)  # [] on the other stages (not the outputs' holders)
        return stage.forward(mbs, lambda h, i: head(model, h, packed[i]))

    def _run_backward(self, model, packed, head, loss_of):
        if self._layout.pp == 1:
            return super()._run_backward(model, packed, head, loss_of)
        stage, mbs = self._stage(model, packed)
        with self.amp():
            stage.train_step(mbs, lambda h, i: loss_of(i, head(model, h, packed[i])))

    # ---- loop ----------------------------------------------------------------------------------
    def iterate(self) -> dict[str, float]:
        self.batch_prompts = self.prompt_batch(self.iteration)
        self._gen_tokens = 0
        self._spec_stats = {}
        self._scored = 0  # sampled responses this rank's reward function scored (`_score`)
        self.store = {}
        self._train_batch = None
        t0 = time.perf_counter()
        times: dict[str, float] = {}
        for level in self.graph.levels():
            # every call of a level gets its data and parameters first, then they all compute: calls
            # on disjoint meshes overlap instead of waiting on each other's reallocations
            ready = {m.name: self._prepare(m) for m in level}
            times.update({m.name: self._execute(m, *ready[m.name]) for m in level})
        # drop the copies built for this iteration's calls: parameters change in the train calls
        for key in self._built:
            self.models.pop(key, None)
        self._built.clear()
        mine = {"times": times, "gen_tokens": self._gen_tokens, "spec": self._spec_stats, "realloc": self.realloc_log,
                "stats": {k: v[0] for k, v in self.store.items() if k.endswith("_stats")},
                "reward_metrics": self.reward_fn.metrics() if self._scored else {}, "scored": self._scored,
                "batch": self._train_batch_summary()}
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, mine)
        metrics = self._merge(everyone)
        self._all_realloc_logs = [line for e in everyone for line in e["realloc"]]
        self.realloc_log = []
        metrics["time/iteration"] = time.perf_counter() - t0
        self.kl_ctl.update(metrics["kl/seq"], metrics.pop("_n_samples"))
        self.iteration += 1
        return metrics

    def _train_batch_summary(self) -> dict[str, Any] | None:
        b = self._train_batch
        if b is None or self.rank != self.plan.layouts["actor_train"].ranks[0]:
            return None
        resp: Responses = b["responses"]
        return {"scores": b["scores"].cpu(), "greedy_scores": b["greedy_scores"].cpu() if "greedy_scores" in b else None,
                "lengths": [len(r) for r in resp.response_ids], "finish": list(resp.finish_reason)}

    def _merge(self, everyone: list[dict[str, Any]]) -> dict[str, float]:
        batch = next(e["batch"] for e in everyone if e["batch"] is not None)
        names = everyone[0]["times"].keys()
        times = {n: max(e["times"][n] for e in everyone) for n in names}  # the slowest rank of each call
        metrics = rollout_metrics(batch["scores"], batch["greedy_scores"], batch["lengths"], batch["finish"], times,
                                  sum(e["gen_tokens"] for e in everyone))
        metrics.update({"kl/coef": self.kl_ctl.value, "_n_samples": len(batch["lengths"])})
        spec: dict[str, Counter] = {}  # a generate call's decode counts, summed over its replicas
        for e in everyone:
            for name, counts in e["spec"].items():
                spec.setdefault(name, Counter()).update(counts)
        metrics.update(speculation_metrics(spec))
        for e in everyone:
            for stats in e["stats"].values():
                metrics.update(stats)
        # each reward rank's metrics are means over its share: weighted by the share's size (a
        # share's tensor and pipeline peers report the same means, so each share weighs alike)
        scored = sum(e["scored"] for e in everyone)
        for key in {k for e in everyone for k in e["reward_metrics"]}:
            metrics[f"reward/{key}"] = sum(e["reward_metrics"].get(key, 0.0) * e["scored"] for e in everyone) / scored
        return metrics

    def full_model(self, role: str) -> Transformer | None:
        """A trained role's whole model on rank 0 (a reallocation to one rank); None elsewhere.
        Collective: every rank takes part."""
        target = Layout((0,))
        src = self.train_layout[role]
        spec = self.specs[role]
        shards = _shards(getattr(self, role), spec) if self.rank in src.ranks else None
        out, stats = reallocate(spec, src, target, shards, device=self.device)
        self._log_realloc(role, src, target, stats)
        return build_local_model(self.args[role], target, 0, out) if self.rank == 0 else None

    # ---- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Collective. `step_N/` holds the whole actor (and critic in `critic/`) in HF format, as
        one process writes it, so that it loads like any model; `trainer_state/rank<r>/<role>/`
        each rank's optimizer (its shard, or its ZeRO part), scheduler and RNG; and
        `trainer_state/state.json`, written last by rank 0, the progress and the plan, which a
        resume runs under again (the optimizer shards fit that plan only)."""
        folder = self.out / "checkpoints" / f"step_{self.iteration:06d}"
        for role in self.train_layout:  # the same order on every rank
            whole = self.full_model(role)
            if whole is not None:
                save_hf(whole, role_folder(folder, role), self.tokenizer)
        for role, layout in self.train_layout.items():
            if self.rank in layout.ranks:
                opt = getattr(self, f"{role}_opt")
                save_trainer_state(folder / STATE_DIR / f"rank{self.rank}" / role, getattr(opt, "optim", opt),
                                   getattr(self, f"{role}_sched"), {"step": self.iteration})
        dist.barrier()  # every rank's part is on disk before the checkpoint is marked complete
        if self.rank == 0:
            save_planned_state(folder / STATE_DIR, {"step": self.iteration, "kl": self.kl_ctl.state_dict()},
                               self.plan.one_line(), self.world)
            prune_checkpoints(self.out, self.cfg.trainer.keep_checkpoints)
        return folder

    def _restore(self) -> None:
        """This rank's optimizer, scheduler and RNG from the checkpoint (`resumed_plan` has
        checked that it was written under this plan); the progress and KL state, as everywhere."""
        for role, layout in self.train_layout.items():
            if self.rank in layout.ranks:
                opt, sched = getattr(self, f"{role}_opt"), getattr(self, f"{role}_sched")
                load_trainer_state(self.resume_dir / STATE_DIR / f"rank{self.rank}" / role, getattr(opt, "optim", opt),
                                   sched)
                for group, lr in zip(opt.param_groups, sched.get_last_lr()):
                    group["lr"] = lr  # under ZeRO the wrapper's groups, which the scheduler drives, set the step's lr
        progress = checkpoint_progress(self.resume_dir)
        self.kl_ctl.load_state_dict(progress["kl"])
        self.start = self.iteration = progress["step"]

    def fit(self) -> RLResult:
        tc = self.cfg.trainer
        lead = self.rank == 0
        logger = bar = None
        # every rank has set up (built its models, its reward function) before rank 0 removes an
        # earlier run (trainer.overwrite) or writes anything: a rank that failed leaves it as it was
        dist.barrier()
        if lead:
            begin_outputs(self.out, self.cfg, tc.overwrite)
            (self.out / "plan.yaml").write_text(self.plan.to_yaml())
            if self.search is not None:
                self.search.write(self.out)
            print(f"remesh: plan on {self.world} ranks: {self.plan.one_line()}", flush=True)
            for note in self._notes:
                print(f"remesh: {note}", flush=True)
            if self.resume_dir is not None:
                print(f"remesh: resumed from {self.resume_dir} at iteration {self.start}", flush=True)
            logger = MetricsLogger(self.out, tc.tensorboard, tc.wandb_project, config_to_dict(self.cfg),
                                   resume_step=self.start if self.resume_dir is not None else None)
            from tqdm.auto import tqdm

            bar = tqdm(total=tc.iterations, initial=self.start, disable=not tc.progress, unit="it",
                       desc=f"{self.cfg.algo.name} (plan)", dynamic_ncols=True)
        shown = self.prompts[:tc.show_samples] if lead and self.resume_dir is None else []
        initial = RolloutEngine(load_hf(self.initial, head="lm").to(self.device), calibrate=False) if shown else None
        before = self.sample_texts(shown, initial) if shown else []
        while self.iteration < tc.iterations:
            metrics = self.iterate()
            if lead:
                if self.iteration == 1:  # the first iteration's reallocations, from every rank that led one
                    for line in self._all_realloc_logs:
                        print(f"remesh: {line}", flush=True)
                logger.log(self.iteration, metrics)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics.get('kl/token', 0.0):.4f}",
                                gen_tok_s=f"{metrics['perf/gen_tokens_per_s']:.0f}", refresh=False)
                bar.update(1)
            if tc.save_every and self.iteration % tc.save_every == 0 and self.iteration < tc.iterations:
                self.save_checkpoint()
        final = self.full_model("actor")  # collective: every rank sends its part to rank 0
        if not lead:
            return RLResult(self.out, self.out / "final", self.out / "metrics.jsonl", None, self.iteration)
        bar.close()
        logger.close()
        save_hf(final, self.out / "final", self.tokenizer)
        curve = plot_reward_curve(logger.path, self.out / "reward_curve.png") if tc.plot else None
        if before:
            after = self.sample_texts(shown, RolloutEngine(final, calibrate=False))
            (self.out / "samples.json").write_text(json.dumps(
                [{"prompt": p.prompt, "before": b, "after": a} for p, b, a in zip(shown, before, after)], indent=1))
            for p, b, a in zip(shown, before, after):
                print(f"\nprompt: {p.prompt}\n  before: {b.strip()}\n  after:  {a.strip()}")
        return RLResult(self.out, self.out / "final", logger.path, curve, self.iteration)


def _shards(model: Transformer, spec: ShardSpec) -> dict[str, Tensor]:
    """A local model's parameters as reallocation source shards (a tied head by the embedding's name)."""
    return {spec.canonical(n): p.detach() for n, p in model.named_parameters()}


def check_plan(cfg: RLConfig, world_size: int) -> ExecutionPlan:
    """Validate the run's plan without any process group (fails before processes start)."""
    graph = graph_for(cfg.algo.name, reference=bool(cfg.kl.coef or cfg.kl.target))
    device = pick_device(cfg.trainer.device)
    # on GPUs, what stays resident must fit a device (the CPU ranks share the host's memory)
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    zero = frozenset(role for role, o in (("actor", cfg.actor_optim), ("critic", cfg.critic_optim)) if o.zero)
    args = role_args(cfg, graph)
    try:
        return validate(resolve_plan(cfg.plan, graph, world_size), graph, args, world_size, device_memory=memory,
                        dtypes={r: role_dtype(cfg, r) for r in graph.roles}, zero=zero,
                        weightless=frozenset() if cfg.reward.model else frozenset({"reward"}))
    except ValueError as e:  # the user's plan: a one-line error, not a traceback
        raise ConfigError(str(e) if str(e).startswith("plan") else f"plan: {e}") from None


def _planned_worker(rank: int, world: int, cfg: RLConfig, plan: ExecutionPlan,
                   search: SearchOutputs | None) -> RLResult:
    return PlannedRLTrainer(cfg, plan, search if rank == 0 else None).fit()


def train_planned(cfg: RLConfig) -> RLResult:
    """Under torchrun: this process's part of the job. Otherwise: `trainer.nproc` local
    processes (gloo on CPU), started here; rank 0's result is returned."""
    world = int(os.environ.get("WORLD_SIZE", cfg.trainer.nproc))
    if cfg.reward.terms:  # user reward files and term arguments: one error here, not one per reward rank
        rule_reward(cfg.reward.terms)
    if any(t.name in ROW_CHECKED_TERMS for t in cfg.reward.terms):  # and the prompt rows they need
        load_prompts(cfg, load_tokenizer(resolve_model_path(cfg.actor.path, "actor.path")), report_skips=False)
    if cfg.trainer.resume:
        cfg = resumed_plan(cfg, world)
    if "WORLD_SIZE" in os.environ:
        # a given plan is checked before the process group exists: every rank fails alike
        plan = None if cfg.plan == "search" else check_plan(cfg, world)
        init_distributed(default_backend(pick_device(cfg.trainer.device)), cfg.trainer.collective_timeout_s)
        try:
            search = None
            if plan is None:
                cfg, search = _searched_by_rank0(cfg, world)
                plan = check_plan(cfg, world)
            return PlannedRLTrainer(cfg, plan, search).fit()
        finally:
            dist.destroy_process_group()
    search = None
    if cfg.plan == "search":
        cfg, search = searched(cfg, world)
    plan = check_plan(cfg, world)
    return spawn(_planned_worker, world, args=(cfg, plan, search), timeout_s=cfg.trainer.job_timeout_s,
                 collective_timeout_s=cfg.trainer.collective_timeout_s)[0]


def resumed_plan(cfg: RLConfig, world: int) -> RLConfig:
    """A resumed planned run goes on under the plan its checkpoint was written under (the
    optimizer's shards fit that plan's layouts): `plan: search` takes it; another plan, another
    number of ranks, or a checkpoint from one process is an error naming both."""
    import dataclasses

    folder = resolve_resume(cfg.trainer.resume, Path(cfg.trainer.output_dir))
    saved = checkpoint_plan(folder)
    if saved is None:
        raise ConfigError(f"trainer.resume: {folder} was written by one process: resume it without a plan")
    if saved["world"] != world:
        raise ConfigError(f"trainer.resume: {folder} was written on {saved['world']} ranks, this job has {world}: "
                         f"resume it with trainer.nproc={saved['world']}")
    if cfg.plan == "search":
        print(f"remesh: resuming under the checkpoint's plan: {saved['plan']}", flush=True)
        return dataclasses.replace(cfg, plan=saved["plan"])
    mine = check_plan(cfg, world).one_line()
    if mine != saved["plan"]:
        raise ConfigError(f"trainer.resume: {folder} was written under the plan \"{saved['plan']}\", not \"{mine}\": "
                         f"resume it under its plan (plan: search takes it)")
    return cfg


def _searched_by_rank0(cfg: RLConfig, world: int) -> tuple[RLConfig, SearchOutputs | None]:
    """Rank 0 searches and sends every rank its plan, or its error (so that no rank waits for a
    plan that will not come): nodes whose caches hold different profiles would otherwise find
    different plans, and a job whose ranks run different plans hangs."""
    import dataclasses
    import pickle

    outcome: list[Any] = [None]
    outputs = None
    if dist.get_rank() == 0:
        try:
            found, outputs = searched(cfg, world)
            outcome[0] = found.plan
        except Exception as e:
            try:
                pickle.dumps(e)
                outcome[0] = e
            except Exception:
                outcome[0] = RuntimeError(f"plan search failed on rank 0: {type(e).__name__}: {e}")
    dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return dataclasses.replace(cfg, plan=outcome[0]), outputs


@dataclass
class SearchOutputs:
    """What a plan search leaves in the run's folder: written by rank 0 with the run's other
    outputs (after `trainer.overwrite` has removed an earlier run's), not when the search ends."""
    report: str
    timeline: Timeline
    title: str

    def write(self, out: Path) -> Path:
        from remesh.planner.planning import plot_timeline

        (out / "plan_search.txt").write_text(self.report + "\n")
        return plot_timeline(self.timeline, out / "plan_timeline.png", self.title)


def searched(cfg: RLConfig, world: int) -> tuple[RLConfig, SearchOutputs]:
    """`cfg` with `plan: search` replaced by the plan the planner finds for `planner.cluster`
    (default: this machine as `world` local processes), and the search's report and timeline."""
    import dataclasses

    from remesh.planner.planning import cluster_for, plan_for_config, report

    p = cfg.planner
    cluster = cluster_for(p.cluster or f"local:{world}", cfg.trainer.device, "planner.cluster")
    if cluster.world != world:
        raise ConfigError(f"planner.cluster {p.cluster}: {cluster.world} devices, but the job has {world} ranks")
    result, _ = plan_for_config(cfg, cluster, seed=p.seed, max_steps=p.steps)
    print(f"remesh: plan search ({result.distinct} plans estimated): {result.best.plan.one_line()} "
          f"(estimated {result.best.seconds:.2f} s per iteration; "
          + ", ".join(f"{k} {e.seconds:.2f} s" for k, e in result.heuristics.items() if e)
          + f"); timeline {Path(cfg.trainer.output_dir) / 'plan_timeline.png'}", flush=True)
    outputs = SearchOutputs(report(result, cluster), result.best.timeline,
                            f"searched plan, estimated {result.best.seconds:.2f} s per iteration")
    return dataclasses.replace(cfg, plan=result.best.plan.one_line()), outputs
