"""Behaviour of the infrastructure modules that the other tests left unchecked (found by
mutation testing): the Pareto front and acceleration tables, the sweep summary, the folder
lock, the config checks, the training callbacks and the EMA / warm-up helpers."""

from __future__ import annotations

import errno
import json
import logging
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_lit import trainer as cpu_trainer
from torch import nn

from flowturbo import config as config_mod
from flowturbo import lock as lock_mod
from flowturbo.eval import summary as summary_mod
from flowturbo.eval.pareto import acceleration_ratios, draw_pareto, pareto_front, write_results
from flowturbo.lit.callbacks import CheckpointOnSignal, SampleGrid, SeedEachRank
from flowturbo.lit.common import (
    ValidationTotals,
    ema_copy,
    optimizer_with_warmup,
)


def row(sampler: str, schedule: str, fid: Any, ms: Any, **kw: Any) -> dict[str, Any]:
    return {"sampler": sampler, "schedule": schedule, "fid": fid, "ms_per_image": ms, **kw}


# ----------------------------------------------------------------------------- pareto


def test_a_row_as_fast_but_worse_is_off_the_front():
    """Dominated means no worse on both and strictly better on one: a row that ties another on
    latency (or on FID) and is worse on the other is not on the front."""
    rows = [
        row("heun", "H4", 12.0, 4.0),
        row("euler", "E8", 20.0, 4.0),  # as fast as H4, worse FID
        row("flowturbo", "H2P4R4", 12.0, 6.0),  # as good as H4, slower
    ]
    assert [r["schedule"] for r in pareto_front(rows)] == ["H4"]


def test_equally_fast_matches_report_the_better_quality():
    """Two candidates as fast as each other both match: the one with the lower FID is named,
    not whichever comes first."""
    rows = [
        row("heun", "H8", 6.0, 8.0),
        row("flowturbo", "H1P3R2", 5.5, 2.0),
        row("flowturbo", "H1P2R3", 4.0, 2.0),
    ]
    (r,) = acceleration_ratios(rows, latency_key="ms_per_image")
    assert (r["candidate_schedule"], r["candidate_fid"]) == ("H1P2R3", 4.0)
    (r,) = acceleration_ratios(rows[::-1], latency_key="ms_per_image")
    assert r["candidate_schedule"] == "H1P2R3"


def test_baselines_without_a_latency_come_after_the_timed_ones():
    """The acceleration rows are ordered by baseline latency; a baseline that was never timed
    is listed last, not first."""
    rows = [
        row("heun", "H16", 3.0, 16.0),
        row("heun", "H4", 12.0, None),
        row("heun", "H8", 6.0, 8.0),
    ]
    ratios = acceleration_ratios(rows, latency_key="ms_per_image")
    assert [r["baseline_schedule"] for r in ratios] == ["H8", "H16", "H4"]


