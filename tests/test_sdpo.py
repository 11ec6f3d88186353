"""SDPO: worked values of spec §3 (ddpo-sdpo-sharpening-search.md), loss symmetries and clipping, and a smoke
train() on a tiny random toy policy with exact NFE / reward-call accounting."""

from __future__ import annotations

import pytest
import torch
from helpers import CountingReward, count_forwards, tiny_policy_16px

import methods
from methods.common import Budget, NullTracker, PerPromptStatTracker, Task
from methods.sampling import stochastic_steps
from methods.sdpo import (
    Config,
    SDPOMethod,
    dense_rewards,
    discounted_returns,
    loss,
    normalise_returns,
    step_similarities,
)

# ------------------------------------------------------------------------------------------- pure functions


def test_dense_rewards_and_returns_worked_example():
    # spec §3.3: T = 4, anchor k = 1.
    s_first = torch.tensor([[1.0, 0.8, 0.7, 0.6]])
    s_last = torch.tensor([[0.6, 0.75, 0.9, 1.0]])
    s_anchor = torch.tensor([[0.8, 1.0, 0.85, 0.75]])
    assert int(torch.argmin(s_first + s_last, dim=1)) == 1
    rewards = dense_rewards(torch.tensor([5.0]), torch.tensor([5.6]), torch.tensor([6.0]),
                            s_first, s_anchor, s_last, torch.tensor([1]))
    assert torch.allclose(rewards, torch.tensor([[5.0, 5.6, 5.575510, 6.0]]), atol=1e-5)
    returns = discounted_returns(rewards, 0.99)
    assert torch.allclose(returns, torch.tensor([[21.830352, 17.000355, 11.515510, 6.0]]), atol=1e-4)


def test_negative_similarities_get_zero_weight():
    # Step 1 is anti-correlated with the first step: clamped to weight 0, not a sign flip.
    rewards = dense_rewards(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0]),
                            torch.tensor([[1.0, -0.5, 0.5, 0.2]]), torch.tensor([[0.5, 0.5, 1.0, 0.5]]),
                            torch.tensor([[0.2, 0.5, 0.5, 1.0]]), torch.tensor([2]))
    assert rewards[0, 1].item() == pytest.approx((2.0 * 0.5 + 3.0 * 0.5) / 1.0)


