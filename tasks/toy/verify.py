"""Exact, weight-free verifiers of the toy world: does an image show what its prompt says?

Foreground = pixels whose brightest channel exceeds a threshold; objects = 4-connected components
(tiny specks dropped); colour = nearest palette chromaticity; shape = nearest template in (bounding-box
fill, top-half / bottom-half mass) space; count = number of objects. A blank image scores 0 everywhere.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from scipy import ndimage

from .world import COLORS, SHAPES, parse_prompt

FOREGROUND = 0.35  # brightest-channel threshold (palette colours are >= 0.8, background 0)
MIN_PIXELS = 5  # components smaller than this are noise specks, not objects
_PALETTE = np.array([np.array(c) / sum(c) for c in COLORS.values()])  # (6, 3) chromaticities
_COLOR_NAMES = list(COLORS)
# Shape templates in feature space: (bounding-box fill, top/bottom mass ratio).
_TEMPLATES = {"circle": (0.78, 1.0), "square": (0.97, 1.0), "triangle": (0.52, 0.40)}


def objects(image: np.ndarray) -> list[tuple[str, str]]:
    """(colour, shape) of every object in one (H, W, 3) image in [0, 1]."""
    mask = image.max(axis=2) > FOREGROUND
    labels, n = ndimage.label(mask)
    found = []
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        comp = labels[box] == i
        area = int(comp.sum())
        if area < MIN_PIXELS:
            continue
        rgb = image[box][comp].mean(axis=0)
        chroma = rgb / max(rgb.sum(), 1e-6)
        color = _COLOR_NAMES[int(np.argmin(((_PALETTE - chroma) ** 2).sum(axis=1)))]
        h, w = comp.shape
        fill = area / (h * w)
        half = h // 2
        top, bottom = comp[:half].sum(), comp[h - half :].sum()
        ratio = top / max(bottom, 1)
        shape = min(
            SHAPES,
            key=lambda s: (fill - _TEMPLATES[s][0]) ** 2 + 0.5 * (ratio - _TEMPLATES[s][1]) ** 2,
        )
        found.append((color, shape))
    return found


def check(image: np.ndarray, prompt: str) -> dict[str, float]:
    """Per-attribute correctness (1.0 / 0.0) of one image against its prompt."""
    items = parse_prompt(prompt)
    found = objects(image)
    want = [(it.color, it.shape) for it in items for _ in range(it.count)]
    count_ok = len(found) == len(want)
    color_ok = bool(found) and Counter(c for c, _ in found) == Counter(c for c, _ in want)
    shape_ok = bool(found) and Counter(s for _, s in found) == Counter(s for _, s in want)
    if len(items) == 1:  # one kind: every object must be of that colour and shape, whatever the count
        color_ok = bool(found) and all(c == items[0].color for c, _ in found)
        shape_ok = bool(found) and all(s == items[0].shape for _, s in found)
    all_ok = count_ok and Counter(found) == Counter(want)
    out = {"color": color_ok, "shape": shape_ok, "count": count_ok, "all": all_ok}
    out = {k: float(v) for k, v in out.items()}
    out["mean3"] = (out["color"] + out["shape"] + out["count"]) / 3.0
    return out


KEYS = ("all", "mean3", "color", "shape", "count")


def score(images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Verifier scores of a batch: images (B, 3, H, W) in [0, 1] -> {key: Tensor[B] float32}."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    arr = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    rows = [check(a, p) for a, p in zip(arr, prompts)]
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.float32) for k in KEYS}
