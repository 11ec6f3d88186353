"""Diffusion-Sharpening's denoising loss in epsilon space (the spec) and in the model's native parameterisation."""

import pytest
import torch

from methods.sharpening import Config, add_noise


def test_native_loss_is_the_epsilon_loss_on_an_epsilon_model():
    from diffusers import DDIMScheduler

    from methods.sharpening import denoising_loss

    scheduler = DDIMScheduler(prediction_type="epsilon", beta_schedule="scaled_linear")
    gen = torch.Generator().manual_seed(0)
    x0, eps, out, x_t = (torch.randn((2, 3, 4, 4), generator=gen) for _ in range(4))  # x_t off any q(x_t | x0)
    for t in (999, 500, 1):
        native = denoising_loss(scheduler, out, x_t, t, x0, eps, "native")
        assert torch.allclose(native, denoising_loss(scheduler, out, x_t, t, x0, eps, "epsilon"))
        assert torch.allclose(native, ((out - eps) ** 2).flatten(1).mean(1))


def test_native_loss_on_a_v_model_is_the_v_error_and_epsilon_weights_it_by_abar():
    from methods.sharpening import denoising_loss
    from tasks.toy.pipeline import build_scheduler

    scheduler = build_scheduler()  # the toy world's: v-prediction, cosine schedule
    assert scheduler.config.prediction_type == "v_prediction"
    # One element by hand at t = 499: abar = 0.49384, x0 = 0.5, eps = -1, output 0.3.
    # v = sqrt(abar) eps - sqrt(1 - abar) x0 = -0.70274 - 0.35572 = -1.05846; native = (0.3 + 1.05846)^2 = 1.84542.
    abar = float(scheduler.alphas_cumprod[499])
    assert abar == pytest.approx(0.49384, abs=1e-5)
    x0, eps, out = torch.tensor([[[[0.5]]]]), torch.tensor([[[[-1.0]]]]), torch.tensor([[[[0.3]]]])
    x_t = add_noise(scheduler, x0, eps, 499)
    assert denoising_loss(scheduler, out, x_t, 499, x0, eps, "native").item() == pytest.approx(1.84542, abs=1e-4)
    # On the path's first latent, eps_hat - eps = sqrt(abar) (v_hat - v): the epsilon loss is abar x native, so at
    # t = 999 (abar = 2.4e-9) a path's first step has no loss term of its own in epsilon space.
    gen = torch.Generator().manual_seed(1)
    x0, eps, out = (torch.randn((2, 3, 4, 4), generator=gen) for _ in range(3))
    for t in (999, 749, 249):
        x_t = add_noise(scheduler, x0, eps, t)
        native = denoising_loss(scheduler, out, x_t, t, x0, eps, "native")
        epsilon = denoising_loss(scheduler, out, x_t, t, x0, eps, "epsilon")
        assert torch.allclose(epsilon, float(scheduler.alphas_cumprod[t]) * native, rtol=1e-3)
    assert float(scheduler.alphas_cumprod[999]) < 1e-8


def test_bad_loss_space_names_the_choices():
    with pytest.raises(ValueError, match="loss_space.*'epsilon'.*'native'.*'nope'"):
        Config(loss_space="nope")


def test_prompt_terms_take_the_loss_in_the_configured_space():
    """The method's path losses follow Config.loss_space: on the first step of a path from t = 999 of the toy
    v-model, the epsilon loss of each copy is abar_999 x its native loss (same prompt, noise and start images)."""
    from helpers import CountingReward, tiny_policy_16px

    from methods.common import Budget
    from methods.sharpening import SharpeningMethod

    losses = {}
    for space in ("epsilon", "native"):
        policy = tiny_policy_16px()
        method = SharpeningMethod(Config(variant="rlhf", loss_space=space, num_steps=4, timestep_sampling="grid"))
        terms = method._prompt_terms(policy, CountingReward(), "a red circle", 4, [(999, 749)],
                                     torch.Generator().manual_seed(0), Budget(max_nfe=10**6))
        losses[space] = terms["model_losses"].detach()
        assert torch.allclose(terms["ref_losses"], losses[space])  # theta = theta_ref before any update
    abar = float(policy.scheduler_for("ddim").alphas_cumprod[999])
    assert torch.allclose(losses["epsilon"], abar * losses["native"], rtol=1e-3)
    assert (losses["native"] > 1e6 * losses["epsilon"]).all()
