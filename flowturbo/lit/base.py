"""Training a base flow model (SiT) with flow matching."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn

from flowturbo.flow import flow_matching_loss
from flowturbo.lit.common import (
    OptimizerFactory,
    ValidationTotals,
    check_training_settings,
    ema_copy,
    optimizer_with_warmup,
    per_sample_draws,
)


class FlowMatchingModule(L.LightningModule):
    """Trains ``net`` (a SiT) on batches ``(x1, y)`` with the flow-matching loss.

    Label dropout for guidance is the SiT's own (``class_dropout_prob``, training mode only).
    An EMA copy of ``net`` is kept, saved in checkpoints and used for validation and samples
    (``val/loss``; ``val/loss_net`` is the trained network's own, what ``export=net`` ships).
    Validation batches are ``(x1, y, ids)`` (:class:`flowturbo.data.ShardDataModule`): each
    sample's noise and time come from its id, and ``val/loss`` is the mean over the whole set,
    the same for any validation batch size and number of ranks.

    Args:
        net: the velocity network ``net(x, t, y)``.
        optimizer: a partial optimizer, called with the parameters (AdamW in the configs).
        warmup_steps: linear learning-rate warm-up.
        ema_decay: EMA decay per optimizer step.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        warmup_steps: int = 0,
        ema_decay: float = 0.999,
    ):
        super().__init__()
        check_training_settings(optimizer, warmup_steps)
        self.save_hyperparameters(ignore=["net", "optimizer"])
        self.net = net
        self.ema = ema_copy(net, ema_decay)
        self.optimizer = optimizer
        self.val_totals = ValidationTotals(("loss", "loss_net"))

    @property
    def sampling_net(self) -> nn.Module:
        """The network to sample with: the EMA weights."""
        return self.ema.module

    @property
    def trained_network(self) -> nn.Module:
        """The network being trained (not its EMA)."""
        return self.net

    def sampling_models(self) -> tuple[nn.Module, None]:
        """(base, refiner) for sample grids: the EMA weights, no refiner."""
        return self.ema.module, None

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x1, y = batch
        x0 = torch.randn_like(x1)
        t = torch.rand(x1.shape[0], device=x1.device)
        loss = flow_matching_loss(self.net, x1, x0, t, y=y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # here, not in on_train_batch_end: checkpoint callbacks run before the module's hook
        self.ema.update_parameters(self.net)

    def on_validation_epoch_start(self) -> None:
        self.val_totals.reset()

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x1, y = batch[:2]
        x0, t = per_sample_draws(  # the same noise every validation
            self.val_totals.ids(batch),
            lambda g: (torch.randn(x1.shape[1:], generator=g), torch.rand((), generator=g)),
        )
        x0, t = x0.to(x1), t.to(x1)
        loss = flow_matching_loss(self.sampling_net, x1, x0, t, y=y, per_sample=True)
        net_loss = flow_matching_loss(self.net, x1, x0, t, y=y, per_sample=True)  # export=net's
        self.val_totals.add(loss=loss, loss_net=net_loss)

    def on_validation_epoch_end(self) -> None:
        means = self.val_totals.means(self.trainer.strategy)  # summed over ranks already
        # sync_dist: a mean of equal values, only so that Lightning does not warn
        self.log("val/loss", means["loss"], prog_bar=True, sync_dist=True)
        self.log("val/loss_net", means["loss_net"], sync_dist=True)

    def configure_optimizers(self) -> dict:
        return optimizer_with_warmup(
            self.net.parameters(), self.optimizer, self.hparams.warmup_steps
        )
