"""What the entry points run: ``train.py`` (fit, export the EMA weights) and
``cache_trajectories.py`` (write the refiner's trajectory cache), from their Hydra configs."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from flowturbo.config import (
    check_accelerator,
    check_config,
    check_ddp_launch,
    check_enough_work,
    command_line,
    register_resolvers,
)
from flowturbo.lit.common import AtomicCheckpointIO
from flowturbo.lock import folder_lock
from flowturbo.models import save_checkpoint

register_resolvers()

log = logging.getLogger(__name__)


def make_loggers(cfg: DictConfig) -> list:
    """CSV logger always; W&B offline unless opted in. ``WANDB_MODE`` wins over the config.

    A W&B run continues when training resumes (a rerun, a requeued SLURM job): its id is kept
    in ``ckpt_dir/wandb_id`` beside ``last.ckpt``, and a fresh start (no checkpoint, or
    ``resume=false``) starts a new run.
    """
    loggers = []
    for name, conf in (cfg.get("logger") or {}).items():
        if conf is None:
            continue
        if "Wandb" in conf.get("_target_", ""):
            mode = os.environ.get("WANDB_MODE")
            if mode == "disabled":
                continue
            if mode is not None:
                conf = OmegaConf.merge(conf, {"offline": mode != "online"})
            if conf.get("id") is None:
                conf = OmegaConf.merge(conf, {})  # a copy whose keys can be added
                with open_dict(conf):
                    conf.id, conf.resume = wandb_run_id(cfg), "allow"
        loggers.append(instantiate(conf))
        log.info("logger %s: %s", name, conf["_target_"])
    return loggers


def make_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The configured callbacks (``cfg.callbacks``; null entries dropped) and, always,
    :class:`~flowturbo.lit.callbacks.SeedEachRank` and
    :class:`~flowturbo.lit.callbacks.RecordSettings` (of :func:`run_settings`)."""
    from flowturbo.lit.callbacks import FinalCheckpoint, RecordSettings, SeedEachRank

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    always = [SeedEachRank(cfg.seed), RecordSettings(run_settings(cfg))]
    return [*callbacks, *always, FinalCheckpoint(cfg.ckpt_dir)]


def run_settings(cfg: DictConfig) -> dict[str, Any]:
    """What a checkpoint records of its run, to compare on resume: ``model``, ``data``, seed."""
    keep = {k: cfg.get(k) for k in ("model", "data", "seed")}
    return OmegaConf.to_container(OmegaConf.create(keep), resolve=True)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"model.optimizer.lr": value, ...}``."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}


def wandb_run_id(cfg: DictConfig) -> str:
    """The W&B run id of this training run: the one in ``ckpt_dir/wandb_id`` when the run
    resumes from ``last.ckpt``, else a new one, written there (by rank 0) for later resumes."""
    from lightning.pytorch.utilities import rank_zero_only

    path = Path(cfg.ckpt_dir) / "wandb_id"
    if cfg.resume and (Path(cfg.ckpt_dir) / "last.ckpt").is_file() and path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    if rank_zero_only.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


def resume_path(cfg: DictConfig) -> str | None:
    """``ckpt_dir/last.ckpt`` when resuming and it exists, else None (a fresh start, said so)."""
    last = Path(cfg.ckpt_dir) / "last.ckpt"
    if cfg.resume and last.is_file():
        log.info("resuming from %s", last)
        return str(last)
    log.info("starting fresh (%s)", f"no {last}" if cfg.resume else "resume=false")
    return None


