"""Figures for the report, as self-contained SVG data URIs (text drawn as paths: no fonts needed to view them).

Each function takes plain numbers (already-computed estimates), so the figures hold no statistics of their own.
Colours follow the registered methods' order (colour()), so a method has the same colour in every figure.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

BASE_COLOUR = "#222222"  # the reference row
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#393b79", "#98df8a", "#ffbb78", "#ff9896", "#c5b0d5", "#f7b6d2", "#aec7e8", "#c49c94", "#637939",
           "#8c6d31", "#843c39")
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
    k: int = -1  # the row's training step count K (-1: a row that trains nothing)


LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P")


def colour(method: str) -> str:
    """The method's colour: the palette by the method's place among the registered methods (a method not registered:
    by a hash of its name), so a method has the same colour in every figure and report."""
    import zlib

    import methods

    if method == "base":
        return BASE_COLOUR
    names = [m for m in methods.names() if m != "base"]
    return PALETTE[(names.index(method) if method in names else zlib.crc32(method.encode())) % len(PALETTE)]


def k_style(k: int, ks: list[int]) -> tuple[str, str]:
    """(line style, marker) of a training step count: colour says the method, style and marker say K."""
    if k < 0:
        return ":", "x"
    i = ks.index(k) if k in ks else 0
    return LINESTYLES[i % len(LINESTYLES)], MARKERS[i % len(MARKERS)]


def _data_uri(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue().encode()).decode()


def _lines(ax, series: list[Series], ks: list[int], *, band: bool = True) -> None:
    for s in series:
        is_base = s.method == "base"
        ls, marker = ("--", "o") if is_base else k_style(s.k, ks)
        kw = dict(color=colour(s.method), lw=1.8 if is_base else 1.3, ls=ls, marker=marker, ms=3.5, label=s.label,
                  zorder=3 if is_base else 2)
        ax.plot(s.x, s.y, **kw)
        if band and any(v == v for v in s.lo):  # NaN-safe: no band when the CI is undefined
            # many rows: faint bands with a thin edge each, so overlapping bands stay readable
            ax.fill_between(s.x, s.lo, s.hi, color=colour(s.method), alpha=0.06, lw=0)
            for edge in (s.lo, s.hi):
                ax.plot(s.x, edge, color=colour(s.method), lw=0.4, alpha=0.5, ls=ls)


def _legend(fig, ax, n: int) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 1.0), ncols=1 if n <= 18 else 2,
               fontsize=7 if n > 12 else 7.5)


def step_curves_figure(by_steps: list[Series], by_nfe: list[Series], reward: str, train_steps: set[int]):
    """Left: reward vs evaluation step count. Right: the same points against inference NFEs per image."""
    ks = sorted(train_steps)
    with plt.rc_context(STYLE):
        fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 3.8), layout="constrained")
        _lines(left, by_steps, ks)
        steps = sorted({x for s in by_steps for x in s.x})
        left.set_xscale("log", base=2)
        left.set_xticks(steps, [str(s) for s in steps])
        left.minorticks_off()
        for k in ks:
            left.axvline(k, color="#999999", lw=0.8, ls=":", zorder=0)
        left.set_xlabel("evaluation steps S  (dotted: training K)")
        left.set_ylabel(f"{reward}  ↑")
        left.set_title("Step generalisation (95% interval bands)")
        _lines(right, by_nfe, ks, band=False)
        right.set_xscale("log", base=2)
        right.xaxis.set_major_locator(LogLocator(base=2))
        right.xaxis.set_major_formatter(FuncFormatter(lambda v, _: si_tick(v)))  # no mathtext: parse_math is off
        right.xaxis.set_minor_formatter(NullFormatter())
        right.set_xlabel("inference NFEs per image (log scale)")
        right.set_title("Inference compute")
        _legend(fig, left, len(by_steps))
        return fig


def step_curves(by_steps: list[Series], by_nfe: list[Series], reward: str, train_steps: set[int]) -> str:
    return _data_uri(step_curves_figure(by_steps, by_nfe, reward, train_steps))


def si_tick(x: float) -> str:
    """Tick text without a separate offset or exponent label (the "1e4" that overlapped the axis label)."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:g}{suffix}"
    return f"{x:g}"


def cost_scatter_figure(points: list[Series], reward: str):
    """Reward (mean over S) vs training NFEs, one point per trained row with its interval as an error bar; rows
    that train nothing (base, inference scaling) are horizontal reference lines. Log x: cells of different budgets
    spread out instead of sitting in one blob beside a point at 0."""
    ks = sorted({p.k for p in points if p.k >= 0})
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 3.4), layout="constrained")
        trained = [p for p in points if p.x[0] > 0]
        for p in points:
            c = colour(p.method)
            if p.x[0] <= 0:
                ax.axhline(p.y[0], color=c, lw=1.2, ls="--" if p.method == "base" else ":", zorder=0, label=p.label)
                continue
            yerr = [[p.y[0] - p.lo[0]], [p.hi[0] - p.y[0]]] if p.lo[0] == p.lo[0] else None
            ax.errorbar(p.x, p.y, yerr=yerr, fmt=k_style(p.k, ks)[1], color=c, ms=5, capsize=2.5, label=p.label)
        if trained:
            xs = [p.x[0] for p in trained]
            ax.set_xscale("log")
            ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # a budget range is < 1 decade
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: si_tick(v)))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training NFEs (sampling + gradient passes, log scale)")
        ax.set_ylabel(f"{reward}, mean over S  ↑")
        ax.set_title("Reward vs training compute")
        _legend(fig, ax, len(points))
        return fig


def cost_scatter(points: list[Series], reward: str) -> str:
    return _data_uri(cost_scatter_figure(points, reward))
