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
    import sys

    from bench import run as bench_run

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        bench_run.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert "$VALUE" not in err[0]
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns/, no Hydra outputs/


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
