"""SDPO: Stepwise Diffusion Policy Optimization (Zhang et al., arXiv 2411.11727).

Plain DDPO gets little to learn from on a few-step model: there are few states, the final step is nearly
deterministic, and only the last step is rewarded. SDPO changes four things
(spec: /work/shared/methods/ddpo-sdpo-sharpening-search.md §1.2, §1.5, §3):

1. It samples trajectories in *pairs*: a and b share the prompt and the initial noise x_T, and each draws
   its own DDIM noise after that.
2. Every step gets a *dense* reward. The reward model scores the decoded x0-prediction at three steps
   only: the first, an anchor and the last. Cosine similarity between x0-predictions interpolates the
   other steps. The x0-prediction at the first step of a long trajectory is the 1-step sample, so one
   long training trajectory also yields rewards for few-step outputs.
3. The dense rewards become discounted returns, and those are normalised per (prompt, step).
4. The loss regresses the difference of the pair's per-step log-ratios onto the difference of their
   advantages: a squared loss with a lambda^i step weight and a log-ratio clip. Each optimizer step sees
   one shuffled step per pair.

Conventions: log-probs are the per-element MEAN Gaussian log-density of the stochastic DDIM step (§1.2),
which is what the clip range 1e-4 is calibrated to. There is no CFG in training (the paper sets
guidance 1). Here the policy's own guidance setting applies, so build the policy with guidance <= 1
to match the paper.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)


@dataclass
class Config:
    """SDPO. Defaults: the official `config/config_sdpo.py` aesthetic config (SD-Turbo, 4 GPUs) as one process."""

    num_steps: int | None = 50
    """training trajectory length T (paper: 50 DDIM steps on SD-Turbo, evaluated at 1-8); None = the cell's task.train_steps"""
    kernel: str | None = "ddim"
    """sampling kernel of the training trajectories (paper: DDIM with exact Gaussian log-probs, spec §1.2); None = the model's"""
    eta: float = 1.0
    """DDIM stochasticity of the training trajectories (paper: 1.0); must be > 0, the loss needs log-probs"""
    pairs_per_epoch: int = 128
    """trajectory pairs sampled per epoch (paper: 8 per batch x 4 batches x 4 GPUs)"""
    sample_batch_size: int = 8
    """pairs per sampler call, so 2x this many trajectories (memory knob; paper: 8)"""
    train_batch_size: int = 2
    """pairs per micro-batch in the update (paper, aesthetic config: 2)"""
    gradient_accumulation_steps: int = 32
    """micro-batches per optimizer step (paper: 8 per GPU x 4 GPUs, so 64 pairs per update)"""
    num_inner_epochs: int = 1
    """passes over each epoch's pairs (paper: 1)"""
    timestep_fraction: float = 1.0
    """fraction of each pair's shuffled step columns that is trained on (paper: 1.0)"""
    train_last_step: bool = True
    """train the last transition too (paper code: every step). No scored x0-prediction depends on its action (R_last
    is the x0-prediction made before it), and its std is tiny (DDIM eta 1: ~0.03 on SD, ~0.006 on the toy), so its
    log-ratio is large, noisy and carries no reward signal; False skips it unless it is the only stochastic step"""
    gamma: float = 0.99
    """discount of the dense rewards into returns G_i = r_i + gamma G_{i+1} (paper: 0.99)"""
    lam: float = 0.99
    """step weight base: step i's log-ratio is weighted lam^i / log_scale, so the first steps count most (paper: 0.99)"""
    log_scale: float = 1.0
    """eta in w_i = lam^i / eta (paper: 1)"""
    clip_range: float = 1e-4
    """log-prob clip: new log-probs are clamped to old +- clip_range in the clipped branch (paper: 1e-4)"""
    adv_clip_max: float = 5.0
    """advantages are clipped to +- this before the pair difference (paper: 5)"""
    per_prompt_stat_tracking: bool = True
    """normalise returns per (prompt, step) with FIFO buffers (paper: on); off = global z-score"""
    stat_buffer_size: int = 32
    """FIFO length of each (prompt, step) buffer (paper: 32)"""
    stat_min_count: int = 16
    """below this many buffered values, use the batch's stats at that step (paper: 16)"""
    optimizer: str = "adamw"
    """"adamw" | "adam" | "sgd" (paper: AdamW)"""
    lr: float = 1e-4
    """learning rate (paper: 1e-4 aesthetic, 5e-5 ImageReward/HPSv2, 6e-5 PickScore)"""
    adam_beta1: float = 0.9
    """AdamW beta1 (paper: 0.9)"""
    adam_beta2: float = 0.999
    """AdamW beta2 (paper: 0.999)"""
    weight_decay: float = 1e-4
    """AdamW weight decay (paper: 1e-4)"""
    adam_eps: float = 1e-8
    """AdamW epsilon (paper: 1e-8)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip before every optimizer step (paper: 1.0)"""
    lora_rank: int = 4
    """LoRA rank of the policy (paper: 4; read by the harness when it builds the Policy)"""
    full_finetune: bool = False
    """train every denoiser weight instead of LoRA adapters (paper: LoRA)"""
    num_epochs: int | None = 100
    """upper bound on epochs (paper: 100 aesthetic, 200 others); None = until the NFE budget is spent"""
    checkpoint_path: str | None = None
    """full-state checkpoint file (adapters, optimizer, RNGs, stat tracker); resumed from when it exists"""
    checkpoint_every: int = 1
    """epochs between checkpoints when checkpoint_path is set (paper: every epoch)"""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # lr: the validation probe of 2026-12-06 (bench/conf/tuning/toy/val-probe.md); it supersedes any lr below.
        # Toy world: training trajectories of T = 16 DDIM steps whatever the cell's K (the paper trains on T = 50 and
        # evaluates at 1-8 steps; 16 keeps 5 epochs of 64 pairs inside the toy's 20k NFEs, T = 50 would leave one), and
        # DDPO-PP's optimizer settings from toy-recipes.md, tuned on 2026-12-05 at T = K = 4 (20k NFEs, gain in
        # toy-all at S = 4 over n = 1,024 paired samples, seed 0; now the `sdpo_t_eq_k` row):
        # - train_last_step=False: training it (std 0.006, never scored) gave -0.081 (lr 1e-4) and ~0 (lr 3e-5);
        #   without it +0.013 at both lrs;
        # - gradient_accumulation_steps=1 (an update per 16 pairs, 4x the updates): +0.051 (4.2 SE); at lr 1e-4 -0.020.
        "toy": dict(num_steps=16, pairs_per_epoch=64, sample_batch_size=64, train_batch_size=16,
                    gradient_accumulation_steps=1, optimizer="adam", lr=1e-5, weight_decay=0.0,
                    full_finetune=True, num_epochs=None, train_last_step=False),
    }
    non_semantic: ClassVar[tuple[str, ...]] = ("sample_batch_size", "checkpoint_path", "checkpoint_every")
    """fields that do not change the result (excluded from a cell's identity)"""

    def __post_init__(self):
        check_positive(self, "num_steps", "eta", "pairs_per_epoch", "sample_batch_size", "train_batch_size",
                       "gradient_accumulation_steps", "num_inner_epochs", "clip_range", "adv_clip_max",
                       "log_scale", "stat_buffer_size", "stat_min_count", "lora_rank", "num_epochs",
                       "checkpoint_every")
        check_positive(self, "lr", "weight_decay", "max_grad_norm", allow_zero=True)
        check_choice("optimizer", self.optimizer, ("adamw", "adam", "sgd"))
        if self.kernel is not None:
            check_choice("kernel", self.kernel, sampling.KERNELS)
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError(f"timestep_fraction must be in (0, 1]; got {self.timestep_fraction}")
        if not (0.0 < self.gamma <= 1.0 and 0.0 < self.lam <= 1.0):
            raise ValueError(f"gamma and lam must be in (0, 1]; got {self.gamma}, {self.lam}")

    @classmethod
    def search_space(cls) -> dict[str, tuple]:
        return {
            "lr": ("log_float", 1e-5, 1e-3),
            "clip_range": ("log_float", 3e-5, 1e-3),
            "gamma": ("float", 0.9, 1.0),
            "lam": ("float", 0.9, 1.0),
            "lora_rank": ("categorical", [4, 8, 16]),
        }


