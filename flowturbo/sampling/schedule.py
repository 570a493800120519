"""Schedule strings (``H2P4R3``) and time grids."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: Step letters a schedule string may use (what each step computes: :mod:`flowturbo.sampling`).
SCHEDULE_LETTERS = {
    "E": "Euler: one base evaluation",
    "H": "Heun: two base evaluations",
    "P": "pseudo corrector: Heun reusing the cached velocity, one base evaluation",
    "R": "refiner: Heun on cached velocity + refiner corrections, two refiner evaluations",
}

_BLOCK = re.compile(r"([A-Za-z])([0-9]*)")  # ASCII digits: \d takes any Unicode digit


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule.

    Attributes:
        text: the schedule as given, normalised: letters upper case, counts without leading
            zeros, no spaces (``"h2 p04r3"`` -> ``"H2P4R3"``); blocks are kept as given
            (``"H4H4"`` stays, though it runs as ``"H8"``).
        plan: one letter per step (``"HHPPPPRRR"``), what the sampler executes.
        base_nfe: evaluations of the base model over the whole schedule.
        refiner_nfe: evaluations of the refiner over the whole schedule.
    """

    text: str
    plan: str
    base_nfe: int
    refiner_nfe: int

    @property
    def num_steps(self) -> int:
        return len(self.plan)

    @property
    def uses_refiner(self) -> bool:
        return "R" in self.plan


def parse_schedule(schedule: str | Schedule) -> Schedule:
    """Parses a schedule string of blocks ``<letter><count>`` (e.g. ``"H2P4R3"``).

    Raises:
        ValueError: naming the offending part for an empty schedule, an unknown letter, a
            missing or zero count, or a schedule whose first step is R (no cached velocity).
    """
    if isinstance(schedule, Schedule):
        return schedule
    if not isinstance(schedule, str):
        raise TypeError(f"schedule must be a string like 'H2P4R3', got {type(schedule).__name__}")
    text = schedule.replace(" ", "")
    if not text:
        raise ValueError("empty schedule: give blocks like 'H8' or 'H2P4R3'")
    if ":" in text:
        raise ValueError(
            f"schedule {schedule!r} names a baseline solver, not a schedule: call that solver "
            "(flowturbo.sampling.BASELINES, e.g. euler(model, noise, 16)), or give blocks like "
            "'H8' or 'H2P4R3'"
        )

    plan: list[str] = []
    pos = 0
    while pos < len(text):
        m = _BLOCK.match(text, pos)
        if m is None:
            raise ValueError(
                f"schedule {schedule!r}: unexpected {text[pos]!r} at position {pos}; "
                "blocks are a letter and a count, like 'H2P4R3'"
            )
        letter, count = m.group(1).upper(), m.group(2)
        part = m.group(0)
        if letter not in SCHEDULE_LETTERS:
            raise ValueError(
                f"schedule {schedule!r}: unknown step letter {m.group(1)!r} in {part!r}; "
                f"known letters: {', '.join(SCHEDULE_LETTERS)}"
            )
        if not count:
            after = text[m.end() : m.end() + 1]
            hint = f" ({after!r} is not one of the digits 0-9)" if after.isdigit() else ""
            raise ValueError(f"schedule {schedule!r}: block {part!r} has no step count{hint}")
        if int(count) == 0:
            raise ValueError(f"schedule {schedule!r}: block {part!r} has a zero step count")
        plan.extend(letter * int(count))
        pos = m.end()

    if plan[0] == "R":
        raise ValueError(
            f"schedule {schedule!r} starts with R: a refiner step needs a cached velocity, "
            "so put an H, E or P step before it"
        )
    base_nfe, refiner_nfe = plan_nfe("".join(plan))
    normalised = "".join(  # one spelling per schedule: "h08" -> "H8" (one row, one folder)
        m.group(1).upper() + str(int(m.group(2))) for m in _BLOCK.finditer(text)
    )
    return Schedule(normalised, "".join(plan), base_nfe, refiner_nfe)


#: (base, refiner) evaluations of each step kind; "M" (midpoint) and "A" (Adams-Bashforth 2)
#: are the baseline solvers' steps, not schedule letters.
STEP_COST = {"E": (1, 0), "H": (2, 0), "P": (1, 0), "R": (0, 2), "M": (2, 0), "A": (1, 0)}


def plan_nfe(plan: str) -> tuple[int, int]:
    """(base NFE, refiner NFE) of a step plan such as ``"HHPPPPRRR"``.

    A P step with no cached velocity (first step) evaluates the base once more, like H.
    """
    base = refiner = 0
    for k, letter in enumerate(plan):
        b, r = STEP_COST["H" if letter == "P" and k == 0 else letter]
        base, refiner = base + b, refiner + r
    return base, refiner


def uniform_grid(num_steps: int, device: torch.device | str | None = None) -> Tensor:
    """The default time grid ``t_k = k / N``, k = 0..N, float64 for exact step sizes.

    Returns:
        (N + 1,) tensor from 0 to 1.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.arange(num_steps + 1, dtype=torch.float64, device=device) / num_steps


def time_dtype(state_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the times passed to the networks for a state of ``state_dtype``: float64
    for float64 states, else float32, so that a bfloat16 or float16 state does not round the
    grid (bfloat16 holds 1/300 to 3 digits: a 300-step grid would get steps of length 0)."""
    return torch.float64 if state_dtype == torch.float64 else torch.float32


def check_full_grid(
    timesteps: Tensor | Sequence[float] | None, num_steps: int, caller: str
) -> Tensor | None:
    """A grid for sampling from noise to data: :func:`check_grid`, starting at 0, ending at 1.

    None (the default grid) passes through. ``caller`` names the function in the error.
    """
    if timesteps is None:
        return None
    ts = check_grid(timesteps, num_steps)
    if ts[0] != 0 or ts[-1] != 1:
        raise ValueError(
            f"{caller} integrates from noise at t = 0 to data at t = 1: timesteps must start "
            f"at 0 and end at 1, got {ts.tolist()}; for part of the path use "
            "flowturbo.sampling.integrate (or edit)"
        )
    return ts


def check_grid(timesteps: Tensor | Sequence[float], num_steps: int) -> Tensor:
    """Validates a custom time grid for ``num_steps`` steps.

    The grid must hold ``num_steps + 1`` strictly increasing times within [0, 1]. A grid that
    starts after 0 integrates from a partially noised state (editing); it need not end at 1.

    Returns:
        (N + 1,) float64 tensor.
    """
    ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
    if ts.numel() != num_steps + 1:
        raise ValueError(
            f"timesteps has {ts.numel()} points but the schedule has {num_steps} steps: "
            f"give {num_steps + 1} times"
        )
    if not bool((ts[1:] > ts[:-1]).all()):
        raise ValueError(f"timesteps must be strictly increasing, got {ts.tolist()}")
    if ts[0] < 0 or ts[-1] > 1:
        raise ValueError(
            f"timesteps must lie within [0, 1] (t=0 noise, t=1 data), got {ts.tolist()}"
        )
    return ts
