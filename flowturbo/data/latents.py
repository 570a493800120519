"""SD-VAE latent shards: images encoded once, written through the shard driver of
:mod:`flowturbo.data.shards` (atomic shards, a manifest with a fingerprint, resume, skipped
samples counted).

``latent.npy`` holds ``LATENT_SCALE`` times the posterior mean, float16; with ``flip`` the
flipped image's latent is stored too (``latent_flip.npy``).
"""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from flowturbo.data.shards import (
    _PARTS,
    MANIFEST_NAME,
    Manifest,
    Record,
    Skip,
    _chunks,
    _fingerprint,
    _folder_plan,
    _is_pattern,
    _is_remote,
    _sample_key,
    _write_shard_set,
    center_crop_resize,
    check_shard_size,
    encode_field,
    image_field,
    read_shard,
    resolve_shards,
    scan_image_folder,
    stat_digest,
)

if TYPE_CHECKING:
    import torch

LATENT_SCALE = 0.18215
"""The SD VAE latent scale used by SiT/DiT: latent = 0.18215 * posterior mean."""
VAE_HINT = (
    'install the VAE extra with `pip install "flowturbo[vae]"` and save the SD VAE '
    "(stabilityai/sd-vae-ft-ema) to a local folder on a machine with internet access, e.g. "
    "`AutoencoderKL.from_pretrained('stabilityai/sd-vae-ft-ema').save_pretrained(FOLDER)`; "
    "nothing is downloaded at run time"
)
_VAE_FILE_SUFFIXES = (".json", ".safetensors", ".bin")  # diffusers config and weights


