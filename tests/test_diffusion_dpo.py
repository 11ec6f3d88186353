"""Diffusion-DPO: the loss on the spec's §2.2 worked values, the shared pair sources (methods.preference_data),
the toy preference dataset writer (tasks.toy.preferences), and short online/offline train() runs on a tiny toy
policy with hand-computed NFE accounting."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import RedReward, changed, tiny_policy

import methods
from methods import diffusion_dpo, sampling
from methods.common import Budget, NullTracker, Task
from methods.preference_data import OfflineDatasetPairs, draw_timesteps, form_pairs, own_noise
from tasks.toy import preferences, verify

PROMPTS = ["a red circle", "two blue squares"]


# ---------------------------------------------------------------------------------------------- pure loss
@pytest.mark.parametrize(
    "e_theta_w, e_theta_l, beta, expected",
    [(0.1000, 0.1000, 5000.0, 0.693147), (0.0990, 0.1005, 5000.0, 0.023245), (0.1010, 0.0990, 5000.0, 5.006715),
     (0.0990, 0.1005, 2500.0, 0.142675)],
)
def test_loss_worked_values(e_theta_w, e_theta_l, beta, expected):
    """Spec §2.2: reference errors 0.1 for both members."""
    f = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    value, inside = diffusion_dpo.loss(f(e_theta_w), f(e_theta_l), f(0.1), f(0.1), beta)
    assert value.item() == pytest.approx(expected, abs=1e-6)
    assert inside.item() == pytest.approx(-0.5 * beta * (e_theta_w - e_theta_l), abs=1e-9)


def test_loss_at_reference_swap_and_gradient():
    e = torch.tensor([0.1, 0.2], dtype=torch.float64)
    value, inside = diffusion_dpo.loss(e, e.flip(0), e, e.flip(0), 5000.0)
    assert value.item() == pytest.approx(math.log(2), abs=1e-12) and diffusion_dpo.implicit_accuracy(inside) == 0.5
    # swapping winner and loser flips the margin
    win, lose = torch.tensor([0.0990]), torch.tensor([0.1005])
    ref = torch.tensor([0.1])
    _, inside = diffusion_dpo.loss(win, lose, ref, ref, 5000.0)
    _, swapped = diffusion_dpo.loss(lose, win, ref, ref, 5000.0)
    assert swapped.item() == pytest.approx(-inside.item())
    # d loss / d e_theta^w = +0.5 beta sigma(-inside): +-1250 at theta = ref, beta 5000
    ew, el = ref.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    diffusion_dpo.loss(ew, el, ref, ref, 5000.0)[0].backward()
    assert ew.grad.item() == pytest.approx(1250.0) and el.grad.item() == pytest.approx(-1250.0)


def test_several_timesteps_average_inside_the_sigmoid():
    win = torch.tensor([[0.099, 0.101, 0.100]])
    lose = torch.tensor([[0.1005, 0.0995, 0.1]])
    ref = torch.full((1, 3), 0.1)
    value, inside = diffusion_dpo.loss(win, lose, ref, ref, 5000.0)
    expected, _ = diffusion_dpo.loss(win.mean(1), lose.mean(1), ref.mean(1), ref.mean(1), 5000.0)
    assert value.item() == pytest.approx(expected.item(), abs=1e-6) and inside.shape == (1,)


# ---------------------------------------------------------------------------------------------- pair sources
def test_form_pairs():
    rewards, groups = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 1, 1])
    win, lose = form_pairs(rewards, groups)
    assert win.tolist() == [0, 3] and lose.tolist() == [1, 2]
    win, lose = form_pairs(torch.tensor([0.2, 0.9, 0.5, 0.5, 0.5, 0.5]), torch.tensor([0, 0, 0, 1, 1, 1]),
                           pairing="best_worst")
    assert win.tolist() == [1] and lose.tolist() == [0]
    win, lose = form_pairs(torch.tensor([0.5, 0.5]), torch.tensor([0, 0]), pairing="best_worst", ties="second_wins")
    assert win.tolist() == [1] and lose.tolist() == [0]
    assert form_pairs(torch.tensor([0.5, 0.6]), torch.tensor([0, 0]), min_gap=0.2)[0].numel() == 0


def test_grid_timesteps_without_replacement_cover_the_grid():
    grid = torch.tensor([999, 749, 499, 249])
    t = draw_timesteps("grid", grid, 1000, (5, 4), torch.Generator().manual_seed(0))
    assert all(sorted(row) == [249, 499, 749, 999] for row in t.tolist())
    u = draw_timesteps("uniform", grid, 1000, (3, 2), torch.Generator().manual_seed(0))
    assert u.shape == (3, 2) and int(u.max()) < 1000


@pytest.mark.parametrize("layout", ["folder", "parquet"])
def test_toy_preference_dataset_round_trip(tmp_path, layout):
    path = preferences.write_dataset(tmp_path / "prefs", split="train", pairs_per_prompt=1, layout=layout)
    data = OfflineDatasetPairs(path, resolution=32)
    n = len(zoo_prompts := preferences.all_prompts("train"))
    assert len(data) == n and data.prompts == zoo_prompts
    prompts, win, lose = data.batch([0, 1, 2])
    assert win.shape == (3, 3, 32, 32) and float(win.min()) >= 0 and float(win.max()) <= 1
    # every label is what the verifier says: winner strictly better on mean3 (PNG round trip included)
    s_w, s_l = verify.score(win, prompts)["mean3"], verify.score(lose, prompts)["mean3"]
    assert bool((s_w > s_l).all())


def test_perturb_changes_exactly_one_attribute():
    rng = np.random.default_rng(0)
    for prompt in ["a red circle", "three blue squares", "a red circle and a blue square"]:
        for _ in range(5):
            new = preferences.perturb(prompt, rng)
            a, b = preferences.parse_prompt(prompt), preferences.parse_prompt(new)
            diffs = sum((x.color != y.color) + (x.shape != y.shape) + (x.count != y.count) for x, y in zip(a, b))
            assert diffs == 1 and len(a) == len(b)


def test_raw_pickapic_columns_drop_ties_and_put_the_winner_first(tmp_path):
    import io

    from PIL import Image

    def png(value):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    frame = pd.DataFrame({"caption": ["a", "b", "c"], "jpg_0": [png(10), png(20), png(30)],
                          "jpg_1": [png(11), png(21), png(31)], "label_0": [1.0, 0.0, 0.5]})
    frame.to_parquet(tmp_path / "train-0.parquet")
    data = OfflineDatasetPairs(tmp_path, resolution=4)
    prompts, win, _ = data.batch([0, 1])
    assert prompts == ["a", "b"] and len(data) == 2  # the tie (label 0.5) is dropped
    assert round(float(win[0].mean()) * 255) == 10 and round(float(win[1].mean()) * 255) == 21  # label_0 = 0: jpg_1 won
    assert win.shape == (2, 3, 4, 4)


# ---------------------------------------------------------------------------------------------- tiny policy
def test_own_noise_is_the_sampling_noise():
    policy = tiny_policy()
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    traj = sampling.sample(policy, PROMPTS, 2, noise=noise, eta=0.0)
    assert torch.equal(own_noise(traj, policy), noise)


@pytest.mark.parametrize("noise, timesteps_per_pair", [("fresh", 1), ("own", 2)])
def test_online_smoke_budget_and_adapters(noise, timesteps_per_pair):
    policy = tiny_policy()
    before = policy.adapter_state_dict()
    method = methods.load("diffusion_dpo_online", prompts_per_round=2, samples_per_prompt=2, pairs_per_update=2,
                          updates_per_round=1, lr=1e-2, noise=noise, timesteps_per_pair=timesteps_per_pair)
    assert isinstance(method, diffusion_dpo.DiffusionDPOOnlineMethod) and method.config.source == "online"
    # hand count: a round samples 2 prompts x 2 images x K=2 steps = 8 NFEs and makes 4 reward calls; an update
    # runs winner + loser through policy and reference at every timestep: 4 x 2 pairs x T NFEs.
    update = 4 * 2 * timesteps_per_pair
    budget = Budget(max_nfe=2 * (8 + update) + 3)
    tracker = NullTracker()
    method.train(policy, Task(PROMPTS, RedReward(), train_steps=2, seed=0), budget, tracker)
    assert (budget.sample_nfe, budget.grad_nfe, budget.reward_calls) == (16, 2 * update, 8)
    assert changed(policy, before)
    # theta = reference at the first update (LoRA B = 0): the loss is exactly ln 2
    assert tracker.series("train/loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    assert tracker.series("train/implicit_acc")[0] == 0.5
    assert tracker.steps("train/loss") == [8 + update, 2 * (8 + update)]


def test_offline_smoke_budget(tmp_path):
    path = preferences.write_dataset(tmp_path / "prefs", split="train", pairs_per_prompt=1)
    policy = tiny_policy()
    before = policy.adapter_state_dict()
    method = methods.load("diffusion_dpo", source="offline", dataset=str(path), pairs_per_update=2, lr=1e-2)
    budget = Budget(max_nfe=3 * 8 + 7)  # update = 4 x 2 pairs x 1 timestep = 8 NFEs; no sampling, no reward calls
    method.train(policy, Task(PROMPTS, RedReward(), train_steps=4, seed=0), budget, NullTracker())
    assert (budget.sample_nfe, budget.grad_nfe, budget.reward_calls) == (0, 24, 0)
    assert changed(policy, before)


def test_config_errors():
    with pytest.raises(ValueError, match="base_samples_per_prompt"):
        methods.load("diffusion_dpo", base_samples_per_prompt=1)
    with pytest.raises(ValueError, match="own"):
        methods.load("diffusion_dpo", source="offline", dataset="x", noise="own")
    with pytest.raises(ValueError, match="betta"):
        methods.load("diffusion_dpo", betta=1.0)
    space = diffusion_dpo.Config.search_space()
    assert {"lr", "beta"} <= set(space)


def test_max_updates_and_unlimited_budget():
    policy = tiny_policy()
    method = methods.load("diffusion_dpo_online", prompts_per_round=2, samples_per_prompt=2, pairs_per_update=2,
                          updates_per_round=3, max_updates=2)
    budget = Budget(max_nfe=None)
    method.train(policy, Task(PROMPTS, RedReward(), train_steps=2, seed=0), budget, NullTracker())
    assert (budget.sample_nfe, budget.grad_nfe) == (8, 16)  # one round, stopped after 2 of its 3 updates
    with pytest.raises(ValueError, match="max_updates"):
        methods.load("diffusion_dpo").train(policy, Task(PROMPTS, RedReward(), 2, 0), Budget(None), NullTracker())


class _Index:
    """A reward that reads which sample it is from the prompt order: a different value for every image (no ties)."""

    name = "index"

    def __call__(self, images, prompts):
        return images.flatten(1).mean(dim=1)


def test_offline_default_is_the_paper_base_sample_set_with_its_source_and_cost():
    """The default diffusion_dpo row is offline: a fixed set of base-model samples labelled by the reward, built once
    (its cost on the budget, its source handed to the tracker); then only updates, no more sampling."""
    from methods.preference_data import BaseSamplePreferences

    policy = tiny_policy()
    method = methods.load("diffusion_dpo", base_samples_per_prompt=3, pairs_per_update=2, lr=1e-2)
    assert method.config.source == "offline" and method.config.dataset is None
    assert method.config.noise == "fresh" and method.config.timesteps_per_pair == 1
    K, build = 2, len(PROMPTS) * 3 * 2  # 2 prompts x 3 samples x K steps
    budget = Budget(max_nfe=build + 2 * 8 + 5)  # then two updates of 4 x 2 pairs x 1 timestep
    tracker = NullTracker()
    method.train(policy, Task(PROMPTS, _Index(), train_steps=K, seed=0), budget, tracker)
    assert (budget.sample_nfe, budget.grad_nfe, budget.reward_calls) == (build, 16, 6)
    source = tracker.texts["diffusion_dpo/pairs_source.json"]
    assert "base samples: 3 per prompt x 2 training prompts" in source and "'index'" in source
    assert tracker.series("train/offline_pairs") == [6.0]  # 3 distinct rewards per prompt: 3 ordered pairs each

    data = BaseSamplePreferences(per_prompt=3, num_steps=K).build(policy, PROMPTS, _Index(), Budget(None),
                                                                  torch.Generator().manual_seed(0))
    prompts = data.row_prompts
    assert all(prompts[w] == prompts[lo] for w, lo in zip(data.win.tolist(), data.lose.tolist()))
    assert bool((data.rewards[data.win] > data.rewards[data.lose]).all())


def test_winner_and_loser_share_the_noise_and_the_timestep(monkeypatch):
    """The paper's pairing: one fresh eps and one t per pair, the same for winner and loser (rows [w; l] of the one
    batched denoiser call), for the policy and for the reference."""
    calls = []
    original = diffusion_dpo.denoising_errors

    def spy(policy, x0, eps, t, cond):
        calls.append((x0.detach().clone(), eps.detach().clone(), t.detach().clone()))
        return original(policy, x0, eps, t, cond)

    monkeypatch.setattr(diffusion_dpo, "denoising_errors", spy)
    policy = tiny_policy()
    method = methods.load("diffusion_dpo", base_samples_per_prompt=3, pairs_per_update=4, lr=1e-2, max_updates=1)
    method.train(policy, Task(PROMPTS, _Index(), train_steps=4, seed=0), Budget(None), NullTracker())
    assert len(calls) == 2  # policy and reference, one update
    (x0, eps, t), (x0_ref, eps_ref, t_ref) = calls
    n = x0.shape[0] // 2
    assert n == 4  # 4 pairs x 1 timestep each
    assert torch.equal(eps[:n], eps[n:]) and torch.equal(t[:n], t[n:])
    assert not torch.equal(x0[:n], x0[n:])  # different images, same noise
    assert len(set(t[:n].tolist())) > 1 or n == 1  # t drawn per pair, not once per batch
    assert torch.equal(eps, eps_ref) and torch.equal(t, t_ref) and torch.equal(x0, x0_ref)
