"""Learned reward model scoring, and the one reward interface the RL loop calls.

``RewardFn.score(prompts_text, responses_text, answers, metas, sequences)`` returns a CPU
float32 tensor [N], one reward per sample, in the samples' order; ``sequences[i]`` is
``prompt_ids + response_ids`` of sample i in the policy's tokenizer. ``metrics()`` reports
means over the last ``score`` call. Adapters:

- ``RuleRewardFn(RuleReward)``: rule terms on the texts; metrics are the per-term means.
- ``LearnedRewardFn(LearnedReward)``: a value-head Transformer on the token sequences (or on
  the texts re-tokenised with the reward model's own tokenizer, when that differs from the
  policy's: ``retokenize=True``).
- ``SumRewardFn([...], weights)``: weighted sum of several, e.g. a learned reward plus a
  length penalty.

``build_reward_fn(cfg.reward, device)`` builds the RL run's RewardFn from its config section
(``model``: a reward-model folder, ``terms``: rule terms; both summed when both are set).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from remesh.data import balanced_micro_batches, pack_sequences, prompt_response_ids
from remesh.model import AttnContext
from remesh.reward.rules import RewardConfigError, RewardTerm, RuleReward


def sequence_rewards(model: nn.Module, sequences: Sequence[Sequence[int]], device: torch.device) -> Tensor:
    """Scalar reward of each sequence: the value head at its last token (fp32); reward-model
    training (``remesh.train.rm``) fits the same."""
    batch = pack_sequences(sequences).to(device)
    hidden = model(batch.tokens, batch.positions, AttnContext.packed(batch.seq_lens(), device))
    return model.values(hidden[batch.cu_seqlens[1:].long() - 1])


class LearnedReward:
    """A trained reward model: the value head at each sequence's last token
    (``sequence_rewards``). ``tokenizer`` (optional) is the reward model's own, used by
    ``score_texts`` to render (prompt, response) exactly as preference data was rendered for
    training."""

    def __init__(self, model: nn.Module, tokenizer: Any = None):
        if getattr(getattr(model, "args", None), "head", "value") != "value":
            raise ValueError("LearnedReward needs a value-head model (ModelArgs.head='value'), got an lm-head model")
        self.model = model
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def score_tokens(self, sequences: Sequence[Sequence[int]], micro_batch_tokens: int = 4096) -> Tensor:
        """Reward of each token sequence: float32 [N] on the CPU, in the input order.

        Sequences are packed (no padding) into micro-batches of at most ``micro_batch_tokens``
        tokens (``balanced_micro_batches``); a sequence longer than that gets a micro-batch of
        its own rather than an error. Packing does not change a sequence's score (attention is
        per sequence), so the result equals scoring each sequence alone.
        """
        lengths = [len(s) for s in sequences]
        for i, n in enumerate(lengths):
            if n == 0:
                raise ValueError(f"sequence {i} is empty; a reward needs at least one token")
        out = torch.empty(len(lengths), dtype=torch.float32)
        if not lengths:
            return out
        budget = max(int(micro_batch_tokens), max(lengths))
        device = self.device
        with torch.inference_mode():
            for idx in balanced_micro_batches(lengths, budget):
                rewards = sequence_rewards(self.model, [list(sequences[i]) for i in idx], device)
                out[torch.tensor(idx)] = rewards.float().cpu()
        return out

    def tokenize(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
        """prompt + response ids in the reward model's tokenizer, rendered like preference data
        (chat template when the tokenizer has one, else plain text + eos)."""
        if self.tokenizer is None:
            raise ValueError("LearnedReward has no tokenizer; pass one to score texts")
        return [prompt_response_ids(self.tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]

    def score_texts(self, prompts: Sequence[str], responses: Sequence[str], micro_batch_tokens: int = 4096) -> Tensor:
        return self.score_tokens(self.tokenize(prompts, responses), micro_batch_tokens)


@runtime_checkable
class RewardFn(Protocol):
    """What the RL loop calls: one reward per sample, and metrics of the last call."""

    def score(self, prompts_text: Sequence[str], responses_text: Sequence[str], answers: Sequence[str | None],
              metas: Sequence[dict], sequences: Sequence[Sequence[int]] | None) -> Tensor: ...

    def metrics(self) -> dict[str, float]: ...


def _mean(x: Tensor) -> float:
    return float(x.mean()) if x.numel() else 0.0


class RuleRewardFn:
    """RuleReward behind RewardFn; ``sequences`` are ignored. Metrics: each term's mean
    (unweighted) over the last call, keyed by term name."""

    def __init__(self, rule_reward: RuleReward):
        self.rule_reward = rule_reward

    def score(self, prompts_text, responses_text, answers, metas, sequences=None) -> Tensor:
        return torch.tensor(self.rule_reward(prompts_text, responses_text, answers, metas), dtype=torch.float32)

    def metrics(self) -> dict[str, float]:
        return dict(self.rule_reward.breakdown)


class LearnedRewardFn:
    """LearnedReward behind RewardFn. Scores ``sequences`` (policy token ids) by default; with
    ``retokenize=True`` (reward model tokenizer != policy tokenizer), or when ``sequences`` is
    None, it scores the texts re-tokenised with the reward model's tokenizer. Metric: ``name``
    -> mean reward of the last call."""

    def __init__(self, learned: LearnedReward, micro_batch_tokens: int = 4096, retokenize: bool = False,
                 name: str = "learned"):
        self.learned = learned
        self.micro_batch_tokens = micro_batch_tokens
        self.retokenize = retokenize
        self.name = name
        self._last: Tensor | None = None

    def score(self, prompts_text, responses_text, answers, metas, sequences=None) -> Tensor:
        if self.retokenize or sequences is None:
            r = self.learned.score_texts(prompts_text, responses_text, self.micro_batch_tokens)
        else:
            if len(sequences) != len(responses_text):
                raise ValueError(f"{len(sequences)} sequences for {len(responses_text)} responses")
            r = self.learned.score_tokens(sequences, self.micro_batch_tokens)
        self._last = r
        return r

    def metrics(self) -> dict[str, float]:
        return {} if self._last is None else {self.name: _mean(self._last)}


class SumRewardFn:
    """Weighted sum of several RewardFns (weights default to 1). Metrics: every part's metrics
    (a repeated key gets ``#i`` for the i-th part) plus ``total``, the mean summed reward."""

    def __init__(self, fns: Sequence[RewardFn], weights: Sequence[float] | None = None):
        if not fns:
            raise ValueError("SumRewardFn needs at least one reward function")
        self.fns = list(fns)
        self.weights = [1.0] * len(self.fns) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.fns):
            raise ValueError(f"{len(self.weights)} weights for {len(self.fns)} reward functions")
        self._total: Tensor | None = None

    def score(self, prompts_text, responses_text, answers, metas, sequences=None) -> Tensor:
        total = torch.zeros(len(responses_text), dtype=torch.float32)
        for fn, w in zip(self.fns, self.weights):
            r = fn.score(prompts_text, responses_text, answers, metas, sequences)
            total += w * r.detach().float().cpu().reshape(-1)
        self._total = total
        return total

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, fn in enumerate(self.fns):
            for k, v in fn.metrics().items():
                out[k if k not in out else f"{k}#{i}"] = v
        if self._total is not None:
            out["total"] = _mean(self._total)
        return out


