"""Results -> report context -> DIR/index.html (Jinja2, autoescaped, self-contained) and DIR/report.pdf (weasyprint).

Sections per (base model, training reward): leaderboard + paired gains over base, held-out rewards, step curves,
cost, image grid; then claims, failed cells, provenance. Every number is computed here from the tidy frame
(reports.frame) with reports.stats; the template only lays them out.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from reports import plots, stats
from reports.frame import (
    BASE,
    GROUP,
    REPORT_SPLIT,
    STANDIN_NOTE,
    SWEEP_PREFIX,
    UNTRAINED,
    Results,
    artifact,
    blocks,
    row_frame,
    text,
)

TEMPLATES = Path(__file__).parent / "templates"
LEVEL_PCT = int(round(100 * stats.LEVEL))
PROVENANCE = "provenance."  # run tags bench.cell sets: CPU model and flags, torch build, float settings


_labels: dict[str, tuple[str, str]] = {}
"""method -> (label, short label): the reported runs' own tags (build_context), else the method class's, else the
name (a method no longer registered, from runs older than the tags)."""


def run_labels(runs: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """method -> (label, short label) from the runs' method_label / method_short_label tags (bench.cell), newest run
    last so it wins."""
    if "tags.method_label" not in runs.columns:
        return {}
    runs = runs.sort_values("start_time") if "start_time" in runs.columns else runs
    short = runs.get("tags.method_short_label", pd.Series("", index=runs.index)).map(text)
    return {method: (long, brief or long) for method, long, brief in
            zip(runs["method"], runs["tags.method_label"].map(text), short) if long}


def label(method: str, short: bool = False) -> str:
    if method not in _labels:
        import methods

        if method not in methods.names():
            return method
        _labels[method] = (methods.label(method), methods.label(method, short=True))
    return _labels[method][1 if short else 0]


def row_name(key: tuple[str, int], short: bool = False) -> str:
    """A leaderboard row as text: the method and, for methods that train, its training step count K."""
    return label(key[0], short) + ("" if key[1] < 0 else f" (K={key[1]})")


def row_order(key: tuple[str, int]) -> tuple:
    """Registered methods in the registry's (sorted) order, base first; others after them."""
    import methods

    order = [BASE, *(m for m in methods.names() if m != BASE)]
    method, k = key
    return (order.index(method) if method in order else len(order), method, k)


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
        return "no interval"
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
    gain_estimates: dict  # row -> {"S": {s: Estimate}, "mean": Estimate, "verdict": {s | "mean": (verdict, p_holm)}}
    paired: dict  # row -> stats.PairedResampled against base (for further paired statistics)


VERDICT_MARK = {stats.BETTER: "better", stats.WORSE: "worse", stats.INCONCLUSIVE: ""}


def gain_cell(e: stats.Estimate, d: int, call: tuple[str, float] | None = None) -> Cell:
    """A paired difference with its interval; green/red when the (Holm-corrected) verdict is better/worse."""
    verdict_, p = call if call is not None else (stats.INCONCLUSIVE, math.nan)
    sub = ci_text(e, d, True) + (f" · {verdict_}" if verdict_ != stats.INCONCLUSIVE else "")
    return Cell(num(e.value, d, True), sub, tone={stats.BETTER: "pos", stats.WORSE: "neg"}.get(verdict_, ""))


