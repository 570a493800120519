"""FID, Inception Score and precision/recall of generated images, with torch-fidelity.

Two extractors are meant to be used:

- ``"flowturbo-digits"`` (:mod:`flowturbo.eval.digits`) for the demo data: a classifier trained
  by the project, weights shipped in ``flowturbo/assets/digits_classifier.pt``;
- ``"inception-v3-compat"`` for ImageNet: torch-fidelity's InceptionV3 (the TF-compatible FID
  network) from a weights file the user provides.

Nothing is downloaded: torch-fidelity fetches InceptionV3 when no weights path is given, so a
missing path or file is an error here instead. Generated images are never cached (no cache
name); the reference's features and FID statistics are cached under ``cache_root`` by a name
that holds a hash of the reference images and of the extractor's weights file, so a changed
reference or extractor never reuses stale statistics.

References (:func:`load_reference`): the demo splits (``demo:train``), a folder of images, an
``.npz`` of images, of FID statistics ``mu``/``sigma`` or of both (ADM's reference batches, e.g.
``VIRTUAL_imagenet256_labeled.npz``: statistics of the whole data set and 10,000 of its images),
or a torch-fidelity statistics file. Where there are statistics, FID is measured against them
(:func:`fid_against_statistics`), as ADM's evaluator does, and the images, if any, serve
precision/recall only; without images, only FID and IS can be computed.
:func:`check_extractor` and :func:`check_reference` check an extractor and a reference cheaply
before any image is generated; a bad file is an error that names it and the format expected,
and unreadable images of a reference folder are skipped and counted.

Precision/recall follow torch-fidelity's convention: precision is the fraction of generated
images inside the reference manifold, recall the fraction of reference images inside the
generated one (input1 = generated, input2 = reference).
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset
from torch.utils.weak import WeakTensorKeyDictionary

from flowturbo.data.shards import IMG_EXTENSIONS, image_files

log = logging.getLogger(__name__)

INCEPTION = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)
_HASH_CHUNK = 1 << 24  # bytes hashed per update


class UInt8Images(Dataset):
    """A uint8 image tensor as the Dataset torch-fidelity reads: item i is a (3, H, W) uint8.

    Args:
        images: (N, C, H, W) uint8 with C = 1 (repeated to 3 channels per item) or C = 3. Kept
            on the CPU.
    """

    def __init__(self, images: Tensor):
        if not torch.is_tensor(images) or images.dtype != torch.uint8:
            raise TypeError(
                "images must be a uint8 tensor (quantise with flowturbo.sampling.to_uint8), got "
                f"{getattr(images, 'dtype', type(images).__name__)}"
            )
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
        self.images = images.detach().cpu()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        image = self.images[i]  # (C, H, W)
        return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


#: A tensor's content hash, with its version counter at the time: a sweep measures every schedule
#: against one reference tensor (ADM's 10,000 images: 2 s to hash) and hashes it once.
_TENSOR_HASHES: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def content_hash(images: Tensor | Dataset) -> str:
    """SHA-256 of images' shape, dtype and bytes (hex).

    Args:
        images: A tensor (any shape; moved to the CPU), or a Dataset of tensors, hashed item
            by item (reads every item once), then their number. A Dataset that already knows
            this hash (``content_sha256``, as :class:`ImageFolderImages` computes it while it
            checks its files) is not read again, nor is a tensor already hashed and not
            modified in place since.

    Returns:
        64 hex digits; equal for equal contents, different when any pixel, the shape or the
        dtype differs.
    """
    known = getattr(images, "content_sha256", None)
    if known is not None:
        return known
    h = hashlib.sha256()
    if torch.is_tensor(images) and images.is_inference():  # no version counter: not kept
        _update(h, images)
    elif torch.is_tensor(images):
        version, digest = _TENSOR_HASHES.get(images, (None, None))
        if version == images._version:  # hashed before and not written to since
            return digest
        _update(h, images)
        _TENSOR_HASHES[images] = (images._version, h.hexdigest())
    else:
        for i in range(len(images)):
            _update(h, images[i])
        h.update(f"dataset:{len(images)};".encode())
    return h.hexdigest()


def _update(h: Any, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}:{tuple(t.shape)};".encode())
    data = t.reshape(-1).view(torch.uint8).numpy()  # raw bytes, any dtype
    for start in range(0, data.size, _HASH_CHUNK):
        h.update(memoryview(data[start : start + _HASH_CHUNK]))


def file_hash(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _writable(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` (or, if it does not exist yet, its nearest existing parent) can be
    written to."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def _share_entries(cache_root: str | os.PathLike, cache_name: str) -> None:
    """Makes this process's cache entries readable by everyone: torch-fidelity writes them
    with mode 0600 (a temporary file renamed), which other users of a shared cache cannot read."""
    for entry in Path(cache_root).glob(f"{cache_name}-*.pt"):
        try:
            if entry.stat().st_uid == os.getuid():
                os.chmod(entry, entry.stat().st_mode | 0o444)
        except OSError:  # another process replaced or removed it meanwhile
            pass


def check_images(what: str, shape: tuple[int, ...], extractor: str) -> None:
    """Image (C, H, W) size the extractor takes; a clear error naming ``what`` otherwise."""
    if extractor == "flowturbo-digits":
        from flowturbo.eval.digits import IMAGE_SIZE

        if tuple(shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"the {what} images are {shape[-2]} x {shape[-1]}, but feature extractor "
                f"{extractor!r} takes {IMAGE_SIZE} x {IMAGE_SIZE} images (the demo digits)"
            )


def resolve_weights(extractor: str, weights_path: str | os.PathLike | None) -> Path:
    """The extractor's weights file, checked to exist; never a download.

    ``flowturbo-digits`` defaults to the shipped classifier; every other extractor needs an
    explicit path (torch-fidelity would download when given none).

    Raises:
        FileNotFoundError: The file is missing; the message names it and how to get it.
    """
    if extractor == "flowturbo-digits":
        from flowturbo.eval.digits import weights_file

        return weights_file(weights_path)
    if weights_path is None or not Path(weights_path).is_file():
        if extractor == INCEPTION:
            where = (
                f"the file {weights_path}"
                if weights_path
                else f"a path to {INCEPTION_WEIGHTS_FILE}"
            )
            raise FileNotFoundError(
                f"InceptionV3 weights not found: expected {where} (torch-fidelity's "
                f"{INCEPTION_WEIGHTS_FILE}); nothing is downloaded at run time: fetch "
                f"{INCEPTION_WEIGHTS_URL} on a machine with internet access and pass its path"
            )
        raise FileNotFoundError(
            f"weights for feature extractor {extractor!r} not found: expected the file "
            f"{weights_path}; nothing is downloaded at run time"
        )
    return Path(weights_path)


def _extractor_weights(extractor: str, weights_path: str | os.PathLike | None) -> Path:
    """Registers the project's extractor when it is the one asked for; the weights file."""
    if extractor == "flowturbo-digits":
        from flowturbo.eval import digits

        digits.register()
    return resolve_weights(extractor, weights_path)


