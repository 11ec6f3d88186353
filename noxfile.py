"""Thin sessions over stepbench's command lines: everything here can also be run by hand.

Torch is installed first from $STEPBENCH_TORCH (default "torch==2.13.0", the CPU wheel these dev
machines carry on disk). On a GPU box set it to the build you want, e.g.
    STEPBENCH_TORCH="torch --index-url https://download.pytorch.org/whl/cu124" nox -s bench-sdxl-turbo
or STEPBENCH_TORCH=skip to keep whatever torch the session venv already has.
"""

from __future__ import annotations

import os
import shlex

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]

TORCH = os.environ.get("STEPBENCH_TORCH", "torch==2.13.0")
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def install(session: nox.Session, *extras: str) -> None:
    if TORCH != "skip":
        session.install(*shlex.split(TORCH))
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install("-e", spec)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (tiny models, CPU, < 10 minutes on 2 cores); `nox -s tests -- -m "not slow"` leaves out the
    multi-process, server and whole-grid tests (under 2 minutes)."""
    install(session, "test")
    session.run("pytest", "-n", os.environ.get("STEPBENCH_TEST_WORKERS", "2"), "--dist", "loadfile",
                *session.posargs, env={**ENV, "HF_HUB_OFFLINE": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "bench", "methods", "tasks", "reports", "tests", "noxfile.py")


@nox.session
def smoke(session: nox.Session) -> None:
    """The first thing to try (about a minute after the install): the 4-cell smoke grid, then its report."""
    install(session)
    session.run("python", "-m", "bench.run", "-m", "grid=smoke", *session.posargs, env=ENV)
    session.run("python", "-m", "reports", "--experiment", "stepbench/smoke", "--out", "report-smoke", env=ENV)
    session.log("report: report-smoke/index.html; the runs: nox -s mlflow-ui (it prints the runs table's URL)")


@nox.session
def bench(session: nox.Session) -> None:
    """The toy benchmark grid on CPU (two workers, one torch thread each), then the report."""
    install(session)
    session.run("python", "-m", "bench.run", "-m", "grid=toy", "hydra/launcher=joblib",
                "hydra.launcher.n_jobs=2", *session.posargs, env=ENV)
    session.run("python", "-m", "reports", "--experiment", "stepbench/toy", "--out", "report", env=ENV)
    session.log("report: report/index.html and report/report.pdf; MLflow UI: nox -s mlflow-ui")


@nox.session
def replicate(session: nox.Session) -> None:
    """Rerun the toy grid under disjoint training seeds (grid=toy-replicate: seeds 3-5 into stepbench/toy-replicate,
    about as long as `nox -s bench`), then print which verdicts of stepbench/toy hold, ending with
    `replicate: N of M verdicts hold, K flipped`. posargs are Hydra overrides for the grid."""
    install(session)
    session.run("python", "-m", "bench.run", "-m", "grid=toy-replicate", "hydra/launcher=joblib",
                "hydra.launcher.n_jobs=2", *session.posargs, env=ENV)
    session.run("python", "-m", "reports", "replicate", "--experiment", "stepbench/toy",
                "--replicate", "stepbench/toy-replicate", env=ENV)


@nox.session
def readme(session: nox.Session) -> None:
    """Rewrite README.md's generated results section from stepbench/toy (the report's numbers, test split only)."""
    install(session)
    session.run("python", "-m", "reports", "readme", "--experiment", "stepbench/toy", *session.posargs, env=ENV)


@nox.session
def report(session: nox.Session) -> None:
    """Render the report from the local MLflow store (sqlite:///mlflow.db)."""
    install(session)
    session.run("python", "-m", "reports", "--out", "report", *session.posargs, env=ENV)


@nox.session(name="mlflow-ui")
def mlflow_ui(session: nox.Session) -> None:
    """The MLflow UI on http://127.0.0.1:5000 over the local store (loopback only). It prints the URL of each
    experiment's runs table: MLflow 3 otherwise opens on its GenAI traces page. posargs: e.g. --uri <store>."""
    install(session)
    session.run("python", "-m", "bench.tracking", "ui", "--port", os.environ.get("MLFLOW_PORT", "5000"),
                *session.posargs)


@nox.session
def sweep(session: nox.Session) -> None:
    """A small Optuna sweep on the toy world (DDPO on toy-turbo, 6 trials, journal file optuna.journal)."""
    install(session)
    session.run("python", "-m", "bench.sweep", "method=ddpo", "model=toy-turbo", "sweep=toy-small",
                *session.posargs, env=ENV)
    session.log("study: optuna-dashboard optuna.journal --host 127.0.0.1 (pip install 'stepbench[dashboard]'); "
                "runs: nox -s mlflow-ui; best config: bench/conf/method/tuned/")


@nox.session(name="build-toy")
def build_toy(session: nox.Session) -> None:
    """Regenerate the toy world's weights (tens of minutes on 2 cores)."""
    install(session)
    session.run("python", "-m", "bench.models", "build", "toy-turbo", *session.posargs, env=ENV)


# --------------------------------------------------------------------------------------------- real-model grids


def _install_unless_passthrough(session: nox.Session, *extras: str) -> None:
    """`nox --no-venv -s ...` runs in the current environment (stepbench already installed): nothing to install."""
    if session.venv_backend != "none":
        install(session, *extras)


def _real_grid(session: nox.Session, grid: str) -> None:
    """Plan + preflight (exit 3 within seconds if CUDA or weights are missing), the grid, then its report.

    `-- --stand-in` runs the same grid on the CPU with tiny pipelines of the real classes and tiny reward models
    (bench/standin.py), in minutes, into its own MLflow store; other posargs are Hydra overrides for every step."""
    import json
    from pathlib import Path

    args = list(session.posargs)
    standin = "--stand-in" in args
    args = [a for a in args if a != "--stand-in"]
    _install_unless_passthrough(session)
    env, overrides, report = dict(ENV), [], ["--out", f"report-{grid}"]
    if standin:
        spec_file = Path(".stepbench-standin") / f"{grid}.json"
        session.run("python", "-m", "bench.standin", grid, "--write", str(spec_file), env=env)
        spec = json.loads(spec_file.read_text())
        env, overrides = {**env, **spec["env"]}, spec["overrides"]
        report = [*spec["report"], "--out", f"report-{grid}-standin"]
    session.run("python", "-m", "bench.plan", "-m", f"grid={grid}", *overrides, *args, env=env)
    from nox.command import CommandFailed

    try:  # exit 1 = some cells FAILED (listed in the run's summary): still render the report of the others
        session.run("python", "-m", "bench.run", "-m", f"grid={grid}", *overrides, *args, env=env)
        failed = False
    except CommandFailed as err:
        if err.return_code != 1:
            raise
        failed = True
    session.run("python", "-m", "reports", "--experiment", f"stepbench/{grid}", *report, env=env)
    if failed:
        session.error(f"grid {grid}: some cells FAILED (see the summary above); the report shows the others")


@nox.session(name="bench-sdxl-turbo")
def bench_sdxl_turbo(session: nox.Session) -> None:
    """grid=sdxl-turbo on CUDA (plan, preflight, run, report); `-- --stand-in`: tiny stand-ins on the CPU."""
    _real_grid(session, "sdxl-turbo")


@nox.session(name="bench-sd-turbo")
def bench_sd_turbo(session: nox.Session) -> None:
    """grid=sd-turbo on CUDA (plan, preflight, run, report); `-- --stand-in`: tiny stand-ins on the CPU."""
    _real_grid(session, "sd-turbo")


@nox.session(name="bench-flux-schnell")
def bench_flux_schnell(session: nox.Session) -> None:
    """grid=flux-schnell on CUDA (plan, preflight, run, report); `-- --stand-in`: tiny stand-ins on the CPU."""
    _real_grid(session, "flux-schnell")


@nox.session(name="bench-sd35-large-turbo")
def bench_sd35_large_turbo(session: nox.Session) -> None:
    """grid=sd35-large-turbo on CUDA (plan, preflight, run, report); `-- --stand-in`: tiny stand-ins on the CPU."""
    _real_grid(session, "sd35-large-turbo")


@nox.session(name="mlflow-server")
def mlflow_server(session: nox.Session) -> None:
    """An MLflow tracking server for parallel workers: a database backend and a proxied artifact store.

    Workers log with tracking.uri=http://127.0.0.1:5000; reports read it with --tracking-uri http://127.0.0.1:5000.
    $MLFLOW_BACKEND_STORE_URI (default sqlite:///mlflow-server.db; shared: postgresql+psycopg2://user@host:5432/mlflow),
    $MLFLOW_ARTIFACTS_DESTINATION (default ./mlartifacts; shared: a path every worker sees, or s3://...),
    $MLFLOW_HOST (default 127.0.0.1), $MLFLOW_PORT (default 5000), $MLFLOW_WORKERS (default 2). posargs go to
    `mlflow server` (e.g. --allowed-hosts for a cluster)."""
    backend = os.environ.get("MLFLOW_BACKEND_STORE_URI", "sqlite:///mlflow-server.db")
    _install_unless_passthrough(session, *(["postgres"] if backend.startswith("postgresql") else []))
    session.run("mlflow", "server", "--backend-store-uri", backend,
                "--artifacts-destination", os.environ.get("MLFLOW_ARTIFACTS_DESTINATION", "./mlartifacts"),
                "--host", os.environ.get("MLFLOW_HOST", "127.0.0.1"), "--port", os.environ.get("MLFLOW_PORT", "5000"),
                "--workers", os.environ.get("MLFLOW_WORKERS", "2"), *session.posargs,
                env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


@nox.session
def perf(session: nox.Session) -> None:
    """Performance benchmarks -> perf.json + perf.md (sampler vs pipeline, per-method toy cells, grid scaling;
    bench/perf.py). posargs go to `python -m bench.perf`: e.g. --quick; `--against 7b17867` (ours / theirs ratios
    on the same toy cells, that revision in a temporary git worktree); `readme` (README's section from perf.json)."""
    install(session)
    session.run("python", "-m", "bench.perf", "--out", "perf.json", "--markdown", "perf.md", *session.posargs, env=ENV)
