"""Verifier rewards of the procedural toy world: exact checks of colour, shape and count.

They wrap `tasks.toy.verify.score(images, prompts) -> dict[str, Tensor[B]]` (imported lazily, when a
toy reward is first called) and pick one of its keys. All are fractions in [0, 1]:
`toy-all` is 1 when colour, shape and count are all right, `toy-mean3` the fraction of the three that
are right, `toy-color` / `toy-shape` / `toy-count` the single checks. A blank image scores 0.
"""

from __future__ import annotations

import torch

from tasks.rewards.base import Reward


class ToyVerifierReward(Reward):
    """One component of the toy world's verifier; prompts must be toy-world prompts."""

    name = "toy"
    key = "all"
    scale = "fraction in [0, 1] from the toy verifier"

    def __init__(self, *, device: str | torch.device = "cpu", batch_size: int = 256):
        super().__init__(device=device, batch_size=batch_size)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from tasks.toy import verify  # lazy: the toy world is only needed when a toy reward is used

        return verify.score(images, prompts)[self.key]


class ToyAll(ToyVerifierReward):
    """1 if colour, shape and count all match the prompt, else 0."""

    name, key = "toy-all", "all"
    scale = "{0, 1}: 1 when colour, shape and count all match the prompt (toy verifier)"


class ToyMean3(ToyVerifierReward):
    """Fraction of {colour, shape, count} that match the prompt: 0, 1/3, 2/3 or 1."""

    name, key = "toy-mean3", "mean3"
    scale = "fraction in [0, 1] of colour/shape/count checks passed (toy verifier)"


class ToyColor(ToyVerifierReward):
    """Colour check of the toy verifier."""

    name, key = "toy-color", "color"
    scale = "[0, 1]: colour check of the toy verifier"


class ToyShape(ToyVerifierReward):
    """Shape check of the toy verifier."""

    name, key = "toy-shape", "shape"
    scale = "[0, 1]: shape check of the toy verifier"


class ToyCount(ToyVerifierReward):
    """Count check of the toy verifier."""

    name, key = "toy-count", "count"
    scale = "[0, 1]: count check of the toy verifier"
