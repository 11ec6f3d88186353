"""Verifier rewards of the procedural toy world: exact checks of colour, shape and count.

They wrap `tasks.toy.verify.score(images, prompts) -> dict[str, Tensor[B]]` (imported lazily, when a
toy reward is first called) and pick one of its keys. All are fractions in [0, 1]:
`toy-all` is 1 when colour, shape and count are all right, `toy-mean3` the fraction of the three that
are right, `toy-color` / `toy-shape` / `toy-count` the single checks. A blank image scores 0.
"""

from __future__ import annotations

import torch

from tasks.rewards.base import Reward

# The five toy rewards are five keys of one verifier pass, and the evaluation scores every batch with several of them
# (training reward + toy-mean3, toy-shape, toy-count): the last pass is kept and reused when the very same images
# (compared element-wise, so reuse is exact) and prompts come again.
_last_pass: tuple[torch.Tensor, tuple[str, ...], dict[str, torch.Tensor]] | None = None


def _verify(images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    global _last_pass
    from tasks.toy import verify  # lazy: the toy world is only needed when a toy reward is used

    images = images.detach()
    if _last_pass is not None:
        seen, seen_prompts, scores = _last_pass
        if (seen_prompts == tuple(prompts) and seen.shape == images.shape and seen.dtype == images.dtype
                and seen.device == images.device and torch.equal(seen, images)):
            return scores
    scores = verify.score(images, prompts)
    _last_pass = (images.clone(), tuple(prompts), scores)
    return scores


class ToyVerifierReward(Reward):
    """One component of the toy world's verifier; prompts must be toy-world prompts."""

    name = "toy"
    key = "all"
    scale = "fraction in [0, 1] from the toy verifier"

    def __init__(self, *, device: str | torch.device = "cpu", batch_size: int = 256):
        super().__init__(device=device, batch_size=batch_size)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return _verify(images, prompts)[self.key].clone()


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
