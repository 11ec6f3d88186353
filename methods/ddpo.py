"""DDPO_IS — Denoising Diffusion Policy Optimization with a PPO-clipped importance ratio.

Black et al., "Training Diffusion Models with Reinforcement Learning" (ICLR 2024); spec:
shared/methods/ddpo-sdpo-sharpening-search.md §2. The K-step stochastic DDIM sampler is a K-step MDP whose
action at step k is x_{k+1} ~ N(mu_theta(x_k, t_k, c), sigma_k^2 I); the reward R(x_0, c) arrives at the end.

One epoch:
  1. sample P prompts x S samples each with the current policy (eta = 1), recording every latent and the
     per-element-mean log-prob of every transition;
  2. score the final images with the reward; advantages per prompt (stat tracker, per-batch groups, or whole
     batch), clipped to +-adv_clip_max; the same scalar advantage is used at every step;
  3. `num_inner_epochs` shuffled passes: each sample trains on a random permutation of its stochastic steps
     (the first `timestep_fraction` of them); gradients accumulate over those steps and
     `gradient_accumulation_steps` micro-batches, then grad-norm clip and one optimizer step.
Deterministic steps (std = 0, e.g. eta = 0) carry no log-prob and are never trained; `train_last_step=False`
also skips the last, nearly deterministic transition (the toy recipe's choice: there it had std 0) unless it is
the only stochastic one (K = 1).

Budget rule: an epoch starts only if its whole cost (sampling NFEs + gradient NFEs + reward calls, computed
exactly before it starts) fits in the remaining budget, so a run never overspends and leaves less than one
epoch unspent. A budget smaller than one epoch is a configuration error (ValueError).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from methods import sampling
from methods.common import (
    Budget,
    Deviation,
    PerPromptStatTracker,
    Task,
    Tracker,
    batch_advantages,
    build_optimizer,
    check_choice,
    check_positive,
    clip_grad_norm,
    default_generate,
    generator,
    group_advantages,
    load_checkpoint,
    progress,
    sample_nfe,
    save_checkpoint,
)
from methods.policy import Conditioning


@dataclass
class Config:
    """DDPO_IS. Defaults: ddpo-pytorch `config/dgx.py` (compressibility; LoRA, 256 samples an epoch, 4 updates
    an epoch), which the README reproduces; the JAX paper runs used full fine-tuning at lr 1e-5."""

    # --- sampling ---
    prompts_per_epoch: int = 256
    """P: prompt draws per epoch."""
    samples_per_prompt: int = 1
    """S: trajectories sampled per drawn prompt (the toy recipe uses 8, so per-prompt groups exist in a batch)."""
    prompt_replacement: bool = True
    """Draw the P prompts uniformly with replacement (paper); False = P distinct prompts (toy recipe)."""
    sample_batch_size: int = 8
    """Trajectories per sampler call (memory only). CPU kernels differ at the 1e-7 level between batch sizes, so
    the log-ratio at unchanged weights is exactly 0 only when this equals train_batch_size."""
    eta: float = 1.0
    """DDIM eta of the training sampler (1 = the DDPM-like stochastic policy of the paper)."""
    kernel: str | None = "ddim"
    """Sampling kernel of `methods.sampling` ("ddim" is DDPO's MDP); None = the model's default kernel."""
    # --- advantages ---
    advantage: str = "tracker"
    """"tracker": per-prompt buffers across epochs (§1.5); "group": per-prompt within this batch (toy recipe);
    "batch": whole-batch z-score."""
    tracker_buffer_size: int = 16
    """Per-prompt FIFO buffer length of the stat tracker."""
    tracker_min_count: int = 16
    """Below this many buffered rewards a prompt is normalised with whole-batch statistics."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [-adv_clip_max, adv_clip_max]."""
    # --- PPO update ---
    clip_range: float = 1e-4
    """PPO epsilon on the ratio of per-element-mean likelihoods (calibrated to the mean convention)."""
    num_inner_epochs: int = 1
    """Passes over each epoch's samples."""
    train_batch_size: int = 32
    """Trajectories per micro-batch (dgx: 4 per GPU x 8 GPUs)."""
    gradient_accumulation_steps: int = 2
    """Micro-batches per optimizer step (gradients also accumulate over all trained timesteps)."""
    timestep_fraction: float = 1.0
    """Fraction of each sample's trainable steps trained per inner epoch (a random subset per sample)."""
    train_last_step: bool = True
    """Train the last transition too (paper). Its std is tiny (DDIM: ~0.03 on SD, ~0.006 on the toy), so it is
    nearly deterministic; the toy recipe did not train it. At K = 1 it is the only action and is always trained."""
    # --- optimizer ---
    optimizer: str = "adamw"
    """"adamw" | "adam" | "sgd"."""
    lr: float = 3e-4
    """Learning rate (ddpo-pytorch with LoRA rank 4)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 1e-4
    """Decoupled weight decay (AdamW)."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip before each optimizer step."""
    # --- policy (read by the harness when it builds the Policy) ---
    lora_rank: int = 4
    """LoRA rank on the denoiser's attention projections."""
    full_finetune: bool = False
    """Train every denoiser weight instead of LoRA adapters (the toy recipe and the JAX paper runs)."""
    # --- run length / checkpoints ---
    num_epochs: int | None = 100
    """Upper bound on epochs (paper: 100); None = run until the NFE budget is spent."""
    checkpoint_path: str | None = None
    """Full-state checkpoint file; resumed from when it exists, rewritten every `checkpoint_every` epochs."""
    checkpoint_every: int = 1
    """Epochs between checkpoints (when `checkpoint_path` is set)."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # lr: the validation probe of 2026-12-06 (bench/conf/tuning/toy/val-probe.md); it supersedes any lr below.
        # toy-recipes.md Recipe 1 "DDPO-PP": +0.04..0.09 `all` at every S in 7.5 CPU minutes; train_batch_size 16
        # instead of its 64 (2026-12-05 probes, K = 4, 20k NFEs, gain in toy-all at S = 4 over n = 1,024 paired
        # samples): 64 -> +0.030 / 3.4 SE and 2.5 SE (seeds 0 / 1, the grid), 32 -> +0.031 (2.9 SE), 16 -> +0.059
        # (5.7 SE) and +0.037 (3.4 SE): more, smaller updates, as PSO and SDPO.
        "toy": dict(
            prompts_per_epoch=32, samples_per_prompt=8, prompt_replacement=False, sample_batch_size=64,
            eta=1.0, kernel="ddim", advantage="group", adv_clip_max=5.0, clip_range=1e-4, num_inner_epochs=1,
            train_batch_size=16, gradient_accumulation_steps=1, timestep_fraction=1.0, train_last_step=False,
            optimizer="adam", lr=1e-5, weight_decay=0.0, max_grad_norm=1.0, full_finetune=True, num_epochs=None,
        ),
    }
    non_semantic: ClassVar[tuple[str, ...]] = ("sample_batch_size", "checkpoint_path", "checkpoint_every")
    """Fields that do not change the result (excluded from a cell's identity)."""

    def __post_init__(self):
        check_positive(self, "prompts_per_epoch", "samples_per_prompt", "sample_batch_size", "clip_range",
                       "num_inner_epochs", "train_batch_size", "gradient_accumulation_steps", "adv_clip_max",
                       "num_epochs", "checkpoint_every", "lora_rank")
        check_positive(self, "lr", "eta", "weight_decay", "max_grad_norm", allow_zero=True)
        check_choice("advantage", self.advantage, ("tracker", "group", "batch"))
        check_choice("optimizer", self.optimizer, ("adamw", "adam", "sgd"))
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError(f"timestep_fraction must be in (0, 1]; got {self.timestep_fraction}")
        if self.advantage == "group" and self.samples_per_prompt < 2:
            raise ValueError("advantage='group' needs samples_per_prompt >= 2 (a single sample has advantage 0)")
        n, per_update = self.samples_per_epoch, self.train_batch_size * self.gradient_accumulation_steps
        if n % per_update:
            raise ValueError(f"samples per epoch ({n} = prompts_per_epoch x samples_per_prompt) must be a multiple "
                             f"of train_batch_size x gradient_accumulation_steps = {per_update}")

    @property
    def samples_per_epoch(self) -> int:
        return self.prompts_per_epoch * self.samples_per_prompt

    @property
    def updates_per_epoch(self) -> int:
        return self.num_inner_epochs * self.samples_per_epoch // (self.train_batch_size * self.gradient_accumulation_steps)

    @classmethod
    def search_space(cls) -> dict[str, tuple]:
        return {
            "lr": ("log_float", 1e-5, 1e-3),
            "clip_range": ("log_float", 3e-5, 1e-3),
            "adv_clip_max": ("categorical", [2.0, 5.0, 10.0]),
            "num_inner_epochs": ("categorical", [1, 2, 4]),
        }


def loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
         clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip surrogate of DDPO_IS for one timestep of a batch (spec §2.4).

        rho_i = exp(log p_theta(x_{k+1} | x_k, c) - log p_old(x_{k+1} | x_k, c))   (per-element-MEAN log-probs, §1.2)
        L     = mean_i max(-A_i rho_i, -A_i clip(rho_i, 1 - eps, 1 + eps)),          eps = clip_range

    Where the clipped branch is the max, the gradient is zero. Diagnostics (no grad):
    approx_kl = 0.5 mean (log rho)^2, clipfrac = mean(|rho - 1| > eps), ratio = mean rho.
    Worked values (A = 1.2, eps = 1e-4): log rho = 5e-5 -> -1.200060; 3e-4 -> -1.200120 (clipped, zero grad);
    -3e-4 -> -1.199640.
    """
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    value = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        info = {
            "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
            "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
            "ratio": ratio.detach().mean(),
            "log_ratio_abs_max": log_ratio.detach().abs().max(),
        }
    return value, info


class DDPOMethod:
    """DDPO_IS (PPO-clip) on the shared sampler; evaluation uses the deterministic default sampler."""

    name: ClassVar[str] = "ddpo"
    label: ClassVar[str] = "DDPO"
    Config = Config
    paper: ClassVar[str] = "Black et al., Training Diffusion Models with Reinforcement Learning (DDPO), arXiv 2305.13301"
    deviations: ClassVar[tuple[Deviation, ...]] = (
        Deviation("toy recipe: group advantages over 8 samples per prompt, 16 trajectories per update, Adam lr 1e-5, "
                  "full fine-tune (paper: per-prompt stat tracking, AdamW 3e-4, LoRA)", "toy-recipes.md Recipe 1 "
                  "(DDPO-PP); 16 per update measured +0.059 vs +0.030 at 64", "methods/ddpo.py Config.presets['toy']"),
        Deviation("toy recipe: the last transition is not trained (paper code: every step)", "its DDIM std is 0.006 "
                  "on the toy: a large, noisy log-ratio that carries little reward signal",
                  "methods/ddpo.py Config.train_last_step"),
        Deviation("trained at the cell's K few-step grid, no CFG (paper: 50 DDIM steps, CFG 5)", "the benchmark "
                  "trains few-step models at K and evaluates at S", "bench/conf/grid/*.yaml train_steps"),
    )

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else Config()

    def generate(self, policy, prompts: list[str], num_steps: int, *, noise: torch.Tensor,
                 budget: Budget | None = None) -> tuple[torch.Tensor, int]:
        return default_generate(policy, prompts, num_steps, noise=noise, budget=budget)

    # ------------------------------------------------------------------------------------------------------
    def trained_steps(self, policy, num_steps: int) -> torch.Tensor:
        """(K,) bool: the transitions DDPO may train on (`sampling.trainable_steps`)."""
        return sampling.trainable_steps(policy, num_steps, self.config.eta, self.config.kernel,
                                        train_last_step=self.config.train_last_step)

    def epoch_cost(self, num_steps: int, num_trained: int, nfe_per_predict: int) -> dict[str, int]:
        """Exact cost of one epoch: sampling NFEs (samples x K x nfe_per_predict), gradient NFEs (one
        forward+backward of one transition of one sample = nfe_per_predict, for `num_trained` transitions per
        sample per inner epoch) and reward calls (one per image)."""
        cfg, n = self.config, self.config.samples_per_epoch
        return {
            "sample_nfe": sample_nfe(n, num_steps, nfe_per_predict),
            "grad_nfe": cfg.num_inner_epochs * n * num_trained * nfe_per_predict,
            "reward_calls": n,
        }

    def train(self, policy, task: Task, budget: Budget, tracker: Tracker) -> None:
        cfg = self.config
        num_steps, npp = int(task.train_steps), int(policy.nfe_per_predict)
        trainable = self.trained_steps(policy, num_steps)  # (K,) bool
        num_trained = int(int(trainable.sum()) * cfg.timestep_fraction)
        if num_trained < 1:
            raise ValueError(f"nothing to train: {int(trainable.sum())} trainable stochastic step(s) of {num_steps} "
                             f"(eta={cfg.eta}, train_last_step={cfg.train_last_step}, "
                             f"timestep_fraction={cfg.timestep_fraction})")
        if not cfg.prompt_replacement and cfg.prompts_per_epoch > len(task.prompts):
            raise ValueError(f"prompt_replacement=False needs prompts_per_epoch ({cfg.prompts_per_epoch}) <= the "
                             f"number of training prompts ({len(task.prompts)})")
        cost = self.epoch_cost(num_steps, num_trained, npp)
        epoch_nfe = cost["sample_nfe"] + cost["grad_nfe"]
        if budget.max_nfe is None and cfg.num_epochs is None:
            raise ValueError("unbounded run: give the Budget a max_nfe or set num_epochs")
        if budget.max_nfe is not None and epoch_nfe > budget.max_nfe:
            raise ValueError(f"the budget ({budget.max_nfe} NFEs) is smaller than one DDPO epoch ({epoch_nfe} NFEs: "
                             f"{cost}); lower prompts_per_epoch x samples_per_prompt or raise the budget")
        if budget.max_reward_calls is not None and cost["reward_calls"] > budget.max_reward_calls:
            raise ValueError(f"the reward-call budget ({budget.max_reward_calls}) is smaller than one DDPO epoch "
                             f"({cost['reward_calls']} images)")

        params = [p for p in policy.trainable_parameters() if p.requires_grad]
        optimizer = build_optimizer(params, cfg)
        stat_tracker = PerPromptStatTracker(cfg.tracker_buffer_size, cfg.tracker_min_count)
        # Separate streams, so that e.g. the sampler's chunk size does not change which prompts are drawn.
        generators = {"prompt": generator(task.seed), "shuffle": generator(task.seed + 1),
                      "noise": generator(task.seed + 2, policy.device)}
        epoch = 0
        if cfg.checkpoint_path and Path(cfg.checkpoint_path).exists():
            state = load_checkpoint(cfg.checkpoint_path, policy=policy, optimizer=optimizer, config=cfg,
                                    budget=budget, generators=generators)
            epoch = state["step"]
            stat_tracker.load_state_dict(state["extra"]["stat_tracker"])

        max_epochs = cfg.num_epochs if cfg.num_epochs is not None else float("inf")
        affordable = epoch + budget.remaining_nfe // epoch_nfe if budget.max_nfe is not None else float("inf")
        planned = int(min(max_epochs, affordable))  # finite: at least one of the two bounds is set
        with progress(tracker, planned, "ddpo epochs") as advance:
            # The budget rule: an epoch starts only if all of it fits (module docstring).
            while epoch < max_epochs and budget.fits(nfe=epoch_nfe, reward_calls=cost["reward_calls"]):
                metrics = self._epoch(policy, task, budget, optimizer, params, stat_tracker, trainable,
                                      num_trained, generators)
                epoch += 1
                metrics["train/epoch"] = float(epoch)
                tracker.log_metrics(metrics, step=budget.total_nfe)
                advance(1)
                if cfg.checkpoint_path and epoch % cfg.checkpoint_every == 0:
                    save_checkpoint(cfg.checkpoint_path, policy=policy, optimizer=optimizer, step=epoch,
                                    config=cfg, budget=budget, generators=generators,
                                    extra={"stat_tracker": stat_tracker.state_dict()})

    # ------------------------------------------------------------------------------------------------------
    def _draw_prompts(self, prompts: list[str], gen: torch.Generator) -> list[str]:
        cfg = self.config
        if cfg.prompt_replacement:
            idx = torch.randint(len(prompts), (cfg.prompts_per_epoch,), generator=gen)
        else:
            idx = torch.randperm(len(prompts), generator=gen)[: cfg.prompts_per_epoch]
        # A drawn prompt's samples are adjacent: [p0] * S + [p1] * S + ...
        return [prompts[i] for i in idx.tolist() for _ in range(cfg.samples_per_prompt)]

    @torch.no_grad()
    def _sample(self, policy, task: Task, prompts: list[str], noise_gen: torch.Generator) -> dict[str, Any]:
        """Roll out the current policy in chunks and score the images; one Trajectory for the whole epoch."""
        cfg = self.config
        trajs, rewards = [], []
        for start in range(0, len(prompts), cfg.sample_batch_size):
            batch = prompts[start: start + cfg.sample_batch_size]
            traj = sampling.sample(policy, batch, task.train_steps, generator=noise_gen, eta=cfg.eta,
                                   kernel=cfg.kernel)
            trajs.append(traj)
            rewards.append(torch.as_tensor(task.reward(traj.images, batch)).detach().float().cpu().reshape(-1))
        traj = dataclasses.replace(
            trajs[0],
            latents=torch.cat([t.latents for t in trajs]),  # (N, K+1, C, h, w)
            log_probs=torch.cat([t.log_probs for t in trajs]),  # (N, K)
            x0_preds=None, images=None, final_latents=None,
            cond=Conditioning.cat([t.cond for t in trajs]), prompts=list(prompts),
        )
        return {"traj": traj, "rewards": torch.cat(rewards)}

    def _advantages(self, prompts: list[str], rewards: torch.Tensor, stat_tracker: PerPromptStatTracker):
        cfg = self.config
        if cfg.advantage == "tracker":
            advantages = stat_tracker.update(prompts, rewards)
        elif cfg.advantage == "group":
            advantages = group_advantages(prompts, rewards)
        else:
            advantages = batch_advantages(rewards)
        return advantages.clamp(-cfg.adv_clip_max, cfg.adv_clip_max)

    def _epoch(self, policy, task, budget, optimizer, params, stat_tracker, trainable, num_trained, generators):
        cfg = self.config
        npp = int(policy.nfe_per_predict)
        accum = cfg.gradient_accumulation_steps
        t0 = time.perf_counter()
        prompts = self._draw_prompts(task.prompts, generators["prompt"])
        n = len(prompts)
        data = self._sample(policy, task, prompts, generators["noise"])
        traj, rewards = data["traj"], data["rewards"]
        budget.spend(sample_nfe=sample_nfe(n, task.train_steps, npp), reward_calls=n)
        if torch.any(trainable & ~traj.stochastic):
            raise RuntimeError(f"sampler's stochastic steps {traj.stochastic.tolist()} disagree with the predicted "
                               f"trainable steps {trainable.tolist()}")
        step_ids = torch.nonzero(trainable).flatten()  # indices k of the trainable transitions
        if not torch.isfinite(traj.log_probs[:, step_ids]).all():
            raise RuntimeError("non-finite sampling log-prob at a trainable step")
        advantages = self._advantages(prompts, rewards, stat_tracker).to(policy.device)  # (N,)
        sample_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        sums = dict.fromkeys(("loss", "approx_kl", "clipfrac", "ratio"), 0.0)
        grad_norms, log_ratio_abs_max, terms = [], 0.0, 0
        for _ in range(cfg.num_inner_epochs):
            order = torch.randperm(n, generator=generators["shuffle"])
            # An independent permutation of the trainable steps per sample; the first `num_trained` are trained.
            perms = torch.argsort(torch.rand(n, len(step_ids), generator=generators["shuffle"]), dim=1)
            chosen = step_ids[perms[:, :num_trained]]  # (N, num_trained) step indices k
            for mb, rows in enumerate(order.split(cfg.train_batch_size)):
                if mb % accum == 0:
                    optimizer.zero_grad(set_to_none=True)
                for k in step_ids.tolist():
                    # Gradients are summed over steps, so the order inside an update does not matter: group the
                    # micro-batch's rows by the step they train on at this point of their permutation.
                    sel = rows[(chosen[rows] == k).any(dim=1)]
                    if len(sel) == 0:
                        continue
                    log_prob = sampling.transition_log_prob(policy, traj, k, index=sel)  # (b,)
                    value, info = loss(log_prob, traj.log_probs[sel, k].to(log_prob), advantages[sel],
                                       cfg.clip_range)
                    # = mean over the micro-batch and the trained steps, averaged over accumulated micro-batches.
                    (value * len(sel) / (len(rows) * num_trained * accum)).backward()
                    sums["loss"] += float(value.detach()) * len(sel)
                    for key in ("approx_kl", "clipfrac", "ratio"):
                        sums[key] += float(info[key]) * len(sel)
                    log_ratio_abs_max = max(log_ratio_abs_max, float(info["log_ratio_abs_max"]))
                    terms += len(sel)
                budget.spend(grad_nfe=len(rows) * num_trained * npp)
                if (mb + 1) % accum == 0:
                    grad_norms.append(clip_grad_norm(params, cfg.max_grad_norm))
                    optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        metrics = {
            "train/reward_mean": float(rewards.mean()),
            "train/reward_std": float(rewards.std(unbiased=False)),
            "train/advantage_abs_mean": float(advantages.abs().mean()),
            "train/zero_advantage_frac": float((advantages == 0).float().mean()),
            "train/loss": sums["loss"] / terms,
            "train/approx_kl": sums["approx_kl"] / terms,
            "train/clipfrac": sums["clipfrac"] / terms,
            "train/ratio": sums["ratio"] / terms,
            "train/log_ratio_abs_max": log_ratio_abs_max,
            "train/grad_norm": sum(grad_norms) / len(grad_norms),
            "train/updates": float(len(grad_norms)),
            "train/trained_steps": float(num_trained),
            "train/sample_seconds": sample_seconds,
            "train/update_seconds": time.perf_counter() - t1,
        }
        if cfg.advantage == "tracker":
            metrics.update({f"train/{k}": v for k, v in stat_tracker.stats().items()})
        return metrics


