"""reports.stats: the hierarchical bootstrap's intervals on hand-computed cases, its coverage on synthetic data with
known seed-, prompt- and noise-level variance (and the old per-sample interval's under-coverage), Holm verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from reports import stats

AT1 = stats.at_step((1,), 1)


def _block(values, prompts=None, steps=(1,)):
    values = np.asarray(values, dtype=float)
    if values.ndim == 1:
        values = values[None]
    if values.ndim == 2:  # (seeds, pairs) at one step count
        values = values[:, :, None]
    prompts = np.arange(values.shape[1]) if prompts is None else np.asarray(prompts)
    return stats.Block(values, prompts, steps)


def test_paired_interval_of_a_constant_shift_is_exact_while_unpaired_intervals_are_wide():
    b = np.array([0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.5, 0.4])  # large prompt-to-prompt spread
    a = b + 0.25
    e = stats.paired_diff_ci(_block(a), _block(b), AT1, n_boot=500)
    assert e.value == pytest.approx(0.25) and e.lo == pytest.approx(0.25) and e.hi == pytest.approx(0.25)
    assert e.p == 0.0
    ua = stats.mean_ci(_block(a), AT1, n_boot=500)
    assert ua.hi - ua.lo > 0.2


def test_prompt_level_alone_gives_the_t_interval_over_prompts():
    # per-prompt differences 0, 0, 3 (one noise each): mean 1, s^2 = 3, SE = s / sqrt(3) = 1, df = 2 -> 1 +- 4.303
    e = stats.paired_diff_ci(_block([[1.0, 2.0, 5.0]]), _block([[1.0, 2.0, 2.0]]), AT1, n_boot=20000, seed=3)
    assert e.value == pytest.approx(1.0)
    assert e.se == pytest.approx(1.0, rel=0.03) and e.df == pytest.approx(2.0)
    assert e.hi - e.value == pytest.approx(st.t.ppf(0.975, 2), rel=0.03)
    assert e.p == pytest.approx(2 * st.t.sf(1.0 / e.se, 2), rel=1e-9)


def test_seed_level_alone_gives_the_t_interval_over_seeds():
    # three seeds whose images all score their seed's value: only the seed level varies
    seeds = np.array([0.1, 0.2, 0.6])
    block = _block(np.repeat(seeds[:, None], 12, axis=1), prompts=np.arange(12) % 4)
    e = stats.mean_ci(block, AT1, n_boot=20000, seed=1)
    se = seeds.std(ddof=1) / math.sqrt(3)
    assert e.value == pytest.approx(0.3) and e.se == pytest.approx(se, rel=0.03) and e.df == pytest.approx(2.0)
    assert (e.lo, e.hi) == pytest.approx((0.3 - st.t.ppf(0.975, 2) * se, 0.3 + st.t.ppf(0.975, 2) * se), rel=0.05)
    assert e.unit == "3 seeds × 4 prompts × noises"


def test_noises_are_drawn_within_their_prompt():
    rng = np.random.default_rng(0)
    prompts = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    w = stats.draw_pairs(rng, prompts, 500)
    sizes = np.bincount(prompts)
    per_prompt = np.stack([w[:, prompts == c].sum(axis=1) for c in range(3)], axis=1)  # (B, prompts)
    copies = per_prompt / sizes
    assert np.allclose(copies, np.round(copies))  # whole copies of each prompt: n noises drawn per copy
    assert (copies.sum(axis=1) == 3).all()  # 3 prompts drawn per resample
    assert (w[:, prompts == 2].std(axis=1) > 0).any()  # noises inside a prompt are resampled, not copied


def test_bootstrap_is_deterministic_given_the_seed_and_identical_seeds_count_once():
    rng = np.random.default_rng(0)
    block = stats.Block(rng.normal(size=(3, 40, 4)), np.arange(40) % 10, (1, 2, 4, 8))
    f = stats.mean_over_steps((1, 2, 4, 8))
    assert stats.mean_ci(block, f, seed=7) == stats.mean_ci(block, f, seed=7)
    assert stats.mean_ci(block, f, seed=7) != stats.mean_ci(block, f, seed=8)
    dup = stats.Block(np.stack([block.values[0]] * 3), block.prompts, block.steps)  # a row that ignores its seed
    assert stats.mean_ci(dup, f).n == 1 and stats.mean_ci(dup, f).unit.startswith("1 seed ×")
    assert stats.win_rate(_block([[1.0, 1.0, 3.0]]), _block([[0.0, 1.0, 4.0]])) == pytest.approx(0.5)


def _world(rng, n_seeds=3, n_prompts=48, n_noises=8, sd_seed=0.03, sd_prompt=0.04, sd_cell=0.02, sd_image=0.3):
    """A trained row and the base model on shared (prompt, noise) pairs with a true gain of 0: the row's per-image
    gain = seed effect + prompt effect + seed x prompt effect + per-image effect (base is deterministic)."""
    prompts = np.repeat(np.arange(n_prompts), n_noises)
    base = rng.normal(0.7, 0.15, n_prompts)[prompts] + rng.normal(0, 0.2, n_prompts * n_noises)
    gain = (rng.normal(0, sd_seed, n_seeds)[:, None] + rng.normal(0, sd_prompt, n_prompts)[prompts]
            + rng.normal(0, sd_cell, (n_seeds, n_prompts))[:, prompts]
            + rng.normal(0, sd_image, (n_seeds, n_prompts * n_noises)))
    return stats.Block((base + gain)[:, :, None], prompts, (1,)), stats.Block(base[None, :, None], prompts, (1,))


@pytest.mark.parametrize("levels", [dict(), dict(sd_seed=0.06, sd_prompt=0.0)], ids=["seed+prompt", "seed-dominated"])
def test_hierarchical_interval_covers_the_true_gain_about_95_percent_and_the_per_sample_one_does_not(levels):
    """200 synthetic grids (3 seeds, 48 prompts x 8 noises, true gain 0): the hierarchical interval covers 0 in about
    95 % of them; the README's old per-sample interval (sd / sqrt(n) over every image) in far fewer."""
    rng = np.random.default_rng(2026)
    n, hits, old_hits = 200, 0, 0
    for r in range(n):
        row, base = _world(rng, **levels)
        e = stats.paired_diff_ci(row, base, AT1, n_boot=300, seed=r)
        hits += e.lo <= 0.0 <= e.hi
        old = stats.sample_only_ci(row, base, AT1)
        old_hits += old.lo <= 0.0 <= old.hi
    assert 0.91 <= hits / n <= 0.99, hits / n
    assert old_hits / n < 0.75, old_hits / n


def test_holm_adjusts_by_hand():
    # p sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06, monotone), 0.5 (x1 = 0.5); NaN is not counted
    assert stats.holm([0.03, 0.01, float("nan"), 0.5, 0.02]) == pytest.approx([0.06, 0.04, float("nan"), 0.5, 0.06],
                                                                              nan_ok=True)
    up = stats.Estimate(0.1, 0.05, 0.15, 3, "x", p=0.01)
    down = stats.Estimate(-0.1, -0.15, -0.05, 3, "x", p=0.012)
    assert [v for v, _ in stats.verdicts([up, down])] == ["better", "worse"]  # 0.02, 0.024 < 0.05
    assert [v for v, _ in stats.verdicts([up, down] + [stats.Estimate(0, -1, 1, 3, "x", p=0.9)] * 3)] == \
        ["inconclusive", "inconclusive", "inconclusive", "inconclusive", "inconclusive"]  # m = 5: 0.01 x 5 = 0.05, not below 0.05


