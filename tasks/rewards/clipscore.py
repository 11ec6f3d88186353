"""CLIPScore: prompt-image agreement under OpenAI CLIP ViT-L/14 (openai/clip-vit-large-patch14).

score = 100 * max(cos(E_img(x), E_txt(prompt)), 0), the torchmetrics `CLIPScore` convention (Hessel et
al.'s CLIP-S with weight 100 instead of 2.5). Alternatives in use: Hessel et al. 2021 use
2.5 * max(cos, 0) with ViT-B/32; Diffusion-Sharpening's `rewards.py` 100 * cos unclipped with ViT-L/14;
Diffusion-DPO/PSO `clip_utils.py` the raw cosine. For cos > 0 they differ only by a constant factor.
"""

from __future__ import annotations

import torch

from tasks.rewards.base import (
    Reward,
    clip_cosine,
    clip_preprocess,
    freeze,
    load_pretrained,
    parse_dtype,
    text_max_length,
)

MODEL_ID = "openai/clip-vit-large-patch14"


class ClipScoreReward(Reward):
    """CLIPScore with OpenAI CLIP ViT-L/14 in transformers' CLIPModel.

    Scale: 100 * max(cosine, 0) (torchmetrics CLIPScore). Options: `path` model + tokenizer (hub id or
    save_pretrained folder, default openai/clip-vit-large-patch14); `tokenizer_path` (default = path);
    `cache_dir`; `requires_grad` lets gradients reach the images (skips uint8 rounding).
    """

    name = "clipscore"
    scale = "CLIPScore: 100 * max(cosine, 0) with CLIP ViT-L/14 (torchmetrics convention)"

    def __init__(
        self, *, path: str = MODEL_ID, tokenizer_path: str | None = None, cache_dir: str | None = None,
        device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", batch_size: int = 16,
        requires_grad: bool = False,
    ):
        super().__init__(device=device, batch_size=batch_size)
        from transformers import AutoTokenizer, CLIPModel

        self.requires_grad = bool(requires_grad)
        self.dtype = parse_dtype(dtype)
        self.model = freeze(load_pretrained(
            self.name, CLIPModel, path, option="path", what="CLIP ViT-L/14 model", cache_dir=cache_dir,
            dtype=self.dtype,
        ))
        self.tokenizer = load_pretrained(
            self.name, AutoTokenizer, tokenizer_path or path, option="tokenizer_path", what="CLIP tokenizer",
            cache_dir=cache_dir,
        )
        self.image_size = self.model.config.vision_config.image_size
        self.max_length = text_max_length(self.tokenizer, self.model.config.text_config.max_position_embeddings)
        self.to(self.device)

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = clip_preprocess(images, self.image_size, quantize=not self.requires_grad)
        cosine = clip_cosine(self.model, self.tokenizer, pixels, prompts, self.max_length)
        return 100.0 * cosine.clamp(min=0.0)
