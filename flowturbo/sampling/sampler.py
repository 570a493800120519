"""The FlowTurbo sampler: one loop over a step plan and an explicit time grid."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowturbo.sampling.compile import compiled_steps, default_compile_options
from flowturbo.sampling.schedule import (
    STEP_COST,
    Schedule,
    check_grid,
    parse_schedule,
    uniform_grid,
)
from flowturbo.sampling.steps import STEPS

VelocityFn = Callable[..., Tensor]
Callback = Callable[[dict[str, Any]], None]
RefinerInput = Literal["d0", "cache"]


def integrate(
    plan: str,
    model: VelocityFn,
    noise: Tensor,
    *,
    refiner: VelocityFn | None = None,
    timesteps: Tensor | Sequence[float] | None = None,
    refiner_input: RefinerInput = "d0",
    compile: bool | dict[str, Any] = False,
    callback: Callback | None = None,
    progress: bool = False,
    desc: str | None = None,
    **model_kwargs: Any,
) -> Tensor:
    """Runs a step plan (one letter per step, see ``steps.STEPS``) from ``noise``.

    The shared loop behind :func:`sample` and the fixed-step baseline solvers.

    Args:
        plan: step kinds, e.g. ``"HHPPPPRRR"``.
        model: ``model(x, t, **model_kwargs) -> v`` with ``t`` of shape (B,).
        noise: (B, C, H, W) state at the first grid time (Gaussian noise at t = 0).
        refiner: ``refiner(x, t, v, **model_kwargs) -> delta_v``; needed by R steps.
        timesteps: N + 1 increasing times in [0, 1]; default ``k / N``.
        refiner_input: velocity the second refiner call of an R step sees: ``"d0"`` (default,
            as trained) or ``"cache"`` (the public FlowTurbo sampler's choice).
        compile: False, True (default options) or a dict of ``torch.compile`` options.
        callback: called after every step with a dict: step, kind, t, x, velocity,
            base_nfe and refiner_nfe (running totals).
        progress: show a progress bar.
        desc: progress bar label.

    Returns:
        (B, C, H, W) state at the last grid time, a tensor the caller owns.
    """
    if refiner_input not in ("d0", "cache"):
        raise ValueError(f"refiner_input must be 'd0' or 'cache', got {refiner_input!r}")
    if "R" in plan and refiner is None:
        raise ValueError("the schedule has R steps but no refiner was given: pass refiner=...")
    n = len(plan)
    ts = uniform_grid(n) if timesteps is None else check_grid(timesteps, n)
    times = ts.tolist()
    time_dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
    ts_dev = ts.to(device=noise.device, dtype=time_dtype)

    steps = STEPS
    if compile:
        options = default_compile_options(noise.device)
        if isinstance(compile, dict):
            options.update(compile)
        steps = compiled_steps(options)
        if options.get("mode") in ("reduce-overhead", "max-autotune") and noise.is_cuda:
            torch.compiler.cudagraph_mark_step_begin()
    step_r = "R:cache" if refiner_input == "cache" else "R"

    x, c = noise, None
    base_nfe = refiner_nfe = 0
    for k in tqdm(range(n), desc=desc, disable=not progress, leave=False):
        kind = plan[k]
        if kind == "P" and c is None:
            kind = "H"  # no cached velocity yet: evaluate it, at one more NFE
        fn = steps[step_r if kind == "R" else kind]
        tp = ts_dev[max(k - 1, 0)]
        x, c = fn(model, refiner, x, c, tp, ts_dev[k], ts_dev[k + 1], model_kwargs)
        b, r = STEP_COST[kind]
        base_nfe, refiner_nfe = base_nfe + b, refiner_nfe + r
        if callback is not None:
            callback(
                {
                    "step": k,
                    "kind": plan[k],
                    "t": times[k + 1],
                    "x": x,
                    "velocity": c,
                    "base_nfe": base_nfe,
                    "refiner_nfe": refiner_nfe,
                }
            )
    # A compiled (CUDA-graph) step may return a buffer that its next replay overwrites.
    return x.clone() if compile else x


def sample(
    model: VelocityFn,
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
    """Samples with a FlowTurbo schedule (Zhao et al., "FlowTurbo", NeurIPS 2024).

    Integrates dx/dt = v(x, t) from ``noise`` at t = 0 towards data at t = 1 with the steps of
    ``schedule`` (E Euler, H Heun, P pseudo corrector, R refiner; DESIGN.md, "Schedules").

    Args:
        model: base velocity, ``model(x, t, **model_kwargs) -> v``, ``t`` of shape (B,).
        noise: (B, C, H, W) Gaussian noise.
        schedule: e.g. ``"H8"``, ``"H1P7"``, ``"H2P4R3"``, or a parsed :class:`Schedule`.
        refiner: ``refiner(x, t, v, **model_kwargs) -> delta_v``; required if R steps are used.
        timesteps: optional custom grid of N + 1 increasing times in [0, 1].
        refiner_input: ``"d0"`` (default) or ``"cache"`` (public FlowTurbo sampler compat.).
        compile: sample-aware compilation: each step kind compiled once and reused
            (True, or a dict of ``torch.compile`` options); eager fallback with one warning.
        callback: called after each step with the running state and NFE counts.
        progress: show a progress bar.
        **model_kwargs: passed to the model and refiner (e.g. ``y=labels``).

    Returns:
        (B, C, H, W) samples at t = 1 (or the grid's last time).

    Raises:
        ValueError: a malformed schedule or grid, or R steps without a refiner.
    """
    sched = parse_schedule(schedule)
    return integrate(
        sched.plan,
        model,
        noise,
        refiner=refiner,
        timesteps=timesteps,
        refiner_input=refiner_input,
        compile=compile,
        callback=callback,
        progress=progress,
        desc=sched.text,
        **model_kwargs,
    )