def test_a_zero_quality_keeps_the_pareto_axis_linear():
    """A quality of 0 (e.g. the reference solver's own error) cannot be drawn on a log axis:
    the axis stays linear however wide the range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row("heun", "H2", 0.0, 1.0), row("heun", "H4", 5.0, 2.0), row("euler", "E", 90.0, 3)]
    fig, ax = plt.subplots()
    try:
        draw_pareto(ax, rows, latency_key="ms_per_image", title="t")
        assert ax.get_yscale() == "linear"
    finally:
        plt.close(fig)


def test_results_take_numpy_and_torch_scalars_as_numbers(tmp_path: Path):
    """Rows holding numpy or torch scalars (a metric straight from a tensor) are written as
    plain JSON numbers."""
    rows = [
        row("heun", "H8", np.float32(6.5), torch.tensor(8.0), n=np.int64(3)),
        row("flowturbo", "H1P3R2", torch.tensor(float("nan")), 2.0),
    ]
    json_path, csv_path = write_results(rows, tmp_path)
    saved = json.loads(json_path.read_text())
    assert saved[0]["fid"] == 6.5 and saved[0]["ms_per_image"] == 8.0 and saved[0]["n"] == 3
    assert saved[1]["fid"] is None
    assert csv_path.read_text().splitlines()[1].startswith("heun,H8,6.5,")


# ----------------------------------------------------------------------------- summary


def _row_file(out: Path, entry: str, fid: float, ms: float, session: str = "s") -> None:
    """A finished row file of ``entry`` (FID and eager ms/img), as a sweep job writes it."""
    from flowturbo.eval import entries, sweep

    e = entries.parse_entry(entry)
    latency = {"eager": {"ms_per_image": ms}, "batch": 4, "session": session}
    data = {
        "entry": e.label,
        "family": e.family,
        "steps": e.steps,
        "base_nfe": e.base_nfe,
        "refiner_nfe": e.refiner_nfe,
        "parts": {"quality": {"result": {"fid": fid}}, "latency": {"result": latency}},
    }
    sweep.write_row(sweep.row_path(out, e), data)


def test_an_unreadable_row_file_is_skipped_with_a_warning(tmp_path: Path, caplog):
    """A row file cut off (or otherwise not JSON) is left out of the summary, and named in
    the log, instead of failing the whole summary."""
    _row_file(tmp_path, "H2", fid=30.0, ms=2.0)
    (tmp_path / "rows" / "H4.json").write_text('{"entry": "H4", "par')
    with caplog.at_level(logging.WARNING, logger="flowturbo.eval.summary"):
        rows = summary_mod.load_rows(tmp_path)
    assert [r["schedule"] for r in rows] == ["H2"]
    assert "unreadable row file" in caplog.text and "H4.json" in caplog.text


def test_infinite_values_are_stored_as_missing():
    """finite() turns NaN and +-inf (a diverged sampler's error) into None, inside dicts too:
    the row files and acceleration.json are strict JSON, which has no Infinity."""
    value = {"fid": float("inf"), "inner": {"ref_error": float("-inf"), "x": float("nan")}}
    assert summary_mod.finite(value | {"ok": 1.5}) == {
        "fid": None,
        "inner": {"ref_error": None, "x": None},
        "ok": 1.5,
    }
    json.dumps(summary_mod.finite(value), allow_nan=False)


def test_rows_are_listed_by_family_then_cost(tmp_path: Path):
    """Heun rows first, then FlowTurbo, then the baseline solvers (FAMILIES), each by cost:
    not one list by cost."""
    _row_file(tmp_path, "euler:2", fid=40.0, ms=1.0)
    _row_file(tmp_path, "H1P2R2", fid=25.0, ms=1.5)
    _row_file(tmp_path, "H4", fid=20.0, ms=4.0)
    _row_file(tmp_path, "H2", fid=30.0, ms=2.0)
    rows = summary_mod.load_rows(tmp_path)
    assert [r["schedule"] for r in rows] == ["H2", "H4", "H1P2R2", "euler:2"]


def test_the_unknown_timing_session_is_named_first_then_the_oldest():
    """Rows stored before sessions were recorded form the session "unknown", listed before the
    dated sessions, which follow oldest first."""
    timed = {"ms_per_image_eager": 1.0}
    rows = [
        {"schedule": "H3", "latency_session": "2025-02-01T10:00:00-bbbb", **timed},
        {"schedule": "H2", "latency_session": None, **timed},
        {"schedule": "H1", "latency_session": "2025-01-01T10:00:00-aaaa", **timed},
        {"schedule": "H9", "latency_session": "2025-01-01T10:00:00-aaaa"},  # never timed
    ]
    sessions = summary_mod.latency_sessions(rows)
    assert list(sessions) == ["unknown", "2025-01-01T10:00:00-aaaa", "2025-02-01T10:00:00-bbbb"]
    assert sessions["2025-01-01T10:00:00-aaaa"] == ["H1"]


def test_decode_ratios_are_given_where_only_some_rows_were_timed_with_the_decode():
    """A sweep whose euler rows were timed without the VAE decode still compares Heun and
    FlowTurbo with the decode included."""
    key = "ms_per_image_eager_with_decode"
    rows = [
        {**row("heun", "H8", 6.0, None), key: 10.0},
        {**row("flowturbo", "H1P3R2", 5.0, None), key: 4.0},
        row("euler", "euler:8", 9.0, None),
    ]
    tables = summary_mod.acceleration_tables(
        rows, candidates=("flowturbo",), quality_keys=("fid",)
    )
    (table,) = [t for t in tables if t["baseline"] == "heun" and t["mode"] == "eager+decode"]
    (r,) = table["rows"]
    assert r["candidate_schedule"] == "H1P3R2" and r["ratio"] == pytest.approx(0.6)


def test_an_empty_rows_folder_is_a_clear_error(tmp_path: Path):
    """A rows folder without row files (every job failed before storing one) is named, with
    what to do, and no summary file is written."""
    (tmp_path / "rows").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no results in .*rows: run the sweep first"):
        summary_mod.summarize(tmp_path)
    assert not (tmp_path / "results.json").exists()


def test_a_mistyped_sweep_folder_is_not_created(tmp_path: Path):
    """summarize_only on a folder that does not exist says so and leaves no folder (nor lock
    file) behind."""
    out = tmp_path / "sweeps" / "dmeo"
    with pytest.raises(FileNotFoundError, match="run the sweep first"):
        summary_mod.summarize(out)
    assert not out.exists()


def test_the_summary_logs_to_wandb_offline_unless_told_otherwise(monkeypatch):
    """wandb.enabled without wandb.offline logs offline (no network use by default)."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert summary_mod.wandb_mode(OmegaConf.create({"wandb": {"enabled": True}})) == "offline"
    on = {"wandb": {"enabled": True, "offline": False}}
    assert summary_mod.wandb_mode(OmegaConf.create(on)) == "online"


# ----------------------------------------------------------------------------- lock


@pytest.fixture
def single_process(monkeypatch):
    """As a run of one process, whatever launched pytest."""
    for name in lock_mod.RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)


