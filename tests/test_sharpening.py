"""Diffusion-Sharpening: worked values of spec §4.4 (ddpo-sdpo-sharpening-search.md), gradient structure of the
SFT and RLHF losses, the path's timesteps, and smoke train() runs with exact NFE / reward-call accounting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import CountingReward, count_forwards, tiny_policy_16px

import methods
from methods import sampling
from methods.common import Budget, NullTracker, Task
from methods.sharpening import (
    Config,
    SharpeningMethod,
    add_noise,
    epsilon_from_output,
    loss,
    rlhf_loss,
    sft_loss,
)

# ------------------------------------------------------------------------------------------- pure losses

WORKED = dict(model=[0.1000, 0.1010], ref=[0.1002, 0.1004], rewards=[1.04, 1.00])  # copy 0 wins


def _rlhf(model, ref, rewards, beta=2500.0):
    model_losses = torch.tensor([model], dtype=torch.float64, requires_grad=True)
    rewards_t = torch.tensor([rewards], dtype=torch.float64, requires_grad=True)
    value, info = rlhf_loss(model_losses, torch.tensor([ref], dtype=torch.float64), rewards_t, beta)
    value.backward()
    return value.item(), model_losses.grad[0], rewards_t.grad, info


def test_rlhf_loss_worked_example():
    # spec §4.4: logits 8e-4, beta * logits = 2.0, R^w - R^l = 0.04 -> 0.126928 + 0.04 = 0.166928.
    value, _, _, info = _rlhf(**WORKED)
    assert value == pytest.approx(0.166928, abs=1e-6)
    assert info["logits"].item() == pytest.approx(8e-4, abs=1e-12)
    assert info["implicit_acc"].item() == 1.0
    # The same inner value as Diffusion-DPO's -log sigmoid(-0.5 beta' (model_diff - ref_diff)) with beta' = 5000.
    dpo = -F.logsigmoid(torch.tensor(-0.5 * 5000 * ((0.1000 - 0.1010) - (0.1002 - 0.1004)), dtype=torch.float64))
    assert value - 0.04 == pytest.approx(dpo.item(), abs=1e-9)


def test_rlhf_reward_gap_carries_no_gradient():
    _, grad, reward_grad, _ = _rlhf(**WORKED)
    assert reward_grad is None
    # Raising the reward gap shifts the value but leaves the gradient unchanged.
    value2, grad2, _, _ = _rlhf(WORKED["model"], WORKED["ref"], [1.54, 1.00])
    assert value2 == pytest.approx(0.166928 + 0.5, abs=1e-6)
    assert torch.equal(grad, grad2)


def test_rlhf_swapping_winner_and_loser_flips_the_gradient():
    _, grad, _, _ = _rlhf(**WORKED)
    # dL/dl^w = beta sigmoid(-beta logits) > 0 (lower the winner's loss), dL/dl^l the opposite.
    expected = 2500 * torch.sigmoid(torch.tensor(-2.0, dtype=torch.float64))
    assert grad[0].item() == pytest.approx(expected.item(), rel=1e-9)
    assert grad[1].item() == pytest.approx(-expected.item(), rel=1e-9)
    _, swapped, _, info = _rlhf(WORKED["model"], WORKED["ref"], [1.00, 1.04])
    assert info["logits"].item() == pytest.approx(-8e-4, abs=1e-12)
    assert swapped[0].item() < 0 < swapped[1].item()


def test_rlhf_ties_give_zero_gradient_and_worst_is_argmin():
    value, grad, _, info = _rlhf([0.1, 0.2, 0.3], [0.1, 0.1, 0.1], [0.5, 0.5, 0.5])
    assert value == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert torch.equal(grad, torch.zeros(3, dtype=torch.float64)) and info["tied"].item() == 1.0
    # n = 3: winner copy 2, loser copy 1; copy 0 gets no gradient.
    _, grad, _, _ = _rlhf([0.1, 0.2, 0.3], [0.1, 0.1, 0.1], [0.5, 0.1, 0.9])
    assert grad[0].item() == 0.0 and grad[2].item() > 0 > grad[1].item()


def test_sft_loss_trains_only_the_best_path():
    model_losses = torch.tensor([[0.3, 0.1, 0.2], [0.5, 0.6, 0.7]], requires_grad=True)
    rewards = torch.tensor([[0.2, 0.1, 0.9], [0.4, 0.4, 0.0]])  # bests: copy 2; tie -> first, copy 0
    value = sft_loss(model_losses, rewards)
    assert value.item() == pytest.approx((0.2 + 0.5) / 2)
    value.backward()
    assert torch.equal(model_losses.grad, torch.tensor([[0.0, 0.0, 0.5], [0.5, 0.0, 0.0]]))
    assert loss("sft", model_losses, rewards)[0].item() == pytest.approx(value.item())
    with pytest.raises(ValueError, match="ref_losses"):
        loss("rlhf", model_losses, rewards)


# ------------------------------------------------------------------------------------------- noise helpers


def test_add_noise_and_epsilon_match_the_scheduler():
    from diffusers import DDIMScheduler

    from tasks.toy.pipeline import build_scheduler

    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(2, 3, 4, 4, generator=gen) - 0.5, torch.randn(2, 3, 4, 4, generator=gen)
    for scheduler in (build_scheduler(), DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                       beta_end=0.012, clip_sample=False)):
        for t in (999, 499, 20):
            x_t = add_noise(scheduler, x0, eps, t)
            assert torch.allclose(x_t, scheduler.add_noise(x0, eps, torch.tensor([t, t])), atol=1e-5)
            # Feed the exact model output for (x0, eps): epsilon_from_output recovers eps, and sampling's
            # transition recovers x0 (x0 within the toy's clip range).
            if scheduler.config.prediction_type == "v_prediction":
                output = scheduler.get_velocity(x0, eps, torch.tensor([t, t]))
            else:
                output = eps
            assert torch.allclose(epsilon_from_output(scheduler, output, x_t, t), eps, atol=1e-4)
            _, _, x0_pred = sampling.transition("ddim", scheduler, output, x_t, t, t - 250, 0.0)
            assert torch.allclose(x0_pred, x0, atol=1e-3)


def test_path_timesteps_uniform_and_grid():
    from tasks.toy.pipeline import build_scheduler

    scheduler = build_scheduler()
    gen = torch.Generator().manual_seed(0)
    method = SharpeningMethod(Config(num_steps=25, trajectory_steps=3))
    for _ in range(50):
        path = method.path_timesteps(scheduler, 25, gen)
        t = path[0][0]
        assert len(path) == min(3, 1 + t // 40)
        for m, (t_m, t_prev) in enumerate(path):
            assert t_m == t - 40 * m and t_prev == (t_m - 40 if t_m >= 40 else -1)
    grid = SharpeningMethod(Config(num_steps=4, trajectory_steps=3, timestep_sampling="grid"))
    starts = {tuple(grid.path_timesteps(scheduler, 4, gen)) for _ in range(30)}
    assert starts == {((999, 749), (749, 499), (499, 249)), ((749, 499), (499, 249), (249, -1))}


def test_config_validation_and_registry():
    assert type(methods.load("sharpening")).__name__ == "SharpeningMethod"
    assert methods.load("sharpening", variant="sft").config.variant == "sft"
    with pytest.raises(ValueError, match="variant"):
        Config(variant="dpo")
    with pytest.raises(ValueError, match="num_samples"):
        Config(num_samples=1)
    assert set(Config.search_space()) <= set(Config.__dataclass_fields__)


def test_sft_variant_has_its_own_grid_entry():
    """method=sharpening_sft: the same algorithm with variant "sft" by default, its own registry name (so the grid and
    the report list the two variants as two rows) and a generated YAML carrying every field's documentation."""
    from bench import grid as grids
    from bench.conf.generate import method_yaml

    sft = methods.load("sharpening_sft", preset="toy")
    assert sft.name == "sharpening_sft" and sft.config.variant == "sft" and isinstance(sft, SharpeningMethod)
    assert methods.load("sharpening", preset="toy").config.variant == "rlhf"
    text = method_yaml("sharpening_sft")
    assert "variant: sft" in text and "num_samples: 3   # n: noisy copies per prompt" in text
    a = grids.compose(["method=sharpening_sft"])
    b = grids.compose(["method=sharpening", "method.variant=sft"])
    assert a["method"]["variant"] == b["method"]["variant"] == "sft"
    assert grids.cell_run_name(a).startswith("sharpening_sft/") and grids.cell_run_name(b).startswith("sharpening/")


