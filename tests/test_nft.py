"""DiffusionNFT: the parameterisation conversion and the loss on hand values, the old-policy EMA, exact NFE
accounting, and short train() runs on a tiny toy policy."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import RedReward, changed, count_forwards, t64, tiny_policy

import methods
from bench import grid as grids
from methods import nft, sampling
from methods.common import Budget, NullTracker, Task

PROMPTS = ["a red circle", "two blue squares", "three green triangles", "a yellow square"]


def task(train_steps=2, seed=0):
    return Task(prompts=PROMPTS, reward=RedReward(), train_steps=train_steps, seed=seed, device="cpu")


def small_nft(**overrides):
    config = dict(group_size=2, groups_per_epoch=2, sample_batch_size=4, train_batch_size=2, updates_per_epoch=2,
                  lr=1e-2, lora_rank=2, lora_alpha=2.0, num_epochs=1)
    config.update(overrides)
    return methods.load("nft", **config)


# ---------------------------------------------------------------------------------------------- pure functions
def test_optimality_and_old_decay_schedule():
    assert nft.optimality(torch.tensor([-7.0, -1.0, 0.0, 2.5]), 5.0).tolist() == pytest.approx([0, 0.4, 0.5, 0.75])
    # decay_type 1 (rate 0.001, max 0.5) and 2 (flat 75, rate 0.0075, max 0.999) of the official code
    assert [nft.old_decay(s, rate=0.001, max_decay=0.5) for s in (0, 300, 900)] == pytest.approx([0.0, 0.3, 0.5])
    assert [nft.old_decay(s, rate=0.0075, max_decay=0.999, flat=75) for s in (10, 75, 175, 500)] == \
        pytest.approx([0.0, 0.0, 0.75, 0.999])


def test_parameterisation_conversion_on_hand_values():
    """abar = 0.64 (sqrt 0.8, sqrt(1 - abar) 0.6), x_t = 1, output 0.5:
    epsilon: x0 = (1 - 0.6 * 0.5) / 0.8 = 0.875;  v: x0 = 0.8 * 1 - 0.6 * 0.5 = 0.5.
    The mix of outputs b o_theta + (1 - b) o_old has the mix of their x0's (affine in the output)."""
    x_t, abar = t64(1.0).view(1, 1), t64(0.64)
    eps_x0, _ = sampling.x0_and_eps("epsilon", t64(0.5).view(1, 1), x_t.float(), abar)
    v_x0, _ = sampling.x0_and_eps("v_prediction", t64(0.5).view(1, 1), x_t.float(), abar)
    assert eps_x0.item() == pytest.approx(0.875, abs=1e-6) and v_x0.item() == pytest.approx(0.5, abs=1e-6)
    o_theta, o_old, b = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.2, 0.3]]), 0.7
    x = torch.tensor([[1.0, -0.4]])
    for kind in ("epsilon", "v_prediction"):
        x0_theta, _ = sampling.x0_and_eps(kind, o_theta, x, abar)
        x0_old, _ = sampling.x0_and_eps(kind, o_old, x, abar)
        x0_pos, x0_neg = nft.implicit_x0(x0_theta, x0_old, b)
        assert torch.allclose(x0_pos, sampling.x0_and_eps(kind, b * o_theta + (1 - b) * o_old, x, abar)[0], atol=1e-6)
        assert torch.allclose(x0_neg, sampling.x0_and_eps(kind, (1 + b) * o_old - b * o_theta, x, abar)[0], atol=1e-6)
    # A v-model's x0 error is sqrt(1 - abar) times its v error (flow matching: t times the velocity error).
    x0_true, eps_true = torch.tensor([[0.3, 0.1]]), torch.tensor([[-1.0, 2.0]])
    x_noisy = 0.8 * x0_true + 0.6 * eps_true
    v_true = 0.8 * eps_true - 0.6 * x0_true
    x0_hat, _ = sampling.x0_and_eps("v_prediction", v_true + 0.25, x_noisy, abar)
    assert torch.allclose(x0_hat - x0_true, torch.full_like(x0_hat, -0.6 * 0.25), atol=1e-6)


