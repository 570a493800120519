"""A LightningDataModule over webdataset shards: endless training streams, exact validation.

**Training** (per rank, per DataLoader worker): shards are drawn with replacement from the whole
list by an RNG seeded with (seed, rank, worker id, epoch), samples pass a shuffle buffer, are
decoded and batched with ``partial=False``; the loader is ``wds.WebLoader(batch_size=None)``
with ``.with_epoch(steps_per_epoch)``, so every rank yields exactly ``steps_per_epoch`` batches
per epoch (unequal counts would hang DDP). The epoch in the seed starts at the trainer's
``current_epoch`` (a resumed run does not replay epoch 0) and advances inside each worker,
which is why workers are persistent. Ranks need no shard split: their RNGs differ. A
checkpoint records how many batches the loader had delivered (Lightning saves and restores
:meth:`ShardLoader.state_dict`); a run resumed mid-epoch adds that count to the seed, so it
draws new batches instead of replaying the epoch's first ones (it is not the stream an
uninterrupted run would have drawn).

**Validation**: one exact pass, no resampling, no shuffling. When the shard count is a multiple
of ``world_size``, rank r reads shards r, r + world_size, ...; otherwise every rank reads every
shard and keeps the samples whose (shard index + position in shard) % world_size == rank.
Either way the ranks' samples are disjoint and together are the whole set (or, with
``val_samples``, the subset: the first ``val_samples // S`` samples of each of the S shards, one
more in the first ``val_samples % S``, the same subset for any number of ranks, workers and
batch size). Within a rank the
DataLoader workers split that rank's shards (exact; a worker may get none). Per-rank batch
counts may differ by one or two (a rank may get none): do not log per-step values with
``sync_dist=True`` in validation. Validation batches are ``(x, y, ids)``: ``ids`` (B,) int64
names each sample by its place in the data set, ``shard index * 2**32 + position in the shard``,
whatever the ranks, workers and batch size, so that a module can draw each sample's noise from
its id and get the same validation loss however the pass is split.

**Skipped samples**: corrupt tar members, unreadable images, samples missing a field and labels
outside ``num_classes`` are skipped (a shard whose tar ends early counts once, recorded as
"shard ended early"), never crash the run (unless ``max_consecutive_skips`` failures come in a
row, which means the data is unusable) and are counted. Counting happens where the failure
happens, in the DataLoader worker, and the count travels *with the data*: each batch a worker
emits carries the number of samples skipped since its previous batch (plus a few messages); a
worker whose stream ends with pending skips emits a count-only batch. The main process of each
rank adds these to :attr:`ShardDataModule.train_skips` / :attr:`ShardDataModule.val_skips` and
drops the count-only batches before Lightning sees them. Counts are therefore exact for the
batches the model consumed (batches prefetched past the end of an epoch are discarded with
their counts), identical with 0 or N workers, and per rank: reduce with ``sum`` across ranks
when logging :meth:`ShardDataModule.skipped_summary`.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Literal, NamedTuple

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from flowturbo.data.demo import demo_shards
from flowturbo.data.shards import (
    MANIFEST_NAME,
    Manifest,
    center_crop_resize,
    image_field,
    resolve_shards,
)

log = logging.getLogger(__name__)

Kind = Literal["image", "latent", "trajectory"]
TRAJECTORY_FIELD = "traj.npy"
"""Trajectory-cache field: (2, K, C, H, W) float16, states then base velocities on a grid."""


# ----------------------------------------------------------------------------- skip accounting


@dataclass
class SkipCounter:
    """Samples skipped in this process (one rank), with the first few messages."""

    count: int = 0
    examples: list[str] = field(default_factory=list)
    max_examples: int = 20

    def add(self, n: int, examples: Sequence[str] = ()) -> None:
        """Add ``n`` skips and keep up to ``max_examples`` messages."""
        self.count += n
        room = self.max_examples - len(self.examples)
        if room > 0:
            self.examples.extend(examples[:room])


class SampleError(RuntimeError):
    """A sample that could not be decoded (names its key and shard)."""


class _SkipHandler:
    """webdataset exception handler living in one worker's stream: count, continue.

    Raises instead once ``limit`` failures (or ``shard_limit`` shards without one usable
    sample) come in a row, since then the data, not one sample, is broken. A tar read error
    ends the rest of its shard: it is counted once per shard read (webdataset may report it
    twice), recorded as "shard ended early" and logged once per shard; how many samples it
    lost is unknown without a manifest.
    """

    def __init__(self, limit: int, shard_limit: int, max_examples: int = 5, log_first: int = 3):
        self.limit, self.shard_limit = limit, shard_limit
        self.max_examples, self.log_first = max_examples, log_first
        self.pending, self.total, self.in_a_row, self.shards_in_a_row = 0, 0, 0, 0
        self.examples: list[str] = []
        self.ended_early: set[str] = set()  # messages logged
        self.shard_ended = False  # the shard being read has ended early
        self.shard_counted = True  # this rank counts the shard's own errors (see new_shard)

    def __call__(self, exn: BaseException) -> bool:
        if isinstance(exn, tarfile.ReadError):
            if self.shard_ended:  # the same end, raised again by the next stage
                return True
            self.shard_ended = True
            if not self.shard_counted:  # another rank reading this shard counts its end
                return True
            message = _ended_early(exn)
            if message not in self.ended_early:  # once per shard, not per training draw
                self.ended_early.add(message)
                log.warning("%s", message)
        else:
            message = f"{type(exn).__name__}: {exn}"[:500]
            if self.total < self.log_first:
                log.warning("skipping a sample: %s", message)
        self.pending += 1
        self.total += 1
        self.in_a_row += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(message)
        if self.in_a_row > self.limit:
            raise RuntimeError(
                f"{self.in_a_row} samples in a row could not be read; last error: {message}"
            ) from exn
        return True

    def ok(self) -> None:
        """A sample was decoded."""
        self.in_a_row = 0

    def watch(self, samples: Iterator[dict]) -> Iterator[dict]:
        """Pass samples through, noting that the shards being read are not empty."""
        for sample in samples:
            self.shards_in_a_row = 0
            yield sample

    def new_shard(self, counted: bool = True) -> None:
        """The next shard is being opened; ``counted``: False where every rank reads it and
        another rank counts its tar errors (a sum over ranks would count them once each)."""
        self.shard_ended = False
        self.shard_counted = counted

    def opened_shard(self) -> None:
        """A training shard was drawn; raise after ``shard_limit`` without a sample."""
        self.new_shard()
        self.shards_in_a_row += 1
        if self.shards_in_a_row > self.shard_limit:
            raise RuntimeError(
                f"read {self.shards_in_a_row} shards without one usable sample: are the shards "
                "empty or of another kind (image vs latent)?"
            )

    def take(self) -> tuple[int, list[str]]:
        """Pending count and messages since the last call."""
        out = self.pending, self.examples
        self.pending, self.examples = 0, []
        return out


def _ended_early(exn: tarfile.ReadError) -> str:
    """The skip record of a tar read error. webdataset appends the URL to ``args``, or
    `` @ <stream name='PATH'>`` to the first argument."""
    what, where = str(exn.args[0]) if exn.args else "read error", "a shard"
    if len(exn.args) > 1 and isinstance(exn.args[-1], str):
        where = exn.args[-1]
    elif match := re.search(r" @ <.*name='(.*)'>$", what):
        what, where = what[: match.start()], match[1]
    return (
        f"shard ended early: {where}: ReadError: {what}"[:400]
        + "; the samples after the damage are lost (counted as one skip): the file is truncated "
        "or damaged, write it again"
    )


class _WorkerBatch(NamedTuple):
    """What a worker emits: a batch (or None for a count-only message) and its skips."""

    x: Tensor | None
    y: Tensor | None
    ids: Tensor | None  # validation: (B,) sample ids; training: None
    skipped: int
    examples: list[str]


SAMPLE_ID = "__sample_id__"
"""Key of a validation sample's id in its webdataset dict: shard index * 2**32 + position."""


