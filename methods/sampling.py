"""The one trajectory sampler all methods share: stochastic few-step kernels with exact per-step log-densities.

Each kernel is a Gaussian transition p(x_next | x_t, c) = N(mean_theta(x_t, t, c), std_t^2 I) built from a diffusers
scheduler's own tables (alphas_cumprod, final_alpha_cumprod, sigmas, set_timesteps); nothing here re-implements
a timetable.

* "ddim" (DDIM with eta; DDPO, SDPO, SPO), in x space, exactly `DDIMScheduler.step`:
      x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)          (v / x0 predictions converted as diffusers does)
      std    = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
      mean   = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - std^2) eps
  with t_prev = t - T // N and abar_prev = final_alpha_cumprod when t_prev < 0 (stored as -1). x0_hat is clipped
  when the scheduler's config says clip_sample. (DDPO's code clamps t_prev to 0 instead: with SD's
  set_alpha_to_one=False the two coincide.)
  noise_rule="cps" (Flow-GRPO's "coefficient-preserving" sampling, GRPO) replaces the std by
      std = sqrt(1 - abar_prev) sin(eta pi / 2),   so   sqrt(1 - abar_prev - std^2) = sqrt(1 - abar_prev) cos(eta pi / 2)
  : the noise part of x_prev keeps the deterministic sampler's coefficient sqrt(1 - abar_prev) (the eps direction and
  the fresh noise share it), where DDIM-eta's std is ~0 at the few-step grid's early steps. eta = 0 is DDIM's
  deterministic step under both rules.
* "euler_ancestral" (SDXL-Turbo, PSO), in the Euler parameterisation z = x / sqrt(abar) with sigma = sqrt((1-abar)/abar),
  exactly `EulerAncestralDiscreteScheduler.step` at eta = 1 (eta scales sigma_up as in k-diffusion; eta = 0 is the
  deterministic `EulerDiscreteScheduler`):
      x0_hat = z - sigma_from eps;  sigma_up = eta sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2)
      sigma_down = sqrt(sigma_to^2 - sigma_up^2);  mean = z + (z - x0_hat) / sigma_from (sigma_down - sigma_from)
      std = sigma_up    (the last step, sigma_to = 0, is deterministic)
  The denoiser sees z / sqrt(sigma^2 + 1) (`model_input`); x_T = noise * init_noise_sigma.
* "lcm" (LCM / DMD2 "predict x0 then renoise", PSO-DMD2) on the next grid timestep t':
      mean = sqrt(abar_t') x0_hat + sqrt(1 - abar_t' - std^2) eps,  std = eta sqrt(1 - abar_t')
  so eta = 1 is the LCM step (mean = sqrt(abar_t') x0_hat) and eta = 0 is DDIM's deterministic step; the last
  step outputs x0_hat (deterministic).

* "flow_euler" (rectified-flow transformers: FLUX, SD3; Flow-GRPO, DanceGRPO), on the sigmas of diffusers'
  `FlowMatchEulerDiscreteScheduler.set_timesteps` called as the model's pipeline calls it (`set_flow_grid`: FLUX passes
  sigmas linspace(1, 1/N, N), SD3 none; both pass mu = calculate_shift(image_seq_len) under dynamic shifting). With
  x_s = (1 - s) x0 + s noise and the velocity v = noise - x0 predicted at timestep t = s * num_train_timesteps:
      x0_hat = x - s v;   dt = s_next - s (< 0)
      mean   = x (1 + sigma_t^2 dt / (2 s)) + v (1 + sigma_t^2 (1 - s) / (2 s)) dt,   std = sigma_t sqrt(-dt)
  the Euler-Maruyama step of the reverse SDE that keeps the ODE's marginals, with noise_rule
      "sde"   (Flow-GRPO's `sde_step_with_logprob`, default): sigma_t = eta sqrt(s / (1 - s)); at s = 1 the code puts
              the grid's next sigma in the denominator (its `sigma_max = sigmas[1]`), kept here;
      "dance" (DanceGRPO's `flux_step` with its SDE correction): sigma_t = eta, constant;
      "cps"   (coefficient-preserving, as the "ddim" kernel's): mean = (1 - s_next) x0_hat + s_next cos(eta pi/2) n_hat,
              std = s_next sin(eta pi / 2), with n_hat = x + (1 - s) v the implied noise; the last step is deterministic.
  eta = 0 is exactly the scheduler's Euler step mean = x + dt v. Unlike DDIM, the last step (s_next = 0) is stochastic
  under "sde" and "dance" (std = sigma_t sqrt(s)), as in their code. The "ddim" noise_rule name, the default of every
  method, selects "sde" on this kernel; on a flow model every VP kernel name selects this kernel (`kernel_for`).

Log-probabilities are the per-element MEAN over C*H*W of the Gaussian log-density (DDPO/SDPO/SPO convention):
      log p = mean[-(x_next - mean)^2 / (2 std^2)] - log std - 0.5 log(2 pi)
computed in float32, NaN where a step is deterministic (std = 0). t_prev is always passed explicitly, never read
from the scheduler's mutable state.

An SDE window (`sde_steps`, Flow-GRPO-Fast / MixGRPO): the grid steps listed take the stochastic step at `eta`, every
other step the deterministic one (eta 0); the trajectory records the window, so `transition_log_prob` rescores with it.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from methods.policy import Conditioning, Policy

KERNELS = ("ddim", "euler_ancestral", "lcm", "flow_euler")
FLOW = "flow_euler"
NOISE_RULES = ("ddim", "cps", "sde", "dance")
"""How a kernel sets its std from eta: "ddim" kernel: DDIM-eta (DDPO, SDPO) or coefficient-preserving (Flow-GRPO's
CPS); "flow_euler" kernel: Flow-GRPO's SDE or DanceGRPO's constant eta ("ddim" selects "sde" there)."""
FLOW_NOISE_RULES = ("sde", "dance", "cps")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class Trajectory:
    """Samples and, when recorded, every intermediate latent and per-step log-density."""

    latents: torch.Tensor | None
    """(B, K+1, C, h, w) float32, x_T ... x_0 in the kernel's native parameterisation (None if record=False)."""
    timesteps: torch.Tensor
    """(K,) long training timesteps of the steps taken (flow_euler: float32 s * num_train_timesteps)."""
    prev_timesteps: torch.Tensor
    """(K,) long target timesteps; -1 = final (DDIM: final_alpha_cumprod; Euler: sigma 0; LCM: clean x0; flow_euler:
    float32, 0 = clean x0)."""
    log_probs: torch.Tensor | None
    """(B, K) float32 per-element-mean Gaussian log-density of each transition; NaN where deterministic."""
    stochastic: torch.Tensor
    """(K,) bool, False where std == 0 (eta = 0, the Euler-A / LCM last step)."""
    x0_preds: torch.Tensor | None
    """(B, K, C, h, w) float32 clean-sample prediction at every step (None if record=False)."""
    images: torch.Tensor | None
    """(B, 3, H, W) float32 in [0, 1] (None if decode=False)."""
    cond: Conditioning
    prompts: list[str]
    kernel: str
    eta: float
    num_steps: int
    """N of the timestep grid (a `continue_from` trajectory covers its steps k_start .. N-1)."""
    nfe: int
    """denoiser forward passes spent (counts CFG's two)."""
    final_latents: torch.Tensor | None = None
    """(B, C, h, w) float32 x_0 (kept also when record=False)."""
    k_start: int = 0
    """grid index of the first step (0 for `sample`)."""
    noise_rule: str = "ddim"
    """the "ddim" kernel's std rule (NOISE_RULES)."""
    sde_steps: tuple[int, ...] | None = None
    """grid indices that took the stochastic step (the SDE window); None = every step at `eta`."""

    def step_eta(self, k: int) -> float:
        """eta of this trajectory's step k (grid step k_start + k): 0 outside the SDE window."""
        return step_eta(self.eta, self.sde_steps, self.k_start + k)


