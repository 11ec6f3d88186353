"""Reliability (issue 16): safe loading, checksummed weights, cross-host claims, store creation, outages, locks."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tasks import models
from tasks.weights import record_checksums, verify_checksums

# ------------------------------------------------------------------------------------------- no pickle


class _Evil:
    """Unpickling this calls os.system: what a crafted checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    from helpers import tiny_policy

    from methods.common import load_checkpoint

    marker = tmp_path / "pwned"
    path = tmp_path / "state.pt"
    torch.save({"version": 1, "payload": _Evil(marker)}, path)
    with pytest.raises(ValueError, match="refusing to load a checkpoint"):
        load_checkpoint(path, policy=tiny_policy(), optimizer=None, config={})
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what the old code did: the file really is armed
    assert marker.exists()


# ------------------------------------------------------------------------------------------- weight checksums


@pytest.mark.parametrize("name", ["toy-base", "toy-turbo"])
def test_shipped_toy_weights_carry_their_checksums(name):
    folder = Path(models.get(name).source)
    recorded = json.loads((folder / "measured.json").read_text())["sha256"]
    assert set(recorded) == {"unet/diffusion_pytorch_model.safetensors",
                             "text_encoder/diffusion_pytorch_model.safetensors"}
    assert verify_checksums(folder) == 2


def test_corrupt_weights_with_intact_header_are_refused(tmp_path, tiny_toy):
    folder = tmp_path / "toy"
    shutil.copytree(tiny_toy, folder)
    record_checksums(folder)
    models.load_pipeline("toy-turbo", path=folder)  # intact: loads
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-100] ^= 0xFF  # one byte of tensor data, far from the JSON header: safetensors still parses it
    weights.write_bytes(bytes(blob))
    from safetensors.torch import load_file

    assert len(load_file(weights)) > 0
    with pytest.raises(models.ModelUnavailableError, match=r"unet/diffusion_pytorch_model.safetensors is corrupted"):
        models.load_pipeline("toy-turbo", path=folder)


