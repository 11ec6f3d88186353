"""Results -> report context -> DIR/index.html (Jinja2, autoescaped, self-contained) and DIR/report.pdf (weasyprint).

Sections per (base model, training reward): leaderboard + paired gains over base, held-out rewards, step curves,
cost, image grid; then claims, failed cells, provenance. Every number is computed here from the tidy frame
(reports.frame) with reports.stats; the template only lays them out.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from reports import plots, stats
from reports.frame import BASE, GROUP, UNTRAINED, Results, artifact, blocks, row_frame

TEMPLATES = Path(__file__).parent / "templates"
METHOD_LABELS = {
    "base": "base (untrained)", "ddpo": "DDPO", "sdpo": "SDPO", "diffusion_dpo": "Diffusion-DPO", "spo": "SPO",
    "spo_reward_x0": "SPO (reward on x̂0, no SPM)",
    "pso": "PSO", "sft": "SFT (plain fine-tuning)", "sharpening": "Diffusion-Sharpening (RLHF)",
    "sharpening_sft": "Diffusion-Sharpening (SFT)", "inference_scaling": "Inference scaling",
}
SHORT_LABELS = {"base": "base", "sft": "SFT", "inference_scaling": "Inference scaling"}  # image-grid rows
METHOD_ORDER = list(METHOD_LABELS)
FEW_UNITS = 5  # below this many seeds/prompts a bootstrap CI is flagged as too narrow


def label(method: str, short: bool = False) -> str:
    if short and method in SHORT_LABELS:
        return SHORT_LABELS[method]
    return METHOD_LABELS.get(method, method)


def row_name(key: tuple[str, int], short: bool = False) -> str:
    """A leaderboard row as text: the method and, for methods that train, its training step count K."""
    return label(key[0], short) + ("" if key[1] < 0 else f" (K={key[1]})")


def row_order(key: tuple[str, int]) -> tuple:
    method, k = key
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method, k)


# ----------------------------------------------------------------------------------------------- formatting


@dataclass
class Cell:
    text: str = "—"
    sub: str = ""  # second line: the CI
    bold: bool = False
    shade: bool = False  # S equals the row's training step count K
    tone: str = ""  # "pos" / "neg": CI excludes zero


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Cell]]
    caption: str = ""
    numeric_from: int = 1  # first numeric column (right-aligned)


def decimals(values) -> int:
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    top = max(finite, default=1.0)
    return 3 if top < 10 else 2 if top < 100 else 1


def best_of(values: list[float], pick=max) -> float | None:
    """The value to set in bold: None when there is nothing to single out (no values, or all equal)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return pick(finite) if len(set(finite)) > 1 else None


def num(x: float, d: int, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:+.{d}f}" if sign else f"{x:.{d}f}"


def ci_text(e: stats.Estimate, d: int, sign: bool = False) -> str:
    if not math.isfinite(e.lo):
        return "no CI (n < 2)"
    return f"[{num(e.lo, d, sign)}, {num(e.hi, d, sign)}]"