def step_eta(eta: float, sde_steps, grid_index: int) -> float:
    """eta at grid step `grid_index` under an SDE window `sde_steps` (None = every step stochastic)."""
    return float(eta) if sde_steps is None or int(grid_index) in sde_steps else 0.0


def _check_noise_rule(kernel: str, noise_rule: str) -> str:
    if noise_rule not in NOISE_RULES:
        raise ValueError(f"unknown noise_rule {noise_rule!r}; available: {', '.join(NOISE_RULES)}")
    if kernel == FLOW:
        if noise_rule == "ddim":
            return "sde"
        if noise_rule not in FLOW_NOISE_RULES:
            raise ValueError(f"noise_rule {noise_rule!r} is not a rule of the 'flow_euler' kernel; available: "
                             f"{', '.join(FLOW_NOISE_RULES)} (or 'ddim', which selects 'sde')")
        return noise_rule
    if noise_rule in ("sde", "dance"):
        raise ValueError(f"noise_rule {noise_rule!r} is a rule of the 'flow_euler' kernel; got kernel {kernel!r}")
    if noise_rule == "cps" and kernel != "ddim":
        raise ValueError(f"noise_rule {noise_rule!r} is a rule of the 'ddim' and 'flow_euler' kernels; got kernel "
                         f"{kernel!r}")
    return noise_rule


