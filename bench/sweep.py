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
handling) in the experiment ``stepbench/sweep/<study>``, tagged ``sweep.study`` and ``sweep.trial``.

- Search space: ``sweep.space`` if given, else the ``search_space:`` block of the method's YAML, else the method's
  ``Config.search_space()``; ``{"lr": ("log_float", 1e-5, 1e-3), "lora_rank": ("categorical", [4, 8])}``, kinds
  float | log_float | int | log_int | categorical (float/int take an optional step). A key is a method field, or
  ``policy.<key>``. Fields pinned on the command line (``method.lr=...``) are not searched.
- Objective (maximised): ``train_steps`` = ``eval/<reward>/s<K>/mean``; ``mean_steps`` = ``eval/<reward>/mean_over_s``
  (step generalization). Every trial gets the same training budget (``budget.nfe``).
- Pruning: at ``sweep.intermediate.points`` NFE milestones of training a probe evaluation (the first
  ``sweep.intermediate.n`` samples of the evaluation protocol: fixed prompts and noise, the trial's objective steps)
  is reported to Optuna; when the pruner (MedianPruner by default) rejects the trial, the cell stops, the trial is
  PRUNED and its MLflow run ends KILLED with the tag ``sweep.state=PRUNED``. The probe saves and restores the RNG
  states, so a trial's training is the same as ``bench.run``'s for the same config.
- Storage: a journal file (``optuna.journal`` in the working directory by default), or an RDB URL (PostgreSQL, MySQL,
  SQLite for one worker). Start the same command in several processes to share a study: ``sweep.n_trials`` counts
  the study's COMPLETE + PRUNED trials (exact with a journal file, whose workers take turns to ask; RDB workers on
  several machines may overshoot by one per worker). A rerun resumes: RUNNING trials whose process died on this host
  are marked FAIL first (RDB storages also use Optuna's heartbeat for other hosts).
- Results: the best trial's complete method config is written to ``bench/conf/method/tuned/<study>.yaml``
  (``python -m bench.run method=tuned/<study>``) and logged to its MLflow run (tag ``sweep.best=true``).

Bad input (unknown method, empty or invalid space, ``sweep.n_trials < 1``, an unreachable storage) exits with status 2
and one message before any trial runs. Exit status 1 when the study has no COMPLETE trial at the end.

This is the only stepbench module that imports optuna.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bench import grid as grids
from bench import tracking
from bench.validate import ConfigError

CONF_DIR = Path(__file__).resolve().parent / "conf"
SWEEP_DIR = CONF_DIR / "sweep"
TUNED_DIR = CONF_DIR / "method" / "tuned"
KINDS = ("float", "log_float", "int", "log_int", "categorical")
OBJECTIVES = ("train_steps", "mean_steps")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "percentile", "none")
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306}
# Trial user attributes that identify the process working on a RUNNING trial (stale-trial detection on restart).
_PROC_ATTRS = ("host", "pid", "pid_start")


# --------------------------------------------------------------------------------------------- sweep config


@dataclass
class SamplerConf:
    name: str = "tpe"
    """Optuna sampler: tpe (multivariate, constant liar for parallel workers) | random."""
    seed: int | None = 0
    """Sampler seed, mixed with the worker's pid and the study's trial count (workers and resumes differ)."""
    n_startup_trials: int = 5
    """TPE: random trials before the model-based proposals start."""


@dataclass
class PrunerConf:
    name: str = "median"
    """median (MedianPruner) | percentile (PercentilePruner) | none."""
    n_startup_trials: int = 3
    """No trial is pruned before this many trials have finished."""
    n_warmup_steps: int = 0
    """No report before this many training NFEs can prune."""
    percentile: float = 25.0
    """percentile pruner: prune below this percentile of the other trials at the same NFE milestone."""


@dataclass
class IntermediateConf:
    points: int = 3
    """Probe evaluations during training, at budget.nfe * i / (points + 1), i = 1..points (0 = no pruning)."""
    n: int = 16
    """Samples per probe evaluation: the first n of the evaluation protocol (same prompts and noise every time)."""


