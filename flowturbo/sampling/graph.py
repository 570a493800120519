"""The whole sampler as one static program: compiled networks and, on a GPU, one CUDA graph.

FlowTurbo's sample-aware compilation: the schedule is fixed before sampling starts,
so for a given batch shape, dtype, device and guidance the complete loop (every H, P and R step,
guidance, an optional decode) is the same sequence of kernels every call. A
:class:`CompiledSampler` compiles the networks once with torch.compile (inductor, without CUDA
graphs of its own) and, on a GPU, records the complete loop over static input buffers as one
CUDA graph. A call copies the noise and labels into those buffers, replays the graph (one launch
for the whole sampler, no Python in between) and returns a copy of the output, so a caller never
holds a buffer that the next replay overwrites. Without CUDA there is no graph: the loop runs the
compiled networks over the same buffers.

:func:`compiled_sampler` keeps the samplers it builds, keyed by every setting they depend on, and
is what ``sample(..., compile="sampler")`` calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from flowturbo.sampling.compile import (
    SAMPLERS,
    CompiledFunction,
    compiled_function,
    options_key,
    release_networks,
    warn_once,
)
from flowturbo.sampling.guidance import ClassifierFreeGuidance
from flowturbo.sampling.schedule import Schedule, check_grid, time_dtype, uniform_grid
from flowturbo.sampling.steps import STEPS, as_plan, run_steps, step_kinds

#: Compiled samplers kept by :func:`compiled_sampler` (each CUDA graph holds its own memory).
MAX_CACHED_SAMPLERS = 8


class CompiledSampler:
    """A fixed step plan for fixed inputs, compiled once and replayed by every call.

    Inference only (runs under ``torch.no_grad``). The networks' parameters are read in place
    by the graph: in-place updates (an EMA, ``load_state_dict``) are seen, parameters replaced
    by new tensors are not; build a new sampler then (:func:`clear_compile_cache`).

    Args:
        plan: one step letter per step (``"HHPPPPRRR"``), or a schedule (``"H2P4R3"``, or parsed).
        model: base velocity ``model(x, t, **kw)`` (e.g. a guidance wrapper around a SiT).
        noise: an example input; fixes the batch shape, dtype and device.
        refiner: ``refiner(x, t, v, **kw)``; needed by R steps.
        timesteps: N + 1 increasing times (default ``k / N``).
        refiner_input: ``"d0"`` or ``"cache"`` (see :func:`~flowturbo.sampling.sample`).
        decode: optional ``decode(x) -> images`` run at the end, inside the same program.
        compile: torch.compile the networks and the decoder (False: record eager kernels).
        compile_options: torch.compile options (default: inductor, static shapes; no CUDA
            graphs of its own, the sampler records one graph for the whole loop).
        cuda_graph: record a CUDA graph (default: when ``noise`` is on a GPU).
        warmup: runs before recording a graph (compiles, autotunes, settles the allocator);
            without a graph, the first call compiles.
        **model_kwargs: example keyword arguments (e.g. ``y=labels``); tensors become static
            inputs, other values are fixed for the sampler's lifetime.
    """

    def __init__(
        self,
        plan: str | Schedule,
        model: Callable[..., Tensor],
        noise: Tensor,
        *,
        refiner: Callable[..., Tensor] | None = None,
        timesteps: Tensor | Sequence[float] | None = None,
        refiner_input: str = "d0",
        decode: Callable[[Tensor], Tensor] | None = None,
        compile: bool = True,
        compile_options: dict[str, Any] | None = None,
        cuda_graph: bool | None = None,
        warmup: int = 2,
        **model_kwargs: Any,
    ):
        plan = as_plan(plan)
        self.kinds = step_kinds(plan, refiner_input)
        if "R" in plan and refiner is None:
            raise ValueError("the schedule has R steps but no refiner was given: pass refiner=...")
        n = len(plan)
        ts = uniform_grid(n) if timesteps is None else check_grid(timesteps, n)
        self.ts = ts.to(noise.device, time_dtype(noise.dtype))
        options = {"dynamic": False, **(compile_options or {})}

        def maybe_compiled(fn):
            return compiled_function(fn, options) if compile and fn is not None else fn

        self.model, self.refiner, self.decode = map(maybe_compiled, (model, refiner, decode))
        self.inputs = {"noise": noise.detach().clone()}
        self.inputs.update({k: v.detach().clone() for k, v in model_kwargs.items() if _is_t(v)})
        self.constants = {k: v for k, v in model_kwargs.items() if not _is_t(v)}
        self.graph: torch.cuda.CUDAGraph | None = None
        self._output: Tensor | None = None
        self.wants_graph = bool(noise.is_cuda if cuda_graph is None else cuda_graph)
        if self.wants_graph:
            with torch.no_grad():
                self._record(max(int(warmup), 1))

    @property
    def fully_compiled(self) -> bool:
        """Every network compiled without fallback and, if asked for, the graph recorded."""
        nets = [f for f in (self.model, self.refiner, self.decode) if f is not None]
        compiled = all(isinstance(f, CompiledFunction) and not f.failed for f in nets)
        return compiled and (self.graph is not None or not self.wants_graph)

    def _program(self) -> Tensor:
        """The whole loop over the static inputs."""
        kw = {**self.constants, **{k: v for k, v in self.inputs.items() if k != "noise"}}
        noise = self.inputs["noise"]
        x = run_steps(STEPS, self.kinds, self.model, self.refiner, noise, self.ts, kw)
        return x if self.decode is None else self.decode(x)

    def _record(self, warmup: int) -> None:
        device = self.inputs["noise"].device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), _without_cast_cache():  # warm-up off the main stream
            for _ in range(warmup):
                self._program()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph), _without_cast_cache():
                self._output = self._program()
        except Exception as error:  # noqa: BLE001 - the loop still runs, uncaptured
            self._output = None
            first = str(error).splitlines()[0] if str(error) else ""
            warn_once(
                f"recording the sampler as a CUDA graph failed ({type(error).__name__}: "
                f"{first}); it runs uncaptured instead: results are the same, latency is not "
                "that of the whole-sampler graph"
            )
            return
        self.graph = graph

    def check_inputs(self, noise: Tensor, model_kwargs: dict[str, Any]) -> None:
        """Raises ValueError naming each input that differs from what the sampler was built for."""
        problems = []
        given = {"noise": noise, **model_kwargs}
        if set(given) != set(self.inputs) | set(self.constants):
            problems.append(
                f"keyword arguments {sorted(set(given) - {'noise'})} instead of "
                f"{sorted((set(self.inputs) | set(self.constants)) - {'noise'})}"
            )
        for name, static in self.inputs.items():
            value = given.get(name)
            if not _is_t(value) or _signature(value) != _signature(static):
                got = _signature(value) if _is_t(value) else type(value).__name__
                problems.append(f"{name}: {got} instead of {_signature(static)}")
        for name, constant in self.constants.items():
            if name in given and given[name] != constant:
                problems.append(f"{name}={given[name]!r} instead of {constant!r}")
        if problems:
            raise ValueError(
                "inputs do not match this compiled sampler: "
                + "; ".join(problems)
                + ". Build one per setting with flowturbo.sampling.compiled_sampler(...)"
            )

    def __call__(self, noise: Tensor, **model_kwargs: Any) -> Tensor:
        """Samples from ``noise`` (and e.g. ``y=labels``), shaped as the example inputs.

        Returns:
            The last state (or the decoded images), a tensor the caller owns.
        """
        self.check_inputs(noise, model_kwargs)
        with torch.no_grad():
            self.inputs["noise"].copy_(noise)
            for name, static in self.inputs.items():
                if name != "noise":
                    static.copy_(model_kwargs[name])
            if self.graph is None:
                return self._program()
            self.graph.replay()
            return self._output.clone()


def compiled_sampler(
    plan: str | Schedule,
    model: Callable[..., Tensor],
    noise: Tensor,
    *,
    refiner: Callable[..., Tensor] | None = None,
    timesteps: Tensor | Sequence[float] | None = None,
    refiner_input: str = "d0",
    decode: Callable[[Tensor], Tensor] | None = None,
    compile_options: dict[str, Any] | None = None,
    **model_kwargs: Any,
) -> CompiledSampler:
    """The :class:`CompiledSampler` for these settings, built on first use and then reused.

    The key is every setting the program depends on: the plan, grid and refiner input; the
    model, refiner and decoder objects and the state a recording bakes in (guidance settings,
    train/eval mode, where the weights live); the shape, dtype and device of every tensor
    input; the other keyword values; the torch.compile options; the autocast state. The
    :data:`MAX_CACHED_SAMPLERS` most recently used samplers are kept. The networks count by
    identity: pass the same objects each call (a ``decode=lambda z: vae.decode(z).sample``
    written in the call is a new object every time, and builds and records a new sampler).
    """
    plan = as_plan(plan)
    device_type = noise.device.type
    autocast = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type)
    grid = None if timesteps is None else tuple(check_grid(timesteps, len(plan)).tolist())
    inputs = tuple(
        sorted(
            (k, _signature(v) if _is_t(v) else repr(v))
            for k, v in {"noise": noise, **model_kwargs}.items()
        )
    )
    options = options_key(compile_options or {})
    nets = tuple((id(fn), _state(fn)) for fn in (model, refiner, decode))
    key = (plan, grid, refiner_input, nets, inputs, options, str(autocast))
    if key in SAMPLERS:
        SAMPLERS.move_to_end(key)
        return SAMPLERS[key][0]
    sampler = CompiledSampler(
        plan, model, noise, refiner=refiner, timesteps=timesteps, refiner_input=refiner_input,
        decode=decode, compile_options=compile_options, **model_kwargs,
    )  # fmt: skip
    SAMPLERS[key] = (sampler, model, refiner, decode)  # the objects keep their ids unique
    while len(SAMPLERS) > MAX_CACHED_SAMPLERS:
        SAMPLERS.popitem(last=False)
        # the evicted sampler's compiled networks hold its models: free those no longer used
        release_networks(fn for _, *nets in SAMPLERS.values() for fn in nets)
    return sampler


def _state(fn: Callable[..., Tensor] | None) -> tuple:
    """What of a network a recorded CUDA graph holds fixed: guidance settings, train or eval
    mode, and the address and dtype of its weights (moved or cast weights are new memory)."""
    if isinstance(fn, ClassifierFreeGuidance):
        return (fn.scale, fn.null_class, fn.channels, _state(fn.fn))
    if isinstance(fn, torch.nn.Module):
        p = next(fn.parameters(), None)
        return (fn.training, None if p is None else (p.data_ptr(), p.dtype, str(p.device)))
    return ()


def fell_back(model: Callable[..., Tensor]) -> bool:
    """Whether a cached compiled sampler of ``model`` runs less compiled than it was built to
    (a network fell back to eager, or recording the CUDA graph failed)."""
    return any(m is model and not s.fully_compiled for s, m, *_ in SAMPLERS.values())


def _without_cast_cache() -> contextlib.AbstractContextManager:
    """The caller's CUDA autocast without its cache of cast weights.

    Autocast keeps the low-precision copies of weights that require grad until its region
    ends; a graph recorded with them would read freed memory once the caller's region has
    ended (PyTorch's CUDA-graph notes ask for ``cache_enabled=False``).
    """
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    dtype = torch.get_autocast_dtype("cuda")
    return torch.autocast("cuda", dtype=dtype, cache_enabled=False)


def _is_t(value: Any) -> bool:
    return isinstance(value, Tensor)


def _signature(t: Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"
