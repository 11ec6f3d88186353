"""SPO: the clamped per-step loss (§3.4 worked values), the pair filter, the step-wise resampler (shared parent,
random continuation, NFE count), and short train() runs with both preference models and hand-computed budgets."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import RedReward, changed, t64, tiny_policy

import methods
from methods import spo
from methods.common import Budget, NullTracker, Task

PROMPTS = ["a red circle", "two blue squares"]


# ---------------------------------------------------------------------------------------------- pure parts
@pytest.mark.parametrize("log_ratio, expected", [(0.0, 0.693147), (0.05, 0.31326), (0.2, 0.12613)])
def test_loss_worked_values_and_clamp_gradient(log_ratio, expected):
    """§3.4, beta 10, eps 0.1: (+r, -r) log-ratios."""
    theta_w, theta_l = t64(log_ratio).requires_grad_(True), t64(-log_ratio).requires_grad_(True)
    value, z = spo.loss(theta_w, t64(0.0), theta_l, t64(0.0), beta=10.0, clamp_eps=0.1)
    assert value.item() == pytest.approx(expected, abs=1e-5)
    value.backward()
    if log_ratio == 0.2:  # both ratios clamped (1.1 / 0.9): zero gradient, the loss floor at beta 10
        assert theta_w.grad.item() == 0.0 and theta_l.grad.item() == 0.0
        assert z.item() == pytest.approx(10 * math.log(1.1 / 0.9))
    else:
        assert theta_w.grad.item() < 0 < theta_l.grad.item()


def test_swapping_winner_and_loser_flips_the_margin():
    _, z = spo.loss(t64(0.03), t64(0.0), t64(-0.01), t64(0.0), 10.0, 0.1)
    _, swapped = spo.loss(t64(-0.01), t64(0.0), t64(0.03), t64(0.0), 10.0, 0.1)
    assert z.item() == pytest.approx(0.4) and swapped.item() == pytest.approx(-0.4)


def test_pair_filter_threshold():
    """thr 0.3 <=> s_w - s_l > 2 artanh(0.3) = 0.6190."""
    assert 2 * math.atanh(0.3) == pytest.approx(0.6190, abs=1e-4)
    keep = spo.keep_pair(t64(21.62, 21.61, 22.0), t64(21.0, 21.0, 22.0), 0.3)
    assert keep.tolist() == [True, False, False]


# ---------------------------------------------------------------------------------------------- tiny policy
def test_resampler_shared_parent_random_continuation_and_nfe():
    policy = tiny_policy()
    calls = []
    predict = policy.predict
    policy.predict = lambda x, t, c: (calls.append(len(x)), predict(x, t, c))[1]
    prompts = [PROMPTS[i % 2] for i in range(8)]
    # prefers candidate 0 of every pool (scores -j); k = 2 and threshold 0 keep every pool
    scorer = lambda x_t, x0, t, cond: -(torch.arange(len(x_t)) % 2).float()  # noqa: E731
    pairs = spo.collect_stepwise_pairs(policy, prompts, 3, scorer, num_candidates=2, threshold=0.0, eta=1.0,
                                       kernel="ddim", start_step=0, generator=torch.Generator().manual_seed(0))
    # NFEs: per prompt 1 (x_T) + 2 (pool at step 0) + 2 (pool at step 1) = 5; the last step reuses a candidate's output
    assert sum(calls) == spo.resampler_nfe(8, 3, 2, [0, 1], 1) == 40
    assert len(pairs) == 16 and pairs.candidates == 16 and pairs.step.tolist() == [0] * 8 + [1] * 8
    # step-1 parents are candidates of the step-0 pool of the same prompt: the winner or the loser (k = 2) ...
    step0, step1 = pairs.step == 0, pairs.step == 1
    assert torch.equal(pairs.prompt[step0], pairs.prompt[step1])
    is_win = (pairs.parent[step1] == pairs.win[step0]).flatten(1).all(1)
    is_lose = (pairs.parent[step1] == pairs.lose[step0]).flatten(1).all(1)
    assert bool((is_win ^ is_lose).all())
    assert 0 < int(is_win.sum()) < 8  # ... chosen at random, not always the best
    # winner and loser are both draws from the parent's transition (finite, similar log-densities)
    logp_w, logp_l = spo.step_log_probs(policy, pairs, torch.arange(16), "ddim", 1.0, 3)
    assert torch.isfinite(logp_w).all() and torch.isfinite(logp_l).all()


@pytest.mark.parametrize("preference_model", ["reward_x0", "spm"])
def test_smoke_budget_and_adapters(preference_model, tmp_path):
    from methods import spm

    policy = tiny_policy()
    before = policy.adapter_state_dict()
    spm_file = spm.ConvSPM(policy.latent_shape[0], 32, width=8).save(tmp_path / "spm.pt", {
        "heldout_accuracy": {"all": 0.9, "n": 64.0}, "train_accuracy": {"all": 0.9}, "source": "test"})
    method = methods.load("spo", preference_model=preference_model, num_candidates=2, threshold=0.0,
                          prompts_per_round=2, pairs_per_update=4, lr=1e-2, spm_path=str(spm_file))
    assert isinstance(method, spo.SPOMethod)
    # Hand count, K = 3, k = 2: a round costs 2 prompts x (1 + 2 + 2) = 10 sampling NFEs and records 2 x 2 pairs
    # (threshold 0, continuous scores); one update on 4 pairs = (policy + reference) x 4 shared parents = 8 NFEs.
    # reward calls per round: 2 (monitoring) + reward_x0's 2 prompts x 2 candidates x 2 pools = 8.
    # spm: a trained file, outside the budget (trained once per model and reward).
    spm_nfe, spm_calls = 0, 0
    round_calls = 2 + (8 if preference_model == "reward_x0" else 0)
    budget = Budget(max_nfe=spm_nfe + 2 * 18 + 4)
    tracker = NullTracker()
    method.train(policy, Task(PROMPTS, RedReward(), train_steps=3, seed=0), budget, tracker)
    assert (budget.sample_nfe, budget.grad_nfe, budget.reward_calls) == (spm_nfe + 20, 16, spm_calls + 2 * round_calls)
    assert tracker.series("train/num_pairs") == [4.0, 4.0]
    assert tracker.series("train/loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    assert changed(policy, before)
    if preference_model == "spm":
        assert tracker.series("train/spm_heldout_acc") == [0.9]


def test_config_errors():
    with pytest.raises(ValueError, match="num_candidates"):
        methods.load("spo", num_candidates=1)
    with pytest.raises(ValueError, match="preference_model"):
        methods.load("spo", preference_model="pickscore")
    with pytest.raises(ValueError, match="train_steps"):
        methods.load("spo").train(tiny_policy(), Task(PROMPTS, RedReward(), 1, 0), Budget(100), NullTracker())