# ----------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class SampleDecoder:
    """Turns one webdataset sample dict into (array, label).

    image: PNG/JPEG bytes -> (H, W) uint8 (``channels`` 1) or (H, W, 3) uint8 (``channels``
    3), center-cropped and resized to ``resolution`` when set, flipped left-right with
    probability 1/2 when ``flip``. latent: ``latent.npy`` (or, when ``flip`` and present,
    ``latent_flip.npy`` with probability 1/2) -> (C, h, w) float16 as stored. trajectory:
    ``traj.npy`` -> (2, K, C, H, W) float16 as stored (states and velocities of one cached
    trajectory, :mod:`flowturbo.lit.trajectories`).

    With ``num_classes`` a label outside [0, num_classes) raises ValueError (so the stream
    skips and counts the sample); trajectories may also hold the null class ``num_classes``.
    """

    kind: Kind = "image"
    channels: int = 3
    resolution: int | None = None
    flip: bool = False
    image_key: str | None = None
    num_classes: int | None = None

    def __call__(self, sample: dict[str, Any], rng: random.Random) -> tuple[np.ndarray, int]:
        label = int(sample["cls"])
        if self.num_classes is not None:
            null = self.kind == "trajectory"  # the cache's label dropout: null class num_classes
            if not 0 <= label < self.num_classes + null:
                allowed = f"[0, {self.num_classes}{']' if null else ')'}"
                raise ValueError(
                    f"label {label} is outside {allowed} ({self.num_classes} classes"
                    f"{' plus the null class' if null else ''}): a corrupt sample, or shards "
                    "of another data set than num_classes says"
                )
        if self.kind == "trajectory":
            name = self.image_key or TRAJECTORY_FIELD
            return np.load(io.BytesIO(sample[name]), allow_pickle=False), label
        if self.kind == "latent":
            name = self.image_key or "latent.npy"
            if self.flip and "latent_flip.npy" in sample and rng.random() < 0.5:
                name = "latent_flip.npy"
            return np.load(io.BytesIO(sample[name]), allow_pickle=False), label
        data = sample[self.image_key] if self.image_key else image_field(sample)
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("L" if self.channels == 1 else "RGB")
            if self.resolution is not None:
                img = center_crop_resize(img, self.resolution)
            array = np.asarray(img)
        if self.flip and rng.random() < 0.5:
            array = array[:, ::-1]
        return array, label


