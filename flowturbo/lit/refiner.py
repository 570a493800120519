"""Training FlowTurbo's velocity refiner against a frozen base model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from flowturbo.flow import interpolant_refiner_batch, refiner_loss, sample_step_sizes
from flowturbo.lit.common import OptimizerFactory, ema_copy, optimizer_with_warmup, seeded_noise
from flowturbo.models import CheckpointError, SiT, build_from_checkpoint, load_checkpoint


def load_frozen_base(path: str, name: str | None = None, **arch) -> SiT:
    """Loads a base model for refiner training, frozen: eval mode, no gradients.

    Args:
        path: a public SiT checkpoint (with ``name`` and ``arch`` overrides giving its
            architecture) or a file written by this project (architecture stored inside).
        name: SiT size, e.g. ``"SiT-XL/2"``, for public checkpoints.
        **arch: SiT constructor overrides (in_channels, num_classes, input_size, ...).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"base checkpoint not found: {path}. Set model.base.path to a SiT checkpoint "
            "(e.g. SiT-XL-2-256x256.pt) or to the ema.pt of a demo_base run."
        )
    if name is not None:
        base = load_checkpoint(SiT.from_name(name, **arch), path)
    else:
        try:
            base = build_from_checkpoint(path)
        except CheckpointError as err:
            raise CheckpointError(
                f"{err}. For a public SiT checkpoint set model.base.name (e.g. SiT-XL/2)."
            ) from err
    return base.eval().requires_grad_(False)


class RefinerModule(L.LightningModule):
    """Trains ``refiner`` to predict V(x', t') - v for a frozen base V (interpolant targets).

    One example: x_t on the path, v = V(x_t, t), dt in (0, dt_max], x' = x_t + dt v; the refiner
    sees (x', t + dt, v). Base and refiner see the same label, dropped to the null class with
    probability ``label_dropout`` for both. The base is loaded in ``setup`` (not a submodule: it
    is neither trained, averaged nor saved in checkpoints).

    Args:
        refiner: the refiner network ``refiner(x, t, v, y, force_drop_ids)``.
        base: factory returning the frozen base (``load_frozen_base`` partial in the configs).
        optimizer: a partial optimizer, called with the refiner's parameters.
        dt_max: largest step between the point and the refiner's point.
        label_dropout: probability of the null class for guidance training.
        warmup_steps: linear learning-rate warm-up.
        ema_decay: EMA decay of the refiner per step.
    """

    def __init__(
        self,
        refiner: nn.Module,
        base: Callable[[], nn.Module],
        optimizer: OptimizerFactory,
        dt_max: float = 0.12,
        label_dropout: float = 0.1,
        warmup_steps: int = 0,
        ema_decay: float = 0.999,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["refiner", "base", "optimizer"])
        self.refiner = refiner
        self.ema = ema_copy(refiner, ema_decay)
        self.base_factory = base
        self.optimizer = optimizer
        self._base: tuple[nn.Module] | None = None  # a tuple keeps it out of the module tree

    @property
    def base(self) -> nn.Module:
        if self._base is None:
            raise RuntimeError("the base model is loaded in setup(); call trainer.fit/validate")
        return self._base[0]

    def setup(self, stage: str) -> None:
        if self._base is None:
            self._base = (self.base_factory(),)

    def on_fit_start(self) -> None:
        self.base.to(self.device).eval()

    def on_validation_start(self) -> None:
        self.base.to(self.device).eval()

    def _examples(self, batch: tuple[Tensor, Tensor], seed: int | None):
        x1, y = batch
        if seed is None:
            x0, t = torch.randn_like(x1), torch.rand(x1.shape[0], device=x1.device)
            u, drop_u = torch.rand_like(t), torch.rand_like(t)
        else:
            x0, t = seeded_noise(x1, seed)
            g = torch.Generator().manual_seed(seed + 1)
            u, drop_u = (torch.rand(t.shape, generator=g).to(t) for _ in range(2))
        dt = sample_step_sizes(t, self.hparams.dt_max, u)
        kw = {"y": y, "force_drop_ids": (drop_u < self.hparams.label_dropout).long()}
        with torch.no_grad():
            examples = interpolant_refiner_batch(self.base, x1, x0, t, dt, **kw)
        return examples, kw

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        examples, kw = self._examples(batch, seed=None)
        loss = refiner_loss(self.refiner, examples, **kw)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.ema.update_parameters(self.refiner)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        examples, kw = self._examples(batch, seed=batch_idx)
        loss = refiner_loss(self.ema.module, examples, **kw)
        unrefined = examples.target.float().pow(2).mean()  # keeping v unchanged: delta = 0
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/loss_unrefined", unrefined, sync_dist=True)
        self.log("val/error_ratio", loss / unrefined, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict:
        return optimizer_with_warmup(
            self.refiner.parameters(), self.optimizer, self.hparams.warmup_steps
        )
