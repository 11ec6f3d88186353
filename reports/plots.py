"""Figures for the report, as self-contained SVG data URIs (text drawn as paths: no fonts needed to view them).

Each function takes plain numbers (already-computed estimates), so the figures hold no statistics of their own.
Colours are fixed per method name, so a method has the same colour in every figure of a report.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

PALETTE = {
    "base": "#222222", "ddpo": "#1f77b4", "sdpo": "#d62728", "diffusion_dpo": "#2ca02c", "spo": "#9467bd", "spo_reward_x0": "#c5b0d5",
    "pso": "#ff7f0e", "sft": "#8c564b", "sharpening": "#e377c2", "sharpening_sft": "#f7b6d2",
    "inference_scaling": "#17becf",
}
_EXTRA = ["#bcbd22", "#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39"]
STYLE = {
    "svg.fonttype": "path", "font.family": "DejaVu Sans", "font.size": 8.5, "axes.titlesize": 9.5,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25,
    "legend.frameon": False, "legend.fontsize": 7.5, "text.parse_math": False, "svg.hashsalt": "stepbench",
}


@dataclass(frozen=True)
class Series:
    """One line: a leaderboard row's values with their CI at each x."""

    label: str
    method: str
    x: list[float]
    y: list[float]
    lo: list[float]
    hi: list[float]


def colour(method: str) -> str:
    if method in PALETTE:
        return PALETTE[method]
    return _EXTRA[sum(map(ord, method)) % len(_EXTRA)]


def _data_uri(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue().encode()).decode()


def _lines(ax, series: list[Series], *, band: bool = True) -> None:
    for s in series:
        is_base = s.method == "base"
        kw = dict(color=colour(s.method), lw=1.4 if is_base else 1.6, ls="--" if is_base else "-",
                  marker="o", ms=3.5, label=s.label, zorder=3 if is_base else 2)
        ax.plot(s.x, s.y, **kw)
        if band and any(v == v for v in s.lo):  # NaN-safe: no band when the CI is undefined
            ax.fill_between(s.x, s.lo, s.hi, color=colour(s.method), alpha=0.12 if not is_base else 0.08, lw=0)


def step_curves(by_steps: list[Series], by_nfe: list[Series], reward: str, train_steps: set[int]) -> str:
    """Left: reward vs evaluation step count. Right: the same points against inference NFEs per image."""
    with plt.rc_context(STYLE):
        fig, (left, right) = plt.subplots(1, 2, figsize=(9.2, 3.3))
        _lines(left, by_steps)
        steps = sorted({x for s in by_steps for x in s.x})
        left.set_xscale("log", base=2)
        left.set_xticks(steps, [str(s) for s in steps])
        left.minorticks_off()
        for k in sorted(train_steps):
            left.axvline(k, color="#999999", lw=0.8, ls=":", zorder=0)
        left.set_xlabel("evaluation steps S  (dotted: training step counts K)")
        left.set_ylabel(f"{reward}  ↑")
        left.set_title("Step generalisation (95% CI bands)")
        _lines(right, by_nfe, band=False)
        right.set_xscale("log", base=2)
        right.xaxis.set_major_locator(LogLocator(base=2))
        right.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # no mathtext: parse_math is off
        right.xaxis.set_minor_formatter(NullFormatter())
        right.set_xlabel("inference NFEs per image (log scale)")
        right.set_ylabel(f"{reward}  ↑")
        right.set_title("Inference compute")
        handles, labels = left.get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        return _data_uri(fig)


def cost_scatter(points: list[Series], reward: str) -> str:
    """Reward (mean over S) vs training NFEs; one point per row with its CI as an error bar."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.4, 3.0))
        for p in points:
            c = colour(p.method)
            yerr = [[p.y[0] - p.lo[0]], [p.hi[0] - p.y[0]]] if p.lo[0] == p.lo[0] else None
            ax.errorbar(p.x, p.y, yerr=yerr, fmt="s" if p.method == "base" else "o", color=c, ms=5, capsize=2.5,
                        label=p.label)
            if p.method == "base":
                ax.axhline(p.y[0], color=c, lw=1.0, ls="--", zorder=0)
        ax.set_xlabel("training NFEs (sampling + gradient passes)")
        ax.set_ylabel(f"{reward}, mean over S  ↑")
        ax.set_title("Reward vs training compute")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        return _data_uri(fig)