def test_step_similarities_anchor_is_least_like_both_ends():
    e = torch.eye(3)
    x0_preds = torch.stack([e[0], e[2], 0.6 * e[0] + 0.8 * e[1], e[1]])[None]  # (1, T=4, 3)
    s_first, s_last, s_anchor, anchor = step_similarities(x0_preds)
    assert torch.allclose(s_first, torch.tensor([[1.0, 0.0, 0.6, 0.0]]))
    assert torch.allclose(s_last, torch.tensor([[0.0, 0.0, 0.8, 1.0]]))
    assert anchor.tolist() == [1]
    assert torch.allclose(s_anchor, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    # Exact ties go to the first index (T = 2: both steps have s_first + s_last = 1 + cos).
    _, _, _, anchor = step_similarities(torch.stack([e[0], e[1]])[None])
    assert anchor.tolist() == [0]


def _loss(rho_a, rho_b, adv_diff, step=1, **kw):
    """loss() at log p_old = 0 (so log p_theta = rho) with A^b = 0."""
    new_a = torch.tensor([rho_a], requires_grad=True)
    new_b = torch.tensor([rho_b], requires_grad=True)
    value, info = loss(new_a, new_b, torch.zeros(1), torch.zeros(1), torch.tensor([adv_diff]), torch.zeros(1),
                       torch.tensor([step]), **kw)
    value.backward()
    return value.item(), new_a.grad.item(), new_b.grad.item(), info


def test_pair_loss_worked_example():
    # spec §3.4: w = 0.99 (step 1), rho^a = 2e-4, rho^b = -1e-4, dA = 0.8 -> L_u 0.639525, L_c 0.639683.
    value, _, _, info = _loss(2e-4, -1e-4, 0.8, step=1)
    assert value == pytest.approx(0.639683, abs=1e-6)
    unclipped = (0.99 * (2e-4 + 1e-4) - 0.8) ** 2
    assert unclipped == pytest.approx(0.639525, abs=1e-6)
    assert info["clipfrac"].item() == pytest.approx(0.5)


def test_pair_loss_step_weight_is_lambda_to_the_step():
    # At theta = theta_old: dL/drho^a = -2 w dA with w = lam^i / log_scale.
    for step in (0, 3):
        _, grad_a, _, _ = _loss(0.0, 0.0, 0.8, step=step, lam=0.9, log_scale=2.0)
        assert grad_a == pytest.approx(-2 * (0.9 ** step / 2.0) * 0.8, rel=1e-5)


def test_pair_loss_swap_symmetry_and_sign_flip():
    rho_a, rho_b, adv_a, adv_b = [torch.tensor([v]) for v in (3e-5, -2e-5, 1.3, -0.4)]
    args = dict(step_index=torch.tensor([2]))
    forward, _ = loss(rho_a, rho_b, torch.zeros(1), torch.zeros(1), adv_a, adv_b, **args)
    swapped, _ = loss(rho_b, rho_a, torch.zeros(1), torch.zeros(1), adv_b, adv_a, **args)
    assert forward.item() == pytest.approx(swapped.item(), rel=1e-6)
    # At theta = theta_old the pair gradient is antisymmetric and flips sign with the advantage order.
    _, grad_a, grad_b, _ = _loss(0.0, 0.0, 0.8)
    assert grad_a < 0 and grad_b == pytest.approx(-grad_a)
    _, grad_a_flipped, _, _ = _loss(0.0, 0.0, -0.8)
    assert grad_a_flipped == pytest.approx(-grad_a)


def test_pair_loss_zero_gradient_where_clipped():
    # Both log-ratios outside +-1e-4 and the clipped branch is the larger: no gradient at all.
    value, grad_a, grad_b, info = _loss(2e-4, -2e-4, 0.8)
    assert value == pytest.approx((0.99 * 2e-4 - 0.8) ** 2, abs=1e-7)
    assert grad_a == 0.0 and grad_b == 0.0
    assert info["clipfrac"].item() == 1.0
    # A ratio moving against the advantage is not clipped away: the unclipped branch wins, gradient flows.
    value, grad_a, _, _ = _loss(-3e-4, 0.0, 0.8)
    assert value == pytest.approx((0.99 * -3e-4 - 0.8) ** 2, abs=1e-7)
    assert grad_a == pytest.approx(2 * 0.99 * (0.99 * -3e-4 - 0.8), rel=1e-5)


def test_advantages_are_clipped_before_the_difference():
    value, _, _, _ = _loss(0.0, 0.0, 40.0, adv_clip_max=5.0)
    assert value == pytest.approx(25.0)


def test_normalise_returns_per_prompt_and_step():
    returns = torch.tensor([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0], [9.0, 90.0]])
    prompts = ["x", "x", "y", "y"]
    tracker = PerPromptStatTracker(buffer_size=8, min_count=2)
    advantages = normalise_returns(returns, prompts, tracker)
    # Each (prompt, step) buffer holds its 2 values: +-1 per pair, separately per step column.
    assert torch.allclose(advantages, torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0], [1.0, 1.0]]), atol=1e-5)
    assert len(tracker.buffers) == 4
    # Below min_count: the step column's batch statistics (both prompts).
    fresh = normalise_returns(returns, prompts, PerPromptStatTracker(buffer_size=8, min_count=3))
    column = returns[:, 1]
    assert torch.allclose(fresh[:, 1], (column - column.mean()) / (column.std(unbiased=False) + 1e-6), atol=1e-5)
    # Without a tracker: one global z-score.
    glob = normalise_returns(returns, prompts, None)
    assert torch.allclose(glob, (returns - returns.mean()) / (returns.std(unbiased=False) + 1e-8))


def test_config_validation_and_registry():
    assert type(methods.load("sdpo")).__name__ == "SDPOMethod"
    assert SDPOMethod is methods.method_class("sdpo")
    with pytest.raises(ValueError, match="eta"):
        Config(eta=0.0)
    with pytest.raises(ValueError, match="timestep_fraction"):
        Config(timestep_fraction=0.0)
    with pytest.raises(ValueError, match="unknown config key"):
        methods.load("sdpo", bogus=1)
    space = Config.search_space()
    assert set(space) <= {f for f in Config.__dataclass_fields__}


def test_method_protocol_documented_fields_and_toy_preset():
    import dataclasses
    import inspect

    method = methods.load("sdpo", preset="toy")
    assert isinstance(method, methods.Method) and method.name == "sdpo"
    lines = inspect.getsource(Config).splitlines()
    for field in dataclasses.fields(Config):
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{field.name}:"))
        assert lines[at + 1].strip().startswith('"""'), f"{field.name} has no docstring"


