"""RL math as small pure functions: masked statistics, KL estimators, loss aggregation,
advantage estimators (GAE, ReMax, GRPO / Dr. GRPO, RLOO, REINFORCE++) and policy/value losses.

Conventions (in the spirit of verl's ``core_algos.py``): responses are padded tensors [B, T];
``mask`` [B, T] is 1/True on real response tokens, left-aligned (each row is ones then zeros);
``logp``, ``old_logp``, ``ref_logp`` are per-token log-probs [B, T]; sequence scores are [B].
Functions never modify their inputs and return fp32 tensors. Padded positions are selected
away with ``torch.where`` (never multiplied by 0), so NaN/inf garbage there cannot leak, and
per-token outputs are 0 on padding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import wraps

import torch
from torch import Tensor

KL_KINDS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def _m(x: Tensor, mask: Tensor) -> Tensor:
    """x as fp32 with padded positions set to 0."""
    return torch.where(mask.bool(), x.float(), 0.0)


# ---------------------------------------------------------------- masked statistics


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) over `dim` (all elements when None)."""
    xm = _m(x, mask)
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) / sum(mask) over `dim`; 0 where the mask is empty."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """sum(mask * (x - mean)^2) / (n - 1 if unbiased else n), over all masked elements."""
    n = mask.bool().sum()
    centered = _m(x.float() - masked_mean(x, mask), mask)
    # With a single element the unbiased variance is undefined; 0 keeps whitening finite.
    denom = (n - 1 if unbiased else n).clamp(min=1)
    return (centered**2).sum() / denom


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over masked elements (+ mean back when not shift_mean)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x.float() - mean) * torch.rsqrt(var + eps)
    return _m(out if shift_mean else out + mean, mask)


# ---------------------------------------------------------------- KL and aggregation


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k1") -> Tensor:
    """Per-token KL(pi || ref) estimate: k1 = d, k2 = d^2 / 2, k3 = exp(-d) + d - 1 with d = logp - ref_logp."""
    d = logp.float() - ref_logp.float()
    if kind == "k1":  # unbiased, high variance, can be negative
        return d
    if kind == "k2":  # biased, low variance, >= 0; as an on-policy loss its gradient is the KL's
        return 0.5 * d**2
    if kind == "k3":  # unbiased and >= 0 (Schulman): exp(ref - logp) - (ref - logp) - 1
        return torch.exp(-d) + d - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; valid: {', '.join(KL_KINDS)}")


def aggregate(loss_mat: Tensor, mask: Tensor, mode: str = "token_mean", norm_len: float | None = None) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar: token_mean = sum / n_tokens; seq_* = mean over non-empty rows
    of (row mean | row sum | row sum / norm_len)."""
    if mode == "token_mean":
        return masked_mean(loss_mat, mask)
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; valid: {', '.join(LOSS_AGGREGATIONS)}")
    lengths = mask.bool().sum(-1)
    row_sum = masked_sum(loss_mat, mask, dim=-1)
    if mode == "seq_mean_token_mean":
        per_seq = row_sum / lengths.clamp(min=1)
    elif mode == "seq_mean_token_sum":
        per_seq = row_sum
    else:  # Dr. GRPO: a constant divisor, so that long and short answers weigh the same per token
        per_seq = row_sum / float(loss_mat.shape[-1] if norm_len is None else norm_len)
    # Empty rows are not responses: they count neither in the numerator nor the denominator.
    return masked_mean(per_seq, lengths > 0)


# ---------------------------------------------------------------- rewards and PPO


def _lengths(mask: Tensor) -> Tensor:
    return mask.bool().sum(-1)