def _reason(err: BaseException) -> str:
    """``Type: message`` of a library error, on one line and cut short, for our messages."""
    return f"{type(err).__name__}: {' '.join(str(err).split())[:400] or 'no detail'}"


def check_registered(extractor: str) -> None:
    """Checks that torch-fidelity knows a feature extractor by this name.

    Raises:
        ValueError: It does not; the message lists the names it knows.
    """
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    from flowturbo.eval import digits

    digits.register()  # the project's extractor, listed below when the name is unknown
    if extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(
            f"torch-fidelity has no feature extractor named {extractor!r}: use {INCEPTION!r} "
            "(InceptionV3, for ImageNet) or 'flowturbo-digits' (the demo digits); registered: "
            f"{', '.join(sorted(FEATURE_EXTRACTORS_REGISTRY))}"
        )


def check_extractor(extractor: str, weights_path: str | os.PathLike | None) -> int:
    """Checks that a feature extractor runs here, before any image is measured with it.

    The extractor must be registered (:func:`check_registered`) and its weights file must
    exist (:func:`resolve_weights`) and load: it is built on the CPU and run on
    torch-fidelity's dummy input (one tiny image). InceptionV3's file is first read with
    ``weights_only=True``: torch-fidelity's loader would unpickle anything in it.

    Args:
        extractor: torch-fidelity extractor name.
        weights_path: its weights file (see :func:`fidelity_metrics`).

    Returns:
        D, the number of features at the extractor's FID layer (the length of the mu of
        reference statistics made with it).

    Raises:
        ValueError: the extractor is not registered, or its weights file does not load.
        FileNotFoundError: the weights file is missing.
    """
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor

    check_registered(extractor)
    weights = resolve_weights(extractor, weights_path)
    if extractor == INCEPTION:
        try:
            torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - unpickling raises many kinds; all mean the same
            raise ValueError(
                f"{weights} could not be read as InceptionV3 weights ({_reason(err)}): expected "
                f"torch-fidelity's {INCEPTION_WEIGHTS_FILE} (a state dict), complete (not "
                f"truncated by an interrupted download); fetch it again from "
                f"{INCEPTION_WEIGHTS_URL}"
            ) from err
    cls = FEATURE_EXTRACTORS_REGISTRY[extractor]
    layer = cls.get_default_feature_layer_for_metric("fid")
    dummy = cls.get_dummy_input_for_compile()  # (1, 3, h, w) uint8
    try:
        net = create_feature_extractor(
            extractor,
            [layer],
            cuda=False,
            feature_extractor_weights_path=str(weights),
            verbose=False,
        )
        with torch.no_grad():
            (features,) = net(dummy)  # (1, D)
    except Exception as err:  # noqa: BLE001 - a wrong file fails in many ways; all mean the same
        raise ValueError(
            f"feature extractor {extractor!r} could not be built from the weights file "
            f"{weights} ({_reason(err)}): is it this extractor's weights file, and complete?"
        ) from err
    return int(features.shape[-1])


