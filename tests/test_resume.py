"""Resume and faults: finished cells are skipped, failing cells are FAILED and the grid goes on, runs of killed
processes are marked KILLED and rerun, and a smoke grid killed with SIGKILL ends with one FINISHED run per cell."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from bench import grid as grids
from bench import tracking

REPO = Path(__file__).resolve().parents[1]


def small(toy, uri: str) -> list[str]:
    return [f"model.path={toy}", "recipe=smoke", "budget.nfe=48", "eval.n=4", "eval.val_n=4", "eval.batch_size=4",
            "eval.grid_images=2", "eval.steps=[1,2]", f"tracking.uri={uri}", "tracking.system_metrics=false",
            "progress=false"]


def statuses(uri: str, grid: str) -> Counter:
    runs = tracking.load_runs(uri, grid)
    return Counter(zip(runs.run_name, runs.status))


def test_finished_cell_is_skipped(tiny_toy, tmp_path):
    from bench.cell import run_cell

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = grids._plain(grids.compose([*small(tiny_toy, uri), "method=base"]))
    assert run_cell(cfg, "resume") == "finished"
    assert run_cell(cfg, "resume") == "skipped"
    again = grids._plain(grids.compose([*small(tiny_toy, uri), "method=base", "threads=2", "eval.batch_size=2"]))
    assert run_cell(again, "resume") == "skipped"  # non-semantic changes do not make a new cell
    assert statuses(uri, "resume") == Counter({("base/toy-turbo/toy-all/k0/s0", "FINISHED"): 1})
    # the base model does not depend on the training seed: the seed-1 job finds the same cell
    same = grids._plain(grids.compose([*small(tiny_toy, uri), "method=base", "seed=1"]))
    assert run_cell(same, "resume") == "skipped"
    other = grids._plain(grids.compose([*small(tiny_toy, uri), "method=base", "eval.seed=2"]))
    assert run_cell(other, "resume") == "finished"


def test_a_base_cell_held_by_another_worker_is_not_waited_for(tiny_toy, tmp_path, monkeypatch):
    """Base cells are shared by the method cells of a (model, reward), every seed and K: when another worker of this machine
    is running one, run_cell returns "running-elsewhere" at once (no second run, no idle core); a method cell trains
    meanwhile and takes its gain over base once the base is finished."""
    import threading

    from bench import cell
    from bench.cell import cell_lock, run_cell

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    base = grids._plain(grids.compose([*small(tiny_toy, uri), "method=base"]))
    ddpo = grids._plain(grids.compose([*small(tiny_toy, uri), "method=ddpo", "train_steps=1"]))
    release = threading.Event()
    execute = cell._execute

    def slow_base(cfg, *args, **kwargs):  # the other worker's base cell runs until released
        if grids.is_base(cfg) and threading.current_thread().name == "other-worker":
            release.wait(60)
        return execute(cfg, *args, **kwargs)

    monkeypatch.setattr(cell, "_execute", slow_base)
    results = []
    worker = threading.Thread(target=lambda: results.append(run_cell(base, "shared")), name="other-worker")
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the other worker holds the base cell's lock
        with cell_lock(uri, grids.cell_id(base), wait=False) as free:
            if not free:
                break
        time.sleep(0.05)
    started = time.monotonic()
    assert run_cell(base, "shared") == "running-elsewhere"
    assert time.monotonic() - started < 30
    threading.Timer(2.0, release.set).start()  # the base finishes while the method cell trains / waits
    assert run_cell(ddpo, "shared") == "finished"
    worker.join(120)
    assert results == ["finished"]
    runs = tracking.load_runs(uri, "shared")
    assert Counter(zip(runs.run_name, runs.status)) == Counter({("base/toy-turbo/toy-all/k0/s0", "FINISHED"): 1,
                                                                ("ddpo/toy-turbo/toy-all/k1/s0", "FINISHED"): 1})
    gains = runs[runs.method == "ddpo"].filter(like="gain_over_base").dropna(axis=1)
    assert len(gains.columns) > 0  # the gain over base was computed: the method cell waited for the base


def test_cells_a_method_cannot_train_are_not_applicable_not_failed(tiny_toy, tmp_path, capsys):
    """Online PSO and SPO train the stochastic steps before the last one, so K = 1 cells of a grid are "n/a": no run,
    no base run, and the grid's summary counts them apart from failures (exit status 0 when the rest finished)."""
    from bench.cell import run_cell
    from bench.run import Plan, summarize

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    pso_k1 = grids._plain(grids.compose([*small(tiny_toy, uri), "method=pso", "train_steps=1"]))
    spo_k2 = grids._plain(grids.compose([*small(tiny_toy, uri), "method=spo", "train_steps=2"]))
    offline = grids._plain(grids.compose([*small(tiny_toy, uri), "method=pso", "train_steps=1", "method.mode=offline",
                                          "method.dataset=x"]))
    assert grids.not_applicable(pso_k1) == "pso trains at K >= 2 only, this cell has K = 1"
    assert grids.not_applicable(spo_k2) is None and grids.not_applicable(offline) is None
    assert grids.not_applicable(grids._plain(grids.compose([*small(tiny_toy, uri), "method=spo", "train_steps=2",
                                                            "method.start_step=1"]))) is not None
    assert run_cell(pso_k1, "na") == "n/a"
    assert "n/a  pso/toy-turbo/toy-all/k1/s0: pso trains at K >= 2 only" in capsys.readouterr().out
    with pytest.raises(Exception, match="unknown experiment 'stepbench/na'"):
        tracking.load_runs(uri, "na")  # not even the grid's experiment was made: nothing ran
    base = grids._plain(grids.compose([*small(tiny_toy, uri), "method=base"]))
    assert run_cell(base, "na") == "finished"
    assert summarize(Plan(grid="na", multirun=True, cells=[base, pso_k1])) == 0
    assert "grid na: 2 cells: 1 finished, 1 n/a" in capsys.readouterr().out