def collate(
    arrays: Sequence[np.ndarray], labels: Sequence[int], kind: Kind
) -> tuple[Tensor, Tensor]:
    """Stack decoded samples into a batch.

    Returns:
        x (B, C, H, W) float32 (images in [-1, 1]; latents as stored; trajectories
        (B, 2, K, C, H, W)), y (B,) int64.
    """
    try:
        stacked = np.stack(arrays)
    except ValueError as exn:
        raise ValueError(
            f"samples of different shapes cannot be batched ({exn}); for images of varying size "
            "set `resolution`"
        ) from exn
    # numpy, single-threaded: tiny torch ops in a process with several intra-op threads can
    # cost milliseconds each in thread wake-ups
    if kind != "image":
        x = stacked.astype(np.float32)
    else:
        chw = stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)
        x = np.empty(chw.shape, np.float32)
        np.divide(chw, np.float32(127.5), out=x)
        x -= 1.0
    return torch.from_numpy(x), torch.tensor(labels, dtype=torch.int64)


# ----------------------------------------------------------------------------- the stream


def mix_seed(*parts: int) -> int:
    """One 32-bit seed from several integers (a base seed, a rank, a worker, an epoch...)."""
    return int(np.random.SeedSequence([p % 2**32 for p in parts]).generate_state(1)[0])


