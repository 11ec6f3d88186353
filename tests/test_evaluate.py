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
    kwargs = dict(n=7, eval_seed=3, batch_size=4, grid_images=5)
    base = ev.evaluate(methods.load("base"), policy, prompts, [1, 2], reward, **kwargs)
    ddpo = ev.evaluate(methods.load("ddpo"), policy, prompts, [1, 2], reward, **kwargs)  # untrained: same weights
    for s in (1, 2):
        assert base.images[s].shape == (5, 3, 32, 32)
        assert torch.equal(base.images[s], ddpo.images[s])
    pd.testing.assert_frame_equal(base.scores, ddpo.scores)
    # rows = n x |S| x |rewards|; prompts cycle; every (sample, S, reward) once
    assert len(base.scores) == 7 * 2 * 2
    assert base.scores.groupby(["sample_idx", "S", "reward"]).size().eq(1).all()
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
                      n=4, eval_seed=0, batch_size=4)
    assert out.extra_nfe[2] == 4 * 2 * (3 - 1)       # two more candidates per image at 2 steps each
    assert out.nfe[2] == 4 * 2 * 3
    assert out.reward_calls[2] == 4 * 3


def test_summary_matches_recomputation():
    rng = np.random.default_rng(0)
    scores = pd.DataFrame({"prompt": "p", "prompt_idx": 0, "sample_idx": np.tile(np.arange(5), 4),
                           "S": np.repeat([1, 1, 4, 4], 5), "reward": np.repeat(["a", "b", "a", "b"], 5),
                           "value": rng.normal(size=20)})
    summary = ev.summarize(scores)
    assert len(summary) == 4
    row = summary[(summary.reward == "b") & (summary.S == 4)].iloc[0]
    values = scores[(scores.reward == "b") & (scores.S == 4)].value
    assert row["mean"] == pytest.approx(values.mean())
    assert row["std"] == pytest.approx(values.std(ddof=1))
    assert row["n"] == 5
    metrics = ev.summary_metrics(summary)
    assert set(metrics) == {f"eval/{r}/s{s}/{k}" for r in "ab" for s in (1, 4) for k in ("mean", "std", "n")}
    assert metrics["eval/b/s4/mean"] == pytest.approx(values.mean())
    gen = ev.step_generalization(summary, "a")
    means = summary[summary.reward == "a"]["mean"]
    assert gen["eval/a/worst_s"] == pytest.approx(means.min())
    assert gen["eval/a/mean_over_s"] == pytest.approx(means.mean())


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
