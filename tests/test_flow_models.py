"""The flow-matching zoo entries (flux-schnell, sd35-large-turbo): the policy on their transformers, the velocity-space
denoising loss, their tiny stand-ins, FLOPs counted on the meta device, and a stand-in grid run per model family."""

from __future__ import annotations

import pytest
import torch

from bench import plan as planner
from bench import standin
from methods import sampling
from methods.policy import FLOW_LORA_TARGETS, Policy
from methods.preference_data import denoising_errors, forward_process
from tasks import models as zoo
from tasks.tiny_flow import build_tiny_flux, build_tiny_sd3

PROMPTS = ["a red cat", "two blue squares"]


@pytest.mark.parametrize("build, name", [(build_tiny_flux, "flux-schnell"), (build_tiny_sd3, "sd35-large-turbo")])
def test_policy_adapts_the_transformer_blocks_and_starts_at_the_base_model(build, name):
    policy = Policy(build(), zoo.get(name), lora_rank=2)
    assert policy.lora_targets == FLOW_LORA_TARGETS and policy.latent_shape == (4, 16, 16)
    adapted = {n.rsplit(".lora_A", 1)[0].split(".")[-1] for n, _ in policy.unet.named_parameters() if ".lora_A" in n}
    # both streams of the joint blocks: image (to_q...) and text (add_q_proj...)
    assert {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"} <= adapted
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    cond = policy.encode_prompts(PROMPTS)
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(750.0)
    out = policy.predict(x, t, cond)
    with policy.reference():
        ref = policy.predict(x, t, cond)
    assert torch.equal(out, ref)  # LoRA B = 0
    out.square().mean().backward()
    grads = [p.grad for p in policy.trainable_parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    # T5 offloaded after encoding: the same conditioning, the encoders back on the CPU
    offloaded = Policy(build(), zoo.get(name), lora_rank=2, offload_text_encoders=True)
    again = offloaded.encode_prompts(PROMPTS)
    assert all(torch.equal(again.tensors[k], cond.tensors[k]) for k in cond.tensors)
    assert all(next(m.parameters()).device.type == "cpu" for m in offloaded._text_encoders)


def test_velocity_space_denoising_loss():
    """Flow models train on their own forward process: x_t = (1 - s) x0 + s eps, target v = eps - x0."""
    scheduler = build_tiny_flux().scheduler
    x0, eps = torch.full((2, 1, 1, 1), 2.0), torch.full((2, 1, 1, 1), -1.0)
    x_t, target = forward_process(scheduler, x0, eps, torch.tensor([250.0, 1000.0]))
    assert x_t.flatten().tolist() == [0.75 * 2 - 0.25, -1.0] and target.flatten().tolist() == [-3.0, -3.0]
    policy = Policy(build_tiny_flux(), zoo.get("flux-schnell"), lora_rank=2)
    cond = policy.encode_prompts(PROMPTS)
    x0 = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500.0, 250.0])
    with torch.no_grad():
        errors = denoising_errors(policy, x0, eps, t, cond)
        s = (t / 1000).view(-1, 1, 1, 1)
        by_hand = (policy.predict((1 - s) * x0 + s * eps, t, cond) - (eps - x0)).square().mean((1, 2, 3))
    assert torch.allclose(errors, by_hand, atol=1e-6)
    from methods.preference_data import grid_timesteps

    assert grid_timesteps(policy, 4).tolist() == [1000.0, 750.0, 500.0, 250.0]  # floats, not truncated


def test_standin_folders_load_as_the_zoo_models(tmp_path):
    for name in ("flux-schnell", "sd35-large-turbo"):
        folder = standin.build_pipeline(name, tmp_path / name)
        pipe = zoo.load_pipeline(name, path=folder)
        assert type(pipe).__name__ == zoo.get(name).pipeline_class
        counted = planner.count_flops(folder)  # a stand-in folder's own transformer, on the meta device
        assert counted["unet_params"] == sum(p.numel() for p in pipe.transformer.parameters())
        assert 0 < counted["unet"] < 1e-3 and counted["vae_decode"] > 0
        policy = Policy(pipe, zoo.get(name))
        traj = sampling.sample(policy, PROMPTS, 2, generator=torch.Generator().manual_seed(0), eta=0.0)
        assert traj.images.shape == (2, 3, 32, 32) and traj.kernel == "flow_euler"