@dataclass
class SweepConf:
    n_trials: int = 20
    """Finished (COMPLETE + PRUNED) trials the study should have; a rerun with more continues the study."""
    study_name: str | None = None
    """Optuna study; None = <method>-<model>-<reward>-k<K> (+ -mean_steps for that objective); "{default}" in the
    name stands for that default (e.g. "{default}-small")."""
    storage: str = "optuna.journal"
    """A journal file path (relative to the working directory) or an RDB URL (postgresql://user@host/db)."""
    objective: str = "train_steps"
    """train_steps: eval reward mean at S = K; mean_steps: mean over the eval step counts (step generalization)."""
    space: dict[str, Any] = field(default_factory=dict)
    """The search space; empty = the method YAML's search_space, else the method's Config.search_space()."""
    enqueue: list[Any] = field(default_factory=list)
    """Parameter dicts tried first, once per study (e.g. [{lr: 1.0e-4}])."""
    enqueue_defaults: bool = True
    """Try the composed config's own values of the searched fields first (when they lie in the space)."""
    overrides: list[str] = field(default_factory=list)
    """bench.run overrides of this preset (budget, eval.n, ...), applied before the command line's."""
    timeout: float | None = None
    """Start no new trial after this many seconds."""
    max_failures: int = 3
    """Stop (exit 1) after this many failed trials in a row in this process."""
    heartbeat: int = 60
    """RDB storages: seconds between trial heartbeats; a RUNNING trial silent for 2x this is marked FAIL."""
    tuned_dir: str | None = None
    """Where the tuned method config goes; None = bench/conf/method/tuned (composable as method=tuned/<study>)."""
    write_tuned: bool = True
    """Write the best trial's method config (and log it to MLflow) at the end."""
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    intermediate: IntermediateConf = field(default_factory=IntermediateConf)


def sweep_presets() -> list[str]:
    return sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(sweep overrides: sweep=<preset> and sweep.<key>=..., cell overrides: everything else)."""
    sweep, cell = [], []
    for arg in argv:
        key = arg.lstrip("+~").split("=", 1)[0]
        (sweep if key == "sweep" or key.startswith("sweep.") else cell).append(arg)
    return sweep, cell


def load_sweep_conf(overrides: list[str]) -> SweepConf:
    """The preset (sweep=<name>, default: default) merged into the typed schema, then the sweep.* overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(f"cannot parse the command line: {' '.join(str(err).split())}") from None
    preset = "default"
    keyed = []
    for override in parsed:
        if override.is_add() or override.is_delete() or override.is_sweep_override():
            raise ConfigError(f"{override.input_line!r}: sweep settings take plain key=value overrides")
        if override.key_or_group == "sweep":
            preset = str(override.value())
        else:
            keyed.append((override.key_or_group[len("sweep."):], override.value()))
    if preset not in sweep_presets():
        raise ConfigError(f"unknown sweep preset {preset!r}; available: {', '.join(sweep_presets())}")
    conf = OmegaConf.structured(SweepConf)
    try:
        conf = OmegaConf.merge(conf, OmegaConf.load(SWEEP_DIR / f"{preset}.yaml") or {})
    except OmegaConfBaseException as err:
        raise ConfigError(f"bench/conf/sweep/{preset}.yaml: {' '.join(str(err).split('full_key:')[0].split())}") from None
    for key, value in keyed:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(conf, parent) if parent else conf
        if node is None or (OmegaConf.is_config(node) and leaf not in node and not _is_free_dict(parent)):
            valid = sorted(node.keys()) if OmegaConf.is_dict(node) else []
            raise ConfigError(f"unknown sweep key 'sweep.{key}'; valid keys under "
                              f"'sweep{'.' + parent if parent else ''}': {', '.join(valid)}")
        try:
            OmegaConf.update(conf, key, value, merge=False)
        except OmegaConfBaseException as err:
            raise ConfigError(f"sweep.{key}={value!r}: {' '.join(str(err).split('full_key:')[0].split())}") from None
    out = OmegaConf.to_object(conf)
    check_sweep_conf(out)
    return out


def _is_free_dict(key: str) -> bool:
    return key == "space" or key.startswith("space.")


def _positive(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"sweep.{key} must be a positive integer; got {value!r}")


