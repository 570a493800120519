"""One run per output folder: an exclusive, non-blocking OS lock on ``<folder>/run.lock``.

``train.py`` (its ``ckpt_dir``) and ``cache_trajectories.py`` (its ``out_dir``) resume into a
stable folder, so two launches with the same name, in two terminals or two SLURM jobs, would
write the same files at once: overwrite each other's checkpoints, or delete each other's
half-written shards. :func:`folder_lock` refuses the second launch instead, naming the process
that holds the folder.

The lock is ``flock`` on the lock file (:class:`filelock.FileLock`, never its soft fallback): the
kernel drops it when the holding process ends in any way, so a killed, crashed or requeued job
never leaves a stale lock behind. The holder writes its pid, host, start time and command into
the file for the message. Only one process of a run takes it, the one of global rank 0
(:func:`is_global_zero_process`): the other ranks of a DDP run work in the same folder by
design.

:func:`waiting_lock` is the same lock for a short section that concurrent jobs take in turn
(e.g. ``evaluate.py``'s jobs writing one sweep's summary): it waits for the holder, up to a
timeout, instead of refusing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

#: The lock file's name inside the locked folder (left there, emptied, when the run ends).
LOCK_NAME = "run.lock"
#: What flock fails with on a file system without it (Lustre mounted without ``-o flock``: ENOSYS;
#: NFS without its lock manager: ENOLCK).
NO_FLOCK = (errno.ENOSYS, errno.ENOLCK)
#: Environment variables that give a process's rank: torchrun's, SLURM's (one process per task)
#: and those Lightning's subprocess launcher (``strategy=ddp``) sets for the processes it starts.
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")


class FolderInUseError(RuntimeError):
    """Another run holds the folder's lock."""


class LockTimeoutError(TimeoutError):
    """A lock that :func:`waiting_lock` waited for stayed held for longer than its timeout."""


def is_global_zero_process() -> bool:
    """Whether this process is global rank 0 of its run: every rank variable that is set
    (:data:`RANK_VARIABLES`) is 0, or none is (a single process, or the process that starts the
    others).

    The ranks are read from the environment because the lock is taken before the Trainer
    exists. ``strategy=ddp`` runs ``train.py`` again for local ranks 1..N-1 with ``LOCAL_RANK``
    (and ``NODE_RANK``) set; under SLURM (Lightning's SLURMEnvironment) every task is started by
    ``srun`` with its global rank in ``SLURM_PROCID``; torchrun sets ``RANK``. A process that
    ``strategy=ddp_spawn`` starts runs only Lightning's training loop, never the entry point's
    function, so it never asks.
    """
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value and value != "0":
            return False
    return True


def holder_info() -> dict[str, object]:
    """What the lock file records of its holder: pid, host, start time, command and, under
    SLURM, the job id."""
    info: dict[str, object] = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
    }
    if os.environ.get("SLURM_JOB_ID"):
        info["slurm_job"] = os.environ["SLURM_JOB_ID"]
    return info


def describe_holder(lock_file: Path) -> str:
    """The holder recorded in ``lock_file``, in words (or that none is recorded yet)."""
    try:
        info = json.loads(lock_file.read_text())
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict) or "pid" not in info:
        return "its pid and host are not recorded yet"
    words = f"pid {info['pid']} on host {info.get('host', '?')}"
    if info.get("slurm_job"):
        words += f", SLURM job {info['slurm_job']}"
    if info.get("since"):
        words += f", since {info['since']}"
    if info.get("command"):
        words += f": {info['command']}"
    return words


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, *, what_to_do: str) -> Iterator[Path | None]:
    """Holds ``folder``'s lock for the ``with`` block (global rank 0 only; other processes get
    ``None`` and take nothing). The folder is created.

    Args:
        folder: the run's output folder.
        what_to_do: the other way out, besides waiting, for the message, e.g. ``"give this run
            another name=... or ckpt_dir=..."``.

    Yields:
        The lock file, or None in a process that is not global rank 0.

    Raises:
        FolderInUseError: another process holds the lock; the message names the folder, the
            holder (pid, host, command) and what to do.
    """
    if not is_global_zero_process():
        yield None
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME

    def refused() -> Exception:
        return FolderInUseError(
            f"{folder} is in use by another run ({describe_holder(path)}); two runs writing to "
            f"one folder overwrite each other's files. Wait for that run to finish (its lock, "
            f"{path}, is released when its process ends, however it ends), or {what_to_do}"
        )

    unsupported = (
        f"cannot lock {folder}: its file system does not support flock locks, which keep a "
        f"second run out of the folder. Use a folder on another file system, or {what_to_do}"
    )
    with _holding(path, timeout_s=None, refused=refused, unsupported=unsupported):
        yield path


