"""The benchmark CLI (a Hydra app over bench/conf/).

    python -m bench.run                                    # one cell: the defaults of bench/conf/config.yaml
    python -m bench.run method=pso train_steps=2 seed=1    # one cell, overridden
    python -m bench.run -m grid=smoke                      # a named grid (Hydra multirun), in-process
    python -m bench.run -m grid=toy hydra/launcher=joblib  # ... on local worker processes (one per core)
    python -m bench.run -m grid=toy hydra/launcher=submitit_slurm hydra.launcher.partition=gpu   # a cluster
    python -m bench.run -m method=base,ddpo seed=0,1       # an ad-hoc sweep (experiment stepbench/adhoc)
    accelerate launch --multi_gpu --num_processes 8 -m bench.run model=sdxl-turbo method=ddpo ...
                                                           # one cell trained data-parallel (bench/accel.py)

Before Hydra starts any job, every cell of the sweep is composed and validated (bench.validate): a bad name or
value exits with status 2 and one message, before any model loads or any MLflow run exists. Each job then runs
bench.cell.run_cell, which skips cells that already FINISHED (resume), marks failing cells FAILED and returns,
so the grid goes on. At the end a summary of the cells' statuses is printed; the exit status is 1 if any
cell's latest run is not FINISHED.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bench import grid as grids
from bench.conf.schema import register
from bench.validate import ConfigError, check_overrides

register()
log = logging.getLogger("bench.run")
_MULTIRUN_FLAGS = ("-m", "--multirun")


@dataclass
class Plan:
    grid: str
    multirun: bool
    cells: list[dict] = field(default_factory=list)
    """Resolved configs of every job, in the grid's (Hydra's) order."""
    jobs: list[list[str]] = field(default_factory=list)
    """The override list of every job, aligned with ``cells``."""


def _one_line(err: BaseException) -> str:
    """Hydra's composition error and its cause, on one line."""
    parts = []
    while err is not None and len(parts) < 3:
        text = " ".join(str(err).split("full_key:")[0].split())
        if text and text not in parts and "$VALUE" not in text:  # OmegaConf's unfilled template of the same error
            parts.append(text)
        err = err.__cause__ or err.__context__
    return "; ".join(parts)


def _unknown_key_message(err: BaseException, overrides: list[str]) -> str | None:
    """'unknown config key ...; valid keys under ...' for an override of a key the config does not have."""
    import re

    from bench import grid as grids

    match = re.search(r"Could not override '([^']+)'", str(err))
    if not match:
        return None
    key = match.group(1)
    parent, _, leaf = key.rpartition(".")
    rest = [o for o in overrides if not o.lstrip("+~").startswith(key + "=") and not grids._is_hydra_override(o)]
    try:
        node = grids.compose([o for o in rest if "," not in o])
        for part in parent.split(".") if parent else []:
            node = node[part]
        valid = sorted(node.keys())
    except Exception:  # noqa: BLE001 - fall back to Hydra's own message
        return None
    if leaf in valid:
        return None
    return f"unknown config key {key!r}; valid keys under {parent or 'the top level'!r}: {', '.join(valid)}"


def prepare(overrides: list[str], multirun: bool) -> Plan:
    """Compose and validate every cell of the run; raises ConfigError with one message."""
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from bench import grid as grids
    from bench.validate import check_config, check_tracking_uri, check_weights

    check_overrides(overrides)
    grid = grids.grid_choice(overrides)
    try:
        jobs = grids.expand(overrides, multirun)
        cells = [grids._plain(grids.compose(job)) for job in jobs]
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_unknown_key_message(err, overrides) or _one_line(err)) from None
    except yaml.YAMLError as err:  # a config file that is not YAML: where and why, on one line
        raise ConfigError(f"bad YAML file: {' '.join(str(err).split())}") from None
    for cell in cells:
        check_config(cell)
    check_weights(cells)
    for uri in sorted({cell["tracking"]["uri"] for cell in cells}):
        check_tracking_uri(uri)
    return Plan(grid=grid, multirun=multirun, cells=cells, jobs=jobs)


def _open_experiments(plan: Plan) -> None:
    """Create the grid's experiment once, in the parent (SQLite schema creation is not safe to race), and
    mark RUNNING runs left by killed processes KILLED."""
    from bench.tracking import Store

    for uri in sorted({cell["tracking"]["uri"] for cell in plan.cells}):
        lease = min(float(c["tracking"].get("lease_seconds", 300.0)) for c in plan.cells if c["tracking"]["uri"] == uri)
        store = Store(uri, lease_seconds=lease)
        experiment_id = store.experiment_id(plan.grid)
        reaped = store.reap_stale(experiment_id)
        if reaped:
            print(f"marked {len(reaped)} stale RUNNING run(s) of killed processes KILLED", flush=True)