def check_sweep_conf(conf: SweepConf) -> None:
    _positive("n_trials", conf.n_trials)
    _positive("intermediate.n", conf.intermediate.n)
    _positive("max_failures", conf.max_failures)
    _positive("heartbeat", conf.heartbeat)
    if conf.intermediate.points < 0:
        raise ConfigError(f"sweep.intermediate.points must be >= 0; got {conf.intermediate.points}")
    for key, value, valid in (("objective", conf.objective, OBJECTIVES), ("sampler.name", conf.sampler.name, SAMPLERS),
                              ("pruner.name", conf.pruner.name, PRUNERS)):
        if value not in valid:
            raise ConfigError(f"unknown sweep.{key} {value!r}; available: {', '.join(valid)}")
    if not 0 < conf.pruner.percentile < 100:
        raise ConfigError(f"sweep.pruner.percentile must be in (0, 100); got {conf.pruner.percentile}")
    if conf.timeout is not None and conf.timeout <= 0:
        raise ConfigError(f"sweep.timeout must be > 0 seconds or null; got {conf.timeout}")
    if not isinstance(conf.enqueue, list) or not all(isinstance(p, dict) for p in conf.enqueue):
        raise ConfigError(f"sweep.enqueue must be a list of parameter dicts; got {conf.enqueue!r}")
    if not conf.storage or not str(conf.storage).strip():
        raise ConfigError("sweep.storage is empty; give a journal file path or an RDB URL")


# --------------------------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class Dim:
    """One searched parameter."""

    key: str
    """A method field ("lr") or a config path under policy ("policy.lora_alpha")."""
    kind: str
    low: Any = None
    high: Any = None
    step: Any = None
    choices: tuple = ()

    @property
    def override_key(self) -> str:
        return self.key if "." in self.key else f"method.{self.key}"

    def distribution(self):
        import optuna.distributions as d

        if self.kind == "categorical":
            return d.CategoricalDistribution(list(self.choices))
        if self.kind in ("float", "log_float"):
            return d.FloatDistribution(self.low, self.high, log=self.kind == "log_float", step=self.step)
        return d.IntDistribution(self.low, self.high, log=self.kind == "log_int", step=self.step or 1)

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.key} in {list(self.choices)}"
        return f"{self.key} ~ {self.kind}[{self.low}, {self.high}]" + (f" step {self.step}" if self.step else "")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_dim(method: str, key: str, spec: Any) -> Dim:
    """("log_float", 1e-5, 1e-3) | ("int", 1, 8[, step]) | ("categorical", [a, b, ...]) -> Dim; ConfigError otherwise."""
    where = f"search space of {method}: {key}"
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ConfigError(f"{where}: expected [kind, low, high] or [categorical, [choices]]; got {spec!r}")
    kind, *args = spec
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown kind {kind!r}; available: {', '.join(KINDS)}")
    if kind == "categorical":
        if len(args) != 1 or not isinstance(args[0], (list, tuple)) or not args[0]:
            raise ConfigError(f"{where}: categorical needs one non-empty list of choices; got {spec!r}")
        choices = tuple(args[0])
        bad = [c for c in choices if c is not None and not isinstance(c, (bool, int, float, str))]
        if bad:
            raise ConfigError(f"{where}: categorical choices must be null, bool, int, float or str; got {bad[0]!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{where}: duplicate categorical choices in {list(choices)}")
        return Dim(key, kind, choices=choices)
    if len(args) not in (2, 3) or not all(_number(a) for a in args):
        raise ConfigError(f"{where}: {kind} needs finite numbers low, high[, step]; got {spec!r}")
    low, high, step = args[0], args[1], (args[2] if len(args) == 3 else None)
    if kind in ("int", "log_int"):
        if not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}: {kind} bounds must be integers; got {spec!r}")
    else:
        low, high, step = float(low), float(high), (None if step is None else float(step))
    if not low < high:
        raise ConfigError(f"{where}: low must be < high; got low={low}, high={high}")
    if kind.startswith("log_") and low <= 0:
        raise ConfigError(f"{where}: {kind} needs low > 0; got {low}")
    if step is not None and (step <= 0 or kind.startswith("log_")):
        raise ConfigError(f"{where}: step must be > 0 and is not allowed with {kind}; got {step}")
    return Dim(key, kind, low, high, step)