def si(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# ----------------------------------------------------------------------------------------------- per reward


@dataclass
class RewardTables:
    reward: str
    leaderboard: Table
    gains: Table
    estimates: dict  # row -> {"S": {s: Estimate}, "mean": Estimate, ...}


def reward_tables(rows: pd.DataFrame, reward: str, steps: tuple[int, ...], *, n_boot: int, seed: int,
                  trained_on: bool) -> RewardTables:
    """Leaderboard (mean [95% CI] per S, mean over S, worst S, step gap, win rate) and paired gains over base."""
    bl = blocks(rows, reward, steps)
    keys = sorted(bl, key=row_order)
    base_key = next((k for k in keys if k[0] == BASE), None)
    est, gain, wins = {}, {}, {}
    for key in keys:
        r = stats.resample(bl[key], n_boot=n_boot, seed=seed)
        e = {"S": {s: r.estimate(stats.at_step(steps, s)) for s in steps},
             "mean": r.estimate(stats.mean_over_steps(steps)), "worst": r.estimate(stats.worst_step)}
        e["worst_s"] = steps[int(np.nanargmin(r.point))] if np.isfinite(r.point).any() else None
        k = key[1]
        e["gap"] = r.estimate(stats.step_gap(steps, k)) if k in steps and len(steps) > 1 else None
        est[key] = e
        if base_key is not None and key != base_key:
            p = stats.resample_paired(bl[key], bl[base_key], n_boot=n_boot, seed=seed)
            gain[key] = {"S": {s: p.estimate(stats.at_step(steps, s)) for s in steps},
                         "mean": p.estimate(stats.mean_over_steps(steps))}
            wins[key] = stats.win_rate(bl[key], bl[base_key])

    d = decimals([e["mean"].value for e in est.values()] + [e["S"][s].value for e in est.values() for s in steps])
    best = {s: best_of([e["S"][s].value for e in est.values()]) for s in steps}
    best_mean = best_of([e["mean"].value for e in est.values()])
    best_worst = best_of([e["worst"].value for e in est.values()])
    best_gap = best_of([abs(e["gap"].value) for e in est.values() if e["gap"] is not None], min)
    best_win = best_of(list(wins.values()))

    def value_cell(e: stats.Estimate, best_value, shade=False):
        return Cell(num(e.value, d), ci_text(e, d), bold=e.value == best_value, shade=shade)

    lb_rows = []
    for key in keys:
        e, (method, k) = est[key], key
        unit = e["mean"]
        few = unit.n < FEW_UNITS  # a percentile bootstrap over 2-4 values cannot show the real spread
        row = [Cell(label(method)), Cell("—" if k < 0 else str(k)),
               Cell(f"{unit.n} {unit.unit}", "CI too narrow" if few else "")]
        row += [value_cell(e["S"][s], best[s], shade=(s == k)) for s in steps]
        row.append(value_cell(e["mean"], best_mean))
        worst = value_cell(e["worst"], best_worst)
        worst.sub = (f"at S={e['worst_s']} · " if e["worst_s"] is not None else "") + worst.sub
        row.append(worst)
        g = e["gap"]
        row.append(Cell("—") if g is None else Cell(num(g.value, d, True), ci_text(g, d, True),
                                                     bold=abs(g.value) == best_gap))
        w = wins.get(key)
        row.append(Cell("—") if w is None else Cell(f"{100 * w:.1f}%", "", bold=w == best_win))
        lb_rows.append(row)
    role = "training reward" if trained_on else "held-out reward, not trained on"
    leaderboard = Table(
        ["Method", "K", "CI over"] + [f"S={s} ↑" for s in steps]
        + ["mean over S ↑", "worst S ↑", "step gap →0", "win rate vs base ↑"], lb_rows,
        caption=f"{reward} ({role}): mean per image [95% bootstrap CI]. Higher is better. Bold: best in column "
                f"(step gap: smallest |gap|). Shaded: S = the row's training step count K.", numeric_from=3)

    g_rows = []
    for key in keys:
        if key not in gain:
            continue
        g = gain[key]
        cells = [Cell(label(key[0])), Cell("—" if key[1] < 0 else str(key[1]))]
        for est_ in [g["S"][s] for s in steps] + [g["mean"]]:
            tone = "pos" if est_.lo > 0 else "neg" if est_.hi < 0 else ""
            cells.append(Cell(num(est_.value, d, True), ci_text(est_, d, True), tone=tone))
        for s, c in zip(steps, cells[2:]):
            c.shade = s == key[1]
        cells.append(Cell(f"{g['mean'].n} {g['mean'].unit}"))
        g_rows.append(cells)
    gains = Table(["Method", "K"] + [f"Δ S={s}" for s in steps] + ["Δ mean over S", "CI over"], g_rows,
                  caption=f"{reward}: gain over the base model on the same (prompt, initial noise) pairs, "
                          f"[95% paired bootstrap CI]. Green/red: CI excludes zero.", numeric_from=2)
    return RewardTables(reward, leaderboard, gains, est)


# ----------------------------------------------------------------------------------------------- cost, NFEs


def group_runs(results: Results, rows: pd.DataFrame) -> dict:
    """The FINISHED runs behind each leaderboard row (by the run ids present in the scores)."""
    runs = results.runs.set_index("run_id")
    out = {}
    for (method, k), part in rows.groupby(["method", "train_steps"]):
        ids = [i for i in part["run_id"].unique() if i in runs.index]
        out[(method, int(k))] = runs.loc[ids]
    return out


def metric_mean(runs: pd.DataFrame, key: str) -> float:
    col = f"metrics.{key}"
    if col not in runs or runs[col].isna().all():
        return float("nan")
    return float(pd.to_numeric(runs[col], errors="coerce").mean())


def train_nfe(runs: pd.DataFrame) -> float:
    """Training compute per run: ``cost/train_nfe`` (sampling + gradient NFEs, as the harness logs it)."""
    total = metric_mean(runs, "cost/train_nfe")
    if math.isnan(total):
        parts = [metric_mean(runs, k) for k in ("cost/sample_nfe", "cost/grad_nfe")]
        total = float("nan") if any(math.isnan(p) for p in parts) else sum(parts)
    return total


def inference_nfe_per_image(runs: pd.DataFrame, reward: str, s: int) -> tuple[float, bool]:
    """NFEs per evaluation image at S from ``cost/eval_nfe/s<S>`` and ``eval/<reward>/s<S>/n``; else S (assumed)."""
    total, n = metric_mean(runs, f"cost/eval_nfe/s{s}"), metric_mean(runs, f"eval/{reward}/s{s}/n")
    if math.isfinite(total) and math.isfinite(n) and n > 0:
        return total / n, True
    return float(s), False


def cost_table(run_sets: dict, keys: list) -> Table:
    """Compute and resources per row, from the cost/* metrics bench.cell logs (mean over the row's runs)."""
    columns = [("training NFEs", si, lambda r: train_nfe(r)),
               ("reward calls", si, lambda r: metric_mean(r, "cost/reward_calls")),
               ("eval NFEs", si, lambda r: metric_mean(r, "cost/eval_nfe")),
               ("train time (s)", lambda x: num(x, 1), lambda r: metric_mean(r, "cost/train_seconds")),
               ("wall time (s)", lambda x: num(x, 1), lambda r: metric_mean(r, "cost/wall_seconds")),
               ("peak RSS (MB)", lambda x: num(x, 0), lambda r: metric_mean(r, "cost/peak_rss_mb"))]
    if any(math.isfinite(metric_mean(r, "cost/cuda_max_allocated_mb")) for r in run_sets.values()):
        columns.append(("peak GPU (MB)", lambda x: num(x, 0), lambda r: metric_mean(r, "cost/cuda_max_allocated_mb")))
    rows = []
    for key in keys:
        runs = run_sets.get(key, pd.DataFrame())
        rows.append([Cell(label(key[0])), Cell("—" if key[1] < 0 else str(key[1])), Cell(str(len(runs)))]
                    + [Cell(fmt(get(runs))) for _, fmt, get in columns])
    return Table(["Method", "K", "runs"] + [name for name, _, _ in columns], rows,
                 caption="Mean per run over the row's seeds. Training NFEs = sampling + gradient denoiser passes; "
                         "eval NFEs (all S) include inference-time search; wall time covers training and "
                         "evaluation.", numeric_from=2)


# ----------------------------------------------------------------------------------------------- image grid

GRID_COLUMNS, GRID_TEXT_H, GRID_HEADS = 8, 26, (0, 16)  # the layout bench.evaluate.save_grid draws
TILE_PX = 128  # tiles larger than this are downscaled in the report


def tile_boxes(width: int, height: int, k: int) -> list[tuple[int, int, int, int]] | None:
    """Boxes (x, y, w, h) of the k square sample tiles in an eval grid PNG, or None if the layout is unknown.

    The grid has min(8, k) columns of width max(w, 96), a 26 px caption under each tile, and an optional 16 px
    title; the sample is centred in its column."""
    if k <= 0:
        return None
    columns = min(GRID_COLUMNS, k)
    rows = -(-k // columns)
    if width % columns:
        return None
    tile_w = width // columns
    for head in GRID_HEADS:
        if (height - head) % rows:
            continue
        side = (height - head) // rows - GRID_TEXT_H
        if side > 0 and tile_w == max(side, 96):
            return [((i % columns) * tile_w + (tile_w - side) // 2, head + (i // columns) * (side + GRID_TEXT_H),
                     side, side) for i in range(k)]
    return None


def image_grid(results: Results, rows: pd.DataFrame, keys: list, steps: tuple[int, ...], reward: str,
               n_samples: int) -> dict:
    """Tiles of fixed (prompt, initial noise) samples: one table per sample, rows = methods, columns = S.

    Tiles are cropped from each row's ``eval/grid_s<S>.png`` (its lowest training seed); the score under a tile
    is that image's value in the tidy frame."""
    from PIL import Image

    scored = rows[rows["reward"] == reward]
    sample_ids = sorted(scored["sample_idx"].unique())[:n_samples]
    params = results.runs.set_index("run_id")
    crops: dict = {}
    missing = []
    for key in keys:
        part = scored[(scored["method"] == key[0]) & (scored["train_steps"] == key[1])]
        if part.empty:
            continue
        seed = int(part["seed"].min())
        run_id = part.loc[part["seed"] == seed, "run_id"].iloc[0]
        try:  # the grid shows the first min(eval.grid_images, eval.n) samples
            k = min(int(params.at[run_id, "params.eval.grid_images"]), int(params.at[run_id, "params.eval.n"]))
        except (KeyError, ValueError, TypeError):
            k = None
        for s in steps:
            path = artifact(results.uri, run_id, f"eval/grid_s{s}.png")
            if path is None:
                missing.append(f"{label(key[0])} S={s}: no eval/grid_s{s}.png")
                continue
            with Image.open(path) as img:
                img = img.convert("RGB")
                boxes = tile_boxes(img.width, img.height, k if k is not None else len(sample_ids))
                if boxes is None:
                    missing.append(f"{label(key[0])} S={s}: grid layout not recognised ({img.width}x{img.height})")
                    continue
                for j in sample_ids:
                    if j < len(boxes):
                        x, y, w, h = boxes[j]
                        tile = img.crop((x, y, x + w, y + h))
                        tile.thumbnail((TILE_PX, TILE_PX), Image.Resampling.LANCZOS)  # large models: keep it small
                        buf = io.BytesIO()
                        tile.save(buf, format="PNG")
                        crops[(key, s, j)] = (png_uri(buf.getvalue()), seed)
    value = scored.groupby(["method", "train_steps", "seed", "S", "sample_idx"])["value"].first()
    d = decimals(scored["value"].tolist())
    samples = []
    for j in sample_ids:
        table = []
        for key in keys:
            tiles = []
            for s in steps:
                uri, seed = crops.get((key, s, j), (None, None))
                score = value.get((key[0], key[1], seed, s, j)) if seed is not None else None
                tiles.append({"uri": uri, "score": "" if score is None else num(score, d), "shade": s == key[1]})
            table.append({"label": row_name(key, short=True), "tiles": tiles})
        first = scored[scored["sample_idx"] == j].iloc[0]
        samples.append({"sample_idx": int(j), "prompt_idx": int(first["prompt_idx"]), "prompt": first["prompt"],
                        "rows": table})
    return {"samples": samples, "steps": steps, "reward": reward, "missing": missing, "any": bool(crops)}


# ----------------------------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class Claim:
    source: str  # the paper whose headline this is
    text: str  # the claim, phrased as a comparison the grid can test
    a: str  # method expected to win ("*" = every trained method)
    b: str  # method it is compared with
    steps: str  # "untrained": S not in {K_a, K_b}; "few": S <= 2; "all"
    compute: str | None = None  # None, or "train" / "total": A may not use more of these NFEs than B


CLAIMS = (
    Claim("SDPO", "SDPO beats DDPO at the step counts neither was trained at", "sdpo", "ddpo", "untrained"),
    Claim("SPO", "SPO beats Diffusion-DPO at equal training NFEs", "spo", "diffusion_dpo", "all", "train"),
    Claim("PSO", "PSO keeps few-step quality where plain fine-tuning (SFT) on the same data degrades it",
          "pso", "sft", "few"),
    Claim("Diffusion-Sharpening", "Sharpening reaches a given reward in fewer training NFEs than Diffusion-DPO",
          "sharpening", "diffusion_dpo", "all", "train"),
    Claim("Inference-time scaling", "A trained method beats inference-time search at equal total NFEs "
          "(training + evaluation)", "*", "inference_scaling", "all", "total"),
)
COMPUTE_TOLERANCE = 0.10  # budgets within 10 % count as equal


def verdict(e: stats.Estimate, nfe_a: float = float("nan"), nfe_b: float = float("nan"),
            compute: str | None = None, a: str = "A", b: str = "B") -> tuple[str, str]:
    """(verdict, reason). A claim "A beats B" is supported when the paired CI of A - B lies above 0 and A used
    no more compute than B (within 10 %); not supported when it lies below 0 and A used no less; else
    inconclusive (CI includes 0 at this n, or compute not matched in the direction that would decide it)."""
    if not math.isfinite(e.lo):
        return "inconclusive at this n", "no confidence interval (fewer than 2 prompts)"
    if compute is None:
        if e.lo > 0:
            return "supported", "paired CI above 0"
        if e.hi < 0:
            return "not supported", f"paired CI below 0 ({b} is better)"
        return "inconclusive at this n", "paired CI includes 0"
    if not (math.isfinite(nfe_a) and math.isfinite(nfe_b)):
        return "inconclusive at this n", "compute (NFEs) not recorded"
    no_more = nfe_a <= nfe_b * (1 + COMPUTE_TOLERANCE)
    no_less = nfe_a >= nfe_b * (1 - COMPUTE_TOLERANCE)
    if e.lo > 0:
        return ("supported", "paired CI above 0 at no more compute") if no_more else \
            ("inconclusive", f"{a} is better but used more NFEs than {b}")
    if e.hi < 0:
        return ("not supported", "paired CI below 0 at no less compute") if no_less else \
            ("inconclusive", f"{a} is worse but used fewer NFEs than {b}")
    return "inconclusive at this n", "paired CI includes 0"


def claim_steps(claim: Claim, steps: tuple[int, ...], ka: int, kb: int) -> tuple[int, ...]:
    if claim.steps == "untrained":
        return tuple(s for s in steps if s not in (ka, kb))
    if claim.steps == "few":
        return tuple(s for s in steps if s <= 2) or steps[:1]
    return steps


def evaluate_claims(title: str, bl: dict, run_sets: dict, reward: str, steps: tuple[int, ...], *,
                    n_boot: int, seed: int, failed: dict[str, int] | None = None) -> list[dict]:
    """One row per claim and compared (A, B) pair of rows in this group; ``failed`` counts failed cells per method."""
    failed = failed or {}
    out = []
    keys = sorted(bl, key=row_order)
    d = decimals([np.nanmean(b.values) for b in bl.values()] or [1.0])
    for claim in CLAIMS:
        rows_a = [k for k in keys if (k[0] not in UNTRAINED if claim.a == "*" else k[0] == claim.a)]
        rows_b = [k for k in keys if k[0] == claim.b]
        base = dict(group=title, source=claim.source, claim=claim.text)
        absent = [m for m, r in ((claim.a, rows_a), (claim.b, rows_b)) if not r]
        if absent:
            why = ["no trained method finished" if m == "*" else
                   f"{label(m)}: no finished cell ({failed[m]} failed)" if failed.get(m) else
                   f"{label(m)}: not in this grid" for m in absent]
            out.append(base | dict(comparison="—", delta="", delta_ci="", compute="", verdict="not run",
                                   reason="; ".join(why)))
            continue
        common = {k[1] for k in rows_a} & {k[1] for k in rows_b}
        pairs = [(x, y) for x in rows_a for y in rows_b if not common or x[1] == y[1]]
        for ka, kb in pairs:
            sel = claim_steps(claim, steps, ka[1], kb[1])
            name = f"{row_name(ka)} − {row_name(kb)}"
            where = f"{reward}, S ∈ {{{', '.join(map(str, sel))}}}" if sel else reward
            row = base | dict(comparison=f"{name} on {where}")
            if not sel:
                out.append(row | dict(delta="", delta_ci="", compute="", verdict="inconclusive",
                                      reason="no evaluated step count outside both training step counts"))
                continue
            e = stats.paired_diff_ci(bl[ka], bl[kb], stats.mean_over_steps(steps, sel), n_boot=n_boot, seed=seed)
            nfe_a = nfe_b = float("nan")
            compute_text = ""
            if claim.compute:
                ra, rb = run_sets.get(ka, pd.DataFrame()), run_sets.get(kb, pd.DataFrame())
                nfe_a, nfe_b = train_nfe(ra), train_nfe(rb)
                if claim.compute == "total":
                    nfe_a += metric_mean(ra, "cost/eval_nfe")
                    nfe_b += metric_mean(rb, "cost/eval_nfe")
                compute_text = f"{si(nfe_a)} vs {si(nfe_b)} {claim.compute} NFEs"
            v, reason = verdict(e, nfe_a, nfe_b, claim.compute, a=row_name(ka), b=row_name(kb))
            if claim.a == "pso" and BASE in {k[0] for k in keys}:
                base_key = next(k for k in keys if k[0] == BASE)
                parts = []
                for k in (ka, kb):
                    g = stats.paired_diff_ci(bl[k], bl[base_key], stats.mean_over_steps(steps, sel),
                                             n_boot=n_boot, seed=seed)
                    parts.append(f"{label(k[0])} − base {num(g.value, d, True)} {ci_text(g, d, True)}")
                reason += "; " + "; ".join(parts)
            out.append(row | dict(delta=num(e.value, d, True), delta_ci=ci_text(e, d, True), compute=compute_text,
                                  verdict=v, reason=reason + f" (n = {e.n} {e.unit})"))
    return out


# ----------------------------------------------------------------------------------------------- failed, provenance


def failed_cells(results: Results, max_chars: int = 1500) -> list[dict]:
    runs = results.runs[~results.runs["status"].isin(["FINISHED", "RUNNING", "SCHEDULED"])]
    out = []
    for run in runs.itertuples():
        detail = ""
        path = artifact(results.uri, run.run_id, "error.txt")
        if path is not None:
            text = path.read_text(errors="replace").strip()
            detail = text if len(text) <= max_chars else "…" + text[-max_chars:]
        out.append(dict(run_name=run.run_name, status=run.status, cell_id=run.cell_id or "",
                        error=run.error or "(no error tag)", traceback=detail))
    return out


def failed_methods(results: Results, experiment: str, model: str, reward: str) -> dict[str, int]:
    runs = results.runs
    bad = runs[(runs["experiment"] == experiment) & (runs["model"] == model) & (runs["reward"] == reward)
               & ~runs["status"].isin(["FINISHED", "RUNNING", "SCHEDULED"])]
    return bad["method"].value_counts().to_dict()


def _counts(series: pd.Series) -> str:
    series = series.dropna().astype(str)
    if series.empty:
        return "not recorded"
    return ", ".join(f"{v} ({n} runs)" if len(series) > 1 else v for v, n in series.value_counts().items())


def provenance(results: Results) -> dict:
    runs = results.runs
    tags = lambda prefix: sorted({c[len("tags."):] for c in runs.columns if c.startswith("tags." + prefix)})  # noqa: E731
    facts = [
        ("tracking URI", results.uri), ("experiments", ", ".join(results.experiments)),
        ("git commit", _counts(runs["git_commit"])), ("stepbench version", _counts(runs["stepbench_version"])),
        ("device", _counts(runs["device"])),
    ]
    for key, name in (("params.dtype", "dtype"), ("params.prompts", "prompt set"), ("params.eval.n", "eval samples n"),
                      ("params.eval.seed", "eval noise seed"), ("params.eval.steps", "eval step counts")):
        if key in runs:
            facts.append((name, _counts(runs[key])))
    libraries = [(k[len("lib."):], _counts(runs["tags." + k])) for k in tags("lib.")]
    rewards = []
    for reward in sorted(results.scores["reward"].unique()) if len(results.scores) else []:
        info = {"name": reward, "trained": reward in set(results.runs["reward"].dropna())}
        for field_ in ("source", "scale"):
            col = f"tags.reward.{reward}.{field_}"
            info[field_] = _counts(runs[col]) if col in runs else "not recorded"
        opts = [c for c in runs.columns if c.startswith("params.reward.options.")]
        mine = runs[runs.get("params.reward.name", runs["reward"]) == reward]
        info["options"] = "; ".join(f"{c[len('params.reward.options.'):]}={_counts(mine[c])}" for c in opts
                                    if mine[c].notna().any()) or "defaults"
        rewards.append(info)
    cells = [dict(run_name=r.run_name, status=r.status, cell_id=r.cell_id or "", commit=(r.git_commit or "")[:12],
                  device=r.device or "") for r in runs.sort_values("run_name").itertuples()]
    return dict(facts=facts, libraries=libraries, rewards=rewards, cells=cells)


# ----------------------------------------------------------------------------------------------- assembly


def _groups(scores: pd.DataFrame):
    """(experiment, model, training reward) groups; a base-only group is dropped when its model has others."""
    has_trained = scores.groupby(list(GROUP), sort=True)["method"].agg(lambda m: bool((m != BASE).any()))
    keys, trained = list(has_trained.index), set(has_trained[has_trained].index)
    for key in keys:
        if key in trained or not any(t[:2] == key[:2] for t in trained):
            yield key


def build_group(results: Results, key: tuple, *, n_boot: int, seed: int, grid_samples: int, many: bool) -> dict:
    experiment, model, train_reward = key
    scores = results.scores
    group = scores[(scores["experiment"] == experiment) & (scores["model"] == model)
                   & (scores["train_reward"] == train_reward)]
    rows = row_frame(group, scores)
    steps = tuple(int(s) for s in sorted(rows["S"].unique()))
    rewards = sorted(rows["reward"].unique(), key=lambda r: (r != train_reward, r))
    tables = [reward_tables(rows, r, steps, n_boot=n_boot, seed=seed, trained_on=r == train_reward)
              for r in rewards]
    main = tables[0]
    keys = sorted(main.estimates, key=row_order)
    run_sets = group_runs(results, rows)

    by_steps, by_nfe, assumed = [], [], False
    for k in keys:
        e = main.estimates[k]
        y = [e["S"][s].value for s in steps]
        name = row_name(k)
        by_steps.append(plots.Series(name, k[0], list(steps), y, [e["S"][s].lo for s in steps],
                                     [e["S"][s].hi for s in steps]))
        nfe = [inference_nfe_per_image(run_sets.get(k, pd.DataFrame()), main.reward, s) for s in steps]
        assumed |= not all(ok for _, ok in nfe)
        by_nfe.append(plots.Series(name, k[0], [x for x, _ in nfe], y, [], []))
    train_ks = {k[1] for k in keys if k[1] >= 0}
    curves = plots.step_curves(by_steps, by_nfe, main.reward, train_ks)

    points = []
    for k in keys:
        e = main.estimates[k]["mean"]
        x = 0.0 if k[0] in UNTRAINED else train_nfe(run_sets.get(k, pd.DataFrame()))
        if math.isfinite(x):
            points.append(plots.Series(row_name(k), k[0], [x], [e.value],
                                       [e.lo], [e.hi]))
    bl = blocks(rows, main.reward, steps)
    title = f"{model} · trained on {train_reward}" + (f" · {experiment}" if many else "")
    return dict(
        id=re.sub(r"[^a-z0-9]+", "-", f"{experiment}-{model}-{train_reward}".lower()).strip("-"),
        title=title, model=model, train_reward=train_reward, experiment=experiment, steps=steps,
        train_steps=sorted(train_ks), main=main, heldout=tables[1:], curves=curves, nfe_assumed=assumed,
        cost=cost_table(run_sets, keys), cost_plot=plots.cost_scatter(points, main.reward) if points else None,
        grid=image_grid(results, rows, keys, steps, main.reward, grid_samples),
        claims=evaluate_claims(title, bl, run_sets, main.reward, steps, n_boot=n_boot, seed=seed,
                               failed=failed_methods(results, experiment, model, train_reward)),
        n_prompts=int(rows["prompt_idx"].nunique()), n_samples=int(rows["sample_idx"].nunique()),
    )


def build_context(results: Results, *, n_boot: int = stats.N_BOOT, seed: int = 0, grid_samples: int = 3) -> dict:
    runs, scores = results.runs, results.scores
    status = runs["status"].value_counts().to_dict()
    keys = list(_groups(scores)) if len(scores) else []
    many = len({k[0] for k in keys}) > 1
    groups = [build_group(results, k, n_boot=n_boot, seed=seed, grid_samples=grid_samples, many=many) for k in keys]
    problems = list(results.problems)
    if status.get("RUNNING"):
        problems.append(f"{status['RUNNING']} run(s) still RUNNING were left out")
    return dict(
        title="stepbench report", experiments=results.experiments, uri=results.uri,
        generated=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        n_runs=len(runs), status=status, n_images=int(len(scores[["run_id", "S", "sample_idx"]].drop_duplicates()))
        if len(scores) else 0, groups=groups, claims=[c for g in groups for c in g["claims"]],
        failed=failed_cells(results), provenance=provenance(results), problems=problems,
        n_boot=n_boot, seed=seed, level=int(round(100 * stats.LEVEL)),
    )


def render_html(context: dict) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2").render(**context)


def write_pdf(html: str, path: Path) -> Path:
    import logging

    for name in ("weasyprint", "fontTools"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from weasyprint import HTML

    HTML(string=html, base_url=str(path.parent)).write_pdf(path)
    return path


def write_report(results: Results, out: str | Path, *, pdf: bool = True, n_boot: int = stats.N_BOOT, seed: int = 0,
                 grid_samples: int = 3) -> dict[str, Path]:
    """DIR/index.html and (unless pdf=False) DIR/report.pdf from the same HTML."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    html = render_html(build_context(results, n_boot=n_boot, seed=seed, grid_samples=grid_samples))
    paths = {"html": out / "index.html"}
    paths["html"].write_text(html, encoding="utf-8")
    if pdf:
        paths["pdf"] = write_pdf(html, out / "report.pdf")
    return paths
