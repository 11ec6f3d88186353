"""GPU memory and speed settings of a cell, and data-parallel training of one cell (accelerate / torchrun).

Settings (config keys; every one has a CPU-safe default):

| key | what it does |
| --- | --- |
| ``dtype: float32 / bfloat16 / float16`` | storage and compute dtype of the frozen base networks (methods.policy) |
| ``precision: fp32 / bf16 / fp16`` | ``torch.autocast`` around every denoiser forward (training and evaluation): its matmuls and convolutions, incl. the float32 LoRA adapters', run in that dtype; ``Policy.predict`` returns float32, so the sampler's transition means, stds and log-probabilities stay float32; weights, gradients and optimizer states stay float32; VAE and reward models are not autocast (scores stay comparable across settings). On the CPU only where it has native bf16 / fp16 arithmetic (AVX512-BF16, AMX): refused elsewhere. Opt-in: the default stays fp32 until the toy grid's verdicts are shown unchanged under bf16 (issue 17) |
| ``policy.gradient_checkpointing`` | recompute the UNet's activations in the backward pass |
| ``method.lora_rank`` | LoRA rank of the adapters (each method's field) |
| ``adam_8bit: true`` | bitsandbytes 8-bit Adam/AdamW states for the method's optimizer (extra ``gpu``; CUDA only) |
| ``offload_rewards: true`` | reward models wait on the CPU and move to the device only while they score |
| ``tf32: true`` | TF32 tensor-core matmuls / convolutions for float32 work on Ampere+ GPUs |

fp16 autocast applies no loss scaling (the methods call ``backward`` themselves), so small gradients can underflow;
prefer bf16, which has float32's exponent range.

Data parallel: ``accelerate launch --multi_gpu --num_processes N -m bench.run <one cell>`` (or ``torchrun
--nproc_per_node N -m bench.run ...``) trains one cell on N processes. Every rank builds the same policy (rank 0's
adapters are broadcast), samples its own data (training seed + rank), and after every backward pass the adapters'
gradients are averaged across ranks (one all-reduce per backward, as DistributedDataParallel does, so gradient
clipping sees the global gradient); every rank then takes the same optimizer step, so the adapters stay
identical. The budget is the cell's total: each rank spends ``budget.nfe / N``; method batch sizes are per
process (as ddpo-pytorch / SDPO count them per GPU). Only rank 0 talks to MLflow, logs, evaluates and saves;
the other ranks wait for rank 0's decision to run or skip the cell (a key in the process group's store), train,
and exit. Backend: NCCL on CUDA, gloo on CPU. Ranks must take the same number of backward passes (as under DDP):
a method that skips an update on one rank only (e.g. when a round yields no valid pair there) would hang.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class MissingExtraError(ImportError):
    """A configured feature needs an optional package that is not installed."""


# ----------------------------------------------------------------------------------------------- settings


def check(cfg: dict) -> None:
    """Fail before anything loads on settings that cannot work here (ValueError / MissingExtraError)."""
    precision = cfg.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; available: {', '.join(PRECISIONS)}")
    if precision != "fp32" and torch.device(str(cfg.get("device", "cpu"))).type == "cpu" and not cpu_autocast(precision):
        raise ValueError(f"precision={precision} on the CPU needs native {precision} arithmetic (AVX512-BF16 / AMX for "
                         f"bf16, AVX512-FP16 / AMX-FP16 for fp16), which this CPU lacks; use precision=fp32 (or a GPU)")
    if cfg.get("adam_8bit", False):
        bitsandbytes()
        if not str(cfg.get("device", "cpu")).startswith("cuda"):
            raise ValueError(f"adam_8bit=true needs a CUDA device (bitsandbytes' 8-bit optimizers); got "
                             f"device={cfg.get('device')!r}")


def cpu_autocast(precision: str) -> bool:
    """Whether this CPU does `precision` arithmetic natively (oneDNN's test); emulated, autocast only slows it down."""
    return {"bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported,
            "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported}.get(precision, lambda: True)()


def bitsandbytes():
    """The bitsandbytes module, or MissingExtraError saying how to install it."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise MissingExtraError(
            "adam_8bit=true needs bitsandbytes, which is not installed: pip install 'stepbench[gpu]' (or pip install "
            f"bitsandbytes) on a CUDA machine, or set adam_8bit=false. ({type(err).__name__}: {err})"
        ) from None
    return bnb


def configure_backends(device: str, tf32: bool) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on CUDA (no effect on the CPU)."""
    if str(device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        torch.backends.cudnn.allow_tf32 = bool(tf32)
        torch.set_float32_matmul_precision("high" if tf32 else "highest")


def autocast_denoiser(policy: Any, precision: str) -> None:
    """Run every forward of the policy's denoiser(s) under autocast (`precision` bf16/fp16; fp32: unchanged).

    Wraps `forward` of the UNet (and of the frozen reference copy of a full fine-tune) on the instance, so the
    sampler, the methods' gradient steps and evaluation all get it, and nothing else (VAE, text encoders and
    reward models keep their dtype). Backward passes follow autocast's recorded dtypes; the adapters' weights
    and gradients stay float32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return
    device_type = torch.device(policy.device).type
    for unet in (policy.unet, getattr(policy, "reference_unet", None)):
        if unet is not None and not getattr(unet, "_stepbench_autocast", None):
            unet.forward = torch.autocast(device_type=device_type, dtype=dtype)(unet.forward)
            unet._stepbench_autocast = precision


def adapter_digest(policy: Any) -> str:
    """sha1 of the trainable weights (ranks of a data-parallel cell must agree after training)."""
    import hashlib

    digest = hashlib.sha1()
    for key, value in sorted(policy.adapter_state_dict().items()):
        digest.update(key.encode())
        digest.update(value.to(torch.float32).numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def optimizers(adam_8bit: bool) -> Iterator[None]:
    """While the block runs, torch.optim.Adam / AdamW are bitsandbytes' 8-bit versions (if `adam_8bit`).

    Every method builds its optimizer with methods.common.build_optimizer, which looks the class up on torch.optim
    when it is called, so the swap reaches all of them; nothing else is built inside a cell's training."""
    if not adam_8bit:
        yield
        return
    bnb = bitsandbytes()
    saved = torch.optim.Adam, torch.optim.AdamW
    torch.optim.Adam, torch.optim.AdamW = bnb.optim.Adam8bit, bnb.optim.AdamW8bit
    try:
        yield
    finally:
        torch.optim.Adam, torch.optim.AdamW = saved


class OffloadedReward:
    """A reward whose models live on the CPU and move to `device` only for the duration of a call.

    Behaves like the wrapped reward (`name`, `scale`, ... are forwarded); the scores come back on the images'
    device. Use it when the reward models and the policy do not fit on the GPU together."""

    def __init__(self, reward: Any, device: str | torch.device):
        self._reward = reward.to("cpu")
        self._device = torch.device(device)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reward, name)

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device=None, dtype=None) -> OffloadedReward:
        if device is not None:
            self._device = torch.device(device)
        if dtype is not None:
            self._reward.to("cpu", dtype)
        return self

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self._reward.to(self._device)
        try:
            return self._reward(images.to(self._device), prompts).to(images.device)
        finally:
            self._reward.to("cpu")
            if self._device.type == "cuda":
                torch.cuda.empty_cache()

    def __repr__(self) -> str:
        return f"OffloadedReward({self._reward!r}, device={str(self._device)!r})"


def place_reward(reward: Any, device: str, offload: bool) -> Any:
    """The reward on `device`, or kept on the CPU and moved there only while scoring."""
    if offload and torch.device(device).type != "cpu":
        return OffloadedReward(reward, device)
    return reward.to(device)


# ----------------------------------------------------------------------------------------------- data parallel


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


@dataclass
class DataParallel:
    """This process's place in a data-parallel cell (torch.distributed initialised from the launcher's env)."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, configured: str) -> str:
        """cuda -> cuda:<local rank>: one GPU per process; cpu stays cpu."""
        dev = torch.device(configured)
        return f"cuda:{self.local_rank}" if dev.type == "cuda" else str(configured)

    # -- coordination ---------------------------------------------------------------------------------------
    def _store(self):
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()

    def announce(self, cell_id: str, decision: str) -> None:
        """Rank 0 tells the other ranks whether it runs ("run") or skips ("skip") cell `cell_id`."""
        if self.is_main:
            self._store().set(f"stepbench/cell/{cell_id}", decision)

    def decision(self, cell_id: str, timeout: float = 7 * 24 * 3600.0) -> str:
        """Wait for rank 0's decision on `cell_id` (rank 0 may first spend hours on the shared base cell)."""
        store = self._store()
        key = f"stepbench/cell/{cell_id}"
        store.wait([key], timedelta(seconds=timeout))
        return store.get(key).decode()

    # -- training ---------------------------------------------------------------------------------------------
    def rank_seed(self, seed: int) -> int:
        """The training seed of this rank: rank 0 keeps the cell's seed, others draw other data."""
        return int(seed) + 1_000_003 * self.rank

    def share_budget(self, nfe: int) -> int:
        """This rank's part of the cell's NFE budget (the remainder goes to the low ranks)."""
        nfe = int(nfe)
        return nfe // self.world_size + (1 if self.rank < nfe % self.world_size else 0)

    def broadcast_parameters(self, params: list[torch.nn.Parameter]) -> None:
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    @contextlib.contextmanager
    def training(self, params: list[torch.nn.Parameter]) -> Iterator[GradientSync]:
        """Rank 0's adapters on every rank, then gradients averaged after every backward pass."""
        self.broadcast_parameters(params)
        sync = GradientSync(params)
        try:
            yield sync
        finally:
            sync.remove()

    def sum_counts(self, values: list[float]) -> list[int]:
        """Element-wise sum over ranks (e.g. the NFEs every rank spent)."""
        import torch.distributed as dist

        device = f"cuda:{self.local_rank}" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return [int(round(v)) for v in t.tolist()]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


_DP: DataParallel | None = None


def data_parallel() -> DataParallel | None:
    """The process's DataParallel when launched with WORLD_SIZE > 1 (process group initialised once), else None."""
    global _DP
    if world_size() <= 1:
        return None
    if _DP is None:
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)  # NCCL works on the current device: one GPU per process
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            # Long timeout: rank 0 evaluates (hours on real models) while the others wait in the store.
            dist.init_process_group(backend=backend, timeout=timedelta(hours=12))
        _DP = DataParallel(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)
    return _DP


