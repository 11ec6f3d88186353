"""methods.sampling: the spec's reference tables, equality with diffusers' own steps and pipelines, and log-probs."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from methods import sampling
from methods.policy import Policy
from tasks import models as zoo
from tasks.registry import UnknownNameError
from tasks.tiny import build_tiny_sd, build_tiny_sdxl

PROMPTS = ["a red cat", "two blue squares", "a photo of a fox", "a dog on the moon"]
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def ddim(spacing="trailing", **kw):
    return DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing=spacing,
                         **kw)


def euler_a():
    return EulerAncestralDiscreteScheduler(**SD, timestep_spacing="trailing", steps_offset=1)


def sd_policy(scheduler_cls=None, **kw):
    pipe = build_tiny_sd()
    if scheduler_cls is not None:
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    return pipe, Policy(pipe, zoo.get("sd-turbo"), **kw)


def run_pipe(pipe, steps, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return pipe(PROMPTS, num_inference_steps=steps, height=32, width=32, generator=g, output_type="pt", **kw).images


# ------------------------------------------------------------------------------------ spec reference tables
def test_alphabar_and_sigma_tables():
    """ddpo-sdpo-sharpening-search.md §1.1 and dpo-spo-pso.md §0.2 (scaled_linear)."""
    abar = ddim().alphas_cumprod.double()
    expected = {0: 0.999150, 249: 0.675432, 499: 0.277670, 749: 0.056623, 979: 0.005913, 999: 0.0046601}
    for t, value in expected.items():
        assert abar[t].item() == pytest.approx(value, rel=2e-5, abs=1e-6), t
    sigma = {999: 14.6146, 749: 4.0817, 499: 1.6129, 249: 0.6932}
    tables = sampling._tables(euler_a())
    for t, value in sigma.items():
        assert tables.sigmas[t].item() == pytest.approx(value, abs=1e-4), t


def test_timestep_grids():
    s = ddim()
    expected = {1: [999], 2: [999, 499], 4: [999, 749, 499, 249], 8: [999, 874, 749, 624, 499, 374, 249, 124]}
    for n, grid in expected.items():
        timesteps, prev = sampling.timestep_grid(s, n)
        assert timesteps.tolist() == grid
        assert prev.tolist() == grid[1:] + [-1]
        assert timesteps.dtype == prev.dtype == torch.long
    timesteps, _ = sampling.timestep_grid(s, 50)
    assert timesteps[:2].tolist() == [999, 979] and timesteps[-1].item() == 19
    # DDIM's rule t - T//N differs from the next grid point when N does not divide T (diffusers' own behaviour).
    assert sampling.timestep_grid(s, 3, "ddim")[1].tolist() == [666, 333, -1]
    assert sampling.timestep_grid(s, 3, "lcm")[1].tolist() == [666, 332, -1]
    # Euler schedulers have float timesteps; the default kernel comes from the class.
    timesteps, prev = sampling.timestep_grid(euler_a(), 4)
    assert timesteps.tolist() == [999, 749, 499, 249] and prev.tolist() == [749, 499, 249, -1]
    leading = ddim("leading")
    timesteps, prev = sampling.timestep_grid(leading, 50)
    assert timesteps[:2].tolist() == [981, 961] and timesteps[-1].item() == 1 and prev[-1].item() == -1
    assert sampling.timestep_grid(leading, 1)[0].tolist() == [1]  # why turbo models must use trailing
    with pytest.raises(UnknownNameError, match="'heun'.*ddim, euler_ancestral, lcm"):
        sampling.timestep_grid(s, 4, "heun")


def _mean_coefficients(kernel, scheduler, t, t_prev, eta=1.0):
    """(std, direction) of one step, read off `transition`: with eps_hat = 1 and x_t = sqrt(1-abar_t) * 1,
    x0_hat = 0, so mean = sqrt(1 - abar_prev - std^2) * 1."""
    abar = scheduler.alphas_cumprod[t].item()
    x_t = torch.full((1, 4, 2, 2), math.sqrt(1 - abar))
    mean, std, x0 = sampling.transition(kernel, scheduler, torch.ones_like(x_t), x_t, t, t_prev, eta)
    assert x0.abs().max().item() < 1e-5
    return float(std), mean.mean().item()


@pytest.mark.parametrize(
    "n, t, t_prev, sigma, direction",
    [
        (1, 999, -1, 0.029155, 0.000058),
        (2, 999, 499, 0.844709, 0.093796),
        (2, 499, -1, 0.029150, 0.000527),
        (4, 999, 749, 0.932625, 0.271268),
        (4, 749, 499, 0.780733, 0.335836),
        (4, 499, 249, 0.514406, 0.244856),
        (8, 999, 874, 0.858397, 0.494695),
        (50, 999, 979, 0.459991, 0.884588),
    ],
)
def test_ddim_sigma_table(n, t, t_prev, sigma, direction):
    """§1.2 table (eta = 1, SD-Turbo trailing grid); the grid itself supplies t_prev."""
    s = ddim()
    timesteps, prev = sampling.timestep_grid(s, n, "ddim")
    assert prev[timesteps.tolist().index(t)].item() == t_prev
    std, dir_coef = _mean_coefficients("ddim", s, t, t_prev)
    assert std == pytest.approx(sigma, abs=2e-6)
    assert dir_coef == pytest.approx(direction, abs=2e-5)


def test_ddim_sigma_sd15_leading():
    s = ddim("leading")
    assert _mean_coefficients("ddim", s, 981, 961)[0] == pytest.approx(0.454463, abs=2e-6)
    assert _mean_coefficients("ddim", s, 1, -1)[0] == pytest.approx(0.02065, abs=1e-5)  # final = abar[0]
    assert _mean_coefficients("ddim", s, 1, -1, eta=0.0)[0] == 0.0


@pytest.mark.parametrize("sigma, expected", [(0.932625, -0.974186), (0.029155, 2.491190)])
def test_worked_log_prob_values(sigma, expected):
    """§1.2: x_prev - mu = 0.5 sigma in every element -> logp = -0.125 - ln(sigma) - 0.918939."""
    mean = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    logp = sampling.gaussian_log_prob(mean + 0.5 * sigma, mean, torch.tensor(sigma))
    assert logp.shape == (3,)
    assert torch.allclose(logp, torch.full((3,), expected), atol=2e-5)
    assert sampling.gaussian_log_prob(mean, mean, torch.tensor(1.0))[0].item() == pytest.approx(-0.918939, abs=1e-6)
    assert torch.isnan(sampling.gaussian_log_prob(mean, mean, torch.tensor(0.0))).all()


def test_gaussian_log_prob_per_sample_std():
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    mean = torch.zeros_like(x)
    std = torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)
    element = -(x**2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    assert torch.allclose(sampling.gaussian_log_prob(x, mean, std), element.flatten(1).mean(1), atol=1e-6)


@pytest.mark.parametrize(
    "t, t_prev, sigma_up, sigma_down",
    [(999, 749, 3.919, 1.140), (749, 499, 1.482, 0.637), (499, 249, 0.626, 0.298), (249, -1, 0.0, 0.0)],
)
def test_euler_ancestral_table(t, t_prev, sigma_up, sigma_down):
    """dpo-spo-pso.md §0.3: with eps_hat = 1, (z - x0_hat) / sigma_from = 1, so mean = z + sigma_down - sigma_from."""
    s = euler_a()
    sampling.timestep_grid(s, 4)
    assert float(s.init_noise_sigma) == pytest.approx(14.6146, abs=1e-4)
    sigma_from = sampling._tables(s).sigmas[t].item()
    z = torch.zeros(1, 4, 2, 2)
    mean, std, x0 = sampling.transition("euler_ancestral", s, torch.ones_like(z), z, t, t_prev, 1.0)
    assert float(std) == pytest.approx(sigma_up, abs=1e-3)
    assert mean.mean().item() + sigma_from == pytest.approx(sigma_down, abs=1e-3)
    assert x0.mean().item() == pytest.approx(-sigma_from, rel=1e-6)
    # eta = 0 is the deterministic Euler step: no noise, sigma_down = sigma_to.
    _, std0, _ = sampling.transition("euler_ancestral", s, torch.ones_like(z), z, t, t_prev, 0.0)
    assert float(std0) == 0.0


@pytest.mark.parametrize("t, t_prev, coef, std", [(999, 749, 0.238, 0.971), (749, 499, 0.527, 0.850),
                                                  (499, 249, 0.822, 0.570)])
def test_lcm_table(t, t_prev, coef, std):
    """dpo-spo-pso.md §0.3 item 3: mean = sqrt(abar_t') x0_hat, std = sqrt(1 - abar_t'); last step deterministic."""
    s = ddim()
    abar = s.alphas_cumprod[t].item()
    x0_true = torch.full((1, 4, 2, 2), 0.7)
    eps = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    x_t = math.sqrt(abar) * x0_true + math.sqrt(1 - abar) * eps
    mean, sd, x0 = sampling.transition("lcm", s, eps, x_t, t, t_prev, 1.0)
    assert torch.allclose(x0, x0_true, atol=1e-5)
    assert float(sd) == pytest.approx(std, abs=1e-3)
    assert torch.allclose(mean, torch.full_like(mean, coef * 0.7), atol=1e-3)
    mean, sd, x0 = sampling.transition("lcm", s, eps, x_t, t, -1, 1.0)
    assert float(sd) == 0.0 and torch.equal(mean, x0)


# ------------------------------------------------------------------------------ equality with diffusers' steps
@pytest.mark.parametrize("prediction_type, clip", [("epsilon", False), ("v_prediction", True)])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_transition_equals_diffusers_step(prediction_type, clip, eta):
    s = ddim(prediction_type=prediction_type)
    if clip:
        s = DDIMScheduler.from_config(s.config, clip_sample=True)
    g = torch.Generator().manual_seed(0)
    x, out, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    timesteps, prev = sampling.timestep_grid(s, 4)
    for t, t_prev in zip(timesteps.tolist(), prev.tolist()):
        expected = s.step(out, t, x, eta=eta, variance_noise=z).prev_sample
        mean, std, _ = sampling.transition("ddim", s, out, x, t, t_prev, eta)
        assert torch.allclose(mean + std * z, expected, atol=1e-5), t


def test_euler_ancestral_transition_equals_diffusers_step():
    s = euler_a()
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 8, 8, generator=g) * 14.6, torch.randn(2, 4, 8, 8, generator=g)
    timesteps, prev = sampling.timestep_grid(s, 4)
    for i, (t, t_prev) in enumerate(zip(timesteps.tolist(), prev.tolist())):
        s._step_index = i
        expected = s.step(out, s.timesteps[i], x, generator=torch.Generator().manual_seed(i)).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        mean, std, _ = sampling.transition("euler_ancestral", s, out, x, t, t_prev, 1.0)
        assert torch.allclose(mean + std * z, expected, atol=1e-5), t
        s._step_index = i
        assert torch.allclose(sampling.model_input("euler_ancestral", s, x, t), s.scale_model_input(x, s.timesteps[i]))


def test_per_sample_timesteps_match_scalar_ones():
    s = ddim()
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    mean, std, x0 = sampling.transition("ddim", s, out, x, torch.tensor([999, 499]), torch.tensor([749, -1]), 1.0)
    for row, (t, tp) in enumerate([(999, 749), (499, -1)]):
        m, sd, x0_row = sampling.transition("ddim", s, out[row:row + 1], x[row:row + 1], t, tp, 1.0)
        assert torch.allclose(mean[row:row + 1], m) and float(std[row]) == pytest.approx(float(sd))
        assert torch.allclose(x0[row:row + 1], x0_row)


def test_add_noise_matches_schedulers():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    s = ddim()
    t = torch.tensor([749, 749])
    assert torch.allclose(sampling.add_noise("ddim", s, x0, 749, noise), s.add_noise(x0, noise, t), atol=1e-6)
    e = euler_a()
    e.set_timesteps(4)
    expected = e.add_noise(x0, noise, torch.tensor([749.0, 749.0]))
    assert torch.allclose(sampling.add_noise("euler_ancestral", e, x0, 749, noise), expected, atol=1e-5)


# ------------------------------------------------------------------------------- equality with the pipelines
@pytest.mark.parametrize("steps", [1, 4])
def test_ddim_reproduces_sd_pipeline(steps):
    """eta=0 with the same initial noise = the pipeline's own output; eta=1 with the same generator too (the
    sampler draws x_T and the step noises in the pipeline's order)."""
    pipe, policy = sd_policy(DDIMScheduler)
    for eta in (0.0, 1.0):
        expected = run_pipe(pipe, steps, guidance_scale=0.0, eta=eta)
        traj = sampling.sample(policy, PROMPTS, steps, generator=torch.Generator().manual_seed(0), eta=eta,
                               kernel="ddim")
        assert traj.images.shape == (4, 3, 32, 32)
        assert torch.allclose(traj.images, expected, atol=1e-5), (steps, eta)
        assert traj.stochastic.tolist() == [eta > 0] * steps and traj.nfe == steps


