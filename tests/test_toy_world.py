"""The toy world: grammar, renderer, verifiers and the training recipe."""

import numpy as np
import pytest
import torch

from tasks.toy import train, verify, world
from tasks.toy.pipeline import ToyPipeline, ToyTextEncoder, build_scheduler, build_unet


def test_prompt_grammar_round_trips_and_splits_are_disjoint():
    for hard in (False, True):
        prompts = world.all_prompts("all", hard=hard)
        assert len(prompts) == len(set(prompts)) == (168 if hard else 96)
        for p in prompts:
            assert world.prompt_text(world.parse_prompt(p)) == p
        train_, val, test = (world.all_prompts(split, hard=hard) for split in ("train", "val", "test"))
        assert not set(train_) & set(val) and not set(train_) & set(test) and not set(val) & set(test)
        assert sorted(train_ + val + test) == sorted(prompts)
        assert (len(train_), len(val), len(test)) == ((84, 28, 56) if hard else (32, 16, 48))
        if not hard:  # every colour, shape and count appears in every split
            for split in (train_, val, test):
                items = [world.parse_prompt(p)[0] for p in split]
                assert {it.color for it in items} == set(world.COLORS) and {it.shape for it in items} == set(world.SHAPES)
                assert {it.count for it in items} == set(world.COUNT_WORDS)
    # the base model never sees the validation or test two-object compositions
    pretraining = set(world.pretraining_prompts())
    assert not pretraining & set(world.all_prompts("test", hard=True) + world.all_prompts("val", hard=True))
    assert set(world.all_prompts("all")) <= pretraining
    with pytest.raises(ValueError, match="unknown split 'eval'; available: all, train, val, test"):
        world.all_prompts("eval")


@pytest.mark.parametrize("bad", ["a purple circle", "five red squares", "four red square", "a red circle and two blue squares"])
def test_parse_rejects_prompts_outside_the_grammar(bad):
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        world.parse_prompt(bad)


@pytest.mark.parametrize("hard", [False, True])
def test_verifiers_are_at_least_99_percent_right_on_rendered_images(hard):
    rng = np.random.default_rng(123)
    pool = world.all_prompts("all", hard=hard)
    prompts = [pool[i % len(pool)] for i in range(600)]
    images = torch.from_numpy(world.render_batch(prompts, rng, flip=True))
    scores = verify.score(images, prompts)
    for key in ("color", "shape", "count", "all"):
        assert scores[key].mean() >= 0.99, (key, scores[key].mean())


def test_blank_noise_and_wrong_images_score_low():
    prompts = ["a red circle", "two blue squares", "a green triangle and a yellow circle"] * 4
    blank = verify.score(torch.zeros(12, 3, 32, 32), prompts)
    assert blank["all"].sum() == 0 and blank["mean3"].sum() == 0
    noise = verify.score(torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(0)), prompts)
    assert noise["all"].sum() == 0
    rng = np.random.default_rng(0)
    drawn = torch.from_numpy(world.render_batch(["a red circle"] * 8, rng))
    wrong_color = verify.score(drawn, ["a blue circle"] * 8)
    assert wrong_color["color"].sum() == 0 and wrong_color["all"].sum() == 0
    assert wrong_color["shape"].mean() == 1 and wrong_color["count"].mean() == 1
    wrong_count = verify.score(drawn, ["three red circles"] * 8)
    assert wrong_count["count"].sum() == 0 and wrong_count["color"].mean() == 1
    # the grown world's neighbours: orange sits between red and yellow, white beside every colour, four beside three
    for drawn_prompt, asked in (("four orange squares", "four red squares"), ("four orange squares", "four yellow squares"),
                                ("a white triangle", "a cyan triangle"), ("two yellow circles", "two white circles")):
        images = torch.from_numpy(world.render_batch([drawn_prompt] * 8, rng))
        right = verify.score(images, [drawn_prompt] * 8)
        assert right["color"].mean() == 1 and right["count"].mean() == 1
        wrong = verify.score(images, [asked] * 8)
        assert wrong["color"].sum() == 0 and wrong["count"].mean() == 1, (drawn_prompt, asked)
    four = torch.from_numpy(world.render_batch(["four blue triangles"] * 8, rng))
    assert verify.score(four, ["three blue triangles"] * 8)["count"].sum() == 0