def test_corrupt_weights_refused_before_any_run(tmp_path, tiny_toy, monkeypatch, capsys):
    from bench import run as bench_run

    folder = tmp_path / "weights"
    shutil.copytree(tiny_toy, folder)
    record_checksums(folder)
    weights = folder / "text_encoder" / "diffusion_pytorch_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-8] ^= 0x01
    weights.write_bytes(bytes(blob))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(SystemExit) as exit_info:
        bench_run.main([f"model.path={folder}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "text_encoder/diffusion_pytorch_model.safetensors is corrupted" in err[0], err
    assert list(work.iterdir()) == []


# ------------------------------------------------------------------------------------------- bad values, early

SMALL = ["recipe=smoke", "budget.nfe=48", "eval.n=4", "eval.batch_size=4", "eval.grid_images=2", "eval.steps=[1,2]",
         "tracking.system_metrics=false", "progress=false"]


def _hub_cached(repo: str) -> bool:
    from huggingface_hub.constants import HF_HUB_CACHE

    return (Path(HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))).exists()


BAD_VALUES = [
    (["seed=-1"], "seed must be an integer in [0, 4294967295] (2**32 - 1); got -1"),
    (["seed=1099511627776"], "seed must be an integer in [0, 4294967295]"),
    (["eval.seed=-3"], "eval.seed must be an integer in [0, 4294967295] (2**32 - 1); got -3"),
    (["threads=100000"], "threads must be <= 1024"),
    (["prompts=simple-animals"], "prompts=simple-animals: model toy-turbo knows only the toy world's words, and its "
                                 "prompts use 'cat'"),
    (["eval.prompts=drawbench"], "eval.prompts=drawbench: model toy-turbo knows only the toy world's words"),
    (["eval.n=1000000000"], "eval.n must be <= 100,000 samples per step count; got 1,000,000,000"),
    (["+budget.nfee=100000"], "unknown config key 'budget.nfee' (given as +budget.nfee=...); valid keys under "
                              "'budget': nfe, reward_calls"),
    (["+nope=1"], "unknown config key 'nope' (given as +nope=...)"),
    (["budget.nfe=abc"], "Value 'abc' of type 'str' could not be converted to Integer"),
    (["method=spo_reward_x0", "budget.nfe=48"], "budget.nfe=48 is smaller than one spo_reward_x0 update at K=4 "
                                                "(418 NFEs); raise budget.nfe to at least 418"),
    (["method=ddpo", "budget.nfe=4"], "budget.nfe=4 is smaller than one ddpo update at K=4 (5 NFEs)"),
    pytest.param(["model=sdxl-turbo"], "model sdxl-turbo: not in the Hugging Face cache; fetch it with "
                                       "`hf download stabilityai/sdxl-turbo` or pass model.path=/path/to/sdxl-turbo",
                 marks=pytest.mark.skipif(_hub_cached("stabilityai/sdxl-turbo"), reason="cached here")),
    pytest.param(["reward=pickscore"], "reward pickscore (PickScore model): not in the Hugging Face cache; fetch it "
                                       "with `hf download yuvalkirstain/PickScore_v1`",
                 marks=pytest.mark.skipif(_hub_cached("yuvalkirstain/PickScore_v1"), reason="cached here")),
]


@pytest.mark.parametrize("argv, message", BAD_VALUES)
def test_bad_value_refused_in_one_line_before_anything_loads(argv, message, tmp_path, monkeypatch, capsys):
    from bench import run as bench_run

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        bench_run.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert "$VALUE" not in err[0]
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns/, no Hydra outputs/


@pytest.mark.slow
def test_missing_weights_fail_fast_in_a_subprocess_with_no_run(tmp_path):
    import subprocess
    import sys
    import time

    if _hub_cached("stabilityai/sdxl-turbo"):
        pytest.skip("sdxl-turbo is cached here")
    tic = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "bench.run", "model=sdxl-turbo"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    elapsed = time.perf_counter() - tic
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "error: weights missing, nothing was loaded or logged: model sdxl-turbo: not in the Hugging Face cache; "
        "fetch it with `hf download stabilityai/sdxl-turbo` or pass model.path=/path/to/sdxl-turbo"]
    assert list(tmp_path.iterdir()) == []
    assert elapsed < 30  # ~4 s on an idle box, 9 s with 3 other jobs on the 2 cores


def test_empty_eval_split_is_refused(tmp_path, monkeypatch):
    import types

    import tasks.prompts as prompt_sets
    from bench import grid as grids
    from bench.validate import ConfigError, check_config

    real = prompt_sets.load

    def load(name):
        if name == "toy-hard":
            return types.SimpleNamespace(train=list(real("toy").train), eval=[], val=[], test=[])
        return real(name)

    monkeypatch.setattr(prompt_sets, "load", load)
    cfg = grids._plain(grids.compose(["eval.prompts=toy-hard"]))
    with pytest.raises(ConfigError, match=r"eval.prompts=toy-hard: its '\w+' split is empty"):
        check_config(cfg)


def test_a_run_that_trained_nothing_ends_failed(tiny_toy, tmp_path):
    """A budget the method cannot make one update within (here: spent before training starts) gives a FAILED run
    with the reason, never a FINISHED one that looks like a result."""
    from bench import grid as grids
    from bench import tracking
    from bench.cell import run_cell

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = grids._plain(grids.compose([f"model.path={tiny_toy}", *SMALL, f"tracking.uri={uri}", "method=ddpo",
                                      "train_steps=1", "with_base=false"]))

    def spend_all(method, policy, task, budget, tracker):
        budget.spend(sample_nfe=budget.max_nfe)
        return tracker

    assert run_cell(cfg, "nothing", train_hook=spend_all) == "failed"
    runs = tracking.load_runs(uri, "nothing")
    assert list(runs.status) == ["FAILED"]
    assert runs["tags.error"].iloc[0].startswith("NothingTrained: trained nothing: ddpo made no update")
    assert run_cell(cfg, "nothing") == "finished"  # the same cell with its budget trains and finishes


# ------------------------------------------------------------------------------------------- store creation

REPO = Path(__file__).resolve().parents[1]


def _subprocess_env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", **extra}


