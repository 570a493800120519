"""FID-versus-latency sweeps over sampler schedules: what ``evaluate.py`` runs.

A sweep evaluates *entries*: FlowTurbo schedules (``"H2P4R3"``), pseudo-corrector-only
(``"H1P7"``) and Heun (``"H8"``) schedules, and baseline solvers (``"euler:16"``,
``"midpoint:8"``, ``"multistep:16"``). Each entry has three parts, computed and cached
separately:

- ``quality``: N images from fixed seeds (image i's noise depends only on (seed, i), its label
  is i % num_classes), decoded with the VAE for latent models, quantised to uint8, then FID,
  IS and precision/recall against the reference (:mod:`flowturbo.eval.fidelity`);
- ``ref_error``: RMS distance between the sampler's output (in the sampler's space: pixels in
  [-1, 1], or scaled latents) and a fine reference ODE solution from the same noise, on the
  first ``ref_error.num_images`` images;
- ``latency``: ms per image of the sampler at ``latency.batch``, eager and with sample-aware
  compilation (:func:`flowturbo.eval.latency.measure_latency`), and of the VAE decode.

The sweep folder (``out_dir``, not Hydra's timestamped run folder, so that multirun jobs and
reruns share it) holds::

    rows/<entry>.json        one per entry, written atomically after every part, with the
                             settings and their hash per part
    grids/<entry>.png        the first few samples of the entry
    reference/ref-<hash>.pt  the reference ODE solution, keyed by its settings
    results.json, results.csv, pareto.png, acceleration.json      the summary

Resume: a part whose settings hash equals the stored one is not recomputed; a changed setting
recomputes only the parts it affects (e.g. ``latency.batch`` only the latency). The summary
merges every row file in ``rows/`` and runs at the end of every job, or alone.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm.auto import tqdm

from flowturbo.eval.atomic import atomic_path
from flowturbo.eval.fidelity import (
    INCEPTION,
    Reference,
    fid_against_statistics,
    fidelity_metrics,
    file_hash,
    load_reference,
)
from flowturbo.eval.latency import measure_latency
from flowturbo.eval.summary import finite, read_row, summarize
from flowturbo.sampling import (
    BASELINES,
    ClassifierFreeGuidance,
    baseline_nfe,
    decode_latents,
    dopri5,
    parse_schedule,
    sample,
    to_uint8,
)
from flowturbo.sampling.steps import step_kinds

log = logging.getLogger(__name__)

#: Parts of a row, each cached under its own settings hash.
PARTS = ("quality", "ref_error", "latency")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class SweepEntry:
    """One sampler configuration of a sweep: a schedule or a baseline solver.

    Attributes:
        label: as written in configs and results: ``"H2P4R3"`` or ``"euler:16"``.
        key: file-safe name of its row file: ``"H2P4R3"``, ``"euler-16"``.
        family: ``"heun"``, ``"pseudo"``, ``"flowturbo"``, ``"euler"``, ``"midpoint"``,
            ``"multistep"`` or ``"other"`` (a schedule mixing other letters).
        plan: one step letter per step (``"HHPPPPRRR"``; ``"MMMM"`` for midpoint, ``"AAAA"``
            for the multistep solver).
        base_nfe: base-model evaluations per image batch.
        refiner_nfe: refiner evaluations per image batch.
        baseline: the name in :data:`flowturbo.sampling.BASELINES` for baseline solvers, None
            for schedules (run by :func:`flowturbo.sampling.sample`).
    """

    label: str
    key: str
    family: str
    plan: str
    base_nfe: int
    refiner_nfe: int
    baseline: str | None = None

    @property
    def steps(self) -> int:
        return len(self.plan)

    @property
    def uses_refiner(self) -> bool:
        return "R" in self.plan


def schedule_family(plan: str) -> str:
    """The sampler family of a schedule's step plan (``"HHPPPPRRR"`` -> ``"flowturbo"``)."""
    letters = set(plan)
    if "R" in letters:
        return "flowturbo"
    if letters == {"H"}:
        return "heun"
    if letters == {"H", "P"} or letters == {"P"}:
        return "pseudo"
    if letters == {"E"}:
        return "euler"
    return "other"