class DeniedLock:
    """filelock's FileLock where the lock file cannot be opened (permissions)."""

    def __init__(self, path: Any, **kwargs: Any):
        self.path = path

    def acquire(self, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(self.path))


def test_other_lock_errors_are_not_reported_as_a_missing_flock(tmp_path: Path, monkeypatch):
    """Only ENOSYS/ENOLCK mean "no flock on this file system": a permission error is raised as
    it is, and a section that may run unlocked without flock does not run."""
    import filelock

    monkeypatch.setattr(filelock, "FileLock", DeniedLock)
    ran = []
    with (
        pytest.raises(PermissionError, match="Permission denied"),
        lock_mod.waiting_lock(
            tmp_path / "summary.lock", timeout_s=1, what="x", what_to_do="-", without_flock="-"
        ),
    ):
        ran.append(True)
    assert ran == []


def test_the_next_holders_record_survives_the_hand_over(tmp_path: Path, monkeypatch):
    """The releasing holder empties the lock file while it still holds the lock: a job that
    takes the lock the moment it is free keeps its own record in the file."""
    import contextlib

    import filelock

    real_lock, path = filelock.FileLock, tmp_path / "summary.lock"
    next_job, handed = contextlib.ExitStack(), []

    class HandOver:
        """The real lock; another job takes it as soon as it is released."""

        def __init__(self, lock_path: Any, **kwargs: Any):
            self.lock = real_lock(lock_path, **kwargs)

        def acquire(self, **kwargs: Any) -> Any:
            return self.lock.acquire(**kwargs)

        def release(self) -> None:
            self.lock.release()
            if not handed:
                handed.append(True)
                next_job.enter_context(lock_mod.waiting_lock(path, **section))

    section = {"timeout_s": 1, "what": "x", "what_to_do": "-"}
    monkeypatch.setattr(filelock, "FileLock", HandOver)
    with next_job:
        with lock_mod.waiting_lock(path, **section):
            pass
        assert handed and json.loads(path.read_text())["pid"] == lock_mod.os.getpid()
    assert path.read_text() == ""