# ---------------------------------------------------------------------------------------------------
# Pure functions: dense rewards, returns, the pair loss
# ---------------------------------------------------------------------------------------------------

def step_similarities(x0_preds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine similarities between every step's x0-prediction and the first, last and anchor step's.

    x0_preds: (B, T, ...). Returns s_first, s_last, s_anchor (B, T) and anchor (B,) long, where
    anchor = argmin_i (s_first[i] + s_last[i]) (the first index on ties), i.e. the step whose prediction
    is least like both ends.
    """
    flat = x0_preds.flatten(2).float()  # (B, T, D)
    flat = flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s_first = (flat * flat[:, :1]).sum(-1)
    s_last = (flat * flat[:, -1:]).sum(-1)
    anchor = torch.argmin(s_first + s_last, dim=1)  # torch.argmin returns the first minimum
    s_anchor = (flat * flat[torch.arange(flat.shape[0], device=flat.device), anchor][:, None]).sum(-1)
    return s_first, s_last, s_anchor, anchor


def dense_rewards(reward_first: torch.Tensor, reward_anchor: torch.Tensor, reward_last: torch.Tensor,
                  s_first: torch.Tensor, s_anchor: torch.Tensor, s_last: torch.Tensor,
                  anchor: torch.Tensor) -> torch.Tensor:
    """Per-step rewards interpolated from the three scored steps (spec §3.3).

        r_i = (R_first s_first[i] + R_anchor s_anchor[i] + R_last s_last[i]) / (s_first[i] + s_anchor[i] + s_last[i])
        then r_0 = R_first, r_k = R_anchor, r_{T-1} = R_last (overwrites, in this order).

    reward_*: (B,), s_*: (B, T), anchor: (B,) long. Returns (B, T).
    The official code does not guard against negative cosines, which the spec flags as an open point.
    Here each similarity is clamped at 0 and the denominator at 1e-8, so a step whose prediction is
    orthogonal to all three references gets weight 0, never a sign flip. This makes no difference when all
    similarities are positive, the usual case for image latents.
    """
    weights = torch.stack([s_first, s_anchor, s_last], dim=-1).clamp_min(0.0)  # (B, T, 3)
    scored = torch.stack([reward_first, reward_anchor, reward_last], dim=-1)[:, None, :]  # (B, 1, 3)
    rewards = (weights * scored).sum(-1) / weights.sum(-1).clamp_min(1e-8)
    rows = torch.arange(rewards.shape[0])
    rewards[:, 0] = reward_first
    rewards[rows, anchor] = reward_anchor
    rewards[:, -1] = reward_last
    return rewards


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_{T-1} = r_{T-1};  G_i = r_i + gamma G_{i+1}.  rewards: (B, T) -> (B, T)."""
    returns = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for i in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, i] + gamma * running
        returns[:, i] = running
    return returns


