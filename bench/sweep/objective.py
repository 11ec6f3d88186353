"""One trial = one benchmark cell: the objective ``study.optimize`` calls, and the probe that reports intermediate
values to the pruner during training."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Iterator
from typing import Any

from bench import grid as grids
from bench import tracking
from bench.sweep.conf import compose_cell
from bench.sweep.space import trial_overrides
from bench.validate import ConfigError


class TrialStopped(RuntimeError):
    """Raised inside a cell's training to stop a trial the pruner rejected."""

    mlflow_status = "KILLED"
    """How bench.cell ends the trial's MLflow run (not FAILED: nothing broke)."""


class TrialFailed(RuntimeError):
    """The trial's cell failed or logged no objective (the trial ends FAIL; the study goes on)."""


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without changing the python, numpy and torch global RNG streams (training stays reproducible)."""
    import random

    import numpy as np
    import torch

    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state_all(state[3])


class Probe:
    """Intermediate evaluations of one trial at NFE milestones, reported to Optuna (trial.report / should_prune)."""

    def __init__(self, trial, milestones: list[int], *, prompts: list[str], steps: list[int], n: int,
                 eval_seed: int, batch_size: int, reward_name: str):
        self.trial = trial
        self.milestones = sorted(set(milestones))
        self.prompts, self.steps, self.n = prompts, steps, n
        self.eval_seed, self.batch_size, self.reward_name = eval_seed, batch_size, reward_name
        self.reported: dict[int, float] = {}
        """NFE milestone -> probe value."""
        self.pruned_at: int | None = None
        self.eval_nfe = 0
        self._context: tuple | None = None

    def hook(self, method, policy, task, budget, tracker):
        """The train hook: called with the cell's method, policy, task, budget and tracker just before training;
        returns the tracker the method gets."""
        self._context = (method, policy, task.reward, budget)
        return SweepTracker(tracker, self)

    def value(self) -> float:
        """Mean of the training reward over the probe's step counts, on the first n protocol samples."""
        from bench import evaluate as ev

        method, policy, reward, _ = self._context
        with preserved_rng():
            result = ev.evaluate(method, policy, self.prompts, self.steps, {self.reward_name: reward}, split="val",
                                 n=self.n, eval_seed=self.eval_seed, batch_size=self.batch_size, grid_images=0)
        self.eval_nfe += sum(result.nfe.values())
        return float(result.scores.groupby("S")["value"].mean().mean())

    def check(self) -> None:
        if self._context is None or self.pruned_at is not None:
            return
        nfe = self._context[3].total_nfe
        crossed = [m for m in self.milestones if m <= nfe and m not in self.reported]
        if not crossed:
            return
        value = self.value()
        for milestone in crossed:
            self.trial.report(value, step=milestone)
            self.reported[milestone] = value
        if self.trial.should_prune():
            self.pruned_at = crossed[-1]
            raise TrialStopped(f"pruned by the sweep at {nfe} training NFEs: probe {self.reward_name} = {value:.4g} "
                               f"is below the other trials at milestone {crossed[-1]}")


class SweepTracker:
    """The tracker a method gets in a sweep: forwards everything to the cell's tracker, then lets the probe
    evaluate at NFE milestones (methods log between units of work, so the policy is in a consistent state)."""

    def __init__(self, inner, probe: Probe):
        self._inner = inner
        self._probe = probe

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._inner.log_metrics(metrics, step)
        self._probe.check()

    def progress(self, total: int, desc: str):
        from methods.common import progress

        return progress(self._inner, total, desc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)



class Objective:
    """``study.optimize``'s objective for a prepared sweep (bench.sweep.Sweep)."""

    def __init__(self, sweep):
        self.sweep = sweep

    def __call__(self, trial) -> float:
        import optuna

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
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        print(f"{index}{shown}", flush=True)
        try:
            cfg, _ = compose_cell(s.cell_overrides + trial_overrides(s.space, params))
            cfg["with_base"] = False  # the study's base cell runs once, before the trials
            from bench.validate import check_config

            check_config(cfg)
        except ConfigError as err:
            raise self.failed(trial, None, str(err)) from None
        trial.set_user_attr("cell_id", grids.cell_id(cfg))
        ev = cfg["eval"]
        import tasks.prompts as prompt_sets

        probe = Probe(trial, s.milestones, prompts=list(prompt_sets.load(ev["prompts"]).val), steps=s.probe_steps,
                      n=s.conf.intermediate.n, eval_seed=int(ev["val_seed"]),
                      batch_size=min(int(ev["batch_size"]), s.conf.intermediate.n), reward_name=s.reward)
        tags = {"sweep.study": s.study_name, "sweep.trial": trial.number, "sweep.storage": s.storage.safe_url(),
                "sweep.params": json.dumps(params, sort_keys=True, default=str)}
        status = run_trial_cell(cfg, s.grid, index, probe.hook, tags, f"{grids.cell_run_name(cfg)}/trial{trial.number}")
        try:
            value = self.outcome(trial, status, probe, index)
        except (TrialFailed, optuna.TrialPruned):
            raise
        except Exception as err:  # noqa: BLE001 - bookkeeping failed (e.g. the MLflow store): the trial FAILs
            import traceback

            traceback.print_exc()
            raise self.failed(trial, status.run_id, f"recording the trial failed: {type(err).__name__}: {err}") \
                from None
        print(f"{index}COMPLETE {s.objective_key} = {value:.4g} (run {status.run_id})", flush=True)
        return value

    def wait_for_slot(self, trial) -> bool:
        """True when the study's finished trials plus the earlier RUNNING ones leave room for this trial; False when
        the study has its n_trials finished trials. While an earlier trial of another worker could still complete
        the study, wait: it finishes, or its worker died and its heartbeat goes stale (Optuna then fails it)."""
        from optuna.storages import fail_stale_trials

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
        import optuna

        s = self.sweep
        run_id = status.run_id
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
        if status not in ("finished", "skipped") or run is None:
            error = (s.store.client.get_run(run_id).data.tags.get("error") if run is not None else None) \
                or f"cell status {status}"
            raise self.failed(trial, run_id, error)
        value = s.store.client.get_run(run_id).data.metrics.get(s.objective_key)
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


def run_trial_cell(cfg: dict, grid: str, index: str, hook, tags: dict[str, Any], run_name: str):
    """bench.cell.run_cell with the probe's train hook, the trial's run name and tags; waits while another worker
    runs the very same config (then reuses its run: a cell is a pure function of its config)."""
    from bench.cell import run_cell

    while True:
        status = run_cell(cfg, grid, index=index, tags=tags, train_hook=hook, run_name=run_name)
        if status != "running-elsewhere":
            return status
        time.sleep(2.0)