def fidelity_metrics(
    generated: Tensor,
    reference: Dataset | Tensor,
    *,
    extractor: str,
    weights_path: str | os.PathLike | None,
    reference_cache_name: str | None,
    cache_root: str | os.PathLike,
    isc: bool = True,
    prc: bool = True,
    batch_size: int = 250,
    isc_splits: int = 10,
    prc_neighborhood: int = 3,
    save_cpu_ram: bool = True,
    verbose: bool = False,
) -> dict[str, Any]:
    """FID of ``generated`` against ``reference``, and optionally IS and precision/recall.

    Args:
        generated: (N, C, H, W) uint8, C = 1 or 3 (quantise with
            :func:`flowturbo.sampling.to_uint8`). Never cached.
        reference: (M, C, H, W) uint8 tensor, or a Dataset whose items are (3, H, W) uint8.
        extractor: torch-fidelity extractor name: ``"flowturbo-digits"`` (images 32 x 32) or
            ``"inception-v3-compat"`` (any size; resized to 299 inside).
        weights_path: The extractor's weights file; None means the shipped classifier for
            ``flowturbo-digits`` and is an error for every other extractor.
        reference_cache_name: Prefix of the reference's cache entries, e.g.
            ``"demo-mnist-val"``; the entries are named ``{prefix}-{images hash}-w{weights
            hash}``. None: nothing is cached.
        cache_root: Folder of the cache.
        isc: Compute the Inception Score (on ``generated``; needs N >= ``isc_splits``).
        prc: Compute precision and recall (needs N and M > ``prc_neighborhood``).
        batch_size: Images per feature-extractor batch.
        isc_splits: Splits of the IS.
        prc_neighborhood: k of the k-NN balls of precision/recall.
        save_cpu_ram: torch-fidelity's switch: True reads the inputs in the main process (no
            DataLoader workers) and computes precision/recall in blocks (same result).
        verbose: torch-fidelity's progress output on stderr.

    Returns:
        ``fid``; ``isc_mean``, ``isc_std`` when ``isc``; ``precision``, ``recall`` when
        ``prc``; and for the record ``extractor``, ``extractor_weights`` (sha256 prefix of the
        weights file), ``reference_hash`` (sha256 prefix of the reference images, only when
        cached), ``num_generated``, ``num_reference``.
    """
    weights = _extractor_weights(extractor, weights_path)
    gen = UInt8Images(generated)
    ref = UInt8Images(reference) if torch.is_tensor(reference) else reference
    n, m = len(gen), len(ref)
    if min(n, m) < 2:
        raise ValueError(
            f"FID needs at least 2 images per set (a covariance), got {n} generated and {m} "
            "reference images"
        )
    check_images("generated", tuple(gen.images.shape[1:]), extractor)
    check_images("reference", tuple(ref[0].shape), extractor)
    if isc and n < isc_splits:
        raise ValueError(f"the Inception Score needs at least isc_splits={isc_splits} images")
    if prc and min(n, m) <= prc_neighborhood:
        raise ValueError(f"precision/recall need more than {prc_neighborhood} images per set")

    weights_tag = file_hash(weights)[:12]
    cache_name, ref_hash = _cache_name(reference, reference_cache_name, cache_root, weights_tag)

    raw = torch_fidelity.calculate_metrics(
        input1=gen,  # generated: no cache name, ever
        input2=ref,
        input2_cache_name=cache_name,
        cache=cache_name is not None,
        cache_root=str(cache_root),
        cuda=torch.cuda.is_available(),
        batch_size=batch_size,
        fid=True,
        isc=isc,
        prc=prc,
        # named explicitly: with no extractor, torch-fidelity would use vgg16 for prc
        feature_extractor=extractor,
        feature_extractor_weights_path=str(weights),
        isc_splits=isc_splits,
        prc_neighborhood=prc_neighborhood,
        save_cpu_ram=save_cpu_ram,
        verbose=verbose,
    )
    out: dict[str, Any] = {"fid": raw[torch_fidelity.KEY_METRIC_FID]}
    if isc:
        out["isc_mean"] = raw[torch_fidelity.KEY_METRIC_ISC_MEAN]
        out["isc_std"] = raw[torch_fidelity.KEY_METRIC_ISC_STD]
    if prc:
        out["precision"] = raw[torch_fidelity.KEY_METRIC_PRECISION]
        out["recall"] = raw[torch_fidelity.KEY_METRIC_RECALL]
    if cache_name is not None:
        _share_entries(cache_root, cache_name)
    out.update(
        extractor=extractor,
        extractor_weights=weights_tag,
        reference_hash=ref_hash,
        num_generated=n,
        num_reference=m,
    )
    return out


