"""Grids: expanding the command line into cells, composing each cell's config, and a cell's identity.

A cell is a pure function of its resolved config. Its identity (``cell_id``) is a hash of the config's
SEMANTIC keys only: model, reward, method and its fields (minus the method's ``Config.non_semantic``), K,
seed, budget, training prompts, evaluation settings that change numbers (splits with their n and noise seed,
steps, prompt set, rewards),
policy settings, dtype. Device, threads, batch sizes that only trade memory for speed, tracking and progress
settings are not part of it, so a cell reruns nowhere else on resume.

A cell whose result cannot depend on a grid axis runs once and is shared (issue 18.6): a method's Config names
those axes in ``invariant_to`` (``SHAREABLE_AXES``: the training seed, K, the training budget, the training
prompts). ``base`` and ``inference_scaling`` train nothing, so they are invariant to all four: the base cell is
(model, reward, eval...), evaluated once per grid and reused by every method's cell and seed, and best-of-N runs
once per (model, reward, search settings), not once per (K, seed). Their identity, run name and tags use the
canonical values (seed 0, K 0: ``cell_seed``, ``cell_train_steps``), whichever job of the grid ran them.

``expand(overrides, multirun)`` reproduces Hydra's basic sweeper (grid file's ``hydra.sweeper.params``
overridden by command-line sweeps) so that bench.run can compose and validate every cell of a grid before the
first one starts.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parent / "conf"
BASE = "base"
# Settings that never change a cell's numbers (excluded from its identity).
NON_SEMANTIC_TOP = ("device", "threads", "progress", "tracking", "with_base", "recipe", "hydra", "tf32",
                    "offload_rewards")
NON_SEMANTIC_EVAL = ("batch_size", "grid_images")
NON_SEMANTIC_POLICY = ("gradient_checkpointing",)
# Grid axes a method may declare its result independent of (Config.invariant_to); a cell of such a method is keyed
# without them and so runs once for all their values.
SHAREABLE_AXES = ("seed", "train_steps", "budget", "prompts")


def _plain(cfg: Any) -> dict:
    """A resolved plain dict of a config (OmegaConf node or dict), without Hydra's own node."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = copy.deepcopy(dict(cfg))
    cfg.pop("hydra", None)
    return cfg


def method_non_semantic(method_name: str) -> tuple[str, ...]:
    import methods

    try:
        return tuple(getattr(methods.config_class(method_name), "non_semantic", ()) or ())
    except (ImportError, ValueError):
        return ()


def invariant_axes(method_name: str) -> tuple[str, ...]:
    """The grid axes method `method_name`'s result cannot depend on (its Config's ``invariant_to``)."""
    import methods

    try:
        axes = tuple(getattr(methods.config_class(method_name), "invariant_to", ()) or ())
    except (ImportError, ValueError):
        return ()
    unknown = sorted(set(axes) - set(SHAREABLE_AXES))
    if unknown:
        raise ValueError(f"method {method_name!r}: invariant_to names {unknown}; valid: {', '.join(SHAREABLE_AXES)}")
    return axes


def _axes(cfg: dict) -> tuple[str, ...]:
    return invariant_axes(cfg["method"]["name"])


def is_shared(cfg: Any) -> bool:
    """True for a cell shared by several jobs of a grid (its method is invariant to the seed or to K)."""
    return bool({"seed", "train_steps"} & set(_axes(_plain(cfg))))


def cell_seed(cfg: dict) -> int:
    """The training seed in the cell's identity: 0 for a method whose result does not depend on it."""
    return 0 if "seed" in _axes(cfg) else int(cfg["seed"])


def cell_train_steps(cfg: dict) -> int:
    """K in the cell's identity, run name and tags: 0 for a method whose result does not depend on it."""
    return 0 if "train_steps" in _axes(cfg) else resolved_train_steps(cfg)


def canonical(cfg: Any) -> dict:
    """The config a shared cell runs with, whichever job of the grid asked for it: the canonical seed (0), so
    its run's params and tags agree. K stays (it must be a step count the model supports) but is not part of
    the identity."""
    cfg = _plain(cfg)
    cfg["seed"] = cell_seed(cfg)
    return cfg


def resolved_train_steps(cfg: dict) -> int:
    if cfg.get("train_steps") is not None:
        return int(cfg["train_steps"])
    import tasks.models as models

    return int(models.get(cfg["model"]["name"]).default_train_steps)


def is_base(cfg: dict) -> bool:
    return cfg["method"]["name"] == BASE


def not_applicable(cfg: Any) -> str | None:
    """Why the cell's method cannot train at its K (its Config's ``min_train_steps()``, e.g. online PSO and SPO need
    a stochastic step before the last one, so K >= 2), else None. Such cells of a grid are "n/a": nothing runs,
    no MLflow run is made, and the grid's summary and plan list them apart instead of as failures."""
    import methods

    cfg = _plain(cfg)
    if is_base(cfg) or "train_steps" in _axes(cfg):
        return None
    name = cfg["method"]["name"]
    config = methods.make_config(name, **{k: v for k, v in cfg["method"].items() if k != "name"})
    need = int(getattr(config, "min_train_steps", lambda: 1)())
    k = resolved_train_steps(cfg)
    return f"{name} trains at K >= {need} only, this cell has K = {k}" if k < need else None


