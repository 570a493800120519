"""Sample-aware compilation of step functions, with an eager fallback.

Each step kind is wrapped by ``torch.compile`` once per set of compile options and kept in a
process-wide cache. torch.compile specialises a wrapper on what it is called with (batch shape,
dtype, device, the model), so a schedule's H steps share one compiled program, the next call with
the same settings replays it, and a new shape or dtype compiles a new one. Step sizes are tensors,
so a non-uniform grid does not recompile. On a GPU the default mode is ``reduce-overhead``
(CUDA graphs).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from typing import Any

import torch

from flowturbo.sampling.steps import STEPS, Step

_CACHE: dict[tuple[str, Hashable], CompiledStep] = {}
_WARNED: set[str] = set()


def default_compile_options(device: torch.device) -> dict[str, Any]:
    """torch.compile options used by ``compile=True``: CUDA graphs on a GPU, static shapes."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return {"mode": mode, "dynamic": False}


def _warn_once(reason: str) -> None:
    if reason in _WARNED:
        return
    _WARNED.add(reason)
    warnings.warn(
        f"torch.compile is unavailable here ({reason}); sampling runs eagerly instead. "
        "Results are the same, latency is not that of compiled sampling.",
        RuntimeWarning,
        stacklevel=4,
    )


class CompiledStep:
    """A compiled step function that falls back to its eager version if compilation fails.

    A failure that the eager function reproduces is the caller's error and is raised as is;
    only a failure of the compiler itself switches to eager, with one warning per process.
    """

    def __init__(self, fn: Step, options: dict[str, Any]):
        self.eager = fn
        self.options = dict(options)
        self.compiled: Callable | None = None
        self.failed = not torch._dynamo.is_dynamo_supported()
        if self.failed:
            _warn_once("torch._dynamo does not support this Python/platform")
        else:
            self.compiled = torch.compile(fn, **self.options)

    def __call__(self, *args):
        if self.failed:
            return self.eager(*args)
        try:
            return self.compiled(*args)
        except Exception as compile_error:  # noqa: BLE001 - decided by the eager re-run below
            out = self.eager(*args)  # a genuine error in the model raises here, unchanged
            self.failed = True
            _warn_once(f"{type(compile_error).__name__}: {str(compile_error).splitlines()[0]}")
            return out


def compiled_steps(options: dict[str, Any]) -> dict[str, CompiledStep]:
    """The compiled step functions for one set of torch.compile options (cached)."""
    key = tuple(sorted(options.items()))
    steps = {}
    for kind, fn in STEPS.items():
        if (kind, key) not in _CACHE:
            _CACHE[kind, key] = CompiledStep(fn, options)
        steps[kind] = _CACHE[kind, key]
    return steps


def clear_compile_cache() -> None:
    """Forgets every compiled step (and torch.compile's own caches)."""
    _CACHE.clear()
    torch._dynamo.reset()
