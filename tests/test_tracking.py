"""bench.tracking: MLflow conventions on a real SQLite store in tmp, batching, the read API, URI checks."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from helpers import free_port

from bench import grid as grids
from bench import tracking


def cell_cfg(uri: str, toy, *overrides: str) -> dict:
    return grids._plain(grids.compose([
        f"model.path={toy}", "recipe=smoke", "budget.nfe=48", "eval.n=8", "eval.val_n=4", "eval.batch_size=8",
        "eval.grid_images=4",
        "eval.steps=[1,2]", f"tracking.uri={uri}", "tracking.system_metrics=false", "progress=false", *overrides]))


@pytest.fixture(scope="module")
def finished_store(tiny_toy, tmp_path_factory):
    """One DDPO cell (and its base cell) run in-process into a fresh SQLite store."""
    from bench.cell import run_cell

    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    cfg = cell_cfg(uri, tiny_toy, "method=ddpo", "train_steps=2", "seed=3")
    assert run_cell(cfg, "testgrid") == "finished"
    return uri, cfg


def test_run_name_tags_params_metrics_artifacts(finished_store):
    from mlflow import MlflowClient

    uri, cfg = finished_store
    assert tracking.list_experiments(uri) == ["stepbench/testgrid"]
    runs = tracking.load_runs(uri, "testgrid")
    # the base cell does not depend on the training seed: one for every seed, named and tagged with seed 0
    assert sorted(runs.run_name) == ["base/toy-turbo/toy-all/k0/s0", "ddpo/toy-turbo/toy-all/k2/s3"]
    assert set(runs.status) == {"FINISHED"}
    row = runs[runs.method == "ddpo"].iloc[0]
    assert (row.model, row.reward, row.train_steps, row.seed, row.grid) == ("toy-turbo", "toy-all", 2, 3, "testgrid")
    assert row.cell_id == grids.cell_id(cfg) and len(row.cell_id) == 12
    for tag in ("git_commit", "stepbench_version", "device"):
        assert row[f"tags.{tag}"]
    assert row["tags.device"] == "cpu"
    # provenance: CPU, torch build and float settings the cell ran under
    import torch

    for tag in ("cpu_model", "cpu_flags", "torch_build.blas_info", "float32_matmul_precision", "deterministic_algorithms"):
        assert row[f"tags.provenance.{tag}"], tag
    assert row["tags.provenance.torch_version"] == torch.__version__
    assert row["tags.provenance.torch_cuda"] == (torch.version.cuda or "none")
    assert row["tags.provenance.num_threads"] == str(cfg["threads"])  # what the cell set, not the process default
    assert (row["tags.provenance.precision"], row["tags.provenance.dtype"]) == ("fp32", "float32")
    # params: the flattened resolved config
    assert row["params.method.name"] == "ddpo" and row["params.budget.nfe"] == "48"
    assert row["params.method.prompts_per_epoch"] == "2" and row["params.eval.steps"] == "[1, 2]"
    assert row["params.model.path"] == cfg["model"]["path"]
    # metrics: eval/<split>/<reward>/s<S>/{mean,std,n} for the training reward and every other configured reward,
    # on both splits with their own sample counts
    rewards = ["toy-all", *cfg["eval"]["rewards"]]
    for reward in rewards:
        for s in (1, 2):
            assert row[f"metrics.eval/test/{reward}/s{s}/n"] == 8 and row[f"metrics.eval/val/{reward}/s{s}/n"] == 4
            for split in ("val", "test"):
                assert np.isfinite(row[f"metrics.eval/{split}/{reward}/s{s}/mean"])
                assert np.isfinite(row[f"metrics.eval/{split}/{reward}/s{s}/std"])
    assert not [c for c in runs.columns if c.startswith("metrics.eval/") and c.split("/")[1] not in ("val", "test")]
    assert row["metrics.cost/train_nfe"] <= 48 and row["metrics.cost/train_nfe"] > 0
    assert row["metrics.cost/eval_nfe"] == (8 + 4) * (1 + 2)
    assert row["metrics.cost/eval_nfe/test/s2"] == 8 * 2 and row["metrics.cost/eval_nfe/val/s2"] == 4 * 2
    for key in ("sample_nfe", "grad_nfe", "reward_calls", "wall_seconds", "peak_rss_mb", "eval_reward_calls"):
        assert f"metrics.cost/{key}" in row
    train_keys = [c for c in runs.columns if c.startswith("metrics.train/")]
    assert train_keys
    # train/* are logged against NFEs consumed
    history = tracking.metric_history(uri, row.run_id, train_keys[0][len("metrics."):])
    assert len(history) >= 1 and history.step.is_monotonic_increasing
    assert 0 < history.step.max() <= 48
    # artifacts
    client = MlflowClient(tracking.resolve_uri(uri))
    top = {a.path for a in client.list_artifacts(row.run_id)}
    assert {"config.yaml", "eval", "adapter", "train_curve.png"} <= top
    assert {a.path for a in client.list_artifacts(row.run_id, "eval")} >= {"eval/scores.parquet", "eval/val", "eval/test"}
    for split in ("val", "test"):
        assert {a.path for a in client.list_artifacts(row.run_id, f"eval/{split}")} == {
            f"eval/{split}/{name}_s{s}.{ext}" for s in (1, 2) for name, ext in (("grid", "png"), ("samples", "npz"))}
    assert [a.path for a in client.list_artifacts(row.run_id, "adapter")] == ["adapter/adapter.safetensors"]
    # the base run trains nothing: no adapter, no train metrics
    base = runs[runs.method == "base"].iloc[0]
    assert "adapter" not in {a.path for a in client.list_artifacts(base.run_id)}
    assert base.train_steps == 0 and base.seed == 0
    # prompts are the run's dataset inputs
    inputs = client.get_run(row.run_id).inputs.dataset_inputs
    contexts = {[t.value for t in i.tags if t.key == "mlflow.data.context"][0]: i.dataset.name for i in inputs}
    assert contexts == {"val": "toy/val", "test": "toy/test", "train": "toy/train"}


def test_scores_parquet_matches_logged_summary(finished_store):
    uri, cfg = finished_store
    runs = tracking.load_runs(uri, "testgrid", status="FINISHED")
    scores = tracking.load_scores(uri, runs.run_id.tolist())
    rewards = {"toy-all", *cfg["eval"]["rewards"]}
    assert len(scores) == 2 * (8 + 4) * 2 * len(rewards)  # 2 runs x (test n + val n) x |S| x |rewards|
    assert list(scores.columns[:11]) == ["run_id", "cell_id", "method", "split", "prompt", "prompt_idx", "sample_idx",
                                         "seed", "S", "reward", "value"]
    ddpo = runs[runs.method == "ddpo"].iloc[0]
    mine = scores[scores.run_id == ddpo.run_id]
    assert set(mine.cell_id) == {ddpo.cell_id} and set(mine.seed) == {3}
    # each split: its own prompts and its own noise seed
    from tasks import prompts as prompt_sets

    toy = prompt_sets.load("toy")
    for split, n, noise_seed in (("val", 4, cfg["eval"]["val_seed"]), ("test", 8, cfg["eval"]["seed"])):
        rows = mine[mine.split == split]
        assert rows.sample_idx.max() == n - 1 and set(rows.eval_seed) == {noise_seed}
        assert set(rows.prompt) <= set(getattr(toy, split))
    assert cfg["eval"]["val_seed"] != cfg["eval"]["seed"]
    for (split, reward, s), values in mine.groupby(["split", "reward", "S"]).value:
        assert ddpo[f"metrics.eval/{split}/{reward}/s{s}/mean"] == pytest.approx(values.mean(), abs=1e-6)
        assert ddpo[f"metrics.eval/{split}/{reward}/s{s}/std"] == pytest.approx(values.std(ddof=1), abs=1e-6)
    # paired gain over the base cell, logged by the trained cell, per split
    base = runs[runs.method == "base"].iloc[0]
    paired = mine.merge(scores[scores.run_id == base.run_id], on=["split", "reward", "S", "sample_idx"])
    assert set(paired.split) == {"val", "test"}
    for (split, reward, s), group in paired.groupby(["split", "reward", "S"]):
        delta = group.value_x - group.value_y
        assert ddpo[f"metrics.eval/{split}/{reward}/s{s}/gain_over_base"] == pytest.approx(delta.mean(), abs=1e-6)
        assert ddpo[f"metrics.eval/{split}/{reward}/s{s}/gain_se"] == pytest.approx(
            delta.std(ddof=1) / len(delta) ** 0.5, abs=1e-6)
    # base and ddpo were evaluated on the same (split, prompt, sample) pairs
    pairs = scores.groupby("run_id")[["split", "prompt", "sample_idx"]].apply(lambda f: tuple(map(tuple, f.values)))
    assert pairs.nunique() == 1
    assert tracking.artifact_path(uri, ddpo.run_id, "config.yaml").read_text().startswith("model:")
    with pytest.raises(FileNotFoundError):
        tracking.artifact_path(uri, ddpo.run_id, "nope.txt")


def test_eval_curve_is_logged_with_step_s(finished_store):
    """eval/<split>/<reward>/mean has one point per S at step = S (MLflow's chart of reward against step count),
    equal to the per-S means the report reads."""
    uri, cfg = finished_store
    runs = tracking.load_runs(uri, "testgrid", status="FINISHED")
    ddpo = runs[runs.method == "ddpo"].iloc[0]
    for split in ("val", "test"):
        for reward in ("toy-all", *cfg["eval"]["rewards"]):
            history = tracking.metric_history(uri, ddpo.run_id, f"eval/{split}/{reward}/mean")
            assert history.step.tolist() == [1, 2]
            for s, value in zip(history.step, history.value):
                assert value == pytest.approx(ddpo[f"metrics.eval/{split}/{reward}/s{s}/mean"], abs=1e-9)
            gen = ddpo[f"metrics.eval/{split}/{reward}/mean_over_s"]
            assert gen == pytest.approx(history.value.mean(), abs=1e-9)


def test_sample_npz_matches_the_scores(finished_store):
    """eval/<split>/samples_s<S>.npz: the first grid_images samples' pixels and ids, the same rows as scores.parquet."""
    uri, cfg = finished_store
    runs = tracking.load_runs(uri, "testgrid", status="FINISHED")
    ddpo = runs[runs.method == "ddpo"].iloc[0]
    scores = tracking.load_scores(uri, [ddpo.run_id])
    for split in ("val", "test"):
        with np.load(tracking.artifact_path(uri, ddpo.run_id, f"eval/{split}/samples_s2.npz"), allow_pickle=False) as f:
            images, prompt, prompt_idx, sample_idx = f["images"], f["prompt"], f["prompt_idx"], f["sample_idx"]
        assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 0
        rows = scores[(scores.split == split) & (scores.S == 2) & (scores.reward == "toy-all")].set_index("sample_idx")
        assert sample_idx.tolist() == [0, 1, 2, 3]
        assert prompt.tolist() == rows.loc[sample_idx].prompt.tolist()
        assert prompt_idx.tolist() == rows.loc[sample_idx].prompt_idx.tolist()


def test_val_only_cell_computes_no_test_number(tiny_toy, tmp_path, monkeypatch):
    """eval.splits=[val] (what sweeps and preset probes run): no test prompt is sampled, no eval/test metric, no test
    row in scores.parquet, no test artifact."""
    from bench import evaluate as ev
    from bench.cell import run_cell
    from tasks import prompts as prompt_sets

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = cell_cfg(uri, tiny_toy, "method=base", "eval.splits=[val]")
    sampled = []
    real = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **kw: (sampled.append((kw["split"], list(a[2]))), real(*a, **kw))[1])
    assert run_cell(cfg, "valonly") == "finished"
    test_prompts = set(prompt_sets.load("toy").test)
    assert [split for split, _ in sampled] == ["val"] and not set(sampled[0][1]) & test_prompts
    runs = tracking.load_runs(uri, "valonly")
    metrics = [c for c in runs.columns if c.startswith("metrics.eval/")]
    assert metrics and all(c.startswith("metrics.eval/val/") for c in metrics)
    scores = tracking.load_scores(uri, runs.run_id.tolist())
    assert set(scores.split) == {"val"} and not set(scores.prompt) & test_prompts
    from mlflow import MlflowClient

    client = MlflowClient(tracking.resolve_uri(uri))
    assert {a.path for a in client.list_artifacts(runs.run_id.iloc[0], "eval")} == {
        "eval/scores.parquet", "eval/summary.csv", "eval/val"}


