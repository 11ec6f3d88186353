"""Prompt sets with fixed, disjoint train/eval splits: `load(name) -> PromptSet`, `names()`.

| name           | train / eval | source |
| -------------- | ------------ | ------ |
| toy            | world's own  | `tasks.toy.world.all_prompts("train" / "eval")`, single-object prompts |
| toy-hard       | world's own  | `tasks.toy.world.all_prompts(split, hard=True)`, two-object compositions |
| simple-animals | 36 / 9       | the 45 animals of DDPO's `simple_animals.txt` (tasks/data/simple_animals.txt) |
| hps            | 80 / 20      | 100 prompts written for stepbench in the 4 HPSv2 styles (tasks/data/hps_styles.csv) |
| drawbench      | 151 / 49     | DrawBench's 200 prompts, 11 categories (tasks/data/drawbench.csv) |

File-based sets are split per category (style, DrawBench category; one group for the animals): a
seeded shuffle of each group puts round(EVAL_FRACTION * n) prompts (at least one when n >= 2) in eval,
and both lists keep the file's order. The split depends only on the file and SPLIT_SEED, so it is
identical on every machine and run. Note DDPO itself trains and evaluates on all 45 animals; here the
eval animals are held out so that evaluation measures generalisation like every other cell.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field
from pathlib import Path

from tasks.registry import Registry

DATA = Path(__file__).parent / "data"
SPLIT_SEED = 0
EVAL_FRACTION = 0.2  # simple-animals and hps; DrawBench uses DRAWBENCH_EVAL_FRACTION
DRAWBENCH_EVAL_FRACTION = 0.25


@dataclass(frozen=True)
class PromptSet:
    name: str
    train: list[str]
    eval: list[str]
    source: str
    category: dict[str, str] = field(default_factory=dict)  # prompt -> category/style, where the set has one


PROMPT_SETS = Registry("prompt set")


def names() -> list[str]:
    return PROMPT_SETS.names()


def load(name: str) -> PromptSet:
    """The prompt set `name`; unknown names raise tasks.registry.UnknownNameError listing the valid ones."""
    return PROMPT_SETS.get(name)()


# --------------------------------------------------------------------------------------------------


def split(prompts: list[str], groups: list[str] | None, *, eval_fraction: float, key: str) -> tuple[list[str], list[str]]:
    """Deterministic stratified split -> (train, eval), disjoint, each in the input order."""
    groups = groups if groups is not None else [""] * len(prompts)
    eval_index: set[int] = set()
    for group in sorted(set(groups)):
        members = [i for i, g in enumerate(groups) if g == group]
        n_eval = max(round(eval_fraction * len(members)), 1 if len(members) >= 2 else 0)
        random.Random(f"{key}/{group}/{SPLIT_SEED}").shuffle(members)
        eval_index.update(members[:n_eval])
    train = [p for i, p in enumerate(prompts) if i not in eval_index]
    held_out = [p for i, p in enumerate(prompts) if i in eval_index]
    return train, held_out


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
        "toy", world.all_prompts("train"), world.all_prompts("eval"),
        "procedural toy world: single-object prompts, split by tasks.toy.world.all_prompts('train'/'eval')",
    )


@PROMPT_SETS.register("toy-hard")
def toy_hard() -> PromptSet:
    from tasks.toy import world

    return PromptSet(
        "toy-hard", world.all_prompts("train", hard=True), world.all_prompts("eval", hard=True),
        "procedural toy world: two-object compositions, split by tasks.toy.world.all_prompts(split, hard=True); "
        "eval compositions are unseen by the base model",
    )


@PROMPT_SETS.register("simple-animals")
def simple_animals() -> PromptSet:
    prompts = _data_lines("simple_animals.txt")
    train, held_out = split(prompts, None, eval_fraction=EVAL_FRACTION, key="simple-animals")
    return PromptSet(
        "simple-animals", train, held_out,
        "DDPO (Black et al. 2023) simple_animals.txt, 45 animals, prompt = the bare word; "
        f"stepbench split: seeded, {len(held_out)} held out for eval",
    )


@PROMPT_SETS.register("hps")
def hps() -> PromptSet:
    prompts, styles = _read_csv("hps_styles.csv", "style")
    train, held_out = split(prompts, styles, eval_fraction=EVAL_FRACTION, key="hps")
    return PromptSet(
        "hps", train, held_out,
        "written for stepbench (not copied from HPD v2 / the HPSv2 benchmark): 25 prompts in each HPSv2 style "
        "(anime, concept-art, paintings, photo); split per style",
        dict(zip(prompts, styles)),
    )


@PROMPT_SETS.register("drawbench")
def drawbench() -> PromptSet:
    prompts, categories = _read_csv("drawbench.csv", "category")
    train, held_out = split(prompts, categories, eval_fraction=DRAWBENCH_EVAL_FRACTION, key="drawbench")
    return PromptSet(
        "drawbench", train, held_out,
        "DrawBench (Saharia et al. 2022, Imagen): 200 prompts in 11 categories, transcribed from public copies; "
        "split per category",
        dict(zip(prompts, categories)),
    )
