"""An offline preference dataset for the toy world, in the Pick-a-Pic v2 layout the preference methods read.

Each pair shows one prompt twice: the winner is a rendering of the prompt itself, the loser a rendering of a
"near miss" prompt with exactly one attribute changed (colour, shape or count of one object), and the toy
verifiers label the pair: it is kept only if the winner scores strictly higher than the loser on `reward`
(default "mean3"), so every label is what the exact verifier says, like Pick-a-Pic's human labels with no ties.

Written to disk as either
- a folder:  OUT/pairs.parquet (columns prompt, image_w, image_l, loser_prompt, score_w, score_l; image cells are
  PNG paths relative to OUT) + OUT/images/*.png;  or
- one file:  OUT.parquet with the PNG bytes in the image cells.
`methods.preference_data.OfflineDatasetPairs` reads both.

    python -m tasks.toy.preferences data/toy-prefs --pairs-per-prompt 16 --split train
"""

from __future__ import annotations

import argparse
import io
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import verify
from .world import COLORS, SHAPES, all_prompts, parse_prompt, prompt_text, render

ATTRIBUTES = ("color", "shape", "count")


def perturb(prompt: str, rng: np.random.Generator, attribute: str | None = None) -> str:
    """The prompt with exactly one attribute of one object changed (a different colour, shape or count).

    Two-object prompts keep count 1 and keep their two objects different in colour and shape (the world's
    grammar). `attribute` forces which one changes (if possible for this prompt)."""
    items = parse_prompt(prompt)
    options = [a for a in ATTRIBUTES if not (a == "count" and len(items) > 1)]
    attribute = attribute if attribute in options else options[int(rng.integers(len(options)))]
    which = int(rng.integers(len(items)))
    item, others = items[which], [it for i, it in enumerate(items) if i != which]
    if attribute == "color":
        taken = {item.color} | {o.color for o in others}
        new = replace(item, color=str(rng.choice([c for c in COLORS if c not in taken])))
    elif attribute == "shape":
        taken = {item.shape} | {o.shape for o in others}
        new = replace(item, shape=str(rng.choice([s for s in SHAPES if s not in taken])))
    else:
        new = replace(item, count=int(rng.choice([n for n in (1, 2, 3) if n != item.count])))
    items = list(items)
    items[which] = new
    return prompt_text(items)


def _score(image: np.ndarray, prompt: str, reward: str) -> float:
    return float(verify.check(image, prompt)[reward])


def make_pairs(prompts: list[str], pairs_per_prompt: int, *, seed: int = 0, reward: str = "mean3",
               max_tries: int = 10) -> list[dict]:
    """`pairs_per_prompt` verifier-labelled (winner, loser) pairs per prompt: dicts with prompt, image_w, image_l
    ((32, 32, 3) float32 in [0, 1]), loser_prompt, score_w, score_l. A candidate pair whose loser does not score
    strictly lower is redrawn (up to `max_tries` times, then skipped)."""
    if reward not in verify.KEYS:
        raise ValueError(f"unknown verifier key {reward!r}; available: {', '.join(verify.KEYS)}")
    rng = np.random.default_rng(seed)
    pairs = []
    for prompt in prompts:
        for _ in range(pairs_per_prompt):
            for _ in range(max_tries):
                image_w = render(prompt, rng)
                loser_prompt = perturb(prompt, rng)
                image_l = render(loser_prompt, rng)
                score_w, score_l = _score(image_w, prompt, reward), _score(image_l, prompt, reward)
                if score_w > score_l:
                    pairs.append(dict(prompt=prompt, image_w=image_w, image_l=image_l, loser_prompt=loser_prompt,
                                      score_w=score_w, score_l=score_l))
                    break
    return pairs


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((image * 255).round().clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_dataset(out: str | Path, *, split: str = "train", hard: bool = False, pairs_per_prompt: int = 8,
                  seed: int = 0, reward: str = "mean3", layout: str = "folder") -> Path:
    """Generate pairs for `all_prompts(split, hard)` and write them to `out` (layout "folder" or "parquet").
    Returns the path to hand to OfflineDatasetPairs (the folder, or the .parquet file)."""
    import pandas as pd

    pairs = make_pairs(all_prompts(split, hard=hard), pairs_per_prompt, seed=seed, reward=reward)
    out = Path(out)
    meta = {k: [p[k] for p in pairs] for k in ("prompt", "loser_prompt", "score_w", "score_l")}
    if layout == "parquet":
        out = out if out.suffix == ".parquet" else out.with_suffix(".parquet")
        out.parent.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame({**meta, "image_w": [_png(p["image_w"]) for p in pairs],
                              "image_l": [_png(p["image_l"]) for p in pairs]})
        frame.to_parquet(out, index=False)
        return out
    if layout != "folder":
        raise ValueError(f"layout must be 'folder' or 'parquet'; got {layout!r}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    names_w, names_l = [], []
    for i, p in enumerate(pairs):
        for image, suffix, names in ((p["image_w"], "w", names_w), (p["image_l"], "l", names_l)):
            name = f"images/{i:06d}_{suffix}.png"
            (out / name).write_bytes(_png(image))
            names.append(name)
    pd.DataFrame({**meta, "image_w": names_w, "image_l": names_l}).to_parquet(out / "pairs.parquet", index=False)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder (or .parquet file with --layout parquet)")
    parser.add_argument("--split", default="train", choices=("train", "val", "test", "all"))
    parser.add_argument("--hard", action="store_true", help="two-object prompts")
    parser.add_argument("--pairs-per-prompt", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reward", default="mean3", choices=verify.KEYS)
    parser.add_argument("--layout", default="folder", choices=("folder", "parquet"))
    args = parser.parse_args(argv)
    path = write_dataset(args.out, split=args.split, hard=args.hard, pairs_per_prompt=args.pairs_per_prompt,
                         seed=args.seed, reward=args.reward, layout=args.layout)
    print(path)


if __name__ == "__main__":
    main()
