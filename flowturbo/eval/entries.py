"""What a sweep or a generation job samples with: an *entry*, a schedule or a baseline solver.

An entry is written as a schedule (``"H2P4R3"``, see :mod:`flowturbo.sampling`) or
``"<solver>:<steps>"`` (``"euler:16"``, ``"midpoint:8"``, ``"multistep:16"``; ``"heun:8"`` is
the schedule ``"H8"``). Its family (``"heun"``, ``"flowturbo"``, ...) groups it in tables and
plots and is derived from the entry alone, so summaries of old row files classify them as the
current code does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from flowturbo.sampling import BASELINES, baseline_nfe, parse_schedule


@dataclass(frozen=True)
class SweepEntry:
    """One sampler configuration of a sweep: a schedule or a baseline solver.

    Attributes:
        label: as written in configs and results: ``"H2P4R3"`` or ``"euler:16"``.
        key: file-safe name of its row file: ``"H2P4R3"``, ``"euler-16"``.
        family: ``"heun"``, ``"heun_euler"`` (Heun steps, then one Euler step: ``"H3E1"``),
            ``"pseudo"``, ``"flowturbo"``, ``"euler"``, ``"midpoint"``, ``"multistep"`` or
            ``"other"`` (a schedule mixing other letters).
        plan: one step letter per step (``"HHPPPPRRR"``; ``"MMMM"`` for midpoint, ``"AAAA"``
            for the multistep solver).
        base_nfe: base-model evaluations per image batch.
        refiner_nfe: refiner evaluations per image batch.
        baseline: the name in :data:`flowturbo.sampling.BASELINES` for baseline solvers, None
            for schedules (run by :func:`flowturbo.sampling.sample`).
    """

    label: str
    key: str
    family: str
    plan: str
    base_nfe: int
    refiner_nfe: int
    baseline: str | None = None

    @property
    def steps(self) -> int:
        return len(self.plan)

    @property
    def uses_refiner(self) -> bool:
        return "R" in self.plan


def schedule_family(plan: str) -> str:
    """The sampler family of a schedule's step plan (``"HHPPPPRRR"`` -> ``"flowturbo"``)."""
    letters = set(plan)
    if "R" in letters:
        return "flowturbo"
    if letters == {"H"}:
        return "heun"
    if plan.endswith("HE") and set(plan[:-1]) == {"H"}:
        return "heun_euler"
    if letters == {"H", "P"} or letters == {"P"}:
        return "pseudo"
    if letters == {"E"}:
        return "euler"
    return "other"


_BASELINE_LETTERS = {"euler": "E", "heun": "H", "midpoint": "M", "multistep": "A"}


def parse_entry(text: str) -> SweepEntry:
    """Parses a sweep entry: a schedule (``"H1P5R3"``) or ``"<solver>:<steps>"``.

    ``"heun:8"`` is the schedule ``"H8"`` (the same computation); ``"euler:16"``,
    ``"midpoint:8"`` and ``"multistep:16"`` run the baseline solvers.

    Raises:
        ValueError: a malformed schedule, an unknown solver or a bad step count.
    """
    text = str(text).strip()
    if ":" not in text:
        sched = parse_schedule(text)
        return SweepEntry(
            sched.text,
            sched.text,
            schedule_family(sched.plan),
            sched.plan,
            sched.base_nfe,
            sched.refiner_nfe,
        )
    name, _, count = text.partition(":")
    name = name.strip().lower()
    if name not in BASELINES:
        raise ValueError(
            f"sampler {text!r}: unknown solver {name!r}; known: {', '.join(BASELINES)} "
            "(or give a schedule like H2P4R3)"
        )
    count = count.strip()
    if not (count.isascii() and count.isdigit()) or int(count) < 1:
        raise ValueError(f"sampler {text!r}: the step count must be a positive integer")
    steps = int(count)
    if name == "heun":
        return parse_entry(f"H{steps}")
    return SweepEntry(
        f"{name}:{steps}",
        f"{name}-{steps}",
        name,
        _BASELINE_LETTERS[name] * steps,
        baseline_nfe(name, steps),
        0,
        baseline=name,
    )


def sweep_entries(cfg: DictConfig) -> list[SweepEntry]:
    """The entries a job evaluates: ``sampler.schedule`` alone when set, else the sweep.

    The sweep is ``sweep.schedules`` then ``sweep.baselines`` (``{solver: [steps, ...]}``),
    duplicates dropped. A single value stands for a one-element list (``sweep.schedules=H8``,
    ``sweep.baselines.euler=16``).

    Raises:
        ValueError: a bad entry, a baseline step count that is not a positive integer (naming
            its key), or nothing to evaluate.
    """
    one = cfg.sampler.get("schedule")
    if one is not None:
        return [parse_entry(str(one))]
    texts = [str(s) for s in _as_list(cfg.sweep.get("schedules"))]
    for name, counts in (cfg.sweep.get("baselines") or {}).items():
        key = f"sweep.baselines.{name}"
        texts += [f"{name}:{_step_count(c, key)}" for c in _as_list(counts)]
    entries = list({e.key: e for e in map(parse_entry, texts)}.values())
    if not entries:
        raise ValueError("nothing to evaluate: set sweep.schedules / sweep.baselines")
    return entries


def _as_list(value: Any) -> list[Any]:
    """A config list as a list; None as []; a single value (``H8``, ``16``) as [value]."""
    if value is None:
        return []
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return [value]


def _step_count(value: Any, key: str) -> int:
    """A baseline's step count from the config: a positive integer (``16`` or ``16.0``)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{key}: step counts must be positive integers, got {value!r}; e.g. {key}=[8,16]"
        )
    return value
