"""Typed schema of the resolved config (Hydra structured config): unknown keys and wrong types are errors.

The YAML files in this directory fill it in; ``config.yaml`` lists it first in its defaults. The ``method`` node is
free-form here because every method has its own fields: bench.validate checks it against the method's ``Config``
dataclass (methods.load raises on an unknown field and names the valid ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConf:
    name: str = MISSING
    """tasks.models name: toy-base, toy-turbo, sd-turbo, sdxl-turbo."""
    path: str | None = None
    """Local weights folder (save_pretrained layout) used instead of the spec's hub id / shipped path."""


@dataclass
class RewardConf:
    name: str = MISSING
    """tasks.rewards name of the TRAINING reward (it is also scored at evaluation)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options for tasks.rewards.load (e.g. a local weights path)."""


@dataclass
class RecipeConf:
    name: str = MISSING
    """Which tuning/<recipe>/<method>.yaml overrides the method's paper defaults: toy, paper, smoke."""


@dataclass
class BudgetConf:
    nfe: int = 20_000
    """Training compute in NFEs (denoiser forward passes in sampling + forward/backward passes in gradient steps)."""
    reward_calls: int | None = None
    """Optional cap on reward-model calls (images scored) during training."""


@dataclass
class EvalConf:
    splits: list[str] = field(default_factory=lambda: ["val", "test"])
    """Held-out prompt lists of the prompt set to evaluate: val (read by tuning: sweeps, preset probes) and test
    (read by leaderboards, claims, README). [val] computes no test number at all."""
    steps: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 6, 8])
    """Evaluation step counts S; each must be in the model's ModelSpec.step_counts."""
    n: int = 256
    """Test-split samples per step count; sample i uses prompt i % len(test prompts) and noise from (seed, i) only."""
    val_n: int = 128
    """Validation-split samples per step count (prompt i % len(val prompts), noise from (val_seed, i))."""
    prompts: str = "${prompts}"
    """Prompt set whose held-out val/test lists are used (default: the training prompt set)."""
    seed: int = 0
    """Test noise seed; identical for every method, model and training seed (paired comparisons)."""
    val_seed: int = 1
    """Validation noise seed; must differ from `seed`, so that tuning never sees the test noise."""
    rewards: list[str] = field(default_factory=list)
    """Rewards scored besides the training reward (reward-hacking control)."""
    batch_size: int = 64
    """Images generated and scored per batch."""
    grid_images: int = 24
    """Samples shown in each eval/grid_s<S>.png."""


@dataclass
class PolicyConf:
    """How the harness wraps the base pipeline (methods.policy.Policy). `lora_rank` and `full_finetune` are
    fields of each training method's Config (its recipes decide them), not set here."""

    lora_alpha: float | None = None
    """LoRA alpha; None = rank (scale 1)."""
    lora_targets: list[str] | None = None
    """Module names to adapt; None = the policy's default for the model family."""
    guidance_scale: float | None = None
    """Classifier-free guidance during training and eval; None = the ModelSpec's guidance_scale."""
    gradient_checkpointing: bool = False
    """Trade compute for memory in the denoiser's backward pass."""


@dataclass
class TrackingConf:
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI: a SQLite file (artifacts beside it in mlruns/), or http(s)://host:port of a server."""
    system_metrics: bool = True
    """mlflow.start_run(log_system_metrics=True): CPU/RAM/GPU sampled by MLflow every 10 s."""
    flush_every: int = 500
    """Buffered train/* metric points written per MlflowClient.log_batch call."""
    flush_seconds: float = 15.0
    """...or at least this often."""
    save_adapter: bool = True
    """Log the trained adapter weights (safetensors) as an artifact."""
    outage_seconds: float = 600.0
    """How long a finished cell waits for an unreachable tracking server to flush its buffered results; then they
    stay in stepbench-unsent/<run id>/ and the cell is FAILED."""
    lease_seconds: float = 300.0
    """A cell's claim in the store: its RUNNING run heartbeats every lease/5 s; another host's run silent for longer
    than this is a dead node's and is reclaimed (bench.tracking.Store)."""


@dataclass
class StepbenchConfig:
    model: ModelConf = field(default_factory=ModelConf)
    reward: RewardConf = field(default_factory=RewardConf)
    method: Any = MISSING
    recipe: RecipeConf = field(default_factory=RecipeConf)
    prompts: str = "toy"
    """tasks.prompts set; training uses its `train` split, evaluation its held-out splits (eval.splits)."""
    train_steps: int | None = None
    """K, the denoising step count used while training; None = the ModelSpec's default_train_steps."""
    seed: int = 0
    """Training seed (prompts drawn, sampling noise, initialisation of the adapters)."""
    budget: BudgetConf = field(default_factory=BudgetConf)
    eval: EvalConf = field(default_factory=EvalConf)
    policy: PolicyConf = field(default_factory=PolicyConf)
    device: str = "cpu"
    """torch device for the cell (cpu, cuda, cuda:1, mps)."""
    dtype: str = "float32"
    """Weights/compute dtype of the frozen base model: float32, float16, bfloat16."""
    precision: str = "fp32"
    """Autocast of every denoiser forward: fp32 (off), bf16, fp16; log-probabilities stay float32 (bench/accel.py)."""
    tf32: bool = True
    """Allow TF32 tensor-core matmuls/convolutions for float32 work on CUDA (Ampere+); no effect on the CPU."""
    adam_8bit: bool = False
    """bitsandbytes 8-bit Adam/AdamW states for the method's optimizer (CUDA; extra `gpu`)."""
    offload_rewards: bool = False
    """Keep reward models on the CPU and move them to `device` only while they score (saves GPU memory)."""
    threads: int = 1
    """torch intra-op threads per process (1: with a co-tenant, 2 threads made a forward pass 80x slower)."""
    with_base: bool = True
    """Make sure the untrained `base` cell of the same (model, reward, seed) exists; run it first if not."""
    progress: bool = True
    """tqdm progress bars over training and evaluation."""
    tracking: TrackingConf = field(default_factory=TrackingConf)


def register() -> None:
    ConfigStore.instance().store(name="stepbench_schema", node=StepbenchConfig)
