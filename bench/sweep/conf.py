"""The sweep's own settings (``sweep=<preset>``, ``sweep.<key>=...``) and the composition of a trial's cell config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import grid as grids
from bench.validate import ConfigError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SWEEP_DIR = CONF_DIR / "sweep"
TUNED_DIR = CONF_DIR / "method" / "tuned"
OBJECTIVES = ("train_steps", "mean_steps")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "percentile", "none")



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
    """Seconds between a running trial's heartbeats (journal and RDB storages); a RUNNING trial silent for 2x this
    (its worker died) is marked FAIL and its slot goes to a live worker."""
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
    cfg["eval"]["splits"] = ["val"]  # tuning reads the validation split only: a sweep computes no test number
    return cfg, yaml_space
