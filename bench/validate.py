"""Check a run's configuration before any model loads or any MLflow run exists: one clear message, non-zero exit.

Two stages:
- ``check_overrides(argv overrides)``: import-free (Hydra's override parser only); every value given on the
  command line for a config group (model=, reward=, method=, grid=, recipe=, including sweeps ``a,b``) must name
  a YAML file in bench/conf/<group>/. This is what makes ``python -m bench.run method=nope`` fail in a second.
- ``check_config(cfg)``: one composed cell config against the registries (tasks.models, tasks.rewards, methods,
  tasks.prompts), the method's Config dataclass (unknown or invalid fields), positive budgets and step counts,
  step counts the model supports (ModelSpec.step_counts), dtype and device. ``check_tracking_uri`` probes the
  tracking URI (SQLite directory writable; for servers a TCP connect with a short timeout, to that host only).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parent / "conf"
GROUPS = ("model", "reward", "method", "recipe", "grid")
DTYPES = ("float32", "float16", "bfloat16")
PRECISIONS = ("fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A bad configuration value; the message names the value and the valid choices."""


def conf_options(group: str) -> list[str]:
    """The options of a config group: the YAML files under bench/conf/<group>/ (nested ones as "dir/name")."""
    root = CONF_DIR / group
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def _unknown(kind: str, name: Any, valid: Iterable[Any]) -> ConfigError:
    return ConfigError(f"unknown {kind} {str(name)!r}; available: {', '.join(map(str, valid))}")


def check_overrides(overrides: list[str]) -> None:
    """Import-free check of config-group choices given on the command line (sweeps included)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(f"cannot parse the command line: {' '.join(str(err).split())}") from None
    for override in parsed:
        group = override.key_or_group
        if override.is_add() or override.is_force_add():
            _check_added_key(group)
        if group not in GROUPS or override.package is not None or override.is_delete():
            continue
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                raise ConfigError(f"{group}: only comma-separated choices can be swept; got {override.input_line!r}")
            values = list(override.sweep_string_iterator())
        else:
            values = [override.get_value_element_as_str()]
        if group == "grid" and len(values) > 1:
            raise ConfigError(f"sweep one grid at a time; got grid={','.join(values)}")
        options = conf_options(group)
        for value in values:
            if value not in options:
                raise _unknown(group, value, options)


FREE_FORM = ("method", "reward.options")
"""Schema nodes that take keys the schema does not list: a method's fields (checked against its Config dataclass
later) and a reward's loader options (checked by tasks.rewards.check_options)."""


def _check_added_key(key: str) -> None:
    """A `+key=value` override may only add keys under a free-form node: `+budget.nfee=1` (a typo of budget.nfe)
    would otherwise be accepted, logged and ignored."""
    import dataclasses
    import typing

    from bench.conf.schema import StepbenchConfig

    if key == "hydra" or key.startswith(("hydra.", "hydra/")) or "/" in key or "@" in key:
        return
    if key in GROUPS or (CONF_DIR / key).is_dir():  # +group=option adds a config group choice
        return
    node: Any = StepbenchConfig
    parts = key.split(".")
    for depth, part in enumerate(parts):
        path = ".".join(parts[:depth])
        if path in FREE_FORM:
            return
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            where = path or "the top level"
            raise ConfigError(f"unknown config key {key!r} (given as +{key}=...); valid keys under {where!r}: "
                              f"{', '.join(sorted(fields))}")
        hint = typing.get_type_hints(node)[part]
        node = hint if dataclasses.is_dataclass(hint) else None


def _names_check(kind: str, name: str, valid: list[str]) -> None:
    if name not in valid:
        raise _unknown(kind, name, valid)


MAX_SEED = 2**32 - 1  # numpy's seed range; torch generators take the same seeds
MAX_THREADS = 1024
MAX_EVAL_N = 100_000


