"""Writing webdataset tar shards: image folders and in-memory samples (VAE latents:
:mod:`flowturbo.data.latents`, through the same driver).

Layout of a shard set (one directory)::

    out_dir/shard-000000.tar, shard-000001.tar, ...   # tar members "{key}.{field}"
    out_dir/manifest.json                             # shards (name, count, bytes), total,
                                                      # classes, skipped files, metadata

Fields are the tar-member suffixes webdataset groups by key: ``jpg``/``png`` (encoded image
bytes), ``cls`` (class index as decimal text), ``*.npy`` (``numpy.save`` bytes, e.g.
``latent.npy``). Keys contain no dots (webdataset splits a member name at its first dot).

All writers share one code path (:func:`_write_shard_set`):

- each shard is written to a hidden temporary name and ``os.replace``-d into place when
  complete, so a ``shard-*.tar`` file is never half written;
- ``manifest.json`` is rewritten atomically after every finished shard and is the done marker:
  on a re-run with ``resume=True`` a shard recorded there whose file still has the recorded
  size is skipped; any other shard of the plan (missing, unrecorded, or of the wrong size, e.g.
  left by an interrupted run) is rewritten, and leftover temporary files are removed;
- the manifest stores a fingerprint of what determines the shard bytes, and its parts under
  ``meta["fingerprint_parts"]``: the resolved source, a hash of every input file's path, class,
  size and modification time (one ``stat`` per file, contents unread), and for latents the
  encoder settings, the VAE dtype and a hash of the VAE's weight files; resuming into a
  directory written from different inputs or settings raises, naming the parts that differ,
  instead of mixing two data sets (a copy of the inputs that changes modification times counts
  as different);
- samples that cannot be read are skipped, counted and listed under ``skipped`` in the
  manifest (per shard and in total), never dropped silently.

One writer per output directory at a time; concurrent writers into the same directory are not
supported.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import braceexpand
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SHARD_NAME = "shard-{:06d}.tar"
SHARD_RE = re.compile(r"^shard-\d{6}\.tar$")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""File suffixes scanned in an image folder (case-insensitive), as torchvision's ImageFolder."""
_TAR_MTIME = 946684800  # fixed member timestamp (2000-01-01) so shard bytes are reproducible
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_PARTS = "fingerprint_parts"  # manifest meta key: what the fingerprint hashes, by name


# ----------------------------------------------------------------------------- manifest


class Skip(NamedTuple):
    """A sample that could not be read: where it came from and why."""

    source: str
    error: str


Record = tuple[str, dict[str, bytes]]
"""One encoded sample: (key, {field: bytes})."""


