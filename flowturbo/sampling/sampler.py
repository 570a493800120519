"""The FlowTurbo sampler: one loop over a step plan and an explicit time grid."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowturbo.sampling.compile import compiled_steps, default_compile_options, warn_once
from flowturbo.sampling.graph import compiled_sampler
from flowturbo.sampling.schedule import (
    STEP_COST,
    Schedule,
    check_full_grid,
    check_grid,
    parse_schedule,
    time_dtype,
    uniform_grid,
)
from flowturbo.sampling.steps import STEPS, Constraint, as_plan, run_steps, step_kinds

VelocityFn = Callable[..., Tensor]
Callback = Callable[[dict[str, Any]], None]
RefinerInput = Literal["d0", "cache"]


def check_labels(model: VelocityFn, y: Any) -> None:
    """Refuses class labels that a SiT (or a guidance wrapper around one) has no embedding for.

    Without this, a label out of range is PyTorch's "index out of range in self" on a CPU and
    a device-side assert on a GPU, which leaves the CUDA context unusable. One check per
    sampling call (a single device sync), never per evaluation.
    """
    net = getattr(model, "fn", model)  # through a guidance wrapper
    embedder = getattr(net, "y_embedder", None)
    table = getattr(embedder, "embedding_table", None)
    if not isinstance(table, torch.nn.Embedding) or not isinstance(y, Tensor) or y.numel() == 0:
        return
    if y.is_floating_point() or y.is_complex():
        raise TypeError(f"y holds class labels: an integer tensor, got {y.dtype}")
    low, high = (int(v) for v in torch.aminmax(y))
    rows = table.num_embeddings
    if low < 0 or high >= rows:
        classes = getattr(embedder, "num_classes", rows)  # a SiT's LabelEmbedder has it
        null = f" ({rows - 1} is the null class)" if rows > classes else ""
        raise ValueError(
            f"class labels y must lie in 0..{rows - 1}{null} for this model "
            f"(num_classes={classes}); got labels from {low} to {high}"
        )


def _random_in_training(net: torch.nn.Module) -> bool:
    """Whether ``net`` computes otherwise in training mode: dropout, batch norm, or a SiT's
    label dropout (its LabelEmbedder's ``dropout_prob``)."""
    nn = torch.nn.modules
    return any(
        m.training
        and (
            (isinstance(m, nn.dropout._DropoutNd) and m.p > 0)
            or isinstance(m, nn.batchnorm._BatchNorm)
            or getattr(m, "dropout_prob", 0) > 0
        )
        for m in net.modules()
    )


def integrate(
    plan: str | Schedule,
    model: VelocityFn,
    noise: Tensor,
    *,
    refiner: VelocityFn | None = None,
    timesteps: Tensor | Sequence[float] | None = None,
    refiner_input: RefinerInput = "d0",
    compile: bool | str | dict[str, Any] = False,
    callback: Callback | None = None,
    progress: bool = False,
    desc: str | None = None,
    constrain: Constraint | None = None,
    **model_kwargs: Any,
) -> Tensor:
    """Runs a step plan (one letter per step, see ``steps.STEPS``) from ``noise``.

    The shared loop behind :func:`sample` and the fixed-step baseline solvers.

    Args:
        plan: step kinds, e.g. ``"HHPPPPRRR"``, or a schedule (``"H2P4R3"``, or parsed).
        model: ``model(x, t, **model_kwargs) -> v`` with ``t`` of shape (B,).
        noise: (B, C, H, W) state at the first grid time (Gaussian noise at t = 0).
        refiner: ``refiner(x, t, v, **model_kwargs) -> delta_v``; needed by R steps.
        timesteps: N + 1 increasing times in [0, 1]; default ``k / N``.
        refiner_input: velocity the second refiner call of an R step sees: ``"d0"`` (default,
            as trained) or ``"cache"`` (the public FlowTurbo sampler's choice).
        compile: False; True or a dict of ``torch.compile`` options: each step kind compiled
            once (:mod:`flowturbo.sampling.compile`); ``"sampler"``: the whole loop as one
            static program, a CUDA graph on a GPU (:func:`.graph.compiled_sampler`).
        callback: called after every step with a dict: step, kind, t, x, velocity,
            base_nfe and refiner_nfe (running totals).
        progress: show a progress bar.
        desc: progress bar label.
        constrain: ``constrain(x, cache, t) -> (x, cache)`` applied after every step, e.g. to
            keep known pixels on their path (:func:`flowturbo.sampling.inpaint`). Not with
            ``compile="sampler"``, whose program holds only the steps.

    Returns:
        (B, C, H, W) state at the last grid time, a tensor the caller owns.
    """
    plan = as_plan(plan)
    kinds = step_kinds(plan, refiner_input)
    if "R" in plan and refiner is None:
        raise ValueError("the schedule has R steps but no refiner was given: pass refiner=...")
    net = getattr(refiner, "fn", refiner)  # through a guidance wrapper
    embedder = getattr(getattr(net, "x_embedder", None), "proj", None)
    if "R" in plan and embedder is not None and embedder.weight.shape[1] == noise.shape[1]:
        raise TypeError(
            f"refiner= takes {noise.shape[1]} input channels, those of x alone; a velocity "
            f"refiner takes x and v concatenated ({2 * noise.shape[1]}): is it the base model? "
            "Pass the VelocityRefiner"
        )
    check_labels(model, model_kwargs.get("y"))
    for fn in (model, refiner):
        net = getattr(fn, "fn", fn)  # through a guidance wrapper
        if isinstance(net, torch.nn.Module) and net.training and _random_in_training(net):
            warn_once(
                f"sampling with a {type(net).__name__} in training mode: its dropout or batch "
                "statistics are on, and a SiT drops labels to the null class at random "
                "(class_dropout_prob); call .eval() on it before sampling"
            )
    n = len(plan)
    ts = uniform_grid(n) if timesteps is None else check_grid(timesteps, n)
    if isinstance(compile, str) and compile not in ("steps", "sampler"):
        raise ValueError(f"compile must be a bool, 'steps', 'sampler' or a dict, got {compile!r}")
    if compile == "sampler":
        if callback is not None or progress or constrain is not None:
            raise ValueError(
                "compile='sampler' runs the whole loop as one program, with no per-step "
                "callback, progress bar or constraint (inpainting): use compile=True for those"
            )
        run = compiled_sampler(
            plan, model, noise, refiner=refiner, timesteps=ts, refiner_input=refiner_input,
            **model_kwargs,
        )  # fmt: skip
        return run(noise, **model_kwargs)

    steps = STEPS
    graphs = False  # CUDA graphs: a step's outputs are buffers its next replay overwrites
    if compile:
        options = default_compile_options(noise.device)
        options.update(compile if isinstance(compile, dict) else {})
        steps = compiled_steps(options)
        graphs = options.get("mode") in ("reduce-overhead", "max-autotune") and noise.is_cuda
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()

    times = ts.tolist()
    nfe = [0, 0]
    bar = tqdm(total=n, desc=desc, disable=not progress, leave=False)

    def after_step(k: int, x: Tensor, c: Tensor) -> None:
        if k == 0 and c is not None and c.shape != x.shape:  # it would broadcast into x
            raise ValueError(
                f"the model returned a velocity of shape {tuple(c.shape)} for x of shape "
                f"{tuple(x.shape)}: model(x, t, **kwargs) must return a tensor shaped like x"
            )
        b, r = STEP_COST[kinds[k][0]]
        nfe[0], nfe[1] = nfe[0] + b, nfe[1] + r
        bar.update()
        if callback is not None:
            if graphs:  # the callback may keep them
                x, c = x.clone(), None if c is None else c.clone()
            info = {"step": k, "kind": plan[k], "t": times[k + 1], "x": x, "velocity": c}
            callback({**info, "base_nfe": nfe[0], "refiner_nfe": nfe[1]})

    ts_dev = ts.to(noise.device, time_dtype(noise.dtype))
    x = run_steps(steps, kinds, model, refiner, noise, ts_dev, model_kwargs, after_step, constrain)
    bar.close()
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
    compile: bool | str | dict[str, Any] = False,
    callback: Callback | None = None,
    progress: bool = False,
    **model_kwargs: Any,
) -> Tensor:
    """Samples with a FlowTurbo schedule (Zhao et al., "FlowTurbo", NeurIPS 2024).

    Integrates dx/dt = v(x, t) from ``noise`` at t = 0 towards data at t = 1 with the steps of
    ``schedule`` (E Euler, H Heun, P pseudo corrector, R refiner).

    Args:
        model: base velocity, ``model(x, t, **model_kwargs) -> v``, ``t`` of shape (B,).
        noise: (B, C, H, W) Gaussian noise.
        schedule: e.g. ``"H8"``, ``"H1P7"``, ``"H2P4R3"``, or a parsed :class:`Schedule`.
        refiner: ``refiner(x, t, v, **model_kwargs) -> delta_v``; required if R steps are used.
        timesteps: optional custom grid of N + 1 increasing times from 0 to 1.
        refiner_input: ``"d0"`` (default) or ``"cache"`` (public FlowTurbo sampler compat.).
        compile: sample-aware compilation: each step kind compiled once and reused
            (True, or a dict of ``torch.compile`` options), or ``"sampler"``: the whole loop
            compiled as one static program (one CUDA graph per setting on a GPU; no callback
            or progress bar, no gradients). Eager fallback with one warning.
        callback: called after each step with the running state and NFE counts.
        progress: show a progress bar.
        **model_kwargs: passed to the model and refiner (e.g. ``y=labels``).

    Returns:
        (B, C, H, W) samples at t = 1.

    Raises:
        ValueError: a malformed schedule or grid, R steps without a refiner, or class labels
            ``y`` the SiT has no embedding for.
    """
    sched = parse_schedule(schedule)
    return integrate(
        sched.plan,
        model,
        noise,
        refiner=refiner,
        timesteps=check_full_grid(timesteps, sched.num_steps, "sample"),
        refiner_input=refiner_input,
        compile=compile,
        callback=callback,
        progress=progress,
        desc=sched.text,
        **model_kwargs,
    )