def reward_tables(rows: pd.DataFrame, reward: str, steps: tuple[int, ...], *, n_boot: int, seed: int,
                  trained_on: bool) -> RewardTables:
    """Leaderboard (mean [95% CI] per S, mean over S, worst S, step gap, win rate) and paired gains over base with
    better / worse / inconclusive verdicts, Holm-corrected over every cell of the gains table."""
    bl = blocks(rows, reward, steps)
    keys = sorted(bl, key=row_order)
    base_key = next((k for k in keys if k[0] == BASE), None)
    est, gain, wins, paired = {}, {}, {}, {}
    for key in keys:
        r = stats.resample(bl[key], n_boot=n_boot, seed=seed)
        e = {"S": {s: r.estimate(stats.at_step(steps, s)) for s in steps},
             "mean": r.estimate(stats.mean_over_steps(steps)), "worst": r.estimate(stats.worst_step)}
        e["worst_s"] = steps[int(np.nanargmin(r.point))] if np.isfinite(r.point).any() else None
        k = key[1]
        e["gap"] = r.estimate(stats.step_gap(steps, k)) if k in steps and len(steps) > 1 else None
        est[key] = e
        if base_key is not None and key != base_key:
            p = paired[key] = stats.resample_paired(bl[key], bl[base_key], n_boot=n_boot, seed=seed)
            gain[key] = {"S": {s: p.estimate(stats.at_step(steps, s)) for s in steps},
                         "mean": p.estimate(stats.mean_over_steps(steps))}
            wins[key] = stats.win_rate(bl[key], bl[base_key])
    # "beats base" verdicts: one Holm family per column (one S, or the mean over S) over the rows of this table
    for col in (*steps, "mean"):
        column = [gain[k]["S"][col] if col != "mean" else gain[k]["mean"] for k in gain]
        for key, call in zip(gain, stats.verdicts(column)):
            gain[key].setdefault("verdict", {})[col] = call

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
        one_seed = k >= 0 and e["mean"].n < 2  # a trained row from one seed: its seed variance is not covered
        row = [Cell(label(method)), Cell("—" if k < 0 else str(k)),
               Cell(e["mean"].unit, "1 seed: seed variance not covered" if one_seed else "")]
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
        ["Method", "K", "interval over"] + [f"S={s} ↑" for s in steps]
        + ["mean over S ↑", "worst S ↑", "step gap →0", "win rate vs base ↑"], lb_rows,
        caption=f"{reward} ({role}), test split: mean per image [{LEVEL_PCT}% interval over training seeds, "
                f"prompts and noises]. Higher is better. Bold: best in column (step gap: smallest |gap|). "
                f"Shaded: S = the row's training step count K.", numeric_from=3)

    g_rows = []
    for key in keys:
        if key not in gain:
            continue
        g = gain[key]
        cells = [Cell(label(key[0])), Cell("—" if key[1] < 0 else str(key[1]))]
        cells += [gain_cell(g["S"][s], d, g["verdict"][s]) for s in steps] + [gain_cell(g["mean"], d, g["verdict"]["mean"])]
        for s, c in zip(steps, cells[2:]):
            c.shade = s == key[1]
        cells.append(Cell(g["mean"].unit))
        g_rows.append(cells)
    gains = Table(["Method", "K"] + [f"Δ S={s}" for s in steps] + ["Δ mean over S", "interval over"], g_rows,
                  caption=f"{reward}, test split: gain over the base model on the same (prompt, initial noise) pairs "
                          f"[{LEVEL_PCT}% interval]. Verdict better / worse (green / red) when the Holm-adjusted "
                          f"p-value is below {stats.ALPHA:.2f}; each column is one family over its {len(gain)} rows, "
                          f"so a cell whose interval excludes 0 can still be inconclusive.", numeric_from=2)
    return RewardTables(reward, leaderboard, gains, est, gain, paired)


