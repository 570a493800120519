"""Pieces both Lightning modules use: EMA of the trained network, AdamW with linear warm-up."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn
from torch.optim.swa_utils import AveragedModel

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def ema_copy(net: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``net`` (weights and buffers), without gradients.

    The decay warms up: after n updates it is ``min(decay, (1 + n) / (10 + n))``, so the average
    forgets the random initial weights within a few hundred steps instead of ``1 / (1 - decay)``
    (a fixed 0.999 still holds 37 % of the initial weights after 1,000 steps).

    Only the trained network is averaged, never a frozen base beside it (that would double the
    memory of a 675 M-parameter model for nothing).
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
    ema = AveragedModel(net, multi_avg_fn=partial(_warmup_ema, decay=decay), use_buffers=True)
    ema.requires_grad_(False)
    return ema


def _warmup_ema(
    ema_params: list, params: list, num_averaged: torch.Tensor, *, decay: float
) -> None:
    """One EMA update (a module-level function: ``ddp_spawn`` pickles the module)."""
    # a tensor on the parameters' device: no host sync per training step
    n = num_averaged.to(ema_params[0].dtype)
    keep = torch.clamp((1 + n) / (10 + n), max=decay)
    torch._foreach_mul_(ema_params, keep)
    torch._foreach_add_(ema_params, torch._foreach_mul(params, 1 - keep))


def optimizer_with_warmup(
    params: Iterable[nn.Parameter], optimizer: OptimizerFactory, warmup_steps: int
) -> dict:
    """``configure_optimizers`` output: the optimizer and a per-step linear warm-up to its lr."""
    opt = optimizer(params)
    warmup = max(int(warmup_steps), 0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def seeded_noise(like: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise (like ``like``) and times (B,) from a fixed seed: reproducible validation batches."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x0 = torch.randn(like.shape, generator=g).to(like)
    t = torch.rand(like.shape[0], generator=g).to(like.device)
    return x0, t


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in its own folder, then renames it into place.

    Lightning's default writes local checkpoints through a temporary file in ``TMPDIR`` and
    moves it: on a cluster, where ``TMPDIR`` is another file system, that move is a copy, and a
    job killed during it leaves ``last.ckpt`` cut off and the previous one lost. A rename in one
    folder is all or nothing. Remote paths (``s3://...``) are left to Lightning.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        from flowturbo.eval.atomic import atomic_path  # flowturbo.eval imports torch-fidelity

        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
