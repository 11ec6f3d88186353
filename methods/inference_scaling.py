"""Inference-time scaling — search over sampling noise with a verifier; trains nothing.

Ma et al., "Inference-Time Scaling for Diffusion Models beyond Scaling Denoising Steps" (arXiv 2501.09732);
spec: shared/methods/ddpo-sdpo-sharpening-search.md §5. With a deterministic sampler (DDIM eta = 0) the initial
noise fixes the image, so extra NFEs can be spent choosing the noise whose image a verifier V(image, prompt)
scores highest. Three searches:

* "random" (best-of-N): candidates z_0..z_{N-1}, z_0 = the shared evaluation noise, z_n ~ N(0, I); keep the
  argmax of V. N = 1 is exactly the base model's sample. Cost N * S NFEs per image.
* "zero_order": pivot z_0 = the shared noise; each of `zo_rounds` rounds draws `zo_neighbours` neighbours at
  cosine `zo_threshold` from the pivot with the pivot's norm (tt-scale-flux formula, §5.3), moves the pivot to
  the best neighbour if it beats the pivot, otherwise restarts from fresh noise (the fresh pivot is not scored
  itself; its best neighbour replaces it next round, so the cost stays fixed). Returns the best image seen.
  Cost (1 + zo_rounds * zo_neighbours) * S NFEs per image.
* "paths" (S >= 2; the few-step analogue of search over paths, §5.5): for each of N initial noises run the
  deterministic path; at grid step b (`paths_branch_step`, default S // 2) re-noise the clean prediction x0_hat
  made at step b-1 to timestep t_b with `paths_branches - 1` fresh noises (q(x_t | x0_hat)) and finish the
  remaining S - b steps; branch 0 is the deterministic path itself. Keep the best final image.
  Cost N * S + N * (paths_branches - 1) * (S - b) NFEs per image. At S = 1 there is no intermediate level:
  the search degenerates to best-of-(N * paths_branches) over initial noise (a warning says so).

All candidates are scored on final images. Ties go to the lowest candidate index (`select_best`), so the base
sample is kept unless something strictly beats it. `generate` returns extra NFEs = NFEs beyond one plain
sample of the prompts; the whole search cost (incl. that plain sample) and the verifier calls are spent on the
budget when one is given, and `last_info` holds the latest search's numbers for the harness to log.
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from methods import sampling
from methods.common import Budget, Deviation, Task, Tracker, check_choice, check_positive, sample_nfe


@dataclass
class Config:
    """Verifier-guided noise search at evaluation time (no training)."""

    search: str = "random"
    """"random" (best-of-N) | "zero_order" | "paths"."""
    num_candidates: int = 4
    """N: initial noises for "random" and "paths" (the paper sweeps 2..256)."""
    verifier: str | None = None
    """Reward name used as verifier (`tasks.rewards`); None = the cell's training reward."""
    zo_rounds: int = 4
    """Zero-order search rounds (tt-scale-flux `search_rounds`)."""
    zo_neighbours: int = 4
    """Neighbours per zero-order round (tt-scale-flux; the paper used 2 for text-to-image)."""
    zo_threshold: float = 0.95
    """Cosine between a neighbour and its pivot (tt-scale-flux `threshold`)."""
    paths_branch_step: int | None = None
    """Grid index b in [1, S-1] where "paths" re-noises and branches; None = S // 2."""
    paths_branches: int = 2
    """M: branches per initial noise in "paths" (branch 0 = the deterministic continuation)."""
    seed: int = 0
    """Seeds the candidate noises (mixed with a checksum of the shared noise, so batches differ)."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {"toy": dict(search="random", num_candidates=4)}
    non_semantic: ClassVar[tuple[str, ...]] = ()
    # Trains nothing, and its candidate noises come from `seed` above (a method field, part of the cell's
    # identity) and the shared evaluation noise, not from the cell's training seed: one cell per (model, reward,
    # search settings) serves every training seed and K of a grid (bench.grid.invariant_axes).
    invariant_to: ClassVar[tuple[str, ...]] = ("seed", "train_steps", "budget", "prompts")

    def __post_init__(self):
        check_choice("search", self.search, ("random", "zero_order", "paths"))
        check_positive(self, "num_candidates", "zo_rounds", "zo_neighbours", "paths_branches", "paths_branch_step")
        if not 0.0 < self.zo_threshold < 1.0:
            raise ValueError(f"zo_threshold must be in (0, 1); got {self.zo_threshold}")

    @classmethod
    def search_space(cls) -> dict[str, tuple]:
        return {
            "num_candidates": ("categorical", [2, 4, 8, 16]),
            "zo_neighbours": ("categorical", [2, 4]),
            "zo_threshold": ("float", 0.8, 0.99),
        }

    def search_samples(self, num_steps: int) -> float:
        """Samples-equivalent cost per image (NFEs / (S * nfe_per_predict)), for budget matching."""
        if self.search == "random":
            return float(self.num_candidates)
        if self.search == "zero_order":
            return float(1 + self.zo_rounds * self.zo_neighbours)
        if num_steps < 2:
            return float(self.num_candidates * self.paths_branches)
        b = _branch_step(self.paths_branch_step, num_steps)
        return self.num_candidates * (1 + (self.paths_branches - 1) * (num_steps - b) / num_steps)

    def eval_cost(self, num_steps: int) -> tuple[int, int, int]:
        """(denoiser calls, decoded images, verifier calls) per evaluated image at S = num_steps, without CFG (the
        cost bench.plan charges this row): best-of-N N*S; zero-order (1 + rounds*neighbours)*S; paths
        N*S + N*(M-1)*(S-b) with N*M candidates."""
        if self.search == "zero_order":
            candidates = 1 + self.zo_rounds * self.zo_neighbours
        else:
            candidates = self.num_candidates * (self.paths_branches if self.search == "paths" else 1)
        return round(self.search_samples(num_steps) * num_steps), candidates, candidates


# --------------------------------------------------------------------------------------------------------------
# Pure selection functions
# --------------------------------------------------------------------------------------------------------------


def select_best(scores: torch.Tensor) -> torch.Tensor | int:
    """Index of the highest score along the last dim; ties go to the LOWEST index (so candidate 0, the base
    sample, wins ties). 1-D input -> int; (..., N) -> LongTensor (...). NaN scores raise ValueError."""
    scores = torch.as_tensor(scores)
    if scores.numel() == 0 or scores.shape[-1] == 0:
        raise ValueError("select_best needs at least one candidate")
    if torch.isnan(scores).any():
        raise ValueError("verifier returned NaN scores")
    best = scores.max(dim=-1, keepdim=True).values
    # First index attaining the max (explicit rather than relying on argmax's tie behaviour).
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)
    first = torch.where(scores == best, positions, scores.shape[-1]).min(dim=-1).values
    return int(first) if scores.dim() == 1 else first


def zo_neighbours(z: torch.Tensor, n: int, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """n neighbours of z at cosine tau with the same norm (tt-scale-flux's formula, spec §5.3):

        u = z / ||z||,  v ~ N(0, I),  w = (v - <v, u> u) / ||v - <v, u> u||,
        neighbour = ||z|| (tau u + sqrt(1 - tau^2) w)

    so <neighbour, z> / ||z||^2 = tau and ||neighbour|| = ||z|| exactly (up to rounding). Norms are over all
    elements of z. Returns (n, *z.shape); v is drawn on CPU from `generator` (device-independent).
    """
    flat = z.reshape(-1).to(torch.float64)
    norm = flat.norm()
    u = flat / norm
    v = torch.randn(n, flat.numel(), generator=generator, dtype=torch.float64).to(flat.device)
    v = v - (v @ u)[:, None] * u[None, :]
    w = v / v.norm(dim=1, keepdim=True)
    neighbours = norm * (tau * u[None, :] + math.sqrt(1.0 - tau * tau) * w)
    return neighbours.to(z.dtype).reshape(n, *z.shape)


def keep_better(best_scores: torch.Tensor, best_images: torch.Tensor, scores: torch.Tensor,
                images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image, keep the incumbent unless the new candidate is strictly better (select_best's tie rule).
    Returns (scores, images, took_new (B,) bool)."""
    took_new = select_best(torch.stack([best_scores, scores], dim=-1)) == 1
    images = torch.where(took_new.to(images.device).view(-1, *[1] * (images.dim() - 1)), images, best_images)
    return torch.where(took_new, scores, best_scores), images, took_new


def renoise(kernel: str, scheduler, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
    """A sample of q(x_t | x0) in the kernel's latent parameterisation (see methods.sampling):
    DDIM / LCM: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise;  Euler: x0 + sigma_t noise, sigma_t = sqrt((1 - abar_t) / abar_t).
    """
    if kernel == sampling.FLOW:  # (1 - s) x0 + s noise
        return sampling.add_noise(kernel, scheduler, x0, t, noise).to(x0.dtype)
    abar = scheduler.alphas_cumprod[int(t)].double()
    if kernel == "euler_ancestral":
        return (x0.double() + ((1 - abar) / abar).sqrt() * noise.double()).to(x0.dtype)
    return (abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()).to(x0.dtype)


def _branch_step(branch_step: int | None, num_steps: int) -> int:
    b = num_steps // 2 if branch_step is None else branch_step
    if not 1 <= b <= num_steps - 1:
        raise ValueError(f"paths_branch_step must be in [1, {num_steps - 1}] at S={num_steps}; got {b}")
    return b


# --------------------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------------------


class InferenceScalingMethod:
    """Trains nothing; `generate` searches initial noises (or paths) against the verifier."""

    name: ClassVar[str] = "inference_scaling"
    label: ClassVar[str] = "Inference scaling"
    trains: ClassVar[bool] = False
    Config = Config
    paper: ClassVar[str] = "Ma et al., Inference-Time Scaling for Diffusion Models beyond Scaling Denoising Steps, arXiv 2501.09732"
    deviations: ClassVar[tuple[Deviation, ...]] = (
        Deviation("toy recipe: best-of-4 with the training reward as the verifier (paper: up to 256 candidates, "
                  "several verifiers)", "a compute level comparable to the trained rows' evaluation",
                  "methods/inference_scaling.py Config.presets['toy']"),
        Deviation("the verifier is the exact toy verifier, an oracle (paper: learned verifiers)", "the toy world's "
                  "only rewards are its verifiers: the row is an upper bound, not a like-for-like method",
                  "methods/inference_scaling.py Config.verifier"),
    )

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else Config()
        self.verifier = None
        self.last_info: dict[str, float] = {}
        self._device = "cpu"

    def set_verifier(self, reward) -> None:
        """The loaded reward object to search against (the harness loads `config.verifier` and passes it here)."""
        self.verifier = reward

    def train(self, policy, task: Task, budget: Budget, tracker: Tracker) -> None:
        # Nothing to train. Without an explicit verifier the cell's training reward is the verifier.
        self._device = task.device
        if self.verifier is None and self.config.verifier in (None, getattr(task.reward, "name", None)):
            self.verifier = task.reward

    def _resolve_verifier(self, verifier):
        if verifier is not None:
            return verifier
        if self.verifier is None:
            if self.config.verifier is None:
                raise ValueError("inference_scaling has no verifier: call train(...) with the task, set_verifier("
                                 "reward), pass verifier=..., or set config.verifier to a reward name")
            from tasks import rewards

            self.verifier = rewards.load(self.config.verifier).to(self._device)
        return self.verifier

    def generate(self, policy, prompts: list[str], num_steps: int, *, noise: torch.Tensor,
                 budget: Budget | None = None, verifier=None) -> tuple[torch.Tensor, int]:
        cfg = self.config
        verify = self._resolve_verifier(verifier)
        prompts = list(prompts)
        gen = torch.Generator().manual_seed(_noise_seed(noise, cfg.seed))
        with torch.no_grad():
            if cfg.search == "random":
                images, samples, calls, info = self._random(policy, prompts, num_steps, noise, verify, gen,
                                                            cfg.num_candidates)
            elif cfg.search == "zero_order":
                images, samples, calls, info = self._zero_order(policy, prompts, num_steps, noise, verify, gen)
            elif num_steps < 2:
                warnings.warn("inference_scaling search='paths' is degenerate at S=1 (no intermediate noise "
                              "level): using best-of-(num_candidates x paths_branches) over initial noise",
                              stacklevel=2)
                images, samples, calls, info = self._random(policy, prompts, num_steps, noise, verify, gen,
                                                            cfg.num_candidates * cfg.paths_branches)
            else:
                images, samples, calls, info = self._paths(policy, prompts, num_steps, noise, verify, gen)
        npp = int(policy.nfe_per_predict)
        # `samples` counts denoiser calls per image (step units); one plain sample costs num_steps of them.
        total_nfe = len(prompts) * samples * npp
        extra_nfe = total_nfe - sample_nfe(len(prompts), num_steps, npp)
        if budget is not None:
            budget.spend(sample_nfe=total_nfe, reward_calls=calls)
        self.last_info = {"search_nfe": float(total_nfe), "extra_nfe": float(extra_nfe),
                          "verifier_calls": float(calls), **info}
        return images, int(extra_nfe)

    # -- searches; each returns (images, denoiser calls per image, verifier calls, info) -------------------
    def _candidate_noise(self, noise: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(noise.shape, generator=gen, dtype=torch.float32).to(device=noise.device, dtype=noise.dtype)

    def _sample(self, policy, prompts, num_steps, z, *, record=False):
        return sampling.sample(policy, prompts, num_steps, noise=z, eta=0.0, record=record)

    def _score(self, verify, images, prompts) -> torch.Tensor:
        return torch.as_tensor(verify(images, prompts)).detach().float().cpu().reshape(-1)

    def _random(self, policy, prompts, num_steps, noise, verify, gen, num_candidates):
        best_images = self._sample(policy, prompts, num_steps, noise).images
        best_scores = self._score(verify, best_images, prompts)
        base_scores = best_scores
        for _ in range(1, num_candidates):
            images = self._sample(policy, prompts, num_steps, self._candidate_noise(noise, gen)).images
            best_scores, best_images, _ = keep_better(best_scores, best_images,
                                                      self._score(verify, images, prompts), images)
        info = {"base_score": float(base_scores.mean()), "chosen_score": float(best_scores.mean())}
        return best_images, num_candidates * num_steps, num_candidates * len(prompts), info

    def _zero_order(self, policy, prompts, num_steps, noise, verify, gen):
        cfg = self.config
        pivot = noise.clone()
        best_images = self._sample(policy, prompts, num_steps, pivot).images
        base_scores = self._score(verify, best_images, prompts)
        best_scores, pivot_scores = base_scores.clone(), base_scores.clone()
        restarts = 0
        for _ in range(cfg.zo_rounds):
            neighbours = torch.stack([zo_neighbours(pivot[i].cpu(), cfg.zo_neighbours, cfg.zo_threshold, gen)
                                      for i in range(len(prompts))], dim=1).to(noise.device)  # (n, B, C, h, w)
            scores = []
            for j in range(cfg.zo_neighbours):
                images = self._sample(policy, prompts, num_steps, neighbours[j]).images
                scores.append(self._score(verify, images, prompts))
                best_scores, best_images, _ = keep_better(best_scores, best_images, scores[-1], images)
            scores = torch.stack(scores, dim=1)  # (B, n)
            pick = select_best(scores)
            moved = scores.gather(1, pick[:, None]).squeeze(1) > pivot_scores
            for i in range(len(prompts)):
                if moved[i]:
                    pivot[i] = neighbours[pick[i], i]
                    pivot_scores[i] = scores[i, pick[i]]
                else:  # restart from fresh noise; unscored, so its best neighbour replaces it next round
                    pivot[i] = torch.randn(pivot[i].shape, generator=gen).to(pivot)
                    pivot_scores[i] = -math.inf
                    restarts += 1
        samples = 1 + cfg.zo_rounds * cfg.zo_neighbours
        info = {"base_score": float(base_scores.mean()), "chosen_score": float(best_scores.mean()),
                "restarts": float(restarts)}
        return best_images, samples * num_steps, samples * len(prompts), info

    def _paths(self, policy, prompts, num_steps, noise, verify, gen):
        cfg = self.config
        b = _branch_step(cfg.paths_branch_step, num_steps)
        best_images = best_scores = base_scores = None
        for n in range(cfg.num_candidates):
            z = noise if n == 0 else self._candidate_noise(noise, gen)
            traj = self._sample(policy, prompts, num_steps, z, record=True)
            scores = self._score(verify, traj.images, prompts)
            if best_images is None:
                best_images, best_scores, base_scores = traj.images, scores, scores
            else:
                best_scores, best_images, _ = keep_better(best_scores, best_images, scores, traj.images)
            x0_pred = traj.x0_preds[:, b - 1]  # the clean prediction made at step b-1, (B, C, h, w)
            for _ in range(1, cfg.paths_branches):
                t_b = traj.timesteps[b] if traj.kernel == sampling.FLOW else int(traj.timesteps[b])
                x_t = renoise(traj.kernel, policy.scheduler_for(traj.kernel), x0_pred, t_b,
                              self._candidate_noise(x0_pred, gen))
                images = sampling.continue_from(policy, x_t, b, num_steps, cond=traj.cond, kernel=traj.kernel,
                                                eta=0.0, record=False).images
                best_scores, best_images, _ = keep_better(best_scores, best_images,
                                                          self._score(verify, images, prompts), images)
        samples = cfg.num_candidates * num_steps + cfg.num_candidates * (cfg.paths_branches - 1) * (num_steps - b)
        calls = cfg.num_candidates * cfg.paths_branches * len(prompts)
        info = {"base_score": float(base_scores.mean()), "chosen_score": float(best_scores.mean())}
        return best_images, samples, calls, info


def _noise_seed(noise: torch.Tensor, seed: int) -> int:
    """A seed that is a pure function of (the shared noise, config.seed): reproducible across runs, and different
    for each evaluation batch so candidate noises are not shared between batches."""
    checksum = zlib.crc32(noise.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return (checksum + 1_000_003 * int(seed)) % (2**63 - 1)