def test_method_protocol_documented_fields_and_toy_preset():
    import dataclasses
    import inspect

    method = methods.load("sharpening", preset="toy")
    assert isinstance(method, methods.Method) and method.name == "sharpening"
    lines = inspect.getsource(Config).splitlines()
    for field in dataclasses.fields(Config):
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{field.name}:"))
        assert lines[at + 1].strip().startswith('"""'), f"{field.name} has no docstring"


# ------------------------------------------------------------------------------------------- smoke training

PROMPTS = ["a red circle", "two blue squares", "three green triangles"]


@pytest.mark.parametrize("variant,reference_on_path", [("rlhf", False), ("rlhf", True), ("sft", False)])
def test_smoke_train_changes_adapters_and_counts_exactly(variant, reference_on_path):
    policy = tiny_policy_16px()
    n, m, N, prompts_per_update = 2, 2, 4, 2
    config = Config(variant=variant, num_samples=n, trajectory_steps=m, num_steps=N, start_steps=N,
                    timestep_sampling="grid", reference_on_path=reference_on_path, batch_size=prompts_per_update,
                    lr=1e-2, optimizer="adam", adam_beta1=0.9, max_updates=2 if variant == "sft" else None,
                    sft_start_candidates=1)
    # Hand count per prompt (grid sampling: every path has M = m steps; no CFG so 1 NFE per forward):
    generated = N * (n if variant == "rlhf" else 1)             # start images at N steps
    reference = 0 if variant == "sft" else n * (m if reference_on_path else 1)
    per_prompt = {"sample": generated + reference, "grad": n * m, "reward": n * m}
    per_update = prompts_per_update * (per_prompt["sample"] + per_prompt["grad"])
    budget = Budget(max_nfe=2 * per_update + per_update // 2)  # 2 updates fit, a third does not
    reward, tracker = CountingReward(), NullTracker()
    forwards = count_forwards(policy)
    before = policy.adapter_state_dict()

    SharpeningMethod(config).train(policy, Task(prompts=PROMPTS, reward=reward, train_steps=N, seed=0), budget, tracker)

    prompts_seen = 2 * prompts_per_update
    if variant == "sft":  # SFT's start image is drawn once per distinct prompt (replay the method's prompt picks)
        from methods.common import generator

        g = generator(0)
        picks = [torch.randint(len(PROMPTS), (prompts_per_update,), generator=g).tolist() for _ in range(2)]
        firsts = [len(set(picks[0])), len(set(picks[0] + picks[1])) - len(set(picks[0]))]
        assert budget.sample_nfe == N * sum(firsts) < prompts_seen * per_prompt["sample"]
        steps = [firsts[0] * N + per_update - prompts_per_update * N, None]
        steps[1] = steps[0] + firsts[1] * N + per_update - prompts_per_update * N
    else:
        assert budget.sample_nfe == prompts_seen * per_prompt["sample"]
        steps = [per_update, 2 * per_update]
    assert budget.grad_nfe == prompts_seen * per_prompt["grad"]
    assert budget.reward_calls == prompts_seen * per_prompt["reward"] == reward.images
    assert forwards["samples"] == budget.total_nfe
    after = policy.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert tracker.steps("train/loss") == steps
    assert tracker.series("train/path_length") == [float(m)] * 2
    assert all(torch.isfinite(torch.tensor(v)) for _, rec in tracker.records for v in rec.values())


def test_sft_start_image_is_the_reward_best_of_its_candidates_drawn_once():
    """SFT without a dataset: a prompt's start image is the reward-best of sft_start_candidates initial-model samples
    (c x start_steps NFEs and c reward calls the first time), then reused with no further sampling."""
    policy = tiny_policy_16px()
    c, start_steps = 3, 2
    method = SharpeningMethod(Config(variant="sft", num_samples=2, trajectory_steps=1, num_steps=4,
                                     start_steps=start_steps, sft_start_candidates=c, timestep_sampling="grid"))
    seen = []

    def reward(images, prompts):
        seen.append(images.detach().clone())
        return images.float().mean(dim=(1, 2, 3))

    start_set, budget, gen = {}, Budget(None), torch.Generator().manual_seed(0)
    path = method.path_timesteps(policy.scheduler_for("ddim"), 4, gen)
    method._prompt_terms(policy, reward, "a red circle", start_steps, path, gen, budget, None, start_set)
    candidates = seen[0]
    assert candidates.shape[0] == c
    best = int(candidates.mean(dim=(1, 2, 3)).argmax())
    assert torch.allclose(policy.decode(start_set["a red circle"])[0], candidates[best])
    assert budget.sample_nfe == c * start_steps and budget.reward_calls == c + 2 * len(path)
    method._prompt_terms(policy, reward, "a red circle", start_steps, path, gen, budget, None, start_set)
    assert budget.sample_nfe == c * start_steps and budget.reward_calls == c + 2 * 2 * len(path)
    assert method.prompt_cost(1, start_steps, 1) == {"sample_nfe": c * start_steps, "grad_nfe": 2, "reward_calls": 2 + c}


def test_toy_preset_places_paths_as_the_released_code():
    """The toy recipe's paths: a 25-step grid (stride 40), a start t ~ U{0..999}, M = min(3, 1 + t // 40)."""
    cfg = methods.make_config("sharpening", "toy")
    assert (cfg.num_steps, cfg.timestep_sampling, cfg.trajectory_steps) == (25, "uniform", 3)
    assert methods.make_config("sharpening_sft", "toy").num_steps == 25
    method = SharpeningMethod(cfg)
    gen = torch.Generator().manual_seed(0)
    scheduler = tiny_policy_16px().scheduler_for("ddim")
    starts = []
    for _ in range(200):
        path = method.path_timesteps(scheduler, 25, gen)
        t = path[0][0]
        starts.append(t)
        assert len(path) == min(3, 1 + t // 40) and [s for s, _ in path] == [t - 40 * i for i in range(len(path))]
    assert min(starts) < 250 and max(starts) > 750  # uniform over the schedule, not the K-step grid


def test_sft_on_dataset_images_generates_nothing_and_denoises_the_dataset_image(tmp_path, monkeypatch):
    """variant sft with a preference dataset: x0 is a winner image of the prompt (VAE-encoded), no start image is
    generated (0 sampling NFEs), and a dataset missing a training prompt is refused before any compute."""
    from tasks.toy import preferences

    policy = tiny_policy_16px()
    out = tmp_path / "prefs"
    preferences.main([str(out), "--pairs-per-prompt", "2", "--split", "train"])
    from tasks import prompts as prompt_sets

    prompts = prompt_sets.load("toy").train[:2]  # the dataset covers the train split, whatever the world holds
    config = Config(variant="sft", num_samples=2, trajectory_steps=2, num_steps=4, timestep_sampling="grid",
                    batch_size=2, lr=1e-2, optimizer="adam", max_updates=None, dataset=str(out))
    method = SharpeningMethod(config)
    encoded = []
    original = policy.encode_images
    monkeypatch.setattr(policy, "encode_images", lambda images, **kw: encoded.append(images) or original(images))
    budget = Budget(max_nfe=2 * 2 * (2 * 2))  # 2 updates of 2 prompts x (n=2 copies x m=2 grad NFEs), no sampling
    SharpeningMethod(config).train(policy, Task(prompts=prompts, reward=CountingReward(), train_steps=4, seed=0), budget,
                             NullTracker())
    assert budget.sample_nfe == 0 and budget.grad_nfe == 16 and len(encoded) == 4
    assert all(images.shape == (1, 3, 16, 16) for images in encoded)
    with pytest.raises(ValueError, match="no image of 1 training prompt"):
        method.train(policy, Task(prompts=["a purple hexagon"] + prompts, reward=CountingReward(), train_steps=4,
                                  seed=0), Budget(max_nfe=100), NullTracker())
    with pytest.raises(ValueError, match="sft variant only"):
        Config(variant="rlhf", dataset=str(out))


def test_uniform_sampling_never_overspends():
    policy = tiny_policy_16px()
    config = Config(num_samples=2, trajectory_steps=3, num_steps=4, start_steps=4, batch_size=1, max_updates=None)
    worst = SharpeningMethod(config).prompt_cost(3, 4, 1)
    budget = Budget(max_nfe=3 * (worst["sample_nfe"] + worst["grad_nfe"]))
    tracker = NullTracker()
    SharpeningMethod(config).train(policy, Task(prompts=PROMPTS, reward=CountingReward(), train_steps=4, seed=1),
                             budget, tracker)
    assert budget.total_nfe <= budget.max_nfe
    assert len(tracker.records) >= 3  # shorter paths leave room for more updates
    lengths = tracker.series("train/path_length")
    assert set(lengths) <= {1.0, 2.0, 3.0}