_BASELINE_LETTERS = {"euler": "E", "heun": "H", "midpoint": "M", "multistep": "A"}


def parse_entry(text: str) -> SweepEntry:
    """Parses a sweep entry: a schedule (``"H1P5R3"``) or ``"<solver>:<steps>"``.

    ``"heun:8"`` is the schedule ``"H8"`` (the same computation); ``"euler:16"``,
    ``"midpoint:8"`` and ``"multistep:16"`` run the baseline solvers.

    Raises:
        ValueError: a malformed schedule, an unknown solver or a bad step count.
    """
    text = str(text).strip()
    if ":" not in text:
        sched = parse_schedule(text)
        return SweepEntry(
            sched.text,
            sched.text,
            schedule_family(sched.plan),
            sched.plan,
            sched.base_nfe,
            sched.refiner_nfe,
        )
    name, _, count = text.partition(":")
    name = name.strip().lower()
    if name not in BASELINES:
        raise ValueError(
            f"sweep entry {text!r}: unknown solver {name!r}; known: {', '.join(BASELINES)} "
            "(or give a schedule like H2P4R3)"
        )
    if not count.strip().isdigit() or int(count) < 1:
        raise ValueError(f"sweep entry {text!r}: the step count must be a positive integer")
    steps = int(count)
    if name == "heun":
        return parse_entry(f"H{steps}")
    return SweepEntry(
        f"{name}:{steps}",
        f"{name}-{steps}",
        name,
        _BASELINE_LETTERS[name] * steps,
        baseline_nfe(name, steps),
        0,
        baseline=name,
    )


def sweep_entries(cfg: DictConfig) -> list[SweepEntry]:
    """The entries a job evaluates: ``sampler.schedule`` alone when set, else the sweep.

    The sweep is ``sweep.schedules`` then ``sweep.baselines`` (``{solver: [steps, ...]}``),
    duplicates dropped.
    """
    one = cfg.sampler.get("schedule")
    if one is not None:
        return [parse_entry(str(one))]
    texts = [str(s) for s in (cfg.sweep.get("schedules") or [])]
    for name, counts in (cfg.sweep.get("baselines") or {}).items():
        texts += [f"{name}:{int(c)}" for c in counts or []]
    entries = list({e.key: e for e in map(parse_entry, texts)}.values())
    if not entries:
        raise ValueError("nothing to evaluate: set sweep.schedules / sweep.baselines")
    return entries


# ----------------------------------------------------------------------------- sampling


def image_seed(seed: int, index: int) -> int:
    """The RNG seed of image ``index``: a hash of (seed, index), so no two images share noise."""
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
        base: the frozen base SiT.
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
        refiner = VelocityRefiner.from_name(arch.pop("name"), **arch)
        load_checkpoint(refiner, path)
    else:
        refiner = build_from_checkpoint(path)
        if not isinstance(refiner, VelocityRefiner):
            raise ValueError(f"{path} holds a {type(refiner).__name__}, not a VelocityRefiner")
    return refiner.eval().requires_grad_(False)


def load_networks(cfg: DictConfig, device: torch.device, *, need_refiner: bool) -> Networks:
    """Loads the base (and the refiner, and the VAE for 4-channel latent models).

    Public checkpoints carry no architecture: ``model.base_arch`` / ``model.refiner_arch``
    give it (``{name: SiT-XL/2, ...}``, as :func:`flowturbo.lit.load_frozen_base` takes).
    """
    from flowturbo.lit.refiner import load_frozen_base

    m = cfg.model
    if not Path(m.base_ckpt).is_file():
        raise FileNotFoundError(
            f"base checkpoint not found: {m.base_ckpt}. Set model.base_ckpt to a demo_base "
            "ema.pt or a public SiT checkpoint (with model.base_arch)"
        )
    arch = OmegaConf.to_container(m.base_arch, resolve=True) if m.get("base_arch") else {}
    base = load_frozen_base(m.base_ckpt, arch.pop("name", None), **arch).to(device)
    refiner = None
    if need_refiner:
        if not m.get("refiner_ckpt"):
            raise ValueError("schedules with R steps need the refiner: set model.refiner_ckpt=...")
        r_arch = m.get("refiner_arch")
        r_arch = OmegaConf.to_container(r_arch, resolve=True) if r_arch else None
        refiner = _load_refiner(m.refiner_ckpt, r_arch).to(device)
    vae = None
    if base.in_channels == 4:  # a latent model: images come from the SD VAE
        if not cfg.get("vae"):
            raise ValueError(
                "the base model is latent (4 channels): set vae=<folder of the SD VAE "
                "(sd-vae-ft-ema), as diffusers saves it>"
            )
        from flowturbo.data import load_vae

        vae = load_vae(cfg.vae, device)
    s = cfg.sampler
    null = base.num_classes
    channels = s.get("cfg_channels")
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


