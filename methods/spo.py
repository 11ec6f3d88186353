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
- "spm": a small step-aware preference model trained at the start of `train` on the policy's own trajectories
  (see `StepAwarePreferenceModel` and `train_spm`): the toy-world stand-in for the paper's CLIP-H SPM trained on
  Pick-a-Pic (which needs GPUs and Pick-a-Pic; not reproduced here).
- "reward_x0": the task reward on the decoded x0 prediction of each candidate (the paper's "w/o SPM" ablation
  uses PickScore this way); costs k reward calls per prompt per branching step.

What the spec leaves open, and the choice made here:
- few-step adaptation (§3.9, not in the paper): every stochastic step but the last branches (start_step 0 instead
  of kappa = 750); the last pool is scored at t_{K-1} from x0 predictions.
- the SPM: the paper's is CLIP-H + adaLN trained on Pick-a-Pic v1 x0-predictions of the *base* model; the one here
  is trained on the policy's own trajectories and final task rewards, so its scores are logits of the predicted
  outcome; the threshold keeps the paper's softmax-difference meaning in those units (0.3 <=> logit gap 0.62).
- only single-step SPO (winner and loser share their parent); SDXL's multi-step "MSPO" (3 inner steps per chunk) is
  not implemented: a 4-step grid has only 3 stochastic transitions.
