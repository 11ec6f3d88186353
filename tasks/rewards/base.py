"""The Reward interface, its errors, CLIP-style image preprocessing in torch, and weight resolution.

Every reward maps images (B, 3, H, W) float in [0, 1] plus B prompts to a float32 Tensor[B], higher is
better. Reward models are frozen; scoring runs under no_grad unless the reward was loaded with
`requires_grad=True` (then gradients flow to the images, e.g. for reward back-propagation methods).

Weights are looked up without surprises: a local path wins; otherwise a hub id is resolved through the
Hugging Face cache, and with HF_HUB_OFFLINE=1 nothing is downloaded (`local_files_only=True`). A
missing file raises `MissingWeightsError` naming the hub id / file and the two ways to provide it.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# OpenAI CLIP normalisation, used by CLIP, OpenCLIP ViT-H-14 (HPSv2, PickScore) and ImageReward's BLIP.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class RewardOptionError(ValueError):
    """An option a reward does not accept (the message names it and the valid ones)."""


class MissingWeightsError(FileNotFoundError):
    """A reward's weights (or tokenizer/config) are neither at the given path nor in the HF cache."""


# --------------------------------------------------------------------------------------------------
# The interface


class Reward:
    """Base class: subclasses set `name` and `scale` and implement `score(images, prompts)`.

    `score` receives one chunk of at most `batch_size` images already on `self.device` and returns a
    Tensor[b]; `__call__` validates inputs, chunks, handles grad mode and returns float32 on the
    images' own device.
    """

    name: str = "reward"
    scale: str = ""  # one line: units and convention
    requires_grad: bool = False
    batch_size: int = 16

    def __init__(self, *, device: str | torch.device = "cpu", batch_size: int = 16):
        if int(batch_size) < 1:
            raise RewardOptionError(f"reward {self.name!r}: batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self._device = torch.device(device)

    # -- device handling ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    def modules(self) -> list[torch.nn.Module]:
        """The torch modules that `.to()` moves; weight-free rewards have none."""
        return []

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Reward:
        if device is not None:
            self._device = torch.device(device)
        if dtype is not None and hasattr(self, "dtype"):
            self.dtype = dtype  # model rewards cast their inputs to self.dtype
        for module in self.modules():
            module.to(device=self._device, dtype=dtype)
        return self

    # -- scoring -----------------------------------------------------------------------------------
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = check_inputs(self.name, images, prompts)
        out_device = images.device
        if images.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32, device=out_device)
        chunks = []
        with torch.set_grad_enabled(self.requires_grad and torch.is_grad_enabled()):
            for start in range(0, images.shape[0], self.batch_size):
                stop = start + self.batch_size
                scores = self.score(images[start:stop].to(self._device), prompts[start:stop])
                chunks.append(scores.reshape(-1).to(device=out_device, dtype=torch.float32))
        return torch.cat(chunks)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={str(self._device)!r}, scale={self.scale!r})"


def check_inputs(name: str, images: Any, prompts: Sequence[str]) -> list[str]:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"reward {name!r} expects images of shape (B, 3, H, W), got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"reward {name!r} expects float images in [0, 1], got dtype {images.dtype}")
    if isinstance(prompts, str):
        raise ValueError(f"reward {name!r} expects a list of prompts, got a single string")
    prompts = list(prompts)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"reward {name!r}: {images.shape[0]} images but {len(prompts)} prompts")
    return prompts


