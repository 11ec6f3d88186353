"""GRPO: advantages and loss on hand-computed values, the SDE window, exact NFE accounting, the first ratio, K >= 2."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import RedReward, changed, count_forwards, tiny_policy

import methods
from bench import grid as grids
from methods import grpo, sampling
from methods.common import Budget, NullTracker, Task

PROMPTS = ["a red circle", "two blue squares", "three green triangles", "a yellow square"]


def task(train_steps=3, seed=0):
    return Task(prompts=PROMPTS, reward=RedReward(), train_steps=train_steps, seed=seed, device="cpu")


def small_grpo(**overrides):
    config = dict(group_size=2, groups_per_epoch=2, sample_batch_size=2, train_batch_size=2, updates_per_epoch=2,
                  lr=1e-2, lora_rank=2, lora_alpha=2.0, num_epochs=1)
    config.update(overrides)
    return methods.load("grpo", **config)


# ---------------------------------------------------------------------------------------------- pure functions
def test_group_relative_advantages_worked_values():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0])
    group, zero = grpo.group_relative_advantages(rewards, 2, global_std=False, adv_clip_max=5.0)
    assert group.tolist() == pytest.approx([-1 / 1.0001, 1 / 1.0001, 0.0, 0.0], rel=1e-6) and zero == 0.5
    glob, _ = grpo.group_relative_advantages(rewards, 2, global_std=True, adv_clip_max=5.0)
    assert glob.tolist() == pytest.approx([-1 / (0.5**0.5 + 1e-4), 1 / (0.5**0.5 + 1e-4), 0.0, 0.0], rel=1e-6)
    assert glob[1].item() == pytest.approx(1.41401, abs=1e-5)
    clipped, _ = grpo.group_relative_advantages(rewards, 2, global_std=True, adv_clip_max=1.2)
    assert clipped.tolist() == pytest.approx([-1.2, 1.2, 0.0, 0.0])
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        grpo.group_relative_advantages(rewards, 3, global_std=True, adv_clip_max=5.0)


def test_loss_worked_values_with_closed_form_kl():
    old = torch.zeros(2, dtype=torch.float64)
    new = torch.tensor([5e-5, 0.0], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    value, info = grpo.loss(new, old, adv, clip_range=1e-4)
    assert value.item() == pytest.approx((-math.exp(5e-5) + 2) / 2, abs=1e-12)
    assert value.item() == pytest.approx(0.499975, abs=1e-6) and info["kl"].item() == 0.0
    mean = torch.full((2, 1, 2, 2), 0.3, dtype=torch.float64, requires_grad=True)
    ref = torch.full((2, 1, 2, 2), 0.2, dtype=torch.float64)
    value, info = grpo.loss(new, old, adv, clip_range=1e-4, kl_beta=0.04, mean=mean, ref_mean=ref, std=0.5)
    assert info["kl"].item() == pytest.approx(0.02, rel=1e-9)  # 0.1^2 / (2 * 0.25)
    assert value.item() == pytest.approx(0.499975 + 0.04 * 0.02, abs=1e-6)
    value.backward()
    # d(beta KL)/d mu = beta (mu - mu_ref) / sigma^2 / (B D) = 0.04 * 0.1 / 0.25 / 8
    assert mean.grad.flatten().tolist() == pytest.approx([0.04 * 0.1 / 0.25 / 8] * 8, rel=1e-9)
    with pytest.raises(ValueError, match="kl_beta > 0 needs"):
        grpo.loss(new, old, adv, clip_range=1e-4, kl_beta=0.1)


# ---------------------------------------------------------------------------------------------- config
def test_window_and_min_train_steps():
    cfg = grpo.Config()
    assert cfg.min_train_steps() == 2 and cfg.noise_rule == "cps" and cfg.eta == 0.8 and cfg.kl_beta == 0.01
    assert cfg.window_starts(4) == [0] and cfg.window_width(4) == 3  # every step but the last
    fast = grpo.Config(sde_window_size=1)
    assert fast.window_starts(4) == [0, 1, 2]
    assert grpo.Config(sde_window_size=2, sde_window_range=(1, 4)).window_starts(8) == [1, 2]
    with pytest.raises(ValueError, match="grpo trains at K >= 2 only"):
        cfg.window_width(1)
    with pytest.raises(ValueError, match="sde_window_size 4 > the K - 1 = 3"):
        grpo.Config(sde_window_size=4).window_width(4)
    with pytest.raises(ValueError, match="must be a multiple of train_batch_size x updates_per_epoch = 32"):
        grpo.Config(group_size=4, groups_per_epoch=2, train_batch_size=16)
    with pytest.raises(ValueError, match="noise_rule must be one of 'ddim', 'cps', 'sde', 'dance'; got 'flow'"):
        grpo.Config(noise_rule="flow")


def test_k1_cells_are_not_applicable():
    cfg = grids.compose(["method=grpo", "train_steps=1"])
    assert "grpo trains at K >= 2 only" in grids.not_applicable(cfg)
    assert grids.not_applicable(grids.compose(["method=grpo", "train_steps=2"])) is None
    with pytest.raises(ValueError, match="grpo trains at K >= 2 only"):
        small_grpo().train(tiny_policy(), task(train_steps=1), Budget(None), NullTracker())


# ---------------------------------------------------------------------------------------------- train()
def test_first_update_ratio_is_exactly_one_and_budget_is_exact():
    """Rollout and training micro-batches have the same shape, so the first update's ratios are exactly 1. NFEs:
    4 trajectories x 3 steps sampled (12); 2 window steps x 4 trajectories x (policy + reference) = 16 gradient NFEs."""
    policy = tiny_policy()
    before = policy.adapter_state_dict()
    counter = count_forwards(policy)
    budget, tracker = Budget(max_nfe=None), NullTracker()
    small_grpo().train(policy, task(train_steps=3), budget, tracker)
    assert tracker.series("train/first_update_ratio_dev") == [0.0]
    assert (budget.sample_nfe, budget.grad_nfe, budget.reward_calls) == (12, 16, 4)
    assert counter["samples"] == budget.total_nfe
    assert tracker.series("train/updates") == [2.0] and changed(policy, before)
    # Without the KL no reference forward is made or booked.
    policy, budget = tiny_policy(), Budget(max_nfe=None)
    counter = count_forwards(policy)
    small_grpo(kl_beta=0.0).train(policy, task(train_steps=3), budget, NullTracker())
    assert (budget.sample_nfe, budget.grad_nfe) == (12, 8) and counter["samples"] == 20


def test_the_ratio_moves_after_the_first_update():
    tracker = NullTracker()
    small_grpo(num_inner_epochs=2).train(tiny_policy(), task(train_steps=3), Budget(None), tracker)
    assert tracker.series("train/first_update_ratio_dev") == [0.0]
    assert tracker.series("train/approx_kl")[0] > 0  # later micro-batches see updated weights


def test_budget_stops_before_an_epoch_that_would_not_fit():
    # One epoch (K = 2, window of 1 step): 4 x 2 sampled + 4 x 1 x 2 gradient = 16 NFEs; 40 fits two epochs only.
    budget, tracker = Budget(max_nfe=40), NullTracker()
    small_grpo(num_epochs=None).train(tiny_policy(), task(train_steps=2), budget, tracker)
    assert budget.total_nfe == 32 and tracker.series("train/epoch") == [1.0, 2.0]
    assert tracker.steps("train/loss") == [16, 32]
    with pytest.raises(ValueError, match="smaller than one GRPO epoch"):
        small_grpo().train(tiny_policy(), task(train_steps=2), Budget(max_nfe=15), NullTracker())


def test_sde_window_trains_only_its_steps():
    policy = tiny_policy()
    method = small_grpo(sde_window_size=1)
    windows = {method.sde_window(4, torch.Generator().manual_seed(s)) for s in range(20)}
    assert windows == {(0,), (1,), (2,)}
    budget = Budget(None)
    method.train(policy, task(train_steps=4), budget, NullTracker())
    assert (budget.sample_nfe, budget.grad_nfe) == (16, 8)  # 1 trained step x 4 x (policy + reference)


def test_shared_initial_noise_gives_a_group_one_start():
    policy = tiny_policy()
    method = small_grpo(shared_initial_noise=True, eta=1e-6)  # almost no SDE noise: members nearly coincide
    traj, _ = method._sample(policy, task(), ["a red circle"] * 2 + ["a yellow square"] * 2, (0, 1),
                             torch.Generator().manual_seed(0))
    assert torch.equal(traj.latents[0, 0], traj.latents[1, 0]) and not torch.equal(traj.latents[0, 0],
                                                                                    traj.latents[2, 0])
    independent = small_grpo()
    traj, _ = independent._sample(policy, task(), ["a red circle"] * 2, (0, 1), torch.Generator().manual_seed(0))
    assert not torch.equal(traj.latents[0, 0], traj.latents[1, 0])


def test_zero_std_groups_are_logged():
    class Constant:
        def __call__(self, images, prompts):
            return torch.ones(len(prompts))

    tracker = NullTracker()
    small_grpo().train(tiny_policy(), Task(PROMPTS, Constant(), 2, 0), Budget(None), tracker)
    assert tracker.series("train/zero_std_ratio") == [1.0] and tracker.series("train/advantage_abs_mean") == [0.0]


def test_checks_before_any_compute():
    with pytest.raises(ValueError, match=r"groups_per_epoch \(8\) > the number of training prompts \(4\)"):
        small_grpo(groups_per_epoch=8).train(tiny_policy(), task(), Budget(None), NullTracker())
    with pytest.raises(ValueError, match="sample_batch_size \\(4\\) must equal train_batch_size \\(2\\)"):
        small_grpo(sample_batch_size=4).train(tiny_policy(), task(), Budget(None), NullTracker())


class _CrashAt:
    """A tracker that dies while logging epoch `epoch` (after that epoch's checkpoint was not yet written)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def log_metrics(self, metrics, step):
        if metrics["train/epoch"] == self.epoch:
            raise KeyboardInterrupt


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    reference = tiny_policy()
    small_grpo(num_epochs=2).train(reference, task(), Budget(None), NullTracker())
    path = str(tmp_path / "grpo.pt")
    with pytest.raises(KeyboardInterrupt):  # the checkpoint holds epoch 1
        small_grpo(num_epochs=2, checkpoint_path=path).train(tiny_policy(), task(), Budget(None), _CrashAt(2))
    resumed, budget = tiny_policy(), Budget(None)
    small_grpo(num_epochs=2, checkpoint_path=path).train(resumed, task(), budget, NullTracker())
    ref, res = reference.adapter_state_dict(), resumed.adapter_state_dict()
    assert all(torch.equal(ref[k], res[k]) for k in ref) and budget.total_nfe == 2 * (12 + 16)


def test_registered_with_presets_and_search_space():
    assert "grpo" in methods.names()
    toy = methods.load("grpo", preset="toy")
    assert toy.config.full_finetune and toy.config.sample_batch_size == toy.config.train_batch_size
    assert set(grpo.Config.search_space()) >= {"lr", "kl_beta", "eta"}
    assert sampling.NOISE_RULES == ("ddim", "cps", "sde", "dance")
