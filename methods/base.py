"""The untrained base model: trains nothing, samples with the shared deterministic sampler.

It is the `base` row of every leaderboard; every other method's gain is measured against it on the same
(prompt, initial noise) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from methods.common import Budget, Deviation, Task, Tracker, default_generate


@dataclass
class Config:
    """The base method has no knobs."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {"toy": {}}
    # Trains nothing: the training seed, K, budget and prompts cannot change its samples (the LoRA adapters it
    # carries start at B = 0), so a grid runs it once and every seed and K shares it (bench.grid.invariant_axes).
    invariant_to: ClassVar[tuple[str, ...]] = ("seed", "train_steps", "budget", "prompts")

    @classmethod
    def search_space(cls) -> dict[str, tuple]:
        return {}


class BaseMethod:
    """Leaves the policy untouched; `generate` is `default_generate`."""

    name: ClassVar[str] = "base"
    label: ClassVar[str] = "base (untrained)"
    short_label: ClassVar[str] = "base"
    trains: ClassVar[bool] = False
    Config = Config
    paper: ClassVar[str] = "the untrained base model"
    deviations: ClassVar[tuple[Deviation, ...]] = ()

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else Config()

    def train(self, policy, task: Task, budget: Budget, tracker: Tracker) -> None:
        return None

    def generate(self, policy, prompts: list[str], num_steps: int, *, noise: torch.Tensor,
                 budget: Budget | None = None) -> tuple[torch.Tensor, int]:
        return default_generate(policy, prompts, num_steps, noise=noise, budget=budget)
