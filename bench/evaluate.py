"""The step-generalization evaluation protocol (design.md, "Evaluation protocol").

For every evaluation split (``eval.splits``: ``val`` and/or ``test``, the prompt set's held-out lists) and every
evaluation step count S: sample n images on that split's prompts from FIXED initial noise, through the method's own
``generate`` (inference scaling searches there and reports its extra NFEs), and score every image with the training
reward and every other configured reward (to expose reward hacking).

Pairing: sample i of a split uses prompt ``prompts[i % len(prompts)]`` and initial noise drawn from a generator
seeded by (the split's noise seed, i) alone, so every method, every training seed and every step count sees the
same (prompt, x_T) pairs; the noise depends on the model only through the latent shape. Differences between methods
are paired. Validation and test use different noise seeds (``eval.val_seed`` and ``eval.seed``) as well as
disjoint prompts: anything tuned on validation has seen neither the test prompts nor the test noise.

Who reads what: tuning and selection (sweeps, preset probes) read ``eval/val/...`` only; leaderboards, claims and
the README read ``eval/test/...`` only. A cell with ``eval.splits=[val]`` computes no test number at all.

Outputs: a tidy per-image scores frame (one row per split x sample x S x reward), mean / std (ddof=1) / n per
(split, reward, S) as MLflow metrics ``eval/<split>/<reward>/s<S>/mean|std|n`` plus ``eval/<split>/<reward>/mean``
with step = S (so MLflow's own chart plots reward against step count), the first images of each S as arrays
(``eval/<split>/samples_s<S>.npz``) and a PNG grid, and the NFEs, reward calls and seconds spent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bench import tracking

SCORE_COLUMNS = ["split", "prompt", "prompt_idx", "sample_idx", "S", "reward", "value"]


def sample_seed(eval_seed: int, index: int) -> int:
    """A 63-bit seed that depends on (eval_seed, index) only (SeedSequence mixing: no collisions in practice)."""
    state = np.random.SeedSequence([int(eval_seed), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def initial_noise(eval_seed: int, indices: range | list[int], latent_shape: tuple[int, ...]) -> torch.Tensor:
    """Standard-normal x_T for the given sample indices: (len(indices), *latent_shape), float32, on the CPU."""
    noise = torch.empty((len(indices), *latent_shape), dtype=torch.float32)
    for row, index in enumerate(indices):
        gen = torch.Generator().manual_seed(sample_seed(eval_seed, index))
        noise[row] = torch.randn(latent_shape, generator=gen, dtype=torch.float32)
    return noise


def prompt_index(sample_idx: int, num_prompts: int) -> int:
    """Samples cycle through the prompts: balanced when n is a multiple of the number of prompts."""
    return sample_idx % num_prompts


@dataclass
class EvalResult:
    split: str
    """The evaluation split these samples came from (val, test, ...)."""
    scores: pd.DataFrame
    """One row per (sample, S, reward): split, prompt, prompt_idx, sample_idx, S, reward, value."""
    images: dict[int, torch.Tensor] = field(default_factory=dict)
    """S -> the first `grid_images` images (k, 3, H, W) in [0, 1] on the CPU."""
    nfe: dict[int, int] = field(default_factory=dict)
    """S -> denoiser NFEs spent generating (plain sampling + any search)."""
    extra_nfe: dict[int, int] = field(default_factory=dict)
    """S -> NFEs beyond one plain sample per image (inference-time search); 0 for ordinary methods."""
    reward_calls: dict[int, int] = field(default_factory=dict)
    """S -> images scored inside generate (search verifiers), not counting the evaluation scoring itself."""
    score_calls: int = 0
    """Images scored by the evaluation rewards (n x |S| x |rewards|)."""
    seconds: dict[int, float] = field(default_factory=dict)
    """S -> wall seconds (generation + scoring)."""


def evaluate(method: Any, policy: Any, prompts: list[str], steps: list[int], rewards: dict[str, Any], *,
             split: str, n: int, eval_seed: int, batch_size: int, grid_images: int = 0,
             progress: Callable[[int, str], Any] | None = None) -> EvalResult:
    """Run the protocol for one trained policy on one split's `prompts` with that split's noise seed; see the
    module docstring.

    `method.generate(policy, prompts, S, noise=x_T, budget=b)` returns (images, extra_nfe) and spends its NFEs
    and verifier calls on `b`; `rewards` maps a reward name to a callable reward(images, prompts) -> Tensor[B].
    `progress(total, desc)` is a context manager yielding advance(k) (e.g. Tracker.progress)."""
    from methods.common import Budget

    if not prompts:
        raise ValueError(f"no evaluation prompts in split {split!r}")
    latent_shape = tuple(policy.latent_shape)
    rows: dict[str, list] = {c: [] for c in SCORE_COLUMNS}
    result = EvalResult(split=split, scores=pd.DataFrame())
    total = len(steps) * n
    bar = progress(total, f"eval {split}") if progress is not None else None
    advance = bar.__enter__() if bar is not None else (lambda k=1: None)
    try:
        for num_steps in steps:
            tic = time.perf_counter()
            budget = Budget(None)
            kept: list[torch.Tensor] = []
            extra = 0
            for start in range(0, n, batch_size):
                indices = list(range(start, min(n, start + batch_size)))
                prompt_idx = [prompt_index(i, len(prompts)) for i in indices]
                batch_prompts = [prompts[j] for j in prompt_idx]
                noise = initial_noise(eval_seed, indices, latent_shape)
                with torch.no_grad():
                    images, extra_nfe = method.generate(policy, batch_prompts, num_steps, noise=noise, budget=budget)
                extra += int(extra_nfe)
                images = images.detach().float().clamp(0, 1)
                for name, reward in rewards.items():
                    values = reward(images, batch_prompts).detach().float().cpu().numpy()
                    if values.shape != (len(indices),) or not np.all(np.isfinite(values)):
                        raise FloatingPointError(f"reward {name!r} returned {values.shape} values, non-finite: "
                                                 f"{int((~np.isfinite(values)).sum())} (S={num_steps})")
                    rows["split"] += [split] * len(indices)
                    rows["prompt"] += batch_prompts
                    rows["prompt_idx"] += prompt_idx
                    rows["sample_idx"] += indices
                    rows["S"] += [num_steps] * len(indices)
                    rows["reward"] += [name] * len(indices)
                    rows["value"] += values.tolist()
                    result.score_calls += len(indices)
                room = grid_images - sum(len(k) for k in kept)
                if room > 0:
                    kept.append(images[:room].cpu())
                advance(len(indices))
            result.images[num_steps] = torch.cat(kept) if kept else torch.zeros(0)
            # a method that does not spend on the budget still generated n plain samples
            plain = n * num_steps * int(getattr(policy, "nfe_per_predict", 1))
            result.nfe[num_steps] = max(int(budget.sample_nfe), plain + extra)
            result.extra_nfe[num_steps] = extra
            result.reward_calls[num_steps] = int(budget.reward_calls)
            result.seconds[num_steps] = time.perf_counter() - tic
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    result.scores = pd.DataFrame(rows, columns=SCORE_COLUMNS).astype(
        {"prompt_idx": "int64", "sample_idx": "int64", "S": "int64", "value": "float64"})
    return result


def sample_arrays(result: EvalResult, num_steps: int, prompts: list[str]) -> dict[str, np.ndarray]:
    """The kept images of one S as the arrays a report needs (``eval/<split>/samples_s<S>.npz``): images
    (k, H, W, 3) uint8, prompt (k,) str, prompt_idx (k,) and sample_idx (k,) int64. The kept images are samples
    0..k-1 of the split, so their prompts follow the cycling rule."""
    images = result.images.get(num_steps, torch.zeros(0))
    k = int(images.shape[0]) if images.ndim == 4 else 0
    sample_idx = np.arange(k, dtype=np.int64)
    prompt_idx = np.array([prompt_index(i, len(prompts)) for i in sample_idx], dtype=np.int64)
    pixels = ((images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy() if k
              else np.zeros((0, 0, 0, 3), dtype=np.uint8))
    return {"images": pixels, "prompt": np.array([prompts[j] for j in prompt_idx], dtype=str),
            "prompt_idx": prompt_idx, "sample_idx": sample_idx}


def save_samples(arrays: dict[str, np.ndarray], path: str | Path) -> Path:
    """Write `sample_arrays` to an .npz (no pickled objects: numpy.load(path) reads it with allow_pickle=False)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def summarize(scores: pd.DataFrame) -> pd.DataFrame:
    """mean, std (ddof=1; 0 when n=1) and n per (split, reward, S)."""
    grouped = scores.groupby(["split", "reward", "S"], sort=True)["value"]
    out = grouped.agg(mean="mean", std=lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0, n="count")
    return out.reset_index()


