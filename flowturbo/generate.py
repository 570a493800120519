"""Generating, editing and inpainting images with one chosen sampler: what ``generate.py`` runs.

This is how a schedule is deployed once a sweep has chosen it. Three tasks share one output
layout, a folder per sampler in ``out_dir`` (default ``generated/<name>``, outside Hydra's run
folder so that a rerun resumes into it, and a multirun over schedules fills one folder each):

- ``sample``: ``num_images`` new images. Image i's noise depends only on (seed, i) exactly as in
  ``evaluate.py``, so with the same seed, schedule and labels image i here is image i of the
  sweep's FID set. Its label is i % classes unless ``labels`` says otherwise.
- ``edit``: the images of ``input`` re-generated from t0 = 1 - ``edit.strength`` (SDEdit,
  :func:`flowturbo.sampling.edit`), usually towards another ``labels``.
- ``inpaint``: the region of each ``input`` image that ``mask`` marks is generated anew, the
  rest kept (:func:`flowturbo.sampling.inpaint`; a latent model's decoded output gets the
  input's kept pixels pasted back, which the VAE alone would only approximate).

::

    out_dir/<sampler>/    e.g. generated/demo_generate_sample/H1P3R3/, euler-16/
      images/<name>.png   one per image, written atomically: a rerun skips the existing ones
      job.json            the settings; resuming a folder made with other settings is refused
      grid.png            the first ``grid.num_images`` (edit/inpaint: inputs, masked, outputs)
      samples.npz         with ``npz=true``: ``arr_0`` (N, H, W, C) uint8 in index order and
                          ``arr_1`` the labels, the format of ADM's evaluation suite

The sampler is ``sampler.schedule`` (a schedule such as ``H1P5R3`` or a baseline such as
``euler:16``), or the one :func:`pick_row` chooses from a finished sweep's ``results.json``
under a quality or latency target (``pick.sweep``, ``pick.max_fid`` / ``pick.max_ms``).
The work is split with Lightning's ``Trainer.predict``: its distributed sampler deals the
image indices to the ranks and every rank writes the images it is dealt; rank 0 then writes the
grid and the ``.npz``. Latent models go through the SD VAE (encode for edit/inpaint, decode).
The images to edit and the masks are read by :mod:`flowturbo.inputs`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from torch import Tensor

from flowturbo.config import check_accelerator, check_ddp_launch, check_enough_work, check_int
from flowturbo.eval.atomic import atomic_path, create_once, remove_leftovers
from flowturbo.eval.entries import SweepEntry, parse_entry
from flowturbo.eval.networks import (
    Networks,
    base_fingerprint,
    fingerprint,
    load_networks,
    run_entry,
    seeded_noise,
)
from flowturbo.inputs import Inputs, Masks, load_inputs, load_masks
from flowturbo.lit.callbacks import StopOnSignal
from flowturbo.sampling import decode_latents, edit, encode_images, from_uint8, inpaint, to_uint8

log = logging.getLogger(__name__)

TASKS = ("sample", "edit", "inpaint")
JOB_NAME = "job.json"


# ----------------------------------------------------------------------------- the sampler


def pick_row(
    rows: Sequence[dict[str, Any]],
    *,
    max_fid: float | None = None,
    max_ms: float | None = None,
    latency: str = "compiled",
    schedules_only: bool = False,
) -> dict[str, Any]:
    """The sweep row to deploy under a quality or a latency target.

    Args:
        rows: rows of a sweep's ``results.json``.
        max_fid: choose the fastest row whose FID is at most this.
        max_ms: choose the row with the lowest FID among those at most this many ms/img.
            With both, the fastest row that meets both.
        latency: ``"compiled"`` or ``"eager"``: which ms/img column counts.
        schedules_only: consider only FlowTurbo schedules, not the baseline solvers
            (``euler:16``): edit and inpaint run schedules only.

    Raises:
        ValueError: no target, a target that is not a number, an unknown latency column, or
            no row meets the target (the message names the best FID and the lowest latency
            the sweep has).
    """
    if max_fid is None and max_ms is None:
        raise ValueError(
            "set pick.max_fid (the fastest entry at or below this FID) or pick.max_ms (the "
            "lowest FID at or below this many ms/img)"
        )
    for key, value in (("max_fid", max_fid), ("max_ms", max_ms)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"pick.{key} must be a number, got {value!r}")
    if latency not in ("compiled", "eager"):
        raise ValueError(f"pick.latency must be 'compiled' or 'eager', got {latency!r}")
    column = f"ms_per_image_{latency}"

    def measured(row: dict[str, Any]) -> bool:
        return all(
            isinstance(row.get(k), int | float) and math.isfinite(row[k]) for k in ("fid", column)
        )

    left_out = ""
    if schedules_only:
        rows = [r for r in rows if is_schedule(r.get("schedule"))]
        left_out = " (baseline solvers left out: edit and inpaint run FlowTurbo schedules)"
        if not rows:
            raise ValueError(
                "the sweep has no schedule, only baseline solvers, which edit and inpaint "
                "cannot run: pick from a sweep with schedules (H8, H1P5R3), or set "
                "sampler.schedule"
            )
    usable = [r for r in rows if measured(r)]
    if not usable:
        raise ValueError(
            f"no row of the sweep has both an FID and {column} (set pick.latency=eager if the "
            "sweep ran with latency.compiled=false)"
        )
    chosen = [
        r
        for r in usable
        if (max_fid is None or r["fid"] <= max_fid) and (max_ms is None or r[column] <= max_ms)
    ]
    if not chosen:
        best = min(usable, key=lambda r: r["fid"])
        fastest = min(usable, key=lambda r: r[column])
        target = [f"FID <= {max_fid}"] if max_fid is not None else []
        target += [f"{latency} latency <= {max_ms} ms/img"] if max_ms is not None else []
        raise ValueError(
            f"no entry of the sweep has {' and '.join(target)}; its best FID is "
            f"{best['fid']:.4g} ({best['schedule']}, "
            f"{best[column]:.4g} ms/img), its fastest entry {fastest['schedule']} "
            f"({fastest[column]:.4g} ms/img, FID {fastest['fid']:.4g}){left_out}"
        )
    if max_fid is not None:
        return min(chosen, key=lambda r: (r[column], r["fid"]))
    return min(chosen, key=lambda r: (r["fid"], r[column]))


def is_schedule(label: Any) -> bool:
    """Whether a sweep entry's label is a FlowTurbo schedule (``H1P5R3``, ``heun:8``), not a
    baseline solver (``euler:16``) or unreadable."""
    try:
        return parse_entry(str(label)).baseline is None
    except ValueError:
        return False


def sweep_rows_for(cfg: DictConfig) -> list[dict[str, Any]]:
    """The rows of ``pick.sweep``'s results.json measured with this job's models and guidance.

    Raises:
        FileNotFoundError: the sweep has no results.json.
        ValueError: results.json is not JSON or not a list of rows, it has no rows yet, or none
            of its rows was measured with these checkpoints and this guidance.
    """
    path = Path(str(cfg.pick.sweep))
    path = path / "results.json" if path.is_dir() or path.suffix != ".json" else path
    if not path.is_file():
        raise FileNotFoundError(
            f"pick.sweep: {path} not found. Give the folder of a finished sweep "
            "(sweeps/<name>, written by evaluate.py) or its results.json"
        )
    try:
        rows = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise ValueError(
            f"pick.sweep: {path} is not valid JSON ({exn}); it may be truncated (a sweep "
            "killed while writing it): rerun evaluate.py on that sweep to write it again"
        ) from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(
            f"pick.sweep: {path} is not a list of rows (objects) as evaluate.py writes; "
            "give the results.json of a sweep"
        )
    if not rows:
        raise ValueError(
            f"pick.sweep: {path} has no rows yet: run evaluate.py on that sweep first, or set "
            "sampler.schedule yourself"
        )
    base = base_fingerprint(cfg.model)
    refiner = fingerprint(cfg.model.get("refiner_ckpt"))
    s = cfg.sampler

    def same_models(row: dict[str, Any]) -> bool:
        if row.get("base_sha256") != base or row.get("cfg_scale") != float(s.cfg_scale):
            return False
        if row.get("cfg_channels") != s.get("cfg_channels"):
            return False
        if row.get("refiner_nfe"):
            return row.get("refiner_sha256") == refiner and row.get("refiner_input") == str(
                s.refiner_input
            )
        return True

    same = [r for r in rows if same_models(r)]
    other = [str(r.get("schedule")) for r in rows if not same_models(r)]
    if same and other:
        log.warning(
            "%d of %s's rows left out of the pick, measured with other models or guidance "
            "(another refiner, refiner_input, cfg_scale or cfg_channels than this job's): %s",
            len(other),
            path,
            ", ".join(other[:8]) + (", ..." if len(other) > 8 else ""),
        )
    if not same:
        raise ValueError(
            f"no row of {path} was measured with these models and this guidance (base "
            f"{base}, refiner {refiner}, cfg_scale {s.cfg_scale}): its rows have base "
            f"{sorted({str(r.get('base_sha256')) for r in rows})}. Pick from a sweep of these "
            "checkpoints, or set sampler.schedule yourself"
        )
    return same


def choose_entry(cfg: DictConfig) -> tuple[SweepEntry, dict[str, Any] | None]:
    """``sampler.schedule``, or the entry picked from ``pick.sweep`` (and its sweep row); edit
    and inpaint pick among the sweep's schedules only."""
    pick = cfg.get("pick") or {}
    if not pick.get("sweep"):
        targets = [f"pick.{k}={pick[k]}" for k in ("max_fid", "max_ms") if pick.get(k) is not None]
        if targets:
            raise ValueError(
                f"{' and '.join(targets)} without pick.sweep: set pick.sweep=sweeps/<name> to "
                "pick from that sweep, or drop the target and set sampler.schedule"
            )
        if cfg.sampler.get("schedule") is None:
            raise ValueError("set sampler.schedule (e.g. H1P5R3) or pick.sweep=sweeps/<name>")
        return parse_entry(str(cfg.sampler.schedule)), None
    row = pick_row(
        sweep_rows_for(cfg),
        max_fid=pick.get("max_fid"),
        max_ms=pick.get("max_ms"),
        latency=pick.get("latency", "compiled"),
        schedules_only=str(cfg.get("task", "sample")) != "sample",
    )
    return parse_entry(row["schedule"]), row