# ------------------------------------------------------------------------------------------- smoke training


def test_pairs_share_prompt_and_initial_noise():
    policy = tiny_policy_16px()
    method = SDPOMethod(Config(num_steps=3))
    budget = Budget(None)
    batch, info = method._sample_pairs(policy, CountingReward(), ["a red circle", "two blue squares"], 3,
                                       torch.Generator().manual_seed(0), budget)
    latents = batch.trajectory.latents  # (4, T+1, C, h, w)
    assert batch.trajectory.prompts[:2] == batch.trajectory.prompts[2:]
    assert torch.equal(latents[:2, 0], latents[2:, 0])
    assert not torch.allclose(latents[:2, 1], latents[2:, 1])
    assert info["rewards"].shape == (4, 3)
    assert budget.reward_calls == 3 * 4 and budget.sample_nfe == 4 * 3


def test_pair_loss_at_old_parameters_regresses_onto_the_advantage_gap():
    # At theta = theta_old every recomputed log-prob equals the sampled one (ratio 1), so the loss of a
    # micro-batch is mean(dA^2) with each pair's own advantages at its own step: checks the row bookkeeping.
    policy = tiny_policy_16px()
    method = SDPOMethod(Config(num_steps=3))
    gen = torch.Generator().manual_seed(1)
    batches = []
    for prompts in (["a red circle", "two blue squares"], ["three green triangles", "a red circle"]):
        batch, _ = method._sample_pairs(policy, CountingReward(), prompts, 3, gen, Budget(None))
        batch.advantages = torch.randn(4, 3, generator=gen)
        batches.append(batch)
    pairs, steps = [(0, 1), (1, 0), (0, 0), (1, 1)], torch.tensor([2, 0, 1, 2])
    value, info = method._pair_loss(policy, batches, pairs, steps)
    gaps = torch.stack([batches[b].advantages[p, k] - batches[b].advantages[p + 2, k]
                        for (b, p), k in zip(pairs, steps.tolist())])
    assert value.item() == pytest.approx((gaps ** 2).mean().item(), rel=1e-4)
    assert info["approx_kl"].item() < 1e-10