def check_resumable(
    path: str, module: L.LightningModule, settings: dict[str, Any] | None = None
) -> None:
    """Refuses ``last.ckpt`` of another run (another experiment or architecture) in words,
    before Lightning's load fails with every key listed; warns, naming them, of ``settings``
    (:func:`run_settings`) that differ from those the checkpoint recorded."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as exn:  # truncated zip, not a torch file, unpickling errors
        raise ValueError(
            f"{path} cannot be read as a checkpoint ({type(exn).__name__}: {exn}); it was "
            "probably cut off while being written. Delete it to start this run over, or rerun "
            "with resume=false (which also starts over)"
        ) from exn
    theirs = {k: tuple(v.shape) for k, v in ckpt.get("state_dict", {}).items()}
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing, unexpected = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    reshaped = sorted(k for k in ours.keys() & theirs.keys() if ours[k] != theirs[k])
    if missing or unexpected or reshaped:
        example = (missing or unexpected or reshaped)[0]
        raise ValueError(
            f"{path} was written by another run: {len(missing)} of this "
            f"{type(module).__name__}'s weights are not in it, {len(unexpected)} of its are "
            f"not in this model and {len(reshaped)} differ in shape (e.g. {example!r}). Give "
            "this run its own name=..., or resume=false to start over (it overwrites that "
            "checkpoint)."
        )
    before = _flat(ckpt.get("settings") or {})
    now = _flat(settings or {})
    changed = sorted(k for k in before.keys() & now.keys() if before[k] != now[k])
    if changed:
        log.warning(
            "resuming %s (step %s) with %d setting(s) other than the run that wrote it: %s. The "
            "checkpoint's weights, optimizer state (its learning rate included) and step "
            "carry on; to start over with these settings give another name=... or resume=false",
            path,
            ckpt.get("global_step"),
            len(changed),
            "; ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed[:8]),
        )


EXPORT_DTYPES = (None, "float32", "float16", "bfloat16")


#: What a run refused for its busy folder can do besides waiting (flowturbo.lock).
TRAIN_ELSEWHERE = "give this run another name=... or ckpt_dir=..."
CACHE_ELSEWHERE = "give this run another out_dir=..."


def train(cfg: DictConfig) -> dict:
    """Fits ``cfg.model`` on ``cfg.data`` and writes ``ckpt_dir/ema.pt`` (``export=net``: the
    trained network's own weights, ``net.pt``); returns the final metrics.

    The run holds ``ckpt_dir``'s lock (:func:`flowturbo.lock.folder_lock`) from before it reads
    ``last.ckpt`` until the export is written: a second run on the folder is refused.
    """
    check_config(cfg, command_line("train.py"))
    check_accelerator(cfg.trainer)
    export = cfg.get("export", "ema")
    if export not in ("ema", "net"):
        raise ValueError(f"export must be 'ema' or 'net', got {export!r}")
    if cfg.get("export_dtype") not in EXPORT_DTYPES:
        raise ValueError(
            f"export_dtype must be null (as trained) or one of {EXPORT_DTYPES[1:]}, got "
            f"{cfg.export_dtype!r}"
        )
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model)
    check_data_kind(cfg, datamodule, module)
    with folder_lock(cfg.ckpt_dir, what_to_do=TRAIN_ELSEWHERE):
        return _fit_and_export(cfg, module, datamodule, export)


def _fit_and_export(
    cfg: DictConfig, module: L.LightningModule, datamodule: L.LightningDataModule, export: str
) -> dict:
    """:func:`train`'s work in ``ckpt_dir``: resume or start, fit, export."""
    from flowturbo.lit.callbacks import FinalCheckpoint

    ckpt_path = resume_path(cfg)
    if ckpt_path is not None:
        check_resumable(ckpt_path, module, run_settings(cfg))
    trainer = instantiate(
        cfg.trainer,
        callbacks=make_callbacks(cfg),
        logger=make_loggers(cfg),
        plugins=[AtomicCheckpointIO()],  # last.ckpt whole or not at all, whatever TMPDIR is
    )
    check_ddp_launch(trainer)
    per_rank = cfg.data.get("batch_size")
    if per_rank is not None and trainer.is_global_zero:  # data.batch_size is per rank
        ranks, accumulate = trainer.world_size, trainer.accumulate_grad_batches
        log.info(
            "batch %d per rank x %d rank(s) x %d accumulated = %d examples per optimizer step",
            per_rank, ranks, accumulate, per_rank * ranks * accumulate,
        )  # fmt: skip
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    (final,) = [c for c in trainer.callbacks if isinstance(c, FinalCheckpoint)]
    # the exported weights' own validation: none yet when the last one was of an earlier step,
    # when a finished run was resumed (nothing trained), or in a ddp_spawn parent process
    if final.validated_step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    # the logged data/skipped* are summed over ranks; without LogSkippedSamples, this rank's
    local = {} if "data/skipped" in metrics else getattr(datamodule, "skipped_summary", dict)()
    # under ddp_spawn this process did not train and its trainer's step stayed 0; the weights
    # came back, and the EMA's update count (one per optimizer step) with them
    step = max(trainer.global_step, int(module.ema.n_averaged))
    if trainer.is_global_zero:
        out = Path(cfg.ckpt_dir) / f"{export}.pt"
        net = module.ema.module if export == "ema" else module.trained_network
        save_checkpoint(
            net,
            out,
            dtype=cfg.get("export_dtype"),
            step=step,
            metrics=metrics,
            run=OmegaConf.to_yaml(cfg),
        )
        log.info("%s weights (step %d) written to %s", export, step, out)
        summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(local.items()))
        print(f"done: step {step}; {summary}" + (f"; {skipped}" if skipped else ""))
        print(f"{'EMA' if export == 'ema' else 'network'} weights: {out}")
    return metrics


