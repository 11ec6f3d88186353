"""What every method shares: the task and compute budget it is given, the tracker it reports through,
per-prompt reward normalisation, the default evaluation sampler, config building, optimizer and
gradient-clipping helpers, and full-state checkpoints.

Conventions (binding for every method file):
- Compute is counted in NFEs *per sample*: one denoiser forward pass on one sample = 1 NFE, so sampling
  B trajectories of K steps costs B * K * policy.nfe_per_predict NFEs (CFG doubles it), and one
  forward+backward of the denoiser on one recorded transition costs policy.nfe_per_predict "grad" NFEs.
  A reward call = one image scored.
- `Budget.spend` only records; it never refuses. A method decides *before* a unit of work (an epoch, a
  round) whether the whole unit fits (`Budget.fits` / `Budget.require`), so a run never overspends.
- Methods log through the `Tracker` they are handed, with metric keys `train/<name>` and step = NFEs
  consumed so far (`budget.total_nfe`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import typing
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------
# Task, budget, tracker
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Task:
    """What a method is asked to optimise."""

    prompts: list[str]
    """Training prompts (disjoint from the evaluation prompts)."""
    reward: Any
    """A `tasks.rewards.Reward`: `reward(images (B,3,H,W) in [0,1], prompts) -> Tensor[B]`, higher is better."""
    train_steps: int
    """K: the number of denoising steps the method samples with during training."""
    seed: int
    """Seeds every random choice the method makes (prompts, noise, shuffles)."""
    device: str = "cpu"
    """Device the policy lives on; rewards are scored where the reward object lives."""


class BudgetExhausted(RuntimeError):
    """Raised by `Budget.require` when a unit of work would not fit in the remaining budget."""


class Budget:
    """Compute budget counted in NFEs (sampling + gradient) and, optionally, reward calls.

    `spend` records and never refuses; `fits` / `require` are how a method checks a whole unit of work
    (e.g. a DDPO epoch) before starting it. `max_nfe=None` means unlimited.
    """

    def __init__(self, max_nfe: int | None, max_reward_calls: int | None = None):
        if max_nfe is not None and max_nfe < 0:
            raise ValueError(f"max_nfe must be >= 0 or None, got {max_nfe}")
        if max_reward_calls is not None and max_reward_calls < 0:
            raise ValueError(f"max_reward_calls must be >= 0 or None, got {max_reward_calls}")
        self.max_nfe = max_nfe
        self.max_reward_calls = max_reward_calls
        self.sample_nfe = 0
        self.grad_nfe = 0
        self.reward_calls = 0

    def spend(self, *, sample_nfe: int = 0, grad_nfe: int = 0, reward_calls: int = 0) -> None:
        if min(sample_nfe, grad_nfe, reward_calls) < 0:
            raise ValueError("cannot spend a negative amount")
        self.sample_nfe += int(sample_nfe)
        self.grad_nfe += int(grad_nfe)
        self.reward_calls += int(reward_calls)

    @property
    def total_nfe(self) -> int:
        return self.sample_nfe + self.grad_nfe

    @property
    def remaining_nfe(self) -> float:
        return math.inf if self.max_nfe is None else self.max_nfe - self.total_nfe

    @property
    def remaining_reward_calls(self) -> float:
        return math.inf if self.max_reward_calls is None else self.max_reward_calls - self.reward_calls

    @property
    def exhausted(self) -> bool:
        return self.remaining_nfe <= 0 or self.remaining_reward_calls <= 0

    def fits(self, *, nfe: int = 0, reward_calls: int = 0) -> bool:
        """True if `nfe` more NFEs and `reward_calls` more reward calls stay within the budget."""
        return nfe <= self.remaining_nfe and reward_calls <= self.remaining_reward_calls

    def require(self, *, nfe: int = 0, reward_calls: int = 0) -> None:
        """Raise `BudgetExhausted` unless `fits(nfe=..., reward_calls=...)`."""
        if not self.fits(nfe=nfe, reward_calls=reward_calls):
            raise BudgetExhausted(
                f"needs {nfe} NFEs and {reward_calls} reward calls; remaining {self.remaining_nfe} NFEs, "
                f"{self.remaining_reward_calls} reward calls"
            )

    def as_dict(self) -> dict[str, int | None]:
        return {
            "max_nfe": self.max_nfe,
            "max_reward_calls": self.max_reward_calls,
            "sample_nfe": self.sample_nfe,
            "grad_nfe": self.grad_nfe,
            "total_nfe": self.total_nfe,
            "reward_calls": self.reward_calls,
        }

    def load_dict(self, state: dict) -> None:
        """Restore the spent counters (used when resuming); the limits stay those of this object."""
        self.sample_nfe = int(state["sample_nfe"])
        self.grad_nfe = int(state["grad_nfe"])
        self.reward_calls = int(state["reward_calls"])

    def __repr__(self) -> str:
        return f"Budget({self.as_dict()})"


@runtime_checkable
class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record scalar metrics; `step` = NFEs consumed so far."""

    def progress(self, total: int, desc: str) -> ContextManager[Callable[[int], None]]:
        """A context manager yielding `advance(n)`; trackers without a progress display may no-op."""


