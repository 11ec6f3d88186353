"""Reward registry: `load(name, **options) -> Reward`, `names()`.

Every reward maps (images (B, 3, H, W) float in [0, 1], B prompts) to a float32 Tensor[B], higher is
better, batched, no grad unless loaded with requires_grad=True. Each has `name`, a one-line `scale`
(units and convention, see each module's docstring for the alternatives in the literature), `device`
and `.to(device)`. Entries are lazy "module:Class" strings: importing this package imports no model
code, and transformers is imported only when a model-based reward is loaded.

    >>> from tasks import rewards
    >>> reward = rewards.load("jpeg-compressibility")
    >>> reward(images, prompts)        # Tensor[B], -kB
    >>> rewards.load("pickscore", path="/models/PickScore_v1", device="cuda")
"""

from __future__ import annotations

from typing import Any

from tasks.registry import Registry, UnknownNameError
from tasks.rewards.base import MissingWeightsError, Reward, RewardOptionError, check_options

REWARDS = Registry("reward")
for _name, _target in {
    "toy-all": "tasks.rewards.toy:ToyAll",
    "toy-mean3": "tasks.rewards.toy:ToyMean3",
    "toy-color": "tasks.rewards.toy:ToyColor",
    "toy-shape": "tasks.rewards.toy:ToyShape",
    "toy-count": "tasks.rewards.toy:ToyCount",
    "jpeg-compressibility": "tasks.rewards.jpeg:JpegCompressibility",
    "jpeg-incompressibility": "tasks.rewards.jpeg:JpegIncompressibility",
    "aesthetic": "tasks.rewards.aesthetic:AestheticReward",
    "pickscore": "tasks.rewards.pickscore:PickScoreReward",
    "hpsv2": "tasks.rewards.hpsv2:HPSv2Reward",
    "imagereward": "tasks.rewards.imagereward:ImageRewardReward",
    "clipscore": "tasks.rewards.clipscore:ClipScoreReward",
}.items():
    REWARDS.register(_name, _target)


def load(name: str, **options: Any) -> Reward:
    """Build reward `name`; unknown names raise UnknownNameError, unknown options RewardOptionError."""
    factory = REWARDS.get(name)
    check_options(name, factory, options)
    return factory(**options)


def names() -> list[str]:
    return REWARDS.names()


__all__ = ["load", "names", "Reward", "REWARDS", "UnknownNameError", "RewardOptionError", "MissingWeightsError"]