def cell_key(cfg: Any) -> dict:
    """The semantic part of a resolved config (what cell_id hashes)."""
    cfg = _plain(cfg)
    method = cfg["method"]["name"]
    base = method == BASE
    axes = set(_axes(cfg))
    skip = set(method_non_semantic(method))
    from bench.validate import method_fields

    fields = {k: v for k, v in method_fields(cfg["method"]).items() if k not in skip}
    ev = cfg["eval"]
    policy = {k: v for k, v in cfg["policy"].items() if k not in NON_SEMANTIC_POLICY}
    return {
        "model": cfg["model"],
        "reward": cfg["reward"],
        "method": {"name": method} if base else {"name": method, **fields},
        "train_steps": cell_train_steps(cfg),
        "seed": cell_seed(cfg),
        "budget": None if "budget" in axes else cfg["budget"],
        "prompts": None if "prompts" in axes else cfg["prompts"],
        "eval": {"splits": [[split, n, seed] for split, n, seed in eval_splits(cfg)], "steps": sorted(ev["steps"]),
                 "prompts": ev["prompts"], "rewards": sorted(set(ev["rewards"]) | {cfg["reward"]["name"]})},
        "policy": {"guidance_scale": policy.get("guidance_scale")} if base else policy,
        "dtype": cfg["dtype"],
        # numerics settings that change numbers join the identity only when not default (older ids stay valid)
        **{key: cfg[key] for key, default in (("precision", "fp32"), ("adam_8bit", False))
           if cfg.get(key, default) != default},
    }


def cell_id(cfg: Any) -> str:
    text = json.dumps(cell_key(cfg), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def eval_splits(cfg: Any) -> list[tuple[str, int, int]]:
    """(split, samples per S, noise seed) for every split a cell evaluates, in eval.splits order: the validation
    split uses eval.val_n and eval.val_seed, every test list (test, test_hard) eval.n and eval.seed."""
    ev = _plain(cfg)["eval"] if not isinstance(cfg, dict) else cfg["eval"]
    return [(str(split), int(ev["val_n"] if split == "val" else ev["n"]),
             int(ev["val_seed"] if split == "val" else ev["seed"])) for split in ev["splits"]]


def cell_run_name(cfg: Any) -> str:
    from bench.tracking import run_name

    cfg = _plain(cfg)
    return run_name(cfg["method"]["name"], cfg["model"]["name"], cfg["reward"]["name"], cell_train_steps(cfg),
                    cell_seed(cfg))


def base_config(cfg: Any) -> dict:
    """The untrained base cell of the same (model, reward, eval settings), shared by every seed and K."""
    cfg = _plain(cfg)
    cfg["method"] = {"name": BASE}
    return canonical(cfg)


# --------------------------------------------------------------------------------------------- composition


def _is_hydra_override(line: str) -> bool:
    key = line.lstrip("+~").split("=", 1)[0]
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def compose(overrides: list[str], *, hydra_node: bool = False):
    """Compose bench/conf/config.yaml with overrides through Hydra's compose API (no job is run)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from bench.conf.schema import register

    register()
    was_initialized = GlobalHydra.instance().is_initialized()
    if was_initialized:
        return hydra_compose("config", overrides=overrides, return_hydra_config=hydra_node)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides, return_hydra_config=hydra_node)


def grid_choice(overrides: list[str]) -> str:
    for line in overrides:
        if line.startswith("grid="):
            return line.split("=", 1)[1]
    return "adhoc"


def expand(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The per-cell override lists Hydra will run: for a multirun, the grid file's hydra.sweeper.params with the
    command line's values winning for the same key, as a cartesian product (Hydra's BasicSweeper order)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [o for o in overrides if not _is_hydra_override(o)]
    if not multirun:
        return [overrides]
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    cfg = compose(fixed, hydra_node=True)
    params = cfg.hydra.sweeper.get("params") or {}
    lines = [f"{k}={v}" for k, v in params.items()] + overrides
    jobs = BasicSweeper.split_arguments(parser.parse_overrides(lines), None)[0]
    return [list(job) for job in jobs]


def grid_cells(overrides: list[str], *, applicable_only: bool = True) -> list[dict]:
    """Every distinct cell a multirun of `overrides` would run, composed, in run order: each job's base cell first
    (as bench.cell runs it, unless with_base=false), then the job; duplicates by cell_id once. Cells the grid
    marks n/a (`not_applicable`) are left out unless applicable_only=False. Composes every job: for a plan of
    a large grid, bench.plan composes once per group of jobs instead."""
    seen: set[str] = set()
    cells: list[dict] = []
    for job in expand(overrides, True):
        cfg = _plain(compose(job))
        with_base = cfg.get("with_base", True) and not is_base(cfg)
        for cell in ([base_config(cfg)] if with_base else []) + [canonical(cfg)]:
            if applicable_only and not_applicable(cell) is not None:
                continue
            cid = cell_id(cell)
            if cid not in seen:
                seen.add(cid)
                cells.append(cell)
    return cells