# ----------------------------------------------------------------------------- scheduler tables


@dataclass(frozen=True)
class _Tables:
    alphas_cumprod: torch.Tensor  # (T,) float64 copy of the scheduler's float32 table
    final_alpha_cumprod: float
    sigmas: torch.Tensor  # (T,) float32, sqrt((1 - abar) / abar) computed as diffusers' Euler schedulers do
    prediction_type: str
    clip_range: float | None
    num_train_timesteps: int


_TABLES: weakref.WeakKeyDictionary[object, _Tables] = weakref.WeakKeyDictionary()


def _tables(scheduler) -> _Tables:
    cached = _TABLES.get(scheduler)
    if cached is not None:
        return cached
    config = scheduler.config
    if config.get("thresholding", False):
        raise NotImplementedError("dynamic thresholding (scheduler config thresholding=True) is not supported")
    alphas_cumprod = scheduler.alphas_cumprod.detach().cpu().to(torch.float32)
    final = getattr(scheduler, "final_alpha_cumprod", None)
    if final is None:
        final = 1.0 if config.get("set_alpha_to_one", False) else alphas_cumprod[0]
    clip = config.get("clip_sample_range", 1.0) if config.get("clip_sample", False) else None
    tables = _Tables(
        alphas_cumprod=alphas_cumprod.double(),
        final_alpha_cumprod=float(final),
        sigmas=((1 - alphas_cumprod) / alphas_cumprod) ** 0.5,
        prediction_type=config.get("prediction_type", "epsilon"),
        clip_range=None if clip is None else float(clip),
        num_train_timesteps=int(config.num_train_timesteps),
    )
    _TABLES[scheduler] = tables
    return tables


def _check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        from tasks.registry import UnknownNameError

        raise UnknownNameError("sampling kernel", kernel, list(KERNELS))
    return kernel


def kernel_for(policy: Policy, kernel: str | None) -> str:
    """The kernel that runs for a method's `kernel` setting: the model's own when None. On a flow model every VP
    kernel name ("ddim", "euler_ancestral", "lcm": a method's stochastic step written for epsilon models) selects
    "flow_euler", the one step a velocity model has (recorded as the trajectory's kernel)."""
    own = policy.spec.scheduler
    kernel = _check_kernel(kernel or own)
    return FLOW if own == FLOW else kernel


def _default_kernel(scheduler) -> str:
    name = type(scheduler).__name__
    if "FlowMatch" in name:
        return FLOW
    return "euler_ancestral" if "Euler" in name else "lcm" if "LCM" in name else "ddim"


def timestep_grid(scheduler, num_steps: int, kernel: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, prev_timesteps), both (N,) long on CPU, from `scheduler.set_timesteps(num_steps)`.

    prev: "ddim" uses diffusers' DDIM rule t - T // N; "euler_ancestral" and "lcm" the next grid timestep. The
    final target is -1. "flow_euler": float32 timesteps s * num_train_timesteps and the next ones, final 0 (sigma 0).
    `kernel` defaults from the scheduler class (Euler* -> euler_ancestral, LCM -> lcm, FlowMatch* -> flow_euler, else
    ddim)."""
    kernel = _check_kernel(kernel or _default_kernel(scheduler))
    if kernel == FLOW:
        return _flow_grid(scheduler, num_steps)
    scheduler.set_timesteps(num_steps)
    raw = scheduler.timesteps.detach().cpu()
    timesteps = raw.round().long()
    if raw.is_floating_point() and not torch.equal(raw, timesteps.to(raw.dtype)):
        raise ValueError(
            f"non-integer timesteps {raw.tolist()} (timestep_spacing={scheduler.config.get('timestep_spacing')!r}); "
            "use 'trailing' (few-step models) or 'leading'"
        )
    if kernel == "ddim":
        prev = timesteps - scheduler.config.num_train_timesteps // num_steps
    else:
        prev = torch.cat([timesteps[1:], timesteps.new_tensor([-1])])
    return timesteps, prev.clamp(min=-1)


@dataclass(frozen=True)
class FlowGrid:
    """How a flow model's pipeline calls `FlowMatchEulerDiscreteScheduler.set_timesteps` (`set_flow_grid`)."""

    linear_sigmas: bool
    """True: sigmas = linspace(1, 1/N, N) passed explicitly (FluxPipeline); False: the scheduler's own (SD3)."""
    image_seq_len: int | None
    """image tokens of the transformer (FLUX: packed 2x2 latent patches; SD3: (h / patch)^2), for mu under
    `use_dynamic_shifting`; None when the scheduler does not shift dynamically."""


