"""methods.sampling's "flow_euler" kernel: the pipelines' grids, eta 0 = FluxPipeline / StableDiffusion3Pipeline on
tiny random-weight models, the Flow-GRPO and DanceGRPO SDE steps' worked values and exact log-probs."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from methods import sampling
from methods.policy import Policy
from tasks import models as zoo
from tasks.tiny_flow import build_tiny_flux, build_tiny_sd3

PROMPTS = ["a red cat", "two blue squares", "a photo of a fox"]
PIPE_ARGS = dict(height=32, width=32, max_sequence_length=16, output_type="latent")


@pytest.fixture(scope="module")
def flux():
    return build_tiny_flux(), Policy(build_tiny_flux(), zoo.get("flux-schnell"))


@pytest.fixture(scope="module")
def sd3():
    return build_tiny_sd3(), Policy(build_tiny_sd3(), zoo.get("sd35-large-turbo"))


def pipe_latents(pipe, steps, **kw):
    out = pipe(PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **PIPE_ARGS, **kw)
    latents = out.images
    return type(pipe)._unpack_latents(latents, 32, 32, 2) if latents.ndim == 3 else latents


def decode_like_pipeline(pipe, latents):
    vae = pipe.vae
    image = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pt")


# ------------------------------------------------------------------------------------------------ grids
def test_grids_are_the_pipelines():
    """SD3: the scheduler's own linspace shifted by 3 (twice, as diffusers builds its table and then its grid);
    FLUX.1-schnell: linspace(1, 1/N, N) unshifted; FLUX.1-dev: mu from 64 image tokens, exponential time shift."""
    def shift(s, k=3.0):
        return k * s / (1 + (k - 1) * s)

    sd3 = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    for n in (1, 2, 4):
        expected = [shift(1 + (shift(1e-3) - 1) * i / max(n - 1, 1)) for i in range(n)] + [0.0]
        assert sampling.flow_sigmas(sd3, n).tolist() == pytest.approx(expected, abs=1e-6)
    timesteps, prev = sampling.timestep_grid(sd3, 4, "flow_euler")
    assert timesteps.dtype == torch.float32 and prev[-1].item() == 0.0 and torch.equal(prev[:-1], timesteps[1:])

    schnell = build_tiny_flux().scheduler
    sampling.set_flow_grid(schnell, linear_sigmas=True, image_seq_len=64)
    assert sampling.timestep_grid(schnell, 4, "flow_euler")[0].tolist() == [1000.0, 750.0, 500.0, 250.0]

    dev = build_tiny_flux(dynamic_shifting=True).scheduler
    with pytest.raises(ValueError, match="use_dynamic_shifting=True.*set_flow_grid"):
        sampling.flow_sigmas(dev, 2)
    sampling.set_flow_grid(dev, linear_sigmas=True, image_seq_len=64)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (64 - 256)
    expected = [math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in (1.0, 0.75, 0.5, 0.25)] + [0.0]
    assert sampling.flow_sigmas(dev, 4).tolist() == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------ equality with pipelines
@pytest.mark.parametrize("steps", [1, 4])
def test_eta_zero_reproduces_flux_schnell_pipeline(flux, steps):
    pipe, policy = flux
    expected = pipe_latents(pipe, steps, guidance_scale=0.0)
    traj = sampling.sample(policy, PROMPTS, steps, generator=torch.Generator().manual_seed(0), eta=0.0)
    assert traj.kernel == "flow_euler" and traj.latents.shape == (3, steps + 1, 4, 16, 16)
    assert torch.equal(traj.final_latents, expected)  # the same initial noise and the scheduler's own Euler step
    assert torch.allclose(traj.images, decode_like_pipeline(pipe, expected), atol=1e-5)
    assert traj.nfe == steps and not traj.stochastic.any() and torch.isnan(traj.log_probs).all()
    # x0_hat = x - s v: at s = 1 the one Euler step lands exactly on it.
    assert torch.allclose(traj.x0_preds[:, 0], traj.latents[:, 1] if steps == 1 else traj.x0_preds[:, 0], atol=1e-6)
    if steps == 1:
        assert torch.allclose(traj.x0_preds[:, 0], traj.final_latents, atol=1e-6)


def test_eta_zero_reproduces_flux_dev_like_pipeline_with_guidance_input():
    """Guidance-distilled FLUX: guidance is a transformer input (one forward per step, no CFG); dynamic shifting."""
    pipe = build_tiny_flux(guidance_embeds=True, dynamic_shifting=True)
    spec = zoo.get("flux-schnell")
    policy = Policy(build_tiny_flux(guidance_embeds=True, dynamic_shifting=True), spec, guidance_scale=3.5)
    expected = pipe_latents(pipe, 2, guidance_scale=3.5)
    traj = sampling.sample(policy, PROMPTS, 2, generator=torch.Generator().manual_seed(0), eta=0.0)
    assert policy.nfe_per_predict == 1 and traj.nfe == 2
    assert torch.equal(traj.final_latents, expected)
    other = pipe_latents(pipe, 2, guidance_scale=1.0)
    assert (other - expected).abs().max() > 1e-4  # the guidance input matters


def test_eta_zero_reproduces_sd35_turbo_pipeline(sd3):
    pipe, policy = sd3
    expected = pipe_latents(pipe, 4, guidance_scale=0.0)
    traj = sampling.sample(policy, PROMPTS, 4, generator=torch.Generator().manual_seed(0), eta=0.0)
    assert torch.equal(traj.final_latents, expected)
    assert torch.allclose(traj.images, decode_like_pipeline(pipe, expected), atol=1e-5)
    assert traj.timesteps.tolist() == pytest.approx([1000.0, 857.6923, 602.1506, 8.9286], abs=1e-3)


# ------------------------------------------------------------------------------------------------ the SDE step
def test_sde_step_worked_values():
    """Flow-GRPO: sigma_t = eta sqrt(s / (1 - s)) (its s = 1 denominator at the next sigma); DanceGRPO: sigma_t = eta;
    mean = x (1 + sigma_t^2 dt / (2 s)) + v (1 + sigma_t^2 (1 - s) / (2 s)) dt, std = sigma_t sqrt(-dt)."""
    sched = FlowMatchEulerDiscreteScheduler()
    x, v = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 0.5)
    mean, std, x0 = sampling.transition("flow_euler", sched, v, x, 500.0, 250.0, 0.7)
    assert mean.item() == pytest.approx(0.721875, abs=1e-6) and float(std) == pytest.approx(0.35, abs=1e-7)
    assert x0.item() == pytest.approx(0.75)
    _, std, _ = sampling.transition("flow_euler", sched, v, x, 1000.0, 750.0, 0.7)
    assert float(std) == pytest.approx(1.4 * 0.5, abs=1e-6)  # sigma_t = 0.7 sqrt(1 / (1 - 0.75)), sqrt(-dt) = 0.5
    mean, std, _ = sampling.transition("flow_euler", sched, v, x, 500.0, 250.0, 0.3, "dance")
    # DanceGRPO's flux_step: x + dt v - 0.5 eta^2 score dt, score = -(x - (1 - s) x0) / s^2 = -(x + (1 - s) v) / s
    assert mean.item() == pytest.approx(1 - 0.25 * 0.5 - 0.5 * 0.09 * 1.25 / 0.5 * 0.25, abs=1e-6)
    assert float(std) == pytest.approx(0.3 * 0.5, abs=1e-7)
    mean, std, _ = sampling.transition("flow_euler", sched, v, x, 500.0, 0.0, 0.7)
    assert float(std) > 0  # the last step stays stochastic in Flow-GRPO's SDE (std = sigma_t sqrt(s))


@pytest.mark.parametrize("rule, eta", [("sde", 0.7), ("dance", 0.3), ("cps", 0.8)])
def test_own_sample_log_prob_is_the_float64_gaussian_density(sd3, rule, eta):
    _, policy = sd3
    traj = sampling.sample(policy, PROMPTS, 4, generator=torch.Generator().manual_seed(2), eta=eta, noise_rule=rule)
    # Flow-GRPO's and DanceGRPO's last step keeps noise (std = sigma_t sqrt(s)); CPS's ends at std = s_next sin = 0
    assert traj.noise_rule == rule and traj.stochastic.tolist() == [True] * 3 + [rule != "cps"]
    with torch.no_grad():
        for k in range(4):
            s, s_next = traj.timesteps[k].double() / 1000, traj.prev_timesteps[k].double() / 1000
            x, x_next = traj.latents[:, k].double(), traj.latents[:, k + 1].double()
            v = policy.predict(traj.latents[:, k], traj.timesteps[k], traj.cond).double()
            dt = s_next - s
            if rule == "cps":
                if k == 3:
                    assert torch.isnan(traj.log_probs[:, k]).all()
                    continue
                std = s_next * math.sin(eta * math.pi / 2)
                mean = (1 - s_next) * (x - s * v) + s_next * math.cos(eta * math.pi / 2) * (x + (1 - s) * v)
                density = torch.distributions.Normal(mean, std).log_prob(x_next).mean((1, 2, 3))
                assert torch.allclose(traj.log_probs[:, k].double(), density, atol=2e-4), k
                continue
            if rule == "dance":
                sigma_t = torch.tensor(eta, dtype=torch.float64)
            else:
                sigma_t = eta * (s / (1 - (s_next if s == 1 else s))).sqrt()
            mean = x * (1 + sigma_t**2 / (2 * s) * dt) + v * (1 + sigma_t**2 * (1 - s) / (2 * s)) * dt
            std = sigma_t * (-dt).sqrt()
            density = torch.distributions.Normal(mean, std).log_prob(x_next).mean((1, 2, 3))
            assert torch.allclose(traj.log_probs[:, k].double(), density, atol=2e-4), k
            assert torch.allclose(traj.x0_preds[:, k].double(), x - s * v, atol=1e-5)
            assert torch.equal(sampling.transition_log_prob(policy, traj, k), traj.log_probs[:, k])


def test_noise_rules_windows_and_errors(flux):
    _, policy = flux
    noise = torch.randn(3, *policy.latent_shape, generator=torch.Generator().manual_seed(1))
    traj = sampling.sample(policy, PROMPTS, 4, noise=noise, generator=torch.Generator().manual_seed(2), eta=0.7,
                           sde_steps=(1,))
    assert traj.noise_rule == "sde"  # "ddim", every method's default rule, selects Flow-GRPO's SDE here
    assert traj.stochastic.tolist() == [False, True, False, False]
    assert torch.equal(sampling.stochastic_steps(policy, 4, 0.7, sde_steps=(1,)), traj.stochastic)
    ode = sampling.sample(policy, PROMPTS, 4, noise=noise, eta=0.0)
    assert torch.equal(traj.latents[:, 1], ode.latents[:, 1]) and not torch.equal(traj.latents[:, 2], ode.latents[:, 2])
    # renoise / add_noise: x_s = (1 - s) x0 + s noise
    x_t = sampling.renoise(policy, ode.final_latents, ode, 2, noise)
    assert torch.allclose(x_t, 0.5 * ode.final_latents + 0.5 * noise, atol=1e-6)
    rest = sampling.continue_from(policy, ode.latents[:, 2], 2, traj=ode)
    assert torch.equal(rest.final_latents, ode.final_latents)
    # A VP kernel name (a method's default stochastic step) selects the flow kernel on a flow model ...
    assert sampling.sample(policy, PROMPTS, 2, noise=noise, kernel="ddim", eta=0.0).kernel == "flow_euler"
    # ... while asking a flow model's scheduler for VP tables, or an SD model for the flow kernel, is refused.
    with pytest.raises(ValueError, match="sampling kernel 'ddim' needs an alphas_cumprod"):
        policy.scheduler_for("ddim")
    with pytest.raises(ValueError, match="noise_rule 'dance' is a rule of the 'flow_euler' kernel; got kernel 'lcm'"):
        sampling.transition("lcm", policy.scheduler, noise, noise, 999, -1, 1.0, "dance")
