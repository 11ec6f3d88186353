"""DiffusionNFT: online negative-aware fine-tuning on the forward process.

Source: Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process" (arXiv 2509.16117; code
NVlabs/DiffusionNFT, `scripts/train_nft_sd3.py` L860-1040, `config/nft.py`, `config/base.py`). Spec:
shared/methods/grpo-nft.md §3.3.

No log-probs and no stochastic sampler: NFT trains on clean samples, through the denoising loss of the forward process,
with the reward deciding whether the current model should move toward a sample (positive) or away from it (negative).
One epoch:
  1. Collect: draw `groups_per_epoch` distinct prompts and a group of G samples each with the deterministic sampler
     (eta 0, the model's own kernel) of the OLD policy, x0 = the final latents; score them.
  2. Optimality: A = group-relative advantage (GRPO's, `global_std` by default), clipped to +-adv_clip_max, and
         r = clip(A / adv_clip_max / 2 + 0.5, 0, 1)           (= A / 10 + 0.5 with the official clip 5)
  3. For each sample and each of its trained timesteps t (a random permutation of the K-step sampler grid's own
     timesteps), fresh noise eps, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, and three predictions at x_t:
     the current model's (with grad), the old policy's and, for the KL, the reference's (no grad). With the old
     prediction frozen, the implicit positive and negative policies are
         v+ = b v_theta + (1 - b) v_old,        v- = (1 + b) v_old - b v_theta                 (b = `beta`)
     and their clean-sample predictions x0+- (flow matching: x0 = x_t - t v). The loss (per sample, means over D):
         L = adv_clip_max [ r ||x0+ - x0||^2 / w+ + (1 - r) ||x0- - x0||^2 / w- ] / b  +  kl_beta ||v_theta - v_ref||^2
     with the adaptive weights w+- = max(mean_D |x0+- - x0|, 1e-5) (detached). Averaged over samples; the trained
     timesteps' gradients accumulate into `updates_per_epoch` optimizer steps.
  4. Old policy: after the epoch, old <- d old + (1 - d) theta with d = min(rate max(step - flat, 0), d_max) (0 before
     `flat`), step = optimizer steps so far; official `decay_type` 1: rate 0.001, d_max 0.5, flat 0 (OCR's type 2:
     flat 75, rate 0.0075, d_max 0.999). d = 0 makes the old policy the current one.

VP models (what stepbench has: toy-turbo predicts v, SD-Turbo and SDXL-Turbo epsilon). The official loss lives in x0
space, so no velocity is needed: for a fixed x_t = sqrt(a) x0 + sqrt(1 - a) eps the clean-sample prediction is affine in
the network output o with a coefficient shared by every o,
    epsilon:  x0(o) = (x_t - sqrt(1 - a) o) / sqrt(a)          v:  x0(o) = sqrt(a) x_t - sqrt(1 - a) o
(`methods.sampling.x0_and_eps`, the schedulers' own formulas), hence x0(b o_theta + (1 - b) o_old) = b x0(o_theta) +
(1 - b) x0(o_old): the implicit policies are mixed in the model's own parameterisation and the same mix holds for their
x0-predictions (`implicit_x0`; tested on hand values). In flow matching x0 - x0_hat = t (v_hat - v) with v = eps - x0;
here x0 - x0_hat = sqrt(1 - a) / sqrt(a) (eps_hat - eps) for an epsilon model and sqrt(1 - a) (v_hat - v) for a v model,
so the loss is the same x0 error and the adaptive weight absorbs the scale factor. The KL term is on the raw outputs
(epsilon or v) as the official one is on raw velocities.

Flow-matching models (FLUX, SD3; a later issue) plug in at the same two places: the forward process becomes
x_t = (1 - t) x0 + t eps and the converter x0(v) = x_t - t v, again affine in v, so `implicit_x0`, `loss`, the EMA and
the loop are unchanged (and x0+- = x_t - t v+- is then literally the official code's form).

Timesteps, and why they are restricted (the spec's point): the official code already trains on the sampler's own
timesteps (its 10-step grid). That matters more here: SD-Turbo / SDXL-Turbo are adversarially distilled on the 4
trailing timesteps {999, 749, 499, 249}; the forward-process loss at other t would fit the network where the distilled
model was never trained and where no few-step evaluation ever queries it. So t is drawn from the training step count
K's own grid (K = 1: t = 999 only, a 1-step model trains at its one timestep, unlike GRPO, which needs K >= 2).

Where code and paper differ, and choices made here:
- The official `timestep_fraction` 0.99 trains int(0.99 x 10) = 9 of 10 timesteps per sample; at K <= 4 it would drop
  a whole timestep (at K = 1 all of them), so the default here is 1.0 (every sampler timestep).
- The official sampler is DPM2 (deterministic, 10 steps, CFG 1) and evaluation uses an EMA of the weights; here the
  model's own deterministic few-step sampler collects, and evaluation uses the trained weights, like every other row.
- The policy loss is multiplied by adv_clip_max (5) in the code, not in the paper; kept.
- What the spec is unsure of: the "adaptive weighting" is the code's (issue #13 reports that a plain velocity loss
  also works); the toy model's v loss is not re-weighted beyond it.

Compute (exact, checked before each epoch): sampling N K npp NFEs, N reward calls; per inner epoch N T npp (2 + [kl_beta
> 0]) gradient NFEs (T = trained timesteps per sample: the current model's forward+backward, the old policy's forward
and the reference's forward, all booked as gradient NFEs as Diffusion-DPO does).
"""

