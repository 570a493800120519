"""One run per output folder (flowturbo.lock): a second holder is refused in words, the lock dies
with its process, and only global rank 0 of a run takes it; a waiting lock (a sweep's summary)
waits for its holder, up to a timeout."""

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from flowturbo.lock import (
    LOCK_NAME,
    RANK_VARIABLES,
    FolderInUseError,
    LockTimeoutError,
    folder_lock,
    is_global_zero_process,
    waiting_lock,
)

ELSEWHERE = "give this run another name=... or ckpt_dir=..."


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """As a run of one process, whatever launched pytest."""
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_a_second_holder_is_refused_naming_the_folder_the_holder_and_what_to_do(tmp_path):
    folder = tmp_path / "checkpoints" / "demo"
    with folder_lock(folder, what_to_do=ELSEWHERE) as path:
        assert path == folder / LOCK_NAME
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(FolderInUseError) as refused, folder_lock(folder, what_to_do=ELSEWHERE):
            pytest.fail("a second holder got the lock")
        message = str(refused.value)
        assert f"{folder} is in use by another run (pid {os.getpid()} on host " in message
        assert socket.gethostname() in message and "Wait for that run to finish" in message
        assert message.endswith(ELSEWHERE)
        assert json.loads(path.read_text()) == holder  # the refused one wrote nothing
    assert path.read_text() == ""  # released: no holder recorded any more
    with folder_lock(folder, what_to_do=ELSEWHERE) as again:  # free for the next run
        assert json.loads(again.read_text())["pid"] == os.getpid()


HOLD = """
import sys, time
from flowturbo.lock import folder_lock
with folder_lock(sys.argv[1], what_to_do="x"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_lock_dies_with_its_holder_process(tmp_path):
    """A killed (or requeued) job leaves no stale lock: the kernel releases it."""
    folder = tmp_path / "traj"
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(FolderInUseError, match=f"pid {holder.pid} on host"),
            folder_lock(folder, what_to_do="give this run another out_dir=..."),
        ):
            pytest.fail("got the lock of a live process")
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()
    assert holder.returncode == -9  # killed: it never released the lock itself
    with folder_lock(folder, what_to_do=ELSEWHERE) as path:
        assert path is not None and json.loads(path.read_text())["pid"] == os.getpid()


WAIT_HOLD = """
import sys
from flowturbo.lock import waiting_lock
with waiting_lock(sys.argv[1], timeout_s=5, what="holding it", what_to_do="x"):
    print("held", flush=True)
    sys.stdin.readline()  # until the test lets go
"""


def test_a_waiting_lock_waits_for_another_process_then_times_out_in_words(tmp_path, caplog):
    """Two jobs of a sweep writing its summary: the second waits for the first, and a holder
    that never lets go is named after the timeout."""
    path = tmp_path / "summary.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", WAIT_HOLD, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(LockTimeoutError) as waited,
            waiting_lock(path, timeout_s=0.2, what="summarising", what_to_do="try later"),
        ):
            pytest.fail("got the lock of a live process")
        message = str(waited.value)
        assert message.startswith(f"waited 0.2 s for {path} before summarising, and it is still")
        assert f"(pid {holder.pid} on host {socket.gethostname()}" in message
        assert message.endswith("try later")

        def let_go():
            holder.stdin.write("\n")
            holder.stdin.flush()

        threading.Timer(0.3, let_go).start()
        start = time.monotonic()
        caplog.set_level("INFO", logger="flowturbo.lock")
        with waiting_lock(path, timeout_s=30, what="summarising", what_to_do="-") as held:
            assert time.monotonic() - start >= 0.2  # it waited for the holder
            assert json.loads(held.read_text())["pid"] == os.getpid()
        assert f"pid {holder.pid} on host" in caplog.text and "waiting up to 30 s" in caplog.text
        assert holder.wait(timeout=30) == 0
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdin.close()
        holder.stdout.close()
    assert path.read_text() == ""  # released, left in place


class NoFlock:
    """filelock's FileLock on a file system without flock (Lustre without -o flock)."""

    def __init__(self, path, **kwargs):
        self.path = path

    def acquire(self, **kwargs):
        raise OSError(errno.ENOSYS, "Function not implemented")


def test_a_file_system_without_flock_is_named_or_the_section_runs_unlocked(
    tmp_path, monkeypatch, caplog
):
    import filelock

    monkeypatch.setattr(filelock, "FileLock", NoFlock)
    path = tmp_path / "summary.lock"
    with (
        pytest.raises(OSError, match=f"cannot lock {path}: its file system does not support"),
        waiting_lock(path, timeout_s=1, what="summarising", what_to_do="-"),
    ):
        pytest.fail("ran without the lock")
    with (
        pytest.raises(OSError, match="Use a folder on another file system, or give"),
        folder_lock(tmp_path / "run", what_to_do="give another name"),
    ):
        pytest.fail("ran without the lock")
    ran = []
    with waiting_lock(path, timeout_s=1, what="x", what_to_do="-", without_flock="beware") as p:
        ran.append(p)
    assert ran == [path]
    assert f"cannot lock {path}" in caplog.text and "going on without it; beware" in caplog.text


@pytest.mark.parametrize(
    "env, zero",
    [
        ({}, True),  # one process, or the one that starts the others
        ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),  # set by Lightning in the parent
        ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False),  # strategy=ddp's re-executed train.py
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # rank 0 of the second node
        ({"SLURM_PROCID": "0"}, True),
        ({"SLURM_PROCID": "5"}, False),  # SLURM task 5 (Lightning's SLURMEnvironment)
        ({"SLURM_PROCID": "0", "LOCAL_RANK": "2"}, False),  # ddp launched inside one task
        ({"RANK": "0", "LOCAL_RANK": "0"}, True),  # torchrun
        ({"RANK": "3", "LOCAL_RANK": "1"}, False),
    ],
)
def test_only_global_rank_zero_takes_the_lock(tmp_path, monkeypatch, env, zero):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert is_global_zero_process() is zero
    folder = tmp_path / "run"
    with folder_lock(folder, what_to_do=ELSEWHERE) as path:
        assert (path is not None) is zero
        # another rank of the same run works in the folder its rank 0 holds
        monkeypatch.setenv("LOCAL_RANK", "1")
        with folder_lock(folder, what_to_do=ELSEWHERE) as other:
            assert other is None


def test_cache_trajectories_refuses_an_out_dir_another_run_holds(tmp_path):
    """Its rank 0 deletes partial shards as a killed run's leftovers: in a folder another run
    is writing, they would be that run's shards in progress."""
    from flowturbo.models import SiT, save_checkpoint
    from flowturbo.train import cache_trajectories

    torch.manual_seed(0)
    base = SiT.from_name("SiT-Tiny/2", input_size=8, in_channels=1, num_classes=3)
    save_checkpoint(base, tmp_path / "base.pt")
    out = tmp_path / "traj"
    overrides = [
        f"cache.base.path={tmp_path / 'base.pt'}",
        "cache.shape=[1,8,8]",
        "cache.num_classes=3",
        "cache.num_train=4",
        "cache.num_val=2",
        "cache.steps=2",
        f"out_dir={out}",
        "+trainer.enable_progress_bar=false",
    ]
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("cache_trajectories", overrides=overrides)
    with folder_lock(out, what_to_do="x"), pytest.raises(FolderInUseError) as refused:
        cache_trajectories(cfg)
    assert str(refused.value).startswith(f"{out} is in use by another run (pid {os.getpid()}")
    assert str(refused.value).endswith("give this run another out_dir=...")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # no plan, no shard