def step_generalization(main: RewardTables, steps: tuple[int, ...]) -> list[dict]:
    """Per training step count K: each trained row's gain over base at S = K against its gains at S != K, and
    (mean gain over S != K) - (gain at S = K) with its interval; verdicts Holm-corrected over that column of every
    K of the group (0: the gain carries over to untrained step counts; worse: it shrinks away from K)."""
    by_k: dict[int, list] = {}
    for key in sorted(main.paired, key=row_order):
        if key[1] in steps and len(steps) > 1:
            by_k.setdefault(key[1], []).append(key)
    diffs = {key: main.paired[key].estimate(stats.off_k_minus_at_k(steps, key[1])) for keys in by_k.values()
             for key in keys}
    calls = dict(zip(diffs, stats.verdicts(list(diffs.values()))))
    d = decimals([e.value for g in main.gain_estimates.values() for e in g["S"].values()])
    out = []
    for k, keys in sorted(by_k.items()):
        off = [s for s in steps if s != k]
        rows, found = [], []
        for key in keys:
            g = main.gain_estimates[key]
            at_k = g["S"][k]
            mean_off = main.paired[key].estimate(stats.mean_over_steps(steps, off))
            found.append(dict(key=key, at_k=at_k, off=mean_off, diff=diffs[key], verdict=calls[key][0],
                              p_holm=calls[key][1]))
            rows.append([Cell(label(key[0])), gain_cell(at_k, d, g["verdict"][k])]
                        + [gain_cell(g["S"][s], d, g["verdict"][s]) for s in off]
                        + [gain_cell(mean_off, d), gain_cell(diffs[key], d, calls[key]), Cell(diffs[key].unit)])
            rows[-1][1].shade = True
        out.append(dict(k=k, rows=found, table=Table(
            ["Method", f"Δ S={k} (=K)"] + [f"Δ S={s}" for s in off] + ["Δ mean S≠K", "Δ(S≠K) − Δ(S=K)", "interval over"],
            rows, caption=f"Trained at K = {k}: gain over base at the training step count (shaded) and at the step "
                          f"counts it was not trained at, test split, [{LEVEL_PCT}% interval]. Last column: mean "
                          f"gain over S ≠ K minus the gain at S = K (0: the gain carries over); its verdicts are "
                          f"Holm-corrected over that column for every K of this model and reward "
                          f"({len(diffs)} comparisons); the per-S verdicts are those of the gains table.",
            numeric_from=1)))
    return out


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
    """NFEs per test image at S: ``cost/eval_nfe/test/s<S>`` over ``eval/test/<reward>/s<S>/n`` (stores from before
    the splits: ``cost/eval_nfe/s<S>`` over ``eval/<reward>/s<S>/n``); else S (assumed)."""
    for total_key, n_key in ((f"cost/eval_nfe/{REPORT_SPLIT}/s{s}", f"eval/{REPORT_SPLIT}/{reward}/s{s}/n"),
                             (f"cost/eval_nfe/s{s}", f"eval/{reward}/s{s}/n")):
        total, n = metric_mean(runs, total_key), metric_mean(runs, n_key)
        if math.isfinite(total) and math.isfinite(n) and n > 0:
            return total / n, True
    return float(s), False


def eval_nfe(runs: pd.DataFrame) -> float:
    """Evaluation NFEs of the test split (all S) per run; ``cost/eval_nfe`` (every split) in older stores."""
    per_s = [c[len("metrics."):] for c in runs.columns if re.fullmatch(rf"metrics\.cost/eval_nfe/{REPORT_SPLIT}/s\d+", c)]
    if per_s:
        return sum(metric_mean(runs, key) for key in per_s)
    return metric_mean(runs, "cost/eval_nfe")


def cost_table(run_sets: dict, keys: list) -> Table:
    """Compute and resources per row, from the cost/* metrics bench.cell logs (mean over the row's runs)."""
    columns = [("training NFEs", si, lambda r: train_nfe(r)),
               ("reward calls", si, lambda r: metric_mean(r, "cost/reward_calls")),
               ("test eval NFEs", si, eval_nfe),
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
                         "test eval NFEs (all S, the test split) include inference-time search; wall time covers "
                         "training and evaluation of every split.", numeric_from=2)


# ----------------------------------------------------------------------------------------------- image grid

TILE_PX = 128  # tiles larger than this are downscaled in the report
ATTRIBUTES = (("colour", "toy-color"), ("shape", "toy-shape"), ("count", "toy-count"))  # the toy verifier's checks


def sample_arrays(uri: str, run_id: str, s: int) -> dict[int, np.ndarray]:
    """sample_idx -> image (H, W, 3) uint8 from a run's ``eval/test/samples_s<S>.npz`` (bench.evaluate logs the
    first k samples of each split and S with their prompt and noise ids); {} when the run has none."""
    path = artifact(uri, run_id, f"eval/{REPORT_SPLIT}/samples_s{s}.npz")
    if path is None:
        return {}
    with np.load(path, allow_pickle=False) as npz:
        return {int(j): img for j, img in zip(npz["sample_idx"], npz["images"])}


