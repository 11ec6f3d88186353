"""bench.run CLI and bench/conf: bad input fails before anything runs, presets are runnable and in sync."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port

from bench import grid as grids
from bench import run as bench_run
from bench.validate import ConfigError, check_config, conf_options

CONF = Path(grids.__file__).resolve().parent / "conf"


def test_unknown_method_fails_fast_in_a_subprocess(tmp_path):
    tic = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "bench.run", "method=nope"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    elapsed = time.perf_counter() - tic
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: unknown method 'nope'; available: " + ", ".join(conf_options("method"))]
    assert "base" in conf_options("method") and "ddpo" in conf_options("method")
    assert elapsed < 20  # no torch/mlflow import on this path (~0.5 s on an idle box)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("argv, message", [
    (["model=sdxl"], "unknown model 'sdxl'; available: flux-schnell, sd-turbo, sd35-large-turbo, sdxl-turbo, toy-base, toy-flow, toy-turbo"),
    (["reward=toy-al"], "unknown reward 'toy-al'; available: "),
    (["-m", "grid=nope"], "unknown grid 'nope'; available: " + ", ".join(conf_options("grid"))),
    (["-m", "method=base,ddpo,nope"], "unknown method 'nope'"),
    (["prompts=nope"], "prompts: unknown prompt set 'nope'; available: "),
    (["budget.nfe=0"], "budget.nfe must be a positive integer; got 0"),
    (["budget.nfe=-5"], "budget.nfe must be a positive integer; got -5"),
    (["train_steps=0"], "train_steps must be a positive integer; got 0"),
    (["eval.steps=[1,5]"], "eval.steps: 5 is not a step count toy-turbo supports; valid: 1, 2, 3, 4, 6, 8"),
    (["eval.n=0"], "eval.n must be a positive integer; got 0"),
    (["eval.val_n=-2"], "eval.val_n must be a positive integer; got -2"),
    (["eval.val_seed=0"], "eval.val_seed must differ from eval.seed (validation and test noise are disjoint); got 0"),
    (["eval.splits=[val,nope]"], "eval.splits: prompt set 'toy' has no held-out split 'nope'; available: "),
    (["eval.splits=[train]"], "eval.splits: 'train' is the training prompts, not a held-out split"),
    (["eval.splits=[]"], "eval.splits is empty"),
    (["eval.rewards=[toy-mean3,nope]"], "eval.rewards: unknown reward 'nope'; available: "),
    (["method.nope=1"], "unknown config key 'method.nope'; valid keys under 'method': "),
    (["bogus=1"], "unknown config key 'bogus'; valid keys under 'the top level': "),
    (["method.lr=-1"], "method.ddpo: lr must be >= 0; got -1"),
    (["dtype=float64"], "unknown dtype 'float64'; available: float32, float16, bfloat16"),
    (["device=cuda:7"], "device 'cuda:7'"),
    (["-m", "grid=smoke", "method=base,pso", "eval.steps=[16]"], "eval.steps: 16 is not a step count"),
])
def test_bad_input_one_message_and_no_run(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    with pytest.raises(SystemExit) as exit_info:
        bench_run.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns/, no Hydra outputs/


def test_unreachable_tracking_uri(tiny_toy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    port = free_port()
    tic = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        bench_run.main([f"tracking.uri=http://127.0.0.1:{port}", f"model.path={tiny_toy}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"tracking URI 'http://127.0.0.1:{port}' is unreachable" in err
    assert time.perf_counter() - tic < 30
    assert list(tmp_path.iterdir()) == []


def test_every_preset_starts_with_its_command():
    files = [p for p in CONF.rglob("*.yaml") if "tuned" not in p.parts]  # tuned/: written by bench.sweep
    assert len(files) > 30
    for path in files:
        first = path.read_text().splitlines()[0]
        if first == "# @package _global_":  # Hydra reads the package header from the first 512 bytes
            first = path.read_text().splitlines()[1]
        assert first.startswith(("# python -m bench.run", "# python -m bench.sweep")), path
        command = first[2:]
        if path.parent.name == "grid" and path.stem != "adhoc":
            assert f"grid={path.stem}" in command and " -m " in command, path


def test_generated_method_configs_are_in_sync():
    out = subprocess.run([sys.executable, "-m", "bench.conf.generate", "--check"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, "run `python -m bench.conf.generate`:\n" + out.stdout + out.stderr


def test_every_method_and_recipe_composes_and_validates(tiny_toy):
    import methods

    for method in methods.names():
        for recipe in ("toy", "smoke"):  # paper = the method file alone; other recipes touch few methods
            cfg = grids._plain(grids.compose([f"method={method}", f"recipe={recipe}", f"model.path={tiny_toy}"]))
            check_config(cfg)
            assert cfg["method"]["name"] == method
    toy = grids._plain(grids.compose(["method=ddpo"]))
    paper = grids._plain(grids.compose(["method=ddpo", "recipe=paper"]))
    assert toy["method"]["lr"] == methods.presets("ddpo")["toy"]["lr"] != paper["method"]["lr"]
    assert paper["method"]["lr"] == methods.config_class("ddpo")().lr
    # the command line beats the recipe
    assert grids._plain(grids.compose(["method=ddpo", "method.lr=0.123"]))["method"]["lr"] == 0.123


@pytest.mark.parametrize("grid", [g for g in conf_options("grid") if g != "adhoc"])
def test_named_grids_expand_validate_and_contain_base(grid, tiny_toy):
    import torch

    cpu = [] if torch.cuda.is_available() else ["device=cpu"]  # GPU grids validate here on the CPU
    if grid.startswith("toy") or grid == "smoke":
        cpu.append(f"model.path={tiny_toy}")
    jobs = grids.expand([f"grid={grid}", *cpu], multirun=True)
    assert any("method=base" in job for job in jobs)
    # composing every cell of a 300-cell grid takes a while on a busy box: the small grids fully, the big ones
    # at both ends
    cells = [grids._plain(grids.compose(job)) for job in (jobs if len(jobs) <= 40 else jobs[:3] + jobs[-3:])]
    for cell in cells[:2] + cells[-2:]:
        check_config(cell)
    if len(jobs) > 40:
        return
    ids = {grids.cell_id(c) for c in cells}
    bases = {grids.cell_id(c) for c in cells if c["method"]["name"] == "base"}
    per_mr = {(c["model"]["name"], c["reward"]["name"]) for c in cells}
    assert len(bases) == len(per_mr)  # base once per (model, reward), whatever the seed and K
    if grid == "smoke":
        assert 4 <= len(ids) <= 6
        assert all(c["eval"]["n"] <= 16 and c["budget"]["nfe"] <= 100 for c in cells)


def test_command_line_sweep_beats_the_grid_file():
    jobs = grids.expand(["grid=smoke", "method=base,ddpo", "train_steps=4"], multirun=True)
    assert [j[:2] for j in jobs] == [["method=base", "train_steps=4"], ["method=ddpo", "train_steps=4"]]


def test_cell_identity_ignores_non_semantic_settings():
    a = grids._plain(grids.compose(["method=ddpo"]))
    b = grids._plain(grids.compose(["method=ddpo", "device=cpu", "threads=2", "eval.batch_size=7", "progress=false",
                                    "tracking.uri=sqlite:///elsewhere.db", "method.sample_batch_size=4"]))
    assert grids.cell_id(a) == grids.cell_id(b)
    for change in ["seed=1", "train_steps=2", "method.lr=0.5", "eval.n=5", "budget.nfe=7", "reward=toy-mean3"]:
        assert grids.cell_id(grids._plain(grids.compose(["method=ddpo", change]))) != grids.cell_id(a), change
    base1 = grids._plain(grids.compose(["method=base", "train_steps=1", "budget.nfe=5"]))
    base4 = grids._plain(grids.compose(["method=base", "train_steps=4"]))
    assert grids.cell_id(base1) == grids.cell_id(base4) == grids.cell_id(grids.base_config(a))
    assert grids.cell_run_name(base4) == "base/toy-turbo/toy-all/k0/s0"
    assert re.fullmatch(r"[0-9a-f]{12}", grids.cell_id(a))


def test_check_config_rejects_missing_weights(tmp_path, monkeypatch):
    cfg = grids._plain(grids.compose(["model.path=/nonexistent/toy"]))
    with pytest.raises(ConfigError, match="model.path '/nonexistent/toy' does not exist"):
        check_config(cfg)
    import tasks.models as models

    spec = models.get("toy-base")
    monkeypatch.setattr(models, "get", lambda name: __import__("dataclasses").replace(spec, source=str(tmp_path)))
    with pytest.raises(ConfigError, match="shipped weights are missing .* `python -m bench.models build toy-base`"):
        check_config(grids._plain(grids.compose(["model=toy-base"])))


@pytest.mark.slow
def test_grid_on_submitit_local_launcher(tiny_toy, tmp_path):
    """A sweep through hydra-submitit-launcher's local executor (what submitit_slurm uses on a cluster): of two
    jobs that are the same base cell (K does not matter to base), bench.schedule launches one, in its own
    process (two workers of one cell meeting at its lock: test_resume)."""
    from bench import tracking

    toy = tiny_toy
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = [sys.executable, "-m", "bench.run", "-m", "method=base", "train_steps=1,2", f"model.path={toy}",
            "recipe=smoke", "eval.n=4", "eval.val_n=4", "eval.batch_size=4", "eval.steps=[1,2]",
            f"tracking.uri={uri}",
            "tracking.system_metrics=false", "progress=false", "hydra/launcher=submitit_local",
            f"hydra.sweep.dir={tmp_path}/multirun"]
    env = {**__import__("os").environ, "PYTHONPATH": str(CONF.parents[1]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "grid adhoc: 1 cells: 1 finished" in out.stdout
    assert "grid adhoc: 1 jobs of 2: 1 would only repeat a shared cell" in out.stdout
    runs = tracking.load_runs(uri, "adhoc")
    assert runs.run_name.tolist() == ["base/toy-turbo/toy-all/k0/s0"]
    assert set(runs.status) == {"FINISHED"}
    logs = [p.read_text() for p in (tmp_path / "multirun" / ".submitit").glob("*/*_log.out")]
    assert len(logs) == 1 and "run  base/" in logs[0]
