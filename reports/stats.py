"""Confidence intervals for the report: percentile bootstrap over seeds or prompts, paired differences, win rates.

Data layout. One leaderboard row (a method at one training step count K, all its training seeds) scored under
one reward is a ``Block``: ``values`` of shape (n_seeds, n_pairs, n_S), where a *pair* is one evaluation
(prompt_idx, sample_idx), i.e. one prompt with one fixed initial noise, shared by every method. Pairs are
clustered by prompt: samples of the same prompt are not independent draws of the prompt distribution, so
prompt-level resampling moves all of a prompt's samples together.

Intervals (all 95 % percentile bootstrap, ``N_BOOT`` resamples, numpy Generator seeded -> deterministic):
- ``mean_ci``: a row's statistic (reward at S, mean over S, worst S, step gap) with the bootstrap **over
  training seeds** when the row has >= 2 distinct seeds, otherwise **over prompts**; every Estimate says which.
  Seeds whose scores are identical (a method that trains nothing, e.g. ``base``) count once.
- ``paired_diff_ci``: A minus B on the *same* (prompt, noise) pairs. Each resample draws one set of prompts used
  by both A and B (that is the pairing: prompt and noise differences cancel), and A's and B's training seeds
  independently when they have several. With one seed each it is the plain paired bootstrap over prompts.
- ``win_rate``: P(A's image scores higher than B's on the same pair), ties count 1/2, averaged over seed
  combinations and over S ("mean win rate", as HELM's column averages over columns).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
N_BOOT = 2000

Statistic = Callable[[np.ndarray], np.ndarray]
"""Maps per-step means (..., n_S) to one number per leading index (...,); must be vectorised."""


@dataclass(frozen=True)
class Block:
    """Per-image scores of one row under one reward, aligned on shared pairs and step counts."""

    values: np.ndarray  # (n_seeds, n_pairs, n_S); NaN where an image is missing
    prompts: np.ndarray  # (n_pairs,) prompt_idx of each pair: the resampling cluster
    steps: tuple[int, ...]  # the S of the last axis

    def __post_init__(self):
        if self.values.ndim != 3 or self.values.shape[1] != len(self.prompts) or self.values.shape[2] != len(self.steps):
            raise ValueError(f"Block shapes disagree: values {self.values.shape}, {len(self.prompts)} pairs, "
                             f"steps {self.steps}")

    @property
    def n_seeds(self) -> int:
        return self.values.shape[0]

    @property
    def n_prompts(self) -> int:
        return len(np.unique(self.prompts))


@dataclass(frozen=True)
class Estimate:
    value: float
    lo: float
    hi: float
    n: int  # number of resampled units
    unit: str  # "seeds" | "prompts" | "prompts (paired)" | ...

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


# ----------------------------------------------------------------------------------------------- statistics


def at_step(steps: tuple[int, ...], s: int) -> Statistic:
    i = steps.index(s)
    return lambda mu: mu[..., i]


def mean_over_steps(steps: tuple[int, ...], subset: tuple[int, ...] | None = None) -> Statistic:
    idx = [steps.index(s) for s in (subset if subset is not None else steps)]
    return lambda mu: mu[..., idx].mean(axis=-1)


def worst_step(mu: np.ndarray) -> np.ndarray:
    return mu.min(axis=-1)


def step_gap(steps: tuple[int, ...], train_steps: int) -> Statistic:
    """Reward at the training step count K minus the mean reward over the other evaluated step counts."""
    k = steps.index(train_steps)
    others = [i for i in range(len(steps)) if i != k]
    return lambda mu: mu[..., k] - mu[..., others].mean(axis=-1)


# ----------------------------------------------------------------------------------------------- core


def _distinct_seeds(values: np.ndarray) -> np.ndarray:
    """Drop seeds whose scores repeat another seed's exactly (a deterministic, untrained row)."""
    keep, seen = [], []
    for i, row in enumerate(values):
        if not any(np.array_equal(row, other, equal_nan=True) for other in seen):
            keep.append(i)
            seen.append(row)
    return values[keep]


def _cluster_sums(values: np.ndarray, valid: np.ndarray, prompts: np.ndarray):
    """Per-(seed, prompt, S) sums over valid pairs and per-(prompt, S) counts.

    values (n_seeds, n_pairs, n_S), valid (n_pairs, n_S) -> sums (n_seeds, n_prompts, n_S), counts (n_prompts, n_S).
    """
    _, codes = np.unique(prompts, return_inverse=True)
    n_clusters = codes.max() + 1 if len(codes) else 0
    onehot = np.zeros((len(codes), n_clusters))
    onehot[np.arange(len(codes)), codes] = 1.0
    filled = np.where(valid[None], values, 0.0)
    sums = np.einsum("ipS,pc->icS", filled, onehot)
    counts = np.einsum("pS,pc->cS", valid.astype(float), onehot)
    return sums, counts


def _step_means(sums, counts, seed_idx, prompt_idx) -> np.ndarray:
    """Per-step means for resampled seeds (B, n_seeds') and prompts (B, n_prompts') -> (B, n_S).

    Mean over the resampled seeds of the count-weighted mean over the resampled prompts."""
    picked = sums[seed_idx[:, :, None], prompt_idx[:, None, :]]  # (B, n_seeds', n_prompts', n_S)
    weight = counts[prompt_idx].sum(axis=1)  # (B, n_S)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (picked.sum(axis=2) / weight[:, None, :]).mean(axis=1)


