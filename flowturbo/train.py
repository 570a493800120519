"""What the entry points run: ``train.py`` (fit, export the EMA weights) and
``cache_trajectories.py`` (write the refiner's trajectory cache), from their Hydra configs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flowturbo.config import check_required, register_resolvers
from flowturbo.models import save_checkpoint

register_resolvers()

log = logging.getLogger(__name__)


def make_loggers(cfg: DictConfig) -> list:
    """CSV logger always; W&B offline unless opted in. ``WANDB_MODE`` wins over the config."""
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
        loggers.append(instantiate(conf))
        log.info("logger %s: %s", name, conf["_target_"])
    return loggers


def resume_path(cfg: DictConfig) -> str | None:
    """``ckpt_dir/last.ckpt`` when resuming and it exists, else None (a fresh start, said so)."""
    last = Path(cfg.ckpt_dir) / "last.ckpt"
    if cfg.resume and last.is_file():
        log.info("resuming from %s", last)
        return str(last)
    log.info("starting fresh (no %s)" if cfg.resume else "starting fresh (resume=false)", last)
    return None


def train(cfg: DictConfig) -> dict:
    """Fits ``cfg.model`` on ``cfg.data`` and writes ``ckpt_dir/ema.pt`` (``export=net``: the
    trained network's own weights, ``net.pt``); returns the final metrics."""
    check_required(cfg, f"python train.py experiment={cfg.get('name', '...')}")
    export = cfg.get("export", "ema")
    if export not in ("ema", "net"):
        raise ValueError(f"export must be 'ema' or 'net', got {export!r}")
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=make_loggers(cfg))
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg))

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    skipped = getattr(datamodule, "skipped_summary", lambda: {})()
    if trainer.is_global_zero:
        out = Path(cfg.ckpt_dir) / f"{export}.pt"
        net = module.ema.module if export == "ema" else module.trained_network
        save_checkpoint(
            net,
            out,
            dtype=cfg.get("export_dtype"),
            step=trainer.global_step,
            metrics=metrics,
            run=OmegaConf.to_yaml(cfg),
        )
        log.info("%s weights (step %d) written to %s", export, trainer.global_step, out)
        summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
        print(f"done: step {trainer.global_step}; {summary}; data skipped: {skipped or 0}")
        print(f"{'EMA' if export == 'ema' else 'network'} weights: {out}")
    return metrics


def cache_trajectories(cfg: DictConfig) -> dict:
    """Writes the trajectory cache ``cfg.cache`` describes to ``cfg.out_dir`` (resumable).

    Runs ``Trainer.predict`` over the plan of shards, so the work is split across every device
    and node the trainer config names; returns the manifest summary (trajectories, shards,
    complete, per split) and how many shards this run wrote (``shards_written``).
    """
    from torch.utils.data import DataLoader

    from flowturbo.data import Manifest
    from flowturbo.lit.trajectories import SPLITS, ShardPlan, TrajectoryCache

    check_required(cfg, "python cache_trajectories.py")
    L.seed_everything(cfg.seed, workers=True)
    settings = {k: v for k, v in cfg.cache.items() if k not in ("name", "base")}
    module = TrajectoryCache(instantiate(cfg.cache.base), out_dir=cfg.out_dir, **settings)
    loader = DataLoader(ShardPlan(module.shards_per_split()), batch_size=1, shuffle=False)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
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
        print(
            "train a refiner on it: python train.py experiment=demo_refiner_traj "
            f"data.train_shards={cfg.out_dir}/train data.val_shards={cfg.out_dir}/val"
        )
    return summary
