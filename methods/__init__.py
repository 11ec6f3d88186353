"""How a policy is improved: one file per method, all behind one small protocol.

    import methods
    method = methods.load("ddpo", preset="toy", lr=1e-4)   # Config built, unknown keys rejected
    method.train(policy, task, budget, tracker)            # mutates the policy's adapters
    images, extra_nfe = method.generate(policy, prompts, num_steps, noise=x_T, budget=None)

Every method module defines `@dataclass class Config` (one docstring per field, paper defaults,
`search_space()` classmethod, optional `presets = {"toy": {...}}` ClassVar), a pure `loss(...)`, and a
method class `<Name>Method` whose constructor takes the Config, and which names its paper (`paper`) and every way the
row departs from it (`deviations`, the README's "row vs paper" table), and its display name in reports (`label`,
optional `short_label` for image-grid rows). Registration is by lazy import so heavy
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
    "UnknownNameError", "config_class", "deviation_rows", "deviations_markdown", "label", "load", "make_config", "names",
    "presets", "trains",
]


@runtime_checkable
class Method(Protocol):
    name: ClassVar[str]
    """Registry name ("ddpo", ...)."""
    label: ClassVar[str]
    """Display name in reports ("DDPO", ...); a class may add `short_label` for image-grid rows."""
    config: Any
    """The method's Config dataclass instance."""

    def train(self, policy, task: Task, budget: Budget, tracker: Tracker) -> None:
        """Improve `policy` (in place) on `task` within `budget`, logging through `tracker`."""

    def generate(self, policy, prompts: list[str], num_steps: int, *, noise: torch.Tensor,
                 budget: Budget | None = None) -> tuple[torch.Tensor, int]:
        """Evaluation-time sampling from the shared initial noise: (images (B,3,H,W) in [0,1], extra NFEs
        spent beyond one plain deterministic sample). Most methods use `methods.common.default_generate`."""


class _Lazy:
    """A registry entry resolving `module`.`attr` (the method class, spelled `<Name>Method`) on first use."""

    def __init__(self, module: str, attr: str):
        self.module, self.attr = module, attr

    def __call__(self) -> type:
        mod = importlib.import_module(self.module)
        if not hasattr(mod, self.attr):
            raise ImportError(f"{self.module} defines no {self.attr} (the method class)")
        return getattr(mod, self.attr)


_REGISTRY = Registry("method")
for _name, _module, _attr in [
    ("base", "methods.base", "BaseMethod"),
    ("ddpo", "methods.ddpo", "DDPOMethod"),
    ("inference_scaling", "methods.inference_scaling", "InferenceScalingMethod"),
    ("diffusion_dpo", "methods.diffusion_dpo", "DiffusionDPOMethod"),
    ("diffusion_dpo_online", "methods.diffusion_dpo", "DiffusionDPOOnlineMethod"),
    ("pso", "methods.pso", "PSOMethod"),
    ("pso_offline", "methods.pso", "PSOOfflineMethod"),
    ("spo", "methods.spo", "SPOMethod"),
    ("spo_reward_x0", "methods.spo", "SPORewardX0Method"),
    ("sft", "methods.sft", "SFTMethod"),
    ("sdpo", "methods.sdpo", "SDPOMethod"),
    ("sdpo_t_eq_k", "methods.sdpo", "SDPOTEqKMethod"),
    ("sharpening", "methods.sharpening", "SharpeningMethod"),
    ("sharpening_sft", "methods.sharpening", "SharpeningSFTMethod"),
    ("grpo", "methods.grpo", "GRPOMethod"),
    ("nft", "methods.nft", "NFTMethod"),
]:
    _REGISTRY.register(_name, _Lazy(_module, _attr))


def names() -> list[str]:
    """Registered method names (sorted)."""
    return _REGISTRY.names()


def trains(name: str) -> bool:
    """Whether method `name` trains (base and inference scaling do not: their class says `trains = False`)."""
    return bool(getattr(method_class(name), "trains", True))


def method_class(name: str) -> type:
    """The method class registered as `name` (imports its module); UnknownNameError otherwise."""
    entry = _REGISTRY.get(name)
    return entry() if isinstance(entry, _Lazy) else entry


def label(name: str, short: bool = False) -> str:
    """Method `name`'s display name (class attribute `label`; `short_label`, when it has one, with short=True)."""
    cls = method_class(name)
    return getattr(cls, "short_label", cls.label) if short else cls.label


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


def deviation_rows(names_: list[str] | None = None) -> list[dict[str, str]]:
    """The "row vs paper" table: one dict (method, paper, deviation, reason, file) per deviation of every registered
    method (or of `names_`), read from each class's `paper` / `deviations` (methods.common.Deviation). The README
    table and the report's section are both made from it."""
    rows = []
    for name in names_ if names_ is not None else names():
        cls = method_class(name)
        for dev in getattr(cls, "deviations", ()):
            rows.append({"method": name, "paper": getattr(cls, "paper", ""), "deviation": dev.what, "reason": dev.why,
                         "file": dev.where})
    return rows


def deviations_markdown(names_: list[str] | None = None) -> str:
    """`deviation_rows` as a Markdown table (what `python -m methods.deviations` prints for the README)."""
    lines = ["| row | paper | deviation from the paper | reason | where |", "| --- | --- | --- | --- | --- |"]
    for row in deviation_rows(names_):
        cells = [row["method"], row["paper"], row["deviation"], row["reason"], f"`{row['file']}`"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def load(name: str, preset: str | None = None, **overrides) -> Method:
    """Build method `name` from its Config (defaults < preset < overrides).

    Unknown method names raise `UnknownNameError` listing the valid ones; unknown config keys raise
    ValueError naming the key and the valid fields. `preset` is reserved (no Config may have such a field).
    """
    _REGISTRY.check(name)
    config = make_config(name, preset, **overrides)
    return method_class(name)(config)
