"""How a policy is improved: one file per method, all behind one small protocol.

    import methods
    method = methods.load("ddpo", preset="toy", lr=1e-4)   # Config built, unknown keys rejected
    method.train(policy, task, budget, tracker)            # mutates the policy's adapters
    images, extra_nfe = method.generate(policy, prompts, num_steps, noise=x_T, budget=None)

Every method module defines `@dataclass class Config` (one docstring per field, paper defaults,
`search_space()` classmethod, optional `presets = {"toy": {...}}` ClassVar), a pure `loss(...)`, and a
method class `<Name>Method` whose constructor takes the Config. Registration is by lazy import so heavy
dependencies load only when a method is used.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from tasks.registry import Registry, UnknownNameError

from .common import Budget, BudgetExhausted, NullTracker, PerPromptStatTracker, Task, Tracker, build_config

__all__ = [
    "Budget", "BudgetExhausted", "Method", "NullTracker", "PerPromptStatTracker", "Task", "Tracker",
    "UnknownNameError", "config_class", "load", "make_config", "names", "presets",
]


@runtime_checkable
class Method(Protocol):
    name: ClassVar[str]
    """Registry name ("ddpo", ...)."""
    config: Any
    """The method's Config dataclass instance."""

    def train(self, policy, task: Task, budget: Budget, tracker: Tracker) -> None:
        """Improve `policy` (in place) on `task` within `budget`, logging through `tracker`."""

    def generate(self, policy, prompts: list[str], num_steps: int, *, noise: torch.Tensor,
                 budget: Budget | None = None) -> tuple[torch.Tensor, int]:
        """Evaluation-time sampling from the shared initial noise: (images (B,3,H,W) in [0,1], extra NFEs
        spent beyond one plain deterministic sample). Most methods use `methods.common.default_generate`."""


class _Lazy:
    """A registry entry resolving `module` lazily to the first attribute of `attrs` that exists.

    The contract names method classes `<Name>Method`; the bare `<Name>` is accepted too so that a file
    written to either spelling registers without edits here.
    """

    def __init__(self, module: str, *attrs: str):
        self.module, self.attrs = module, attrs

    def __call__(self) -> type:
        mod = importlib.import_module(self.module)
        for attr in self.attrs:
            if hasattr(mod, attr):
                return getattr(mod, attr)
        raise ImportError(f"{self.module} defines none of {', '.join(self.attrs)} (the method class)")


_REGISTRY = Registry("method")
for _name, _module, _attrs in [
    ("base", "methods.base", ("BaseMethod", "Base")),
    ("ddpo", "methods.ddpo", ("DDPOMethod", "DDPO")),
    ("inference_scaling", "methods.inference_scaling", ("InferenceScalingMethod", "InferenceScaling")),
    ("diffusion_dpo", "methods.diffusion_dpo", ("DiffusionDPOMethod", "DiffusionDPO")),
    ("pso", "methods.pso", ("PSOMethod", "PSO")),
    ("spo", "methods.spo", ("SPOMethod", "SPO")),
    ("spo_reward_x0", "methods.spo", ("SPORewardX0",)),
    ("sft", "methods.sft", ("SFTMethod", "SFT")),
    ("sdpo", "methods.sdpo", ("SDPOMethod", "SDPO")),
    ("sharpening", "methods.sharpening", ("SharpeningMethod", "DiffusionSharpeningMethod", "Sharpening")),
    ("sharpening_sft", "methods.sharpening", ("SharpeningSFTMethod",)),
]:
    _REGISTRY.register(_name, _Lazy(_module, *_attrs))


def names() -> list[str]:
    """Registered method names (sorted)."""
    return _REGISTRY.names()


def method_class(name: str) -> type:
    """The method class registered as `name` (imports its module); UnknownNameError otherwise."""
    entry = _REGISTRY.get(name)
    return entry() if isinstance(entry, _Lazy) else entry


def config_class(name: str) -> type:
    """The Config dataclass of method `name`: `Method.Config` if the class carries it, else the module's."""
    cls = method_class(name)
    config_cls = getattr(cls, "Config", None) or getattr(importlib.import_module(cls.__module__), "Config", None)
    if config_cls is None:
        raise ImportError(f"method {name!r} ({cls.__module__}) defines no Config dataclass")
    return config_cls


def presets(name: str) -> dict[str, dict[str, Any]]:
    """The named presets of method `name` (e.g. {"toy": {...}}); {} when it has none."""
    return dict(getattr(config_class(name), "presets", {}) or {})


def make_config(name: str, preset: str | None = None, **overrides) -> Any:
    """Method `name`'s Config: defaults, then `preset`'s values, then `overrides`. Unknown keys -> ValueError."""
    return build_config(config_class(name), preset, **overrides)


def load(name: str, preset: str | None = None, **overrides) -> Method:
    """Build method `name` from its Config (defaults < preset < overrides).

    Unknown method names raise `UnknownNameError` listing the valid ones; unknown config keys raise
    ValueError naming the key and the valid fields. `preset` is reserved (no Config may have such a field).
    """
    _REGISTRY.check(name)
    config = make_config(name, preset, **overrides)
    return method_class(name)(config)