class GradientSync:
    """Average the gradients of `params` across ranks once at the end of every backward pass that reached them.

    A post-accumulate-grad hook on each parameter queues one callback per backward on the autograd engine; the
    callback all-reduces all gradients flattened into one buffer (DDP's semantics: .grad holds the global mean
    before any clipping or optimizer step). Parameters without a gradient contribute zeros."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = [p for p in params if p.requires_grad]
        self._queued = False
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]
        self.syncs = 0

    def _hook(self, _param: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._all_reduce)

    def _all_reduce(self) -> None:
        import torch.distributed as dist

        self._queued = False
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g).to(g.dtype))
            offset += n
        self.syncs += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class ScaledTracker:
    """Rank 0's tracker in a data-parallel cell: `step` (this rank's NFEs) scaled to the cell's NFEs."""

    def __init__(self, tracker: Any, world: int):
        self._tracker, self._world = tracker, int(world)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tracker, name)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._tracker.log_metrics(metrics, int(step) * self._world)


class NullRun:
    """Stands in for bench.tracking.CellRun on ranks > 0: nothing is logged anywhere."""

    run_id = "rank>0"

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None

    def tracker(self, show_progress: bool = True):
        return _NullProgressTracker()


class _NullProgressTracker:
    """methods.common.Tracker that drops everything (ranks > 0)."""

    def __init__(self):
        self.history: list = []

    def log_metrics(self, metrics, step) -> None:
        return None

    @contextlib.contextmanager
    def progress(self, total: int, desc: str):
        yield lambda n=1: None