def test_stale_running_run_is_marked_killed_and_rerun(tiny_toy, tmp_path):
    from bench.cell import run_cell

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = grids._plain(grids.compose([*small(tiny_toy, uri), "method=base"]))
    store = tracking.Store(uri)
    exp = store.experiment_id("stale")
    # a RUNNING run left by a process that no longer exists (as after kill -9)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import psutil  # noqa: F401  (the tags below mimic tracking._process_tags of that process)

    tags = {"cell_id": grids.cell_id(cfg), "stepbench.host": __import__("socket").gethostname(),
            "stepbench.pid": str(dead.pid), "stepbench.pid_start": "1.000"}
    stale = store.client.create_run(exp, run_name=grids.cell_run_name(cfg), tags=tags)
    # ...and a RUNNING run whose process is alive (this one): left alone
    alive = store.client.create_run(exp, run_name="other", tags={
        "cell_id": "somethingelse", **tracking._process_tags()})
    assert run_cell(cfg, "stale") == "finished"
    assert store.client.get_run(stale.info.run_id).info.status == "KILLED"
    assert "process died" in store.client.get_run(stale.info.run_id).data.tags["error"]
    assert store.client.get_run(alive.info.run_id).info.status == "RUNNING"
    assert statuses(uri, "stale")[("base/toy-turbo/toy-all/k0/s0", "FINISHED")] == 1


def test_failing_cell_is_failed_and_the_grid_goes_on(tiny_toy, tmp_path, monkeypatch, capsys):
    """In-process multirun (basic launcher): DDPO's training raises; the next job still runs, the failed cell
    carries the error as a tag and error.txt, and the command exits 1 after the summary."""
    import methods
    from bench import run as bench_run

    ddpo_cls = methods.method_class("ddpo")
    real_train = ddpo_cls.train

    def train(self, policy, task, budget, tracker):  # a diverging run, as a method reports it
        raise FloatingPointError("loss is NaN at epoch 0 (injected)")

    monkeypatch.setattr(ddpo_cls, "train", train)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["-m", "method=ddpo,inference_scaling", "train_steps=1", *small(tiny_toy, uri),
            f"hydra.sweep.dir={tmp_path}/multirun"]
    with pytest.raises(SystemExit) as exit_info:
        bench_run.main(argv)
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "grid adhoc: 3 cells: 1 failed, 2 finished" in out
    assert "FAILED   ddpo/toy-turbo/toy-all/k1/s0" in out
    runs = tracking.load_runs(uri, "adhoc")
    assert Counter(runs.status) == Counter({"FINISHED": 2, "FAILED": 1})
    failed = runs[runs.status == "FAILED"].iloc[0]
    assert failed.run_name == "ddpo/toy-turbo/toy-all/k1/s0"
    assert failed["tags.error"] == "FloatingPointError: loss is NaN at epoch 0 (injected)"
    assert "injected" in tracking.artifact_path(uri, failed.run_id, "error.txt").read_text()
    # the job after the failing one ran (the grid went on); base ran once, first, for both jobs
    assert runs.run_name.tolist() == ["base/toy-turbo/toy-all/k0/s0", "ddpo/toy-turbo/toy-all/k1/s0",
                                      "inference_scaling/toy-turbo/toy-all/k0/s0"]
    # a rerun retries only the failed cell
    monkeypatch.setattr(ddpo_cls, "train", real_train)
    bench_run.main(argv)
    runs = tracking.load_runs(uri, "adhoc")
    assert Counter(runs.status) == Counter({"FINISHED": 3, "FAILED": 1})


@pytest.mark.slow
def test_sigkill_mid_grid_then_rerun_gives_one_finished_run_per_cell(tiny_toy, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "bench.run", "-m", "grid=smoke", *small(tiny_toy, uri),
            f"hydra.sweep.dir={tmp_path}/multirun"]
    log_path = tmp_path / "first.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    victim = None
    try:
        deadline = time.monotonic() + 240
        while victim is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            text = log_path.read_text()
            # bench.cell prints "run  <name> (cell <id>, run <run_id>)" once the MLflow run exists; kill inside
            # the first DDPO cell, after the base cell finished
            match = re.search(r"run  ddpo/\S+ \(cell \w+, run (\w+)\)", text)
            if match and "done base/" in text:
                victim = match.group(1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, as a scheduler's kill -9 would
        proc.wait()
        log.close()
    assert victim, "no DDPO cell started:\n" + log_path.read_text()[-3000:]
    before = tracking.load_runs(uri, "smoke")
    assert before.set_index("run_id").status[victim] == "RUNNING"  # the partial run is not FINISHED

    rerun = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "grid smoke: 4 cells: 4 finished" in rerun.stdout
    runs = tracking.load_runs(uri, "smoke")
    finished = runs[runs.status == "FINISHED"]
    assert finished.cell_id.value_counts().eq(1).all() and finished.cell_id.nunique() == 4
    assert (runs.status == "RUNNING").sum() == 0
    stale = runs[runs.run_id.isin(before[before.status == "RUNNING"].run_id)]
    assert set(stale.status) == {"KILLED"} and victim in set(stale.run_id)
    # cells finished before the kill were skipped, not rerun
    done_before = set(before[before.status == "FINISHED"].cell_id)
    assert all(Counter(finished.cell_id)[c] == 1 for c in done_before)
    assert len(runs) == 4 + len(stale)