def _batches(n: int, batch_size: int) -> Iterator[Tensor]:
    for start in range(0, n, batch_size):
        yield torch.arange(start, min(n, start + batch_size))


def _sample_indices(
    entry: SweepEntry, nets: Networks, cfg: DictConfig, idx: Tensor, compile: bool = False
) -> Tensor:
    noise = seeded_noise(cfg.seed, idx, nets.shape).to(nets.device)
    labels = (idx % nets.num_classes).to(nets.device)
    return run_entry(
        entry, nets, noise, labels, refiner_input=cfg.sampler.refiner_input, compile=compile
    )


def generate(
    entry: SweepEntry, nets: Networks, cfg: DictConfig, num_images: int, keep: int = 0
) -> tuple[Tensor, Tensor | None]:
    """Generates ``num_images`` images of an entry, batched, with a progress bar.

    Args:
        entry: the sampler.
        nets: the networks.
        cfg: the sweep config (seed, sampler.batch_size, sampler.refiner_input, progress).
        num_images: N.
        keep: also return the sampler outputs of the first ``keep`` images.

    Returns:
        (N, C', H', W') uint8 images on the CPU (decoded for latent models), and the
        (min(keep, N), C, H, W) float32 sampler outputs (None when ``keep`` is 0).
    """
    images: Tensor | None = None
    kept: list[Tensor] = []
    bar = tqdm(
        total=num_images,
        desc=f"{entry.label}",
        unit="img",
        disable=not cfg.get("progress", True),
        leave=False,
    )
    for idx in _batches(num_images, cfg.sampler.batch_size):
        x = _sample_indices(entry, nets, cfg, idx)
        if int(idx[0]) < keep:
            kept.append(x[: keep - int(idx[0])].cpu())
        with torch.no_grad(), nets.autocast():
            decoded = decode_latents(x, nets.vae) if nets.vae is not None else x
        batch = to_uint8(decoded).cpu()
        if images is None:
            images = torch.empty((num_images, *batch.shape[1:]), dtype=torch.uint8)
        images[idx] = batch
        bar.update(len(idx))
    bar.close()
    return images, (torch.cat(kept) if kept else None)


# ----------------------------------------------------------------------------- settings


def settings_hash(settings: Any) -> str:
    """16 hex digits of the SHA-256 of the settings as canonical JSON."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=32)
def _cached_file_hash(path: str, size: int, mtime_ns: int) -> str:
    return file_hash(path)[:16]


def fingerprint(path: str | os.PathLike | None) -> str | None:
    """Content hash of a file (16 hex digits; memoised per size and mtime), or a folder's tag."""
    if path is None:
        return None
    p = Path(str(path))
    if p.is_file():
        st = p.stat()
        return _cached_file_hash(str(p.resolve()), st.st_size, st.st_mtime_ns)
    if p.is_dir():
        return f"folder:{p.resolve()}"
    return f"missing:{p}"


