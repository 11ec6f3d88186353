"""ImageReward v1.0 (Xu et al., 2023): BLIP ViT-L/16 + BERT text encoder with image cross-attention + MLP.

raw = MLP(h_[CLS]), h = BERT(prompt tokens, cross-attending to the ViT's patch tokens of the 224 px
CLIP-normalised image); score = (raw - 0.16717362830052426) / 1.03334 (the official `ImageReward.score`
normalisation). SDPO trains on the raw MLP output instead; (raw - mean)/std is an affine map, so the
two orderings agree but the numbers do not.

The `image-reward` package cannot run here (old timm/fairscale pins, OpenAI `clip`, hub download at
construction), so the published checkpoint (`ImageReward.pt`, a state dict with keys
`blip.visual_encoder.*`, `blip.text_encoder.*`, `mlp.layers.*`) is loaded into transformers'
BlipVisionModel and BlipTextModel (the latter is BLIP's own `med.py` BERT, with cross-attention), plus
the 5-Linear MLP head. The text encoder is called bidirectionally (`is_decoder=False`), as BLIP's
"multimodal" mode. Sizes are read from the tensors; text heads / eps / activation from
`med_config.json` beside the checkpoint (BERT-base values otherwise); vision heads = 16 (BLIP ViT-L).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.rewards.base import (
    Reward,
    clip_preprocess,
    freeze,
    linear_head,
    load_pretrained,
    load_state_dict,
    parse_dtype,
    resolve_file,
)

REPO, CHECKPOINT, MED_CONFIG = "THUDM/ImageReward", "ImageReward.pt", "med_config.json"
TOKENIZER_ID = "bert-base-uncased"  # BLIP's tokenizer (+[DEC], [ENC] which prompts never contain)
RAW_MEAN, RAW_STD = 0.16717362830052426, 1.0333394966054072
TEXT_MAX_LENGTH = 35  # ImageReward pads/truncates prompts to 35 tokens
VISION_HEADS = 16  # BLIP create_vit("large"): width 1024, 16 heads
MED_DEFAULTS = {"num_attention_heads": 12, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0}

# BLIP ViT (timm layout) block -> transformers BlipEncoderLayer
_VIT_BLOCK_RENAMES = {
    "norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}


def _blocks(keys: list[str], pattern: str) -> int:
    indices = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if indices != set(range(len(indices))):
        raise ValueError(f"non-contiguous layers for {pattern!r}: {sorted(indices)}")
    return len(indices)


def imagereward_to_transformers(
    state_dict: dict[str, torch.Tensor], med_config: dict[str, Any] | None = None, *, vision_heads: int = VISION_HEADS,
) -> tuple[Any, Any, dict[str, dict[str, torch.Tensor]]]:
    """ImageReward.pt state dict -> (BlipVisionConfig, BlipTextConfig, {"vision", "text", "mlp"} state dicts).

    Vision (BLIP/timm ViT -> BlipVisionModel): cls_token -> embeddings.class_embedding, pos_embed ->
    embeddings.position_embedding, patch_embed.proj -> embeddings.patch_embedding,
    blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2} -> encoder.layers.i.{layer_norm1,
    self_attn.qkv, self_attn.projection, layer_norm2, mlp.fc1, mlp.fc2}, norm -> post_layernorm (same
    fused [q; k; v] qkv layout, LayerNorm eps 1e-6). Text: med.py's BertModel keys are BlipTextModel's
    keys unchanged (no token-type embeddings in either); position_ids buffers are dropped. MLP: mlp.* as is.
    Other keys (BLIP's vision_proj/text_proj heads) are unused.
    """
    from transformers import BlipTextConfig, BlipVisionConfig

    med = {**MED_DEFAULTS, **(med_config or {})}
    vis = {k[len("blip.visual_encoder."):]: v for k, v in state_dict.items() if k.startswith("blip.visual_encoder.")}
    txt = {k[len("blip.text_encoder."):]: v for k, v in state_dict.items() if k.startswith("blip.text_encoder.")}
    mlp = {k[len("mlp."):]: v for k, v in state_dict.items() if k.startswith("mlp.")}
    for part, tensors in (("blip.visual_encoder", vis), ("blip.text_encoder", txt), ("mlp", mlp)):
        if not tensors:
            raise ValueError(f"not an ImageReward checkpoint: no '{part}.*' keys")

    width, patch = vis["cls_token"].shape[-1], vis["patch_embed.proj.weight"].shape[-1]
    grid = int(round((vis["pos_embed"].shape[1] - 1) ** 0.5))
    v_layers = _blocks(list(vis), r"blocks\.(\d+)\.")
    vision_config = BlipVisionConfig(
        hidden_size=width, intermediate_size=vis["blocks.0.mlp.fc1.weight"].shape[0], num_hidden_layers=v_layers,
        num_attention_heads=vision_heads, image_size=grid * patch, patch_size=patch, hidden_act="gelu",
        layer_norm_eps=1e-6,
    )
    vision = {
        "embeddings.class_embedding": vis["cls_token"],
        "embeddings.position_embedding": vis["pos_embed"],
        "embeddings.patch_embedding.weight": vis["patch_embed.proj.weight"],
        "embeddings.patch_embedding.bias": vis["patch_embed.proj.bias"],
        "post_layernorm.weight": vis["norm.weight"],
        "post_layernorm.bias": vis["norm.bias"],
    }
    for i in range(v_layers):
        for old, new in _VIT_BLOCK_RENAMES.items():
            for param in ("weight", "bias"):
                vision[f"encoder.layers.{i}.{new}.{param}"] = vis[f"blocks.{i}.{old}.{param}"]

    vocab, hidden = txt["embeddings.word_embeddings.weight"].shape
    text_config = BlipTextConfig(
        vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=width,
        intermediate_size=txt["encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=_blocks(list(txt), r"encoder\.layer\.(\d+)\."),
        num_attention_heads=int(med["num_attention_heads"]),
        max_position_embeddings=txt["embeddings.position_embeddings.weight"].shape[0],
        hidden_act=med["hidden_act"], layer_norm_eps=float(med["layer_norm_eps"]), pad_token_id=med["pad_token_id"],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, is_decoder=True,  # builds cross-attention
        bos_token_id=None, eos_token_id=None, sep_token_id=None,
    )
    text = {k: v for k, v in txt.items() if not k.endswith("position_ids") and not k.startswith("pooler.")}
    return vision_config, text_config, {"vision": vision, "text": text, "mlp": mlp}


class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attending BERT + MLP head; forward returns the raw reward (B,)."""

    def __init__(self, vision_config: Any, text_config: Any, mlp: nn.Sequential):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = mlp

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state  # (B, 1 + patches, width)
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        hidden = self.text(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask, is_decoder=False,
        ).last_hidden_state  # (B, L, hidden)
        return self.mlp(hidden[:, 0, :]).squeeze(-1)


def _find_med_config(checkpoint: str, med_config: str | None) -> dict[str, Any] | None:
    candidate = Path(med_config) if med_config else Path(checkpoint).with_name(MED_CONFIG)
    if med_config and not candidate.is_file():
        raise FileNotFoundError(f"reward 'imagereward': med_config file {med_config!r} does not exist")
    return json.loads(candidate.read_text()) if candidate.is_file() else None


class ImageRewardReward(Reward):
    """ImageReward v1.0 in transformers' BLIP modules.

    Scale: the official normalised score (raw - 0.16717) / 1.03334 (`ImageReward.score`; SDXL ~0.5-1.1).
    Options: `path` ImageReward.pt (or its folder; default hub THUDM/ImageReward); `med_config` the BERT
    config json (default: med_config.json beside the checkpoint, else BERT-base values); `tokenizer_path`
    (default bert-base-uncased); `cache_dir`; `requires_grad`.
    """

    name = "imagereward"
    scale = "ImageReward v1.0 official normalised score (raw - 0.16717) / 1.03334 (SDPO logs the raw output)"

    def __init__(
        self, *, path: str | None = None, med_config: str | None = None, tokenizer_path: str = TOKENIZER_ID,
        cache_dir: str | None = None, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
        batch_size: int = 16, requires_grad: bool = False,
    ):
        super().__init__(device=device, batch_size=batch_size)
        from transformers import AutoTokenizer

        self.requires_grad = bool(requires_grad)
        self.dtype = parse_dtype(dtype)
        self.tokenizer = load_pretrained(
            self.name, AutoTokenizer, tokenizer_path, option="tokenizer_path", what="BERT tokenizer",
            cache_dir=cache_dir,
        )
        checkpoint = resolve_file(self.name, path, REPO, CHECKPOINT, cache_dir=cache_dir, what="ImageReward checkpoint")
        vision_config, text_config, weights = imagereward_to_transformers(
            load_state_dict(checkpoint), _find_med_config(checkpoint, med_config)
        )
        model = ImageRewardModel(vision_config, text_config, linear_head(weights["mlp"]))
        model.vision.load_state_dict(weights["vision"], strict=True)
        model.text.load_state_dict(weights["text"], strict=True)
        self.model = freeze(model)
        self.image_size = vision_config.image_size
        self.to(self.device, self.dtype)

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def raw(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The MLP output before normalisation (SDPO's convention), (B,)."""
        pixels = clip_preprocess(images, self.image_size, quantize=not self.requires_grad)
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=TEXT_MAX_LENGTH,
                              return_tensors="pt")
        return self.model(pixels.to(self.dtype), text.input_ids.to(self.device), text.attention_mask.to(self.device))

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self.raw(images, prompts) - RAW_MEAN) / RAW_STD
