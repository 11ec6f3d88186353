"""HPSv2 (Wu et al., 2023): OpenCLIP ViT-H/14 fine-tuned on Human Preference Dataset v2.

score = 100 * cos(E_img(x), E_txt(prompt)) with the HPS_v2_compressed.pt weights (v2.0; v2.1 with
`version="v2.1"`). The official `hpsv2.score` returns the raw cosine (~0.2-0.35); papers report it x100
("26.95", "28.16"), which is the convention here. HPS v2.0 and v2.1 give different numbers
(tgxs002/HPSv2#43): the version is part of the reward's `scale` string so it is recorded with results.

open_clip (and its torchvision dependency) cannot be installed beside our torch, so the OpenCLIP state
dict is converted to transformers' CLIPModel by `openclip_to_transformers` below; architecture sizes are
read from the tensors, attention heads from ViT-H-14's config (16 vision, 16 text). The HPSv2 fork
preprocesses with ToTensor, then ResizeMaxSize (tensor bicubic resize of the long side to 224, black
padding), then OpenAI CLIP mean/std; for square images the padding is a no-op. Text: the OpenCLIP BPE tokenizer, which is the tokenizer of
laion/CLIP-ViT-H-14-laion2B-s32B-b79K (context 77).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from tasks.rewards.base import (
    Reward,
    clip_cosine,
    clip_preprocess,
    freeze,
    load_pretrained,
    load_state_dict,
    parse_dtype,
    resolve_file,
    text_max_length,
)

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
TOKENIZER_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
VIT_H14_HEADS = (16, 16)  # (vision, text): widths 1280 / 1024 with head widths 80 / 64

# OpenCLIP keys that carry no weights we need (buffers rebuilt by transformers).
_IGNORED = re.compile(r"^(attn_mask|visual\.attn_mask|.*\.attn_mask)$")

# Per-block renames, OpenCLIP residual block -> transformers CLIPEncoderLayer (qkv split separately).
_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    if indices != set(range(len(indices))):
        raise ValueError(f"non-contiguous transformer blocks under {prefix!r}: {sorted(indices)}")
    return len(indices)


def _convert_blocks(sd: dict[str, torch.Tensor], used: set[str], src: str, dst: str, n: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i in range(n):
        s, d = f"{src}{i}.", f"{dst}{i}."
        for param in ("weight", "bias"):
            fused = sd[f"{s}attn.in_proj_{param}"]  # rows: [q; k; v]
            used.add(f"{s}attn.in_proj_{param}")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.chunk(3, dim=0)):
                out[f"{d}self_attn.{name}.{param}"] = part.clone()
            for old, new in _BLOCK_RENAMES.items():
                out[f"{d}{new}.{param}"] = sd[f"{s}{old}.{param}"]
                used.add(f"{s}{old}.{param}")
    return out


def openclip_to_transformers(
    state_dict: dict[str, torch.Tensor], *, vision_heads: int = VIT_H14_HEADS[0], text_heads: int = VIT_H14_HEADS[1],
    hidden_act: str = "gelu", layer_norm_eps: float = 1e-5, eos_token_id: int = 49407,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """OpenCLIP ViT CLIP state dict -> (transformers CLIPConfig, CLIPModel state dict).

    Mapping (OpenCLIP -> transformers): visual.conv1 -> vision_model.embeddings.patch_embedding;
    visual.class_embedding / positional_embedding -> embeddings.class_embedding / position_embedding;
    ln_pre -> pre_layrnorm; resblocks.i.{ln_1, attn.in_proj (split q/k/v), attn.out_proj, ln_2,
    mlp.c_fc, mlp.c_proj} -> layers.i.{layer_norm1, self_attn.{q,k,v}_proj, self_attn.out_proj,
    layer_norm2, mlp.fc1, mlp.fc2}; ln_post -> post_layernorm; proj (width, dim) -> visual_projection.weight
    = proj.T. Text likewise, with token_embedding, positional_embedding, ln_final -> final_layer_norm and
    text_projection.T; logit_scale is copied. Keys that are neither mapped nor ignorable buffers raise
    (e.g. layer-scale or attention-pooling variants, which this conversion does not support).
    """
    from transformers import CLIPConfig

    sd, used = state_dict, set()

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise KeyError(f"OpenCLIP state dict lacks {key!r}")
        used.add(key)
        return sd[key]

    patch = take("visual.conv1.weight")  # (width, 3, p, p), no bias in OpenCLIP ViTs
    v_width, p = patch.shape[0], patch.shape[-1]
    grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    v_layers = _count_blocks(sd, "visual.transformer.resblocks.")
    t_layers = _count_blocks(sd, "transformer.resblocks.")
    vocab, t_width = sd["token_embedding.weight"].shape
    context = sd["positional_embedding"].shape[0]
    proj_dim = sd["visual.proj"].shape[1]
    if sd["text_projection"].shape[1] != proj_dim:
        raise ValueError("visual.proj and text_projection have different output sizes")

    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=t_width, num_hidden_layers=t_layers, num_attention_heads=text_heads,
            intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            max_position_embeddings=context, hidden_act=hidden_act, layer_norm_eps=layer_norm_eps,
            eos_token_id=eos_token_id, projection_dim=proj_dim,
        ),
        vision_config=dict(
            hidden_size=v_width, num_hidden_layers=v_layers, num_attention_heads=vision_heads,
            intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            image_size=grid * p, patch_size=p, hidden_act=hidden_act, layer_norm_eps=layer_norm_eps,
            projection_dim=proj_dim,
        ),
        projection_dim=proj_dim,
    )

    out = {
        "vision_model.embeddings.patch_embedding.weight": patch,
        "vision_model.embeddings.class_embedding": take("visual.class_embedding"),
        "vision_model.embeddings.position_embedding.weight": take("visual.positional_embedding"),
        "vision_model.pre_layrnorm.weight": take("visual.ln_pre.weight"),
        "vision_model.pre_layrnorm.bias": take("visual.ln_pre.bias"),
        "vision_model.post_layernorm.weight": take("visual.ln_post.weight"),
        "vision_model.post_layernorm.bias": take("visual.ln_post.bias"),
        "visual_projection.weight": take("visual.proj").T.contiguous(),
        "text_model.embeddings.token_embedding.weight": take("token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight": take("positional_embedding"),
        "text_model.final_layer_norm.weight": take("ln_final.weight"),
        "text_model.final_layer_norm.bias": take("ln_final.bias"),
        "text_projection.weight": take("text_projection").T.contiguous(),
        "logit_scale": take("logit_scale").reshape(()),
    }
    out.update(_convert_blocks(sd, used, "visual.transformer.resblocks.", "vision_model.encoder.layers.", v_layers))
    out.update(_convert_blocks(sd, used, "transformer.resblocks.", "text_model.encoder.layers.", t_layers))
    leftover = sorted(k for k in sd if k not in used and not _IGNORED.match(k))
    if leftover:
        raise ValueError(f"unsupported OpenCLIP keys (architecture variant not handled): {leftover[:10]}")
    return config, out


class HPSv2Reward(Reward):
    """Human Preference Score v2 on transformers' CLIPModel converted from the OpenCLIP checkpoint.

    Scale: 100 x cosine(image, prompt) (papers' convention; the hpsv2 package returns the raw cosine).
    Options: `version` "v2.0" (HPS_v2_compressed.pt, default) or "v2.1" (HPS_v2.1_compressed.pt);
    `path` the checkpoint file (or folder containing it; default hub xswu/HPSv2); `tokenizer_path`
    (default laion/CLIP-ViT-H-14-laion2B-s32B-b79K); `cache_dir`; `requires_grad`.
    """

    name = "hpsv2"
    scale = "HPSv2: 100 x cosine(image, prompt) (papers' x100 convention; raw ~0.2-0.35)"

    def __init__(
        self, *, version: str = "v2.0", path: str | None = None, tokenizer_path: str = TOKENIZER_ID,
        cache_dir: str | None = None, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
        batch_size: int = 16, requires_grad: bool = False,
    ):
        super().__init__(device=device, batch_size=batch_size)
        if version not in HPS_FILES:
            raise ValueError(f"reward 'hpsv2': unknown version {version!r}; available: {', '.join(HPS_FILES)}")
        from transformers import AutoTokenizer, CLIPModel

        self.version = version
        self.scale = f"HPS{version}: 100 x cosine(image, prompt) (papers' x100 convention; raw ~0.2-0.35)"
        self.requires_grad = bool(requires_grad)
        self.dtype = parse_dtype(dtype)
        self.tokenizer = load_pretrained(
            self.name, AutoTokenizer, tokenizer_path, option="tokenizer_path", what="OpenCLIP ViT-H-14 tokenizer",
            cache_dir=cache_dir,
        )
        checkpoint = resolve_file(self.name, path, HPS_REPO, HPS_FILES[version], cache_dir=cache_dir,
                                  what=f"HPS {version} checkpoint")
        eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 49407
        config, weights = openclip_to_transformers(load_state_dict(checkpoint), eos_token_id=eos)
        model = CLIPModel(config)
        model.load_state_dict(weights, strict=True)
        self.model = freeze(model)
        self.image_size = config.vision_config.image_size
        self.max_length = text_max_length(self.tokenizer, config.text_config.max_position_embeddings)
        self.to(self.device, self.dtype)

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = clip_preprocess(images, self.image_size, quantize=not self.requires_grad, mode="pad", resample="torch")
        return 100.0 * clip_cosine(self.model, self.tokenizer, pixels, prompts, self.max_length)