def resolve_space(method: str, cfg: dict, raw: dict | None, source: str, pinned: set[str]) -> dict[str, Dim]:
    """Parse and check a raw space against the method's Config: unknown fields and values the Config rejects are
    errors; keys pinned on the command line are dropped (printed)."""
    import methods
    from bench.validate import method_fields

    if not raw:
        raise ConfigError(f"method {method!r} has an empty search space ({source}); give one with "
                          f"sweep.space={{lr:[log_float,1e-5,1e-3]}} or a search_space: block in its YAML")
    if not isinstance(raw, dict):
        raise ConfigError(f"search space of {method} ({source}) must be a mapping key -> spec; got {raw!r}")
    fields = [f.name for f in dataclasses.fields(methods.config_class(method))]
    base_fields = method_fields(cfg["method"])
    space: dict[str, Dim] = {}
    for key, spec in raw.items():
        key = str(key)
        if key.startswith("method."):
            key = key[len("method."):]
        if "." in key:
            top, _, leaf = key.partition(".")
            if top != "policy" or leaf not in cfg["policy"]:
                raise ConfigError(f"search space of {method} ({source}): {key!r} is not searchable; keys are the "
                                  f"method's fields ({', '.join(fields)}) or policy.<{'|'.join(cfg['policy'])}>")
        elif key not in fields:
            raise ConfigError(f"search space of {method} ({source}): unknown field {key!r}; valid fields: "
                              f"{', '.join(fields) or '(none)'}")
        dim = parse_dim(method, key, spec)
        if "." not in key:  # the Config must accept every value the space can produce (checked at its ends)
            values = dim.choices if dim.kind == "categorical" else (dim.low, dim.high)
            for value in values:
                try:
                    methods.make_config(method, **{**base_fields, key: value})
                except (TypeError, ValueError) as err:
                    raise ConfigError(f"search space of {method} ({source}): {key}={value!r} is invalid: {err}") \
                        from None
        space[key] = dim
    for key in sorted(pinned & set(space)):
        print(f"{space[key].override_key} is set on the command line: not searched", flush=True)
        del space[key]
    if not space:
        raise ConfigError(f"search space of {method} ({source}) is empty once the fields set on the command line "
                          f"({', '.join(sorted(pinned))}) are removed")
    return space


def hydra_value(value: Any) -> str:
    """A Python value as a Hydra override value (strings quoted, so 'null' or '1e-3' stay strings)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def trial_overrides(space: dict[str, Dim], params: dict[str, Any]) -> list[str]:
    return [f"{space[k].override_key}={hydra_value(v)}" for k, v in params.items() if k in space]


# --------------------------------------------------------------------------------------------- storage


@dataclass
class Storage:
    url: str
    """What the user gave, made absolute for journal files."""
    optuna: Any
    """The optuna storage object."""
    journal: Path | None = None
    """The journal file, for journal storages."""
    rdb: Any = None
    """The RDBStorage (heartbeats), for RDB URLs."""

    @property
    def ask_lock(self) -> Path | None:
        """Workers on one journal take turns to count trials and ask, so n_trials is exact."""
        return None if self.journal is None else self.journal.with_name(self.journal.name + ".asklock")

    def dashboard_command(self) -> str:
        target = str(self.journal) if self.journal is not None else self.url
        try:
            target = str(Path(target).relative_to(Path.cwd())) if self.journal is not None else target
        except ValueError:
            pass
        return f"optuna-dashboard {target} --host 127.0.0.1"


def _is_url(spec: str) -> bool:
    return "://" in spec


def check_storage(spec: str, timeout: float = 3.0) -> None:
    """Fail fast on a storage that cannot work; creates nothing. Talks only to the URL's own host."""
    if not _is_url(spec):
        path = Path(spec).expanduser().resolve()
        if path.exists() and not path.is_file():
            raise ConfigError(f"sweep.storage {spec!r}: {path} exists and is not a file (expected a journal file)")
        if path.is_file() and path.stat().st_size:  # Optuna would append to a foreign file before failing to read it
            with open(path, "rb") as handle:
                first = handle.readline(65536)
            try:
                is_journal = "op_code" in json.loads(first)
            except (ValueError, TypeError):
                is_journal = False
            if not is_journal:
                raise ConfigError(f"sweep.storage {spec!r}: {path} is not an Optuna journal file; give a new path "
                                  f"or an RDB URL")
        existing = path.parent
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise ConfigError(f"sweep.storage {spec!r}: directory {existing} is not writable")
        return
    parsed = urlparse(spec)
    scheme = parsed.scheme.split("+")[0]
    if scheme not in RDB_SCHEMES:
        raise ConfigError(f"sweep.storage {spec!r}: unknown scheme {parsed.scheme!r}; use a journal file path "
                          f"(optuna.journal) or an RDB URL: {', '.join(s + '://' for s in RDB_SCHEMES)}")
    if scheme == "sqlite":
        path = tracking._sqlite_path(spec)
        if path is None:
            raise ConfigError(f"sweep.storage {spec!r}: expected sqlite:///<path to .db file>")
        parent = path.resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise ConfigError(f"sweep.storage {spec!r}: directory {parent} does not exist or is not writable")
        return
    host = parsed.hostname
    if not host:
        raise ConfigError(f"sweep.storage {spec!r} names no host")
    port = parsed.port or _DEFAULT_PORTS[scheme]
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        raise ConfigError(f"sweep.storage {spec!r} is unreachable ({host}:{port}: {err.strerror or err}); start the "
                          f"database or use a journal file: sweep.storage=optuna.journal") from None


