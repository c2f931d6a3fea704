"""remesh.algorithms: every function against numbers computed by hand (or by a tiny explicit loop here)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from remesh.algorithms import (
    ADVANTAGE_ESTIMATORS,
    LOSS_AGGREGATIONS,
    AdaptiveKLController,
    AdvantageConfig,
    AdvantageInputs,
    FixedKLController,
    aggregate,
    compute_advantages,
    gae,
    grpo_advantages,
    kl_estimate,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_gradient_loss,
    ppo_policy_loss,
    register_advantage,
    reinforce_pp_advantages,
    remax_advantages,
    remax_returns,
    rloo_advantages,
    token_rewards,
    value_loss,
)

NAN = float("nan")
# B=2, T=3, the second response one token shorter; padding holds NaN to prove it is never read.
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, NAN]])


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ---------------------------------------------------------------- masked helpers


def test_masked_helpers():
    close(masked_sum(X, MASK), 15.0)
    close(masked_sum(X, MASK, dim=-1), [6.0, 9.0])
    close(masked_mean(X, MASK), 3.0)
    close(masked_mean(X, MASK, dim=-1), [2.0, 4.5])
    close(masked_mean(X, MASK, dim=0), [2.5, 3.5, 3.0])
    # Values 1..5, mean 3, squared deviations 4+1+0+1+4 = 10.
    close(masked_var(X, MASK), 10 / 4)
    close(masked_var(X, MASK, unbiased=False), 10 / 5)
    s = math.sqrt(2.5 + 1e-8)
    close(masked_whiten(X, MASK), [[-2 / s, -1 / s, 0.0], [1 / s, 2 / s, 0.0]])
    close(masked_whiten(X, MASK, shift_mean=False), [[3 - 2 / s, 3 - 1 / s, 3.0], [3 + 1 / s, 3 + 2 / s, 0.0]])
    # Empty mask: 0, not NaN; an int mask works like a bool one.
    empty = torch.zeros(2, 3, dtype=torch.bool)
    close(masked_mean(X, empty), 0.0)
    close(masked_mean(X, MASK.long(), dim=-1), [2.0, 4.5])


# ---------------------------------------------------------------- KL


def test_kl_estimators_hand_values():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-2.0, -1.0]])  # d = logp - ref = [1, -1]
    close(kl_estimate(logp, ref, "k1"), [[1.0, -1.0]])
    close(kl_estimate(logp, ref, "k2"), [[0.5, 0.5]])
    # k3 = exp(-d) + d - 1: e^-1 + 0 and e^1 - 2.
    close(kl_estimate(logp, ref, "k3"), [[math.exp(-1), math.e - 2]])
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'; valid: k1, k2, k3"):
        kl_estimate(logp, ref, "k4")


def test_kl_k3_nonnegative_zero_at_equality_and_differentiable():
    g = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(64, 16, generator=g) * 5, -torch.rand(64, 16, generator=g) * 5
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert (kl_estimate(logp, ref, "k2") >= 0).all()
    for kind in ("k1", "k2", "k3"):
        close(kl_estimate(ref, ref, kind), torch.zeros(64, 16))
    # Usable as a loss term: d k3 / d logp = 1 - exp(-d) = 1 - e^-1 at d = 1.
    lp = torch.tensor([-1.0], requires_grad=True)
    kl_estimate(lp, torch.tensor([-2.0]), "k3").sum().backward()
    close(lp.grad, [1 - math.exp(-1)])


# ---------------------------------------------------------------- aggregation


def test_aggregations_differ_on_unequal_lengths():
    # Row sums 6 (3 tokens) and 9 (2 tokens).
    assert LOSS_AGGREGATIONS == ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
    close(aggregate(X, MASK, "token_mean"), 15 / 5)
    close(aggregate(X, MASK, "seq_mean_token_mean"), (6 / 3 + 9 / 2) / 2)
    close(aggregate(X, MASK, "seq_mean_token_sum"), (6 + 9) / 2)
    close(aggregate(X, MASK, "seq_mean_token_sum_norm"), (6 / 3 + 9 / 3) / 2)  # norm_len defaults to T = 3
    close(aggregate(X, MASK, "seq_mean_token_sum_norm", norm_len=10), (0.6 + 0.9) / 2)
    # An empty row is not a response: adding one changes no mode.
    x3 = torch.cat([X, torch.full((1, 3), 7.0)])
    m3 = torch.cat([MASK, torch.zeros(1, 3, dtype=torch.bool)])
    for mode in LOSS_AGGREGATIONS:
        close(aggregate(x3, m3, mode), aggregate(X, MASK, mode))
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'; valid: token_mean, seq_mean_token_mean"):
        aggregate(X, MASK, "mean")


# ---------------------------------------------------------------- rewards, GAE, PPO


def test_token_rewards():
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, NAN]])
    close(token_rewards(scores, MASK), [[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    close(token_rewards(scores, MASK, kl, kl_coef=0.5), [[-0.05, -0.1, -0.15 + 1.0], [-0.2, -0.25 + 2.0, 0.0]])
    # An empty response gets nothing (no last token to put the score on).
    close(token_rewards(torch.tensor([3.0]), torch.zeros(1, 2, dtype=torch.bool)), [[0.0, 0.0]])


def _gae_loop(rewards, values, lengths, gamma, lam):
    adv = [[0.0] * 3 for _ in rewards]
    for b, (r, v, n) in enumerate(zip(rewards, values, lengths)):
        running = 0.0
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0
            running = r[t] + gamma * next_v - v[t] + gamma * lam * running
            adv[b][t] = running
    return adv


REWARDS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, NAN]])
VALUES = torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.1, NAN]])


def test_gae_against_explicit_loop():
    r, v = [[0.0, 0.0, 1.0], [0.0, 2.0]], [[0.5, 0.4, 0.3], [0.2, 0.1]]
    expected = _gae_loop(r, v, [3, 2], 0.9, 0.8)
    adv, ret = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.8)
    close(adv, expected)
    close(ret, [[expected[0][t] + v[0][t] for t in range(3)], [expected[1][0] + 0.2, expected[1][1] + 0.1, 0.0]])
    # One number by hand: row 1, last token: delta = 2 + 0.9 * 0 - 0.1 = 1.9.
    assert adv[1, 1].item() == pytest.approx(1.9)


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    adv, ret = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=1.0)
    close(adv, [[1 - 0.5, 1 - 0.4, 1 - 0.3], [2 - 0.2, 2 - 0.1, 0.0]])
    close(ret, [[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]])


def test_masked_tokens_never_influence_gae():
    clean_r, clean_v = REWARDS.nan_to_num(0.0), VALUES.nan_to_num(0.0)
    dirty_r, dirty_v = REWARDS.nan_to_num(1e6), VALUES.nan_to_num(-1e6)
    for a, b in zip(gae(clean_r, clean_v, MASK, 0.9, 0.8), gae(dirty_r, dirty_v, MASK, 0.9, 0.8)):
        close(a, b)


def _ppo_inputs():
    # Tokens (ratio, A): (1.5, +1) clipped; (0.5, +1) not; (1.5, -1) not; (0.5, -1) clipped; (1.0, +2) not.
    ratio = torch.tensor([[1.5, 0.5, 1.5], [0.5, 1.0, 1.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -1.0, NAN]])
    logp = (old + ratio.log()).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 2.0, NAN]])
    return logp, old, adv


def test_ppo_policy_loss_clips():
    logp, old, adv = _ppo_inputs()
    loss, stats = ppo_policy_loss(logp, old, adv, MASK)
    # Per token max(-r A, -clip(r) A): -1.2 (clipped), -0.5, 1.5, 0.8 (clipped), -2.0.
    close(loss, (-1.2 - 0.5 + 1.5 + 0.8 - 2.0) / 5)
    assert stats["clipfrac"] == pytest.approx(2 / 5)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.5 + 0.5 + 1.0) / 5)
    assert stats["approx_kl"] == pytest.approx(-(2 * math.log(1.5) + 2 * math.log(0.5)) / 5, abs=1e-6)
    assert all(isinstance(v, float) for v in stats.values())
    # Clipped tokens get no gradient; others -A r / n_tokens.
    loss.backward()
    close(logp.grad, [[0.0, -0.5 / 5, 1.5 / 5], [0.0, -2.0 / 5, 0.0]])
    # Clip-higher (asymmetric): with clip_high=0.6 the ratio 1.5 token is no longer clipped.
    loss_hi, stats_hi = ppo_policy_loss(logp, old, adv, MASK, clip_low=0.2, clip_high=0.6)
    close(loss_hi, (-1.5 - 0.5 + 1.5 + 0.8 - 2.0) / 5)
    assert stats_hi["clipfrac"] == pytest.approx(1 / 5)
    # The aggregation is a config choice: sequence means of (-1.2 - 0.5 + 1.5) / 3 and (0.8 - 2.0) / 2.
    loss_seq, _ = ppo_policy_loss(logp, old, adv, MASK, agg="seq_mean_token_mean")
    close(loss_seq, (-0.2 / 3 + -1.2 / 2) / 2)


def test_value_loss_clips():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    old = torch.tensor([[0.0, 0.0, 1.0], [0.0, NAN, NAN]])
    values = torch.tensor([[0.5, 0.5, 1.1], [-1.0, NAN, NAN]])
    returns = torch.tensor([[1.0, 0.0, 2.0], [0.0, NAN, NAN]])
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    # 0.5 * max(unclipped, clipped): max(0.25, 0.64), max(0.25, 0.04), max(0.81, 0.81), max(1, 0.04).
    close(loss, 0.5 * (0.64 + 0.25 + 0.81 + 1.0) / 4)
    assert stats["vf_clipfrac"] == pytest.approx(1 / 4)


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=6.6, n_steps=100)  # error 0.1: coefficient grows to pull KL down toward the target
    assert ctl.value == pytest.approx(0.1 * (1 + 0.1 * 100 / 10000))
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(600.0, 100)  # error 99 clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * 1.002)
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(0.0, 100)  # error -1 clipped to -0.2: coefficient shrinks
    assert ctl.value == pytest.approx(0.1 * 0.998)
    state = json.loads(json.dumps(ctl.state_dict()))
    fresh = AdaptiveKLController(0.5, 6.0, 10000)
    fresh.load_state_dict(state)
    assert fresh.value == ctl.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
    fixed.load_state_dict({"value": 0.2})  # a checkpoint's coefficient: the configured one wins
    assert fixed.value == 0.05 and fixed.state_dict() == {}
    resumed = AdaptiveKLController(0.5, 6.0, 10000)
    resumed.load_state_dict(fixed.state_dict())  # a fixed run resumed with kl.target: the configured start
    assert resumed.value == 0.5


# ---------------------------------------------------------------- ReMax, GRPO, RLOO, REINFORCE++


def test_remax():
    sample, greedy = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    close(remax_advantages(sample, greedy, MASK), [[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]])
    ref = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, NAN]])
    # Reward diff clamped to +-0.8; row 0 (3 tokens) discounts 0.5^3, 0.5^2, 0.5^1, row 1: 0.5^2, 0.5^1.
    out = remax_returns(sample, greedy, logp, ref, MASK, kl_coef=0.5, gamma=0.5, clip=0.8)
    row0 = [-0.05 + 0.125 * 0.8, -0.1 + 0.25 * 0.8, -0.15 + 0.5 * 0.8]
    row1 = [-0.2 - 0.25 * 0.8, -0.25 - 0.5 * 0.8, 0.0]
    close(out, [row0, row1])
    # gamma = 1, no KL, wide clip: the paper's estimator.
    close(remax_returns(sample, greedy, logp, ref, MASK, kl_coef=0.0), remax_advantages(sample, greedy, MASK))


def test_policy_gradient_loss():
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, NAN]])
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -2.0, NAN]], requires_grad=True)
    loss = policy_gradient_loss(logp, adv, MASK)  # -A logp = 1, 2, 3, -1, -2
    close(loss, 3 / 5)
    loss.backward()
    close(logp.grad, [[-0.2, -0.2, -0.2], [0.2, 0.2, 0.0]])  # NaN padding: zero gradient, not NaN
    close(policy_gradient_loss(logp, adv, MASK, "seq_mean_token_sum"), (6 + -3) / 2)


def test_grpo_and_dr_grpo():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    mask = torch.tensor([[1, 1]] * 5 + [[1, 0]], dtype=torch.bool)
    # Group 1: mean 2, unbiased std 1. Group 2: mean 2, deviations -2, -2, 4, std sqrt(24 / 2).
    s2 = math.sqrt(12)
    per_seq = [-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6), -2 / (s2 + 1e-6), -2 / (s2 + 1e-6), 4 / (s2 + 1e-6)]
    expected = [[a, a] for a in per_seq]
    expected[5][1] = 0.0
    close(grpo_advantages(scores, 3, mask), expected)
    dr = [[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0], [-2.0, -2.0], [-2.0, -2.0], [4.0, 0.0]]
    close(grpo_advantages(scores, 3, mask, scale_by_std=False), dr)
    # Identical scores in a group: zero advantage, not NaN.
    close(grpo_advantages(torch.ones(2), 2, torch.ones(2, 1)), [[0.0], [0.0]])
    with pytest.raises(ValueError, match="GRPO needs group_size >= 2 dividing the batch"):
        grpo_advantages(scores, 4, mask)


def test_rloo_group_of_three():
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    mask = torch.ones(6, 1, dtype=torch.bool)
    # r_i minus the mean of the two others.
    close(rloo_advantages(scores, 3, mask), [[1 - 4.0], [2 - 3.5], [6 - 1.5], [0 - 1.5], [0 - 1.5], [3 - 0.0]])
    with pytest.raises(ValueError, match="RLOO needs group_size >= 2"):
        rloo_advantages(scores, 1, mask)


def test_reinforce_pp_discounting():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 4.0, NAN]])
    adv, ret = reinforce_pp_advantages(rewards, MASK, gamma=0.5)
    # Row 0: 2; 0 + 0.5 * 2 = 1; 1 + 0.5 * 1 = 1.5. Row 1: 4; 0 + 0.5 * 4 = 2.
    close(ret, [[1.5, 1.0, 2.0], [2.0, 4.0, 0.0]])
    # Whitened over the batch: mean 2.1, squared deviations sum 5.2, unbiased var 1.3.
    s = math.sqrt(1.3 + 1e-8)
    close(adv, [[-0.6 / s, -1.1 / s, -0.1 / s], [-0.1 / s, 1.9 / s, 0.0]], atol=1e-5)


# ---------------------------------------------------------------- registry


def _inputs(pad: float) -> AdvantageInputs:
    fill = lambda t: torch.where(MASK, t.nan_to_num(0.0), pad)  # noqa: E731
    return AdvantageInputs(
        scores=torch.tensor([1.0, 3.0]), greedy_scores=torch.tensor([2.0, 2.0]),
        token_rewards=fill(REWARDS), values=fill(VALUES),
        logp=fill(-torch.rand(2, 3)), ref_logp=fill(-torch.rand(2, 3)), mask=MASK,
    )


def test_registry_contents_and_dispatch():
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "remax", "remax_reference", "grpo", "dr_grpo", "rloo", "reinforce_pp"}
    cfg = AdvantageConfig(group_size=2, gamma=0.9, lam=0.8, kl_coef=0.1)
    torch.manual_seed(0)
    inputs = _inputs(0.0)
    adv, ret = compute_advantages("rloo", inputs, cfg)
    close(adv, [[-2.0, -2.0, -2.0], [2.0, 2.0, 0.0]])
    close(ret, adv)
    adv, ret = compute_advantages("gae", inputs, cfg)
    raw, raw_ret = gae(inputs.token_rewards, inputs.values, MASK, 0.9, 0.8)
    close(adv, masked_whiten(raw, MASK))
    close(ret, raw_ret)
    adv, _ = compute_advantages("gae", inputs, AdvantageConfig(gamma=0.9, lam=0.8, whiten=False))
    close(adv, raw)
    close(compute_advantages("dr_grpo", inputs, cfg)[0], [[-1.0] * 3, [1.0, 1.0, 0.0]])


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_every_estimator_ignores_padding_and_keeps_inputs(name):
    cfg = AdvantageConfig(group_size=2, gamma=0.9, lam=0.8, kl_coef=0.1)
    torch.manual_seed(0)
    clean = _inputs(0.0)
    torch.manual_seed(0)
    dirty = _inputs(NAN)
    snapshot = {k: v.clone() for k, v in vars(dirty).items()}
    for a, b in zip(compute_advantages(name, clean, cfg), compute_advantages(name, dirty, cfg)):
        close(b, a)
        assert b[1, 2].item() == 0.0  # per-token outputs are 0 on padding
    for k, v in vars(dirty).items():  # inputs untouched
        torch.testing.assert_close(v, snapshot[k], rtol=0, atol=0, equal_nan=True)


def test_registry_errors():
    valid = "dr_grpo, gae, grpo, reinforce_pp, remax, remax_reference, rloo"
    with pytest.raises(ValueError, match=rf"unknown advantage estimator 'ppo'; valid: {valid}$"):
        compute_advantages("ppo", AdvantageInputs())
    with pytest.raises(ValueError, match=r"advantage estimator 'gae' needs inputs: values \(missing\)"):
        compute_advantages("gae", AdvantageInputs(token_rewards=REWARDS, mask=MASK))
    with pytest.raises(ValueError, match=r"'remax' needs inputs: greedy_scores, mask"):
        ADVANTAGE_ESTIMATORS["remax"](AdvantageInputs(scores=torch.ones(2)), AdvantageConfig())
    with pytest.raises(ValueError, match="GRPO needs group_size >= 2"):  # default group_size=1
        compute_advantages("grpo", AdvantageInputs(scores=torch.ones(2), mask=MASK))


def test_register_advantage_decorator():
    @register_advantage("test_zero", requires=("scores", "mask"))
    def zero(batch, cfg):
        z = torch.zeros(batch.mask.shape)
        return z, z

    try:
        adv, _ = compute_advantages("test_zero", AdvantageInputs(scores=torch.ones(2), mask=MASK))
        close(adv, torch.zeros(2, 3))
        with pytest.raises(ValueError, match="'test_zero' needs inputs: scores"):
            compute_advantages("test_zero", AdvantageInputs(mask=MASK))
    finally:
        del ADVANTAGE_ESTIMATORS["test_zero"]


def test_outputs_are_fp32_for_other_input_dtypes():
    x64 = X.nan_to_num(0.0).double()
    assert masked_mean(x64, MASK).dtype == torch.float32
    assert masked_whiten(x64, MASK).dtype == torch.float32
    assert kl_estimate(x64.bfloat16(), x64, "k3").dtype == torch.float32
    assert gae(x64, x64, MASK, 1.0, 1.0)[0].dtype == torch.float32
    assert grpo_advantages(torch.tensor([1.0, 2.0], dtype=torch.float64), 2, MASK).dtype == torch.float32
    assert token_rewards(torch.tensor([1.0, 2.0], dtype=torch.bfloat16), MASK).dtype == torch.float32
