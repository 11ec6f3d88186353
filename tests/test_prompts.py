"""Prompt sets: contents, fixed disjoint splits, sources, errors."""

from __future__ import annotations

from collections import Counter

import pytest

from tasks import prompts
from tasks.registry import UnknownNameError

ALL = ["drawbench", "hps", "simple-animals", "toy", "toy-hard"]


def test_names_and_unknown_name():
    assert prompts.names() == ALL
    with pytest.raises(UnknownNameError) as info:
        prompts.load("parti")
    assert "unknown prompt set 'parti'" in str(info.value) and "drawbench, hps, simple-animals" in str(info.value)


@pytest.mark.parametrize("name", ALL)
def test_splits_are_disjoint_deterministic_and_sourced(name):
    first, again = prompts.load(name), prompts.load(name)
    assert first.name == name and first.source
    assert first.train and first.eval
    assert not set(first.train) & set(first.eval)
    assert len(set(first.train)) == len(first.train) and len(set(first.eval)) == len(first.eval)
    assert (first.train, first.eval) == (again.train, again.eval)
    assert all(isinstance(p, str) and p == p.strip() and p for p in first.train + first.eval)


def test_simple_animals_is_ddpos_list():
    s = prompts.load("simple-animals")
    everything = set(s.train) | set(s.eval)
    assert len(everything) == 45 and (len(s.train), len(s.eval)) == (36, 9)
    assert {"cat", "dog", "kangaroo", "hedgehog", "llama"} <= everything
    assert s.eval == ["monkey", "goat", "tiger", "fox", "wolf", "frog", "duck", "bee", "hedgehog"]  # pinned split


def test_hps_four_styles_written_for_stepbench():
    s = prompts.load("hps")
    assert (len(s.train), len(s.eval)) == (80, 20)
    assert Counter(s.category[p] for p in s.eval) == {"anime": 5, "concept-art": 5, "paintings": 5, "photo": 5}
    assert "not copied" in s.source


def test_drawbench_has_200_prompts_in_11_categories():
    s = prompts.load("drawbench")
    counts = Counter(s.category.values())
    assert sum(counts.values()) == 200 and len(s.train) + len(s.eval) == 200
    assert counts == {"Colors": 25, "Conflicting": 10, "Counting": 19, "DALL-E": 20, "Descriptions": 20,
                      "Gary Marcus et al.": 10, "Misspellings": 10, "Positional": 20, "Rare Words": 7,
                      "Reddit": 38, "Text": 21}
    assert all(counts_eval >= 1 for counts_eval in Counter(s.category[p] for p in s.eval).values())
    assert len(Counter(s.category[p] for p in s.eval)) == 11
    assert "A horse riding an astronaut." in s.category and "Rbefraigerator." in s.category


def test_toy_sets_come_from_the_toy_world():
    world = pytest.importorskip("tasks.toy.world")
    toy, hard = prompts.load("toy"), prompts.load("toy-hard")
    assert toy.train == world.all_prompts("train") and toy.eval == world.all_prompts("eval")
    assert hard.train == world.all_prompts("train", hard=True) and hard.eval == world.all_prompts("eval", hard=True)
    assert all(" and " in p for p in hard.train + hard.eval)
    assert all(world.parse_prompt(p) for p in toy.train + hard.eval)  # every prompt is in the toy grammar


def test_split_helper_is_stratified():
    items = [f"p{i}" for i in range(12)]
    groups = ["a"] * 10 + ["b"] * 2
    train, held_out = prompts.split(items, groups, eval_fraction=0.2, key="t")
    assert len(held_out) == 3 and sum(p in held_out for p in items[10:]) == 1
    assert train + held_out != items and sorted(train + held_out, key=items.index) == items
