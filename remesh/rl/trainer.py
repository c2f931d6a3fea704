"""RL training on one process: the algorithm's dataflow graph, run by the one-process executor.

Each MFC of the graph is served by a handler on one role's model (actor, ref, reward, critic).
The RL math comes from `remesh.algorithms` (pure functions); this module wires it to models,
optimizers and data, and owns the loop: prompts -> rollouts -> scores -> updates, with metrics,
a progress bar, checkpoints that resume exactly, a reward-curve PNG and samples before/after.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from remesh.algorithms import (AdaptiveKLController, AdvantageConfig, AdvantageInputs, FixedKLController,
                               aggregate, compute_advantages, kl_estimate, masked_mean, masked_sum,
                               policy_gradient_loss, ppo_policy_loss, token_rewards, value_loss)
from remesh.checkpoint import load_hf, load_tokenizer, resolve_model_path, save_hf
from remesh.checkpoint.hf import load_hf_config
from remesh.config import ConfigError, config_to_dict
from remesh.data import PromptExample, load_prompt_dataset
from remesh.dataflow.executor import OneProcessExecutor
from remesh.dataflow.graph import MFC, graph_for
from remesh.reward import build_reward_fn
from remesh.reward.rules import why_unscorable
from remesh.rl.batch import (PackedMicroBatch, Responses, forward_packed, logprobs_head, micro_batches, pack_micro_batch,
                             values_head)
from remesh.rl.config import RLConfig
from remesh.rollout import Rollout, RolloutEngine, SamplingParams
from remesh.rollout.drafters import load_draft_model
from remesh.rollout.engine import tokens_per_seq_step
from remesh.rollout.sampling import stop_token_ids
from remesh.train.metrics import MetricsLogger, read_metrics
from remesh.train.optim import build_optimizer, build_scheduler, warmup_outlasts_run
from remesh.train.state import (STATE_DIR, begin_outputs, checkpoint_plan, claim_output_dir, load_trainer_state,
                                prune_checkpoints, resolve_resume, role_folder, save_trainer_state)
from remesh.train.trainer import autocast_context, epoch_order, pick_device, tc_clip

# which registered advantage estimator each algorithm uses
_ESTIMATOR = {"ppo": "gae", "grpo": "grpo", "rloo": "rloo", "reinforce_pp": "reinforce_pp"}
_SEQUENCE_LEVEL = {"remax", "grpo", "dr_grpo", "rloo"}  # estimators that take sequence scores


@dataclass
class RLResult:
    output_dir: Path
    final_model: Path
    metrics_file: Path
    reward_curve: Path | None
    iterations: int


def load_prompts(cfg: RLConfig, tokenizer: Any, report_skips: bool = True) -> list[PromptExample]:
    """The run's prompt rows (`data`), each one that the reward's terms can score: a row they
    cannot (exact_answer without a reference answer) is a bad row, found when the file loads,
    not after the first rollout (an error naming it, or dropped and counted under
    `data.skip_bad_rows`). The rows dropped are reported once, by rank 0 if `report_skips`
    (False for a check made before the ranks load them again)."""
    def unscorable(p: PromptExample) -> str | None:
        return next((f"reward term {t.name!r} cannot score it: {why}" for t in cfg.reward.terms
                     if (why := why_unscorable(t.name, p.prompt, p.answer, p.meta)) is not None), None)

    prompts, report = load_prompt_dataset(cfg.data.train, tokenizer, max_prompt_len=cfg.data.max_prompt_len,
                                          skip_bad_rows=cfg.data.skip_bad_rows, unscorable=unscorable)
    if report.skipped and report_skips and int(os.environ.get("RANK", 0)) == 0:
        print(f"remesh: {report.summary()}")
    return prompts


class RLTrainer:
    def __init__(self, cfg: RLConfig):
        # before any work, as `train_rl` does for a planned run (whose ranks build PlannedRLTrainer)
        claim_output_dir(Path(cfg.trainer.output_dir), cfg.trainer.resume, cfg.trainer.overwrite)
        self._setup_common(cfg)
        self._setup_models()
        self.executor = OneProcessExecutor(self.graph, self._handlers())

    def _setup_common(self, cfg: RLConfig) -> None:
        """What every process of a run holds alike: config, graph, tokenizer, prompts, KL control."""
        self.cfg = cfg
        tc = cfg.trainer
        self.device = pick_device(tc.device)
        self.out = Path(tc.output_dir)
        self.amp = autocast_context(tc.mixed_precision, self.device)
        torch.manual_seed(tc.seed)
        # no KL term (coef 0, no adaptive target): no reference model in memory, no ref_inf call
        self.graph = graph_for(cfg.algo.name, reference=bool(cfg.kl.coef or cfg.kl.target))
        self.initial = resolve_model_path(cfg.actor.path, "actor.path")
        self.resume_dir = resolve_resume(tc.resume, self.out) if tc.resume else None
        self.tokenizer = load_tokenizer(self.initial)
        self._config_eos = load_hf_config(self.initial, "lm").extra.get("eos_token_id")
        self.prompts = load_prompts(cfg, self.tokenizer)
        if (samples := min(len(self.prompts), tc.prompts_per_iter) * cfg.rollout.n_samples) < cfg.algo.mini_batches:
            raise ConfigError(f"algo.mini_batches: {cfg.algo.mini_batches} mini-batches of an iteration's {samples} "
                              f"samples ({len(self.prompts)} prompt rows in {cfg.data.train}) would leave some empty")
        self.steps_per_iter = cfg.algo.ppo_epochs * cfg.algo.mini_batches
        self.total_steps = tc.iterations * self.steps_per_iter
        for name in ("actor_optim", "critic_optim") if "critic" in self.graph.roles else ("actor_optim",):
            warning = warmup_outlasts_run(getattr(cfg, name), self.total_steps, name)
            if warning and int(os.environ.get("RANK", 0)) == 0:  # under torchrun, said once
                print(warning)
        k = cfg.kl
        self.kl_ctl = AdaptiveKLController(k.coef, k.target, k.horizon) if k.target else FixedKLController(k.coef)
        self.start = 0
        self.iteration = 0
        self._gen_tokens = 0
        self._spec_stats: dict[str, dict[str, int]] = {}  # generate call -> its decode counts

    def _setup_models(self) -> None:
        """Every role's whole model on this process, optimizers, and the resumed state."""
        cfg = self.cfg
        dtype = getattr(torch, cfg.actor.dtype)
        if self.resume_dir is not None and (saved := checkpoint_plan(self.resume_dir)):
            raise ConfigError(f"trainer.resume: {self.resume_dir} was written under an execution plan on "
                              f"{saved['world']} ranks: resume it under that plan (plan: \"{saved['plan']}\", "
                              f"trainer.nproc={saved['world']})")
        self.actor = load_hf(self.resume_dir or self.initial, head="lm", dtype=dtype, device=self.device)
        self.engine = RolloutEngine(self.actor, spec=cfg.rollout.spec, max_batch=cfg.rollout.max_batch,
                                    keep_cache=cfg.rollout.keep_cache,
                                    draft_model=load_draft_model(cfg.rollout.draft_model, self.actor, dtype,
                                                                  "rollout.draft_model"))
        self.ref = None
        if "ref" in self.graph.roles:
            self.ref = load_hf(self.initial, head="lm", dtype=dtype, device=self.device).requires_grad_(False).eval()
        self.critic = None
        if "critic" in self.graph.roles:
            critic_cfg = cfg.critic or cfg.actor
            source = role_folder(self.resume_dir, "critic") if self.resume_dir else resolve_model_path(
                critic_cfg.path, "critic.path" if cfg.critic else "actor.path")
            self.critic = load_hf(source, head="value", dtype=getattr(torch, critic_cfg.dtype), device=self.device)
        self.reward_fn = build_reward_fn(cfg.reward, self.device, policy_tokenizer=self.tokenizer)
        self.actor_opt = build_optimizer(self.actor, cfg.actor_optim)
        self.actor_sched = build_scheduler(self.actor_opt, self.total_steps, cfg.actor_optim)
        if self.critic is not None:
            self.critic_opt = build_optimizer(self.critic, cfg.critic_optim)
            self.critic_sched = build_scheduler(self.critic_opt, self.total_steps, cfg.critic_optim)
        if self.resume_dir is not None:
            progress = load_trainer_state(self.resume_dir / STATE_DIR, self.actor_opt, self.actor_sched)
            if self.critic is not None:
                load_trainer_state(role_folder(self.resume_dir, "critic") / STATE_DIR, self.critic_opt, self.critic_sched)
            self.kl_ctl.load_state_dict(progress["kl"])
            self.start = progress["step"]
        self.iteration = self.start

    def _handlers(self) -> dict:
        return {
            ("actor", "generate"): self._generate,
            ("ref", "inference"): self._ref_logprobs,
            ("reward", "inference"): self._score,
            ("critic", "inference"): self._values,
            ("actor", "train_step"): self._train_actor,
            ("critic", "train_step"): self._train_critic,
        }

    # ---- MFC handlers -------------------------------------------------------------------------
    def _sampling(self, greedy: bool) -> SamplingParams:
        r = self.cfg.rollout
        seed = self.cfg.trainer.seed * 1_000_003 + self.iteration * 2 + int(greedy)  # fixed per iteration
        return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, greedy=greedy,
                              max_new_tokens=r.max_new_tokens, n=1 if greedy else r.n_samples, seed=seed,
                              stop_token_ids=self._stop_ids())

    def _stop_ids(self) -> tuple[int, ...]:
        return stop_token_ids(self.tokenizer.eos_token_id, self._config_eos)

    def _generate(self, mfc: MFC, inputs: dict[str, Any]) -> dict[str, Any]:
        prompts: list[PromptExample] = inputs["prompts"]
        greedy = bool(mfc.option("greedy", False))
        with self.amp():  # prompt_keys: a data-parallel instance's prompts are part of the batch
            rollouts = self._rollouts(mfc, [p.prompt_ids for p in prompts], self._sampling(greedy),
                                      inputs.get("prompt_keys"))
        self._spec_stats[mfc.name] = self.engine.stats.decode_counts()
        responses = Responses([r.prompt_index for r in rollouts], [r.prompt_ids for r in rollouts],
                              [r.response_ids for r in rollouts], [r.finish_reason for r in rollouts])
        self._gen_tokens += sum(len(r.response_ids) for r in rollouts)
        if greedy:
            return {"greedy_responses": responses}
        return {"responses": responses, "behaviour_logp": responses.pad([r.logprobs for r in rollouts], self.device)}

    def _rollouts(self, mfc: MFC, prompts: list[list[int]], params: SamplingParams,
                  keys: list[int] | None) -> list[Rollout]:
        """Hook: generation under a plan lets data-parallel instances exchange samples."""
        return self.engine.generate(prompts, params, prompt_keys=keys)

    def _ref_logprobs(self, mfc: MFC, inputs: dict[str, Any]) -> dict[str, Any]:
        return {"ref_logp": self._forward_only(self.ref, inputs["responses"], self._logprobs_head)}

    def _score(self, mfc: MFC, inputs: dict[str, Any]) -> dict[str, Any]:
        out = {}
        # the greedy responses first: a reward function's metrics (reward/<term>) describe its
        # last call, which must be the sampled responses that reward/mean averages
        for key, name in (("greedy_responses", "greedy_scores"), ("responses", "scores")):
            if key in inputs:
                out[name] = self._score_responses(inputs[key])
        self._scored = len(inputs["responses"].response_ids)  # a planned run weighs each rank's metrics by it
        return out

    def _score_responses(self, resp: Responses) -> Tensor:
        prompts = [self.batch_prompts[i] for i in resp.prompt_index]
        texts = self.tokenizer.batch_decode(resp.response_ids, skip_special_tokens=True)
        with self.amp():
            scores = self.reward_fn.score([p.prompt for p in prompts], texts, [p.answer for p in prompts],
                                          [p.meta for p in prompts], resp.sequences())
        return scores.float().to(self.device)

    def _values(self, mfc: MFC, inputs: dict[str, Any]) -> dict[str, Any]:
        return {"values": self._forward_only(self.critic, inputs["responses"], values_head)}

    def _advantages(self, inputs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """(advantages, returns, per-token KL of the behaviour policy to the reference).

        Each train MFC computes this from its own inputs (as ReaL's interfaces do), so that
        actor_train and critic_train stay independent calls that a plan may place apart; it is
        a few [B, T] tensor ops, negligible next to the forward passes."""
        a, k = self.cfg.algo, self.cfg.kl
        resp: Responses = inputs["responses"]
        mask = resp.mask(self.device)
        ref_logp = inputs.get("ref_logp", inputs["behaviour_logp"])  # no reference: zero KL
        kl = kl_estimate(inputs["behaviour_logp"], ref_logp, k.estimator) * mask
        coef = self.kl_ctl.value if k.mode == "reward" else 0.0
        if a.name == "remax":
            name = "remax" if a.remax_variant == "paper" else "remax_reference"
        elif a.name == "grpo" and a.dr_grpo:
            name = "dr_grpo"
        else:
            name = _ESTIMATOR[a.name]
        scores = inputs["scores"]
        if name in _SEQUENCE_LEVEL and coef:
            scores = scores - coef * masked_sum(kl, mask, dim=1)  # KL as a sequence-level reward penalty
        batch = AdvantageInputs(scores=scores, greedy_scores=inputs.get("greedy_scores"),
                                token_rewards=token_rewards(inputs["scores"], mask, kl, coef),
                                values=inputs.get("values"), logp=inputs["behaviour_logp"],
                                ref_logp=ref_logp, mask=mask)
        adv_cfg = AdvantageConfig(gamma=a.gamma, lam=a.lam, group_size=self.cfg.rollout.n_samples,
                                  kl_coef=coef, remax_clip=a.remax_clip, whiten=a.whiten_advantages)
        adv, ret = compute_advantages(name, batch, adv_cfg)
        return adv, ret, kl

    def _minibatches(self, n: int, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.cfg.trainer.seed * 7919 + self.iteration * 131 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        k = self.cfg.algo.mini_batches
        return [order[i::k] for i in range(k) if order[i::k]]

    # hooks a data-parallel trainer overrides (remesh/rl/planned.py): one process computes the
    # whole mini-batch, sums nothing, and steps with torch's own clipping
    def _share(self, resp: Responses, idx: list[int]) -> list[int]:
        """The samples of a mini-batch that this process computes."""
        return idx

    def _reduce_sums(self, sums: dict[str, float], mismatch: Tensor) -> tuple[dict[str, float], float, float]:
        """Per-process partial sums -> totals; logprob mismatch -> (max, mean)."""
        return sums, float(mismatch.max()), float(mismatch.mean())

    def _optimizer_step(self, model: torch.nn.Module, opt: Any, sched: Any, grad_clip: float | None) -> float:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc_clip(grad_clip))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return float(norm)

    def _logprobs_head(self, model: torch.nn.Module, hidden: Tensor, mb: PackedMicroBatch) -> Tensor:
        return logprobs_head(model, hidden, mb, self.cfg.rollout.temperature, self.cfg.actor.logprob_chunk_tokens)

    # a model over packed micro-batches: `head(model, hidden, micro-batch)` -> [n, T] per-token values
    def _forward_only(self, model: torch.nn.Module, resp: Responses,
                      head: Callable[[torch.nn.Module, Tensor, PackedMicroBatch], Tensor]) -> Tensor:
        """`head` of every sample, [B, T], without gradients."""
        tc = self.cfg.trainer
        micros = micro_batches(resp, list(range(len(resp))), tc.micro_batch_tokens, tc.share_prompts)
        out = torch.zeros(len(resp), resp.max_len, device=self.device)
        with torch.no_grad(), self.amp():
            parts = self._run_forward(model, self._pack(resp, micros), head)
        for idx, part in zip(micros, parts):
            out[idx] = part
        return out

    def _forward_backward(self, model: torch.nn.Module, resp: Responses, micros: list[list[int]],
                          head: Callable[[torch.nn.Module, Tensor, PackedMicroBatch], Tensor],
                          loss_of: Callable[[int, Tensor], Tensor]) -> None:
        """Gradients of the micro-batches' losses (`loss_of(i, head output)`, already weighted)."""
        self._run_backward(model, self._pack(resp, micros), head, loss_of)

    def _pack(self, resp: Responses, micros: list[list[int]]) -> list[PackedMicroBatch]:
        return [pack_micro_batch(resp, idx, self.device, self.cfg.trainer.share_prompts) for idx in micros]

    # hooks a pipeline-parallel trainer overrides (remesh/rl/planned.py): it streams the micro-batches
    # through its stages, and only the last stage has head outputs
    def _run_forward(self, model: torch.nn.Module, packed: list[PackedMicroBatch],
                     head: Callable[[torch.nn.Module, Tensor, PackedMicroBatch], Tensor]) -> list[Tensor]:
        return [head(model, forward_packed(model, mb), mb) for mb in packed]

    def _run_backward(self, model: torch.nn.Module, packed: list[PackedMicroBatch],
                      head: Callable[[torch.nn.Module, Tensor, PackedMicroBatch], Tensor],
                      loss_of: Callable[[int, Tensor], Tensor]) -> None:
        for i, mb in enumerate(packed):
            with self.amp():
                out = head(model, forward_packed(model, mb), mb)
            loss_of(i, out).backward()

    def _units(self, mask: Tensor, idx: list[int]) -> float:
        """What a mini-batch's loss is averaged over, so micro-batch losses add up exactly."""
        return float(mask[idx].sum()) if self.cfg.algo.loss_agg == "token_mean" else float(len(idx))

    def _train_actor(self, mfc: MFC, inputs: dict[str, Any]) -> dict[str, Any]:
        a, cfg = self.cfg.algo, self.cfg
        resp: Responses = inputs["responses"]
        adv, _, kl = self._advantages(inputs)
        mask = resp.mask(self.device)
        old_logp, ref_logp = inputs["behaviour_logp"], inputs.get("ref_logp")
        sums = {"loss": 0.0, "clipfrac": 0.0, "grad_norm": 0.0, "kl_loss": 0.0}
        mismatch: list[Tensor] = []
        self.actor.train()
        for epoch in range(a.ppo_epochs):
            for mb_i, mb in enumerate(self._minibatches(len(resp), epoch)):
                units = self._units(mask, mb)
                micros = micro_batches(resp, self._share(resp, mb), cfg.trainer.micro_batch_tokens,
                                       cfg.trainer.share_prompts)

                def loss_of(i: int, logp: Tensor) -> Tensor:
                    micro, m = micros[i], mask[micros[i]]
                    if epoch == 0 and mb_i == 0:  # parameters not yet updated: must equal the sampler's
                        mismatch.append(((logp.detach() - old_logp[micro]).abs() * m)[m.bool()])
                    if a.name == "remax":
                        loss = policy_gradient_loss(logp, adv[micro], m, a.loss_agg, resp.max_len)
                        clip = 0.0
                    else:
                        loss, st = ppo_policy_loss(logp, old_logp[micro], adv[micro], m, a.clip_low, a.clip_high,
                                                   a.loss_agg, resp.max_len)
                        clip = st["clipfrac"]
                    if cfg.kl.mode == "loss" and self.kl_ctl.value and ref_logp is not None:
                        kl_loss = aggregate(kl_estimate(logp, ref_logp[micro], cfg.kl.estimator), m, a.loss_agg,
                                            resp.max_len)
                        loss = loss + self.kl_ctl.value * kl_loss
                        sums["kl_loss"] += float(kl_loss.detach()) / self.steps_per_iter
                    weight = self._units(mask, micro) / units
                    sums["loss"] += float(loss.detach()) * weight / self.steps_per_iter
                    sums["clipfrac"] += clip * weight / self.steps_per_iter
                    return loss * weight

                self._forward_backward(self.actor, resp, micros, self._logprobs_head, loss_of)
                lr = self.actor_sched.get_last_lr()[0]  # the rate this step uses (the step advances it)
                norm = self._optimizer_step(self.actor, self.actor_opt, self.actor_sched, cfg.actor_optim.grad_clip)
                sums["grad_norm"] += norm / self.steps_per_iter
        diffs = torch.cat(mismatch) if mismatch else torch.zeros(1)
        sums, diff_max, diff_mean = self._reduce_sums(sums, diffs)
        stats = {f"actor/{k}": v for k, v in sums.items()}
        stats.update({"actor/lr": lr,
                      "logprob_mismatch/max": diff_max, "logprob_mismatch/mean": diff_mean,
                      "kl/seq": float(masked_sum(kl, mask, dim=1).mean()),
                      "kl/token": float(masked_mean(kl, mask)),
                      "advantage/mean": float(masked_mean(adv, mask))})
        return {"actor_stats": stats}

    def _train_critic(self, mfc: MFC, inputs: dict[str, Any]) -> dict[str, Any]:
        a, cfg = self.cfg.algo, self.cfg
        resp: Responses = inputs["responses"]
        _, returns, _ = self._advantages(inputs)
        mask, old_values = resp.mask(self.device), inputs["values"]
        sums = {"loss": 0.0, "clipfrac": 0.0, "grad_norm": 0.0}
        self.critic.train()
        for epoch in range(a.ppo_epochs):
            for mb in self._minibatches(len(resp), epoch):
                units = self._units(mask, mb)
                micros = micro_batches(resp, self._share(resp, mb), cfg.trainer.micro_batch_tokens,
                                       cfg.trainer.share_prompts)

                def loss_of(i: int, values: Tensor) -> Tensor:
                    micro = micros[i]
                    loss, st = value_loss(values, old_values[micro], returns[micro], mask[micro], a.value_clip,
                                          a.loss_agg, resp.max_len)
                    weight = self._units(mask, micro) / units
                    sums["loss"] += float(loss.detach()) * weight / self.steps_per_iter
                    sums["clipfrac"] += st["vf_clipfrac"] * weight / self.steps_per_iter
                    return loss * weight

                self._forward_backward(self.critic, resp, micros, values_head, loss_of)
                norm = self._optimizer_step(self.critic, self.critic_opt, self.critic_sched,
                                            cfg.critic_optim.grad_clip)
                sums["grad_norm"] += norm / self.steps_per_iter
        sums, _, _ = self._reduce_sums(sums, torch.zeros(1))
        return {"critic_stats": {f"critic/{k}": v for k, v in sums.items()}}

    # ---- loop ----------------------------------------------------------------------------------
    def prompt_batch(self, iteration: int) -> list[PromptExample]:
        n, k = len(self.prompts), self.cfg.trainer.prompts_per_iter
        per_epoch = max(1, n // k)
        epoch, index = divmod(iteration, per_epoch)
        order = epoch_order(n, self.cfg.trainer.seed, epoch)
        return [self.prompts[i] for i in order[index * k:(index + 1) * k]]

    def iterate(self) -> dict[str, float]:
        self.batch_prompts = self.prompt_batch(self.iteration)
        self._gen_tokens = 0
        t0 = time.perf_counter()
        data, times = self.executor.run({"prompts": self.batch_prompts})
        metrics = self._metrics(data, times)
        metrics["time/iteration"] = time.perf_counter() - t0
        self.kl_ctl.update(metrics["kl/seq"], len(data["responses"]))
        self.iteration += 1
        return metrics

    def _metrics(self, data: dict[str, Any], times: dict[str, float]) -> dict[str, float]:
        resp: Responses = data["responses"]
        metrics = rollout_metrics(data["scores"], data.get("greedy_scores"), [len(r) for r in resp.response_ids],
                                  resp.finish_reason, times, self._gen_tokens)
        metrics["kl/coef"] = self.kl_ctl.value
        metrics.update(data["actor_stats"])
        metrics.update(data.get("critic_stats", {}))
        metrics.update({f"reward/{k}": v for k, v in self.reward_fn.metrics().items()})
        metrics.update(speculation_metrics(self._spec_stats))
        return metrics

    def save_checkpoint(self) -> Path:
        folder = self.out / "checkpoints" / f"step_{self.iteration:06d}"
        save_hf(self.actor, folder, self.tokenizer)
        if self.critic is not None:
            save_hf(self.critic, role_folder(folder, "critic"), self.tokenizer)
            save_trainer_state(role_folder(folder, "critic") / STATE_DIR, self.critic_opt, self.critic_sched,
                               {"step": self.iteration})
        save_trainer_state(folder / STATE_DIR, self.actor_opt, self.actor_sched,  # last: marks it complete
                           {"step": self.iteration, "kl": self.kl_ctl.state_dict()})
        prune_checkpoints(self.out, self.cfg.trainer.keep_checkpoints)
        return folder

    def sample_texts(self, prompts: list[PromptExample], engine: RolloutEngine | None = None) -> list[str]:
        """Greedy responses to `prompts`, by the run's engine unless another is given."""
        params = SamplingParams(greedy=True, max_new_tokens=self.cfg.rollout.max_new_tokens,
                                stop_token_ids=self._stop_ids())
        with self.amp():
            rollouts = (engine or self.engine).generate([p.prompt_ids for p in prompts], params)
        return self.tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)

    def fit(self) -> RLResult:
        tc = self.cfg.trainer
        begin_outputs(self.out, self.cfg, tc.overwrite)
        logger = MetricsLogger(self.out, tc.tensorboard, tc.wandb_project, config_to_dict(self.cfg),
                               resume_step=self.start if self.resume_dir is not None else None)
        shown = self.prompts[:tc.show_samples]
        before = self.sample_texts(shown) if shown and self.resume_dir is None else []
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.iterations, initial=self.start, disable=not tc.progress, unit="it",
                   desc=self.cfg.algo.name, dynamic_ncols=True)
        while self.iteration < tc.iterations:
            metrics = self.iterate()
            logger.log(self.iteration, metrics)
            if tc.save_every and self.iteration % tc.save_every == 0 and self.iteration < tc.iterations:
                self.save_checkpoint()
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['kl/token']:.4f}",
                            gen_tok_s=f"{metrics['perf/gen_tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
        bar.close()
        logger.close()
        final = self.out / "final"
        save_hf(self.actor, final, self.tokenizer)
        curve = plot_reward_curve(logger.path, self.out / "reward_curve.png") if tc.plot else None
        if before:
            after = self.sample_texts(shown)
            (self.out / "samples.json").write_text(json.dumps(
                [{"prompt": p.prompt, "before": b, "after": a} for p, b, a in zip(shown, before, after)], indent=1))
            for p, b, a in zip(shown, before, after):
                print(f"\nprompt: {p.prompt}\n  before: {b.strip()}\n  after:  {a.strip()}")
        return RLResult(self.out, final, logger.path, curve, self.iteration)


