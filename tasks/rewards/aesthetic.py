"""LAION aesthetic predictor v2 ("improved aesthetic predictor", Schuhmann 2022) as used by DDPO and SDPO.

score = MLP(e / |e|), e = CLIP ViT-L/14 image embedding (projected, 768-d) of the 224 px CLIP-preprocessed
uint8 image. The MLP is the published `sac+logos+ava1-l14-linearMSE.pth` layout: five Linear layers with
dropout between the first four and no non-linearity (keys layers.0, layers.2, layers.4, layers.6,
layers.7; dropout sits at the odd indices 1, 3, 5).
"""

from __future__ import annotations

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
    pooled,
    resolve_file,
)

CLIP_ID = "openai/clip-vit-large-patch14"
# trl's copy of sac+logos+ava1-l14-linearMSE.pth (the file DDPO/SDPO ship in their assets).
MLP_REPO, MLP_FILE = "trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"


class AestheticReward(Reward):
    """LAION aesthetic predictor v2 on CLIP ViT-L/14 image embeddings.

    Scale: the predictor's raw output, a mean-opinion-score-like number on roughly 1-10 (as ddpo-pytorch
    and SDPO report it). Not normalised. The prompt is ignored.

    Options: `path` the MLP .pth (or a folder containing `aesthetic-model.pth`; default hub file
    trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth); `clip_path` the CLIP model (hub id or
    save_pretrained folder, default openai/clip-vit-large-patch14); `cache_dir` HF cache override;
    `requires_grad` lets gradients reach the images (skips uint8 rounding).
    """

    name = "aesthetic"
    scale = "LAION aesthetic predictor v2 raw output (~1-10), as ddpo-pytorch/SDPO; prompt ignored"

    def __init__(
        self, *, path: str | None = None, clip_path: str = CLIP_ID, cache_dir: str | None = None,
        device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", batch_size: int = 16,
        requires_grad: bool = False,
    ):
        super().__init__(device=device, batch_size=batch_size)
        from transformers import CLIPModel

        self.requires_grad = bool(requires_grad)
        self.dtype = parse_dtype(dtype)
        self.clip = freeze(load_pretrained(
            self.name, CLIPModel, clip_path, option="clip_path", what="CLIP ViT-L/14 model", cache_dir=cache_dir,
            dtype=self.dtype,
        ))
        mlp_file = resolve_file(self.name, path, MLP_REPO, MLP_FILE, cache_dir=cache_dir, what="aesthetic MLP")
        self.mlp = freeze(linear_head(load_state_dict(mlp_file)))
        embed_dim = self.clip.config.projection_dim
        if self.mlp[0].in_features != embed_dim:
            raise ValueError(f"aesthetic MLP expects {self.mlp[0].in_features}-d embeddings, CLIP gives {embed_dim}")
        self.image_size = self.clip.config.vision_config.image_size
        self.to(self.device, self.dtype)

    def modules(self) -> list[nn.Module]:
        return [self.clip, self.mlp]

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = clip_preprocess(images, self.image_size, quantize=not self.requires_grad)
        embeds = pooled(self.clip.get_image_features(pixel_values=pixels.to(self.dtype)))
        embeds = embeds / torch.linalg.vector_norm(embeds, dim=-1, keepdim=True)
        return self.mlp(embeds).squeeze(-1)
