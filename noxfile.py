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
    """The test suite (tiny models, CPU, < 10 minutes on 2 cores)."""
    install(session, "test")
    session.run("pytest", "-n", os.environ.get("STEPBENCH_TEST_WORKERS", "2"), "--dist", "loadfile",
                *session.posargs, env={**ENV, "HF_HUB_OFFLINE": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "bench", "methods", "tasks", "reports", "tests", "noxfile.py")


@nox.session
def bench(session: nox.Session) -> None:
    """The toy benchmark grid on CPU (two workers, one torch thread each), then the report."""
    install(session)
    session.run("python", "-m", "bench.run", "-m", "grid=toy", "hydra/launcher=joblib",
                "hydra.launcher.n_jobs=2", *session.posargs, env=ENV)
    session.run("python", "-m", "reports", "--experiment", "stepbench/toy", "--out", "report", env=ENV)
    session.log("report: report/index.html and report/report.pdf; MLflow UI: nox -s mlflow-ui")


@nox.session
def report(session: nox.Session) -> None:
    """Render the report from the local MLflow store (sqlite:///mlflow.db)."""
    install(session)
    session.run("python", "-m", "reports", "--out", "report", *session.posargs, env=ENV)


@nox.session(name="mlflow-ui")
def mlflow_ui(session: nox.Session) -> None:
    """The MLflow UI on http://127.0.0.1:5000 over the local store (loopback only)."""
    install(session)
    session.run("mlflow", "ui", "--backend-store-uri", "sqlite:///mlflow.db", "--host", "127.0.0.1",
                "--port", os.environ.get("MLFLOW_PORT", "5000"), *session.posargs)


@nox.session(name="build-toy")
def build_toy(session: nox.Session) -> None:
    """Regenerate the toy world's weights (tens of minutes on 2 cores)."""
    install(session)
    session.run("python", "-m", "bench.models", "build", "toy-turbo", *session.posargs, env=ENV)
