"""Building the refiner's trajectory cache: the frozen base's ODE solutions as shards.

``python cache_trajectories.py cache=demo`` runs :class:`TrajectoryCache` through
``Trainer.predict``: the work is a fixed plan of shards (train and val), Lightning's distributed
sampler deals the shard indices out to the ranks, and each rank writes the shards it is dealt.
Every trajectory depends only on (seed, its global index), so a shard's content is the same
whoever writes it and whenever. A shard is written to a temporary name and renamed when
complete; a re-run skips every shard file that exists, so an interrupted job resumes where it
stopped, and writes again a shard cut or changed since (a size other than its manifest's, or no
tar end). Before any shard is written, rank 0 writes each split's ``manifest.json`` with
``complete=False`` (so ``resolve_shards`` refuses the folder of a run that was killed); when all
ranks are done, it rewrites them complete. ``plan.json`` holds the settings: a folder with
shards made with other settings is refused, a plan with no shard yet is replaced.

One sample (key ``t{index:08d}``): ``traj.npy`` (2, K, C, H, W) float16, the states x_k and
the base velocities v(x_k, t_k) on the uniform grid t_k = k / (K - 1) (Heun steps), and
``cls``, the label the base saw (``num_classes`` = the null class, drawn with probability
``label_dropout`` as in refiner training).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from flowturbo.data.datamodule import TRAJECTORY_FIELD
from flowturbo.data.shards import (
    MANIFEST_NAME,
    SHARD_NAME,
    Manifest,
    ShardInfo,
    encode_field,
    has_tar_end,
    write_tar,
)
from flowturbo.lit.common import base_precision, check_null_class
from flowturbo.sampling import heun_trajectory

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
PLAN_NAME = "plan.json"


class ShardPlan(Dataset):
    """Every shard of the cache as ``(split index, shard index)``, train first, then val."""

    def __init__(self, shards_per_split: dict[str, int]):
        self.items = [
            (i, k) for i, split in enumerate(SPLITS) for k in range(shards_per_split[split])
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tensor:
        return torch.tensor(self.items[i])  # batches of these are (B, 2)


class TrajectoryCache(L.LightningModule):
    """Writes trajectories of a frozen base to ``out_dir/{train,val}/shard-*.tar``.

    Args:
        base: factory returning the frozen base (``load_frozen_base`` partial in the configs).
        out_dir: cache folder; the plan and the settings are checked against ``plan.json``.
        shape: (C, H, W) of the base's input.
        num_classes: labels are drawn uniformly from ``range(num_classes)``.
        num_train, num_val: trajectories per split.
        steps: Heun steps of each trajectory (K = steps + 1 stored points).
        per_shard: trajectories per shard (the last shard of a split may hold fewer).
        batch_size: trajectories integrated at once.
        label_dropout: probability that a trajectory is drawn with the null class.
        seed: with the trajectory's global index, fixes its noise and label.
        base_autocast: integrate under the trainer's precision (e.g. bf16-mixed); False
            (default): in float32, autocast off, as the refiner's targets are differences of
            the stored velocities (:func:`flowturbo.lit.common.base_precision`).
    """

    def __init__(
        self,
        base: Callable[[], nn.Module],
        out_dir: str,
        shape: tuple[int, int, int],
        num_classes: int,
        num_train: int,
        num_val: int,
        steps: int,
        per_shard: int = 256,
        batch_size: int = 64,
        label_dropout: float = 0.1,
        seed: int = 0,
        base_autocast: bool = False,
    ):
        super().__init__()
        counts = (
            ("num_train", num_train, 1),
            ("num_val", num_val, 0),
            ("steps", steps, 1),
            ("per_shard", per_shard, 1),
            ("batch_size", batch_size, 1),
        )
        for name, value, least in counts:
            if int(value) < least:
                raise ValueError(f"cache.{name} must be >= {least}, got {value}")
        if not 0 <= label_dropout <= 1:
            raise ValueError(f"cache.label_dropout must be in [0, 1], got {label_dropout}")
        self.base_factory = base
        self.out_dir = Path(out_dir)
        self.shape = tuple(int(s) for s in shape)
        self.num_classes = int(num_classes)
        self.counts = {"train": int(num_train), "val": int(num_val)}
        self.steps, self.per_shard, self.batch_size = int(steps), int(per_shard), int(batch_size)
        self.label_dropout, self.seed = float(label_dropout), int(seed)
        self.base_autocast = bool(base_autocast)
        self._base: tuple[nn.Module] | None = None  # a tuple keeps it out of the module tree

    # -- the plan

    def shards_per_split(self) -> dict[str, int]:
        return {s: -(-n // self.per_shard) for s, n in self.counts.items()}

    def shard_path(self, split: str, k: int) -> Path:
        return self.out_dir / split / SHARD_NAME.format(k)

    def shards_on_disk(self) -> int:
        """Intact shards of the plan on disk (see :meth:`damaged`; a shard file appears only
        when complete)."""
        count = 0
        for split, n in self.shards_per_split().items():
            count += sum(self.shard_path(split, k).is_file() for k in range(n))
            count -= len(self.damaged(split))
        return count

    def damaged(self, split: str) -> list[Path]:
        """The split's shard files cut or changed since they were written: a size other than
        the one the split's manifest records, or no tar end-of-archive marker."""
        manifest_path = self.out_dir / split / MANIFEST_NAME
        recorded = {}
        if manifest_path.is_file():
            recorded = {s.name: s.bytes for s in Manifest.load(manifest_path).shards}
        out = []
        for k in range(self.shards_per_split()[split]):
            path = self.shard_path(split, k)
            if path.is_file():
                size = path.stat().st_size
                if recorded.get(path.name, size) != size or not has_tar_end(str(path)):
                    out.append(path)
        return out

    def first_index(self, split: str, k: int) -> int:
        """Global index of the first trajectory of shard k of ``split`` (val follows train)."""
        return (0 if split == "train" else self.counts["train"]) + k * self.per_shard

    def settings(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "num_classes": self.num_classes,
            "counts": self.counts,
            "steps": self.steps,
            "grid": "uniform",
            "solver": "heun",
            "per_shard": self.per_shard,
            "label_dropout": self.label_dropout,
            "seed": self.seed,
            "base": self.base_fingerprint,
            "base_precision": "trainer" if self.base_autocast else "float32",
        }

    def check_plan(self, write: bool = True) -> None:
        """Refuses to resume into a folder holding shards made with other settings or another
        base; a plan none of whose shards exists (a run that failed first) is replaced.

        Args:
            write: write ``plan.json`` when it is missing or replaced (rank 0 only); every rank
                checks, so all of them raise together.
        """
        plan = self.out_dir / PLAN_NAME
        settings = self.settings()
        if plan.is_file():
            old = json.loads(plan.read_text())
            if old == settings:
                return
            if any(True for split in SPLITS for _ in (self.out_dir / split).glob("shard-*.tar")):
                keys = settings.keys() | old.keys()
                diff = sorted(k for k in keys if old.get(k) != settings.get(k))
                raise RuntimeError(
                    f"{self.out_dir} holds a trajectory cache made with other settings "
                    f"(differs in {diff}); use another out_dir or delete that folder"
                )
            log.info("%s: replacing the plan of a run that wrote no shard", self.out_dir)
        if not write:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = plan.with_name(f".{PLAN_NAME}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(settings, indent=1))
        os.replace(tmp, plan)

    # -- Lightning hooks

    @property
    def base(self) -> nn.Module:
        if self._base is None:
            raise RuntimeError("the base model is loaded in setup(); call trainer.predict")
        return self._base[0]

    def setup(self, stage: str) -> None:
        if self._base is None:
            base = self.base_factory()
            self._check_base(base)
            self._base = (base,)
            self.base_fingerprint = _fingerprint(base)

    def _check_base(self, base: nn.Module) -> None:
        """Refuses a shape or a label count the base does not take (a SiT or a FlowModel)."""
        c, size, classes = (
            getattr(base, a, None) for a in ("in_channels", "input_size", "num_classes")
        )
        if c is not None and size is not None and self.shape != (c, size, size):
            raise ValueError(
                f"cache.shape={list(self.shape)} does not fit the base, which takes "
                f"{[c, size, size]} (in_channels={c}, input_size={size})"
            )
        if classes is not None and self.num_classes != classes:
            raise ValueError(
                f"cache.num_classes={self.num_classes} differs from the base's "
                f"num_classes={classes}"
            )
        check_null_class(base, self.label_dropout, "cache.label_dropout")

    def on_predict_start(self) -> None:
        self.base.to(self.device).eval()
        zero = self.trainer.is_global_zero
        self.check_plan(write=zero)
        if zero:  # before any shard: a killed run leaves manifests that resolve_shards refuses
            for split, n in self.shards_per_split().items():
                folder = self.out_dir / split
                folder.mkdir(parents=True, exist_ok=True)
                for stale in folder.glob(".shard-*.tar.tmp-*"):  # partial shards of a killed run
                    stale.unlink(missing_ok=True)
                for path in self.damaged(split):  # written again by this run
                    log.warning(
                        "%s was cut or changed since it was written: writing it again", path
                    )
                    path.unlink()
                self._write_manifest(split, n, complete=False)
        self.trainer.strategy.barrier()

    def predict_step(self, batch: Tensor, batch_idx: int) -> int:
        """Writes the batch's shards that do not exist yet; returns how many it wrote."""
        written = 0
        for split_index, k in batch.tolist():
            split = SPLITS[split_index]
            path = self.shard_path(split, k)
            if path.is_file():
                continue  # written by an earlier run (files appear only when complete)
            start = self.first_index(split, k)
            end = min(start + self.per_shard, self.first_index(split, 0) + self.counts[split])
            write_tar(path, self._records(start, end))
            written += 1
        return written

    def on_predict_end(self) -> None:
        self.trainer.strategy.barrier()
        if self.trainer.is_global_zero:
            for split, n in self.shards_per_split().items():
                self._write_manifest(split, n)
        self.trainer.strategy.barrier()

    # -- content

    def _labels_and_noise(self, index: int) -> tuple[int, Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = int(torch.randint(self.num_classes, (), generator=g))
        if float(torch.rand((), generator=g)) < self.label_dropout:
            label = self.num_classes  # the null class
        return label, torch.randn(self.shape, generator=g)

    def _records(self, start: int, end: int):
        for lo in range(start, end, self.batch_size):
            idx = range(lo, min(lo + self.batch_size, end))
            labels, noise = zip(*(self._labels_and_noise(i) for i in idx), strict=True)
            x0 = torch.stack(noise).to(self.device)
            y = torch.tensor(labels, device=self.device)
            with base_precision(self.base_autocast, self.device):
                states, velocities, _ = heun_trajectory(self.base, x0, self.steps, y=y)
            traj = torch.stack([states, velocities], 1).to(torch.float16).cpu().numpy()
            for i, label, array in zip(idx, labels, traj, strict=True):
                fields = {TRAJECTORY_FIELD: encode_field(TRAJECTORY_FIELD, array)}
                yield f"t{i:08d}", {**fields, "cls": encode_field("cls", label)}

    def _write_manifest(self, split: str, num_shards: int, complete: bool = True) -> None:
        """Lists the split's shards on disk; complete only if asked and none is missing."""
        shards = []
        for k in range(num_shards):
            path = self.shard_path(split, k)
            if not path.is_file():
                complete = False
                continue
            start = self.first_index(split, k)
            count = min(self.per_shard, self.first_index(split, 0) + self.counts[split] - start)
            shards.append(ShardInfo(path.name, count, path.stat().st_size))
        manifest = Manifest(
            kind="trajectory",
            shard_size=self.per_shard,
            shards=shards,
            complete=complete,
            fingerprint=hashlib.sha256(json.dumps(self.settings()).encode()).hexdigest()[:16],
            meta={**self.settings(), "field": TRAJECTORY_FIELD, "split": split},
        )
        manifest.save(self.out_dir / split / MANIFEST_NAME)


def _fingerprint(model: nn.Module) -> str:
    """A short hash of a model's weights: a cache is tied to the base that made it.

    For a flow model of the user's own it covers how the network is called too (``adapter``).
    """
    h = hashlib.sha256()
    adapter = getattr(model, "adapter", None)  # flowturbo.models.FlowModel
    if adapter is not None:
        h.update(json.dumps(adapter, sort_keys=True).encode())
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(value.detach().float().cpu().numpy()).tobytes())
    return h.hexdigest()[:16]