- gradient clipping is a no-op in the official code (§3.7); here it is applied (grad_clip=1.0; 0 reproduces).
- the ratio clamp is a code detail inherited from D3PO; whether the paper states it is unverified (§3.4).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from methods import sampling
from methods.common import (
    Budget,
    Task,
    Tracker,
    build_optimizer,
    check_choice,
    check_positive,
    clip_grad_norm,
    default_generate,
    generator,
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
    # --- the step-aware preference model ("spm") ---
    spm_path: str | None = None
    """load a trained SPM (torch file written by `StepAwarePreferenceModel.save`) instead of training one."""
    spm_prompts: int = 32
    """SPM data: prompts per sampling round."""
    spm_samples_per_prompt: int = 8
    """SPM data: trajectories per prompt."""
    spm_rounds: int = 2
    """SPM data: sampling rounds (the data = rounds x prompts x samples trajectories x (K-1) noisy states)."""
    spm_epochs: int = 20
    """SPM training passes over its data."""
    spm_batch_size: int = 64
    """SPM training batch."""
    spm_lr: float = 1e-3
    """SPM learning rate (Adam)."""
    spm_width: int = 32
    """SPM conv channels (the net has ~8 * width^2 * 9 weights; width 32: ~0.1M parameters)."""
    spm_flip: bool = True
    """augment SPM data with horizontal flips (valid for the toy world and natural images)."""
    spm_loss: str = "bce"
    """"bce": predict the final reward in [0, 1] (the verifier outcome) from the noisy state; "pairwise": PickScore's
    softmax cross-entropy over two same-prompt states at the same step, soft labels from the final rewards."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "toy": dict(prompts_per_round=32, pairs_per_update=32, lr=3e-5, optimizer="adam", weight_decay=0.0,
                    full_finetune=True, spm_rounds=2, spm_prompts=32, spm_samples_per_prompt=8),
    }

    def __post_init__(self):
        check_choice("preference_model", self.preference_model, ("spm", "reward_x0"))
        check_choice("spm_loss", self.spm_loss, ("bce", "pairwise"))
        check_positive(self, "beta", "lr", "prompts_per_round", "pairs_per_update", "sample_eta", "spm_prompts",
                       "spm_samples_per_prompt", "spm_rounds", "spm_epochs", "spm_batch_size", "spm_lr", "spm_width",
                       "reward_score_scale", "lora_rank", "max_updates")
        check_positive(self, "weight_decay", "start_step", "threshold", allow_zero=True)
        if self.num_candidates < 2:
            raise ValueError(f"num_candidates must be >= 2; got {self.num_candidates}")
        if not 0.0 < self.clamp_eps < 1.0:
            raise ValueError(f"clamp_eps must be in (0, 1); got {self.clamp_eps}")
        if not self.threshold < 1.0:
            raise ValueError(f"threshold is a softmax-probability difference, < 1; got {self.threshold}")
        if self.spm_loss == "pairwise" and self.spm_samples_per_prompt < 2:
            raise ValueError("spm_loss='pairwise' needs spm_samples_per_prompt >= 2")

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
# The step-aware preference model (toy-scale)
# ---------------------------------------------------------------------------------------------------------------


def prompt_vectors(cond) -> torch.Tensor:
    """One vector per prompt from a policy Conditioning: SDXL's pooled embedding, else the token states mean-pooled
    (SD), else the toy encoder's vector itself: (B, D) float32, no grad."""
    tensors = cond.tensors
    if "pooled" in tensors:
        vec = tensors["pooled"]
    else:
        vec = tensors["embeds"]
        if vec.ndim == 3:
            vec = vec.mean(dim=1)
    return vec.detach().float()


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class StepAwarePreferenceModel(nn.Module):
    """score(x_t, x0_hat, t, prompt) -> a logit; higher = the final image of this state is more likely preferred.

    A stand-in for the paper's SPM (CLIP-H with DiT-style adaLN timestep modulation, §3.2) small enough to train on a
    CPU in seconds: three stride-2 3x3 conv stages over the channel-concatenation of the denoiser's input x_t (VP-scaled)
    and its clean prediction x0_hat, each followed by GroupNorm and a FiLM (scale, shift) modulation computed from
    [sinusoidal(t), projected prompt vector] (the adaLN analogue), global average pooling, and a linear head on
    [pooled features, modulation embedding]. At step t the verifier outcome of the final image is mostly decided by
    x0_hat; x_t adds the noise the next step will see.
    """

    def __init__(self, latent_channels: int, prompt_dim: int, width: int = 32, embed_dim: int = 64):
        super().__init__()
        self.config = dict(latent_channels=latent_channels, prompt_dim=prompt_dim, width=width, embed_dim=embed_dim)
        self.embed_dim = embed_dim
        self.prompt_proj = nn.Linear(prompt_dim, embed_dim)
        width2 = 2 * embed_dim
        self.embed = nn.Sequential(nn.Linear(width2, width2), nn.SiLU(), nn.Linear(width2, width2))
        chans = [2 * latent_channels, width, 2 * width, 2 * width]
        # every stage halves the resolution (32 -> 16 -> 8 -> 4 on the toy world): ~2 M multiply-adds per state
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1) for i in range(3))
        self.norms = nn.ModuleList(nn.GroupNorm(8, chans[i + 1]) for i in range(3))
        self.films = nn.ModuleList(nn.Linear(2 * embed_dim, 2 * chans[i + 1]) for i in range(3))
        for film in self.films:  # start as identity modulation, like the paper's zero-initialised adaLN
            nn.init.zeros_(film.weight)
            nn.init.zeros_(film.bias)
        self.head = nn.Linear(chans[-1] + 2 * embed_dim, 1)

    def forward(self, x_t: torch.Tensor, x0_pred: torch.Tensor, t: torch.Tensor, prompt_vec: torch.Tensor
                ) -> torch.Tensor:
        """Logits (B,) for states x_t (B, C, h, w), x0_pred (B, C, h, w), integer t (B,), prompt_vec (B, D)."""
        emb = torch.cat([timestep_embedding(t, self.embed_dim), self.prompt_proj(prompt_vec)], dim=1)
        emb = self.embed(emb)
        h = torch.cat([x_t, x0_pred], dim=1).float()
        for conv, norm, film in zip(self.convs, self.norms, self.films):
            scale, shift = film(emb).chunk(2, dim=1)
            h = nn.functional.silu(norm(conv(h)) * (1 + scale[..., None, None]) + shift[..., None, None])
        return self.head(torch.cat([h.mean(dim=(2, 3)), emb], dim=1)).squeeze(1)

    def save(self, path) -> None:
        torch.save({"config": self.config, "state": self.state_dict()}, path)

    @classmethod
    def load(cls, path) -> StepAwarePreferenceModel:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = cls(**blob["config"])
        model.load_state_dict(blob["state"])
        return model


