"""MLflow, in one place: the only stepbench module that imports mlflow (reports read runs through it too).

Conventions (design.md, "MLflow conventions"):
- one experiment per grid, ``stepbench/<grid>``; one run per cell, named ``<method>/<model>/<reward>/k<K>/s<seed>``;
- tags: method, model, reward, train_steps, seed, grid, cell_id, git_commit, stepbench_version, device
  (plus ``stepbench.host/pid/pid_start`` so a later process can tell a live run from one whose process was killed);
- params: the flattened resolved config; metrics ``train/*`` (step = NFEs consumed),
  ``eval/<split>/<reward>/s<S>/mean|std|n`` (``eval_metric_key``), ``eval/<split>/<reward>/mean`` with step = S,
  ``cost/*``; artifacts ``config.yaml``, ``eval/scores.parquet``, ``eval/<split>/grid_s<S>.png`` and
  ``eval/<split>/samples_s<S>.npz``, adapter safetensors,
  ``train_curve.png`` (and ``error.txt`` for a failed cell).

Metrics are buffered and written with ``MlflowClient.log_batch``: on SQLite one ``log_metric`` call costs ~17 ms,
1000 points in one batch ~0.25 s. mlflow itself is imported lazily so that ``python -m bench.run method=nope`` fails
in well under a second.

Read API (``Store.runs/artifact/scores/metric_history/experiments``, on ``mlflow.search_runs`` and
``mlflow.artifacts.download_artifacts``; for a URI: ``load_runs``, ``artifact_path``, ``load_scores``,
``metric_history``, ``list_experiments``).
CLI: ``python -m bench.tracking ui [--uri sqlite:///mlflow.db] [--port 5000]`` starts ``mlflow ui`` on 127.0.0.1 and
prints the URL of each stepbench experiment's runs table (``ui_url``); ``python -m bench.tracking runs --grid toy``
prints a run table.

The MLflow 3 UI opens on an experiment's GenAI "Traces" page unless told otherwise: the installed UI (3.17) takes
its workflow type from the URL's ``workflowType`` parameter, else from the browser's local storage (default
"genai"), and no longer from the ``mlflow.experimentKind`` experiment tag; no server flag sets it. So the URLs we
print carry ``?workflowType=machine_learning`` and point at the ``/runs`` tab. Experiments are still created with
``mlflow.experimentKind=custom_model_development`` for UIs that read the tag.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

DEFAULT_URI = "sqlite:///mlflow.db"
EXPERIMENT_PREFIX = "stepbench/"
# what the MLflow UI reads to show an experiment's runs table rather than its GenAI traces (see the docstring)
EXPERIMENT_KIND_TAG = {"mlflow.experimentKind": "custom_model_development"}
UI_QUERY = "workflowType=machine_learning"
# Tags that identify a cell; reports group by them.
CELL_TAGS = ("method", "model", "reward", "train_steps", "seed", "grid", "cell_id")
_PROC_TAGS = ("stepbench.host", "stepbench.pid", "stepbench.pid_start", "stepbench.heartbeat")
HEARTBEAT_TAG = "stepbench.heartbeat"
DEFAULT_LEASE_SECONDS = 300.0
"""A RUNNING run of another host whose heartbeat tag is older than this is a dead node's: reclaimed."""
_PARAMS_PER_BATCH = 100  # MLflow's MAX_PARAMS_TAGS_PER_BATCH
_METRICS_PER_BATCH = 1000  # MLflow's MAX_METRICS_PER_BATCH
_MAX_PARAM_LEN = 6000
_MAX_TAG_LEN = 8000


class TrackingURIError(ValueError):
    """The tracking URI cannot be used (unreachable host, unwritable SQLite directory, unknown scheme)."""


class StoreUnreachable(RuntimeError):
    """The tracking server stayed unreachable past ``tracking.outage_seconds``; the cell's results are on disk."""

    mlflow_status = "FAILED"


def _is_outage(err: BaseException) -> bool:
    """A connection failure to the tracking server (after MLflow's own HTTP retries), not a rejected request."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    try:
        import requests

        if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
    except ImportError:
        pass
    text = str(err)
    return any(s in text for s in ("Max retries exceeded", "Connection refused", "Failed to establish a new connection",
                                   "Read timed out", "RemoteDisconnected", "Connection aborted"))


class ClaimLost(RuntimeError):
    """Another worker (on this or another host) claimed the same cell at the same moment; this one backs off."""


# ----------------------------------------------------------------------------------------------- names


def experiment_name(grid: str) -> str:
    return f"{EXPERIMENT_PREFIX}{grid}"


def run_name(method: str, model: str, reward: str, train_steps: int, seed: int) -> str:
    return f"{method}/{model}/{reward}/k{train_steps}/s{seed}"


def eval_metric_key(split: str, reward: str, num_steps: int | None, stat: str) -> str:
    """``eval/<split>/<reward>/s<S>/<stat>`` (stat: mean, std, n, gain_over_base, gain_se), or without a step count
    ``eval/<split>/<reward>/<stat>`` (the per-S means logged with step = S as ``mean``; mean_over_s, worst_s)."""
    return f"eval/{split}/{reward}/{stat}" if num_steps is None else f"eval/{split}/{reward}/s{num_steps}/{stat}"


# ----------------------------------------------------------------------------------------------- URIs


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths are relative to the working directory)."""
    if not uri.startswith("sqlite:"):
        return None
    rest = uri[len("sqlite:"):]
    if rest.startswith("///"):
        return Path(rest[3:]) if rest[3:] else None
    if rest.startswith("//"):
        return Path(rest[2:])
    return None