from __future__ import annotations

import contextlib
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
from methods.grpo import group_relative_advantages

WEIGHT_FLOOR = 1e-5
"""Lower clip of the adaptive weights (official code)."""


@dataclass
class Config:
    """DiffusionNFT. Defaults: NVlabs/DiffusionNFT `config/nft.py` (SD3.5-M GenEval/PickScore: G 24 x 48 groups, one
    update an epoch, beta 1, KL 1e-4, decay_type 1) and `config/base.py` (AdamW 3e-4, LoRA r 32 / alpha 64)."""

    # --- collection ---
    group_size: int = 24
    """G: samples per prompt (official: 24)."""
    groups_per_epoch: int = 48
    """distinct prompts drawn per epoch, one group each (official: 48)."""
    sample_batch_size: int = 8
    """samples per sampler call (memory only)."""
    global_std: bool = True
    """divide advantages by the std of every reward of the epoch instead of the group's (official: True)."""
    adv_clip_max: float = 5.0
    """advantages clipped to +- this; r = A / adv_clip_max / 2 + 0.5; the policy loss is scaled by it (official: 5)."""
    # --- loss ---
    beta: float = 1.0
    """b: strength of the implicit guidance v+- (official: 1; 0.1 for OCR)."""
    kl_beta: float = 1e-4
    """weight of ||v_theta - v_ref||^2 (official `train.beta`: 1e-4)."""
    timestep_fraction: float = 1.0
    """fraction of the K sampler timesteps trained per sample, a random subset (official 0.99 of 10; see the module)."""
    # --- old policy ---
    old_decay_rate: float = 0.001
    """d = min(rate (step - flat), d_max): the old policy's EMA decay per optimizer step (decay_type 1: 0.001)."""
    old_decay_max: float = 0.5
    """d_max (decay_type 1: 0.5; OCR's type 2: 0.999)."""
    old_decay_flat: int = 0
    """optimizer steps before the decay starts rising (d = 0: old = current) (decay_type 1: 0; type 2: 75)."""
    # --- update ---
    num_inner_epochs: int = 1
    """passes over each epoch's samples (official: 1)."""
    train_batch_size: int = 8
    """samples per micro-batch (official: 9 per GPU)."""
    updates_per_epoch: int = 1
    """optimizer steps per inner epoch (official `gradient_step_per_epoch`: 1; OCR 2)."""
    # --- optimizer ---
    optimizer: str = "adamw"
    """"adamw" | "adam" | "sgd" (official: AdamW)."""
    lr: float = 3e-4
    """learning rate (official: 3e-4 with LoRA)."""
    adam_beta1: float = 0.9
    """Adam beta1 (official: 0.9)."""
    adam_beta2: float = 0.999
    """Adam beta2 (official: 0.999)."""
    adam_eps: float = 1e-8
    """Adam epsilon (official: 1e-8)."""
    weight_decay: float = 1e-4
    """AdamW weight decay (official: 1e-4)."""
    max_grad_norm: float = 1.0
    """gradient-norm clip before every optimizer step (official: 1.0)."""
    # --- policy (read by the harness when it builds the Policy) ---
    lora_rank: int = 32
    """LoRA rank (official: 32)."""
    lora_alpha: float = 64.0
    """LoRA alpha (official: 64)."""
    full_finetune: bool = False
    """train every denoiser weight instead of LoRA adapters (the toy recipes)."""
    # --- run length / checkpoints ---
    num_epochs: int | None = None
    """upper bound on epochs; None = until the NFE budget is spent (official: runs until stopped)."""
    checkpoint_path: str | None = None
    """full-state checkpoint file (adapters, old policy, optimizer, RNGs); resumed from when it exists."""
    checkpoint_every: int = 1
    """epochs between checkpoints (when checkpoint_path is set)."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # lr: the validation probe of 2026-12-06 (bench/conf/tuning/toy/val-probe.md); it supersedes any lr below.
        # Toy world: GRPO's toy batch shape (16 groups x G = 16, micro-batches of 16, an update each, Adam 3e-5, full
        # fine-tune). Probes (K = 4, 20k NFEs, gain in toy-all at S = 4 over base on the validation split, n = 1,024
        # paired samples, seed 0) are listed below.
        # 2026-12-06, toy-turbo weights before the world rebuild 2de9a2a (31 train / 10 val prompts), base 0.713 on
        # the 10 validation prompts (eval noise seed 1234):
        # - this preset (beta 1, kl_beta 1e-4, decay_type 1, 4 epochs): +0.028 (SE 0.009, 3.3 SE) on training seed 0,
        #   +0.027 (SE 0.009, 3.0 SE) on training seed 1.
        "toy": dict(group_size=16, groups_per_epoch=16, sample_batch_size=64, train_batch_size=16,
                    updates_per_epoch=16, optimizer="adam", lr=9e-5, weight_decay=0.0, full_finetune=True),
    }
    non_semantic: ClassVar[tuple[str, ...]] = ("sample_batch_size", "checkpoint_path", "checkpoint_every")
    """fields that do not change the result (excluded from a cell's identity)."""

    def __post_init__(self):
        check_positive(self, "group_size", "groups_per_epoch", "sample_batch_size", "adv_clip_max", "beta",
                       "num_inner_epochs", "train_batch_size", "updates_per_epoch", "lora_rank", "lora_alpha",
                       "num_epochs", "checkpoint_every")
        check_positive(self, "kl_beta", "old_decay_rate", "old_decay_flat", "lr", "weight_decay", "max_grad_norm",
                       allow_zero=True)
        check_choice("optimizer", self.optimizer, ("adamw", "adam", "sgd"))
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (a group of one has advantage 0); got {self.group_size}")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError(f"timestep_fraction must be in (0, 1]; got {self.timestep_fraction}")
        if not 0.0 <= self.old_decay_max < 1.0:
            raise ValueError(f"old_decay_max must be in [0, 1); got {self.old_decay_max}")
        n = self.samples_per_epoch
        if n % (self.train_batch_size * self.updates_per_epoch):
            raise ValueError(f"samples per epoch ({n} = group_size x groups_per_epoch) must be a multiple of "
                             f"train_batch_size x updates_per_epoch = {self.train_batch_size * self.updates_per_epoch}")

    @property
    def samples_per_epoch(self) -> int:
        return self.group_size * self.groups_per_epoch

    def trained_timesteps(self, num_steps: int) -> int:
        """T: sampler timesteps trained per sample (at least 1)."""
        return max(1, int(num_steps * self.timestep_fraction))

    @classmethod
    def search_space(cls) -> dict[str, tuple]:
        return {
            "lr": ("log_float", 1e-5, 1e-3),
            "beta": ("categorical", [0.1, 0.5, 1.0]),
            "kl_beta": ("categorical", [0.0, 1e-4, 1e-3, 1e-2]),
            "old_decay_max": ("categorical", [0.0, 0.5, 0.9]),
        }


# ---------------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------------


def optimality(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """r = clip(clip(A, +-adv_clip_max) / adv_clip_max / 2 + 0.5, 0, 1): 0.5 for an average sample, 1 for the best.
    Worked values (clip 5): A = [-7, -1, 0, 2.5] -> [0, 0.4, 0.5, 0.75]."""
    clipped = advantages.clamp(-adv_clip_max, adv_clip_max)
    return (clipped / adv_clip_max / 2.0 + 0.5).clamp(0.0, 1.0)


def old_decay(step: int, *, rate: float, max_decay: float, flat: int = 0) -> float:
    """The old policy's EMA decay after `step` optimizer steps (official `return_decay`): 0 before `flat`, then
    min(rate (step - flat), max_decay). decay_type 1: step 300 -> 0.3, step 900 -> 0.5."""
    if step < flat:
        return 0.0
    return min((step - flat) * rate, max_decay)


def implicit_x0(x0_theta: torch.Tensor, x0_old: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0+, x0-) = (b x0_theta + (1 - b) x0_old, (1 + b) x0_old - b x0_theta): the implicit positive and negative
    policies' clean-sample predictions. Equal to x0(v+-) for any parameterisation whose x0(o) is affine in the output o
    at fixed x_t (epsilon, v, sample, flow velocity); x0_old should be detached."""
    return beta * x0_theta + (1 - beta) * x0_old, (1 + beta) * x0_old - beta * x0_theta


def loss(x0_theta: torch.Tensor, x0_old: torch.Tensor, x0: torch.Tensor, r: torch.Tensor, *, beta: float,
         loss_scale: float = 5.0, kl_beta: float = 0.0, out_theta: torch.Tensor | None = None,
         out_ref: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT loss for a batch (B, ...) at one timestep per sample (module docstring, step 3):

        x0+, x0- = implicit_x0(x0_theta, x0_old, b)
        w+- = max(mean_D |x0+- - x0|, 1e-5)                                      (detached)
        L   = loss_scale mean_i [r_i mean_D (x0+ - x0)^2 / w+ + (1 - r_i) mean_D (x0- - x0)^2 / w-] / b
              + kl_beta mean_i mean_D (out_theta - out_ref)^2

    Worked values (D = 2, b = 1, loss_scale 5): x0 = [0, 0], x0_theta = [1, -1], x0_old = [0.5, 0.5], r = 0.75 ->
    x0+ = [1, -1] (w+ 1, mse 1), x0- = [0, 2] (w- 1, mse 2): L = 5 (0.75 + 0.5) = 6.25.
    At x0_theta = x0_old (the start of an epoch with d = 0) w+ = w-, and r = 0.5 gives zero gradient.
    """
    x0_old = x0_old.detach()
    x0_pos, x0_neg = implicit_x0(x0_theta, x0_old, beta)
    dims = tuple(range(1, x0.ndim))
    with torch.no_grad():
        w_pos = (x0_pos.double() - x0.double()).abs().mean(dim=dims).clamp(min=WEIGHT_FLOOR).to(x0_theta.dtype)
        w_neg = (x0_neg.double() - x0.double()).abs().mean(dim=dims).clamp(min=WEIGHT_FLOOR).to(x0_theta.dtype)
    positive = ((x0_pos - x0) ** 2).mean(dim=dims) / w_pos
    negative = ((x0_neg - x0) ** 2).mean(dim=dims) / w_neg
    policy_loss = (r * positive + (1 - r) * negative) / beta
    value = loss_scale * policy_loss.mean()
    kl = torch.zeros((), dtype=value.dtype, device=value.device)
    if kl_beta > 0:
        if out_theta is None or out_ref is None:
            raise ValueError("kl_beta > 0 needs out_theta and out_ref")
        kl = ((out_theta - out_ref.detach()) ** 2).flatten(1).mean(1).mean()
        value = value + kl_beta * kl
    with torch.no_grad():
        info = {"policy_loss": policy_loss.mean().detach(), "kl": kl.detach(),
                "old_deviate": ((x0_theta.detach() - x0_old) ** 2).mean()}
    return value, info


# ---------------------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _swapped(params: list[torch.nn.Parameter], other: list[torch.Tensor]):
    """Run the model with `other`'s values in `params` (the old policy), then swap back (no copies: data pointers)."""
    for p, o in zip(params, other):
        p.data, o.data = o.data, p.data
    try:
        with torch.no_grad():
            yield
    finally:
        for p, o in zip(params, other):
            p.data, o.data = o.data, p.data


class NFTMethod:
    """DiffusionNFT on the shared deterministic sampler; evaluation uses the deterministic default sampler."""

    name: ClassVar[str] = "nft"
    label: ClassVar[str] = "DiffusionNFT"
    Config = Config
    paper: ClassVar[str] = ("Zheng et al., DiffusionNFT: Online Diffusion Reinforcement with Forward Process, "
                            "arXiv 2509.16117")
    deviations: ClassVar[tuple[Deviation, ...]] = (
        Deviation("the loss on the VP forward process x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, implicit policies mixed "
                  "in the model's own output (epsilon or v) (paper: flow matching, v+- mixed velocities)",
                  "x0(o) is affine in the output at fixed x_t, so the x0-space loss is the same; the turbo models are "
                  "VP epsilon models, the toy a v model", "methods/nft.py (module docstring)"),
        Deviation("t on the K-step sampler grid of the cell, every grid timestep per sample (paper: its 10-step grid, "
                  "timestep_fraction 0.99)", "adversarially distilled models are trained on their few timesteps only; "
                  "int(0.99 K) would drop a whole timestep at K <= 4", "methods/nft.py Config.timestep_fraction"),
        Deviation("collection with the model's own deterministic few-step sampler, evaluation with the trained weights "
                  "(paper: DPM2 10 steps, EMA weights for evaluation)", "every row samples and is evaluated the same "
                  "way", "methods/nft.py (module docstring)"),
        Deviation("toy recipe: 16 prompts x G = 16, Adam lr 9e-5, full fine-tune, an update per 16 samples (paper: "
                  "48 x 24, AdamW 3e-4, LoRA r32, one update an epoch)", "DDPO's toy settings, so the rows differ only "
                  "in the algorithm; a 1M-parameter denoiser", "methods/nft.py Config.presets['toy']"),
    )

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else Config()

    def generate(self, policy, prompts: list[str], num_steps: int, *, noise: torch.Tensor,
                 budget: Budget | None = None) -> tuple[torch.Tensor, int]:
        return default_generate(policy, prompts, num_steps, noise=noise, budget=budget)

    def epoch_cost(self, num_steps: int, nfe_per_predict: int) -> dict[str, int]:
        """Exact cost of one epoch: sampling N K npp NFEs; per inner epoch N T npp (2 + [kl_beta > 0]) gradient NFEs
        (current forward+backward, old forward, reference forward); N reward calls."""
        cfg, n = self.config, self.config.samples_per_epoch
        per_step = nfe_per_predict * (3 if cfg.kl_beta > 0 else 2)
        return {"sample_nfe": sample_nfe(n, num_steps, nfe_per_predict),
                "grad_nfe": cfg.num_inner_epochs * n * cfg.trained_timesteps(num_steps) * per_step,
                "reward_calls": n}

    def train(self, policy, task: Task, budget: Budget, tracker: Tracker) -> None:
        cfg = self.config
        num_steps, npp = int(task.train_steps), int(policy.nfe_per_predict)
        if cfg.groups_per_epoch > len(task.prompts):
            raise ValueError(f"groups_per_epoch ({cfg.groups_per_epoch}) > the number of training prompts "
                             f"({len(task.prompts)}): each group needs its own prompt")
        cost = self.epoch_cost(num_steps, npp)
        epoch_nfe = cost["sample_nfe"] + cost["grad_nfe"]
        if budget.max_nfe is None and cfg.num_epochs is None:
            raise ValueError("unbounded run: give the Budget a max_nfe or set num_epochs")
        if budget.max_nfe is not None and epoch_nfe > budget.max_nfe:
            raise ValueError(f"the budget ({budget.max_nfe} NFEs) is smaller than one NFT epoch ({epoch_nfe} NFEs: "
                             f"{cost}); lower group_size x groups_per_epoch or raise the budget")
        if budget.max_reward_calls is not None and cost["reward_calls"] > budget.max_reward_calls:
            raise ValueError(f"the reward-call budget ({budget.max_reward_calls}) is smaller than one NFT epoch "
                             f"({cost['reward_calls']} images)")

        params = [p for p in policy.trainable_parameters() if p.requires_grad]
        old = [p.detach().clone() for p in params]  # the old policy starts at the current one
        optimizer = build_optimizer(params, cfg)
        generators = {"prompt": generator(task.seed), "shuffle": generator(task.seed + 1),
                      "noise": generator(task.seed + 2, policy.device)}
        state = {"epoch": 0, "updates": 0}
        if cfg.checkpoint_path and Path(cfg.checkpoint_path).exists():
            saved = load_checkpoint(cfg.checkpoint_path, policy=policy, optimizer=optimizer, config=cfg,
                                    budget=budget, generators=generators)
            state = {"epoch": saved["step"], "updates": saved["extra"]["updates"]}
            for o, value in zip(old, saved["extra"]["old"]):
                o.copy_(value)

        max_epochs = cfg.num_epochs if cfg.num_epochs is not None else float("inf")
        affordable = state["epoch"] + budget.remaining_nfe // epoch_nfe if budget.max_nfe is not None else math.inf
        with progress(tracker, int(min(max_epochs, affordable)), "nft epochs") as advance:
            while state["epoch"] < max_epochs and budget.fits(nfe=epoch_nfe, reward_calls=cost["reward_calls"]):
                metrics = self._epoch(policy, task, budget, optimizer, params, old, state, generators)
                state["epoch"] += 1
                metrics["train/epoch"] = float(state["epoch"])
                tracker.log_metrics(metrics, step=budget.total_nfe)
                advance(1)
                if cfg.checkpoint_path and state["epoch"] % cfg.checkpoint_every == 0:
                    save_checkpoint(cfg.checkpoint_path, policy=policy, optimizer=optimizer, step=state["epoch"],
                                    config=cfg, budget=budget, generators=generators,
                                    extra={"updates": state["updates"], "old": [o.cpu() for o in old]})

    # -----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _collect(self, policy, task: Task, prompts: list[str], params, old, noise_gen) -> tuple[torch.Tensor, ...]:
        """Clean samples x0 (N, C, h, w) of the old policy's deterministic sampler, their conditioning and rewards."""
        cfg = self.config
        latents, conds, rewards = [], [], []
        with _swapped(params, old):
            for start in range(0, len(prompts), cfg.sample_batch_size):
                batch = prompts[start:start + cfg.sample_batch_size]
                traj = sampling.sample(policy, batch, task.train_steps, generator=noise_gen, eta=0.0, record=False)
                latents.append(traj.final_latents)
                conds.append(traj.cond)
                rewards.append(torch.as_tensor(task.reward(traj.images, batch)).detach().float().cpu().reshape(-1))
        from methods.policy import Conditioning

        return torch.cat(latents), Conditioning.cat(conds), torch.cat(rewards)

    def _epoch(self, policy, task, budget, optimizer, params, old, state, generators) -> dict[str, float]:
        cfg = self.config
        num_steps, npp = int(task.train_steps), int(policy.nfe_per_predict)
        t0 = time.perf_counter()
        picks = torch.randperm(len(task.prompts), generator=generators["prompt"])[:cfg.groups_per_epoch].tolist()
        prompts = [task.prompts[i] for i in picks for _ in range(cfg.group_size)]  # group by group
        x0, cond, rewards = self._collect(policy, task, prompts, params, old, generators["noise"])
        n = len(prompts)
        budget.spend(sample_nfe=sample_nfe(n, num_steps, npp), reward_calls=n)
        advantages, zero_std_ratio = group_relative_advantages(rewards, cfg.group_size, global_std=cfg.global_std,
                                                               adv_clip_max=cfg.adv_clip_max)
        r = optimality(advantages, cfg.adv_clip_max).to(policy.device)
        sample_seconds = time.perf_counter() - t0

        # The training view is the VP forward process on the DDIM tables (Euler kernels see the same x_t after their
        # input scaling), at the K-step grid's own timesteps (module docstring).
        # A flow model trains on its own forward process x_t = (1 - s) x0 + s eps, x0_hat = x_t - s v.
        flow = policy.spec.scheduler == sampling.FLOW
        scheduler = policy.scheduler_for(sampling.FLOW if flow else "ddim")
        grid, _ = sampling.timestep_grid(policy.scheduler_for(policy.spec.scheduler), num_steps, policy.spec.scheduler)
        abar_table = None if flow else scheduler.alphas_cumprod.double()
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        trained = cfg.trained_timesteps(num_steps)
        per_update = n // cfg.updates_per_epoch // cfg.train_batch_size
        per_step = npp * (3 if cfg.kl_beta > 0 else 2)

        t1 = time.perf_counter()
        sums = dict.fromkeys(("loss", "policy_loss", "kl", "old_deviate"), 0.0)
        grad_norms, count = [], 0
        for _ in range(cfg.num_inner_epochs):
            order = torch.randperm(n, generator=generators["shuffle"])
            # each sample's own random order of the grid's timesteps; the first `trained` are used
            columns = torch.argsort(torch.rand(n, num_steps, generator=generators["shuffle"]), dim=1)[:, :trained]
            for mb, rows in enumerate(order.split(cfg.train_batch_size)):
                if mb % per_update == 0:
                    optimizer.zero_grad(set_to_none=True)
                rows_dev = rows.to(policy.device)
                sub = cond.select(rows)
                for j in range(trained):
                    t = grid[columns[rows, j]]  # (b,) long (flow: float)
                    eps = torch.randn(x0[rows_dev].shape, generator=generators["noise"],
                                      device=generators["noise"].device).to(policy.device)
                    x_t = sampling.add_noise(sampling.FLOW if flow else "ddim", scheduler, x0[rows_dev], t, eps)
                    t_dev = t.to(policy.device)
                    with _swapped(params, old):
                        out_old = policy.predict(x_t, t_dev, sub)
                    out_theta = policy.predict(x_t, t_dev, sub)
                    out_ref = None
                    if cfg.kl_beta > 0:
                        with policy.reference():
                            out_ref = policy.predict(x_t, t_dev, sub)
                    if flow:
                        s = (t.float() / scheduler.config.num_train_timesteps).view(-1, 1, 1, 1).to(x_t.device)
                        x0_theta, x0_old = x_t - s * out_theta, x_t - s * out_old
                    else:
                        x0_theta, _ = sampling.x0_and_eps(prediction_type, out_theta, x_t, abar_table[t])
                        x0_old, _ = sampling.x0_and_eps(prediction_type, out_old, x_t, abar_table[t])
                    value, info = loss(x0_theta, x0_old, x0[rows_dev], r[rows_dev], beta=cfg.beta,
                                       loss_scale=cfg.adv_clip_max, kl_beta=cfg.kl_beta, out_theta=out_theta,
                                       out_ref=out_ref)
                    (value / (trained * per_update)).backward()
                    sums["loss"] += float(value.detach())
                    for key in ("policy_loss", "kl", "old_deviate"):
                        sums[key] += float(info[key])
                    count += 1
                budget.spend(grad_nfe=len(rows) * trained * per_step)
                if (mb + 1) % per_update == 0:
                    grad_norms.append(clip_grad_norm(params, cfg.max_grad_norm))
                    optimizer.step()
                    state["updates"] += 1
        optimizer.zero_grad(set_to_none=True)

        decay = old_decay(state["updates"], rate=cfg.old_decay_rate, max_decay=cfg.old_decay_max,
                          flat=cfg.old_decay_flat)
        with torch.no_grad():
            for p, o in zip(params, old):
                o.mul_(decay).add_(p.detach(), alpha=1.0 - decay)

        metrics = {f"train/{key}": value / count for key, value in sums.items()}
        metrics.update({
            "train/reward_mean": float(rewards.mean()),
            "train/reward_std": float(rewards.std(unbiased=False)),
            "train/zero_std_ratio": zero_std_ratio,
            "train/optimality_mean": float(r.mean()),
            "train/old_decay": decay,
            "train/grad_norm": sum(grad_norms) / len(grad_norms),
            "train/updates": float(len(grad_norms)),
            "train/sample_seconds": sample_seconds,
            "train/update_seconds": time.perf_counter() - t1,
        })
        if not all(math.isfinite(v) for v in metrics.values()):
            raise RuntimeError(f"non-finite NFT metrics: {metrics}")
        return metrics