def resolve_labels(
    spec: Any, n: int, num_classes: int, *, task: str, own: Tensor | None = None
) -> Tensor:
    """The (n,) class labels of a job; ``num_classes`` is the null class (no label).

    ``labels=null``: i % num_classes for ``sample``; for edit and inpaint the inputs' own labels
    where known (the demo digits), else the null class. ``"null"``: the null class for all. An
    int: that class for all. A list: cycled over the images.

    Raises:
        ValueError: anything else (a float, a bool, another string, a class out of range).
    """
    if spec is None:
        if task == "sample":
            return torch.arange(n) % num_classes
        if own is not None:
            return own[:n].clone()
        spec = "null"
    if spec == "null":
        return torch.full((n,), num_classes, dtype=torch.long)
    if isinstance(spec, list | tuple | ListConfig):
        values = list(spec)
    else:  # one class; anything else is refused below
        values = [spec] if isinstance(spec, int) and not isinstance(spec, bool) else []

    def is_class(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= num_classes

    bad = [v for v in values if not is_class(v)]
    if not values or bad:
        raise ValueError(
            f"labels must be null, 'null', a class in [0, {num_classes}] ({num_classes}: the "
            f"null class) or a list of them; got {spec!r}"
        )
    return torch.tensor(values, dtype=torch.long)[torch.arange(n) % len(values)]


# ----------------------------------------------------------------------------- the job


@dataclass
class Job:
    """Everything a rank needs to write its images."""

    task: str
    entry: SweepEntry
    names: list[str]
    labels: Tensor
    out_dir: Path
    seed: int
    settings: dict[str, Any]
    inputs: Inputs | None = None
    masks: Masks | None = None
    strength: float = 1.0
    refiner_input: str = "d0"
    compile: bool = False
    pixel_size: int = 32
    pixel_channels: int = 1

    def path(self, i: int) -> Path:
        return self.out_dir / "images" / f"{self.names[i]}.png"

    def exists(self, i: int) -> bool:
        """Whether output image i is written: a non-empty file (PNGs are written atomically, so
        an empty one is a leftover of a failed copy or a full disk and is written again)."""
        path = self.path(i)
        return path.is_file() and path.stat().st_size > 0

    def read(self, i: int) -> Tensor:
        """Output image i as (C, H, W) uint8; an unreadable file, or one of another shape, is
        an error naming it."""
        try:
            image = read_png(self.path(i))
        except (OSError, ValueError, Image.DecompressionBombError) as exn:
            raise ValueError(
                f"{self.path(i)} is not a readable image ({type(exn).__name__}: {exn}): delete "
                "it and run the job again"
            ) from None
        want = (self.pixel_channels, self.pixel_size, self.pixel_size)
        if tuple(image.shape) != want:
            raise ValueError(
                f"{self.path(i)} is {'x'.join(map(str, image.shape))}, not the job's "
                f"{'x'.join(map(str, want))} (C x H x W): delete it and run the job again"
            )
        return image

    def done(self) -> int:
        return sum(self.exists(i) for i in range(len(self.names)))

    def check_folder(self) -> None:
        """Refuses to resume into a folder written with other settings (more or fewer images are
        the same settings: a rerun with a larger ``num_images`` adds the missing ones).

        A new folder gets ``job.json`` created once (:func:`create_once`): of two jobs started
        on one new folder at once, the second is checked against the first's settings.
        """
        path = self.out_dir / JOB_NAME
        text = json.dumps(self.settings, indent=1) + "\n"
        if path.is_file() or not create_once(path, text):
            try:
                old = json.loads(path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as exn:
                old = exn
            if not isinstance(old, dict):
                why = f"not valid JSON ({old})" if isinstance(old, Exception) else "not an object"
                raise RuntimeError(
                    f"{path} is damaged, {why}: it no longer tells which settings made the "
                    f"images in {self.out_dir}; "
                    "delete that folder (or only its job.json, if you know they were made with "
                    "this run's settings) or use another out_dir (or name)"
                )
            if old != self.settings:
                diff = sorted(
                    k
                    for k in old.keys() | self.settings.keys()
                    if old.get(k) != self.settings.get(k)
                )
                raise RuntimeError(
                    f"{self.out_dir} holds images made with other settings (differs in {diff}); "
                    "use another out_dir (or name) or delete that folder"
                )


def make_job(cfg: DictConfig, entry: SweepEntry, nets: Networks) -> Job:
    """Checks the task's settings and gathers its inputs, masks and labels."""
    task = str(cfg.task)
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if task != "sample" and entry.baseline is not None:
        raise ValueError(
            f"{task} runs FlowTurbo schedules; {entry.label} is a baseline solver. Use a "
            "schedule, e.g. E16 (Euler) or H8 (Heun)"
        )
    channels, size = nets.shape[0], nets.shape[1]
    if nets.vae is not None:  # SD VAE: 3 x (8 h) x (8 w) images
        channels, size = 3, size * 2 ** (len(nets.vae.config.block_out_channels) - 1)
    limit = cfg.get("num_images")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(
            f"num_images must be a whole number >= 1 (or null: every input, for edit and "
            f"inpaint), got {limit!r}"
        )
    inputs = masks = None
    if task == "sample":
        if limit is None:
            raise ValueError("task=sample needs num_images >= 1, got null")
        names = [f"{i:06d}" for i in range(limit)]
    else:
        if not cfg.get("input"):
            raise ValueError(f"task={task} needs input=<folder of images> (or demo:val)")
        inputs = load_inputs(cfg.input, channels, size, limit)
        names = inputs.names
        for f, why in inputs.skipped.items():
            log.warning("unreadable input skipped: %s (%s)", f, why)
        if task == "inpaint":
            masks = load_masks(cfg.mask, names, size, inputs.sizes)
    labels_spec = (
        OmegaConf.to_container(cfg.labels) if OmegaConf.is_list(cfg.labels) else cfg.labels
    )
    labels = resolve_labels(
        labels_spec, len(names), nets.num_classes, task=task, own=inputs.labels if inputs else None
    )
    strength = _edit_strength(cfg.edit.strength) if task == "edit" else 1.0
    m, s = cfg.model, cfg.sampler
    settings = {
        "task": task,
        "sampler": entry.label,
        "seed": int(cfg.seed),
        # rules, not lists: image i's label and noise depend only on i, so a rerun with more
        # images extends the folder
        "labels": labels_spec,
        "base": base_fingerprint(m),
        "refiner": fingerprint(m.get("refiner_ckpt")) if entry.uses_refiner else None,
        "refiner_input": str(s.refiner_input) if entry.uses_refiner else None,
        "vae": fingerprint(cfg.vae) if nets.vae is not None else None,
        "cfg_scale": float(s.cfg_scale),
        "cfg_channels": s.get("cfg_channels"),
        "dtype": str(s.dtype),
        "input": str(cfg.input) if inputs else None,
        "mask": str(cfg.mask) if masks else None,
        # the files' identity too: other images (or masks) at the same path are another job
        **({"input_files": fingerprint(cfg.input)} if inputs and inputs.files else {}),
        **({"mask_files": fingerprint(cfg.mask)} if masks and masks.is_file else {}),
        "strength": strength if task == "edit" else None,
    }
    return Job(
        task,
        entry,
        names,
        labels,
        Path(cfg.out_dir) / entry.key,
        int(cfg.seed),
        settings,
        inputs,
        masks,
        strength,
        str(s.refiner_input),
        bool(s.get("compile", False)),
        size,
        channels,
    )


def _edit_strength(value: Any) -> float:
    """``edit.strength`` as a float in (0, 1]; anything else is an error naming the key."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(
            f"edit.strength must be a number in (0, 1] (SDEdit starts at t0 = 1 - strength: 1 "
            f"from noise, small keeps the input's layout), got {value!r}"
        )
    return float(value)


def save_png(image: Tensor, path: Path) -> None:
    """(C, H, W) uint8 -> a PNG, written atomically (grey for one channel)."""
    array = image.permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(tmp, format="PNG")


def read_png(path: Path) -> Tensor:
    """A PNG written by :func:`save_png` as (C, H, W) uint8."""
    with Image.open(path) as img:
        array = np.asarray(img)
    tensor = torch.from_numpy(array.copy())
    return tensor[None] if tensor.dim() == 2 else tensor.permute(2, 0, 1)


class ImageWriter(L.LightningModule):
    """Writes a job's missing images, the batch of indices Lightning deals to this rank.

    The networks are loaded by the caller (on the CPU) and moved to this rank's device when
    prediction starts; they are not part of the module tree and never saved.
    """

    def __init__(self, job: Job, nets: Networks, *, grid_images: int = 32, npz: bool = False):
        super().__init__()
        self.job, self.nets = job, nets
        self.grid_images, self.npz = int(grid_images), bool(npz)

    def on_predict_start(self) -> None:
        n = self.nets
        for module in (n.base, n.refiner, n.vae):
            if module is not None:
                module.to(self.device)
        self.nets = dataclasses.replace(n, device=self.device)
        self.job.check_folder()
        if self.job.done() < len(self.job.names):  # they would not be this job's
            for summary in ("grid.png", "samples.npz"):
                (self.job.out_dir / summary).unlink(missing_ok=True)

    def predict_step(self, batch: Tensor, batch_idx: int) -> int:
        """Writes the batch's images that do not exist yet; returns how many it wrote."""
        job, nets = self.job, self.nets
        todo = [i for i in batch.tolist() if not job.exists(i)]
        if not todo:
            return 0  # written by an earlier run (files appear only when complete)
        noise = seeded_noise(job.seed, todo, nets.shape).to(self.device)
        y = job.labels[todo].to(self.device)
        with torch.no_grad(), nets.autocast():
            if job.task == "sample":
                x = run_entry(
                    job.entry, nets, noise, y, refiner_input=job.refiner_input, compile=job.compile
                )
            else:
                images = job.inputs.load(todo, job.pixel_channels, job.pixel_size)
                x1 = encode_images(from_uint8(images).to(self.device), nets.vae)
                common = dict(
                    refiner=nets.refiner_velocity if job.entry.uses_refiner else None,
                    refiner_input=job.refiner_input,
                    compile=job.compile,
                    y=y,
                )
                if job.task == "edit":
                    x = edit(
                        nets.velocity, x1, noise, job.entry.label, strength=job.strength, **common
                    )
                else:
                    mask = job.masks.load(todo)  # (B or 1, 1, H, W) pixels, 1 = generate
                    x = inpaint(
                        nets.velocity, x1, mask.to(self.device), noise, job.entry.label, **common
                    )
            out = to_uint8(decode_latents(x.float(), nets.vae)).cpu()
        if job.task == "inpaint" and nets.vae is not None:  # the VAE does not return them
            keep = mask.expand_as(out) < 0.5
            out = torch.where(keep, images, out)  # the known pixels exactly
        for i, image in zip(todo, out, strict=True):
            save_png(image, job.path(i))
        return len(todo)

    def on_predict_end(self) -> None:
        self.trainer.strategy.barrier()
        if self.trainer.is_global_zero:
            self.finish()
        self.trainer.strategy.barrier()

    def finish(self) -> None:
        """The grid and the .npz, once every image exists (every rank is done writing: the
        temporary files of killed runs are removed first)."""
        job = self.job
        remove_leftovers(job.out_dir / "images")
        missing = [job.names[i] for i in range(len(job.names)) if not job.exists(i)]
        if missing:
            log.warning(
                "%d images are missing (e.g. %s): rerun to write them", len(missing), missing[:3]
            )
            return
        n = min(self.grid_images, len(job.names))
        if n > 0:
            write_grid(job, n)
        if self.npz:
            write_npz(job)


def write_grid(job: Job, n: int) -> None:
    """``grid.png``: the first n outputs (one class a column for ``sample``); for edit and
    inpaint three rows of up to 16, inputs, inputs with the mask grey, outputs."""
    from torchvision.utils import save_image

    outputs = torch.stack([job.read(i) for i in range(n)])
    if job.task == "sample":
        classes = len(set(job.labels[:n].tolist()))  # i % classes: one class a column
        rows, nrow = outputs, min(classes if classes > 1 else 8, n)
    else:
        n = min(n, 16)
        outputs = outputs[:n]
        inputs = job.inputs.load(range(n), job.pixel_channels, job.pixel_size)
        if inputs.shape[1] != outputs.shape[1]:  # grey inputs of an RGB model, or the reverse
            inputs = inputs.expand_as(outputs)
        shown = [inputs]
        if job.task == "inpaint":
            mask = job.masks.load(range(n)).bool().expand_as(inputs)
            shown.append(torch.where(mask, torch.full_like(inputs, 128), inputs))
        rows, nrow = torch.cat([*shown, outputs]), n
    with atomic_path(job.out_dir / "grid.png") as tmp:
        save_image(rows.float() / 255, tmp, nrow=max(1, nrow), padding=1, format="PNG")


def write_npz(job: Job) -> None:
    """``samples.npz``: every image, (N, H, W, C) uint8 in index order, and the labels.

    Streamed from the PNGs into the archive one image at a time (memory: one image, however
    many there are); ``np.load`` reads it like ``np.savez``'s (uncompressed zip, ZIP64).
    """
    shape = (len(job.names), job.pixel_size, job.pixel_size, job.pixel_channels)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
    with atomic_path(job.out_dir / "samples.npz") as tmp, zipfile.ZipFile(tmp, "w") as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {**header, "shape": shape})
            for i in range(len(job.names)):
                f.write(job.read(i).permute(1, 2, 0).contiguous().numpy().tobytes())
        with archive.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, job.labels.numpy())


