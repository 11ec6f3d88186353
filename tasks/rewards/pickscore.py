"""PickScore (Kirstain et al., 2023): a CLIP-H/14 fine-tuned on Pick-a-Pic human preferences.

score = logit_scale.exp() * cos(E_img(x), E_txt(prompt)) with the checkpoint's own logit scale
(exp = 100), i.e. the published "x100" convention (typical SD/SDXL values 18-24). Alternatives in use:
the raw cosine (~0.2; PSO/Diffusion-DPO `pickscore_utils.py` and SDPO log this as "PickScore") and a
softmax over candidate images for ranking. Multiply the raw cosine by 100 to compare.
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

MODEL_ID = "yuvalkirstain/PickScore_v1"
PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScoreReward(Reward):
    """PickScore v1 in transformers' CLIPModel.

    Scale: logit_scale.exp() (= 100) x cosine(image, prompt), as the PickScore authors publish.
    Options: `path` model (hub id or save_pretrained folder, default yuvalkirstain/PickScore_v1);
    `processor_path` tokenizer (default laion/CLIP-ViT-H-14-laion2B-s32B-b79K); `cache_dir`;
    `requires_grad` lets gradients reach the images (skips uint8 rounding).
    """

    name = "pickscore"
    scale = "PickScore: logit_scale.exp() (=100) x cosine, published x100 convention (~18-24 for SD)"

    def __init__(
        self, *, path: str = MODEL_ID, processor_path: str = PROCESSOR_ID, cache_dir: str | None = None,
        device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", batch_size: int = 16,
        requires_grad: bool = False,
    ):
        super().__init__(device=device, batch_size=batch_size)
        from transformers import AutoTokenizer, CLIPModel

        self.requires_grad = bool(requires_grad)
        self.dtype = parse_dtype(dtype)
        self.model = freeze(load_pretrained(
            self.name, CLIPModel, path, option="path", what="PickScore model", cache_dir=cache_dir, dtype=self.dtype,
        ))
        self.tokenizer = load_pretrained(
            self.name, AutoTokenizer, processor_path, option="processor_path", what="CLIP-H tokenizer",
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
        return self.model.logit_scale.exp().float() * cosine
