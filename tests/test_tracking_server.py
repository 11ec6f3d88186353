"""A grid run with two parallel workers (Hydra joblib launcher) against a real MLflow tracking server loses and
duplicates nothing. The server (SQLite backend, proxied artifact store) is started here on 127.0.0.1 and a free
port, and stopped by its pid; it takes ~15-30 s to start on a busy box."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from helpers import started_mlflow_server, wait_healthy

from bench import tracking

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, log: Path, timeout: float = 300.0):
    """`mlflow server` on 127.0.0.1:<free port> (as `nox -s mlflow-server` starts it), healthy; yields its URL."""
    with started_mlflow_server(backend_uri, artifacts, log) as (proc, url):
        wait_healthy(proc, url, log, timeout)
        yield url


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_workers_against_a_tracking_server_lose_and_duplicate_nothing(tiny_toy, tmp_path):
    with mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts", tmp_path / "server.log") as url:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
        argv = [sys.executable, "-m", "bench.run", "-m", "grid=smoke", "hydra/launcher=joblib",
                "hydra.launcher.n_jobs=2", f"tracking.uri={url}", f"model.path={tiny_toy}", "eval.n=4",
                "eval.val_n=4", "eval.steps=[1,2]", "progress=false", f"hydra.sweep.dir={tmp_path}/multirun"]
        out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=800)
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-4000:]
        assert "grid smoke: 4 cells: 4 finished" in out.stdout, log[-4000:]

        runs = tracking.load_runs(url, "smoke")
        # 6 jobs (base, ddpo and inference_scaling at K=1,2): base and inference scaling do not depend on K, so
        # they are one cell each: 4 cells, one run each
        assert len(runs) == 4, runs[["run_name", "status", "cell_id"]]
        assert Counter(runs.cell_id).most_common(1)[0][1] == 1
        assert set(runs.status) == {"FINISHED"}
        assert sorted(runs.run_name) == sorted([
            "base/toy-turbo/toy-all/k0/s0", "ddpo/toy-turbo/toy-all/k1/s0", "ddpo/toy-turbo/toy-all/k2/s0",
            "inference_scaling/toy-turbo/toy-all/k0/s0"])
        # nothing lost: every evaluation number, every per-image score (through the server's artifact proxy),
        # and the training curves of the trained cells
        rewards = ["toy-all", "toy-mean3", "toy-shape", "toy-count", "jpeg-compressibility"]
        for _, run in runs.iterrows():
            for reward in rewards:
                for s in (1, 2):
                    for split in ("val", "test"):
                        assert run[f"metrics.eval/{split}/{reward}/s{s}/n"] == 4, (run.run_name, split, reward, s)
            assert str(run.artifact_uri).startswith("mlflow-artifacts:")
        scores = tracking.load_scores(url, runs.run_id.tolist())
        assert len(scores) == 4 * 2 * 2 * 4 * len(rewards)  # runs x splits x S x n x rewards
        assert scores.groupby("run_id").size().eq(2 * 2 * 4 * len(rewards)).all()
        for _, run in runs[runs.method == "ddpo"].iterrows():
            keys = [k for k in run.index if k.startswith("metrics.train/") and run[k] == run[k]]
            assert keys, run.run_name
            history = tracking.metric_history(url, run.run_id, keys[0][len("metrics."):])
            assert len(history) >= 1 and history.step.is_monotonic_increasing
            assert history.step.max() <= 48