def summary_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """{"eval/<split>/<reward>/s<S>/mean|std|n": value} for MLflow."""
    metrics = {}
    for row in summary.itertuples(index=False):
        for stat in ("mean", "std", "n"):
            metrics[tracking.eval_metric_key(row.split, row.reward, int(row.S), stat)] = float(getattr(row, stat))
    return metrics


def curve_metrics(summary: pd.DataFrame) -> dict[int, dict[str, float]]:
    """S -> {"eval/<split>/<reward>/mean": mean at S}: logged with MLflow step = S, these keys are one line per
    (split, reward) in MLflow's own chart of reward against step count."""
    curves: dict[int, dict[str, float]] = {}
    for row in summary.itertuples(index=False):
        curves.setdefault(int(row.S), {})[tracking.eval_metric_key(row.split, row.reward, None, "mean")] = \
            float(row.mean)
    return curves


def step_generalization(summary: pd.DataFrame, reward: str) -> dict[str, float]:
    """Per-cell summaries of one reward across S, per split: mean over S and worst S (design.md)."""
    out = {}
    for split, rows in summary[summary.reward == reward].groupby("split", sort=True):
        means = rows.set_index("S")["mean"]
        out[tracking.eval_metric_key(split, reward, None, "mean_over_s")] = float(means.mean())
        out[tracking.eval_metric_key(split, reward, None, "worst_s")] = float(means.min())
    return out


