"""Prompt sets with fixed, disjoint train/val/test splits: `load(name) -> PromptSet`, `names()`.

Alignment trains on `train`; anything that tunes or selects (sweeps, preset probes) reads `val`; leaderboards,
claims and the README read `test`.

| name           | train / val / test | source |
| -------------- | ------------------ | ------ |
| toy            | world's own        | `tasks.toy.world.all_prompts(split)`, single-object prompts |
| toy-hard       | world's own        | `tasks.toy.world.all_prompts(split, hard=True)`, two-object compositions |
| simple-animals | 29 / 7 / 9         | the 45 animals of DDPO's `simple_animals.txt` (tasks/data/simple_animals.txt) |
| hps            | 64 / 16 / 20       | 100 prompts written for stepbench in the 4 HPSv2 styles (tasks/data/hps_styles.csv) |
| drawbench      | 119 / 32 / 49      | DrawBench's 200 prompts, 11 categories (tasks/data/drawbench.csv) |

File-based sets are split per category (style, DrawBench category; one group for the animals): a
seeded shuffle of each group puts round(TEST_FRACTION * n) prompts (at least one when n >= 2) in test,
then a second seeded shuffle of each group's remaining prompts puts round(VAL_FRACTION * n) of them in
val; every list keeps the file's order. The test split is the held-out split these sets always had. The
splits depend only on the file and SPLIT_SEED, so they are identical on every machine and run. Note DDPO
itself trains and evaluates on all 45 animals; here the test animals are held out so that evaluation
measures generalisation like every other cell.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field
from pathlib import Path

from tasks.registry import Registry

DATA = Path(__file__).parent / "data"
SPLIT_SEED = 0
TEST_FRACTION = 0.2  # simple-animals and hps; DrawBench uses DRAWBENCH_TEST_FRACTION
DRAWBENCH_TEST_FRACTION = 0.25
VAL_FRACTION = 0.2  # of each group's prompts left after the test split


@dataclass(frozen=True)
class PromptSet:
    name: str
    train: list[str]
    val: list[str]
    test: list[str]
    source: str
    category: dict[str, str] = field(default_factory=dict)  # prompt -> category/style, where the set has one


PROMPT_SETS = Registry("prompt set")


def names() -> list[str]:
    return PROMPT_SETS.names()


def load(name: str) -> PromptSet:
    """The prompt set `name`; unknown names raise tasks.registry.UnknownNameError listing the valid ones."""
    return PROMPT_SETS.get(name)()


# --------------------------------------------------------------------------------------------------


def split(prompts: list[str], groups: list[str] | None, *, fraction: float, key: str) -> tuple[list[str], list[str]]:
    """Deterministic stratified split -> (kept, held_out), disjoint, each in the input order; held_out takes
    round(fraction * n) prompts of every group of n (at least one when n >= 2)."""
    groups = groups if groups is not None else [""] * len(prompts)
    held_index: set[int] = set()
    for group in sorted(set(groups)):
        members = [i for i, g in enumerate(groups) if g == group]
        n_held = max(round(fraction * len(members)), 1 if len(members) >= 2 else 0)
        random.Random(f"{key}/{group}/{SPLIT_SEED}").shuffle(members)
        held_index.update(members[:n_held])
    kept = [p for i, p in enumerate(prompts) if i not in held_index]
    held_out = [p for i, p in enumerate(prompts) if i in held_index]
    return kept, held_out


def three_way(prompts: list[str], groups: list[str] | None, *, test_fraction: float,
              key: str) -> tuple[list[str], list[str], list[str]]:
    """(train, val, test): test as `split(..., fraction=test_fraction)`, then val carved from the rest per group."""
    group_of = dict(zip(prompts, groups)) if groups is not None else None
    rest, test = split(prompts, groups, fraction=test_fraction, key=key)
    train, val = split(rest, [group_of[p] for p in rest] if group_of else None, fraction=VAL_FRACTION,
                       key=f"{key}/val")
    return train, val, test


def _data_lines(filename: str) -> list[str]:
    """Lines of a data file without '#' header comments and blank lines."""
    text = (DATA / filename).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _read_csv(filename: str, column: str) -> tuple[list[str], list[str]]:
    rows = list(csv.DictReader(_data_lines(filename)))
    return [row["prompt"] for row in rows], [row[column] for row in rows]


@PROMPT_SETS.register("toy")
def toy() -> PromptSet:
    from tasks.toy import world  # lazy: the toy world is only imported when its prompts are asked for

    return PromptSet(
        "toy", *(world.all_prompts(split) for split in world.SPLITS),
        "procedural toy world: single-object prompts, split by tasks.toy.world.all_prompts('train'/'val'/'test')",
    )


@PROMPT_SETS.register("toy-hard")
def toy_hard() -> PromptSet:
    from tasks.toy import world

    return PromptSet(
        "toy-hard", *(world.all_prompts(split, hard=True) for split in world.SPLITS),
        "procedural toy world: two-object compositions, split by tasks.toy.world.all_prompts(split, hard=True); "
        "test compositions are unseen by the base model",
    )


@PROMPT_SETS.register("simple-animals")
def simple_animals() -> PromptSet:
    prompts = _data_lines("simple_animals.txt")
    train, val, test = three_way(prompts, None, test_fraction=TEST_FRACTION, key="simple-animals")
    return PromptSet(
        "simple-animals", train, val, test,
        "DDPO (Black et al. 2023) simple_animals.txt, 45 animals, prompt = the bare word; "
        f"stepbench split: seeded, {len(test)} held out for test, {len(val)} for val",
    )


@PROMPT_SETS.register("hps")
def hps() -> PromptSet:
    prompts, styles = _read_csv("hps_styles.csv", "style")
    train, val, test = three_way(prompts, styles, test_fraction=TEST_FRACTION, key="hps")
    return PromptSet(
        "hps", train, val, test,
        "written for stepbench (not copied from HPD v2 / the HPSv2 benchmark): 25 prompts in each HPSv2 style "
        "(anime, concept-art, paintings, photo); split per style",
        dict(zip(prompts, styles)),
    )


@PROMPT_SETS.register("drawbench")
def drawbench() -> PromptSet:
    prompts, categories = _read_csv("drawbench.csv", "category")
    train, val, test = three_way(prompts, categories, test_fraction=DRAWBENCH_TEST_FRACTION, key="drawbench")
    return PromptSet(
        "drawbench", train, val, test,
        "DrawBench (Saharia et al. 2022, Imagen): 200 prompts in 11 categories, transcribed from public copies; "
        "split per category",
        dict(zip(prompts, categories)),
    )