def resolve_uri(uri: str | None) -> str:
    """Make a relative SQLite URI absolute, so that worker processes with another working directory agree."""
    uri = uri or DEFAULT_URI
    path = _sqlite_path(uri)
    if path is not None and not path.is_absolute():
        return f"sqlite:///{path.resolve()}"
    return uri


def check_uri(uri: str, timeout: float = 3.0, *, what: str = "tracking URI",
              hint: str = "start the server or pass tracking.uri=sqlite:///mlflow.db") -> None:
    """Fail fast on a tracking URI that cannot work; talks only to the URI's own host.

    sqlite: the database's directory must exist (or be creatable) and be writable. http(s)/databases: a TCP
    connection to host:port within ``timeout`` seconds. file: accepted as is (MLflow decides). `what` names the
    setting in the messages and `hint` is the advice for an unreachable host (bench.sweep checks its storage here).
    """
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme == "sqlite":
        path = _sqlite_path(uri)
        if path is None or str(path) in ("", ":memory:"):
            raise TrackingURIError(f"{what} {uri!r}: expected sqlite:///<path to .db file>")
        if path.is_dir():
            raise TrackingURIError(f"{what} {uri!r}: {path} is a directory; name the database file inside it, "
                                   f"e.g. sqlite:///{(path / 'mlflow.db').resolve()}")
        parent = path.resolve().parent
        existing = parent
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise TrackingURIError(f"{what} {uri!r}: {existing} is a file, not a directory")
        if not os.access(existing, os.W_OK):
            raise TrackingURIError(f"{what} {uri!r}: directory {parent} is not writable")
        return
    if scheme in ("", "file"):
        return
    if scheme in DEFAULT_PORTS:
        if not parsed.hostname:
            raise TrackingURIError(f"{what} {uri!r} names no host")
        problem = unreachable(uri, timeout)
        if problem:
            raise TrackingURIError(f"{what} {uri!r} is unreachable ({problem}); {hint}")
        return
    if scheme == "databricks":
        return
    raise TrackingURIError(
        f"{what} {uri!r}: unknown scheme {parsed.scheme!r}; use sqlite:///<file>, http(s)://host:port, "
        f"or a database URL"
    )


DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}


def unreachable(url: str, timeout: float = 3.0) -> str | None:
    """None when a TCP connection to the URL's host:port (default port of its scheme) opens within `timeout`
    seconds; else "host:port: reason". Talks only to that host (tracking servers, sweep databases)."""
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or DEFAULT_PORTS.get(parsed.scheme.split("+")[0])
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{host}:{port}: {err.strerror or err}"


def _artifact_root(uri: str) -> Path | None:
    """Artifacts of a SQLite store live beside the database, in ``mlruns/`` (as MLflow's own default does)."""
    path = _sqlite_path(uri)
    return None if path is None else path.resolve().parent / "mlruns"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=resolve_uri(uri))


def start_mlflow_run(uri: str, experiment_id: str, name: str, tags: dict[str, str], system_metrics: bool):
    """The active (fluent) MLflow run of a cell: system metrics are logged only for the fluent run."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags, log_system_metrics=system_metrics)


def end_mlflow_run(status: str) -> None:
    import mlflow

    mlflow.end_run(status=status)


# ----------------------------------------------------------------------------------------------- process identity


def host_id() -> str:
    """This machine's name in run tags and claims: $STEPBENCH_HOST_ID if set (containers that share a hostname,
    tests of two "machines" on one box), else the hostname."""
    return os.environ.get("STEPBENCH_HOST_ID") or socket.gethostname()


def _process_tags() -> dict[str, str]:
    import psutil

    pid = os.getpid()
    return {
        "stepbench.host": host_id(),
        "stepbench.pid": str(pid),
        "stepbench.pid_start": f"{psutil.Process(pid).create_time():.3f}",
        HEARTBEAT_TAG: f"{time.time():.3f}",
    }


def _process_alive(tags: dict[str, str]) -> bool | None:
    """True/False when the run's process is (not) alive on this host; None when it ran on another host."""
    import psutil

    if tags.get("stepbench.host") != host_id() or "stepbench.pid" not in tags:
        return None
    try:
        proc = psutil.Process(int(tags["stepbench.pid"]))
        return abs(proc.create_time() - float(tags.get("stepbench.pid_start", "nan"))) < 0.01
    except (psutil.NoSuchProcess, ValueError):
        return False


