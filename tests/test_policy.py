"""methods.policy: LoRA placement, gradients, the reference model, CFG, conditioning and adapter checkpoints."""

from __future__ import annotations

import pytest
import torch

from methods import sampling
from methods.policy import Conditioning, Policy, load_policy
from tasks import models as zoo
from tasks.tiny import build_tiny_sd, build_tiny_sdxl

PROMPTS = ["a red cat", "two blue squares", "a photo of a fox"]


def inputs(shape=(3, 4, 16, 16), seed=0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return x, torch.tensor(749)


def perturb(params, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


def toy_pipeline():
    from tasks.toy.pipeline import ToyPipeline, ToyTextEncoder, build_scheduler, build_unet

    torch.manual_seed(0)
    return ToyPipeline(unet=build_unet((8, 16)), text_encoder=ToyTextEncoder(width=8, out_dim=32),
                       scheduler=build_scheduler())


def test_gradients_reach_only_adapter_parameters():
    pipe = build_tiny_sd()
    policy = Policy(pipe, zoo.get("sd-turbo"), lora_rank=4)
    trainable = policy.trainable_parameters()
    names = {n for n, p in policy.unet.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} >= {"to_q", "to_k", "to_v"}
    assert any(".to_out.0.lora_" in n for n in names)
    # rank-4 LoRA on every attention projection of the tiny UNet: a few thousand of its ~1M weights
    assert 1_000 < sum(p.numel() for p in trainable) < 50_000
    assert all(p.dtype == torch.float32 for p in trainable)

    traj = sampling.sample(policy, PROMPTS, 2, generator=torch.Generator().manual_seed(0))
    sampling.transition_log_prob(policy, traj, 0).sum().backward()
    lora_b = [p for n, p in policy.unet.named_parameters() if ".lora_B." in n]
    assert all(p.grad is not None for p in trainable)
    assert all(p.grad.abs().sum() > 0 for p in lora_b)  # B = 0 at init, so only B gets a gradient at first
    others = [p for n, p in policy.unet.named_parameters() if "lora_" not in n]
    others += list(pipe.vae.parameters()) + list(pipe.text_encoder.parameters())
    assert all(p.grad is None and not p.requires_grad for p in others)


def test_reference_is_the_base_model_after_adapters_change():
    pipe = build_tiny_sd()
    x, t = inputs()
    embeds, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    with torch.no_grad():
        base = pipe.unet(x, t, encoder_hidden_states=embeds).sample
    policy = Policy(pipe, zoo.get("sd-turbo"))
    cond = policy.encode_prompts(PROMPTS)
    assert torch.equal(cond.tensors["embeds"], embeds)
    assert torch.equal(policy.predict(x, t, cond), base)  # B = 0: the adapted model starts at the base model
    perturb(policy.trainable_parameters())
    adapted = policy.predict(x, t, cond)
    assert (adapted - base).abs().max() > 1e-3
    with policy.reference():
        reference = policy.predict(x, t, cond)
        assert not reference.requires_grad
    assert torch.equal(reference, base)
    # adapters are back on (and trainable) after the context
    again = policy.predict(x, t, cond)
    assert torch.equal(again, adapted) and again.requires_grad
    assert all(p.requires_grad for p in policy.trainable_parameters())


def test_full_finetune_reference_is_a_frozen_copy():
    policy = Policy(toy_pipeline(), zoo.get("toy-turbo"), full_finetune=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cond = policy.encode_prompts(["a red circle", "two blue squares"])
    before = policy.predict(x, 499, cond).detach()
    params = policy.trainable_parameters()
    assert len(params) == len(list(policy.unet.parameters()))
    perturb(params, 0.01)
    assert (policy.predict(x, 499, cond) - before).abs().max() > 1e-4
    with policy.reference():
        assert torch.equal(policy.predict(x, 499, cond), before)
    assert set(policy.adapter_state_dict()) == set(policy.unet.state_dict())


def test_toy_lora_targets_convolutions_and_time_projection():
    policy = Policy(toy_pipeline(), zoo.get("toy-turbo"), lora_rank=2)
    names = [n for n, p in policy.unet.named_parameters() if p.requires_grad]
    layers = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert layers == {"conv1", "conv2", "time_emb_proj", "conv_shortcut"}
    assert policy.latent_shape == (3, 32, 32) and policy.resolution == 32 and policy.nfe_per_predict == 1
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(policy.decode(policy.encode_images(images)), images, atol=1e-6)
    with pytest.raises(ValueError, match="already carries peft adapters"):
        Policy(policy.pipeline, zoo.get("toy-turbo"))


def test_toy_cfg_combines_conditional_and_empty_prompt():
    pipe = toy_pipeline()
    policy = Policy(pipe, zoo.get("toy-base"), guidance_scale=3.0)  # explicit CFG (toy-base samples without)
    assert policy.guidance_scale == 3.0 and policy.nfe_per_predict == 2
    prompts = ["a red circle", "two blue squares"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 249])  # per-sample timesteps
    with torch.no_grad():
        cond_out = pipe.unet(x, t, class_labels=pipe.text_encoder.encode(prompts)).sample
        uncond_out = pipe.unet(x, t, class_labels=pipe.text_encoder.encode(["", ""])).sample
    expected = uncond_out + 3.0 * (cond_out - uncond_out)
    assert torch.allclose(policy.predict(x, t, policy.encode_prompts(prompts)), expected, atol=1e-5)


def test_sdxl_conditioning_has_pooled_embeds_and_time_ids():
    policy = Policy(build_tiny_sdxl(), zoo.get("sdxl-turbo"), guidance_scale=2.0)
    cond = policy.encode_prompts(PROMPTS)
    assert cond.tensors["embeds"].shape == (3, 16, 64) and cond.tensors["pooled"].shape == (3, 32)
    assert cond.tensors["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 3
    # force_zeros_for_empty_prompt: the negative branch is all zeros, as in the pipeline
    assert cond.tensors["neg_embeds"].abs().sum() == 0 and cond.tensors["neg_pooled"].abs().sum() == 0
    x, t = inputs()
    out = policy.predict(x, t, cond)
    assert out.shape == x.shape and out.dtype == torch.float32
    # the pooled embedding matters (it goes through add_embedding)
    other = Conditioning(cond.prompts, {**cond.tensors, "pooled": cond.tensors["pooled"] + 1})
    assert (policy.predict(x, t, other) - out).abs().max() > 1e-4


def test_conditioning_select_repeat_cat():
    cond = Conditioning(["a", "b", "c"], {"embeds": torch.arange(3.0).view(3, 1)})
    assert len(cond) == 3
    sel = cond.select(torch.tensor([2, 0]))
    assert sel.prompts == ["c", "a"] and sel.tensors["embeds"].flatten().tolist() == [2.0, 0.0]
    assert cond.select(slice(1, 3)).prompts == ["b", "c"]
    assert cond.select(torch.tensor([True, False, True])).prompts == ["a", "c"]
    rep = cond.repeat(2)
    assert rep.prompts == ["a", "a", "b", "b", "c", "c"]
    assert rep.tensors["embeds"].flatten().tolist() == [0, 0, 1, 1, 2, 2]
    both = Conditioning.cat([cond, sel])
    assert both.prompts == ["a", "b", "c", "c", "a"] and both.tensors["embeds"].shape == (5, 1)


def test_adapter_save_load_round_trip(tmp_path):
    policy = Policy(build_tiny_sd(), zoo.get("sd-turbo"), lora_rank=2)
    perturb(policy.trainable_parameters())
    x, t = inputs()
    cond = policy.encode_prompts(PROMPTS)
    expected = policy.predict(x, t, cond).detach()
    path = policy.save_adapter(tmp_path / "adapter.safetensors")

    fresh = Policy(build_tiny_sd(), zoo.get("sd-turbo"), lora_rank=2)
    assert (fresh.predict(x, t, cond) - expected).abs().max() > 1e-3
    fresh.load_adapter(path)
    assert torch.equal(fresh.predict(x, t, cond), expected)
    state = fresh.adapter_state_dict()
    assert state.keys() == policy.adapter_state_dict().keys() and all(v.device.type == "cpu" for v in state.values())

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata()["model"] == "sd-turbo" and f.metadata()["lora_rank"] == "2"
    with pytest.raises(ValueError, match="rank 4"):
        Policy(build_tiny_sd(), zoo.get("sd-turbo"), lora_rank=4).load_adapter(path)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        policy = Policy(build_tiny_sd(), zoo.get("sd-turbo"), gradient_checkpointing=checkpointing)
        perturb(policy.trainable_parameters())
        policy.train()
        assert policy.unet.is_gradient_checkpointing == checkpointing
        x, t = inputs()
        policy.predict(x, t, policy.encode_prompts(PROMPTS)).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.trainable_parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0
    policy.set_gradient_checkpointing(False)
    assert not policy.unet.is_gradient_checkpointing


def test_decode_and_encode_images_sd():
    policy = Policy(build_tiny_sd(), zoo.get("sd-turbo"))
    assert policy.latent_shape == (4, 16, 16) and policy.resolution == 32 and policy.vae_scale_factor == 2
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    latents = policy.encode_images(images)
    assert latents.shape == (2, 4, 16, 16) and latents.dtype == torch.float32
    decoded = policy.decode(latents)
    assert decoded.shape == (2, 3, 32, 32) and decoded.min() >= 0 and decoded.max() <= 1
    vae = policy.pipeline.vae
    with torch.no_grad():
        direct = vae.decode(latents / vae.config.scaling_factor).sample
    assert torch.allclose(decoded, (direct / 2 + 0.5).clamp(0, 1), atol=1e-6)


def test_load_policy_from_local_folder(tmp_path):
    build_tiny_sdxl(tmp_path / "sdxl")
    policy = load_policy("sdxl-turbo", path=tmp_path / "sdxl", lora_rank=2, guidance_scale=0.0)
    assert policy.spec.name == "sdxl-turbo" and policy.scheduler.config.timestep_spacing == "trailing"
    assert type(policy.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert type(policy.scheduler_for("ddim")).__name__ == "DDIMScheduler"
    assert policy.scheduler_for("ddim").config.set_alpha_to_one is False
    assert policy.scheduler_for("ddim").config.clip_sample is False
    assert policy.lora_rank == 2 and policy.nfe_per_predict == 1