def _cache_name(
    reference: Dataset | Tensor,
    prefix: str | None,
    cache_root: str | os.PathLike | None,
    weights_tag: str,
) -> tuple[str | None, str | None]:
    """The torch-fidelity cache name of a reference's features, ``{prefix}-{images hash}-w{
    weights hash}``, and the images hash; (None, None) without a prefix, (None, hash) when the
    cache root cannot be written (then with a warning)."""
    if prefix is None:
        return None, None
    if os.sep in prefix or prefix.strip() != prefix:
        raise ValueError(f"bad cache name {prefix!r} (no slashes or spaces)")
    ref_hash = content_hash(reference)[:16]
    if cache_root is None or not _writable(cache_root):
        warnings.warn(
            f"FID cache root {cache_root} is not writable: the reference's features are "
            "computed without caching",
            stacklevel=3,
        )
        return None, ref_hash
    return f"{prefix}-{ref_hash}-w{weights_tag}", ref_hash


# ----------------------------------------------------------------------------- references

_REFERENCE_KINDS = (
    "a folder of images, an .npz of images (arr_0, N x H x W x 3 uint8) or of statistics (mu, "
    "sigma), a torch-fidelity .pt statistics file, or demo:train / demo:val"
)


def _read_image(file: Path) -> Tensor:
    """One image file as (3, H, W) uint8 (converted to RGB)."""
    from PIL import Image

    with Image.open(file) as img:
        array = np.asarray(img.convert("RGB"))  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class ImageFolderImages(Dataset):
    """Image files as (3, H, W) uint8 items, read on access and converted to RGB.

    Made by :meth:`from_folder`, which checks every file once. Images are not resized, so
    they all have one size (InceptionV3 resizes to 299 inside; the digits extractor needs
    32 x 32).

    Args:
        files: The image files, each readable, all of one size.
        content_sha256: Their :func:`content_hash`, when already known (None: computed on
            request, reading every file).
        skipped: Files left out because they could not be read, as ``{"source", "error"}``
            dicts.
    """

    def __init__(
        self,
        files: list[Path],
        content_sha256: str | None = None,
        skipped: list[dict[str, str]] | None = None,
    ):
        self.files = list(files)
        self.content_sha256 = content_sha256
        self.skipped = list(skipped or [])

    @classmethod
    def from_folder(cls, root: str | os.PathLike) -> ImageFolderImages:
        """Every readable image file under ``root`` (recursively, sorted by path).

        Reads each file once: a file that cannot be decoded is skipped, counted and listed in
        ``skipped`` (a warning names how many and the first), and the content hash is computed
        on the way, so that the FID cache is keyed without reading the folder again.

        Raises:
            FileNotFoundError: No image file under ``root``, or none that can be read.
            ValueError: An image of another size than the first; the message names both files
                and sizes.
        """
        root = Path(root)
        candidates = image_files(root, f"the reference folder {root}")
        if not candidates:
            raise FileNotFoundError(
                f"no image files ({', '.join(IMG_EXTENSIONS)}) under the reference folder {root}"
            )
        h = hashlib.sha256()
        files: list[Path] = []
        skipped: list[dict[str, str]] = []
        first: Tensor | None = None
        for file in candidates:
            try:
                image = _read_image(file)  # (3, H, W)
            except Exception as err:  # noqa: BLE001 - decoders raise many kinds; all mean the same
                skipped.append({"source": str(file), "error": _reason(err)})
                continue
            if first is None:
                first = image
            elif image.shape != first.shape:
                raise ValueError(
                    f"the reference images must all have one size (they are not resized): "
                    f"{file} is {image.shape[1]} x {image.shape[2]}, but {files[0]} is "
                    f"{first.shape[1]} x {first.shape[2]} (height x width); resize or remove "
                    "the odd ones"
                )
            files.append(file)
            _update(h, image)
        if skipped:
            log.warning(
                "reference folder %s: skipped %d of %d image files that could not be read; "
                "first: %s (%s)",
                root,
                len(skipped),
                len(candidates),
                skipped[0]["source"],
                skipped[0]["error"],
            )
        if not files:
            raise FileNotFoundError(
                f"none of the {len(candidates)} image files under the reference folder {root} "
                f"could be read; first: {skipped[0]['source']} ({skipped[0]['error']})"
            )
        h.update(f"dataset:{len(files)};".encode())  # as content_hash ends a Dataset's hash
        return cls(files, h.hexdigest(), skipped)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        return _read_image(self.files[i])