def git_commit(repo: Path | None = None) -> str:
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stepbench_version() -> str:
    try:
        from importlib.metadata import version

        return version("stepbench")
    except Exception:  # not installed as a distribution (running from a checkout)
        from bench import __version__

        return __version__


# ----------------------------------------------------------------------------------------------- lock files


def _private_dir(path: Path) -> Path:
    """`path` as a directory of this user's, mode 0700, never a symlink (created if missing)."""
    import stat

    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise TrackingURIError(f"lock folder {path} is a symlink, not a directory, or not this user's; remove it")
    return path


def lock_dir(uri: str) -> Path:
    """Where this host's lock files for a store live: beside a SQLite database (``.stepbench-locks/<host>``), else
    in a per-user folder ($XDG_RUNTIME_DIR or ~/.cache, ``stepbench-locks/<hash of the URI>/<host>``); every level
    0700 and checked not to be a symlink. Per host because flock does not reach across machines (shared NFS): other
    hosts are kept off a cell by its lease in the store (``Store.start_run``)."""
    import hashlib

    uri = resolve_uri(uri)
    db = _sqlite_path(uri)
    if db is not None:
        top = _private_dir(db.resolve().parent / ".stepbench-locks")
    else:
        root = Path(os.environ.get("XDG_RUNTIME_DIR") or Path.home() / ".cache")
        root.mkdir(parents=True, exist_ok=True)
        top = _private_dir(_private_dir(root / "stepbench-locks") / hashlib.sha1(uri.encode()).hexdigest()[:12])
    return _private_dir(top / host_id().replace("/", "_"))


@contextlib.contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """An exclusive flock on `path` (released by the kernel if the process dies). The file is opened with
    O_NOFOLLOW and never truncated, so a planted symlink is refused, not followed. Yields True once held; with
    wait=False yields False at once when another process holds it."""
    import errno
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise TrackingURIError(f"lock file {path} is a symlink; refusing to follow it (remove it)") from None
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- SQLite store creation

_CREATED: set[str] = set()


def _schema_state(db: Path) -> str:
    """"complete" (every MLflow table, schema at this MLflow's head revision), "empty" (no file or no tables),
    "partial-empty" (half-created, no run in it) or "partial-data" (wrong schema version with runs in it)."""
    import sqlite3

    if not db.exists() or db.stat().st_size == 0:
        return "empty"
    from mlflow.store.db.utils import _get_latest_schema_revision

    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as con:
        tables = {row[0] for row in con.execute("select name from sqlite_master where type='table'")}
        if not tables:
            return "empty"
        version = None
        if "alembic_version" in tables:
            row = con.execute("select version_num from alembic_version").fetchone()
            version = row[0] if row else None
        if {"experiments", "runs", "metrics", "params", "tags"} <= tables and version == _get_latest_schema_revision():
            return "complete"
        has_runs = "runs" in tables and con.execute("select count(*) from runs").fetchone()[0] > 0
    return "partial-data" if has_runs else "partial-empty"


def ensure_sqlite_store(uri: str) -> None:
    """Create a SQLite store once, under a lock, atomically: MLflow builds its tables in a temporary file that is
    renamed into place when complete, so a kill during creation (about 7 s of migrations) never leaves a
    half-created ``mlflow.db``, and two processes starting in a fresh folder wait for one creator. A half-created
    store left by older code (or by MLflow itself) with no run in it is moved aside and recreated; one with runs
    is named with the fix in one line."""
    uri = resolve_uri(uri)
    db = _sqlite_path(uri)
    if db is None or uri in _CREATED:
        return
    db = db.resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(lock_dir(uri) / "store-create.lock"):
        state = _schema_state(db)
        if state == "partial-data":
            raise TrackingURIError(
                f"tracking store {db} has an incomplete or out-of-date MLflow schema but holds runs: back it up, "
                f"then run `mlflow db upgrade sqlite:///{db}` (or move it aside to start a new store)")
        if state == "partial-empty":
            aside = db.with_name(f"{db.name}.incomplete-{int(time.time())}")
            db.replace(aside)
            print(f"tracking store {db} was half-created (killed during MLflow's table creation) and held no run: "
                  f"moved aside to {aside.name}, creating it again", file=sys.stderr, flush=True)
            state = "empty"
        if state == "empty":
            for stale in db.parent.glob(f"{db.name}.creating-*"):  # a creator killed earlier (we hold the lock)
                stale.unlink(missing_ok=True)
            tmp = db.with_name(f"{db.name}.creating-{os.getpid()}")
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            root = _artifact_root(uri)
            store = SqlAlchemyStore(f"sqlite:///{tmp}", root.as_uri() if root else None)
            store.engine.dispose()
            os.replace(tmp, db)
    _CREATED.add(uri)