def tile_uri(image: np.ndarray) -> str:
    from PIL import Image

    tile = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    tile.thumbnail((TILE_PX, TILE_PX), Image.Resampling.LANCZOS)  # large models: keep the report small
    buf = io.BytesIO()
    tile.save(buf, format="PNG")
    return png_uri(buf.getvalue())


def failed_attributes(scores: dict[str, float]) -> list[str]:
    """The toy verifier's checks an image failed, from its per-image attribute scores (colour from toy-mean3 when
    toy-color itself was not scored: mean3 = (colour + shape + count) / 3)."""
    got = {name: scores.get(reward) for name, reward in ATTRIBUTES}
    if got["colour"] is None and None not in (scores.get("toy-mean3"), got["shape"], got["count"]):
        got["colour"] = round(3 * scores["toy-mean3"] - got["shape"] - got["count"], 6)
    return [name for name, v in got.items() if v is not None and v < 1]


def image_grid(results: Results, rows: pd.DataFrame, keys: list, steps: tuple[int, ...], reward: str,
               n_samples: int) -> dict:
    """The samples on which the rows disagree most: one table per sample (the same prompt and initial noise in every
    tile), rows = methods (their lowest training seed), columns = S; under each tile its score and, on the toy
    world, which attribute checks it failed. Images come from the logged arrays (``sample_arrays``)."""
    chosen = {}  # row -> (run_id, seed)
    for key in keys:
        part = rows[(rows["method"] == key[0]) & (rows["train_steps"] == key[1])]
        if len(part):
            seed = int(part["seed"].min())
            chosen[key] = (part.loc[part["seed"] == seed, "run_id"].iloc[0], seed)
    images, missing = {}, []
    for key, (run_id, _) in chosen.items():
        absent = []
        for s in steps:
            arrays = sample_arrays(results.uri, run_id, s)
            if not arrays:
                absent.append(str(s))
            images.update({(key, s, j): img for j, img in arrays.items()})
        if absent:
            missing.append(f"{row_name(key, short=True)} at S = {', '.join(absent)}")
    if missing and not images:
        missing = [f"no run logged eval/{REPORT_SPLIT}/samples_s<S>.npz (runs from before the sample arrays)"]
    run_ids = [r for r, _ in chosen.values()]
    mine = rows[rows["run_id"].isin(run_ids)]
    per_image = mine.pivot_table(index=["run_id", "S", "sample_idx"], columns="reward", values="value", aggfunc="first")
    shown = sorted({j for (_, _, j) in images})
    if reward in per_image and shown:
        # disagreement of a sample: the spread of the rows' scores, averaged over S
        table = per_image[reward].unstack("run_id")  # (S, sample_idx) x run
        spread = (table.max(axis=1) - table.min(axis=1)).groupby(level="sample_idx").mean()
        spread = spread.reindex(shown).fillna(-1.0)
        shown = sorted(shown, key=lambda j: (-spread[j], j))
    shown = shown[:n_samples]
    d = decimals(mine.loc[mine["reward"] == reward, "value"].tolist())
    prompts = mine.drop_duplicates("sample_idx").set_index("sample_idx")
    samples = []
    for j in shown:
        table = []
        for key, (run_id, _) in chosen.items():
            tiles = []
            for s in steps:
                img = images.get((key, s, j))
                scores = per_image.loc[(run_id, s, j)].dropna().to_dict() if (run_id, s, j) in per_image.index else {}
                score = scores.get(reward)
                fails = failed_attributes(scores)
                tiles.append({"uri": tile_uri(img) if img is not None else None,
                              "score": "" if score is None else num(score, d), "fails": ", ".join(fails),
                              "shade": s == key[1]})
            table.append({"label": row_name(key, short=True), "tiles": tiles})
        first = prompts.loc[j] if j in prompts.index else None
        samples.append({"sample_idx": int(j), "prompt_idx": int(first["prompt_idx"]) if first is not None else -1,
                        "prompt": first["prompt"] if first is not None else "", "rows": table})
    return {"samples": samples, "steps": steps, "reward": reward, "missing": missing, "any": bool(images)}


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
    Claim("GRPO", "GRPO's group baseline and KL to the reference change step generalization: GRPO beats DDPO at the "
          "step counts neither was trained at", "grpo", "ddpo", "untrained"),
    Claim("DiffusionNFT", "NFT beats GRPO at equal training NFEs", "nft", "grpo", "all", "train"),
    Claim("Inference-time scaling", "A trained method beats inference-time search at equal total NFEs "
          "(training + evaluation)", "*", "inference_scaling", "all", "total"),
)
COMPUTE_TOLERANCE = 0.10  # budgets within 10 % count as equal