def test_ddim_with_cfg_reproduces_sd_pipeline_from_given_noise():
    pipe, policy = sd_policy(DDIMScheduler, guidance_scale=4.0)
    noise = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    expected = pipe(PROMPTS, num_inference_steps=2, height=32, width=32, guidance_scale=4.0, latents=noise,
                    output_type="pt").images
    traj = sampling.sample(policy, PROMPTS, 2, noise=noise, eta=0.0)
    assert policy.nfe_per_predict == 2 and traj.nfe == 4
    assert torch.allclose(traj.images, expected, atol=1e-5)
    assert torch.equal(traj.latents[:, 0], noise)
    unguided = sampling.sample(Policy(build_tiny_sd(), zoo.get("sd-turbo")), PROMPTS, 2, noise=noise, eta=0.0)
    assert (unguided.images - expected).abs().max() > 1e-3  # guidance changes the result


def test_euler_kernel_reproduces_sd_turbo_euler_pipeline():
    """sd-turbo's own EulerDiscreteScheduler = kernel euler_ancestral at eta 0; DDIM differs only at its last step."""
    pipe, policy = sd_policy()
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    expected = run_pipe(pipe, 4, guidance_scale=0.0)
    traj = sampling.sample(policy, PROMPTS, 4, generator=torch.Generator().manual_seed(0), kernel="euler_ancestral",
                           eta=0.0)
    assert torch.allclose(traj.images, expected, atol=1e-5)
    assert not traj.stochastic.any() and torch.isnan(traj.log_probs).all()
    assert torch.allclose(traj.latents[:, 0] / 14.6146, torch.randn(4, 4, 16, 16, generator=torch.Generator()
                                                                    .manual_seed(0)), atol=1e-4)


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_euler_ancestral_reproduces_sdxl_pipeline(guidance):
    pipe = build_tiny_sdxl()
    expected = run_pipe(pipe, 4, guidance_scale=guidance)
    policy = Policy(pipe, zoo.get("sdxl-turbo"), guidance_scale=guidance)
    traj = sampling.sample(policy, PROMPTS, 4, generator=torch.Generator().manual_seed(0))
    assert traj.kernel == "euler_ancestral"
    assert torch.allclose(traj.images, expected, atol=1e-5)
    assert traj.stochastic.tolist() == [True, True, True, False]
    assert torch.isnan(traj.log_probs[:, 3]).all() and torch.isfinite(traj.log_probs[:, :3]).all()


