"""The sweep's own settings (``sweep=<preset>``, ``sweep.<key>=...``) and the composition of a trial's cell config.
What each field means: bench/conf/sweep/default.yaml (the default preset, one comment per field)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bench import grid as grids
from bench import run as bench_run
from bench.validate import ConfigError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SWEEP_DIR = CONF_DIR / "sweep"
TUNED_DIR = CONF_DIR / "method" / "tuned"
CHOICES = {"objective": ("train_steps", "mean_steps"), "sampler.name": ("tpe", "random"),
           "pruner.name": ("median", "percentile", "none")}


@dataclass
class SamplerConf:
    name: str = "tpe"
    seed: int | None = 0
    n_startup_trials: int = 5


@dataclass
class PrunerConf:
    name: str = "median"
    n_startup_trials: int = 3
    n_warmup_steps: int = 0
    percentile: float = 25.0


@dataclass
class IntermediateConf:
    points: int = 3
    n: int = 16


@dataclass
class SweepConf:
    n_trials: int = 20
    study_name: str | None = None
    storage: str = "optuna.journal"
    objective: str = "train_steps"
    space: dict[str, Any] = field(default_factory=dict)
    enqueue: list[Any] = field(default_factory=list)
    enqueue_defaults: bool = True
    overrides: list[str] = field(default_factory=list)
    timeout: float | None = None
    max_failures: int = 3
    heartbeat: int = 60
    tuned_dir: str | None = None
    write_tuned: bool = True
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    intermediate: IntermediateConf = field(default_factory=IntermediateConf)


def sweep_presets() -> list[str]:
    return sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split("full_key:")[0].split())


def load_sweep_conf(overrides: list[str]) -> SweepConf:
    """The preset (sweep=<name>, default: default) merged into the typed schema, then the sweep.* overrides."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(f"cannot parse the command line: {' '.join(str(err).split())}") from None
    preset, keyed = "default", []
    for override in parsed:
        if override.is_add() or override.is_delete() or override.is_sweep_override():
            raise ConfigError(f"{override.input_line!r}: sweep settings take plain key=value overrides")
        if override.key_or_group == "sweep":
            preset = str(override.value())
        else:
            keyed.append((override.key_or_group[len("sweep."):], override.value()))
    if preset not in sweep_presets():
        raise ConfigError(f"unknown sweep preset {preset!r}; available: {', '.join(sweep_presets())}")
    try:
        conf = OmegaConf.merge(OmegaConf.structured(SweepConf), OmegaConf.load(SWEEP_DIR / f"{preset}.yaml") or {})
    except OmegaConfBaseException as err:
        raise ConfigError(f"bench/conf/sweep/{preset}.yaml: {_one_line(err)}") from None
    for key, value in keyed:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(conf, parent) if parent else conf
        free = key.startswith("space.")  # the space is a free mapping
        if node is None or (OmegaConf.is_config(node) and leaf not in node and not free):
            valid = sorted(node.keys()) if OmegaConf.is_dict(node) else []
            raise ConfigError(f"unknown sweep key 'sweep.{key}'; valid keys under "
                              f"'sweep{'.' + parent if parent else ''}': {', '.join(valid)}")
        try:
            OmegaConf.update(conf, key, value, merge=False)
        except OmegaConfBaseException as err:
            raise ConfigError(f"sweep.{key}={value!r}: {_one_line(err)}") from None
    out = OmegaConf.to_object(conf)
    check_sweep_conf(out)
    return out


def check_sweep_conf(conf: SweepConf) -> None:
    for key, value in (("n_trials", conf.n_trials), ("intermediate.n", conf.intermediate.n),
                       ("max_failures", conf.max_failures), ("heartbeat", conf.heartbeat)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"sweep.{key} must be a positive integer; got {value!r}")
    if conf.intermediate.points < 0:
        raise ConfigError(f"sweep.intermediate.points must be >= 0; got {conf.intermediate.points}")
    for key, valid in CHOICES.items():
        value = conf.objective if key == "objective" else getattr(conf, key.split(".")[0]).name
        if value not in valid:
            raise ConfigError(f"unknown sweep.{key} {value!r}; available: {', '.join(valid)}")
    if not 0 < conf.pruner.percentile < 100:
        raise ConfigError(f"sweep.pruner.percentile must be in (0, 100); got {conf.pruner.percentile}")
    if conf.timeout is not None and conf.timeout <= 0:
        raise ConfigError(f"sweep.timeout must be > 0 seconds or null; got {conf.timeout}")
    if not isinstance(conf.enqueue, list) or not all(isinstance(p, dict) for p in conf.enqueue):
        raise ConfigError(f"sweep.enqueue must be a list of parameter dicts; got {conf.enqueue!r}")
    if not str(conf.storage or "").strip():
        raise ConfigError("sweep.storage is empty; give a journal file path or an RDB URL")


def compose_cell(overrides: list[str]) -> tuple[dict, dict | None]:
    """(resolved cell config, the method YAML's search_space block or None); ConfigError with bench.run's wording.
    Tuning reads the validation split only: a sweep computes no test number."""
    try:
        cfg = grids._plain(grids.compose(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(bench_run._unknown_key_message(err, overrides) or bench_run._one_line(err)) from None
    yaml_space = cfg["method"].pop("search_space", None)
    cfg["eval"]["splits"] = ["val"]
    return cfg, yaml_space