@dataclass
class Reference:
    """What generated images are compared with: images, precomputed FID statistics, or both.

    With both (ADM's reference batches), FID is measured against the statistics, which cover
    the whole data set, and the images serve precision/recall.

    Attributes:
        name: cache-name prefix and label (``"demo-train"``, ``"VIRTUAL_imagenet256"``).
        images: (M, C, H, W) uint8 tensor or a Dataset of (3, H, W) uint8; None when there are
            only statistics.
        mu, sigma: FID statistics of the reference features ((D,) float32 and (D, D) float64);
            None when there are only images.
        source: where it came from, for the record.
        skipped: image files of a reference folder left out because they could not be read.
    """

    name: str
    source: str
    images: Tensor | Dataset | None = None
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    skipped: int = 0

    @property
    def is_statistics(self) -> bool:
        """Whether FID is measured against precomputed statistics (``mu``, ``sigma``)."""
        return self.mu is not None

    def __len__(self) -> int:
        return 0 if self.images is None else len(self.images)


def load_reference(spec: str, cache_dir: str | os.PathLike | None = None) -> Reference:
    """Reads the reference set of a FID measurement; nothing is downloaded.

    Args:
        spec: one of
            - ``"demo:train"`` / ``"demo:val"``: the demo digits split, (M, 1, 32, 32) uint8;
            - a folder: every readable image file under it
              (:meth:`ImageFolderImages.from_folder`; unreadable ones are skipped and counted
              in ``Reference.skipped``);
            - an ``.npz`` with ``arr_0`` (M, H, W, 3) or (M, H, W) uint8 images, ``mu`` and
              ``sigma`` (statistics), or both (ADM's ``VIRTUAL_imagenet256_labeled.npz``: FID
              against the statistics, precision/recall against the images, as ADM's
              evaluator does);
            - a ``.pt`` torch-fidelity statistics file (a dict with ``mu`` and ``sigma``), read
              with ``weights_only=True`` (arrays and numbers only, no code).
        cache_dir: cache root of the demo shards (default: the project cache).

    Returns:
        A :class:`Reference`.

    Raises:
        FileNotFoundError: the file or folder does not exist, or the folder holds no readable
            image.
        ValueError: an unknown kind of reference, a file that cannot be read as its kind, or
            contents of the wrong shape or type; the message names the file and the format
            expected.
    """
    if spec.startswith("demo:"):
        from flowturbo.eval.digits import load_demo_split

        split = spec.split(":", 1)[1]
        images, _ = load_demo_split(split, cache_dir)
        return Reference(f"demo-{split}", spec, images=images[:, None])  # (M, 1, 32, 32)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"FID reference not found: {spec}. Give {_REFERENCE_KINDS}")
    name = path.stem.replace(" ", "_")
    if path.is_dir():
        images = ImageFolderImages.from_folder(path)
        return Reference(name, str(path), images=images, skipped=len(images.skipped))
    if path.suffix == ".npz":
        data = _read_npz(path)
        images, mu, sigma = None, None, None
        if "mu" in data:
            mu, sigma = _checked_statistics(data["mu"], data["sigma"], f"the statistics in {path}")
        if "arr_0" in data:
            arr = data["arr_0"]
            if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
                raise ValueError(
                    f"{path}: arr_0 must be (N, H, W[, C]) uint8, got {arr.dtype} {arr.shape}"
                )
            if arr.ndim == 4 and arr.shape[-1] not in (1, 3):
                raise ValueError(
                    f"{path}: arr_0 must hold (N, H, W, C) images with C = 1 or 3 channels "
                    f"last (as ADM's reference batches), got shape {arr.shape}"
                )
            images = torch.from_numpy(arr if arr.ndim == 4 else arr[..., None])
            images = images.permute(0, 3, 1, 2).contiguous()
        return Reference(name, str(path), images=images, mu=mu, sigma=sigma)
    if path.suffix == ".pt":
        try:
            with torch.serialization.safe_globals(_numpy_globals()):
                stats = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - unpickling raises many kinds; all mean the same
            raise ValueError(
                f"{path} could not be read as a torch-fidelity statistics file ({_reason(err)}): "
                "expected a dict of mu and sigma arrays, as torch.save writes it (arrays and "
                "numbers only, read with weights_only=True), complete (not truncated by an "
                "interrupted copy)"
            ) from err
        if not (isinstance(stats, dict) and "mu" in stats and "sigma" in stats):
            raise ValueError(f"{path} is not a torch-fidelity statistics file (mu, sigma)")
        mu, sigma = _checked_statistics(stats["mu"], stats["sigma"], f"the statistics in {path}")
        return Reference(name, str(path), mu=mu, sigma=sigma)
    raise ValueError(f"unknown kind of FID reference {spec!r}: give {_REFERENCE_KINDS}")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz reference that are used: ``arr_0``, ``mu`` and ``sigma`` (both or
    neither), whichever are there.

    Raises:
        ValueError: the file is not a readable .npz archive, or holds neither; the message
            names the file and the format expected.
    """
    expected = (
        "expected a NumPy .npz archive (np.savez) with arr_0 (N x H x W x 3 uint8 images) or "
        "mu and sigma (statistics)"
    )
    if not zipfile.is_zipfile(path):  # np.load would try to unpickle it, and say so
        raise ValueError(
            f"{path} is not an .npz archive (not a complete zip file: another kind of file, or "
            f"truncated by an interrupted copy): {expected}"
        )
    try:
        with np.load(path) as data:  # allow_pickle=False: arrays only, no code
            names = list(data.files)
            keys = ["arr_0"] if "arr_0" in names else []
            if "mu" in names and "sigma" in names:
                keys += ["mu", "sigma"]
            arrays = {key: data[key] for key in keys}
    except Exception as err:  # noqa: BLE001 - numpy and zipfile raise many kinds
        raise ValueError(
            f"{path} could not be read as an .npz file ({_reason(err)}): {expected}, complete "
            "(not damaged by an interrupted copy)"
        ) from err
    if not arrays:
        raise ValueError(
            f"{path} has neither arr_0 (images) nor mu and sigma (statistics); its arrays: "
            f"{', '.join(names) or 'none'}"
        )
    return arrays


def _numpy_globals() -> list[Any]:
    """What ``torch.load(weights_only=True)`` needs to rebuild NumPy float arrays (torch-fidelity
    stores its statistics as such); none of it runs code."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import _reconstruct

    dtypes = [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64)]
    return [_reconstruct, np.ndarray, np.dtype, *dtypes]