def summarize(plan: Plan) -> int:
    """Print each cell's latest status; return the number of cells not FINISHED (cells whose method cannot train at
    their K are counted "n/a", not as failures)."""
    from bench import grid as grids
    from bench.tracking import Store

    cells: dict[str, dict] = {}
    counts: dict[str, int] = {}
    for cell in plan.cells:
        if grids.not_applicable(cell) is not None:
            counts["n/a"] = counts.get("n/a", 0) + 1  # never run (the method cannot train at this K): not a failure
            continue
        if cell.get("with_base", True) and not grids.is_base(cell):
            base = grids.base_config(cell)
            cells.setdefault(grids.cell_id(base), base)
        cells.setdefault(grids.cell_id(cell), cell)
    bad = []
    stores: dict[str, Store] = {}
    for cid, cell in cells.items():
        uri = cell["tracking"]["uri"]
        try:
            store = stores.setdefault(uri, Store(uri))
            runs = store.cell_runs(store.experiment_id(plan.grid), cid)
        except Exception as err:  # noqa: BLE001 - the summary is printed even when the server is down
            from bench.tracking import _is_outage

            if not _is_outage(err):
                raise
            runs = None
        if runs is None:
            counts["UNKNOWN"] = counts.get("UNKNOWN", 0) + 1
            bad.append(f"  UNKNOWN  {grids.cell_run_name(cell)} (cell {cid}): tracking server unreachable")
            continue
        status = "FINISHED" if any(r.info.status == "FINISHED" for r in runs) else (
            max(runs, key=lambda r: r.info.start_time).info.status if runs else "MISSING")
        counts[status] = counts.get(status, 0) + 1
        if status != "FINISHED":
            bad.append(f"  {status:8s} {grids.cell_run_name(cell)} (cell {cid})")
    parts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    print(f"grid {plan.grid}: {len(cells) + counts.get('n/a', 0)} cells: {parts}", flush=True)
    for line in bad:
        print(line, flush=True)
    return len(bad)


def _keep_joblib_worker() -> None:
    """Stop loky (the joblib launcher's backend) from restarting this worker as "leaking": it does so when a worker's
    RSS grows by 300 MB after its first job, and a cell legitimately grows it (models, reward nets, the allocator's
    cache), so a worker whose first job was a quick skip (a duplicate base job) was restarted after its next cell
    and paid its imports (~8 CPU-s) again ("A worker stopped while some jobs were given to the executor")."""
    executor = sys.modules.get("joblib.externals.loky.process_executor")
    if executor is not None and hasattr(executor, "_MAX_MEMORY_LEAK_SIZE"):
        executor._MAX_MEMORY_LEAK_SIZE = max(executor._MAX_MEMORY_LEAK_SIZE, 2**40)


@contextlib.contextmanager
def _scheduled(plan: Plan | None):
    """A multirun launches each distinct cell once, longest first (bench.schedule), under one grid progress bar."""
    if plan is None:
        yield
        return
    from bench import plan as plans
    from bench import schedule

    order = schedule.launch_order(plan.cells)
    dropped = len(plan.cells) - len(order)
    saved = {key: os.environ.get(key) for key in ("STEPBENCH_NUM_JOBS", "STEPBENCH_PARENT", "STEPBENCH_PROGRESS_ROW")}
    os.environ["STEPBENCH_NUM_JOBS"] = str(len(order))
    os.environ["STEPBENCH_PARENT"] = str(os.getpid())  # workers (inheriting it) draw their bars on their own rows
    if dropped:
        print(f"grid {plan.grid}: {len(order)} jobs of {len(plan.cells)}: {dropped} would only repeat a shared cell "
              f"(base, inference scaling: one cell for every seed and K)", flush=True)
    cells: dict[str, float] = {}
    for cfg in plan.cells:
        for cid in schedule.job_cells(cfg):
            if cid not in cells:
                cell = cfg if cid == grids.cell_id(cfg) else grids.base_config(cfg)
                cells[cid] = plans.cell_work(cell)
    uris = {cfg["tracking"]["uri"] for cfg in plan.cells}
    show = len(uris) == 1 and all(cfg["progress"] for cfg in plan.cells)
    try:
        with schedule.ordered_sweep(plan.jobs, order), \
                schedule.GridProgress(next(iter(uris)), plan.grid, cells, enabled=show):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> str:
    from bench.cell import run_cell

    _keep_joblib_worker()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components..." bars, one per cell: noise
    hc = HydraConfig.get()
    grid = hc.runtime.choices.get("grid") or "adhoc"
    index = ""
    if os.environ.get("STEPBENCH_PARENT"):  # a grid: this worker's progress bars get their own row
        from bench.schedule import claim_progress_position

        os.environ["STEPBENCH_PROGRESS_ROW"] = str(claim_progress_position(os.environ["STEPBENCH_PARENT"]))
    if hc.mode is not None and hc.mode.name == "MULTIRUN":
        total = os.environ.get("STEPBENCH_NUM_JOBS", "?")
        index = f"[{int(hc.job.num) + 1}/{total}] "
    return run_cell(cfg, grid, index=index)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    multirun = any(a in _MULTIRUN_FLAGS for a in argv)
    other_flags = [a for a in argv if a.startswith("-") and a not in _MULTIRUN_FLAGS]
    # accelerate launch / torchrun: ranks > 0 of a data-parallel cell never touch MLflow (bench/accel.py)
    follower = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and int(os.environ.get("RANK", "0") or 0) != 0
    plan = None
    if not other_flags:  # --help, --cfg job, --info ... go straight to Hydra
        overrides = [a for a in argv if a not in _MULTIRUN_FLAGS]
        try:
            plan = prepare(overrides, multirun)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        os.environ["STEPBENCH_NUM_JOBS"] = str(len(plan.cells))
        import uuid

        os.environ["STEPBENCH_LAUNCH"] = uuid.uuid4().hex[:12]  # bench.cell.LAUNCH_ENV: a failing base once per launch
        if not follower:
            _open_experiments(plan)
    sys.argv = [sys.argv[0] if sys.argv else "bench.run", *argv]
    with _scheduled(plan if multirun and not follower else None):
        hydra_main()
    if plan is not None and not follower and summarize(plan):
        sys.exit(1)


if __name__ == "__main__":
    main()
