"""A flow model of your own, adapted once to flowturbo's call and time convention.

The framework calls every base model as ``model(x, t, y, force_drop_ids=None) -> v`` with
t in [0, 1], t = 0 noise and t = 1 data, v = x1 - x0 (SiT's convention), and reads three facts
from it: ``in_channels``, ``input_size`` and ``num_classes`` (label ``num_classes`` is the null
class). :class:`FlowModel` gives any velocity network that shape; :func:`load_flow_model`
builds one from a checkpoint with a function of the user's package, which is what the configs'
``factory`` key names (train.py ``model.base``, cache_trajectories.py ``cache.base``,
evaluate.py / generate.py ``model.base_arch``).

Many flow models run the other way: data at t = 0, noise at t = 1, velocity noise - data, and
times scaled to [0, 1000] (diffusers' flow-matching schedulers, Stable Diffusion 3). With
``time="data_to_noise"`` the adapter evaluates ``v(x, t) = -net(x, (1 - t) * time_scale, y)``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["FlowModel", "load_flow_model"]

TimeConvention = Literal["noise_to_data", "data_to_noise"]
_TIMES = ("noise_to_data", "data_to_noise")


class FlowModel(nn.Module):
    """A user's velocity network ``net(x, s, y)`` seen as flowturbo's ``model(x, t, y)``.

    Args:
        net: the network; called as ``net(x, s, y)`` (``net(x, s)`` if not ``conditional``)
            with x (B, C, H, W), s (B,) its own times and y (B,) long labels, returning the
            (B, C, H, W) velocity in its own convention.
        in_channels: channels C of the state (4 for SD-VAE latents, which evaluate.py and
            generate.py decode with the VAE).
        input_size: side H = W of the state.
        num_classes: real classes; flowturbo's null class (no label, for guidance) is
            ``num_classes``. 1 for an unconditional model.
        time: ``"noise_to_data"`` (flowturbo's and SiT's: t = 0 noise, v = data - noise) or
            ``"data_to_noise"`` (t = 0 data, v = noise - data).
        time_scale: the network's time is ``time_scale`` times the [0, 1] time (e.g. 1000).
        conditional: the network takes labels.
        null_label: the label the network was trained with for "no class" (default
            ``num_classes``); flowturbo's null class and ``force_drop_ids`` map to it.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        in_channels: int,
        input_size: int,
        num_classes: int = 1,
        time: TimeConvention = "noise_to_data",
        time_scale: float = 1.0,
        conditional: bool = True,
        null_label: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(
                f"a flow model must be a torch.nn.Module (so it moves to the device and its "
                f"weights identify it), got {type(net).__name__}"
            )
        if time not in _TIMES:
            raise ValueError(f"time must be one of {', '.join(_TIMES)}, got {time!r}")
        if min(in_channels, input_size, num_classes) < 1 or time_scale <= 0:
            raise ValueError(
                "in_channels, input_size and num_classes must be >= 1 and time_scale > 0, got "
                f"{in_channels}, {input_size}, {num_classes}, {time_scale}"
            )
        self.net = net
        self.in_channels = int(in_channels)
        self.input_size = int(input_size)
        self.num_classes = int(num_classes)
        self.null_label = self.num_classes if null_label is None else int(null_label)
        # how the network is called: part of the model's identity beside its weights
        self.adapter = {
            "time": time,
            "time_scale": float(time_scale),
            "conditional": bool(conditional),
            "null_label": self.null_label,
        }

    def forward(
        self, x: Tensor, t: Tensor | float, y: Tensor | None = None, force_drop_ids=None
    ) -> Tensor:
        """Velocity in flowturbo's convention.

        Args:
            x: (B, C, H, W) state.
            t: (B,) times in [0, 1] (0 noise, 1 data), or a scalar for all.
            y: (B,) long labels; ``num_classes`` is the null class.
            force_drop_ids: optional (B,) ints; where 1 the label is the null class.

        Returns:
            (B, C, H, W) velocity, v = data - noise.
        """
        a = self.adapter
        if not torch.is_tensor(t):
            t = torch.tensor(t, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        # times stay in (at least) float32 when the state is bf16: 1 - 0.999 is 0 in bf16
        t = t.to(x.device, torch.promote_types(t.dtype, torch.float32))
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        reverse = a["time"] == "data_to_noise"
        s = ((1 - t) if reverse else t) * a["time_scale"]  # (B,) the network's time
        if a["conditional"]:
            if y is None:
                raise ValueError("this flow model is conditional: pass labels y")
            null = y == self.num_classes
            if force_drop_ids is not None:
                null = null | (force_drop_ids == 1)
            v = self.net(x, s, torch.where(null, self.null_label, y))
        else:
            v = self.net(x, s)
        if v.shape != x.shape:
            raise ValueError(
                f"the flow model's network returned shape {tuple(v.shape)} for input "
                f"{tuple(x.shape)}: it must return a velocity shaped like its input (drop "
                "extra heads, such as a learned variance, in the network)"
            )
        return -v if reverse else v

    def extra_repr(self) -> str:
        facts = {"in_channels": self.in_channels, "input_size": self.input_size}
        facts.update(num_classes=self.num_classes, **self.adapter)
        return ", ".join(f"{k}={v}" for k, v in facts.items())


def _resolve(factory: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(factory):
        return factory
    module, sep, name = str(factory).replace(":", ".").rpartition(".")
    if not sep or not module:
        raise ValueError(
            f"factory must be a dotted path such as mypkg.flows.load_model, got {factory!r}"
        )
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ImportError(
            f"cannot import the flow model factory {factory!r} ({err}). Install your package "
            "(pip install -e .) or put its folder on PYTHONPATH"
        ) from err
    if not callable(fn):
        raise TypeError(f"factory {factory!r} is a {type(fn).__name__}, not a function")
    return fn


def load_flow_model(
    path: str | os.PathLike,
    factory: str | Callable[..., nn.Module],
    *,
    factory_kwargs: dict[str, Any] | None = None,
    **spec: Any,
) -> FlowModel:
    """Builds a user's flow model with ``factory(path, **factory_kwargs)`` and adapts it.

    Args:
        path: its checkpoint (a file, or a folder for formats that are folders).
        factory: a function ``(path, **factory_kwargs) -> nn.Module``, or its dotted import
            path (``"mypkg.flows.load_model"``).
        factory_kwargs: more arguments for the factory.
        **spec: :class:`FlowModel`'s arguments (in_channels, input_size, num_classes, time,
            time_scale, conditional, null_label).

    Returns:
        The adapted model on the CPU, in eval mode without gradients.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"flow model checkpoint not found: {path}")
    net = _resolve(factory)(str(path), **(factory_kwargs or {}))
    return FlowModel(net, **spec).eval().requires_grad_(False)