def machine(device: torch.device) -> str:
    """Words for the machine a latency was measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def part_settings(cfg: DictConfig, entry: SweepEntry, device: torch.device) -> dict[str, dict]:
    """The settings that determine each part of an entry's row (what its hash covers)."""
    m, s = cfg.model, cfg.sampler
    arch = OmegaConf.to_container(m.base_arch, resolve=True) if m.get("base_arch") else None
    common: dict[str, Any] = {
        "entry": entry.label,
        "base": {"sha256": fingerprint(m.base_ckpt), "arch": arch},
        "cfg_scale": float(s.cfg_scale),
        "cfg_channels": s.get("cfg_channels"),
        "dtype": s.dtype,
        "device": device.type,
        "vae": fingerprint(cfg.get("vae")),
    }
    if entry.uses_refiner:
        r_arch = m.get("refiner_arch")
        common["refiner"] = {
            "sha256": fingerprint(m.get("refiner_ckpt")),
            "arch": OmegaConf.to_container(r_arch, resolve=True) if r_arch else None,
        }
        common["refiner_input"] = s.refiner_input
    f, lat = cfg.fid, cfg.latency
    ref = str(f.reference)
    return {
        "quality": {
            **common,
            "seed": int(cfg.seed),
            "num_images": int(f.num_images),
            "extractor": f.extractor,
            "extractor_weights": fingerprint(extractor_weights(f)),
            "reference": ref,
            "reference_sha256": None if ref.startswith("demo:") else fingerprint(ref),
            "isc": bool(f.isc),
            "prc": bool(f.prc),
        },
        "ref_error": {**common, "seed": int(cfg.seed), "reference": reference_settings(cfg)},
        "latency": {
            **common,
            "batch": int(lat.batch),
            "warmup": int(lat.warmup),
            "repeats": int(lat.repeats),
            "eager": bool(lat.eager),
            "compiled": bool(lat.compiled),
            "compile_mode": compile_mode(lat),
            "decode": bool(lat.decode),
            "machine": machine(device),
            "torch": torch.__version__,
        },
    }


def extractor_weights(fid: DictConfig) -> str | None:
    """The feature extractor's weights file: ``fid.inception_weights`` for InceptionV3,
    ``fid.weights`` for the others, the shipped classifier for ``flowturbo-digits`` by default.
    """
    if fid.extractor == INCEPTION:
        return fid.get("inception_weights")
    if fid.get("weights") is None and fid.extractor == "flowturbo-digits":
        from flowturbo.eval.digits import DEFAULT_WEIGHTS

        return str(DEFAULT_WEIGHTS)
    return fid.get("weights")


def reference_settings(cfg: DictConfig) -> dict[str, Any]:
    """The settings of the reference ODE solution (solver, accuracy, images, model)."""
    e, m, s = cfg.ref_error, cfg.model, cfg.sampler
    solver = {"solver": e.solver, "dtype": e.dtype, "num_images": int(e.num_images)}
    if e.solver == "heun":
        solver["steps"] = int(e.steps)
    elif e.solver == "dopri5":
        solver.update(rtol=float(e.rtol), atol=float(e.atol))
    else:
        raise ValueError(f"ref_error.solver must be 'heun' or 'dopri5', got {e.solver!r}")
    arch = OmegaConf.to_container(m.base_arch, resolve=True) if m.get("base_arch") else None
    return {
        **solver,
        "base": {"sha256": fingerprint(m.base_ckpt), "arch": arch},
        "cfg_scale": float(s.cfg_scale),
        "cfg_channels": s.get("cfg_channels"),
        "seed": int(cfg.seed),
    }


# ----------------------------------------------------------------------------- the parts


def measure_quality(
    entry: SweepEntry,
    nets: Networks,
    cfg: DictConfig,
    reference: Reference,
    out_dir: Path,
    keep: int,
) -> tuple[dict[str, Any], Tensor | None]:
    """Generates ``fid.num_images`` images and measures FID (+ IS, precision/recall).

    Also writes ``grids/<entry>.png`` (the first ``grid.num_images`` images).

    Returns:
        The part's result and the first ``keep`` sampler outputs (for the reference error).
    """
    f = cfg.fid
    start = time.perf_counter()
    images, kept = generate(entry, nets, cfg, int(f.num_images), keep=keep)
    generation_s = time.perf_counter() - start
    write_grid(images, out_dir / "grids" / f"{entry.key}.png", cfg, nets.num_classes)

    start = time.perf_counter()
    cache_root = Path(f.cache_root)
    common = dict(extractor=f.extractor, weights_path=extractor_weights(f), cache_root=cache_root)
    if reference.is_statistics:
        metrics = fid_against_statistics(
            images,
            reference.mu,
            reference.sigma,
            isc=bool(f.isc),
            batch_size=f.batch_size,
            **common,
        )
    else:
        metrics = fidelity_metrics(
            images,
            reference.images,
            reference_cache_name=reference.name,
            isc=bool(f.isc),
            prc=bool(f.prc),
            batch_size=f.batch_size,
            **common,
        )
    metrics.update(
        reference=reference.source,
        generation_s=generation_s,
        metrics_s=time.perf_counter() - start,
    )
    return metrics, kept


