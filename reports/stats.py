"""Intervals and verdicts for the report: a hierarchical bootstrap over training seeds, prompts and noises.

Data layout. One leaderboard row (a method at one training step count K, all its training seeds) scored under
one reward on one split is a ``Block``: ``values`` of shape (n_seeds, n_pairs, n_S), where a *pair* is one
evaluation (prompt_idx, sample_idx), i.e. one prompt with one fixed initial noise, shared by every method.

Where the variance comes from. A trained row's number varies with (1) its training seed (and, for on-policy RL,
the machine's float rounding, which acts like another seed), (2) which prompts the test split happens to hold,
(3) which initial noises each prompt is sampled from. Seeds and prompts are *crossed* (every seed is evaluated on
the same prompts and noises) and noises are nested in prompts. An interval from the per-sample spread alone (the
old ``SE = sd / sqrt(n)``) covers only (3) and under-covers; tests/test_stats.py measures by how much.

The bootstrap. Three levels are resampled, each with replacement:
- each row's training seeds (rows whose seeds gave identical scores, e.g. ``base``, count once: they do not depend
  on the seed, and pair with every seed of the row they are compared with);
- prompts, one draw shared by every seed and every row compared on them (the pairing: a paired gain A - B is
  computed on the same resampled prompts and noises, so shared prompt and noise effects cancel);
- noises within each drawn prompt (each copy of a prompt gets its own draw).
Statistics are functions of a row's per-step means (reward at S, mean over S, worst S, gain at S != K minus gain
at S = K, ...), evaluated on every resample, so summaries and per-S numbers come from the same draws.

The interval. With the 3-5 seeds a grid can afford, a percentile interval of the bootstrap distribution is too
narrow: the bootstrap spread of a mean of n seeds is (n - 1)/n of the truth, and its normal-like quantiles ignore
that the spread itself was estimated from n values (the t distribution's 4.30 instead of 1.96 at n = 3; in
tests/test_stats.py's seed-dominated simulation a percentile interval covered 88 %, this one 95 %). So the seed
level and the prompt-and-noise level are each bootstrapped with the other held fixed, which gives each level's
share of the variance (v_level = n/(n-1) * bootstrap variance); the interval is ``value +- t(df) * sqrt(V)``,
V = sum of v_level, with Welch-Satterthwaite degrees of freedom ``df = V^2 / sum(v_level^2 / (n_level - 1))``.
With many prompts and a dominant prompt level this is the usual ~1.96 SE interval; with few seeds and a dominant
seed level it is the t interval over seeds. Both levels include the seed x prompt interaction and the image noise,
so these are counted twice: conservative (99 % coverage in the simulation when seeds do not matter at all), as a
crossed design's bootstrap is. The p-value is the same t's.

Verdicts. ``holm`` adjusts a family's p-values (Holm 1979: step-down Bonferroni, controls the family-wise error
rate); a comparison is ``better`` / ``worse`` when its adjusted p-value is below ``ALPHA`` and its value is
positive / negative, else ``inconclusive``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05  # family-wise error rate of the verdicts
LEVEL = 0.95  # of the intervals shown
N_BOOT = 2000

Statistic = Callable[[np.ndarray], np.ndarray]
"""Maps per-step means (..., n_S) to one number per leading index (...,); must be vectorised."""


@dataclass(frozen=True)
class Block:
    """Per-image scores of one row under one reward, aligned on shared pairs and step counts."""

    values: np.ndarray  # (n_seeds, n_pairs, n_S); NaN where an image is missing
    prompts: np.ndarray  # (n_pairs,) prompt_idx of each pair: the cluster its noises are nested in
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
    n: int  # training seeds behind the value (distinct ones; 1 for a row that does not depend on its seed)
    unit: str  # what the interval resamples, e.g. "3 seeds × 48 prompts × noises"
    se: float = math.nan
    df: float = math.nan
    p: float = math.nan  # two-sided p-value of "value = 0" (uncorrected)

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


# ----------------------------------------------------------------------------------------------- statistics


def at_step(steps: tuple[int, ...], s: int) -> Statistic:
    i = steps.index(s)
    return lambda mu: mu[..., i]


def mean_over_steps(steps: tuple[int, ...], subset: Sequence[int] | None = None) -> Statistic:
    idx = [steps.index(s) for s in (subset if subset is not None else steps)]
    return lambda mu: mu[..., idx].mean(axis=-1)


def worst_step(mu: np.ndarray) -> np.ndarray:
    return mu.min(axis=-1)


def step_gap(steps: tuple[int, ...], train_steps: int) -> Statistic:
    """Reward at the training step count K minus the mean reward over the other evaluated step counts."""
    k = steps.index(train_steps)
    others = [i for i in range(len(steps)) if i != k]
    return lambda mu: mu[..., k] - mu[..., others].mean(axis=-1)


def off_k_minus_at_k(steps: tuple[int, ...], train_steps: int, off: Sequence[int] | None = None) -> Statistic:
    """Mean over the step counts ``off`` (default: every S != K) minus the value at S = K; applied to a paired
    difference it is "gain at S != K minus gain at S = K" (0: the gain generalises across step counts)."""
    k = steps.index(train_steps)
    idx = [steps.index(s) for s in (off if off is not None else [s for s in steps if s != train_steps])]
    return lambda mu: mu[..., idx].mean(axis=-1) - mu[..., k]


# ----------------------------------------------------------------------------------------------- resampling


def distinct_seeds(values: np.ndarray) -> np.ndarray:
    """Drop seeds whose scores repeat another seed's exactly (a row that does not depend on its seed)."""
    keep, seen = [], []
    for i, row in enumerate(values):
        if not any(np.array_equal(row, other, equal_nan=True) for other in seen):
            keep.append(i)
            seen.append(row)
    return values[keep]


