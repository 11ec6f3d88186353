"""Helpers shared by several test modules (`from helpers import ...`; pytest puts tests/ on sys.path): tiny toy
policies and stand-in rewards for the methods' smoke runs, and free ports / subprocess servers for the tracking and
database tests. Fixtures live in conftest.py."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from methods.policy import Policy

# ------------------------------------------------------------------------------------------- tiny toy policies


def tiny_policy(seed: int = 0, *, sample_size: int = 32, text_width: int = 32, lora_rank: int = 2,
                guidance_scale: float | None = None, full_finetune: bool = False) -> Policy:
    """A random-weight toy pipeline (UNet channels (8, 16), ~40k params) wrapped as a LoRA Policy.

    The weights come from torch.manual_seed(seed), so equal arguments give equal weights. The UNet is the toy's
    build_unet((8, 16)) at `sample_size` px; the text encoder's output width is the UNet's time-embedding width."""
    from methods.policy import Policy
    from tasks import models as zoo
    from tasks.toy.pipeline import ToyPipeline, ToyTextEncoder, build_scheduler, build_unet

    torch.manual_seed(seed)
    unet = build_unet((8, 16), sample_size=sample_size)
    encoder = ToyTextEncoder(width=text_width, out_dim=unet.config.block_out_channels[0] * 4)
    pipe = ToyPipeline(unet=unet, text_encoder=encoder, scheduler=build_scheduler())
    return Policy(pipe, zoo.get("toy-turbo"), lora_rank=lora_rank, guidance_scale=guidance_scale,
                  full_finetune=full_finetune)


def tiny_policy_16px(guidance_scale: float | None = None) -> Policy:
    """The SDPO and Sharpening tests' tiny policy: 16x16 px samples and an 8-wide text encoder (seed 0)."""
    return tiny_policy(sample_size=16, text_width=8, guidance_scale=guidance_scale)


def changed(policy, before) -> bool:
    """Whether any trainable tensor of `policy` differs from `before` (an earlier adapter_state_dict())."""
    after = policy.adapter_state_dict()
    return any(not torch.equal(before[k], after[k]) for k in before)


def count_forwards(policy):
    """Counts denoiser forward passes per sample (CFG's doubled batch included)."""
    counter = {"samples": 0}
    policy.unet.register_forward_hook(lambda module, args, output: counter.__setitem__(
        "samples", counter["samples"] + args[0].shape[0]))
    return counter


def t64(*values):
    """A float64 tensor of `values`."""
    return torch.tensor(values, dtype=torch.float64)


# ------------------------------------------------------------------------------------------- stand-in rewards


class RedReward:
    """A continuous stand-in reward (mean red intensity): random-weight models score 0 on the toy verifiers.
    Counts the images it scores in `calls`."""

    name = "red"

    def __init__(self):
        self.calls = 0

    def __call__(self, images, prompts):
        assert len(prompts) == images.shape[0]
        self.calls += images.shape[0]
        return images[:, 0].mean(dim=(1, 2))


class CountingReward:
    """Mean brightness (no ties), counting every image it scores."""

    def __init__(self):
        self.images = 0

    def __call__(self, images, prompts):
        assert len(prompts) == len(images)
        self.images += len(images)
        return images.float().mean(dim=(1, 2, 3))


# ------------------------------------------------------------------------------------------- ports and servers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released): for a server to start on, or as
    a closed port for the "unreachable" checks."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, chars: int = 3000) -> str:
    """The last `chars` characters of a log file ("" if it does not exist)."""
    return path.read_text()[-chars:] if path.is_file() else ""


def stop_process_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the process group of `proc` (its pid: it was started as a session leader), SIGKILL after `grace`."""
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
def started_mlflow_server(backend_uri: str, artifacts: Path, log: Path):
    """Start `mlflow server` on 127.0.0.1:<free port> (as `nox -s mlflow-server` starts it), not yet waiting for it;
    yields (process, url). Stopped by its pid at the end."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--artifacts-destination",
           str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc)


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 300.0) -> None:
    """Wait until the server at `url` answers /health with 200; its log's tail in the error if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        if time.monotonic() > deadline:
            raise TimeoutError(f"mlflow server not healthy after {timeout:.0f} s:\n{tail(log)}")
        time.sleep(0.5)
