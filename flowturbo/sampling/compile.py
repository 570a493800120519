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
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch

from flowturbo.sampling.steps import STEPS

_CACHE: dict[tuple[Hashable, ...], CompiledFunction] = {}
_WARNED: set[str] = set()
#: Whole compiled samplers (flowturbo.sampling.graph), least recently used first.
SAMPLERS: OrderedDict[tuple, Any] = OrderedDict()


def default_compile_options(device: torch.device) -> dict[str, Any]:
    """torch.compile options used by ``compile=True``: CUDA graphs on a GPU, static shapes."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return {"mode": mode, "dynamic": False}


def warn_once(message: str) -> None:
    """A RuntimeWarning with ``message``, once per process."""
    if message in _WARNED:
        return
    _WARNED.add(message)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def _warn_once(reason: str) -> None:
    warn_once(
        f"torch.compile is unavailable here ({reason}); sampling runs eagerly instead. "
        "Results are the same, latency is not that of compiled sampling."
    )


def _strict_flag() -> str | None:
    """The dynamo setting that makes its recompile limit an error, by this torch's name."""
    config = torch._dynamo.config
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(config, name):
            return name
    return None


_STRICT = _strict_flag()


class CompiledFunction:
    """A compiled function (a step, a network) that falls back to eager if compilation fails.

    A failure that the eager function reproduces is the caller's error and is raised as is;
    only a failure of the compiler itself switches to eager, with one warning per process.
    torch.compile's recompile limit (8 programs per function, counted over every shape, dtype
    and model it was called with) counts as such a failure: left alone, torch runs further
    shapes eagerly without a word, and a latency called compiled would be an eager one.
    """

    def __init__(self, fn: Callable, options: dict[str, Any]):
        self.eager = fn
        self.options = dict(options)
        self.compiled: Callable | None = None
        self.failed = not torch._dynamo.is_dynamo_supported()
        if self.failed:
            _warn_once("torch._dynamo does not support this Python/platform")
        else:
            self.compiled = torch.compile(fn, **self.options)

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.eager(*args, **kwargs)
        config = torch._dynamo.config
        strict = _STRICT is not None and not getattr(config, _STRICT)
        try:
            if strict:  # set and reset directly: a config.patch costs 5x more per call
                setattr(config, _STRICT, True)
            return self.compiled(*args, **kwargs)
        except Exception as compile_error:  # noqa: BLE001 - decided by the eager re-run below
            out = self.eager(*args, **kwargs)  # a genuine error in the model raises here
            self.failed = True
            reason = f"{type(compile_error).__name__}: {str(compile_error).splitlines()[0]}"
            if "limit" in reason.lower():
                reason += (
                    "; a process that samples many shapes, dtypes or models can raise "
                    "torch._dynamo.config.recompile_limit"
                )
            _warn_once(reason)
            return out
        finally:
            if strict:
                setattr(config, _STRICT, False)


def compiled_steps(options: dict[str, Any]) -> dict[str, CompiledFunction]:
    """The compiled step functions for one set of torch.compile options (cached)."""
    return {kind: compiled_function(fn, options) for kind, fn in STEPS.items()}


def compiled_function(fn: Callable, options: dict[str, Any]) -> CompiledFunction:
    """``fn`` (a function, a network, a guidance wrapper) compiled with ``options`` (cached).

    The cache holds ``fn`` itself, so its identity, the key, stays unique while cached.
    """
    key = (id(fn), options_key(options))
    if key not in _CACHE:
        _CACHE[key] = CompiledFunction(fn, options)
    return _CACHE[key]


def options_key(options: dict[str, Any]) -> str:
    """A hashable key of torch.compile options, nested ones (``options={...}``) included."""
    return repr(sorted(options.items()))


def release_networks(in_use: Iterable[Callable | None]) -> None:
    """Forgets the compiled networks (not the step functions) other than those ``in_use``, so
    that the models they hold can be freed: called when whole samplers leave the cache."""
    keep = {id(fn) for fn in in_use if fn is not None} | {id(fn) for fn in STEPS.values()}
    for key in [k for k in _CACHE if k[0] not in keep]:
        del _CACHE[key]


def clear_compile_cache() -> None:
    """Forgets every compiled step, network and sampler (and torch.compile's own caches)."""
    _CACHE.clear()
    SAMPLERS.clear()
    torch._dynamo.reset()