_FLOW_GRIDS: weakref.WeakKeyDictionary[object, FlowGrid] = weakref.WeakKeyDictionary()


def set_flow_grid(scheduler, *, linear_sigmas: bool, image_seq_len: int | None) -> None:
    """Record how the "flow_euler" kernel builds `scheduler`'s grid (the policy calls this with its pipeline's rule)."""
    _FLOW_GRIDS[scheduler] = FlowGrid(bool(linear_sigmas), None if image_seq_len is None else int(image_seq_len))


def flow_sigmas(scheduler, num_steps: int) -> torch.Tensor:
    """(N+1,) float32 sigmas s_0 = 1 > ... > s_N = 0 of an N-step grid, from the scheduler's own `set_timesteps` with
    the arguments the model's pipeline passes (explicit linear sigmas for FLUX, mu by image size when shifting)."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    grid = _FLOW_GRIDS.get(scheduler, FlowGrid(False, None))
    config = scheduler.config
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    kwargs = {}
    if config.get("use_dynamic_shifting", False):
        if grid.image_seq_len is None:
            raise ValueError("this FlowMatchEulerDiscreteScheduler shifts its sigmas by image size "
                             "(use_dynamic_shifting=True): call sampling.set_flow_grid(scheduler, image_seq_len=...)")
        kwargs["mu"] = calculate_shift(grid.image_seq_len, config.get("base_image_seq_len", 256),
                                       config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                       config.get("max_shift", 1.15))
    if grid.linear_sigmas and not config.get("use_flow_sigmas", False):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), **kwargs)
    else:
        scheduler.set_timesteps(num_steps, **kwargs)
    return scheduler.sigmas.detach().cpu().to(torch.float32)


def _flow_grid(scheduler, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    sigmas = flow_sigmas(scheduler, num_steps)
    timesteps = scheduler.timesteps.detach().cpu().to(torch.float32)  # = sigmas[:-1] * num_train_timesteps
    return timesteps, sigmas[1:] * float(scheduler.config.num_train_timesteps)


# ----------------------------------------------------------------------------- the kernels (pure maths)


def _as_index(t) -> torch.Tensor:
    return torch.as_tensor(t).to(device="cpu", dtype=torch.long)


def _broadcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float64 coefficient (0-d, or (B,) for per-sample timesteps) as float32 broadcastable against `like`."""
    coef = coef.to(torch.float32)
    if coef.ndim == 1:
        coef = coef.view(-1, *([1] * (like.ndim - 1)))
    return coef.to(like.device)


def _abar(tables: _Tables, t: torch.Tensor, final: float) -> torch.Tensor:
    a = tables.alphas_cumprod[t.clamp(min=0)]
    return torch.where(t >= 0, a, torch.full_like(a, final))


def _sigma(tables: _Tables, t: torch.Tensor) -> torch.Tensor:
    s = tables.sigmas[t.clamp(min=0)]
    return torch.where(t >= 0, s, torch.zeros_like(s))


def model_input(kernel: str, scheduler, x_t: torch.Tensor, t) -> torch.Tensor:
    """What the denoiser sees for latent x_t: x_t itself, or z / sqrt(sigma^2 + 1) for the Euler kernel."""
    if kernel != "euler_ancestral":
        return x_t
    sigma = _sigma(_tables(scheduler), _as_index(t))
    return x_t / _broadcast((sigma**2 + 1) ** 0.5, x_t)  # float32, as the Euler schedulers' scale_model_input