def draw_seeds(rng: np.random.Generator, n_seeds: int, n_boot: int) -> np.ndarray:
    """(n_boot, n_seeds) how often each seed is drawn in each resample."""
    return rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n_boot).astype(float)


def draw_pairs(rng: np.random.Generator, prompts: np.ndarray, n_boot: int) -> np.ndarray:
    """(n_boot, n_pairs) how often each (prompt, noise) pair is drawn: prompts with replacement, then for each
    drawn copy of a prompt its noises with replacement (as many as the prompt has)."""
    _, codes = np.unique(prompts, return_inverse=True)
    n_pairs = len(codes)
    sizes = np.bincount(codes)
    order = np.argsort(codes, kind="stable")  # pair indices grouped by prompt
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    picked = rng.integers(0, len(sizes), size=(n_boot, len(sizes)))  # (B, n_prompts) drawn prompts
    width = int(sizes.max())
    slot = np.floor(rng.random((n_boot, len(sizes), width)) * sizes[picked][..., None]).astype(np.int64)
    used = np.arange(width)[None, None, :] < sizes[picked][..., None]  # a copy draws as many noises as it has
    pair = order[starts[picked][..., None] + np.minimum(slot, sizes[picked][..., None] - 1)]
    flat = (np.arange(n_boot)[:, None, None] * n_pairs + pair)[used]
    return np.bincount(flat, minlength=n_boot * n_pairs).reshape(n_boot, n_pairs).astype(float)


def step_means(values: np.ndarray, valid: np.ndarray, seed_w: np.ndarray, pair_w: np.ndarray) -> np.ndarray:
    """Per-step means (B, n_S) for seed weights (B|1, n_seeds) and pair weights (B|1, n_pairs): the seed-weighted
    mean of each seed's pair-weighted mean. values (n_seeds, n_pairs, n_S), valid (n_pairs, n_S)."""
    n_seeds, n_pairs, n_steps = values.shape
    filled = np.where(valid[None], values, 0.0).transpose(1, 0, 2).reshape(n_pairs, n_seeds * n_steps)
    sums = (pair_w @ filled).reshape(len(pair_w), n_seeds, n_steps)  # (B, n_seeds, n_S)
    counts = pair_w @ valid.astype(float)  # (B, n_S)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_seed = sums / counts[:, None, :]
        return np.einsum("bs,bsS->bS", seed_w, per_seed) / seed_w.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Resampled:
    """A row's per-step means at the point estimate and under the bootstrap of each level with the other fixed:
    training seeds (prompts and noises fixed) and prompts with their noises (seeds fixed)."""

    point: np.ndarray  # (n_S,)
    seeds: np.ndarray  # (n_boot, n_S)
    pairs: np.ndarray  # (n_boot, n_S)
    n_seeds: int
    n_prompts: int

    def estimate(self, statistic: Statistic, level: float = LEVEL) -> Estimate:
        f = statistic
        value = float(f(self.point[None])[0])
        parts = [(f(self.seeds), self.n_seeds), (f(self.pairs), self.n_prompts)]
        return interval(value, parts, self.n_seeds, unit([self.n_seeds], self.n_prompts), level)


