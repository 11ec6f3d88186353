"""toy-flow: the rectified-flow toy model's recipe (tasks.toy.train.train_flow) at tiny scale, its pipeline, and the
flow kernel reproducing that pipeline through the zoo entry."""

from __future__ import annotations

import shutil

import torch

from methods import sampling
from methods.policy import Policy
from tasks import models as zoo
from tasks.toy import train, world
from tasks.toy.flow_pipeline import ToyFlowPipeline
from tasks.toy.pipeline import ToyPipeline

TINY = train.FlowRecipe(pairs=16, teacher_steps=2, steps=25, batch_size=8, lr=1e-3, warmup=5)


def _flow_loss(pipe, z, x0, prompts, s):
    with torch.no_grad():
        x_s = (1 - s) * x0 + s * z
        v = pipe.unet(x_s, torch.full((len(z),), 1000 * s), class_labels=pipe.text_encoder.encode(prompts)).sample
        return float((v - (z - x0)).square().mean())


def test_tiny_recipe_builds_loads_and_the_flow_kernel_reproduces_it(tmp_path):
    base_dir = tmp_path / "toy-base"
    shutil.copytree(zoo.get("toy-base").source, base_dir)
    report = train.build("toy-flow", out=tmp_path, recipe=train.Recipe(flow=TINY), n_measure=4, progress=False)
    entry = report["toy-flow"]
    assert entry["recipe"]["steps"] == 25 and set(entry["rewards"]) == {"1", "2", "4", "8"}
    assert all(0.0 <= row["all"] <= 1.0 for row in entry["rewards"].values())
    assert (tmp_path / "toy-flow" / "measured.json").is_file()

    pipe = zoo.load_pipeline("toy-flow", path=tmp_path / "toy-flow")  # checksums recorded and verified
    assert isinstance(pipe, ToyFlowPipeline) and type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    # The reflow fit: on the teacher's own pairs the student's velocity error is below toy-base's (the VP
    # v-prediction it started from) at the 1- and 2-step grids' sigmas.
    teacher = ToyPipeline.from_pretrained(base_dir)
    prompts, z, x0 = train.teacher_pairs(teacher, TINY, progress=False)
    for s in (1.0, 0.5):
        assert _flow_loss(pipe, z, x0, prompts, s) < _flow_loss(teacher, z, x0, prompts, s), s

    # eta 0 = the pipeline's own Euler steps on FLUX's linear grid
    prompts = world.all_prompts("test")[:4]
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = pipe(prompts, num_inference_steps=4, latents=noise).images
    policy = Policy(zoo.load_pipeline("toy-flow", path=tmp_path / "toy-flow"), zoo.get("toy-flow"))
    traj = sampling.sample(policy, prompts, 4, noise=noise, eta=0.0)
    assert traj.kernel == "flow_euler" and traj.timesteps.tolist() == [1000.0, 750.0, 500.0, 250.0]
    assert torch.allclose(traj.images, expected, atol=1e-5)
    sde = sampling.sample(policy, prompts, 4, noise=noise, generator=torch.Generator().manual_seed(1), eta=0.7)
    assert torch.isfinite(sde.log_probs).all() and not torch.equal(sde.images, traj.images)