def generate_images(cfg: DictConfig) -> dict[str, Any]:
    """Runs a ``generate.py`` job (resumable): see the module docstring.

    Returns:
        What was done: ``sampler``, ``task``, ``images`` (in the job), ``written`` (by this
        run), ``skipped_inputs``, ``out_dir`` (the sampler's folder, ``out_dir/<sampler>``),
        ``grid`` (its grid.png, None when none was written) and, when picked from a sweep,
        ``picked``.
    """
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader

    from flowturbo.config import check_config, command_line, register_resolvers

    register_resolvers()
    check_config(cfg, command_line("generate.py"))
    check_accelerator(cfg.trainer)
    batch_size = check_int(cfg, "sampler.batch_size", 1)
    grid_images = check_int(cfg, "grid.num_images", 0)
    check_int(cfg, "seed", 0)
    if cfg.get("threads"):
        torch.set_num_threads(check_int(cfg, "threads", 1))
    entry, row = choose_entry(cfg)
    if row is not None:
        log.info(
            "picked %s from %s: FID %.4g, %.4g ms/img %s at batch %s on %s",
            entry.label,
            cfg.pick.sweep,
            row["fid"],
            row[f"ms_per_image_{cfg.pick.latency}"],
            cfg.pick.latency,
            row.get("batch"),
            row.get("machine"),
        )
    nets = load_networks(cfg, torch.device("cpu"), need_refiner=entry.uses_refiner)
    job = make_job(cfg, entry, nets)
    writer = ImageWriter(job, nets, grid_images=grid_images, npz=cfg.npz)
    before = job.done()
    loader = DataLoader(torch.arange(len(job.names)), batch_size=batch_size)
    trainer = instantiate(
        cfg.trainer,
        logger=False,
        callbacks=[StopOnSignal()],  # SIGTERM stops it (Lightning's handler lets it run on)
        enable_checkpointing=False,
        enable_progress_bar=bool(cfg.get("progress", True)),
        precision="32-true",  # the networks run under sampler.dtype's autocast instead
    )
    check_ddp_launch(trainer)
    check_enough_work(len(job.names), trainer.world_size, "images")
    trainer.predict(writer, dataloaders=loader, return_predictions=False)
    done = job.done()
    grid = job.out_dir / "grid.png" if done == len(job.names) and writer.grid_images > 0 else None
    summary = {
        "task": job.task,
        "sampler": entry.label,
        "images": len(job.names),
        "written": done - before,
        "skipped_inputs": len(job.inputs.skipped) if job.inputs else 0,
        "out_dir": str(job.out_dir),
        "grid": None if grid is None else str(grid),
    }
    if row is not None:
        summary["picked"] = {
            k: row.get(k)
            for k in ("fid", "ms_per_image_eager", "ms_per_image_compiled", "batch", "machine")
        }
    if trainer.is_global_zero:
        skipped = summary["skipped_inputs"]
        print(
            f"{job.task} with {entry.label}: {summary['images']} images in {job.out_dir}/images "
            f"({summary['written']} written now)"
            + (f", grid: {grid}" if grid else "")
            + (f"; {skipped} unreadable inputs skipped (see the log)" if skipped else "")
        )
    return summary