# ----------------------------------------------------------------------------- config


def test_missing_settings_are_listed_in_order():
    """The ``???`` settings are named sorted, nested and top-level ones alike."""
    cfg = OmegaConf.create({"zeta": "???", "alpha": {"y": "???", "x": 1}, "beta": "???"})
    with pytest.raises(ValueError, match=r"must be given: alpha\.y, beta, zeta\. "):
        config_mod.check_required(cfg, "python train.py")


def test_a_folder_name_of_exactly_the_longest_length_is_kept():
    """Overrides that fit in MAX_FOLDER_NAME characters name the folder as typed; one more
    character and the name is cut and hashed, still within the limit."""
    longest = "a=" + "x" * (config_mod.MAX_FOLDER_NAME - 2)
    assert config_mod.job_folder_name(longest) == longest
    longer = config_mod.job_folder_name(longest + "y")
    assert longer != longest and len(longer) <= config_mod.MAX_FOLDER_NAME


def test_text_booleans_inside_lists_are_refused():
    """A yes/no/on/off inside a list is text as well, and refused naming its place."""
    cfg = OmegaConf.create({"sweep": {"flags": [True, "yes"]}})
    with pytest.raises(ValueError, match=r"sweep\.flags\.1=yes: Hydra reads"):
        config_mod.check_text_booleans(cfg)


def test_hydras_own_settings_are_not_checked_for_text_booleans():
    """Only the job's settings are checked: Hydra's section is Hydra's."""
    cfg = OmegaConf.create({"hydra": {"job": {"chdir": "no"}}, "resume": False})
    config_mod.check_text_booleans(cfg)


def test_check_int_refuses_booleans_and_accepts_the_minimum():
    """true is no count (bool is an int in Python); the minimum itself is allowed."""
    cfg = OmegaConf.create({"threads": True, "seed": 0, "batch": 1})
    with pytest.raises(ValueError, match=r"threads must be an integer >= 1, got True"):
        config_mod.check_int(cfg, "threads", 1)
    assert config_mod.check_int(cfg, "seed", 0) == 0
    assert config_mod.check_int(cfg, "batch", 1) == 1


def test_as_many_items_as_processes_is_enough_work():
    config_mod.check_enough_work(2, 2, "images")
    with pytest.raises(ValueError, match="1 images for 2 processes"):
        config_mod.check_enough_work(1, 2, "images")


