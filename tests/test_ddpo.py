"""DDPO: the PPO-clip loss on the spec's worked values, and short train() runs on a tiny toy policy."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import RedReward, tiny_policy

import methods
from methods import ddpo, sampling
from methods.common import Budget, NullTracker, Task

PROMPTS = ["a red circle", "two blue squares", "three green triangles", "a yellow square"]


# ---------------------------------------------------------------------------------------------- pure loss
@pytest.mark.parametrize(
    "log_ratio, expected, grad_flows",
    [(5e-5, -1.200060, True), (3e-4, -1.200120, False), (-3e-4, -1.199640, True)],
)
def test_loss_worked_values(log_ratio, expected, grad_flows):
    """Spec §2.4: A = 1.2, eps = 1e-4."""
    old = torch.tensor([2.0], dtype=torch.float64)
    new = (old + log_ratio).clone().requires_grad_(True)
    value, info = ddpo.loss(new, old, torch.tensor([1.2], dtype=torch.float64), clip_range=1e-4)
    assert value.item() == pytest.approx(expected, abs=1e-6)
    value.backward()
    if grad_flows:  # d/dlogp of -A exp(logp - old) = -A rho
        assert new.grad.item() == pytest.approx(-1.2 * math.exp(log_ratio), rel=1e-9)
    else:
        assert new.grad.item() == 0.0
    assert info["clipfrac"].item() == (0.0 if abs(log_ratio) < 1e-4 else 1.0)
    assert info["approx_kl"].item() == pytest.approx(0.5 * log_ratio**2, rel=1e-6)


def test_loss_is_batch_mean_and_negative_advantage_clips_low_side():
    old = torch.zeros(2, dtype=torch.float64)
    new = torch.tensor([-3e-4, 3e-4], dtype=torch.float64)
    adv = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    value, info = ddpo.loss(new, old, adv, 1e-4)
    # row 0: A<0, rho=0.9997: max(0.9997, 0.9999) = 0.9999 (clipped); row 1: A>0, rho=1.0003 -> -1.0001 (clipped)
    assert value.item() == pytest.approx((0.9999 - 1.0001) / 2, abs=1e-9)
    assert info["clipfrac"].item() == 1.0


def test_loss_zero_at_identical_log_probs():
    logp = torch.tensor([0.3, -0.7])
    value, info = ddpo.loss(logp, logp.clone(), torch.tensor([1.0, -1.0]), 1e-4)
    assert value.item() == 0.0 and info["approx_kl"].item() == 0.0 and info["log_ratio_abs_max"].item() == 0.0


# ---------------------------------------------------------------------------------------------- tiny policy
def small_ddpo(**overrides):
    config = dict(prompts_per_epoch=2, samples_per_prompt=2, prompt_replacement=False, sample_batch_size=4,
                  advantage="group", train_batch_size=2, gradient_accumulation_steps=1, lr=1e-2, num_epochs=None)
    config.update(overrides)
    return methods.load("ddpo", **config)


def task(train_steps=2, seed=0):
    return Task(prompts=PROMPTS, reward=RedReward(), train_steps=train_steps, seed=seed, device="cpu")


def adapters_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- train()
def test_stochastic_mask_matches_sampler():
    policy = tiny_policy()
    for steps, eta in [(1, 1.0), (4, 1.0), (4, 0.0)]:
        traj = sampling.sample(policy, PROMPTS[:1], steps, generator=torch.Generator().manual_seed(0), eta=eta)
        assert torch.equal(sampling.stochastic_steps(policy, steps, eta, "ddim"), traj.stochastic)


def test_train_changes_adapters_and_spends_exact_budget():
    policy = tiny_policy()
    before = policy.adapter_state_dict()
    # One epoch = 4 samples x 2 steps (8 sampling NFEs) + 4 samples x 2 trained steps (8 grad NFEs) = 16 NFEs.
    # A 40-NFE budget fits 2 epochs (32); a third would need 48 > 40, so it must not start.
    budget, tracker = Budget(max_nfe=40), NullTracker()
    small_ddpo().train(policy, task(train_steps=2), budget, tracker)
    assert budget.as_dict() == {"max_nfe": 40, "max_reward_calls": None, "sample_nfe": 16, "grad_nfe": 16,
                                "total_nfe": 32, "reward_calls": 8}
    assert not adapters_equal(before, policy.adapter_state_dict())
    assert tracker.series("train/epoch") == [1.0, 2.0]
    assert tracker.steps("train/loss") == [16, 32]  # step = NFEs consumed
    assert tracker.series("train/updates") == [2.0, 2.0]  # 4 samples / (2 per micro-batch x 1 accumulation)
    for key in ("train/reward_mean", "train/approx_kl", "train/clipfrac", "train/loss", "train/grad_norm"):
        assert len(tracker.series(key)) == 2


def test_lr_zero_keeps_log_ratio_exactly_zero():
    """Unchanged weights -> ratio exactly 1, provided the training micro-batches have the sampler's batch size
    (CPU kernels differ by ~1 ulp between batch sizes); otherwise it stays far below the clip range."""
    policy = tiny_policy()
    before = policy.adapter_state_dict()
    tracker = NullTracker()
    small_ddpo(lr=0.0, weight_decay=0.0, num_epochs=1, sample_batch_size=2, train_batch_size=2,
               gradient_accumulation_steps=2, num_inner_epochs=2).train(
        policy, task(train_steps=3), Budget(max_nfe=None), tracker)
    assert adapters_equal(before, policy.adapter_state_dict())
    assert tracker.series("train/log_ratio_abs_max") == [0.0]
    assert tracker.series("train/clipfrac") == [0.0] and tracker.series("train/approx_kl") == [0.0]
    assert tracker.series("train/ratio") == [1.0]

    tracker = NullTracker()
    small_ddpo(lr=0.0, weight_decay=0.0, num_epochs=1, sample_batch_size=4, train_batch_size=1,
               gradient_accumulation_steps=4).train(policy, task(train_steps=3), Budget(max_nfe=None), tracker)
    assert tracker.series("train/log_ratio_abs_max")[0] < 1e-5 and tracker.series("train/clipfrac") == [0.0]


def test_toy_preset_skips_last_step_and_counts_budget():
    policy = tiny_policy(full_finetune=True)
    method = methods.load("ddpo", preset="toy", prompts_per_epoch=2, samples_per_prompt=2, sample_batch_size=4,
                          train_batch_size=4, num_epochs=1)
    assert method.config.full_finetune and method.config.lr == methods.presets("ddpo")["toy"]["lr"] != methods.load("ddpo").config.lr and not method.config.train_last_step
    assert method.trained_steps(policy, 4).tolist() == [True, True, True, False]
    assert method.trained_steps(policy, 1).tolist() == [True]  # the only action at K = 1 is trained anyway
    budget = Budget(max_nfe=None)
    method.train(policy, task(train_steps=4), budget, NullTracker())
    # 4 samples x 4 steps sampled; 4 samples x 3 trained transitions (the last, std 0.006, is not trained).
    assert (budget.sample_nfe, budget.grad_nfe, budget.reward_calls) == (16, 12, 4)


def test_timestep_fraction_trains_a_subset_and_cfg_doubles_nfe():
    policy = tiny_policy()
    policy.nfe_per_predict = 2  # accounting only: pretend CFG (predict() is unchanged for the toy)
    budget = Budget(max_nfe=None)
    small_ddpo(num_epochs=1, timestep_fraction=0.5, train_last_step=False).train(
        policy, task(train_steps=4), budget, NullTracker())
    # int(3 trainable x 0.5) = 1 transition per sample.
    assert (budget.sample_nfe, budget.grad_nfe) == (4 * 4 * 2, 4 * 1 * 2)


def test_budget_smaller_than_one_epoch_fails_loudly():
    with pytest.raises(ValueError, match="smaller than one DDPO epoch"):
        small_ddpo().train(tiny_policy(), task(train_steps=2), Budget(max_nfe=15), NullTracker())
    with pytest.raises(ValueError, match="nothing to train"):
        small_ddpo(eta=0.0).train(tiny_policy(), task(train_steps=2), Budget(max_nfe=100), NullTracker())


def test_stat_tracker_advantages_run():
    tracker = NullTracker()
    small_ddpo(advantage="tracker", tracker_min_count=2, num_epochs=2).train(
        tiny_policy(), task(train_steps=2), Budget(None), tracker)
    assert tracker.series("train/tracked_prompts")[-1] >= 2


class _CrashAt:
    def __init__(self, epoch):
        self.epoch, self.inner = epoch, NullTracker()

    def log_metrics(self, metrics, step):
        if metrics["train/epoch"] == self.epoch:
            raise KeyboardInterrupt
        self.inner.log_metrics(metrics, step)


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    reference = tiny_policy()
    small_ddpo(num_epochs=2).train(reference, task(train_steps=2), Budget(None), NullTracker())

    path = str(tmp_path / "ddpo.pt")
    with pytest.raises(KeyboardInterrupt):  # dies while logging epoch 2: the checkpoint holds epoch 1
        small_ddpo(num_epochs=2, checkpoint_path=path).train(tiny_policy(), task(train_steps=2), Budget(None),
                                                           _CrashAt(2))
    resumed, budget = tiny_policy(), Budget(None)
    small_ddpo(num_epochs=2, checkpoint_path=path).train(resumed, task(train_steps=2), budget, NullTracker())
    assert adapters_equal(reference.adapter_state_dict(), resumed.adapter_state_dict())
    assert budget.total_nfe == 2 * 16
    with pytest.raises(ValueError, match="refusing to resume"):
        small_ddpo(num_epochs=2, checkpoint_path=path, lr=1e-3).train(tiny_policy(), task(train_steps=2),
                                                                      Budget(None), NullTracker())


def test_generate_is_deterministic_default_sampler():
    policy = tiny_policy()
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(1))
    budget = Budget(None)
    images, extra = methods.load("ddpo").generate(policy, PROMPTS[:2], 2, noise=noise, budget=budget)
    expected = sampling.sample(policy, PROMPTS[:2], 2, noise=noise, eta=0.0).images
    assert extra == 0 and torch.equal(images, expected) and budget.sample_nfe == 4