def claim_verdict(call: str, nfe_a: float = float("nan"), nfe_b: float = float("nan"), compute: str | None = None,
                  a: str = "A", b: str = "B") -> tuple[str, str]:
    """(verdict, reason) of a claim "A beats B" from its Holm-corrected call (better / worse / inconclusive).
    Where compute matters, better needs A to have used no more NFEs than B (within 10 %) and worse no fewer;
    otherwise the comparison is inconclusive (the compute difference could explain it)."""
    if call == stats.INCONCLUSIVE:
        return stats.INCONCLUSIVE, "not significant after Holm correction"
    if compute is not None:
        if not (math.isfinite(nfe_a) and math.isfinite(nfe_b)):
            return stats.INCONCLUSIVE, "compute (NFEs) not recorded"
        if call == stats.BETTER and nfe_a > nfe_b * (1 + COMPUTE_TOLERANCE):
            return stats.INCONCLUSIVE, f"{a} is better but used more NFEs than {b}"
        if call == stats.WORSE and nfe_a < nfe_b * (1 - COMPUTE_TOLERANCE):
            return stats.INCONCLUSIVE, f"{a} is worse but used fewer NFEs than {b}"
        return call, f"{a} {call} than {b} at {'no more' if call == stats.BETTER else 'no less'} compute"
    return call, f"{a} {call} than {b}"


def claim_steps(claim: Claim, steps: tuple[int, ...], ka: int, kb: int) -> tuple[int, ...]:
    if claim.steps == "untrained":
        return tuple(s for s in steps if s not in (ka, kb))
    if claim.steps == "few":
        return tuple(s for s in steps if s <= 2) or steps[:1]
    return steps


def evaluate_claims(title: str, bl: dict, run_sets: dict, reward: str, steps: tuple[int, ...], *,
                    n_boot: int, seed: int, failed: dict[str, int] | None = None) -> list[dict]:
    """One row per claim and compared (A, B) pair of rows in this group; ``failed`` counts failed cells per method.
    Rows that were compared carry their Estimate under "estimate"; ``decide_claims`` gives the verdicts."""
    failed = failed or {}
    out = []
    keys = sorted(bl, key=row_order)
    d = decimals([np.nanmean(b.values) for b in bl.values()] or [1.0])
    for claim in CLAIMS:
        rows_a = [k for k in keys if (k[0] not in UNTRAINED if claim.a == "*" else k[0] == claim.a)]
        rows_b = [k for k in keys if k[0] == claim.b]
        base = dict(group=title, source=claim.source, claim=claim.text, estimate=None)
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
                out.append(row | dict(delta="", delta_ci="", compute="", verdict=stats.INCONCLUSIVE,
                                      reason="no evaluated step count outside both training step counts"))
                continue
            e = stats.paired_diff_ci(bl[ka], bl[kb], stats.mean_over_steps(steps, sel), n_boot=n_boot, seed=seed)
            nfe_a = nfe_b = float("nan")
            compute_text = ""
            if claim.compute:
                ra, rb = run_sets.get(ka, pd.DataFrame()), run_sets.get(kb, pd.DataFrame())
                nfe_a, nfe_b = train_nfe(ra), train_nfe(rb)
                if claim.compute == "total":
                    nfe_a += eval_nfe(ra)
                    nfe_b += eval_nfe(rb)
                compute_text = f"{si(nfe_a)} vs {si(nfe_b)} {claim.compute} NFEs"
            note = ""
            if claim.a == "pso" and BASE in {k[0] for k in keys}:
                base_key = next(k for k in keys if k[0] == BASE)
                parts = []
                for k in (ka, kb):
                    g = stats.paired_diff_ci(bl[k], bl[base_key], stats.mean_over_steps(steps, sel),
                                             n_boot=n_boot, seed=seed)
                    parts.append(f"{label(k[0])} − base {num(g.value, d, True)} {ci_text(g, d, True)}")
                note = "; " + "; ".join(parts)
            out.append(row | dict(delta=num(e.value, d, True), delta_ci=ci_text(e, d, True), compute=compute_text,
                                  estimate=e, nfe=(nfe_a, nfe_b), kind=claim.compute, names=(row_name(ka), row_name(kb)),
                                  note=note + f" (interval over {e.unit})"))
    return out