def test_loss_worked_values():
    x0 = torch.zeros(1, 2, dtype=torch.float64)
    x0_theta = torch.tensor([[1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    x0_old = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    value, info = nft.loss(x0_theta, x0_old, x0, torch.tensor([0.75], dtype=torch.float64), beta=1.0)
    # x0+ = [1, -1]: mse 1, w+ 1; x0- = [0, 2]: mse 2, w- 1 -> 5 (0.75 * 1 + 0.25 * 2) = 6.25
    assert value.item() == pytest.approx(6.25, abs=1e-12) and info["policy_loss"].item() == pytest.approx(1.25)
    out = torch.tensor([[0.2, 0.4]], dtype=torch.float64, requires_grad=True)
    value, info = nft.loss(x0_theta, x0_old, x0, torch.tensor([0.75], dtype=torch.float64), beta=1.0,
                           kl_beta=0.5, out_theta=out, out_ref=torch.zeros(1, 2, dtype=torch.float64))
    assert info["kl"].item() == pytest.approx(0.1) and value.item() == pytest.approx(6.25 + 0.05)


def test_loss_has_no_gradient_at_the_old_policy_for_an_average_sample():
    x0 = torch.randn(3, 4, dtype=torch.float64)
    old = torch.randn(3, 4, dtype=torch.float64)
    theta = old.clone().requires_grad_(True)
    value, _ = nft.loss(theta, old, x0, torch.full((3,), 0.5, dtype=torch.float64), beta=1.0)
    value.backward()
    assert theta.grad.abs().max().item() < 1e-12
    theta.grad = None
    value, _ = nft.loss(theta, old, x0, torch.ones(3, dtype=torch.float64), beta=1.0)  # the best: toward x0
    value.backward()
    assert (theta.grad * (old - x0) > 0).all()  # gradient descent moves x0_theta toward x0


# ---------------------------------------------------------------------------------------------- train()
def test_train_spends_exact_budget_and_trains_at_k1():
    """K = 1: one epoch = 4 samples x 1 step (4) + 4 x 1 timestep x (current + old + reference) = 12 NFEs."""
    policy = tiny_policy()
    before = policy.adapter_state_dict()
    counter = count_forwards(policy)
    budget, tracker = Budget(max_nfe=None), NullTracker()
    small_nft().train(policy, task(train_steps=1), budget, tracker)
    assert (budget.sample_nfe, budget.grad_nfe, budget.reward_calls) == (4, 12, 4)
    assert counter["samples"] == budget.total_nfe and changed(policy, before)
    assert tracker.series("train/updates") == [2.0]
    assert grids.not_applicable(grids.compose(["method=nft", "train_steps=1"])) is None
    # K = 3 without the KL: 12 sampled, 4 x 3 timesteps x (current + old) = 24
    policy, budget = tiny_policy(), Budget(max_nfe=None)
    counter = count_forwards(policy)
    small_nft(kl_beta=0.0).train(policy, task(train_steps=3), budget, NullTracker())
    assert (budget.sample_nfe, budget.grad_nfe) == (12, 24) and counter["samples"] == 36


def test_budget_stops_before_an_epoch_that_would_not_fit():
    budget, tracker = Budget(max_nfe=30), NullTracker()  # one epoch at K = 1 is 16 NFEs: a second does not fit
    small_nft(num_epochs=None).train(tiny_policy(), task(train_steps=1), budget, tracker)
    assert budget.total_nfe == 16 and tracker.series("train/epoch") == [1.0]
    with pytest.raises(ValueError, match="smaller than one NFT epoch"):
        small_nft().train(tiny_policy(), task(train_steps=1), Budget(max_nfe=15), NullTracker())


def test_old_policy_follows_the_ema_schedule():
    """With d = 0 the old policy is the current one after an epoch (its deviation starts at 0 the next epoch);
    with a fixed d = 0.5 it lags behind."""
    tracker = NullTracker()
    small_nft(num_epochs=2, kl_beta=0.0, old_decay_rate=0.0).train(tiny_policy(), task(), Budget(None), tracker)
    assert tracker.series("train/old_decay") == [0.0, 0.0]
    method = small_nft(num_epochs=1, old_decay_rate=1.0, old_decay_max=0.5)
    policy = tiny_policy()
    params = [p for p in policy.trainable_parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    # one epoch by hand, to read the old weights it leaves
    old = [p.detach().clone() for p in params]
    state = {"epoch": 0, "updates": 0}
    optimizer = torch.optim.SGD(params, lr=0.1)
    from methods.common import generator

    gens = {"prompt": generator(0), "shuffle": generator(1), "noise": generator(2)}
    metrics = method._epoch(policy, task(), Budget(None), optimizer, params, old, state, gens)
    assert metrics["train/old_decay"] == 0.5 and state["updates"] == 2
    for p, o, s in zip(params, old, start):
        assert torch.allclose(o, 0.5 * s + 0.5 * p.detach(), atol=1e-7)


def test_sampling_uses_the_old_policy():
    """The collected x0 come from the old weights: swapping in other weights changes them, and the swap is undone."""
    policy = tiny_policy()
    params = [p for p in policy.trainable_parameters() if p.requires_grad]
    current = [p.detach().clone() for p in params]
    other = [p.detach().clone() + 0.05 for p in params]
    method = small_nft()
    x0_a, _, _ = method._collect(policy, task(), PROMPTS, params, [p.clone() for p in current],
                                 torch.Generator().manual_seed(0))
    x0_b, _, _ = method._collect(policy, task(), PROMPTS, params, other, torch.Generator().manual_seed(0))
    assert not torch.equal(x0_a, x0_b)
    assert all(torch.equal(p, c) for p, c in zip(params, current))
    noise = torch.randn(4, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    expected = sampling.sample(policy, PROMPTS, 2, noise=noise, eta=0.0, record=False).final_latents
    assert torch.equal(x0_a, expected)


def test_timesteps_are_the_samplers_own():
    policy = tiny_policy()
    seen = []
    original = policy.predict

    def spy(x, t, cond):
        seen.extend(torch.as_tensor(t).reshape(-1).tolist())
        return original(x, t, cond)

    policy.predict = spy
    small_nft(kl_beta=0.0).train(policy, task(train_steps=2), Budget(None), NullTracker())
    grid, _ = sampling.timestep_grid(policy.scheduler, 2, "ddim")
    assert set(seen) == set(grid.tolist()) == {999, 499}


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    class CrashAt:
        def log_metrics(self, metrics, step):
            if metrics["train/epoch"] == 2:
                raise KeyboardInterrupt

    reference = tiny_policy()
    small_nft(num_epochs=2, old_decay_rate=0.3).train(reference, task(), Budget(None), NullTracker())
    path = str(tmp_path / "nft.pt")
    with pytest.raises(KeyboardInterrupt):
        small_nft(num_epochs=2, old_decay_rate=0.3, checkpoint_path=path).train(tiny_policy(), task(), Budget(None),
                                                                                CrashAt())
    resumed = tiny_policy()
    small_nft(num_epochs=2, old_decay_rate=0.3, checkpoint_path=path).train(resumed, task(), Budget(None),
                                                                            NullTracker())
    ref, res = reference.adapter_state_dict(), resumed.adapter_state_dict()
    assert all(torch.equal(ref[k], res[k]) for k in ref)


def test_registered_with_presets_and_search_space():
    assert "nft" in methods.names()
    toy = methods.load("nft", preset="toy")
    assert toy.config.full_finetune and toy.config.beta == 1.0 and toy.config.kl_beta == 1e-4
    assert set(nft.Config.search_space()) >= {"lr", "beta", "kl_beta"}
    with pytest.raises(ValueError, match="old_decay_max must be in"):
        nft.Config(old_decay_max=1.0)
    assert math.isclose(nft.Config().trained_timesteps(4), 4) and nft.Config(timestep_fraction=0.5).trained_timesteps(1) == 1


def test_report_claims_compare_grpo_with_ddpo_and_nft_with_grpo():
    from reports.render import CLAIMS, label

    claims = {(c.a, c.b): c for c in CLAIMS}
    assert claims[("grpo", "ddpo")].steps == "untrained" and claims[("grpo", "ddpo")].compute is None
    assert claims[("nft", "grpo")].steps == "all" and claims[("nft", "grpo")].compute == "train"
    assert label("grpo") == "GRPO (Flow-GRPO)" and label("nft") == "DiffusionNFT"