def spm_loss(model: StepAwarePreferenceModel, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """"bce": BCE(logit, final reward r in [0, 1]). "pairwise": PickScore's criterion on (a, b) states of the same
    prompt at the same step: cross-entropy of softmax([s_a, s_b]) against labels (1,0) / (0,1) / (.5,.5) (tie)."""
    if kind == "bce":
        logits = model(batch["x_t"], batch["x0"], batch["t"], batch["prompt"])
        return nn.functional.binary_cross_entropy_with_logits(logits, batch["reward"])
    s_a = model(batch["x_t"], batch["x0"], batch["t"], batch["prompt"])
    s_b = model(batch["x_t_b"], batch["x0_b"], batch["t"], batch["prompt"])
    label_a = 0.5 + 0.5 * torch.sign(batch["reward"] - batch["reward_b"])
    log_p = torch.log_softmax(torch.stack([s_a, s_b], dim=1), dim=1)
    return -(label_a * log_p[:, 0] + (1 - label_a) * log_p[:, 1]).mean()


@torch.no_grad()
def collect_spm_data(policy, prompts: list[str], reward, num_steps: int, *, samples_per_prompt: int, eta: float,
                     kernel: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Sample `samples_per_prompt` trajectories per prompt and return every noisy state a candidate can be scored in
    (grid steps 1..K-1) with the final reward: x_t (VP-scaled denoiser input), x0 (the policy's x0_hat there), t,
    prompt vector, reward, group (prompt index) and step index. Rows: (trajectory, step) flattened."""
    batch = [p for p in prompts for _ in range(samples_per_prompt)]
    traj = sampling.sample(policy, batch, num_steps, generator=generator, eta=eta, kernel=kernel)
    rewards = torch.as_tensor(reward(traj.images, batch), dtype=torch.float32).cpu().reshape(-1)
    scheduler = policy.scheduler_for(kernel)
    vec = prompt_vectors(traj.cond).cpu()
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("x_t", "x0", "t", "prompt", "reward", "group", "step")}
    groups = torch.arange(len(prompts)).repeat_interleave(samples_per_prompt)
    for k in range(1, num_steps):
        t = traj.timesteps[k]
        rows["x_t"].append(sampling.model_input(kernel, scheduler, traj.latents[:, k], t).cpu())
        rows["x0"].append(traj.x0_preds[:, k].cpu())
        rows["t"].append(t.repeat(len(batch)))
        rows["prompt"].append(vec)
        rows["reward"].append(rewards)
        rows["group"].append(groups)
        rows["step"].append(torch.full((len(batch),), k))
    return {k: torch.cat(v) for k, v in rows.items()}


def _pairs_within(data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) row indices of states sharing prompt group and step, a < b (for the pairwise loss and accuracy)."""
    key = data["group"] * 1000 + data["step"]
    a, b = [], []
    for value in key.unique().tolist():
        rows = (key == value).nonzero().flatten().tolist()
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                a.append(rows[i])
                b.append(rows[j])
    return torch.tensor(a, dtype=torch.long), torch.tensor(b, dtype=torch.long)


def pairwise_accuracy(model: StepAwarePreferenceModel, data: dict[str, torch.Tensor]) -> dict[int, float]:
    """Per timestep t: fraction of same-prompt, same-step state pairs with different final rewards that the model
    orders correctly (the paper validates its SPM this way at t in {0, 251, ..., 951})."""
    a, b = _pairs_within(data)
    if len(a) == 0:
        return {}
    with torch.no_grad():
        s = model(data["x_t"], data["x0"], data["t"], data["prompt"])
    diff_r = data["reward"][a] - data["reward"][b]
    decided = diff_r != 0
    correct = (torch.sign(s[a] - s[b]) == torch.sign(diff_r)) & decided
    out = {}
    for t in data["t"][a].unique().tolist():
        mask = (data["t"][a] == t) & decided
        if mask.any():
            out[int(t)] = float(correct[mask].float().mean())
    return out


def fit_spm(data: dict[str, torch.Tensor], *, kind: str, epochs: int, batch_size: int, lr: float, width: int,
            flip: bool, generator: torch.Generator, latent_channels: int) -> tuple[StepAwarePreferenceModel, list[float]]:
    """Train a StepAwarePreferenceModel on `collect_spm_data` rows; returns (model, per-epoch mean losses)."""
    if kind == "bce" and not bool(((data["reward"] >= 0) & (data["reward"] <= 1)).all()):
        raise ValueError("spm_loss='bce' predicts a reward in [0, 1] (a verifier outcome); this reward leaves that "
                         "range: use spm_loss='pairwise' or preference_model='reward_x0'")
    with torch.random.fork_rng(devices=[]):  # seed the SPM's init from `generator`, leaving the global RNG alone
        torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=generator)))
        model = StepAwarePreferenceModel(latent_channels, data["prompt"].shape[1], width=width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if kind == "pairwise":
        a, b = _pairs_within(data)
        units = len(a)
    else:
        units = len(data["reward"])
    history = []
    for _ in range(epochs):
        order = torch.randperm(units, generator=generator)
        total = 0.0
        for start in range(0, units, batch_size):
            idx = order[start : start + batch_size]
            if kind == "pairwise":
                ia, ib = a[idx], b[idx]
                batch = {k: data[k][ia] for k in ("x_t", "x0", "t", "prompt", "reward")}
                batch.update(x_t_b=data["x_t"][ib], x0_b=data["x0"][ib], reward_b=data["reward"][ib])
            else:
                batch = {k: data[k][idx] for k in ("x_t", "x0", "t", "prompt", "reward")}
            if flip:
                mask = torch.rand(len(idx), generator=generator) < 0.5
                for key in ("x_t", "x0", "x_t_b", "x0_b"):
                    if key in batch:
                        batch[key] = torch.where(mask[:, None, None, None], batch[key].flip(-1), batch[key])
            value = spm_loss(model, batch, kind)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            total += float(value.detach()) * len(idx)
        history.append(total / max(units, 1))
    return model.eval().requires_grad_(False), history


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
    x = noise * float(scheduler.init_noise_sigma)
    t0 = timesteps[0].to(device)
    out = policy.predict(sampling.model_input(kernel, scheduler, x, int(timesteps[0])), t0, cond)
    parents, wins, losses, steps, prompt_rows, pools = [], [], [], [], [], 0
    for i in range(num_steps):
        t, t_prev = int(timesteps[i]), int(prev[i])
        mean, std, _ = sampling.transition(kernel, scheduler, out, x, t, t_prev, eta)
        stochastic = float(std) > 0
        if start_step <= i < num_steps - 1 and stochastic:
            eps = torch.randn((B, k, *x.shape[1:]), generator=generator).to(device)
            candidates = (mean.unsqueeze(1) + std * eps).flatten(0, 1)          # (B*k, C, h, w), rows p*k + j
            t_next = int(timesteps[i + 1])
            cond_k = cond.repeat(k)
            model_in = sampling.model_input(kernel, scheduler, candidates, t_next)
            out_c = policy.predict(model_in, timesteps[i + 1].to(device), cond_k)
            _, _, x0_c = sampling.transition(kernel, scheduler, out_c, candidates, t_next, int(prev[i + 1]), eta)
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
                out = policy.predict(sampling.model_input(kernel, scheduler, x, int(timesteps[i + 1])),
                                     timesteps[i + 1].to(device), cond)
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
    Config = Config

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else Config()
        self.spm: StepAwarePreferenceModel | None = None

    # ------------------------------------------------------------------------------------------------ SPM
    def train_spm(self, policy, task: Task, budget: Budget, tracker: Tracker, gen: torch.Generator,
                  kernel: str) -> StepAwarePreferenceModel:
        """Sample the policy's own trajectories, score their final images with the task reward, and fit the SPM on
        every noisy state (spm_rounds x spm_prompts x spm_samples_per_prompt trajectories; costs their sampling NFEs
        and reward calls). 1/8 of the prompt groups are held out for the logged pairwise accuracy per timestep."""
        cfg = self.config
        n = cfg.spm_prompts * cfg.spm_samples_per_prompt
        nfe = n * task.train_steps * policy.nfe_per_predict
        parts = []
        for _ in range(cfg.spm_rounds):
            budget.require(nfe=nfe, reward_calls=n)
            prompts = pick_prompts(task.prompts, cfg.spm_prompts, gen)
            part = collect_spm_data(policy, prompts, task.reward, task.train_steps,
                                    samples_per_prompt=cfg.spm_samples_per_prompt, eta=cfg.sample_eta, kernel=kernel,
                                    generator=gen)
            part["group"] = part["group"] + len(parts) * cfg.spm_prompts
            parts.append(part)
            budget.spend(sample_nfe=nfe, reward_calls=n)
        data = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        held_out = data["group"] % 8 == 7
        train = {k: v[~held_out] for k, v in data.items()}
        val = {k: v[held_out] for k, v in data.items()}
        model, history = fit_spm(train, kind=cfg.spm_loss, epochs=cfg.spm_epochs, batch_size=cfg.spm_batch_size,
                                 lr=cfg.spm_lr, width=cfg.spm_width, flip=cfg.spm_flip, generator=gen,
                                 latent_channels=policy.latent_shape[0])
        metrics = {"train/spm_loss_first": history[0], "train/spm_loss_last": history[-1],
                   "train/spm_reward_mean": float(data["reward"].mean())}
        metrics.update({f"train/spm_val_pair_acc_t{t}": acc for t, acc in pairwise_accuracy(model, val).items()})
        tracker.log_metrics(metrics, step=budget.total_nfe)
        return model

    def _scorer(self, policy, task: Task, budget: Budget) -> Callable:
        cfg = self.config
        if cfg.preference_model == "reward_x0":
            def score(x_t, x0_pred, t, cond):
                budget.spend(reward_calls=len(x0_pred))
                images = policy.decode(x0_pred)
                return cfg.reward_score_scale * torch.as_tensor(task.reward(images, cond.prompts)).float().to(x_t.device)
            return score
        spm = self.spm.to(policy.device)

        def score(x_t, x0_pred, t, cond):
            t_vec = torch.full((len(x_t),), t, dtype=torch.long, device=x_t.device)
            return spm(x_t.float(), x0_pred.float(), t_vec, prompt_vectors(cond).to(x_t.device))
        return score

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
        kernel = cfg.kernel or policy.spec.scheduler
        gen = generator(task.seed)
        if cfg.preference_model == "spm" and self.spm is None:
            self.spm = (StepAwarePreferenceModel.load(cfg.spm_path) if cfg.spm_path
                        else self.train_spm(policy, task, budget, tracker, gen, kernel))
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
        # SPO's toy preset without the fields of the SPM it does not train.
        "toy": {k: v for k, v in Config.presets["toy"].items() if not k.startswith("spm_")},
    }


class SPORewardX0Method(SPOMethod):
    """SPO with preference_model="reward_x0" by default (see RewardX0Config)."""

    name: ClassVar[str] = "spo_reward_x0"
    Config = RewardX0Config