class ShardStream(IterableDataset):
    """Batches of one rank from a shard list (iterated inside each DataLoader worker).

    Yields ``_WorkerBatch(x, y, ids, skipped, examples)`` items: x (B, C, H, W) float32, y (B,)
    int64, ids (B,) int64 (the exact pass; None in training), and the samples skipped since the
    previous item (x, y and ids are None in a count-only item). :class:`ShardLoader` turns them
    into ``(x, y)`` (training) or ``(x, y, ids)`` (the exact pass).

    Args:
        urls: Shard paths or URLs.
        decoder: Sample -> (array, label).
        batch_size: Samples per batch.
        train: True: endless resampled, shuffled stream, full batches only. False: one exact
            pass over this rank's share, the last batch of each worker may be partial.
        rank: Global rank of this process.
        world_size: Number of ranks.
        seed: Base seed (training).
        epoch: Epoch of the first pass; later passes count up from it.
        resumed_at: Batches delivered before a resume (0: a fresh run), part of the seed.
        samples: The exact pass: read only this many samples of the set, the first
            ``samples // S`` of each of the S shards and one more of the first ``samples % S``
            (None: all).
        shuffle_buffer: Training shuffle buffer size; <= 1 disables it.
        max_consecutive_skips: Raise after this many unreadable samples in a row.
    """

    def __init__(
        self,
        urls: Sequence[str],
        decoder: SampleDecoder,
        *,
        batch_size: int,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        resumed_at: int = 0,
        samples: int | None = None,
        shuffle_buffer: int = 1000,
        max_consecutive_skips: int = 1000,
    ):
        super().__init__()
        if not urls:
            raise ValueError("ShardStream needs at least one shard")
        self.urls, self.decoder, self.train = list(urls), decoder, train
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.max_consecutive_skips = shuffle_buffer, max_consecutive_skips
        self.epoch = epoch - 1  # advanced at the start of every pass
        self.resumed_at = resumed_at
        self.samples = samples

    def __iter__(self) -> Iterator[_WorkerBatch]:
        self.epoch += 1
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        resume = (self.resumed_at,) if self.resumed_at else ()  # a fresh run's seeds as before
        rng = random.Random(mix_seed(self.seed, self.rank, worker, self.epoch, *resume))
        handler = _SkipHandler(
            self.max_consecutive_skips, shard_limit=max(100, 10 * len(self.urls))
        )
        if self.train:
            samples = wds.tarfile_samples(self._resampled(rng, handler), handler=handler)
            samples = handler.watch(samples)
            if self.shuffle_buffer > 1:
                samples = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(samples)
        else:
            samples = self._exact(worker, workers, handler)
        yield from self._batches(samples, rng, handler)

    def _resampled(self, rng: random.Random, handler: _SkipHandler) -> Iterator[dict[str, str]]:
        while True:
            handler.opened_shard()
            yield {"url": self.urls[rng.randrange(len(self.urls))]}

    def _exact(self, worker: int, workers: int, handler: _SkipHandler) -> Iterator[dict]:
        """This rank's and worker's share of one pass (see the module docstring)."""
        shards = list(enumerate(self.urls))
        by_shard = len(shards) % self.world_size == 0
        if by_shard:
            shards = shards[self.rank :: self.world_size]
        for index, url in shards[worker::workers]:
            handler.new_shard(counted=by_shard or index % self.world_size == self.rank)
            samples = wds.tarfile_samples([{"url": url}], handler=handler)
            if self.samples is not None:  # this shard's share of the subset
                per_shard, more = divmod(self.samples, len(self.urls))
                samples = islice(samples, per_shard + (index < more))
            for position, sample in enumerate(samples):
                if by_shard or (index + position) % self.world_size == self.rank:
                    yield {**sample, SAMPLE_ID: index * 2**32 + position}

    def _batches(
        self, samples: Iterator[dict], rng: random.Random, handler: _SkipHandler
    ) -> Iterator[_WorkerBatch]:
        arrays: list[np.ndarray] = []
        labels: list[int] = []
        ids: list[int] = []
        for sample in samples:
            try:
                array, label = self.decoder(sample, rng)
            except Exception as exn:
                where = f"{sample.get('__key__')} @ {sample.get('__url__')}"
                handler(SampleError(f"{where}: {type(exn).__name__}: {exn}"))
                continue
            handler.ok()
            arrays.append(array)
            labels.append(label)
            if not self.train:
                ids.append(sample[SAMPLE_ID])
            if len(arrays) == self.batch_size:
                yield self._batch(arrays, labels, ids, handler)
                arrays, labels, ids = [], [], []
        if arrays and not self.train:
            yield self._batch(arrays, labels, ids, handler)
        elif handler.pending:
            yield _WorkerBatch(None, None, None, *handler.take())

    def _batch(
        self, arrays: list[np.ndarray], labels: list[int], ids: list[int], handler: _SkipHandler
    ) -> _WorkerBatch:
        x, y = collate(arrays, labels, self.decoder.kind)
        sample_ids = None if self.train else torch.tensor(ids, dtype=torch.int64)
        return _WorkerBatch(x, y, sample_ids, *handler.take())


