"""The sweep's result: the best trial's complete method config as ``tuned/<study>.yaml`` (composable as
``method=tuned/<study>``), logged to the best trial's MLflow run with the trials table. An existing file is never
overwritten: a sweep whose result differs writes ``<study>-2.yaml`` (then -3, ...) and says so."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import yaml

from bench import tracking
from bench.sweep.conf import TUNED_DIR, compose_cell
from bench.sweep.space import hydra_value, trial_overrides


def tuned_yaml(sweep, best, name: str) -> str:
    """The best trial's complete method config (recipe values, command-line overrides and the searched values),
    so that method=tuned/<name> needs no recipe."""
    cfg, _ = compose_cell(sweep.cell_overrides + trial_overrides(sweep.space, best.params))
    policy_keys = {k.split(".", 1)[1]: v for k, v in best.params.items() if k.startswith("policy.")}
    run_id = best.user_attrs.get("mlflow_run_id", "?")
    extra = " ".join(o for o in sweep.cell_overrides if not o.startswith("method="))
    lines = [
        f"# python -m bench.run method=tuned/{name} model={sweep.model} reward={sweep.reward} train_steps={sweep.k}",
        f"# Tuned by: python -m bench.sweep method={sweep.method} {extra}".rstrip(),
        f"# study {sweep.study_name} ({sweep.storage.safe_url()}): best of {len(sweep.study.trials)} trials = trial "
        f"{best.number}, {sweep.objective_key} = {best.value:.6g} (MLflow run {run_id}, experiment "
        f"{tracking.experiment_name(sweep.grid)}); budget {sweep.cfg['budget']['nfe']} NFEs, seed {sweep.cfg['seed']}.",
        f"# Searched: {', '.join(d.describe() for d in sweep.space.values())}.",
    ]
    if policy_keys:
        lines.append("# Policy values of the best trial (set them too): "
                     + " ".join(f"policy.{k}={hydra_value(v)}" for k, v in policy_keys.items()))
    lines.append("# Every field is written out (recipe values included), so this file needs no recipe.")
    searched = {k for k in best.params if "." not in k}
    out = []
    for key, value in cfg["method"].items():  # one line per field, in flow style (as bench.conf.generate writes)
        text = yaml.safe_dump({key: value}, default_flow_style=True, width=10_000).strip()[1:-1]
        out.append(text + ("   # searched" if key in searched else ""))
    return "\n".join(lines + out) + "\n"


def write_tuned(sweep, best) -> tuple[Path, str]:
    """Write the tuned config under the first free name <study>.yaml, <study>-2.yaml, ... (a file holding the very
    same text counts as written); each file appears whole and is never replaced (a hard link of a finished temp
    file), so parallel workers finishing together cannot clobber each other or an earlier sweep's result."""
    folder = Path(sweep.conf.tuned_dir).expanduser().resolve() if sweep.conf.tuned_dir else TUNED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        name = sweep.study_name if attempt == 1 else f"{sweep.study_name}-{attempt}"
        path, text = folder / f"{name}.yaml", tuned_yaml(sweep, best, name)
        tmp = folder / f".{name}.yaml.{os.getpid()}.tmp"
        tmp.write_text(text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            if path.read_text() == text:
                return path, text
            continue
        finally:
            tmp.unlink()
        if attempt > 1:
            print(f"tuned config: {folder / (sweep.study_name + '.yaml')} holds an earlier sweep's result and is kept; "
                  f"this sweep's best is {path.name}", flush=True)
        return path, text
    raise FileExistsError(f"{folder}: no free name for the tuned config of {sweep.study_name}")


def log_best(sweep, best, complete: list, name: str, text: str) -> None:
    """Tag the best trial's run sweep.best=true (the other COMPLETE runs false) and log the tuned config and the
    trials table to it."""
    run_id = best.user_attrs.get("mlflow_run_id")
    for trial in complete:
        other = trial.user_attrs.get("mlflow_run_id")
        if other and other != run_id:
            with contextlib.suppress(Exception):
                tracking.CellRun(sweep.store, other).set_tags({"sweep.best": "false"})
    if not run_id:
        return
    run = tracking.CellRun(sweep.store, run_id)
    run.set_tags({"sweep.best": "true"})
    run.log_text(text, f"sweep/{name}")
    run.log_text(sweep.study.trials_dataframe().to_csv(index=False), "sweep/trials.csv")
