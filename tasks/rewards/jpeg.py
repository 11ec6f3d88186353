"""JPEG (in)compressibility, the weight-free rewards of DDPO (Black et al., 2023).

The image is converted to uint8 with round(clamp(x * 255)), saved by PIL as JPEG at quality 95 and its
size measured in kB (bytes / 1000, as ddpo-pytorch's `rewards.py`). Compressibility is the negated size,
incompressibility the size itself. Blank images are the most compressible: on its own this reward is
trivially hacked, which is why the harness always reports the other rewards beside it.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from tasks.rewards.base import Reward, to_uint8

JPEG_QUALITY = 95


def jpeg_size_kb(images: torch.Tensor, quality: int = JPEG_QUALITY) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B,) float32 JPEG file sizes in kB (1 kB = 1000 bytes)."""
    from PIL import Image

    pixels = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3) uint8
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegCompressibility(Reward):
    """-kB of the uint8 image saved as JPEG quality 95 (DDPO's "compressibility"); prompts are ignored.

    Scale: negative kilobytes (1 kB = 1000 bytes), as ddpo-pytorch. No alternative convention is in use.
    """

    name = "jpeg-compressibility"
    scale = "-kB of the uint8 image as JPEG quality 95 (ddpo-pytorch convention; higher = smaller file)"
    sign = -1.0

    def __init__(self, *, device: str | torch.device = "cpu", batch_size: int = 64):
        super().__init__(device=device, batch_size=batch_size)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.sign * jpeg_size_kb(images).to(images.device)


class JpegIncompressibility(JpegCompressibility):
    """+kB of the uint8 image saved as JPEG quality 95 (DDPO's "incompressibility"); prompts are ignored."""

    name = "jpeg-incompressibility"
    scale = "+kB of the uint8 image as JPEG quality 95 (ddpo-pytorch convention; higher = larger file)"
    sign = 1.0