class _Receiver:
    """Main-process stage: add a worker batch's skips to the counter, drop count-only items.

    A separate object (not a bound method of :class:`ShardLoader`) so that loaders are not in
    reference cycles: a DataLoader freed by the cyclic garbage collector waits 5 s per worker
    to shut down.
    """

    def __init__(self, counter: SkipCounter):
        self.counter = counter

    def __call__(self, batch: _WorkerBatch) -> tuple[Tensor, ...] | None:
        if batch.skipped:
            self.counter.add(batch.skipped, batch.examples)
        if batch.x is None:
            return None
        return (batch.x, batch.y) if batch.ids is None else (batch.x, batch.y, batch.ids)


class ShardLoader:
    """The iterable handed to Lightning: ``(x, y)`` batches (``(x, y, ids)`` in an exact
    pass), skip counts collected on the way.

    Wraps ``wds.WebLoader(stream, batch_size=None, ...)``. With ``epoch_batches`` every
    iteration yields exactly that many batches (``.with_epoch`` on the loader, the stream being
    endless) and ``len()`` is defined. Workers are persistent (their stream's epoch counter
    survives between epochs); ``mp_context`` is their start method (None: the process default).
    :meth:`close` stops them. :meth:`state_dict` / :meth:`load_state_dict` are what Lightning
    saves in a checkpoint and restores on resume: the batches delivered so far, so that a
    resumed stream differs.
    """

    def __init__(
        self,
        stream: ShardStream,
        counter: SkipCounter,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        epoch_batches: int | None = None,
        mp_context: str | None = None,
    ):
        self.stream, self.counter = stream, counter
        self.epoch_batches = epoch_batches
        self.delivered = stream.resumed_at
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            kwargs = {"persistent_workers": True, "multiprocessing_context": mp_context}
        web = wds.WebLoader(
            stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kwargs
        )
        self.dataloader: torch.utils.data.DataLoader = web.pipeline[0]
        loader = web.map(_Receiver(counter))  # runs in this process
        self.loader = loader.with_epoch(epoch_batches) if epoch_batches is not None else loader

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        for batch in self.loader:
            self.delivered += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """What a checkpoint keeps: the number of batches delivered (prefetched ones included)."""
        return {"delivered": self.delivered}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: seed the stream with the checkpoint's count (before its workers start)."""
        self.delivered = self.stream.resumed_at = int(state["delivered"])

    def __len__(self) -> int:
        if self.epoch_batches is not None:
            return self.epoch_batches
        raise TypeError("a single pass over shards has no known length")

    def close(self) -> None:
        """Shut down the worker processes now (they restart on the next iteration)."""
        iterator = getattr(self.dataloader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.dataloader._iterator = None


# ----------------------------------------------------------------------------- the DataModule

#: Where a missing trajectory cache comes from.
TRAJECTORY_HINT = (
    "to write the trajectory cache, run `python cache_trajectories.py` first (cache=... "
    "out_dir=... for another base model) and give its out_dir/train and out_dir/val"
)


class ShardDataModule(L.LightningDataModule):
    """Training batches ``(x, y)`` and validation batches ``(x, y, ids)`` from webdataset shards.

    ``x`` is float32 (B, C, H, W): images in [-1, 1] (grayscale demo digits: C = 1, 32 x 32),
    or VAE latents as stored (e.g. (B, 4, 32, 32) for 256 px); ``y`` is int64 (B,) class
    indices; ``ids`` int64 (B,) name the validation samples (their place in the set). See the
    module docstring for sharding, seeding, exactness and skip counting.

    Args:
        train_shards: Training shards: a brace pattern
            (``/data/train/shard-{000000..000146}.tar``), a folder holding ``manifest.json``
            (or ``*.tar``), a glob, or a list of paths. Ignored with ``source="demo"``.
        val_shards: Validation shards, same forms; None = no validation.
        source: "shards" (use the two arguments above) or "demo": the MNIST demo set from
            :func:`~flowturbo.data.demo.demo_shards` (written to the cache on first use),
            grayscale 32 x 32, 10 classes. A Hydra config selects it with
            ``data.source: demo``.
        kind: "image" (``jpg``/``png`` fields), "latent" (``latent.npy`` and optionally
            ``latent_flip.npy``) or "trajectory" (``traj.npy``, a trajectory cache).
        batch_size: Batch size per rank.
        val_batch_size: Validation batch size per rank; default ``batch_size``.
        num_workers: DataLoader worker processes per rank (persistent when > 0).
        shuffle_buffer: Samples in the training shuffle buffer (filled before the first batch
            of every epoch); <= 1 disables shuffling.
        seed: Base seed; streams are seeded with (seed, rank, worker id, epoch).
        steps_per_epoch: Training batches per rank per epoch.
        val_samples: Validate on this many samples of the validation set (None: all of it):
            the first ``val_samples // S`` of each of its S shards, one more of the first
            ``val_samples % S``; the same subset whatever the ranks, workers and batch size.
        resolution: Images: center-crop and resize to this side (ADM style); None keeps the
            stored size (all images must then share it). Ignored for latents.
        channels: Images: 1 (grayscale) or 3 (RGB); None = 1 for the demo, else 3.
        hflip: Random horizontal flip in training (latents: pick ``latent_flip.npy`` with
            probability 1/2 when present); None = off for the demo (digits), else on.
        image_key: Field to read instead of the default (first of jpg/jpeg/png/webp for
            images, ``latent.npy`` for latents).
        pin_memory: Pin batches in page-locked memory (for GPU training).
        cache_dir: Cache root for the demo set; default ``$FLOWTURBO_CACHE`` or
            ``~/.cache/flowturbo``.
        max_consecutive_skips: Raise after this many unreadable samples in a row.
        num_classes: The model's number of classes: samples whose label is outside
            [0, num_classes) are skipped and counted (trajectories may also hold the null
            class ``num_classes``). A manifest's ``classes`` take precedence (a value smaller
            than their count is an error); None: the manifest's count, or no check without one.
        multiprocessing_context: Start method of the DataLoader workers ("fork", "spawn",
            "forkserver"); None = the process default. Under Lightning's ``ddp_spawn`` the
            default is "spawn", so every worker re-imports the stack (seconds each, once, as
            workers are persistent); "fork" starts them at once.
    """

    def __init__(
        self,
        train_shards: str | Sequence[str] | None = None,
        val_shards: str | Sequence[str] | None = None,
        *,
        source: Literal["shards", "demo"] = "shards",
        kind: Kind = "image",
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        steps_per_epoch: int = 1000,
        val_samples: int | None = None,
        resolution: int | None = None,
        channels: int | None = None,
        hflip: bool | None = None,
        image_key: str | None = None,
        pin_memory: bool = False,
        cache_dir: str | None = None,
        max_consecutive_skips: int = 1000,
        num_classes: int | None = None,
        multiprocessing_context: str | None = None,
    ):
        super().__init__()
        if source not in ("shards", "demo"):
            raise ValueError(f"source must be 'shards' or 'demo', got {source!r}")
        if kind not in ("image", "latent", "trajectory"):
            raise ValueError(f"kind must be 'image', 'latent' or 'trajectory', got {kind!r}")
        if source == "demo" and kind != "image":
            raise ValueError("the demo set holds images: use kind='image' with source='demo'")
        if source == "shards" and train_shards is None and val_shards is None:
            raise ValueError(
                "give train_shards and/or val_shards (a brace pattern or a folder with "
                "manifest.json), or source='demo'"
            )
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if batch_size < 1 or steps_per_epoch < 1:
            raise ValueError("batch_size and steps_per_epoch must be positive")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be positive or None, got {num_classes}")
        if val_samples is not None and val_samples < 1:
            raise ValueError(
                f"val_samples must be positive or None (the whole set), got {val_samples}"
            )
        self.save_hyperparameters(logger=False)
        demo = source == "demo"
        self.train_shards, self.val_shards = train_shards, val_shards
        self.source, self.kind, self.batch_size = source, kind, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        self.steps_per_epoch, self.val_samples = steps_per_epoch, val_samples
        self.resolution, self.image_key, self.pin_memory = resolution, image_key, pin_memory
        self.channels = channels if channels is not None else (1 if demo else 3)
        self.hflip = hflip if hflip is not None else not demo
        self.cache_dir, self.max_consecutive_skips = cache_dir, max_consecutive_skips
        self.multiprocessing_context = multiprocessing_context
        self.configured_classes = num_classes
        self.train_skips, self.val_skips = SkipCounter(), SkipCounter()
        self.train_urls: list[str] | None = None
        self.val_urls: list[str] | None = None
        self.classes: list[str] | None = None
        self._manifest_classes: int | None = None
        self._loaders: list[ShardLoader] = []

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_loaders"] = []  # live worker processes do not travel (e.g. to ddp_spawn ranks)
        return state

    # -- setup

    def prepare_data(self) -> None:
        """Write the demo set once (rank 0 of each node) when ``source="demo"``."""
        if self.source == "demo":
            demo_shards(self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Resolve the shard lists (raises early when a pattern matches nothing)."""
        train, val = self.train_shards, self.val_shards
        if self.source == "demo":
            root = demo_shards(self.cache_dir)
            train, val = str(root / "train"), str(root / "val")
        if train is not None and self.train_urls is None:
            self.train_urls = self._resolve("train_shards", train)
        if val is not None and self.val_urls is None:
            self.val_urls = self._resolve("val_shards", val)
        named: dict[str, list[str]] = {}  # class names of each split's manifest
        for key, spec in (("train_shards", train), ("val_shards", val)):
            if isinstance(spec, str | os.PathLike):
                folder = os.path.expanduser(str(spec))
                if os.path.isfile(os.path.join(folder, MANIFEST_NAME)):
                    manifest = Manifest.load(folder)
                    if manifest.classes:
                        named[key] = list(manifest.classes)
                    self.classes = self.classes or manifest.classes
                    # a trajectory cache records the base's class count instead of names
                    self._manifest_classes = self._manifest_classes or (
                        len(manifest.classes)
                        if manifest.classes
                        else manifest.meta.get("num_classes")
                    )
        if len(named) == 2 and named["train_shards"] != named["val_shards"]:
            train_names, val_names = named["train_shards"], named["val_shards"]
            only = [
                f"only in data.{key}: {', '.join(sorted(set(mine) - set(other))[:5]) or '-'}"
                for key, mine, other in (
                    ("train_shards", train_names, val_names),
                    ("val_shards", val_names, train_names),
                )
            ]
            raise ValueError(
                "data.train_shards and data.val_shards were written from different class "
                "folders, and a label is its class's place in each set's own sorted list, so "
                f"the validation labels would name other classes ({'; '.join(only)}): write "
                "both from folders with the same class subfolders (an empty folder stands for "
                "a class without images)"
            )
        configured, listed = self.configured_classes, self._manifest_classes
        if configured is not None and listed is not None and configured < listed:
            raise ValueError(
                f"num_classes={configured} but the shards' manifest lists {listed} "
                f"classes, whose labels do not fit a {configured}-class model: set num_classes "
                "to the model's number of classes, or use shards of that many classes"
            )

    def _resolve(self, key: str, spec: str | Sequence[str]) -> list[str]:
        """:func:`resolve_shards`, its errors led by the setting ``data.<key>=<spec>``."""
        if self.source == "demo":  # the cache's own folders, not a setting
            return resolve_shards(spec)
        try:
            return resolve_shards(spec)
        except FileNotFoundError as exn:  # from None: the message holds the inner one whole
            hint = f"; {TRAJECTORY_HINT}" if self.kind == "trajectory" else ""
            raise FileNotFoundError(f"data.{key}={spec}: {exn}{hint}") from None
        except (RuntimeError, ValueError) as exn:
            kind = RuntimeError if isinstance(exn, RuntimeError) else ValueError
            raise kind(f"data.{key}={spec}: {exn}") from None

    @property
    def num_classes(self) -> int | None:
        """Labels are checked against [0, num_classes): the manifest's class count (after
        :meth:`setup`; a trajectory cache's ``meta.num_classes``), else the ``num_classes``
        argument, else None (no check)."""
        return self._manifest_classes or self.configured_classes

    def _rank_world(self) -> tuple[int, int]:
        """(global rank, world size): the trainer's, else torch.distributed's, else (0, 1)."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _decoder(self, train: bool) -> SampleDecoder:
        return SampleDecoder(
            kind=self.kind,
            channels=self.channels,
            resolution=self.resolution,
            flip=self.hflip and train,
            image_key=self.image_key,
            num_classes=self.num_classes,
        )

    # -- loaders

    def train_dataloader(self) -> ShardLoader:
        """Endless resampled stream, exactly ``steps_per_epoch`` batches per epoch per rank."""
        if self.train_urls is None:
            self.setup("fit")
        if self.train_urls is None:
            raise ValueError("no train_shards configured")
        rank, world = self._rank_world()
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        stream = ShardStream(
            self.train_urls,
            self._decoder(train=True),
            batch_size=self.batch_size,
            train=True,
            rank=rank,
            world_size=world,
            seed=self.seed,
            epoch=epoch,
            shuffle_buffer=self.shuffle_buffer,
            max_consecutive_skips=self.max_consecutive_skips,
        )
        loader = ShardLoader(
            stream,
            self.train_skips,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            epoch_batches=self.steps_per_epoch,
            mp_context=self.multiprocessing_context,
        )
        self._loaders.append(loader)
        return loader

    def val_dataloader(self) -> ShardLoader | list:
        """One exact pass over this rank's share of the validation set ([] without one).

        Batches are ``(x, y, ids)``, ids the samples' places in the set (module docstring).
        """
        if self.val_urls is None:
            self.setup("validate")
        if self.val_urls is None:
            return []
        rank, world = self._rank_world()
        stream = ShardStream(
            self.val_urls,
            self._decoder(train=False),
            batch_size=self.val_batch_size,
            train=False,
            rank=rank,
            world_size=world,
            samples=self.val_samples,
            max_consecutive_skips=self.max_consecutive_skips,
        )
        loader = ShardLoader(
            stream,
            self.val_skips,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            mp_context=self.multiprocessing_context,
        )
        self._loaders.append(loader)
        return loader

    def teardown(self, stage: str | None = None) -> None:
        """Stop the worker processes of the loaders made so far."""
        for loader in self._loaders:
            loader.close()
        self._loaders.clear()

    # -- skip accounting

    @property
    def skipped(self) -> int:
        """Samples skipped on this rank so far (training + validation passes)."""
        return self.train_skips.count + self.val_skips.count

    def skipped_summary(self) -> dict[str, int]:
        """Skip counts of this rank, ready for ``log_dict`` (reduce with sum across ranks).

        Returns:
            ``{"data/skipped": train + val, "data/skipped_train": ..., "data/skipped_val":
            ...}``; validation counts accumulate over passes (a corrupt validation sample is
            counted once per pass). Messages are in ``train_skips.examples`` and
            ``val_skips.examples``.
        """
        return {
            "data/skipped": self.skipped,
            "data/skipped_train": self.train_skips.count,
            "data/skipped_val": self.val_skips.count,
        }


def demo_datamodule(**kwargs: Any) -> ShardDataModule:
    """``ShardDataModule(source="demo", **kwargs)``: the MNIST demo set."""
    return ShardDataModule(source="demo", **kwargs)
