"""Inference-time search: pure selection / neighbour functions, and the searches on a tiny toy policy."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import RedReward, tiny_policy

import methods
from methods import inference_scaling as its
from methods import sampling
from methods.common import Budget, NullTracker, Task
from tasks.toy.pipeline import build_scheduler

PROMPTS = ["a red circle", "two blue squares", "three green triangles", "a yellow square"]


# ---------------------------------------------------------------------------------------------- select_best
def test_select_best_argmax_and_lowest_index_wins_ties():
    assert its.select_best(torch.tensor([0.1, 0.5, 0.3])) == 1
    assert its.select_best(torch.tensor([0.5, 0.2, 0.5])) == 0  # tie with the base candidate: keep the base
    assert its.select_best(torch.tensor([0.2, 0.7, 0.7, 0.1])) == 1
    assert its.select_best(torch.tensor([-math.inf, -1.0])) == 1
    assert its.select_best(torch.tensor([3.0])) == 0
    batched = its.select_best(torch.tensor([[0.0, 1.0, 1.0], [2.0, 2.0, 2.0]]))
    assert batched.tolist() == [1, 0]


def test_select_best_rejects_nan_and_empty():
    with pytest.raises(ValueError, match="NaN"):
        its.select_best(torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError):
        its.select_best(torch.tensor([]))


def test_keep_better_only_replaces_on_strict_improvement():
    best_scores, best_images = torch.tensor([1.0, 1.0, 1.0]), torch.zeros(3, 1, 2, 2)
    scores, images = torch.tensor([0.5, 1.0, 1.5]), torch.ones(3, 1, 2, 2)
    new_scores, new_images, took = its.keep_better(best_scores, best_images, scores, images)
    assert took.tolist() == [False, False, True]
    assert new_scores.tolist() == [1.0, 1.0, 1.5]
    assert new_images[:, 0, 0, 0].tolist() == [0.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------------------- zo_neighbours
def test_zo_neighbours_hand_computed_in_two_dimensions():
    """z = (3, 4): u = (0.6, 0.8); the only unit directions orthogonal to u are +-(-0.8, 0.6), so every neighbour
    is 5 (0.95 u +- sqrt(1 - 0.95^2) (-0.8, 0.6)) = (2.85 -+ 1.248999, 3.8 +- 0.936750)."""
    z = torch.tensor([3.0, 4.0], dtype=torch.float64)
    out = its.zo_neighbours(z, 6, 0.95, torch.Generator().manual_seed(0))
    assert out.shape == (6, 2)
    s = 5 * math.sqrt(1 - 0.95**2)
    plus = torch.tensor([2.85 - 0.8 * s, 3.8 + 0.6 * s], dtype=torch.float64)
    minus = torch.tensor([2.85 + 0.8 * s, 3.8 - 0.6 * s], dtype=torch.float64)
    assert plus.tolist() == pytest.approx([1.601000, 4.736750], abs=1e-6)
    for row in out:
        assert torch.allclose(row, plus, atol=1e-12) or torch.allclose(row, minus, atol=1e-12)


def test_zo_neighbours_cosine_and_norm_on_a_latent():
    z = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(1))
    out = its.zo_neighbours(z, 4, 0.95, torch.Generator().manual_seed(2))
    assert out.shape == (4, 4, 16, 16) and out.dtype == z.dtype
    flat, pivot = out.reshape(4, -1).double(), z.reshape(-1).double()
    cos = flat @ pivot / (flat.norm(dim=1) * pivot.norm())
    assert torch.allclose(cos, torch.full((4,), 0.95, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(flat.norm(dim=1) / pivot.norm(), torch.ones(4, dtype=torch.float64), atol=1e-6)
    assert not torch.allclose(flat[0], flat[1])  # distinct directions


# ---------------------------------------------------------------------------------------------- the method
@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


@pytest.fixture(scope="module")
def noise(policy):
    return torch.randn(len(PROMPTS), *policy.latent_shape, generator=torch.Generator().manual_seed(7))


def test_best_of_four_picks_max_verifier_candidate_and_reports_4x_nfe(policy, noise):
    method = methods.load("inference_scaling", search="random", num_candidates=4)
    verifier = RedReward()
    method.set_verifier(verifier)
    budget = Budget(None)
    images, extra = method.generate(policy, PROMPTS, 2, noise=noise, budget=budget)

    # Rebuild the four candidates: 0 = the shared noise, then draws from the documented seed.
    gen = torch.Generator().manual_seed(its._noise_seed(noise, 0))
    candidates = [noise] + [torch.randn(noise.shape, generator=gen) for _ in range(3)]
    all_images = torch.stack([sampling.sample(policy, PROMPTS, 2, noise=z, eta=0.0).images for z in candidates], 1)
    scores = all_images[:, :, 0].mean(dim=(2, 3))  # (B, 4)
    pick = its.select_best(scores)
    assert pick.tolist() != [0, 0, 0, 0]  # the search changed something (this seed)
    assert torch.equal(images, all_images[torch.arange(len(PROMPTS)), pick])

    base_nfe = len(PROMPTS) * 2  # B x S x 1 NFE
    assert budget.sample_nfe == 4 * base_nfe and extra == 3 * base_nfe
    assert budget.reward_calls == 4 * len(PROMPTS) == verifier.calls
    assert method.last_info["search_nfe"] == 4 * base_nfe
    assert method.last_info["chosen_score"] == pytest.approx(float(scores.max(1).values.mean()))


def test_single_candidate_equals_base(policy, noise):
    method = methods.load("inference_scaling", num_candidates=1)
    images, extra = method.generate(policy, PROMPTS, 2, noise=noise, verifier=RedReward())
    base, base_extra = methods.load("base").generate(policy, PROMPTS, 2, noise=noise)
    assert extra == 0 == base_extra and torch.equal(images, base)


def test_zero_order_never_worse_than_base_and_counts_cost(policy, noise):
    method = methods.load("inference_scaling", search="zero_order", zo_rounds=2, zo_neighbours=2)
    budget = Budget(None)
    images, extra = method.generate(policy, PROMPTS, 1, noise=noise, budget=budget, verifier=RedReward())
    base = methods.load("base").generate(policy, PROMPTS, 1, noise=noise)[0]
    chosen, base_scores = images[:, 0].mean(dim=(1, 2)), base[:, 0].mean(dim=(1, 2))
    assert torch.all(chosen >= base_scores)
    # (1 pivot + 2 rounds x 2 neighbours) samples x B images x S=1 step.
    assert budget.sample_nfe == 5 * len(PROMPTS) and extra == 4 * len(PROMPTS)
    assert budget.reward_calls == 5 * len(PROMPTS)


def test_paths_cost_and_degenerate_cases(policy, noise):
    # S = 2, b = 1: per image N*S + N*(M-1)*(S-b) = 2*2 + 2*1*1 = 6 denoiser calls.
    method = methods.load("inference_scaling", search="paths", num_candidates=2, paths_branches=2)
    budget = Budget(None)
    images, extra = method.generate(policy, PROMPTS, 2, noise=noise, budget=budget, verifier=RedReward())
    base = methods.load("base").generate(policy, PROMPTS, 2, noise=noise)[0]
    assert budget.sample_nfe == 6 * len(PROMPTS) and extra == 4 * len(PROMPTS)
    assert budget.reward_calls == 4 * len(PROMPTS)
    assert torch.all(images[:, 0].mean(dim=(1, 2)) >= base[:, 0].mean(dim=(1, 2)))

    single = methods.load("inference_scaling", search="paths", num_candidates=1, paths_branches=1)
    assert torch.equal(single.generate(policy, PROMPTS, 2, noise=noise, verifier=RedReward())[0], base)

    # S = 1 has no intermediate level: best-of-(N x M) over initial noise, with a warning.
    with pytest.warns(UserWarning, match="degenerate at S=1"):
        images, extra = method.generate(policy, PROMPTS, 1, noise=noise, verifier=RedReward())
    expected = methods.load("inference_scaling", num_candidates=4).generate(policy, PROMPTS, 1, noise=noise,
                                                                             verifier=RedReward())
    assert torch.equal(images, expected[0]) and extra == expected[1] == 3 * len(PROMPTS)


def test_renoise_matches_forward_process():
    scheduler = build_scheduler()
    x0, eps = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0)
    abar = float(scheduler.alphas_cumprod[499])
    expected = math.sqrt(abar) + math.sqrt(1 - abar) * 2.0
    assert its.renoise("ddim", scheduler, x0, 499, eps).item() == pytest.approx(expected, rel=1e-6)
    assert its.renoise("euler_ancestral", scheduler, x0, 499, eps).item() == pytest.approx(
        1 + math.sqrt((1 - abar) / abar) * 2.0, rel=1e-6)


def test_verifier_resolution(policy, noise):
    method = methods.load("inference_scaling")
    with pytest.raises(ValueError, match="no verifier"):
        method.generate(policy, PROMPTS, 1, noise=noise)
    reward = RedReward()
    budget = Budget(100)
    method.train(policy, Task(PROMPTS, reward, 1, 0), budget, NullTracker())  # trains nothing
    assert method.verifier is reward and budget.total_nfe == 0
    method.generate(policy, PROMPTS, 1, noise=noise)
    assert reward.calls == 4 * len(PROMPTS)
    other = methods.load("inference_scaling", verifier="toy-mean3")
    other.train(policy, Task(PROMPTS, reward, 1, 0), budget, NullTracker())
    assert other.verifier is None  # a different configured verifier is not replaced by the training reward


def test_config_validation():
    with pytest.raises(ValueError, match="search"):
        methods.load("inference_scaling", search="beam")
    with pytest.raises(ValueError, match="zo_threshold"):
        methods.load("inference_scaling", zo_threshold=1.0)
    with pytest.raises(ValueError, match="paths_branch_step"):
        methods.load("inference_scaling", search="paths", paths_branch_step=2).generate(
            tiny_policy(), PROMPTS[:1], 2, noise=torch.zeros(1, 3, 32, 32), verifier=RedReward())
