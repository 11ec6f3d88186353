"""Diffusion-DPO (Wallace et al., arXiv 2311.12908, CVPR 2024) for few-step models.

The implicit reward of an image is how much better the fine-tuned model denoises it than the frozen reference
does; the loss pushes that margin up for the preferred image relative to the dispreferred one (spec
dpo-spo-pso.md §2). Pair sources:

- "offline" (the paper, the default): a FIXED preference set. With `dataset` set, (prompt, winner, loser) images of
  a preference dataset on disk (Pick-a-Pic v2 layout; `python -m tasks.toy.preferences` writes a toy one), encoded
  to latents (§2.3, §2.5). Without one, the set is built once before training from samples of the initial model
  labelled by the task reward (`preference_data.BaseSamplePreferences`; its source is logged as a run artifact);
- "online": pairs sampled from the *current* policy and ranked by the task reward (§2.7a, toy recipe 2): the
  `diffusion_dpo_online` row, a labelled adaptation.

Algorithm (one optimizer update):
    pairs (x0_w, x0_l, c)  <- source
    t   <- per pair, from the model's own K-step grid (few-step models: the paper's turbo mode) or U{0..999}
    eps <- per pair and timestep, shared by winner and loser ("fresh", the paper); or each sample's own
           starting noise z ("own": the reflow pairing (z, x0) of a deterministic sample, toy-recipes suggestion)
    e_theta, e_ref <- element-mean denoising errors of policy and reference (adapters disabled)
    loss = mean_pairs softplus(0.5 beta [(e_theta^w - e_ref^w) - (e_theta^l - e_ref^l)])   (+ sft_weight e_theta^w)
Reference = the same model with its adapters disabled (`policy.reference()`), as in the diffusers DPO script.
Compute: every update costs 4 * pairs * timesteps_per_pair * nfe_per_predict NFEs (policy forward+backward and
reference forward, winner and loser); the reference's forwards are booked as grad NFEs.

What the spec leaves open, and the choice made here:
- Turbo timesteps: the official code draws t from the fixed 4-step grid {249, 499, 749, 999} and ALSO rescales the
  schedule to zero terminal SNR; the diffusers `--is_turbo` path does not rescale (§2.4 [DISAGREE]). Here: the
  grid of the K steps the cell trains with (K=4 gives the same four timesteps), no rescale (diffusers).
- beta: only beta_code = 5000 is reproducible (it absorbs T*omega, the 1/2 and the element mean, §2.2); with
  timesteps_per_pair > 1 the bracket is averaged (not summed) over timesteps, so beta keeps its meaning.
- noise="own" gives winner and loser different eps (each its own z), unlike the paper's shared eps: it trades the
  shared-noise variance reduction for the exact reflow path of each sample (toy-recipes suggestion, untested there).
- Online pairs: "§2.7a" is a harness definition (no official online script); ties are dropped (min_reward_gap).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

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
    check_run_length,
    denoising_errors,
    describe,
    draw_timesteps,
    grid_timesteps,
    offline_pairs,
    own_noise,
)

log = logging.getLogger(__name__)


@dataclass
class Config:
    """Diffusion-DPO knobs; defaults follow the official code / diffusers DPO script for SDXL-Turbo (§2.5)."""

    source: str = "offline"
    """"offline": a fixed preference set (the paper): `dataset`, else base samples labelled by the reward; "online":
    pairs from the current policy ranked by the task reward (§2.7a, the diffusion_dpo_online row)."""
    dataset: str | None = None
    """offline: a preference dataset (parquet/jsonl file or folder; Pick-a-Pic v2 columns accepted); None = build the
    set from `base_samples_per_prompt` samples of the initial model per training prompt, labelled by the reward."""
    base_samples_per_prompt: int = 8
    """offline without a dataset: initial-model samples per training prompt; every within-prompt pair with a reward
    gap > min_reward_gap is a preference pair (Pick-a-Pic: ~14 images per prompt)."""
    beta: float = 5000.0
    """KL strength beta_code (absorbs T*omega(lambda_t), the 1/2 and the element mean); 5000 in every launcher."""
    lr: float = 1e-5
    """learning rate (diffusers DPO LoRA script: 1e-5 constant; official full-UNet runs: 2.048e-5)."""
    weight_decay: float = 1e-2
    """AdamW weight decay (official and diffusers: 1e-2)."""
    optimizer: str = "adamw"
    """"adamw" | "adam" | "sgd" (methods.common.build_optimizer)."""
    grad_clip: float = 1.0
    """global gradient-norm clip (1.0 in both codebases; <= 0 measures only)."""
    pairs_per_update: int = 16
    """pairs per optimizer update (diffusers turbo: 8 per device x 2 accumulation steps)."""
    micro_batch: int = 0
    """pairs per forward/backward chunk, gradients accumulated over chunks (0 = all pairs at once)."""
    timesteps: str = "grid"
    """"grid": t from the model's own K-step sampling grid (turbo mode, §2.4); "uniform": t ~ U{0..999}."""
    timesteps_per_pair: int = 1
    """timesteps (each with its own noise) per pair; their error differences are averaged inside the sigmoid
    (1 = the paper; K with "grid" = every grid step, PSO's sequence-level sum, §4.2)."""
    noise: str = "fresh"
    """"fresh": one eps ~ N(0,I) per pair and timestep shared by winner and loser (paper); "own": each sample's
    own starting noise z (online only: the reflow pairing (z, x0) a distilled student was trained on)."""
    sft_weight: float = 0.0
    """weight of an added plain denoising loss on the winners (0 = pure DPO, the paper's DPO mode)."""
    caption_dropout: float = 0.0
    """fraction of prompts replaced by "" in updates (official SD runs 0.2; turbo launcher 0)."""
    prompts_per_round: int = 16
    """online: prompts sampled per round."""
    samples_per_prompt: int = 2
    """online: images per prompt per round (2 = the §2.7a definition; toy recipe 2 used 8)."""
    updates_per_round: int = 1
    """online: optimizer updates per round, each on `pairs_per_update` pairs drawn with replacement."""
    pairing: str = "all"
    """online: "all" ordered (winner, loser) pairs within a prompt, or "best_worst" (one per prompt)."""
    min_reward_gap: float = 0.0
    """online: a pair needs reward(winner) - reward(loser) > this (0 drops exact ties only)."""
    sample_eta: float = 0.0
    """online: sampler stochasticity (0 = deterministic DDIM, as in toy recipe 2 and needed for noise="own")."""
    kernel: str | None = None
    """online: sampling kernel ("ddim" | "euler_ancestral" | "lcm"); None = the model's default."""
    max_updates: int | None = None
    """stop after this many optimizer updates (None = when the budget is spent)."""
    random_flip: bool = True
    """offline: flip winner and loser of a pair together with probability 1/2 (official: random h-flip)."""
    lora_rank: int = 8
    """LoRA rank (diffusers DPO script: 8); read by the harness when it builds the policy."""
    full_finetune: bool = False
    """train every denoiser weight (official DPO runs, the toy recipes) instead of LoRA; read by the harness."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # toy world, the paper's algorithm: a fixed set of base-sample pairs (8 samples per training prompt, labelled
        # by the verifier), one fresh eps and one grid t per pair shared by winner and loser; toy-recipes.md's
        # optimizer (full fine-tune, Adam) and the online row's lr / batch. micro_batch is memory only (non_semantic).
        "toy": dict(source="offline", base_samples_per_prompt=8, lr=5e-5, beta=5000.0, pairs_per_update=64,
                    noise="fresh", timesteps_per_pair=1, weight_decay=0.0, optimizer="adam", full_finetune=True,
                    micro_batch=16),
    }
    non_semantic: ClassVar[tuple[str, ...]] = ("micro_batch",)
    """Fields that do not change the result (excluded from a cell's identity)."""

    def __post_init__(self):
        check_choice("source", self.source, ("online", "offline"))
        check_choice("timesteps", self.timesteps, ("grid", "uniform"))
        check_choice("noise", self.noise, ("fresh", "own"))
        check_choice("pairing", self.pairing, ("all", "best_worst"))
        check_positive(self, "beta", "lr", "pairs_per_update", "timesteps_per_pair", "prompts_per_round",
                       "updates_per_round", "lora_rank", "max_updates", "base_samples_per_prompt")
        check_positive(self, "micro_batch", "sft_weight", "caption_dropout", "min_reward_gap", "sample_eta",
                       "weight_decay", allow_zero=True)
        if self.source == "offline" and not self.dataset and self.base_samples_per_prompt < 2:
            raise ValueError(f"base_samples_per_prompt must be >= 2 to form pairs; got {self.base_samples_per_prompt}")
        if self.source == "offline" and self.noise == "own":
            raise ValueError("noise='own' needs the sample's own starting noise: only source='online' has it")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2; got {self.samples_per_prompt}")

    @classmethod
    def search_space(cls) -> dict[str, tuple]:
        return {
            "lr": ("log_float", 1e-6, 1e-4),
            "beta": ("log_float", 500.0, 20000.0),
            "timesteps_per_pair": ("categorical", [1, 2, 4]),
            "noise": ("categorical", ["fresh", "own"]),
            "sft_weight": ("categorical", [0.0, 0.1, 1.0]),
        }


def loss(err_theta_w: torch.Tensor, err_theta_l: torch.Tensor, err_ref_w: torch.Tensor, err_ref_l: torch.Tensor,
         beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion-DPO loss (spec §2.2, code form) and the per-pair margin `inside`.

        inside = -0.5 * beta * [(e_theta^w - e_ref^w) - (e_theta^l - e_ref^l)]
        loss   = mean_pairs( -log sigmoid(inside) ) = mean_pairs softplus(-inside)

    e_* are element-MEAN squared denoising errors, shape (P,) or (P, T) for T timesteps per pair; with (P, T) the
    bracket is averaged over T inside the sigmoid (a lower-variance estimate of the same margin; T=1 is the paper).
    Positive `inside` = the model denoises the winner better, relative to the reference, than the loser.
    Worked values (beta 5000): theta = ref -> ln 2 = 0.693147; e_theta = (0.0990, 0.1005), refs 0.1 -> 0.023245.
    """
    bracket = (err_theta_w - err_ref_w) - (err_theta_l - err_ref_l)
    if bracket.ndim == 2:
        bracket = bracket.mean(dim=1)
    inside = -0.5 * beta * bracket
    return torch.nn.functional.softplus(-inside).mean(), inside


def implicit_accuracy(inside: torch.Tensor) -> float:
    """Fraction of pairs with inside > 0, ties counting 1/2 (diffusers' rule: 0.5 at theta = ref)."""
    return float(((inside > 0).float() + 0.5 * (inside == 0).float()).mean())


def update_nfe(num_pairs: int, timesteps_per_pair: int, nfe_per_predict: int) -> int:
    """NFEs of one update: winner and loser, each through the policy (forward+backward) and the reference
    (forward), at every timestep: 2 * 2 * P * T * nfe_per_predict (the reference's forwards count too)."""
    return 4 * num_pairs * timesteps_per_pair * nfe_per_predict


class DiffusionDPOMethod:
    """Diffusion-DPO, offline or online; `generate` is the shared deterministic sampler."""

    name: ClassVar[str] = "diffusion_dpo"
    label: ClassVar[str] = "Diffusion-DPO"
    Config = Config
    paper: ClassVar[str] = "Wallace et al., Diffusion Model Alignment Using Direct Preference Optimization, arXiv 2311.12908"
    deviations: ClassVar[tuple[Deviation, ...]] = (
        Deviation("without a dataset, the fixed preference set is built from 8 samples per training prompt of the "
                  "initial model labelled by the task reward (paper: Pick-a-Pic v2, human labels)",
                  "the toy world has no human preference set and the task gives prompts, not images; the set's source "
                  "is logged with every run (diffusion_dpo/pairs_source.json)",
                  "methods/preference_data.py BaseSamplePreferences; methods/diffusion_dpo.py Config.dataset"),
        Deviation("building the set is charged to the cell's NFE and reward-call budget (paper: a free dataset)",
                  "equal compute across rows", "methods/diffusion_dpo.py _train_offline"),
        Deviation("t from the model's own K-step grid, no zero-terminal-SNR rescale (official turbo mode rescales)",
                  "the diffusers --is_turbo path; the grid of the cell's K is the turbo grid at K = 4",
                  "methods/diffusion_dpo.py Config.timesteps"),
        Deviation("toy recipe: v-prediction target, Adam lr 5e-5, full fine-tune, 64 pairs per update (paper: eps "
                  "target, AdamW 2.048e-5 / LoRA 1e-5, 16 pairs)", "the toy denoiser predicts v; toy-recipes.md's "
                  "optimizer", "methods/preference_data.py denoising_target; methods/diffusion_dpo.py presets"),
    )

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else Config()

    # --------------------------------------------------------------------------------------------------
    def train(self, policy, task: Task, budget: Budget, tracker: Tracker) -> None:
        cfg = self.config
        log.info("diffusion_dpo config: %s", describe(cfg))
        check_run_length(budget, cfg.max_updates)
        self.updates = 0
        gen = generator(task.seed)
        params = policy.trainable_parameters()
        optimizer = build_optimizer(params, cfg)
        grid = grid_timesteps(policy, task.train_steps)
        cost = update_nfe(cfg.pairs_per_update, cfg.timesteps_per_pair, policy.nfe_per_predict)
        if cfg.source == "online":
            self._train_online(policy, task, budget, tracker, optimizer, params, grid, cost, gen)
        else:
            self._train_offline(policy, task, budget, tracker, optimizer, params, grid, cost, gen)

    def _train_online(self, policy, task, budget, tracker, optimizer, params, grid, cost, gen) -> None:
        cfg = self.config
        source = OnlineRewardPairs(prompts_per_round=cfg.prompts_per_round, samples_per_prompt=cfg.samples_per_prompt,
                                   eta=cfg.sample_eta, pairing=cfg.pairing, min_gap=cfg.min_reward_gap,
                                   kernel=cfg.kernel)
        round_nfe, round_calls = source.round_cost(task.train_steps, policy.nfe_per_predict)
        # A round is only started if it can be followed by at least one update.
        while budget.fits(nfe=round_nfe + cost, reward_calls=round_calls) and not self._done():
            batch = source.collect(policy, task.prompts, task.reward, task.train_steps, budget, gen)
            tracker.log_metrics({"train/reward_mean": float(batch.rewards.mean()),
                                 "train/reward_std": float(batch.rewards.std(unbiased=False)),
                                 "train/num_pairs": float(batch.num_pairs)}, step=budget.total_nfe)
            if batch.num_pairs == 0:
                continue  # every prompt tied; the sampling cost was spent, so the loop still terminates
            x0 = batch.traj.latents[:, -1].float()  # (B, C, h, w): the samples themselves
            z = own_noise(batch.traj, policy) if cfg.noise == "own" else None
            prompts = batch.traj.prompts
            for _ in range(cfg.updates_per_round):
                if not budget.fits(nfe=cost) or self._done():
                    break
                pick = torch.randint(batch.num_pairs, (cfg.pairs_per_update,), generator=gen)
                win, lose = batch.win[pick], batch.lose[pick]
                metrics = self._update(policy, optimizer, params, x0[win], x0[lose], [prompts[i] for i in win.tolist()],
                                       grid, gen, z_w=None if z is None else z[win], z_l=None if z is None else z[lose])
                budget.spend(grad_nfe=cost)
                tracker.log_metrics(metrics, step=budget.total_nfe)

    def _train_offline(self, policy, task, budget, tracker, optimizer, params, grid, cost, gen) -> None:
        cfg = self.config
        data = offline_pairs(cfg, policy, task, budget, tracker, gen, self.name)
        order: list[int] = []
        while budget.fits(nfe=cost) and not self._done():
            if len(order) < cfg.pairs_per_update:  # reshuffle each pass over the fixed set
                order += torch.randperm(len(data), generator=gen).tolist()
            rows, order = order[: cfg.pairs_per_update], order[cfg.pairs_per_update :]
            prompts, x0_w, x0_l = data.latent_batch(rows, policy, gen)
            metrics = self._update(policy, optimizer, params, x0_w, x0_l, prompts, grid, gen)
            budget.spend(grad_nfe=cost)
            tracker.log_metrics(metrics, step=budget.total_nfe)

    def _done(self) -> bool:
        return self.config.max_updates is not None and self.updates >= self.config.max_updates

    # --------------------------------------------------------------------------------------------------
    def _update(self, policy, optimizer, params, x0_w, x0_l, prompts, grid, gen, *, z_w=None, z_l=None
                ) -> dict[str, float]:
        """One optimizer update on P pairs (x0_w, x0_l: (P, C, h, w), winner and loser share prompts[i])."""
        cfg = self.config
        num_pairs, T = x0_w.shape[0], cfg.timesteps_per_pair
        device = x0_w.device
        t = draw_timesteps(cfg.timesteps, grid, policy.scheduler.config.num_train_timesteps, (num_pairs, T), gen)
        if z_w is None:  # fresh noise, shared by winner and loser of a pair (same t, same eps)
            eps = torch.randn((num_pairs, T, *x0_w.shape[1:]), generator=gen).to(device)
            eps_w = eps_l = eps
        else:  # own noise: each sample's z, the same at every timestep
            eps_w = z_w.to(device).unsqueeze(1).expand(-1, T, *z_w.shape[1:])
            eps_l = z_l.to(device).unsqueeze(1).expand(-1, T, *z_l.shape[1:])
        if cfg.caption_dropout > 0:
            drop = (torch.rand(num_pairs, generator=gen) < cfg.caption_dropout).tolist()
            prompts = ["" if d else p for p, d in zip(prompts, drop)]
        chunk = cfg.micro_batch or num_pairs
        optimizer.zero_grad(set_to_none=True)
        parts: dict[str, list[torch.Tensor]] = {"inside": [], "e_theta_w": [], "e_theta_l": [], "e_ref_w": [],
                                                "e_ref_l": []}
        for start in range(0, num_pairs, chunk):
            sl = slice(start, min(start + chunk, num_pairs))
            n = sl.stop - sl.start
            # Winner and loser through one batched forward: rows [w (n*T); l (n*T)].
            x0 = torch.cat([x0_w[sl].unsqueeze(1).expand(-1, T, *x0_w.shape[1:]),
                            x0_l[sl].unsqueeze(1).expand(-1, T, *x0_l.shape[1:])]).flatten(0, 1)
            noise = torch.cat([eps_w[sl], eps_l[sl]]).flatten(0, 1)
            tt = t[sl].repeat(2, 1).flatten().to(device)
            cond = policy.encode_prompts([p for p in prompts[sl] for _ in range(T)] * 2)
            e_theta = denoising_errors(policy, x0, noise, tt, cond).view(2, n, T)
            with policy.reference():
                e_ref = denoising_errors(policy, x0, noise, tt, cond).view(2, n, T)
            value, inside = loss(e_theta[0], e_theta[1], e_ref[0], e_ref[1], cfg.beta)
            if cfg.sft_weight > 0:
                value = value + cfg.sft_weight * e_theta[0].mean()
            (value * n / num_pairs).backward()
            for key, v in zip(parts, (inside, e_theta[0], e_theta[1], e_ref[0], e_ref[1])):
                parts[key].append(v.detach())
        grad_norm = clip_grad_norm(params, cfg.grad_clip)
        optimizer.step()
        self.updates += 1
        cat = {k: torch.cat(v) for k, v in parts.items()}
        with torch.no_grad():
            dpo_loss, _ = loss(cat["e_theta_w"], cat["e_theta_l"], cat["e_ref_w"], cat["e_ref_l"], cfg.beta)
        return {
            "train/loss": float(dpo_loss),
            "train/implicit_acc": implicit_accuracy(cat["inside"]),
            "train/margin": float(cat["inside"].mean()),
            "train/raw_model_loss": float(0.5 * (cat["e_theta_w"].mean() + cat["e_theta_l"].mean())),
            "train/raw_ref_loss": float(0.5 * (cat["e_ref_w"].mean() + cat["e_ref_l"].mean())),
            "train/grad_norm": grad_norm,
        }

    def generate(self, policy, prompts: list[str], num_steps: int, *, noise: torch.Tensor,
                 budget: Budget | None = None) -> tuple[torch.Tensor, int]:
        return default_generate(policy, prompts, num_steps, noise=noise, budget=budget)


@dataclass
class OnlineConfig(Config):
    """Diffusion-DPO on online pairs (§2.7a): each round samples the current policy, ranks its samples by the task
    reward and trains on within-prompt pairs; the `diffusion_dpo_online` row, a labelled adaptation of the paper."""

    source: str = "online"
    """"online": pairs from the current policy ranked by the task reward (this row); "offline": a fixed set."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # toy recipe 2 with the suggestions it lists: reflow-paired noise, every grid step per pair, 8 samples
        # per prompt, an SFT term on winners. Expect "no significant change" from the fresh-noise paper form.
        # micro_batch: 64 pairs x 4 timesteps x 2 = 512 UNet rows in one backward peaked at 3.0 GB RSS on the CPU;
        # chunks of 16 pairs peak at 1.3 GB and take half the CPU time (bench/perf.py). Memory only: non_semantic.
        "toy": dict(lr=5e-5, beta=5000.0, pairs_per_update=64, prompts_per_round=36, samples_per_prompt=8,
                    updates_per_round=8, noise="own", timesteps_per_pair=4, weight_decay=0.0, optimizer="adam",
                    full_finetune=True, micro_batch=16),
    }


class DiffusionDPOOnlineMethod(DiffusionDPOMethod):
    """Diffusion-DPO with source="online" by default (see OnlineConfig)."""

    name: ClassVar[str] = "diffusion_dpo_online"
    label: ClassVar[str] = "Diffusion-DPO (online)"
    Config = OnlineConfig
    deviations: ClassVar[tuple[Deviation, ...]] = (
        Deviation("online pairs: each round samples the CURRENT policy and ranks by the task reward (paper: a fixed "
                  "offline preference dataset)", "the usual few-step baseline form (§2.7a); compare with the "
                  "offline diffusion_dpo row", "methods/diffusion_dpo.py OnlineConfig.source"),
        Deviation("toy recipe: each sample's own starting noise z instead of one fresh eps shared by winner and loser",
                  "the reflow pairing (z, x0) of a deterministic sample (toy-recipes.md suggestion)",
                  "methods/diffusion_dpo.py Config.noise"),
        Deviation("toy recipe: all 4 grid timesteps per pair averaged inside the sigmoid (paper: one t per pair)",
                  "a lower-variance estimate of the same margin", "methods/diffusion_dpo.py Config.timesteps_per_pair"),
        *DiffusionDPOMethod.deviations[2:],
    )