def write_grid(images: Tensor, path: Path, cfg: DictConfig, num_classes: int) -> None:
    """Saves the first ``grid.num_images`` of (N, C, H, W) uint8 images, one class a column."""
    n = min(int(cfg.grid.num_images), len(images))
    if n <= 0:
        return
    from torchvision.utils import save_image

    with atomic_path(path) as tmp:
        save_image(images[:n].float() / 255, tmp, nrow=min(num_classes, n), padding=1)


def reference_solution(nets: Networks, cfg: DictConfig, out_dir: Path) -> Tensor:
    """The fine ODE solution from the first ``ref_error.num_images`` noises, cached on disk.

    Heun with ``ref_error.steps`` steps or adaptive Dormand-Prince at ``rtol``/``atol``, in
    ``ref_error.dtype`` (float64 for small models), no autocast. Cached as
    ``reference/ref-<hash>.pt`` in ``out_dir``, the hash of :func:`reference_settings`.

    Returns:
        (K, C, H, W) float64 on the CPU.
    """
    settings = reference_settings(cfg)
    path = out_dir / "reference" / f"ref-{settings_hash(settings)}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if json.loads(saved["settings"]) == json.loads(json.dumps(settings, default=str)):
            return saved["x"]
    e = cfg.ref_error
    dtype = {"float64": torch.float64, "float32": torch.float32}[e.dtype]
    model = nets.base if dtype == torch.float32 else copy.deepcopy(nets.base).to(dtype)
    s = cfg.sampler
    velocity = ClassifierFreeGuidance(model, s.cfg_scale, nets.num_classes, s.get("cfg_channels"))
    k = int(e.num_images)
    out = torch.empty(k, *nets.shape, dtype=torch.float64)
    bar = tqdm(total=k, desc="reference solution", unit="img", disable=not cfg.progress)
    start = time.perf_counter()
    for idx in _batches(k, cfg.sampler.batch_size):
        noise = seeded_noise(cfg.seed, idx, nets.shape).to(nets.device, dtype)
        labels = (idx % nets.num_classes).to(nets.device)
        with torch.no_grad():
            if e.solver == "heun":
                x = BASELINES["heun"](velocity, noise, int(e.steps), y=labels)
            else:
                x = dopri5(velocity, noise, rtol=float(e.rtol), atol=float(e.atol), y=labels)
        out[idx] = x.double().cpu()
        bar.update(len(idx))
    bar.close()
    del model
    took = time.perf_counter() - start
    log.info("reference solution (%s, %d images) in %.0f s -> %s", e.solver, k, took, path)
    with atomic_path(path) as tmp:
        torch.save({"x": out, "settings": json.dumps(settings, default=str)}, tmp)
    return out


def rms_distance(x: Tensor, reference: Tensor) -> float:
    """RMS over every element of ``x - reference`` ((K, C, H, W) each), in float64."""
    return float((x.double() - reference.double()).pow(2).mean().sqrt())


def measure_ref_error(
    entry: SweepEntry, nets: Networks, cfg: DictConfig, reference: Tensor, kept: Tensor | None
) -> dict[str, Any]:
    """RMS distance of the entry's outputs to the reference solution on the same noise."""
    k = reference.shape[0]
    if kept is None or kept.shape[0] < k:
        kept = torch.cat(
            [
                _sample_indices(entry, nets, cfg, idx).cpu()
                for idx in _batches(k, cfg.sampler.batch_size)
            ]
        )
    return {"ref_error": rms_distance(kept[:k], reference), "ref_error_images": k}


@contextlib.contextmanager
def _strict_dynamo() -> Iterator[None]:
    """Makes torch.compile raise, instead of silently running eagerly, at its recompile limit.

    The sampler's compiled steps then fall back to eager with a warning and record it, so
    a row never reports eager timings as compiled ones.
    """
    config = torch._dynamo.config
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(config, name):
            with config.patch(**{name: True}):
                yield
            return
    yield