def loss(log_prob_a: torch.Tensor, log_prob_b: torch.Tensor,
         old_log_prob_a: torch.Tensor, old_log_prob_b: torch.Tensor,
         advantage_a: torch.Tensor, advantage_b: torch.Tensor, step_index: torch.Tensor, *,
         lam: float = 0.99, log_scale: float = 1.0, clip_range: float = 1e-4,
         adv_clip_max: float = 5.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SDPO pair loss at one step per pair (spec §3.4). All inputs are (B,) over pairs.

        rho^x  = log p_theta(x_{i+1} | x_i, c) - log p_old        for x in {a, b}   (per-element-mean log-probs)
        dA     = clip(A^a_i, +-adv_clip_max) - clip(A^b_i, +-adv_clip_max)
        w_i    = lam^i / log_scale                                 (i = step index; i = 0 is the first denoising step)
        L_u    = (w_i (rho^a - rho^b) - dA)^2
        L_c    = (w_i (rho~^a - rho~^b) - dA)^2,  rho~ = clamp(log p_theta, log p_old +- clip_range) - log p_old
        L      = mean_B max(L_u, L_c)

    The clip acts in log space, not on the ratio. Where the clipped branch wins and both log-probs sit
    outside the clip, the gradient is zero. Swapping a and b negates both differences and leaves L
    unchanged. Returns (loss, info); info holds detached diagnostics: clipfrac, approx_kl.
    """
    weight = lam ** step_index.to(log_prob_a.dtype) / log_scale
    adv_diff = (advantage_a.clamp(-adv_clip_max, adv_clip_max)
                - advantage_b.clamp(-adv_clip_max, adv_clip_max))
    ratio_a = log_prob_a - old_log_prob_a
    ratio_b = log_prob_b - old_log_prob_b
    clipped_a = torch.clamp(log_prob_a, old_log_prob_a - clip_range, old_log_prob_a + clip_range) - old_log_prob_a
    clipped_b = torch.clamp(log_prob_b, old_log_prob_b - clip_range, old_log_prob_b + clip_range) - old_log_prob_b
    loss_unclipped = (weight * (ratio_a - ratio_b) - adv_diff) ** 2
    loss_clipped = (weight * (clipped_a - clipped_b) - adv_diff) ** 2
    value = torch.maximum(loss_unclipped, loss_clipped).mean()
    with torch.no_grad():
        ratios = torch.cat([ratio_a, ratio_b])
        info = {
            "clipfrac": (ratios.abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * (ratios ** 2).mean(),
        }
    return value, info


def normalise_returns(returns: torch.Tensor, prompts: list[str], stats: PerPromptStatTracker | None) -> torch.Tensor:
    """Advantages from returns (2N, T): per (prompt, step) through the stat tracker (spec §1.5), which falls
    back to the statistics of that step's column (both members of every pair) while a buffer is short.
    Without a tracker, a global z-score over all elements is used, as the official code does."""
    if stats is None:
        return (returns - returns.mean()) / (returns.std(unbiased=False) + 1e-8)
    columns = [stats.update([f"{prompt}\x1fstep={i}" for prompt in prompts], returns[:, i])
               for i in range(returns.shape[1])]
    return torch.stack([torch.as_tensor(column, dtype=returns.dtype) for column in columns], dim=1)


# ---------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------

@dataclass
class _PairBatch:
    """One sampler call's pairs: rows [0, n) are trajectories a, rows [n, 2n) their partners b."""
    trajectory: sampling.Trajectory
    num_pairs: int
    advantages: torch.Tensor | None = None  # (2n, T) on the policy device


class SDPOMethod:
    """SDPO on the shared sampler; evaluation uses the deterministic default sampler."""

    name: ClassVar[str] = "sdpo"
    label: ClassVar[str] = "SDPO"
    Config = Config
    paper: ClassVar[str] = "Zhang et al., Stepwise Diffusion Policy Optimization, arXiv 2411.11727"
    deviations: ClassVar[tuple[Deviation, ...]] = (
        Deviation("toy recipe: training trajectories of T = 16 DDIM steps (paper: 50); real recipes keep 50",
                  "T = 50 leaves no complete epoch inside the toy grid's 8k-NFE budget; 16 leaves two",
                  "methods/sdpo.py Config.presets['toy'] num_steps"),
        Deviation("toy recipe: the last transition is not trained (paper code: every step)",
                  "no scored x0-prediction depends on its action and its std is 0.006: it dominated the gradient "
                  "and collapsed the model (-0.081 at S = 4)", "methods/sdpo.py Config.train_last_step"),
        Deviation("toy recipe: Adam lr 1e-5, full fine-tune, 64 pairs/epoch, an update per 16 pairs (paper: AdamW "
                  "1e-4, LoRA r4, 128 pairs/epoch, 64 pairs per update)",
                  "toy-recipes.md's optimizer for a 1M-parameter denoiser; more, smaller updates measured better",
                  "methods/sdpo.py Config.presets['toy']"),
        Deviation("guidance is the model's own (paper: CFG 1 in training, i.e. none)",
                  "the turbo models run without CFG already; the toy has none", "methods/sdpo.py (module docstring)"),
    )

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else Config()

    def generate(self, policy, prompts: list[str], num_steps: int, *, noise: torch.Tensor,
                 budget: Budget | None = None) -> tuple[torch.Tensor, int]:
        return default_generate(policy, prompts, num_steps, noise=noise, budget=budget)

    def epoch_cost(self, num_steps: int, num_trained_steps: int, nfe_per_predict: int) -> dict[str, int]:
        """Exact cost of one epoch of P pairs (2P trajectories of T steps): sampling NFEs, gradient NFEs (one
        forward+backward of one transition of one trajectory = nfe_per_predict) and 3 reward calls per
        trajectory (first, anchor and last x0-prediction), i.e. 6 per pair."""
        cfg = self.config
        trajectories = 2 * cfg.pairs_per_epoch
        return {"sample_nfe": sample_nfe(trajectories, num_steps, nfe_per_predict),
                "grad_nfe": cfg.num_inner_epochs * trajectories * num_trained_steps * nfe_per_predict,
                "reward_calls": 3 * trajectories}

    # -- training -----------------------------------------------------------------------------------
    def train(self, policy, task: Task, budget: Budget, tracker: Tracker) -> None:
        cfg = self.config
        num_steps, npp = int(cfg.num_steps or task.train_steps), int(policy.nfe_per_predict)
        params = [p for p in policy.trainable_parameters() if p.requires_grad]
        optimizer = build_optimizer(params, cfg)
        stats = (PerPromptStatTracker(cfg.stat_buffer_size, cfg.stat_min_count)
                 if cfg.per_prompt_stat_tracking else None)
        generators = {"prompt": generator(task.seed), "shuffle": generator(task.seed + 1),
                      "noise": generator(task.seed + 2, task.device)}

        stochastic = sampling.stochastic_steps(policy, num_steps, cfg.eta, cfg.kernel)  # (T,) bool
        trainable = sampling.trainable_steps(policy, num_steps, cfg.eta, cfg.kernel,
                                             train_last_step=cfg.train_last_step)
        num_trained = int(int(trainable.sum()) * cfg.timestep_fraction)
        if num_trained < 1:
            raise ValueError(f"nothing to train: {int(trainable.sum())} trainable step(s) of {num_steps} at "
                             f"eta={cfg.eta} with timestep_fraction={cfg.timestep_fraction}")
        cost = self.epoch_cost(num_steps, num_trained, npp)
        epoch_nfe = cost["sample_nfe"] + cost["grad_nfe"]
        if budget.max_nfe is None and cfg.num_epochs is None:
            raise ValueError("unbounded run: give the Budget a max_nfe or set num_epochs")
        if budget.max_nfe is not None and epoch_nfe > budget.max_nfe:
            raise ValueError(f"the budget ({budget.max_nfe} NFEs) is smaller than one SDPO epoch ({epoch_nfe} NFEs: "
                             f"{cost}); lower pairs_per_epoch or num_steps, or raise the budget")
        log.info("sdpo: T=%d steps (%d trained per pair, the cell's K=%d), %d pairs/epoch, epoch cost %s", num_steps,
                 num_trained, task.train_steps, cfg.pairs_per_epoch, cost)

        epoch = 0
        if cfg.checkpoint_path and Path(cfg.checkpoint_path).exists():
            state = load_checkpoint(cfg.checkpoint_path, policy=policy, optimizer=optimizer, config=cfg,
                                    budget=budget, generators=generators)
            epoch = state["step"]
            if stats is not None:
                stats.load_state_dict(state["extra"]["stat_tracker"])

        max_epochs = cfg.num_epochs if cfg.num_epochs is not None else float("inf")
        planned = int(min(max_epochs, epoch + budget.remaining_nfe // epoch_nfe))
        with progress(tracker, planned, "sdpo epochs") as advance:
            while epoch < max_epochs and budget.fits(nfe=epoch_nfe, reward_calls=cost["reward_calls"]):
                metrics = self._epoch(policy, task, budget, optimizer, params, stats, stochastic, trainable,
                                      num_trained, num_steps, generators)
                epoch += 1
                metrics["train/epoch"] = float(epoch)
                tracker.log_metrics(metrics, step=budget.total_nfe)
                advance(1)
                if cfg.checkpoint_path and epoch % cfg.checkpoint_every == 0:
                    save_checkpoint(cfg.checkpoint_path, policy=policy, optimizer=optimizer, step=epoch, config=cfg,
                                    budget=budget, generators=generators,
                                    extra={"stat_tracker": stats.state_dict() if stats is not None else None})

    def _epoch(self, policy, task, budget, optimizer, params, stats, stochastic, trainable, num_trained, num_steps,
               generators) -> dict[str, float]:
        cfg = self.config
        t0 = time.perf_counter()
        picks = torch.randint(len(task.prompts), (cfg.pairs_per_epoch,), generator=generators["prompt"]).tolist()
        prompts = [task.prompts[i] for i in picks]  # uniformly with replacement, as the paper
        batches, diagnostics = [], []
        for start in range(0, len(prompts), cfg.sample_batch_size):
            batch, info = self._sample_pairs(policy, task.reward, prompts[start:start + cfg.sample_batch_size],
                                             num_steps, generators["noise"], budget)
            if not torch.equal(batch.trajectory.stochastic.cpu(), stochastic):
                raise RuntimeError(f"sampler's stochastic steps {batch.trajectory.stochastic.tolist()} differ from "
                                   f"the predicted {stochastic.tolist()}")
            batches.append(batch)
            diagnostics.append(info)

        # Normalise over the whole epoch at once: the per-step batch fallback uses every trajectory.
        returns = torch.cat([discounted_returns(d["rewards"], cfg.gamma) for d in diagnostics])  # (2P, T)
        batch_prompts = [p for batch in batches for p in batch.trajectory.prompts]
        advantages = normalise_returns(returns, batch_prompts, stats)
        offset = 0
        for batch in batches:
            rows = 2 * batch.num_pairs
            batch.advantages = advantages[offset:offset + rows].to(batch.trajectory.log_probs.device)
            offset += rows
        sample_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        update = self._update(policy, batches, optimizer, params, trainable, num_trained, generators["shuffle"],
                              budget)
        metrics = {f"train/{key}": float(torch.cat([d[key] for d in diagnostics]).mean())
                   for key in ("reward_first", "reward_anchor", "reward_last", "anchor_step")}
        metrics.update({
            "train/dense_reward_mean": float(torch.cat([d["rewards"] for d in diagnostics]).mean()),
            "train/return_first_mean": float(returns[:, 0].mean()),
            "train/advantage_abs_mean": float(advantages.abs().mean()),
            "train/negative_similarity_frac": float(torch.cat([d["negative_similarity"] for d in diagnostics]).mean()),
            "train/sample_seconds": sample_seconds,
            "train/update_seconds": time.perf_counter() - t1,
            **{f"train/{key}": value for key, value in update.items()},
        })
        if stats is not None:
            metrics.update({f"train/{k}": v for k, v in stats.stats().items()})
        return metrics

    # -- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _sample_pairs(self, policy, reward, prompts: list[str], num_steps: int, noise_gen: torch.Generator,
                      budget: Budget) -> tuple[_PairBatch, dict[str, torch.Tensor]]:
        cfg = self.config
        n = len(prompts)
        x_T = torch.randn((n, *policy.latent_shape), generator=noise_gen, device=noise_gen.device)
        # Trajectory b starts from the same x_T with the same prompt; only the per-step DDIM noise differs.
        # decode=False: the final latent is never looked at (the "last" image is the last step's x0-prediction).
        trajectory = sampling.sample(policy, prompts + prompts, num_steps, generator=noise_gen,
                                     noise=torch.cat([x_T, x_T]).to(policy.device), kernel=cfg.kernel, eta=cfg.eta,
                                     decode=False)
        budget.spend(sample_nfe=sample_nfe(2 * n, num_steps, policy.nfe_per_predict))

        x0_preds = trajectory.x0_preds  # (2n, T, C, h, w)
        s_first, s_last, s_anchor, anchor = step_similarities(x0_preds)
        # The "last" image is the decoded x0-prediction of the last step, not the final latent (spec §3.2).
        scored_steps = torch.stack([torch.zeros_like(anchor), anchor, torch.full_like(anchor, x0_preds.shape[1] - 1)])
        scores = score_steps(policy, reward, x0_preds, scored_steps, prompts + prompts)  # (3, 2n)
        budget.spend(reward_calls=3 * 2 * n)
        reward_first, reward_anchor, reward_last = scores
        s_first, s_last, s_anchor = s_first.cpu(), s_last.cpu(), s_anchor.cpu()
        rewards = dense_rewards(reward_first, reward_anchor, reward_last, s_first, s_anchor, s_last, anchor.cpu())
        info = {"reward_first": reward_first, "reward_anchor": reward_anchor, "reward_last": reward_last,
                "anchor_step": anchor.float().cpu(), "rewards": rewards,
                "negative_similarity": (torch.stack([s_first, s_anchor, s_last]) < 0).float().flatten()}
        return _PairBatch(trajectory, n), info

    # -- update -------------------------------------------------------------------------------------
    def _update(self, policy, batches: list[_PairBatch], optimizer, params, trainable: torch.Tensor,
                num_trained: int, shuffle_gen: torch.Generator, budget: Budget) -> dict[str, float]:
        """Step-shuffled updates (spec §3.5). Each pair gets its own permutation of its trainable steps and
        trains on the first `num_trained`. The outer loop runs over those columns and the inner loop over
        micro-batches of shuffled pairs, so an optimizer step sees one random step per pair. Gradients
        accumulate over `gradient_accumulation_steps` micro-batches, not over steps (unlike DDPO)."""
        cfg = self.config
        npp = int(policy.nfe_per_predict)
        step_ids = torch.nonzero(trainable).flatten()  # deterministic steps have no log-prob
        pairs = [(b, p) for b, batch in enumerate(batches) for p in range(batch.num_pairs)]
        sums = {"loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, "grad_norm": 0.0}
        micro_batches = updates = 0
        optimizer.zero_grad(set_to_none=True)
        for _ in range(cfg.num_inner_epochs):
            order = torch.randperm(len(pairs), generator=shuffle_gen)
            perms = torch.argsort(torch.rand(len(pairs), len(step_ids), generator=shuffle_gen), dim=1)
            columns = step_ids[perms[:, :num_trained]]  # (P, num_trained) step indices
            for column in range(num_trained):
                for chosen in order.split(cfg.train_batch_size):
                    value, info = self._pair_loss(policy, batches, [pairs[i] for i in chosen.tolist()],
                                                  columns[chosen, column])
                    (value / cfg.gradient_accumulation_steps).backward()
                    budget.spend(grad_nfe=2 * len(chosen) * npp)
                    micro_batches += 1
                    for key in ("clipfrac", "approx_kl"):
                        sums[key] += float(info[key])
                    sums["loss"] += float(value.detach())
                    if micro_batches % cfg.gradient_accumulation_steps == 0:
                        sums["grad_norm"] += self._optimizer_step(optimizer, params)
                        updates += 1
        if micro_batches % cfg.gradient_accumulation_steps:
            sums["grad_norm"] += self._optimizer_step(optimizer, params)  # the epoch's partial accumulation
            updates += 1
        out = {key: value / max(micro_batches, 1) for key, value in sums.items() if key != "grad_norm"}
        out.update(grad_norm=sums["grad_norm"] / max(updates, 1), updates=float(updates))
        return out

    def _pair_loss(self, policy, batches: list[_PairBatch], pairs: list[tuple[int, int]],
                   step_index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Recompute both trajectories' log-probs of each pair at its step under the current parameters."""
        cfg = self.config
        slots = len(pairs)
        new_a, new_b, old_a, old_b, adv_a, adv_b = ([None] * slots for _ in range(6))
        # transition_log_prob takes one step index per call: group the micro-batch by (sampler call, step).
        groups: dict[tuple[int, int], list[int]] = {}
        for slot, ((b, _), k) in enumerate(zip(pairs, step_index.tolist())):
            groups.setdefault((b, k), []).append(slot)
        for (b, k), members in groups.items():
            batch = batches[b]
            rows_a = [pairs[slot][1] for slot in members]
            rows = torch.tensor(rows_a + [row + batch.num_pairs for row in rows_a])
            log_probs = sampling.transition_log_prob(policy, batch.trajectory, k, index=rows).float()
            old = batch.trajectory.log_probs[rows.to(batch.trajectory.log_probs.device), k].float()
            advantages = batch.advantages[rows.to(batch.advantages.device), k]
            half = len(members)
            for j, slot in enumerate(members):
                new_a[slot], new_b[slot] = log_probs[j], log_probs[half + j]
                old_a[slot], old_b[slot] = old[j].to(log_probs.device), old[half + j].to(log_probs.device)
                adv_a[slot], adv_b[slot] = advantages[j].to(log_probs.device), advantages[half + j].to(log_probs.device)
        stack = torch.stack
        return loss(stack(new_a), stack(new_b), stack(old_a), stack(old_b), stack(adv_a), stack(adv_b),
                    step_index.to(new_a[0].device), lam=cfg.lam, log_scale=cfg.log_scale,
                    clip_range=cfg.clip_range, adv_clip_max=cfg.adv_clip_max)

    def _optimizer_step(self, optimizer, params) -> float:
        grad_norm = clip_grad_norm(params, self.config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm


def score_steps(policy, reward, x0_preds: torch.Tensor, steps: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Rewards of the decoded x0-predictions x0_preds[b, steps[j, b]]: (J, B) for steps (J, B) long, x0_preds
    (B, T, C, h, w). First, anchor and last coincide for some rows (always at T = 1; at T = 2 the anchor is one of
    the ends), so each distinct (row, step) is decoded and scored once, in batches of B, and the score reused (a
    reward is a function of the image). The budget still counts J * B reward calls, the algorithm's own count."""
    num_rows = x0_preds.shape[0]
    keys = steps.cpu() * num_rows + torch.arange(num_rows)  # (J, B): one key per (step, row)
    unique, inverse = torch.unique(keys.flatten(), return_inverse=True)  # step-major, like the (J, B) layout
    rows, cols = unique % num_rows, unique // num_rows
    latents = x0_preds[rows.to(x0_preds.device), cols.to(x0_preds.device)]
    images = torch.cat([policy.decode(chunk) for chunk in latents.split(num_rows)])  # (U, 3, H, W)
    values = torch.as_tensor(reward(images, [prompts[r] for r in rows.tolist()])).detach().float().cpu().reshape(-1)
    return values[inverse].view(steps.shape)



@dataclass
class TEqKConfig(Config):
    """SDPO trained on trajectories of the cell's own K steps (T = K), a labelled adaptation of the paper (which trains
    on T = 50 and evaluates at fewer steps): its own grid entry `sdpo_t_eq_k`, to show what the long trajectory buys."""

    num_steps: int | None = None
    """training trajectory length T; None = the cell's task.train_steps (this row's definition: T = K)"""

    presets: ClassVar[dict[str, dict[str, Any]]] = {"toy": {**Config.presets["toy"], "num_steps": None}}


class SDPOTEqKMethod(SDPOMethod):
    """SDPO with T = K (see TEqKConfig): at K = 4 the lambda^i weights are 1 / 0.99 / 0.98 and only the anchor step is
    interpolated, so it is close to a paired DDPO."""

    name: ClassVar[str] = "sdpo_t_eq_k"
    label: ClassVar[str] = "SDPO (T = K)"
    Config = TEqKConfig
    deviations: ClassVar[tuple[Deviation, ...]] = (
        Deviation("training trajectories of T = K steps (paper: T = 50, evaluated at 1-8)",
                  "the adaptation every other method gets (train at K); shows what SDPO's long trajectory buys",
                  "methods/sdpo.py TEqKConfig.num_steps"),
        *SDPOMethod.deviations[1:],
    )