def decide_claims(claims: list[dict]) -> list[dict]:
    """Verdicts for the whole claims table: Holm over every compared row (one family), then the compute rule."""
    compared = [c for c in claims if c.get("estimate") is not None]
    for c, (call, p) in zip(compared, stats.verdicts([c["estimate"] for c in compared])):
        v, reason = claim_verdict(call, *c["nfe"], c["kind"], *c["names"])
        c.update(verdict=v, p_holm=p, reason=f"{reason}; Holm-adjusted p = {p:.3g} over {len(compared)} "
                                             f"comparisons{c['note']}")
    return claims


# ----------------------------------------------------------------------------------------------- failed, provenance


def failed_cells(results: Results, max_chars: int = 1500) -> list[dict]:
    runs = results.runs[~results.runs["status"].isin(["FINISHED", "RUNNING", "SCHEDULED"])]
    out = []
    for run in runs.itertuples():
        detail = ""
        path = artifact(results.uri, run.run_id, "error.txt")
        if path is not None:
            trace = path.read_text(errors="replace").strip()
            detail = trace if len(trace) <= max_chars else "…" + trace[-max_chars:]
        out.append(dict(run_name=run.run_name, status=run.status, cell_id=text(run.cell_id),
                        error=text(run.error) or "(no error tag)", traceback=detail))
    return out


def row_vs_paper(results: Results) -> list[dict]:
    """The "row vs paper" table from the runs' `paper` / `paper_deviations` tags (written by bench.cell from each
    method's Deviation records; the README's table is the same data): per method of the report, the newest run's."""
    runs = results.runs
    if "tags.paper_deviations" not in runs.columns:
        return []
    runs = runs[runs["tags.paper_deviations"].map(text) != ""]
    if "start_time" in runs.columns:
        runs = runs.sort_values("start_time")
    out = []
    for method, run in runs.groupby("method").tail(1).set_index("method").sort_index().iterrows():
        paper = text(run.get("tags.paper", ""))
        for what, why, where in json.loads(text(run["tags.paper_deviations"])):
            out.append(dict(method=method, paper=paper, deviation=what, reason=why, file=where))
    return out


def failed_methods(results: Results, experiment: str, model: str, reward: str) -> dict[str, int]:
    runs = results.runs
    bad = runs[(runs["experiment"] == experiment) & (runs["model"] == model) & (runs["reward"] == reward)
               & ~runs["status"].isin(["FINISHED", "RUNNING", "SCHEDULED"])]
    return bad["method"].value_counts().to_dict()


def _counts(series: pd.Series) -> str:
    series = series.map(text)
    series = series[series != ""]
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
    facts += [(k, _counts(runs["tags." + k])) for k in tags(PROVENANCE)]  # CPU, torch build, float settings
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
    cells = [dict(run_name=r.run_name, status=r.status, cell_id=text(r.cell_id), commit=text(r.git_commit)[:12],
                  device=text(r.device)) for r in runs.sort_values("run_name").itertuples()]
    return dict(facts=facts, libraries=libraries, rewards=rewards, cells=cells)


# ----------------------------------------------------------------------------------------------- assembly


