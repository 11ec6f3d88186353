"""Rewards: registry, weight-free rewards, and every model reward on a tiny random-weight model saved in
the published checkpoint layout. Random weights mean no semantics: these tests check the maths
(scale transforms, key conversions against reference forwards written here from the original
architectures), shapes, determinism, gradients, devices and error messages."""

from __future__ import annotations

import io
import json
import math
import socket
import string

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tasks import rewards
from tasks.registry import UnknownNameError
from tasks.rewards.base import CLIP_MEAN, CLIP_STD, MissingWeightsError, RewardOptionError, clip_preprocess

PROMPTS = ["a red cat", "two dogs", "blue sky", "an old tree"]


def images(seed: int = 0, n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Independent CLIP input for images already at the model resolution: uint8 rounding + mean/std."""
    x = (x.clamp(0, 1) * 255).round() / 255
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any socket connection attempt fails the test: rewards must never reach a hub here."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --------------------------------------------------------------------------------------------------
# Registry


def test_names_and_unknown_name():
    expected = {"toy-all", "toy-mean3", "toy-color", "toy-shape", "toy-count", "jpeg-compressibility",
                "jpeg-incompressibility", "aesthetic", "pickscore", "hpsv2", "imagereward", "clipscore"}
    assert set(rewards.names()) == expected
    with pytest.raises(UnknownNameError) as info:
        rewards.load("aesthetics")
    message = str(info.value)
    assert "unknown reward 'aesthetics'" in message
    assert all(name in message for name in expected)


def test_unknown_option_names_it_and_the_valid_ones():
    with pytest.raises(RewardOptionError) as info:
        rewards.load("jpeg-compressibility", quality=90)
    assert "'quality'" in str(info.value) and "device, batch_size" in str(info.value)
    with pytest.raises(RewardOptionError) as info:
        rewards.load("pickscore", checkpoint="x")  # validated before anything is loaded
    assert "'checkpoint'" in str(info.value) and "processor_path" in str(info.value)


def test_bad_inputs_raise():
    reward = rewards.load("jpeg-compressibility")
    with pytest.raises(ValueError, match="images but 1 prompts"):
        reward(images(n=2), ["one"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        reward(torch.rand(2, 1, 8, 8), ["a", "b"])
    assert reward(torch.rand(0, 3, 8, 8), []).shape == (0,)


# --------------------------------------------------------------------------------------------------
# JPEG


def independent_jpeg_kb(image: torch.Tensor) -> float:
    array = np.clip(np.rint(image.permute(1, 2, 0).numpy().astype(np.float64) * 255), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def test_jpeg_values_in_kb_and_blank_beats_noise():
    batch = torch.cat([torch.zeros(1, 3, 32, 32), torch.full((1, 3, 32, 32), 0.5), images(1, n=2)])
    compress = rewards.load("jpeg-compressibility")(batch, [""] * 4)
    incompress = rewards.load("jpeg-incompressibility", batch_size=3)(batch, [""] * 4)
    expected = torch.tensor([independent_jpeg_kb(img) for img in batch])
    assert compress.dtype == torch.float32 and compress.shape == (4,)
    torch.testing.assert_close(incompress, expected)
    torch.testing.assert_close(compress, -expected)
    assert compress[0] > compress[2] + 1.0  # blank is much more compressible than noise (kB scale)
    assert rewards.load("jpeg-compressibility").scale.startswith("-kB")


# --------------------------------------------------------------------------------------------------
# Toy verifier rewards


@pytest.mark.parametrize("name,key", [("toy-all", "all"), ("toy-mean3", "mean3"), ("toy-color", "color"),
                                      ("toy-shape", "shape"), ("toy-count", "count")])
def test_toy_rewards_wrap_the_verifier(name, key):
    from tasks.toy import verify, world
    prompts = world.all_prompts("train")[:3]
    rng = np.random.default_rng(0)
    real = torch.stack([torch.from_numpy(np.asarray(world.render(p, rng), dtype=np.float32)).permute(2, 0, 1)
                        for p in prompts])
    batch = torch.cat([real, torch.zeros(1, 3, 32, 32)])
    prompts = prompts + [prompts[0]]
    reward = rewards.load(name)
    scores = reward(batch, prompts)
    torch.testing.assert_close(scores, verify.score(batch, prompts)[key].float())
    assert scores.dtype == torch.float32 and reward.name == name
    if name in ("toy-all", "toy-mean3"):
        assert scores[-1] == 0  # a blank image scores 0


# --------------------------------------------------------------------------------------------------
# Preprocessing: the torch transform equals PIL's (the authors' pipeline) on uint8 images


@pytest.mark.parametrize("height,width,size", [(32, 32, 56), (40, 30, 24), (96, 64, 40), (33, 33, 33)])
def test_clip_preprocess_matches_pil(height, width, size):
    x = images(3, n=1, size=max(height, width))[..., :height, :width]
    u8 = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(u8)
    short, long = min(height, width), max(height, width)
    new = (size, int(size * long / short)) if height <= width else (int(size * long / short), size)
    if short != size:
        pil = pil.resize((new[1], new[0]), Image.BICUBIC)
    arr = np.asarray(pil, dtype=np.float32) / 255
    top, left = int(round((arr.shape[0] - size) / 2)), int(round((arr.shape[1] - size) / 2))
    arr = arr[top:top + size, left:left + size]
    expected = (torch.from_numpy(arr).permute(2, 0, 1)[None] - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        CLIP_STD).view(1, 3, 1, 1)
    got = clip_preprocess(x, size)
    assert got.shape == (1, 3, size, size)
    step = 1 / 255 / min(CLIP_STD)
    diff = (got - expected).abs()
    assert diff.max() <= step + 1e-5  # PIL's fixed-point rounding may differ by one level on ties
    assert (diff > 1e-5).float().mean() < 0.01


def test_clip_preprocess_pad_mode_and_gradients():
    x = images(4, n=1, size=40)[..., :20, :40].clone().requires_grad_(True)
    out = clip_preprocess(x, 20, mode="pad", quantize=False)
    assert out.shape == (1, 3, 20, 20)
    black = (torch.zeros(3) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out[0, :, :5, 0], black[:, None].expand(3, 5))  # 5 padded rows on top
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# Tiny models in the published layouts


def tiny_clip_tokenizer():
    """A real CLIPTokenizer (byte-level BPE, '</w>' word ends) over single letters, no merges."""
    from transformers import CLIPTokenizer

    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(string.ascii_lowercase)})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})  # eos has the largest id, as in CLIP
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip_model(seed: int, projection_dim: int = 16):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=54, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=52, eos_token_id=53,
                         pad_token_id=53),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=projection_dim, logit_scale_init_value=math.log(100.0),
    )
    return CLIPModel(config).eval()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A save_pretrained folder holding a tiny CLIPModel and its tokenizer."""
    path = tmp_path_factory.mktemp("tiny_clip")
    tiny_clip_model(0).save_pretrained(path)
    tiny_clip_tokenizer().save_pretrained(path)
    return path


def reference_cosine(model_dir, batch, prompts):
    """Cosine computed directly with the saved CLIPModel (no reward code involved)."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    tok = tiny_clip_tokenizer()(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=normalise(batch))
        txt = model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    return F.cosine_similarity(img, txt, dim=-1), model


def test_pickscore_is_logit_scaled_cosine(clip_dir):
    reward = rewards.load("pickscore", path=str(clip_dir), processor_path=str(clip_dir), batch_size=3)
    batch = images(5)
    scores = reward(batch, PROMPTS)
    cosine, model = reference_cosine(clip_dir, batch, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32 and scores.grad_fn is None
    torch.testing.assert_close(model.logit_scale.exp(), torch.tensor(100.0))
    torch.testing.assert_close(scores, 100.0 * cosine, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(reward(batch, PROMPTS), scores, atol=0, rtol=0)  # deterministic
    assert "100" in reward.scale and reward.name == "pickscore"


def test_clipscore_is_100_cos_clipped_at_zero(clip_dir):
    reward = rewards.load("clipscore", path=str(clip_dir))
    batch = images(6, n=8)
    prompts = PROMPTS * 2
    scores = reward(batch, prompts)
    cosine, _ = reference_cosine(clip_dir, batch, prompts)
    torch.testing.assert_close(scores, 100.0 * cosine.clamp(min=0), atol=1e-4, rtol=1e-5)
    assert (scores >= 0).all()


def test_requires_grad_reaches_pixels_and_to_device(clip_dir):
    reward = rewards.load("clipscore", path=str(clip_dir), requires_grad=True)
    batch = images(7, n=2).requires_grad_(True)
    reward(batch, PROMPTS[:2]).sum().backward()
    assert batch.grad is not None and batch.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in reward.model.parameters())  # the reward model stays frozen
    assert reward.to("cpu") is reward and reward.device == torch.device("cpu")
    half = rewards.load("pickscore", path=str(clip_dir), processor_path=str(clip_dir), dtype="bfloat16")
    full = rewards.load("pickscore", path=str(clip_dir), processor_path=str(clip_dir))
    out = half(images(8, n=2), PROMPTS[:2])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, full(images(8, n=2), PROMPTS[:2]), atol=2.0, rtol=0.05)


def test_aesthetic_is_mlp_of_normalised_image_embedding(clip_dir, tmp_path):
    torch.manual_seed(1)
    # published layout: Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout,
    # Linear(64, 16), Linear(16, 1) -> keys layers.0/2/4/6/7; the tiny CLIP embeds in 16-d instead of 768
    dims = [16, 1024, 128, 64, 16, 1]
    state = {}
    for index, (d_in, d_out) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        state[f"layers.{index}.weight"] = torch.randn(d_out, d_in) / math.sqrt(d_in)
        state[f"layers.{index}.bias"] = torch.randn(d_out) * 0.1
    torch.save(state, tmp_path / "aesthetic-model.pth")
    reward = rewards.load("aesthetic", path=str(tmp_path), clip_path=str(clip_dir))
    batch = images(9)
    scores = reward(batch, PROMPTS)

    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        embed = model.get_image_features(pixel_values=normalise(batch))
        embed = embed if isinstance(embed, torch.Tensor) else embed.pooler_output
        x = embed / embed.norm(dim=-1, keepdim=True)
        for index in (0, 2, 4, 6, 7):  # no non-linearity in the published predictor
            x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    torch.testing.assert_close(scores, x.squeeze(-1), atol=1e-4, rtol=1e-4)
    assert reward(batch, ["other"] * 4).equal(scores)  # the prompt is ignored

    bad = dict(state)
    bad["layers.1.weight"] = bad.pop("layers.2.weight")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="layers.2.weight"):
        rewards.load("aesthetic", path=str(tmp_path / "bad.pth"), clip_path=str(clip_dir))


# --------------------------------------------------------------------------------------------------
# HPSv2: OpenCLIP state dict -> transformers CLIPModel, checked against an OpenCLIP-style forward


def tiny_openclip_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with OpenCLIP ViT key names/shapes: vision width 32 (patch 8, 32 px), text width
    32, context 16, 2 layers each, embed dim 16."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    def blocks(prefix, width, layers):
        out = {}
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            out.update({
                p + "ln_1.weight": 1 + rnd(width), p + "ln_1.bias": rnd(width),
                p + "attn.in_proj_weight": rnd(3 * width, width, scale=0.3), p + "attn.in_proj_bias": rnd(3 * width),
                p + "attn.out_proj.weight": rnd(width, width, scale=0.3), p + "attn.out_proj.bias": rnd(width),
                p + "ln_2.weight": 1 + rnd(width), p + "ln_2.bias": rnd(width),
                p + "mlp.c_fc.weight": rnd(64, width, scale=0.3), p + "mlp.c_fc.bias": rnd(64),
                p + "mlp.c_proj.weight": rnd(width, 64, scale=0.3), p + "mlp.c_proj.bias": rnd(width),
            })
        return out

    sd = {
        "visual.conv1.weight": rnd(32, 3, 8, 8), "visual.class_embedding": rnd(32),
        "visual.positional_embedding": rnd(17, 32), "visual.ln_pre.weight": 1 + rnd(32), "visual.ln_pre.bias": rnd(32),
        "visual.ln_post.weight": 1 + rnd(32), "visual.ln_post.bias": rnd(32), "visual.proj": rnd(32, 16, scale=0.3),
        "token_embedding.weight": rnd(54, 32, scale=0.5), "positional_embedding": rnd(16, 32),
        "ln_final.weight": 1 + rnd(32), "ln_final.bias": rnd(32), "text_projection": rnd(32, 16, scale=0.3),
        "logit_scale": torch.tensor(math.log(100.0)), "attn_mask": torch.full((16, 16), float("-inf")).triu(1),
    }
    sd.update(blocks("visual.", 32, 2))
    sd.update(blocks("", 32, 2))
    return sd


def openclip_forward(sd, pixels, ids, heads=16):
    """OpenCLIP's ViT and text tower (pre-LN residual blocks with nn.MultiheadAttention, GELU, class
    token pooling, argmax(eot) text pooling, causal text mask), written independently of the reward."""

    def tower(x, prefix, layers, mask=None):
        width = x.shape[-1]
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
            attn.load_state_dict({"in_proj_weight": sd[p + "attn.in_proj_weight"],
                                  "in_proj_bias": sd[p + "attn.in_proj_bias"],
                                  "out_proj.weight": sd[p + "attn.out_proj.weight"],
                                  "out_proj.bias": sd[p + "attn.out_proj.bias"]})
            y = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
            x = x + attn(y, y, y, attn_mask=mask, need_weights=False)[0]
            y = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
            y = F.gelu(y @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
            x = x + y @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
        return x

    with torch.no_grad():
        x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=8).flatten(2).transpose(1, 2)  # (B, 16, 32)
        x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
        x = F.layer_norm(x + sd["visual.positional_embedding"], (32,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
        x = tower(x, "visual.", 2)
        image = F.layer_norm(x[:, 0], (32,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]
        t = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
        t = tower(t, "", 2, mask=sd["attn_mask"][: ids.shape[1], : ids.shape[1]])
        t = F.layer_norm(t, (32,), sd["ln_final.weight"], sd["ln_final.bias"])
        text = t[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


@pytest.fixture(scope="module")
def hps_assets(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_hps")
    sd = tiny_openclip_state_dict()
    torch.save({"state_dict": sd, "epoch": 1}, path / "HPS_v2_compressed.pt")
    tiny_clip_tokenizer().save_pretrained(path / "tokenizer")
    return path, sd


def test_openclip_conversion_matches_openclip_forward(hps_assets):
    from transformers import CLIPModel

    from tasks.rewards.hpsv2 import openclip_to_transformers

    _, sd = hps_assets
    config, weights = openclip_to_transformers(sd, eos_token_id=53)
    assert config.vision_config.image_size == 32 and config.vision_config.patch_size == 8
    assert config.text_config.max_position_embeddings == 16 and config.projection_dim == 16
    model = CLIPModel(config).eval()
    model.load_state_dict(weights, strict=True)
    pixels = normalise(images(10))
    ids = tiny_clip_tokenizer()(PROMPTS, padding="max_length", max_length=16, return_tensors="pt").input_ids
    ref_image, ref_text = openclip_forward(sd, pixels, ids)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(input_ids=ids)
    image = F.normalize(image if isinstance(image, torch.Tensor) else image.pooler_output, dim=-1)
    text = F.normalize(text if isinstance(text, torch.Tensor) else text.pooler_output, dim=-1)
    torch.testing.assert_close(image, ref_image, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text, ref_text, atol=1e-5, rtol=1e-4)

    variant = dict(sd)
    variant["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(32)  # layer-scale variant
    with pytest.raises(ValueError, match="ls_1"):
        openclip_to_transformers(variant)


def test_hpsv2_is_100_cos_of_openclip_model(hps_assets):
    path, sd = hps_assets
    reward = rewards.load("hpsv2", path=str(path), tokenizer_path=str(path / "tokenizer"), batch_size=2)
    batch = images(11)
    scores = reward(batch, PROMPTS)
    ids = tiny_clip_tokenizer()(PROMPTS, padding="max_length", max_length=16, return_tensors="pt").input_ids
    ref_image, ref_text = openclip_forward(sd, normalise(batch), ids)
    torch.testing.assert_close(scores, 100 * (ref_image * ref_text).sum(-1), atol=1e-3, rtol=1e-4)
    assert reward.scale.startswith("HPSv2.0") and "100" in reward.scale
    with pytest.raises(MissingWeightsError, match="HPS_v2.1_compressed.pt"):
        rewards.load("hpsv2", version="v2.1", path=str(path), tokenizer_path=str(path / "tokenizer"))


# --------------------------------------------------------------------------------------------------
# ImageReward: published key layout -> transformers BLIP modules, checked against BLIP's own maths


def tiny_bert_tokenizer():
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "two", "dogs", "blue", "sky", "an",
             "old", "tree", "##s"]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def tiny_imagereward_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """ImageReward.pt layout: BLIP ViT (width 48, patch 8, 32 px, 2 blocks), med.py BERT (hidden 32,
    2 layers, cross-attention to width 48, vocab 18 incl. [DEC]/[ENC]), MLP head 32-1024-128-64-16-1."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    v, h, vocab = "blip.visual_encoder.", "blip.text_encoder.", 18
    sd = {v + "cls_token": rnd(1, 1, 48), v + "pos_embed": rnd(1, 17, 48),
          v + "patch_embed.proj.weight": rnd(48, 3, 8, 8), v + "patch_embed.proj.bias": rnd(48),
          v + "norm.weight": 1 + rnd(48), v + "norm.bias": rnd(48)}
    for i in range(2):
        p = f"{v}blocks.{i}."
        sd.update({p + "norm1.weight": 1 + rnd(48), p + "norm1.bias": rnd(48),
                   p + "attn.qkv.weight": rnd(144, 48, scale=0.3), p + "attn.qkv.bias": rnd(144),
                   p + "attn.proj.weight": rnd(48, 48, scale=0.3), p + "attn.proj.bias": rnd(48),
                   p + "norm2.weight": 1 + rnd(48), p + "norm2.bias": rnd(48),
                   p + "mlp.fc1.weight": rnd(96, 48, scale=0.3), p + "mlp.fc1.bias": rnd(96),
                   p + "mlp.fc2.weight": rnd(48, 96, scale=0.3), p + "mlp.fc2.bias": rnd(48)})
    sd.update({h + "embeddings.word_embeddings.weight": rnd(vocab, 32, scale=0.5),
               h + "embeddings.position_embeddings.weight": rnd(40, 32),
               h + "embeddings.LayerNorm.weight": 1 + rnd(32), h + "embeddings.LayerNorm.bias": rnd(32),
               h + "embeddings.position_ids": torch.arange(40)[None]})
    for i in range(2):
        p = f"{h}encoder.layer.{i}."
        for block, kv_in in (("attention", 32), ("crossattention", 48)):
            sd.update({p + f"{block}.self.query.weight": rnd(32, 32, scale=0.3), p + f"{block}.self.query.bias": rnd(32),
                       p + f"{block}.self.key.weight": rnd(32, kv_in, scale=0.3), p + f"{block}.self.key.bias": rnd(32),
                       p + f"{block}.self.value.weight": rnd(32, kv_in, scale=0.3),
                       p + f"{block}.self.value.bias": rnd(32),
                       p + f"{block}.output.dense.weight": rnd(32, 32, scale=0.3),
                       p + f"{block}.output.dense.bias": rnd(32),
                       p + f"{block}.output.LayerNorm.weight": 1 + rnd(32),
                       p + f"{block}.output.LayerNorm.bias": rnd(32)})
        sd.update({p + "intermediate.dense.weight": rnd(64, 32, scale=0.3), p + "intermediate.dense.bias": rnd(64),
                   p + "output.dense.weight": rnd(32, 64, scale=0.3), p + "output.dense.bias": rnd(32),
                   p + "output.LayerNorm.weight": 1 + rnd(32), p + "output.LayerNorm.bias": rnd(32)})
    sd.update({"blip.vision_proj.weight": rnd(8, 48), "blip.vision_proj.bias": rnd(8),
               "blip.text_proj.weight": rnd(8, 32), "blip.text_proj.bias": rnd(8)})  # unused BLIP heads
    dims = [32, 1024, 128, 64, 16, 1]
    for index, (d_in, d_out) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        sd[f"mlp.layers.{index}.weight"] = rnd(d_out, d_in, scale=1 / math.sqrt(d_in))
        sd[f"mlp.layers.{index}.bias"] = rnd(d_out)
    return sd


