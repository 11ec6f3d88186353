"""One trial = one benchmark cell: the objective ``study.optimize`` calls, and the probe that reports intermediate
values to the pruner during training."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import socket
import time
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import optuna
import torch
from optuna.storages import fail_stale_trials

import tasks.prompts as prompt_sets
from bench import evaluate as ev
from bench import grid as grids
from bench import tracking
from bench.cell import run_cell
from bench.sweep.conf import compose_cell
from bench.sweep.space import trial_overrides
from bench.validate import ConfigError, check_config


class TrialStopped(RuntimeError):
    """Raised inside a cell's training to stop a trial the pruner rejected."""

    mlflow_status = "KILLED"  # how bench.cell ends the trial's MLflow run (not FAILED: nothing broke)


class TrialFailed(RuntimeError):
    """The trial's cell failed or logged no objective (the trial ends FAIL; the study goes on)."""


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without changing the python, numpy and torch (CPU and CUDA) global RNG streams."""
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        try:
            yield
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])


class Probe:
    """Intermediate evaluations of one trial at NFE milestones (the mean training reward over the objective's step
    counts on the first sweep.intermediate.n validation samples), reported to Optuna (trial.report / should_prune)."""

    def __init__(self, trial, sweep, cfg: dict):
        self.trial, self.sweep, self.eval = trial, sweep, cfg["eval"]
        self.reported: dict[int, float] = {}  # NFE milestone -> probe value
        self.pruned_at: int | None = None
        self.eval_nfe = 0
        self._context: tuple | None = None

    def hook(self, method, policy, task, budget, tracker):
        """bench.cell's train hook, called just before training: returns the tracker the method gets, which
        forwards everything and probes after each log_metrics (the policy is then in a consistent state)."""
        self._context = (method, policy, task.reward, budget)
        probe = self

        class SweepTracker:
            def log_metrics(self, metrics: dict[str, float], step: int) -> None:
                tracker.log_metrics(metrics, step)
                probe.check()

            def __getattr__(self, name: str) -> Any:
                return getattr(tracker, name)

        return SweepTracker()

    def check(self) -> None:
        if self._context is None or self.pruned_at is not None:
            return
        method, policy, reward, budget = self._context
        s, n, nfe = self.sweep, self.sweep.conf.intermediate.n, budget.total_nfe
        crossed = [m for m in s.milestones if m <= nfe and m not in self.reported]
        if not crossed:
            return
        with preserved_rng():
            result = ev.evaluate(method, policy, list(prompt_sets.load(self.eval["prompts"]).val), s.probe_steps,
                                 {s.reward: reward}, split="val", n=n, eval_seed=int(self.eval["val_seed"]),
                                 batch_size=min(int(self.eval["batch_size"]), n), grid_images=0)
        self.eval_nfe += sum(result.nfe.values())
        value = float(result.scores.groupby("S")["value"].mean().mean())
        for milestone in crossed:
            self.trial.report(value, step=milestone)
            self.reported[milestone] = value
        if self.trial.should_prune():
            self.pruned_at = crossed[-1]
            raise TrialStopped(f"pruned by the sweep at {nfe} training NFEs: probe {s.reward} = {value:.4g} "
                               f"is below the other trials at milestone {crossed[-1]}")


class Objective:
    """``study.optimize``'s objective for a prepared sweep (bench.sweep.Sweep)."""

    def __init__(self, sweep):
        self.sweep = sweep

    def __call__(self, trial) -> float:
        s = self.sweep
        params = {key: dim.suggest(trial) for key, dim in s.space.items()}
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        index = f"[trial {trial.number}] "
        if not self.wait_for_slot(trial):
            trial.study.stop()
            print(f"{index}not run: the study already has its {s.conf.n_trials} finished trials", flush=True)
            trial.set_user_attr("error", "not run: the study had its sweep.n_trials finished trials")
            raise TrialFailed("not run: the study had its sweep.n_trials finished trials")
        print(index + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()),
              flush=True)
        try:
            cfg, _ = compose_cell(s.cell_overrides + trial_overrides(s.space, params))
            cfg["with_base"] = False  # the study's base cell runs once, before the trials
            check_config(cfg)
        except ConfigError as err:
            raise self.failed(trial, None, str(err)) from None
        trial.set_user_attr("cell_id", grids.cell_id(cfg))
        probe = Probe(trial, s, cfg)
        tags = {"sweep.study": s.study_name, "sweep.trial": trial.number, "sweep.storage": s.storage.safe_url(),
                "sweep.params": json.dumps(params, sort_keys=True, default=str)}
        # another worker running the very same config: wait, then reuse its run (a cell is a pure function of it)
        while (status := run_cell(cfg, s.grid, index=index, tags=tags, train_hook=probe.hook,
                                  run_name=f"{grids.cell_run_name(cfg)}/trial{trial.number}")) == "running-elsewhere":
            time.sleep(2.0)
        try:
            value = self.outcome(trial, status, probe, index)
        except (TrialFailed, optuna.TrialPruned):
            raise
        except Exception as err:  # noqa: BLE001 - bookkeeping failed (e.g. the MLflow store): the trial FAILs
            traceback.print_exc()
            raise self.failed(trial, status.run_id, f"recording the trial failed: {type(err).__name__}: {err}") \
                from None
        print(f"{index}COMPLETE {s.objective_key} = {value:.4g} (run {status.run_id})", flush=True)
        return value

    def wait_for_slot(self, trial) -> bool:
        """True when the study's finished trials plus the earlier RUNNING ones leave room for this trial; False when
        the study has its n_trials finished trials. While an earlier trial of another worker could still complete
        the study, wait: it finishes, or its worker died and its heartbeat goes stale (Optuna then fails it)."""
        n = self.sweep.conf.n_trials
        while True:
            trials = trial.study.get_trials(deepcopy=False)
            finished = sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
            earlier = sum(t.state.name == "RUNNING" and t.number < trial.number for t in trials)
            if finished >= n:
                return False
            if finished + earlier < n:
                return True
            time.sleep(min(2.0, self.sweep.conf.heartbeat))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental"
                fail_stale_trials(trial.study)

    def outcome(self, trial, status, probe: Probe, index: str) -> float:
        """Tag the cell's run with the trial's fate; the objective value, or TrialPruned / TrialFailed."""
        s, run_id = self.sweep, status.run_id
        run = None if run_id is None else tracking.CellRun(s.store, run_id)
        if run is not None:
            trial.set_user_attr("mlflow_run_id", run_id)
            trial.set_user_attr("mlflow_experiment", tracking.experiment_name(s.grid))
            for milestone, value in probe.reported.items():
                run.log_metrics({"sweep/intermediate": value}, step=milestone)
            run.flush()
        if status == "skipped":
            trial.set_user_attr("reused_run", True)
            print(f"{index}same config as an earlier finished cell: reusing run {run_id}", flush=True)
        if probe.pruned_at is not None:  # the run ended KILLED (TrialStopped.mlflow_status) with the reason as error
            if run is not None:
                run.set_tags({"sweep.state": "PRUNED"})
            value = probe.reported.get(probe.pruned_at)
            print(f"{index}PRUNED at {probe.pruned_at} NFEs" + (f" (probe {value:.4g})" if value is not None else "")
                  + (f" (run {run_id})" if run_id else ""), flush=True)
            raise optuna.TrialPruned(f"pruned at {probe.pruned_at} training NFEs")
        data = s.store.client.get_run(run_id).data if run is not None else None
        if status not in ("finished", "skipped") or run is None:
            raise self.failed(trial, run_id, (data.tags.get("error") if data else None) or f"cell status {status}")
        value = data.metrics.get(s.objective_key)
        if value is None or not math.isfinite(value):
            raise self.failed(trial, run_id, f"the cell logged no finite {s.objective_key}")
        if status != "skipped":
            run.set_tags({"sweep.state": "COMPLETE"})
            run.log_metrics({"sweep/objective": value, "sweep/probe_eval_nfe": probe.eval_nfe})
            run.flush()
        return value

    def failed(self, trial, run_id: str | None, error: str) -> TrialFailed:
        trial.set_user_attr("error", error[:2000])
        if run_id is not None:
            tracking.CellRun(self.sweep.store, run_id).set_tags({"sweep.state": "FAIL"})
        print(f"[trial {trial.number}] FAIL {error}" + (f" (run {run_id})" if run_id else ""), flush=True)
        return TrialFailed(error)