def _seed(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{key} must be an integer in [0, {MAX_SEED}] (2**32 - 1); got {value!r}")


def _positive_int(key: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer; got {value!r}")


def prompt_set_names() -> list[str] | None:
    """tasks.prompts' names, or None when the module does not offer names() (then load() decides)."""
    import tasks.prompts as prompts

    names = getattr(prompts, "names", None)
    return list(names()) if callable(names) else None


def held_out_splits(prompt_set: Any) -> list[str]:
    """The evaluation splits a tasks.prompts.PromptSet offers: its prompt lists other than train (val, test, and
    test_hard where the set has one)."""
    return [name for name, value in vars(prompt_set).items() if name != "train" and isinstance(value, list)]


RESERVED_METHOD_KEYS = ("name", "search_space")
"""Keys of the method node that belong to the harness (registry name; bench.sweep's optional search space)."""


def method_fields(method: Any) -> dict[str, Any]:
    """The method node without the harness's reserved keys: the keyword overrides for methods.load."""
    return {k: v for k, v in dict(method).items() if k not in RESERVED_METHOD_KEYS}


def check_config(cfg: Any) -> None:
    """Validate one composed cell config (an OmegaConf node or a plain nested dict). Raises ConfigError."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True))

    # --- numbers first: no imports needed
    _positive_int("budget.nfe", cfg.budget.nfe)
    _positive_int("budget.reward_calls", cfg.budget.reward_calls, allow_none=True)
    _positive_int("train_steps", cfg.train_steps, allow_none=True)
    _positive_int("eval.n", cfg.eval.n)
    _positive_int("eval.val_n", cfg.eval.val_n)
    splits = list(cfg.eval.splits)
    if not splits:
        raise ConfigError("eval.splits is empty; give at least one held-out split, e.g. eval.splits=[val,test]")
    if len(set(splits)) != len(splits):
        raise ConfigError(f"eval.splits has duplicates: {splits}")
    if "train" in splits:
        raise ConfigError("eval.splits: 'train' is the training prompts, not a held-out split; valid: val, test")
    if cfg.eval.val_seed == cfg.eval.seed:
        raise ConfigError(f"eval.val_seed must differ from eval.seed (validation and test noise are disjoint); got "
                          f"{cfg.eval.val_seed!r} for both")
    _positive_int("eval.batch_size", cfg.eval.batch_size)
    _positive_int("threads", cfg.threads)
    if cfg.threads > MAX_THREADS:
        raise ConfigError(f"threads must be <= {MAX_THREADS} (torch intra-op threads per process; 1 is the default, "
                          f"use more workers instead); got {cfg.threads!r}")
    _seed("seed", cfg.seed)
    for key in sorted(k for k in cfg.eval.keys() if str(k).endswith("seed")):
        _seed(f"eval.{key}", cfg.eval[key])
    for key in ("n", "val_n"):
        if cfg.eval[key] > MAX_EVAL_N:
            raise ConfigError(f"eval.{key} must be <= {MAX_EVAL_N:,} samples per step count; got {cfg.eval[key]:,} "
                              f"({cfg.eval[key] * len(cfg.eval.steps):,} images over eval.steps="
                              f"{list(cfg.eval.steps)}); "
                              f"`python -m bench.plan` estimates a grid's cost")
    lease = cfg.tracking.get("lease_seconds", 300.0)
    if not lease > 0:
        raise ConfigError(f"tracking.lease_seconds must be > 0 seconds; got {lease!r}")
    if cfg.eval.grid_images < 0:
        raise ConfigError(f"eval.grid_images must be >= 0; got {cfg.eval.grid_images!r}")
    steps = list(cfg.eval.steps)
    if not steps:
        raise ConfigError("eval.steps is empty; give at least one step count, e.g. eval.steps=[1,2,4,8]")
    for s in steps:
        _positive_int("eval.steps", s)
    if len(set(steps)) != len(steps):
        raise ConfigError(f"eval.steps has duplicates: {steps}")
    if cfg.dtype not in DTYPES:
        raise _unknown("dtype", cfg.dtype, DTYPES)
    if cfg.get("precision", "fp32") not in PRECISIONS:
        raise _unknown("precision", cfg.precision, PRECISIONS)

    # --- registries (lazy: importing them loads no model)
    import methods
    import tasks.models as models
    import tasks.rewards as rewards

    _names_check("model", cfg.model.name, models.names())
    spec = models.get(cfg.model.name)
    if cfg.model.path is not None and not Path(cfg.model.path).exists():
        raise ConfigError(f"model.path {cfg.model.path!r} does not exist (a save_pretrained folder of "
                          f"{cfg.model.name})")
    for s in steps:
        if s not in spec.step_counts:
            raise ConfigError(f"eval.steps: {s} is not a step count {spec.name} supports; valid: "
                              f"{', '.join(map(str, spec.step_counts))}")
    from bench.grid import resolved_train_steps

    k = resolved_train_steps(cfg)
    if k not in spec.step_counts:
        raise ConfigError(f"train_steps: {k} is not a step count {spec.name} supports; valid: "
                          f"{', '.join(map(str, spec.step_counts))}")

    reward_names = rewards.names()
    _names_check("reward", cfg.reward.name, reward_names)
    try:
        rewards.check_options(cfg.reward.name, rewards.REWARDS.get(cfg.reward.name), dict(cfg.reward.options))
    except ValueError as err:
        raise ConfigError(f"reward.options: {err}") from None
    for name in cfg.eval.rewards:
        if name not in reward_names:
            raise ConfigError(f"eval.rewards: unknown reward {name!r}; available: {', '.join(reward_names)}")

    for key in ("prompts", "eval.prompts"):
        value = cfg.prompts if key == "prompts" else cfg.eval.prompts
        valid = prompt_set_names()
        if valid is not None:
            if value not in valid:
                raise ConfigError(f"{key}: unknown prompt set {value!r}; available: {', '.join(valid)}")
        else:
            import tasks.prompts as prompts
            from tasks.registry import UnknownNameError

            try:
                prompts.load(value)
            except UnknownNameError as err:
                raise ConfigError(f"{key}: {err}") from None
    _check_prompts(cfg, spec)
    import tasks.prompts as prompt_sets

    available = held_out_splits(prompt_sets.load(cfg.eval.prompts))
    for split in splits:
        if split not in available:
            raise ConfigError(f"eval.splits: prompt set {cfg.eval.prompts!r} has no held-out split {split!r}; "
                              f"available: {', '.join(available)}")

    method_name = cfg.method.name
    _names_check("method", method_name, methods.names())
    try:
        config = methods.make_config(method_name, **method_fields(cfg.method))
    except ImportError as err:
        raise ConfigError(f"method {method_name!r} is registered but cannot be imported: {err}") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"method.{method_name}: {err}") from None
    if methods.trains(method_name):
        guidance = cfg.policy.guidance_scale if cfg.policy.guidance_scale is not None else spec.guidance_scale
        need = min_update_nfe(config, k, 2 if guidance > 1.0 else 1)
        if cfg.budget.nfe < need:
            raise ConfigError(f"budget.nfe={cfg.budget.nfe} is smaller than one {method_name} update at K={k} "
                              f"({need} NFEs); raise budget.nfe to at least {need}")

    _check_device(cfg.device)
    if cfg.get("adam_8bit", False) or cfg.get("precision", "fp32") != "fp32":
        from bench.accel import MissingExtraError, check

        try:
            check({"adam_8bit": cfg.get("adam_8bit", False), "precision": cfg.get("precision", "fp32"),
                   "device": cfg.device})
        except (MissingExtraError, ValueError) as err:
            raise ConfigError(str(err)) from None
    if cfg.model.path is None and not spec.is_hub and not (Path(spec.source) / "model_index.json").is_file():
        raise ConfigError(f"model {spec.name!r}: its shipped weights are missing ({spec.source} has no "
                          f"model_index.json); regenerate them with `python -m bench.models build {spec.name}` "
                          f"or pass model.path=<save_pretrained folder>")
    from tasks.models import ModelUnavailableError
    from tasks.weights import WeightsChecksumError, verify_checksums

    folder = cfg.model.path if cfg.model.path is not None else (None if spec.is_hub else spec.source)
    if folder is not None:
        try:  # corrupt tensors behind an intact header load fine and give wrong numbers: check before any run
            verify_checksums(folder, fix=f"rebuild with `python -m bench.models build {spec.name}` or restore the "
                                         f"files (git checkout -- {folder})")
        except (WeightsChecksumError, ModelUnavailableError) as err:
            raise ConfigError(f"model {spec.name!r}: {err}") from None


def min_update_nfe(config: Any, train_steps: int, nfe_per_predict: int) -> int:
    """NFEs of the cheapest update the method can make: its Config's own ``min_update_nfe(K, nfe_per_predict)``
    when it defines one, else the floor every training method shares (one sampled trajectory of K steps and one
    gradient NFE)."""
    own = getattr(config, "min_update_nfe", None)
    if callable(own):
        return int(own(train_steps, nfe_per_predict))
    return train_steps * nfe_per_predict + 1


def _eval_split_names(cfg: Any) -> list[str]:
    return [str(s) for s in cfg.eval.get("splits", None) or ["val", "test"]]


def _check_prompts(cfg: Any, spec: Any) -> None:
    """The prompt sets exist for the model (the toy models and verifiers know only the toy world's words) and
    every split the cell uses is non-empty."""
    import tasks.prompts as prompts

    toy = spec.family == "toy" or str(cfg.reward.name).startswith("toy") or any(
        str(r).startswith("toy") for r in cfg.eval.rewards)
    for key, name, splits in (("prompts", cfg.prompts, ["train"]), ("eval.prompts", cfg.eval.prompts,
                                                                     _eval_split_names(cfg))):
        try:
            pset = prompts.load(name)
        except Exception as err:  # noqa: BLE001 - a broken data file: one line
            raise ConfigError(f"{key}: prompt set {name!r} cannot be read: {err}") from None
        if toy:
            words = _toy_unknown_words(pset)
            if words:
                ok = [n for n in (prompt_set_names() or []) if not _toy_unknown_words(prompts.load(n))]
                why = f"model {spec.name} knows" if spec.family == "toy" else "the toy verifier rewards know"
                raise ConfigError(f"{key}={name}: {why} only the toy world's words, and its prompts use "
                                  f"{', '.join(repr(w) for w in words[:3])}; prompt sets that fit: {', '.join(ok)}")
        for split in splits:
            members = getattr(pset, split, None)
            if members is not None and len(members) == 0:
                raise ConfigError(f"{key}={name}: its {split!r} split is empty; choose a prompt set with "
                                  f"{split} prompts")


def _toy_unknown_words(pset: Any) -> list[str]:
    from tasks.toy.world import VOCAB

    vocab = set(VOCAB)
    unknown: dict[str, None] = {}
    for split in ("train", "val", "test", "eval", "test_hard"):
        for prompt in getattr(pset, split, None) or []:
            for word in prompt.lower().replace(",", " ").split():
                if word not in vocab:
                    unknown.setdefault(word)
    return list(unknown)


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:<i> or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available here; use device=cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} requested but MPS is not available here; use device=cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device {device!r}; use cpu, cuda, cuda:<i> or mps")


def check_weights(cells: list[dict]) -> None:
    """bench.plan's preflight for the weights the cells load (pipelines, training and evaluation rewards), before
    any MLflow store is touched: ConfigError with one line naming each missing file and the command that fetches it."""
    from bench.plan import check_pipeline, check_reward

    problems = []
    for model, path in dict.fromkeys((c["model"]["name"], c["model"].get("path")) for c in cells):
        problems.append(check_pipeline(model, path))
    rewards: dict[tuple, tuple[str, dict, bool]] = {}
    for c in cells:
        options = dict(c["reward"].get("options") or {})
        rewards.setdefault((c["reward"]["name"], repr(sorted(options.items()))), (c["reward"]["name"], options, True))
    for c in cells:
        for name in c["eval"]["rewards"]:
            if not any(key[0] == name for key in rewards):
                rewards.setdefault((name, "[]"), (name, {}, False))
    for name, options, training in rewards.values():
        problems.extend(check_reward(name, options, training=training))
    problems = [p for p in problems if p is not None]
    if problems:
        raise ConfigError(missing_line(problems))


def missing_line(problems: list) -> str:
    """bench.plan's Missing records on one line: what is missing and the command or override that provides it."""
    parts = []
    for m in problems:
        if m.repo is None:
            parts.append(f"{m.what}: {m.detail}")
            continue
        get = f"hf download {m.repo}" + (f" {m.filename}" if m.filename else "")
        parts.append(f"{m.what}: not in the Hugging Face cache; fetch it with `{get}`"
                     + (f" or pass {m.local}" if m.local else ""))
    return "weights missing, nothing was loaded or logged: " + "; ".join(parts)


def check_tracking_uri(uri: str, timeout: float = 3.0) -> None:
    from bench.tracking import TrackingURIError, check_uri

    try:
        check_uri(uri, timeout=timeout)
    except TrackingURIError as err:
        raise ConfigError(str(err)) from None