def test_four_objects_never_overlap():
    """Rejection sampling never falls back to an overlapping layout: four objects are four components."""
    from scipy import ndimage

    rng = np.random.default_rng(7)
    images = world.render_batch(["four white squares"] * 200, rng)
    counts = [ndimage.label(image.max(axis=0) > verify.FOREGROUND)[1] for image in images]
    assert counts == [4] * 200


def test_pipeline_round_trips_through_save_and_from_pretrained(tmp_path):
    torch.manual_seed(0)
    pipe = ToyPipeline(build_unet((16, 32, 32)), ToyTextEncoder(out_dim=64), build_scheduler())
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = pipe(["a red circle", "two cyan squares"], num_inference_steps=2, latents=z).images
    pipe.save_pretrained(tmp_path)
    again = ToyPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    after = again(["a red circle", "two cyan squares"], num_inference_steps=2, latents=z).images
    assert before.shape == (2, 3, 32, 32) and torch.equal(before, after)
    assert again.scheduler.config.timestep_spacing == "trailing"
    assert 0 <= float(after.min()) and float(after.max()) <= 1


def test_text_encoder_binds_word_order():
    enc = ToyTextEncoder(out_dim=16)
    a = enc.encode(["a red circle and a blue square"])
    b = enc.encode(["a blue circle and a red square"])
    assert not torch.allclose(a, b)


def test_measure_splits_scores_test_val_and_hard_test_with_their_sample_counts():
    torch.manual_seed(0)
    pipe = ToyPipeline(build_unet((8, 16, 16)), ToyTextEncoder(width=16, out_dim=32), build_scheduler())
    pipe.set_progress_bar_config(disable=True)
    calls = []
    original = train.measure
    try:
        train.measure = lambda p, steps, n, **kw: calls.append((list(steps), n, kw["prompts"])) or original(p, steps, n, **kw)
        out = train._measure_splits(pipe, [1], 8, 0.0, False, test_only=[2])
    finally:
        train.measure = original
    assert calls == [([1, 2], 8, world.all_prompts("test")), ([1], 4, world.all_prompts("val")),
                     ([1], 4, world.all_prompts("test", hard=True))]
    assert list(out["rewards"]) == ["1", "2"] and list(out["rewards_val"]) == ["1"] == list(out["rewards_hard"])
    assert out["splits"]["rewards_val"] == f"toy/val: {len(world.all_prompts('val'))} prompts, n=4"
    assert set(out["rewards"]["1"]) == set(verify.KEYS)


def test_base_recipe_loss_falls_in_a_few_steps():
    """40 steps of the real recipe already beat the untrained network on a held-out denoising batch."""
    recipe = train.BaseRecipe(steps=40, batch_size=16, lr=2e-3, warmup=5, channels=(16, 32, 32))
    pipe = train.train_base(recipe, progress=False)
    torch.manual_seed(0)
    untrained = ToyPipeline(build_unet((16, 32, 32)), ToyTextEncoder(out_dim=64), build_scheduler())
    prompts = world.all_prompts("all")[:16]
    x0 = torch.from_numpy(world.render_batch(prompts, np.random.default_rng(5))) * 2 - 1
    t = torch.full((16,), 500)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    a = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * x0

    def loss(p):
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(p.unet(x_t, t, class_labels=p.encode_prompt(prompts)).sample, v))

    assert loss(pipe) < 0.7 * loss(untrained)


def test_readme_toy_model_table_is_measured_json():
    """The README's toy-model table is measured.json as printed (rounded to 3 decimals): a rebuild that changes the
    weights without updating the table, or a hand edit of a number, fails here."""
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    rows = re.findall(r"^\| `(toy-base|toy-turbo)` `(all|mean3)`, (test|val) \|(.*)$",
                      (root / "README.md").read_text(encoding="utf-8"), flags=re.M)
    assert len(rows) == 6
    for model, reward, split, rest in rows:
        measured = json.loads((root / "tasks/toy/weights" / model / "measured.json").read_text())
        table = measured["rewards" if split == "test" else "rewards_val"]
        cells = [c.strip() for c in rest.split("|")][:5]
        for s, cell in zip(("1", "2", "4", "8", "50"), cells):
            if cell == "—":
                assert s not in table  # shown as a dash only where nothing was measured
                continue
            assert cell == f"{table[s][reward]:.3f}", (model, reward, split, s)
