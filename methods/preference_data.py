"""Where the preference methods (Diffusion-DPO, PSO, SPO's neighbours, filtered SFT) get their pairs, and the
forward-process denoising error they share.

Pair sources (spec dpo-spo-pso.md §5.2):
- `OnlineRewardPairs`   several trajectories per prompt from the *current* policy, ranked by the task reward;
                        winner/loser pairs within a prompt (online Diffusion-DPO §2.7a, online PSO §4.4, SFT).
- `OfflineDatasetPairs` a preference dataset on disk in Pick-a-Pic v2 form (prompt, winner image, loser image),
                        as one parquet file or a folder (offline Diffusion-DPO §2.3, offline PSO targets §4.5).
- `SelfSampleReferences` samples of the *initial* model (adapters disabled), drawn once per prompt and cached
                        (offline PSO's reference images x^rho, §4.5).

Denoising error (§2.2 "code form"): for a clean latent x0, noise eps and timestep t,
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps                       (DDPM forward process, VP form)
    err = mean over the C*h*w elements of (model(x_t, t, c) - target)^2
with target = eps (epsilon-prediction), v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (v-prediction) or x0
("sample"), read from the scheduler config. The element MEAN (not sum) is what makes beta = 5000 the right scale.
Flow models (FlowMatchEulerDiscreteScheduler) use their own forward process and velocity target, the loss they were
trained with: x_t = (1 - s) x0 + s eps, target v = eps - x0, s = t / num_train_timesteps (`forward_process`).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from methods.common import log_text, sample_nfe

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# The forward-process denoising error (shared by diffusion_dpo, pso offline, sft)
# ----------------------------------------------------------------------------------------------------------


def alphas_cumprod(scheduler, t: torch.Tensor) -> torch.Tensor:
    """abar_t for integer timesteps t (B,), float32 on t's device, shaped (B, 1, 1, 1)."""
    table = scheduler.alphas_cumprod.to(device=t.device, dtype=torch.float32)
    return table[t.long()].view(-1, 1, 1, 1)


def is_flow(scheduler) -> bool:
    """A rectified-flow model's scheduler (velocity prediction, x_s = (1 - s) x0 + s eps)."""
    return "FlowMatch" in type(scheduler).__name__


def _flow_s(scheduler, t: torch.Tensor) -> torch.Tensor:
    """s = t / num_train_timesteps for timesteps t (B,), float32, shaped (B, 1, 1, 1)."""
    return (t.float() / float(scheduler.config.num_train_timesteps)).view(-1, 1, 1, 1)


def forward_process(scheduler, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor):
    """(x_t, target): the model's forward process at timesteps t (B,) and what its denoiser should output there.
    VP: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, target eps / v / x0; flow: x_t = (1 - s) x0 + s eps, v = eps - x0."""
    if is_flow(scheduler):
        s = _flow_s(scheduler, t)
        return (1 - s) * x0 + s * eps, eps - x0
    abar = alphas_cumprod(scheduler, t)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    return x_t, denoising_target(scheduler.config.prediction_type, x0, eps, abar)