def open_storage(spec: str, heartbeat: int) -> Storage:
    """The optuna storage for a journal path or an RDB URL (after check_storage)."""
    import optuna

    if not _is_url(spec):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(spec).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return Storage(str(path), JournalStorage(JournalFileBackend(str(path))), journal=path)
    scheme = urlparse(spec).scheme.split("+")[0]
    kwargs: dict[str, Any] = {}
    if scheme != "sqlite":  # heartbeats find trials of dead workers on other machines
        kwargs = {"heartbeat_interval": heartbeat, "grace_period": 2 * heartbeat}
    for attempt in range(3):  # workers starting together on a fresh database race to create Optuna's tables
        try:
            rdb = optuna.storages.RDBStorage(spec, **kwargs)
            break
        except ImportError as err:
            raise ConfigError(f"sweep.storage {spec!r}: the database driver is missing ({err}); install it, e.g. "
                              f"pip install 'stepbench[postgres]'") from None
        except Exception as err:  # noqa: BLE001 - SQLAlchemy's many connection errors: one message
            if attempt == 2:
                raise ConfigError(f"sweep.storage {spec!r}: cannot open the database: "
                                  f"{' '.join(str(err).split())[:300]}") from None
            time.sleep(1.0 + attempt)
    return Storage(spec, rdb, rdb=rdb)


