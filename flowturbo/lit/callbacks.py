"""Callbacks shared by the training runs."""

from __future__ import annotations

import lightning as L
import torch


class LogSkippedSamples(L.Callback):
    """Logs the DataModule's skipped-sample counts (summed over ranks) after each epoch.

    Shows corrupt or undecodable samples in the logs as ``data/skipped``, ``data/skipped_train``
    and ``data/skipped_val``; a no-op for data modules without ``skipped_summary()``.
    """

    def _log(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        summary = getattr(trainer.datamodule, "skipped_summary", None)
        if summary is None:
            return
        for key, count in summary().items():
            total = trainer.strategy.reduce(
                torch.tensor(float(count), device=module.device), reduce_op="sum"
            )
            module.log(key, total, rank_zero_only=True)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._log(trainer, module)
