"""The trainable policy: a base pipeline plus LoRA adapters (peft) on its denoiser.

Every method sees a model family (toy, SD, SDXL, FLUX, SD3) only through this wrapper: `encode_prompts` -> a `Conditioning`,
`predict(x_t, t, cond)` -> the denoiser's raw output (epsilon or v, with classifier-free guidance folded in),
`decode(latents)` -> images in [0, 1]. The frozen reference model of KL/ratio-based methods is the same network
with the adapters switched off (`with policy.reference(): ...`), so it costs no memory; with `full_finetune=True`
it is a frozen deep copy taken at construction.

Precision: the networks run in `dtype`; `predict` returns float32, and the adapter weights are kept in float32
(the convention of DDPO/SDPO: fp16 base, fp32 LoRA), so log-probabilities are always computed in float32.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from tasks import models as zoo

# Attention projections of the cross-attention UNets (what DDPO/SDPO/trl adapt, rank 4, alpha 4).
SD_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# The toy UNet2DModel has no attention: adapt the convolutions and the time(+text) embedding projection of every
# ResNet block.
TOY_LORA_TARGETS = ("conv1", "conv2", "time_emb_proj", "conv_shortcut")
# The rectified-flow transformers (FLUX, SD3): the image and text streams' attention projections of every joint block
# (FLUX's single blocks have to_q/k/v only), as Flow-GRPO's SD3 and DanceGRPO's FLUX LoRA configs.
FLOW_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
FLOW_FAMILIES = ("flux", "sd3")
FAMILIES = ("toy", "sd", "sdxl", *FLOW_FAMILIES)
ADAPTER_NAME = "default"


@dataclass
class Conditioning:
    """Encoded prompts: per-sample tensors (first dim B) that `Policy.predict` turns into denoiser kwargs.

    Keys: "embeds" (SD/SDXL/FLUX/SD3: (B, L, D) token states; toy: (B, D)); SDXL, FLUX and SD3 add "pooled" (B, D2),
    SDXL "time_ids" (B, 6); with classifier-free guidance the same keys prefixed "neg_" hold the empty prompt's encoding.
    """

    prompts: list[str]
    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, idx) -> Conditioning:
        """The rows `idx` (int, slice, list or 1-D tensor of indices / bool mask)."""
        if isinstance(idx, int):
            idx = [idx]
        if isinstance(idx, slice):
            prompts = self.prompts[idx]
        else:
            idx = torch.as_tensor(idx)
            if idx.dtype == torch.bool:
                idx = idx.nonzero().flatten()
            idx = idx.to(torch.long)
            prompts = [self.prompts[i] for i in idx.tolist()]
        tensors = {k: v[idx.to(v.device) if torch.is_tensor(idx) else idx] for k, v in self.tensors.items()}
        return Conditioning(prompts, tensors)

    def repeat(self, n: int) -> Conditioning:
        """Each sample n times in a row: [p0, p0, ..., p1, p1, ...] (like `repeat_interleave`)."""
        prompts = [p for p in self.prompts for _ in range(n)]
        return Conditioning(prompts, {k: v.repeat_interleave(n, dim=0) for k, v in self.tensors.items()})

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        prompts = [p for part in parts for p in part.prompts]
        return Conditioning(prompts, {k: torch.cat([part.tensors[k] for part in parts]) for k in parts[0].tensors})

    def to(self, device) -> Conditioning:
        return Conditioning(self.prompts, {k: v.to(device) for k, v in self.tensors.items()})


def _kernel_scheduler(scheduler, kernel: str):
    """The scheduler whose tables a sampling kernel uses, built from the pipeline scheduler's config.

    "ddim" and "lcm" use DDIMScheduler (alphas_cumprod, final_alpha_cumprod, clip_sample, trailing grid);
    "euler_ancestral" uses EulerAncestralDiscreteScheduler (sigmas, init_noise_sigma). Keys the target class does
    not know are defaulted the SD way (no x0 clipping, final alpha = alphas_cumprod[0]) rather than with DDIM's
    own defaults (clip to [-1, 1], final alpha 1), which are wrong for latent models and give NaN log-probs.
    """
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    target = {"ddim": DDIMScheduler, "lcm": DDIMScheduler, "euler_ancestral": EulerAncestralDiscreteScheduler,
              "flow_euler": FlowMatchEulerDiscreteScheduler}
    if kernel not in target:
        from tasks.registry import UnknownNameError

        raise UnknownNameError("sampling kernel", kernel, sorted(target))
    cls = target[kernel]
    is_flow = isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    if is_flow != (kernel == "flow_euler"):
        need = "a flow-matching" if kernel == "flow_euler" else "an alphas_cumprod (VP)"
        valid = "flow_euler" if is_flow else "ddim, euler_ancestral or lcm"
        raise ValueError(f"sampling kernel {kernel!r} needs {need} scheduler; this model's is "
                         f"{type(scheduler).__name__}: use kernel {valid}")
    if isinstance(scheduler, cls):
        return scheduler
    config = dict(scheduler.config)
    extra = {}
    if cls is DDIMScheduler:
        extra = dict(
            set_alpha_to_one=config.get("set_alpha_to_one", False), clip_sample=config.get("clip_sample", False)
        )
    return cls.from_config(config, **extra)


class Policy(torch.nn.Module):
    """A base pipeline + trainable LoRA adapters (peft). Reference = same model with adapters disabled."""

    def __init__(
        self,
        pipeline,
        spec: zoo.ModelSpec,
        *,
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        lora_targets: tuple[str, ...] | list[str] | None = None,
        full_finetune: bool = False,
        guidance_scale: float | None = None,
        device="cpu",
        dtype: torch.dtype = torch.float32,
        gradient_checkpointing: bool = False,
        offload_text_encoders: bool | None = None,
    ):
        super().__init__()
        if spec.family not in FAMILIES:
            raise ValueError(f"unsupported model family {spec.family!r}; expected one of {', '.join(FAMILIES)}")
        self.spec = spec
        self.family = spec.family
        self.device = torch.device(device)
        self.dtype = dtype
        self.full_finetune = full_finetune
        self.guidance_scale = float(spec.guidance_scale if guidance_scale is None else guidance_scale)
        # FLUX is guidance-distilled: its guidance scale is an input of the transformer, never CFG.
        self.nfe_per_predict = 2 if self.guidance_scale > 1.0 and spec.family != "flux" else 1
        self.lora_rank = lora_rank
        self.lora_alpha = float(lora_rank if lora_alpha is None else lora_alpha)

        pipeline.to(self.device)
        for component in pipeline.components.values():
            if isinstance(component, torch.nn.Module) and getattr(component, "dtype", dtype) != dtype:
                component.to(dtype=dtype)
        vae = getattr(pipeline, "vae", None)
        if vae is not None and dtype == torch.float16 and vae.config.get("force_upcast", False):
            vae.to(torch.float32)  # the SD/SDXL VAEs overflow in fp16 (diffusers upcasts them the same way)
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(pipeline, name, None)
            if module is not None:
                module.requires_grad_(False).eval()
        self.pipeline = pipeline  # not an nn.Module: a plain attribute
        # FLUX's / SD3's T5-XXL (4.7B parameters, ~9.5 GB in bf16) waits on the CPU and visits the device only to
        # encode (None: on for the flow families off the CPU), so the transformer's training fits one 80 GB GPU.
        if offload_text_encoders is None:
            offload_text_encoders = spec.family in FLOW_FAMILIES and self.device.type != "cpu"
        self.offload_text_encoders = bool(offload_text_encoders)
        self._text_encoders = [m for m in (getattr(pipeline, n, None) for n in
                                           ("text_encoder", "text_encoder_2", "text_encoder_3")) if m is not None]
        if self.offload_text_encoders:
            for module in self._text_encoders:
                module.to("cpu")
        # registered submodule, the only one that trains: the UNet, or the flow models' transformer
        self.unet = pipeline.transformer if spec.family in FLOW_FAMILIES else pipeline.unet
        from peft.tuners.tuners_utils import BaseTunerLayer

        if any(isinstance(m, BaseTunerLayer) for m in self.unet.modules()):
            raise ValueError("the pipeline's UNet already carries peft adapters (is it wrapped by another Policy?); "
                             "build each Policy from its own freshly loaded pipeline")
        self.unet.requires_grad_(False)
        self._schedulers: dict[str, object] = {}
        self.scheduler = self.scheduler_for(spec.scheduler)

        if full_finetune:
            self.lora_targets: tuple[str, ...] = ()
            self.reference_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
            self.unet.requires_grad_(True)
        else:
            from peft import LoraConfig, inject_adapter_in_model

            default = {"toy": TOY_LORA_TARGETS, "flux": FLOW_LORA_TARGETS, "sd3": FLOW_LORA_TARGETS}.get(
                self.family, SD_LORA_TARGETS)
            self.lora_targets = tuple(lora_targets or default)
            config = LoraConfig(
                r=lora_rank, lora_alpha=self.lora_alpha, target_modules=list(self.lora_targets),
                init_lora_weights=True,  # B = 0: the adapted model starts exactly at the base model
            )
            inject_adapter_in_model(config, self.unet, adapter_name=ADAPTER_NAME)
            for name, param in self.unet.named_parameters():
                if "lora_" in name:
                    param.data = param.data.to(torch.float32)
                    param.requires_grad_(True)
        self._trainable = [p for p in self.unet.parameters() if p.requires_grad]
        self._in_reference = False
        self.set_gradient_checkpointing(gradient_checkpointing)

    # ---------------------------------------------------------------- schedulers and shapes
    def scheduler_for(self, kernel: str):
        """The scheduler holding kernel `kernel`'s tables (cached; see `_kernel_scheduler`)."""
        if kernel not in self._schedulers:
            scheduler = _kernel_scheduler(self.pipeline.scheduler, kernel)
            if kernel == "flow_euler":  # the grid as the pipeline builds it (FLUX: linear sigmas; mu by image size)
                from methods.sampling import set_flow_grid

                # FLUX and the toy flow model pass linspace(1, 1/N, N); SD3 uses the scheduler's own
                set_flow_grid(scheduler, linear_sigmas=self.family in ("flux", "toy"), image_seq_len=self.image_seq_len)
            self._schedulers[kernel] = scheduler
        return self._schedulers[kernel]

    @property
    def image_seq_len(self) -> int:
        """Image tokens the transformer sees (FLUX: 2x2-packed latent patches; SD3: patch_size patches)."""
        side = self.latent_shape[-1]
        patch = 2 if self.family == "flux" else int(getattr(self.unet.config, "patch_size", 1))
        return (side // patch) ** 2

    @property
    def vae_scale_factor(self) -> int:
        if self.family == "toy":
            return 1
        return 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Image side in pixels, from the loaded network (a tiny stand-in is smaller than `spec.resolution`); FLUX's
        transformer has no sample size: its VAE's."""
        if self.family == "flux":
            return int(self.pipeline.vae.config.sample_size)
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent as the sampler holds it (FLUX: unpacked, C = in_channels / 4)."""
        if self.family == "flux":
            side = self.resolution // self.vae_scale_factor
            return (int(self.unet.config.in_channels) // 4, side, side)
        side = int(self.unet.config.sample_size)
        return (int(self.unet.config.in_channels), side, side)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.unet.enable_gradient_checkpointing()
        elif getattr(self.unet, "is_gradient_checkpointing", False):
            self.unet.disable_gradient_checkpointing()

    # ---------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Encode prompts (and, with CFG, the empty negative prompt) exactly as the pipeline's __call__ does."""
        if self.offload_text_encoders:
            for module in self._text_encoders:
                module.to(self.device)
            try:
                return self._encode(list(prompts))
            finally:
                for module in self._text_encoders:
                    module.to("cpu")
        return self._encode(list(prompts))

    def _encode(self, prompts: list[str]) -> Conditioning:
        cfg = self.nfe_per_predict == 2
        pipe = self.pipeline
        tensors: dict[str, torch.Tensor] = {}
        if self.family == "toy":
            tensors["embeds"] = pipe.text_encoder.encode(prompts).to(self.device, self.dtype)
            if cfg:
                tensors["neg_embeds"] = pipe.text_encoder.encode([""] * len(prompts)).to(self.device, self.dtype)
        elif self.family == "sd":
            embeds, neg = pipe.encode_prompt(prompts, self.device, 1, cfg)
            tensors["embeds"] = embeds
            if cfg:
                tensors["neg_embeds"] = neg
        elif self.family == "flux":
            embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                   num_images_per_prompt=1, max_sequence_length=self.max_sequence_length)
            tensors.update(embeds=embeds, pooled=pooled)
        elif self.family == "sd3":
            embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=cfg, max_sequence_length=self.max_sequence_length)
            tensors.update(embeds=embeds, pooled=pooled)
            if cfg:
                tensors.update(neg_embeds=neg, neg_pooled=neg_pooled)
        else:
            embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=cfg
            )
            side = self.resolution
            projection_dim = (
                pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
            )
            time_ids = pipe._get_add_time_ids(
                (side, side), (0, 0), (side, side), dtype=embeds.dtype, text_encoder_projection_dim=projection_dim
            ).to(self.device).repeat(len(prompts), 1)
            tensors.update(embeds=embeds, pooled=pooled, time_ids=time_ids)
            if cfg:
                tensors.update(neg_embeds=neg, neg_pooled=neg_pooled, neg_time_ids=time_ids.clone())
        return Conditioning(prompts, tensors)

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens per prompt (FLUX.1-schnell: 256, SD3: 256), capped by the T5 tokenizer's own length."""
        return min(256, int(self.pipeline.tokenizer_2.model_max_length if self.family == "flux"
                            else self.pipeline.tokenizer_3.model_max_length))

    # ---------------------------------------------------------------- the denoiser
    def _denoiser(self):
        return self.reference_unet if (self.full_finetune and self._in_reference) else self.unet

    def _call_denoiser(self, x, t, tensors: dict[str, torch.Tensor], prefix: str = ""):
        unet = self._denoiser()
        if self.family == "toy":
            return unet(x, t, class_labels=tensors[prefix + "embeds"]).sample
        if self.family in FLOW_FAMILIES:
            return self._call_transformer(unet, x, t, tensors, prefix)
        added = None
        if self.family == "sdxl":
            added = {"text_embeds": tensors[prefix + "pooled"], "time_ids": tensors[prefix + "time_ids"]}
        return unet(x, t, encoder_hidden_states=tensors[prefix + "embeds"], added_cond_kwargs=added, return_dict=False)[0]

    def _call_transformer(self, transformer, x, t, tensors, prefix):
        """The flow transformers' velocity at scheduler timestep t (floats s * 1000), called as their pipelines call
        them: SD3 with t itself, FLUX with t / 1000 on 2x2-packed latents, its guidance as an input (guidance_embeds)."""
        batch = x.shape[0]
        t = t.expand(batch) if t.ndim == 0 else t
        embeds, pooled = tensors[prefix + "embeds"], tensors[prefix + "pooled"]
        if self.family == "sd3":
            return transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                               return_dict=False)[0]
        pipe = type(self.pipeline)
        _, channels, height, width = x.shape
        packed = pipe._pack_latents(x, batch, channels, height, width)
        img_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, x.device, x.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=embeds.dtype)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((batch,), self.guidance_scale, device=x.device, dtype=torch.float32)
        out = transformer(hidden_states=packed, timestep=t.to(x.dtype) / 1000, guidance=guidance,
                          pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids,
                          return_dict=False)[0]
        return pipe._unpack_latents(out, height * self.vae_scale_factor, width * self.vae_scale_factor,
                                    self.vae_scale_factor)

    def predict(self, x_t: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        """Raw denoiser output (epsilon or v) at timestep(s) `t`, with CFG if guidance_scale > 1; float32.

        x_t: (B, C, h, w), the denoiser's input (Euler kernels scale their latent first, see sampling).
        t: int, 0-d tensor or (B,) tensor of training timesteps (flow models: float scheduler timesteps s * 1000). Gradients reach the adapters (or all UNet
        weights with full_finetune) unless inside `reference()`.
        """
        x = x_t.to(device=self.device, dtype=self.dtype)
        if not torch.is_tensor(t):
            t = torch.tensor(t, device=self.device)
        t = t.to(self.device)
        if self.nfe_per_predict == 1:
            return self._call_denoiser(x, t, cond.tensors).float()
        # CFG: one batched call, negative first (the pipelines' order, so outputs match them bit for bit).
        tensors = {k: torch.cat([cond.tensors["neg_" + k], v]) for k, v in cond.tensors.items() if not k.startswith("neg_")}
        t2 = torch.cat([t, t]) if t.ndim == 1 else t
        out = self._call_denoiser(torch.cat([x, x]), t2, tensors).float()
        uncond, text = out.chunk(2)
        return uncond + self.guidance_scale * (text - uncond)

    @contextmanager
    def reference(self):
        """The frozen base model: adapters disabled (or the frozen copy with full_finetune), no grad."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        was = self._in_reference
        self._in_reference = True
        layers = [] if self.full_finetune else [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            with torch.no_grad():
                yield self
        finally:
            self._in_reference = was
            if not was:
                for layer in layers:
                    layer.enable_adapters(True)

    # ---------------------------------------------------------------- images <-> latents
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) float32 in [0, 1] (VAE decode; identity for the toy)."""
        if self.family == "toy":
            return (latents.float().clamp(-1, 1) + 1) / 2
        vae = self.pipeline.vae
        latents = latents.to(device=self.device, dtype=vae.dtype)
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
            if vae.config.get("shift_factor") is not None:  # FLUX and SD3 VAEs
                latents = latents + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return (image.float() * 0.5 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> latents (float32). VAE posterior mean, or a posterior sample when a
        generator is given; `x*2-1` for the toy (pixel space)."""
        if self.family == "toy":
            return images.to(self.device).float() * 2 - 1
        vae = self.pipeline.vae
        dist = vae.encode(images.to(device=self.device, dtype=vae.dtype) * 2 - 1).latent_dist
        latents = dist.mean if generator is None else dist.sample(generator)
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            return ((latents - mean) * vae.config.scaling_factor / std).float()
        if vae.config.get("shift_factor") is not None:
            latents = latents - vae.config.shift_factor
        return (latents * vae.config.scaling_factor).float()

    # ---------------------------------------------------------------- trainable state
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._trainable)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights (LoRA tensors, or the whole UNet with full_finetune), detached CPU copies."""
        if self.full_finetune:
            state = self.unet.state_dict()
        else:
            from peft import get_peft_model_state_dict

            state = get_peft_model_state_dict(self.unet, adapter_name=ADAPTER_NAME)
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.full_finetune:
            self.unet.load_state_dict(state)
            return
        from peft import set_peft_model_state_dict

        own = self.adapter_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        reshaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or reshaped:
            raise ValueError(
                f"adapter state does not match this policy (rank {self.lora_rank}, targets {self.lora_targets}): "
                f"{len(missing)} missing {missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}, "
                f"{len(reshaped)} with other shapes {[(k, tuple(state[k].shape)) for k in reshaped[:2]]}"
            )
        set_peft_model_state_dict(self.unet, state, adapter_name=ADAPTER_NAME)

    def save_adapter(self, path: str | Path) -> Path:
        """Write the trainable weights as safetensors (with the model name and LoRA config as metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "model": self.spec.name,
            "full_finetune": str(self.full_finetune),
            "lora_rank": str(self.lora_rank),
            "lora_alpha": str(self.lora_alpha),
            "lora_targets": ",".join(self.lora_targets),
        }
        save_file(self.adapter_state_dict(), str(path), metadata=metadata)
        return path

    def load_adapter(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        self.load_adapter_state_dict(load_file(str(path)))


def load_policy(
    model_name: str, *, path=None, device="cpu", dtype: torch.dtype = torch.float32, **lora_kwargs
) -> Policy:
    """Load zoo model `model_name` (hub, or local folder `path`) and wrap it as a `Policy`."""
    spec = zoo.get(model_name)
    pipeline = zoo.load_pipeline(model_name, path=path, device=device, dtype=dtype)
    return Policy(pipeline, spec, device=device, dtype=dtype, **lora_kwargs)