def _identity(n: int) -> np.ndarray:
    return np.arange(n)[None, :]


def _resample(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    return rng.integers(0, n, size=(n_boot, n))


def _interval(point: float, boot: np.ndarray, n: int, unit: str, level: float) -> Estimate:
    boot = boot[np.isfinite(boot)]
    if n < 2 or boot.size == 0:
        return Estimate(float(point), float("nan"), float("nan"), n, unit)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return Estimate(float(point), float(lo), float(hi), n, unit)


# ----------------------------------------------------------------------------------------------- public


@dataclass(frozen=True)
class Resampled:
    """Per-step means of a row at the point estimate and under every bootstrap resample; any statistic of them
    gets its CI from the same resamples (so mean over S, worst S and gap are jointly consistent)."""

    point: np.ndarray  # (n_S,)
    boot: np.ndarray  # (n_boot, n_S)
    n: int
    unit: str

    def estimate(self, statistic: Statistic, level: float = LEVEL) -> Estimate:
        return _interval(statistic(self.point[None])[0], statistic(self.boot), self.n, self.unit, level)


@dataclass(frozen=True)
class PairedResampled:
    """A's and B's per-step means under shared prompt resamples; statistics are differences A - B."""

    a: Resampled
    b: Resampled

    def estimate(self, statistic: Statistic, level: float = LEVEL) -> Estimate:
        point = statistic(self.a.point[None])[0] - statistic(self.b.point[None])[0]
        return _interval(point, statistic(self.a.boot) - statistic(self.b.boot), self.a.n, self.a.unit, level)


def resample(block: Block, *, n_boot: int = N_BOOT, seed: int = 0) -> Resampled:
    """Bootstrap a row over its training seeds (>= 2 distinct seeds) or else over prompts."""
    values = _distinct_seeds(block.values)
    sums, counts = _cluster_sums(values, np.isfinite(values).all(axis=0), block.prompts)
    n_seeds, n_prompts = sums.shape[0], sums.shape[1]
    point = _step_means(sums, counts, _identity(n_seeds), _identity(n_prompts))[0]
    rng = np.random.default_rng(seed)
    if n_seeds >= 2:
        boot = _step_means(sums, counts, _resample(rng, n_seeds, n_boot), _identity(n_prompts))
        return Resampled(point, boot, n_seeds, "seeds")
    boot = _step_means(sums, counts, _identity(1), _resample(rng, n_prompts, n_boot))
    return Resampled(point, boot, n_prompts, "prompts")


def resample_paired(a: Block, b: Block, *, n_boot: int = N_BOOT, seed: int = 0) -> PairedResampled:
    """Bootstrap A and B on the same resampled prompts (the pairing); their seeds independently."""
    if a.steps != b.steps or not np.array_equal(a.prompts, b.prompts):
        raise ValueError("paired comparisons need blocks aligned on the same pairs and steps (frame.blocks does this)")
    va, vb = _distinct_seeds(a.values), _distinct_seeds(b.values)
    valid = np.isfinite(va).all(axis=0) & np.isfinite(vb).all(axis=0)
    sums_a, counts = _cluster_sums(va, valid, a.prompts)
    sums_b, _ = _cluster_sums(vb, valid, b.prompts)
    n_prompts = counts.shape[0]
    rng = np.random.default_rng(seed)
    prompt_idx = _resample(rng, n_prompts, n_boot)
    unit = "prompts, paired" + (" (+ seeds)" if max(len(sums_a), len(sums_b)) >= 2 else "")
    out = []
    for sums in (sums_a, sums_b):
        n = len(sums)
        seed_idx = _resample(rng, n, n_boot) if n >= 2 else _identity(1)
        out.append(Resampled(_step_means(sums, counts, _identity(n), _identity(n_prompts))[0],
                             _step_means(sums, counts, seed_idx, prompt_idx), n_prompts, unit))
    return PairedResampled(*out)


def mean_ci(block: Block, statistic: Statistic, *, n_boot: int = N_BOOT, seed: int = 0,
            level: float = LEVEL) -> Estimate:
    """A row's statistic with its bootstrap CI over seeds (>= 2 distinct seeds) or else over prompts."""
    return resample(block, n_boot=n_boot, seed=seed).estimate(statistic, level)


def paired_diff_ci(a: Block, b: Block, statistic: Statistic, *, n_boot: int = N_BOOT, seed: int = 0,
                   level: float = LEVEL) -> Estimate:
    """statistic(A) - statistic(B) on shared (prompt, noise) pairs; prompts resampled jointly, seeds independently."""
    return resample_paired(a, b, n_boot=n_boot, seed=seed).estimate(statistic, level)


def win_rate(a: Block, b: Block, steps: tuple[int, ...] | None = None) -> float:
    """Mean over S of P(A > B) on the same pair (ties 1/2), over all (seed of A, seed of B) combinations."""
    va, vb = _distinct_seeds(a.values), _distinct_seeds(b.values)
    valid = np.isfinite(va).all(axis=0) & np.isfinite(vb).all(axis=0)  # (n_pairs, n_S)
    cols = [a.steps.index(s) for s in (steps if steps is not None else a.steps)]
    rates = []
    for c in cols:
        mask = valid[:, c]
        if not mask.any():
            continue
        x = va[:, mask, c][:, None, :]  # (na, 1, n)
        y = vb[:, mask, c][None, :, :]  # (1, nb, n)
        rates.append(float(((x > y) + 0.5 * (x == y)).mean()))
    return float(np.mean(rates)) if rates else float("nan")
