"""PSO — Pairwise Sample Optimization (Miao et al., arXiv 2410.03190, ICLR 2025), spec dpo-spo-pso.md §4.

Fine-tuning a timestep-distilled model with the plain diffusion loss makes it forget few-step sampling (see
methods/sft.py). PSO instead raises a DPO-style *relative* likelihood margin between target samples and the
model's own samples, with the frozen distilled model as the DPO reference, and evaluates likelihoods only on the
model's own few-step grid.

mode "online" (official `train_online_pso_*.py`, §4.4): per prompt two trajectories from the current policy
(independent x_T), ranked by the reward; for every stochastic grid step except the last (deterministic) one,
    log r = clamp(log p_theta(x_{t'} | x_t) - log p_ref(x_{t'} | x_t), log(1-eps), log(1+eps))
    loss  = softplus(-beta (log r_w - log r_l))
with per-element-MEAN Gaussian transition log-densities (sampling.transition_log_prob).

mode "offline" (official personalization script + the generic preference form, §4.5): targets x^tau = winner
images of a preference dataset; references x^rho = samples of the *initial* distilled model drawn once per prompt
(`SelfSampleReferences`) or the dataset's losers; one grid timestep and one shared eps per pair;
    "pso":    z = beta [(err_pre^tau - lam err_pre^rho) - (err_theta^tau - lam err_theta^rho)],  loss = softplus(-z)
    "pso_db": z = -beta (err_theta^tau - lam err_theta^rho),                                  loss = relu(1 - z)
    + prior_weight * mean(err_theta^rho)
(err = element-mean denoising error; lam = neg_defactor). The official script's grid index maps to t in
{750, 500, 250, 0} (likely a bug, §4.5 caveat); here t is the actual sampling grid, e.g. {999, 749, 499, 249}.

What the spec leaves open, and the choice made here:
- the paper's exact beta scaling and per-step weights are unverified (§4.2): online beta 50 / eps 0.1 are the
  SDXL-Turbo config, offline beta 5 / lambda 0.1 / prior 0.5 the personalization scripts; FestDPO's offline
  preference reproduction tuned beta 10, lr 1e-4 (use `beta=10, lr=1e-4` to follow it).
- offline references: the paper's offline *preference* runs may have used dataset losers or self-samples
  (unverified); default "self" (samples of the initial model, the personalization code), option "dataset_loser".
- ties online: the two official scripts differ (SDXL-Turbo: sample 2 wins; DMD2: no gradient); default "skip".
- the last grid step is never trained online, even when the kernel gives it a tiny non-zero std (DDIM with
  set_alpha_to_one=False); the official code drops it because Euler-A / LCM make it deterministic.
- two trajectories of a pair start from independent x_T, as the official code does (despite its comment).
- offline "pso" vs "pso_db": every released script uses "pso_db" (the default here); the DPO-form "pso" is the one
  that matches §4.2's derivation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
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
)
from methods.preference_data import (
    OnlineRewardPairs,
    SelfSampleReferences,
    check_run_length,
    denoising_errors,
    describe,
    draw_timesteps,
    grid_timesteps,
    offline_pairs,
)

log = logging.getLogger(__name__)

_MODE_DEFAULTS = {
    # SDXL-Turbo online config (§4.4): beta 50, lr 1e-5, train batch 4 x accumulation 2.
    "online": dict(beta=50.0, lr=1e-5, pairs_per_update=8),
    # personalization scripts (§4.5): pso_db, beta 5, lr 2e-4, batch 1 x accumulation 4.
    "offline": dict(beta=5.0, lr=2e-4, pairs_per_update=4),
}


@dataclass
class Config:
    """PSO knobs. `None` fields take the mode's official default (online: SDXL-Turbo config; offline: the
    released personalization scripts); `resolved()` fills them and train() logs the result."""

    mode: str = "online"
    """"online": reward-ranked pairs of the current policy's trajectories; "offline": dataset targets vs
    references sampled once from the initial model."""
    variant: str = "pso_db"
    """offline loss: "pso" (DPO form with the frozen reference) or "pso_db" (hinge, no reference; every released
    script). Online always uses the clamped transition-ratio loss."""
    beta: float | None = None
    """beta: None -> 50 online, 5 offline."""
    clamp_eps: float = 0.1
    """online: per-transition ratio clamp [1-eps, 1+eps] (zero gradient outside)."""
    lr: float | None = None
    """learning rate: None -> 1e-5 online, 2e-4 offline."""
    weight_decay: float = 1e-6
    """AdamW weight decay (online config: 1e-6; the personalization script's value is unverified)."""
    optimizer: str = "adamw"
    """"adamw" | "adam" | "sgd" (official: 8-bit AdamW; plain AdamW here)."""
    grad_clip: float = 1.0
    """global gradient-norm clip (1.0)."""
    pairs_per_update: int | None = None
    """pairs per optimizer update: None -> 8 online (4 x 2 accumulation, all timesteps), 4 offline."""
    micro_batch: int = 0
    """online: pairs per forward/backward chunk (0 = all pairs of an update at once); memory only."""
    lora_rank: int = 32
    """LoRA rank (online SDXL-Turbo: 32; DMD2 and personalization: 16); read by the harness."""
    full_finetune: bool = False
    """train every denoiser weight instead of LoRA (the toy recipes do); read by the harness."""
    max_updates: int | None = None
    """stop after this many optimizer updates (None = when the budget is spent)."""
    # --- online ---
    prompts_per_round: int = 16
    """online: prompts per sampling round, two trajectories each (official: 4 x 4 batches per epoch)."""
    sample_eta: float = 1.0
    """online: sampler stochasticity; transitions need a density, so > 0."""
    kernel: str | None = None
    """sampling kernel ("ddim" | "euler_ancestral" | "lcm"); None = the model's default."""
    ties: str = "skip"
    """online: equal rewards -> "skip" the pair (DMD2 script: constant loss, no gradient) or "second_wins"
    (SDXL-Turbo script)."""
    min_reward_gap: float = 0.0
    """online: a pair needs reward(winner) - reward(loser) > this."""
    # --- offline ---
    dataset: str | None = None
    """offline: preference dataset (targets = winners; losers used only with reference_source="dataset_loser");
    None = a fixed set built from `base_samples_per_prompt` initial-model samples per prompt labelled by the reward."""
    base_samples_per_prompt: int = 8
    """offline without a dataset: initial-model samples per training prompt; the winners of their within-prompt
    reward-ranked pairs are the targets (preference_data.BaseSamplePreferences)."""
    reference_source: str = "self"
    """offline: "self" = samples of the initial model (the paper); "dataset_loser" = the dataset's loser, which
    makes the "pso" variant Diffusion-DPO restricted to the grid."""
    references_per_prompt: int = 2
    """offline: initial-model samples kept per prompt (personalization: 20 for its single class prompt)."""
    reference_eta: float = 0.0
    """offline: sampler eta of the reference samples (0 = the deterministic sampler evaluation uses)."""
    neg_defactor: float = 0.1
    """offline: lambda, the weight of the reference-sample error inside the margin."""
    prior_weight: float = 0.5
    """offline: weight of mean(err_theta^rho), the "prior" term that keeps the model on its own samples."""
    random_flip: bool = True
    """offline: flip target images horizontally with probability 1/2."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # lr: the validation probe of 2026-12-06 (bench/conf/tuning/toy/val-probe.md); it supersedes any lr below.
        # toy world: online, more prompts per round (verifier rewards tie often), full fine-tune as the toy recipes.
        # pairs_per_update 16 (2026-12-05 probes, K = 4, 20k NFEs, gain in toy-all at S = 4 over n = 1,024 paired
        # samples): 32 pairs -> +0.032 (2.9 SE), 16 -> +0.065 (5.6 SE) and +0.039 (3.9 SE) on seeds 0 and 1;
        # lr 5e-5 / 1e-4 at 32 pairs: +0.026 / +0.022. More, smaller updates, as the official 8 pairs per update.
        "toy": dict(mode="online", prompts_per_round=64, pairs_per_update=16, lr=1e-5, beta=50.0, optimizer="adam",
                    weight_decay=0.0, full_finetune=True),
    }
    non_semantic: ClassVar[tuple[str, ...]] = ("micro_batch",)
    """Fields that do not change the result (excluded from a cell's identity)."""

    def __post_init__(self):
        check_choice("mode", self.mode, ("online", "offline"))
        check_choice("variant", self.variant, ("pso", "pso_db"))
        check_choice("ties", self.ties, ("skip", "second_wins"))
        check_choice("reference_source", self.reference_source, ("self", "dataset_loser"))
        check_positive(self, "beta", "lr", "pairs_per_update", "prompts_per_round", "references_per_prompt",
                       "lora_rank", "max_updates")
        check_positive(self, "micro_batch", "weight_decay", "min_reward_gap", "reference_eta", "neg_defactor",
                       "prior_weight", allow_zero=True)
        if not 0.0 < self.clamp_eps < 1.0:
            raise ValueError(f"clamp_eps must be in (0, 1); got {self.clamp_eps}")
        if self.mode == "online" and not self.sample_eta > 0:
            raise ValueError("online PSO needs stochastic transitions: sample_eta must be > 0")
        if self.mode == "offline" and not self.dataset and self.base_samples_per_prompt < 2:
            raise ValueError(f"base_samples_per_prompt must be >= 2 to form pairs; got {self.base_samples_per_prompt}")

    def resolved(self) -> Config:
        """A copy with the None fields set to the mode's defaults."""
        fill = {k: v for k, v in _MODE_DEFAULTS[self.mode].items() if getattr(self, k) is None}
        return dataclasses.replace(self, **fill)

    def min_train_steps(self) -> int:
        """Smallest K this config can train at: online PSO trains the stochastic steps before the last, so K >= 2;
        offline PSO takes timesteps of the grid, any K. The harness marks smaller-K cells "n/a" (bench.grid)."""
        return 2 if self.mode == "online" else 1

    @classmethod
    def search_space(cls) -> dict[str, tuple]:
        return {
            "lr": ("log_float", 1e-6, 1e-3),
            "beta": ("log_float", 1.0, 100.0),      # FestDPO tuned over {1, 10, 50, 100}
            "clamp_eps": ("categorical", [0.01, 0.1, 0.2]),
            "lora_rank": ("categorical", [8, 16, 32]),
        }


def loss(logp_theta_w: torch.Tensor, logp_ref_w: torch.Tensor, logp_theta_l: torch.Tensor, logp_ref_l: torch.Tensor,
         beta: float, clamp_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Online PSO / D3PO-style transition loss (spec §4.4, §0.4) and the per-pair margin z.

        log r_* = clamp(logp_theta^* - logp_ref^*, log(1 - eps), log(1 + eps))   (= log clamp(ratio, 1-eps, 1+eps))
        z       = beta * (log r_w - log r_l)
        loss    = mean softplus(-z) = mean -log sigmoid(z)

    logp are per-element-MEAN Gaussian log-densities of the recorded transition (B,). Zero gradient where a ratio
    is clamped; the loss is bounded below by softplus(-beta (log(1+eps) - log(1-eps))) (beta 50: 4.4e-5).
    Worked value (beta 50, eps 0.1): log-ratios +0.0016128 / -0.0015713 -> z 0.159207, loss 0.616709.
    """
    low, high = math.log(1.0 - clamp_eps), math.log(1.0 + clamp_eps)
    log_ratio_w = torch.clamp(logp_theta_w - logp_ref_w, low, high)
    log_ratio_l = torch.clamp(logp_theta_l - logp_ref_l, low, high)
    z = beta * (log_ratio_w - log_ratio_l)
    return torch.nn.functional.softplus(-z).mean(), z


def offline_loss(err_theta_target: torch.Tensor, err_theta_reference: torch.Tensor, beta: float, neg_defactor: float,
                 variant: str, err_pre_target: torch.Tensor | None = None,
                 err_pre_reference: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Offline PSO margin loss (spec §4.5, without the prior term) and the per-pair margin z.

        "pso":    z = beta [(err_pre^tau - lam err_pre^rho) - (err_theta^tau - lam err_theta^rho)],  softplus(-z)
        "pso_db": z = -beta (err_theta^tau - lam err_theta^rho),                                  relu(1 - z)

    err_* are element-mean denoising errors (B,) at a shared (t, eps) per pair; tau = target, rho = reference
    sample, pre = frozen distilled model. At theta = pre, "pso" gives ln 2; "pso_db" gives 1 when
    err^tau = lam err^rho. Positive z = the target is denoised better (relative to the reference sample).
    """
    model_term = err_theta_target - neg_defactor * err_theta_reference
    if variant == "pso":
        if err_pre_target is None or err_pre_reference is None:
            raise ValueError("variant 'pso' needs the frozen model's errors err_pre_target, err_pre_reference")
        z = beta * ((err_pre_target - neg_defactor * err_pre_reference) - model_term)
        return torch.nn.functional.softplus(-z).mean(), z
    if variant == "pso_db":
        z = -beta * model_term
        return torch.relu(1.0 - z).mean(), z
    raise ValueError(f"variant must be 'pso' or 'pso_db'; got {variant!r}")


def trained_steps(traj) -> list[int]:
    """Grid steps whose transition is trained: stochastic ones, never the last (official PSO:
    distilled_train_steps = num_steps - 1). With DDIM and set_alpha_to_one=False the last step has a tiny but
    non-zero std; its log-ratio would be scaled by 1/(2 std^2) and be clamped anyway, so it is dropped too."""
    return [k for k in range(traj.num_steps - 1) if bool(traj.stochastic[k])]


class PSOMethod:
    """Pairwise Sample Optimization, online or offline; `generate` is the shared deterministic sampler."""

    name: ClassVar[str] = "pso"
    label: ClassVar[str] = "PSO"
    Config = Config
    paper: ClassVar[str] = "Miao et al., Tuning Timestep-Distilled Diffusion Model Using Pairwise Sample Optimization, arXiv 2410.03190"
    deviations: ClassVar[tuple[Deviation, ...]] = (
        Deviation("toy recipe: 64 prompts per round, 16 pairs per update, Adam lr 1e-5, full fine-tune (SDXL-Turbo "
                  "config: AdamW 1e-5, 8 pairs per update, LoRA)", "toy-recipes.md's optimizer; 16 pairs measured "
                  "+0.065 vs +0.032 at 32", "methods/pso.py Config.presets['toy']"),
        Deviation("the last grid step is never trained even where the kernel gives it a tiny std (DDIM)",
                  "the official Euler-A / LCM kernels make it deterministic", "methods/pso.py trained_steps"),
        Deviation("gradient clipping at 1.0 applied", "as configured officially", "methods/pso.py Config.grad_clip"),
    )

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else Config()

    def train(self, policy, task: Task, budget: Budget, tracker: Tracker) -> None:
        cfg = self.config.resolved()
        log.info("pso config (resolved): %s", describe(cfg))
        check_run_length(budget, cfg.max_updates)
        self.updates = 0
        gen = generator(task.seed)
        params = policy.trainable_parameters()
        optimizer = build_optimizer(params, cfg)
        if cfg.mode == "online":
            self._train_online(cfg, policy, task, budget, tracker, optimizer, params, gen)
        else:
            self._train_offline(cfg, policy, task, budget, tracker, optimizer, params, gen)

    def _done(self, cfg) -> bool:
        return cfg.max_updates is not None and self.updates >= cfg.max_updates

    # ------------------------------------------------------------------------------------------- online
    def _train_online(self, cfg, policy, task, budget, tracker, optimizer, params, gen) -> None:
        if task.train_steps < cfg.min_train_steps():
            raise ValueError("online PSO trains the stochastic steps before the last one: "
                             f"train_steps must be >= {cfg.min_train_steps()}")
        source = OnlineRewardPairs(prompts_per_round=cfg.prompts_per_round, samples_per_prompt=2, eta=cfg.sample_eta,
                                   pairing="best_worst", min_gap=cfg.min_reward_gap, ties=cfg.ties, kernel=cfg.kernel)
        round_nfe, round_calls = source.round_cost(task.train_steps, policy.nfe_per_predict)
        # NFE of one pair at one step: 2 trajectories x (policy forward+backward + reference forward).
        pair_step_nfe = 4 * policy.nfe_per_predict
        min_update = pair_step_nfe * (task.train_steps - 1)
        while budget.fits(nfe=round_nfe + min_update, reward_calls=round_calls) and not self._done(cfg):
            batch = source.collect(policy, task.prompts, task.reward, task.train_steps, budget, gen)
            steps = trained_steps(batch.traj)
            if not steps:
                raise ValueError("no stochastic transition before the last step: use sample_eta > 0 and a kernel "
                                 "with a density")
            tracker.log_metrics({"train/reward_mean": float(batch.rewards.mean()),
                                 "train/num_pairs": float(batch.num_pairs)}, step=budget.total_nfe)
            order = torch.randperm(batch.num_pairs, generator=gen)
            # One inner epoch: a shuffled pass over this round's pairs, all trained steps of each pair per update.
            for start in range(0, batch.num_pairs, cfg.pairs_per_update):
                rows = order[start : start + cfg.pairs_per_update]
                cost = pair_step_nfe * len(rows) * len(steps)
                if not budget.fits(nfe=cost) or self._done(cfg):
                    return
                metrics = self._online_update(cfg, policy, optimizer, params, batch, rows, steps)
                budget.spend(grad_nfe=cost)
                tracker.log_metrics(metrics, step=budget.total_nfe)

    def _online_update(self, cfg, policy, optimizer, params, batch, rows, steps) -> dict[str, float]:
        traj, num = batch.traj, len(rows)
        chunk = cfg.micro_batch or num
        optimizer.zero_grad(set_to_none=True)
        margins, losses, clipped = [], [], []
        for start in range(0, num, chunk):
            part = rows[start : start + chunk]
            win, lose = batch.win[part], batch.lose[part]
            both = torch.cat([win, lose])
            for k in steps:  # every stochastic step is its own loss term; gradients accumulate (§4.4)
                logp_theta = sampling.transition_log_prob(policy, traj, k, index=both)
                with policy.reference():
                    logp_ref = sampling.transition_log_prob(policy, traj, k, index=both)
                n = len(part)
                value, z = loss(logp_theta[:n], logp_ref[:n], logp_theta[n:], logp_ref[n:], cfg.beta, cfg.clamp_eps)
                (value * n / (num * len(steps))).backward()
                margins.append(z.detach())
                losses.append(value.detach() * n)
                log_ratio = (logp_theta - logp_ref).detach()
                clipped.append((log_ratio.abs() > math.log(1 + cfg.clamp_eps) * 0.999).float())
        grad_norm = clip_grad_norm(params, cfg.grad_clip)
        optimizer.step()
        self.updates += 1
        z = torch.cat(margins)
        return {"train/loss": float(torch.stack(losses).sum() / (num * len(steps))),
                "train/margin": float(z.mean()),
                "train/implicit_acc": float(((z > 0).float() + 0.5 * (z == 0).float()).mean()),
                "train/clipfrac": float(torch.cat(clipped).mean()),
                "train/grad_norm": grad_norm}

    # ------------------------------------------------------------------------------------------ offline
    def _train_offline(self, cfg, policy, task, budget, tracker, optimizer, params, gen) -> None:
        data = offline_pairs(cfg, policy, task, budget, tracker, gen, self.name)
        references = SelfSampleReferences(per_prompt=cfg.references_per_prompt, num_steps=task.train_steps,
                                          eta=cfg.reference_eta, kernel=cfg.kernel)
        grid = grid_timesteps(policy, task.train_steps)
        npp = policy.nfe_per_predict
        # policy on [targets; references]; the frozen model too for "pso".
        update_cost = (2 if cfg.variant == "pso" else 1) * 2 * cfg.pairs_per_update * npp
        order: list[int] = []
        while True:
            if len(order) < cfg.pairs_per_update:
                order += torch.randperm(len(data), generator=gen).tolist()
            rows = order[: cfg.pairs_per_update]
            prompts = data.prompts_of(rows)
            ref_cost = references.missing_cost(prompts, npp) if cfg.reference_source == "self" else 0
            if not budget.fits(nfe=update_cost + ref_cost) or self._done(cfg):
                return
            order = order[cfg.pairs_per_update :]
            prompts, x0_target, x0_loser = data.latent_batch(rows, policy, gen)
            if cfg.reference_source == "self":
                x0_reference = references.draw(policy, prompts, budget, gen).to(task.device)
            else:
                x0_reference = x0_loser
            metrics = self._offline_update(cfg, policy, optimizer, params, x0_target, x0_reference, prompts, grid, gen)
            budget.spend(grad_nfe=update_cost)
            tracker.log_metrics(metrics, step=budget.total_nfe)

    def _offline_update(self, cfg, policy, optimizer, params, x0_target, x0_reference, prompts, grid, gen):
        num = x0_target.shape[0]
        # One grid timestep and one eps per pair, shared by target and reference (§4.5); every grid step may be
        # drawn, including the last: the forward process has no deterministic step.
        t = draw_timesteps("grid", grid, policy.scheduler.config.num_train_timesteps, (num, 1), gen).flatten()
        eps = torch.randn(x0_target.shape, generator=gen).to(x0_target.device)
        x0, noise = torch.cat([x0_target, x0_reference]), torch.cat([eps, eps])
        tt = torch.cat([t, t]).to(x0_target.device)
        cond = policy.encode_prompts(list(prompts) * 2)
        optimizer.zero_grad(set_to_none=True)
        err_theta = denoising_errors(policy, x0, noise, tt, cond).view(2, num)
        err_pre = None
        if cfg.variant == "pso":
            with policy.reference():
                err_pre = denoising_errors(policy, x0, noise, tt, cond).view(2, num)
        value, z = offline_loss(err_theta[0], err_theta[1], cfg.beta, cfg.neg_defactor, cfg.variant,
                                None if err_pre is None else err_pre[0], None if err_pre is None else err_pre[1])
        prior = err_theta[1].mean()
        (value + cfg.prior_weight * prior).backward()
        grad_norm = clip_grad_norm(params, cfg.grad_clip)
        optimizer.step()
        self.updates += 1
        value, prior, z, err_theta = value.detach(), prior.detach(), z.detach(), err_theta.detach()
        return {"train/loss": float(value), "train/prior_loss": float(prior), "train/margin": float(z.mean()),
                "train/err_target": float(err_theta[0].mean()), "train/err_reference": float(err_theta[1].mean()),
                "train/grad_norm": grad_norm}

    def generate(self, policy, prompts: list[str], num_steps: int, *, noise: torch.Tensor,
                 budget: Budget | None = None) -> tuple[torch.Tensor, int]:
        return default_generate(policy, prompts, num_steps, noise=noise, budget=budget)


@dataclass
class OfflineConfig(Config):
    """PSO's offline form (§4.5) as its own grid entry `pso_offline`: targets vs samples of the initial distilled
    model, one grid t and one eps per pair, the "pso_db" hinge of every released script."""

    mode: str = "offline"
    """"offline": targets from a fixed preference set vs the initial model's own samples (this row)."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # lr: the validation probe of 2026-12-06 (bench/conf/tuning/toy/val-probe.md); it supersedes any lr below.
        # toy world: targets = winners of a fixed set of 8 initial-model samples per training prompt labelled by the
        # verifier (no dataset); the personalization scripts' beta 5 / lambda 0.1 / prior 0.5; toy-recipes.md's
        # optimizer with online PSO's 16 pairs per update and an lr between its 3e-5 and the scripts' 2e-4.
        "toy": dict(mode="offline", base_samples_per_prompt=8, pairs_per_update=16, lr=1.67e-5, optimizer="adam",
                    weight_decay=0.0, full_finetune=True),
    }


class PSOOfflineMethod(PSOMethod):
    """PSO with mode="offline" by default (see OfflineConfig)."""

    name: ClassVar[str] = "pso_offline"
    label: ClassVar[str] = "PSO (offline)"
    Config = OfflineConfig
    deviations: ClassVar[tuple[Deviation, ...]] = (
        Deviation("without a dataset, targets are the reward-winners among 8 initial-model samples per training "
                  "prompt (paper: a target image set, e.g. preference winners or personalization photos)",
                  "the toy world has no target image set; the set's source is logged with every run "
                  "(pso_offline/pairs_source.json)", "methods/preference_data.py BaseSamplePreferences"),
        Deviation("t is the actual sampling grid {999, 749, 499, 249} (official script: {750, 500, 250, 0})",
                  "the script's index map looks like a bug (spec §4.5)", "methods/pso.py _offline_update"),
        Deviation("toy recipe: Adam lr 1.67e-5, full fine-tune, 16 pairs per update (scripts: lr 2e-4, 4 pairs, LoRA)",
                  "toy-recipes.md's optimizer", "methods/pso.py OfflineConfig.presets['toy']"),
    )
