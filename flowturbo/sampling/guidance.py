"""Classifier-free guidance as a wrapper around any velocity function (base or refiner)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def missing_null_class(net: object, null_class: int) -> int | None:
    """How many label embeddings a SiT ``net`` has when ``null_class`` is not among them (it
    was built with ``class_dropout_prob=0``, so it never learned an unconditional velocity);
    None when it has that embedding, or is no SiT (another model's labels are its own)."""
    table = getattr(getattr(net, "y_embedder", None), "embedding_table", None)
    if isinstance(table, torch.nn.Embedding) and null_class >= table.num_embeddings:
        return table.num_embeddings
    return None


class ClassifierFreeGuidance:
    """Guided velocity ``v = v_u + s (v_c - v_u)``, computed as one batch of 2B.

    Wraps ``fn(x, t, *extra, y=labels)``: a base model (no extra) or a refiner (extra = the
    velocity). The conditional half sees ``y``, the unconditional half the null class.
    With ``scale == 1`` the wrapper calls ``fn`` once on the conditional batch.

    Args:
        fn: velocity function taking ``y`` as a keyword.
        scale: guidance scale s.
        null_class: label of the unconditional (dropped) class, ``num_classes`` for SiT.
        channels: guide only the first ``channels`` channels and keep the conditional velocity
            on the rest. Public SiT/FlowTurbo results used 3 of 4 latent channels; None (default)
            guides all channels.
    """

    def __init__(
        self,
        fn: Callable[..., Tensor],
        scale: float,
        null_class: int,
        channels: int | None = None,
    ):
        if channels is not None and channels < 1:
            raise ValueError(f"channels must be None (all) or >= 1, got {channels}")
        rows = missing_null_class(fn, null_class)
        if scale != 1.0 and rows is not None:
            raise ValueError(
                f"guidance (scale {scale}) needs the null class {null_class}, but the model has "
                f"{rows} label embeddings (it was built with "
                "class_dropout_prob=0, so it never learned an unconditional velocity): use "
                "scale 1, or a model trained with label dropout"
            )
        self.fn = fn
        self.scale = float(scale)
        self.null_class = int(null_class)
        self.channels = channels

    def __call__(self, x: Tensor, t: Tensor, *extra: Tensor, y: Tensor) -> Tensor:
        """x (B, C, H, W), t (B,), extra (B, C, H, W) each, y (B,) -> (B, C, H, W)."""
        if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(
                f"guidance needs y, a tensor of one class label per sample, shape (B,) = "
                f"({x.shape[0]},), got {got}"
            )
        if self.scale == 1.0:
            return self.fn(x, t, *extra, y=y)
        both = [torch.cat([a, a]) for a in (x, t, *extra)]
        labels = torch.cat([y, torch.full_like(y, self.null_class)])
        cond, uncond = self.fn(*both, y=labels).chunk(2)
        if self.channels is None:
            return uncond + self.scale * (cond - uncond)
        k = self.channels
        guided = uncond[:, :k] + self.scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)

    def __repr__(self) -> str:
        return (
            f"ClassifierFreeGuidance(scale={self.scale}, null_class={self.null_class}, "
            f"channels={self.channels})"
        )
