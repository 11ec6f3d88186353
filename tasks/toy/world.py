"""Procedural world of coloured shapes on black, 32x32 RGB.

Prompts name one kind of object ("a red circle", "three blue triangles") or, in the hard split, two
single objects ("a red circle and a blue square"). Everything is seeded: the same rng gives the same image.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

SIZE = 32
SUPERSAMPLE = 2
# Saturated colours whose chromaticities are far apart, so the verifier separates them exactly.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.12, 0.80, 0.15),
    "blue": (0.15, 0.30, 0.98),
    "yellow": (0.95, 0.88, 0.10),
    "magenta": (0.90, 0.12, 0.88),
    "cyan": (0.10, 0.85, 0.90),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
WORD_COUNTS = {v: k for k, v in COUNT_WORDS.items()}
# Half-size of an object in pixels, by how many objects share the image.
RADIUS = {1: (6.5, 9.0), 2: (5.0, 6.5), 3: (4.0, 5.0)}
GAP = 2.0  # pixels between bounding boxes: touching objects would merge into one component
VOCAB = ["a", "two", "three", "and", *COLORS, *SHAPES, *(s + "s" for s in SHAPES)]


@dataclass(frozen=True)
class Item:
    color: str
    shape: str
    count: int


def prompt_text(items: list[Item] | tuple[Item, ...]) -> str:
    parts = []
    for it in items:
        noun = it.shape if it.count == 1 else it.shape + "s"
        parts.append(f"{COUNT_WORDS[it.count]} {it.color} {noun}")
    return " and ".join(parts)


def parse_prompt(text: str) -> list[Item]:
    """Inverse of `prompt_text`; raises ValueError naming the prompt if it is not of the grammar."""
    items = []
    for part in text.strip().lower().split(" and "):
        words = part.split()
        if len(words) != 3 or words[0] not in WORD_COUNTS or words[1] not in COLORS:
            raise ValueError(f"not a toy-world prompt: {text!r}")
        count, noun = WORD_COUNTS[words[0]], words[2]
        shape = noun if count == 1 else noun[:-1]
        if shape not in SHAPES or (count > 1) != noun.endswith("s"):
            raise ValueError(f"not a toy-world prompt: {text!r}")
        items.append(Item(words[1], shape, count))
    if len(items) > 2 or (len(items) == 2 and any(it.count != 1 for it in items)):
        raise ValueError(f"not a toy-world prompt: {text!r}")
    return items


def _single_prompts() -> list[str]:
    return [prompt_text([Item(c, s, n)]) for n in (1, 2, 3) for c in COLORS for s in SHAPES]


def _pair_prompts() -> list[str]:
    kinds = list(itertools.product(COLORS, SHAPES))
    out = []
    for (c1, s1), (c2, s2) in itertools.combinations(kinds, 2):
        if c1 != c2 and s1 != s2:  # two different kinds, distinguishable by colour AND shape
            out.append(prompt_text([Item(c1, s1, 1), Item(c2, s2, 1)]))
    return out


SPLITS = ("train", "val", "test")


def _split_of(index: int, hard: bool) -> str:
    # test: every 4th single-object prompt, every 3rd composition; val: every 4th of the rest
    every = 3 if hard else 4
    if index % every == every - 1:
        return "test"
    return "val" if (index - index // every) % 4 == 3 else "train"


def all_prompts(split: str = "all", hard: bool = False) -> list[str]:
    """Prompt lists, disjoint splits "train" / "val" / "test" (or "all"), each in the grammar's order.

    Single-object prompts (54): 31 train, 10 val, 13 test; the base model is pretrained on all of them
    (alignment trains on "train", is tuned on "val" and measured on "test", prompts it never trained on).
    Hard two-object prompts (90): 45 train, 15 val, 30 test; the test compositions are unseen by the base.
    """
    if split not in ("all", *SPLITS):
        raise ValueError(f"unknown split {split!r}; available: all, {', '.join(SPLITS)}")
    prompts = _pair_prompts() if hard else _single_prompts()
    if split == "all":
        return prompts
    return [p for i, p in enumerate(prompts) if _split_of(i, hard) == split]


def pretraining_prompts() -> list[str]:
    """What `toy-base` learns from: every single-object prompt and the non-test two-object compositions."""
    return all_prompts("all") + all_prompts("train", hard=True) + all_prompts("val", hard=True)


def _shape_mask(shape: str, cx: float, cy: float, r: float, grid: np.ndarray) -> np.ndarray:
    y, x = grid
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    if shape == "square":
        h = r * 0.86  # same area as the circle of radius r, roughly
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    # upright isosceles triangle: apex at the top, base at the bottom
    top, bottom = cy - r, cy + r * 0.85
    frac = (y - top) / (bottom - top)
    return (frac >= 0) & (frac <= 1) & (np.abs(x - cx) <= frac * r * 1.05)


_GRID = np.mgrid[0 : SIZE * SUPERSAMPLE, 0 : SIZE * SUPERSAMPLE].astype(np.float32) / SUPERSAMPLE + 0.25


def render(prompt: str, rng: np.random.Generator) -> np.ndarray:
    """An image (32, 32, 3) float32 in [0, 1] showing `prompt`, objects placed without overlap."""
    items = parse_prompt(prompt)
    objects = [(it.color, it.shape) for it in items for _ in range(it.count)]
    n = len(objects)
    lo, hi = RADIUS[min(n, 3)]
    canvas = np.zeros((SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE, 3), np.float32)
    for _ in range(200):
        radii = rng.uniform(lo, hi, size=n)
        centres = [rng.uniform(r + 1, SIZE - r - 1, size=2) for r in radii]
        ok = all(
            np.any(np.abs(centres[i] - centres[j]) > radii[i] + radii[j] + GAP)
            for i in range(n)
            for j in range(i)
        )
        if ok:
            break
    for (color, shape), r, (cx, cy) in zip(objects, radii, centres):
        mask = _shape_mask(shape, cx, cy, r, _GRID)
        canvas[mask] = COLORS[color]
    img = canvas.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return img


def render_batch(prompts: list[str], rng: np.random.Generator, flip: bool = False) -> np.ndarray:
    """(B, 3, 32, 32) float32 in [0, 1]; `flip` applies random horizontal flips (a valid augmentation)."""
    out = np.stack([render(p, rng) for p in prompts]).transpose(0, 3, 1, 2)
    if flip:
        which = rng.random(len(prompts)) < 0.5
        out[which] = out[which][..., ::-1]
    return np.ascontiguousarray(out)