def add_noise(scheduler, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (VP form: the denoiser's input for every kernel); a flow model's
    (1 - s) x0 + s eps."""
    if is_flow(scheduler):
        return forward_process(scheduler, x0, eps, t)[0]
    abar = alphas_cumprod(scheduler, t)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def denoising_target(prediction_type: str, x0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """What the denoiser should output at x_t: eps, v = sqrt(abar) eps - sqrt(1-abar) x0, or x0."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return abar.sqrt() * eps - (1 - abar).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")


def denoising_errors(policy, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """Per-sample element-mean squared error of the policy's prediction at x_t = q(x_t | x0, eps): (B,) float32.

    Gradients flow to the adapters unless called under `policy.reference()` / `torch.no_grad()`.
    """
    x_t, target = forward_process(policy.scheduler, x0, eps, t)
    output = policy.predict(x_t, t, cond).float()
    return (output - target.float()).pow(2).flatten(1).mean(dim=1)


def own_noise(traj, policy) -> torch.Tensor:
    """The trajectory's own starting noise z ~ N(0, I): x_T / init_noise_sigma of the kernel that sampled it (1 for
    DDIM, sqrt(sigma_max^2 + 1) for Euler-ancestral). Used for the "reflow" pairing (z, x0) of a deterministic
    sample: the pair a reflow-distilled student was trained to map."""
    scheduler = policy.scheduler_for(traj.kernel) if hasattr(policy, "scheduler_for") else policy.scheduler
    return traj.latents[:, 0].float() / float(getattr(scheduler, "init_noise_sigma", 1.0))


def grid_timesteps(policy, num_steps: int) -> torch.Tensor:
    """The model's own K-step sampling grid (e.g. [999, 749, 499, 249] for K=4, trailing), long (K,); a flow
    model's float timesteps s * 1000."""
    from methods import sampling

    timesteps, _ = sampling.timestep_grid(policy.scheduler, num_steps)
    return timesteps.cpu() if is_flow(policy.scheduler) else timesteps.long().cpu()


def draw_timesteps(mode: str, grid: torch.Tensor, num_train_timesteps: int, shape: tuple[int, int],
                   generator: torch.Generator) -> torch.Tensor:
    """Training timesteps, long tensor of `shape` = (pairs, timesteps_per_pair).

    mode "grid": from the model's own sampling grid (Diffusion-DPO turbo mode, PSO); each row draws without
    replacement while the row is no longer than the grid (so timesteps_per_pair = K covers the whole grid).
    mode "uniform": t ~ U{0 .. num_train_timesteps-1} (Diffusion-DPO for multi-step models).
    """
    rows, per_row = shape
    if mode == "uniform":
        return torch.randint(0, num_train_timesteps, shape, generator=generator)
    if mode != "grid":
        raise ValueError(f"timesteps must be 'grid' or 'uniform'; got {mode!r}")
    if per_row <= len(grid):
        idx = torch.stack([torch.randperm(len(grid), generator=generator)[:per_row] for _ in range(rows)])
    else:
        idx = torch.randint(0, len(grid), shape, generator=generator)
    return grid[idx]


# ----------------------------------------------------------------------------------------------------------
# Pair formation from rewards (pure)
# ----------------------------------------------------------------------------------------------------------


def form_pairs(rewards: torch.Tensor, groups: torch.Tensor, *, pairing: str = "all", min_gap: float = 0.0,
               ties: str = "skip") -> tuple[torch.Tensor, torch.Tensor]:
    """(win, lose) index tensors into a batch whose rows i belong to prompt groups[i].

    pairing "all": every ordered pair (i, j) of the same group with r_i - r_j > min_gap (toy recipe 2).
    pairing "best_worst": per group, argmax vs argmin if their gap > min_gap (one pair per prompt).
    ties "skip" drops groups/pairs within min_gap (PSO DMD2 script: strict dominance); "second_wins" makes the
    later sample of a tied best_worst pair the winner (PSO SDXL-Turbo script, "r1 <= r2 -> sample 2 wins").
    Example: rewards [1, 0, 0, 1] in groups [0, 0, 1, 1], "all" -> win [0, 3], lose [1, 2].
    """
    if pairing not in ("all", "best_worst"):
        raise ValueError(f"pairing must be 'all' or 'best_worst'; got {pairing!r}")
    if ties not in ("skip", "second_wins"):
        raise ValueError(f"ties must be 'skip' or 'second_wins'; got {ties!r}")
    r = torch.as_tensor(rewards, dtype=torch.float64).cpu().reshape(-1)
    g = torch.as_tensor(groups).cpu().reshape(-1)
    win, lose = [], []
    for group in dict.fromkeys(g.tolist()):
        rows = (g == group).nonzero().flatten().tolist()
        if pairing == "all":
            for i in rows:
                for j in rows:
                    if i != j and r[i] - r[j] > min_gap:
                        win.append(i)
                        lose.append(j)
            continue
        best = max(rows, key=lambda i: (r[i].item(), -i))
        worst = min(rows, key=lambda i: (r[i].item(), -i))
        if r[best] - r[worst] > min_gap:
            win.append(best)
            lose.append(worst)
        elif ties == "second_wins" and len(rows) >= 2:
            win.append(rows[-1])
            lose.append(rows[0])
    return torch.tensor(win, dtype=torch.long), torch.tensor(lose, dtype=torch.long)


def pick_prompts(pool: Sequence[str], n: int, generator: torch.Generator) -> list[str]:
    """n distinct prompts from `pool` (a random permutation; cycles through the pool if n > len(pool))."""
    if not pool:
        raise ValueError("the prompt pool is empty")
    order: list[int] = []
    while len(order) < n:
        order += torch.randperm(len(pool), generator=generator).tolist()
    return [pool[i] for i in order[:n]]


# ----------------------------------------------------------------------------------------------------------
# Online pairs: sampled from the current policy, ranked by the reward
# ----------------------------------------------------------------------------------------------------------


@dataclass
class OnlineRound:
    """One online round: P*M trajectories, their rewards, and the winner/loser index pairs among them."""

    traj: Any
    """`methods.sampling.Trajectory` of B = P*M samples, rows grouped by prompt (row = p*M + m)."""
    rewards: torch.Tensor
    """(B,) float32 task rewards of the final images."""
    groups: torch.Tensor
    """(B,) long: which of the round's P prompts each row belongs to."""
    win: torch.Tensor
    """(num_pairs,) long rows of the winners."""
    lose: torch.Tensor
    """(num_pairs,) long rows of the losers."""

    @property
    def num_pairs(self) -> int:
        return int(self.win.numel())


class OnlineRewardPairs:
    """Samples `samples_per_prompt` trajectories for each of `prompts_per_round` prompts from the current
    policy, scores the final images with the reward, and forms winner/loser pairs (`form_pairs`).

    Costs per round: P*M*K*nfe_per_predict sampling NFEs and P*M reward calls (`round_cost`).
    """

    def __init__(self, *, prompts_per_round: int, samples_per_prompt: int, eta: float = 0.0,
                 pairing: str = "all", min_gap: float = 0.0, ties: str = "skip", kernel: str | None = None):
        if samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2 to form pairs; got {samples_per_prompt}")
        self.prompts_per_round = prompts_per_round
        self.samples_per_prompt = samples_per_prompt
        self.eta, self.pairing, self.min_gap, self.ties, self.kernel = eta, pairing, min_gap, ties, kernel

    def round_cost(self, num_steps: int, nfe_per_predict: int) -> tuple[int, int]:
        """(sampling NFEs, reward calls) of one round."""
        n = self.prompts_per_round * self.samples_per_prompt
        return n * num_steps * nfe_per_predict, n

    @torch.no_grad()
    def collect(self, policy, prompt_pool: Sequence[str], reward, num_steps: int, budget,
                generator: torch.Generator) -> OnlineRound:
        from methods import sampling

        prompts = pick_prompts(prompt_pool, self.prompts_per_round, generator)
        batch = [p for p in prompts for _ in range(self.samples_per_prompt)]
        traj = sampling.sample(policy, batch, num_steps, generator=generator, eta=self.eta, kernel=self.kernel)
        budget.spend(sample_nfe=sample_nfe(len(batch), num_steps, policy.nfe_per_predict))
        rewards = torch.as_tensor(reward(traj.images, batch), dtype=torch.float32).detach().cpu().reshape(-1)
        budget.spend(reward_calls=len(batch))
        groups = torch.arange(len(prompts)).repeat_interleave(self.samples_per_prompt)
        win, lose = form_pairs(rewards, groups, pairing=self.pairing, min_gap=self.min_gap, ties=self.ties)
        return OnlineRound(traj=traj, rewards=rewards, groups=groups, win=win, lose=lose)


# ----------------------------------------------------------------------------------------------------------
# Offline pairs: a Pick-a-Pic-v2-style dataset on disk
# ----------------------------------------------------------------------------------------------------------

PAIRS_FILES = ("pairs.parquet", "metadata.parquet", "pairs.jsonl", "metadata.jsonl")
"""File names looked for, in order, inside a dataset folder; otherwise every *.parquet below it is read."""


def _read_table(path: Path):
    import pandas as pd

    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".jsonl":
        return pd.read_json(path, lines=True)
    raise ValueError(f"{path}: expected a .parquet or .jsonl file")


def _to_pairs_frame(frame, root: Path):
    """Normalise a table to columns (prompt, image_w, image_l, root).

    Accepted layouts: (prompt | caption, image_w, image_l), or raw Pick-a-Pic v2 (caption, jpg_0, jpg_1,
    label_0): ties (label_0 not in {0, 1}) are dropped and each pair reordered so the winner comes first
    (label_0 == 1 means image 0 won), as in the official Diffusion-DPO script (spec §2.3).
    """
    import pandas as pd

    cols = set(frame.columns)
    prompt_col = "prompt" if "prompt" in cols else "caption" if "caption" in cols else None
    if prompt_col is None:
        raise ValueError(f"preference table has no 'prompt' or 'caption' column; columns: {sorted(cols)}")
    if {"image_w", "image_l"} <= cols:
        winners, losers = frame["image_w"], frame["image_l"]
        prompts = frame[prompt_col]
    elif {"jpg_0", "jpg_1", "label_0"} <= cols:
        keep = frame["label_0"].isin([0, 1])
        frame = frame[keep]
        first_wins = frame["label_0"] == 1
        winners = frame["jpg_0"].where(first_wins, frame["jpg_1"])
        losers = frame["jpg_1"].where(first_wins, frame["jpg_0"])
        prompts = frame[prompt_col]
    else:
        raise ValueError("preference table needs columns (image_w, image_l) or Pick-a-Pic's (jpg_0, jpg_1, "
                         f"label_0); columns: {sorted(cols)}")
    return pd.DataFrame({"prompt": prompts.astype(str).values, "image_w": list(winners), "image_l": list(losers),
                         "root": str(root)})


def load_image(value: Any, root: Path) -> np.ndarray:
    """An image cell -> (H, W, 3) float32 in [0, 1]. Cells may be encoded bytes (PNG/JPEG), a HF datasets
    image dict {"bytes": ..., "path": ...}, or a path (relative to the dataset folder)."""
    from PIL import Image

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, str):
        image = Image.open(root / value if not Path(value).is_absolute() else Path(value))
    else:
        raise ValueError(f"cannot read an image from a cell of type {type(value).__name__}")
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def resize_center_crop(image: np.ndarray, resolution: int) -> np.ndarray:
    """Resize the short side to `resolution` (bicubic) and centre-crop to a square (spec §2.3 preprocessing)."""
    from PIL import Image

    h, w = image.shape[:2]
    if (h, w) == (resolution, resolution):
        return image
    scale = resolution / min(h, w)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    pil = Image.fromarray((image * 255).round().clip(0, 255).astype(np.uint8)).resize(size, Image.BICUBIC)
    arr = np.asarray(pil, dtype=np.float32) / 255.0
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return arr[top : top + resolution, left : left + resolution]


class OfflineDatasetPairs:
    """A preference dataset on disk: rows (prompt, image_w, image_l), winner first.

    `path` is a .parquet/.jsonl file or a folder holding one of PAIRS_FILES (image cells as paths relative to
    the folder, or bytes), else every *.parquet below it (e.g. a local copy of `yuvalkirstain/pickapic_v2`'s
    shards, raw columns accepted). Images are resized + centre-cropped to `resolution`; `random_flip` flips the
    winner and loser of a pair together (a valid augmentation for the toy world and Pick-a-Pic).
    """

    def __init__(self, path: str | Path, *, resolution: int, random_flip: bool = False):
        import pandas as pd

        path = Path(path)
        if path.is_file():
            frames = [_to_pairs_frame(_read_table(path), path.parent)]
        elif path.is_dir():
            named = [path / name for name in PAIRS_FILES if (path / name).is_file()]
            files = named[:1] or sorted(path.rglob("*.parquet"))
            if not files:
                raise FileNotFoundError(f"{path}: no {', '.join(PAIRS_FILES)} and no *.parquet files")
            frames = [_to_pairs_frame(_read_table(f), path) for f in files]
        else:
            raise FileNotFoundError(f"preference dataset {path} does not exist (a .parquet/.jsonl file or a folder; "
                                    "`python -m tasks.toy.preferences OUT` writes a toy one)")
        self.frame = pd.concat(frames, ignore_index=True)
        if len(self.frame) == 0:
            raise ValueError(f"preference dataset {path} has no (non-tie) pairs")
        self.path, self.resolution, self.random_flip = path, resolution, random_flip

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def prompts(self) -> list[str]:
        return self.frame["prompt"].tolist()

    def _image(self, value, root) -> np.ndarray:
        return resize_center_crop(load_image(value, Path(root)), self.resolution)

    def batch(self, indices: Sequence[int], generator: torch.Generator | None = None
              ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """(prompts, images_w, images_l) with images (B, 3, H, W) float32 in [0, 1]."""
        rows = self.frame.iloc[list(indices)]
        win = np.stack([self._image(v, r) for v, r in zip(rows["image_w"], rows["root"])])
        lose = np.stack([self._image(v, r) for v, r in zip(rows["image_l"], rows["root"])])
        images_w = torch.from_numpy(win).permute(0, 3, 1, 2).contiguous()
        images_l = torch.from_numpy(lose).permute(0, 3, 1, 2).contiguous()
        if self.random_flip:
            flip = torch.rand(len(rows), generator=generator) < 0.5
            images_w[flip] = images_w[flip].flip(-1)
            images_l[flip] = images_l[flip].flip(-1)
        return rows["prompt"].tolist(), images_w, images_l

    def prompts_of(self, indices: Sequence[int]) -> list[str]:
        return self.frame["prompt"].iloc[list(indices)].tolist()

    @property
    def source(self) -> str:
        return f"preference dataset {self.path} ({len(self)} pairs)"

    @torch.no_grad()
    def latent_batch(self, indices: Sequence[int], policy, generator: torch.Generator | None = None
                     ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """(prompts, x0_w, x0_l): the pairs' images encoded by the policy's VAE (identity-like on the toy)."""
        prompts, images_w, images_l = self.batch(indices, generator)
        x0 = policy.encode_images(torch.cat([images_w, images_l]).to(policy.device)).float()
        x0_w, x0_l = x0.chunk(2)
        return prompts, x0_w, x0_l

    def targets_for(self, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        """One random winner image of each given prompt (B, 3, H, W) (offline PSO targets)."""
        by_prompt = self.frame.groupby("prompt").indices
        rows = []
        for p in prompts:
            if p not in by_prompt:
                raise KeyError(f"prompt {p!r} is not in the preference dataset {self.path}")
            options = by_prompt[p]
            rows.append(int(options[int(torch.randint(len(options), (1,), generator=generator))]))
        return self.batch(rows, generator)[1]


# ----------------------------------------------------------------------------------------------------------
# A fixed preference set from samples of the initial model, labelled by the reward (offline, no dataset at hand)
# ----------------------------------------------------------------------------------------------------------


class BaseSamplePreferences:
    """An offline preference set built ONCE, before training, from the *initial* model (adapters disabled):
    `per_prompt` deterministic samples of each training prompt at the cell's K steps, scored by the task reward, and
    every ordered within-prompt pair with reward(winner) - reward(loser) > min_gap (`form_pairs`). It stays fixed
    for the whole run, like Pick-a-Pic for Diffusion-DPO: the toy world's stand-in for a human preference dataset
    ("AI feedback" labels, spec dpo-spo-pso.md §2.3). Rows are pairs; `latent_batch` gives their clean latents.

    Cost (spent once, in `build`): len(prompts) * per_prompt * K * nfe_per_predict sampling NFEs and as many reward
    calls as samples. `source` says where the pairs came from; methods log it (`methods.common.log_text`).
    """

    def __init__(self, *, per_prompt: int, num_steps: int, eta: float = 0.0, kernel: str | None = None,
                 min_gap: float = 0.0):
        if per_prompt < 2:
            raise ValueError(f"base-sample preferences need per_prompt >= 2 samples to form pairs; got {per_prompt}")
        self.per_prompt, self.num_steps, self.eta, self.kernel, self.min_gap = per_prompt, num_steps, eta, kernel, min_gap
        self.latents = torch.zeros(0)
        self.rewards = torch.zeros(0)
        self.row_prompts: list[str] = []
        self.win = self.lose = torch.zeros(0, dtype=torch.long)
        self.source = ""

    def cost(self, num_prompts: int, nfe_per_predict: int) -> tuple[int, int]:
        """(sampling NFEs, reward calls) of `build` over `num_prompts` prompts."""
        n = num_prompts * self.per_prompt
        return n * self.num_steps * nfe_per_predict, n

    @torch.no_grad()
    def build(self, policy, prompts: Sequence[str], reward, budget, generator: torch.Generator,
              batch_size: int = 256) -> BaseSamplePreferences:
        from methods import sampling

        prompts = list(dict.fromkeys(prompts))
        nfe, calls = self.cost(len(prompts), policy.nfe_per_predict)
        budget.require(nfe=nfe, reward_calls=calls)
        rows = [p for p in prompts for _ in range(self.per_prompt)]
        latents, rewards = [], []
        with policy.reference():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                traj = sampling.sample(policy, chunk, self.num_steps, generator=generator, eta=self.eta,
                                       kernel=self.kernel, record=False)
                latents.append(traj.final_latents.float().cpu())
                rewards.append(torch.as_tensor(reward(traj.images, chunk), dtype=torch.float32).detach().cpu().reshape(-1))
        budget.spend(sample_nfe=nfe, reward_calls=calls)
        self.latents, self.rewards, self.row_prompts = torch.cat(latents), torch.cat(rewards), rows
        groups = torch.arange(len(prompts)).repeat_interleave(self.per_prompt)
        self.win, self.lose = form_pairs(self.rewards, groups, pairing="all", min_gap=self.min_gap)
        if len(self.win) == 0:
            raise ValueError(f"no preference pairs: every one of the {len(prompts)} prompts' {self.per_prompt} base "
                             "samples tied on the reward; raise per_prompt or use a preference dataset")
        reward_name = getattr(reward, "name", type(reward).__name__)
        self.source = (f"base samples: {self.per_prompt} per prompt x {len(prompts)} training prompts from the initial "
                       f"model (adapters disabled) at K={self.num_steps}, eta={self.eta}, labelled by reward "
                       f"{reward_name!r}; {len(self.win)} ordered pairs with a reward gap > {self.min_gap}")
        return self

    def __len__(self) -> int:
        return int(self.win.numel())

    def prompts_of(self, indices: Sequence[int]) -> list[str]:
        return [self.row_prompts[int(self.win[i])] for i in indices]

    def latent_batch(self, indices: Sequence[int], policy, generator: torch.Generator | None = None
                     ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """(prompts, x0_w, x0_l) of pairs `indices`, latents (B, C, h, w) float32 on the policy's device."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        win, lose = self.win[index], self.lose[index]
        return self.prompts_of(indices), self.latents[win].to(policy.device), self.latents[lose].to(policy.device)

    def summary(self) -> dict[str, Any]:
        """What the set is made of (logged beside `source`)."""
        return {"source": self.source, "pairs": len(self), "samples": len(self.row_prompts),
                "reward_mean": float(self.rewards.mean()), "reward_gap_mean": float(
                    (self.rewards[self.win] - self.rewards[self.lose]).mean()) if len(self) else 0.0}


def offline_pairs(cfg, policy, task, budget, tracker, gen: torch.Generator, name: str):
    """The fixed preference set of an offline run: `cfg.dataset` on disk, else base samples of the initial model
    labelled by the task reward (built now, charged to the budget). Its source goes to the tracker as a JSON artifact
    `<name>/pairs_source.json` and its size as train/offline_pairs."""
    if cfg.dataset:
        data = OfflineDatasetPairs(cfg.dataset, resolution=policy.resolution, random_flip=cfg.random_flip)
        info = {"source": data.source, "pairs": len(data)}
    else:
        data = BaseSamplePreferences(per_prompt=cfg.base_samples_per_prompt, num_steps=task.train_steps,
                                     kernel=getattr(cfg, "kernel", None), min_gap=getattr(cfg, "min_reward_gap", 0.0))
        data.build(policy, task.prompts, task.reward, budget, gen)
        info = data.summary()
    log.info("%s pairs: %s", name, info["source"])
    log_text(tracker, json.dumps(info, indent=1), f"{name}/pairs_source.json")
    tracker.log_metrics({"train/offline_pairs": float(len(data))}, step=budget.total_nfe)
    return data


# ----------------------------------------------------------------------------------------------------------
# Self-sampled references: the initial model's own samples, drawn once per prompt
# ----------------------------------------------------------------------------------------------------------


class SelfSampleReferences:
    """Samples of the *initial* distilled model (adapters disabled), `per_prompt` per prompt, drawn lazily the
    first time a prompt is asked for and then kept for the whole run (PSO offline §4.5: "generated at step 0
    only ... kept fixed"). Lazy drawing keeps a large prompt set affordable; the reference model never changes,
    so drawing later gives the same distribution as drawing everything at step 0.

    Stores the final latents x0 (C, h, w) and the starting noise z of each sample (for the reflow pairing).
    """

    def __init__(self, *, per_prompt: int, num_steps: int, eta: float = 0.0, kernel: str | None = None):
        if per_prompt < 1:
            raise ValueError(f"per_prompt must be >= 1; got {per_prompt}")
        self.per_prompt, self.num_steps, self.eta, self.kernel = per_prompt, num_steps, eta, kernel
        self.latents: dict[str, torch.Tensor] = {}   # prompt -> (per_prompt, C, h, w)
        self.noise: dict[str, torch.Tensor] = {}     # prompt -> (per_prompt, C, h, w)

    def missing_cost(self, prompts: Sequence[str], nfe_per_predict: int) -> int:
        """Sampling NFEs needed to draw references for the not-yet-seen prompts among `prompts`."""
        new = {p for p in prompts if p not in self.latents}
        return len(new) * self.per_prompt * self.num_steps * nfe_per_predict

    @torch.no_grad()
    def draw(self, policy, prompts: Sequence[str], budget, generator: torch.Generator) -> torch.Tensor:
        """One stored reference latent x0 per given prompt, chosen at random among its `per_prompt`: (B, C, h, w)."""
        from methods import sampling

        new = list(dict.fromkeys(p for p in prompts if p not in self.latents))
        if new:
            batch = [p for p in new for _ in range(self.per_prompt)]
            with policy.reference():
                traj = sampling.sample(policy, batch, self.num_steps, generator=generator, eta=self.eta,
                                       kernel=self.kernel)
            budget.spend(sample_nfe=sample_nfe(len(batch), self.num_steps, policy.nfe_per_predict))
            final = traj.latents[:, -1].float().cpu()
            z = own_noise(traj, policy).cpu()
            for i, p in enumerate(new):
                self.latents[p] = final[i * self.per_prompt : (i + 1) * self.per_prompt]
                self.noise[p] = z[i * self.per_prompt : (i + 1) * self.per_prompt]
        choice = torch.randint(self.per_prompt, (len(prompts),), generator=generator).tolist()
        return torch.stack([self.latents[p][j] for p, j in zip(prompts, choice)])


def check_run_length(budget, max_updates: int | None) -> None:
    """Training loops stop when the budget is spent or after `max_updates`; refuse a run that would never stop."""
    if max_updates is None and budget.max_nfe is None and budget.max_reward_calls is None:
        raise ValueError("an unlimited budget (max_nfe=None, max_reward_calls=None) needs max_updates, "
                         "else training never stops")


def describe(config) -> str:
    """One-line JSON of a config (for the log line every train() prints first)."""
    from dataclasses import asdict

    return json.dumps(asdict(config), default=str, sort_keys=True)