@pytest.mark.parametrize("guidance, eta", [(0.0, 0.0), (3.0, 0.0), (0.0, 1.0)])
def test_reproduces_toy_pipeline(guidance, eta):
    from tasks.toy.pipeline import ToyPipeline, ToyTextEncoder, build_scheduler, build_unet

    torch.manual_seed(0)
    pipe = ToyPipeline(unet=build_unet((16, 32)), text_encoder=ToyTextEncoder(out_dim=64), scheduler=build_scheduler())
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "two blue squares", "three green triangles", "a yellow square"]
    expected = pipe(prompts, 4, guidance_scale=guidance, eta=eta, generator=torch.Generator().manual_seed(0)).images
    policy = Policy(pipe, zoo.get("toy-base"), guidance_scale=guidance)
    traj = sampling.sample(policy, prompts, 4, generator=torch.Generator().manual_seed(0), eta=eta)
    # The cosine schedule's abar[999] = 2e-9 makes DDIM's sqrt(1 - abar_prev - std^2) at eta = 1 a float32
    # cancellation in diffusers (computed in float64 here): ~1e-4 apart, not 1e-6.
    assert torch.allclose(traj.images, expected, atol=1e-5 if eta == 0 else 1e-3)
    assert traj.nfe == 4 * (2 if guidance > 1 else 1)