@dataclass(frozen=True)
class PairedResampled:
    """Rows A and B on the same resampled prompts and noises (their seeds drawn independently); statistics are
    differences f(A) - f(B)."""

    a: Resampled
    b: Resampled

    def estimate(self, statistic: Statistic, level: float = LEVEL) -> Estimate:
        f, a, b = statistic, self.a, self.b
        fa, fb = f(a.point[None])[0], f(b.point[None])[0]
        parts = [(f(a.seeds) - fb, a.n_seeds), (fa - f(b.seeds), b.n_seeds), (f(a.pairs) - f(b.pairs), a.n_prompts)]
        return interval(float(fa - fb), parts, max(a.n_seeds, b.n_seeds),
                        unit([a.n_seeds, b.n_seeds], a.n_prompts, paired=True), level)


def unit(seeds: Sequence[int], n_prompts: int, paired: bool = False) -> str:
    """What an interval resamples, e.g. "3 seeds × 48 prompts × noises" (rows with one seed add no seed level)."""
    many = [str(n) for n in seeds if n > 1]
    text = f"{' + '.join(many) or '1'} seed{'s' if many else ''} × {n_prompts} prompts × noises"
    return text + (", paired" if paired else "")


def interval(value: float, parts: list[tuple[np.ndarray, int]], n: int, unit_text: str,
             level: float = LEVEL) -> Estimate:
    """value +- t(df) * SE from each level's bootstrap draws (levels with one unit add no variance: there is
    nothing to resample); df by Welch-Satterthwaite. See the module docstring."""
    from scipy import stats as st

    if not math.isfinite(value):
        return Estimate(value, math.nan, math.nan, n, unit_text)
    variances, dfs = [], []
    for draws, n_units in parts:
        draws = np.asarray(draws, dtype=float)
        draws = draws[np.isfinite(draws)]
        if n_units < 2 or draws.size < 2:
            continue
        variances.append(float(draws.var()) * n_units / (n_units - 1))
        dfs.append(n_units - 1)
    if not variances:
        return Estimate(value, math.nan, math.nan, n, unit_text)
    total = sum(variances)
    se = math.sqrt(total)
    if total <= 1e-30:  # no spread at any level (e.g. a constant shift): the value is exact
        return Estimate(value, value, value, n, unit_text, 0.0, math.inf, 1.0 if value == 0 else 0.0)
    df = total ** 2 / sum(v ** 2 / d for v, d in zip(variances, dfs))
    q = float(st.t.ppf(1 - (1 - level) / 2, df))
    p = float(2 * st.t.sf(abs(value) / se, df))
    return Estimate(value, value - q * se, value + q * se, n, unit_text, se, df, p)


def _prepare(block: Block, valid: np.ndarray | None = None):
    values = distinct_seeds(block.values)
    if valid is None:
        valid = np.isfinite(values).all(axis=0)
    return values, valid


@functools.lru_cache(maxsize=8)
def _shared_pair_draws(prompts: tuple[int, ...], n_boot: int, seed: int) -> np.ndarray:
    """The prompt-and-noise draws of one bootstrap seed, shared by every row compared on the same pairs (rows of a
    leaderboard are aligned on the same pairs, so they are drawn once per table instead of once per row)."""
    draws = draw_pairs(np.random.default_rng(seed), np.asarray(prompts), n_boot)
    draws.setflags(write=False)
    return draws


def _resampled(values, valid, n_prompts, pair_draws, rng, n_boot) -> Resampled:
    n_seeds = len(values)
    ones_s, ones_p = np.ones((1, n_seeds)), np.ones((1, values.shape[1]))
    seed_draws = draw_seeds(rng, n_seeds, n_boot)
    return Resampled(point=step_means(values, valid, ones_s, ones_p)[0],
                     seeds=step_means(values, valid, seed_draws, ones_p),
                     pairs=step_means(values, valid, ones_s, pair_draws), n_seeds=n_seeds, n_prompts=n_prompts)