def test_metrics_are_buffered_and_flushed_in_batches(tmp_path, monkeypatch):
    store = tracking.Store(f"sqlite:///{tmp_path}/m.db")
    exp = store.experiment_id("batching")
    calls = []
    real = store.client.log_batch
    monkeypatch.setattr(store.client, "log_batch", lambda run_id, **kw: (calls.append(kw), real(run_id, **kw)))
    with store.start_run(exp, "x/y/z/k1/s0", {"cell_id": "abc"}, flush_every=250, flush_seconds=1e9) as run:
        tracker = run.tracker(show_progress=False)
        for step in range(200):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "train/reward": step / 200}, step=step * 10)
        metric_calls = [c for c in calls if c.get("metrics")]
        assert len(metric_calls) == 1 and len(metric_calls[0]["metrics"]) == 250  # one batch, not 400 calls
        with tracker.progress(3, "x") as advance:
            advance(3)
    history = tracking.metric_history(store.uri, run.run_id, "train/loss")
    assert len(history) == 200 and history.step.tolist() == [s * 10 for s in range(200)]
    assert len(tracking.metric_history(store.uri, run.run_id, "train/reward")) == 200
    assert store.client.get_run(run.run_id).info.status == "FINISHED"


def test_failed_block_marks_run_failed_with_error_text(tmp_path):
    store = tracking.Store(f"sqlite:///{tmp_path}/m.db")
    exp = store.experiment_id("failing")
    with pytest.raises(ValueError, match="reward exploded"):
        with store.start_run(exp, "a/b/c/k1/s0", {"cell_id": "abc"}) as run:
            raise ValueError("reward exploded")
    info = store.client.get_run(run.run_id)
    assert info.info.status == "FAILED"
    assert info.data.tags["error"] == "ValueError: reward exploded"
    text = tracking.artifact_path(store.uri, run.run_id, "error.txt").read_text()
    assert "Traceback" in text and "reward exploded" in text