class NullTracker:
    """Keeps every logged metric in memory (`.records` = [(step, metrics)]); for tests and dry runs."""

    def __init__(self):
        self.records: list[tuple[int, dict[str, float]]] = []
        self.texts: dict[str, str] = {}
        self.artifacts: list[tuple[Path, str | None]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.records.append((int(step), {k: float(v) for k, v in metrics.items()}))

    @contextlib.contextmanager
    def progress(self, total: int, desc: str) -> Iterator[Callable[[int], None]]:
        yield lambda n=1: None

    def log_text(self, text: str, artifact_file: str) -> None:
        self.texts[artifact_file] = text

    def log_artifact(self, local_path: str | Path, artifact_dir: str | None = None) -> None:
        self.artifacts.append((Path(local_path), artifact_dir))

    def series(self, key: str) -> list[float]:
        """All logged values of one metric, in order."""
        return [m[key] for _, m in self.records if key in m]

    def steps(self, key: str) -> list[int]:
        return [s for s, m in self.records if key in m]


def log_text(tracker: Any, text: str, artifact_file: str) -> None:
    """Hand a text file (e.g. where a method's training pairs came from) to the tracker, which stores it as a run
    artifact; a tracker without artifacts drops it. Methods never know where results go."""
    fn = getattr(tracker, "log_text", None)
    if fn is not None:
        fn(text, artifact_file)


def log_artifact(tracker: Any, local_path: str | Path, artifact_dir: str | None = None) -> None:
    """Hand a file (e.g. a trained preference model) to the tracker to store with the run; dropped if it cannot."""
    fn = getattr(tracker, "log_artifact", None)
    if fn is not None:
        fn(local_path, artifact_dir)


def progress(tracker: Any, total: int, desc: str) -> ContextManager[Callable[[int], None]]:
    """`tracker.progress(...)` if the tracker has one, else a no-op (progress display is optional)."""
    fn = getattr(tracker, "progress", None)
    if fn is None:
        return contextlib.nullcontext(lambda n=1: None)
    return fn(total, desc)


@dataclass(frozen=True)
class Deviation:
    """One way a leaderboard row differs from the paper it is named after (the "row vs paper" table).

    Every method class carries `paper: ClassVar[str]` (the citation) and `deviations: ClassVar[tuple[Deviation, ...]]`;
    the README table and the report's section both read them (`methods.deviation_rows()`), so they cannot drift."""

    what: str
    """how the row's algorithm or setting differs from the paper's (the paper's value named)"""
    why: str
    """the reason it is kept"""
    where: str
    """the file (and field) that holds it"""


# ----------------------------------------------------------------------------------------------------------
# Reward normalisation (spec ddpo-sdpo-sharpening-search.md §1.5, §2.3)
# ----------------------------------------------------------------------------------------------------------

STD_EPS = 1e-6
"""Added to the population std before dividing (DDPO / SDPO stat trackers)."""


class PerPromptStatTracker:
    """Per-prompt FIFO reward buffers that persist across epochs (DDPO's stat tracker, spec §1.5).

    For each unique prompt of the batch, this batch's rewards are appended to its buffer first; then if
    the buffer holds fewer than `min_count` values the batch is normalised with the mean/std of *all*
    rewards of the current batch, else with the buffer's mean/std. std = population std + 1e-6.
    Example: buffer [1, 2, 3, 4] (min_count <= 4), value 4 -> (4 - 2.5) / 1.1180 = 1.3416.
    """

    def __init__(self, buffer_size: int, min_count: int):
        if buffer_size < 1 or min_count < 0:
            raise ValueError(f"need buffer_size >= 1 and min_count >= 0, got {buffer_size}, {min_count}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        """Advantages (float32, same shape as `rewards`) for this batch; updates the buffers."""
        values = torch.as_tensor(rewards, dtype=torch.float64).detach().cpu().reshape(-1)
        if len(prompts) != values.numel():
            raise ValueError(f"{len(prompts)} prompts but {values.numel()} rewards")
        advantages = torch.empty_like(values)
        batch_mean, batch_std = values.mean(), values.std(unbiased=False) + STD_EPS
        for prompt in dict.fromkeys(prompts):  # unique, in first-seen order
            rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[rows].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                stored = torch.tensor(list(buffer), dtype=torch.float64)
                mean, std = stored.mean(), stored.std(unbiased=False) + STD_EPS
            advantages[rows] = (values[rows] - mean) / std
        return advantages.to(torch.float32).reshape(torch.as_tensor(rewards).shape)

    def stats(self) -> dict[str, float]:
        lengths = [len(b) for b in self.buffers.values()]
        return {"tracked_prompts": float(len(lengths)), "mean_buffer_len": float(np.mean(lengths)) if lengths else 0.0}

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {p: list(b) for p, b in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = int(state["buffer_size"]), int(state["min_count"])
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state["buffers"].items()}


def group_advantages(prompts: Sequence[str], rewards: torch.Tensor, eps: float = STD_EPS) -> torch.Tensor:
    """Per-batch, per-prompt normalisation (toy recipe 1): A_i = (r_i - mean_g) / (std_g + eps) over the
    samples g of the *current batch* that share prompt i (population std). A group whose rewards are all
    equal gets advantage 0. No state is kept between batches."""
    values = torch.as_tensor(rewards, dtype=torch.float64).detach().cpu().reshape(-1)
    if len(prompts) != values.numel():
        raise ValueError(f"{len(prompts)} prompts but {values.numel()} rewards")
    advantages = torch.empty_like(values)
    for prompt in dict.fromkeys(prompts):
        rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
        group = values[rows]
        advantages[rows] = (group - group.mean()) / (group.std(unbiased=False) + eps)
    return advantages.to(torch.float32)


def batch_advantages(rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Whole-batch z-score (DDPO with per-prompt tracking off): (r - mean) / (std + 1e-8), population std."""
    values = torch.as_tensor(rewards, dtype=torch.float64).detach().cpu().reshape(-1)
    return ((values - values.mean()) / (values.std(unbiased=False) + eps)).to(torch.float32)


# ----------------------------------------------------------------------------------------------------------
# NFE accounting and evaluation-time sampling
# ----------------------------------------------------------------------------------------------------------


def sample_nfe(num_samples: int, num_steps: int, nfe_per_predict: int) -> int:
    """NFEs of sampling `num_samples` trajectories of `num_steps` denoiser calls each."""
    return int(num_samples) * int(num_steps) * int(nfe_per_predict)


def default_generate(policy, prompts: list[str], num_steps: int, *, noise: torch.Tensor,
                     budget: Budget | None = None) -> tuple[torch.Tensor, int]:
    """Evaluation sampling shared by every method that does not change it: the policy's deterministic
    sampler (eta = 0, the model's default kernel) from the given initial noise x_T.

    Returns (images (B, 3, H, W) in [0, 1], extra_nfe = 0). "Extra" NFEs are those spent beyond this plain
    sample of the same prompts; the plain sample's own NFEs are spent on `budget` when one is given.
    """
    from methods import sampling

    with torch.no_grad():
        traj = sampling.sample(policy, list(prompts), num_steps, noise=noise, eta=0.0, record=False)
    if budget is not None:
        budget.spend(sample_nfe=sample_nfe(len(prompts), num_steps, policy.nfe_per_predict))
    return traj.images, 0


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------


def build_config(config_cls: type, preset: str | None = None, **overrides) -> Any:
    """`config_cls(**preset_values, **overrides)` with loud errors.

    An unknown key raises ValueError naming it and the valid fields; an unknown preset names the presets.
    Lists given for tuple-typed defaults (YAML/Hydra) are turned into tuples.
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    values: dict[str, Any] = {}
    if preset is not None:
        presets = getattr(config_cls, "presets", {}) or {}
        if preset not in presets:
            raise ValueError(f"unknown preset {preset!r} for {config_cls.__module__}.{config_cls.__qualname__}; "
                             f"available: {', '.join(sorted(presets)) or '(none)'}")
        values.update(presets[preset])
    values.update(overrides)
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise ValueError(f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                         f"for {config_cls.__module__}.Config; valid fields: {', '.join(fields)}")
    for key, value in values.items():
        if isinstance(value, list) and isinstance(_field_default(fields[key]), tuple):
            values[key] = tuple(value)
    return config_cls(**values)


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None


def config_dict(config: Any) -> dict[str, Any]:
    """The config as a plain dict (tuples kept), for logging and checkpoint comparison."""
    return dataclasses.asdict(config)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_positive(config: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        if value is None:
            continue
        if value < 0 or (value == 0 and not allow_zero):
            raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}; got {value!r}")


# ----------------------------------------------------------------------------------------------------------
# Optimisation helpers
# ----------------------------------------------------------------------------------------------------------


def _foreach(cls: type) -> dict[str, bool]:
    """torch's multi-tensor (foreach) update, which torch picks by itself on CUDA only: on the CPU it is bit-identical
    to the per-parameter loop and faster (tests/test_perf.py; the fused kernel is faster still but changes bits, so
    it is not used). bitsandbytes' 8-bit classes (bench.accel.optimizers swaps them in) take no such flag."""
    return {"foreach": True} if cls.__module__.startswith("torch.optim") else {}


def build_optimizer(params: Sequence[torch.nn.Parameter], config: Any) -> torch.optim.Optimizer:
    """The optimizer named by `config.optimizer` ("adamw" | "adam" | "sgd") with the config's `lr`,
    `adam_beta1`, `adam_beta2`, `adam_eps`, `weight_decay` (missing fields take torch defaults; eps 1e-8)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: did the policy get LoRA adapters or full_finetune=True?")
    name = getattr(config, "optimizer", "adamw")
    lr = float(config.lr)
    weight_decay = float(getattr(config, "weight_decay", 0.0))
    if name in ("adamw", "adam"):
        betas = (float(getattr(config, "adam_beta1", 0.9)), float(getattr(config, "adam_beta2", 0.999)))
        eps = float(getattr(config, "adam_eps", 1e-8))
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **_foreach(cls))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(getattr(config, "momentum", 0.0)),
                               weight_decay=weight_decay, foreach=True)
    raise ValueError(f"unknown optimizer {name!r}; available: adamw, adam, sgd")


def clip_grad_norm(params: Sequence[torch.nn.Parameter], max_norm: float | None) -> float:
    """Clip the global gradient norm to `max_norm` (None or <= 0: measure only). Returns the norm before
    clipping (0.0 when no parameter has a gradient)."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm is None or max_norm <= 0:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch's global generators (methods still prefer explicit Generators)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch Generator seeded with `seed` on `device`."""
    return torch.Generator(device=device).manual_seed(int(seed))


# ----------------------------------------------------------------------------------------------------------
# Full-state checkpoints: adapters + optimizer + RNG + step + config (+ budget, method extras)
# ----------------------------------------------------------------------------------------------------------

CHECKPOINT_VERSION = 1


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Python, numpy and torch global RNG states plus the states of named method generators."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(_tuplify(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    for name, g in (generators or {}).items():
        if name not in state["generators"]:
            raise KeyError(f"checkpoint has no state for generator {name!r}; has {sorted(state['generators'])}")
        g.set_state(state["generators"][name])


def _tuplify(value):
    return tuple(_tuplify(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(path: str | Path, *, policy, optimizer: torch.optim.Optimizer | None, step: int, config: Any,
                    budget: Budget | None = None, generators: dict[str, torch.Generator] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a method's full training state to one file (atomically, via a temporary file).

    `step` is the method's own counter (e.g. epochs done); `extra` holds method state such as a stat
    tracker's `state_dict()`. Adapters come from `policy.adapter_state_dict()`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "version": CHECKPOINT_VERSION,
        "config": config_dict(config),
        "step": int(step),
        "adapters": {k: v.detach().cpu() for k, v in policy.adapter_state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng_state(generators),
        "budget": budget.as_dict() if budget is not None else None,
        "extra": extra or {},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def _load_tensors_only(path: str | Path) -> dict[str, Any]:
    """torch.load restricted to tensors and plain containers (weights_only=True): a checkpoint file is data, and a
    pickle that names any other callable (os.system, ...) is refused instead of run."""
    import pickle

    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: refusing to load a checkpoint that is not plain tensors and containers "
                         f"(torch.load weights_only=True: {first})") from None


def load_checkpoint(path: str | Path, *, policy, optimizer: torch.optim.Optimizer | None, config: Any,
                    budget: Budget | None = None,
                    generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Restore a state written by `save_checkpoint` into `policy`, `optimizer`, the RNGs, `generators` and
    `budget`'s counters. Refuses (ValueError) a checkpoint written with a different config, naming the keys
    that differ. Returns {"step": int, "extra": dict}."""
    state = _load_tensors_only(path)
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {state.get('version')} != {CHECKPOINT_VERSION}")
    current = config_dict(config)
    differ = sorted(k for k in set(current) | set(state["config"]) if current.get(k) != state["config"].get(k))
    if differ:
        detail = ", ".join(f"{k}: saved {state['config'].get(k)!r} vs now {current.get(k)!r}" for k in differ)
        raise ValueError(f"{path}: refusing to resume with a different config ({detail})")
    policy.load_adapter_state_dict(state["adapters"])
    if optimizer is not None:
        if state["optimizer"] is None:
            raise ValueError(f"{path}: checkpoint has no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"], generators)
    if budget is not None and state["budget"] is not None:
        budget.load_dict(state["budget"])
    return {"step": state["step"], "extra": state["extra"]}


def type_hints(config_cls: type) -> dict[str, Any]:
    """Resolved field types of a config dataclass (for the harness's structured configs)."""
    return typing.get_type_hints(config_cls)
