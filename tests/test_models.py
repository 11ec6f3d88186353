"""tasks.models (the zoo) and tasks.tiny (offline stand-in pipelines)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tasks import models
from tasks.registry import UnknownNameError
from tasks.tiny import build_tiny_sd, build_tiny_sdxl


def test_zoo_entries():
    assert models.names() == ["flux-schnell", "sd-turbo", "sd35-large-turbo", "sdxl-turbo", "toy-base", "toy-flow", "toy-turbo"]
    base, turbo = models.get("toy-base"), models.get("toy-turbo")
    assert (base.family, base.pipeline_class, base.scheduler, base.guidance_scale) == ("toy", "ToyPipeline", "ddim", 1.0)
    # 3 and 6 steps visit timesteps (666, 332 / 832, 166) that no trailing K in {1, 2, 4} trains on
    assert base.step_counts == (1, 2, 3, 4, 6, 8, 16, 50) and turbo.step_counts == (1, 2, 3, 4, 6, 8)
    assert turbo.guidance_scale == 0.0
    assert Path(base.source) == Path(models.__file__).parent / "toy" / "weights" / "toy-base"
    sd, sdxl = models.get("sd-turbo"), models.get("sdxl-turbo")
    assert (sd.source, sd.pipeline_class, sd.scheduler, sd.native_scheduler) == (
        "stabilityai/sd-turbo", "StableDiffusionPipeline", "ddim", "EulerDiscreteScheduler")
    assert (sdxl.source, sdxl.pipeline_class, sdxl.scheduler) == (
        "stabilityai/sdxl-turbo", "StableDiffusionXLPipeline", "euler_ancestral")
    assert sd.resolution == sdxl.resolution == 512 and sd.guidance_scale == sdxl.guidance_scale == 0.0
    flux, sd3 = models.get("flux-schnell"), models.get("sd35-large-turbo")
    assert (flux.family, flux.source, flux.pipeline_class, flux.scheduler, flux.resolution) == (
        "flux", "black-forest-labs/FLUX.1-schnell", "FluxPipeline", "flow_euler", 1024)
    assert (sd3.family, sd3.source, sd3.pipeline_class, sd3.scheduler, sd3.guidance_scale) == (
        "sd3", "stabilityai/stable-diffusion-3.5-large-turbo", "StableDiffusion3Pipeline", "flow_euler", 0.0)
    for name in models.names():
        spec = models.get(name)
        assert spec.default_train_steps in spec.step_counts


def test_unknown_model_names_the_bad_value_and_valid_ones():
    with pytest.raises(UnknownNameError) as info:
        models.get("sd-trubo")
    message = str(info.value)
    assert "sd-trubo" in message and "model" in message
    assert "available: flux-schnell, sd-turbo, sd35-large-turbo, sdxl-turbo, toy-base, toy-flow, toy-turbo" in message
    with pytest.raises(UnknownNameError, match="sdxl-turbo"):
        models.load_pipeline("sdxl", path="/nonexistent")


def test_tiny_builders_are_deterministic_and_tiny():
    a, b = build_tiny_sd(), build_tiny_sd()
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(build_tiny_sd(seed=1).unet.conv_in.weight, a.unet.conv_in.weight)
    assert 0.8e6 < sum(p.numel() for p in a.unet.parameters()) < 1.2e6
    assert type(a.scheduler).__name__ == "EulerDiscreteScheduler"
    xl = build_tiny_sdxl()
    assert type(xl.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    for pipe in (a, xl):
        config = pipe.scheduler.config
        assert config.timestep_spacing == "trailing" and config.steps_offset == 1
        assert config.set_alpha_to_one is False and config.beta_schedule == "scaled_linear"
    assert a.tokenizer("a red cat").input_ids == [0, a.tokenizer.convert_tokens_to_ids("a"),
                                                  a.tokenizer.convert_tokens_to_ids("red"),
                                                  a.tokenizer.convert_tokens_to_ids("cat"), 1]


@pytest.mark.parametrize("name, build", [("sd-turbo", build_tiny_sd), ("sdxl-turbo", build_tiny_sdxl)])
def test_load_pipeline_from_local_folder_offline(tmp_path, name, build):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    original = build(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "model_index.json").is_file()
    pipe = models.load_pipeline(name, path=tmp_path / "pipe")
    assert type(pipe).__name__ == models.get(name).pipeline_class
    assert type(pipe.scheduler) is type(original.scheduler)
    kwargs = dict(num_inference_steps=2, height=32, width=32, guidance_scale=0.0, output_type="pt")
    expected = original(["a red cat"], generator=torch.Generator().manual_seed(0), **kwargs).images
    loaded = pipe(["a red cat"], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.equal(loaded, expected)


def test_load_pipeline_switches_to_trailing_spacing(tmp_path):
    pipe = build_tiny_sd()
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing="leading")
    pipe.save_pretrained(tmp_path)
    loaded = models.load_pipeline("sd-turbo", path=tmp_path)
    assert loaded.scheduler.config.timestep_spacing == "trailing"
    loaded.scheduler.set_timesteps(1)
    assert loaded.scheduler.timesteps.tolist() == [999]


def test_missing_local_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(models.ModelUnavailableError) as info:
        models.load_pipeline("sd-turbo", path=missing)
    message = str(info.value)
    assert str(missing) in message and "model_index.json" in message and "build_tiny_sd" in message


def test_uncached_hub_model_offline_is_a_clear_error():
    from huggingface_hub.constants import HF_HUB_CACHE

    if (Path(HF_HUB_CACHE) / "models--stabilityai--sdxl-turbo").exists():
        pytest.skip("sdxl-turbo is in the local cache here")
    with pytest.raises(models.ModelUnavailableError) as info:
        models.load_pipeline("sdxl-turbo")
    message = str(info.value)
    assert "hf download stabilityai/sdxl-turbo" in message and "path=" in message


def test_toy_models_load_from_the_package_or_explain():
    source = Path(models.get("toy-turbo").source)
    if not (source / "model_index.json").is_file():
        with pytest.raises(models.ModelUnavailableError, match="bench.models build toy-turbo"):
            models.load_pipeline("toy-turbo")
        return
    pipe = models.load_pipeline("toy-turbo")
    assert type(pipe).__name__ == "ToyPipeline" and pipe.scheduler.config.timestep_spacing == "trailing"
