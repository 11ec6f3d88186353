"""The search space: a method's searchable fields as Optuna distributions, checked against the method's Config, and
a trial's sampled values as Hydra overrides of the cell."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import methods
from bench.validate import ConfigError, method_fields

KINDS = ("float", "log_float", "int", "log_int", "categorical")


@dataclass(frozen=True)
class Dim:
    """One searched parameter."""

    key: str  # a method field ("lr") or a config path under policy ("policy.lora_alpha")
    kind: str
    low: Any = None
    high: Any = None
    step: Any = None
    choices: tuple = ()

    @property
    def override_key(self) -> str:
        return self.key if "." in self.key else f"method.{self.key}"

    def suggest(self, trial) -> Any:
        """The trial's value of this parameter (Optuna's suggest API: an enqueued value, else the sampler's)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind in ("float", "log_float"):
            return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log_float", step=self.step)
        return trial.suggest_int(self.key, self.low, self.high, log=self.kind == "log_int", step=self.step or 1)

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
    if len(args) not in (2, 3) or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)
                                          for a in args):
        raise ConfigError(f"{where}: {kind} needs finite numbers low, high[, step]; got {spec!r}")
    low, high, step = args[0], args[1], (args[2] if len(args) == 3 else None)
    if kind in ("int", "log_int") and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}: {kind} bounds must be integers; got {spec!r}")
    if kind not in ("int", "log_int"):
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
    if not raw:
        raise ConfigError(f"method {method!r} has an empty search space ({source}); give one with "
                          f"sweep.space={{lr:[log_float,1e-5,1e-3]}} or a search_space: block in its YAML")
    if not isinstance(raw, dict):
        raise ConfigError(f"search space of {method} ({source}) must be a mapping key -> spec; got {raw!r}")
    fields = [f.name for f in dataclasses.fields(methods.config_class(method))]
    base_fields = method_fields(cfg["method"])
    space: dict[str, Dim] = {}
    for key, spec in raw.items():
        key = str(key).removeprefix("method.")
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
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def trial_overrides(space: dict[str, Dim], params: dict[str, Any]) -> list[str]:
    return [f"{space[k].override_key}={hydra_value(v)}" for k, v in params.items() if k in space]


def pinned_keys(overrides: list[str]) -> set[str]:
    """Searchable keys given a value on the command line (method.lr=..., policy.lora_alpha=...)."""
    keys = [line.lstrip("+~").split("=", 1)[0] for line in overrides]
    return {k.removeprefix("method.") for k in keys if k.startswith(("method.", "policy."))}
