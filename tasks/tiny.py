"""Tiny random-weight SD / SDXL pipelines, built fully offline (no hub, no downloads).

They have the exact component layout of `stabilityai/sd-turbo` and `stabilityai/sdxl-turbo` (same pipeline
classes, the same turbo schedulers with trailing spacing, a VAE, CLIP text encoders, a cross-attention UNet),
but ~1M parameters and 32x32 px images (VAE factor 2, latent 4x16x16). Tests use them, and the harness uses them
for "stand-in" runs of the real model names: `build_tiny_sd(path)` writes a `save_pretrained` folder that
`tasks.models.load_pipeline("sd-turbo", path=...)` loads like the real weights.

Everything is seeded: the same call gives bit-identical weights on every machine with the same torch.
"""

from __future__ import annotations

from pathlib import Path

import torch

# A small closed vocabulary: the toy world's words plus the simple-animals prompt set and a few generic words.
# Words outside it map to <unk>; that is fine for random-weight pipelines.
WORDS = (
    "a an the of and with in on photo picture painting drawing image cat dog horse monkey rabbit zebra spider "
    "bird sheep deer cow goat lion tiger bear raccoon fox wolf lizard beetle ant butterfly fish shark whale "
    "dolphin squirrel mouse rat snake turtle frog chicken duck goose bee pig turkey fly llama camel bat gorilla "
    "hedgehog kangaroo red green blue yellow magenta cyan circle circles square squares triangle triangles one "
    "two three four park moon colored , ."
).split()

RESOLUTION = 32          # pixels; latent 16x16 with the factor-2 VAE
MAX_TOKENS = 16          # tokenizer model_max_length (CLIP uses 77; 16 keeps the text encoder tiny)
HIDDEN = 32              # text-encoder hidden size (both encoders)

# The turbo models' scheduler settings (HF `scheduler/scheduler_config.json` of sd-turbo / sdxl-turbo).
_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    timestep_spacing="trailing",
    steps_offset=1,
    # Not init arguments of the Euler schedulers; kept in the config (as in the real turbo configs) so that a
    # DDIMScheduler built from it has a finite last-step variance.
    set_alpha_to_one=False,
    clip_sample=False,
)


def build_tokenizer():
    """A CLIP-like word-level tokenizer: <|startoftext|> words <|endoftext|>, padded with <|endoftext|>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|startoftext|>", "<|endoftext|>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        model_max_length=MAX_TOKENS,
    )


def _text_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=HIDDEN,
    )


def _vae():
    from diffusers import AutoencoderKL

    # Two blocks -> downsampling factor 2**(2-1) = 2.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=RESOLUTION,
    )


def _finish(pipe, path):
    pipe.set_progress_bar_config(disable=True)
    if path is not None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(path)
    return pipe


def build_tiny_sd(path: str | Path | None = None, *, seed: int = 0):
    """Tiny random-weight `StableDiffusionPipeline` shaped like sd-turbo (EulerDiscreteScheduler, trailing).

    UNet ~1.0M params (cross-attention dim 32), VAE factor 2, 32x32 px. Saved with `save_pretrained` to `path`
    when given. Deterministic in `seed`.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = _vae()
    text_encoder = CLIPTextModel(_text_config(len(tokenizer)))
    scheduler = EulerDiscreteScheduler.from_config(_SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _finish(pipe, path)


def build_tiny_sdxl(path: str | Path | None = None, *, seed: int = 0):
    """Tiny random-weight `StableDiffusionXLPipeline` shaped like sdxl-turbo (EulerAncestral, trailing).

    Two text encoders (CLIPTextModel + CLIPTextModelWithProjection, hidden 32 each -> cross-attention dim 64),
    pooled text embeds + 6 micro-conditioning time ids, VAE factor 2, 32x32 px. Deterministic in `seed`.
    """
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * HIDDEN,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + HIDDEN,  # 6 time ids x 8 + pooled text dim
        norm_num_groups=32,
    )
    vae = _vae()
    text_encoder = CLIPTextModel(_text_config(len(tokenizer)))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(len(tokenizer_2)))
    scheduler = EulerAncestralDiscreteScheduler.from_config(_SCHEDULER_CONFIG)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _finish(pipe, path)


BUILDERS = {"sd": build_tiny_sd, "sdxl": build_tiny_sdxl}
