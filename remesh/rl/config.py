"""Typed config of an RL run (`kind: rl`): algorithm, models, reward, rollout and trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from remesh.config import FieldError, require_at_least, require_positive
from remesh.train.configs import ModelConfig, OptimConfig, check_wandb

ALGOS = ("ppo", "remax", "grpo", "rloo", "reinforce_pp")


@dataclass
class AlgoConfig:
    name: Literal["ppo", "remax", "grpo", "rloo", "reinforce_pp"] = "remax"
    gamma: float = 1.0
    lam: float = 0.95  # GAE lambda (PPO)
    clip_low: float = 0.2  # PPO-clip ratio range [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2
    value_clip: float = 0.2  # PPO value-loss clip
    ppo_epochs: int = 1  # passes over each rollout
    mini_batches: int = 1  # optimizer steps per pass
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"] = \
        "token_mean"
    whiten_advantages: bool = True  # PPO: whiten GAE advantages over the batch
    remax_variant: Literal["paper", "reference"] = "paper"  # reference: per-token KL + clipped, discounted reward
    remax_clip: float = 5.0
    dr_grpo: bool = False  # GRPO without std scaling (use loss_agg=seq_mean_token_sum_norm with it)

    def __post_init__(self) -> None:
        require_at_least(self, 1, "ppo_epochs", "mini_batches")
        require_at_least(self, 0, "clip_low", "clip_high", "value_clip", "remax_clip")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise FieldError(name, f"{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class KLConfig:
    coef: float = 0.05
    estimator: Literal["k1", "k2", "k3"] = "k1"
    mode: Literal["reward", "loss"] = "reward"  # a per-token penalty in the reward, or a loss term
    target: float | None = None  # adaptive KL controller (Ziegler et al.) when set
    horizon: int = 10000

    def __post_init__(self) -> None:
        require_at_least(self, 0, "coef")
        require_at_least(self, 1, "horizon")
        if self.target is not None and self.target <= 0:
            raise FieldError("target", f"target must be positive (null: a fixed coef), got {self.target}")


@dataclass
class RewardTermConfig:
    name: str  # a built-in (exact_answer, vader_sentiment, length_penalty, max_length_penalty,
    # format_penalty) or a user function as path/to/file.py:function
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardConfig:
    model: str | None = None  # HF folder of a reward model (value head), e.g. the output of `remesh rm`
    terms: list[RewardTermConfig] = field(default_factory=list)  # rule-based terms, summed with the model's score

    def __post_init__(self) -> None:
        if self.model is None and not self.terms:
            raise ValueError("set reward.model (a reward-model folder) and/or reward.terms (rule-based rewards)")


@dataclass
class RolloutConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 48
    n_samples: int = 1  # responses per prompt (the group size of GRPO / RLOO)
    max_batch: int = 64  # sequences decoded together
    spec: str = "auto"  # speculative decoding: off, auto (adaptive) or fixed, e.g. ngram:4, history:4x2, model:3
    # keep the KV cache and its CUDA graphs between generate calls (None: on a GPU, if it takes at
    # most 1/16 of the device's memory; False frees it for the training in between)
    keep_cache: bool | None = None
    draft_model: str | None = None  # for the "model" drafter: an HF folder, or self:N (the actor's first N layers)
    # sample migration between data-parallel generation instances (under a plan with dp > 1):
    # engine steps between load exchanges (0: off), and how a moved sequence's context travels
    migrate_every: int = 8
    migrate_transfer: Literal["auto", "cache", "recompute"] = "auto"

    def __post_init__(self) -> None:
        from remesh.rollout.adaptive import check_speculation
        from remesh.rollout.drafters import self_draft_layers
        from remesh.rollout.sampling import SamplingParams

        if self.migrate_every < 0:
            raise FieldError("migrate_every", f"migrate_every must be >= 0 (0: no migration), got {self.migrate_every}")
        require_at_least(self, 1, "max_batch")
        # the engine's own checks, at load time rather than after the models load
        try:
            SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                           max_new_tokens=self.max_new_tokens, n=self.n_samples)
        except FieldError as e:
            if e.field != "n":
                raise
            raise FieldError("n_samples", f"n_samples must be >= 1, got {self.n_samples}") from None
        if self.draft_model is not None:
            try:
                self_draft_layers(self.draft_model)
            except ValueError as e:
                raise FieldError("draft_model", str(e)) from None
        if wrong := check_speculation(self.spec, self.draft_model is not None):
            raise FieldError(*wrong)


@dataclass
class PromptDataConfig:
    train: str = "data/demo/prompts.jsonl"
    max_prompt_len: int = 128
    skip_bad_rows: bool = False

    def __post_init__(self) -> None:
        require_at_least(self, 1, "max_prompt_len")


@dataclass
class RLTrainerConfig:
    output_dir: str = "runs/rl"
    seed: int = 0
    iterations: int = 20
    prompts_per_iter: int = 8
    micro_batch_tokens: int = 4096
    # the samples of one prompt share one copy of it in the training and inference forwards
    share_prompts: bool = True
    save_every: int = 0  # iterations between checkpoints; 0: only the final actor
    keep_checkpoints: int = 2  # most recent step checkpoints kept on disk; 0: all
    resume: str | None = None  # checkpoint folder or "latest"
    overwrite: bool = False  # a fresh run into an output_dir holding an earlier run removes it (else: refused)
    mixed_precision: Literal["auto", "bf16", "off"] = "auto"
    device: str = "auto"
    tensorboard: bool = True
    wandb_project: str | None = None
    progress: bool = True
    show_samples: int = 3  # prompts whose responses are printed before and after training
    plot: bool = True  # reward curve PNG
    nproc: int = 1  # local processes for a run with a plan (under torchrun: its world size instead)
    # how long a rank of a planned run waits in one collective (for another mesh's generation,
    # a data transfer, a reallocation) before the job fails: a hung rank cannot hang the job
    collective_timeout_s: float = 1800.0
    job_timeout_s: float | None = None  # stop a planned run on local processes after this long

    def __post_init__(self) -> None:
        require_at_least(self, 1, "iterations", "prompts_per_iter", "micro_batch_tokens", "nproc")
        require_at_least(self, 0, "save_every", "keep_checkpoints", "show_samples")
        require_positive(self, "collective_timeout_s", "job_timeout_s")
        check_wandb(self)


@dataclass
class PlannerConfig:
    """For `plan: search`: the cluster to plan for and the search's budget."""

    cluster: str | None = None  # a cluster YAML or shipped name; None: this machine, trainer.nproc processes
    steps: int = 3000  # plans the annealing search proposes (a step budget keeps it deterministic)
    seed: int = 0

    def __post_init__(self) -> None:
        require_at_least(self, 1, "steps")