def _checked_statistics(mu: Any, sigma: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics as torch-fidelity computes them: mu (D,) float32, sigma (D, D) float64.

    Raises:
        ValueError: not numeric, of the wrong shapes, or not finite; the message names
            ``what``.
    """
    try:
        mu = np.asarray(mu, dtype=np.float32)  # the dtypes of torch-fidelity's own statistics
        sigma = np.asarray(sigma, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: mu and sigma must be numeric arrays ({_reason(err)})") from err
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{what}: statistics must be mu (D,) and sigma (D, D), got {mu.shape}, {sigma.shape}"
        )
    bad = int((~np.isfinite(mu)).sum()), int((~np.isfinite(sigma)).sum())
    if any(bad):
        raise ValueError(
            f"{what} are not finite: {bad[0]} NaN/inf entries in mu, {bad[1]} in sigma "
            "(recompute them)"
        )
    return mu, sigma


def check_reference(reference: Reference, extractor: str, feature_dim: int) -> None:
    """Checks that a reference fits the extractor, before anything is measured against it.

    Args:
        reference: from :func:`load_reference`.
        extractor: torch-fidelity extractor name.
        feature_dim: D of the extractor's FID layer (:func:`check_extractor`).

    Raises:
        ValueError: statistics of another feature width than ``feature_dim``, fewer than 2
            images, or images of a size the extractor does not take.
    """
    if reference.is_statistics and reference.mu.shape[0] != feature_dim:
        raise ValueError(
            f"the reference statistics have {reference.mu.shape[0]} features, but feature "
            f"extractor {extractor!r} gives {feature_dim} at its FID layer: they were "
            "computed with another extractor; give statistics made with this one, or the "
            "reference images"
        )
    if reference.images is None:
        return
    if not reference.is_statistics and len(reference) < 2:
        raise ValueError(
            f"the reference has {len(reference)} image(s); FID needs at least 2 (a covariance)"
        )
    check_images("reference", tuple(reference.images[0].shape), extractor)


def fid_against_statistics(
    generated: Tensor,
    mu: np.ndarray,
    sigma: np.ndarray,
    *,
    extractor: str,
    weights_path: str | os.PathLike | None,
    isc: bool = True,
    prc_reference: Dataset | Tensor | None = None,
    reference_cache_name: str | None = None,
    cache_root: str | os.PathLike | None = None,
    batch_size: int = 250,
    isc_splits: int = 10,
    prc_neighborhood: int = 3,
    save_cpu_ram: bool = True,
    verbose: bool = False,
) -> dict[str, Any]:
    """FID of ``generated`` against precomputed reference statistics (and optionally the IS,
    and precision/recall against reference images).

    The generated images pass through the extractor once; FID, IS and precision/recall are all
    read from those features, with torch-fidelity's own formulas. Generated images are never
    cached; the features of ``prc_reference`` are, as in :func:`fidelity_metrics`. This is how
    ADM's evaluator uses its reference batches: FID against the statistics of the whole data
    set, precision/recall against the batch's images.

    Args:
        generated: (N, C, H, W) uint8, C = 1 or 3.
        mu: (D,) mean of the reference features at the extractor's FID layer.
        sigma: (D, D) their covariance.
        prc_reference: reference images for precision/recall, (M, C, H, W) uint8 or a Dataset
            of (3, H, W) uint8; None: no precision/recall.
        reference_cache_name, cache_root: the cache of ``prc_reference``'s features, as in
            :func:`fidelity_metrics`.
        extractor, weights_path, isc, batch_size, isc_splits, prc_neighborhood, save_cpu_ram,
            verbose: as in :func:`fidelity_metrics`.

    Returns:
        ``fid`` (and ``isc_mean``, ``isc_std``; ``precision``, ``recall``), ``extractor``,
        ``extractor_weights``, ``reference_hash`` (of the statistics), ``num_generated``,
        ``num_reference`` (the images of ``prc_reference``, else None).
    """
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import (
        create_feature_extractor,
        extract_featuresdict_from_input_id_cached,
        get_featuresdict_from_dataset,
    )

    weights = _extractor_weights(extractor, weights_path)
    gen = UInt8Images(generated)
    mu, sigma = _checked_statistics(mu, sigma, "the reference statistics")
    if len(gen) < 2:
        raise ValueError(f"FID needs at least 2 generated images (a covariance), got {len(gen)}")
    check_images("generated", tuple(gen.images.shape[1:]), extractor)
    if isc and len(gen) < isc_splits:
        raise ValueError(f"the Inception Score needs at least isc_splits={isc_splits} images")
    ref = prc_reference
    if ref is not None:
        ref = UInt8Images(ref) if torch.is_tensor(ref) else ref
        check_images("reference", tuple(ref[0].shape), extractor)
        if min(len(gen), len(ref)) <= prc_neighborhood:
            raise ValueError(f"precision/recall need more than {prc_neighborhood} images per set")

    # one pass of the extractor over the generated images, at every layer a metric reads
    cls = FEATURE_EXTRACTORS_REGISTRY[extractor]
    layer = {"fid": cls.get_default_feature_layer_for_metric("fid")}
    if isc:
        layer["isc"] = cls.get_default_feature_layer_for_metric("isc")
    if ref is not None:
        layer["prc"] = cls.get_default_feature_layer_for_metric("prc")
    cuda = torch.cuda.is_available()
    net = create_feature_extractor(
        extractor,
        sorted(set(layer.values())),
        cuda=cuda,
        feature_extractor_weights_path=str(weights),
        verbose=verbose,
    )
    features = get_featuresdict_from_dataset(gen, net, batch_size, cuda, save_cpu_ram, verbose)
    stats = fid_featuresdict_to_statistics(features, layer["fid"])
    if stats["mu"].shape != mu.shape:
        raise ValueError(
            f"the reference statistics have {mu.shape[0]} features, the extractor {extractor!r} "
            f"gives {stats['mu'].shape[0]} at its FID layer: they were computed with another "
            "extractor"
        )
    raw = fid_statistics_to_metric(stats, {"mu": mu, "sigma": sigma}, verbose)
    out: dict[str, Any] = {"fid": raw[torch_fidelity.KEY_METRIC_FID]}
    if isc:
        raw = isc_featuresdict_to_metric(
            features, layer["isc"], isc_splits=isc_splits, verbose=verbose
        )
        out["isc_mean"] = raw[torch_fidelity.KEY_METRIC_ISC_MEAN]
        out["isc_std"] = raw[torch_fidelity.KEY_METRIC_ISC_STD]
    weights_tag = file_hash(weights)[:12]
    if ref is not None:
        cache_name, _ = _cache_name(prc_reference, reference_cache_name, cache_root, weights_tag)
        ref_features = extract_featuresdict_from_input_id_cached(
            2,
            net,
            input2=ref,
            input2_cache_name=cache_name,
            cache=cache_name is not None,
            cache_root=None if cache_root is None else str(cache_root),
            batch_size=batch_size,
            cuda=cuda,
            save_cpu_ram=save_cpu_ram,
            verbose=verbose,
        )
        raw = prc_featuresdict_to_metric(
            features,  # input1 = generated, input2 = reference, as torch-fidelity has them
            ref_features,
            layer["prc"],
            prc_neighborhood=prc_neighborhood,
            save_cpu_ram=save_cpu_ram,
            verbose=verbose,
        )
        out["precision"] = raw[torch_fidelity.KEY_METRIC_PRECISION]
        out["recall"] = raw[torch_fidelity.KEY_METRIC_RECALL]
        if cache_name is not None:
            _share_entries(cache_root, cache_name)
    out.update(
        extractor=extractor,
        extractor_weights=weights_tag,
        reference_hash=hashlib.sha256(mu.tobytes() + sigma.tobytes()).hexdigest()[:16],
        num_generated=len(gen),
        num_reference=None if ref is None else len(ref),
    )
    return out