def x0_and_eps(prediction_type: str, out: torch.Tensor, x: torch.Tensor, abar: torch.Tensor):
    """(x0_hat, eps_hat) implied by the denoiser output `out` at x = sqrt(abar) x0 + sqrt(1 - abar) eps, for the
    scheduler's prediction_type (epsilon, v_prediction or sample). abar: 0-d, (B,) or broadcastable against x."""
    sqrt_a, sqrt_1ma = _broadcast(abar.sqrt(), x), _broadcast((1 - abar).sqrt(), x)
    if prediction_type == "epsilon":
        return (x - sqrt_1ma * out) / sqrt_a, out
    if prediction_type == "v_prediction":
        return sqrt_a * x - sqrt_1ma * out, sqrt_a * out + sqrt_1ma * x
    if prediction_type == "sample":
        return out, (x - sqrt_a * out) / sqrt_1ma
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def transition(kernel: str, scheduler, model_output: torch.Tensor, x_t: torch.Tensor, t, t_prev, eta: float,
               noise_rule: str = "ddim"):
    """One step's Gaussian: (mean (B,C,h,w), std (0-d or (B,1,1,1)), x0_pred (B,C,h,w)), all float32.

    t, t_prev: ints / 0-d tensors, or (B,) tensors for per-sample steps; t_prev = -1 is the final target.
    `model_output` is the raw denoiser output for `model_input(kernel, scheduler, x_t, t)`. noise_rule: "ddim"
    (DDIM-eta) or "cps" (coefficient-preserving; "ddim" kernel only).
    """
    noise_rule = _check_noise_rule(kernel, noise_rule)
    if kernel == FLOW:
        return flow_transition(scheduler, model_output, x_t, t, t_prev, eta, noise_rule)
    tables = _tables(scheduler)
    out, x = model_output.float(), x_t.float()
    t, t_prev = _as_index(t), _as_index(t_prev)

    if _check_kernel(kernel) == "euler_ancestral":
        sigma_from, sigma_to = _sigma(tables, t).double(), _sigma(tables, t_prev).double()
        s = _broadcast(sigma_from, x)
        if tables.prediction_type == "epsilon":
            x0 = x - s * out
        elif tables.prediction_type == "v_prediction":
            x0 = out * _broadcast(-sigma_from / (sigma_from**2 + 1) ** 0.5, x) + x / _broadcast(sigma_from**2 + 1, x)
        elif tables.prediction_type == "sample":
            x0 = out
        else:
            raise ValueError(f"unknown prediction_type {tables.prediction_type!r}")
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2).clamp(min=0) ** 0.5
        sigma_up = torch.minimum(sigma_to, eta * sigma_up)
        sigma_down = (sigma_to**2 - sigma_up**2).clamp(min=0) ** 0.5
        mean = x + (x - x0) / s * _broadcast(sigma_down - sigma_from, x)
        return mean, _broadcast(sigma_up, x), x0

    a_t = _abar(tables, t, tables.final_alpha_cumprod)
    # LCM's last step returns the clean prediction: treat its final target as abar = 1.
    a_prev = _abar(tables, t_prev, tables.final_alpha_cumprod if kernel == "ddim" else 1.0)
    x0, eps = x0_and_eps(tables.prediction_type, out, x, a_t)
    if tables.clip_range is not None:
        x0 = x0.clamp(-tables.clip_range, tables.clip_range)
    if kernel == "ddim" and noise_rule == "cps":
        std = (1 - a_prev).clamp(min=0) ** 0.5 * math.sin(eta * math.pi / 2)
    elif kernel == "ddim":
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0) ** 0.5
    else:
        std = eta * (1 - a_prev).clamp(min=0) ** 0.5
    direction = (1 - a_prev - std**2).clamp(min=0) ** 0.5
    mean = _broadcast(a_prev**0.5, x) * x0 + _broadcast(direction, x) * eps
    return mean, _broadcast(std, x), x0


def _flow_sigma(scheduler, t) -> torch.Tensor:
    """sigma = t / num_train_timesteps in float64 (0-d or (B,)); t is a scheduler timestep (float), not an index."""
    t = torch.as_tensor(t).detach().to("cpu", torch.float64)
    return t / float(scheduler.config.num_train_timesteps)