@pytest.mark.parametrize("guidance_scale", [None, 2.0])
def test_smoke_train_changes_adapters_and_counts_exactly(guidance_scale):
    policy = tiny_policy_16px(guidance_scale)
    npp = policy.nfe_per_predict
    assert npp == (2 if guidance_scale else 1)
    T, pairs = 3, 4
    config = Config(num_steps=T, pairs_per_epoch=pairs, sample_batch_size=2, train_batch_size=2,
                    gradient_accumulation_steps=2, stat_min_count=2, lr=1e-2, num_epochs=None)
    assert stochastic_steps(policy, T, 1.0, "ddim").all()  # final alpha = alphas_cumprod[0] < 1: all stochastic
    # Hand count per epoch: 2P = 8 trajectories x T steps sampled; each trained at all T steps; 3 rewards each.
    epoch_nfe = (8 * T + 8 * T) * npp
    budget = Budget(max_nfe=2 * epoch_nfe + epoch_nfe // 2)  # room for 2 epochs, not 3
    reward, tracker = CountingReward(), NullTracker()
    forwards = count_forwards(policy)
    before = policy.adapter_state_dict()

    SDPOMethod(config).train(policy, Task(prompts=["a red circle", "two blue squares", "three green triangles"],
                                    reward=reward, train_steps=1, seed=0), budget, tracker)

    assert budget.sample_nfe == 2 * 8 * T * npp
    assert budget.grad_nfe == 2 * 8 * T * npp
    assert budget.reward_calls == 2 * 8 * 3 == reward.images
    assert forwards["samples"] == budget.total_nfe
    after = policy.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert tracker.steps("train/loss") == [epoch_nfe, 2 * epoch_nfe]
    # Micro-batches per epoch: T columns x 2 micro-batches of 2 pairs; accumulation 2 -> 3 updates per epoch.
    assert tracker.series("train/updates") == [3.0, 3.0]
    assert all(torch.isfinite(torch.tensor(v)) for _, m in tracker.records for v in m.values())


def test_budget_smaller_than_an_epoch_is_an_error():
    policy = tiny_policy_16px()
    task = Task(prompts=["a red circle"], reward=CountingReward(), train_steps=2, seed=0)
    with pytest.raises(ValueError, match="smaller than one SDPO epoch"):
        SDPOMethod(Config(num_steps=None, pairs_per_epoch=2)).train(policy, task, Budget(max_nfe=10), NullTracker())


def test_train_last_step_false_never_trains_the_last_transition(monkeypatch):
    """train_last_step=False: the last transition (whose action no scored x0-prediction depends on) gets no log-prob
    recomputation, so no gradient; the epoch's gradient NFEs count T - 1 steps per trajectory. With one stochastic
    step only (T = 1) that step is still trained, as in DDPO."""
    from methods import sampling

    policy = tiny_policy_16px()
    T, pairs = 3, 4
    trained_steps = []
    original = sampling.transition_log_prob

    def spy(policy_, trajectory, k, **kw):
        trained_steps.append(int(k))
        return original(policy_, trajectory, k, **kw)

    monkeypatch.setattr(sampling, "transition_log_prob", spy)
    config = Config(num_steps=T, pairs_per_epoch=pairs, sample_batch_size=4, train_batch_size=2,
                    gradient_accumulation_steps=1, stat_min_count=2, lr=1e-2, num_epochs=1, train_last_step=False)
    budget = Budget(max_nfe=10_000)
    task = Task(prompts=["a red circle", "two blue squares"], reward=CountingReward(), train_steps=1, seed=0)
    SDPOMethod(config).train(policy, task, budget, NullTracker())
    assert set(trained_steps) == {0, 1} and T - 1 not in trained_steps
    assert budget.grad_nfe == 2 * pairs * (T - 1)
    assert SDPOMethod(config).epoch_cost(T, T - 1, 1)["grad_nfe"] == budget.grad_nfe

    trained_steps.clear()
    one = Budget(max_nfe=10_000)
    SDPOMethod(Config(num_steps=1, pairs_per_epoch=2, sample_batch_size=2, train_batch_size=2, num_epochs=1,
                train_last_step=False)).train(policy, task, one, NullTracker())
    assert set(trained_steps) == {0} and one.grad_nfe == 2 * 2


def test_trajectory_length_T_is_honoured_independently_of_K(monkeypatch):
    """SDPO trains on T-step trajectories whatever the cell's K: the sampler runs T steps, the lambda^i weights reach
    steps i >= K, and the NFEs are T's (a 6-step trajectory in a K = 2 cell). `sdpo_t_eq_k` follows K instead."""
    from methods import sdpo

    T, K, pairs = 6, 2, 2
    seen = {"steps": [], "shapes": []}
    original_loss, original_sample = sdpo.loss, sdpo.sampling.sample

    def loss_spy(*args, **kw):
        seen["steps"] += args[6].tolist()  # step_index: the i of lambda^i
        return original_loss(*args, **kw)

    def sample_spy(policy, prompts, num_steps, **kw):
        traj = original_sample(policy, prompts, num_steps, **kw)
        seen["shapes"].append(tuple(traj.log_probs.shape))
        return traj

    monkeypatch.setattr(sdpo, "loss", loss_spy)
    monkeypatch.setattr(sdpo.sampling, "sample", sample_spy)
    policy = tiny_policy_16px()
    config = Config(num_steps=T, pairs_per_epoch=pairs, sample_batch_size=2, train_batch_size=2, num_epochs=1,
                    stat_min_count=2, train_last_step=False)
    budget = Budget(max_nfe=10_000)
    SDPOMethod(config).train(policy, Task(prompts=["a red circle", "two blue squares"], reward=CountingReward(),
                                          train_steps=K, seed=0), budget, NullTracker())
    assert seen["shapes"] == [(2 * pairs, T)]
    assert set(seen["steps"]) == set(range(T - 1))  # every step but the last, far beyond K
    assert budget.sample_nfe == 2 * pairs * T and budget.grad_nfe == 2 * pairs * (T - 1)
    # the weight of step i is lambda^i: at theta = theta_old, dL/drho^a = -2 lam^i dA, here at step 4 > K
    _, grad_a, _, _ = _loss(0.0, 0.0, 1.0, step=4)
    assert grad_a == pytest.approx(-2 * 0.99 ** 4, rel=1e-5)

    toy = methods.make_config("sdpo", "toy")
    assert toy.num_steps >= 16  # the toy recipe's long T, whatever the grid's K
    assert methods.make_config("sdpo_t_eq_k", "toy").num_steps is None  # T = the cell's K
    assert methods.load("sdpo_t_eq_k").name == "sdpo_t_eq_k"