def check_data_kind(cfg: DictConfig, datamodule: object, module: object) -> None:
    """A refiner with trajectory targets reads a trajectory cache, every other model images or
    latents, and images are read with the model's channels: a mismatch is named here rather
    than failing inside the model."""
    kind = getattr(datamodule, "kind", None)
    target = cfg.model.get("target")
    network = getattr(module, "net", None)
    if network is None:
        network = getattr(module, "refiner", None)
    wanted, read = getattr(network, "in_channels", None), getattr(datamodule, "channels", None)
    if kind == "image" and None not in (wanted, read) and wanted != read:
        fix = (
            f"add +data.channels={wanted} to read them so"
            if wanted in (1, 3)
            else "a latent model trains from latent shards (data=imagenet_latents)"
        )
        raise ValueError(
            f"the model takes {wanted}-channel inputs, but the image shards are read as "
            f"{read}-channel images: {fix}"
        )
    if kind is None or (target == "trajectory") == (kind == "trajectory"):
        return
    if target == "trajectory":
        raise ValueError(
            f"model.target=trajectory trains from a trajectory cache, but the data are {kind} "
            "shards: add data=trajectories data.train_shards=... (python cache_trajectories.py "
            "writes the cache), or use model.target=interpolant"
        )
    raise ValueError(
        f"the data are a trajectory cache (data.kind=trajectory), which only a refiner with "
        f"model.target=trajectory reads (this model's target: {target}): set "
        "model.target=trajectory, or train from image or latent shards"
    )


#: train.py's command for a trajectory cache of a flow model of the user's own.
OWN_TRAIN_COMMAND = (
    "python train.py experiment=own_refiner model.target=trajectory data=trajectories "
    "model.base.path={base_path} model.base.factory={factory} "
    "data.train_shards={out_dir}/train data.val_shards={out_dir}/val"
)


def cache_trajectories(cfg: DictConfig) -> dict:
    """Writes the trajectory cache ``cfg.cache`` describes to ``cfg.out_dir`` (resumable).

    Runs ``Trainer.predict`` over the plan of shards, so the work is split across every device
    and node the trainer config names; returns the manifest summary (trajectories, shards,
    complete, per split) and how many shards this run wrote (``shards_written``). When done it
    prints ``cfg.cache.train_command``, the train.py command for the cache.
    """
    from torch.utils.data import DataLoader

    from flowturbo.data import Manifest
    from flowturbo.lit.callbacks import StopOnSignal
    from flowturbo.lit.trajectories import SPLITS, ShardPlan, TrajectoryCache

    cache = cfg.cache.get("name", "demo")
    command = "python cache_trajectories.py" + ("" if cache == "demo" else f" cache={cache}")
    check_config(cfg, command)
    check_accelerator(cfg.trainer)
    L.seed_everything(cfg.seed, workers=True)
    not_settings = ("name", "base", "train_command")
    settings = {k: v for k, v in cfg.cache.items() if k not in not_settings}
    module = TrajectoryCache(instantiate(cfg.cache.base), out_dir=cfg.out_dir, **settings)
    loader = DataLoader(ShardPlan(module.shards_per_split()), batch_size=1, shuffle=False)
    trainer = instantiate(
        cfg.trainer, logger=False, callbacks=[StopOnSignal()], enable_checkpointing=False
    )
    check_ddp_launch(trainer)
    check_enough_work(len(loader.dataset), trainer.world_size, "shards")
    # one run per folder: a second one would delete this one's half-written shards as stale
    with folder_lock(cfg.out_dir, what_to_do=CACHE_ELSEWHERE):
        before = module.shards_on_disk()  # counted here: ranks of a spawned run have own modules
        trainer.predict(module, dataloaders=loader, return_predictions=False)
    summary = {}
    if trainer.is_global_zero:
        for split in SPLITS:
            m = Manifest.load(Path(cfg.out_dir) / split)
            summary[split] = {"trajectories": m.total, "shards": len(m.shards)}
            summary[split]["complete"] = m.complete
        summary["shards_written"] = module.shards_on_disk() - before
        print(f"trajectory cache {cfg.out_dir}: {summary}")
        hint = cfg.cache.get("train_command") or (
            "python train.py ... data=trajectories "
            "data.train_shards={out_dir}/train data.val_shards={out_dir}/val"
        )
        factory = cfg.cache.base.get("factory")
        if factory:  # a flow model of the user's own, not the cache config's SiT
            hint = OWN_TRAIN_COMMAND + " (and your copy's settings)"
        if cfg.cache.num_val == 0:  # no val split to validate on
            hint = hint.replace("data.val_shards={out_dir}/val", "data.val_shards=null")
        base_path = cfg.cache.base.get("path", "...")
        hint = hint.format(out_dir=cfg.out_dir, base_path=base_path, factory=factory)
        print(f"train a refiner on it: {hint}")
    return summary