_HALF_CREATED = """
import sqlite3, sys
from alembic.script import ScriptDirectory
from mlflow import MlflowClient
from mlflow.store.db.utils import _get_alembic_config

db = sys.argv[1]
MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
revisions = [r.revision for r in ScriptDirectory.from_config(_get_alembic_config("")).walk_revisions()]
with sqlite3.connect(db) as con:
    con.execute("update alembic_version set version_num = ?", (revisions[6],))
    con.execute("drop table job_locks")
"""
_MLFLOW_OPENS = "import sys; from mlflow import MlflowClient; MlflowClient(tracking_uri=sys.argv[1]).search_experiments()"


def _half_created(db: Path) -> None:
    """A store as a kill in the middle of MLflow's migrations leaves it: tables of later migrations already there,
    the recorded schema revision older (MLflow then re-runs migrations and fails with "... already exists").
    Made in a subprocess: MLflow caches a store object per URI in a process."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", _HALF_CREATED, str(db)], check=True, capture_output=True,
                   env=_subprocess_env(), timeout=180)


def test_half_created_store_is_repaired(tmp_path, capsys):
    import subprocess
    import sys

    from bench import tracking

    db = tmp_path / "mlflow.db"
    _half_created(db)
    before = subprocess.run([sys.executable, "-c", _MLFLOW_OPENS, f"sqlite:///{db}"], capture_output=True, text=True,
                            env=_subprocess_env(), timeout=180)
    assert before.returncode != 0 and "already exists" in before.stderr  # what every later run hit before the fix
    store = tracking.Store(f"sqlite:///{db}")
    experiment_id = store.experiment_id("repaired")
    with store.start_run(experiment_id, "r", {"cell_id": "c0"}) as run:
        run.log_metrics({"x": 1.0})
    assert tracking.load_runs(f"sqlite:///{db}", "repaired").status.tolist() == ["FINISHED"]
    assert len(list(tmp_path.glob("mlflow.db.incomplete-*"))) == 1  # moved aside, not deleted
    assert "was half-created" in capsys.readouterr().err


def test_half_created_store_with_runs_is_named_with_the_fix(tmp_path):
    import sqlite3

    from bench import tracking

    db = tmp_path / "mlflow.db"
    store = tracking.Store(f"sqlite:///{db}")
    with store.start_run(store.experiment_id("g"), "r", {"cell_id": "c0"}):
        pass
    with sqlite3.connect(db) as con:
        con.execute("update alembic_version set version_num = 'dc11669786a4'")
    tracking._CREATED.clear()
    with pytest.raises(tracking.TrackingURIError, match=r"holds runs: back it up, then run `mlflow db upgrade "):
        tracking.Store(f"sqlite:///{db}")


_CREATE = ("import sys; from bench.tracking import Store; s = Store(sys.argv[1]); print('exp', s.experiment_id('two'), "
           "flush=True)")


@pytest.mark.slow
def test_kill_during_store_creation_then_a_run_succeeds(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from bench import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.Popen([sys.executable, "-c", _CREATE, uri], env=_subprocess_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob("mlflow.db.creating-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)  # MLflow is building its tables (several seconds): kill it there
    assert list(tmp_path.glob("mlflow.db.creating-*")), "the creator never reached table creation"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert not (tmp_path / "mlflow.db").exists()  # never a half-created store under the real name
    store = tracking.Store(uri)
    with store.start_run(store.experiment_id("after-kill"), "r", {"cell_id": "c0"}) as run:
        run.log_metrics({"x": 1.0})
    assert tracking.load_runs(uri, "after-kill").status.tolist() == ["FINISHED"]
    assert not list(tmp_path.glob("mlflow.db.creating-*"))  # the killed creator's leftover is cleaned


@pytest.mark.slow
def test_two_processes_create_one_fresh_store(tmp_path):
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    procs = [subprocess.Popen([sys.executable, "-c", _CREATE, uri], env=_subprocess_env(), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    assert len({o[0].strip() for o in outs}) == 1  # the same experiment id in both


def test_tracking_uri_that_is_a_directory_fails_fast(tmp_path, monkeypatch, capsys):
    import time

    from bench import run as bench_run

    work = tmp_path / "work"
    (work / "store").mkdir(parents=True)
    monkeypatch.chdir(work)
    tic = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        bench_run.main([f"tracking.uri=sqlite:///{work / 'store'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{work / 'store'} is a directory; name the database file inside it" in err[0]
    assert time.perf_counter() - tic < 60
    assert [p.name for p in work.iterdir()] == ["store"] and list((work / "store").iterdir()) == []


# ------------------------------------------------------------------------------------------- lock files


def test_lock_files_do_not_follow_planted_symlinks(tmp_path, monkeypatch):
    from bench import tracking
    from bench.cell import cell_lock

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    folder = tracking.lock_dir(uri)
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    (folder / "abc123.lock").symlink_to(victim)
    with pytest.raises(tracking.TrackingURIError, match="is a symlink; refusing to follow it"):
        with cell_lock(uri, "abc123"):
            pass
    assert victim.read_text() == "precious"

    # a server's locks live in a per-user 0700 folder, not a shared temp folder; a planted folder symlink is refused
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run" / "stepbench-locks").symlink_to(elsewhere)
    with pytest.raises(tracking.TrackingURIError, match="is a symlink, not a directory, or not this user's"):
        tracking.lock_dir("http://127.0.0.1:5000")
    (tmp_path / "run" / "stepbench-locks").unlink()
    server = tracking.lock_dir("http://127.0.0.1:5000")
    assert server.is_relative_to(tmp_path / "run") and oct(server.stat().st_mode & 0o777) == "0o700"
    with cell_lock("http://127.0.0.1:5000", "c1") as held:
        assert held
    assert list(elsewhere.iterdir()) == []


# ------------------------------------------------------------------------------------------- cross-host claims


def _cell(tiny_toy, uri: str, *extra: str) -> dict:
    from bench import grid as grids

    return grids._plain(grids.compose([f"model.path={tiny_toy}", *SMALL, f"tracking.uri={uri}", "method=base",
                                       *extra]))


def test_a_live_claim_of_another_host_is_honoured_and_a_dead_nodes_run_is_reclaimed(tiny_toy, tmp_path):
    import time

    from bench import grid as grids
    from bench import tracking
    from bench.cell import run_cell

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = _cell(tiny_toy, uri, "tracking.lease_seconds=60")
    store = tracking.Store(uri, lease_seconds=60)
    exp = store.experiment_id("hosts")
    cid = grids.cell_id(cfg)

    def foreign_run(heartbeat: float):
        return store.client.create_run(exp, run_name=grids.cell_run_name(cfg), tags={
            "cell_id": cid, "stepbench.host": "node-b", "stepbench.pid": "4242", "stepbench.pid_start": "1.000",
            "stepbench.heartbeat": f"{heartbeat:.3f}"})

    alive = foreign_run(time.time())  # node-b heartbeated just now: its claim holds
    assert run_cell(cfg, "hosts") == "running-elsewhere"
    assert store.client.get_run(alive.info.run_id).info.status == "RUNNING"
    assert [r.info.status for r in store.cell_runs(exp, cid)] == ["RUNNING"]  # no second run of the cell

    store.client.set_terminated(alive.info.run_id, status="KILLED")
    dead = foreign_run(time.time() - 120)  # node-b went silent 2 minutes ago, lease 60 s: a dead node
    assert run_cell(cfg, "hosts") == "finished"
    reclaimed = store.client.get_run(dead.info.run_id)
    assert reclaimed.info.status == "KILLED" and "host node-b sent no heartbeat" in reclaimed.data.tags["error"]


def test_the_heartbeat_keeps_a_long_cell_claimed(tmp_path):
    import time

    from bench import tracking

    store = tracking.Store(f"sqlite:///{tmp_path}/mlflow.db", lease_seconds=1.0)
    exp = store.experiment_id("beat")
    with store.start_run(exp, "long", {"cell_id": "c0"}) as run:
        first = store.client.get_run(run.run_id).data.tags["stepbench.heartbeat"]
        time.sleep(1.5)  # longer than the lease: only the heartbeat keeps the claim alive
        live = store.client.get_run(run.run_id)
        assert float(live.data.tags["stepbench.heartbeat"]) > float(first)
        assert store.heartbeat_age(live) < 1.0
        other_host = tracking.Store(store.uri, lease_seconds=1.0)
        live.data.tags["stepbench.host"] = "node-b"  # as another host sees it: alive by heartbeat, not by pid
        assert other_host.claim_alive(live)


_GRID_SEEDS = "0,1,2,3,4,5"


@pytest.mark.slow
def test_two_hosts_on_one_store_run_no_cell_twice(tiny_toy, tmp_path):
    """Two `bench.run` processes as two machines (different STEPBENCH_HOST_ID, so they share no lock file, only
    the store) start the same 6-cell grid at once (6 evaluation seeds: base is one cell for every training seed):
    every cell FINISHED exactly once."""
    import subprocess
    import sys
    from collections import Counter

    from bench import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.Store(uri)  # (creating the store under its lock is tested above; here the claims are)
    argv = [sys.executable, "-m", "bench.run", "-m", "method=base", "eval.seed=" + ",".join(str(10 + int(s)) for s in _GRID_SEEDS.split(",")), f"model.path={tiny_toy}",
            *SMALL, f"tracking.uri={uri}", "grid=adhoc"]
    procs = []
    for host in ("node-a", "node-b"):
        procs.append(subprocess.Popen([*argv, f"hydra.sweep.dir={tmp_path}/{host}"], cwd=tmp_path, text=True,
                                      env=_subprocess_env(STEPBENCH_HOST_ID=host), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    # a host whose own jobs end while the other host still runs a cell reports that cell RUNNING and exits 1
    assert all(p.returncode in (0, 1) for p in procs) and "FAILED" not in "".join(outs), [o[-3000:] for o in outs]
    runs = tracking.load_runs(uri, "adhoc")
    finished = Counter(runs[runs.status == "FINISHED"].cell_id)
    assert len(finished) == len(_GRID_SEEDS.split(",")) and set(finished.values()) == {1}, finished
    assert set(runs.status) == {"FINISHED"}  # no RUNNING or FAILED leftovers; a lost claim's run is deleted
    hosts = Counter(runs["tags.stepbench.host"])
    assert sum(hosts.values()) == 6 and set(hosts) <= {"node-a", "node-b"}
    print("cells per host:", dict(hosts))


# ------------------------------------------------------------------------------------------- server outages


@pytest.mark.timeout(900)
def test_results_survive_a_tracking_server_outage(tiny_toy, tmp_path, monkeypatch):
    """The server (loopback, SQLite backend) is stopped by its pid while a cell runs. Restarted while the cell waits:
    every buffered result reaches it and the run is FINISHED. Not restarted: the cell is FAILED (not a crash) and
    its results are on disk."""
    import subprocess
    import sys
    import threading

    import pandas as pd
    from helpers import free_port, stop_process_group, wait_healthy

    from bench import tracking
    from bench.cell import run_cell

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # see the outage at once (default: ~2 min of retries)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
           "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    servers = []

    def start():
        log = tmp_path / f"server{len(servers)}.log"
        with open(log, "w") as handle:
            servers.append(subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}))
        return servers[-1], log

    def outage(restart: bool):
        def hook(method, policy, task, budget, tracker):
            stop_process_group(servers[-1])  # the server goes away in the middle of the cell
            if restart:
                threading.Timer(2.0, start).start()
            return tracker
        return hook

    try:
        wait_healthy(*start()[:1], url, tmp_path / "server0.log")
        back = grids_cfg(tiny_toy, url, "eval.seed=20", "tracking.outage_seconds=300")  # base: one cell per eval seed
        assert run_cell(back, "outage", train_hook=outage(restart=True)) == "finished"
        runs = tracking.load_runs(url, "outage")
        assert runs.status.tolist() == ["FINISHED"]
        assert runs.filter(like="metrics.eval/").notna().all(axis=None) and runs.filter(like="metrics.eval/").shape[1] > 4
        scores = pd.read_parquet(tracking.artifact_path(url, runs.run_id[0], "eval/scores.parquet", tmp_path / "dl"))
        assert len(scores) > 0
        assert not (tmp_path / "stepbench-unsent").exists()

        wait_healthy(servers[-1], url, tmp_path / f"server{len(servers) - 1}.log")
        down = grids_cfg(tiny_toy, url, "eval.seed=21", "tracking.outage_seconds=2")
        assert run_cell(down, "outage", train_hook=outage(restart=False)) == "failed"
        unsent = list((tmp_path / "stepbench-unsent").iterdir())
        assert len(unsent) == 1
        kept = pd.read_parquet(unsent[0] / "artifacts" / "eval" / "scores.parquet")
        assert len(kept) == len(scores)
        assert "eval/" in (unsent[0] / "metrics.csv").read_text()
        assert run_cell(grids_cfg(tiny_toy, url, "eval.seed=22"), "outage") == "failed"  # the next cell: a status, no crash
    finally:
        for proc in servers:
            stop_process_group(proc)


def grids_cfg(tiny_toy, uri: str, *extra: str) -> dict:
    return _cell(tiny_toy, uri, "tracking.system_metrics=false", *extra)


# ------------------------------------------------------------------------------------------- failures, briefly


def test_a_failing_base_runs_once_per_grid_and_failures_print_one_line(tiny_toy, tmp_path, monkeypatch, capsys):
    """Three jobs share one base cell whose evaluation hits a full disk: one FAILED base run (not one per job), one
    console line per failure and no traceback, the method cells still run, and the summary is printed."""
    import errno

    from bench import cell, tracking
    from bench import grid as grids
    from bench import run as bench_run

    execute = cell._execute

    def full_disk(cfg, *args, **kwargs):
        if grids.is_base(cfg):
            raise OSError(errno.ENOSPC, "No space left on device", "/data/mlruns/scores.parquet")
        return execute(cfg, *args, **kwargs)

    monkeypatch.setattr(cell, "_execute", full_disk)
    monkeypatch.setenv("STEPBENCH_LAUNCH", "")  # restored after main() sets its own
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["-m", "method=inference_scaling", "method.num_candidates=2,3,4",  # 3 cells (it does not depend on K)
            f"model.path={tiny_toy}", *SMALL,
            f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path}/multirun"]
    with pytest.raises(SystemExit) as exit_info:
        bench_run.main(argv)
    assert exit_info.value.code == 1
    out = capsys.readouterr()
    runs = tracking.load_runs(uri, "adhoc")
    base = runs[runs.method == "base"]
    assert base.status.tolist() == ["FAILED"]  # not retried by the 2nd and 3rd job
    assert sorted(runs[runs.method != "base"].status) == ["FINISHED"] * 3
    assert "Traceback" not in out.out + out.err
    failed = [line for line in out.out.splitlines() if "FAILED base/" in line]
    assert failed == ["[1/3] (base) FAILED base/toy-turbo/toy-all/k0/s0: OSError: [Errno 28] No space left on device: "
                      "'/data/mlruns/scores.parquet' (traceback: the run's error.txt)"]
    assert out.out.count("it FAILED earlier in this grid launch") == 2
    assert "grid adhoc: 4 cells: 1 failed, 3 finished" in out.out


def test_bad_yaml_file_is_one_line(tmp_path, monkeypatch, capsys):
    from bench import grid as grids
    from bench import run as bench_run
    from bench import validate

    conf = tmp_path / "conf"
    shutil.copytree(grids.CONF_DIR, conf)  # a private copy of bench/conf with one broken grid file
    (conf / "grid" / "broken.yaml").write_text("# @package _global_\nbudget:\n  nfe: [1, 2\n")
    monkeypatch.setattr(grids, "CONF_DIR", conf)
    monkeypatch.setattr(validate, "CONF_DIR", conf)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(SystemExit) as exit_info:
        bench_run.main(["-m", "grid=broken"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: bad YAML file: while parsing a flow sequence"), err
    assert "grid/broken.yaml" in err[0] and list(work.iterdir()) == []