def flow_transition(scheduler, model_output: torch.Tensor, x_t: torch.Tensor, t, t_prev, eta: float,
                    noise_rule: str = "sde"):
    """The "flow_euler" step's Gaussian (mean, std, x0_pred), float32 (module docstring). t, t_prev: scheduler
    timesteps s * num_train_timesteps (floats, 0-d or (B,)); t_prev = 0 is the clean sample."""
    v, x = model_output.float(), x_t.float()
    s, s_next = _flow_sigma(scheduler, t), _flow_sigma(scheduler, t_prev)
    if bool((s_next >= s).any()) or bool((s > 1).any()) or bool((s_next < 0).any()):
        raise ValueError(f"flow step needs 1 >= t > t_prev >= 0 (sigma); got sigma {s.tolist()} -> {s_next.tolist()}")
    x0 = x - _broadcast(s, x) * v
    dt = s_next - s
    if eta == 0:  # the scheduler's own Euler step, in its float32 arithmetic
        dt32 = s_next.to(torch.float32) - s.to(torch.float32)
        return x + _broadcast(dt32, x) * v, _broadcast(torch.zeros_like(s), x), x0
    if noise_rule == "cps":  # noise part kept at the grid's coefficient s_next, split between n_hat and fresh noise
        std = s_next * math.sin(eta * math.pi / 2)
        noise_hat = x + _broadcast(1 - s, x) * v  # the noise implied by v = noise - x0
        mean = _broadcast(1 - s_next, x) * x0 + _broadcast(s_next * math.cos(eta * math.pi / 2), x) * noise_hat
        return mean, _broadcast(std, x), x0
    if noise_rule == "dance":
        sigma_t = torch.full_like(s, float(eta))
    else:  # Flow-GRPO: sqrt(s / (1 - s)), its s = 1 denominator taken at the grid's next sigma
        sigma_t = eta * (s / (1 - torch.where(s == 1, s_next, s))) ** 0.5
    std = sigma_t * (-dt) ** 0.5
    x_coef = 1 + sigma_t**2 / (2 * s) * dt
    v_coef = (1 + sigma_t**2 * (1 - s) / (2 * s)) * dt
    mean = _broadcast(x_coef, x) * x + _broadcast(v_coef, x) * v
    return mean, _broadcast(std, x), x0


def gaussian_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std) -> torch.Tensor:
    """(B,) per-element-mean log N(x_next; mean, std^2 I) in float32; NaN where std == 0."""
    diff = x_next.float() - mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=diff.device)
    std = std.reshape(-1) if std.ndim else std  # () or (B,)
    ok = std > 0
    safe = torch.where(ok, std, torch.ones_like(std))
    log_prob = -diff.pow(2).flatten(1).mean(1) / (2 * safe**2) - torch.log(safe) - _HALF_LOG_2PI
    return torch.where(ok, log_prob, torch.full_like(log_prob, float("nan")))


# ----------------------------------------------------------------------------- sampling loops


def _randn(shape, generator, policy: Policy) -> torch.Tensor:
    # diffusers' own helper, in the model dtype: the same generator then draws exactly what the pipeline draws.
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generator, device=policy.device, dtype=policy.dtype).float()


def sample(
    policy: Policy,
    prompts: list[str] | None,
    num_steps: int,
    *,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    kernel: str | None = None,
    eta: float = 1.0,
    cond: Conditioning | None = None,
    record: bool = True,
    decode: bool = True,
    noise_rule: str = "ddim",
    sde_steps=None,
) -> Trajectory:
    """Sample `num_steps` steps from pure noise for each prompt.

    noise: standard-normal (B, C, h, w) initial noise; x_T = noise * init_noise_sigma (1 for DDIM/LCM, sigma_max
    for Euler). Drawn from `generator` when None, in the pipeline's order, so that `pipeline(..., generator=g)` and
    `sample(..., generator=g)` see the same numbers. kernel defaults to `policy.spec.scheduler`. record=False keeps
    only `final_latents` and `images` (no per-step latents, log-probs or x0 predictions). noise_rule: the "ddim"
    kernel's std rule ("ddim" | "cps"); sde_steps: grid indices of the stochastic steps (None = all), eta 0 elsewhere.
    """
    kernel = kernel_for(policy, kernel)
    scheduler = policy.scheduler_for(kernel)
    if cond is None:
        if prompts is None:
            raise ValueError("sample needs prompts or an encoded cond")
        cond = policy.encode_prompts(prompts)
    shape = (len(cond), *policy.latent_shape)
    if noise is None:
        noise = _randn(shape, generator, policy)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {shape} (B = {len(cond)} prompts)")
    timestep_grid(scheduler, num_steps, kernel)  # sets the scheduler's sigmas, hence init_noise_sigma
    x_T = noise.to(policy.device, torch.float32) * float(getattr(scheduler, "init_noise_sigma", 1.0))
    return continue_from(
        policy, x_T, 0, num_steps, cond=cond, kernel=kernel, eta=eta, generator=generator, record=record,
        decode=decode, noise_rule=noise_rule, sde_steps=sde_steps,
    )


