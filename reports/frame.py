"""MLflow -> one tidy pandas frame (one row per image score), read through bench.tracking only.

``load(uri, experiments)`` returns ``Results``:
- ``scores``: the tidy frame of the **test split** (leaderboards, claims and the README read test only; tuning reads
  validation, never shown here). Columns: experiment, run_id, run_name, cell_id, method, model, train_reward (the
  reward the cell trained on), train_steps (K), seed (training seed), split, reward (the reward this image was
  scored with), S (evaluation step count), prompt_idx, sample_idx, prompt, value. FINISHED runs only.
- ``runs``: one row per run of every status (costs, error text, provenance tags, params).

Experiments: every ``stepbench/*`` one except the sweeps' (``stepbench/sweep/*``: trials of many configs at one
grid position), which are read only when named or asked for; of a sweep, only the best trial (tag
``sweep.best=true``, the tuned config) is a row. ``Results.standin`` is true when runs come from a random-weight
stand-in (``recipe=standin``, bench/standin.py): every page of such a report says it is not a result.

``blocks(group, reward, steps)`` turns one (experiment, model, training reward) group into aligned per-row
arrays for reports.stats: a *row* is (method, K); its Block holds (seeds, pairs, S) scores where a pair is one
(prompt_idx, sample_idx), the same prompt and initial noise for every method.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bench import tracking
from reports.stats import Block

BASE = "base"
UNTRAINED = (BASE, "inference_scaling")  # methods that train nothing: their K is meaningless (-1 in rows)
ROW = ("method", "train_steps")  # a leaderboard row
GROUP = ("experiment", "model", "train_reward")  # one leaderboard
SCORE_COLUMNS = ["experiment", "run_id", "run_name", "cell_id", "method", "model", "train_reward", "train_steps",
                 "seed", "split", "reward", "S", "prompt_idx", "sample_idx", "prompt", "value"]
REPORT_SPLIT = "test"  # the only split a leaderboard, claim or README number is computed from
SWEEP_PREFIX = tracking.EXPERIMENT_PREFIX + "sweep/"
STANDIN_RECIPE = "standin"  # bench/standin.py runs every cell with recipe=standin (the run's `recipe` tag)
STANDIN_NOTE = "random-weight stand-in: not a result"


class ReportInputError(Exception):
    """Input the user can fix (no store, unknown experiment, no runs): printed as one message, exit code 2."""


@dataclass
class Results:
    uri: str
    experiments: list[str]
    runs: pd.DataFrame  # one row per run
    scores: pd.DataFrame  # one row per image score (the tidy frame)
    problems: list[str] = field(default_factory=list)  # non-fatal: listed in the report
    standin: bool = False  # runs of a random-weight stand-in (bench/standin.py): numbers mean nothing


# ----------------------------------------------------------------------------------------------- loading


def _check_store(uri: str) -> str:
    """Refuse a SQLite store that does not exist (MLflow would silently create an empty one)."""
    uri = tracking.resolve_uri(uri)
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise ReportInputError(f"no MLflow store at {path} (tracking URI {uri}); run a grid first, "
                                   f"e.g. python -m bench.run, or pass --tracking-uri")
        return uri
    try:
        tracking.check_uri(uri)
    except tracking.TrackingURIError as err:
        raise ReportInputError(str(err)) from None
    return uri


def resolve_experiments(uri: str, requested: list[str] | None = None, latest: bool = False,
                        sweeps: bool = False) -> list[str]:
    """Full experiment names: the requested ones ("toy" or "stepbench/toy"), else every stepbench/* experiment
    except the sweeps' (stepbench/sweep/*) unless ``sweeps``."""
    available = tracking.list_experiments(uri)
    if not available:
        raise ReportInputError(f"no stepbench experiments in {uri}; run a grid first (python -m bench.run)")
    if not requested:
        names = [n for n in available if sweeps or not n.startswith(SWEEP_PREFIX)]
        if not names:
            raise ReportInputError(f"only sweep experiments in {uri} ({', '.join(available)}); name one with "
                                   f"--experiment or pass --sweeps")
    else:
        names = []
        for name in requested:
            full = name if name.startswith(tracking.EXPERIMENT_PREFIX) else tracking.experiment_name(name)
            if full not in available:
                raise ReportInputError(f"unknown experiment '{name}'; available: {', '.join(available)}")
            names.append(full)
    if latest and len(names) > 1:
        starts = {n: tracking.load_runs(uri, n).get("start_time", pd.Series(dtype="datetime64[ns]")).max()
                  for n in names}
        names = [max((n for n in names if pd.notna(starts[n])), key=starts.get, default=names[-1])]
    return names


def _runs_table(frame: pd.DataFrame, experiment: str) -> pd.DataFrame:
    frame = frame.copy()
    frame.insert(0, "experiment", experiment)
    for col, tag in (("error", "tags.error"), ("git_commit", "tags.git_commit"), ("recipe", "tags.recipe"),
                     ("stepbench_version", "tags.stepbench_version"), ("device", "tags.device")):
        # a run without the tag has None (or NaN after a concat): text columns hold "" then, never a float
        frame[col] = frame[tag].map(text) if tag in frame else ""
    for col in [c for c in frame.columns if c.startswith("metrics.cost/")]:
        frame[col[len("metrics."):]] = pd.to_numeric(frame[col], errors="coerce")
    return frame


def text(value) -> str:
    """A tag's value as text: "" for a missing tag (None or NaN)."""
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


def tidy(runs: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """Join per-image scores with their run's cell tags (the run's tags are authoritative for the cell)."""
    cell = runs[["run_id", "experiment", "run_name", "cell_id", "method", "model", "reward", "train_steps", "seed"]]
    cell = cell.rename(columns={"reward": "train_reward"})
    scores = scores[["run_id", "split", "prompt", "prompt_idx", "sample_idx", "S", "reward", "value"]]
    frame = scores.merge(cell, on="run_id", how="inner", validate="many_to_one")
    for col in ("S", "prompt_idx", "sample_idx", "train_steps", "seed"):
        frame[col] = pd.to_numeric(frame[col]).astype("int64")
    frame["value"] = pd.to_numeric(frame["value"]).astype("float64")
    return frame[SCORE_COLUMNS].reset_index(drop=True)


def _sweep_best(runs: pd.DataFrame, problems: list[str]) -> pd.DataFrame:
    """Of a sweep experiment's runs, the best trials (tag sweep.best=true: the tuned config); the rest are trials."""
    sweep = runs["experiment"].str.startswith(SWEEP_PREFIX)
    if not sweep.any():
        return runs
    best = runs.get("tags.sweep.best", pd.Series("", index=runs.index)).map(text) == "true"
    dropped = sweep & ~best
    for experiment, n in runs.loc[dropped, "experiment"].value_counts().items():
        problems.append(f"{experiment}: {n} sweep trial run(s) left out; a sweep is reported by its best trial "
                        f"(the tuned config, tag sweep.best=true)")
    return runs[~dropped]


def test_split(pieces: list[pd.DataFrame], problems: list[str]) -> pd.DataFrame:
    """Only the test split's scores of each run. A run scored before the split protocol has no `split` column: its
    rows are read as the evaluation split they were, with a note (those prompts and noises were also tuned on)."""
    legacy = [p for p in pieces if "split" not in p]
    if legacy:
        problems.append(f"{len(legacy)} run(s) were scored before the train/val/test protocol (no split in "
                        f"eval/scores.parquet): their evaluation prompts and noise were also used for tuning, so "
                        f"their numbers are not held-out test numbers")
    scores = pd.concat([p if "split" in p else p.assign(split=REPORT_SPLIT) for p in pieces], ignore_index=True)
    split = scores["split"].astype(str)
    if len(scores) and not (split == REPORT_SPLIT).any():
        problems.append(f"no {REPORT_SPLIT}-split scores (splits present: {', '.join(sorted(split.unique()))}); "
                        f"the report reads the {REPORT_SPLIT} split only")
    return scores[split == REPORT_SPLIT]


def load(uri: str | None = None, experiments: list[str] | None = None, *, latest: bool = False,
         sweeps: bool = False) -> Results:
    """Everything the report shows, read through bench.tracking: test-split scores of FINISHED runs."""
    uri = _check_store(uri or tracking.DEFAULT_URI)
    names = resolve_experiments(uri, experiments, latest, sweeps)
    runs = pd.concat([_runs_table(tracking.load_runs(uri, n), n) for n in names], ignore_index=True)
    if runs.empty:
        raise ReportInputError(f"experiment(s) {', '.join(names)} in {uri} have no runs")
    problems: list[str] = []
    runs = _sweep_best(runs, problems)
    untagged = runs[["method", "model", "reward"]].isna().any(axis=1)
    if untagged.any():
        problems.append(f"{int(untagged.sum())} run(s) without the method/model/reward tags of a stepbench cell "
                        f"ignored: {', '.join(map(str, runs.loc[untagged, 'run_name']))}")
    finished = runs[(runs["status"] == "FINISHED") & ~untagged]
    # a cell re-run after finishing would count twice; keep its newest FINISHED run
    cell = finished["cell_id"].fillna(finished["run_id"])
    newest = finished.assign(_cell=cell).sort_values("start_time").drop_duplicates(["experiment", "_cell"], keep="last")
    for run_name in finished.loc[~finished.index.isin(newest.index), "run_name"]:
        problems.append(f"older duplicate FINISHED run of cell {run_name} ignored")
    # one run per grid position (method/model/reward/K/seed): after a config change (a retuned preset) the grid reruns
    # those cells under new cell ids; mixing both configs into one row would be wrong, so the newest config wins
    latest = newest.drop_duplicates(["experiment", "run_name"], keep="last")
    for _, run in newest.loc[~newest.index.isin(latest.index)].iterrows():
        problems.append(f"{run['run_name']}: FINISHED run of an older config (cell {run['_cell']}) superseded by a "
                        f"newer run of another config, ignored")
    newest = latest
    pieces = []
    for run in newest.itertuples():
        try:
            pieces.append(tracking.load_scores(uri, [run.run_id]))
        except Exception as err:  # a missing artifact must not hide every other run
            problems.append(f"{run.run_name}: per-image scores unreadable ({type(err).__name__}: {err})")
    scores = test_split(pieces, problems) if pieces else pd.DataFrame(columns=SCORE_COLUMNS)
    frame = tidy(runs, scores) if len(scores) else pd.DataFrame(columns=SCORE_COLUMNS)
    return Results(uri, names, runs, frame, problems, standin=bool((runs["recipe"] == STANDIN_RECIPE).any()))


@functools.cache
def _artifact_dir(uri: str, run_id: str, folder: str) -> Path | None:
    """A run's artifact folder as a local directory, fetched once (one MLflow round trip per run and folder)."""
    try:
        local = tracking.artifact_path(uri, run_id, folder)
    except Exception:  # no such folder (e.g. a cell that failed before evaluating)
        return None
    return local if local.is_dir() else None


def artifact(uri: str, run_id: str, path: str) -> Path | None:
    """A run's artifact (e.g. ``eval/grid_s4.png``) as a local file, or None when it does not exist."""
    folder, _, name = path.rpartition("/")
    if folder:
        local = _artifact_dir(uri, run_id, folder)
        local = local / name if local is not None else None
    else:
        try:
            local = tracking.artifact_path(uri, run_id, path)
        except Exception:
            return None
    return local if local is not None and local.is_file() else None


# ----------------------------------------------------------------------------------------------- arrays


def base_rows(group: pd.DataFrame, all_scores: pd.DataFrame) -> pd.DataFrame:
    """The base model's scores for a group: its own base cells, else any base cell of the same model."""
    own = group[group["method"] == BASE]
    if len(own):
        return own
    experiment, model = group["experiment"].iloc[0], group["model"].iloc[0]
    other = all_scores[(all_scores["experiment"] == experiment) & (all_scores["model"] == model)
                       & (all_scores["method"] == BASE)]
    # the base model is the same whatever reward its cell was filed under: take one such cell's runs
    return other[other["train_reward"] == other["train_reward"].min()] if len(other) else other


def row_frame(group: pd.DataFrame, all_scores: pd.DataFrame) -> pd.DataFrame:
    """The group's scores with the base row attached; methods that train nothing get train_steps -1 (no K)."""
    rows = pd.concat([group[group["method"] != BASE], base_rows(group, all_scores)], ignore_index=True)
    rows.loc[rows["method"].isin(UNTRAINED), "train_steps"] = -1
    return rows


def blocks(rows: pd.DataFrame, reward: str, steps: tuple[int, ...]) -> dict[tuple[str, int], Block]:
    """One Block per (method, K) row under one reward, all aligned on the same pairs and steps."""
    sub = rows[(rows["reward"] == reward) & rows["S"].isin(steps)]
    pairs = sorted(set(zip(sub["prompt_idx"], sub["sample_idx"])))
    columns = pd.MultiIndex.from_tuples([(p, j, s) for p, j in pairs for s in steps],
                                        names=["prompt_idx", "sample_idx", "S"])
    prompts = np.array([p for p, _ in pairs])
    out = {}
    for key, part in sub.groupby(list(ROW), sort=False):
        table = part.pivot_table(index="seed", columns=["prompt_idx", "sample_idx", "S"], values="value",
                                 aggfunc="mean").reindex(columns=columns)
        values = table.to_numpy(dtype=float).reshape(len(table), len(pairs), len(steps))
        out[(key[0], int(key[1]))] = Block(values, prompts, tuple(steps))
    return out