def test_flop_constants_match_a_count_of_the_real_sd35_config():
    counted = planner.count_flops("sd35-large-turbo")
    assert counted["unet_params"] == 8_056_627_520  # SD3.5-Large's MMDiT (8.1B, as published)
    assert counted["unet"] == pytest.approx(planner.UNET_TFLOP["sd35-large-turbo"], rel=2e-3)
    assert counted["vae_decode"] == pytest.approx(planner.VAE_DECODE_TFLOP["sd35-large-turbo"], rel=2e-3)


@pytest.mark.parametrize("grid", ["flux-schnell", "sd35-large-turbo"])
def test_flow_grid_plans_every_method(grid):
    p = planner.plan([f"grid={grid}"], multirun=True)
    assert {c.method for c in p.cells} == {
        "base", "ddpo", "diffusion_dpo", "diffusion_dpo_online", "pso", "pso_offline", "spo", "spo_reward_x0", "sdpo",
        "sdpo_t_eq_k", "sharpening", "sharpening_sft", "sft", "inference_scaling", "grpo", "nft"}
    ddpo = next(c for c in p.cells if c.method == "ddpo")
    per_nfe = planner.UNET_TFLOP[grid]
    assert ddpo.train_nfe == 256_000 and ddpo.tflop > ddpo.train_nfe * planner.TRAIN_NFE_FACTOR * per_nfe
    assert p.gpu_hours > 1000  # 1024 px transformers at 31-69 TFLOP per NFE


@pytest.mark.slow
@pytest.mark.parametrize("grid, methods", [("flux-schnell", "grpo,sft"), ("sd35-large-turbo", "ddpo,sharpening")])
def test_standin_flow_grid_runs(grid, methods, tmp_path, monkeypatch, capsys):
    """One log-prob method (the flow SDE kernel) and one denoising-loss method per model family, through bench.run
    on the tiny pipeline and tiny reward models."""
    import huggingface_hub.constants as hub

    from bench import run as bench_run
    from bench import tracking

    built = standin.build(grid, tmp_path / "standin")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(built.hub_cache))
    for key, value in built.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [o for o in built.overrides(grid, budget_nfe=128, eval_n=2, workers=1) if not o.startswith("tracking.uri")]
    bench_run.main(["-m", f"grid={grid}", *overrides, f"tracking.uri={uri}", f"method={methods}", "train_steps=2",
                    "eval.steps=[1]", "eval.rewards=[pickscore]", f"hydra.sweep.dir={tmp_path}/multirun"])
    n = len(methods.split(",")) + 1  # and the base cell
    assert f"grid {grid}: {n} cells: {n} finished" in capsys.readouterr().out
    runs = tracking.load_runs(uri, grid).set_index("method")
    assert set(runs.status) == {"FINISHED"} and set(runs.model) == {grid}
    assert sorted(runs.index) == sorted(["base", *methods.split(",")])
    for method in methods.split(","):
        assert 0 < runs.loc[method, "metrics.cost/train_nfe"] <= 128


def test_shipped_toy_flow_is_the_recipe_and_the_kernel_reproduces_it():
    """The committed weights: built by FlowRecipe's defaults (measured.json records them), loadable through the zoo
    (checksums verified), and sampled by the flow kernel exactly as by their pipeline."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    from methods.policy import load_policy
    from tasks.toy import train, world

    measured = json.loads((Path(zoo.get("toy-flow").source) / "measured.json").read_text())
    assert measured["recipe"] == asdict(train.FlowRecipe()) and set(measured["rewards"]) == {"1", "2", "4", "8"}
    policy = load_policy("toy-flow")
    prompts = world.all_prompts("test")[:4]
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    expected = policy.pipeline(prompts, num_inference_steps=2, latents=noise).images
    traj = sampling.sample(policy, prompts, 2, noise=noise, eta=0.0)
    assert torch.allclose(traj.images, expected, atol=1e-5)