def test_check_uri(tmp_path):
    tracking.check_uri(f"sqlite:///{tmp_path}/new/dir/mlflow.db")  # creatable
    tic = time.perf_counter()
    with pytest.raises(tracking.TrackingURIError, match="unreachable"):
        tracking.check_uri(f"http://127.0.0.1:{free_port()}", timeout=2.0)
    assert time.perf_counter() - tic < 5
    (tmp_path / "afile").write_text("x")
    with pytest.raises(tracking.TrackingURIError, match="not a directory"):
        tracking.check_uri(f"sqlite:///{tmp_path}/afile/sub/mlflow.db")
    with pytest.raises(tracking.TrackingURIError, match="unknown scheme"):
        tracking.check_uri("ftp://example.invalid/x")


def test_resolve_uri_and_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.resolve_uri("http://host:5000") == "http://host:5000"
    assert tracking.experiment_name("toy") == "stepbench/toy"
    assert tracking.run_name("ddpo", "toy-turbo", "toy-all", 4, 1) == "ddpo/toy-turbo/toy-all/k4/s1"
    assert tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}


def test_ui_command_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.tracking", "ui", "--uri", f"sqlite:///{tmp_path}/m.db",
                          "--port", "5123", "--print"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert "mlflow ui --backend-store-uri sqlite:///" in line and "--host 127.0.0.1 --port 5123" in line
    assert f"--default-artifact-root {(tmp_path / 'mlruns').as_uri()}" in line


def test_load_runs_of_unknown_experiment_names_the_valid_ones(finished_store):
    from tasks.registry import UnknownNameError

    uri, _ = finished_store
    with pytest.raises(UnknownNameError, match="stepbench/testgrid"):
        tracking.load_runs(uri, "nope")
    assert isinstance(tracking.load_runs(uri, "stepbench/testgrid"), pd.DataFrame)
