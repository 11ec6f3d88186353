"""The toy world's rectified-flow pipeline (`toy-flow`): the toy UNet predicting the velocity v = noise - x0 at
x_s = (1 - s) x0 + s noise, sampled with diffusers' FlowMatchEulerDiscreteScheduler on FLUX's grid
(sigmas linspace(1, 1/N, N), no shift), so 1 step goes from pure noise to x0_hat = x - v."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .pipeline import SIZE, ToyPipeline


def build_flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def linear_sigmas(num_steps: int) -> np.ndarray:
    """The grid's sigmas as FluxPipeline passes them (`methods.sampling.set_flow_grid(linear_sigmas=True)`)."""
    return np.linspace(1.0, 1 / num_steps, num_steps)


class ToyFlowPipeline(ToyPipeline):
    """`pipe(prompts, num_inference_steps=4)` -> images (B, 3, 32, 32) in [0, 1]; the UNet's output is a velocity."""

    @torch.no_grad()
    def __call__(self, prompts: list[str] | str, num_inference_steps: int = 4, guidance_scale: float = 0.0,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pt", return_dict: bool = True):
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        device, dtype = self.unet.device, self.unet.dtype
        cond = self.encode_prompt(prompts).to(dtype)
        uncond = self.encode_prompt([""] * len(prompts)).to(dtype) if guidance_scale > 1.0 else None
        if latents is None:
            latents = torch.randn((len(prompts), 3, SIZE, SIZE), generator=generator, device=device, dtype=dtype)
        x = latents.to(device=device, dtype=dtype)
        self.scheduler.set_timesteps(sigmas=linear_sigmas(num_inference_steps), device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            v = self.predict(x, t.expand(len(prompts)), cond, uncond, guidance_scale)
            x = self.scheduler.step(v, t, x).prev_sample
        images = self.decode(x.float())
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