def resample(block: Block, *, n_boot: int = N_BOOT, seed: int = 0) -> Resampled:
    """Bootstrap a row over its training seeds, prompts and noises within prompt."""
    values, valid = _prepare(block)
    pair_draws = _shared_pair_draws(tuple(block.prompts.tolist()), n_boot, seed)
    return _resampled(values, valid, block.n_prompts, pair_draws, np.random.default_rng((seed, 1)), n_boot)


def resample_paired(a: Block, b: Block, *, n_boot: int = N_BOOT, seed: int = 0) -> PairedResampled:
    """Bootstrap A and B on the same resampled prompts and noises (the pairing); their seeds independently.
    A row with one distinct seed (base, inference scaling) pairs with every seed of the other row."""
    if a.steps != b.steps or not np.array_equal(a.prompts, b.prompts):
        raise ValueError("paired comparisons need blocks aligned on the same pairs and steps (frame.blocks does this)")
    va, vb = distinct_seeds(a.values), distinct_seeds(b.values)
    valid = np.isfinite(va).all(axis=0) & np.isfinite(vb).all(axis=0)
    pair_draws = _shared_pair_draws(tuple(a.prompts.tolist()), n_boot, seed)
    return PairedResampled(_resampled(va, valid, a.n_prompts, pair_draws, np.random.default_rng((seed, 1)), n_boot),
                           _resampled(vb, valid, a.n_prompts, pair_draws, np.random.default_rng((seed, 2)), n_boot))


def mean_ci(block: Block, statistic: Statistic, *, n_boot: int = N_BOOT, seed: int = 0,
            level: float = LEVEL) -> Estimate:
    """A row's statistic with its hierarchical-bootstrap interval."""
    return resample(block, n_boot=n_boot, seed=seed).estimate(statistic, level)


def paired_diff_ci(a: Block, b: Block, statistic: Statistic, *, n_boot: int = N_BOOT, seed: int = 0,
                   level: float = LEVEL) -> Estimate:
    """statistic(A) - statistic(B) on shared (prompt, noise) pairs with its hierarchical-bootstrap interval."""
    return resample_paired(a, b, n_boot=n_boot, seed=seed).estimate(statistic, level)


def sample_only_ci(a: Block, b: Block | None, statistic: Statistic, level: float = LEVEL) -> Estimate:
    """The interval the README used to print: every image of every seed an independent draw, SE = sd / sqrt(n) of
    the per-image (paired) values of the statistic's steps. Kept only to show, in tests, that it under-covers."""
    from scipy import stats as st

    values = a.values if b is None else a.values - distinct_seeds(b.values)[:1]
    per_image = statistic(values)  # (n_seeds, n_pairs)
    flat = per_image[np.isfinite(per_image)]
    se = float(flat.std(ddof=1) / math.sqrt(flat.size))
    q = float(st.norm.ppf(1 - (1 - level) / 2))
    value = float(flat.mean())
    return Estimate(value, value - q * se, value + q * se, a.n_seeds, "images", se)


# ----------------------------------------------------------------------------------------------- verdicts


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (step-down): p_(i) * (m - i + 1), made monotone, capped at 1. NaN stays NaN and
    does not count towards m."""
    p = np.asarray(pvalues, dtype=float)
    finite = np.flatnonzero(np.isfinite(p))
    out = np.full(len(p), np.nan)
    m = len(finite)
    order = finite[np.argsort(p[finite], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


BETTER, WORSE, INCONCLUSIVE = "better", "worse", "inconclusive"


def call(e: Estimate, adjusted_p: float, alpha: float = ALPHA) -> str:
    """better / worse / inconclusive from a comparison's value and its family-adjusted p-value."""
    if not (math.isfinite(adjusted_p) and adjusted_p < alpha):
        return INCONCLUSIVE
    return BETTER if e.value > 0 else WORSE if e.value < 0 else INCONCLUSIVE


def verdicts(estimates: Sequence[Estimate], alpha: float = ALPHA) -> list[tuple[str, float]]:
    """(verdict, Holm-adjusted p) for each comparison of one family."""
    adjusted = holm([e.p for e in estimates])
    return [(call(e, q, alpha), q) for e, q in zip(estimates, adjusted)]


def win_rate(a: Block, b: Block, steps: tuple[int, ...] | None = None) -> float:
    """Mean over S of P(A > B) on the same pair (ties 1/2), over all (seed of A, seed of B) combinations."""
    va, vb = distinct_seeds(a.values), distinct_seeds(b.values)
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
