"""The one latency measurement of the project: warm-up, synchronisation, median over repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Latency:
    """Wall-clock latency of one call, in milliseconds.

    Attributes:
        median_ms, min_ms, max_ms: over ``repeats`` timed calls after ``warmup`` untimed ones.
        batch: images produced per call.
        device: where it ran (``"cuda:0"``, ``"cpu"``).
    """

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    warmup: int
    batch: int
    device: str

    @property
    def ms_per_image(self) -> float:
        return self.median_ms / self.batch

    def as_dict(self) -> dict:
        return {**asdict(self), "ms_per_image": self.ms_per_image}


def measure_latency(
    fn: Callable[[], object],
    *,
    batch: int,
    device: torch.device | str = "cpu",
    warmup: int = 3,
    repeats: int = 10,
) -> Latency:
    """Times ``fn()`` (which produces ``batch`` images) after warm-up, synchronising the device.

    On CUDA each call is timed with CUDA events around it and a synchronisation after it; on
    the CPU with ``time.perf_counter``. Warm-up calls absorb compilation and allocator effects.

    Returns:
        A :class:`Latency` with the median, min and max over ``repeats`` calls.
    """
    timed = measure_latencies({0: fn}, batch=batch, device=device, warmup=warmup, repeats=repeats)
    return timed[0]


def measure_latencies(
    fns: Mapping[Hashable, Callable[[], object]],
    *,
    batch: int,
    device: torch.device | str = "cpu",
    warmup: int = 3,
    repeats: int = 10,
) -> dict[Hashable, Latency]:
    """Times several functions in interleaved rounds, so that their ratios are fair.

    Every function is warmed up, then each of ``repeats`` rounds calls every function once,
    starting one later each round. A shared machine's slow drift (other jobs, clock changes)
    then lands on all of them alike instead of on whichever was timed last. Each call is timed
    as :func:`measure_latency` times one.

    Args:
        fns: the calls to time, each producing ``batch`` images, by any key.
        batch, device, warmup, repeats: as for :func:`measure_latency`.

    Returns:
        A :class:`Latency` per key of ``fns`` (none for no functions).
    """
    if not fns:  # e.g. a sweep with latency.eager=false and latency.compiled=false
        return {}
    if repeats < 1 or warmup < 0 or batch < 1:
        raise ValueError("need repeats >= 1, warmup >= 0 and batch >= 1")
    device = torch.device(device)
    keys = list(fns)
    for key in keys:
        for _ in range(warmup):
            fns[key]()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: dict[Hashable, list[float]] = {key: [] for key in keys}
    for r in range(repeats):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            times[key].append(_time_call(fns[key], device))
    return {
        key: Latency(statistics.median(t), min(t), max(t), repeats, warmup, batch, str(device))
        for key, t in times.items()
    }


def _time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call, the device synchronised after it."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3
