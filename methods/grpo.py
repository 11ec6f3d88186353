"""GRPO for diffusion models, in its Flow-GRPO / DanceGRPO form, on the shared sampler's exact per-step log-probs.

Sources: Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL" (arXiv 2505.05470; code yifan123/flow_grpo,
`scripts/train_sd3.py`, `config/grpo.py`, `flow_grpo/stat_tracking.py`); Xue et al., "DanceGRPO" (arXiv 2505.07818;
code XueZeyue/DanceGRPO). Spec: shared/methods/grpo-nft.md §3.1-3.2.

GRPO = DDPO + a group-relative baseline + a KL to the reference + a marginal-preserving stochastic step. One epoch:
  1. Draw `groups_per_epoch` distinct prompts; for each, sample a group of G = `group_size` trajectories
     (independent initial noise x_K, or one shared x_K per group with `shared_initial_noise`, DanceGRPO's
     `--init_same_noise`). Steps inside the SDE window are stochastic, all others (always the last) take the
     deterministic ODE/DDIM-0 step, so the final image differs from the ODE sample only through the window's noise.
  2. The stochastic step (VP/DDIM form, `methods.sampling`, kernel "ddim"):
         eps_hat = eps_theta(x_k, t_k, c);  x0_hat = (x_k - sqrt(1 - abar_k) eps_hat) / sqrt(abar_k)
         sigma_k = sqrt(1 - abar_prev) sin(eta pi / 2)                          noise_rule="cps" (Flow-GRPO's CPS)
              or eta sqrt((1 - abar_prev) / (1 - abar_k)) sqrt(1 - abar_k / abar_prev)  noise_rule="ddim" (DDPO, DanceGRPO-SD)
         mu_k = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_k^2) eps_hat;   x_prev = mu_k + sigma_k z
         log pi(x_prev | x_k) = mean_D[-(x_prev - mu_k)^2 / (2 sigma_k^2)] - log sigma_k - log(2 pi) / 2
     Log-probs are per-element MEANS over the latent (Flow-GRPO's convention, which the clip range 1e-4 is calibrated
     to; DDPO/SDPO here use the same).
  3. r_i = R(x0_i, c);  A_i = clip((r_i - mean_group(r)) / (std + 1e-4), +-adv_clip_max), std = the group's
     (population) std, or that of every reward of the epoch with `global_std` (Flow-GRPO's default). The same A_i is
     used at every trained step. `zero_std_ratio` = fraction of groups whose rewards are all equal (no signal).
  4. For each trained step k (the SDE window), PPO-clip plus a closed-form KL to the reference (adapters off):
         rho = exp(log pi_theta - log pi_old)
         L   = mean_i max(-A_i rho_i, -A_i clip(rho_i, 1 - eps, 1 + eps)) + beta KL,
         KL  = mean_i mean_D (mu_theta - mu_ref)^2 / (2 sigma_k^2)
     (both Gaussians share sigma_k, so this is their exact KL, per element). Gradients accumulate over the trained
     steps and the micro-batches of one update; `updates_per_epoch` optimizer steps per epoch (Flow-GRPO: 2).

Where code and paper differ, and choices made here:
- The step into t_0 is deterministic under both rules when abar_final = 1; SD's final_alpha_cumprod = abar[0] leaves a
  std of ~0.03 there. Flow-GRPO drops it through `timestep_fraction = 0.99` (int(0.99 K) = K - 1 trained steps;
  issue #62: its log-prob overflows). Here the last step is always outside the SDE window, hence deterministic and
  never trained, so a 1-step model has nothing to train: `min_train_steps()` = 2 (K = 1 cells are n/a); train at
  K >= 2 and evaluate at S = 1, which is exactly stepbench's cross-step matrix.
- SDE window (Flow-GRPO-Fast, MixGRPO, Flow-Factory `sde_steps`): `sde_window_size` = w > 0 puts the stochastic step on
  w consecutive steps whose start is drawn per epoch uniformly from `sde_window_range` (default: any start that keeps
  the window before the last step); 0 = every step but the last (Flow-GRPO). Only window steps are trained.
- Flow-GRPO keeps an EMA of the weights for its evaluation images; stepbench evaluates the trained weights themselves,
  like every other row.
- The ratio is exactly 1 on the first update after sampling only when training micro-batches have the sampler's batch
  size (CPU kernels round differently across batch sizes; DanceGRPO #57); `sample_batch_size` must equal
  `train_batch_size`, and the first update's max |rho - 1| is logged as `train/first_update_ratio_dev`.
- What the spec is unsure of: Flow-GRPO's stat tracker groups by prompt string across the epoch; prompts here are drawn
  without replacement, so a prompt is exactly one group. The KL weight is 0.04 for rule-based rewards (GenEval, OCR)
  and 0.01 for PickScore in the official configs; the default here is 0.01 (the real grids' rewards are all learned
  preference models).

Flow-matching models (FLUX, SD3; a later issue): the window, advantages and loss stay as they are; only the step
changes, to Flow-GRPO's SDE step (`flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`): sigma_t = a sqrt(t / (1 - t))
(a = 0.7), mean = x (1 + sigma_t^2 dt / (2 t)) + v (1 + sigma_t^2 (1 - t) / (2 t)) dt, std = sigma_t sqrt(-dt). It plugs
in as a further kernel of `methods.sampling.transition` returning (mean, std, x0_hat), after which
`transition_gaussian` / `transition_log_prob` and everything below are unchanged.

Compute (exact, checked before each epoch starts; the budget rule of DDPO): sampling N K npp NFEs (N = G x groups),
N reward calls, and per inner epoch N w npp gradient NFEs, doubled when beta > 0 (the reference's forward at every
trained step is booked as a gradient NFE, as Diffusion-DPO does).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from methods import sampling
from methods.common import (
    Budget,
    Deviation,
    Task,
    Tracker,
    build_optimizer,
    check_choice,
    check_positive,
    clip_grad_norm,
    default_generate,
    generator,
    load_checkpoint,
    progress,
    sample_nfe,
    save_checkpoint,
)
from methods.policy import Conditioning

ADV_EPS = 1e-4
"""Added to the reward std before dividing (Flow-GRPO's stat tracker)."""


@dataclass
class Config:
    """GRPO (Flow-GRPO). Defaults: flow_grpo `config/grpo.py::pickscore_sd3` (G 24 x 48 groups, 2 updates an epoch,
    KL 0.01, LoRA r 32 / alpha 64, lr 3e-4) with the CPS step at eta 0.8 (Flow-GRPO README) on the VP models here."""

    # --- sampling ---
    group_size: int = 24
    """G: trajectories per prompt (Flow-GRPO `num_image_per_prompt` 24; DanceGRPO 16, FLUX 12)."""
    groups_per_epoch: int = 48
    """distinct prompts drawn per epoch, one group each (Flow-GRPO: 48)."""
    shared_initial_noise: bool = False
    """one initial noise x_K per group (DanceGRPO `--init_same_noise`): all variation from the SDE noise; False =
    independent x_K per trajectory (Flow-GRPO)."""
    sample_batch_size: int = 8
    """trajectories per sampler call; must equal train_batch_size so the first ratio is exactly 1 (memory knob)."""
    kernel: str = "ddim"
    """sampling kernel with exact Gaussian log-probs ("ddim": the VP/DDIM step of the spec)."""
    noise_rule: str = "cps"
    """"cps": sigma_k = sqrt(1 - abar_prev) sin(eta pi / 2) (Flow-GRPO's coefficient-preserving step); "ddim": DDIM-eta."""
    eta: float = 0.8
    """noise level of the stochastic step (CPS: 0.8, Flow-GRPO README; DDIM-eta: 1 as DanceGRPO-SD)."""
    sde_window_size: int = 0
    """w: stochastic (and trained) steps per trajectory, consecutive; 0 = every step but the last (Flow-GRPO)."""
    sde_window_range: tuple[int, int] | None = None
    """[lo, hi): the window starts at a step drawn per epoch from lo .. hi - w; None = anywhere before the last step."""
    # --- advantages ---
    global_std: bool = True
    """divide by the std of every reward of the epoch instead of the group's (Flow-GRPO `global_std`: True)."""
    adv_clip_max: float = 5.0
    """advantages are clipped to +- this (Flow-GRPO: 5)."""
    # --- update ---
    clip_range: float = 1e-4
    """PPO epsilon on the ratio of per-element-mean likelihoods (Flow-GRPO: 1e-4)."""
    kl_beta: float = 0.01
    """beta: weight of the closed-form KL to the reference (Flow-GRPO: 0.01 PickScore, 0.04 GenEval/OCR; DanceGRPO 0)."""
    num_inner_epochs: int = 1
    """passes over each epoch's trajectories (Flow-GRPO: 1)."""
    train_batch_size: int = 8
    """trajectories per micro-batch (Flow-GRPO: 9 per GPU); gradients accumulate over the trained steps too."""
    updates_per_epoch: int = 2
    """optimizer steps per inner epoch (Flow-GRPO: gradient_accumulation_steps = batches per epoch / 2)."""
    # --- optimizer ---
    optimizer: str = "adamw"
    """"adamw" | "adam" | "sgd" (Flow-GRPO: AdamW)."""
    lr: float = 3e-4
    """learning rate (Flow-GRPO: 3e-4 with LoRA)."""
    adam_beta1: float = 0.9
    """Adam beta1 (Flow-GRPO: 0.9)."""
    adam_beta2: float = 0.999
    """Adam beta2 (Flow-GRPO: 0.999)."""
    adam_eps: float = 1e-8
    """Adam epsilon (Flow-GRPO: 1e-8)."""
    weight_decay: float = 1e-4
    """AdamW weight decay (Flow-GRPO: 1e-4)."""
    max_grad_norm: float = 1.0
    """gradient-norm clip before every optimizer step (Flow-GRPO: 1.0)."""
    # --- policy (read by the harness when it builds the Policy) ---
    lora_rank: int = 32
    """LoRA rank (Flow-GRPO: 32)."""
    lora_alpha: float = 64.0
    """LoRA alpha (Flow-GRPO: 64)."""
    full_finetune: bool = False
    """train every denoiser weight instead of LoRA adapters (DanceGRPO; the toy recipes)."""
    # --- run length / checkpoints ---
    num_epochs: int | None = None
    """upper bound on epochs; None = until the NFE budget is spent (Flow-GRPO runs until stopped)."""
    checkpoint_path: str | None = None
    """full-state checkpoint file; resumed from when it exists, rewritten every `checkpoint_every` epochs."""
    checkpoint_every: int = 1
    """epochs between checkpoints (when checkpoint_path is set)."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # lr: the validation probe of 2026-12-06 (bench/conf/tuning/toy/val-probe.md); it supersedes any lr below.
        # Toy world: DDPO's toy optimizer (micro-batches of 16, an update each, Adam 3e-5, full fine-tune), so the
        # rows differ in the algorithm only; 16 groups x G = 16 = 256 trajectories an epoch as DDPO's 32 x 8 (the toy
        # set has 31 training prompts, and a group needs its own prompt). Probes (K = 4, 20k NFEs, gain in toy-all at
        # S = 4 over base on the validation split, n = 1,024 paired samples, seed 0) are listed below.
        # 2026-12-06, toy-turbo weights before the world rebuild 2de9a2a (31 train / 10 val prompts), base 0.713 on
        # the 10 validation prompts (eval noise seed 1234), one probe at a time on a
        # shared box:
        # - this preset (CPS eta 0.8, kl_beta 0.01, 7 epochs): +0.017 (SE 0.012, 1.3 SE);
        # - noise_rule="ddim", eta 1 (DDPO's step): +0.021 (SE 0.012, 1.8 SE);
        # - kl_beta 0 (DanceGRPO; 11 epochs, the reference forwards saved): -0.005 (SE 0.014).
        # None reaches 3 SE on this one seed; the preset keeps Flow-GRPO's CPS step and KL.
        "toy": dict(group_size=16, groups_per_epoch=16, sample_batch_size=16, train_batch_size=16,
                    updates_per_epoch=16, optimizer="adam", lr=1e-5, weight_decay=0.0, full_finetune=True),
    }
    non_semantic: ClassVar[tuple[str, ...]] = ("sample_batch_size", "checkpoint_path", "checkpoint_every")
    """fields that do not change the result (excluded from a cell's identity)."""

    def __post_init__(self):
        check_positive(self, "group_size", "groups_per_epoch", "sample_batch_size", "eta", "adv_clip_max",
                       "clip_range", "num_inner_epochs", "train_batch_size", "updates_per_epoch", "lora_rank",
                       "lora_alpha", "num_epochs", "checkpoint_every")
        check_positive(self, "sde_window_size", "kl_beta", "lr", "weight_decay", "max_grad_norm", allow_zero=True)
        check_choice("kernel", self.kernel, ("ddim",))
        check_choice("noise_rule", self.noise_rule, sampling.NOISE_RULES)
        check_choice("optimizer", self.optimizer, ("adamw", "adam", "sgd"))
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (a group of one has advantage 0); got {self.group_size}")
        if self.noise_rule == "cps" and not 0.0 < self.eta <= 1.0:
            raise ValueError(f"eta must be in (0, 1] with noise_rule='cps' (sin(eta pi / 2)); got {self.eta}")
        n = self.samples_per_epoch
        if n % (self.train_batch_size * self.updates_per_epoch):
            raise ValueError(f"trajectories per epoch ({n} = group_size x groups_per_epoch) must be a multiple of "
                             f"train_batch_size x updates_per_epoch = {self.train_batch_size * self.updates_per_epoch}")
        if self.sde_window_range is not None:
            lo, hi = self.sde_window_range
            if not 0 <= lo < hi:
                raise ValueError(f"sde_window_range must be [lo, hi) with 0 <= lo < hi; got {self.sde_window_range}")

    @property
    def samples_per_epoch(self) -> int:
        return self.group_size * self.groups_per_epoch

    def min_train_steps(self) -> int:
        """K >= 2: the last step is deterministic (outside the SDE window), so K = 1 leaves nothing to train."""
        return 2

    def window_starts(self, num_steps: int) -> list[int]:
        """The steps an SDE window may start at for a K-step trajectory (the last step never joins it)."""
        width = self.window_width(num_steps)
        lo, hi = self.sde_window_range if self.sde_window_range is not None else (0, num_steps - 1)
        starts = [s for s in range(lo, min(hi, num_steps - 1) - width + 1)]
        if not starts:
            raise ValueError(f"no SDE window of {width} step(s) fits in range {self.sde_window_range} before the last "
                             f"of K = {num_steps} steps")
        return starts

    def window_width(self, num_steps: int) -> int:
        if num_steps < self.min_train_steps():
            raise ValueError(f"grpo trains at K >= {self.min_train_steps()} only (the last step is deterministic); "
                             f"got K = {num_steps}")
        width = self.sde_window_size or num_steps - 1
        if width > num_steps - 1:
            raise ValueError(f"sde_window_size {self.sde_window_size} > the K - 1 = {num_steps - 1} steps before the "
                             f"last one")
        return width

    @classmethod
    def search_space(cls) -> dict[str, tuple]:
        return {
            "lr": ("log_float", 1e-5, 1e-3),
            "kl_beta": ("categorical", [0.0, 0.004, 0.01, 0.04]),
            "eta": ("float", 0.3, 1.0),
            "clip_range": ("log_float", 3e-5, 1e-3),
            "global_std": ("categorical", [True, False]),
        }


# ---------------------------------------------------------------------------------------------------------------
# Pure functions: advantages and the loss
# ---------------------------------------------------------------------------------------------------------------


def group_relative_advantages(rewards: torch.Tensor, group_size: int, *, global_std: bool,
                              adv_clip_max: float) -> tuple[torch.Tensor, float]:
    """(A (N,) float32, zero_std_ratio) for rewards (N,) laid out group by group ([g0] * G + [g1] * G + ...).

        A_i = clip((r_i - mean_{group(i)} r) / (std + 1e-4), -adv_clip_max, adv_clip_max)
        std = population std of group(i), or of all N rewards when global_std (Flow-GRPO's stat tracker)
    zero_std_ratio: the fraction of groups whose rewards are all equal.
    Worked values (G = 2): rewards [1, 3, 2, 2] -> group std [1, 0], global std 0.7071; group: [-0.9999, 0.9999, 0, 0];
    global: [-1.4140, 1.4140, 0, 0]; zero_std_ratio 0.5.
    """
    values = torch.as_tensor(rewards, dtype=torch.float64).detach().cpu().reshape(-1)
    if values.numel() % group_size:
        raise ValueError(f"{values.numel()} rewards do not split into groups of {group_size}")
    groups = values.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    group_std = groups.std(dim=1, unbiased=False, keepdim=True)
    std = values.std(unbiased=False) if global_std else group_std
    advantages = (centred / (std + ADV_EPS)).clamp(-adv_clip_max, adv_clip_max).reshape(-1)
    zero_std_ratio = float((groups == groups[:, :1]).all(dim=1).double().mean())
    return advantages.to(torch.float32), zero_std_ratio


def loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, *, clip_range: float,
         kl_beta: float = 0.0, mean: torch.Tensor | None = None, ref_mean: torch.Tensor | None = None,
         std: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss at one trained step for a batch (B,) (spec §3.1.6):

        rho  = exp(log pi_theta - log pi_old)                                  (per-element-MEAN log-probs)
        L_pg = mean_i max(-A_i rho_i, -A_i clip(rho_i, 1 - eps, 1 + eps)),   eps = clip_range
        KL   = mean_i mean_D (mu_theta - mu_ref)^2 / (2 sigma^2)               (mean, ref_mean (B, ...); sigma 0-d or (B, 1, ..))
        L    = L_pg + kl_beta KL

    Worked values: A = [1, -2], log rho = [5e-5, 0], eps 1e-4 -> L_pg = (-1.00005 + 2) / 2 = 0.499975; with
    mu_theta - mu_ref = 0.1 everywhere, sigma 0.5, beta 0.04: KL = 0.01 / 0.5 = 0.02, L = 0.500775.
    Diagnostics (no grad): approx_kl = 0.5 mean (log rho)^2, clipfrac, ratio, ratio_dev_max = max |rho - 1|, kl.
    """
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    value = torch.maximum(unclipped, clipped).mean()
    kl = torch.zeros((), dtype=value.dtype, device=value.device)
    if kl_beta > 0:
        if mean is None or ref_mean is None or std is None:
            raise ValueError("kl_beta > 0 needs mean, ref_mean and std")
        std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
        kl = ((mean - ref_mean) ** 2 / (2 * std**2)).flatten(1).mean(1).mean()
        value = value + kl_beta * kl
    with torch.no_grad():
        info = {
            "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
            "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
            "ratio": ratio.detach().mean(),
            "ratio_dev_max": (ratio.detach() - 1.0).abs().max(),
            "kl": kl.detach(),
        }
    return value, info


# ---------------------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------------------


class GRPOMethod:
    """GRPO (Flow-GRPO) on the shared sampler; evaluation uses the deterministic default sampler."""

    name: ClassVar[str] = "grpo"
    label: ClassVar[str] = "GRPO (Flow-GRPO)"
    Config = Config
    paper: ClassVar[str] = "Liu et al., Flow-GRPO: Training Flow Matching Models via Online RL, arXiv 2505.05470"
    deviations: ClassVar[tuple[Deviation, ...]] = (
        Deviation("the VP/DDIM stochastic step with CPS noise sqrt(1 - abar_prev) sin(eta pi / 2) (paper: the flow-matching "
                  "SDE step, sigma_t = 0.7 sqrt(t / (1 - t)))",
                  "SD-Turbo, SDXL-Turbo and the toy are VP epsilon/v models; CPS is Flow-GRPO's own marginal-preserving "
                  "rule. On the flow models (flux-schnell, sd35-large-turbo) the same rule runs on the flow kernel; "
                  "method.noise_rule=sde is the paper's SDE step there", "methods/sampling.py noise_rule"),
        Deviation("the last step is deterministic and never trained, so K = 1 cells are n/a (paper: timestep_fraction "
                  "0.99 drops it from the loss at 10 steps)", "a 1-step model has no stochastic transition left to "
                  "train; it is evaluated at S = 1 after training at K >= 2", "methods/grpo.py Config.min_train_steps"),
        Deviation("evaluation uses the trained weights (paper: an EMA of them)", "every row is evaluated the same way",
                  "methods/grpo.py (module docstring)"),
        Deviation("toy recipe: 16 prompts x G = 16, Adam lr 1e-5, full fine-tune, an update per 16 trajectories (paper: "
                  "48 x 24, AdamW 3e-4, LoRA r32, 2 updates an epoch)", "DDPO's toy settings, so the rows differ only "
                  "in the algorithm; a 1M-parameter denoiser", "methods/grpo.py Config.presets['toy']"),
    )

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else Config()

    def generate(self, policy, prompts: list[str], num_steps: int, *, noise: torch.Tensor,
                 budget: Budget | None = None) -> tuple[torch.Tensor, int]:
        return default_generate(policy, prompts, num_steps, noise=noise, budget=budget)

    def epoch_cost(self, num_steps: int, nfe_per_predict: int) -> dict[str, int]:
        """Exact cost of one epoch: sampling N K npp NFEs; gradient NFEs N w npp per inner epoch (w = the window's
        trained steps), x2 with the KL (the reference's forwards); N reward calls."""
        cfg, n = self.config, self.config.samples_per_epoch
        per_step = nfe_per_predict * (2 if cfg.kl_beta > 0 else 1)
        return {"sample_nfe": sample_nfe(n, num_steps, nfe_per_predict),
                "grad_nfe": cfg.num_inner_epochs * n * cfg.window_width(num_steps) * per_step,
                "reward_calls": n}

    def train(self, policy, task: Task, budget: Budget, tracker: Tracker) -> None:
        cfg = self.config
        num_steps, npp = int(task.train_steps), int(policy.nfe_per_predict)
        cfg.window_starts(num_steps)  # K and the window are checked before any compute
        if cfg.groups_per_epoch > len(task.prompts):
            raise ValueError(f"groups_per_epoch ({cfg.groups_per_epoch}) > the number of training prompts "
                             f"({len(task.prompts)}): each group needs its own prompt")
        if cfg.sample_batch_size != cfg.train_batch_size:
            raise ValueError(f"sample_batch_size ({cfg.sample_batch_size}) must equal train_batch_size "
                             f"({cfg.train_batch_size}): the first update's ratio is exactly 1 only at equal shapes")
        cost = self.epoch_cost(num_steps, npp)
        epoch_nfe = cost["sample_nfe"] + cost["grad_nfe"]
        if budget.max_nfe is None and cfg.num_epochs is None:
            raise ValueError("unbounded run: give the Budget a max_nfe or set num_epochs")
        if budget.max_nfe is not None and epoch_nfe > budget.max_nfe:
            raise ValueError(f"the budget ({budget.max_nfe} NFEs) is smaller than one GRPO epoch ({epoch_nfe} NFEs: "
                             f"{cost}); lower group_size x groups_per_epoch or raise the budget")
        if budget.max_reward_calls is not None and cost["reward_calls"] > budget.max_reward_calls:
            raise ValueError(f"the reward-call budget ({budget.max_reward_calls}) is smaller than one GRPO epoch "
                             f"({cost['reward_calls']} images)")

        params = [p for p in policy.trainable_parameters() if p.requires_grad]
        optimizer = build_optimizer(params, cfg)
        generators = {"prompt": generator(task.seed), "shuffle": generator(task.seed + 1),
                      "noise": generator(task.seed + 2, policy.device), "window": generator(task.seed + 3)}
        epoch = 0
        if cfg.checkpoint_path and Path(cfg.checkpoint_path).exists():
            state = load_checkpoint(cfg.checkpoint_path, policy=policy, optimizer=optimizer, config=cfg,
                                    budget=budget, generators=generators)
            epoch = state["step"]

        max_epochs = cfg.num_epochs if cfg.num_epochs is not None else float("inf")
        affordable = epoch + budget.remaining_nfe // epoch_nfe if budget.max_nfe is not None else float("inf")
        with progress(tracker, int(min(max_epochs, affordable)), "grpo epochs") as advance:
            while epoch < max_epochs and budget.fits(nfe=epoch_nfe, reward_calls=cost["reward_calls"]):
                metrics = self._epoch(policy, task, budget, optimizer, params, generators)
                epoch += 1
                metrics["train/epoch"] = float(epoch)
                tracker.log_metrics(metrics, step=budget.total_nfe)
                advance(1)
                if cfg.checkpoint_path and epoch % cfg.checkpoint_every == 0:
                    save_checkpoint(cfg.checkpoint_path, policy=policy, optimizer=optimizer, step=epoch, config=cfg,
                                    budget=budget, generators=generators)

    # -----------------------------------------------------------------------------------------------------------
    def sde_window(self, num_steps: int, window_gen: torch.Generator) -> tuple[int, ...]:
        """The grid steps that are stochastic (and trained) this epoch."""
        starts = self.config.window_starts(num_steps)
        start = starts[int(torch.randint(len(starts), (1,), generator=window_gen))]
        return tuple(range(start, start + self.config.window_width(num_steps)))

    @torch.no_grad()
    def _sample(self, policy, task: Task, prompts: list[str], window: tuple[int, ...],
                noise_gen: torch.Generator) -> tuple[sampling.Trajectory, torch.Tensor]:
        """Roll out every group with the current policy in chunks and score the final images."""
        cfg = self.config
        shape = (len(prompts) // cfg.group_size, *policy.latent_shape)
        if cfg.shared_initial_noise:  # one x_K per group, repeated over its G members
            noise = torch.randn(shape, generator=noise_gen, device=noise_gen.device).repeat_interleave(
                cfg.group_size, dim=0)
        else:
            noise = torch.randn((len(prompts), *shape[1:]), generator=noise_gen, device=noise_gen.device)
        trajs, rewards = [], []
        for start in range(0, len(prompts), cfg.sample_batch_size):
            batch = prompts[start:start + cfg.sample_batch_size]
            traj = sampling.sample(policy, batch, task.train_steps, generator=noise_gen, kernel=cfg.kernel,
                                   eta=cfg.eta, noise_rule=cfg.noise_rule, sde_steps=window,
                                   noise=noise[start:start + len(batch)].to(policy.device))
            trajs.append(traj)
            rewards.append(torch.as_tensor(task.reward(traj.images, batch)).detach().float().cpu().reshape(-1))
        traj = dataclasses.replace(
            trajs[0],
            latents=torch.cat([t.latents for t in trajs]),  # (N, K+1, C, h, w)
            log_probs=torch.cat([t.log_probs for t in trajs]),  # (N, K)
            x0_preds=None, images=None, final_latents=None,
            cond=Conditioning.cat([t.cond for t in trajs]), prompts=list(prompts),
        )
        return traj, torch.cat(rewards)

    def _epoch(self, policy, task, budget, optimizer, params, generators) -> dict[str, float]:
        cfg = self.config
        num_steps, npp = int(task.train_steps), int(policy.nfe_per_predict)
        t0 = time.perf_counter()
        picks = torch.randperm(len(task.prompts), generator=generators["prompt"])[:cfg.groups_per_epoch].tolist()
        prompts = [task.prompts[i] for i in picks for _ in range(cfg.group_size)]  # group by group
        window = self.sde_window(num_steps, generators["window"])
        traj, rewards = self._sample(policy, task, prompts, window, generators["noise"])
        n = len(prompts)
        budget.spend(sample_nfe=sample_nfe(n, num_steps, npp), reward_calls=n)
        if traj.stochastic.nonzero().flatten().tolist() != list(window):
            raise RuntimeError(f"sampler's stochastic steps {traj.stochastic.tolist()} are not the window {window}")
        if not torch.isfinite(traj.log_probs[:, list(window)]).all():
            raise RuntimeError("non-finite sampling log-prob inside the SDE window")
        advantages, zero_std_ratio = group_relative_advantages(rewards, cfg.group_size, global_std=cfg.global_std,
                                                               adv_clip_max=cfg.adv_clip_max)
        advantages = advantages.to(policy.device)
        sample_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        per_update = n // cfg.updates_per_epoch // cfg.train_batch_size  # micro-batches per optimizer step
        terms = len(window) * per_update
        sums = dict.fromkeys(("loss", "approx_kl", "clipfrac", "ratio", "kl"), 0.0)
        grad_norms, first_update_dev, count = [], 0.0, 0
        per_step = npp * (2 if cfg.kl_beta > 0 else 1)
        for _ in range(cfg.num_inner_epochs):
            order = torch.randperm(n, generator=generators["shuffle"])
            for mb, rows in enumerate(order.split(cfg.train_batch_size)):
                if mb % per_update == 0:
                    optimizer.zero_grad(set_to_none=True)
                for k in window:
                    mean, std, x_next = sampling.transition_gaussian(policy, traj, k, index=rows)
                    log_prob = sampling.gaussian_log_prob(x_next, mean, std)  # (b,)
                    ref_mean = None
                    if cfg.kl_beta > 0:
                        with policy.reference():
                            ref_mean, _, _ = sampling.transition_gaussian(policy, traj, k, index=rows)
                    value, info = loss(log_prob, traj.log_probs[rows, k].to(log_prob), advantages[rows],
                                       clip_range=cfg.clip_range, kl_beta=cfg.kl_beta, mean=mean,
                                       ref_mean=ref_mean, std=std)
                    (value / terms).backward()  # the mean over the update's micro-batches and trained steps
                    for key in sums:
                        sums[key] += float(value.detach()) if key == "loss" else float(info[key])
                    count += 1
                    if not grad_norms:
                        first_update_dev = max(first_update_dev, float(info["ratio_dev_max"]))
                budget.spend(grad_nfe=len(rows) * len(window) * per_step)
                if (mb + 1) % per_update == 0:
                    grad_norms.append(clip_grad_norm(params, cfg.max_grad_norm))
                    optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        metrics = {f"train/{key}": value / count for key, value in sums.items()}
        metrics.update({
            "train/reward_mean": float(rewards.mean()),
            "train/reward_std": float(rewards.std(unbiased=False)),
            "train/zero_std_ratio": zero_std_ratio,
            "train/advantage_abs_mean": float(advantages.abs().mean()),
            "train/first_update_ratio_dev": first_update_dev,
            "train/grad_norm": sum(grad_norms) / len(grad_norms),
            "train/updates": float(len(grad_norms)),
            "train/window_start": float(window[0]),
            "train/sample_seconds": sample_seconds,
            "train/update_seconds": time.perf_counter() - t1,
        })
        if not all(math.isfinite(v) for v in metrics.values()):
            raise RuntimeError(f"non-finite GRPO metrics: {metrics}")
        return metrics


