"""SPO — Step-by-step (step-aware) Preference Optimization (Liang et al., arXiv 2406.04314, CVPR 2025), spec
dpo-spo-pso.md §3, adapted to few-step models (§3.9).

Instead of ranking two whole trajectories, SPO compares k candidates x_{t'}^{1..k} sampled from the SAME parent
x_t, so a pair differs only in one transition's noise; a step-aware preference model (SPM) that reads noisy
states picks the best (win) and worst (lose) candidate, and the trajectory continues from a *uniformly random*
candidate (not the best), so the next pair again shares its parent.

Resampler (per prompt, no grad, current policy; `collect_stepwise_pairs`):
    x <- x_T
    for grid step i (t_i -> t_{i+1}):
        if start_step <= i < K-1 and the step is stochastic:
            candidates c_1..c_k ~ N(mean_theta(x, t_i), std_i^2 I)          (one parent, k noises)
            s_j <- SPM(c_j, x0_hat(c_j), t_{i+1}, prompt)                    (x0_hat: one batched denoiser call)
            keep (x, i, c_argmax, c_argmin) iff softmax([s_w, s_l])_0 - softmax(...)_1 = tanh((s_w - s_l)/2) > thr
            x <- c_j, j ~ U{1..k}
        else: an ordinary step
The last grid step is deterministic for few-step kernels (or has a vanishing std), so pools end at x_{t_{K-1}}:
its candidates are scored at t_{K-1} from their x0 predictions (spec §3.9).

Loss per recorded transition (`loss`), with per-element-MEAN Gaussian log-densities of the DDIM/Euler-A step:
    log r = clamp(log p_theta(x^* | x_t) - log p_ref(x^* | x_t), log(1-eps), log(1+eps)),  * in {w, l}
    loss  = softplus(-beta (log r_w - log r_l))          beta 10, eps 0.1 (zero gradient where clamped)

Preference model (`preference_model`):
- "spm": the step-aware preference model of methods/spm.py, trained the paper's way (pairs of clean images labelled
  by the reward, forward-noised to t with a shared eps, scored from the initial model's x0-predictions, pairwise
  loss) once per (model, reward) and cached under `spm_cache_dir`; the file and its held-out pairwise accuracy go to
  the tracker, and SPO refuses an SPM that is not above chance by `spm_min_margin`. `spm_path` loads a cached file,
  or a released checkpoint of the paper (`spm_clip_path` = its PickScore CLIP config folder).
- "reward_x0": the task reward on the decoded x0 prediction of each candidate (the paper's "w/o SPM" ablation uses
  PickScore this way); costs k reward calls per prompt per branching step.

What the spec leaves open, and the choice made here:
- few-step adaptation (§3.9, not in the paper): every stochastic step but the last branches (start_step 0 instead
  of kappa = 750); the last pool is scored at t_{K-1} from x0 predictions.
- the SPM on the toy world: a small conv net (methods/spm.py ConvSPM) instead of CLIP-H, and reward-labelled
  initial-model samples instead of Pick-a-Pic's human labels; its scores are pairwise logits, so the threshold keeps
  the paper's softmax-difference meaning (0.3 <=> score gap 0.62).
- only single-step SPO (winner and loser share their parent); SDXL's multi-step "MSPO" (3 inner steps per chunk) is
  not implemented: a 4-step grid has only 3 stochastic transitions.
- gradient clipping is a no-op in the official code (§3.7); here it is applied (grad_clip=1.0; 0 reproduces).
- the ratio clamp is a code detail inherited from D3PO; whether the paper states it is unverified (§3.4).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from methods import sampling
from methods import spm as spm_lib
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
    log_artifact,
    log_text,
)
from methods.preference_data import check_run_length, describe, pick_prompts

log = logging.getLogger(__name__)


@dataclass
class Config:
    """SPO knobs; defaults follow the SD1.5 config `spo_sd-v1-5_4k-prompts_num-sam-4_10ep_bs10.py` (§3.5) where it
    applies to few-step models (all stochastic transitions are branched, §3.9)."""

    num_candidates: int = 4
    """k: candidates sampled from each parent (SD1.5: 4; SDXL: 2)."""
    threshold: float = 0.3
    """keep a pair iff tanh((s_w - s_l)/2) > threshold (SD1.5 0.3 <=> s_w - s_l > 0.619; SDXL 0.4)."""
    beta: float = 10.0
    """beta of the per-step DPO loss (10; re-tune for Euler-A's step sizes, §3.9)."""
    clamp_eps: float = 0.1
    """ratio clamp [1-eps, 1+eps] (inherited from D3PO; zero gradient outside)."""
    lr: float = 6e-5
    """learning rate (SD1.5: AdamW 6e-5 constant; SDXL 1e-5)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    optimizer: str = "adamw"
    """"adamw" | "adam" | "sgd"."""
    grad_clip: float = 1.0
    """gradient-norm clip as configured officially; the official clip is a no-op (consumed iterator, §3.7):
    set 0 to reproduce that (0 = measure only)."""
    prompts_per_round: int = 40
    """prompts sampled per round (SD1.5: 10 per GPU x 4 GPUs)."""
    pairs_per_update: int = 40
    """recorded transitions per optimizer update (SD1.5: 10 per GPU x 4 GPUs, no accumulation)."""
    start_step: int = 0
    """first grid step that branches (SD 20 steps: 4, i.e. kappa = 750; few-step grids: 0 = all transitions)."""
    sample_eta: float = 1.0
    """sampler stochasticity of the training trajectories (SPO: DDIM eta 1)."""
    kernel: str | None = None
    """sampling kernel ("ddim" | "euler_ancestral" | "lcm"); None = the model's default."""
    preference_model: str = "spm"
    """"spm": step-aware preference model trained here (or loaded from spm_path); "reward_x0": the task reward
    on each candidate's decoded x0 prediction."""
    reward_score_scale: float = 1.0
    """reward_x0: scores are reward * this before the threshold test (1 for PickScore-x100 units)."""
    monitor_reward: bool = True
    """score each round's final images with the task reward for logging (counts as reward calls)."""
    max_updates: int | None = None
    """stop after this many optimizer updates (None = when the budget is spent)."""
    lora_rank: int = 4
    """LoRA rank (SD1.5: 4; SDXL: 64); read by the harness."""
    full_finetune: bool = False
    """train every denoiser weight instead of LoRA; read by the harness."""
    # --- the step-aware preference model ("spm", methods/spm.py) ---
    spm_path: str | None = None
    """load this SPM instead of training one: a file written by methods.spm (cached), or a released checkpoint of the
    paper (*.bin, with spm_clip_path)."""
    spm_clip_path: str | None = None
    """released SPM only: the PickScore_v1 CLIP folder (config + tokenizer) the checkpoint was trained from."""
    spm_cache_dir: str = ".stepbench-cache/spm"
    """where trained SPMs are kept, one file per (model, reward, spm settings): trained once, reused by every cell."""
    spm_samples_per_prompt: int = 8
    """SPM data: initial-model samples per training prompt, labelled by the reward into within-prompt pairs."""
    spm_views_per_pair: int = 4
    """SPM data: (t ~ U{0..999}, shared eps) draws per pair, each scored from the x0-predictions (paper: 1 per pair
    per epoch over 0.9M pairs)."""
    spm_sample_steps: int | None = None
    """SPM data: sampler steps of the clean images (None = the model's default K), so the SPM is one per model."""
    spm_epochs: int = 30
    """SPM training passes over its views."""
    spm_batch_size: int = 64
    """SPM training batch (pairs)."""
    spm_lr: float = 1e-3
    """SPM learning rate (Adam)."""
    spm_width: int = 32
    """SPM conv channels (ConvSPM; ~0.1M parameters at 32)."""
    spm_flip: bool = True
    """augment SPM pairs with horizontal flips (both members alike; valid for the toy world and natural images)."""
    spm_min_margin: float = 0.05
    """SPO refuses an SPM whose held-out pairwise accuracy is not above 0.5 + this."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "toy": dict(prompts_per_round=32, pairs_per_update=32, lr=3e-5, optimizer="adam", weight_decay=0.0,
                    full_finetune=True),
    }

    def __post_init__(self):
        check_choice("preference_model", self.preference_model, ("spm", "reward_x0"))
        check_positive(self, "beta", "lr", "prompts_per_round", "pairs_per_update", "sample_eta",
                       "spm_samples_per_prompt", "spm_views_per_pair", "spm_sample_steps", "spm_epochs",
                       "spm_batch_size", "spm_lr", "spm_width", "reward_score_scale", "lora_rank", "max_updates")
        check_positive(self, "spm_min_margin", allow_zero=True)
        check_positive(self, "weight_decay", "start_step", "threshold", allow_zero=True)
        if self.num_candidates < 2:
            raise ValueError(f"num_candidates must be >= 2; got {self.num_candidates}")
        if not 0.0 < self.clamp_eps < 1.0:
            raise ValueError(f"clamp_eps must be in (0, 1); got {self.clamp_eps}")
        if not self.threshold < 1.0:
            raise ValueError(f"threshold is a softmax-probability difference, < 1; got {self.threshold}")
        if self.spm_samples_per_prompt < 2:
            raise ValueError(f"spm_samples_per_prompt must be >= 2 to form pairs; got {self.spm_samples_per_prompt}")
        if self.spm_path and self.spm_path.endswith(".bin") and not self.spm_clip_path:
            raise ValueError(f"spm_path={self.spm_path!r} is a released SPM checkpoint: set spm_clip_path to its "
                             "PickScore_v1 CLIP folder")

    def min_train_steps(self) -> int:
        """Smallest K this config can train at: SPO branches the stochastic steps from start_step up to the one
        before the last, so K >= start_step + 2. The harness marks smaller-K cells "n/a" (bench.grid)."""
        return self.start_step + 2

    def min_update_nfe(self, train_steps: int, nfe_per_predict: int) -> int:
        """NFEs of the cheapest policy update (the harness refuses a smaller budget before anything loads): one
        resampler round plus the two gradient NFEs of a pair, as the training loop's budget check counts it."""
        branch = list(range(self.start_step, train_steps - 1))
        return (resampler_nfe(self.prompts_per_round, train_steps, self.num_candidates, branch, nfe_per_predict)
                + 2 * nfe_per_predict)

    @classmethod
    def search_space(cls) -> dict[str, tuple]:
        return {
            "lr": ("log_float", 1e-6, 1e-3),
            "beta": ("log_float", 1.0, 100.0),
            "threshold": ("categorical", [0.0, 0.1, 0.3]),
            "num_candidates": ("categorical", [2, 4]),
        }


def loss(logp_theta_w: torch.Tensor, logp_ref_w: torch.Tensor, logp_theta_l: torch.Tensor, logp_ref_l: torch.Tensor,
         beta: float, clamp_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SPO per-step DPO loss (spec §3.4) and the per-pair margin z.

        log r_* = clamp(logp_theta^* - logp_ref^*, log(1 - eps), log(1 + eps))   (log of the clamped ratio)
        z       = beta (log r_w - log r_l);   loss = mean softplus(-z) = mean -log sigmoid(z)

    Worked values (beta 10, eps 0.1): log-ratios (0, 0) -> 0.693147; (+0.05, -0.05) -> 0.31326;
    (+0.2, -0.2) -> clamped to (log 1.1, log 0.9) -> 0.12613 with zero gradient (the loss floor at beta 10).
    """
    low, high = math.log(1.0 - clamp_eps), math.log(1.0 + clamp_eps)
    z = beta * (torch.clamp(logp_theta_w - logp_ref_w, low, high) - torch.clamp(logp_theta_l - logp_ref_l, low, high))
    return torch.nn.functional.softplus(-z).mean(), z


def keep_pair(score_w: torch.Tensor, score_l: torch.Tensor, threshold: float) -> torch.Tensor:
    """SPO's pair filter: softmax over (s_w, s_l) gives p_w - p_l = tanh((s_w - s_l) / 2) > threshold (bool).
    threshold 0.3 <=> s_w - s_l > 2 artanh(0.3) = 0.6190."""
    return torch.tanh((score_w - score_l) / 2) > threshold


# ---------------------------------------------------------------------------------------------------------------
# The step-wise resampler
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class StepPairs:
    """Recorded transitions: the shared parent x_t, the win/lose children, the grid step and the prompt row."""

    parent: torch.Tensor    # (n, C, h, w) kernel parameterisation
    win: torch.Tensor       # (n, C, h, w)
    lose: torch.Tensor      # (n, C, h, w)
    step: torch.Tensor      # (n,) long grid index i of the transition t_i -> t_{i+1}
    prompt: torch.Tensor    # (n,) long row into `cond`
    cond: Any               # Conditioning of the round's prompts
    candidates: int = 0     # pools formed (kept or not)
    final_latents: torch.Tensor | None = None  # (B, C, h, w) where each prompt's trajectory ended

    def __len__(self) -> int:
        return int(self.step.numel())


def resampler_nfe(num_prompts: int, num_steps: int, num_candidates: int, branch_steps: list[int],
                  nfe_per_predict: int) -> int:
    """NFEs of one resampler round: per prompt one denoiser call at x_T, then for every step i < K-1 either k calls
    (the candidates of a branching step, each needed for the next step anyway) or 1: B (1 + sum_i n_i) npp."""
    per_prompt = 1 + sum(num_candidates if i in branch_steps else 1 for i in range(num_steps - 1))
    return num_prompts * per_prompt * nfe_per_predict


@torch.no_grad()
def collect_stepwise_pairs(policy, prompts: list[str], num_steps: int, scorer: Callable, *, num_candidates: int,
                           threshold: float, eta: float, kernel: str, start_step: int,
                           generator: torch.Generator) -> StepPairs:
    """SPO's step-wise resampler (module docstring). `scorer(x_t, x0_pred, t, cond) -> (N,)` scores candidate states
    (x_t = VP-scaled denoiser input, t a python int). Cost: `resampler_nfe(...)` sampling NFEs."""
    scheduler = policy.scheduler_for(kernel)
    timesteps, prev = sampling.timestep_grid(scheduler, num_steps, kernel)
    cond = policy.encode_prompts(prompts)
    B, k, device = len(prompts), num_candidates, policy.device
    rows = torch.arange(B, device=device)
    noise = torch.randn((B, *policy.latent_shape), generator=generator).to(device)
    x = noise * float(getattr(scheduler, "init_noise_sigma", 1.0))  # flow schedulers start at sigma 1: none
    t0 = timesteps[0].to(device)
    # grid timesteps as python numbers: ints, or a flow model's floats s * 1000
    timesteps, prev = (timesteps.tolist(), prev.tolist()) if kernel == sampling.FLOW else (timesteps, prev)
    as_t = float if kernel == sampling.FLOW else int
    out = policy.predict(sampling.model_input(kernel, scheduler, x, as_t(timesteps[0])), t0, cond)
    parents, wins, losses, steps, prompt_rows, pools = [], [], [], [], [], 0
    for i in range(num_steps):
        t, t_prev = as_t(timesteps[i]), as_t(prev[i])
        mean, std, _ = sampling.transition(kernel, scheduler, out, x, t, t_prev, eta)
        stochastic = float(std) > 0
        if start_step <= i < num_steps - 1 and stochastic:
            eps = torch.randn((B, k, *x.shape[1:]), generator=generator).to(device)
            candidates = (mean.unsqueeze(1) + std * eps).flatten(0, 1)          # (B*k, C, h, w), rows p*k + j
            t_next = as_t(timesteps[i + 1])
            cond_k = cond.repeat(k)
            model_in = sampling.model_input(kernel, scheduler, candidates, t_next)
            out_c = policy.predict(model_in, torch.as_tensor(t_next, device=device), cond_k)
            _, _, x0_c = sampling.transition(kernel, scheduler, out_c, candidates, t_next, as_t(prev[i + 1]), eta)
            scores = scorer(model_in, x0_c, t_next, cond_k).float().view(B, k)
            best, worst = scores.argmax(dim=1), scores.argmin(dim=1)
            keep = keep_pair(scores[rows, best], scores[rows, worst], threshold) & (best != worst)
            cand = candidates.view(B, k, *x.shape[1:])
            pools += B
            if keep.any():
                parents.append(x[keep].cpu())
                wins.append(cand[rows, best][keep].cpu())
                losses.append(cand[rows, worst][keep].cpu())
                steps.append(torch.full((int(keep.sum()),), i, dtype=torch.long))
                prompt_rows.append(rows[keep].cpu())
            j = torch.randint(k, (B,), generator=generator).to(device)  # continue from a uniformly random candidate
            x = cand[rows, j]
            out = out_c.view(B, k, *out_c.shape[1:])[rows, j]
        else:
            x = mean + std * torch.randn(x.shape, generator=generator).to(device) if stochastic else mean
            if i < num_steps - 1:
                out = policy.predict(sampling.model_input(kernel, scheduler, x, as_t(timesteps[i + 1])),
                                     torch.as_tensor(timesteps[i + 1], device=device), cond)
    shape = (0, *policy.latent_shape)
    cat = lambda parts, empty: torch.cat(parts) if parts else empty  # noqa: E731
    return StepPairs(parent=cat(parents, torch.zeros(shape)), win=cat(wins, torch.zeros(shape)),
                     lose=cat(losses, torch.zeros(shape)), step=cat(steps, torch.zeros(0, dtype=torch.long)),
                     prompt=cat(prompt_rows, torch.zeros(0, dtype=torch.long)), cond=cond, candidates=pools,
                     final_latents=x)


def step_log_probs(policy, pairs: StepPairs, index: torch.Tensor, kernel: str, eta: float, num_steps: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(win | parent), log p(lose | parent)) under the policy's current parameters, (n,) each: ONE denoiser
    call per pair, since winner and loser share their parent (single-step SPO)."""
    scheduler = policy.scheduler_for(kernel)
    timesteps, prev = sampling.timestep_grid(scheduler, num_steps, kernel)
    device = policy.device
    step = pairs.step[index]
    t, t_prev = timesteps[step], prev[step]
    parent = pairs.parent[index].to(device)
    cond = pairs.cond.select(pairs.prompt[index])
    out = policy.predict(sampling.model_input(kernel, scheduler, parent, t), t.to(device), cond)
    mean, std, _ = sampling.transition(kernel, scheduler, out, parent, t, t_prev, eta)
    return (sampling.gaussian_log_prob(pairs.win[index].to(device), mean, std),
            sampling.gaussian_log_prob(pairs.lose[index].to(device), mean, std))


class SPOMethod:
    """Step-by-step preference optimisation with a step-aware preference model; `generate` is the shared sampler."""

    name: ClassVar[str] = "spo"
    label: ClassVar[str] = "SPO"
    Config = Config
    paper: ClassVar[str] = "Liang et al., Step-aware Preference Optimization / SPO, arXiv 2406.04314"
    deviations: ClassVar[tuple[Deviation, ...]] = (
        Deviation("toy world: the SPM is a 0.1M-parameter conv net on x0-predictions, trained on reward-labelled "
                  "initial-model samples (paper: CLIP-H PickScore + adaLN on Pick-a-Pic v1 human labels); the released "
                  "SPMs load for SD-1.5 / SDXL", "no Pick-a-Pic or CLIP-H on the toy; the paper's recipe otherwise "
                  "(clean pairs noised to t, x0-predictions, pairwise loss), gated on held-out accuracy",
                  "methods/spm.py; methods/spo.py Config.spm_*"),
        Deviation("the SPM's training compute is outside the cell's budget and shared by all cells of a (model, "
                  "reward)", "the paper trains its SPM once, before and apart from SPO", "methods/spm.py train_spm"),
        Deviation("few-step grid: every stochastic step but the last branches (paper: kappa = 750 on 20 steps); the "
                  "last pool is scored at t_{K-1}", "a 4-step grid has 3 stochastic transitions (spec §3.9)",
                  "methods/spo.py Config.start_step"),
        Deviation("gradient clipping at 1.0 applied (the official clip is a no-op)", "as configured officially; "
                  "grad_clip=0 reproduces the code", "methods/spo.py Config.grad_clip"),
        Deviation("toy recipe: Adam lr 3e-5, full fine-tune, 32 prompts per round (paper SD1.5: AdamW 6e-5, LoRA r4, "
                  "40 prompts)", "toy-recipes.md's optimizer", "methods/spo.py Config.presets['toy']"),
    )

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else Config()
        self.spm = None  # a scorer with .score(x_t, x0_pred, t, cond) -> (N,): methods.spm.ConvSPM or ReleasedScorer

    # ------------------------------------------------------------------------------------------------ SPM
    def spm_settings(self, policy) -> spm_lib.SPMSettings:
        cfg = self.config
        return spm_lib.SPMSettings(samples_per_prompt=cfg.spm_samples_per_prompt, views_per_pair=cfg.spm_views_per_pair,
                                   epochs=cfg.spm_epochs, batch_size=cfg.spm_batch_size, lr=cfg.spm_lr,
                                   width=cfg.spm_width, flip=cfg.spm_flip,
                                   sample_steps=cfg.spm_sample_steps or policy.spec.default_train_steps)

    def load_spm(self, policy, task: Task, tracker: Tracker, budget: Budget):
        """The cell's SPM: `spm_path` if given, else the cached one of (model, reward), trained now if missing. The
        file and its record go to the tracker; its held-out accuracy is logged and gates training."""
        cfg = self.config
        if cfg.spm_path and cfg.spm_path.endswith(".bin"):
            return ReleasedScorer(spm_lib.load_released_spm(cfg.spm_path, cfg.spm_clip_path), cfg.spm_clip_path, policy)
        reward_name = getattr(task.reward, "name", type(task.reward).__name__)
        path = Path(cfg.spm_path) if cfg.spm_path else spm_lib.cache_path(cfg.spm_cache_dir, policy.spec.name,
                                                                           reward_name, self.spm_settings(policy))
        if path.exists():
            model, info = spm_lib.ConvSPM.load(path)
            log.info("spo: cached SPM %s (held-out accuracy %.3f)", path, info["heldout_accuracy"]["all"])
        elif cfg.spm_path:
            raise FileNotFoundError(f"spm_path={cfg.spm_path!r} does not exist")
        else:
            model, info = spm_lib.train_spm(policy, task.prompts, task.reward, self.spm_settings(policy))
            model.save(path, info)
            log.info("spo: trained SPM %s (held-out accuracy %.3f)", path, info["heldout_accuracy"]["all"])
        log_artifact(tracker, path, "spm")
        log_text(tracker, json.dumps({**info, "file": str(path)}, indent=1, default=str), "spm/spm_info.json")
        metrics = {f"train/spm_heldout_acc_{k}": v for k, v in info["heldout_accuracy"].items() if k not in ("all", "n")}
        metrics.update({"train/spm_heldout_acc": info["heldout_accuracy"]["all"],
                        "train/spm_heldout_views": info["heldout_accuracy"]["n"],
                        "train/spm_train_acc": info["train_accuracy"]["all"]})
        tracker.log_metrics(metrics, step=budget.total_nfe)
        spm_lib.check_accuracy(info, cfg.spm_min_margin)
        return model.to(policy.device)

    def _scorer(self, policy, task: Task, budget: Budget) -> Callable:
        cfg = self.config
        if cfg.preference_model == "reward_x0":
            def score(x_t, x0_pred, t, cond):
                budget.spend(reward_calls=len(x0_pred))
                images = policy.decode(x0_pred)
                return cfg.reward_score_scale * torch.as_tensor(task.reward(images, cond.prompts)).float().to(x_t.device)
            return score
        return self.spm.score

    # --------------------------------------------------------------------------------------------- train
    def train(self, policy, task: Task, budget: Budget, tracker: Tracker) -> None:
        cfg = self.config
        log.info("spo config: %s", describe(cfg))
        K = task.train_steps
        if K < cfg.min_train_steps():
            raise ValueError(f"SPO branches the stochastic steps from start_step={cfg.start_step} to the one before the "
                             f"last: train_steps must be >= {cfg.min_train_steps()}, got {K}")
        check_run_length(budget, cfg.max_updates)
        self.updates = 0
        kernel = sampling.kernel_for(policy, cfg.kernel)
        gen = generator(task.seed)
        if cfg.preference_model == "spm" and self.spm is None:
            self.spm = self.load_spm(policy, task, tracker, budget)
        scorer = self._scorer(policy, task, budget)
        params = policy.trainable_parameters()
        optimizer = build_optimizer(params, cfg)
        npp = policy.nfe_per_predict
        branch = list(range(cfg.start_step, K - 1))
        round_nfe = resampler_nfe(cfg.prompts_per_round, K, cfg.num_candidates, branch, npp)
        round_calls = (cfg.prompts_per_round if cfg.monitor_reward else 0) + (
            cfg.prompts_per_round * cfg.num_candidates * len(branch) if cfg.preference_model == "reward_x0" else 0)
        while budget.fits(nfe=round_nfe + 2 * npp, reward_calls=round_calls) and not self._done():
            prompts = pick_prompts(task.prompts, cfg.prompts_per_round, gen)
            pairs = collect_stepwise_pairs(policy, prompts, K, scorer, num_candidates=cfg.num_candidates,
                                           threshold=cfg.threshold, eta=cfg.sample_eta, kernel=kernel,
                                           start_step=cfg.start_step, generator=gen)
            budget.spend(sample_nfe=round_nfe)
            metrics = {"train/num_pairs": float(len(pairs)),
                       "train/valid_pair_rate": len(pairs) / max(pairs.candidates, 1)}
            if cfg.monitor_reward:
                with torch.no_grad():
                    images = policy.decode(pairs.final_latents)
                    metrics["train/reward_mean"] = float(torch.as_tensor(task.reward(images, prompts)).float().mean())
                budget.spend(reward_calls=len(prompts))
            tracker.log_metrics(metrics, step=budget.total_nfe)
            order = torch.randperm(len(pairs), generator=gen)
            for start in range(0, len(pairs), cfg.pairs_per_update):
                index = order[start : start + cfg.pairs_per_update]
                cost = 2 * len(index) * npp  # policy forward+backward + reference forward, one per shared parent
                if not budget.fits(nfe=cost) or self._done():
                    return
                metrics = self._update(policy, optimizer, params, pairs, index, kernel, K)
                budget.spend(grad_nfe=cost)
                tracker.log_metrics(metrics, step=budget.total_nfe)

    def _done(self) -> bool:
        return self.config.max_updates is not None and self.updates >= self.config.max_updates

    def _update(self, policy, optimizer, params, pairs, index, kernel, num_steps) -> dict[str, float]:
        cfg = self.config
        optimizer.zero_grad(set_to_none=True)
        logp_theta_w, logp_theta_l = step_log_probs(policy, pairs, index, kernel, cfg.sample_eta, num_steps)
        with policy.reference():
            logp_ref_w, logp_ref_l = step_log_probs(policy, pairs, index, kernel, cfg.sample_eta, num_steps)
        value, z = loss(logp_theta_w, logp_ref_w, logp_theta_l, logp_ref_l, cfg.beta, cfg.clamp_eps)
        value.backward()
        grad_norm = clip_grad_norm(params, cfg.grad_clip)
        optimizer.step()
        self.updates += 1
        bound = math.log(1 + cfg.clamp_eps) * 0.999
        ratios = torch.cat([logp_theta_w - logp_ref_w, logp_theta_l - logp_ref_l]).detach()
        return {"train/loss": float(value.detach()), "train/margin": float(z.detach().mean()),
                "train/implicit_acc": float(((z > 0).float() + 0.5 * (z == 0).float()).mean()),
                "train/ratio_win": float((logp_theta_w - logp_ref_w).detach().exp().mean()),
                "train/clipfrac": float((ratios.abs() > bound).float().mean()), "train/grad_norm": grad_norm}

    def generate(self, policy, prompts: list[str], num_steps: int, *, noise: torch.Tensor,
                 budget: Budget | None = None) -> tuple[torch.Tensor, int]:
        return default_generate(policy, prompts, num_steps, noise=noise, budget=budget)


@dataclass
class RewardX0Config(Config):
    """SPO with the task reward on each candidate's decoded x0 prediction as the step-wise preference model (the
    paper's "w/o SPM" ablation), as a grid entry of its own (`method=spo_reward_x0`) so a leaderboard lists it beside
    SPO with its trained SPM. The algorithm is the one of `method=spo method.preference_model=reward_x0`."""

    preference_model: str = "reward_x0"
    """"spm": step-aware preference model trained here (or loaded from spm_path); "reward_x0": the task reward on
    each candidate's decoded x0 prediction."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # lr: the validation probe of 2026-12-06 (bench/conf/tuning/toy/val-probe.md); it supersedes any lr below.
        # SPO's toy preset without the fields of the SPM it does not train.
        "toy": {**{k: v for k, v in Config.presets["toy"].items() if not k.startswith("spm_")}, "lr": 1e-5},
    }


class SPORewardX0Method(SPOMethod):
    """SPO with preference_model="reward_x0" by default (see RewardX0Config)."""

    name: ClassVar[str] = "spo_reward_x0"
    label: ClassVar[str] = "SPO (reward on x̂0, no SPM)"
    Config = RewardX0Config
    deviations: ClassVar[tuple[Deviation, ...]] = (
        Deviation("the task reward on each candidate's decoded x0-prediction picks win / lose (no SPM)",
                  "the paper's own \"w/o SPM\" ablation (PickScore on x0-predictions)",
                  "methods/spo.py RewardX0Config.preference_model"),
        *SPOMethod.deviations[2:],
    )


class ReleasedScorer:
    """A released SPM (methods.spm.ReleasedSPM) as SPO's scorer: decode each candidate's x0-prediction, resize
    bicubically to the CLIP size, CLIP-normalise, tokenise the prompts, score at t (the official preprocessing)."""

    def __init__(self, model, clip_path: str, policy):
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(clip_path, local_files_only=True)
        self.model, self.policy, self.tokenizer = model.to(policy.device), policy, processor.tokenizer
        size = processor.image_processor.crop_size
        self.size = int(size["height"] if isinstance(size, dict) else size)
        self.mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)

    @torch.no_grad()
    def score(self, x_t, x0_pred, t, cond) -> torch.Tensor:
        images = self.policy.decode(x0_pred)  # (N, 3, H, W) in [0, 1]
        images = torch.nn.functional.interpolate(images, size=(self.size, self.size), mode="bicubic",
                                                 align_corners=False).clamp(0, 1)
        pixels = (images - self.mean.to(images.device)) / self.std.to(images.device)
        ids = self.tokenizer(list(cond.prompts), padding="max_length", truncation=True, max_length=77,
                             return_tensors="pt").input_ids.to(images.device)
        t_vec = torch.full((len(images),), int(t), device=images.device)
        return self.model.score_pixels(pixels, ids, t_vec)
