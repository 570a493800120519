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
  compilation, and of the VAE decode; measured last, for all entries of the job together in
  interleaved rounds (:func:`flowturbo.eval.latency.measure_latencies`), each result marked
  with the timing session (one id per pass of the sweep that timed entries together).

The sweep folder (``out_dir``, not Hydra's timestamped run folder, so that multirun jobs and
reruns share it) holds::

    rows/<entry>.json        one per entry, written atomically after every part, with the
                             settings and their hash per part (a killed job's temporary
                             ``rows/.<entry>.<random>.tmp.json`` is removed by the next run)
    grids/<entry>.png        the first few samples of the entry
    reference/ref-<hash>.pt  the reference ODE solution, keyed by its settings
    partial/<entry>-<hash>/  the images of an entry being generated, saved every
                             ``fid.save_every`` images so that an interrupted job resumes
                             mid-entry; deleted once the entry's quality is stored
    results.json, results.csv, pareto.png, acceleration.json      the summary
    rows.lock                held while a job stores a part in a row file (milliseconds)
    summary.lock             held by the job writing the summary (jobs take turns)

Resume: a part whose settings hash equals the stored one is not recomputed; a changed setting
recomputes only the parts it affects (e.g. ``latency.batch`` only the latency). The summary
merges every row file in ``rows/`` and runs at the end of every job, or alone; it names the
timing sessions when a rerun timed only some entries.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import platform
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from flowturbo.config import check_int
from flowturbo.eval.atomic import atomic_path, remove_leftovers
from flowturbo.eval.entries import SweepEntry, sweep_entries
from flowturbo.eval.fidelity import (
    INCEPTION,
    INCEPTION_WEIGHTS_FILE,
    Reference,
    check_extractor,
    check_images,
    check_reference,
    check_registered,
    fid_against_statistics,
    fidelity_metrics,
    load_reference,
)
from flowturbo.eval.latency import measure_latencies
from flowturbo.eval.networks import (
    Networks,
    base_fingerprint,
    check_sampler,
    fingerprint,
    load_networks,
    run_entry,
    seeded_noise,
)
from flowturbo.eval.summary import finite, read_row, settings_hash, summarize
from flowturbo.sampling import (
    BASELINES,
    ClassifierFreeGuidance,
    decode_latents,
    dopri5,
    to_uint8,
)
from flowturbo.sampling.steps import step_kinds

log = logging.getLogger(__name__)

#: Parts of a row, each cached under its own settings hash.
PARTS = ("quality", "ref_error", "latency")

#: The lock file in ``out_dir`` held while a row file is read, updated and written
#: (:func:`store_part`), and the longest wait for it: the section takes milliseconds.
ROWS_LOCK = "rows.lock"
ROWS_LOCK_TIMEOUT_S = 600.0

#: Splits of the Inception Score (it needs at least as many images) and k of the k-nearest-
#: neighbour balls of precision/recall (they need more images), as torch-fidelity uses them.
ISC_SPLITS = 10
PRC_NEIGHBORHOOD = 3

#: How an ``.npz`` reference is read, in the quality settings of rows measured against one: rows
#: from before FID used an npz's statistics where it also has images are measured again.
NPZ_REFERENCE = "FID against mu/sigma where present, else arr_0; precision/recall on arr_0"

#: ``ref_error.dtype``: the precision of the reference ODE solution.
REFERENCE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


# ----------------------------------------------------------------------------- generation


def _batches(n: int, batch_size: int, start: int = 0) -> Iterator[Tensor]:
    for first in range(start, n, batch_size):
        yield torch.arange(first, min(n, first + batch_size))


def _sample_indices(
    entry: SweepEntry, nets: Networks, cfg: DictConfig, idx: Tensor, compile: bool = False
) -> Tensor:
    noise = seeded_noise(cfg.seed, idx, nets.shape).to(nets.device)
    labels = (idx % nets.num_classes).to(nets.device)
    return run_entry(
        entry, nets, noise, labels, refiner_input=cfg.sampler.refiner_input, compile=compile
    )


