"""The launch order of a grid's jobs: each distinct cell once, the longest cells first.

    order = launch_order(jobs, cells)     # indices into jobs, in the order to launch them
    with ordered_sweep(jobs, order):      # Hydra's BasicSweeper launches exactly those jobs, in that order
        hydra_main()

Why. Hydra's basic sweeper launches the grid's cartesian product in file order. Two things waste workers then:
(1) jobs whose cells are shared (bench.grid: base and best-of-N are one cell for every seed and K) still take a
worker slot, and one that finds its cell running elsewhere has nothing to do; (2) with two workers and the long
cells last, one worker runs the last long cell alone while the other idles (issue 17: the smoke grid was bounded
by load balance). Longest-processing-time-first is the classic greedy answer for identical workers (within 4/3 of
the optimal makespan). Cell lengths are bench.plan's estimate (``plan.cell_work``: training and evaluation NFEs),
not a second copy of its constants.

Jobs are only dropped or reordered, never changed: a job is dropped when every cell it would run (its own cell and,
with ``with_base``, its base cell) is already run by an earlier job of the new order. Jobs whose method cannot train
at their K ("n/a") stay, last, so the grid still prints why they did not run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


def job_cells(cfg: dict) -> list[str]:
    """Cell ids a job runs, in the order bench.cell runs them: its base cell first (unless with_base=false or the
    job is the base), then its own cell. An n/a job runs nothing."""
    from bench import grid as grids

    if grids.not_applicable(cfg) is not None:
        return []
    ids = []
    if cfg.get("with_base", True) and not grids.is_base(cfg):
        ids.append(grids.cell_id(grids.base_config(cfg)))
    ids.append(grids.cell_id(cfg))
    return ids


def launch_order(cells: list[dict], work: list[float] | None = None) -> list[int]:
    """Indices of the jobs to launch (one composed config per job, in the grid's order), longest first.

    ``work``: each job's own cell's estimated length (default bench.plan.cell_work). Ties keep the grid's order;
    jobs that add no new cell are dropped; n/a jobs go last."""
    from bench import plan

    runs = [job_cells(cfg) for cfg in cells]
    if work is None:
        work = [plan.cell_work(cfg) if ids else 0.0 for cfg, ids in zip(cells, runs)]
    ranked = sorted(range(len(cells)), key=lambda i: (not runs[i], -work[i], i))
    order, covered = [], set()
    for i in ranked:
        ids = runs[i]
        if ids and set(ids) <= covered:
            continue
        covered.update(ids)
        order.append(i)
    return order


@contextlib.contextmanager
def ordered_sweep(jobs: list[list[str]], order: list[int]) -> Iterator[None]:
    """Make Hydra's BasicSweeper launch ``[jobs[i] for i in order]`` instead of its cartesian product.

    Hydra has no option for the launch order, and a custom sweeper must be a plugin in the ``hydra_plugins``
    namespace package; this wraps the one static method that lists the jobs, for the duration of the block. If the
    sweeper's own list is not the one bench.grid.expand computed (a Hydra change), its order is kept as it is."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    original = BasicSweeper.__dict__["split_arguments"]
    wanted = [list(jobs[i]) for i in order]

    def split_arguments(overrides, max_batch_size):
        batches = original.__func__(overrides, max_batch_size)
        theirs = [list(job) for batch in batches for job in batch]
        if sorted(map(tuple, theirs)) != sorted(map(tuple, jobs)):
            return batches
        size = max_batch_size or len(wanted) or 1
        return [wanted[i:i + size] for i in range(0, len(wanted), size)]

    BasicSweeper.split_arguments = staticmethod(split_arguments)
    try:
        yield
    finally:
        BasicSweeper.split_arguments = original


# --------------------------------------------------------------------------------------------- progress


class GridProgress:
    """One grid-level progress bar in the launching process, with an ETA: a thread polls the MLflow store every
    ``interval`` seconds for the grid's cells that ended (FINISHED, FAILED or KILLED) and advances the bar by
    their estimated work (``plan.cell_work``), so the ETA weighs a long cell more than a short one. Works with any
    launcher (the workers log to the same store). Cells already FINISHED when the grid starts count as done."""

    def __init__(self, uri: str, grid: str, cells: dict[str, float], *, interval: float = 5.0,
                 enabled: bool = True):
        self.uri, self.grid, self.cells, self.interval, self.enabled = uri, grid, cells, interval, enabled
        self._stop = None

    def _ended(self, store, experiment_id) -> set[str]:
        return {cid for cid, status in store.cell_statuses(experiment_id).items()
                if cid in self.cells and status in ("FINISHED", "FAILED", "KILLED")}

    def __enter__(self):
        import threading

        if not self.enabled or not self.cells:
            return self
        from tqdm.auto import tqdm

        from bench.tracking import Store

        store = Store(self.uri)
        experiment_id = store.experiment_id(self.grid)
        done = self._ended(store, experiment_id)
        total = sum(self.cells.values()) or 1.0
        self.bar = tqdm(total=total, initial=sum(self.cells[c] for c in done), desc=f"grid {self.grid}",
                        position=0, leave=True, dynamic_ncols=True, mininterval=1.0,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
        self._store, self._experiment_id, self._seen = store, experiment_id, set(done)
        self._describe()
        self._stop = threading.Event()

        def poll():
            while not self._stop.wait(self.interval):
                self._poll()

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        try:
            now = self._ended(self._store, self._experiment_id)
        except Exception:  # noqa: BLE001 - a busy store must not stop the grid; try again next time
            return
        new = now - self._seen
        if new:
            self._seen |= new
            self.bar.update(sum(self.cells[c] for c in new))
            self._describe()

    def _describe(self) -> None:
        self.bar.set_description_str(f"grid {self.grid}: {len(self._seen)}/{len(self.cells)} cells", refresh=True)

    def __exit__(self, *exc):
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
            self._poll()  # the last cells, ended after the last tick
            self.bar.close()


def claim_progress_position(parent: str, slots: int = 64) -> int:
    """A row for this worker's progress bars below the grid bar (tqdm ``position``), so that two workers' bars do
    not overwrite each other: the first free of ``slots`` lock files of the launching process ``parent``. The lock
    is held until this process exits (the kernel releases it then), so a worker keeps its row for all its cells.
    The lock files live in a per-user 0700 folder and are opened without following links (as the cell locks)."""
    import errno
    import fcntl
    import os

    from bench.tracking import _private_dir

    if parent in _HELD:  # the in-process launcher runs every job in this process: one row for all of them
        return _HELD[parent][1]
    root = Path(os.environ.get("XDG_RUNTIME_DIR") or Path.home() / ".cache")
    root.mkdir(parents=True, exist_ok=True)
    folder = _private_dir(_private_dir(root / "stepbench-progress") / str(parent).replace("/", "_"))
    for slot in range(1, slots + 1):
        try:
            fd = os.open(folder / f"row{slot}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            if err.errno == errno.ELOOP:  # a planted symlink: never followed, that row is skipped
                continue
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _HELD[parent] = (fd, slot)
        return slot
    return 1


_HELD: dict[str, tuple[int, int]] = {}  # launching process -> (open lock file descriptor, row) of this process
