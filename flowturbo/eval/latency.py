"""The one latency measurement of the project: warm-up, synchronisation, median over repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
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
    if repeats < 1 or warmup < 0 or batch < 1:
        raise ValueError("need repeats >= 1, warmup >= 0 and batch >= 1")
    device = torch.device(device)
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Latency(
        statistics.median(times), min(times), max(times), repeats, warmup, batch, str(device)
    )
