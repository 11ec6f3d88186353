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
    splits = (first.train, first.val, first.test)
    assert all(splits), [len(s) for s in splits]  # every split non-empty
    assert not set(first.train) & set(first.val) and not set(first.train) & set(first.test)
    assert not set(first.val) & set(first.test)
    assert all(len(set(s)) == len(s) for s in splits)
    assert splits == (again.train, again.val, again.test)
    assert all(isinstance(p, str) and p == p.strip() and p for p in first.train + first.val + first.test)
    assert not hasattr(first, "eval")  # renamed: callers read .val (tuning) or .test (leaderboards)


def test_simple_animals_is_ddpos_list():
    s = prompts.load("simple-animals")
    everything = set(s.train) | set(s.val) | set(s.test)
    assert len(everything) == 45 and (len(s.train), len(s.val), len(s.test)) == (29, 7, 9)
    assert {"cat", "dog", "kangaroo", "hedgehog", "llama"} <= everything
    # the test split is the held-out split this set always had (pinned); val is carved from the rest
    assert s.test == ["monkey", "goat", "tiger", "fox", "wolf", "frog", "duck", "bee", "hedgehog"]


def test_hps_four_styles_written_for_stepbench():
    s = prompts.load("hps")
    assert (len(s.train), len(s.val), len(s.test)) == (64, 16, 20)
    assert Counter(s.category[p] for p in s.test) == {"anime": 5, "concept-art": 5, "paintings": 5, "photo": 5}
    assert Counter(s.category[p] for p in s.val) == {"anime": 4, "concept-art": 4, "paintings": 4, "photo": 4}
    assert "not copied" in s.source


def test_drawbench_has_200_prompts_in_11_categories():
    s = prompts.load("drawbench")
    counts = Counter(s.category.values())
    assert sum(counts.values()) == 200 and len(s.train) + len(s.val) + len(s.test) == 200
    assert (len(s.train), len(s.val), len(s.test)) == (119, 32, 49)
    assert counts == {"Colors": 25, "Conflicting": 10, "Counting": 19, "DALL-E": 20, "Descriptions": 20,
                      "Gary Marcus et al.": 10, "Misspellings": 10, "Positional": 20, "Rare Words": 7,
                      "Reddit": 38, "Text": 21}
    for held_out in (s.val, s.test):  # every category is in both held-out splits (Rare Words has 7 prompts)
        assert len(Counter(s.category[p] for p in held_out)) == 11
    assert "A horse riding an astronaut." in s.category and "Rbefraigerator." in s.category


def test_toy_sets_come_from_the_toy_world():
    from tasks.toy import world
    toy, hard = prompts.load("toy"), prompts.load("toy-hard")
    for split in ("train", "val", "test"):
        assert getattr(toy, split) == world.all_prompts(split)
        assert getattr(hard, split) == world.all_prompts(split, hard=True)
    assert all(" and " in p for p in hard.train + hard.val + hard.test)
    assert all(world.parse_prompt(p) for p in toy.train + toy.val + hard.test)  # every prompt is in the toy grammar


def test_split_helper_is_stratified():
    items = [f"p{i}" for i in range(12)]
    groups = ["a"] * 10 + ["b"] * 2
    train, held_out = prompts.split(items, groups, fraction=0.2, key="t")
    assert len(held_out) == 3 and sum(p in held_out for p in items[10:]) == 1
    assert train + held_out != items and sorted(train + held_out, key=items.index) == items


def test_three_way_keeps_the_old_held_out_split_as_test_and_carves_val_per_group():
    items = [f"p{i}" for i in range(30)]
    groups = ["a"] * 20 + ["b"] * 10
    train, val, test = prompts.three_way(items, groups, test_fraction=0.2, key="t")
    assert test == prompts.split(items, groups, fraction=0.2, key="t")[1]
    assert (len(train), len(val), len(test)) == (19, 5, 6)  # test 4 + 2; val round(0.2 * 16) + round(0.2 * 8)
    assert sum(p in val for p in items[20:]) == 2 and sorted(train + val + test, key=items.index) == items
    assert (train, val, test) == prompts.three_way(items, groups, test_fraction=0.2, key="t")
    assert prompts.three_way(items, groups, test_fraction=0.2, key="other")[1] != val  # seeded by key