def test_cuda_is_refused_without_cuda_even_where_mps_exists(monkeypatch):
    """MPS stands in for ``gpu`` (Lightning picks it) but not for ``cuda``; the name is read
    in any case."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    config_mod.check_accelerator({"accelerator": "gpu"})
    with pytest.raises(ValueError, match="trainer.accelerator=cuda but no CUDA GPU"):
        config_mod.check_accelerator({"accelerator": "cuda"})
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="trainer.accelerator=gpu but no CUDA GPU"):
        config_mod.check_accelerator({"accelerator": "GPU"})


# ----------------------------------------------------------------------------- callbacks


class TinyNet(L.LightningModule):
    """A linear layer trained on random vectors: the cheapest Lightning run."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).pow(2).mean()

    def validation_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> None:
        self.log("val", self.net(batch[0]).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def vectors(n: int = 32) -> torch.utils.data.DataLoader:
    data = torch.utils.data.TensorDataset(torch.randn(n, 4))
    return torch.utils.data.DataLoader(data, batch_size=4)


def tiny_trainer(tmp_path: Path, steps: int, callbacks: list, **kw: Any) -> L.Trainer:
    settings = {"limit_val_batches": 0, "num_sanity_val_steps": 0} | kw
    return cpu_trainer(
        tmp_path, steps, callbacks=callbacks, enable_checkpointing=False, **settings
    )


class Signal(L.Callback):
    """Signals this process at a hook: ``at`` is ``("batch", step)``, ``("validation", n)``
    (the n-th validation pass) or ``("train_end", None)``."""

    def __init__(self, at: tuple[str, Any], signum: int = signal.SIGUSR2, times: int = 1):
        self.at, self.signum, self.times, self.validations = at, signum, times, 0

    def _send(self) -> None:
        for _ in range(self.times):
            signal.raise_signal(self.signum)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.at == ("batch", trainer.global_step):
            self._send()

    def on_validation_start(self, trainer, module) -> None:
        self.validations += 1
        if self.at == ("validation", self.validations):
            self._send()

    def on_train_end(self, trainer, module) -> None:
        if self.at[0] == "train_end":
            self._send()


@pytest.fixture
def requeue_calls():
    """SIGUSR2's handler before the callback (submitit's): records its calls."""
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGUSR2, previous)


def test_a_requeue_signal_after_the_last_step_is_still_passed_on(tmp_path: Path, requeue_calls):
    """SIGUSR2 that comes once no step is left to end (say during the final hooks): nothing is
    saved, but submitit's handler is still called when fitting ends, so the job is requeued."""
    on_signal = CheckpointOnSignal(str(tmp_path / "ckpt"))
    tiny_trainer(tmp_path, 2, [on_signal, Signal(("train_end", None))]).fit(TinyNet(), vectors())
    assert requeue_calls == [signal.SIGUSR2] and on_signal.saved_at is None


def test_a_repeated_requeue_signal_still_saves_once(tmp_path: Path, requeue_calls):
    """SIGUSR2 twice in one step (SLURM may signal again) is no "second stop signal": the
    step's end saves last.ckpt and then calls submitit's handler once."""
    on_signal = CheckpointOnSignal(str(tmp_path / "ckpt"))
    callbacks = [on_signal, Signal(("batch", 1), times=2)]
    tiny_trainer(tmp_path, 4, callbacks).fit(TinyNet(), vectors())
    assert on_signal.saved_at == 2 and (tmp_path / "ckpt" / "last.ckpt").is_file()
    assert requeue_calls == [signal.SIGUSR2]


def test_a_signal_during_fits_validation_saves_at_its_end(tmp_path: Path, requeue_calls):
    """A signal that comes during the validation pass of a fit is acted on when that pass
    ends, not one training step later."""
    on_signal = CheckpointOnSignal(str(tmp_path / "ckpt"))
    callbacks = [on_signal, Signal(("validation", 1))]
    fit = tiny_trainer(tmp_path, 6, callbacks, limit_val_batches=1, val_check_interval=2)
    fit.fit(TinyNet(), vectors(), vectors(8))
    assert on_signal.saved_at == 2 and requeue_calls == [signal.SIGUSR2]


def test_the_handlers_are_not_installed_outside_fitting(tmp_path: Path):
    """trainer.validate() leaves Ctrl-C and SIGTERM as they were: nothing to save there, and
    the signal must not wait for the end of the pass."""
    seen = []

    class Record(L.Callback):
        def on_validation_start(self, trainer, module) -> None:
            seen.append(signal.getsignal(signal.SIGINT))

    on_signal = CheckpointOnSignal(str(tmp_path / "ckpt"))
    before = signal.getsignal(signal.SIGINT)
    trainer = tiny_trainer(tmp_path, 1, [on_signal, Record()], limit_val_batches=1)
    trainer.validate(TinyNet(), vectors(8), verbose=False)
    assert seen == [before]


