"""Filtered SFT (the naive baseline): the plain denoising loss, sample selection, the two noise pairings, and a
short train() run on a tiny toy policy with a hand-computed NFE count."""

from __future__ import annotations

import pytest
import torch
from helpers import RedReward, tiny_policy

import methods
from methods import sft
from methods.common import Budget, NullTracker, Task
from methods.preference_data import add_noise, denoising_target
from tasks.toy.pipeline import build_scheduler

PROMPTS = ["a red circle", "two blue squares"]


def test_loss_values():
    assert sft.loss(torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)).item() == 1.0
    x = torch.randn(2, 3, 4, 4)
    assert sft.loss(x, x).item() == 0.0
    # mean over samples of element means: rows with errors 1 and 4 -> 2.5
    pred = torch.stack([torch.ones(3, 4, 4), 2 * torch.ones(3, 4, 4)])
    assert sft.loss(pred, torch.zeros_like(pred)).item() == pytest.approx(2.5)


def test_select():
    rewards, groups = torch.tensor([0.0, 1.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1])
    assert sft.select(rewards, groups, "best").tolist() == [1]  # group 1 is a tie: nothing preferred
    assert sft.select(rewards, groups, "threshold", 1.0).tolist() == [1, 2, 3]


def test_v_target_recovers_x0_and_eps():
    """The denoising target is the scheduler's velocity: x0 = sqrt(abar) x_t - sqrt(1-abar) v."""
    scheduler = build_scheduler()
    x0, eps, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([999, 249])
    x_t = add_noise(scheduler, x0, eps, t)
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = denoising_target("v_prediction", x0, eps, abar)
    assert torch.allclose(abar.sqrt() * x_t - (1 - abar).sqrt() * v, x0, atol=1e-5)
    assert torch.allclose(scheduler.get_velocity(x0, eps, t), v, atol=1e-6)


@pytest.mark.parametrize("pairing", ["fresh", "reflow"])
def test_smoke_budget_and_adapters(pairing):
    policy = tiny_policy()
    before = policy.adapter_state_dict()
    method = methods.load("sft", pairing=pairing, prompts_per_round=2, samples_per_prompt=2, batch_size=2,
                          updates_per_round=2, lr=1e-2)
    assert isinstance(method, sft.SFTMethod)
    # Hand count, K = 2: a round samples 4 images x 2 steps = 8 NFEs, 4 reward calls; each update 2 samples
    # forward+backward = 2 NFEs (no reference model); 2 updates -> 12 a round.
    budget = Budget(max_nfe=2 * 12 + 9)
    tracker = NullTracker()
    method.train(policy, Task(PROMPTS, RedReward(), train_steps=2, seed=0), budget, tracker)
    assert (budget.sample_nfe, budget.grad_nfe, budget.reward_calls) == (16, 8, 8)
    assert tracker.series("train/num_kept") == [2.0, 2.0]
    after = policy.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_reflow_pairing_fits_the_samples_own_path_better():
    """On its own deterministic samples the (z, x0) reflow pair is the path the sampler itself took, so a 1-step
    sample's reflow loss at t=999 is nearly 0 (x_999 = z up to abar_999; measured 7e-4) -- fresh noise: 0.2."""
    from methods import sampling
    from methods.preference_data import own_noise

    policy = tiny_policy()
    traj = sampling.sample(policy, PROMPTS, 1, generator=torch.Generator().manual_seed(0), eta=0.0)
    x0, z, t = traj.latents[:, -1], own_noise(traj, policy), torch.tensor([999, 999])
    abar = policy.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        out = policy.predict(add_noise(policy.scheduler, x0, z, t), t, traj.cond)
        pred_x0 = abar.sqrt() * add_noise(policy.scheduler, x0, z, t) - (1 - abar).sqrt() * out
        fresh = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
        out_fresh = policy.predict(add_noise(policy.scheduler, x0, fresh, t), t, traj.cond)
    reflow_err = sft.loss(out, denoising_target("v_prediction", x0, z, abar))
    fresh_err = sft.loss(out_fresh, denoising_target("v_prediction", x0, fresh, abar))
    # the 1-step sample is (nearly) the x0 prediction from x_T = z, so the reflow target is nearly the model's own
    # output, while fresh noise asks for a different output at t = 999
    assert (pred_x0.clamp(-1, 1) - x0).abs().max() < 0.05
    assert reflow_err < 0.1 * fresh_err