def imagereward_forward(sd, pixels, ids, mask, vision_heads=16, text_heads=4):
    """BLIP ViT (timm blocks, eps 1e-6) + med.py BERT in multimodal mode + MLP, from the raw checkpoint."""
    v, h = "blip.visual_encoder.", "blip.text_encoder."

    def attention(q, k, v_, heads, additive=None):
        b, lq, d = q.shape
        split = lambda t: t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
        if additive is not None:
            scores = scores + additive
        return (scores.softmax(-1) @ split(v_)).transpose(1, 2).reshape(b, lq, d)

    def lin(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    with torch.no_grad():
        x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=8)
        x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], 1, -1), x.flatten(2).transpose(1, 2)], 1)
        x = x + sd[v + "pos_embed"]
        for i in range(2):
            p = f"{v}blocks.{i}."
            y = F.layer_norm(x, (48,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
            q, k, val = lin(y, p + "attn.qkv").chunk(3, dim=-1)
            x = x + lin(attention(q, k, val, vision_heads), p + "attn.proj")
            y = F.layer_norm(x, (48,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
            x = x + lin(F.gelu(lin(y, p + "mlp.fc1")), p + "mlp.fc2")
        image = F.layer_norm(x, (48,), sd[v + "norm.weight"], sd[v + "norm.bias"], eps=1e-6)

        t = sd[h + "embeddings.word_embeddings.weight"][ids] + sd[h + "embeddings.position_embeddings.weight"][: ids.shape[1]]
        t = F.layer_norm(t, (32,), sd[h + "embeddings.LayerNorm.weight"], sd[h + "embeddings.LayerNorm.bias"], eps=1e-12)
        pad = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended attention mask
        for i in range(2):
            p = f"{h}encoder.layer.{i}."
            for block, memory, additive in (("attention", None, pad), ("crossattention", image, None)):
                src = t if memory is None else memory
                a = attention(lin(t, p + f"{block}.self.query"), lin(src, p + f"{block}.self.key"),
                              lin(src, p + f"{block}.self.value"), text_heads, additive)
                t = F.layer_norm(lin(a, p + f"{block}.output.dense") + t, (32,),
                                 sd[p + f"{block}.output.LayerNorm.weight"], sd[p + f"{block}.output.LayerNorm.bias"],
                                 eps=1e-12)
            f = lin(F.gelu(lin(t, p + "intermediate.dense")), p + "output.dense")
            t = F.layer_norm(f + t, (32,), sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"], eps=1e-12)
        x = t[:, 0]
        for index in (0, 2, 4, 6, 7):
            x = lin(x, f"mlp.layers.{index}")
    return x.squeeze(-1)


def test_imagereward_matches_blip_maths_and_normalisation(tmp_path):
    sd = tiny_imagereward_state_dict()
    torch.save(sd, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps({
        "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 18, "layer_norm_eps": 1e-12,
        "hidden_act": "gelu", "add_cross_attention": True, "encoder_width": 48, "pad_token_id": 0}))
    tiny_bert_tokenizer().save_pretrained(tmp_path / "tokenizer")
    reward = rewards.load("imagereward", path=str(tmp_path), tokenizer_path=str(tmp_path / "tokenizer"), batch_size=3)
    batch = images(12)
    scores = reward(batch, PROMPTS)
    tok = tiny_bert_tokenizer()(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    raw = imagereward_forward(sd, normalise(batch), tok.input_ids, tok.attention_mask)
    torch.testing.assert_close(reward.raw(batch, PROMPTS), raw, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores, (raw - 0.16717362830052426) / 1.0333394966054072, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores[0], scores[1])  # prompts and images matter
    assert reward(batch, PROMPTS).equal(scores)


# --------------------------------------------------------------------------------------------------
# Missing weights: a clear error naming the hub id / file and how to provide it; no network


@pytest.mark.parametrize("name,options,names_in_message", [
    ("pickscore", {}, ["yuvalkirstain/PickScore_v1", "path="]),
    ("clipscore", {}, ["openai/clip-vit-large-patch14", "path="]),
    ("aesthetic", {}, ["openai/clip-vit-large-patch14", "clip_path="]),
    ("hpsv2", {"tokenizer_path": "CLIP_DIR"}, ["xswu/HPSv2", "HPS_v2_compressed.pt", "path="]),
    ("imagereward", {"tokenizer_path": "CLIP_DIR"}, ["THUDM/ImageReward", "ImageReward.pt", "path="]),
    ("aesthetic", {"clip_path": "CLIP_DIR"}, ["trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"]),
])
def test_missing_weights_error_is_clear_and_offline(name, options, names_in_message, clip_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    options = {k: str(clip_dir) if v == "CLIP_DIR" else v for k, v in options.items()}
    with pytest.raises(MissingWeightsError) as info:
        rewards.load(name, cache_dir=str(tmp_path / "empty_cache"), **options)
    message = str(info.value)
    for fragment in names_in_message + ["HF_HUB_OFFLINE=1", "hf download", f"reward '{name}'"]:
        assert fragment in message, (fragment, message)


def test_missing_local_path_names_the_path(tmp_path):
    with pytest.raises(MissingWeightsError, match="does not exist") as info:
        rewards.load("pickscore", path=str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(info.value)