def compile_mode(lat: DictConfig) -> str:
    """``latency.compile_mode``, checked: "steps" or "sampler"."""
    mode = str(lat.get("compile_mode", "steps"))
    if mode not in ("steps", "sampler"):
        raise ValueError(f"latency.compile_mode must be 'steps' or 'sampler', got {mode!r}")
    return mode


def compiled_for(entry: SweepEntry, nets: Networks, cfg: DictConfig) -> bool:
    """Whether the entry's compiled sampling ran compiled (no eager fallback happened)."""
    from flowturbo.sampling.compile import compiled_steps, default_compile_options
    from flowturbo.sampling.graph import fell_back

    if compile_mode(cfg.latency) == "sampler":
        return not fell_back(nets.velocity)
    steps = compiled_steps(default_compile_options(nets.device))
    return not any(steps[k].failed for k in step_kinds(entry.plan, cfg.sampler.refiner_input))


def measure_entry_latency(entry: SweepEntry, nets: Networks, cfg: DictConfig) -> dict[str, Any]:
    """ms/img of the entry's sampler at ``latency.batch``: eager, compiled, and VAE decode.

    Same noise and labels as images 0..batch-1. ``compile_s`` is the first compiled call
    (compilation of the step kinds not compiled by an earlier entry of this process, plus
    one sampling); ``compiled`` is False when torch.compile failed and the sampler fell back.
    """
    lat = cfg.latency
    b, device = int(lat.batch), nets.device
    idx = torch.arange(b)
    noise = seeded_noise(cfg.seed, idx, nets.shape).to(device)
    labels = (idx % nets.num_classes).to(device)
    refiner_input = cfg.sampler.refiner_input

    def run(compile: bool | str) -> Callable[[], Tensor]:
        return lambda: run_entry(
            entry, nets, noise, labels, refiner_input=refiner_input, compile=compile
        )

    compiled = True if compile_mode(lat) == "steps" else "sampler"

    timing = dict(batch=b, device=device, warmup=int(lat.warmup), repeats=int(lat.repeats))
    out: dict[str, Any] = {"batch": b, "device": str(device), "machine": machine(device)}
    if lat.eager:
        out["eager"] = measure_latency(run(False), **timing).as_dict()
    if lat.compiled:
        with _strict_dynamo():
            start = time.perf_counter()
            run(compiled)()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            compile_s = time.perf_counter() - start
            measured = measure_latency(run(compiled), **timing).as_dict()
        ok = compiled_for(entry, nets, cfg)
        out["compiled"] = {**measured, "compiled": ok, "compile_s": compile_s}
    if lat.decode and nets.vae is not None:
        z = run(False)()

        def decode() -> Tensor:
            with torch.no_grad(), nets.autocast():
                return decode_latents(z, nets.vae)

        out["decode"] = measure_latency(decode, **timing).as_dict()
    return out


# ----------------------------------------------------------------------------- the sweep


def row_path(out_dir: Path, entry: SweepEntry) -> Path:
    return out_dir / "rows" / f"{entry.key}.json"


def write_row(path: Path, row: dict[str, Any]) -> None:
    """Writes a row file atomically, with the hash over its parts' hashes."""
    row["settings_hash"] = settings_hash({p: row["parts"].get(p, {}).get("hash") for p in PARTS})
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(row, indent=2, default=str, allow_nan=False) + "\n")


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_sweep(cfg: DictConfig) -> dict[str, Any]:
    """Evaluates every entry of the sweep (resuming), then writes the summary.

    Args:
        cfg: the composed ``conf/evaluate.yaml`` (with an experiment).

    Returns:
        The summary (:func:`flowturbo.eval.summary.summarize`): ``rows`` and ``acceleration``.
    """
    from flowturbo.config import check_required, register_resolvers

    register_resolvers()
    out_dir = Path(cfg.out_dir)
    if cfg.get("summarize_only"):
        return summarize(out_dir, cfg)
    check_required(cfg, f"python evaluate.py experiment={cfg.get('name', '...')}")
    device = resolve_device(cfg.device)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    todo = plan_work(cfg, sweep_entries(cfg), device, out_dir)
    if todo:
        log.info("to do: %s", ", ".join(f"{e.label} ({'+'.join(m)})" for e, _, m in todo))
        nets = load_networks(cfg, device, need_refiner=any(e.uses_refiner for e, _, _ in todo))
        shared: dict[str, Any] = {}  # the FID reference and the reference solution, loaded once
        for entry, settings, missing in todo:
            evaluate_entry(entry, settings, missing, nets, cfg, out_dir, shared)
    return summarize(out_dir, cfg)


