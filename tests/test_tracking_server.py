"""A grid run with two parallel workers (Hydra joblib launcher) against a real MLflow tracking server loses and
duplicates nothing. The server (SQLite backend, proxied artifact store) is started here on 127.0.0.1 and a free
port, and stopped by its pid; it takes ~15-30 s to start on a busy box."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import torch

from bench import tracking

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the server's process group (its pid: it was started as a session leader), SIGKILL after `grace`."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, log: Path, timeout: float = 300.0):
    """`mlflow server` on 127.0.0.1:<free port> (as `nox -s mlflow-server` starts it); yields its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--artifacts-destination",
           str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def tiny_toy(tmp_path_factory):
    """A random-weight toy pipeline (the shipped toy weights are not needed to test the plumbing)."""
    from tasks.toy.pipeline import ToyPipeline, ToyTextEncoder, build_scheduler, build_unet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("toy") / "tiny-toy"
    ToyPipeline(build_unet((8, 16, 16)), ToyTextEncoder(width=16, out_dim=32), build_scheduler()).save_pretrained(path)
    return path


@pytest.mark.timeout(900)
def test_two_workers_against_a_tracking_server_lose_and_duplicate_nothing(tiny_toy, tmp_path):
    with mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts", tmp_path / "server.log") as url:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
        argv = [sys.executable, "-m", "bench.run", "-m", "grid=smoke", "hydra/launcher=joblib",
                "hydra.launcher.n_jobs=2", f"tracking.uri={url}", f"model.path={tiny_toy}", "eval.n=4",
                "eval.steps=[1,2]", "progress=false", f"hydra.sweep.dir={tmp_path}/multirun"]
        out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=800)
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-4000:]
        assert "grid smoke: 5 cells: 5 finished" in out.stdout, log[-4000:]

        runs = tracking.load_runs(url, "smoke")
        # 6 jobs (base, ddpo and inference_scaling at K=1,2; base twice) share one base cell: 5 cells, one run each
        assert len(runs) == 5, runs[["run_name", "status", "cell_id"]]
        assert Counter(runs.cell_id).most_common(1)[0][1] == 1
        assert set(runs.status) == {"FINISHED"}
        assert sorted(runs.run_name) == sorted([
            "base/toy-turbo/toy-all/k0/s0", "ddpo/toy-turbo/toy-all/k1/s0", "ddpo/toy-turbo/toy-all/k2/s0",
            "inference_scaling/toy-turbo/toy-all/k1/s0", "inference_scaling/toy-turbo/toy-all/k2/s0"])
        # nothing lost: every evaluation number, every per-image score (through the server's artifact proxy),
        # and the training curves of the trained cells
        rewards = ["toy-all", "toy-mean3", "toy-shape", "toy-count", "jpeg-compressibility"]
        for _, run in runs.iterrows():
            for reward in rewards:
                for s in (1, 2):
                    assert run[f"metrics.eval/{reward}/s{s}/n"] == 4, (run.run_name, reward, s)
            assert str(run.artifact_uri).startswith("mlflow-artifacts:")
        scores = tracking.load_scores(url, runs.run_id.tolist())
        assert len(scores) == 5 * 2 * 4 * len(rewards)
        assert scores.groupby("run_id").size().eq(2 * 4 * len(rewards)).all()
        for _, run in runs[runs.method == "ddpo"].iterrows():
            keys = [k for k in run.index if k.startswith("metrics.train/") and run[k] == run[k]]
            assert keys, run.run_name
            history = tracking.metric_history(url, run.run_id, keys[0][len("metrics."):])
            assert len(history) >= 1 and history.step.is_monotonic_increasing
            assert history.step.max() <= 48
