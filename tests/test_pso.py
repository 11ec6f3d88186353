"""PSO: the online transition loss (§4.4 worked example, clamp) and the offline pso / pso_db losses (§4.5), the
trained-step rule, and short online/offline train() runs on a tiny toy policy with hand-computed NFE counts."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import RedReward, changed, t64, tiny_policy

import methods
from methods import pso, sampling
from methods.common import Budget, NullTracker, Task
from tasks.toy import preferences

PROMPTS = ["a red circle", "two blue squares"]


# ---------------------------------------------------------------------------------------------- online loss
def test_online_worked_example_from_transition_mses():
    """§4.4 DMD2 kernel 749->499: variance 0.722330, winner MSE 0.72000 vs 0.72233, loser 0.72460 vs 0.72233."""
    std = math.sqrt(0.722330)
    x_next = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    logp = lambda mse: sampling.gaussian_log_prob(x_next, torch.full_like(x_next, math.sqrt(mse)), std)  # noqa: E731
    value, z = pso.loss(logp(0.72000), logp(0.72233), logp(0.72460), logp(0.72233), beta=50.0, clamp_eps=0.1)
    assert (logp(0.72000) - logp(0.72233)).item() == pytest.approx(0.0016128, abs=2e-6)
    assert z.item() == pytest.approx(0.159207, abs=2e-4)
    assert value.item() == pytest.approx(0.616709, abs=1e-4)


@pytest.mark.parametrize("log_ratio, expected", [(0.0, 0.693147), (0.05, 0.31326), (0.2, 0.12613)])
def test_online_clamp_examples(log_ratio, expected):
    """§3.4 values (beta 10, eps 0.1) hold for the same loss form."""
    theta_w, theta_l = t64(log_ratio).requires_grad_(True), t64(-log_ratio).requires_grad_(True)
    value, _ = pso.loss(theta_w, t64(0.0), theta_l, t64(0.0), beta=10.0, clamp_eps=0.1)
    assert value.item() == pytest.approx(expected, abs=1e-5)
    value.backward()
    if log_ratio > math.log(1.1):  # clamped: no gradient at all
        assert theta_w.grad.item() == 0.0 and theta_l.grad.item() == 0.0
    else:
        assert theta_w.grad.item() < 0 < theta_l.grad.item()


def test_online_swap_flips_margin_and_floor():
    _, z = pso.loss(t64(0.01), t64(0.0), t64(-0.02), t64(0.0), 50.0, 0.1)
    _, swapped = pso.loss(t64(-0.02), t64(0.0), t64(0.01), t64(0.0), 50.0, 0.1)
    assert swapped.item() == pytest.approx(-z.item())
    floor, _ = pso.loss(t64(1.0), t64(0.0), t64(-1.0), t64(0.0), 50.0, 0.1)
    assert floor.item() == pytest.approx(math.log1p(math.exp(-50 * math.log(1.1 / 0.9))), rel=1e-9)  # ~4.4e-5


# ---------------------------------------------------------------------------------------------- offline loss
def test_offline_pso_variant():
    err = t64(0.1, 0.3)
    value, z = pso.offline_loss(err, err.flip(0), 5.0, 0.1, "pso", err, err.flip(0))
    assert value.item() == pytest.approx(math.log(2), abs=1e-12) and z.abs().max().item() == 0
    # theta denoises the target 0.01 better than pre: z = beta * 0.01 = 0.05
    value, z = pso.offline_loss(t64(0.09), t64(0.3), 5.0, 0.1, "pso", t64(0.1), t64(0.3))
    assert z.item() == pytest.approx(0.05) and value.item() == pytest.approx(math.log1p(math.exp(-0.05)))
    # swapping target and reference (with lambda = 1) flips the margin
    _, z1 = pso.offline_loss(t64(0.09), t64(0.3), 5.0, 1.0, "pso", t64(0.1), t64(0.3))
    _, z2 = pso.offline_loss(t64(0.3), t64(0.09), 5.0, 1.0, "pso", t64(0.3), t64(0.1))
    assert z2.item() == pytest.approx(-z1.item())
    with pytest.raises(ValueError, match="frozen"):
        pso.offline_loss(t64(0.1), t64(0.1), 5.0, 0.1, "pso")


def test_offline_pso_db_hinge():
    value, z = pso.offline_loss(t64(0.05), t64(0.5), 5.0, 0.1, "pso_db")  # err_tau = lambda err_rho
    assert z.item() == pytest.approx(0.0) and value.item() == pytest.approx(1.0)
    value, z = pso.offline_loss(t64(0.1), t64(0.5), 5.0, 0.1, "pso_db")  # z = -5 (0.1 - 0.05) = -0.25
    assert z.item() == pytest.approx(-0.25) and value.item() == pytest.approx(1.25)
    target = t64(-1.0).requires_grad_(True)  # z = 5.25 > 1: hinge inactive, zero gradient
    value, _ = pso.offline_loss(target, t64(0.5), 5.0, 0.1, "pso_db")
    value.backward()
    assert value.item() == 0.0 and target.grad.item() == 0.0


def test_resolved_defaults_per_mode():
    online = pso.Config().resolved()
    assert (online.beta, online.lr, online.pairs_per_update) == (50.0, 1e-5, 8)
    offline = pso.Config(mode="offline", dataset="x").resolved()
    assert (offline.beta, offline.lr, offline.pairs_per_update, offline.variant) == (5.0, 2e-4, 4, "pso_db")
    assert pso.Config(mode="offline", dataset="x", beta=10.0).resolved().beta == 10.0
    with pytest.raises(ValueError, match="sample_eta"):
        pso.Config(sample_eta=0.0)


# ---------------------------------------------------------------------------------------------- tiny policy
def test_trained_steps_exclude_the_last():
    policy = tiny_policy()
    traj = sampling.sample(policy, PROMPTS, 3, generator=torch.Generator().manual_seed(0), eta=1.0)
    assert bool(traj.stochastic.all())  # DDIM with set_alpha_to_one=False: even the last std is > 0 ...
    assert pso.trained_steps(traj) == [0, 1]  # ... but it is never trained (official: num_steps - 1)
    traj = sampling.sample(policy, PROMPTS, 3, generator=torch.Generator().manual_seed(0), eta=0.0)
    assert pso.trained_steps(traj) == []


def test_online_smoke_budget_and_adapters():
    policy = tiny_policy()
    before = policy.adapter_state_dict()
    method = methods.load("pso", prompts_per_round=2, pairs_per_update=2, lr=1e-2)
    assert isinstance(method, pso.PSOMethod)
    # Hand count, K = 3: a round samples 2 prompts x 2 trajectories x 3 steps = 12 NFEs and 4 reward calls; its 2
    # pairs train steps {0, 1}: 2 trajectories x (policy + reference) x 2 pairs x 2 steps = 16 NFEs.
    budget = Budget(max_nfe=2 * 28 + 4)
    tracker = NullTracker()
    method.train(policy, Task(PROMPTS, RedReward(), train_steps=3, seed=0), budget, tracker)
    assert (budget.sample_nfe, budget.grad_nfe, budget.reward_calls) == (24, 32, 8)
    assert changed(policy, before)
    assert tracker.series("train/loss")[0] == pytest.approx(math.log(2), abs=1e-6)  # theta = ref at the start


@pytest.mark.parametrize("variant", ["pso", "pso_db"])
def test_offline_smoke_budget(tmp_path, variant):
    path = preferences.write_dataset(tmp_path / "prefs", split="train", pairs_per_prompt=2)
    prompts = preferences.all_prompts("train")[:1]  # keep the dataset to one prompt: 2 rows
    import pandas as pd
    frame = pd.read_parquet(path / "pairs.parquet")
    frame[frame["prompt"].isin(prompts)].to_parquet(path / "pairs.parquet")
    policy = tiny_policy()
    before = policy.adapter_state_dict()
    method = methods.load("pso", mode="offline", variant=variant, dataset=str(path), pairs_per_update=2, lr=1e-2,
                          references_per_prompt=2)
    # references: 1 prompt x 2 samples x K=2 steps = 4 sampling NFEs, drawn once; an update runs [targets;
    # references] (2 x 2 rows) through the policy, and for "pso" through the frozen model too.
    update = 8 if variant == "pso" else 4
    budget = Budget(max_nfe=4 + 3 * update + update - 1)
    tracker = NullTracker()
    method.train(policy, Task(prompts, RedReward(), train_steps=2, seed=0), budget, tracker)
    assert (budget.sample_nfe, budget.grad_nfe, budget.reward_calls) == (4, 3 * update, 0)
    assert changed(policy, before)
    if variant == "pso":
        assert tracker.series("train/loss")[0] == pytest.approx(math.log(2), abs=1e-6)