# ----------------------------------------------------------------------------------------------- write side


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1, "c": [1, 2]}} -> {"a.b": "1", "a.c": "[1, 2]"}: lists stay one param."""
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        if not tree and prefix:
            out[prefix[:-1]] = "{}"
        return out
    out[prefix[:-1]] = str(tree)[:_MAX_PARAM_LEN]
    return out


class StoreReader:
    """The read side of Store (reports, the sweep, gains over base): MLflow's own read API, no client round trips."""

    uri: str
    client: Any

    def experiments(self, prefix: str = EXPERIMENT_PREFIX) -> list[str]:
        """Names of the stepbench experiments (one per grid) in the store."""
        return sorted(e.name for e in self.client.search_experiments() if e.name.startswith(prefix))

    def experiment_ids(self, experiment: str | list[str]) -> list[str]:
        """Ids of grid names ("toy") or full experiment names; UnknownNameError naming the available ones."""
        ids = []
        for name in [experiment] if isinstance(experiment, str) else list(experiment):
            name = name if name.startswith(EXPERIMENT_PREFIX) else experiment_name(name)
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                from tasks.registry import UnknownNameError

                raise UnknownNameError("experiment", name, self.experiments())
            ids.append(exp.experiment_id)
        return ids

    def runs(self, experiment: str | list[str] = "toy", status: str | None = None):
        """One row per run (mlflow.search_runs' frame): run_id, run_name, status, start_time, end_time,
        artifact_uri, experiment_id, the cell tags as typed columns (method, model, reward, train_steps, seed, grid,
        cell_id) and every ``tags.*``, ``params.*``, ``metrics.*`` (latest value) column, oldest run first.
        ``experiment`` is a grid name ("toy") or a full experiment name; ``status`` filters (e.g. "FINISHED")."""
        import mlflow
        import pandas as pd

        ids = self.experiment_ids(experiment)
        mlflow.set_tracking_uri(self.uri)
        frame = mlflow.search_runs(ids, filter_string=f"attributes.status = '{status}'" if status else "",
                                   output_format="pandas", order_by=["attributes.start_time ASC"])
        if not len(frame):
            return pd.DataFrame(columns=["run_id", "run_name", "status", *CELL_TAGS])
        frame = frame.rename(columns={"tags.mlflow.runName": "run_name"})
        for col in ("start_time", "end_time"):  # naive UTC, as the rest of stepbench writes times
            frame[col] = pd.to_datetime(frame[col], utc=True).dt.tz_localize(None)
        for key in CELL_TAGS:
            frame[key] = frame.get(f"tags.{key}")
        for col in ("train_steps", "seed"):
            frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("Int64")
        frame["tags.mlflow.runName"] = frame["run_name"]
        return frame.reset_index(drop=True)

    def artifact(self, run_id: str, path: str, dst: str | Path | None = None) -> Path:
        """A local file (or directory) for a run's artifact: the file itself for local artifact stores, else a
        download (into `dst`, default a temp folder). FileNotFoundError when the run has no such artifact."""
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=self.uri,
                                                            dst_path=None if dst is None else str(dst)))
        except (MlflowException, OSError) as err:
            info = self.client.get_run(run_id).info
            raise FileNotFoundError(f"run {run_id} ({info.run_name}, {info.status}) has no artifact {path!r}: "
                                    f"{' '.join(str(err).split())[:300]}") from None

    def scores(self, run_ids: list[str] | str, missing: str = "raise"):
        """The per-image scores tables (``eval/scores.parquet``) of the given runs, concatenated; columns run_id,
        cell_id, method, prompt, prompt_idx, sample_idx, seed, S, reward, value (+ model, train_steps, eval_seed).
        ``missing="skip"`` ignores runs without scores (failed cells) instead of raising."""
        import pandas as pd

        frames = []
        for run_id in [run_ids] if isinstance(run_ids, str) else list(run_ids):
            try:
                frames.append(pd.read_parquet(self.artifact(run_id, "eval/scores.parquet")))
            except FileNotFoundError:
                if missing != "skip":
                    raise
        if not frames:
            return pd.DataFrame(columns=["run_id", "cell_id", "method", "prompt", "prompt_idx", "sample_idx", "seed",
                                         "S", "reward", "value"])
        return pd.concat(frames, ignore_index=True)

    def metric_history(self, run_id: str, key: str):
        """All points of one metric of a run (e.g. ``train/reward_mean`` against NFEs): columns step, value,
        timestamp."""
        import pandas as pd

        points = self.client.get_metric_history(run_id, key)
        return pd.DataFrame([(m.step, m.value, m.timestamp) for m in points], columns=["step", "value", "timestamp"])


