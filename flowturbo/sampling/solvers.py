"""Baseline ODE solvers under one call, and an adaptive Dormand-Prince reference.

Fixed-step baselines share :func:`~flowturbo.sampling.sampler.integrate` with the FlowTurbo
sampler (same loop, grid, compilation and callbacks), so comparisons are like for like:
``solver(model, noise, steps, *, timesteps=None, compile=False, callback=None, progress=False,
**model_kwargs) -> Tensor``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from flowturbo.sampling.sampler import Callback, VelocityFn, integrate
from flowturbo.sampling.schedule import check_full_grid, plan_nfe, time_dtype, uniform_grid


def _num_steps(name: str, steps: int) -> int:
    """``steps`` as an int >= 1; a float, a string or a schedule is refused, not truncated."""
    try:
        n = operator.index(steps)  # ints, numpy ints and integer 0-dim tensors; not 2.5
    except TypeError:
        hint = " (for a schedule such as 'H2P4R3' use sample)" if isinstance(steps, str) else ""
        raise TypeError(
            f"{name}: steps must be an integer number of steps, got {steps!r}{hint}"
        ) from None
    if n < 1:
        raise ValueError(f"{name}: steps must be >= 1, got {n}")
    return n


def _fixed_step(letter: str, name: str) -> Callable[..., Tensor]:
    def solver(
        model: VelocityFn,
        noise: Tensor,
        steps: int,
        *,
        timesteps: Tensor | Sequence[float] | None = None,
        compile: bool | str | dict[str, Any] = False,
        callback: Callback | None = None,
        progress: bool = False,
        **model_kwargs: Any,
    ) -> Tensor:
        steps = _num_steps(name, steps)
        return integrate(
            letter * steps,
            model,
            noise,
            timesteps=check_full_grid(timesteps, steps, name),
            compile=compile,
            callback=callback,
            progress=progress,
            desc=f"{name} {steps}",
            **model_kwargs,
        )

    solver.__name__ = solver.__qualname__ = name
    return solver


euler = _fixed_step("E", "euler")
euler.__doc__ = "Euler's method, first order, 1 NFE per step."
heun = _fixed_step("H", "heun")
heun.__doc__ = "Heun's method (explicit trapezoid), second order, 2 NFE per step."
midpoint = _fixed_step("M", "midpoint")
midpoint.__doc__ = "Explicit midpoint method, second order, 2 NFE per step."
multistep = _fixed_step("A", "multistep")
multistep.__doc__ = (
    "Variable-step Adams-Bashforth 2 (Euler first step), second order, 1 NFE per step."
)

#: Fixed-step baseline solvers by name, and the step letter each runs.
BASELINES: dict[str, Callable[..., Tensor]] = {
    "euler": euler,
    "heun": heun,
    "midpoint": midpoint,
    "multistep": multistep,
}
_LETTERS = {"euler": "E", "heun": "H", "midpoint": "M", "multistep": "A"}


def baseline_nfe(name: str, steps: int) -> int:
    """Base-model evaluations of a fixed-step baseline with ``steps`` steps."""
    if name not in _LETTERS:
        raise ValueError(f"unknown baseline solver {name!r}; known: {', '.join(_LETTERS)}")
    return plan_nfe(_LETTERS[name] * steps)[0]


@torch.no_grad()
def heun_trajectory(
    model: VelocityFn, noise: Tensor, steps: int, **model_kwargs: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """Heun's method on the uniform grid t_k = k / steps, recording every grid point.

    Used to build the refiner's trajectory cache: the states x_k and the base velocities
    v(x_k, t_k) there (the velocity at the last point is evaluated too), 2 steps + 1 NFE.

    Args:
        model: ``model(x, t, **model_kwargs) -> v``, t of shape (B,).
        noise: (B, C, H, W) state at t = 0.
        steps: number of Heun steps.

    Returns:
        states (B, K, C, H, W), velocities (B, K, C, H, W) and times (K,), K = steps + 1.
    """
    steps = _num_steps("heun_trajectory", steps)
    times = uniform_grid(steps, device=noise.device).to(time_dtype(noise.dtype))
    b = noise.shape[0]
    x, states, velocities = noise, [], []
    d0 = model(x, times[0].expand(b), **model_kwargs)
    for t0, t1 in zip(times[:-1], times[1:], strict=True):
        states.append(x)
        velocities.append(d0)
        h = t1 - t0
        d1 = model(x + h * d0, t1.expand(b), **model_kwargs)
        x = x + h / 2 * (d0 + d1)
        d0 = model(x, t1.expand(b), **model_kwargs)
    states.append(x)
    velocities.append(d0)
    return torch.stack(states, 1), torch.stack(velocities, 1), times


# Dormand-Prince 5(4) tableau.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


@torch.no_grad()
def dopri5(
    model: VelocityFn,
    noise: Tensor,
    *,
    t_start: float = 0.0,
    t_end: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    first_step: float = 0.01,
    max_steps: int = 10_000,
    callback: Callback | None = None,
    **model_kwargs: Any,
) -> Tensor:
    """Adaptive Dormand-Prince 5(4) (Dormand & Prince, 1980): the "exact" ODE solution.

    Integrates in the dtype of ``noise`` (use float64 for references). The error of a step is
    the RMS of (x5 - x4) / (atol + rtol * max(|x|, |x_new|)) over each sample, its largest
    over the batch (so a sample's accuracy does not depend on what it is batched with); steps
    with error <= 1 are accepted, the step size follows the usual 0.9 err^(-1/5) controller.

    Args:
        model: ``model(x, t, **model_kwargs) -> v``, t of shape (B,).
        noise: (B, ...) state at ``t_start``.
        rtol, atol: relative and absolute tolerances.
        max_steps: the most steps tried, rejected ones included, before it gives up.
        callback: called after each accepted step with step, t, x and base_nfe.

    Returns:
        (B, ...) state at ``t_end``.
    """
    if not t_end > t_start:
        raise ValueError(f"t_end ({t_end}) must be greater than t_start ({t_start})")
    b = noise.shape[0]

    def f(x: Tensor, t: float) -> Tensor:
        return model(
            x,
            torch.full((b,), t, dtype=time_dtype(noise.dtype), device=noise.device),
            **model_kwargs,
        )

    x, t, h = noise, t_start, min(first_step, t_end - t_start)
    k1 = f(x, t)
    nfe, accepted = 1, 0
    for _ in range(max_steps):
        h = min(h, t_end - t)
        ks = [k1]
        for i in range(1, 7):
            xi = x + h * sum(a * k for a, k in zip(_A[i], ks, strict=False) if a != 0.0)
            ks.append(f(xi, t + _C[i] * h))
        nfe += 6
        x5 = x + h * sum(bk * k for bk, k in zip(_B5, ks, strict=True) if bk != 0.0)
        x4 = x + h * sum(bk * k for bk, k in zip(_B4, ks, strict=True) if bk != 0.0)
        scale = atol + rtol * torch.maximum(x.abs(), x5.abs())
        err = ((x5 - x4) / scale).pow(2).flatten(1).mean(1).sqrt().max().item()
        if err <= 1.0:
            t, x, k1 = t + h, x5, ks[6]  # first-same-as-last: k7 is v at the new point
            accepted += 1
            if callback is not None:
                callback({"step": accepted - 1, "t": t, "x": x, "base_nfe": nfe})
            if t >= t_end:
                return x
        factor = 10.0 if err == 0 else min(10.0, max(0.2, 0.9 * err ** (-1 / 5)))
        h = h * factor
    raise RuntimeError(f"dopri5 did not reach t={t_end} in {max_steps} steps (at t={t:.4g})")
