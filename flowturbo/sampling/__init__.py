"""Sampling flow models with FlowTurbo schedules and baseline solvers.

Time convention, everywhere in this project (SiT's): t = 0 is Gaussian noise x0, t = 1 is data
x1, the path is x_t = t x1 + (1 - t) x0 and the velocity is v = dx/dt = x1 - x0. Samplers
integrate from t = 0 to t = 1.

A schedule is blocks of a step letter and a count (``"H2P4R3"`` runs H H P P P P R R R) on the
grid t_k = k / N (or a custom grid from 0 to 1). Step k, with h = t_{k+1} - t_k, state x, base
velocity v, refiner R and c the velocity cached by the step before (none before the first):

====  ===========================================================================  =========
step  computes                                                                     cache
====  ===========================================================================  =========
E     d = v(x, t_k); x += h d                                                      d
H     d0 = v(x, t_k); d1 = v(x + h d0, t_{k+1}); x += h/2 (d0 + d1)                d1
P     as H with d0 = c (first step: d0 = v(x, t_k), one more base evaluation)      d1
R     d0 = c + R(x, t_k, c); d1 = d0 + R(x + h d0, t_{k+1}, d0); x += h/2 (d0+d1)  d0
====  ===========================================================================  =========

E costs one base evaluation, H two, P one, R two refiner evaluations; a schedule may not start
with R. ``refiner_input="cache"`` gives R's second call c instead of d0, as the public FlowTurbo
sampler does.

Entry points:
- :func:`sample`: FlowTurbo schedules (``"H8"``, ``"H1P7"``, ``"H2P4R3"``), optionally compiled
  per step kind (``compile=True``) or as one static program (``compile="sampler"``).
- :func:`compiled_sampler`: that static program as an object, one per setting, replayed per call
  (a CUDA graph of the whole loop on a GPU).
- :data:`BASELINES`: Euler, Heun, midpoint and Adams-Bashforth 2 under one call, and
  :func:`dopri5`, an adaptive reference solver.
- :func:`edit` and :func:`inpaint`: re-generate an image from its noised state (SDEdit), or
  fill a masked region keeping the rest, with any schedule.
- :class:`ClassifierFreeGuidance`: guidance as a wrapper around the base model or the refiner.
"""

from flowturbo.sampling.compile import clear_compile_cache
from flowturbo.sampling.decode import decode_latents, encode_images, from_uint8, to_uint8
from flowturbo.sampling.edit import edit, inpaint, resize_mask
from flowturbo.sampling.graph import CompiledSampler, compiled_sampler
from flowturbo.sampling.guidance import ClassifierFreeGuidance
from flowturbo.sampling.sampler import integrate, sample
from flowturbo.sampling.schedule import (
    SCHEDULE_LETTERS,
    Schedule,
    check_grid,
    parse_schedule,
    plan_nfe,
    uniform_grid,
)
from flowturbo.sampling.solvers import (
    BASELINES,
    baseline_nfe,
    dopri5,
    euler,
    heun,
    heun_trajectory,
    midpoint,
    multistep,
)

__all__ = [
    "BASELINES",
    "SCHEDULE_LETTERS",
    "ClassifierFreeGuidance",
    "CompiledSampler",
    "Schedule",
    "baseline_nfe",
    "check_grid",
    "clear_compile_cache",
    "compiled_sampler",
    "decode_latents",
    "dopri5",
    "edit",
    "encode_images",
    "euler",
    "from_uint8",
    "heun",
    "heun_trajectory",
    "inpaint",
    "integrate",
    "midpoint",
    "multistep",
    "parse_schedule",
    "plan_nfe",
    "resize_mask",
    "sample",
    "to_uint8",
    "uniform_grid",
]
