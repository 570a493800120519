"""Callbacks shared by the training runs."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

from flowturbo.data.datamodule import mix_seed

log = logging.getLogger(__name__)


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


class SeedEachRank(L.Callback):
    """Seeds each rank's training draws (noise, times, dropped labels) by its rank and step.

    ``seed_everything`` gives every process the same seed, so without this every rank of a DDP
    run draws the same noise and times for its different images, and a resumed run draws the
    noise of step 0 again. When fitting starts, torch's generators are seeded with (seed, global
    rank, global step). Rank 0 of a fresh run keeps the stream ``seed_everything`` gave it, so
    single-process runs are as before. ``train.py`` always adds it.

    Args:
        seed: the run's seed (``cfg.seed``).
    """

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.global_rank or trainer.global_step:
            torch.manual_seed(mix_seed(self.seed, trainer.global_rank, trainer.global_step))


class RecordSettings(L.Callback):
    """Stores the run's settings in every checkpoint (``checkpoint["settings"]``), so that a
    resumed run can say which of them it changed (``train.py``'s ``check_resumable``).

    Args:
        settings: plain nested dicts (e.g. the resolved ``model`` and ``data`` configs).
    """

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings

    def on_save_checkpoint(
        self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["settings"] = self.settings


class StopOnSignal(L.Callback):
    """Stops a prediction job (``generate.py``, ``cache_trajectories.py``) at the end of the
    batch under way when it is told to: Ctrl-C's ``SIGINT``, ``SIGTERM`` of ``kill`` or
    ``scancel``. The job exits with status 1; what it wrote is kept and the same command goes
    on from there. A second signal stops at once.

    Lightning's own ``SIGTERM`` handler lets prediction run on to its end (it acts on the
    signal only while fitting or validating) and, under DDP, broadcasts from rank 0 inside the
    handler, which deadlocks ranks busy in another collective. This one replaces it while
    prediction runs. Each rank stops on its own signal: prediction deals ranks unequal numbers
    of batches, so there is no per-batch collective to agree in (a terminal's Ctrl-C and
    SLURM's ``scancel`` signal every rank).

    Args:
        stop_on: the names of the signals that stop.
    """

    stage = "predict"  # the trainer function the handlers are installed for

    def __init__(self, stop_on: Sequence[str] = ("SIGINT", "SIGTERM")):
        self.stop_on = {getattr(signal, name) for name in stop_on}
        self._previous: dict[int, Any] = {}
        self._trainer: L.Trainer | None = None
        self._received: tuple[int, Any] | None = None  # (signum, frame) not acted on yet

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if stage == self.stage:
            self._install(trainer)

    def on_predict_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._back_on_top()

    def on_predict_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        if self._trainer is not None and self._received is not None:
            self._stop(trainer, "stopped: run the same command again to go on")

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if self._trainer is not None:
            self._uninstall()
            if self._received is not None:  # the job ended first: nothing left to do but
                self._pass_on()  # what the signal did before (submitit's requeue, a stop)

    def on_exception(
        self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException
    ) -> None:
        # the teardown hook is not called then; a signal still pending is dropped (a crashed
        # run is not requeued). Lightning's own teardown may install this handler again: with
        # no trainer it does what the signal did before.
        if self._trainer is not None:
            self._uninstall()
            self._received = None

    def _signals(self) -> list[int]:
        return sorted(self.stop_on)

    def _install(self, trainer: L.Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        self._trainer = trainer
        for signum in self._signals():
            self._previous[signum] = signal.signal(signum, self._handle)

    def _back_on_top(self) -> None:
        # Lightning installs its own SIGTERM handler after setup, with this one inside it; under
        # DDP that handler broadcasts from rank 0 (Lightning >= 2.5.2) wherever the ranks are,
        # and a rank inside another collective then waits forever. This one goes back on top,
        # and what the signals did before either stays this one's previous handler.
        if self._trainer is not None:
            for signum in self.stop_on:
                signal.signal(signum, self._handle)

    def _uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous or signal.SIG_DFL)
        self._trainer = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self._trainer is None or (signum in self.stop_on and self._received is not None):
            self._received = None  # not running (any more), or stop signalled twice: at once
            self._call_previous(signum, frame)
            return
        self._announce(signal.Signals(signum))
        self._received = (signum, frame)

    def _announce(self, signum: signal.Signals) -> None:
        log.warning(
            "%s: stopping at the end of this batch (%s again to stop at once)",
            signum.name,
            _again(signum),
        )

    def _stop(self, trainer: L.Trainer, message: str) -> None:
        """Ends the job (status 1) after logging ``message``."""
        self._received = None
        log.warning(message)
        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            # a rank of ddp_spawn: torch's process wrapper takes KeyboardInterrupt for its own
            # stop and exits with 0, and the main process would wait for its results forever
            raise SystemExit(1)
        raise KeyboardInterrupt  # Lightning shuts down and exits with status 1

    def _pass_on(self) -> None:
        (signum, frame), self._received = self._received, None
        self._call_previous(signum, frame)

    def _call_previous(self, signum: int, frame: Any) -> None:
        """What the signal did before this callback: the handler installed then, or the
        default action (KeyboardInterrupt for SIGINT; for SIGTERM, the process ends)."""
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif signum == signal.SIGINT and previous == signal.SIG_DFL:
            raise KeyboardInterrupt
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


class CheckpointOnSignal(StopOnSignal):
    """Saves ``last.ckpt`` when the job is told to stop: SLURM's time-out warning (then the job
    is requeued), Ctrl-C or ``SIGTERM`` (then the run stops).

    submitit (Hydra's SLURM launcher) is told of a time-out or preemption by ``SIGUSR2``
    (``signal_delay_s`` before the end) and requeues the job from its own handler; Lightning's
    auto-requeue listens on ``SIGUSR1`` and never fires under submitit. This callback saves the
    full training state (model, optimizer, EMA, step) to ``dirpath/last.ckpt`` first and then
    calls the handler that was installed before it (submitit's), so the requeued job resumes
    from there (``resume=true``, the same ``ckpt_dir``). On a stop signal (``stop_on``: Ctrl-C's
    ``SIGINT``, and ``SIGTERM`` of ``kill`` or ``scancel``) it saves the same way and then stops
    the run with ``KeyboardInterrupt`` (Lightning shuts down and exits with status 1); rerunning
    the command continues from there. A second stop signal stops at once, without saving.

    The signal handler only notes the signal: the checkpoint is written at the end of the
    training step (or validation pass) under way, when every rank has agreed that some rank
    was signalled (one boolean all-reduce per step in a distributed run). Saving from the
    handler itself ran the checkpoint's collective wherever each rank was, e.g. one inside the
    backward pass's gradient all-reduce: the ranks deadlocked and the job was never requeued.
    Every rank saves together; a rank that was signalled then calls its previous handler, or,
    for a stop signal on any rank, every rank stops.

    Args:
        dirpath: checkpoint folder (``ckpt_dir``), outside Hydra's run directory.
        signum: the signal name of the requeue warning, ``SIGUSR2`` for submitit.
        stop_on: the names of the signals that save and stop.
    """

    stage = "fit"

    def __init__(
        self, dirpath: str, signum: str = "SIGUSR2", stop_on: Sequence[str] = ("SIGINT", "SIGTERM")
    ):
        super().__init__(stop_on)
        self.path = Path(dirpath) / "last.ckpt"
        self.signum = getattr(signal, signum)
        self.saved_at: int | None = None

    def _signals(self) -> list[int]:
        return [self.signum, *super()._signals()]

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._back_on_top()

    def _announce(self, signum: signal.Signals) -> None:
        if signum in self.stop_on:
            log.warning(
                "%s: saving %s at the end of this training step, then stopping (%s again to "
                "stop at once, without saving)",
                signum.name,
                self.path,
                _again(signum),
            )
        else:
            log.warning("%s: saving %s at the end of this training step", signum.name, self.path)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        self._save_if_signalled(trainer)

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":  # a long validation pass is no place to wait
            self._save_if_signalled(trainer)

    def _save_if_signalled(self, trainer: L.Trainer) -> None:
        if self._trainer is None:
            return
        signalled = self._received is not None
        stop = signalled and self._received[0] in self.stop_on
        if trainer.world_size > 1:  # every rank takes part in the save, or none
            signalled = trainer.strategy.reduce_boolean_decision(signalled, all=False)
            if signalled:  # and every rank stops if one was told to
                stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not signalled:
            return
        trainer.save_checkpoint(self.path)
        self.saved_at = trainer.global_step
        log.warning("saved %s at step %d", self.path, trainer.global_step)
        if stop:
            self._stop(
                trainer,
                f"stopped at step {trainer.global_step}: run the same command again to "
                f"continue from {self.path}",
            )
        if self._received is not None:
            self._pass_on()


class FinalCheckpoint(L.Callback):
    """Leaves ``dirpath/last.ckpt`` at the step where training ended, and records the step of
    the last validation (``validated_step``).

    ModelCheckpoint saves every ``every_n_train_steps``, and Lightning writes ``last.ckpt`` at
    the end of training only when it wrote none before: a run whose ``max_steps`` is not a
    multiple of that interval left ``last.ckpt`` behind its exported weights, and the same
    command run again trained the last steps anew (other noise, other weights). train.py
    validates once more when ``validated_step`` is not the final step, so that the metrics it
    stores describe the weights it exports.
    """

    def __init__(self, dirpath: str | os.PathLike):
        self.path = Path(dirpath) / "last.ckpt"
        self.saved_step: int | None = None
        self.validated_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # a resumed run starts from its checkpoint's step, saved already
        self.saved_step = trainer.global_step if trainer.ckpt_path else None

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint):
        self.saved_step = trainer.global_step  # on every rank: all of them decide alike below

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.saved_step != trainer.global_step:
            trainer.save_checkpoint(self.path)
            if trainer.is_global_zero:
                log.info("saved %s at the final step %d", self.path, trainer.global_step)


def _again(signum: signal.Signals) -> str:
    """How a user sends ``signum`` once more, for the messages: Ctrl-C for SIGINT."""
    return "Ctrl-C" if signum == signal.SIGINT else signum.name


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` (and at the end), a grid of samples from fixed noise and labels.

    The module says what to sample with (``sampling_models()`` -> base, refiner or None):
    the base run samples its EMA weights with ``base_schedule``, the refiner run its frozen base
    and EMA refiner with the FlowTurbo ``schedule``. Grids are written as PNG files to
    ``out_dir`` and logged to W&B (``samples``) when a W&B logger is attached. Latent models
    are decoded with the SD VAE from ``vae_path``; without one their grids are skipped.

    Args:
        every_n_steps: optimizer steps between grids.
        num_images: images per grid, labels cycling through the classes.
        schedule: FlowTurbo schedule for refiner runs, e.g. ``"H1P5R3"``.
        base_schedule: schedule for base runs (no refiner), e.g. ``"H8"``.
        cfg_scale: classifier-free guidance scale (1 = none).
        seed: fixes the noise.
        out_dir: folder for ``step_XXXXXX.png``.
        vae_path: local SD VAE folder, for latent models.
    """

    def __init__(
        self,
        every_n_steps: int = 250,
        num_images: int = 20,
        schedule: str = "H1P5R3",
        base_schedule: str = "H8",
        cfg_scale: float = 1.0,
        seed: int = 0,
        out_dir: str = "samples",
        vae_path: str | None = None,
    ):
        from flowturbo.sampling import parse_schedule

        for text in (schedule, base_schedule):
            parse_schedule(text)  # a bad schedule fails now, not at step 250
        self.every_n_steps, self.num_images = int(every_n_steps), int(num_images)
        self.schedule, self.base_schedule = schedule, base_schedule
        self.cfg_scale, self.seed = float(cfg_scale), int(seed)
        self.out_dir, self.vae_path = Path(out_dir), vae_path
        self._vae: Any = None
        self._last_step = -1
        self._warned = False

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        # at the start of the next batch, so that the module's EMA includes step N's update
        step = trainer.global_step
        due = self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0
        if due and step != self._last_step:
            self._grid(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self._grid(trainer, module)

    def _skip(self, why: str) -> None:
        if not self._warned:
            log.info("sample grids skipped: %s", why)
            self._warned = True

    @torch.no_grad()
    def _grid(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from torchvision.utils import save_image

        from flowturbo.sampling import ClassifierFreeGuidance, decode_latents, sample

        self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        base, refiner = module.sampling_models()
        if base is None:
            return self._skip("the frozen base is not loaded (trajectory targets)")
        if base.in_channels == 4 and self.vae_path is None and self._vae is None:
            return self._skip("latent model and no vae_path to decode with")
        classes = base.num_classes
        g = torch.Generator().manual_seed(self.seed)
        shape = (self.num_images, base.in_channels, base.input_size, base.input_size)
        noise = torch.randn(shape, generator=g).to(module.device)
        y = (torch.arange(self.num_images) % classes).to(module.device)
        schedule = self.base_schedule if refiner is None else self.schedule
        v = ClassifierFreeGuidance(base, self.cfg_scale, classes)
        r = None if refiner is None else ClassifierFreeGuidance(refiner, self.cfg_scale, classes)
        was_training = [(m, m.training) for m in (base, refiner) if m is not None]
        for m, _ in was_training:
            m.eval()
        try:
            x = sample(v, noise, schedule, refiner=r, y=y)
        finally:
            for m, mode in was_training:
                m.train(mode)
        if base.in_channels == 4:
            if self._vae is None:
                from flowturbo.data import load_vae

                self._vae = load_vae(self.vae_path, device=module.device)
            x = decode_latents(x, self._vae)
        images = (x.float().clamp(-1, 1) + 1) / 2
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step_{trainer.global_step:06d}.png"
        save_image(images, path, nrow=min(classes, 10))
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(
                    "samples",
                    [str(path)],
                    step=trainer.global_step,
                    caption=[f"{schedule}, step {trainer.global_step}"],
                )
