"""Tiny random-weight FLUX and SD3 pipelines (rectified-flow transformers), built fully offline like `tasks.tiny`.

They have the component layout of `black-forest-labs/FLUX.1-schnell` and `stabilityai/stable-diffusion-3.5-large-turbo`
(same pipeline classes, FlowMatchEulerDiscreteScheduler with the real scheduler configs, a VAE with shift and scaling
factors, CLIP text encoders plus a T5 encoder, the real transformer classes) but a few hundred thousand parameters
and 32x32 px images (VAE factor 2). `build_tiny_flux(path)` writes a `save_pretrained` folder that
`tasks.models.load_pipeline("flux-schnell", path=...)` loads like the real weights. Deterministic in `seed`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tasks.tiny import HIDDEN, MAX_TOKENS, RESOLUTION, WORDS, _finish, _text_config, build_tokenizer

T5_DIM = 64  # T5 d_model = the transformers' joint_attention_dim (SD3 pads the two CLIP states, 2 x 32, to it)
LATENT_CHANNELS = 4

# The real scheduler configs (scheduler/scheduler_config.json of the hub repos). FLUX.1-dev shifts by image size
# (use_dynamic_shifting=True, shift 3.0): `build_tiny_flux(dynamic_shifting=True)` builds that variant for tests.
FLUX_SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                              max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
SD35_TURBO_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


def build_t5_tokenizer():
    """A T5-like word-level tokenizer: words </s>, padded with <pad> (id 0)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=MAX_TOKENS)


def _t5(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=T5_DIM, d_kv=16, d_ff=64, num_layers=1,
                                   num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0,
                                   eos_token_id=1)).eval()


def _vae(scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=LATENT_CHANNELS, layers_per_block=1, norm_num_groups=32,
                         sample_size=RESOLUTION, scaling_factor=scaling_factor, shift_factor=shift_factor,
                         use_quant_conv=False, use_post_quant_conv=False)


def build_tiny_flux(path: str | Path | None = None, *, seed: int = 0, guidance_embeds: bool = False,
                    dynamic_shifting: bool = False):
    """Tiny random-weight `FluxPipeline` shaped like FLUX.1-schnell (no guidance embedding, no shift).

    guidance_embeds / dynamic_shifting=True give the FLUX.1-dev variant (guidance as a transformer input, sigmas
    shifted by image size). CLIP (pooled) + T5 (tokens) encoders, VAE factor 2 with FLUX's scaling and shift factors,
    latent 4x16x16 packed into 64 tokens of 16 channels.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tokenizer(), build_t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=T5_DIM, pooled_projection_dim=HIDDEN,
                                         guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(**{**FLUX_SCHNELL_SCHEDULER, **(
        dict(use_dynamic_shifting=True, shift=3.0) if dynamic_shifting else {})})
    pipe = FluxPipeline(scheduler=scheduler, vae=_vae(0.3611, 0.1159), text_encoder=CLIPTextModel(
        _text_config(len(tokenizer))), tokenizer=tokenizer, text_encoder_2=_t5(len(tokenizer_2)),
        tokenizer_2=tokenizer_2, transformer=transformer)
    return _finish(pipe, path)


def build_tiny_sd3(path: str | Path | None = None, *, seed: int = 0):
    """Tiny random-weight `StableDiffusion3Pipeline` shaped like SD3.5-Large-Turbo (MMDiT with RMS qk-norm, shift 3).

    Two CLIP encoders with projection (pooled 2 x 32), T5 (64), VAE factor 2 with SD3's scaling and shift factors,
    latent 4x16x16 in 2x2 patches.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, tokenizer_2, tokenizer_3 = build_tokenizer(), build_tokenizer(), build_t5_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=RESOLUTION // 2, patch_size=2, in_channels=LATENT_CHANNELS,
                                        num_layers=2, attention_head_dim=8, num_attention_heads=4,
                                        joint_attention_dim=T5_DIM, caption_projection_dim=32,
                                        pooled_projection_dim=2 * HIDDEN, out_channels=LATENT_CHANNELS,
                                        pos_embed_max_size=RESOLUTION // 2, qk_norm="rms_norm")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD35_TURBO_SCHEDULER),
        vae=_vae(1.5305, 0.0609), text_encoder=CLIPTextModelWithProjection(_text_config(len(tokenizer))),
        tokenizer=tokenizer, text_encoder_2=CLIPTextModelWithProjection(_text_config(len(tokenizer_2))),
        tokenizer_2=tokenizer_2, text_encoder_3=_t5(len(tokenizer_3)), tokenizer_3=tokenizer_3)
    return _finish(pipe, path)


BUILDERS = {"flux": build_tiny_flux, "sd3": build_tiny_sd3}