# ---------------------------------------------------------------- from config


def load_learned_reward(path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        model: nn.Module | None = None) -> LearnedReward:
    """A reward model saved by ``remesh rm`` (HF folder with a value head, plus its tokenizer).
    A causal-LM checkpoint is refused: its value head would be a fresh zero head. ``model``: the
    folder's model already built (e.g. a rank's shards of it under an execution plan)."""
    from remesh.checkpoint import load_hf, load_tokenizer, resolve_model_path
    from remesh.checkpoint.hf import load_hf_config

    folder = resolve_model_path(path, "reward.model")
    if load_hf_config(folder).head != "value":
        raise RewardConfigError(f"reward.model {path!r} is a causal LM, not a reward model (no value head); "
                                f"train one with `remesh rm` and point reward.model at its output")
    if model is None:
        model = load_hf(folder, head="value", dtype=dtype, device=device)
    return LearnedReward(model, load_tokenizer(folder))


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers give the same ids for the same rendered text (vocabulary, eos and
    chat template all equal)."""
    if a is b:
        return True
    return (a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id
            and getattr(a, "chat_template", None) == getattr(b, "chat_template", None))


def rule_reward(terms: list[Any]) -> RuleReward:
    """The rule terms of a reward config (``name`` / ``weight`` / ``args``) built: user files
    imported and arguments checked (RewardConfigError)."""
    return RuleReward([RewardTerm(t.name, float(t.weight), dict(t.args or {})) for t in terms])


def build_reward_fn(cfg: Any, device: torch.device | str = "cpu", *, dtype: torch.dtype = torch.float32,
                    micro_batch_tokens: int = 4096, policy_tokenizer: Any = None,
                    model: nn.Module | None = None) -> RewardFn:
    """The RewardFn of a reward config: ``cfg.model`` (reward-model folder or None) and
    ``cfg.terms`` (objects with name / weight / args, e.g. RewardTerm); the learned score and the
    rule terms are summed when both are set.

    The learned reward scores the policy's token sequences, unless ``policy_tokenizer`` is given
    and differs from the reward model's (``same_tokenizer``): then the texts are re-tokenised
    with the reward model's tokenizer. Rule terms are built (user files imported, args checked)
    here, so config mistakes surface before any rollout. ``model``: the reward model, already
    built (a rank's part of it under an execution plan), instead of loading ``cfg.model``.
    """
    folder = getattr(cfg, "model", None)
    terms = list(getattr(cfg, "terms", None) or [])
    parts: list[RewardFn] = []
    if folder:
        learned = load_learned_reward(folder, device, dtype, model)
        retok = policy_tokenizer is not None and not same_tokenizer(policy_tokenizer, learned.tokenizer)
        parts.append(LearnedRewardFn(learned, micro_batch_tokens, retokenize=retok))
    if terms:
        parts.append(RuleRewardFn(rule_reward(terms)))
    if not parts:
        raise RewardConfigError("set reward.model (a reward-model folder) and/or reward.terms (rule-based rewards)")
    return parts[0] if len(parts) == 1 else SumRewardFn(parts)