def continue_from(
    policy: Policy,
    x_t: torch.Tensor,
    k_start: int,
    num_steps: int | None = None,
    *,
    traj: Trajectory | None = None,
    cond: Conditioning | None = None,
    prompts: list[str] | None = None,
    kernel: str | None = None,
    eta: float | None = None,
    generator: torch.Generator | None = None,
    record: bool = True,
    decode: bool = True,
    noise_rule: str | None = None,
    sde_steps=None,
) -> Trajectory:
    """Run grid steps k_start .. N-1 of an N-step grid from latent x_t (B, C, h, w) in the kernel's
    parameterisation (e.g. `traj.latents[:, k]`, or `renoise(...)`); SPO's branching and tree search restart here.

    `traj` (the trajectory x_t came from) supplies num_steps, cond, kernel, eta, noise_rule and sde_steps unless
    given explicitly; without it eta defaults to 1. k_start is a grid index; the returned trajectory's step 0 is grid
    step k_start.
    """
    if traj is not None:
        num_steps = traj.num_steps if num_steps is None else num_steps
        cond = traj.cond if cond is None and prompts is None else cond
        kernel = kernel or traj.kernel
        eta = traj.eta if eta is None else eta
        noise_rule = noise_rule or traj.noise_rule
        sde_steps = traj.sde_steps if sde_steps is None else sde_steps
    if num_steps is None:
        raise ValueError("continue_from needs num_steps (or the trajectory x_t came from as traj=...)")
    eta = 1.0 if eta is None else eta
    kernel = kernel_for(policy, kernel)
    noise_rule = _check_noise_rule(kernel, noise_rule or "ddim")
    if sde_steps is not None:
        sde_steps = tuple(sorted({int(g) for g in sde_steps}))
        if any(not 0 <= g < num_steps for g in sde_steps):
            raise ValueError(f"sde_steps {list(sde_steps)} must be grid indices in [0, {num_steps})")
    scheduler = policy.scheduler_for(kernel)
    if cond is None:
        cond = policy.encode_prompts(prompts)
    timesteps, prev = timestep_grid(scheduler, num_steps, kernel)
    timesteps, prev = timesteps[k_start:], prev[k_start:]
    t_device = timesteps.to(policy.device)
    steps = len(timesteps)

    x = x_t.to(policy.device, torch.float32)
    latents, x0_preds, log_probs, stochastic = [x], [], [], []
    with torch.no_grad():
        for k in range(steps):
            t, t_prev = (timesteps[k], prev[k]) if kernel == FLOW else (int(timesteps[k]), int(prev[k]))
            output = policy.predict(model_input(kernel, scheduler, x, t), t_device[k], cond)
            eta_k = step_eta(eta, sde_steps, k_start + k)
            mean, std, x0_pred = transition(kernel, scheduler, output, x, t, t_prev, eta_k, noise_rule)
            is_stochastic = float(std) > 0
            # diffusers' Euler-A draws noise even for its sigma_up = 0 last step; mirror it to keep RNG streams equal.
            if is_stochastic or (kernel == "euler_ancestral" and eta_k > 0):
                noise = _randn(x.shape, generator, policy)
            x_next = mean + std * noise if is_stochastic else mean
            stochastic.append(is_stochastic)
            if record:
                latents.append(x_next)
                x0_preds.append(x0_pred)
                log_probs.append(gaussian_log_prob(x_next, mean, std))
            x = x_next
        images = policy.decode(x) if decode else None

    return Trajectory(
        latents=torch.stack(latents, dim=1) if record else None,
        timesteps=timesteps,
        prev_timesteps=prev,
        log_probs=torch.stack(log_probs, dim=1) if record else None,
        stochastic=torch.tensor(stochastic, dtype=torch.bool),
        x0_preds=torch.stack(x0_preds, dim=1) if record else None,
        images=images,
        cond=cond,
        prompts=list(cond.prompts),
        kernel=kernel,
        eta=float(eta),
        num_steps=num_steps,
        nfe=steps * policy.nfe_per_predict,
        final_latents=x,
        k_start=k_start,
        noise_rule=noise_rule,
        sde_steps=sde_steps,
    )


