"""bench.evaluate: paired initial noise, the scores table, summaries, and the PNG outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from bench import evaluate as ev


@pytest.fixture(scope="module")
def policy(tiny_toy):
    from methods.policy import load_policy

    return load_policy("toy-turbo", path=str(tiny_toy), full_finetune=False)


def test_noise_depends_only_on_eval_seed_and_sample_index():
    shape = (3, 8, 8)
    full = ev.initial_noise(7, range(6), shape)
    assert torch.equal(ev.initial_noise(7, [4, 1], shape), full[[4, 1]])  # batching does not matter
    assert not torch.allclose(ev.initial_noise(8, range(6), shape), full)  # the seed does
    assert not torch.allclose(full[0], full[1])
    # another model with the same latent shape gets the same noise; a larger latent starts differently
    assert torch.equal(ev.initial_noise(7, range(2), shape), full[:2])
    assert abs(float(full.mean())) < 0.2 and abs(float(full.std()) - 1) < 0.1


def test_two_methods_see_identical_noise_and_images(policy):
    import methods
    from tasks import rewards

    prompts = ["a red circle", "two blue squares", "three green triangles"]
    reward = {"toy-mean3": rewards.load("toy-mean3"), "jpeg-compressibility": rewards.load("jpeg-compressibility")}
    kwargs = dict(split="test", n=7, eval_seed=3, batch_size=4, grid_images=5)
    base = ev.evaluate(methods.load("base"), policy, prompts, [1, 2], reward, **kwargs)
    ddpo = ev.evaluate(methods.load("ddpo"), policy, prompts, [1, 2], reward, **kwargs)  # untrained: same weights
    for s in (1, 2):
        assert base.images[s].shape == (5, 3, 32, 32)
        assert torch.equal(base.images[s], ddpo.images[s])
    pd.testing.assert_frame_equal(base.scores, ddpo.scores)
    # rows = n x |S| x |rewards|; prompts cycle; every (sample, S, reward) once
    assert len(base.scores) == 7 * 2 * 2
    assert base.scores.groupby(["sample_idx", "S", "reward"]).size().eq(1).all()
    assert list(base.scores.columns) == ev.SCORE_COLUMNS and set(base.scores.split) == {"test"}
    one = base.scores[(base.scores.S == 1) & (base.scores.reward == "toy-mean3")].sort_values("sample_idx")
    assert one.prompt_idx.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert (base.scores.prompt == [prompts[i] for i in base.scores.prompt_idx]).all()
    assert base.nfe == {1: 7, 2: 14} and base.extra_nfe == {1: 0, 2: 0}
    assert base.score_calls == 28
    # the images differ between step counts (the protocol is not degenerate)
    assert not torch.equal(base.images[1], base.images[2])


def test_inference_scaling_reports_extra_nfe(policy):
    import methods
    from tasks import rewards

    search = methods.load("inference_scaling", num_candidates=3)
    reward = rewards.load("toy-mean3")
    search.train(policy, methods.Task(prompts=["a red circle"], reward=reward, train_steps=1, seed=0),
                 methods.Budget(10), methods.NullTracker())
    out = ev.evaluate(search, policy, ["a red circle", "a blue square"], [2], {"toy-mean3": reward},
                      split="val", n=4, eval_seed=0, batch_size=4)
    assert out.extra_nfe[2] == 4 * 2 * (3 - 1)       # two more candidates per image at 2 steps each
    assert out.nfe[2] == 4 * 2 * 3
    assert out.reward_calls[2] == 4 * 3


def _fake_scores(seed: int = 0) -> pd.DataFrame:
    """Two splits (val: 3 samples, test: 5) x S in {1, 4} x rewards a, b, random values."""
    rng = np.random.default_rng(seed)
    frames = []
    for split, n in (("val", 3), ("test", 5)):
        frames.append(pd.DataFrame({"split": split, "prompt": "p", "prompt_idx": 0, "sample_idx": np.tile(np.arange(n), 4),
                                    "S": np.repeat([1, 1, 4, 4], n), "reward": np.repeat(["a", "b", "a", "b"], n),
                                    "value": rng.normal(size=4 * n)}))
    return pd.concat(frames, ignore_index=True)


def test_summary_and_metric_keys_name_the_split():
    scores = _fake_scores()
    summary = ev.summarize(scores)
    assert len(summary) == 8
    row = summary[(summary.split == "test") & (summary.reward == "b") & (summary.S == 4)].iloc[0]
    values = scores[(scores.split == "test") & (scores.reward == "b") & (scores.S == 4)].value
    assert row["mean"] == pytest.approx(values.mean())
    assert row["std"] == pytest.approx(values.std(ddof=1))
    assert row["n"] == 5
    metrics = ev.summary_metrics(summary)
    assert set(metrics) == {f"eval/{sp}/{r}/s{s}/{k}" for sp in ("val", "test") for r in "ab" for s in (1, 4)
                            for k in ("mean", "std", "n")}
    assert metrics["eval/test/b/s4/mean"] == pytest.approx(values.mean())
    assert metrics["eval/val/b/s4/n"] == 3 and metrics["eval/test/b/s4/n"] == 5
    # the curve: one key per (split, reward), one point per S (logged with step = S)
    curves = ev.curve_metrics(summary)
    assert sorted(curves) == [1, 4]
    assert set(curves[4]) == {f"eval/{sp}/{r}/mean" for sp in ("val", "test") for r in "ab"}
    assert curves[4]["eval/test/b/mean"] == pytest.approx(values.mean())
    gen = ev.step_generalization(summary, "a")
    assert set(gen) == {f"eval/{sp}/a/{k}" for sp in ("val", "test") for k in ("mean_over_s", "worst_s")}
    for split in ("val", "test"):
        means = summary[(summary.reward == "a") & (summary.split == split)]["mean"]
        assert gen[f"eval/{split}/a/worst_s"] == pytest.approx(means.min())
        assert gen[f"eval/{split}/a/mean_over_s"] == pytest.approx(means.mean())


def test_gains_over_base_pair_samples_within_each_split():
    base = _fake_scores(0)
    trained = base.copy()
    trained["value"] = base["value"] + np.where(base.split == "val", 0.25, -0.5) + 0.01 * base.sample_idx
    only_val_base = base[base.split == "val"]
    gains = ev.gains_over_base(trained, only_val_base)
    # the base evaluated val only: no test gain is made up
    assert gains and all(k.startswith("eval/val/") for k in gains)
    gains = ev.gains_over_base(trained, base)
    assert gains["eval/val/a/s1/gain_over_base"] == pytest.approx(0.25 + 0.01 * np.mean([0, 1, 2]))
    assert gains["eval/test/b/s4/gain_over_base"] == pytest.approx(-0.5 + 0.01 * np.mean(range(5)))
    assert gains["eval/test/b/s4/gain_se"] == pytest.approx(0.01 * np.std(range(5), ddof=1) / 5 ** 0.5)


def test_val_and_test_noise_are_disjoint(policy):
    """The two splits draw x_T from different seeds: no validation noise equals any test noise, and the same
    prompt under the two seeds gives different images."""
    import methods
    from tasks import rewards

    shape = tuple(policy.latent_shape)
    val, test = ev.initial_noise(1, range(16), shape), ev.initial_noise(0, range(16), shape)
    distance = torch.cdist(val.flatten(1), test.flatten(1))
    assert float(distance.min()) > 1.0  # no shared row (standard normal rows differ by ~sqrt(2 * dim))
    reward = {"toy-all": rewards.load("toy-all")}
    kwargs = dict(n=4, batch_size=4, grid_images=4)
    on_val = ev.evaluate(methods.load("base"), policy, ["a red circle"], [1], reward, split="val", eval_seed=1,
                         **kwargs)
    on_test = ev.evaluate(methods.load("base"), policy, ["a red circle"], [1], reward, split="test", eval_seed=0,
                          **kwargs)
    assert set(on_val.scores.split) == {"val"} and set(on_test.scores.split) == {"test"}
    assert not any(torch.equal(a, b) for a in on_val.images[1] for b in on_test.images[1])


def test_sample_arrays_match_the_scores(policy, tmp_path):
    """The npz a report reads holds the first grid_images samples of a split: their uint8 pixels, prompt and
    indices are those of the scores rows with the same sample_idx."""
    import methods
    from tasks import rewards

    prompts = ["a red circle", "two blue squares", "three green triangles"]
    reward = rewards.load("toy-all")
    result = ev.evaluate(methods.load("base"), policy, prompts, [1, 2], {"toy-all": reward}, split="test", n=7,
                         eval_seed=0, batch_size=4, grid_images=5)
    arrays = ev.sample_arrays(result, 2, prompts)
    path = ev.save_samples(arrays, tmp_path / "test" / "samples_s2.npz")
    with np.load(path, allow_pickle=False) as loaded:
        data = {k: loaded[k] for k in loaded.files}
    assert set(data) == {"images", "prompt", "prompt_idx", "sample_idx"}
    assert data["images"].shape == (5, 32, 32, 3) and data["images"].dtype == np.uint8
    rows = result.scores[result.scores.S == 2].set_index("sample_idx").loc[data["sample_idx"]]
    assert data["sample_idx"].tolist() == [0, 1, 2, 3, 4]
    assert data["prompt_idx"].tolist() == rows.prompt_idx.tolist() == [0, 1, 2, 0, 1]
    assert data["prompt"].tolist() == rows.prompt.tolist()
    expected = (result.images[2] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(data["images"], expected)
    # the stored pixels score (up to 8-bit rounding) what the scores table says
    rescored = reward(torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 255, data["prompt"].tolist())
    assert np.allclose(rescored.numpy(), rows.value.to_numpy(), atol=0.05)


def test_grid_and_curve_pngs(tmp_path):
    from PIL import Image

    images = torch.rand(10, 3, 32, 32)
    png = ev.save_grid(images, [f"prompt {i}" for i in range(10)], list(np.linspace(0, 1, 10)), tmp_path / "g.png",
                       title="t", reward="toy-all", columns=4, scale=3)
    width, height = Image.open(png).size
    assert width == 4 * 96 and height == 16 + 3 * (96 + 26)
    curve = ev.save_training_curve([(10, {"train/reward_mean": 0.1, "train/loss": 1.0}),
                                    (20, {"train/reward_mean": 0.2, "train/loss": 0.5})], tmp_path / "c.png")
    assert curve is not None and Image.open(curve).size[0] > 100
    assert ev.save_training_curve([], tmp_path / "none.png") is None