@dataclass
class RLConfig:
    kind: Literal["rl"] = "rl"
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    actor: ModelConfig = field(default_factory=ModelConfig)
    critic: ModelConfig | None = None  # PPO only; defaults to the actor's initial weights with a value head
    actor_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_steps=0,
                                                                         schedule="constant"))
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6, warmup_steps=0,
                                                                          schedule="constant"))
    kl: KLConfig = field(default_factory=KLConfig)
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(
        terms=[RewardTermConfig("vader_sentiment")]))
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    trainer: RLTrainerConfig = field(default_factory=RLTrainerConfig)
    # execution plan: None (one process), colocated, split, search (the planner's choice for
    # `planner.cluster`), a plan YAML file, or the one-line form "actor_gen=d2@0-1 actor_train=d1t2@0-1 ...";
    # checked against the graph before processes start
    plan: str | None = None
    planner: PlannerConfig = field(default_factory=PlannerConfig)

    def __post_init__(self) -> None:
        if self.algo.name in ("grpo", "rloo") and self.rollout.n_samples < 2:
            raise ValueError(f"{self.algo.name} needs rollout.n_samples >= 2 (the group size)")
        samples = self.trainer.prompts_per_iter * self.rollout.n_samples
        if self.algo.mini_batches > samples:  # an empty mini-batch takes no step, yet the lr schedule counts it
            raise ValueError(f"algo.mini_batches: {self.algo.mini_batches} mini-batches of an iteration's {samples} "
                             f"samples (trainer.prompts_per_iter x rollout.n_samples) would leave some empty: "
                             f"at most {samples}")
        longest = self.data.max_prompt_len + self.rollout.max_new_tokens
        if longest > self.trainer.micro_batch_tokens:  # else found at the first training call, after a rollout
            raise ValueError(f"trainer.micro_batch_tokens: {self.trainer.micro_batch_tokens} cannot hold a sequence of "
                             f"data.max_prompt_len + rollout.max_new_tokens = {longest} tokens: raise it to at least "
                             f"{longest}")
        if self.plan is not None and self.rollout.draft_model is not None:
            # a draft model would have to run on the generation mesh's ranks in step with the policy
            raise ValueError("rollout.draft_model: the model drafter runs in one-process runs only, not under a "
                             f"plan (plan: {self.plan}); drop it, or the plan")