def test_rank_zero_of_a_fresh_run_keeps_its_seed_everything_stream():
    """SeedEachRank reseeds other ranks and resumed runs only: a single-process run from step
    0 draws what seed_everything gave it."""
    seeds = SeedEachRank(0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    seeds.on_train_start(SimpleNamespace(global_rank=0, global_step=0), None)
    assert torch.equal(torch.rand(3), expected)
    for rank, step in ((1, 0), (0, 5)):
        torch.manual_seed(123)
        seeds.on_train_start(SimpleNamespace(global_rank=rank, global_step=step), None)
        assert not torch.equal(torch.rand(3), expected)


def test_skipped_samples_are_summed_over_ranks():
    """data/skipped* are totals over every rank, not a mean of the ranks' counts."""
    from flowturbo.lit.callbacks import LogSkippedSamples

    class Strategy:  # another rank skipped 5 of each kind
        def reduce(self, value: torch.Tensor, reduce_op: str) -> torch.Tensor:
            both = torch.stack([value, torch.tensor(5.0)])
            return both.sum() if reduce_op == "sum" else both.mean()

    logged: dict[str, float] = {}
    datamodule = SimpleNamespace(
        skipped_summary=lambda: {"data/skipped": 1, "data/skipped_val": 0}
    )
    trainer = SimpleNamespace(datamodule=datamodule, strategy=Strategy())
    module = SimpleNamespace(
        device=torch.device("cpu"), log=lambda key, value, **kw: logged.update({key: float(value)})
    )
    LogSkippedSamples().on_train_epoch_end(trainer, module)
    assert logged == {"data/skipped": 6.0, "data/skipped_val": 5.0}


def tiny_flow_module() -> L.LightningModule:
    from flowturbo.lit import FlowMatchingModule
    from flowturbo.models import SiT

    torch.manual_seed(0)
    sit = SiT.from_name("SiT-Tiny/2", input_size=8, in_channels=1, num_classes=3)
    return FlowMatchingModule(sit, lambda params: torch.optim.SGD(params, lr=0.01))


def test_sample_grid_is_drawn_once_per_step_with_gradient_accumulation(
    tmp_path: Path, monkeypatch
):
    """With accumulated batches a step starts several batches: its grid is drawn once."""
    import torchvision.utils

    saved: list[str] = []
    monkeypatch.setattr(torchvision.utils, "save_image", lambda x, path, **kw: saved.append(path))
    grids = SampleGrid(every_n_steps=1, num_images=3, base_schedule="H1", out_dir=str(tmp_path))
    x = torch.randn(8, 1, 8, 8)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.arange(8) % 3), batch_size=2
    )
    tiny_trainer(tmp_path, 2, [grids], accumulate_grad_batches=2).fit(tiny_flow_module(), data)
    assert [Path(p).name for p in saved] == ["step_000001.png", "step_000002.png"]


def test_the_sample_grids_noise_follows_its_seed(tmp_path: Path, monkeypatch):
    """The grid's noise is fixed by ``seed``: the same seed draws the same grid, another seed
    another grid."""
    import torchvision.utils

    images: list[torch.Tensor] = []
    monkeypatch.setattr(torchvision.utils, "save_image", lambda x, path, **kw: images.append(x))
    module = tiny_flow_module()
    trainer = L.Trainer(logger=False, enable_progress_bar=False)
    for seed in (0, 0, 1):
        grid = SampleGrid(num_images=3, base_schedule="H1", seed=seed, out_dir=str(tmp_path))
        grid.on_train_end(trainer, module)
    assert torch.equal(images[0], images[1]) and not torch.equal(images[0], images[2])


@pytest.mark.parametrize("training", [True, False])
def test_a_sample_grid_leaves_the_models_in_their_mode(tmp_path: Path, training: bool):
    """The grid samples in eval mode, then puts every model back as it was (a net left in eval
    mode would train without its label dropout)."""
    module = tiny_flow_module()
    module.train(training)
    grids = SampleGrid(num_images=3, base_schedule="H1", out_dir=str(tmp_path))
    grids.on_train_end(L.Trainer(logger=False, enable_progress_bar=False), module)
    assert (tmp_path / "step_000000.png").is_file()
    assert all(m.training is training for m in module.modules())