@contextlib.contextmanager
def file_lock(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _process_attrs() -> dict[str, Any]:
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": round(psutil.Process().create_time(), 3)}


def _process_dead(attrs: dict[str, Any]) -> bool:
    """True only when the process that owns a RUNNING trial ran on this host and is gone."""
    import psutil

    if attrs.get("host") != socket.gethostname() or "pid" not in attrs:
        return False
    try:
        return abs(psutil.Process(int(attrs["pid"])).create_time() - float(attrs.get("pid_start", "nan"))) >= 0.01
    except (psutil.NoSuchProcess, ValueError):
        return True


# --------------------------------------------------------------------------------------------- pruning probe


class TrialStopped(RuntimeError):
    """Raised inside a cell's training to stop a trial the pruner rejected."""

    mlflow_status = "KILLED"
    """How bench.cell ends the trial's MLflow run (not FAILED: nothing broke)."""


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
            result = ev.evaluate(method, policy, self.prompts, self.steps, {self.reward_name: reward}, n=self.n,
                                 eval_seed=self.eval_seed, batch_size=self.batch_size, grid_images=0)
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


def run_hooked_cell(cfg: dict, grid: str, index: str, hook, tags: dict[str, Any]) -> str:
    """bench.cell.run_cell with the probe's train hook and the trial's run tags; waits while another worker runs
    the very same config (then reuses its run: a cell is a pure function of its config)."""
    from bench.cell import run_cell

    status = run_cell(cfg, grid, index=index, tags=tags, train_hook=hook)
    while status == "running-elsewhere":
        time.sleep(2.0)
        status = run_cell(cfg, grid, index=index, tags=tags, train_hook=hook)
    return status


# --------------------------------------------------------------------------------------------- the study


def compose_cell(overrides: list[str]) -> tuple[dict, dict | None]:
    """(resolved cell config, the method YAML's search_space block or None); ConfigError with bench.run's wording."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from bench import run as bench_run

    try:
        cfg = grids._plain(grids.compose(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(bench_run._unknown_key_message(err, overrides) or bench_run._one_line(err)) from None
    yaml_space = cfg["method"].pop("search_space", None)
    return cfg, yaml_space


def _pinned(overrides: list[str]) -> set[str]:
    """Searchable keys given a value on the command line (method.lr=..., policy.lora_alpha=...)."""
    out = set()
    for line in overrides:
        key = line.lstrip("+~").split("=", 1)[0]
        if key.startswith("method."):
            out.add(key[len("method."):])
        elif key.startswith("policy."):
            out.add(key)
    return out


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
        self.objective_key = (tracking.eval_metric_key(self.reward, self.k, "mean") if conf.objective == "train_steps"
                              else f"eval/{self.reward}/mean_over_s")
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
        fail trials of dead processes, and open the MLflow experiment. Raises ConfigError before any trial."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.storage = open_storage(self.conf.storage, self.conf.heartbeat)
        key = json.dumps(self.key(), sort_keys=True, default=str)
        with file_lock(self.storage.ask_lock):
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
            self._fail_dead_trials()
            # the MLflow store is created under the same lock: SQLite schema creation is not safe to race
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

    def _fail_dead_trials(self) -> None:
        from optuna.trial import TrialState

        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if _process_dead(trial.user_attrs):
                self.storage.optuna.set_trial_user_attr(trial._trial_id, "error",
                                                        "its process died while it was RUNNING; marked FAIL on restart")
                self.storage.optuna.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
                print(f"trial {trial.number} was left RUNNING by a dead process (pid {trial.user_attrs.get('pid')}): "
                      f"marked FAIL", flush=True)

    # ------------------------------------------------------------------ the loop
    def counts(self) -> dict[str, int]:
        from optuna.trial import TrialState

        out = {s.name: 0 for s in TrialState}
        for trial in self.study.get_trials(deepcopy=False):
            out[trial.state.name] += 1
        return out

    def _next_trial(self):
        """Ask for a trial unless the study already has n_trials finished or running ones (None then)."""
        import optuna

        with file_lock(self.storage.ask_lock):
            with warnings.catch_warnings():  # "experimental"; "heartbeat is supposed to be used with optimize":
                warnings.simplefilter("ignore")  # this loop records the heartbeats itself (_heartbeat)
                if self.storage.rdb is not None and self.storage.rdb.get_heartbeat_interval():
                    optuna.storages.fail_stale_trials(self.study)
                counts = self.counts()
                if counts["COMPLETE"] + counts["PRUNED"] + counts["RUNNING"] >= self.conf.n_trials:
                    return None
                trial = self.study.ask({k: d.distribution() for k, d in self.space.items()})
            for name, value in _process_attrs().items():
                trial.set_user_attr(name, value)
            return trial

    def run(self) -> int:
        """Run trials until the study has n_trials finished ones; write the tuned config; 0 if any trial is
        COMPLETE."""
        counts = self.counts()
        print(f"study {self.study_name} ({self.storage.url}): {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, "
              f"{counts['FAIL']} failed so far; up to {self.conf.n_trials} finished trials", flush=True)
        print(f"  objective {self.objective_key} (maximise), budget {self.cfg['budget']['nfe']} NFEs per trial, "
              f"space ({self.space_source}): {'; '.join(d.describe() for d in self.space.values())}", flush=True)
        if self.cfg.get("with_base", True):
            from bench.cell import run_cell

            run_cell(grids.base_config(self.cfg), self.grid, index="(base) ")
        start, failures = time.monotonic(), 0
        while True:
            if self.conf.timeout is not None and time.monotonic() - start > self.conf.timeout:
                print(f"sweep.timeout ({self.conf.timeout} s) reached: no new trial", flush=True)
                break
            trial = self._next_trial()
            if trial is None:
                break
            state = self.run_trial(trial)
            failures = failures + 1 if state == "FAIL" else 0
            if failures >= self.conf.max_failures:
                print(f"error: {failures} trials in a row failed (sweep.max_failures); stopping", file=sys.stderr,
                      flush=True)
                self.finish()
                return 1
        return self.finish()

    def run_trial(self, trial) -> str:
        """One trial = one cell; returns the Optuna state name it ends in."""
        from optuna.trial import TrialState

        import tasks.prompts as prompt_sets

        params = dict(trial.params)
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        index = f"[trial {trial.number}] "
        print(f"{index}{shown}", flush=True)
        tags = {"sweep.study": self.study_name, "sweep.trial": trial.number, "sweep.storage": self._safe_url(),
                "sweep.params": json.dumps(params, sort_keys=True, default=str)}
        try:
            cfg, _ = compose_cell(self.cell_overrides + trial_overrides(self.space, params))
            cfg["with_base"] = False  # the study's base cell runs once, before the trials
            from bench.validate import check_config

            check_config(cfg)
        except ConfigError as err:
            return self._tell(trial, TrialState.FAIL, None, error=str(err))
        cid = grids.cell_id(cfg)
        trial.set_user_attr("cell_id", cid)
        ev = cfg["eval"]
        probe = Probe(trial, self.milestones, prompts=list(prompt_sets.load(ev["prompts"]).val),
                      steps=self.probe_steps, n=self.conf.intermediate.n, eval_seed=int(ev["seed"]),
                      batch_size=min(int(ev["batch_size"]), self.conf.intermediate.n), reward_name=self.reward)
        since = int(time.time() * 1000) - 1000
        try:
            with self._heartbeat(trial):
                status = run_hooked_cell(cfg, self.grid, index, probe.hook, tags)
        except BaseException as err:  # Ctrl-C, SystemExit: the trial must not stay RUNNING in the study
            with contextlib.suppress(Exception):
                trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:2000])
                self.study.tell(trial, state=TrialState.FAIL)
            raise
        try:
            return self._record(trial, cid, status, probe, since, index)
        except Exception as err:  # noqa: BLE001 - bookkeeping failed (e.g. the MLflow store): no trial stays RUNNING
            import traceback

            traceback.print_exc()
            return self._tell(trial, TrialState.FAIL, None, error=f"recording the trial failed: {type(err).__name__}: "
                                                                   f"{err}")

    def _record(self, trial, cid: str, status: str, probe: Probe, since: int, index: str) -> str:
        """Read the cell's outcome from MLflow, tag its run and tell Optuna."""
        from optuna.trial import TrialState

        run = self._find_run(cid, since, status)
        run_id = None if run is None else run.info.run_id
        if run_id is not None:
            trial.set_user_attr("mlflow_run_id", run_id)
            trial.set_user_attr("mlflow_experiment", tracking.experiment_name(self.grid))
            cell_run = tracking.CellRun(self.store, run_id)
            for milestone, value in probe.reported.items():
                cell_run.log_metrics({"sweep/intermediate": value}, step=milestone)
            cell_run.flush()
        if status == "skipped":
            trial.set_user_attr("reused_run", True)
            print(f"{index}same config as an earlier finished cell: reusing run {run_id}", flush=True)
        if probe.pruned_at is not None:  # the run ended KILLED (TrialStopped.mlflow_status) with the reason as error
            if run_id is not None:
                tracking.CellRun(self.store, run_id).set_tags({"sweep.state": "PRUNED"})
            return self._tell(trial, TrialState.PRUNED, run_id, milestone=probe.pruned_at,
                              value=probe.reported.get(probe.pruned_at))
        if status not in ("finished", "skipped") or run is None:
            error = (run.data.tags.get("error") if run is not None else None) or f"cell status {status}"
            if run_id is not None:
                tracking.CellRun(self.store, run_id).set_tags({"sweep.state": "FAIL"})
            return self._tell(trial, TrialState.FAIL, run_id, error=error)
        value = self.store.client.get_run(run_id).data.metrics.get(self.objective_key)
        if value is None or not math.isfinite(value):
            error = f"the cell logged no finite {self.objective_key}"
            tracking.CellRun(self.store, run_id).set_tags({"sweep.state": "FAIL"})
            return self._tell(trial, TrialState.FAIL, run_id, error=error)
        cell_run = tracking.CellRun(self.store, run_id)
        if status != "skipped":
            cell_run.set_tags({"sweep.state": "COMPLETE"})
            cell_run.log_metrics({"sweep/objective": value, "sweep/probe_eval_nfe": probe.eval_nfe})
            cell_run.flush()
        return self._tell(trial, TrialState.COMPLETE, run_id, value=value)

    def _tell(self, trial, state, run_id, *, value=None, error=None, milestone=None) -> str:
        if error:
            trial.set_user_attr("error", error[:2000])
        self.study.tell(trial, value if state.name == "COMPLETE" else None, state=state)
        if state.name == "COMPLETE":
            what = f"{self.objective_key} = {value:.4g}"
        elif state.name == "PRUNED":
            what = f"at {milestone} NFEs" + (f" (probe {value:.4g})" if value is not None else "")
        else:
            what = error or ""
        print(f"[trial {trial.number}] {state.name} {what}" + (f" (run {run_id})" if run_id else ""), flush=True)
        return state.name

    def _safe_url(self) -> str:
        parsed = urlparse(self.storage.url)
        if parsed.password:
            return self.storage.url.replace(f":{parsed.password}@", ":***@")
        return self.storage.url

    def _find_run(self, cid: str, since_ms: int, status: str):
        if status == "skipped":
            return self.store.finished_run(self.experiment_id, cid)
        mine = [r for r in self.store.cell_runs(self.experiment_id, cid)
                if r.data.tags.get("stepbench.pid") == str(os.getpid())
                and r.data.tags.get("stepbench.host") == socket.gethostname() and r.info.start_time >= since_ms]
        return max(mine, key=lambda r: r.info.start_time) if mine else None

    @contextlib.contextmanager
    def _heartbeat(self, trial) -> Iterator[None]:
        """Record Optuna heartbeats of a running trial (RDB storages with a heartbeat interval)."""
        rdb = self.storage.rdb
        interval = rdb.get_heartbeat_interval() if rdb is not None else None
        if not interval:
            yield
            return
        stop = threading.Event()

        def beat():
            while True:
                with contextlib.suppress(Exception):
                    rdb.record_heartbeat(trial._trial_id)
                if stop.wait(interval):
                    break

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

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
            path, text = self.write_tuned(best)
            print(f"tuned config: {path}" + (f"  (python -m bench.run method=tuned/{self.study_name})"
                                              if path.parent == TUNED_DIR else ""), flush=True)
            self._log_best(best, complete, path.name, text)
        print(f"dashboard: {self.storage.dashboard_command()}", flush=True)
        return 0

    def tuned_path(self) -> Path:
        return Path(self.conf.tuned_dir).expanduser().resolve() / f"{self.study_name}.yaml" if self.conf.tuned_dir \
            else TUNED_DIR / f"{self.study_name}.yaml"

    def tuned_yaml(self, best) -> str:
        """The best trial's complete method config (recipe values, command-line overrides and the searched
        values), so that method=tuned/<study> needs no recipe."""
        import yaml

        cfg, _ = compose_cell(self.cell_overrides + trial_overrides(self.space, best.params))
        method = cfg["method"]
        policy_keys = {k.split(".", 1)[1]: v for k, v in best.params.items() if k.startswith("policy.")}
        run_id = best.user_attrs.get("mlflow_run_id", "?")
        extra = " ".join(o for o in self.cell_overrides if not o.startswith("method="))
        lines = [
            f"# python -m bench.run method=tuned/{self.study_name} model={self.model} reward={self.reward} "
            f"train_steps={self.k}",
            f"# Tuned by: python -m bench.sweep method={self.method} {extra}".rstrip(),
            f"# study {self.study_name} ({self._safe_url()}): best of {len(self.study.trials)} trials = trial "
            f"{best.number}, {self.objective_key} = {best.value:.6g} (MLflow run {run_id}, experiment "
            f"{tracking.experiment_name(self.grid)}); budget {self.cfg['budget']['nfe']} NFEs, seed {self.cfg['seed']}.",
            f"# Searched: {', '.join(d.describe() for d in self.space.values())}.",
        ]
        if policy_keys:
            lines.append("# Policy values of the best trial (set them too): "
                         + " ".join(f"policy.{k}={hydra_value(v)}" for k, v in policy_keys.items()))
        lines.append("# Every field is written out (recipe values included), so this file needs no recipe.")
        searched = {k for k in best.params if "." not in k}
        out = []
        for key, value in method.items():  # one line per field, values in flow style (as bench.conf.generate writes)
            text = yaml.safe_dump({key: value}, default_flow_style=True, width=10_000).strip()[1:-1]
            out.append(text + ("   # searched" if key in searched else ""))
        return "\n".join(lines + out) + "\n"

    def write_tuned(self, best) -> tuple[Path, str]:
        path = self.tuned_path()
        text = self.tuned_yaml(best)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # atomic: parallel workers finishing together never leave half a file
        return path, text

    def _log_best(self, best, complete: list, name: str, text: str) -> None:
        """Tag the best trial's run sweep.best=true (the other COMPLETE runs false) and log the tuned config and
        the trials table to it."""
        import tempfile

        run_id = best.user_attrs.get("mlflow_run_id")
        for trial in complete:
            other = trial.user_attrs.get("mlflow_run_id")
            if other and other != run_id:
                with contextlib.suppress(Exception):
                    tracking.CellRun(self.store, other).set_tags({"sweep.best": "false"})
        if not run_id:
            return
        run = tracking.CellRun(self.store, run_id)
        run.set_tags({"sweep.best": "true"})
        run.log_text(text, f"sweep/{name}")
        with tempfile.TemporaryDirectory(prefix="stepbench-sweep-") as tmp:
            table = Path(tmp) / "trials.csv"
            self.study.trials_dataframe().to_csv(table, index=False)
            run.log_artifact(table, "sweep")


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
    space = resolve_space(method, cfg, raw, source, _pinned(cell_overrides))
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


if __name__ == "__main__":
    # run the imported module, not this __main__ copy: one set of classes (TrialStopped, SweepConf) per process
    from bench.sweep import main as _main

    sys.exit(_main())