@contextlib.contextmanager
def waiting_lock(
    path: str | os.PathLike,
    *,
    timeout_s: float,
    what: str,
    what_to_do: str,
    without_flock: str | None = None,
) -> Iterator[Path]:
    """Holds the lock file ``path`` for the ``with`` block, waiting for it while another process
    holds it: a short section (read, then write, shared files) that concurrent jobs take in
    turn. Every process takes it, whatever its rank. The folder must exist.

    Args:
        path: the lock file (created; left there, emptied, when released).
        timeout_s: the longest wait. The section takes seconds and a holder that ends in any
            way releases the lock, so a lock held this long belongs to a stuck process.
        what: the section, for the messages, e.g. ``"writing the summary of sweeps/demo"``.
        what_to_do: what to do after a timeout, for its message.
        without_flock: None: a file system without flock locks is an error. Else the section
            runs unlocked there, after a warning that ends with this text (what the section
            risks, what to do).

    Yields:
        The lock file.

    Raises:
        LockTimeoutError: the lock stayed held for ``timeout_s``; the message names the lock,
            its holder (pid, host, command) and what to do.
        OSError: the file system does not support flock locks (``without_flock`` None).
    """
    path = Path(path)

    def refused() -> Exception:
        return LockTimeoutError(
            f"waited {timeout_s:g} s for {path} before {what}, and it is still held "
            f"({describe_holder(path)}). That section takes seconds: the holder looks stuck. "
            f"Its lock is released when its process ends, however it ends; {what_to_do}"
        )

    unsupported = (
        f"cannot lock {path}: its file system does not support flock locks, which keep "
        f"concurrent jobs from {what} at the same time"
    )
    if without_flock is None:
        unsupported += ". Use a folder on another file system"
    else:
        unsupported += f": going on without it; {without_flock}"
    with _holding(
        path,
        timeout_s=timeout_s,
        refused=refused,
        unsupported=unsupported,
        unlocked_ok=without_flock is not None,
    ):
        yield path


@contextlib.contextmanager
def _holding(
    path: Path,
    *,
    timeout_s: float | None,
    refused: Callable[[], Exception],
    unsupported: str,
    unlocked_ok: bool = False,
) -> Iterator[None]:
    """Holds the flock on ``path`` for the ``with`` block, the holder recorded in the file.

    ``timeout_s`` None: one attempt, else a wait of up to that long (logged when there is one).
    A lock still held then raises ``refused()``. A file system without flock raises
    OSError(errno, ``unsupported``), or with ``unlocked_ok`` logs ``unsupported`` as a warning
    and runs the block unlocked.
    """
    from filelock import FileLock, Timeout

    record = (json.dumps(holder_info()) + "\n").encode()

    def write_holder(fd: int) -> None:  # with the lock held, through filelock's descriptor
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)

    lock = FileLock(path, fallback_to_soft=False, on_acquired=write_holder)
    locked = True
    try:
        try:
            lock.acquire(blocking=False)
        except Timeout:
            if timeout_s is None:
                raise
            log.info(
                "%s is held by %s; waiting up to %g s", path, describe_holder(path), timeout_s
            )
            lock.acquire(timeout=timeout_s)
    except Timeout:
        raise refused() from None
    except OSError as exn:
        if exn.errno not in NO_FLOCK:
            raise
        if not unlocked_ok:
            raise OSError(exn.errno, unsupported) from None
        log.warning("%s", unsupported)
        locked = False
    if not locked:
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # still held: no holder is recorded once it is free
            path.write_bytes(b"")
        lock.release()
