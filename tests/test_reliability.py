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