# ----------------------------------------------------------------------------------------------- log-probs
def test_recorded_log_probs_equal_independent_closed_form_ddim():
    """Recompute every step's density from diffusers' DDIMScheduler (mean = step with zero noise, variance from
    its _get_variance) and the element-wise Gaussian formula."""
    _, policy = sd_policy(DDIMScheduler)
    traj = sampling.sample(policy, PROMPTS, 4, generator=torch.Generator().manual_seed(1), eta=0.8)
    s = DDIMScheduler.from_config(policy.pipeline.scheduler.config)
    s.set_timesteps(4)
    with torch.no_grad():
        for k, t in enumerate(s.timesteps):
            x, x_next = traj.latents[:, k], traj.latents[:, k + 1]
            eps = policy.predict(x, t, traj.cond)
            mean = s.step(eps, t, x, eta=0.8, variance_noise=torch.zeros_like(x)).prev_sample
            prev_t = t - 1000 // 4
            std = 0.8 * s._get_variance(t, prev_t) ** 0.5
            element = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
            assert torch.allclose(traj.log_probs[:, k], element.mean(dim=(1, 2, 3)), atol=1e-4), k
            assert torch.allclose(traj.x0_preds[:, k], s.step(eps, t, x).pred_original_sample, atol=1e-5)


