"""Hyper-parameter sweeps with Optuna: one study per (method, model, reward, K); every trial is one benchmark cell.

    python -m bench.sweep method=ddpo model=toy-turbo sweep.n_trials=20            # study ddpo-toy-turbo-toy-all-k4
    python -m bench.sweep method=pso train_steps=2 sweep.objective=mean_steps      # objective: mean over eval S
    python -m bench.sweep method=ddpo sweep=toy-small                              # preset bench/conf/sweep/toy-small.yaml
    python -m bench.sweep method=ddpo 'sweep.space={lr:[log_float,1e-5,1e-3]}'     # search only lr
    python -m bench.sweep method=ddpo sweep.storage=postgresql://user@db-host/optuna   # workers on several machines
    optuna-dashboard optuna.journal --host 127.0.0.1                               # watch the study (loopback only)

How it works: the README's "Tuning hyper-parameters (Optuna)". The settings (``sweep=<preset>``, ``sweep.<key>=``)
are documented in bench/conf/sweep/default.yaml; every other argument is a bench.run override of the cells. Search
space kinds: float | log_float | int | log_int | categorical; keys are method fields or ``policy.<key>``. Trials
evaluate the validation split only. A RUNNING trial whose heartbeat is silent for 2 x ``sweep.heartbeat`` s (its
worker died) is marked FAIL and a live worker takes its slot; the study stops at ``sweep.n_trials`` COMPLETE + PRUNED
trials. The tuned config is never overwritten: a different result goes to ``<study>-2.yaml``.

Bad input exits with status 2 and one message before any trial; status 1 when no trial is COMPLETE at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from collections import Counter

import numpy as np
import optuna
import pandas as pd
from optuna import pruners
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

import methods
from bench import grid as grids
from bench import tracking
from bench.sweep.conf import SWEEP_DIR, TUNED_DIR, SweepConf, compose_cell, load_sweep_conf, sweep_presets
from bench.sweep.objective import Objective, TrialFailed, TrialStopped, preserved_rng
from bench.sweep.space import Dim, hydra_value, parse_dim, pinned_keys, resolve_space, trial_overrides
from bench.sweep.storage import Storage, check_storage, open_storage
from bench.sweep.tuned import log_best, write_tuned
from bench.validate import ConfigError, check_config, check_overrides, check_tracking_uri

__all__ = ["SWEEP_DIR", "TUNED_DIR", "Dim", "Sweep", "SweepConf", "TrialStopped", "compose_cell", "hydra_value",
           "load_study", "load_sweep_conf", "main", "parse_dim", "prepare", "preserved_rng", "resolve_space",
           "sweep_presets", "trial_overrides", "write_tuned"]


class Sweep:
    """A prepared sweep: the validated base config, the search space, the study and the MLflow experiment."""

    def __init__(self, conf: SweepConf, cell_overrides: list[str], cfg: dict, space: dict[str, Dim], space_source: str):
        self.conf, self.cell_overrides, self.cfg, self.space, self.space_source = conf, cell_overrides, cfg, space, \
            space_source
        self.method, self.model, self.reward = cfg["method"]["name"], cfg["model"]["name"], cfg["reward"]["name"]
        self.k = grids.resolved_train_steps(cfg)
        suffix = "" if conf.objective == "train_steps" else f"-{conf.objective}"
        default = f"{self.method}-{self.model}-{self.reward}-k{self.k}{suffix}"
        self.study_name = (conf.study_name or default).replace("{default}", default)
        self.grid = f"sweep/{self.study_name}"
        by_k = conf.objective == "train_steps"
        self.objective_key = tracking.eval_metric_key("val", self.reward, self.k if by_k else None,
                                                      "mean" if by_k else "mean_over_s")
        self.probe_steps = [self.k] if by_k else list(cfg["eval"]["steps"])
        nfe, points = int(cfg["budget"]["nfe"]), conf.intermediate.points
        self.milestones = sorted({nfe * i // (points + 1) for i in range(1, points + 1)} - {0})
        self.storage: Storage | None = None
        self.study = None
        self.store: tracking.Store | None = None

    def key(self) -> dict:
        """What must not change between the runs of one study: the cell's semantic config without the searched
        fields, the objective and the search space."""
        base = grids.cell_key(self.cfg)
        base["method"] = {k: v for k, v in base["method"].items() if k not in self.space}
        base["policy"] = {k: v for k, v in base["policy"].items() if f"policy.{k}" not in self.space}
        return {"cell": base, "objective": self.conf.objective,
                "space": {k: dataclasses.asdict(d) for k, d in sorted(self.space.items())}}

    def open(self) -> None:
        """Open the storage, create or load the study (checking it belongs to this config), enqueue first trials,
        and open the MLflow experiment. Raises ConfigError before any trial."""
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # trial outcomes are printed by the objective
        self.storage = open_storage(self.conf.storage, self.conf.heartbeat)
        key = json.dumps(self.key(), sort_keys=True, default=str)
        self.study = optuna.create_study(study_name=self.study_name, storage=self.storage.optuna,
                                         direction="maximize", pruner=self._pruner(), load_if_exists=True)
        self.study.sampler = self._sampler(len(self.study.trials))
        stored = self.study.user_attrs.get("stepbench.key")
        if stored is None:
            for name, value in {"stepbench.key": key, "method": self.method, "model": self.model,
                                "reward": self.reward, "train_steps": self.k, "objective": self.objective_key,
                                "budget_nfe": int(self.cfg["budget"]["nfe"]),
                                "space": {k: d.describe() for k, d in self.space.items()}}.items():
                self.study.set_user_attr(name, value)
            self._enqueue_first()
        elif stored != key:
            old, new = (pd.json_normalize(json.loads(text)).iloc[0].to_dict() for text in (stored, key))
            diff = [f"{k}: {old.get(k, '(absent)')!r} in the study, {new.get(k, '(absent)')!r} now"
                    for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            raise ConfigError(f"study {self.study_name!r} in {self.storage.url} was made for another config "
                              f"({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}); use the same overrides, "
                              f"or a new sweep.study_name")
        self.store = tracking.Store(self.cfg["tracking"]["uri"])
        self.store.reap_stale(self.store.experiment_id(self.grid))

    def _sampler(self, existing: int):
        """Seeded by (sampler.seed, pid, trials so far): parallel workers and a resumed study do not replay the
        random proposals of another process or of the first run."""
        seed = self.conf.sampler.seed
        if seed is not None:
            seed = int(np.random.SeedSequence([seed, os.getpid(), existing]).generate_state(1)[0])
        if self.conf.sampler.name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        with warnings.catch_warnings():  # multivariate and constant_liar are "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.conf.sampler.n_startup_trials,
                                              multivariate=True, constant_liar=True)

    def _pruner(self):
        p = self.conf.pruner
        if p.name == "none" or not self.milestones:
            return pruners.NopPruner()
        if p.name == "percentile":
            return pruners.PercentilePruner(p.percentile, n_startup_trials=p.n_startup_trials,
                                            n_warmup_steps=p.n_warmup_steps)
        return pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)

    def _enqueue_first(self) -> None:
        defaults = {}
        for key, dim in self.space.items():
            value = self.cfg["policy"].get(key.split(".", 1)[1]) if "." in key else self.cfg["method"].get(key)
            if self.conf.enqueue_defaults and dim.contains(value):
                defaults[key] = value
        for params in ([defaults] if defaults else []) + [dict(p) for p in self.conf.enqueue]:
            self.study.enqueue_trial(params, skip_if_exists=True)

    def counts(self) -> Counter:
        return Counter(t.state.name for t in self.study.get_trials(deepcopy=False))

    def run(self) -> int:
        """study.optimize until the study has n_trials finished trials; write the tuned config; 0 if any trial is
        COMPLETE (1 after sweep.max_failures failed trials in a row)."""
        counts, n, max_failures = self.counts(), self.conf.n_trials, self.conf.max_failures
        print(f"study {self.study_name} ({self.storage.safe_url()}): {counts['COMPLETE']} complete, "
              f"{counts['PRUNED']} pruned, {counts['FAIL']} failed so far; up to {n} finished trials\n"
              f"  objective {self.objective_key} (maximise), budget {self.cfg['budget']['nfe']} NFEs per trial, "
              f"space ({self.space_source}): {'; '.join(d.describe() for d in self.space.values())}", flush=True)
        if self.cfg.get("with_base", True):
            from bench.cell import run_cell

            run_cell(grids.base_config(self.cfg), self.grid, index="(base) ")
        streak = [0]  # failed trials in a row in this process

        def failures_in_a_row(study, trial) -> None:
            failed = trial.state == TrialState.FAIL and not trial.user_attrs.get("error", "").startswith("not run")
            streak[0] = streak[0] + 1 if failed else 0
            if streak[0] >= max_failures:
                print(f"error: {max_failures} trials in a row failed (sweep.max_failures); stopping",
                      file=sys.stderr, flush=True)
                study.stop()

        if counts["COMPLETE"] + counts["PRUNED"] < n:
            finished = MaxTrialsCallback(n, states=(TrialState.COMPLETE, TrialState.PRUNED))
            self.study.optimize(Objective(self), timeout=self.conf.timeout, catch=(TrialFailed,),
                                callbacks=[finished, failures_in_a_row])
        status = self.finish()
        return 1 if streak[0] >= max_failures else status

    def finish(self) -> int:
        counts = self.counts()
        print(f"study {self.study_name}: {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, "
              f"{counts['FAIL']} failed, {counts['RUNNING']} running", flush=True)
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            print("error: no COMPLETE trial: nothing to write", file=sys.stderr, flush=True)
            return 1
        best = self.study.best_trial
        print(f"best trial {best.number}: {self.objective_key} = {best.value:.4g} with "
              f"{json.dumps(best.params, sort_keys=True, default=str)}", flush=True)
        if self.conf.write_tuned:
            path, text = write_tuned(self, best)
            print(f"tuned config: {path}" + (f"  (python -m bench.run method=tuned/{path.stem})"
                                              if path.parent == TUNED_DIR else ""), flush=True)
            log_best(self, best, complete, path.name, text)
        print(f"dashboard: {self.storage.dashboard_command()}", flush=True)
        return 0


def load_study(study_name: str, storage: str = SweepConf.storage):
    """An existing study (for reading results: study.trials, study.best_trial, study.trials_dataframe())."""
    check_storage(storage)
    return optuna.load_study(study_name=study_name, storage=open_storage(storage, SweepConf.heartbeat).optuna)


def prepare(argv: list[str]) -> Sweep:
    """Parse, compose and validate everything, then open the study; ConfigError before any trial runs."""
    if any(a in ("-m", "--multirun") for a in argv):
        raise ConfigError("bench.sweep runs one study; -m/--multirun is not supported (start one sweep per method)")
    keys = [a.lstrip("+~").split("=", 1)[0] for a in argv]  # sweep=<preset>, sweep.<key>=...: the sweep's own
    conf = load_sweep_conf([a for a, k in zip(argv, keys) if k == "sweep" or k.startswith("sweep.")])
    cell_overrides = [*conf.overrides, *(a for a, k in zip(argv, keys) if k != "sweep" and not k.startswith("sweep."))]
    check_overrides(cell_overrides)
    cfg, yaml_space = compose_cell(cell_overrides)
    check_config(cfg)
    method = cfg["method"]["name"]
    if conf.space:
        raw, source = conf.space, "sweep.space"
    elif yaml_space:
        raw, source = yaml_space, f"search_space in bench/conf/method/{method}.yaml"
    else:
        config = methods.config_class(method)
        raw, source = config.search_space(), f"{config.__module__}.Config.search_space()"
    sweep = Sweep(conf, cell_overrides, cfg, resolve_space(method, cfg, raw, source, pinned_keys(cell_overrides)),
                  source)
    if conf.objective == "train_steps" and sweep.k not in cfg["eval"]["steps"]:
        raise ConfigError(f"sweep.objective=train_steps needs K={sweep.k} among eval.steps {cfg['eval']['steps']}; "
                          f"add it, or use sweep.objective=mean_steps")
    for k, v in (item for params in conf.enqueue for item in params.items()):
        if k not in sweep.space:
            raise ConfigError(f"sweep.enqueue: {k!r} is not searched; searched: {', '.join(sweep.space)}")
        if not sweep.space[k].contains(v):
            raise ConfigError(f"sweep.enqueue: {k}={v!r} lies outside {sweep.space[k].describe()}")
    check_tracking_uri(cfg["tracking"]["uri"])
    check_storage(conf.storage)
    sweep.open()
    return sweep


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        sweep = prepare(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return sweep.run()