class Store(StoreReader):
    """A connection to one tracking URI: experiments, cell lookup for resume, stale-run cleanup, new runs."""

    def __init__(self, uri: str | None = None, *, lease_seconds: float = DEFAULT_LEASE_SECONDS):
        self.uri = resolve_uri(uri)
        self.lease_seconds = float(lease_seconds)
        ensure_sqlite_store(self.uri)
        self.client = _client(self.uri)

    def experiment_id(self, grid: str) -> str:
        """The experiment of a grid, created on first use (artifacts beside a SQLite database)."""
        from mlflow.exceptions import MlflowException

        name = experiment_name(grid)
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        root = _artifact_root(self.uri)
        location = None if root is None else (root / name.replace("/", "-")).as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND_TAG)
        except MlflowException:  # another worker created it first
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def cell_statuses(self, experiment_id: str) -> dict[str, str]:
        """{cell_id: status} over the experiment's runs; a cell with any FINISHED run is FINISHED, else its newest
        run's status (the grid's progress bar polls this)."""
        out: dict[str, tuple[bool, int, str]] = {}
        page_token = None
        while True:
            page = self.client.search_runs([experiment_id], max_results=1000, page_token=page_token)
            for run in page:
                cid = run.data.tags.get("cell_id")
                if cid is None:
                    continue
                rank = (run.info.status == "FINISHED", run.info.start_time or 0, run.info.status)
                out[cid] = max(out.get(cid, rank), rank)
            page_token = page.token
            if not page_token:
                break
        return {cid: rank[2] for cid, rank in out.items()}

    def cell_runs(self, experiment_id: str, cell_id: str) -> list:
        return list(self.client.search_runs([experiment_id], filter_string=f"tags.cell_id = '{cell_id}'",
                                            max_results=1000))

    def finished_run(self, experiment_id: str, cell_id: str):
        """The newest FINISHED run of this cell, or None."""
        runs = [r for r in self.cell_runs(experiment_id, cell_id) if r.info.status == "FINISHED"]
        return max(runs, key=lambda r: r.info.start_time) if runs else None

    def heartbeat_age(self, run) -> float:
        """Seconds since the run's last heartbeat (its start when it has none: runs of older code)."""
        beat = run.data.tags.get(HEARTBEAT_TAG)
        try:
            last = float(beat) if beat is not None else run.info.start_time / 1000.0
        except ValueError:
            last = run.info.start_time / 1000.0
        return time.time() - last

    def claim_alive(self, run) -> bool:
        """Whether a RUNNING run still holds its cell: on this host, its process lives; on another host, its
        heartbeat is younger than the lease."""
        alive = _process_alive(run.data.tags)
        if alive is not None:
            return alive
        return self.heartbeat_age(run) < self.lease_seconds

    def reap_stale(self, experiment_id: str, cell_id: str | None = None) -> list[str]:
        """Mark RUNNING runs that no longer hold their cell KILLED: their process on this host is dead (killed,
        crashed), or their host stopped heartbeating for longer than the lease (a dead node). Returns their ids."""
        flt = "attributes.status = 'RUNNING'" + (f" and tags.cell_id = '{cell_id}'" if cell_id else "")
        reaped = []
        for run in self.client.search_runs([experiment_id], filter_string=flt, max_results=1000):
            if not self.claim_alive(run):
                same_host = run.data.tags.get("stepbench.host") == host_id()
                why = ("process died while the run was RUNNING (killed or crashed)" if same_host else
                       f"host {run.data.tags.get('stepbench.host', '?')} sent no heartbeat for "
                       f"{self.heartbeat_age(run):.0f} s (lease {self.lease_seconds:.0f} s): a dead node")
                self.client.set_tag(run.info.run_id, "error", f"{why}; marked KILLED and reclaimed")
                self.client.set_terminated(run.info.run_id, status="KILLED")
                reaped.append(run.info.run_id)
        return reaped

    def live_run(self, experiment_id: str, cell_id: str, exclude: str | None = None):
        """A RUNNING run of this cell that still holds it (another worker, here or on another host), or None."""
        for run in self.cell_runs(experiment_id, cell_id):
            if run.info.run_id != exclude and run.info.status == "RUNNING" and self.claim_alive(run):
                return run
        return None

    def _confirm_claim(self, experiment_id: str, cell_id: str, run_id: str) -> None:
        """Claim-then-check: our RUNNING run is committed before we look, so of two workers that start a cell at
        the same moment at least one sees the other; each that sees another live claim (or a FINISHED run) backs
        off: its run is deleted and ClaimLost raised. Both backing off is possible (they retry after a pause);
        both going on is not."""
        rival = self.live_run(experiment_id, cell_id, exclude=run_id) or self.finished_run(experiment_id, cell_id)
        if rival is not None:
            raise ClaimLost(f"cell {cell_id} is claimed by run {rival.info.run_id} "
                            f"({rival.data.tags.get('stepbench.host', '?')}, {rival.info.status})")

    @contextlib.contextmanager
    def start_run(self, experiment_id: str, name: str, tags: dict[str, Any], *, system_metrics: bool = False,
                  flush_every: int = 1000, flush_seconds: float = 15.0,
                  outage_seconds: float = 600.0) -> Iterator[CellRun]:
        """Open a run; it ends FINISHED when the block exits normally, FAILED (error tag + error.txt) otherwise.

        Writes that fail because the tracking server is unreachable are buffered (artifacts copied to a spool
        folder) and replayed when it answers again; at the end of the block the run waits up to `outage_seconds`
        for it. Still unreachable: the buffered results stay in ``stepbench-unsent/<run id>/`` and
        StoreUnreachable is raised. The exception is re-raised: the caller decides whether the grid goes on."""
        import logging

        # the monitor's "Started/Stopping/Successfully terminated system metrics monitoring" INFO lines, 4 per
        # cell (88 in one toy grid), add nothing on the console; its warnings still show
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        all_tags = {k: str(v) for k, v in tags.items()} | _process_tags()
        active = start_mlflow_run(self.uri, experiment_id, name, all_tags, system_metrics)
        if "cell_id" in tags:
            try:
                self._confirm_claim(experiment_id, str(tags["cell_id"]), active.info.run_id)
            except ClaimLost:
                end_mlflow_run("KILLED")
                self.client.delete_run(active.info.run_id)  # not a result, not a failure: out of every view
                raise
        run = CellRun(self, active.info.run_id, flush_every=flush_every, flush_seconds=flush_seconds)
        beat = _Heartbeat(self.client, active.info.run_id, self.lease_seconds / 5)
        try:
            yield run
        except BaseException as err:
            beat.stop()
            run.fail(err)
            raise
        else:
            beat.stop()
            run.flush()
            if not run.replay(outage_seconds):
                where = run.spool_to_disk()
                with contextlib.suppress(Exception):
                    end_mlflow_run("FAILED")
                raise StoreUnreachable(f"tracking server {self.uri} unreachable for more than {outage_seconds:.0f} s; "
                                       f"this cell's results are kept in {where}")
            end_mlflow_run("FINISHED")


