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
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

#: The lock file's name inside the locked folder (left there, emptied, when the run ends).
LOCK_NAME = "run.lock"
#: Environment variables that give a process's rank: torchrun's, SLURM's (one process per task)
#: and those Lightning's subprocess launcher (``strategy=ddp``) sets for the processes it starts.
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")


class FolderInUseError(RuntimeError):
    """Another run holds the folder's lock."""


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
    from filelock import FileLock, Timeout

    if not is_global_zero_process():
        yield None
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    record = (json.dumps(holder_info()) + "\n").encode()

    def write_holder(fd: int) -> None:  # with the lock held, through filelock's descriptor
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)

    lock = FileLock(path, blocking=False, fallback_to_soft=False, on_acquired=write_holder)
    try:
        lock.acquire()
    except Timeout:
        raise FolderInUseError(
            f"{folder} is in use by another run ({describe_holder(path)}); two runs writing to "
            f"one folder overwrite each other's files. Wait for that run to finish (its lock, "
            f"{path}, is released when its process ends, however it ends), or {what_to_do}"
        ) from None
    except OSError as exn:
        if exn.errno != errno.ENOSYS:
            raise
        raise OSError(
            exn.errno,
            f"cannot lock {folder}: its file system does not support flock locks, which keep a "
            f"second run out of the folder. Use a folder on another file system, or "
            f"{what_to_do}",
        ) from None
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):  # still held: no holder is recorded once it is free
            path.write_bytes(b"")
        lock.release()