def _groups(scores: pd.DataFrame):
    """(experiment, model, training reward) groups; a base-only group is dropped when its model has others."""
    has_trained = scores.groupby(list(GROUP), sort=True)["method"].agg(lambda m: bool((m != BASE).any()))
    keys, trained = list(has_trained.index), set(has_trained[has_trained].index)
    for key in keys:
        if key in trained or not any(t[:2] == key[:2] for t in trained):
            yield key


def build_group(results: Results, key: tuple, *, n_boot: int, seed: int, grid_samples: int, many: bool,
                figures: bool = True) -> dict:
    """One (experiment, model, training reward) section; ``figures=False`` leaves out plots and image grids (the
    README and replicate need the numbers only)."""
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
                                     [e["S"][s].hi for s in steps], k[1]))
        nfe = [inference_nfe_per_image(run_sets.get(k, pd.DataFrame()), main.reward, s) for s in steps]
        assumed |= not all(ok for _, ok in nfe)
        by_nfe.append(plots.Series(name, k[0], [x for x, _ in nfe], y, [], [], k[1]))
    train_ks = {k[1] for k in keys if k[1] >= 0}
    curves = plots.step_curves(by_steps, by_nfe, main.reward, train_ks) if figures else None

    points = []
    for k in keys:
        e = main.estimates[k]["mean"]
        x = 0.0 if k[0] in UNTRAINED else train_nfe(run_sets.get(k, pd.DataFrame()))
        if math.isfinite(x):
            points.append(plots.Series(row_name(k), k[0], [x], [e.value], [e.lo], [e.hi], k[1]))
    bl = blocks(rows, main.reward, steps)
    title = f"{model} · trained on {train_reward}" + (f" · {experiment}" if many else "")
    if experiment.startswith(SWEEP_PREFIX):  # asked for with --sweeps: its rows are the best trials' tuned configs
        title += f" · tuned config (best trial) of sweep {experiment[len(SWEEP_PREFIX):]}"
    return dict(
        id=re.sub(r"[^a-z0-9]+", "-", f"{experiment}-{model}-{train_reward}".lower()).strip("-"),
        title=title, model=model, train_reward=train_reward, experiment=experiment, steps=steps,
        train_steps=sorted(train_ks), main=main, heldout=tables[1:], curves=curves, nfe_assumed=assumed,
        stepgen=step_generalization(main, steps),
        cost=cost_table(run_sets, keys), cost_plot=plots.cost_scatter(points, main.reward) if points and figures else None,
        grid=image_grid(results, rows, keys, steps, main.reward, grid_samples) if figures else None,
        claims=evaluate_claims(title, bl, run_sets, main.reward, steps, n_boot=n_boot, seed=seed,
                               failed=failed_methods(results, experiment, model, train_reward)),
        n_prompts=int(rows["prompt_idx"].nunique()), n_samples=int(rows["sample_idx"].nunique()),
    )


def build_context(results: Results, *, n_boot: int = stats.N_BOOT, seed: int = 0, grid_samples: int = 3,
                  figures: bool = True) -> dict:
    runs, scores = results.runs, results.scores
    _labels.clear()
    _labels.update(run_labels(runs))
    status = runs["status"].value_counts().to_dict()
    keys = list(_groups(scores)) if len(scores) else []
    many = len({k[0] for k in keys}) > 1
    groups = [build_group(results, k, n_boot=n_boot, seed=seed, grid_samples=grid_samples, many=many, figures=figures)
              for k in keys]
    problems = list(results.problems)
    if status.get("RUNNING"):
        problems.append(f"{status['RUNNING']} run(s) still RUNNING were left out")
    return dict(
        title=(f"{STANDIN_NOTE} · " if results.standin else "") + "stepbench report", standin=results.standin,
        standin_note=STANDIN_NOTE, split=REPORT_SPLIT, alpha=stats.ALPHA, experiments=results.experiments, uri=results.uri,
        generated=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        n_runs=len(runs), status=status, n_images=int(len(scores[["run_id", "S", "sample_idx"]].drop_duplicates()))
        if len(scores) else 0, groups=groups, claims=decide_claims([c for g in groups for c in g["claims"]]),
        failed=failed_cells(results), provenance=provenance(results), problems=problems,
        deviations=row_vs_paper(results),
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