def add_noise(kernel: str, scheduler, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
    """Forward-diffuse x0 to timestep t in the kernel's parameterisation: sqrt(abar) x0 + sqrt(1-abar) noise
    (DDIM, LCM), or x0 + sigma noise (Euler's z = x / sqrt(abar)), or (1 - s) x0 + s noise (flow, t = s * T).
    t: int (float for flow), or (B,) tensor."""
    x0, noise = x0.float(), noise.to(x0.device, torch.float32)
    if _check_kernel(kernel) == FLOW:
        s = _flow_sigma(scheduler, t)
        return _broadcast(1 - s, x0) * x0 + _broadcast(s, x0) * noise
    tables, t = _tables(scheduler), _as_index(t)
    if _check_kernel(kernel) == "euler_ancestral":
        return x0 + _broadcast(_sigma(tables, t), x0) * noise
    abar = _abar(tables, t, tables.final_alpha_cumprod)
    return _broadcast(abar.sqrt(), x0) * x0 + _broadcast((1 - abar).sqrt(), x0) * noise


def renoise(policy: Policy, x0: torch.Tensor, traj: Trajectory, k: int, noise: torch.Tensor) -> torch.Tensor:
    """A latent for grid step k of `traj`'s grid (its timestep t_k) made from a clean estimate x0 and fresh
    noise, ready for `continue_from(policy, x_t, k, traj=traj)` (the "search over paths" restart)."""
    scheduler = policy.scheduler_for(traj.kernel)
    timesteps, _ = timestep_grid(scheduler, traj.num_steps, traj.kernel)
    t = timesteps[k] if traj.kernel == FLOW else int(timesteps[k])
    return add_noise(traj.kernel, scheduler, x0.to(policy.device), t, noise)


def transition_log_prob(policy: Policy, traj: Trajectory, k: int, *, index=None) -> torch.Tensor:
    """(B,) log-density of the recorded transition k (x_k -> x_{k+1}) under the policy's CURRENT parameters, with
    gradients (call inside `policy.reference()` for the reference model). index: a subset of the batch rows.
    NaN for a deterministic step."""
    mean, std, x_next = transition_gaussian(policy, traj, k, index=index)
    return gaussian_log_prob(x_next, mean, std)


def transition_gaussian(policy: Policy, traj: Trajectory, k: int, *, index=None):
    """(mean, std, x_next) of the recorded transition k under the policy's CURRENT parameters: the Gaussian whose
    density `transition_log_prob` evaluates at x_next (GRPO's closed-form KL needs the mean itself)."""
    if traj.latents is None:
        raise ValueError("this trajectory was sampled with record=False: no latents to score")
    latents = traj.latents if index is None else traj.latents[index]
    cond = traj.cond if index is None else traj.cond.select(index)
    scheduler = policy.scheduler_for(traj.kernel)
    t, t_prev = traj.timesteps[k], traj.prev_timesteps[k]
    x, x_next = latents[:, k], latents[:, k + 1]
    output = policy.predict(model_input(traj.kernel, scheduler, x, t), t.to(policy.device), cond)
    mean, std, _ = transition(traj.kernel, scheduler, output, x, t, t_prev, traj.step_eta(k), traj.noise_rule)
    return mean, std, x_next


def stochastic_steps(policy: Policy, num_steps: int, eta: float, kernel: str | None = None, *,
                     noise_rule: str = "ddim", sde_steps=None) -> torch.Tensor:
    """(K,) bool: which of the K transitions have std > 0 (hence a log-prob) at this kernel, grid, eta, noise rule
    and SDE window. The std of every kernel depends only on (t, t_prev, eta), so a dummy transition answers it
    before sampling."""
    kernel = kernel_for(policy, kernel)
    scheduler = policy.scheduler_for(kernel)
    timesteps, prev = timestep_grid(scheduler, num_steps, kernel)
    dummy = torch.zeros(1, 1, 1, 1)
    if kernel != FLOW:
        timesteps, prev = timesteps.tolist(), prev.tolist()  # ints
    return torch.tensor([float(transition(kernel, scheduler, dummy, dummy, t, p,
                                          step_eta(eta, sde_steps, g), noise_rule)[1]) > 0
                         for g, (t, p) in enumerate(zip(timesteps, prev))], dtype=torch.bool)


def trainable_steps(policy: Policy, num_steps: int, eta: float, kernel: str | None = None, *,
                    train_last_step: bool = True) -> torch.Tensor:
    """(K,) bool: the transitions a log-prob method trains on: the stochastic ones, minus the last when
    train_last_step=False and another stochastic step exists. The last few-step transition is nearly deterministic
    (DDIM eta 1: std ~0.03 on SD, ~0.006 on the toy), so its log-ratio is large and noisy; at K = 1 it is the only
    action and stays trainable."""
    mask = stochastic_steps(policy, num_steps, eta, kernel)
    if not train_last_step and mask[:-1].any():
        mask[-1] = False
    return mask
