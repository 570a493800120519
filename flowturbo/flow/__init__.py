"""The linear flow path and the training losses, as pure functions.

Convention (SiT's): x_t = t x1 + (1 - t) x0 with x0 ~ N(0, I) noise at t = 0 and x1 data at
t = 1; the target velocity is u = x1 - x0. Randomness (noise, times, step sizes) is drawn by the
caller and passed in, so every function here is deterministic and testable; none mutates its
inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) matching x's rank."""
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """The point x_t = t x1 + (1 - t) x0. x0, x1 (B, ...), t (B,) -> (B, ...)."""
    tb = _bcast(t, x1)
    return tb * x1 + (1 - tb) * x0


def target_velocity(x0: Tensor, x1: Tensor) -> Tensor:
    """The conditional velocity u = x1 - x0 of the linear path. (B, ...) -> (B, ...)."""
    return x1 - x0


def _mse(pred: Tensor, target: Tensor, per_sample: bool) -> Tensor:
    """Mean squared error in float32: a scalar, or (B,) means over each sample's elements."""
    error = F.mse_loss(pred.float(), target.float(), reduction="none" if per_sample else "mean")
    return error.flatten(1).mean(1) if per_sample else error


def flow_matching_loss(
    model: Callable[..., Tensor],
    x1: Tensor,
    x0: Tensor,
    t: Tensor,
    *,
    per_sample: bool = False,
    **model_kwargs: Any,
) -> Tensor:
    """Flow-matching loss: mean squared error between model(x_t, t) and x1 - x0.

    Args:
        model: ``model(x, t, **model_kwargs) -> v``.
        x1: (B, C, H, W) data.
        x0: (B, C, H, W) noise.
        t: (B,) times in [0, 1].
        per_sample: return each sample's loss (B,) instead of the batch mean.

    Returns:
        Scalar loss, or (B,) with ``per_sample``.
    """
    v = model(interpolate(x0, x1, t), t, **model_kwargs)
    return _mse(v, target_velocity(x0, x1), per_sample)


def sample_step_sizes(t: Tensor, dt_max: float, u: Tensor) -> Tensor:
    """Step sizes dt in (0, dt_max] with t + dt <= 1, from uniforms u in [0, 1).

    Args:
        t: (B,) times in [0, 1).
        dt_max: largest step (0.12 in the public FlowTurbo code; a config value here).
        u: (B,) uniform samples in [0, 1).

    Returns:
        (B,) step sizes ``(1 - u) * min(dt_max, 1 - t)``.
    """
    if dt_max <= 0:
        raise ValueError(f"dt_max must be > 0, got {dt_max}")
    return (1 - u) * torch.clamp(1 - t, max=dt_max)


@dataclass(frozen=True)
class RefinerBatch:
    """One batch of refiner training examples.

    The refiner sees (x, t, v) and must predict ``target`` = V(x, t) - v.

    Attributes:
        x: (B, C, H, W) the point the refiner is evaluated at.
        t: (B,) its time.
        v: (B, C, H, W) the velocity the refiner is given.
        target: (B, C, H, W) the velocity change it should predict.
    """

    x: Tensor
    t: Tensor
    v: Tensor
    target: Tensor


@torch.no_grad()
def interpolant_refiner_batch(
    base: Callable[..., Tensor],
    x1: Tensor,
    x0: Tensor,
    t: Tensor,
    dt: Tensor,
    **model_kwargs: Any,
) -> RefinerBatch:
    """Interpolant targets (the paper's): two frozen-base evaluations per example.

    v = V(x_t, t) on the path; x' = x_t + dt v, t' = t + dt; target = V(x', t') - v.

    Args:
        base: the frozen base, ``base(x, t, **model_kwargs) -> v``.
        x1, x0: (B, C, H, W) data and noise.
        t: (B,) times; dt: (B,) step sizes with t + dt <= 1.
    """
    x_t = interpolate(x0, x1, t)
    v = base(x_t, t, **model_kwargs)
    x_next = x_t + _bcast(dt, x_t) * v
    t_next = t + dt
    return RefinerBatch(x_next, t_next, v, base(x_next, t_next, **model_kwargs) - v)


def trajectory_refiner_batch(x_b: Tensor, t_b: Tensor, v_a: Tensor, v_b: Tensor) -> RefinerBatch:
    """Trajectory-cache targets: two cached points a < b of one base trajectory, no base call.

    The refiner at (x_b, t_b) is given the earlier velocity v_a and must predict v_b - v_a.

    Args:
        x_b: (B, C, H, W) state at the later time; t_b: (B,) that time.
        v_a, v_b: (B, C, H, W) base velocities at the earlier and the later point.
    """
    return RefinerBatch(x_b, t_b, v_a, v_b - v_a)


def refiner_loss(
    refiner: Callable[..., Tensor],
    batch: RefinerBatch,
    *,
    per_sample: bool = False,
    **model_kwargs: Any,
) -> Tensor:
    """Velocity-difference regression: MSE between R(x, t, v) and the target.

    Scalar, or each example's (B,) with ``per_sample``.
    """
    pred = refiner(batch.x, batch.t, batch.v, **model_kwargs)
    return _mse(pred, batch.target, per_sample)


__all__ = [
    "RefinerBatch",
    "flow_matching_loss",
    "interpolant_refiner_batch",
    "interpolate",
    "refiner_loss",
    "sample_step_sizes",
    "target_velocity",
    "trajectory_refiner_batch",
]