class _Heartbeat:
    """Refreshes a run's heartbeat tag every `interval` seconds from a daemon thread (the run's lease)."""

    def __init__(self, client, run_id: str, interval: float):
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(client, run_id, max(interval, 0.2)), daemon=True,
                                        name="stepbench-heartbeat")
        self._thread.start()

    def _beat(self, client, run_id: str, interval: float) -> None:
        while not self._stop.wait(interval):
            with contextlib.suppress(Exception):  # a server outage: the lease just ages meanwhile
                client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.3f}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class Tracker:
    """What methods receive (methods.common.Tracker): buffered ``train/*`` metrics, step = NFEs consumed."""

    def __init__(self, run: CellRun, prefix: str = "train/", show_progress: bool = True):
        self._run = run
        self.prefix = prefix
        self.show_progress = show_progress
        self.history: list[tuple[int, dict[str, float]]] = []  # for the training-curve PNG

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        metrics = {(k if k.startswith(self.prefix) else self.prefix + k): float(v) for k, v in metrics.items()}
        self.history.append((int(step), metrics))
        self._run.log_metrics(metrics, step=int(step))

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text artifact a method hands over (e.g. where its preference pairs came from)."""
        self._run.log_text(text, artifact_file)

    def log_artifact(self, local_path: str | Path, artifact_dir: str | None = None) -> None:
        """A file a method hands over (e.g. its trained preference model), stored with the run."""
        self._run.log_artifact(local_path, artifact_dir)

    @contextlib.contextmanager
    def progress(self, total: int, desc: str) -> Iterator[Callable[..., None]]:
        from tqdm.auto import tqdm

        # each worker of a grid draws on its own row below the grid's bar (bench.schedule.claim_progress_position)
        row = int(os.environ.get("STEPBENCH_PROGRESS_ROW", "0") or 0)
        bar = tqdm(total=total, desc=desc, leave=False, disable=not self.show_progress, mininterval=1.0,
                   dynamic_ncols=True, position=row)
        try:
            yield lambda n=1: bar.update(n)
        finally:
            bar.close()


class CellRun:
    """One open MLflow run: batched metrics, params, tags, artifacts, the prompts as a dataset input."""

    def __init__(self, store: Store, run_id: str, *, flush_every: int = 1000, flush_seconds: float = 15.0):
        self.store = store
        self.client = store.client
        self.run_id = run_id
        self.flush_every = min(flush_every, _METRICS_PER_BATCH)
        self.flush_seconds = flush_seconds
        self._buffer: list = []
        self._last_flush = time.monotonic()
        self._pending: list[tuple[str, tuple]] = []  # writes held back while the server is unreachable
        self._spool: Path | None = None

    # outages ---------------------------------------------------------------------------------------
    def _write(self, op: str, *args) -> None:
        """One write to the store, or into the pending list when the server is (or just became) unreachable."""
        if self._pending:
            self._pending.append((op, args))
            return
        try:
            self._apply(op, args)
        except Exception as err:  # noqa: BLE001 - classified below; anything but an outage is re-raised
            if not _is_outage(err):
                raise
            print(f"tracking server unreachable ({type(err).__name__}); buffering this run's results locally",
                  file=sys.stderr, flush=True)
            self._pending.append((op, args))

    def _apply(self, op: str, args: tuple) -> None:
        if op == "batch":
            metrics, params, tags = args
            self.client.log_batch(self.run_id, metrics=metrics, params=params, tags=tags, synchronous=True)
        elif op == "artifact":
            self.client.log_artifact(self.run_id, *args)
        elif op == "text":
            self.client.log_text(self.run_id, *args)
        elif op == "inputs":
            self.client.log_inputs(self.run_id, datasets=args[0])

    def _spool_file(self, local_path: str | Path) -> str:
        """A copy of an artifact that outlives the cell's temporary folder (for a later replay)."""
        import shutil

        if self._spool is None:
            import tempfile

            self._spool = Path(tempfile.mkdtemp(prefix=f"stepbench-spool-{self.run_id[:8]}-"))
        dst = self._spool / str(len(self._pending)) / Path(local_path).name  # the artifact keeps its name
        dst.parent.mkdir()
        (shutil.copytree if Path(local_path).is_dir() else shutil.copy2)(local_path, dst)
        return str(dst)

    def replay(self, wait_seconds: float) -> bool:
        """Send the buffered writes in order, retrying for up to `wait_seconds`; True when none is left."""
        deadline = time.monotonic() + wait_seconds
        while self._pending:
            op, args = self._pending[0]
            try:
                self._apply(op, args)
            except Exception as err:  # noqa: BLE001
                if not _is_outage(err):
                    raise
                if time.monotonic() > deadline:
                    return False
                time.sleep(min(5.0, max(0.5, wait_seconds / 20)))
                continue
            self._pending.pop(0)
        if self._spool is not None:
            import shutil

            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None
        return True

    def spool_to_disk(self) -> Path:
        """Write the unsent results to ``stepbench-unsent/<run id>/`` in the working directory: metrics.csv,
        params.json, tags.json, texts and artifacts as files. Returns the folder."""
        import json
        import shutil

        out = Path("stepbench-unsent") / self.run_id
        (out / "artifacts").mkdir(parents=True, exist_ok=True)
        rows, params, tags = [], {}, {}
        for op, args in self._pending:
            if op == "batch":
                metrics, prm, tgs = args
                rows += [f"{m.key},{m.value!r},{m.step},{m.timestamp}" for m in metrics]
                params.update({p.key: p.value for p in prm})
                tags.update({t.key: t.value for t in tgs})
            elif op == "artifact":
                local, artifact_dir = args
                dst = out / "artifacts" / (artifact_dir or "")
                dst.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if Path(local).is_dir() else shutil.copy2)(local, dst / Path(local).name)
            elif op == "text":
                text, artifact_file = args
                (out / "artifacts" / artifact_file).parent.mkdir(parents=True, exist_ok=True)
                (out / "artifacts" / artifact_file).write_text(text)
        (out / "metrics.csv").write_text("key,value,step,timestamp\n" + "\n".join(rows) + "\n")
        (out / "params.json").write_text(json.dumps(params, indent=1))
        (out / "tags.json").write_text(json.dumps(tags, indent=1))
        return out.resolve()

    def tracker(self, show_progress: bool = True) -> Tracker:
        return Tracker(self, show_progress=show_progress)

    # metrics -----------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(key, float(value), now, int(step)) for key, value in metrics.items())
        if len(self._buffer) >= self.flush_every or time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:_METRICS_PER_BATCH], self._buffer[_METRICS_PER_BATCH:]
            self._write("batch", chunk, [], [])
        self._last_flush = time.monotonic()

    # params / tags ------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self._write("batch", [], items[i:i + _PARAMS_PER_BATCH], [])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:_MAX_TAG_LEN]) for k, v in tags.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self._write("batch", [], [], items[i:i + _PARAMS_PER_BATCH])

    # artifacts -----------------------------------------------------------------------------------
    def log_artifact(self, local_path: str | Path, artifact_dir: str | None = None) -> None:
        if self._pending:  # the cell's temporary files are gone by the time the server is back: keep a copy
            self._pending.append(("artifact", (self._spool_file(local_path), artifact_dir)))
            return
        try:
            self._apply("artifact", (str(local_path), artifact_dir))
        except Exception as err:  # noqa: BLE001
            if not _is_outage(err):
                raise
            self._pending.append(("artifact", (self._spool_file(local_path), artifact_dir)))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._write("text", text, artifact_file)

    def log_prompts(self, prompts: list[str], name: str, context: str) -> None:
        """The prompts as a dataset input of this run (mlflow.data.from_pandas, logged by run id, not through the
        fluent active run). Two workers logging the same new dataset at once race on the store's unique key
        (sqlite3.IntegrityError from the loser); the retry finds the winner's row and links it."""
        import time
        import warnings

        import mlflow
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.exceptions import MlflowException
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        frame = pd.DataFrame({"prompt_idx": range(len(prompts)), "prompt": prompts})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "integer column(s)" schema hint: not a model input
            dataset = mlflow.data.from_pandas(frame, name=name)
            entry = DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        if self._pending:
            self._pending.append(("inputs", ([entry],)))
            return
        for attempt in range(4):
            try:
                self.client.log_inputs(self.run_id, datasets=[entry])
                return
            except MlflowException as err:
                if _is_outage(err):
                    self._pending.append(("inputs", ([entry],)))
                    return
                unique_key_race = "unique" in str(err).lower()  # SQLite "UNIQUE constraint", PostgreSQL "unique constraint"
                if not unique_key_race or attempt == 3:
                    raise
                time.sleep(0.2 * (attempt + 1))

    # end -----------------------------------------------------------------------------------------
    def fail(self, err: BaseException) -> None:
        """Mark the run FAILED with the error text as a tag and as ``error.txt`` (best effort)."""
        import traceback

        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else getattr(err, "mlflow_status", "FAILED")
        with contextlib.suppress(Exception):
            self.flush()
        with contextlib.suppress(Exception):
            self.set_tags({"error": f"{type(err).__name__}: {err}"[:_MAX_TAG_LEN]})
        with contextlib.suppress(Exception):
            self.log_text(text, "error.txt")
        if self._pending:  # the server is down: keep what this cell produced on disk
            print(f"tracking server unreachable; this cell's results are kept in {self.spool_to_disk()}",
                  file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):
                end_mlflow_run(status)
            return
        end_mlflow_run(status)


