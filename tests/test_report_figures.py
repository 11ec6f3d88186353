"""reports.plots at full scale: a synthetic grid larger than toy-full (14 trained rows per K, K = 1, 2, 4, S = 1, 2,
3, 4, 6, 8) draws step curves and the compute scatter with no two text artists overlapping (labels, ticks, offsets, titles,
legend entries), each row with its own (colour, line style) pair."""

from __future__ import annotations

import itertools

import matplotlib
import numpy as np
import pytest

from reports import plots

METHODS = ["ddpo", "diffusion_dpo", "diffusion_dpo_online", "pso", "pso_offline", "spo", "spo_reward_x0", "sdpo",
           "sdpo_t_eq_k", "sharpening", "sharpening_sft", "sft", "grpo", "nft"]  # the toy grid's trained rows
KS = [1, 2, 4]
STEPS = [1, 2, 3, 4, 6, 8]


def _series():
    rng = np.random.default_rng(0)
    by_steps, by_nfe, points = [], [], []
    rows = [("base", -1), ("inference_scaling", -1)] + [(m, k) for m in METHODS for k in KS]
    for method, k in rows:
        label = method if k < 0 else f"{method} (K={k})"
        y = list(0.6 + 0.3 * (1 - np.exp(-np.array(STEPS) / 3)) + rng.normal(0, 0.02, len(STEPS)))
        half = 0.02 + rng.uniform(0, 0.03)
        by_steps.append(plots.Series(label, method, STEPS, y, [v - half for v in y], [v + half for v in y], k))
        per_image = 4 if method == "inference_scaling" else 1
        by_nfe.append(plots.Series(label, method, [s * per_image for s in STEPS], y, [], [], k))
        nfe = 0.0 if k < 0 else float(20000 * (1 + 0.1 * rng.normal()) * (1 + KS.index(k)))
        points.append(plots.Series(label, method, [nfe], [float(np.mean(y))], [float(np.mean(y)) - half],
                                   [float(np.mean(y)) + half], k))
    return by_steps, by_nfe, points


def text_overlaps(fig) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty text artists whose drawn boxes intersect (by more than half a pixel)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    drawn = set()
    for ax in fig.axes:  # tick labels are drawn only for the ticks inside the view
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis._update_ticks():
                drawn |= {tick.label1, tick.label2}
    boxes = []
    for text in fig.findobj(matplotlib.text.Text):
        is_tick = any(text is t.label1 or text is t.label2 for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
                      for t in axis.get_major_ticks() + axis.get_minor_ticks())
        if not text.get_visible() or not text.get_text().strip() or (is_tick and text not in drawn):
            continue
        box = text.get_window_extent(renderer).expanded(1.0, 1.0).shrunk(0.98, 0.98)
        boxes.append((text.get_text(), box))
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2)
            if ba.x0 + 0.5 < bb.x1 and bb.x0 + 0.5 < ba.x1 and ba.y0 + 0.5 < bb.y1 and bb.y0 + 0.5 < ba.y1]


@pytest.fixture(scope="module")
def series():
    return _series()


def test_step_curves_at_full_scale_have_no_overlapping_text(series):
    by_steps, by_nfe, _ = series
    fig = plots.step_curves_figure(by_steps, by_nfe, "toy-all", set(KS))
    try:
        assert text_overlaps(fig) == []
        legend_texts = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
        assert len(legend_texts) == len(by_steps)  # every row in the legend
        # every row distinguishable: colour by method, line style by K
        styles = [(line.get_color(), line.get_linestyle(), line.get_marker()) for line in fig.axes[0].get_lines()
                  if line.get_label() in legend_texts]
        assert len(set(styles)) == len(by_steps)
        assert len({line.get_color() for line in fig.axes[0].get_lines()}) >= len(METHODS) + 2  # a colour per method
    finally:
        matplotlib.pyplot.close(fig)


def test_compute_scatter_at_full_scale_has_no_overlapping_text_and_no_offset_label(series):
    _, _, points = series
    fig = plots.cost_scatter_figure(points, "toy-all")
    try:
        assert text_overlaps(fig) == []
        ax = fig.axes[0]
        assert ax.get_xscale() == "log" and ax.xaxis.get_offset_text().get_text() == ""
        labels = [t.label1.get_text() for t in ax.xaxis._update_ticks() if t.label1.get_text()]  # ticks in view
        assert len(labels) >= 2 and all(label.endswith("k") for label in labels), labels  # "20k", not "2" + "1e4"
    finally:
        matplotlib.pyplot.close(fig)


def test_the_overlap_check_finds_overlapping_text():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.text(0.5, 0.5, "first label")
    ax.text(0.52, 0.5, "second label")
    try:
        assert text_overlaps(fig) == [("first label", "second label")]
    finally:
        plt.close(fig)
