"""Atomic file writes: write to a temporary file in the target's folder, then ``os.replace``."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)
#: Names of atomic_path's temporary files: ".<stem>.<8 random chars>.tmp<suffix>" (mkstemp's).
TEMP_NAME = re.compile(r"\..*\.[a-z0-9_]{8}\.tmp(\.[^.]*)?")


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether ``path`` names one of :func:`atomic_path`'s temporary files (never a result:
    readers of a folder skip them; one that outlived its process was never completed)."""
    return TEMP_NAME.fullmatch(Path(path).name) is not None


#: A temporary file this many seconds old was left by a killed writer (a result is written in
#: well under a second); a younger one may be another job's write in progress.
STALE_S = 60.0


def remove_leftovers(folder: str | os.PathLike, older_than_s: float = STALE_S) -> list[Path]:
    """Deletes the temporary files that killed writers left in ``folder`` (not recursive),
    those at least ``older_than_s`` old, and logs them; returns them."""
    folder, now = Path(folder), time.time()
    stale = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):  # renamed or removed meanwhile
            if is_temporary(p) and now - p.stat().st_mtime >= older_than_s:
                p.unlink()
                stale.append(p)
    if stale:
        log.warning(
            "%s: removed %d temporary file(s) of a killed writer: %s",
            folder,
            len(stale),
            ", ".join(p.name for p in stale[:5]),
        )
    return stale


def _temporary(path: Path) -> Path:
    """Creates an empty file named as :data:`TEMP_NAME` says, next to ``path`` (whose parent
    folders are created); the caller renames it over ``path`` or removes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the suffix last so that writers which infer the format from it (savefig) still can
    fd, name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}"
    )
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success it replaces ``path`` in one step.

    Readers never see a half-written file: the temporary file lives in the same folder (same
    file system) and is renamed over ``path`` only when the ``with`` block finishes without an
    exception; on an exception it is removed. Parent folders are created.

    Example::

        with atomic_path("out/results.json") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    tmp = _temporary(path)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are for everyone to read
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def create_once(path: str | os.PathLike, text: str) -> bool:
    """Writes ``path`` whole with ``text`` unless it exists; True when this call created it.

    Of two processes creating one file at once, exactly one succeeds and the other reads the
    winner's text: the file is written under a temporary name, then hard-linked to ``path``,
    which fails when ``path`` exists (where the file system has no hard links, it is renamed
    over ``path`` only if absent at that moment, a window of microseconds).
    """
    path = Path(path)
    tmp = _temporary(path)
    try:
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links here
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)