def token_rewards(scores: Tensor, mask: Tensor, kl: Tensor | None = None, kl_coef: float = 0.0) -> Tensor:
    """r[b, t] = -kl_coef * kl[b, t] on response tokens, + scores[b] at row b's last valid token."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if kl is not None and kl_coef != 0.0:
        out = _m(-kl_coef * kl.float(), mask)
    lengths = _lengths(mask)
    last = (lengths - 1).clamp(min=0).unsqueeze(-1)
    score = torch.where(lengths > 0, scores.float(), 0.0).unsqueeze(-1)  # empty rows get no score
    return out.scatter_add(-1, last, score)


def gae(token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """A_t = sum_l (gamma*lam)^l delta_{t+l}, delta_t = r_t + gamma*V_{t+1} - V_t (V = 0 past the end); R = A + V."""
    r, v = _m(token_rewards, mask), _m(values, mask)  # zeroed padding = terminal state after the last token
    T = r.shape[-1]
    adv = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        running = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * running
        adv[:, t] = running
    adv = _m(adv, mask)
    return adv, _m(adv + v, mask)


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
    clip_low: float = 0.2, clip_high: float = 0.2, agg: str = "token_mean", norm_len: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """loss = agg(-min(r*A, clip(r, 1-clip_low, 1+clip_high)*A)), r = exp(logp - old_logp)."""
    log_ratio = _m(logp.float() - old_logp.detach().float(), mask)  # 0 on padding: ratio 1, no overflow
    ratio = torch.exp(log_ratio)
    adv = _m(advantages.detach(), mask)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, agg, norm_len)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
        "approx_kl": masked_mean(-log_ratio.detach(), mask).item(),  # k1 of old vs new
        "ratio_mean": masked_mean(ratio.detach(), mask).item(),
    }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
    clip_range: float = 0.2, agg: str = "token_mean", norm_len: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """loss = agg(0.5 * max((v - R)^2, (old + clip(v - old, -eps, eps) - R)^2))."""
    v, old, ret = _m(values, mask), _m(old_values.detach(), mask), _m(returns.detach(), mask)
    v_clipped = old + (v - old).clamp(-clip_range, clip_range)
    err, err_clipped = (v - ret) ** 2, (v_clipped - ret) ** 2
    loss = aggregate(0.5 * torch.maximum(err, err_clipped), mask, agg, norm_len)
    return loss, {"vf_clipfrac": masked_mean((err_clipped > err).float(), mask).item()}


class AdaptiveKLController:
    """Ziegler et al. 2019: coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)  # clip: one noisy batch moves little
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        # a checkpoint of a fixed-coefficient run has none: start from the configured one
        self.value = float(state.get("value", self.value))


class FixedKLController:
    """A constant coefficient with the adaptive controller's interface. It has no state: a run
    resumed with another `kl.coef` uses the new one."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        pass


# ---------------------------------------------------------------- critic-free estimators


def remax_advantages(scores_sample: Tensor, scores_greedy: Tensor, mask: Tensor) -> Tensor:
    """ReMax (paper): A[b, t] = r(x, y_b) - r(x, ybar_b) on every token of the sampled response."""
    diff = scores_sample.float() - scores_greedy.float()
    return _m(diff.unsqueeze(-1).expand(mask.shape), mask)


def remax_returns(
    scores_sample: Tensor, scores_greedy: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor,
    kl_coef: float, gamma: float = 1.0, clip: float = 5.0,
) -> Tensor:
    """ReMax (reference code): G[b, t] = -kl_coef*(logp - ref)_t + gamma^(T_b - t + 1) * clamp(r - r_greedy, +-clip)."""
    diff = (scores_sample.float() - scores_greedy.float()).clamp(-clip, clip)
    t0 = torch.arange(mask.shape[-1], device=mask.device)  # 0-indexed j: exponent T_b - j
    exponent = (_lengths(mask).unsqueeze(-1) - t0).clamp(min=0).float()
    # The reference loop keeps only the current token's KL but discounts the reward once per step.
    per_token = -kl_coef * (logp.float() - ref_logp.float()).detach() + gamma**exponent * diff.unsqueeze(-1)
    return _m(per_token, mask)


def policy_gradient_loss(
    logp: Tensor, advantages: Tensor, mask: Tensor, agg: str = "token_mean", norm_len: float | None = None
) -> Tensor:
    """REINFORCE loss: agg(-A.detach() * logp)."""
    # Advantages masked first: garbage on padding must not reach logp's gradient as 0 * NaN.
    return aggregate(-_m(advantages.detach(), mask) * logp.float(), mask, agg, norm_len)


def _groups(scores: Tensor, group_size: int, what: str) -> Tensor:
    if group_size < 2 or scores.shape[0] % group_size:
        raise ValueError(f"{what} needs group_size >= 2 dividing the batch ({scores.shape[0]}); got {group_size}")
    return scores.float().view(-1, group_size)


def grpo_advantages(
    scores: Tensor, group_size: int, mask: Tensor, eps: float = 1e-6, scale_by_std: bool = True
) -> Tensor:
    """A_i = (r_i - mean_group) / (std_group + eps), unbiased std; Dr. GRPO (scale_by_std=False): r_i - mean_group."""
    g = _groups(scores, group_size, "GRPO")
    adv = g - g.mean(-1, keepdim=True)
    if scale_by_std:
        adv = adv / (g.std(-1, keepdim=True) + eps)
    return _m(adv.reshape(-1, 1).expand(mask.shape), mask)


def rloo_advantages(scores: Tensor, group_size: int, mask: Tensor) -> Tensor:
    """A_i = r_i - mean_{j != i} r_j within each group of group_size consecutive responses."""
    g = _groups(scores, group_size, "RLOO")
    adv = g - (g.sum(-1, keepdim=True) - g) / (group_size - 1)
    return _m(adv.reshape(-1, 1).expand(mask.shape), mask)


def reinforce_pp_advantages(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> tuple[Tensor, Tensor]:
    """G_t = r_t + gamma * G_{t+1} within each row; A = masked_whiten(G) over the whole batch."""
    r = _m(token_rewards, mask)
    returns = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[-1])):
        running = r[:, t] + gamma * running  # padding after the end is 0, so each row starts at its last token
        returns[:, t] = running
    return masked_whiten(returns, mask), returns


# ---------------------------------------------------------------- registry


@dataclass
class AdvantageInputs:
    """Everything an estimator may read; each estimator declares which fields it requires."""

    scores: Tensor | None = None  # [B] sequence rewards of the sampled responses
    greedy_scores: Tensor | None = None  # [B] rewards of the greedy responses (ReMax baseline)
    token_rewards: Tensor | None = None  # [B, T] e.g. from token_rewards()
    values: Tensor | None = None  # [B, T] critic values
    logp: Tensor | None = None  # [B, T] policy log-probs at sampling time
    ref_logp: Tensor | None = None  # [B, T] reference log-probs
    mask: Tensor | None = None  # [B, T] response mask


@dataclass
class AdvantageConfig:
    gamma: float = 1.0
    lam: float = 0.95
    group_size: int = 1  # GRPO / RLOO: consecutive responses per prompt
    kl_coef: float = 0.0  # ReMax reference-code returns only
    remax_clip: float = 5.0
    eps: float = 1e-6  # GRPO std epsilon
    whiten: bool = True  # GAE: whiten advantages over the batch


Estimator = Callable[[AdvantageInputs, AdvantageConfig], tuple[Tensor, Tensor]]
ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {}
_INPUT_FIELDS = tuple(f.name for f in fields(AdvantageInputs))


def register_advantage(name: str, requires: tuple[str, ...] = ("mask",)) -> Callable[[Estimator], Estimator]:
    """Decorator: ADVANTAGE_ESTIMATORS[name] = fn, checking that the `requires` inputs are present."""
    assert all(r in _INPUT_FIELDS for r in requires), requires

    def deco(fn: Estimator) -> Estimator:
        @wraps(fn)
        def checked(batch: AdvantageInputs, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
            missing = [r for r in requires if getattr(batch, r) is None]
            if missing:
                raise ValueError(f"advantage estimator {name!r} needs inputs: {', '.join(missing)} (missing)")
            return fn(batch, cfg)

        ADVANTAGE_ESTIMATORS[name] = checked
        return checked

    return deco


def compute_advantages(name: str, inputs: AdvantageInputs, cfg: AdvantageConfig | None = None) -> tuple[Tensor, Tensor]:
    """(advantages, returns) from the registered estimator `name`."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {', '.join(sorted(ADVANTAGE_ESTIMATORS))}")
    return ADVANTAGE_ESTIMATORS[name](inputs, cfg or AdvantageConfig())