# ----------------------------------------------------------------------------- common


def test_ema_decay_must_be_below_one():
    """A decay of 1 would never move the EMA away from the initial weights."""
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\), got 1.0"):
        ema_copy(nn.Linear(2, 1), 1.0)
    ema_copy(nn.Linear(2, 1), 0.0)


def test_ema_warm_up_follows_its_formula():
    """After n averaged updates the decay is min(decay, (1 + n) / (10 + n)): the second update
    keeps 2/11 of the average, later ones at most ``decay``."""
    net = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(net.weight)
    ema = ema_copy(net, 0.5)
    ema.update_parameters(net)  # the first copies
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update_parameters(net)  # n = 1: keep 2/11
    assert float(ema.module.weight) == pytest.approx(9 / 11)
    for _ in range(20):  # n >= 8: keep min(0.5, ...) = 0.5
        with torch.no_grad():
            net.weight.fill_(0.0)
        ema.update_parameters(net)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update_parameters(net)
    assert float(ema.module.weight) == pytest.approx(0.5, abs=1e-3)


class WithStatistic(nn.Module):
    """A layer and a float buffer that training updates (as a running statistic)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.register_buffer("statistic", torch.zeros(2))


def test_ema_averages_buffers_and_has_no_gradients():
    """Buffers are averaged like the weights (not copied from the live network); the EMA's
    parameters never require gradients."""
    net = WithStatistic()
    ema = ema_copy(net, 0.9)
    assert not any(p.requires_grad for p in ema.parameters())
    ema.update_parameters(net)  # the first copies
    net.statistic.fill_(1.0)
    ema.update_parameters(net)  # n = 1: keep 2/11 of the average
    assert ema.module.statistic.tolist() == pytest.approx([9 / 11, 9 / 11])


def test_ema_of_a_network_with_batchnorm_copies_its_integer_buffers():
    """BatchNorm's num_batches_tracked is an int64 buffer: averaging it with a float decay made
    the second EMA update raise (a network with BatchNorm failed at training step 2)."""
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ema_copy(net, 0.9)
    for _ in range(3):
        net(torch.randn(4, 2))  # a training forward: running statistics and the count move
        ema.update_parameters(net)
    bn = ema.module[1]
    assert bn.num_batches_tracked.dtype == torch.int64 and int(bn.num_batches_tracked) == 3
    assert not torch.equal(bn.running_mean, net[1].running_mean)  # averaged, not copied


def test_learning_rate_warms_up_linearly_to_its_value_and_stays():
    """Step s uses lr * min(1, (s + 1) / warmup): the first step already learns, and the lr
    never exceeds the configured one. (A negative warm-up is refused when the module is built:
    test_configs.)"""
    w = torch.nn.Parameter(torch.zeros(1))

    def lrs(warmup: int, steps: int) -> list[float]:
        out = optimizer_with_warmup([w], lambda p: torch.optim.SGD(p, lr=1.0), warmup)
        opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
        seen = []
        for _ in range(steps):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return seen

    assert lrs(4, 6) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert lrs(0, 2) == [1.0, 1.0]


def test_validation_ids_of_plain_batches_number_the_pass_from_zero():
    """Batches without ids get their places in the pass: consecutive across batches, and from
    0 again after a reset (the next validation pass draws the same noise)."""
    totals = ValidationTotals(("loss",))
    batch = (torch.zeros(3, 1), torch.zeros(3))
    assert totals.ids(batch).tolist() == [0, 1, 2]
    assert totals.ids(batch).tolist() == [3, 4, 5]
    totals.reset()
    assert totals.ids(batch).tolist() == [0, 1, 2]