def _load_rgb(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> (size, size, 3) uint8, center-cropped."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(center_crop_resize(img.convert("RGB"), size))


def _resolve_image_source(source: str | os.PathLike) -> tuple[str, Any, list[str] | None]:
    """("shards", [paths], classes) for a shard set, ("folder", files, classes) for a tree."""
    src = os.path.expanduser(str(source))
    path = Path(src)
    if not path.exists() and not _is_remote(src) and not _is_pattern(src):
        raise FileNotFoundError(
            f"source not found: {src}: give an image folder (ImageFolder layout: "
            "root/<class>/<image>) or an image shard folder (written by write_image_shards, "
            "with manifest.json)"
        )
    if path.is_dir() and not (path / MANIFEST_NAME).exists() and not any(path.glob("*.tar")):
        classes, files = scan_image_folder(path)
        return "folder", files, classes
    classes = Manifest.load(path).classes if (path / MANIFEST_NAME).is_file() else None
    return "shards", resolve_shards(src), classes


class _LatentEncoder:
    """Encodes uint8 image batches with the VAE: 0.18215 * posterior mean (not a sample)."""

    def __init__(self, vae: Any, device: torch.device, dtype: torch.dtype, scale: float):
        self.vae, self.device, self.dtype, self.scale = vae, device, dtype, scale

    def __call__(self, images: np.ndarray, flip: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, H, W, 3) uint8 -> float16 latents (B, C, h, w) and their flipped twins."""
        import torch

        from flowturbo.sampling.decode import encode_images, from_uint8

        x = from_uint8(torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2))
        x = x.to(self.dtype)
        if flip:
            x = torch.cat([x, x.flip(3)])
        z = encode_images(x, self.vae, self.scale)
        z = z.float().cpu().numpy().astype(np.float16)
        n = len(images)
        return z[:n], (z[n:] if flip else None)


@dataclass
class _LatentJob:
    """One latent shard: decode inputs (thread pool), encode in batches, yield records."""

    inputs: Callable[[], Iterator[tuple[str, int, bytes] | Skip]]
    encoder: _LatentEncoder
    resolution: int
    batch_size: int
    flip: bool
    decode_workers: int

    def _decode(self, item: tuple[str, int, bytes] | Skip) -> tuple[str, int, np.ndarray] | Skip:
        if isinstance(item, Skip):
            return item
        key, label, data = item
        try:
            return key, label, _load_rgb(data, self.resolution)
        except Exception as exn:
            return Skip(key, f"{type(exn).__name__}: {exn}")

    def _encode(self, batch: list[tuple[str, int, np.ndarray]]) -> Iterator[Record]:
        z, z_flip = self.encoder(np.stack([img for _, _, img in batch]), self.flip)
        for i, (key, label, _) in enumerate(batch):
            fields = {"latent.npy": encode_field("latent.npy", z[i])}
            if z_flip is not None:
                fields["latent_flip.npy"] = encode_field("latent_flip.npy", z_flip[i])
            fields["cls"] = encode_field("cls", label)
            yield key, fields

    def __call__(self) -> Iterator[Record | Skip]:
        batch: list[tuple[str, int, np.ndarray]] = []

        def take(item: tuple[str, int, np.ndarray] | Skip) -> Iterator[Record | Skip]:
            if isinstance(item, Skip):
                yield item
                return
            batch.append(item)
            if len(batch) == self.batch_size:
                yield from self._encode(batch)
                batch.clear()

        # decode ahead in threads (bounded: two batches in flight) while the VAE encodes
        with ThreadPoolExecutor(max(1, self.decode_workers)) as pool:
            pending: deque[Future] = deque()
            for item in self.inputs():
                pending.append(pool.submit(self._decode, item))
                if len(pending) >= 2 * self.batch_size:
                    yield from take(pending.popleft().result())
            while pending:
                yield from take(pending.popleft().result())
        if batch:
            yield from self._encode(batch)


@dataclass
class _ShardInputs:
    path: str

    def __call__(self) -> Iterator[tuple[str, int, bytes] | Skip]:
        for key, fields in read_shard(self.path):
            try:
                yield key, int(fields["cls"]), image_field(fields)
            except Exception as exn:
                yield Skip(f"{key} @ {self.path}", f"{type(exn).__name__}: {exn}")


@dataclass
class _FolderInputs:
    root: str
    items: list[tuple[int, str, int]]

    def __call__(self) -> Iterator[tuple[str, int, bytes] | Skip]:
        for index, rel, label in self.items:
            try:
                with open(os.path.join(self.root, rel), "rb") as f:
                    yield _sample_key(index, rel), label, f.read()
            except OSError as exn:
                yield Skip(rel, f"{type(exn).__name__}: {exn}")


def load_vae(vae_path: str | os.PathLike, device: Any = "cpu", dtype: Any = None) -> Any:
    """Load the SD VAE (diffusers ``AutoencoderKL``) from a local folder, in eval mode.

    Raises:
        FileNotFoundError: The folder does not exist (the message says how to get it).
        ImportError: diffusers is not installed.
    """
    vae_path = Path(vae_path)
    if not vae_path.is_dir():
        raise FileNotFoundError(f"VAE folder {vae_path} not found: {VAE_HINT}")
    try:
        from diffusers import AutoencoderKL
    except ImportError as exn:
        raise ImportError(f"the VAE needs diffusers: {VAE_HINT}") from exn
    vae = AutoencoderKL.from_pretrained(str(vae_path), local_files_only=True)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _vae_fingerprint(vae_path: str | os.PathLike) -> str:
    """Hash of the VAE folder's config and weight files, by content (memoised per file)."""
    from flowturbo.eval.networks import fingerprint

    files = sorted(
        p for p in Path(vae_path).iterdir() if p.is_file() and p.suffix in _VAE_FILE_SUFFIXES
    )
    return _fingerprint({p.name: fingerprint(p) for p in files})[:16]


def write_latent_shards(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    vae_path: str | os.PathLike,
    *,
    resolution: int = 256,
    batch_size: int = 64,
    flip: bool = True,
    device: str | torch.device | None = None,
    vae_dtype: str = "float32",
    scale: float = LATENT_SCALE,
    shard_size: int = 1000,
    decode_workers: int = 8,
    resume: bool = True,
    progress: bool = True,
    shuffle_seed: int | None = 0,
) -> Manifest:
    """Encode images once with the SD VAE and write latent shards.

    Each image is center-cropped and resized to ``resolution`` (ADM style,
    :func:`center_crop_resize`), mapped to [-1, 1] and encoded;
    ``latent.npy`` = ``scale`` * the posterior **mean** (deterministic; not a sample of the
    posterior), float16, shape (C, resolution / 8, resolution / 8) for the SD VAE. With ``flip``
    the horizontally flipped image's latent is stored as ``latent_flip.npy`` (a flip of the
    latent is not the latent of the flip). ``cls`` is copied.

    Args:
        source: An image shard set (folder with ``manifest.json`` or ``*.tar``, or a brace
            pattern): one latent shard per input shard, same keys. Or an
            ImageFolder root: planned like :func:`write_image_shards` with ``shard_size``
            and ``shuffle_seed``.
            Output shard ``i`` holds the latents of input shard ``i`` (sorted order).
        out_dir: Output folder.
        vae_path: Local folder of a diffusers ``AutoencoderKL`` (e.g. sd-vae-ft-ema).
        resolution: Image side before encoding.
        batch_size: Images per VAE call (doubled with ``flip``).
        flip: Also store the flipped image's latent.
        device: Torch device; default CUDA when available.
        vae_dtype: "float32", "float16" or "bfloat16" for the VAE.
        scale: Latent scale factor.
        shard_size: Files per shard for an ImageFolder source.
        decode_workers: Threads decoding and cropping images.
        resume: Skip shards recorded as complete.
        progress: tqdm bar over shards.
        shuffle_seed: for an ImageFolder source, the seed of the files' order across shards
            (None: sorted, class after class); a shard set keeps its own order.

    Returns:
        The final manifest (kind "latent"; meta records the settings and latent shape).

    Raises:
        FileNotFoundError: ``vae_path`` or the source does not exist.
        ImportError: diffusers is missing.
    """
    import torch

    check_shard_size(shard_size)
    source = os.path.expanduser(str(source))  # the files are read from it, not only listed
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, vae_dtype)
    kind, inputs, classes = _resolve_image_source(source)
    vae = load_vae(vae_path, device=device, dtype=dtype)
    encoder = _LatentEncoder(vae, torch.device(device), dtype, scale)
    order = "as in the input shards"
    if kind == "folder":
        items, order = _folder_plan(inputs, shuffle_seed)
        chunks = _chunks(items, shard_size)
        sources: list[Callable[[], Iterator[Any]]] = [
            _FolderInputs(str(source), list(c)) for c in chunks
        ]
        entries = ((os.path.join(source, rel), f"{rel}\0{y}") for rel, y in inputs)
    else:
        sources = [_ShardInputs(p) for p in inputs]
        entries = ((p, os.path.abspath(p)) for p in inputs)
    jobs = [
        (i, _LatentJob(src, encoder, resolution, batch_size, flip, decode_workers))
        for i, src in enumerate(sources)
    ]
    settings = {
        "vae_path": str(Path(vae_path).resolve()),
        "vae_dtype": vae_dtype,
        "resolution": resolution,
        "scale": scale,
        "posterior": "mean",
        "flip": flip,
        "dtype": "float16",
        "source": str(source),
    }
    parts = {
        "source": str(Path(str(source)).resolve()) if Path(str(source)).exists() else str(source),
        "num_inputs": len(inputs),
        "inputs": stat_digest(entries),
        "vae_weights": _vae_fingerprint(vae_path),
        "order": order,
        **{k: v for k, v in settings.items() if k not in ("vae_path", "source")},
    }
    template = Manifest(
        kind="latent",
        shard_size=shard_size,
        classes=classes,
        fingerprint=_fingerprint("latent", shard_size, parts),
        meta={**settings, _PARTS: parts},
    )
    manifest = _write_shard_set(
        Path(out_dir),
        jobs,
        template,
        resume=resume,
        progress=progress,
        total_jobs=len(jobs),
        desc=f"latent shards -> {out_dir}",
    )
    first = next((s for s in manifest.shard_paths(out_dir)), None)
    if first is not None and "latent_shape" not in manifest.meta:
        _, fields = next(read_shard(first))
        manifest.meta["latent_shape"] = list(np.load(io.BytesIO(fields["latent.npy"])).shape)
        manifest.save(Path(out_dir) / MANIFEST_NAME)
    return manifest
