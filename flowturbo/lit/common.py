"""Pieces both Lightning modules use: EMA of the trained network, AdamW with linear warm-up,
validation totals over ranks, atomic checkpoint writes, the process group's end at exit."""

from __future__ import annotations

import atexit
import contextlib
import math
import os
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import Strategy
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from flowturbo.data.datamodule import mix_seed
from flowturbo.sampling.guidance import missing_null_class

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
    """One EMA update (a module-level function: ``ddp_spawn`` pickles the module). Integer
    buffers (BatchNorm's ``num_batches_tracked``) cannot be averaged: they are copied."""
    ema_floats, floats = [], []
    for e, p in zip(ema_params, params, strict=True):
        if e.is_floating_point():
            ema_floats.append(e)
            floats.append(p)
        else:
            e.copy_(p)
    if not floats:
        return
    # a tensor on the parameters' device: no host sync per training step
    n = num_averaged.to(ema_floats[0].dtype)
    keep = torch.clamp((1 + n) / (10 + n), max=decay)
    torch._foreach_mul_(ema_floats, keep)
    torch._foreach_add_(ema_floats, torch._foreach_mul(floats, 1 - keep))


def check_training_settings(optimizer: OptimizerFactory, warmup_steps: int) -> None:
    """Errors that name the ``model.*`` setting, raised when the module is built: torch would
    refuse a bad learning rate only after the base is loaded, naming no setting, and a negative
    warm-up would pass unnoticed."""
    given = getattr(optimizer, "keywords", {})  # Hydra's _partial_ gives a functools.partial
    for key, zero_allowed in (("lr", False), ("weight_decay", True)):
        value = given.get(key)
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and math.isfinite(value) and (value >= 0 if zero_allowed else value > 0):
            continue
        lowest = ">= 0" if zero_allowed else "> 0"
        raise ValueError(f"model.optimizer.{key} must be a number {lowest}, got {value!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"model.warmup_steps must be a whole number >= 0, got {warmup_steps!r}")


def optimizer_with_warmup(
    params: Iterable[nn.Parameter], optimizer: OptimizerFactory, warmup_steps: int
) -> dict:
    """``configure_optimizers`` output: the optimizer and a per-step linear warm-up to its lr."""
    opt = optimizer(params)
    warmup = int(warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def base_precision(autocast: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """The precision in which the frozen base makes the refiner's targets.

    A target is a small difference of two base velocities (V(x', t') - v, or v_b - v_a of a
    trajectory): in bfloat16 (the trainer's ``bf16-mixed`` autocast) its rounding is of the
    order of the difference itself (39 % RMS error of the interpolant target on the demo base,
    ``experiments/README.md``). ``autocast=False`` runs the base in float32, autocast off;
    True: under the trainer's precision (faster, less exact).
    """
    return contextlib.nullcontext() if autocast else torch.autocast(device.type, enabled=False)


def per_sample_draws(
    ids: Tensor, draw: Callable[[torch.Generator], tuple[Tensor, ...]]
) -> tuple[Tensor, ...]:
    """Random values that depend on each sample alone, for reproducible validation.

    ``draw(g)`` is called once per sample with a CPU generator seeded by the sample's id; its
    outputs are stacked along a new first dimension. A sample's noise is then the same whatever
    the batch size, the number of ranks and the order of the batches.

    Args:
        ids: (B,) int64 sample ids.
        draw: generator -> tensors of one sample.

    Returns:
        The stacked draws, each (B, ...), on the CPU.
    """
    # the id hashed to 32 bits: torch's CPU generator keeps only a seed's low 32 bits, which
    # would give sample p of every shard (id shard * 2**32 + p) the same draws
    seeds = [mix_seed(i >> 32, i) for i in ids.tolist()]
    rows = [draw(torch.Generator().manual_seed(seed)) for seed in seeds]
    return tuple(torch.stack(column) for column in zip(*rows, strict=True))


class ValidationTotals:
    """Per-sample sums over one validation pass, summed over ranks at its end.

    A mean of per-batch means (Lightning's ``self.log(..., sync_dist=True)`` in
    ``validation_step``) weighs a rank's short last batch like a full one and averages the ranks'
    means however many samples each had; sums of per-sample values and one count give the mean
    over the set, the same for any batch size and number of ranks, and a rank without samples
    adds zeros instead of leaving the others waiting for its metric.

    Args:
        names: the quantities summed, e.g. ``("loss", "unrefined")``.
    """

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.names) + 1, dtype=torch.float64)  # + the count
        self.seen = 0  # samples of batches without ids, numbered in order of arrival

    def ids(self, batch: tuple[Tensor, ...]) -> Tensor:
        """The batch's sample ids: its third element, or, for ``(x, y)`` batches of another
        loader, the samples' places in this rank's pass (then not independent of the ranks)."""
        if len(batch) > 2:
            return batch[2]
        n = batch[0].shape[0]
        self.seen += n
        return torch.arange(self.seen - n, self.seen)

    def add(self, **values: Tensor) -> None:
        """Adds per-sample values, each (B,), one keyword per name."""
        if set(values) != set(self.names):
            raise ValueError(f"expected values for {self.names}, got {tuple(values)}")
        first = next(iter(values.values()))
        count = torch.tensor([first.shape[0]], dtype=torch.float64, device=first.device)
        sums = torch.stack([values[k].detach().double().sum() for k in self.names])
        self.sums = self.sums.to(first.device) + torch.cat([sums, count])  # no host sync

    def means(self, strategy: Strategy) -> dict[str, Tensor]:
        """Means over all ranks' samples (NaN when there were none), one reduction."""
        total = strategy.reduce(self.sums.to(strategy.root_device), reduce_op="sum")
        return dict(zip(self.names, (total[:-1] / total[-1]).float(), strict=True))


def check_null_class(
    net: nn.Module, label_dropout: float, key: str, what: str = "the base"
) -> None:
    """Refuses label dropout for a SiT (base or refiner, ``what``) without a null-class
    embedding (one built with ``class_dropout_prob=0``): the dropped labels would index past
    its table, PyTorch's bare "index out of range in self" on a CPU and a device-side assert on
    a GPU, after the run has started. ``key`` names the setting, e.g.
    ``"model.label_dropout"``. Other flow models are not checked (their null label is their
    own)."""
    classes = getattr(net, "num_classes", None)
    rows = None if classes is None else missing_null_class(net, classes)
    if label_dropout > 0 and rows is not None:
        raise ValueError(
            f"{key}={label_dropout} drops labels to the null class {classes}, but {what} has "
            f"no embedding for it ({rows} label embeddings: it was built with "
            f"class_dropout_prob=0): set {key}=0, or build it with class_dropout_prob > 0"
        )


def end_process_group() -> None:
    """Destroys this process's default ``torch.distributed`` process group, if it has one.

    Registered with ``atexit`` when ``flowturbo.lit`` is imported, so it runs in every rank
    (a ``ddp_spawn`` rank imports it to unpickle the module). Lightning ends NCCL groups at
    exit but not gloo's (DDP on CPUs): a gloo work still referenced when the interpreter shuts
    down aborts the rank after its job is done ("terminate called without an active
    exception", SIGABRT), and ``ddp_spawn`` then raises in the main process.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


atexit.register(end_process_group)


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