@dataclass
class ShardInfo:
    """One finished shard: file name, samples written, file size, samples skipped."""

    name: str
    count: int
    bytes: int
    skipped: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Manifest:
    """The contents of ``manifest.json``: what a shard set holds.

    Attributes:
        kind: "image", "latent" or "samples".
        shard_size: Samples per shard before skips (the last shard may hold fewer).
        shards: Finished shards in index order.
        classes: Class names, index = position (ImageFolder order), or None.
        complete: True once every shard of the plan is written.
        fingerprint: Hash of the inputs and settings, used to refuse resuming into a
            directory written from something else (its parts, when the writer records them,
            are ``meta["fingerprint_parts"]``); None when unknown.
        meta: Free-form settings (resolution, VAE folder, latent scale, ...).
    """

    kind: str
    shard_size: int
    shards: list[ShardInfo] = field(default_factory=list)
    classes: list[str] | None = None
    complete: bool = False
    fingerprint: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Samples in all shards."""
        return sum(s.count for s in self.shards)

    @property
    def skipped(self) -> list[dict[str, str]]:
        """Every skipped input, as {"source", "error"} dicts, in shard order."""
        return [item for s in self.shards for item in s.skipped]

    @property
    def num_skipped(self) -> int:
        """Number of skipped inputs."""
        return sum(len(s.skipped) for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the derived totals written out for readers."""
        return {
            "format": "flowturbo-shards/1",
            "kind": self.kind,
            "complete": self.complete,
            "total": self.total,
            "num_shards": len(self.shards),
            "shard_size": self.shard_size,
            "classes": self.classes,
            "num_skipped": self.num_skipped,
            "skipped": self.skipped,
            "fingerprint": self.fingerprint,
            "meta": self.meta,
            "shards": [vars(s) for s in self.shards],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        """Inverse of :meth:`to_dict` (derived fields are recomputed, not read)."""
        return cls(
            kind=d["kind"],
            shard_size=int(d["shard_size"]),
            shards=[ShardInfo(**s) for s in d["shards"]],
            classes=d.get("classes"),
            complete=bool(d.get("complete", False)),
            fingerprint=d.get("fingerprint"),
            meta=dict(d.get("meta") or {}),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a temporary file in the same folder, then ``os.replace``."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        """Read a manifest file, or the ``manifest.json`` inside a directory."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exn:
            raise ValueError(
                f"{path} is not a shard-set manifest ({type(exn).__name__}: {exn}); it is "
                "written by flowturbo's shard writers (and cache_trajectories.py): write the "
                "folder again (resume=False), or restore the file"
            ) from exn

    def shard_paths(self, root: str | os.PathLike) -> list[Path]:
        """Paths of the non-empty shards under ``root`` (the manifest's folder)."""
        return [Path(root) / s.name for s in self.shards if s.count > 0]


#: What a shard spec names, for messages about one that is missing.
SHARD_FOLDER_HINT = (
    "give the folder that write_image_shards / write_latent_shards / cache_trajectories.py "
    "wrote (it holds manifest.json and the .tar shards)"
)


def _is_pattern(text: str) -> bool:
    """Whether a shard spec is a brace or glob pattern, or several specs joined by ``::``."""
    return "::" in text or "{" in text or glob.has_magic(text)


def resolve_shards(spec: str | os.PathLike | Sequence[str]) -> list[str]:
    """Expand a shard specification into a list of shard paths (or URLs).

    Accepted: a folder with ``manifest.json`` (its non-empty shards; the manifest must be
    complete and each shard file must have the size it records), a folder of ``*.tar`` files
    (sorted), a brace pattern such as ``/data/train/shard-{000000..000146}.tar`` (``::``
    separates several), a glob pattern, a sequence of paths (a list, a tuple or an OmegaConf
    ``ListConfig`` from a Hydra override; a sequence that names folders is the shards of each
    in turn), or remote URLs (``pipe:``, ``http://``, ..., passed on unchecked). A path to a
    ``manifest.json`` stands for its folder.

    Raises:
        FileNotFoundError: The named folder or file does not exist, nothing matches the
            pattern, or named local shards are missing.
        RuntimeError: The folder's manifest is from an unfinished writer run, or a shard's
            file size differs from the size the manifest records (truncated or damaged), or
            a local shard without a manifest does not end with tar's end-of-archive marker.
    """
    checked = False  # sizes checked against a manifest
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        paths = [os.path.expanduser(str(s)) for s in spec]
        if any(os.path.isdir(p) for p in paths):  # shard sets: each resolved as a whole
            return [url for p in paths for url in resolve_shards(p)]
        urls = paths
    else:
        text = os.path.expanduser(str(spec))
        if os.path.basename(text) == MANIFEST_NAME and os.path.isfile(text):
            text = os.path.dirname(text) or "."  # the manifest stands for its set
        folder = Path(text)
        if folder.is_dir():
            manifest_path = folder / MANIFEST_NAME
            if manifest_path.is_file():
                urls, checked = _manifest_shards(manifest_path), True
            else:
                urls = sorted(str(p) for p in folder.glob("*.tar"))
        elif not os.path.exists(text) and not _is_remote(text) and not _is_pattern(text):
            what = "file" if text.endswith(".tar") else "folder"
            where = "" if os.path.isabs(text) else f" (relative to {os.getcwd()})"
            raise FileNotFoundError(f"shard {what} not found: {text}{where}: {SHARD_FOLDER_HINT}")
        else:
            urls = []
            for part in text.split("::"):
                for url in braceexpand.braceexpand(part):
                    if _is_remote(url) or not glob.has_magic(url):
                        urls.append(url)
                    else:
                        urls.extend(sorted(glob.glob(url)))
    if not urls:
        raise FileNotFoundError(
            f"no shard files match {str(spec)!r}: write shards first (flowturbo.data."
            "write_image_shards, write_latent_shards or demo_shards), then pass the folder with "
            "manifest.json or a brace pattern, quoted on a Hydra command line: "
            "'data.train_shards=\"DIR/shard-{000000..000009}.tar\"'"
        )
    missing = [u for u in urls if not _is_remote(u) and not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shard files named by {str(spec)!r} do not exist, "
            f"e.g. {missing[0]}; check the pattern's range, or write the missing shards again "
            "with the command that wrote the others"
        )
    # without a manifest, a local tar must end with tar's end-of-archive marker: a cut between
    # two members would otherwise end the shard early without an error
    unended = [] if checked else [u for u in urls if not _is_remote(u) and not has_tar_end(u)]
    if unended:
        raise RuntimeError(
            f"{len(unended)} of {len(urls)} shard files named by {str(spec)!r} do not end with "
            f"tar's end-of-archive marker (two zero blocks), so they were cut short (an "
            f"interrupted copy or write) and reading them would silently lose the samples "
            f"after the cut: {', '.join(unended[:5])}{', ...' if len(unended) > 5 else ''}; "
            "copy or write them again (`tar tf FILE` reports the unexpected end)"
        )
    return urls


def has_tar_end(path: str) -> bool:
    """Whether a tar file ends with the end-of-archive marker: its last 1,024 bytes are zero."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) < 2 * tarfile.BLOCKSIZE:
            return False
        f.seek(-2 * tarfile.BLOCKSIZE, os.SEEK_END)
        return not any(f.read())


def _manifest_shards(manifest_path: Path) -> list[str]:
    """The non-empty shards a complete manifest lists, each checked against its recorded size."""
    manifest = Manifest.load(manifest_path)
    if not manifest.complete:
        raise RuntimeError(
            f"{manifest_path} is incomplete: the shard writer did not finish; re-run it (it "
            "resumes where it stopped)"
        )
    folder = manifest_path.parent
    damaged = []
    for s in manifest.shards:
        path = folder / s.name
        if s.count > 0 and path.is_file() and (size := path.stat().st_size) != s.bytes:
            damaged.append(f"{s.name} ({size} bytes, recorded {s.bytes})")
    if damaged:
        raise RuntimeError(
            f"{len(damaged)} shard file(s) in {folder} do not have the size {MANIFEST_NAME} "
            f"records, so they are truncated or damaged and would silently lose samples: "
            f"{', '.join(damaged[:5])}{', ...' if len(damaged) > 5 else ''}; delete them and "
            "re-run the command that wrote the set: it writes missing shards again "
            "(the shard writers with resume=True, and cache_trajectories.py, also rewrite "
            "shards of the wrong size)"
        )
    return [str(p) for p in manifest.shard_paths(folder)]


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


# ----------------------------------------------------------------------------- encoding


def encode_field(name: str, value: Any) -> bytes:
    """Encode one field value into tar-member bytes.

    Rules: bytes pass through unchanged (already encoded images); ``cls`` -> decimal text;
    a name ending in ``npy`` -> ``numpy.save`` of the array (no pickle); str -> UTF-8.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if name == "cls" or name.endswith(".cls"):
        return str(int(value)).encode()
    if name.endswith("npy"):
        buf = io.BytesIO()
        np.save(buf, np.asarray(value), allow_pickle=False)
        return buf.getvalue()
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"cannot encode field {name!r} of type {type(value).__name__}")


def _check_key(key: str) -> str:
    if not _KEY_RE.match(key):
        raise ValueError(f"shard key {key!r} must match {_KEY_RE.pattern} (no dots or slashes)")
    return key


def read_shard(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Iterate over the samples of one tar shard, grouped by key as webdataset does.

    Yields:
        (key, {field: bytes}) in file order.
    """
    key, fields = None, {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isreg():
                continue
            base = os.path.basename(member.name)
            stem, _, ext = base.partition(".")
            prefix = os.path.join(os.path.dirname(member.name), stem)
            if prefix != key and key is not None:
                yield key, fields
                fields = {}
            key = prefix
            fields[ext.lower()] = tar.extractfile(member).read()
    if key is not None:
        yield key, fields


def write_tar(path: Path, records: Iterable[Record | Skip]) -> ShardInfo:
    """Write one shard of ``(key, {field: bytes})`` records to ``path`` atomically.

    The tar is written to a temporary name and renamed when complete; ``Skip`` items are
    counted in the returned ``ShardInfo``, not written.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count, skipped = 0, []
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w") as tar:
                for rec in records:
                    if isinstance(rec, Skip):
                        skipped.append(rec._asdict())
                        continue
                    key, fields = rec
                    for name, data in fields.items():
                        info = tarfile.TarInfo(f"{_check_key(key)}.{name}")
                        info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
                        tar.addfile(info, io.BytesIO(data))
                    count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ShardInfo(path.name, count, path.stat().st_size, skipped)


def _execute(task: tuple[Path, Callable[[], Iterable[Record | Skip]]]) -> ShardInfo:
    path, job = task
    return write_tar(path, job())


# ----------------------------------------------------------------------------- the one driver


def _write_shard_set(
    out_dir: Path,
    jobs: Iterable[tuple[int, Callable[[], Iterable[Record | Skip]]]],
    template: Manifest,
    *,
    resume: bool,
    workers: int = 0,
    mp_context: str = "spawn",
    progress: bool = True,
    total_jobs: int | None = None,
    desc: str = "shards",
) -> Manifest:
    """Write shard ``index`` of each ``(index, job)`` unless already done; keep the manifest.

    ``job()`` yields the shard's records (and :class:`Skip` entries). With ``workers > 0`` jobs
    run in a process pool (each worker writes whole shards; jobs must be picklable), else
    in this process, lazily, in order.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".shard-*.tar.tmp-*"):  # partial shards of an interrupted run
        stale.unlink(missing_ok=True)
    manifest_path = out_dir / MANIFEST_NAME
    done: dict[str, ShardInfo] = {}
    if resume and manifest_path.exists():
        previous = Manifest.load(manifest_path)
        same = (
            previous.kind == template.kind
            and previous.shard_size == template.shard_size
            # a writer that knows its inputs refuses a set whose inputs are unknown: they may
            # be other data (write_sample_shards' resume trusts its caller instead)
            and (template.fingerprint is None or previous.fingerprint == template.fingerprint)
        )
        if not same:
            raise ValueError(
                f"{manifest_path} was written from other inputs or settings "
                f"({_differences(previous, template)}); pass resume=False to "
                "rewrite the directory, or choose another output directory"
            )
        for s in previous.shards:
            p = out_dir / s.name
            if p.is_file() and p.stat().st_size == s.bytes:
                done[s.name] = s

    manifest = Manifest(**{**vars(template), "shards": sorted(done.values(), key=_name)})
    manifest.complete = False
    manifest.save(manifest_path)
    results = dict(done)
    plan: list[str] = []
    bar = tqdm(total=total_jobs, desc=desc, unit="shard", disable=not progress)

    def record(info: ShardInfo) -> None:
        results[info.name] = info
        manifest.shards = sorted(results.values(), key=_name)
        manifest.save(manifest_path)
        bar.update(1)
        bar.set_postfix(samples=manifest.total, skipped=manifest.num_skipped)

    def pending() -> Iterator[tuple[Path, Callable[[], Iterable[Record | Skip]]]]:
        for index, job in jobs:
            name = SHARD_NAME.format(index)
            plan.append(name)
            if name in done:
                bar.update(1)
                continue
            yield out_dir / name, job

    try:
        if workers > 0:
            tasks = list(pending())
            if tasks:
                with mp.get_context(mp_context).Pool(min(workers, len(tasks))) as pool:
                    for info in pool.imap_unordered(_execute, tasks):
                        record(info)
        else:
            for task in pending():
                record(_execute(task))
    finally:
        bar.close()

    manifest.shards = [results[name] for name in plan]
    manifest.complete = True
    manifest.save(manifest_path)
    for extra in out_dir.glob("shard-*.tar"):  # shards of an older, longer plan
        if SHARD_RE.match(extra.name) and extra.name not in plan:
            extra.unlink()
    if manifest.num_skipped:
        log.warning(
            "%s: skipped %d unreadable input(s), listed under 'skipped' in %s; first: %s",
            out_dir,
            manifest.num_skipped,
            manifest_path,
            manifest.skipped[0],
        )
    return manifest


def _name(s: ShardInfo) -> str:
    return s.name


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _differences(previous: Manifest, template: Manifest) -> str:
    """What differs between a directory's manifest and a new run, for the resume error."""
    old = {"kind": previous.kind, "shard_size": previous.shard_size}
    new = {"kind": template.kind, "shard_size": template.shard_size}
    note = ""
    if previous.fingerprint is None:
        note = (
            "; its manifest records no fingerprint of its inputs (written by "
            "write_sample_shards or an older writer), so they may be other data"
        )
    elif _PARTS in previous.meta and _PARTS in template.meta:
        old.update(previous.meta[_PARTS])
        new.update(template.meta[_PARTS])
    elif _PARTS in template.meta:
        note = "; its manifest, an older writer's, does not record what the fingerprint covers"
    diffs = [
        f"{k} {old.get(k)!r}, now {new.get(k)!r}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]
    return ("; ".join(diffs) or f"kind {previous.kind!r}, shard_size {previous.shard_size}") + note


def stat_digest(entries: Iterable[tuple[str, str]]) -> str:
    """Hash of ``(path, name)`` entries: each name with its file's size and modification time.

    One ``stat`` per file and no contents read (seconds for ImageNet's 1.28 M files on a local
    disk), so it changes when a file is added, removed, renamed, rewritten or touched. A file
    that cannot be stat-ed counts as missing.
    """
    h = hashlib.sha256()
    for path, name in entries:
        try:
            st = os.stat(path)
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{name}\0missing\n".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- image folders


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """List an ImageFolder tree ``root/<class_dir>/**/<image>`` as torchvision does.

    Class index = position in the sorted class-folder names; files are those with an
    :data:`IMG_EXTENSIONS` suffix (case-insensitive), sorted; other files, and files directly
    under ``root``, are left out with a warning that counts them and names a few.

    Returns:
        (classes, [(path relative to root, class index), ...]).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root} has no class folders (expected root/<class>/<image>)")
    files, left_out = [], [e.name for e in os.scandir(root) if e.is_file()]
    for index, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            for fname in sorted(filenames):
                rel = os.path.relpath(os.path.join(dirpath, fname), root)
                if fname.lower().endswith(IMG_EXTENSIONS):
                    files.append((rel, index))
                else:
                    left_out.append(rel)
    if left_out:
        log.warning(
            "%s: left out %d file(s) that are not images in a class folder (suffixes %s); "
            "first: %s",
            root,
            len(left_out),
            ", ".join(IMG_EXTENSIONS),
            ", ".join(sorted(left_out)[:3]),
        )
    return classes, files


def image_files(root: str | os.PathLike, what: str) -> list[Path]:
    """Every file under ``root`` (recursively, sorted by path) with an :data:`IMG_EXTENSIONS`
    suffix (case-insensitive). Other files are left out with a warning that counts them and
    names a few, so that a folder's ``.gif`` images are not dropped unsaid; hidden files and a
    killed writer's temporary files are not counted. ``what`` names the folder in the warning
    (e.g. ``"input=photos"``)."""
    from flowturbo.eval.atomic import is_temporary

    files, left_out = [], []
    for path in sorted(Path(root).rglob("*")):
        if not path.is_file() or is_temporary(path):
            continue
        if path.suffix.lower() in IMG_EXTENSIONS:
            files.append(path)
        elif not path.name.startswith("."):
            left_out.append(path)
    if left_out:
        log.warning(
            "%s: left out %d file(s) whose suffix is not an image's (%s); first: %s",
            what,
            len(left_out),
            ", ".join(IMG_EXTENSIONS),
            ", ".join(str(p.relative_to(root)) for p in left_out[:3]),
        )
    return files


def _sample_key(index: int, rel_path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_\-]", "_", Path(rel_path).stem)[:64]
    return f"{index:08d}_{stem}"


def _read_image_file(path: str) -> tuple[str, bytes]:
    """Fully decode an image (catches truncation) and return (field, bytes) to store.

    JPEG and PNG files are stored as their original bytes; any other format is re-encoded
    losslessly as PNG.
    """
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format
        img.load()
        if fmt == "JPEG":
            return "jpg", data
        if fmt == "PNG":
            return "png", data
        if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
            img = img.convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return "png", buf.getvalue()


@dataclass
class _ImageFolderJob:
    """One shard of an image folder: read, check and yield its files (picklable)."""

    root: str
    items: list[tuple[int, str, int]]  # (global index, relative path, class index)

    def __call__(self) -> Iterator[Record | Skip]:
        for index, rel, label in self.items:
            try:
                ext, data = _read_image_file(os.path.join(self.root, rel))
            except Exception as exn:
                yield Skip(rel, f"{type(exn).__name__}: {exn}")
                continue
            yield _sample_key(index, rel), {ext: data, "cls": encode_field("cls", label)}


def check_shard_size(shard_size: Any) -> None:
    """Refuses a shard size that is not a whole number >= 1, naming it."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1 (samples per shard): {shard_size!r}")


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _folder_plan(
    files: Sequence[tuple[str, int]], shuffle_seed: int | None
) -> tuple[list[tuple[int, str, int]], str]:
    """The order in which an ImageFolder's files go into shards, and its name for the record.

    Items are ``(index in the sorted list, relative path, class)``, so a sample's key names
    its file whatever the order. Shuffled with ``random.Random(shuffle_seed)`` (None: sorted,
    class after class): a training stream mixes a few shards at a time (its shuffle buffer),
    and ImageNet's sorted shards hold one or two classes each, so sorted shards gave batches
    of few classes and a validation subset of few classes.
    """
    items = [(i, rel, label) for i, (rel, label) in enumerate(files)]
    if shuffle_seed is None:
        return items, "sorted"
    random.Random(shuffle_seed).shuffle(items)
    return items, f"shuffled, seed {shuffle_seed}"


def write_image_shards(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 1000,
    workers: int | None = None,
    resume: bool = True,
    progress: bool = True,
    mp_context: str = "spawn",
    shuffle_seed: int | None = 0,
) -> Manifest:
    """Write an ImageFolder tree (ImageNet train layout) as webdataset tar shards.

    Each sample is ``{key}.jpg`` (the original JPEG bytes, not re-encoded) or ``{key}.png``
    (PNG files as they are; other formats re-encoded losslessly to PNG) plus ``{key}.cls``
    (class index as text, index = sorted class-folder order). Keys are
    ``{index in the sorted file list:08d}_{file stem}``. Shard ``i`` holds files
    ``i * shard_size ...`` of that list shuffled with ``shuffle_seed`` (so that every shard
    mixes the classes; None: sorted, class after class), so a re-run plans the same shards.
    Files that cannot be decoded are skipped and listed in the manifest's ``skipped``.

    Args:
        root: ``root/<class_dir>/<image>`` tree.
        out_dir: Output folder for ``shard-%06d.tar`` and ``manifest.json``.
        shard_size: Files per shard.
        workers: Processes, each writing whole shards; None = CPU count, 0 = this process.
        resume: Skip shards the manifest records as complete (see the module docstring).
        progress: Show a tqdm bar over shards.
        mp_context: multiprocessing start method for the pool.
        shuffle_seed: seed of the files' order across shards; None: sorted.

    Returns:
        The final manifest (also written to ``out_dir/manifest.json``).
    """
    check_shard_size(shard_size)
    root = os.path.expanduser(str(root))
    classes, files = scan_image_folder(root)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMG_EXTENSIONS)}) under {root}")
    items, order = _folder_plan(files, shuffle_seed)
    chunks = _chunks(items, shard_size)
    jobs = [(i, _ImageFolderJob(str(root), list(c))) for i, c in enumerate(chunks)]
    source = str(Path(root).resolve())
    parts = {
        "source": source,
        "num_files": len(files),
        "files": stat_digest((os.path.join(root, rel), f"{rel}\0{y}") for rel, y in files),
        "order": order,
    }
    template = Manifest(
        kind="image",
        shard_size=shard_size,
        classes=classes,
        fingerprint=_fingerprint("image", shard_size, parts),
        meta={"source": source, _PARTS: parts},
    )
    workers = (os.cpu_count() or 1) if workers is None else workers
    return _write_shard_set(
        Path(out_dir),
        jobs,
        template,
        resume=resume,
        workers=workers,
        mp_context=mp_context,
        progress=progress,
        total_jobs=len(jobs),
        desc=f"image shards -> {out_dir}",
    )


