"""The toy text-to-image pipeline: a pixel-space UNet2DModel conditioned through its class embedding.

It is an ordinary `DiffusionPipeline`, so `save_pretrained` / `from_pretrained` work as for Stable
Diffusion, and the policy layer treats it like SD: encode prompts, predict, decode (identity here).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from .world import SIZE, VOCAB


class ToyTextEncoder(ModelMixin, ConfigMixin):
    """Word + position embeddings -> MLP -> one vector added to the UNet's time embedding.

    Word order matters ("a red circle and a blue square" binds colours to shapes), so the token
    embeddings are concatenated, not pooled. The empty prompt (all padding) is the unconditional input
    used for classifier-free guidance.
    """

    @register_to_config
    def __init__(self, vocab: tuple[str, ...] = tuple(VOCAB), max_length: int = 8, width: int = 32,
                 out_dim: int = 128):
        super().__init__()
        self.word = torch.nn.Embedding(len(vocab) + 2, width)  # + padding + unknown
        self.position = torch.nn.Parameter(torch.zeros(max_length, width))
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(max_length * width, 2 * out_dim), torch.nn.SiLU(),
            torch.nn.Linear(2 * out_dim, out_dim),
        )
        self._ids = {w: i + 2 for i, w in enumerate(vocab)}

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        n = self.config.max_length
        ids = torch.zeros(len(prompts), n, dtype=torch.long)  # 0 = padding
        for row, text in enumerate(prompts):
            words = text.lower().split()[:n]
            ids[row, : len(words)] = torch.tensor([self._ids.get(w, 1) for w in words], dtype=torch.long)
        return ids.to(self.word.weight.device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.word(input_ids) + self.position  # (B, L, width)
        return self.mlp(h.flatten(1))  # (B, out_dim)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self(self.tokenize(prompts))


def build_unet(channels: tuple[int, ...] = (32, 64, 64), sample_size: int = SIZE) -> UNet2DModel:
    return UNet2DModel(
        sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=channels,
        layers_per_block=1, down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels), norm_num_groups=8,
        class_embed_type="identity",
    )


def build_scheduler() -> DDIMScheduler:
    # Cosine schedule + v-prediction; trailing spacing so that 1 step starts from pure noise (t=999).
    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
        clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=False, steps_offset=0,
        timestep_spacing="trailing",
    )


class ToyPipeline(DiffusionPipeline):
    """`pipe(prompts, num_inference_steps=4)` -> images (B, 3, 32, 32) in [0, 1] (output_type="pt")."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet: UNet2DModel, text_encoder: ToyTextEncoder, scheduler: DDIMScheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, scheduler=scheduler)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder.encode(list(prompts))

    def predict(self, x_t: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor | None = None,
                guidance_scale: float = 0.0) -> torch.Tensor:
        """The UNet's v-prediction, with classifier-free guidance when guidance_scale > 1."""
        if uncond is None or guidance_scale <= 1.0:
            return self.unet(x_t, t, class_labels=cond).sample
        both = self.unet(torch.cat([x_t, x_t]), t, class_labels=torch.cat([uncond, cond])).sample
        v_uncond, v_cond = both.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    @staticmethod
    def decode(x0: torch.Tensor) -> torch.Tensor:
        return (x0.clamp(-1, 1) + 1) / 2

    @torch.no_grad()
    def __call__(self, prompts: list[str] | str, num_inference_steps: int = 4, guidance_scale: float = 0.0,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 eta: float = 0.0, output_type: str = "pt", return_dict: bool = True):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        device = self.unet.device
        dtype = self.unet.dtype
        cond = self.encode_prompt(prompts).to(dtype)
        uncond = self.encode_prompt([""] * len(prompts)).to(dtype) if guidance_scale > 1.0 else None
        if latents is None:
            latents = torch.randn((len(prompts), 3, SIZE, SIZE), generator=generator, device=device, dtype=dtype)
        x = latents.to(device=device, dtype=dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            v = self.predict(x, t, cond, uncond, guidance_scale)
            x = self.scheduler.step(v, t, x, eta=eta, generator=generator).prev_sample
        images = self.decode(x.float())
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
        elif output_type == "pil":
            images = self.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().numpy())
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
