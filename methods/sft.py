"""Reward-filtered SFT: the naive baseline PSO argues against (spec dpo-spo-pso.md §4.1; toy-recipes.md Recipe 3).

Sample from the current distilled model, keep the reward-preferred samples, and fit them with the plain
denoising objective
    L = mean_i mean_elements ( f_theta(x_t, t, c) - y )^2,   x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
    y = eps | v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 | x0   (the model's prediction type)
with no reference model and no pairwise term.

pairing "fresh" (the cautionary baseline): eps ~ N(0, I) drawn anew. At t = 999 this teaches a distilled student
to predict the *posterior mean*, which undoes its few-step distillation: on the toy world it collapsed the student
within 2 CPU minutes, worst at 1 step (Recipe 3: `all` 0.21 -> 0.05 at S=1). This is PSO's argument, reproduced.
pairing "reflow" (the fair naive baseline): eps = the sample's own starting noise z, so the model regresses the
straight (z, x0) pair it produced itself, the objective the student was distilled with (toy-world.md).
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
    check_run_length,
    describe,
    draw_timesteps,
    forward_process,
    grid_timesteps,
    own_noise,
    pick_prompts,
)

log = logging.getLogger(__name__)


@dataclass
class Config:
    """Filtered-SFT knobs; defaults are toy Recipe 3's (the PSO paper gives no hyper-parameters for it)."""

    pairing: str = "fresh"
    """"fresh": new eps ~ N(0,I) (PSO's naive baseline, the cautionary one); "reflow": the sample's own z."""
    selection: str = "best"
    """which samples are "preferred": "best" = per prompt the top-reward sample when it beats the prompt's worst;
    "threshold" = every sample with reward >= min_reward (Recipe 3: `all` = 1)."""
    min_reward: float = 1.0
    """threshold selection: minimum reward of a kept sample."""
    lr: float = 5e-5
    """learning rate (Recipe 3: Adam 5e-5)."""
    optimizer: str = "adam"
    """"adamw" | "adam" | "sgd"."""
    weight_decay: float = 0.0
    """weight decay."""
    grad_clip: float = 1.0
    """global gradient-norm clip."""
    batch_size: int = 64
    """samples per optimizer update, drawn with replacement from the round's kept samples."""
    updates_per_round: int = 8
    """optimizer updates per sampling round."""
    prompts_per_round: int = 36
    """prompts per sampling round."""
    samples_per_prompt: int = 8
    """samples per prompt per round (Recipe 3: 36 x 8 = 288)."""
    timesteps: str = "grid"
    """"grid": t from the model's own K-step grid (Recipe 3); "uniform": t ~ U{0..999}."""
    sample_eta: float = 0.0
    """sampler stochasticity (0: deterministic, so the reflow pair (z, x0) is exact)."""
    kernel: str | None = None
    """sampling kernel; None = the model's default."""
    max_updates: int | None = None
    """stop after this many optimizer updates (None = when the budget is spent)."""
    lora_rank: int = 8
    """LoRA rank; read by the harness when it builds the policy."""
    full_finetune: bool = False
    """train every denoiser weight instead of LoRA (Recipe 3 did); read by the harness."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # lr: the validation probe of 2026-12-06 (bench/conf/tuning/toy/val-probe.md); it supersedes any lr below.
        "toy": dict(selection="threshold", min_reward=1.0, full_finetune=True, lr=3.33e-6),
        "toy_reflow": dict(selection="threshold", min_reward=1.0, full_finetune=True, pairing="reflow"),
    }

    def __post_init__(self):
        check_choice("pairing", self.pairing, ("fresh", "reflow"))
        check_choice("selection", self.selection, ("best", "threshold"))
        check_choice("timesteps", self.timesteps, ("grid", "uniform"))
        check_positive(self, "lr", "batch_size", "updates_per_round", "prompts_per_round", "samples_per_prompt",
                       "lora_rank", "max_updates")
        check_positive(self, "weight_decay", "sample_eta", allow_zero=True)
        if self.selection == "best" and self.samples_per_prompt < 2:
            raise ValueError("selection='best' needs samples_per_prompt >= 2")

    @classmethod
    def search_space(cls) -> dict[str, tuple]:
        return {"lr": ("log_float", 1e-6, 1e-4), "pairing": ("categorical", ["fresh", "reflow"])}


def loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain denoising loss: mean over samples of the element-mean squared error (f_theta - y)^2, float32.
    Example: prediction 0, target 1 everywhere -> 1.0; prediction = target -> 0."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1).mean()


def select(rewards: torch.Tensor, groups: torch.Tensor, selection: str, min_reward: float = 1.0) -> torch.Tensor:
    """Indices of the kept ("preferred") samples. "best": per group its first top-reward row, only if it beats
    the group's minimum; "threshold": rows with reward >= min_reward.
    Example: rewards [0, 1, 1, 1] in groups [0, 0, 1, 1] -> best [1], threshold(1.0) [1, 2, 3]."""
    r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    if selection == "threshold":
        return (r >= min_reward).nonzero().flatten()
    if selection != "best":
        raise ValueError(f"selection must be 'best' or 'threshold'; got {selection!r}")
    keep = []
    for g in dict.fromkeys(groups.tolist()):
        rows = (groups == g).nonzero().flatten()
        values = r[rows]
        if values.max() > values.min():
            keep.append(int(rows[int(values.argmax())]))
    return torch.tensor(keep, dtype=torch.long)


class SFTMethod:
    """Reward-filtered SFT on the policy's own samples; `generate` is the shared deterministic sampler."""

    name: ClassVar[str] = "sft"
    label: ClassVar[str] = "SFT (plain fine-tuning)"
    short_label: ClassVar[str] = "SFT"
    Config = Config
    paper: ClassVar[str] = "naive baseline (no paper): the plain denoising loss on reward-preferred samples"
    deviations: ClassVar[tuple[Deviation, ...]] = ()

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else Config()

    def train(self, policy, task: Task, budget: Budget, tracker: Tracker) -> None:
        from methods import sampling

        cfg = self.config
        log.info("sft config: %s", describe(cfg))
        check_run_length(budget, cfg.max_updates)
        updates = 0
        gen = generator(task.seed)
        params = policy.trainable_parameters()
        optimizer = build_optimizer(params, cfg)
        grid = grid_timesteps(policy, task.train_steps)
        npp = policy.nfe_per_predict
        num = cfg.prompts_per_round * cfg.samples_per_prompt
        round_nfe, update_nfe = num * task.train_steps * npp, cfg.batch_size * npp
        scheduler = policy.scheduler
        done = lambda: cfg.max_updates is not None and updates >= cfg.max_updates  # noqa: E731
        while budget.fits(nfe=round_nfe + update_nfe, reward_calls=num) and not done():
            prompts = pick_prompts(task.prompts, cfg.prompts_per_round, gen)
            batch = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
            with torch.no_grad():
                traj = sampling.sample(policy, batch, task.train_steps, generator=gen, eta=cfg.sample_eta,
                                       kernel=cfg.kernel)
                budget.spend(sample_nfe=round_nfe)
                rewards = torch.as_tensor(task.reward(traj.images, batch), dtype=torch.float32).cpu().reshape(-1)
                budget.spend(reward_calls=num)
            groups = torch.arange(len(prompts)).repeat_interleave(cfg.samples_per_prompt)
            kept = select(rewards, groups, cfg.selection, cfg.min_reward)
            tracker.log_metrics({"train/reward_mean": float(rewards.mean()), "train/num_kept": float(len(kept))},
                                step=budget.total_nfe)
            if len(kept) == 0:
                continue  # nothing preferred this round (the toy SFT run's pool shrank to 0; skip, don't crash)
            x0_all = traj.latents[:, -1].float()
            z_all = own_noise(traj, policy) if cfg.pairing == "reflow" else None
            for _ in range(cfg.updates_per_round):
                if not budget.fits(nfe=update_nfe) or done():
                    break
                rows = kept[torch.randint(len(kept), (cfg.batch_size,), generator=gen)]
                x0 = x0_all[rows]
                eps = z_all[rows] if z_all is not None else torch.randn(x0.shape, generator=gen).to(x0.device)
                t = draw_timesteps(cfg.timesteps, grid, scheduler.config.num_train_timesteps, (len(rows), 1),
                                   gen).flatten().to(x0.device)
                x_t, target = forward_process(scheduler, x0, eps, t)  # VP, or a flow model's velocity target
                cond = traj.cond.select(rows)
                optimizer.zero_grad(set_to_none=True)
                value = loss(policy.predict(x_t, t, cond), target)
                value.backward()
                grad_norm = clip_grad_norm(params, cfg.grad_clip)
                optimizer.step()
                updates += 1
                budget.spend(grad_nfe=update_nfe)
                tracker.log_metrics({"train/loss": float(value.detach()), "train/grad_norm": grad_norm},
                                    step=budget.total_nfe)

    def generate(self, policy, prompts: list[str], num_steps: int, *, noise: torch.Tensor,
                 budget: Budget | None = None) -> tuple[torch.Tensor, int]:
        return default_generate(policy, prompts, num_steps, noise=noise, budget=budget)