# ----------------------------------------------------------------------------------------------- read side
# Methods of the one store object on MLflow's own read API (mlflow.search_runs as a pandas frame,
# mlflow.artifacts.download_artifacts); the module functions below are the same calls for a URI (reports use them).


def list_experiments(uri: str = DEFAULT_URI, prefix: str = EXPERIMENT_PREFIX) -> list[str]:
    return Store(uri).experiments(prefix)


def load_runs(uri: str = DEFAULT_URI, experiment: str | list[str] = "toy", status: str | None = None):
    return Store(uri).runs(experiment, status)


def artifact_path(uri: str, run_id: str, path: str, dst: str | Path | None = None) -> Path:
    return Store(uri).artifact(run_id, path, dst)


def load_scores(uri: str, run_ids: list[str] | str, missing: str = "raise"):
    return Store(uri).scores(run_ids, missing)


def metric_history(uri: str, run_id: str, key: str):
    return Store(uri).metric_history(run_id, key)


# ----------------------------------------------------------------------------------------------- CLI


def ui_command(uri: str, port: int, host: str = "127.0.0.1") -> list[str]:
    """The exact ``mlflow ui`` command for a store (artifacts of SQLite stores are read from beside the db)."""
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", resolve_uri(uri), "--host", host,
           "--port", str(port)]
    root = _artifact_root(resolve_uri(uri))
    if root is not None:
        cmd += ["--default-artifact-root", root.as_uri()]
    return cmd


