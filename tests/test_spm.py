"""SPO's step-aware preference model (methods/spm.py): the pairwise loss (worked values), the paper's training views
(winner and loser noised with the same eps at the same t), a ConvSPM learning a preference from x0-predictions, the
held-out accuracy gate, the train-once cache handed to the tracker, and the released-checkpoint loader on a tiny
random model of the published layout."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import RedReward, tiny_policy

import methods
from methods import spm
from methods.common import Budget, NullTracker, Task

PROMPTS = ["a red circle", "two blue squares"]


def test_pairwise_loss_worked_values():
    zero = torch.zeros(3)
    assert spm.pairwise_loss(zero, zero).item() == pytest.approx(math.log(2), abs=1e-6)
    assert spm.pairwise_loss(torch.tensor([2.0]), torch.tensor([0.0])).item() == pytest.approx(0.126928, abs=1e-6)


class _Pairs:
    """A preference set whose winner and loser latents are identical: their views must then be identical too."""

    def latent_batch(self, rows, policy, generator=None):
        g = torch.Generator().manual_seed(len(rows))
        x0 = torch.randn(len(rows), *policy.latent_shape, generator=g)
        return [PROMPTS[r % 2] for r in rows], x0, x0.clone()


def test_views_share_noise_and_t_between_winner_and_loser():
    policy = tiny_policy()
    views = spm.make_views(policy, _Pairs(), [0, 1, 2], views_per_pair=2, generator=torch.Generator().manual_seed(0))
    assert views["x0_w"].shape == (6, *policy.latent_shape) and views["t"].shape == (6,)
    assert torch.equal(views["x0_w"], views["x0_l"])  # same x0, same eps, same t -> the same x0-prediction
    assert len(set(views["t"].tolist())) > 1 and int(views["t"].max()) < 1000  # t ~ U{0..999} per view


def test_conv_spm_learns_a_preference_from_x0_predictions():
    """The rule the SPM must learn: the winner is the image whose red channel has the sign the prompt asks for."""
    g = torch.Generator().manual_seed(0)
    n = 512
    sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    base = torch.randn(n, 3, 16, 16, generator=g) * 0.3
    x_w, x_l = base.clone(), base.clone()
    x_w[:, 0] += sign[:, None, None]
    x_l[:, 0] -= sign[:, None, None]
    views = {"x0_w": x_w, "x0_l": x_l, "t": torch.randint(0, 1000, (n,), generator=g),
             "prompt": sign[:, None].repeat(1, 4)}
    train = {k: v[:384] for k, v in views.items()}
    held = {k: v[384:] for k, v in views.items()}
    settings = spm.SPMSettings(epochs=15, batch_size=64, lr=3e-3, width=8)
    model, history = spm.fit(train, settings, latent_channels=3, generator=g)
    assert history[-1] < 0.5 * history[0]
    acc = spm.pairwise_accuracy(model, held)
    assert acc["all"] > 0.9 and acc["n"] == 128.0 and {"t0-250", "t750-1000"} <= set(acc)
    swapped = spm.pairwise_accuracy(model, {**held, "x0_w": held["x0_l"], "x0_l": held["x0_w"]})
    assert swapped["all"] == pytest.approx(1 - acc["all"])


def test_accuracy_gate_refuses_an_spm_at_chance():
    info = {"heldout_accuracy": {"all": 0.53, "n": 200.0}, "train_accuracy": {"all": 0.99}, "source": "test pairs"}
    with pytest.raises(ValueError, match=r"refuses its SPM: held-out pairwise accuracy 0.530 .* not above chance"):
        spm.check_accuracy(info, 0.05)
    spm.check_accuracy({**info, "heldout_accuracy": {"all": 0.56, "n": 200.0}}, 0.05)


def test_train_spm_holds_out_prompts_and_records_its_source():
    policy = tiny_policy()
    prompts = [f"{n} {c} {s}" for n in ("a", "two") for c in ("red", "blue") for s in ("circle", "square")]
    settings = spm.SPMSettings(samples_per_prompt=3, views_per_pair=2, epochs=2, width=8, sample_steps=2)
    model, info = spm.train_spm(policy, prompts, RedReward(), settings)
    assert info["heldout_prompts"] == 1 and info["pairs_heldout"] == 3 and info["pairs_train"] == 7 * 3
    assert info["heldout_accuracy"]["n"] == 3 * 2 and 0.0 <= info["heldout_accuracy"]["all"] <= 1.0
    assert info["sample_nfe"] == 8 * 3 * 2 and info["reward_calls"] == 8 * 3 and info["x0_nfe"] == 2 * (21 + 3) * 2
    assert "base samples: 3 per prompt x 8 training prompts" in info["source"]


def _saved_spm(path, accuracy):
    model = spm.ConvSPM(3, 8, width=8)
    info = {"heldout_accuracy": {"all": accuracy, "n": 64.0}, "train_accuracy": {"all": 0.9}, "source": "test"}
    return model.save(path, info)


def test_spo_trains_its_spm_once_per_model_and_reward_and_hands_it_to_the_tracker(tmp_path, monkeypatch):
    calls = []

    def fake_train(policy, prompts, reward, settings):
        calls.append(reward.name)
        model = spm.ConvSPM(policy.latent_shape[0], 8, width=8)
        return model, {"heldout_accuracy": {"all": 0.8, "n": 64.0, "t0-250": 0.9}, "train_accuracy": {"all": 0.95},
                       "source": "fake"}

    monkeypatch.setattr(spm, "train_spm", fake_train)
    policy = tiny_policy()
    task = Task(PROMPTS, RedReward(), train_steps=3, seed=0)
    for seed in (0, 1):  # two cells of the same (model, reward): one training
        tracker = NullTracker()
        method = methods.load("spo", spm_cache_dir=str(tmp_path / "cache"))
        model = method.load_spm(policy, Task(PROMPTS, RedReward(), 3, seed), tracker, Budget(None))
        assert isinstance(model, spm.ConvSPM)
        (artifact, folder), = tracker.artifacts
        assert folder == "spm" and artifact.exists() and artifact.parent == tmp_path / "cache"
        assert "fake" in tracker.texts["spm/spm_info.json"]
        assert tracker.series("train/spm_heldout_acc") == [0.8]
        assert tracker.series("train/spm_heldout_acc_t0-250") == [0.9]
    assert calls == ["red"]
    del task

    bad = _saved_spm(tmp_path / "bad.pt", 0.51)
    with pytest.raises(ValueError, match="refuses its SPM"):
        methods.load("spo", spm_path=str(bad)).train(policy, Task(PROMPTS, RedReward(), 3, 0), Budget(1000),
                                                     NullTracker())


def _tiny_clip_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)


@pytest.mark.parametrize("variant", ["sd15", "sdxl"])
def test_released_spm_loader_reads_the_published_layout(tmp_path, variant):
    """A tiny random model saved under the released file name with the published key layout ("model." + CLIPModel
    keys + t_embedder / adaLN_modulation modules) loads strictly and scores like the saved one; at the paper's init
    (zero modulation, gates 1) the score is the plain CLIP score, whatever t; a checkpoint of another layout fails."""
    from transformers import CLIPModel

    torch.manual_seed(0)
    config = _tiny_clip_config()
    source = spm.ReleasedSPM(config)
    keys = set(source.state_dict())
    assert {"model.t_embedder.mlp.0.weight", "model.t_embedder.mlp.2.bias",
            "model.vision_model.encoder.layers.1.adaLN_modulation.1.weight",
            "model.vision_model.adaLN_modulation.1.bias", "model.logit_scale"} <= keys
    pixels, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 64, (2, 16))
    t = torch.tensor([999, 251])
    with torch.no_grad():
        # the paper's init reproduces CLIP (PickScore) exactly
        plain = CLIPModel(config)
        plain.load_state_dict({k[len("model."):]: v for k, v in source.state_dict().items()
                               if k.startswith("model.") and "adaLN" not in k and "t_embedder" not in k})
        out = plain(input_ids=ids, pixel_values=pixels)
        assert torch.allclose(source.score_pixels(pixels, ids, t), out.logits_per_image.diagonal(), atol=1e-5)
        for p in source.parameters():  # a trained checkpoint: modulation that depends on t
            p.add_(0.05 * torch.randn_like(p))
        expected = source.score_pixels(pixels, ids, t)
        assert not torch.allclose(expected, source.score_pixels(pixels, ids, torch.tensor([0, 0])))
    path = tmp_path / spm.RELEASED_FILES[variant]
    torch.save(source.state_dict(), path)
    loaded = spm.load_released_spm(path, config)
    with torch.no_grad():
        assert torch.equal(loaded.score_pixels(pixels, ids, t), expected)
    state = source.state_dict()
    state.pop("model.vision_model.adaLN_modulation.1.bias")
    torch.save(state, tmp_path / "other.bin")
    with pytest.raises(ValueError, match=r"missing \['model.vision_model.adaLN_modulation.1.bias'\]"):
        spm.load_released_spm(tmp_path / "other.bin", config)
    with pytest.raises(FileNotFoundError, match="hf download SPO-Diffusion-Models/Step-Aware_Preference_Models"):
        spm.load_released_spm(tmp_path / "absent.bin", config)
