"""The networks an entry runs on, the noise it starts from, and one sampled batch.

Shared by ``evaluate.py`` (:mod:`flowturbo.eval.sweep`) and ``generate.py``
(:mod:`flowturbo.generate`), so that image i of a sweep's FID set and image i of a generation
job are the same image: its noise depends only on (seed, i), its networks are loaded and
guided the same way, and :func:`run_entry` samples it with the same call.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from flowturbo.eval.entries import SweepEntry
from flowturbo.eval.fidelity import file_hash
from flowturbo.sampling import BASELINES, ClassifierFreeGuidance, sample

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: The base's settings in evaluate.py's and generate.py's ``model`` config, named in the errors
#: of :func:`flowturbo.lit.load_frozen_base` (train.py names them differently).
BASE_KEYS = {"path": "model.base_ckpt", "name": "model.base_arch.name"}


def image_seed(seed: int, index: int) -> int:
    """The RNG seed of image ``index``: a hash of (seed, index).

    torch's CPU generator keeps only a seed's low 32 bits, so among 50,000 images one pair
    shares its noise with probability about 25 % (harmless for FID); changing the seeds would
    change every image of every sweep.
    """
    digest = hashlib.sha256(f"flowturbo/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seeded_noise(seed: int, indices: Sequence[int] | Tensor, shape: Sequence[int]) -> Tensor:
    """Gaussian noise of each image from its own generator, independent of batching.

    Args:
        seed: the sweep's seed.
        indices: (B,) image indices.
        shape: (C, H, W) of one image.

    Returns:
        (B, C, H, W) float32 on the CPU.
    """
    indices = [int(i) for i in indices]
    out = torch.empty(len(indices), *shape)
    g = torch.Generator()
    for j, i in enumerate(indices):
        g.manual_seed(image_seed(seed, i))
        out[j] = torch.randn(tuple(shape), generator=g)
    return out


@dataclass
class Networks:
    """The models of a sweep, on their device, and the guided velocity functions.

    Attributes:
        base: the frozen base (a SiT, or a :class:`flowturbo.models.FlowModel`).
        refiner: the velocity refiner, or None when no entry needs it.
        vae: the SD VAE for latent models, else None.
        velocity: guided base, ``velocity(x, t, y=labels)``.
        refiner_velocity: guided refiner, ``refiner_velocity(x, t, v, y=labels)``, or None.
        num_classes: real classes; labels are i % num_classes, the null class is num_classes.
        shape: (C, H, W) of the sampler's state.
        device: where everything runs.
        dtype: autocast dtype of the networks (float32: no autocast).
    """

    base: nn.Module
    refiner: nn.Module | None
    vae: Any | None
    velocity: ClassifierFreeGuidance
    refiner_velocity: ClassifierFreeGuidance | None
    num_classes: int
    shape: tuple[int, int, int]
    device: torch.device
    dtype: torch.dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def _load_refiner(path: str, arch: dict[str, Any] | None) -> nn.Module:
    from flowturbo.models import VelocityRefiner, build_from_checkpoint, load_checkpoint

    if not Path(path).is_file():
        raise FileNotFoundError(
            f"refiner checkpoint not found: {path}. Set model.refiner_ckpt to the EMA refiner "
            "(checkpoints/<run>/ema.pt of a refiner run, or SiT-XL-2-Refiner.pt with "
            "model.refiner_arch)"
        )
    if arch:
        arch = dict(arch)
        key = arch.pop("key", None)  # the checkpoint's entry holding the weights
        refiner = VelocityRefiner.from_name(arch.pop("name"), **arch)
        load_checkpoint(refiner, path, key=key)
    else:
        refiner = build_from_checkpoint(path)
        if not isinstance(refiner, VelocityRefiner):
            raise ValueError(
                f"model.refiner_ckpt={path} holds a {type(refiner).__name__}, not a "
                "VelocityRefiner: set model.refiner_ckpt to the EMA refiner trained on this base "
                "(checkpoints/<run>/ema.pt of a refiner run); a base checkpoint belongs in "
                "model.base_ckpt"
            )
    return refiner.eval().requires_grad_(False)


def _check_refiner(refiner: nn.Module, base: nn.Module, model_cfg: DictConfig) -> None:
    """Refuses a refiner made for another base, before any sampling.

    The refiner takes the base's state and velocity concatenated (2C channels) at the base's
    resolution, and the same labels: guidance gives both the base's null class
    (``num_classes``), which a refiner of more classes would read as a real class.
    """
    embed = refiner.x_embedder.proj.weight.shape[1]  # 2C: state and velocity
    misfits = []
    if embed != 2 * base.in_channels:
        misfits.append(
            f"the refiner takes {embed} channels (state and velocity), the base's states have "
            f"{base.in_channels} (a refiner for them takes {2 * base.in_channels})"
        )
    if refiner.input_size != base.input_size:
        misfits.append(
            f"the refiner works at {refiner.input_size} x {refiner.input_size}, the base at "
            f"{base.input_size} x {base.input_size}"
        )
    if refiner.num_classes != base.num_classes:
        misfits.append(
            f"the refiner has {refiner.num_classes} classes, the base {base.num_classes} "
            f"(guidance gives both the base's null class, label {base.num_classes})"
        )
    if misfits:
        arch = " (or fix model.refiner_arch)" if model_cfg.get("refiner_arch") else ""
        raise ValueError(
            f"model.refiner_ckpt={model_cfg.refiner_ckpt} does not fit "
            f"model.base_ckpt={model_cfg.base_ckpt}: {'; '.join(misfits)}. Set "
            f"model.refiner_ckpt to the refiner trained on this base{arch}"
        )


def load_networks(cfg: DictConfig, device: torch.device, *, need_refiner: bool) -> Networks:
    """Loads the base (and the refiner, and the VAE for 4-channel latent models).

    Public checkpoints carry no architecture: ``model.base_arch`` / ``model.refiner_arch``
    give it (``{name: SiT-XL/2, ...}``, as :func:`flowturbo.lit.load_frozen_base` takes). A flow
    model of the user's own is ``{factory: mypkg.load_model, in_channels: ..., ...}``.
    """
    from flowturbo.lit.refiner import load_frozen_base

    m = cfg.model
    arch = OmegaConf.to_container(m.base_arch, resolve=True) if m.get("base_arch") else {}
    own = bool(arch.get("factory"))  # a flow model of the user's own: a file or a folder
    if not (Path(m.base_ckpt).exists() if own else Path(m.base_ckpt).is_file()):
        raise FileNotFoundError(
            f"base checkpoint not found: {m.base_ckpt}. Set model.base_ckpt to a demo_base "
            "ema.pt, a public SiT checkpoint (with model.base_arch), or your own flow model's "
            "checkpoint (with model.base_arch.factory)"
        )
    name = arch.pop("name", None)
    base = load_frozen_base(m.base_ckpt, name, keys=BASE_KEYS, **arch).to(device)
    refiner = None
    if need_refiner:
        if not m.get("refiner_ckpt"):
            raise ValueError("schedules with R steps need the refiner: set model.refiner_ckpt=...")
        r_arch = m.get("refiner_arch")
        r_arch = OmegaConf.to_container(r_arch, resolve=True) if r_arch else None
        refiner = _load_refiner(m.refiner_ckpt, r_arch)
        _check_refiner(refiner, base, m)
        refiner = refiner.to(device)
    vae = None
    if base.in_channels == 4:  # a latent model: images come from the SD VAE
        if not cfg.get("vae"):
            raise ValueError(
                "the base model is latent (4 channels): set vae=<folder of the SD VAE "
                "(sd-vae-ft-ema), as diffusers saves it>"
            )
        from flowturbo.data import load_vae

        vae = load_vae(cfg.vae, device)
    elif cfg.get("vae"):
        log.warning(
            "vae=%s ignored: the base works in pixel space (%d x %d x %d states), not on SD VAE "
            "latents",
            cfg.vae,
            base.in_channels,
            base.input_size,
            base.input_size,
        )
    s = cfg.sampler
    null = base.num_classes
    channels = check_sampler(s, base.in_channels)
    velocity = ClassifierFreeGuidance(base, s.cfg_scale, null, channels)
    refiner_velocity = (
        ClassifierFreeGuidance(refiner, s.cfg_scale, null, channels) if refiner else None
    )
    size = base.input_size
    return Networks(
        base,
        refiner,
        vae,
        velocity,
        refiner_velocity,
        base.num_classes,
        (base.in_channels, size, size),
        device,
        _dtype(s.dtype),
    )


def check_sampler(s: DictConfig, channels: int | None = None) -> int | None:
    """Checks ``sampler.cfg_scale``, ``sampler.cfg_channels`` (for a base of ``channels``
    channels; None: not known yet, any positive count) and ``sampler.refiner_input`` before
    any image is made; returns cfg_channels.

    Raises:
        ValueError: naming the setting and what it takes.
    """
    scale = s.cfg_scale
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"sampler.cfg_scale must be a number (1: no guidance), got {scale!r}")
    guided = s.get("cfg_channels")
    top = channels if channels is not None else guided
    if guided is not None and (
        isinstance(guided, bool) or not isinstance(guided, int) or not 1 <= guided <= top
    ):
        span = f"1..{channels}, the base's channels" if channels is not None else "from 1"
        raise ValueError(
            f"sampler.cfg_channels must be null (guide every channel) or {span} (3: the "
            f"public SiT checkpoints' setting), got {guided!r}"
        )
    if s.get("refiner_input", "d0") not in ("d0", "cache"):
        raise ValueError(
            "sampler.refiner_input must be 'd0' (as the refiner is trained) or 'cache' (the "
            f"public FlowTurbo sampler's), got {s.refiner_input!r}"
        )
    return guided


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"sampler.dtype must be one of {', '.join(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def run_entry(
    entry: SweepEntry,
    nets: Networks,
    noise: Tensor,
    labels: Tensor,
    *,
    refiner_input: str = "d0",
    compile: bool | str = False,
) -> Tensor:
    """Samples one batch with an entry's sampler (no gradients, under the sweep's autocast).

    Args:
        entry: the schedule or baseline solver.
        nets: the networks.
        noise: (B, C, H, W) on ``nets.device``.
        labels: (B,) long class labels on ``nets.device``.
        refiner_input: ``"d0"`` or ``"cache"`` (R steps only).
        compile: sample-aware compilation (``sample(..., compile=...)``: True or "sampler").

    Returns:
        (B, C, H, W) float32 sampler output at t = 1.
    """
    with torch.no_grad(), nets.autocast():
        if entry.baseline is not None:
            solver = BASELINES[entry.baseline]
            x = solver(nets.velocity, noise, entry.steps, compile=compile, y=labels)
        else:
            x = sample(
                nets.velocity,
                noise,
                entry.label,
                refiner=nets.refiner_velocity if entry.uses_refiner else None,
                refiner_input=refiner_input,
                compile=compile,
                y=labels,
            )
    return x.float()


@functools.lru_cache(maxsize=32)
def _cached_file_hash(path: str, size: int, mtime_ns: int) -> str:
    return file_hash(path)[:16]


def base_fingerprint(model_cfg: DictConfig) -> str | None:
    """The identity of a run's base model (``model`` config of evaluate.py and generate.py).

    A SiT is fixed by its checkpoint, so this is the checkpoint's hash. A flow model of the
    user's own (``base_arch.factory``) also depends on how it is called (time convention,
    labels), which the file does not fix: the hash then covers ``base_arch`` as well.
    """
    sha = fingerprint(model_cfg.base_ckpt)
    arch = model_cfg.get("base_arch")
    if not arch or not arch.get("factory"):
        return sha
    spec = json.dumps(OmegaConf.to_container(arch, resolve=True), sort_keys=True)
    return hashlib.sha256(f"{sha}/{spec}".encode()).hexdigest()[:16]


def fingerprint(path: str | os.PathLike | None) -> str | None:
    """Content hash of a file (16 hex digits; memoised per size and mtime), or of a folder.

    A folder (a reference image folder, a VAE, a model package) is hashed by the relative
    path, size and modification time of every file under it, hidden ones and ``__pycache__``
    left out (:func:`flowturbo.data.shards.stat_digest`: one ``stat`` per file, contents
    unread): a file added, removed, renamed or rewritten changes it. Within one process it is
    memoised while the folder's own modification time stays (a change in a subfolder, or a
    file rewritten in place, is seen by the next process).
    """
    if path is None:
        return None
    p = Path(str(path))
    if p.is_file():
        st = p.stat()
        return _cached_file_hash(str(p.resolve()), st.st_size, st.st_mtime_ns)
    if p.is_dir():
        return _cached_folder_hash(str(p.resolve()), p.stat().st_mtime_ns)
    return f"missing:{p}"


@functools.lru_cache(maxsize=32)
def _cached_folder_hash(folder: str, mtime_ns: int) -> str:
    from flowturbo.data.shards import stat_digest

    root = Path(folder)
    files = sorted(
        (f.relative_to(root).as_posix(), f)
        for f in root.rglob("*")
        if f.is_file()
        and not any(
            part.startswith(".") or part == "__pycache__" for part in f.relative_to(root).parts
        )
    )
    return "folder:" + stat_digest((str(f), name) for name, f in files)