def ui_url(base: str, experiment_id: str | None = None) -> str:
    """The MLflow UI page that shows an experiment's runs table (or, without an id, the experiment list) in
    "model training" mode, e.g. http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning."""
    base = base.rstrip("/")
    if experiment_id is None:
        return f"{base}/#/experiments?{UI_QUERY}"
    return f"{base}/#/experiments/{experiment_id}/runs?{UI_QUERY}"


def ui_urls(uri: str, base: str) -> list[tuple[str, str]]:
    """(experiment name, runs-table URL) of every stepbench experiment in a store; [] when the store is empty or
    not there yet."""
    if _sqlite_path(uri) is not None and not _sqlite_path(uri).exists():
        return []
    client = _client(uri)
    return [(e.name, ui_url(base, e.experiment_id)) for e in client.search_experiments()
            if e.name.startswith(EXPERIMENT_PREFIX)]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.tracking", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    ui = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1")
    ui.add_argument("--uri", default=DEFAULT_URI)
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--print", action="store_true", help="print the command instead of running it")
    runs = sub.add_parser("runs", help="print the runs of a grid's experiment")
    runs.add_argument("--uri", default=DEFAULT_URI)
    runs.add_argument("--grid", default=None, help="grid name; default: list the experiments")
    args = parser.parse_args(argv)
    if args.cmd == "ui":
        cmd = ui_command(args.uri, args.port)
        print(" ".join(cmd), flush=True)
        base = f"http://127.0.0.1:{args.port}"
        print(f"open the runs table (not the GenAI traces page MLflow 3 opens on): {ui_url(base)}", flush=True)
        for name, url in ui_urls(args.uri, base):
            print(f"  {name}: {url}", flush=True)
        if args.print:
            return 0
        return subprocess.call(cmd)
    if args.grid is None:
        print("\n".join(list_experiments(args.uri)))
        return 0
    frame = load_runs(args.uri, args.grid)
    cols = ["run_name", "status", "cell_id", *[c for c in frame.columns if c.endswith("/mean")][:8]]
    buf = io.StringIO()
    frame[[c for c in cols if c in frame]].to_string(buf, index=False)
    print(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