def test_recorded_log_probs_equal_independent_closed_form_euler_ancestral():
    pipe = build_tiny_sdxl()
    policy = Policy(pipe, zoo.get("sdxl-turbo"))
    traj = sampling.sample(policy, PROMPTS, 4, generator=torch.Generator().manual_seed(1))
    s = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    s.set_timesteps(4)
    sig = s.sigmas.double()
    with torch.no_grad():
        for k in range(3):
            z, z_next = traj.latents[:, k], traj.latents[:, k + 1]
            eps = policy.predict(z / (sig[k] ** 2 + 1) ** 0.5, s.timesteps[k], traj.cond).double()
            up = (sig[k + 1] ** 2 * (sig[k] ** 2 - sig[k + 1] ** 2) / sig[k] ** 2) ** 0.5
            down = (sig[k + 1] ** 2 - up**2) ** 0.5
            mean = z + eps * (down - sig[k])  # (z - x0) / sigma = eps
            element = -((z_next - mean) ** 2) / (2 * up**2) - torch.log(up) - 0.5 * math.log(2 * math.pi)
            assert torch.allclose(traj.log_probs[:, k].double(), element.mean(dim=(1, 2, 3)), atol=1e-4), k


@pytest.mark.parametrize("kernel, guidance", [("ddim", 2.0), ("euler_ancestral", 0.0), ("lcm", 0.0)])
def test_transition_log_prob_ratio_is_exactly_zero(kernel, guidance):
    _, policy = sd_policy(guidance_scale=guidance)
    traj = sampling.sample(policy, PROMPTS, 3, generator=torch.Generator().manual_seed(2), kernel=kernel, eta=1.0)
    assert traj.latents.shape == (4, 4, 4, 16, 16) and traj.x0_preds.shape == (4, 3, 4, 16, 16)
    assert traj.latents.dtype == traj.log_probs.dtype == torch.float32
    assert traj.stochastic.tolist() == [True, True, kernel == "ddim"]
    for k in range(3):
        log_prob = sampling.transition_log_prob(policy, traj, k)
        if traj.stochastic[k]:
            assert log_prob.requires_grad
            assert torch.equal(log_prob - traj.log_probs[:, k], torch.zeros(4)), k
        else:
            assert torch.isnan(log_prob).all() and torch.isnan(traj.log_probs[:, k]).all()
    # A subset of the batch (smaller forward batch: equal to float32 rounding).
    sub = sampling.transition_log_prob(policy, traj, 1, index=torch.tensor([2, 0]))
    assert torch.allclose(sub, traj.log_probs[[2, 0], 1], atol=1e-5)
    # Under the reference (adapters off) the ratio is still 0 while the adapters are untouched...
    with policy.reference():
        assert torch.equal(sampling.transition_log_prob(policy, traj, 0), traj.log_probs[:, 0])
    # ...and moves once they change.
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    assert (sampling.transition_log_prob(policy, traj, 0) - traj.log_probs[:, 0]).abs().max() > 1e-4