def rollout_metrics(scores: Tensor, greedy_scores: Tensor | None, lengths: list[int], finish: list[str],
                    times: dict[str, float], gen_tokens: int) -> dict[str, float]:
    """An iteration's reward, response and timing metrics (`times`: seconds per MFC)."""
    metrics = {"reward/mean": float(scores.mean()), "reward/std": float(scores.std()) if len(scores) > 1 else 0.0,
               "response/len_mean": sum(lengths) / len(lengths),
               "response/stop_frac": sum(f == "stop" for f in finish) / len(finish)}
    if greedy_scores is not None:
        metrics["reward/greedy_mean"] = float(greedy_scores.mean())
    metrics.update({f"time/{k}": v for k, v in times.items()})
    gen_time = sum(v for k, v in times.items() if k.startswith("actor_gen") or k == "actor_greedy")
    metrics["perf/gen_tokens"] = gen_tokens
    metrics["perf/gen_tokens_per_s"] = gen_tokens / max(gen_time, 1e-9)
    return metrics


def speculation_metrics(counts: dict[str, dict[str, int]]) -> dict[str, float]:
    """How much speculative decoding gave each generate call, from its decode counts
    (`GenerationStats.decode_counts`, summed over the call's engines): perf/<call>/tokens_per_seq_step,
    the tokens a sequence emitted per decode step (1 without speculation, more as drafts are
    accepted), and perf/<call>/spec_step_frac, the share of steps that verified a draft."""
    out = {}
    for name, c in counts.items():
        if c["steps"]:
            out[f"perf/{name}/tokens_per_seq_step"] = tokens_per_seq_step(c)
            out[f"perf/{name}/spec_step_frac"] = c["spec_steps"] / c["steps"]
    return out


def plot_reward_curve(metrics_file: Path, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_file) if "reward/mean" in r]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["reward/mean"] for r in rows], label="reward (sampled)")
    if rows and "reward/greedy_mean" in rows[0]:
        ax.plot(steps, [r["reward/greedy_mean"] for r in rows], label="reward (greedy)", alpha=0.7)
    if len(rows) >= 5:  # a moving average makes the trend readable through sampling noise
        w = 5
        avg = [sum(r["reward/mean"] for r in rows[max(0, i - w + 1):i + 1]) / min(w, i + 1) for i in range(len(rows))]
        ax.plot(steps, avg, label=f"reward ({w}-iteration mean)", linewidth=2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.set_title(f"{metrics_file.parent.name}: reward per iteration")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def train_rl(cfg: RLConfig) -> RLResult:
    pick_device(cfg.trainer.device)  # a device this machine lacks fails here, before a plan search or processes
    if cfg.plan is None:
        return RLTrainer(cfg).fit()
    from remesh.rl.planned import train_planned

    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, rank 0 (which writes the outputs) alone
        claim_output_dir(Path(cfg.trainer.output_dir), cfg.trainer.resume, cfg.trainer.overwrite)
    return train_planned(cfg)