def generate(
    entry: SweepEntry,
    nets: Networks,
    cfg: DictConfig,
    num_images: int,
    keep: int = 0,
    partial: Path | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Generates ``num_images`` images of an entry, batched, with a progress bar.

    With ``partial``, the images are also saved there as they are made, in chunks of at least
    ``fid.save_every`` images (``images-<first>-<end>.pt``, each written atomically), and the
    chunks found there are read instead of generated again: a job interrupted in the middle of
    an entry resumes where it stopped. Image i depends only on (seed, i), so the resumed images
    are those an uninterrupted run makes. The folder must be named after everything that
    determines the images (:func:`partial_dir`).

    Args:
        entry: the sampler.
        nets: the networks.
        cfg: the sweep config (seed, sampler.batch_size, sampler.refiner_input, fid.save_every,
            progress).
        num_images: N.
        keep: also return the sampler outputs of the first ``keep`` images.
        partial: the folder of the saved chunks; None: nothing is saved.

    Returns:
        (N, C', H', W') uint8 images on the CPU (decoded for latent models), and the
        (min(keep, N), C, H, W) float32 sampler outputs (None when ``keep`` is 0).
    """
    images: Tensor | None = None
    kept: list[Tensor] = []
    done = 0
    if partial is not None:
        images, kept, done = _read_chunks(partial, num_images, keep)
        if done:
            log.info("%s: %d of %d images read from %s", entry.label, done, num_images, partial)
    save_every = int(cfg.fid.get("save_every", 0)) if partial is not None else 0
    chunk: list[tuple[Tensor, Tensor | None]] = []  # (images, kept outputs) not saved yet
    bar = tqdm(
        total=num_images,
        initial=done,
        desc=f"{entry.label}",
        unit="img",
        disable=not cfg.get("progress", True),
        leave=False,
    )
    for idx in _batches(num_images, cfg.sampler.batch_size, start=done):
        x = _sample_indices(entry, nets, cfg, idx)
        first = int(idx[0])
        outputs = x[: keep - first].cpu() if first < keep else None
        if outputs is not None:
            kept.append(outputs)
        with torch.no_grad(), nets.autocast():
            decoded = decode_latents(x, nets.vae) if nets.vae is not None else x
        batch = to_uint8(decoded).cpu()
        if images is None:
            images = torch.empty((num_images, *batch.shape[1:]), dtype=torch.uint8)
        images[idx] = batch
        bar.update(len(idx))
        if save_every > 0:
            chunk.append((batch, outputs))
            if sum(len(b) for b, _ in chunk) >= save_every or int(idx[-1]) + 1 == num_images:
                done = _write_chunk(partial, done, chunk)
                chunk = []
    bar.close()
    return images, (torch.cat(kept) if kept else None)


#: Quality settings that decide how images are scored, not the images: an interrupted entry's
#: saved images serve a rerun that changes only these (image i depends on the seed and i alone,
#: so a rerun with another ``fid.num_images`` reads the ones it needs).
SCORING_SETTINGS = (
    "num_images", "extractor", "extractor_weights", "reference", "reference_sha256", "npz",
    "isc", "prc",
)  # fmt: skip


def partial_dir(out_dir: Path, entry: SweepEntry, quality: dict[str, Any]) -> Path:
    """The folder of an entry's saved images (:func:`generate`), named after the entry and the
    hash of the quality settings that decide the images (not :data:`SCORING_SETTINGS`)."""
    images = {k: v for k, v in quality.items() if k not in SCORING_SETTINGS}
    return out_dir / "partial" / f"{entry.key}-{settings_hash(images)}"


def _write_chunk(folder: Path, first: int, chunk: list[tuple[Tensor, Tensor | None]]) -> int:
    """Saves images ``first`` onwards (and the kept outputs among them); returns the end."""
    images = torch.cat([b for b, _ in chunk])
    outputs = [o for _, o in chunk if o is not None]
    end = first + len(images)
    with atomic_path(folder / f"images-{first:08d}-{end:08d}.pt") as tmp:
        torch.save({"images": images, "kept": torch.cat(outputs) if outputs else None}, tmp)
    return end


def _read_chunks(
    folder: Path, num_images: int, keep: int
) -> tuple[Tensor | None, list[Tensor], int]:
    """The saved chunks of :func:`generate`, in order from image 0, as long as they follow on
    from each other and hold the kept outputs this run needs; (images, kept, images read)."""
    remove_leftovers(folder)  # a killed job's half-written chunk
    files = {int(p.name.split("-")[1]): p for p in folder.glob("images-*-*.pt")}
    images: Tensor | None = None
    kept: list[Tensor] = []
    done = 0
    while done in files:
        try:
            chunk = torch.load(files[done], map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - damaged: generate it again from here
            log.warning("%s cannot be read (%s): generating from image %d", files[done], err, done)
            break
        n = len(chunk["images"])
        wanted = max(0, min(keep, done + n) - done)
        have = 0 if chunk["kept"] is None else len(chunk["kept"])
        if done + n > num_images or have < wanted:
            break  # saved for another run (fewer kept outputs): generated again from here
        if images is None:
            images = torch.empty((num_images, *chunk["images"].shape[1:]), dtype=torch.uint8)
        images[done : done + n] = chunk["images"]
        if wanted:
            kept.append(chunk["kept"][:wanted])
        done += n
    return images, kept, done


# ----------------------------------------------------------------------------- settings


def machine(device: torch.device) -> str:
    """Words for the machine a latency was measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def _base_settings(m: DictConfig) -> dict[str, Any]:
    arch = OmegaConf.to_container(m.base_arch, resolve=True) if m.get("base_arch") else None
    return {"sha256": base_fingerprint(m), "arch": arch}


def part_settings(
    cfg: DictConfig, entry: SweepEntry, device: torch.device, *, latent: bool = True
) -> dict[str, dict]:
    """The settings that determine each part of an entry's row (what its hash covers).

    ``latent``: False once the base is known to work in pixel space, where ``vae`` plays no
    part (before the base is loaded, a VAE given counts).
    """
    m, s, vae = cfg.model, cfg.sampler, cfg.get("vae")
    common: dict[str, Any] = {
        "entry": entry.label,
        "base": _base_settings(m),
        "cfg_scale": float(s.cfg_scale),
        "cfg_channels": s.get("cfg_channels"),
        "dtype": s.dtype,
        "device": device.type,
        "vae": fingerprint(vae) if latent else None,
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
            # a file or folder by its content alone: the same one given another way (a
            # relative path, a link) is not measured again
            "reference": ref if ref.startswith("demo:") else None,
            "reference_sha256": None if ref.startswith("demo:") else fingerprint(ref),
            **({"npz": NPZ_REFERENCE} if ref.endswith(".npz") else {}),
            "isc": bool(f.isc),
            "prc": bool(f.prc),
        },
        # without a reference error (ref_error.num_images=0) its settings play no part
        **(
            {"ref_error": {**common, "seed": int(cfg.seed), "reference": reference_settings(cfg)}}
            if int(cfg.ref_error.num_images) > 0
            else {}
        ),
        "latency": {
            **common,
            "batch": int(lat.batch),
            "warmup": int(lat.warmup),
            "repeats": int(lat.repeats),
            "eager": bool(lat.eager),
            "compiled": bool(lat.compiled),
            "compile_mode": compile_mode(lat),
            "rounds": "interleaved",  # every entry of a job timed in the same rounds
            "decode": bool(lat.decode),
            **({"decode_timed": "alone and after each sampler"} if latent and vae else {}),
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
    if e.dtype not in REFERENCE_DTYPES:
        raise ValueError(
            f"ref_error.dtype must be {' or '.join(map(repr, REFERENCE_DTYPES))}, got {e.dtype!r}"
        )
    solver = {"solver": e.solver, "dtype": e.dtype, "num_images": int(e.num_images)}
    if e.solver == "heun":
        solver["steps"] = int(e.steps)
    elif e.solver == "dopri5":
        solver.update(rtol=float(e.rtol), atol=float(e.atol))
    else:
        raise ValueError(f"ref_error.solver must be 'heun' or 'dopri5', got {e.solver!r}")
    return {
        **solver,
        "base": _base_settings(m),
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
    partial: Path | None = None,
) -> tuple[dict[str, Any], Tensor | None]:
    """Generates ``fid.num_images`` images and measures FID (+ IS, precision/recall).

    Also writes ``grids/<entry>.png`` (the first ``grid.num_images`` images). ``partial``: the
    folder where :func:`generate` saves the images as they are made (None: not saved).

    Returns:
        The part's result and the first ``keep`` sampler outputs (for the reference error).
    """
    f = cfg.fid
    start = time.perf_counter()
    images, kept = generate(entry, nets, cfg, int(f.num_images), keep=keep, partial=partial)
    generation_s = time.perf_counter() - start
    write_grid(images, out_dir / "grids" / f"{entry.key}.png", cfg, nets.num_classes)

    start = time.perf_counter()
    common = dict(extractor=f.extractor, weights_path=extractor_weights(f))
    if reference.is_statistics:  # with images too (ADM's batches): those for precision/recall
        metrics = fid_against_statistics(
            images,
            reference.mu,
            reference.sigma,
            isc=bool(f.isc),
            prc_reference=reference.images if f.prc else None,
            reference_cache_name=reference.name,
            cache_root=Path(f.cache_root),
            batch_size=f.batch_size,
            isc_splits=ISC_SPLITS,
            prc_neighborhood=PRC_NEIGHBORHOOD,
            **common,
        )
    else:
        metrics = fidelity_metrics(
            images,
            reference.images,
            reference_cache_name=reference.name,
            cache_root=Path(f.cache_root),
            isc=bool(f.isc),
            prc=bool(f.prc),
            batch_size=f.batch_size,
            isc_splits=ISC_SPLITS,
            prc_neighborhood=PRC_NEIGHBORHOOD,
            **common,
        )
    metrics.update(
        reference=reference.source,
        reference_skipped=reference.skipped,
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
    dtype = REFERENCE_DTYPES[e.dtype]
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


def measure_entries_latency(
    entries: Sequence[SweepEntry], nets: Networks, cfg: DictConfig
) -> dict[str, dict[str, Any]]:
    """ms/img of the entries' samplers at ``latency.batch``: eager, compiled, and VAE decode.

    Same noise and labels as images 0..batch-1. All calls are timed together in interleaved
    rounds (:func:`flowturbo.eval.latency.measure_latencies`), so the ratios between entries
    do not depend on when each was measured; in ``compile_mode=sampler`` in groups of at most
    :data:`~flowturbo.sampling.graph.MAX_CACHED_SAMPLERS` entries, the compiled samplers kept at
    once. For a latent model (``latency.decode`` on) the VAE decode is timed alone, once per
    group and reported with every entry, and after each sampler as one call (``eager_decode``,
    ``compiled_decode``: latent noise to pixels, what a deployed sampler costs).
    ``compile_s`` is the first compiled call (compilation of what an earlier entry of this
    process did not compile, plus one sampling); ``compiled`` is False when torch.compile
    failed and the sampler fell back.

    Returns:
        The latency part's result per entry key.
    """
    from flowturbo.sampling.graph import MAX_CACHED_SAMPLERS

    lat = cfg.latency
    b, device = int(lat.batch), nets.device
    idx = torch.arange(b)
    noise = seeded_noise(cfg.seed, idx, nets.shape).to(device)
    labels = (idx % nets.num_classes).to(device)
    refiner_input = cfg.sampler.refiner_input
    compiled = True if compile_mode(lat) == "steps" else "sampler"
    timing = dict(batch=b, device=device, warmup=int(lat.warmup), repeats=int(lat.repeats))

    def run(entry: SweepEntry, compile: bool | str) -> Callable[[], Tensor]:
        return lambda: run_entry(
            entry, nets, noise, labels, refiner_input=refiner_input, compile=compile
        )

    results: dict[str, dict[str, Any]] = {}
    group_size = MAX_CACHED_SAMPLERS if compiled == "sampler" else max(1, len(entries))
    for first in range(0, len(entries), group_size):
        group = entries[first : first + group_size]
        calls: dict[tuple[str, str], Callable[[], object]] = {}
        compile_s: dict[str, float] = {}
        decode = bool(lat.decode) and nets.vae is not None
        for entry in group:
            if lat.eager:
                calls[entry.key, "eager"] = run(entry, False)
                if decode:
                    calls[entry.key, "eager_decode"] = _then_decode(run(entry, False), nets)
            if lat.compiled:
                start = time.perf_counter()
                run(entry, compiled)()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                compile_s[entry.key] = time.perf_counter() - start
                calls[entry.key, "compiled"] = run(entry, compiled)
                if decode:
                    calls[entry.key, "compiled_decode"] = _then_decode(run(entry, compiled), nets)
        if decode:  # alone, the same for every entry: timed once
            latents = run(group[0], False)()
            calls["", "decode"] = _then_decode(lambda z=latents: z, nets)
        timed = measure_latencies(calls, **timing)
        for entry in group:
            out: dict[str, Any] = {"batch": b, "device": str(device), "machine": machine(device)}
            for (key, mode), latency in timed.items():
                if key in (entry.key, ""):
                    out[mode] = latency.as_dict()
            if "compiled" in out:
                ok = compiled_for(entry, nets, cfg)
                out["compiled"].update(compiled=ok, compile_s=compile_s[entry.key])
                if "compiled_decode" in out:
                    out["compiled_decode"].update(compiled=ok)
            results[entry.key] = out
    return results


def _then_decode(sample: Callable[[], Tensor], nets: Networks) -> Callable[[], Tensor]:
    """``sample()``'s latents decoded to pixels by the VAE, as one call."""

    def decoded() -> Tensor:
        z = sample()
        with torch.no_grad(), nets.autocast():
            return decode_latents(z, nets.vae)

    return decoded


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
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device={name} is not a torch device: give auto, cpu, cuda or cuda:<index>"
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={name}, but no CUDA GPU is visible here (torch.cuda.is_available() is "
            "False): set device=cpu or device=auto, or run on a GPU node"
        )
    return device


def run_sweep(cfg: DictConfig) -> dict[str, Any]:
    """Evaluates every entry of the sweep (resuming), then writes the summary.

    The settings are checked first (:func:`check_settings`), then, when some FID is to be
    measured, the extractor and the reference (:func:`check_fid`): only then are the networks
    loaded and images generated.

    Args:
        cfg: the composed ``conf/evaluate.yaml`` (with an experiment).

    Returns:
        The summary (:func:`flowturbo.eval.summary.summarize`): ``rows`` and ``acceleration``.
    """
    from flowturbo.config import check_config, command_line, register_resolvers

    register_resolvers()
    out_dir = Path(cfg.out_dir)
    for folder in ("rows", "grids", "reference"):  # a killed job's half-written files
        remove_leftovers(out_dir / folder)
    summarize_only = cfg.get("summarize_only")
    check_config(cfg, command_line("evaluate.py"), required=not summarize_only)
    if summarize_only:
        return summarize(out_dir, cfg)
    check_settings(cfg)
    device = resolve_device(cfg.device)
    check_writable(out_dir)
    if cfg.get("threads") is not None:  # 0 is refused, not read as "the default"
        torch.set_num_threads(check_int(cfg, "threads", 1, "(null: torch's default)"))
    todo = plan_work(cfg, sweep_entries(cfg), device, out_dir)
    if todo:
        shared: dict[str, Any] = {}  # the FID reference and the reference solution, loaded once
        if any("quality" in missing for _, _, missing in todo):
            shared["reference"] = check_fid(cfg)
        nets = load_networks(cfg, device, need_refiner=any(e.uses_refiner for e, _, _ in todo))
        if "reference" in shared and nets.vae is None:  # before any image is generated
            check_images("generated", nets.shape, cfg.fid.extractor)
        if cfg.get("vae") and nets.vae is None:  # a pixel model: the VAE setting plays no part
            todo = plan_work(cfg, [e for e, _, _ in todo], device, out_dir, latent=False)
        if todo:
            log.info("to do: %s", ", ".join(f"{e.label} ({'+'.join(m)})" for e, _, m in todo))
        for entry, settings, missing in todo:
            evaluate_entry(entry, settings, missing, nets, cfg, out_dir, shared)
        timed = [(entry, settings) for entry, settings, missing in todo if "latency" in missing]
        if timed:
            evaluate_latency(timed, nets, cfg, out_dir)
    return summarize(out_dir, cfg)


def check_settings(cfg: DictConfig) -> None:
    """Checks the sweep's numbers before anything is loaded or generated.

    Raises:
        ValueError: naming the setting: ``sampler.batch_size`` or ``fid.batch_size`` < 1;
            ``sampler.cfg_scale`` not a number, ``sampler.refiner_input`` unknown;
            ``fid.save_every``, ``grid.num_images`` or ``ref_error.num_images`` < 0;
            ``ref_error.steps`` < 1 for a Heun reference; ``fid.num_images`` < 2, or
            too few for the Inception Score or precision/recall when they are on; a latency
            setting out of range (``batch``, ``repeats`` < 1, ``warmup`` < 0) when some latency
            is measured.
    """
    check_int(cfg, "sampler.batch_size", 1)
    check_sampler(cfg.sampler)
    check_int(cfg, "fid.batch_size", 1)
    check_int(cfg, "fid.save_every", 0)
    check_int(cfg, "grid.num_images", 0, "(0: no grid)")
    check_int(cfg, "seed", 0)
    n = check_int(cfg, "fid.num_images", 2, "(FID needs a covariance of the images)")
    errors = check_int(cfg, "ref_error.num_images", 0, "(0: no reference error)")
    if errors > 0 and cfg.ref_error.solver == "heun":
        check_int(cfg, "ref_error.steps", 1)
    if cfg.fid.isc and n < ISC_SPLITS:
        raise ValueError(
            f"fid.num_images={n}: the Inception Score needs at least {ISC_SPLITS} images (one "
            f"per split); give fid.num_images>={ISC_SPLITS} or set fid.isc=false"
        )
    if cfg.fid.prc and n <= PRC_NEIGHBORHOOD:
        raise ValueError(
            f"fid.num_images={n}: precision/recall need more than {PRC_NEIGHBORHOOD} images (k = "
            f"{PRC_NEIGHBORHOOD} nearest neighbours); give fid.num_images>={PRC_NEIGHBORHOOD + 1} "
            "or set fid.prc=false"
        )
    lat = cfg.latency
    if lat.eager or lat.compiled or (lat.decode and cfg.get("vae")):
        check_int(cfg, "latency.batch", 1)
        check_int(cfg, "latency.repeats", 1)
        check_int(cfg, "latency.warmup", 0)


def check_writable(out_dir: Path) -> None:
    """Makes the sweep's folders and writes a file there, before any image is generated (a
    folder found read-only after the first entry's images would throw them away).

    Raises:
        OSError: of the kind the file system gave, naming ``out_dir`` and what to do.
    """
    try:
        for folder in ("rows", "grids", "reference"):
            (out_dir / folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir / "rows", prefix=".writable-"):
            pass
    except OSError as err:
        raise type(err)(
            f"out_dir={out_dir}: the sweep's results cannot be written there ({err}); give a "
            "folder you can write to with out_dir=... (or another name=...)"
        ) from err


def check_fid(cfg: DictConfig) -> Reference:
    """Checks the FID settings and reads the reference, before any network is loaded or any
    image generated (a bad setting found after the images would throw them away).

    ``fid.extractor`` must be registered with torch-fidelity and its weights file
    (:func:`extractor_weights`) must load (:func:`flowturbo.eval.fidelity.check_extractor`,
    one tiny image through it); ``fid.reference`` must be readable and fit the extractor
    (:func:`flowturbo.eval.fidelity.check_reference`): statistics of its feature width, or
    images of a size it takes, more than ``PRC_NEIGHBORHOOD`` of them when ``fid.prc`` is on.
    No reference feature is computed here.

    Returns:
        The reference, read once for every entry of the job.

    Raises:
        FileNotFoundError, ValueError: the message starts with the setting to change.
    """
    f = cfg.fid
    weights = extractor_weights(f)
    weights_key = "fid.inception_weights" if f.extractor == INCEPTION else "fid.weights"
    if f.extractor == INCEPTION and "inception_weights" not in f:  # only sit_xl_sweep has it
        raise FileNotFoundError(
            f"fid.extractor={INCEPTION} reads InceptionV3's weights from a local file: add "
            f"+fid.inception_weights=<path to {INCEPTION_WEIGHTS_FILE}> (the + adds the key, "
            "which experiment=sit_xl_sweep has already)"
        )
    with _named("fid.extractor", f.extractor):
        check_registered(f.extractor)
    with _named(weights_key, weights):
        feature_dim = check_extractor(f.extractor, weights)
    with _named("fid.reference", f.reference):
        reference = load_reference(str(f.reference))
        check_reference(reference, f.extractor, feature_dim)
        if f.prc and reference.images is None:
            log.warning(
                "fid.prc=true, but fid.reference=%s holds statistics (mu, sigma): precision and "
                "recall need reference images, so the rows get FID and IS only",
                f.reference,
            )
        if f.prc and reference.images is not None and len(reference) <= PRC_NEIGHBORHOOD:
            raise ValueError(
                f"precision/recall need more than {PRC_NEIGHBORHOOD} reference images, it has "
                f"{len(reference)}: give more or set fid.prc=false"
            )
    return reference


@contextlib.contextmanager
def _named(key: str, value: Any) -> Iterator[None]:
    """Puts the setting ``key=value`` in front of the FileNotFoundError or ValueError raised
    inside."""
    try:
        yield
    except (FileNotFoundError, ValueError) as err:
        kind = FileNotFoundError if isinstance(err, FileNotFoundError) else ValueError
        raise kind(f"{key}={value}: {err}") from err


def plan_work(
    cfg: DictConfig,
    entries: Sequence[SweepEntry],
    device: torch.device,
    out_dir: Path,
    *,
    latent: bool = True,
) -> list[tuple[SweepEntry, dict[str, dict], list[str]]]:
    """What is left to do: per entry, the parts whose stored settings hash differs (and every
    latency with ``latency.retime_all``); ``latent`` as :func:`part_settings` takes it.

    Returns:
        ``(entry, settings of every part, names of the parts to compute)`` for each entry
        with something to compute; up-to-date entries are logged and left out.
    """
    todo = []
    for entry in entries:
        settings = part_settings(cfg, entry, device, latent=latent)
        parts = (read_row(row_path(out_dir, entry)) or {}).get("parts", {})
        missing = [
            p
            for p in settings
            if parts.get(p, {}).get("hash") != settings_hash(settings[p])
            or (p == "latency" and cfg.latency.get("retime_all"))
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
    """Computes the ``missing`` quality and reference-error parts of one entry, rewriting its
    row file after each part (the latency parts of all entries: :func:`evaluate_latency`).

    ``shared`` holds, across entries, the FID reference (``"reference"``, read and checked by
    :func:`check_fid` before any network is loaded) and the reference ODE solution
    (``"solution"``, computed by the first entry that needs it).
    """
    kept = None
    if "quality" in missing:
        keep = int(cfg.ref_error.num_images) if "ref_error" in missing else 0
        partial = partial_dir(out_dir, entry, settings["quality"])
        if int(cfg.fid.save_every) <= 0:
            partial = None
        result, kept = measure_quality(
            entry, nets, cfg, shared["reference"], out_dir, keep, partial
        )
        store_part(out_dir, entry, settings, "quality", result)
        _remove_partial(out_dir, entry)
        log.info("%s: FID %.4g (%d images)", entry.label, result["fid"], result["num_generated"])
    if "ref_error" in missing:
        if "solution" not in shared:
            shared["solution"] = reference_solution(nets, cfg, out_dir)
        result = measure_ref_error(entry, nets, cfg, shared["solution"], kept)
        store_part(out_dir, entry, settings, "ref_error", result)
        log.info("%s: error to the reference %.4g", entry.label, result["ref_error"])


def _remove_partial(out_dir: Path, entry: SweepEntry) -> None:
    """Deletes the entry's saved images once its quality is stored (those of other settings
    too), and the ``partial`` folder when nothing else is left in it."""
    root = out_dir / "partial"
    for folder in root.glob(f"{entry.key}-*"):
        shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):  # another job's images are still there
        root.rmdir()


def evaluate_latency(
    todo: Sequence[tuple[SweepEntry, dict[str, dict]]],
    nets: Networks,
    cfg: DictConfig,
    out_dir: Path,
) -> None:
    """Measures the latency parts of these entries together, then writes each row file.

    Every result gets the same ``session``: the start time of this timing pass and a random
    suffix, by which the summary tells latencies timed together from the others.
    """
    if cfg.latency.eager or cfg.latency.compiled or nets.vae is not None and cfg.latency.decode:
        log.info("latency of %s, in interleaved rounds", ", ".join(e.label for e, _ in todo))
    session = f"{time.strftime('%Y-%m-%dT%H:%M:%S')}-{uuid.uuid4().hex[:8]}"
    results = measure_entries_latency([entry for entry, _ in todo], nets, cfg)
    for entry, settings in todo:
        store_part(out_dir, entry, settings, "latency", results[entry.key] | {"session": session})
        words = _latency_words(results[entry.key])
        if words:
            log.info("%s: latency %s", entry.label, words)


def store_part(
    out_dir: Path, entry: SweepEntry, settings: dict[str, dict], name: str, result: dict
) -> None:
    """Stores one computed part in the entry's row file: read, updated and written again
    holding ``out_dir/rows.lock`` (:data:`ROWS_LOCK`), so that two jobs storing parts of one
    entry at once (``sampler.schedule=H8,heun:8`` is one entry twice) each keep the other's.

    The lock is held for the few milliseconds of the read and the write, never while a part is
    computed; on a file system without flock locks the row is written unlocked, with a warning.
    """
    from flowturbo.lock import waiting_lock

    path = row_path(out_dir, entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    with waiting_lock(
        out_dir / ROWS_LOCK,
        timeout_s=ROWS_LOCK_TIMEOUT_S,
        what=f"storing the {name} of {entry.label} in {path}",
        what_to_do=f"end that process and rerun this job: only {entry.label}'s {name} is "
        "computed again",
        without_flock="two jobs storing parts of one schedule at once may lose one part "
        "(the next run computes it again)",
    ):
        row, parts = _open_row(path, entry, settings)
        _store(parts, name, settings, result)
        write_row(path, row)


def _open_row(path: Path, entry: SweepEntry, settings: dict[str, dict]) -> tuple[dict, dict]:
    """An entry's row file as stored (or new), its identity refreshed, and its parts, less
    those no longer configured (e.g. ref_error after ref_error.num_images=0) or measured with
    other settings than this job's: a job killed between storing a new quality and timing the
    entry must not leave a row that pairs the new FID with a latency of other settings (the
    next run computes the dropped part anyway)."""
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
    for name in list(parts):
        if name not in settings or parts[name].get("hash") != settings_hash(settings[name]):
            del parts[name]
    return row, parts


def _store(parts: dict, name: str, settings: dict, result: dict) -> None:
    parts[name] = {
        "hash": settings_hash(settings[name]),
        "settings": settings[name],
        "result": finite(result),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _latency_words(result: dict[str, Any]) -> str:
    words = []
    for mode in ("eager", "compiled", "decode", "eager_decode", "compiled_decode"):
        if mode in result:
            words.append(f"{mode} {result[mode]['ms_per_image']:.3g} ms/img")
    if "compiled" in result and not result["compiled"]["compiled"]:
        words.append("(compilation failed: eager fallback)")
    return ", ".join(words) + f" at batch {result['batch']}" if words else ""
