"""Between images and the sampler's space: VAE encoding and decoding for latent models, uint8."""

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
    z = _to_vae(latents / scale, vae)
    return vae.decode(z).sample.to(latents.dtype)


@torch.no_grad()
def encode_images(images: Tensor, vae: Any | None = None, scale: float = SD_VAE_SCALE) -> Tensor:
    """Encodes images in [-1, 1] into the sampler's space, the inverse of :func:`decode_latents`.

    Args:
        images: (B, C, H, W) images, float in [-1, 1].
        vae: a diffusers ``AutoencoderKL`` for latent models (the posterior mean is used, not a
            sample); None for pixel-space models.
        scale: latent scale factor the model was trained with.

    Returns:
        (B, C', h, w) scaled latents, or ``images`` itself without a VAE.
    """
    if vae is None:
        return images
    return (vae.encode(_to_vae(images, vae)).latent_dist.mean * scale).to(images.dtype)


def _to_vae(x: Tensor, vae: Any) -> Tensor:
    """``x`` on the VAE's device and in its dtype (e.g. an fp16 VAE fed float32 latents);
    unchanged for a VAE that does not say (anything with ``encode``/``decode``)."""
    dtype, device = getattr(vae, "dtype", None), getattr(vae, "device", None)
    if torch.is_autocast_enabled(x.device.type):  # autocast casts inside the VAE itself
        dtype = None
    return x.to(device=device, dtype=dtype)


def from_uint8(images: Tensor) -> Tensor:
    """uint8 images in [0, 255] to float32 in [-1, 1], the inverse of :func:`to_uint8`."""
    if images.dtype != torch.uint8:
        raise TypeError(
            f"from_uint8 takes uint8 images in [0, 255], got {images.dtype}: float images are "
            "expected in [-1, 1] already (from [0, 1]: images * 2 - 1)"
        )
    return images.float() / 127.5 - 1.0


def to_uint8(images: Tensor) -> Tensor:
    """Quantises images in [-1, 1] to uint8 in [0, 255] (clamped, rounded). Shape unchanged.

    Raises:
        ValueError: the images hold NaN or infinite values, which would quantise to black
            pixels without a word (a checkpoint with NaN weights, or a sampler that overflowed).
    """
    finite = torch.isfinite(images)
    if not bool(finite.all()):
        bad = int((~finite).flatten(1).any(1).sum()) if images.dim() > 1 else 1
        raise ValueError(
            f"{bad} of {len(images)} images hold NaN or infinite values: the networks' outputs "
            "are not finite. Check that the checkpoints hold finite weights, and sample in "
            "float32 (sampler.dtype=float32) if float16 overflowed"
        )
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
