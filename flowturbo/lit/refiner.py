"""Training FlowTurbo's velocity refiner against a frozen base model."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn

from flowturbo.flow import (
    RefinerBatch,
    interpolant_refiner_batch,
    refiner_loss,
    sample_step_sizes,
    trajectory_refiner_batch,
)
from flowturbo.lit.common import (
    OptimizerFactory,
    ValidationTotals,
    base_precision,
    check_null_class,
    check_training_settings,
    ema_copy,
    optimizer_with_warmup,
    per_sample_draws,
)
from flowturbo.models import (
    CheckpointError,
    SiT,
    VelocityRefiner,
    build_from_checkpoint,
    load_checkpoint,
    load_flow_model,
)


def load_frozen_base(
    path: str,
    name: str | None = None,
    factory: str | None = None,
    *,
    keys: Mapping[str, str] | None = None,
    **arch,
) -> nn.Module:
    """Loads a base model for refiner training, frozen: eval mode, no gradients.

    Args:
        path: a public SiT checkpoint (with ``name`` and ``arch`` overrides giving its
            architecture), a file written by this project (architecture stored inside), or,
            with ``factory``, a checkpoint of a flow model of the user's own.
        name: SiT size, e.g. ``"SiT-XL/2"``, for public checkpoints.
        factory: dotted path of a function ``(path) -> nn.Module`` that builds a flow model of
            the user's own; ``arch`` then holds :class:`flowturbo.models.FlowModel`'s
            arguments (in_channels, input_size, num_classes, time, ...).
        keys: the caller's config keys of ``path`` and ``name``, named in error messages:
            ``{"path": ..., "name": ...}``; train.py's (``model.base.path``,
            ``model.base.name``) by default, e.g. ``model.base_ckpt`` and
            ``model.base_arch.name`` for evaluate.py.
        **arch: SiT constructor overrides (in_channels, num_classes, input_size, ...).
    """
    keys = {"path": "model.base.path", "name": "model.base.name", **(keys or {})}
    if factory is not None:
        if name is not None:
            raise ValueError(
                f"give either a SiT name ({name!r}) or a factory ({factory!r}) for the base"
            )
        return load_flow_model(path, factory, **arch)
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"base checkpoint not found: {path}. Set {keys['path']} to a SiT checkpoint "
            "(e.g. SiT-XL-2-256x256.pt) or to the net.pt / ema.pt of a train.py base run."
        )
    if name is not None:
        base = load_checkpoint(SiT.from_name(name, **arch), path)
    else:
        try:
            base = build_from_checkpoint(path)
        except CheckpointError as err:
            raise CheckpointError(
                f"{err}. For a public SiT checkpoint set {keys['name']} (e.g. SiT-XL/2)."
            ) from err
    if isinstance(base, VelocityRefiner):
        raise CheckpointError(
            f"{path} holds a velocity refiner, not a base flow model: set {keys['path']} to "
            "the base the refiner is trained for (e.g. the net.pt or ema.pt of a base run)"
        )
    return base.eval().requires_grad_(False)


Target = Literal["interpolant", "trajectory"]


class RefinerModule(L.LightningModule):
    """Trains ``refiner`` to predict the change of a frozen base's velocity.

    ``target="interpolant"`` (batches ``(x1, y)`` of data): x_t on the path, v = V(x_t, t),
    dt in (0, dt_max], x' = x_t + dt v; the refiner sees (x', t + dt, v) and predicts
    V(x', t + dt) - v. Base and refiner see the same label, dropped to the null class with
    probability ``label_dropout`` for both. The base is loaded in ``setup`` (not a submodule: it
    is neither trained, averaged nor saved in checkpoints).

    ``target="trajectory"`` (batches ``(traj, y)`` from a trajectory cache, traj
    (B, 2, K, C, H, W) states and velocities on the grid k / (K - 1)): two points a < b of one
    trajectory at most dt_max apart; the refiner sees (x_b, t_b, v_a) and predicts v_b - v_a.
    No base evaluation; ``y`` is the label the base saw (the null class included).

    Validation batches carry sample ids (``(x, y, ids)``, :class:`flowturbo.data.ShardDataModule`):
    each example's randomness comes from its id, and ``val/loss``, ``val/loss_unrefined`` and
    ``val/error_ratio`` (their quotient) are over the whole set, the same for any validation batch
    size and number of ranks.

    Args:
        refiner: the refiner network ``refiner(x, t, v, y, force_drop_ids)``.
        base: factory returning the frozen base (``load_frozen_base`` partial in the configs);
            with trajectory targets optional (None), used only for sample grids.
        optimizer: a partial optimizer, called with the refiner's parameters.
        target: "interpolant" or "trajectory".
        dt_max: largest step between the point and the refiner's point.
        label_dropout: probability of the null class for guidance training (interpolant).
        warmup_steps: linear learning-rate warm-up.
        ema_decay: EMA decay of the refiner per step.
        base_autocast: evaluate the base for interpolant targets under the trainer's precision
            (e.g. bf16-mixed); False (default): in float32, autocast off, as the targets are
            small differences of velocities (:func:`flowturbo.lit.common.base_precision`).
    """

    def __init__(
        self,
        refiner: nn.Module,
        base: Callable[[], nn.Module] | None,
        optimizer: OptimizerFactory,
        target: Target = "interpolant",
        dt_max: float = 0.12,
        label_dropout: float = 0.1,
        warmup_steps: int = 0,
        ema_decay: float = 0.999,
        base_autocast: bool = False,
    ):
        super().__init__()
        if target not in ("interpolant", "trajectory"):
            raise ValueError(f"target must be 'interpolant' or 'trajectory', got {target!r}")
        if target == "interpolant" and base is None:
            raise ValueError("interpolant targets need the frozen base: set model.base")
        check_training_settings(optimizer, warmup_steps)
        if not 0 < dt_max <= 1:
            raise ValueError(f"model.dt_max must be in (0, 1], got {dt_max}")
        if not 0 <= label_dropout <= 1:
            raise ValueError(f"model.label_dropout must be in [0, 1], got {label_dropout}")
        if target == "interpolant":  # trajectory labels are the cache's, dropped when cached
            check_null_class(refiner, label_dropout, "model.label_dropout", "the refiner")
        self.save_hyperparameters(ignore=["refiner", "base", "optimizer"])
        self.refiner = refiner
        self.ema = ema_copy(refiner, ema_decay)
        self.base_factory = base
        self.optimizer = optimizer
        self._base: tuple[nn.Module] | None = None  # a tuple keeps it out of the module tree
        self.val_totals = ValidationTotals(("loss", "unrefined", "loss_net"))

    @property
    def base(self) -> nn.Module:
        if self._base is None:
            raise RuntimeError("the base model is loaded in setup(); call trainer.fit/validate")
        return self._base[0]

    @property
    def trained_network(self) -> nn.Module:
        """The network being trained (not its EMA)."""
        return self.refiner

    def sampling_models(self) -> tuple[nn.Module | None, nn.Module]:
        """(base, refiner) for sample grids: the frozen base (None if not loaded), EMA refiner."""
        return (self._base[0] if self._base else None), self.ema.module

    @property
    def uses_base(self) -> bool:
        return self.hparams.target == "interpolant"

    def setup(self, stage: str) -> None:
        if self._base is None and self.base_factory is not None:
            base = self.base_factory()
            check_null_class(base, self.hparams.label_dropout, "model.label_dropout")
            self._base = (base,)

    def on_fit_start(self) -> None:
        if self._base is not None:
            self.base.to(self.device).eval()

    def on_validation_start(self) -> None:
        if self._base is not None:
            self.base.to(self.device).eval()

    def examples(
        self, x: Tensor, y: Tensor, ids: Tensor | None = None
    ) -> tuple[RefinerBatch, dict]:
        """Training examples of a batch and the model kwargs.

        Args:
            x: (B, C, H, W) data (interpolant) or (B, 2, K, C, H, W) trajectories.
            y: (B,) labels.
            ids: (B,) sample ids: each example's randomness drawn from its id (validation);
                None: from the global RNG (training).
        """
        if self.uses_base:
            return self._interpolant_examples(x, y, ids)
        return self._trajectory_examples(x, y, ids)

    def _interpolant_examples(self, x1: Tensor, y: Tensor, ids: Tensor | None):
        if ids is None:
            x0, t = torch.randn_like(x1), torch.rand(x1.shape[0], device=x1.device)
            u, drop_u = torch.rand_like(t), torch.rand_like(t)
        else:
            x0, t, u, drop_u = per_sample_draws(
                ids,
                lambda g: (torch.randn(x1.shape[1:], generator=g), *torch.rand(3, generator=g)),
            )
            x0, t, u, drop_u = x0.to(x1), t.to(x1), u.to(x1), drop_u.to(x1)
        dt = sample_step_sizes(t, self.hparams.dt_max, u)
        kw = {"y": y, "force_drop_ids": (drop_u < self.hparams.label_dropout).long()}
        with torch.no_grad(), base_precision(self.hparams.base_autocast, x1.device):
            examples = interpolant_refiner_batch(self.base, x1, x0, t, dt, **kw)
        return examples, kw

    def _trajectory_examples(
        self, traj: Tensor, y: Tensor, ids: Tensor | None
    ) -> tuple[RefinerBatch, dict]:
        b, steps = traj.shape[0], traj.shape[2] - 1  # traj (B, 2, K, C, H, W)
        # gap b - a in {1, ..., floor(dt_max * steps)}, then a uniform in [0, steps - gap]
        max_gap = min(steps, int(self.hparams.dt_max * steps + 1e-6))
        if max_gap < 1:
            raise ValueError(
                f"the trajectory cache has {steps} steps, so its nearest points are 1/{steps} "
                f"apart, more than model.dt_max={self.hparams.dt_max}: cache with cache.steps >= "
                f"{math.ceil(1 / self.hparams.dt_max - 1e-6)}, or raise model.dt_max"
            )
        if ids is None:
            gap, u = torch.randint(1, max_gap + 1, (b,)), torch.rand(b)
        else:
            gap, u = per_sample_draws(
                ids,
                lambda g: (
                    torch.randint(1, max_gap + 1, (), generator=g),
                    torch.rand((), generator=g),
                ),
            )
        a = (u * (steps - gap + 1)).long().clamp(max=steps - gap)
        a, gap, rows = a.to(traj.device), gap.to(traj.device), torch.arange(b, device=traj.device)
        later = a + gap
        examples = trajectory_refiner_batch(
            x_b=traj[rows, 0, later],
            t_b=later.to(traj.dtype) / steps,
            v_a=traj[rows, 1, a],
            v_b=traj[rows, 1, later],
        )
        return examples, {"y": y, "force_drop_ids": torch.zeros_like(y)}  # labels as cached

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        examples, kw = self.examples(*batch)
        loss = refiner_loss(self.refiner, examples, **kw)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # here, not in on_train_batch_end: checkpoint callbacks run before the module's hook
        self.ema.update_parameters(self.refiner)

    def on_validation_epoch_start(self) -> None:
        self.val_totals.reset()

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        examples, kw = self.examples(*batch[:2], ids=self.val_totals.ids(batch))
        loss = refiner_loss(self.ema.module, examples, per_sample=True, **kw)
        unrefined = examples.target.float().pow(2).flatten(1).mean(1)  # keeping v: delta = 0
        net_loss = refiner_loss(self.refiner, examples, per_sample=True, **kw)  # export=net's
        self.val_totals.add(loss=loss, unrefined=unrefined, loss_net=net_loss)

    def on_validation_epoch_end(self) -> None:
        means = self.val_totals.means(self.trainer.strategy)  # summed over ranks already
        # sync_dist: a mean of equal values, only so that Lightning does not warn
        self.log("val/loss", means["loss"], prog_bar=True, sync_dist=True)
        self.log("val/loss_unrefined", means["unrefined"], sync_dist=True)
        ratio = means["loss"] / means["unrefined"]  # of sums over the set, not a mean of ratios
        self.log("val/error_ratio", ratio, prog_bar=True, sync_dist=True)
        self.log("val/loss_net", means["loss_net"], sync_dist=True)  # the trained, not EMA, one

    def configure_optimizers(self) -> dict:
        return optimizer_with_warmup(
            self.refiner.parameters(), self.optimizer, self.hparams.warmup_steps
        )
