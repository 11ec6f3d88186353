"""A real PostgreSQL backs an Optuna study with two worker processes and the MLflow tracking server (what
workers on several machines share: README, "Scaling out").

The test starts a private cluster: initdb into a fresh directory under /tmp (owned by the unprivileged `postgres`
user when run as root, since PostgreSQL refuses to run as root), listening on 127.0.0.1 only and a free port,
stopped at the end by the postmaster's pid. It skips only where the PostgreSQL server binaries are absent
(`apt-get install -y postgresql`, which .ci/run does). Driver: psycopg2 (SQLAlchemy URL postgresql+psycopg2://).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import free_port, started_mlflow_server, tail, wait_healthy

REPO = Path(__file__).resolve().parents[1]


def pg_bin() -> Path | None:
    """The directory holding initdb and pg_ctl: PATH first, then Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


BIN = pg_bin()
pytestmark = pytest.mark.skipif(
    BIN is None, reason="PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
                        "/usr/lib/postgresql/*/bin: install them with `apt-get install -y postgresql` (.ci/run does)")


@dataclass
class Cluster:
    port: int
    user: str = "stepbench"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)


@pytest.fixture(scope="module")
def postgres():
    """A private PostgreSQL cluster on 127.0.0.1:<free port>, trust auth for the local test user."""
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        name = next(u for u in ("postgres", "nobody") if _user_exists(u))
        owner = pwd.getpwnam(name)
        as_user = ["runuser", "-u", name, "--"] if shutil.which("runuser") else [
            "setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--clear-groups"]
    base = Path(tempfile.mkdtemp(prefix="stepbench-pg-", dir="/tmp"))
    if owner is not None:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    data, port = base / "data", free_port()
    subprocess.run([*as_user, str(BIN / "initdb"), "-D", str(data), "-U", "stepbench", "--auth=trust", "-E", "UTF8",
                    "--no-sync", "--no-instructions"], check=True, capture_output=True, timeout=300)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={base} -c fsync=off"
    start = subprocess.run([*as_user, str(BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-o",
                            options, "-w", "-t", "120", "start"], capture_output=True, text=True, timeout=180)
    pid = None
    try:
        assert start.returncode == 0, start.stdout + start.stderr + tail(base / "server.log", 2000)
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
        yield Cluster(port=port)
    finally:
        if pid is None and (data / "postmaster.pid").is_file():
            pid = int((data / "postmaster.pid").read_text().splitlines()[0])
        if pid is not None:
            _stop_postmaster(pid)
        shutil.rmtree(base, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _stop_postmaster(pid: int) -> None:
    """SIGQUIT = PostgreSQL's immediate shutdown (a throwaway cluster needs no checkpoint); SIGKILL if it hangs."""
    for sig, wait in ((signal.SIGQUIT, 20.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _alive(pid):
            return


OPTUNA_WORKER = textwrap.dedent("""
    import sys, optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage, worker = sys.argv[1], sys.argv[2]
    study = optuna.load_study(study_name="stepbench-pg", storage=storage)
    def objective(trial):
        trial.set_user_attr("worker", worker)
        x = trial.suggest_float("x", -4.0, 4.0)
        for step in range(3):  # intermediate values, as a sweep of training cells reports them
            trial.report((x - 1.0) ** 2 + 1.0 / (step + 1), step)
        return (x - 1.0) ** 2
    study.optimize(objective, n_trials=int(sys.argv[3]))
""")

MLFLOW_WORKER = textwrap.dedent("""
    import sys
    from bench import tracking
    url, worker = sys.argv[1], sys.argv[2]
    store = tracking.Store(url)
    experiment = store.experiment_id("postgres")  # both workers race to create it
    for j in range(3):
        tags = {"cell_id": f"w{worker}-r{j}", "method": "ddpo", "seed": j}
        with store.start_run(experiment, f"ddpo/w{worker}/r{j}", tags, flush_every=50) as run:
            run.log_params({"worker": worker, "run": j})
            for step in range(120):
                run.log_metrics({"train/reward_mean": step * 0.01, "train/loss": 1.0 / (step + 1)}, step=step)
            run.log_text(f"worker {worker} run {j}", "note.txt")
""")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_postgres_backs_an_optuna_study_with_two_workers_and_the_mlflow_server(postgres, tmp_path):
    import optuna

    from bench import tracking

    mlflow_db = postgres.create_database("mlflow")
    optuna_db = postgres.create_database("optuna")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
    log = tmp_path / "mlflow.log"
    # the server starts (~20-30 s on a busy box) while the Optuna workers run
    with started_mlflow_server(mlflow_db, tmp_path / "artifacts", log) as (server, url):
        optuna.create_study(study_name="stepbench-pg", storage=optuna_db, direction="minimize")  # once, first
        workers = [subprocess.Popen([sys.executable, "-c", OPTUNA_WORKER, optuna_db, str(w), "8"], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for w in (0, 1)]
        outputs = [w.communicate(timeout=300)[0] for w in workers]
        assert [w.returncode for w in workers] == [0, 0], outputs
        study = optuna.load_study(study_name="stepbench-pg", storage=optuna_db)
        trials = study.get_trials(deepcopy=False)
        assert len(trials) == 16
        assert sorted(t.number for t in trials) == list(range(16))  # no lost or duplicated trial numbers
        assert len({t._trial_id for t in trials}) == 16
        assert {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}
        assert sorted(t.user_attrs["worker"] for t in trials) == ["0"] * 8 + ["1"] * 8
        assert all(len(t.intermediate_values) == 3 for t in trials)
        assert study.best_value == min(t.value for t in trials)

        wait_healthy(server, url, log)
        workers = [subprocess.Popen([sys.executable, "-c", MLFLOW_WORKER, url, str(w)], env=env, cwd=tmp_path,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for w in (0, 1)]
        outputs = [w.communicate(timeout=300)[0] for w in workers]
        assert [w.returncode for w in workers] == [0, 0], outputs
        runs = tracking.load_runs(url, "postgres")
        assert len(runs) == 6 and set(runs.status) == {"FINISHED"}
        assert sorted(runs.cell_id) == sorted(f"w{w}-r{j}" for w in (0, 1) for j in range(3))
        for _, run in runs.iterrows():
            history = tracking.metric_history(url, run.run_id, "train/reward_mean")
            assert history.step.tolist() == list(range(120)), run.run_name  # every point, once
            assert run["metrics.train/loss"] == pytest.approx(1.0 / 120)
            assert tracking.artifact_path(url, run.run_id, "note.txt", dst=tmp_path / run.run_id).read_text() == (
                f"worker {run['params.worker']} run {run['params.run']}")