# Critic-free estimators return (A, A): the "returns" are the advantages themselves, as in verl.


@register_advantage("gae", requires=("token_rewards", "values", "mask"))
def _gae(b: AdvantageInputs, c: AdvantageConfig) -> tuple[Tensor, Tensor]:
    adv, ret = gae(b.token_rewards, b.values, b.mask, c.gamma, c.lam)
    return (masked_whiten(adv, b.mask) if c.whiten else adv), ret


@register_advantage("remax", requires=("scores", "greedy_scores", "mask"))
def _remax(b: AdvantageInputs, c: AdvantageConfig) -> tuple[Tensor, Tensor]:
    adv = remax_advantages(b.scores, b.greedy_scores, b.mask)
    return adv, adv


@register_advantage("remax_reference", requires=("scores", "greedy_scores", "logp", "ref_logp", "mask"))
def _remax_reference(b: AdvantageInputs, c: AdvantageConfig) -> tuple[Tensor, Tensor]:
    ret = remax_returns(b.scores, b.greedy_scores, b.logp, b.ref_logp, b.mask, c.kl_coef, c.gamma, c.remax_clip)
    return ret, ret


@register_advantage("grpo", requires=("scores", "mask"))
def _grpo(b: AdvantageInputs, c: AdvantageConfig) -> tuple[Tensor, Tensor]:
    adv = grpo_advantages(b.scores, c.group_size, b.mask, c.eps)
    return adv, adv


@register_advantage("dr_grpo", requires=("scores", "mask"))
def _dr_grpo(b: AdvantageInputs, c: AdvantageConfig) -> tuple[Tensor, Tensor]:
    adv = grpo_advantages(b.scores, c.group_size, b.mask, c.eps, scale_by_std=False)
    return adv, adv


@register_advantage("rloo", requires=("scores", "mask"))
def _rloo(b: AdvantageInputs, c: AdvantageConfig) -> tuple[Tensor, Tensor]:
    adv = rloo_advantages(b.scores, c.group_size, b.mask)
    return adv, adv


@register_advantage("reinforce_pp", requires=("token_rewards", "mask"))
def _reinforce_pp(b: AdvantageInputs, c: AdvantageConfig) -> tuple[Tensor, Tensor]:
    return reinforce_pp_advantages(b.token_rewards, b.mask, c.gamma)