def gains_over_base(scores: pd.DataFrame, base_scores: pd.DataFrame) -> dict[str, float]:
    """Paired gain over the base cell per (split, reward, S): mean and standard error of value - base value over
    the same (split, sample) pairs, i.e. the same prompt and initial noise (``gain_over_base``, ``gain_se``).
    A split the base run did not evaluate gets no gain."""
    keys = ["split", "reward", "S", "sample_idx"]
    paired = scores[keys + ["value"]].merge(base_scores[keys + ["value"]], on=keys, suffixes=("", "_base"))
    out = {}
    for (split, reward, num_steps), group in paired.groupby(["split", "reward", "S"]):
        delta = group["value"] - group["value_base"]
        out[tracking.eval_metric_key(split, reward, int(num_steps), "gain_over_base")] = float(delta.mean())
        out[tracking.eval_metric_key(split, reward, int(num_steps), "gain_se")] = \
            float(delta.std(ddof=1) / len(delta) ** 0.5) if len(delta) > 1 else 0.0
    return out


def save_grid(images: torch.Tensor, prompts: list[str], values: list[float], path: str | Path, *,
              title: str = "", reward: str = "", columns: int = 8, scale: int = 3) -> Path:
    """A PNG grid of images (k, 3, H, W) in [0, 1], each tile upscaled `scale`x with its prompt and score below."""
    from PIL import Image, ImageDraw, ImageFont

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    k = int(images.shape[0])
    font = ImageFont.load_default()
    columns = max(1, min(columns, k)) if k else 1
    rows = max(1, -(-k // columns))
    h, w = (int(images.shape[2]) * scale, int(images.shape[3]) * scale) if k else (32 * scale, 32 * scale)
    tile_w = max(w, 96)
    text_h, head = 26, (16 if title else 0)
    canvas = Image.new("RGB", (columns * tile_w, head + rows * (h + text_h)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy() if k else []
    for i in range(k):
        r, c = divmod(i, columns)
        x0, y0 = c * tile_w + (tile_w - w) // 2, head + r * (h + text_h)
        tile = Image.fromarray(pixels[i]).resize((w, h), Image.NEAREST)
        canvas.paste(tile, (x0, y0))
        label = prompts[i] if len(prompts[i]) <= 18 else prompts[i][:17] + "~"
        draw.text((c * tile_w + 2, y0 + h + 1), label, fill="black", font=font)
        draw.text((c * tile_w + 2, y0 + h + 13), f"{reward} {values[i]:.3f}".strip(), fill="darkblue", font=font)
    canvas.save(path)
    return path


def save_training_curve(history: list[tuple[int, dict[str, float]]], path: str | Path, title: str = "",
                        max_panels: int = 6) -> Path | None:
    """Plot up to `max_panels` train/* metrics against NFEs consumed; None when nothing was logged."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys: list[str] = []
    for _, metrics in history:
        for key in metrics:
            if key not in keys:
                keys.append(key)
    preferred = [k for k in keys if "reward" in k] + [k for k in keys if "loss" in k]
    keys = list(dict.fromkeys(preferred + keys))[:max_panels]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(s, m[key]) for s, m in history if key in m]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("NFEs consumed", fontsize=8)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
