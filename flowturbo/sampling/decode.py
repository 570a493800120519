"""From the sampler's output to images: VAE decoding for latent models, uint8 quantisation."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: Stable Diffusion VAE latent scale used by SiT/DiT (latents = scale * encoder mean).
SD_VAE_SCALE = 0.18215


@torch.no_grad()
def decode_latents(latents: Tensor, vae: Any | None = None, scale: float = SD_VAE_SCALE) -> Tensor:
    """Decodes sampler outputs to images in [-1, 1].

    Args:
        latents: (B, C, h, w) sampler output.
        vae: a diffusers ``AutoencoderKL`` (or anything with ``decode(z).sample``) for latent
            models; None for pixel-space models, whose output is already the image.
        scale: latent scale factor the model was trained with.

    Returns:
        (B, 3 or C, H, W) images, float, nominally in [-1, 1].
    """
    if vae is None:
        return latents
    return vae.decode(latents / scale).sample


def to_uint8(images: Tensor) -> Tensor:
    """Quantises images in [-1, 1] to uint8 in [0, 255] (clamped, rounded). Shape unchanged."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