# ----------------------------------------------------------------------------- in-memory samples


@dataclass
class _RecordsJob:
    records: list[Record]

    def __call__(self) -> Iterator[Record]:
        return iter(self.records)


def write_sample_shards(
    samples: Iterable[tuple[str, Mapping[str, Any]]],
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 1000,
    classes: Sequence[str] | None = None,
    kind: str = "samples",
    meta: Mapping[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Manifest:
    """Write ``(key, {field: value})`` samples as tar shards of ``shard_size`` samples.

    Values are encoded by :func:`encode_field`: bytes as they are (e.g. ``"png"`` image
    bytes), ``"cls"`` as text, ``"*.npy"`` fields as ``numpy.save`` bytes. Used for the demo
    set, for latent shards made elsewhere and for trajectory caches.

    Args:
        samples: Iterable of (key, fields); keys match ``[A-Za-z0-9_-]+`` and are unique.
        out_dir: Output folder.
        shard_size: Samples per shard.
        classes: Class names to record in the manifest.
        kind: Manifest kind ("samples", "image", "latent", ...).
        meta: Extra settings to record in the manifest.
        resume: Skip shards already recorded as complete. The iterable must then yield the same
            samples in the same order (it is still consumed; only writing is skipped).
        progress: Show a tqdm bar over shards.

    Returns:
        The final manifest.
    """

    check_shard_size(shard_size)

    def jobs() -> Iterator[tuple[int, _RecordsJob]]:
        chunk: list[Record] = []
        index, seen = 0, set()
        for key, fields in samples:
            if key in seen:  # webdataset would merge or drop the two samples when reading
                raise ValueError(f"sample key {key!r} is given twice: keys must be unique")
            seen.add(key)
            chunk.append((key, {k: encode_field(k, v) for k, v in fields.items()}))
            if len(chunk) == shard_size:
                yield index, _RecordsJob(chunk)
                chunk, index = [], index + 1
        if chunk:
            yield index, _RecordsJob(chunk)

    template = Manifest(
        kind=kind,
        shard_size=shard_size,
        classes=list(classes) if classes is not None else None,
        meta=dict(meta or {}),
    )
    return _write_shard_set(
        Path(out_dir), jobs(), template, resume=resume, progress=progress, desc=f"{kind} shards"
    )


# ----------------------------------------------------------------------------- images


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """ADM-style center crop: halve with a box filter while the short side is >= 2 * size,
    resize the short side to ``size`` (bicubic), then crop the central ``size`` x ``size``."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize(
        (round(img.width * scale), round(img.height * scale)), resample=Image.Resampling.BICUBIC
    )
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def image_field(fields: Mapping[str, bytes]) -> bytes:
    """The encoded image of a sample: its first jpg, jpeg, png or webp field."""
    for ext in ("jpg", "jpeg", "png", "webp"):
        if ext in fields:
            return fields[ext]
    raise KeyError(f"no image field (jpg/jpeg/png/webp) among {sorted(fields)}")