def check_options(name: str, factory: Any, options: dict[str, Any]) -> None:
    """Raise RewardOptionError for options the factory's signature does not accept."""
    params = inspect.signature(factory).parameters
    valid = [p for p, spec in params.items() if spec.kind is not inspect.Parameter.VAR_KEYWORD and p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(valid) if valid else "(none)"
        raise RewardOptionError(
            f"reward {name!r} has no option {', '.join(repr(u) for u in unknown)}; valid options: {listed}"
        )


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise RewardOptionError(f"dtype must be a floating torch dtype such as 'float32', got {dtype!r}")
    return value


# --------------------------------------------------------------------------------------------------
# Images as the authors feed them: uint8(round(clamp(x * 255))), PIL bicubic resize of the short side,
# center crop, CLIP mean/std. PIL's bicubic (a = -0.5, kernel widened by the scale when shrinking,
# uint8 rounding after each pass) is reproduced exactly with two weight matrices, so it runs on any
# device, batched, and is differentiable when quantisation is off.


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> uint8 with round(clamp(x * 255)), as every reward repo does."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def _quantize(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round() / 255


def _pil_bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@functools.lru_cache(maxsize=64)
def pil_bicubic_weights(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, in_size) float64 matrix of PIL's bicubic resampling coefficients (Resample.c).

    Cached: callers must not modify it in place (they only take `.to(...)` copies)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for out in range(out_size):
        center = (out + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        row = [_pil_bicubic((j - center + 0.5) / filter_scale) for j in range(lo, hi)]
        total = sum(row)
        for j, w in zip(range(lo, hi), row):
            weights[out, j] = w / total if total != 0.0 else w
    return weights


def resize_bicubic(images: torch.Tensor, height: int, width: int, *, quantize: bool = True) -> torch.Tensor:
    """PIL-equivalent bicubic resize of (B, C, H, W) in [0, 1]: horizontal pass, then vertical."""
    x = images
    in_h, in_w = x.shape[-2:]
    if width != in_w:
        w = pil_bicubic_weights(in_w, width).to(device=x.device, dtype=x.dtype)
        x = x @ w.T
        x = _quantize(x) if quantize else x
    if height != in_h:
        h = pil_bicubic_weights(in_h, height).to(device=x.device, dtype=x.dtype)
        x = torch.einsum("oh,bchw->bcow", h, x)
        x = _quantize(x) if quantize else x
    return x


def clip_preprocess(
    images: torch.Tensor,
    size: int = 224,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    quantize: bool = True,
    mode: str = "crop",
    resample: str = "pil",
) -> torch.Tensor:
    """CLIP's transform on tensors: (B, 3, H, W) in [0, 1] -> normalised (B, 3, size, size) float32.

    mode="crop": resize the short side to `size`, center crop (OpenAI CLIP, HF CLIPImageProcessor,
    ImageReward). mode="pad": resize the long side to `size` and pad with black (the HPSv2 fork's
    `ResizeMaxSize`). Both are the same map for square images. resample="pil": PIL bicubic on the
    uint8 image (result rounded to uint8), as CLIP/ImageReward/HF processors; resample="torch":
    torchvision's tensor resize (bicubic, antialias, no rounding), as the HPSv2 fork, which resizes
    after ToTensor. quantize=True starts from the uint8 image as the authors do; quantize=False skips
    all rounding so that gradients reach the pixels (used with requires_grad=True).
    """
    if mode not in ("crop", "pad"):
        raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
    if resample not in ("pil", "torch"):
        raise ValueError(f"resample must be 'pil' or 'torch', got {resample!r}")

    def resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if resample == "torch":
            return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        return resize_bicubic(x, height, width, quantize=quantize)

    x = images.float().clamp(0, 1)
    if quantize:
        x = _quantize(x)
    h, w = x.shape[-2:]
    if mode == "pad":
        scale = size / max(h, w)
        if scale != 1.0:
            new_h, new_w = round(h * scale), round(w * scale)
            x = resize(x, new_h, new_w)
            pad_h, pad_w = size - new_h, size - new_w
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    else:
        short, long = min(h, w), max(h, w)
        if short != size:
            new_long = int(size * long / short)  # torchvision / transformers rule for a single int size
            new_h, new_w = (size, new_long) if h <= w else (new_long, size)
            x = resize(x, new_h, new_w)
            h, w = new_h, new_w
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))  # torchvision CenterCrop
        x = x[..., top : top + size, left : left + size]
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


# --------------------------------------------------------------------------------------------------
# Weights: a local path, else the Hugging Face cache (never the network when HF_HUB_OFFLINE=1)


def hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    if flag.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub is a dependency of transformers
        return False


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(source: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else (absolute, ./, ~, deeper) is a local path."""
    return not _HUB_ID.match(source)


def missing_message(reward: str, what: str, source: str, option: str, filename: str | None = None) -> str:
    offline = hub_offline()
    target = f"file '{filename}' of hub repo '{source}'" if filename else f"hub repo '{source}'"
    cmd = f"hf download {source}" + (f" {filename}" if filename else "")
    return (
        f"reward {reward!r}: {what} not found: {target} is not in the local Hugging Face cache"
        + (" (HF_HUB_OFFLINE=1, so no download was attempted)" if offline else " and could not be downloaded")
        + f". Provide it either as a local path: tasks.rewards.load({reward!r}, {option}='/path/to/"
        + (filename if filename else "model_dir")
        + f"'), or put it in the HF cache (HF_HOME / HF_HUB_CACHE, or the cache_dir option) by running "
        f"`{cmd}` on a machine with network access."
    )


def resolve_file(
    reward: str, path: str | os.PathLike | None, repo_id: str, filename: str, *, option: str = "path",
    cache_dir: str | None = None, what: str = "weights",
) -> str:
    """A single checkpoint file: `path` (file, or folder holding `filename`) or hub `repo_id/filename`."""
    if path is not None:
        candidate = Path(path).expanduser()
        if candidate.is_dir():
            candidate = candidate / filename
        if not candidate.is_file():
            raise MissingWeightsError(
                f"reward {reward!r}: {what} file {str(candidate)!r} does not exist ({option}={str(path)!r}); "
                f"pass {option}= the file or a folder containing '{filename}', or omit {option} to use "
                f"hub file '{repo_id}/{filename}' from the Hugging Face cache."
            )
        return str(candidate)
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=hub_offline())
    except Exception as error:  # LocalEntryNotFoundError, HTTP and connection errors alike
        raise MissingWeightsError(missing_message(reward, what, repo_id, option, filename)) from error


def load_pretrained(
    reward: str, cls: Any, source: str, *, option: str, what: str, cache_dir: str | None = None, **kwargs: Any
) -> Any:
    """`cls.from_pretrained(source)` for a local folder or a hub id, offline-safe, clear error if missing."""
    local = Path(str(source)).expanduser()
    if local.exists():
        return cls.from_pretrained(str(local), local_files_only=True, **kwargs)
    if _looks_like_path(str(source)):
        raise MissingWeightsError(
            f"reward {reward!r}: {what} folder {str(source)!r} ({option}=) does not exist; pass {option}= an "
            f"existing save_pretrained folder or a hub id available in the Hugging Face cache."
        )
    try:
        return cls.from_pretrained(source, cache_dir=cache_dir, local_files_only=hub_offline(), **kwargs)
    except OSError as error:
        raise MissingWeightsError(missing_message(reward, what, str(source), option)) from error


def load_state_dict(file: str) -> dict[str, torch.Tensor]:
    """A .pt/.pth/.bin (torch pickle of tensors) or .safetensors file -> flat state dict."""
    if str(file).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"could not read {file!r} as a tensors-only checkpoint ({error}); convert it to a plain state dict"
        ) from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # HPSv2 / Lightning-style wrapper
    if not isinstance(state, dict):
        raise ValueError(f"{file!r} does not contain a state dict (got {type(state).__name__})")
    prefix = "module."  # DistributedDataParallel wrapper
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


LINEAR_INDICES = (0, 2, 4, 6, 7)
DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}


def linear_head(state_dict: dict[str, torch.Tensor]) -> nn.Sequential:
    """The 5-Linear MLP of the LAION aesthetic predictor and ImageReward (keys layers.{0,2,4,6,7}; no
    non-linearity, dropout at the odd indices), sized from its state dict and loaded."""
    expected = {f"layers.{i}.{p}" for i in LINEAR_INDICES for p in ("weight", "bias")}
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(
            f"not a 5-Linear MLP head state dict: missing {missing}, unexpected {unexpected}; "
            f"expected keys {sorted(expected)}"
        )
    layers: list[nn.Module] = []
    for index in range(max(LINEAR_INDICES) + 1):
        if index in LINEAR_INDICES:
            out_features, in_features = state_dict[f"layers.{index}.weight"].shape
            layers.append(nn.Linear(in_features, out_features))
        else:
            layers.append(nn.Dropout(DROPOUTS[index]))
    mlp = nn.Sequential(*layers)
    holder = nn.Module()
    holder.layers = mlp
    holder.load_state_dict(state_dict)
    return mlp


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def pooled(output: Any) -> torch.Tensor:
    """transformers 5 returns model outputs from get_*_features (pooler_output = projected); 4.x tensors."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def clip_cosine(model: Any, tokenizer: Any, pixel_values: torch.Tensor, prompts: list[str], max_length: int) -> torch.Tensor:
    """Cosine similarity between each image and its own prompt under a transformers CLIPModel: (B,)."""
    device = pixel_values.device
    text = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    image_embeds = pooled(model.get_image_features(pixel_values=pixel_values.to(model.dtype)))
    text_embeds = pooled(
        model.get_text_features(input_ids=text.input_ids.to(device), attention_mask=text.attention_mask.to(device))
    )
    image_embeds = F.normalize(image_embeds.float(), dim=-1)
    text_embeds = F.normalize(text_embeds.float(), dim=-1)
    return (image_embeds * text_embeds).sum(-1)


def text_max_length(tokenizer: Any, model_max: int) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    return min(model_max, limit) if isinstance(limit, int) and 0 < limit < 10**6 else model_max