def plan_work(
    cfg: DictConfig, entries: Sequence[SweepEntry], device: torch.device, out_dir: Path
) -> list[tuple[SweepEntry, dict[str, dict], list[str]]]:
    """What is left to do: per entry, the parts whose stored settings hash differs.

    Returns:
        ``(entry, settings of every part, names of the parts to compute)`` for each entry
        with something to compute; up-to-date entries are logged and left out.
    """
    todo = []
    for entry in entries:
        settings = part_settings(cfg, entry, device)
        if int(cfg.ref_error.num_images) <= 0:
            settings.pop("ref_error")
        parts = (read_row(row_path(out_dir, entry)) or {}).get("parts", {})
        missing = [
            p for p in settings if parts.get(p, {}).get("hash") != settings_hash(settings[p])
        ]
        if missing:
            todo.append((entry, settings, missing))
        else:
            log.info("%s: up to date (%s), skipped", entry.label, row_path(out_dir, entry))
    return todo


def evaluate_entry(
    entry: SweepEntry,
    settings: dict[str, dict],
    missing: Sequence[str],
    nets: Networks,
    cfg: DictConfig,
    out_dir: Path,
    shared: dict[str, Any],
) -> None:
    """Computes the ``missing`` parts of one entry, rewriting its row file after each part.

    ``shared`` caches, across entries, the FID reference (``"reference"``) and the reference
    ODE solution (``"solution"``).
    """
    path = row_path(out_dir, entry)
    row = read_row(path) or {}
    row.update(
        entry=entry.label,
        key=entry.key,
        family=entry.family,
        plan=entry.plan,
        steps=entry.steps,
        base_nfe=entry.base_nfe,
        refiner_nfe=entry.refiner_nfe,
    )
    parts = row.setdefault("parts", {})
    for name in [p for p in parts if p not in settings]:
        del parts[name]  # e.g. ref_error after ref_error.num_images=0

    kept = None
    if "quality" in missing:
        if "reference" not in shared:
            shared["reference"] = load_reference(str(cfg.fid.reference))
        keep = int(cfg.ref_error.num_images) if "ref_error" in missing else 0
        result, kept = measure_quality(entry, nets, cfg, shared["reference"], out_dir, keep)
        _store(parts, "quality", settings, result)
        write_row(path, row)
        log.info("%s: FID %.4g (%d images)", entry.label, result["fid"], result["num_generated"])
    if "ref_error" in missing:
        if "solution" not in shared:
            shared["solution"] = reference_solution(nets, cfg, out_dir)
        result = measure_ref_error(entry, nets, cfg, shared["solution"], kept)
        _store(parts, "ref_error", settings, result)
        write_row(path, row)
        log.info("%s: error to the reference %.4g", entry.label, result["ref_error"])
    if "latency" in missing:
        result = measure_entry_latency(entry, nets, cfg)
        _store(parts, "latency", settings, result)
        write_row(path, row)
        log.info("%s: latency %s", entry.label, _latency_words(result))


def _store(parts: dict, name: str, settings: dict, result: dict) -> None:
    parts[name] = {
        "hash": settings_hash(settings[name]),
        "settings": settings[name],
        "result": finite(result),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _latency_words(result: dict[str, Any]) -> str:
    words = []
    for mode in ("eager", "compiled", "decode"):
        if mode in result:
            words.append(f"{mode} {result[mode]['ms_per_image']:.3g} ms/img")
    if "compiled" in result and not result["compiled"]["compiled"]:
        words.append("(compilation failed: eager fallback)")
    return ", ".join(words) + f" at batch {result['batch']}"