def test_record_false_and_continue_from():
    _, policy = sd_policy(DDIMScheduler)
    full = sampling.sample(policy, PROMPTS, 4, generator=torch.Generator().manual_seed(5), eta=0.0)
    light = sampling.sample(policy, PROMPTS, 4, generator=torch.Generator().manual_seed(5), eta=0.0, record=False)
    assert light.latents is None and light.log_probs is None and light.x0_preds is None
    assert torch.equal(light.images, full.images) and torch.equal(light.final_latents, full.latents[:, -1])
    # Restarting from a recorded intermediate latent with eta = 0 retraces the rest of the trajectory.
    rest = sampling.continue_from(policy, full.latents[:, 2], 2, traj=full)
    assert rest.k_start == 2 and rest.timesteps.tolist() == [499, 249] and rest.nfe == 2
    assert torch.equal(rest.latents, full.latents[:, 2:]) and torch.equal(rest.images, full.images)
    # renoise: a grid-step-2 latent from the step-1 clean prediction (t_2 = 499).
    noise = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    x_t = sampling.renoise(policy, full.x0_preds[:, 1], full, 2, noise)
    abar = policy.scheduler.alphas_cumprod[499]
    assert torch.allclose(x_t, abar.sqrt() * full.x0_preds[:, 1] + (1 - abar).sqrt() * noise, atol=1e-6)
    branch = sampling.continue_from(policy, x_t, 2, traj=full, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert branch.log_probs.shape == (4, 2) and torch.isfinite(branch.log_probs).all()


def test_unknown_kernel_names_valid_ones():
    _, policy = sd_policy()
    with pytest.raises(UnknownNameError, match="unknown sampling kernel 'dpm'; available: ddim, euler_ancestral, lcm"):
        sampling.sample(policy, PROMPTS, 2, kernel="dpm")


# ----------------------------------------------------------------------------------------------- CPS and SDE windows
def test_cps_step_coefficients_and_own_sample_log_prob_in_float64():
    """noise_rule='cps': std = sqrt(1 - abar_prev) sin(eta pi / 2), the eps coefficient sqrt(1 - abar_prev) cos(.);
    the recorded log-prob of the sampler's own draw equals the float64 Gaussian density recomputed by hand."""
    _, policy = sd_policy(DDIMScheduler)
    eta = 0.8
    traj = sampling.sample(policy, PROMPTS, 4, generator=torch.Generator().manual_seed(3), eta=eta, noise_rule="cps")
    assert traj.noise_rule == "cps" and traj.stochastic.tolist() == [True] * 4
    abar = policy.scheduler_for("ddim").alphas_cumprod.double()
    final = abar[0]  # set_alpha_to_one=False
    with torch.no_grad():
        for k, (t, t_prev) in enumerate(zip(traj.timesteps.tolist(), traj.prev_timesteps.tolist())):
            x, x_next = traj.latents[:, k].double(), traj.latents[:, k + 1].double()
            eps = policy.predict(traj.latents[:, k], t, traj.cond).double()
            a_t, a_prev = abar[t], (abar[t_prev] if t_prev >= 0 else final)
            std = (1 - a_prev).sqrt() * math.sin(eta * math.pi / 2)
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            mean = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * math.cos(eta * math.pi / 2) * eps
            density = (-((x_next - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)).mean((1, 2, 3))
            assert torch.allclose(traj.log_probs[:, k].double(), density, atol=2e-4), k
            rescored = sampling.transition_log_prob(policy, traj, k)
            assert torch.equal(rescored, traj.log_probs[:, k])


def test_cps_at_eta_zero_is_the_deterministic_sampler_and_needs_ddim():
    _, policy = sd_policy(DDIMScheduler)
    noise = torch.randn(len(PROMPTS), *policy.latent_shape, generator=torch.Generator().manual_seed(4))
    ode = sampling.sample(policy, PROMPTS, 4, noise=noise, eta=0.0)
    cps = sampling.sample(policy, PROMPTS, 4, noise=noise, eta=0.0, noise_rule="cps")
    assert torch.equal(ode.images, cps.images) and cps.stochastic.tolist() == [False] * 4
    with pytest.raises(ValueError, match="noise_rule 'cps' is a rule of the 'ddim' and 'flow_euler' kernels"):
        sampling.sample(policy, PROMPTS, 2, noise=noise, kernel="lcm", noise_rule="cps")
    with pytest.raises(ValueError, match="unknown noise_rule 'sdx'; available: ddim, cps, sde, dance"):
        sampling.sample(policy, PROMPTS, 2, noise=noise, noise_rule="sdx")
    with pytest.raises(ValueError, match="noise_rule 'sde' is a rule of the 'flow_euler' kernel; got kernel 'ddim'"):
        sampling.sample(policy, PROMPTS, 2, noise=noise, noise_rule="sde")


def test_sde_window_is_stochastic_only_inside_and_rescored_with_it():
    _, policy = sd_policy(DDIMScheduler)
    noise = torch.randn(len(PROMPTS), *policy.latent_shape, generator=torch.Generator().manual_seed(5))
    traj = sampling.sample(policy, PROMPTS, 4, noise=noise, generator=torch.Generator().manual_seed(6), eta=0.8,
                           noise_rule="cps", sde_steps=(1, 2))
    assert traj.stochastic.tolist() == [False, True, True, False] and traj.sde_steps == (1, 2)
    assert torch.isnan(traj.log_probs[:, [0, 3]]).all() and torch.isfinite(traj.log_probs[:, [1, 2]]).all()
    assert torch.equal(sampling.stochastic_steps(policy, 4, 0.8, "ddim", noise_rule="cps", sde_steps=(1, 2)),
                       traj.stochastic)
    # The first step is the ODE step: it reproduces the deterministic sampler's first latent exactly.
    ode = sampling.sample(policy, PROMPTS, 4, noise=noise, eta=0.0)
    assert torch.equal(traj.latents[:, 1], ode.latents[:, 1]) and not torch.equal(traj.latents[:, 2], ode.latents[:, 2])
    for k in (1, 2):
        assert torch.equal(sampling.transition_log_prob(policy, traj, k), traj.log_probs[:, k])
    with pytest.raises(ValueError, match=r"sde_steps \[4\] must be grid indices in \[0, 4\)"):
        sampling.sample(policy, PROMPTS, 4, noise=noise, sde_steps=[4])
