"""Procedural world of coloured shapes on black, 32x32 RGB.

Prompts name one kind of object ("a red circle", "four orange squares": 8 colours x 3 shapes x 1-4 objects)
or, in the hard split, two single objects ("a red circle and a blue square"). Everything is seeded: the same
rng gives the same image. Orange and white were added (with count 4) to grow the test split to 48 prompts:
their chromaticities stay at least 0.23 from every other colour's, and the verifiers stay >= 99.8% right.
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
    "orange": (0.95, 0.42, 0.10),
    "white": (0.92, 0.92, 0.92),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
WORD_COUNTS = {v: k for k, v in COUNT_WORDS.items()}
# Half-size of an object in pixels, by how many objects share the image.
RADIUS = {1: (6.5, 9.0), 2: (5.0, 6.5), 3: (4.0, 5.0), 4: (3.8, 4.6)}
GAP = 2.0  # pixels between bounding boxes: touching objects would merge into one component
_CANDIDATES = 64  # layouts drawn at once by the rejection sampler
VOCAB = ["a", "two", "three", "four", "and", *COLORS, *SHAPES, *(s + "s" for s in SHAPES)]


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
    return [prompt_text([Item(c, s, n)]) for n in COUNT_WORDS for c in COLORS for s in SHAPES]


def _pair_prompts() -> list[str]:
    kinds = list(itertools.product(COLORS, SHAPES))
    out = []
    for (c1, s1), (c2, s2) in itertools.combinations(kinds, 2):
        if c1 != c2 and s1 != s2:  # two different kinds, distinguishable by colour AND shape
            out.append(prompt_text([Item(c1, s1, 1), Item(c2, s2, 1)]))
    return out


SPLITS = ("train", "val", "test")


def _split_of(index: int, prompt: str, hard: bool) -> str:
    if hard:  # compositions: every 3rd is a test one, every 4th of the rest a validation one
        if index % 3 == 2:
            return "test"
        return "val" if (index - index // 3) % 4 == 3 else "train"
    # one kind of object, attribute indices (c, s, n): c + s + n even -> test (half); odd and c + s a
    # multiple of 3 -> val (a sixth); the rest -> train (a third). Every colour, shape and count is in every split.
    item = parse_prompt(prompt)[0]
    c, s, n = list(COLORS).index(item.color), SHAPES.index(item.shape), item.count - 1
    if (c + s + n) % 2 == 0:
        return "test"
    return "val" if (c + s) % 3 == 0 else "train"


def all_prompts(split: str = "all", hard: bool = False) -> list[str]:
    """Prompt lists, disjoint splits "train" / "val" / "test" (or "all"), each in the grammar's order.

    Single-object prompts (96 = 8 colours x 3 shapes x counts 1-4): 32 train, 16 val, 48 test, balanced
    over colours, shapes and counts; the base model is pretrained on all of them (alignment trains on
    "train", is tuned on "val" and measured on "test", all prompts alignment never trained on).
    Hard two-object prompts (168 compositions): 84 train, 28 val, 56 test; the base model is pretrained on
    the train compositions only, so val and test compositions are unseen by every model.
    """
    if split not in ("all", *SPLITS):
        raise ValueError(f"unknown split {split!r}; available: all, {', '.join(SPLITS)}")
    prompts = _pair_prompts() if hard else _single_prompts()
    if split == "all":
        return prompts
    return [p for i, p in enumerate(prompts) if _split_of(i, p, hard) == split]


def pretraining_prompts() -> list[str]:
    """What `toy-base` learns from: every single-object prompt and the training two-object compositions."""
    return all_prompts("all") + all_prompts("train", hard=True)


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


def _placement(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Radii (n,) and centres (n, 2) of n objects whose bounding boxes stay GAP pixels apart.

    Rejection sampling, vectorised over a block of candidate layouts (four objects need ~60 draws on
    average); it never falls back to an overlapping layout, which would change the count.
    """
    lo, hi = RADIUS[n]
    for _ in range(100):
        radii = rng.uniform(lo, hi, size=(_CANDIDATES, n))
        centres = rng.uniform(radii[..., None] + 1, SIZE - radii[..., None] - 1, size=(_CANDIDATES, n, 2))
        dist = np.abs(centres[:, :, None] - centres[:, None])  # (C, n, n, 2)
        need = (radii[:, :, None] + radii[:, None] + GAP)[..., None]  # (C, n, n, 1)
        apart = (dist > need).any(axis=-1) | np.eye(n, dtype=bool)
        ok = apart.all(axis=(1, 2))
        if ok.any():
            first = int(np.argmax(ok))
            return radii[first], centres[first]
    raise RuntimeError(f"no layout of {n} objects with radii {RADIUS[n]} found")


def render(prompt: str, rng: np.random.Generator) -> np.ndarray:
    """An image (32, 32, 3) float32 in [0, 1] showing `prompt`, objects placed without overlap."""
    items = parse_prompt(prompt)
    objects = [(it.color, it.shape) for it in items for _ in range(it.count)]
    radii, centres = _placement(len(objects), rng)
    canvas = np.zeros((SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE, 3), np.float32)
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
