"""One function per step kind, all with one signature.

``step(model, refiner, x, c, tp, t0, t1, kw) -> (x_next, c_next)``: ``x`` the state at ``t0``,
``c`` the cached velocity (None before the first step), ``tp`` the previous grid time (used by the
multistep method), ``t0``/``t1`` 0-dim time tensors, ``kw`` the model keyword arguments. The
functions are plain tensor code so that each can be compiled once and reused for every step of its
kind (FlowTurbo's sample-aware compilation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from flowturbo.sampling.schedule import Schedule, parse_schedule

Step = Callable[..., tuple[Tensor, Tensor]]
#: ``constrain(x, cache, t) -> (x, cache)``, applied after every step (see :func:`run_steps`).
Constraint = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def euler_step(model, refiner, x: Tensor, c, tp, t0: Tensor, t1: Tensor, kw: dict[str, Any]):
    """Euler: d = v(x, t0); x + h d. Caches d."""
    h = t1 - t0
    d = model(x, t0.expand(x.shape[0]), **kw)
    return x + h * d, d


def heun_step(model, refiner, x: Tensor, c, tp, t0: Tensor, t1: Tensor, kw: dict[str, Any]):
    """Heun: predictor d0 = v(x, t0), corrector d1 = v(x + h d0, t1). Caches d1."""
    h = t1 - t0
    d0 = model(x, t0.expand(x.shape[0]), **kw)
    x_tilde = x + h * d0
    d1 = model(x_tilde, t1.expand(x.shape[0]), **kw)
    return x + h / 2 * (d0 + d1), d1


def pseudo_step(model, refiner, x: Tensor, c: Tensor, tp, t0: Tensor, t1: Tensor, kw):
    """Pseudo corrector: Heun with d0 = the cached velocity, one base evaluation. Caches d1."""
    h = t1 - t0
    d0 = c
    x_tilde = x + h * d0
    d1 = model(x_tilde, t1.expand(x.shape[0]), **kw)
    return x + h / 2 * (d0 + d1), d1


def refiner_step(model, refiner, x: Tensor, c: Tensor, tp, t0: Tensor, t1: Tensor, kw):
    """Refiner step: d0 = c + R(x, t0, c); d1 = d0 + R(x + h d0, t1, d0). Caches d0.

    The second call sees the velocity it stepped along (d0), as the refiner is trained.
    """
    h = t1 - t0
    d0 = c + refiner(x, t0.expand(x.shape[0]), c, **kw)
    x_tilde = x + h * d0
    d1 = d0 + refiner(x_tilde, t1.expand(x.shape[0]), d0, **kw)
    return x + h / 2 * (d0 + d1), d0


def refiner_step_cache_input(model, refiner, x: Tensor, c: Tensor, tp, t0: Tensor, t1: Tensor, kw):
    """Refiner step as the public FlowTurbo sampler computes it: d1 = d0 + R(x~, t1, c).

    Compatibility switch for the public refiner checkpoint and the paper's figures.
    """
    h = t1 - t0
    d0 = c + refiner(x, t0.expand(x.shape[0]), c, **kw)
    x_tilde = x + h * d0
    d1 = d0 + refiner(x_tilde, t1.expand(x.shape[0]), c, **kw)
    return x + h / 2 * (d0 + d1), d0


def midpoint_step(model, refiner, x: Tensor, c, tp, t0: Tensor, t1: Tensor, kw):
    """Explicit midpoint: d = v(x + h/2 v(x, t0), t0 + h/2); x + h d. Caches d."""
    h = t1 - t0
    d0 = model(x, t0.expand(x.shape[0]), **kw)
    x_mid = x + h / 2 * d0
    d = model(x_mid, (t0 + h / 2).expand(x.shape[0]), **kw)
    return x + h * d, d


def adams_bashforth2_step(model, refiner, x: Tensor, c, tp: Tensor, t0: Tensor, t1: Tensor, kw):
    """Variable-step Adams-Bashforth 2: x + h ((1 + r/2) d - r/2 c), r = h / h_prev.

    The first step (no cache) is an Euler step. One base evaluation per step. Caches d.
    """
    h = t1 - t0
    d = model(x, t0.expand(x.shape[0]), **kw)
    if c is None:
        return x + h * d, d
    r = h / (t0 - tp)
    return x + h * ((1 + r / 2) * d - (r / 2) * c), d


#: Step kind -> function. "R" uses the d0 input; "R:cache" is the compatibility variant.
STEPS: dict[str, Step] = {
    "E": euler_step,
    "H": heun_step,
    "P": pseudo_step,
    "R": refiner_step,
    "R:cache": refiner_step_cache_input,
    "M": midpoint_step,
    "A": adams_bashforth2_step,
}


def as_plan(plan: str | Schedule) -> str:
    """The step plan (``"HHPPPPRRR"``) of a plan, a schedule string (``"H2P4R3"``: it holds
    digits, which a plan never does) or a parsed :class:`Schedule`."""
    if isinstance(plan, Schedule):
        return plan.plan
    if not isinstance(plan, str):
        raise TypeError(
            f"a step plan is a string of step letters such as 'HHPPRR' (or a schedule such as "
            f"'H2P2R2', or a parsed Schedule), got {type(plan).__name__}"
        )
    return parse_schedule(plan).plan if any(c.isdigit() for c in plan) else plan


def step_kinds(plan: str, refiner_input: str = "d0") -> list[str]:
    """The :data:`STEPS` key each step of ``plan`` runs.

    A P step with no cached velocity (the first step) runs as H, at one more NFE; R runs as
    ``"R"`` or, with ``refiner_input="cache"``, as the compatibility variant ``"R:cache"``.
    """
    if refiner_input not in ("d0", "cache"):
        raise ValueError(f"refiner_input must be 'd0' or 'cache', got {refiner_input!r}")
    letters = sorted(kind for kind in STEPS if len(kind) == 1)
    unknown = sorted(set(plan) - set(letters))
    if not plan or unknown:
        raise ValueError(
            f"step plan {plan!r} has {'no step' if not plan else f'unknown steps {unknown}'}: "
            f"a plan is one letter per step out of {', '.join(letters)} (e.g. "
            "'HHPPRR'; parse_schedule('H2P2R2').plan makes one)"
        )
    if plan[0] == "R":
        raise ValueError(
            f"step plan {plan!r} starts with R: a refiner step needs a cached velocity"
        )
    after = next((i for i in range(1, len(plan)) if plan[i] == "A" and plan[i - 1] not in "AE"), 0)
    if after:
        raise ValueError(
            f"step plan {plan!r}: the A (Adams-Bashforth) step {after} follows "
            f"{plan[after - 1]}; it extrapolates from the velocity at the previous step's "
            "start, which only E and A steps cache"
        )
    kinds = ["R:cache" if kind == "R" and refiner_input == "cache" else kind for kind in plan]
    if kinds[0] == "P":
        kinds[0] = "H"
    return kinds


def run_steps(
    steps: dict[str, Step],
    kinds: list[str],
    model,
    refiner,
    x: Tensor,
    ts: Tensor,
    kw: dict[str, Any],
    after_step: Callable[[int, Tensor, Tensor], None] | None = None,
    constrain: Constraint | None = None,
) -> Tensor:
    """The sampling loop: step k runs ``steps[kinds[k]]`` from ``ts[k]`` to ``ts[k + 1]``.

    ``ts`` holds the grid on ``x``'s device. After each step, ``constrain(x, cache, t)`` (if
    given) returns the state and cache to go on with (inpainting pins the known pixels to their
    path), then ``after_step(k, x, cache)`` is called. Returns the last state.
    """
    c = None
    for k, kind in enumerate(kinds):
        x, c = steps[kind](model, refiner, x, c, ts[max(k - 1, 0)], ts[k], ts[k + 1], kw)
        if constrain is not None:
            x, c = constrain(x, c, ts[k + 1])
        if after_step is not None:
            after_step(k, x, c)
    return x
