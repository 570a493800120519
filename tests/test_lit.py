import functools
import io
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from flowturbo.data import ShardDataModule
from flowturbo.data.shards import write_sample_shards
from flowturbo.lit import FlowMatchingModule, RefinerModule, load_frozen_base
from flowturbo.lit.callbacks import CheckpointOnSignal, SampleGrid, StopOnSignal
from flowturbo.lit.common import per_sample_draws
from flowturbo.models import CheckpointError, SiT, VelocityRefiner, save_checkpoint

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def tiny_sit(**kw):
    return SiT.from_name("SiT-Tiny/2", input_size=8, in_channels=1, num_classes=3, **kw)


def loader(n=64, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = (y.float() - 1).reshape(-1, 1, 1, 1).expand(n, 1, 8, 8) + 0.1 * torch.randn(
        n, 1, 8, 8, generator=g
    )
    return DataLoader(TensorDataset(x.contiguous(), y), batch_size=batch, shuffle=True)


def trainer(tmp_path, steps, **kw):
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


class LossHistory(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


AdamW = functools.partial(torch.optim.AdamW, lr=2e-3)


def test_flow_matching_module_learns(tmp_path):
    torch.manual_seed(0)
    module = FlowMatchingModule(tiny_sit(), AdamW, warmup_steps=5, ema_decay=0.9)
    history = LossHistory()
    trainer(tmp_path, 80, callbacks=[history]).fit(module, loader())
    first, last = sum(history.losses[:10]) / 10, sum(history.losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    # the EMA moved away from its initial copy and differs from the live weights
    ema_w = module.ema.module.final_layer.linear.weight
    assert ema_w.abs().sum() > 0
    assert not torch.equal(ema_w, module.net.final_layer.linear.weight)


@pytest.fixture
def base_file(tmp_path):
    torch.manual_seed(1)
    base = tiny_sit(learn_sigma=False)
    for p in base.final_layer.parameters():  # a base with non-trivial velocities
        torch.nn.init.normal_(p, std=0.1)
    path = tmp_path / "base.pt"
    save_checkpoint(base, path)
    return path


def refiner_module(base_file, **kw):
    refiner = VelocityRefiner.from_name(
        "SiT-Tiny/2", input_size=8, in_channels=1, num_classes=3, learn_sigma=False
    )
    base = functools.partial(load_frozen_base, str(base_file))
    return RefinerModule(refiner, base, AdamW, dt_max=0.12, warmup_steps=5, **kw)


def test_label_dropout_with_a_base_or_refiner_without_a_null_class_is_refused(tmp_path):
    """Dropped labels indexed past the table of a SiT built with class_dropout_prob=0: a bare
    "index out of range in self" at the first step (a device-side assert on a GPU)."""
    path = tmp_path / "no_null.pt"
    save_checkpoint(tiny_sit(learn_sigma=False, class_dropout_prob=0.0), path)
    module = refiner_module(path)
    with pytest.raises(
        ValueError, match="model.label_dropout=0.1 drops labels to the null class 3"
    ):
        module.setup("fit")
    refiner_module(path, label_dropout=0.0).setup("fit")  # without dropout it trains
    no_null = VelocityRefiner.from_name(
        "SiT-Tiny/2", input_size=8, in_channels=1, num_classes=3, class_dropout_prob=0.0
    )
    with pytest.raises(ValueError, match="null class 3, but the refiner has no embedding"):
        RefinerModule(no_null, functools.partial(load_frozen_base, str(path)), AdamW)


def test_refiner_targets_are_made_in_float32_under_bf16_mixed_precision(base_file):
    """Under bf16-mixed (the GPU trainer's) the targets V(x', t') - v, small differences of two
    velocities, were bfloat16: a 39 % RMS error on the demo base. Now in float32 by default;
    model.base_autocast=true keeps the trainer's precision."""
    x1 = torch.randn(16, 1, 8, 8)
    y = torch.arange(16) % 3
    ids = torch.arange(16)
    results = {}
    for autocast in (False, True):
        module = refiner_module(base_file, base_autocast=autocast)
        module.setup("fit")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[autocast], _ = module.examples(x1, y, ids)
    module = refiner_module(base_file)
    module.setup("fit")
    exact, _ = module.examples(x1, y, ids)  # no autocast at all
    assert results[False].target.dtype == torch.float32
    assert torch.equal(results[False].target, exact.target)
    assert results[True].target.dtype == torch.bfloat16  # the faster, rounded choice


def test_base_and_refiner_see_the_same_dropped_labels(base_file):
    """The base making the targets gets the refiner's labels and force_drop_ids (a base given y
    alone made conditional targets for examples the refiner saw as the null class), and labels
    are dropped with probability label_dropout: none at 0, all at 1."""
    x1, y, ids = torch.randn(64, 1, 8, 8), torch.arange(64) % 3, torch.arange(64)
    calls = []
    for dropout, fewest, most in ((0.0, 0, 0), (0.5, 16, 48), (1.0, 64, 64)):
        module = refiner_module(base_file, label_dropout=dropout)
        module.setup("fit")
        module.base.register_forward_pre_hook(
            lambda net, args, kwargs: calls.append(kwargs), with_kwargs=True
        )
        for sample_ids in (ids, None):  # validation (drawn from each sample's id), training
            calls.clear()
            _, kw = module.examples(x1, y, sample_ids)
            dropped = int(kw["force_drop_ids"].sum())
            assert fewest <= dropped <= most, (dropout, dropped)
            assert len(calls) == 2  # V(x_t, t) and V(x', t')
            for call in calls:
                assert call.keys() == {"y", "force_drop_ids"}
                assert torch.equal(call["y"], y)
                assert torch.equal(call["force_drop_ids"], kw["force_drop_ids"])


def test_validation_scores_the_ema_refiner(tmp_path, base_file):
    """val/loss is the loss of the EMA refiner (the one sampled and shipped), not of the raw
    weights being trained."""
    from flowturbo.flow import refiner_loss

    torch.manual_seed(0)
    module = refiner_module(base_file, ema_decay=0.9)
    trainer(tmp_path, 10, limit_val_batches=0).fit(module, loader())
    x, y, ids = torch.randn(12, 1, 8, 8), torch.arange(12) % 3, torch.arange(12)
    val = DataLoader(TensorDataset(x, y, ids), batch_size=4)
    (metrics,) = trainer(tmp_path, 1).validate(module, val, verbose=False)
    module.eval()
    with torch.no_grad():
        examples, kw = module.examples(x, y, ids)
        ema = float(refiner_loss(module.ema.module, examples, **kw))
        raw = float(refiner_loss(module.refiner, examples, **kw))
    assert abs(raw - ema) > 1e-3 * ema  # the EMA lags the trained weights
    assert metrics["val/loss"] == pytest.approx(ema, rel=1e-5)
    # and the trained weights' own, which export=net ships (net.pt recorded the EMA's)
    assert metrics["val/loss_net"] == pytest.approx(raw, rel=1e-5)


def test_refiner_module_trains_only_the_refiner(tmp_path, base_file):
    torch.manual_seed(0)
    module = refiner_module(base_file)
    history = LossHistory()
    fit = trainer(tmp_path, 60, callbacks=[history], limit_val_batches=2)
    fit.fit(module, loader(), val_dataloaders=loader(32, seed=1))
    reference = load_frozen_base(str(base_file))
    for (name, p), q in zip(module.base.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), f"frozen base weight {name} changed"
        assert p.grad is None and not p.requires_grad
    assert not module.base.training
    assert all(not k.startswith("_base") for k in module.state_dict())  # base not saved
    first, last = sum(history.losses[:10]) / 10, sum(history.losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    metrics = fit.callback_metrics
    assert float(metrics["val/error_ratio"]) < 1.0  # better than keeping v unchanged


def test_resume_from_last_continues_the_step_count(tmp_path, base_file):
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    torch.manual_seed(0)
    first = refiner_module(base_file)
    trainer(tmp_path, 6, callbacks=[ckpt], limit_val_batches=0).fit(first, loader())
    ema_before = first.ema.n_averaged.item()
    second = refiner_module(base_file)
    t2 = trainer(tmp_path, 10, limit_val_batches=0)
    t2.fit(second, loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert t2.global_step == 10
    assert ema_before == 6 and second.ema.n_averaged.item() == 10  # EMA resumed, not restarted


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_a_checkpoint_mid_run_holds_the_ema_of_its_step(tmp_path, base_file, kind):
    """ModelCheckpoint saves in on_train_batch_end, before the module's own hook: an EMA updated
    there would be one step behind in every checkpoint, and a resumed run would miss an update."""
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=3, filename="{step}"
    )
    torch.manual_seed(0)
    base = kind == "base"
    module = FlowMatchingModule(tiny_sit(), AdamW) if base else refiner_module(base_file)
    trainer(tmp_path, 3, callbacks=[ckpt], limit_val_batches=0).fit(module, loader())
    state = torch.load(tmp_path / "ckpt" / "step=3.ckpt", weights_only=False)["state_dict"]
    assert state["ema.n_averaged"].item() == 3
    ema = {k.removeprefix("ema."): v for k, v in state.items() if k.startswith("ema.")}
    for name, value in module.ema.state_dict().items():  # the EMA as it stood at step 3
        torch.testing.assert_close(ema[name], value, rtol=0, atol=0)


def test_a_damaged_last_checkpoint_is_named_with_what_to_do(tmp_path, base_file):
    """A job killed while saving can leave last.ckpt cut off; every requeue would then crash."""
    from flowturbo.train import check_resumable

    module = refiner_module(base_file)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, 2, callbacks=[ckpt], limit_val_batches=0).fit(module, loader())
    last = tmp_path / "ckpt" / "last.ckpt"
    check_resumable(str(last), module)  # whole: accepted
    last.write_bytes(last.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"last.ckpt cannot be read .* rerun with resume=false"):
        check_resumable(str(last), module)
    with pytest.raises(ValueError, match=r"model.label_dropout must be in \[0, 1\], got 2.0"):
        refiner_module(base_file, label_dropout=2.0)


def test_checkpoints_are_written_in_their_own_folder_whatever_tmpdir_is(
    tmp_path, base_file, monkeypatch
):
    """Lightning's default writes through TMPDIR and moves the file; across file systems (a
    cluster's node-local /tmp) a move is a copy, and a kill during it cuts last.ckpt off."""
    import tempfile

    from flowturbo.lit.common import AtomicCheckpointIO

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no_tmpdir"))  # nothing may go there
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    module = refiner_module(base_file)
    fit = trainer(
        tmp_path, 2, callbacks=[ckpt], limit_val_batches=0, plugins=[AtomicCheckpointIO()]
    )
    fit.fit(module, loader())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")] == []


def test_the_modules_pickle_as_ddp_spawn_needs(base_file):
    """ddp_spawn pickles the module; the EMA's update was a closure, which does not pickle."""
    import pickle

    for module in (FlowMatchingModule(tiny_sit(), AdamW), refiner_module(base_file)):
        again = pickle.loads(pickle.dumps(module))
        assert again.ema.n_averaged.item() == 0


def test_missing_or_wrong_base_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.base.path"):
        load_frozen_base(str(tmp_path / "nope.pt"))
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read as a PyTorch checkpoint"):
        load_frozen_base(str(text))
    base = SiT.from_name("SiT-Tiny/2", input_size=8, in_channels=1, num_classes=3)
    save_checkpoint(VelocityRefiner.from_base(base), tmp_path / "refiner.pt")
    with pytest.raises(CheckpointError, match="holds a velocity refiner, not a base"):
        load_frozen_base(str(tmp_path / "refiner.pt"))


def test_base_errors_name_the_callers_settings(tmp_path):
    """Each script names its own keys: train.py's by default, others' through ``keys``."""
    keys = {"path": "cache.base.path", "name": "cache.base.name"}
    with pytest.raises(FileNotFoundError, match=r"Set cache\.base\.path to a SiT checkpoint"):
        load_frozen_base(str(tmp_path / "nope.pt"), keys=keys)
    torch.save(tiny_sit().state_dict(), tmp_path / "bare.pt")  # a public-style state dict
    with pytest.raises(CheckpointError, match=r"set model\.base\.name \(e\.g\. SiT-XL/2\)"):
        load_frozen_base(str(tmp_path / "bare.pt"))
    with pytest.raises(CheckpointError, match=r"set cache\.base\.name \(e\.g\. SiT-XL/2\)"):
        load_frozen_base(str(tmp_path / "bare.pt"), keys=keys)
    save_checkpoint(VelocityRefiner.from_base(tiny_sit()), tmp_path / "refiner.pt")
    with pytest.raises(CheckpointError, match=r"base flow model: set cache\.base\.path to"):
        load_frozen_base(str(tmp_path / "refiner.pt"), keys=keys)


@pytest.mark.parametrize("cache", ["demo", "imagenet"])
def test_cache_trajectories_base_errors_name_its_settings(tmp_path, cache):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "cache_trajectories", overrides=[f"cache={cache}", f"cache.base.path={tmp_path}/no"]
        )
    with pytest.raises(FileNotFoundError, match=r"Set cache\.base\.path to"):
        instantiate(cfg.cache.base)()


class SendSignal(L.Callback):
    """Signals this process at the start of the step at ``at_step`` (``times`` times): mid-step,
    as SLURM may."""

    def __init__(self, at_step, signum, times=1):
        self.at_step, self.signum, self.times = at_step, signum, times

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


def test_sigusr2_saves_last_checkpoint_then_calls_the_previous_handler(tmp_path):
    """What submitit's time-out warning does: last.ckpt at the end of the step under way,
    then submitit requeues."""
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        torch.manual_seed(0)
        module = FlowMatchingModule(tiny_sit(), AdamW)
        on_signal = CheckpointOnSignal(str(tmp_path / "ckpt"))
        callbacks = [on_signal, SendSignal(3, signal.SIGUSR2)]
        trainer(tmp_path, 5, callbacks=callbacks, limit_val_batches=0).fit(module, loader())
        assert calls == [signal.SIGUSR2] and on_signal.saved_at == 4  # step 3 done, then saved
        saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
        assert saved["global_step"] == 4 and saved["optimizer_states"]
        assert signal.getsignal(signal.SIGUSR2) is not on_signal._handle  # uninstalled after fit
    finally:
        signal.signal(signal.SIGUSR2, previous)


def stop_now(signum, frame):
    """Stands in for what SIGINT and SIGTERM do by default: stop the process."""
    raise KeyboardInterrupt


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_save_last_checkpoint_then_stop(tmp_path, signum):
    """Ctrl-C (or kill, scancel) lost every step since the last periodic checkpoint: now the
    step under way ends, last.ckpt is saved and the run stops (status 1); a second signal stops
    at once, without saving."""
    before = signal.signal(signum, stop_now)
    try:
        for times, saved_step in ((1, 4), (2, None)):
            torch.manual_seed(0)
            folder = tmp_path / f"ckpt{times}"
            on_signal = CheckpointOnSignal(str(folder))
            callbacks = [on_signal, SendSignal(3, signum, times)]
            fit = trainer(tmp_path, 8, callbacks=callbacks, limit_val_batches=0)
            with pytest.raises(SystemExit) as stopped:  # Lightning's graceful shutdown
                fit.fit(FlowMatchingModule(tiny_sit(), AdamW), loader())
            assert stopped.value.code == 1 and fit.global_step < 8
            assert on_signal.saved_at == saved_step
            if saved_step is None:
                assert not (folder / "last.ckpt").exists()
            else:
                saved = torch.load(folder / "last.ckpt", weights_only=False)
                assert saved["global_step"] == saved_step and saved["optimizer_states"]
            with pytest.raises(KeyboardInterrupt):  # after the run, the signal stops at once
                signal.getsignal(signum)(signum, None)
    finally:
        signal.signal(signum, before)


DDP_SIGNAL_RUN = """
import os, signal, sys, time
import lightning as L, torch
from torch import nn
from flowturbo.lit.callbacks import CheckpointOnSignal, StopOnSignal

folder, signame, ranks, strategy, task = sys.argv[1:]

class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(8, 8)

    def on_fit_start(self):
        open(f"{folder}/pid{self.global_rank}", "w").write(str(os.getpid()))

    on_predict_start = on_fit_start

    def send(self, wait):
        if self.global_rank == 0 and not hasattr(self, "sent"):
            self.sent = True
            time.sleep(wait)  # training: the other rank now waits in the gradient all-reduce
            for rank in ranks.split(","):
                os.kill(int(open(f"{folder}/pid{rank}").read()), getattr(signal, signame))

    def training_step(self, batch, i):
        if self.global_step == 3:
            self.send(2)
        return self.net(batch[0]).pow(2).mean()

    def predict_step(self, batch, i):
        if i == 3:
            self.send(0)
        time.sleep(0.3)
        print("rank", self.global_rank, "predicted batch", i, flush=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

def submitit_stand_in(signum, frame):
    print("requeue asked by pid", os.getpid(), flush=True)

class StandIn(L.Callback):
    def setup(self, trainer, module, stage):  # in each rank, before the callback
        signal.signal(signal.SIGUSR2, submitit_stand_in)

if __name__ == "__main__":
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 8)), 4)
    on_signal = CheckpointOnSignal(folder) if task == "fit" else StopOnSignal()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=6, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[StandIn(), on_signal],
    )
    getattr(trainer, task)(Net(), data)
    print("finished", flush=True)
"""


def run_two_ranks(folder: Path, signame: str, ranks: str, strategy: str, task: str = "fit"):
    """DDP_SIGNAL_RUN's ``task`` (fit or predict) on two CPU ranks, rank 0 sending ``signame``
    to ``ranks`` in step or batch 3; the whole process group is killed if it has not ended in
    120 s (a deadlock)."""
    script = folder / "run.py"
    script.write_text(DDP_SIGNAL_RUN)
    command = [sys.executable, str(script), str(folder), signame, ranks, strategy, task]
    run = subprocess.Popen(
        command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group: ddp's further rank included
    )  # fmt: skip
    try:
        out, err = run.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        out, err = run.communicate()
        pytest.fail(f"the ranks deadlocked after {signame} to rank(s) {ranks}: {err[-2000:]}")
    return run.returncode, out, err


def test_sigusr2_under_ddp_saves_on_every_rank_at_a_step_end(tmp_path):
    """Saving from the signal handler ran the checkpoint's barrier wherever each rank was: a rank
    inside the backward pass's all-reduce and one in the barrier deadlocked (SLURM then killed
    the job at its time limit, never requeued)."""
    code, out, err = run_two_ranks(tmp_path, "SIGUSR2", "1,0", "ddp_spawn")
    assert code == 0, err[-2000:]
    assert "finished" in out and out.count("requeue asked by pid") == 2
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 4  # the end of the step the signals came in


@pytest.mark.parametrize(
    "signame, ranks, strategy", [("SIGTERM", "1", "ddp"), ("SIGINT", "0", "ddp_spawn")]
)
def test_a_stop_signal_to_one_rank_saves_and_stops_every_rank(tmp_path, signame, ranks, strategy):
    """SIGTERM to one rank under ddp deadlocked: Lightning's own SIGTERM handler, installed over
    this one, broadcasts from rank 0 inside the handler. Under ddp_spawn torch's process wrapper
    swallowed the stop and the main process waited for results forever. Now every rank saves at
    the end of the step and the run ends with status 1."""
    code, out, err = run_two_ranks(tmp_path, signame, ranks, strategy)
    assert code == 1 and "finished" not in out, err[-2000:]
    # every rank saved and stopped (a rank's last words may be cut by Lightning's shutdown)
    assert "stopped at step 4: run the same command again" in err
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 4 and saved["optimizer_states"]


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_sigterm_stops_prediction_on_every_rank(tmp_path, strategy):
    """generate.py and cache_trajectories.py (Trainer.predict) ran on to their end after SIGTERM
    (kill, scancel): Lightning's handler acts on it only while fitting. Now each rank stops at
    the end of its batch and the job ends with status 1."""
    code, out, err = run_two_ranks(tmp_path, "SIGTERM", "0,1", strategy, task="predict")
    assert code == 1 and "finished" not in out, err[-2000:]
    assert "stopped: run the same command again to go on" in err
    for rank in (0, 1):
        assert out.count(f"rank {rank} predicted batch") < 8  # of the 8 it was dealt


GLOO_EXIT_RUN = """
import sys, torch, torch.distributed as dist, torch.multiprocessing as mp

def rank(index, port):
    import flowturbo.lit  # as a ddp_spawn rank does to unpickle the module
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=index, world_size=2)
    dist.all_reduce(torch.ones(4))
    pending = [dist.all_reduce(torch.ones(4), async_op=True) for _ in range(50)]

if __name__ == "__main__":
    mp.spawn(rank, args=(int(sys.argv[1]),), nprocs=2)
    print("finished", flush=True)
"""


def test_a_spawned_gloo_rank_exits_cleanly_with_work_under_way(tmp_path):
    """Lightning destroys NCCL process groups at exit, not gloo's: a ddp_spawn rank on CPUs
    whose gloo work was still referenced at exit aborted in the interpreter's shutdown
    (SIGABRT, "terminate called without an active exception") after finishing its job, which
    failed the whole run now and then. Here every rank leaves 50 reductions under way."""
    with socket.socket() as s:  # a free port for the ranks' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "run.py"
    script.write_text(GLOO_EXIT_RUN)
    run = subprocess.run(
        [sys.executable, str(script), str(port)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and "finished" in run.stdout, run.stderr[-2000:]


@pytest.mark.parametrize("times", [1, 2])
def test_sigterm_ends_prediction_after_its_batch_and_a_second_one_at_once(tmp_path, times):
    """One SIGTERM: the batch under way ends, then the job (status 1); a second one within it
    does what SIGTERM did before the job (here a stand-in that raises), as it does after it."""

    class Signalled(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net, self.done = torch.nn.Linear(2, 2), []

        def predict_step(self, batch, i):
            for _ in range(times if i == 1 else 0):
                os.kill(os.getpid(), signal.SIGTERM)
            self.done.append(i)

    class Stand(Exception):
        pass

    def stand_in(signum, frame):
        raise Stand

    before = signal.signal(signal.SIGTERM, stand_in)
    try:
        data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=1)
        module = Signalled()
        with pytest.raises(SystemExit if times == 1 else Stand) as stopped:
            trainer(tmp_path, 1, callbacks=[StopOnSignal()]).predict(module, data)
        assert module.done == ([0, 1] if times == 1 else [0])
        assert times == 2 or stopped.value.code == 1
        with pytest.raises(Stand):  # after the job, SIGTERM does what it did before
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sample_grids_from_fixed_noise(tmp_path, base_file):
    torch.manual_seed(0)
    grids = SampleGrid(every_n_steps=2, num_images=6, out_dir=str(tmp_path / "a"))
    module = refiner_module(base_file)
    trainer(tmp_path, 4, callbacks=[grids], limit_val_batches=0).fit(module, loader())
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "step_000002.png",
        "step_000004.png",
    ]
    # the same noise and labels: a second run with the same weights draws the same grid
    again = SampleGrid(every_n_steps=2, num_images=6, out_dir=str(tmp_path / "b"))
    again._grid(L.Trainer(logger=False), module)
    first = np.asarray(Image.open(tmp_path / "a" / "step_000004.png"))
    second = np.asarray(Image.open(tmp_path / "b" / "step_000000.png"))
    assert np.array_equal(first, second)
    assert first.shape[:2] == (2 + 2 * 10, 2 + 3 * 10)  # 2 rows of 3 classes, 8 px + padding


def test_ema_warms_up_and_forgets_the_initial_weights():
    from flowturbo.lit.common import ema_copy

    net = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    ema = ema_copy(net, 0.999)
    ema.update_parameters(net)  # the first update copies the initial weights
    with torch.no_grad():
        net.weight.fill_(1.0)
    for _ in range(300):
        ema.update_parameters(net)
    # a fixed 0.999 would be at 1 - 0.999**300 = 0.26 here
    assert 0.9 < float(ema.module.weight[0, 0]) < 1.0


def _digit_shards(out: Path, n: int, shard_size: int) -> Path:
    """``n`` random 8x8 grayscale PNGs, labels 0-2, as shards of ``shard_size``."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(png, format="PNG")
        samples.append((f"s{i:03d}", {"png": png.getvalue(), "cls": i % 3}))
    write_sample_shards(samples, out, shard_size=shard_size, progress=False)
    return out


def _validate(module, tmp_path, shards: Path, batch: int, ranks: int = 1) -> dict:
    data = ShardDataModule(val_shards=str(shards), channels=1, val_batch_size=batch, num_workers=0)
    spawn = {"devices": ranks, "strategy": "ddp_spawn"} if ranks > 1 else {}
    (metrics,) = trainer(tmp_path, 1, **spawn).validate(module, datamodule=data, verbose=False)
    return metrics


def test_validation_metrics_do_not_depend_on_the_batch_size(tmp_path, base_file):
    torch.manual_seed(0)
    module = refiner_module(base_file)
    shards = _digit_shards(tmp_path / "val", 11, shard_size=4)
    by_4, by_7 = (_validate(module, tmp_path, shards, batch) for batch in (4, 7))
    for key in ("val/loss", "val/loss_unrefined", "val/error_ratio"):
        assert by_7[key] == pytest.approx(by_4[key], rel=1e-5), key
    # the error ratio is of sums over the set, not a mean of the batches' ratios
    assert by_4["val/error_ratio"] == pytest.approx(
        by_4["val/loss"] / by_4["val/loss_unrefined"], rel=1e-5
    )
    base = FlowMatchingModule(tiny_sit(learn_sigma=False), AdamW)
    by_4, by_7 = (_validate(base, tmp_path, shards, batch) for batch in (4, 7))
    assert by_7["val/loss"] == pytest.approx(by_4["val/loss"], rel=1e-5)


@pytest.mark.parametrize("samples", [3, 1], ids=["uneven", "a-rank-without-samples"])
def test_validation_metrics_are_over_the_whole_set_on_two_ranks(tmp_path, base_file, samples):
    torch.manual_seed(0)
    module = refiner_module(base_file)
    shards = _digit_shards(tmp_path / "val", samples, shard_size=4)  # one shard: split by sample
    alone = _validate(module, tmp_path, shards, batch=2)
    two = _validate(module, tmp_path, shards, batch=2, ranks=2)
    for key in ("val/loss", "val/loss_unrefined", "val/error_ratio"):
        assert two[key] == pytest.approx(alone[key], rel=1e-5), key


def test_per_sample_draws_depend_on_the_whole_id_alone():
    """torch's CPU generator keeps a seed's low 32 bits: ids shard * 2**32 + position of two
    shards drew the same noise before the ids were hashed."""
    draw = lambda g: (torch.randn(3, generator=g),)  # noqa: E731
    ids = torch.tensor([5, 2**32 + 5, 2 * 2**32 + 5, 7])
    (x,) = per_sample_draws(ids, draw)
    assert len({tuple(row.tolist()) for row in x}) == 4
    (again,) = per_sample_draws(ids.flip(0)[:2], draw)  # another batch, another order
    assert torch.equal(again, x.flip(0)[:2])
