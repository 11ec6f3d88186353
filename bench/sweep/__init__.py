"""Hyper-parameter sweeps with Optuna: one study per (method, model, reward, K); every trial is one benchmark cell.

    python -m bench.sweep method=ddpo model=toy-turbo sweep.n_trials=20            # study ddpo-toy-turbo-toy-all-k4
    python -m bench.sweep method=pso train_steps=2 sweep.objective=mean_steps      # objective: mean over eval S
    python -m bench.sweep method=ddpo sweep=toy-small                              # preset bench/conf/sweep/toy-small.yaml
    python -m bench.sweep method=ddpo 'sweep.space={lr:[log_float,1e-5,1e-3]}'     # search only lr
    python -m bench.sweep method=ddpo sweep.storage=postgresql://user@db-host/optuna   # workers on several machines
    optuna-dashboard optuna.journal --host 127.0.0.1                               # watch the study (loopback only)

Everything that is not ``sweep=<preset>`` or ``sweep.<key>=<value>`` is a bench.run override: the cell config is
composed through Hydra exactly as ``python -m bench.run`` composes it, with the trial's sampled values added as
``method.<field>=<value>`` overrides, and the trial runs through ``bench.cell.run_cell`` (MLflow run, resume, fault
handling) in the experiment ``stepbench/sweep/<study>`` as the run ``<cell run name>/trial<N>``, tagged
``sweep.study`` and ``sweep.trial``. Optuna runs the loop (``study.optimize``); the pieces are split by job:
``conf`` (the sweep settings), ``space`` (search space), ``storage`` (journal / RDB with heartbeats), ``objective``
(one trial = one cell, the pruning probe) and ``tuned`` (the result file).

- Search space: ``sweep.space`` if given, else the ``search_space:`` block of the method's YAML, else the method's
  ``Config.search_space()``; ``{"lr": ("log_float", 1e-5, 1e-3), "lora_rank": ("categorical", [4, 8])}``, kinds
  float | log_float | int | log_int | categorical (float/int take an optional step). A key is a method field, or
  ``policy.<key>``. Fields pinned on the command line (``method.lr=...``) are not searched.
- Objective (maximised): ``train_steps`` = ``eval/val/<reward>/s<K>/mean``; ``mean_steps`` =
  ``eval/val/<reward>/mean_over_s`` (step generalization), on the validation split only: trials run with
  ``eval.splits=[val]`` and compute no test number. Every trial gets the same training budget (``budget.nfe``).
- Pruning: at ``sweep.intermediate.points`` NFE milestones of training a probe evaluation (the first
  ``sweep.intermediate.n`` samples of the evaluation protocol: fixed prompts and noise, the trial's objective steps)
  is reported to Optuna; when the pruner (MedianPruner by default) rejects the trial, the cell stops, the trial is
  PRUNED and its MLflow run ends KILLED with the tag ``sweep.state=PRUNED``. The probe saves and restores the RNG
  states, so a trial's training is the same as ``bench.run``'s for the same config.
- Storage: a journal file (``optuna.journal`` in the working directory by default), or an RDB URL (PostgreSQL, MySQL,
  SQLite). Start the same command in several processes, on one or several machines, to share a study: the study
  stops at ``sweep.n_trials`` COMPLETE + PRUNED trials (MaxTrialsCallback); a trial starts only while the finished
  and earlier running trials leave room for it (else it waits, or ends at once as FAIL "not run" when the study is
  full). Running trials send heartbeats every ``sweep.heartbeat`` s; a RUNNING trial silent for twice that (its
  worker died) is marked FAIL by the next worker's ``study.optimize``, and a live worker takes its slot. A rerun
  resumes the study.
- Results: the best trial's complete method config is written to ``bench/conf/method/tuned/<study>.yaml``
  (``python -m bench.run method=tuned/<study>``; never overwritten: a different result goes to ``<study>-2.yaml``)
  and logged to its MLflow run (tag ``sweep.best=true``).

Bad input (unknown method, empty or invalid space, ``sweep.n_trials < 1``, an unreachable storage) exits with status 2
and one message before any trial runs. Exit status 1 when the study has no COMPLETE trial at the end.

Only the bench.sweep modules import optuna.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from typing import Any

from bench import grid as grids
from bench import tracking
from bench.sweep.conf import (
    SWEEP_DIR,
    TUNED_DIR,
    SweepConf,
    compose_cell,
    load_sweep_conf,
    split_argv,
    sweep_presets,
)
from bench.sweep.objective import Objective, TrialStopped, preserved_rng
from bench.sweep.space import Dim, hydra_value, parse_dim, pinned_keys, resolve_space, trial_overrides
from bench.sweep.storage import Storage, check_storage, open_storage
from bench.sweep.tuned import log_best, write_tuned
from bench.validate import ConfigError

__all__ = ["SWEEP_DIR", "TUNED_DIR", "Dim", "Sweep", "SweepConf", "TrialStopped", "compose_cell", "hydra_value",
           "load_study", "load_sweep_conf", "main", "parse_dim", "prepare", "preserved_rng", "resolve_space",
           "sweep_presets", "trial_overrides"]

def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}



class Sweep:
    """A prepared sweep: the validated base config, the search space, the study and the MLflow experiment."""

    def __init__(self, conf: SweepConf, cell_overrides: list[str], cfg: dict, space: dict[str, Dim], space_source: str):
        self.conf = conf
        self.cell_overrides = cell_overrides
        self.cfg = cfg
        self.space = space
        self.space_source = space_source
        self.method = cfg["method"]["name"]
        self.model = cfg["model"]["name"]
        self.reward = cfg["reward"]["name"]
        self.k = grids.resolved_train_steps(cfg)
        suffix = "" if conf.objective == "train_steps" else f"-{conf.objective}"
        default = f"{self.method}-{self.model}-{self.reward}-k{self.k}{suffix}"
        self.study_name = (conf.study_name or default).replace("{default}", default)
        self.grid = f"sweep/{self.study_name}"
        # the validation split only: tuning never reads a test number (bench/evaluate.py)
        self.objective_key = (tracking.eval_metric_key("val", self.reward, self.k, "mean")
                              if conf.objective == "train_steps"
                              else tracking.eval_metric_key("val", self.reward, None, "mean_over_s"))
        self.probe_steps = [self.k] if conf.objective == "train_steps" else list(cfg["eval"]["steps"])
        nfe = int(cfg["budget"]["nfe"])
        points = conf.intermediate.points
        self.milestones = sorted({nfe * i // (points + 1) for i in range(1, points + 1)} - {0})
        self.storage: Storage | None = None
        self.study = None
        self.store: tracking.Store | None = None
        self.experiment_id: str | None = None

    # ------------------------------------------------------------------ identity
    def key(self) -> dict:
        """What must not change between the runs of one study: the cell's semantic config without the searched
        fields, the objective and the search space."""
        base = grids.cell_key(self.cfg)
        base["method"] = {k: v for k, v in base["method"].items() if k not in self.space}
        base["policy"] = {k: v for k, v in base["policy"].items() if f"policy.{k}" not in self.space}
        return {"cell": base, "objective": self.conf.objective,
                "space": {k: dataclasses.asdict(d) for k, d in sorted(self.space.items())}}

    # ------------------------------------------------------------------ setup
    def open(self) -> None:
        """Open the storage, create or load the study (checking it belongs to this config), enqueue first trials,
        and open the MLflow experiment. Raises ConfigError before any trial."""
        import optuna

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
            raise ConfigError(self._mismatch(json.loads(stored), json.loads(key)))
        self.store = tracking.Store(self.cfg["tracking"]["uri"])
        self.experiment_id = self.store.experiment_id(self.grid)
        self.store.reap_stale(self.experiment_id)

    def _mismatch(self, stored: dict, current: dict) -> str:
        old, new = _flat(stored), _flat(current)
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        shown = "; ".join(f"{k}: {old.get(k, '(absent)')!r} in the study, {new.get(k, '(absent)')!r} now"
                          for k in diff[:4])
        return (f"study {self.study_name!r} in {self.storage.url} was made for another config ({shown}"
                f"{'; ...' if len(diff) > 4 else ''}); use the same overrides, or a new sweep.study_name")

    def _sampler(self, existing: int):
        """Seeded by (sampler.seed, pid, trials so far): parallel workers and a resumed study do not replay the
        random proposals of another process or of the first run."""
        import numpy as np
        import optuna

        seed = None
        if self.conf.sampler.seed is not None:
            seed = int(np.random.SeedSequence([self.conf.sampler.seed, os.getpid(), existing]).generate_state(1)[0])
        if self.conf.sampler.name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        with warnings.catch_warnings():  # multivariate and constant_liar are "experimental" since optuna 2.x
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.conf.sampler.n_startup_trials,
                                              multivariate=True, constant_liar=True)

    def _pruner(self):
        import optuna

        p = self.conf.pruner
        if p.name == "none" or not self.milestones:
            return optuna.pruners.NopPruner()
        if p.name == "percentile":
            return optuna.pruners.PercentilePruner(p.percentile, n_startup_trials=p.n_startup_trials,
                                                   n_warmup_steps=p.n_warmup_steps)
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)

    def check_enqueue(self) -> None:
        for params in self.conf.enqueue:
            for k, v in params.items():
                if k not in self.space:
                    raise ConfigError(f"sweep.enqueue: {k!r} is not searched; searched: {', '.join(self.space)}")
                if not self.space[k].contains(v):
                    raise ConfigError(f"sweep.enqueue: {k}={v!r} lies outside {self.space[k].describe()}")

    def _enqueue_first(self) -> None:
        first: list[dict] = []
        if self.conf.enqueue_defaults:
            defaults = {}
            for key, dim in self.space.items():
                value = self.cfg["policy"].get(key.split(".", 1)[1]) if "." in key else self.cfg["method"].get(key)
                if dim.contains(value):
                    defaults[key] = value
            if defaults:
                first.append(defaults)
        first += [dict(p) for p in self.conf.enqueue]
        for params in first:
            self.study.enqueue_trial(params, skip_if_exists=True)

    # ------------------------------------------------------------------ the loop
    def counts(self) -> dict[str, int]:
        from optuna.trial import TrialState

        out = {s.name: 0 for s in TrialState}
        for trial in self.study.get_trials(deepcopy=False):
            out[trial.state.name] += 1
        return out

    def run(self) -> int:
        """study.optimize until the study has n_trials finished trials; write the tuned config; 0 if any trial is
        COMPLETE."""
        from optuna.study import MaxTrialsCallback
        from optuna.trial import TrialState

        from bench.sweep.objective import TrialFailed

        counts = self.counts()
        print(f"study {self.study_name} ({self.storage.safe_url()}): {counts['COMPLETE']} complete, "
              f"{counts['PRUNED']} pruned, {counts['FAIL']} failed so far; up to {self.conf.n_trials} finished "
              f"trials", flush=True)
        print(f"  objective {self.objective_key} (maximise), budget {self.cfg['budget']['nfe']} NFEs per trial, "
              f"space ({self.space_source}): {'; '.join(d.describe() for d in self.space.values())}", flush=True)
        if self.cfg.get("with_base", True):
            from bench.cell import run_cell

            run_cell(grids.base_config(self.cfg), self.grid, index="(base) ")
        failures = []

        def failures_in_a_row(study, trial) -> None:
            failures.append(trial.state == TrialState.FAIL and not trial.user_attrs.get("error", "").startswith(
                "not run"))
            if len(failures) >= self.conf.max_failures and all(failures[-self.conf.max_failures:]):
                print(f"error: {self.conf.max_failures} trials in a row failed (sweep.max_failures); stopping",
                      file=sys.stderr, flush=True)
                study.stop()

        finished = MaxTrialsCallback(self.conf.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if counts["COMPLETE"] + counts["PRUNED"] < self.conf.n_trials:
            self.study.optimize(Objective(self), timeout=self.conf.timeout, catch=(TrialFailed,),
                                callbacks=[finished, failures_in_a_row])
        stopped = len(failures) >= self.conf.max_failures and all(failures[-self.conf.max_failures:])
        status = self.finish()
        return 1 if stopped else status

    # ------------------------------------------------------------------ results
    def finish(self) -> int:
        counts = self.counts()
        print(f"study {self.study_name}: {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, "
              f"{counts['FAIL']} failed, {counts['RUNNING']} running", flush=True)
        complete = [t for t in self.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
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


# --------------------------------------------------------------------------------------------- entry points


def load_study(study_name: str, storage: str = SweepConf.storage):
    """An existing study (for reading results: study.trials, study.best_trial, study.trials_dataframe())."""
    import optuna

    check_storage(storage)
    return optuna.load_study(study_name=study_name, storage=open_storage(storage, SweepConf.heartbeat).optuna)


def prepare(argv: list[str]) -> Sweep:
    """Parse, compose and validate everything, then open the study; ConfigError before any trial runs."""
    import methods
    from bench.validate import check_config, check_overrides, check_tracking_uri

    if any(a in ("-m", "--multirun") for a in argv):
        raise ConfigError("bench.sweep runs one study; -m/--multirun is not supported (start one sweep per method)")
    sweep_argv, cell_argv = split_argv(argv)
    conf = load_sweep_conf(sweep_argv)
    cell_overrides = list(conf.overrides) + cell_argv
    check_overrides(cell_overrides)
    cfg, yaml_space = compose_cell(cell_overrides)
    check_config(cfg)
    method = cfg["method"]["name"]
    if conf.space:
        raw, source = conf.space, "sweep.space"
    elif yaml_space:
        raw, source = yaml_space, f"search_space in bench/conf/method/{method}.yaml"
    else:
        raw, source = methods.config_class(method).search_space(), f"{methods.config_class(method).__module__}.Config" \
                                                                  f".search_space()"
    space = resolve_space(method, cfg, raw, source, pinned_keys(cell_overrides))
    sweep = Sweep(conf, cell_overrides, cfg, space, source)
    if conf.objective == "train_steps" and sweep.k not in cfg["eval"]["steps"]:
        raise ConfigError(f"sweep.objective=train_steps needs K={sweep.k} among eval.steps {cfg['eval']['steps']}; "
                          f"add it, or use sweep.objective=mean_steps")
    sweep.check_enqueue()
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

