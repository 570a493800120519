"""Editing and inpainting existing images with any FlowTurbo schedule or baseline step plan.

Both start from an image x1 in the model's space (pixels, or VAE latents for a latent model) and
the same noise x0 a plain sample would use; the linear path x_t = t x1 + (1 - t) x0 is the one
every model here is trained on.

- :func:`edit` (SDEdit, Meng et al., ICLR 2022, for flows): start from the noised image
  x_{t0} at t0 = 1 - strength and integrate to t = 1 with the schedule's steps spread over
  [t0, 1]. A new class label turns one image into another; ``strength`` trades faithfulness
  to the input for freedom to change it.
- :func:`inpaint` (replacement, as in RePaint without resampling): integrate from noise and,
  after every step, put the known pixels back on their path, x_t = t x1 + (1 - t) x0, and the
  cached velocity there to the path's velocity x1 - x0, so that P and R steps, which reuse the
  cache, see the known region consistently. The generated region follows the model, guided by
  the known one through the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flowturbo.flow import interpolate, target_velocity
from flowturbo.sampling.sampler import Callback, RefinerInput, VelocityFn, integrate
from flowturbo.sampling.schedule import Schedule, check_grid, parse_schedule, uniform_grid


def edit(
    model: VelocityFn,
    image: Tensor,
    noise: Tensor,
    schedule: str | Schedule,
    *,
    strength: float,
    refiner: VelocityFn | None = None,
    refiner_input: RefinerInput = "d0",
    compile: bool | str | dict[str, Any] = False,
    callback: Callback | None = None,
    progress: bool = False,
    **model_kwargs: Any,
) -> Tensor:
    """Re-generates ``image`` from its partially noised state (SDEdit for flows).

    Starts at t0 = 1 - ``strength`` from x_{t0} = t0 image + (1 - t0) noise and runs the
    schedule's N steps on the uniform grid from t0 to 1. ``strength=1`` is plain sampling from
    ``noise``; small strengths keep the image's layout, large ones follow the label.

    Args:
        model: base velocity, ``model(x, t, **model_kwargs) -> v``.
        image: (B, C, H, W) images in the model's space (VAE latents for a latent model).
        noise: (B, C, H, W) Gaussian noise, the x0 of the path through ``image``.
        schedule: e.g. ``"H4"``, ``"H1P3R2"``; all N steps are spent on [t0, 1].
        strength: in (0, 1], how much of the path is re-generated.
        refiner, refiner_input, compile, callback, progress: as for :func:`sample`.
        **model_kwargs: e.g. ``y=new_labels``.

    Returns:
        (B, C, H, W) edited images in the model's space.
    """
    if not 0.0 < float(strength) <= 1.0:
        raise ValueError(
            f"strength must be in (0, 1] (1: sample from noise, near 0: keep the image), "
            f"got {strength}"
        )
    _check_same_shape(image=image, noise=noise)
    sched = parse_schedule(schedule)
    t0 = 1.0 - float(strength)
    ts = t0 + (1.0 - t0) * uniform_grid(sched.num_steps)
    ts[-1] = 1.0
    x = interpolate(noise, image.to(noise), torch.tensor(t0, dtype=torch.float64))
    return integrate(
        sched.plan,
        model,
        x,
        refiner=refiner,
        timesteps=ts,
        refiner_input=refiner_input,
        compile=compile,
        callback=callback,
        progress=progress,
        desc=f"edit {sched.text}",
        **model_kwargs,
    )


def inpaint(
    model: VelocityFn,
    image: Tensor,
    mask: Tensor,
    noise: Tensor,
    schedule: str | Schedule,
    *,
    refiner: VelocityFn | None = None,
    timesteps: Tensor | Sequence[float] | None = None,
    refiner_input: RefinerInput = "d0",
    compile: bool | dict[str, Any] = False,
    callback: Callback | None = None,
    progress: bool = False,
    **model_kwargs: Any,
) -> Tensor:
    """Fills the masked region of ``image`` with the model, keeping the rest exactly.

    Args:
        model: base velocity, ``model(x, t, **model_kwargs) -> v``.
        image: (B, C, H, W) images in the model's space (VAE latents for a latent model).
        mask: 1 where new content is generated, 0 where ``image`` is kept (as in diffusers'
            inpainting); shape (B or 1, 1 or C, h, w). A mask of another resolution (a pixel
            mask for a latent model) is resized: a cell is generated if any pixel it covers is.
        noise: (B, C, H, W) Gaussian noise at t = 0.
        schedule: any FlowTurbo schedule (``"H8"``, ``"H1P5R3"``).
        timesteps: optional grid of N + 1 increasing times from 0 (default k / N).
        refiner, refiner_input, callback, progress: as for :func:`sample`.
        compile: False, or True / a dict of ``torch.compile`` options (each step kind compiled;
            the replacement after each step runs eagerly). The one-program ``"sampler"`` mode
            holds no per-call image or mask and is refused.
        **model_kwargs: e.g. ``y=labels``.

    Returns:
        (B, C, H, W) images equal to ``image`` where ``mask`` is 0.
    """
    if compile == "sampler":
        raise ValueError(
            "inpaint replaces the known pixels after every step, which compile='sampler' "
            "cannot hold: use compile=True (each step kind compiled)"
        )
    _check_same_shape(image=image, noise=noise)
    if image.dim() != 4:
        raise ValueError(
            f"inpaint takes images of shape (B, C, H, W), got {tuple(image.shape)}"
            + (": add the batch dimension, image[None]" if image.dim() == 3 else "")
        )
    sched = parse_schedule(schedule)
    n = sched.num_steps
    ts = uniform_grid(n) if timesteps is None else check_grid(timesteps, n)
    if float(ts[0]) != 0.0 or float(ts[-1]) != 1.0:
        raise ValueError(
            "inpaint integrates from noise to the image: timesteps must start at 0 and end "
            f"at 1, got {ts[0].item():g} to {ts[-1].item():g}"
        )
    generate = resize_mask(mask, image.shape).to(noise)  # noise's dtype and device
    keep = 1.0 - generate
    x1 = image.to(noise)
    path_velocity = target_velocity(noise, x1)

    def replace_known(x: Tensor, c: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        known = interpolate(noise, x1, t)  # t: the step's end time, 0-dim
        return generate * x + keep * known, generate * c + keep * path_velocity

    # The start, t = 0, is the noise itself: already on every known pixel's path.
    return integrate(
        sched.plan,
        model,
        noise,
        refiner=refiner,
        timesteps=ts,
        refiner_input=refiner_input,
        compile=compile,
        callback=callback,
        progress=progress,
        desc=f"inpaint {sched.text}",
        constrain=replace_known,
        **model_kwargs,
    )


def resize_mask(mask: Tensor, shape: torch.Size | Sequence[int]) -> Tensor:
    """A {0, 1} mask broadcastable to ``shape`` (B, C, H, W), resized if its H, W differ.

    Resizing marks a cell 1 if any pixel it covers is non-zero (so a latent cell over a
    region to be generated is generated); a smaller mask is enlarged by repeating cells.

    Args:
        mask: (B or 1, 1 or C, h, w) or (h, w) tensor; non-zero means "generate".
        shape: the images' (B, C, H, W).

    Returns:
        (B or 1, 1 or C, H, W) float tensor of 0s and 1s.
    """
    b, c, h, w = shape
    m = torch.as_tensor(mask)
    if m.dim() == 2:
        m = m[None, None]
    if m.dim() != 4 or m.shape[0] not in (1, b) or m.shape[1] not in (1, c):
        raise ValueError(
            f"mask must have shape (B or 1, 1 or C, h, w) or (h, w) for images of shape "
            f"{tuple(shape)}, got {tuple(m.shape)}"
        )
    m = (m != 0).float()
    if m.shape[-2:] != (h, w):
        m = F.adaptive_max_pool2d(m, (h, w))  # max over the pixels each cell covers
    return m


def _check_same_shape(**tensors: Tensor) -> None:
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(
                f"{name} must be a floating-point tensor in the model's space, got {got}"
                + (
                    ": convert uint8 images with from_uint8 (then encode_images for a latent "
                    "model)"
                    if got == torch.uint8
                    else ""
                )
            )
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"these must have one shape, (B, C, H, W) in the model's space: {listed}")
