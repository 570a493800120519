"""The trajectory cache: written by cache_trajectories (Lightning predict), resumed, read back
by the DataModule and trained on without a base."""

import io
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from flowturbo.data import Manifest, ShardDataModule, read_shard, resolve_shards
from flowturbo.data.shards import write_tar
from flowturbo.lit import RefinerModule
from flowturbo.models import SiT, VelocityRefiner, save_checkpoint
from flowturbo.sampling import heun_trajectory
from flowturbo.train import cache_trajectories

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    torch.manual_seed(0)
    net = SiT.from_name("SiT-Tiny/2", input_size=8, in_channels=1, num_classes=3)
    for p in net.parameters():  # SiT's zero-initialised layers would make a constant flow
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path_factory.mktemp("base") / "base.pt"
    save_checkpoint(net, path)
    return path


def cache_cfg(base_file, out_dir, *extra):
    overrides = [
        f"cache.base.path={base_file}",
        "cache.shape=[1,8,8]",
        "cache.num_classes=3",
        "cache.num_train=10",
        "cache.num_val=3",
        "cache.steps=4",
        "cache.per_shard=4",
        "cache.batch_size=3",
        f"out_dir={out_dir}",
        "+trainer.enable_progress_bar=false",
        *extra,
    ]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("cache_trajectories", overrides=overrides)
    return cfg


def test_cache_is_written_complete_and_true_to_the_base(base_file, tmp_path):
    out = tmp_path / "traj"
    summary = cache_trajectories(cache_cfg(base_file, out))
    assert summary["train"] == {"trajectories": 10, "shards": 3, "complete": True}
    assert summary["val"] == {"trajectories": 3, "shards": 1, "complete": True}
    assert Manifest.load(out / "train").meta["steps"] == 4

    samples = [f for p in sorted((out / "train").glob("shard-*.tar")) for f in read_shard(p)]
    assert [k for k, _ in samples] == [f"t{i:08d}" for i in range(10)]
    base = SiT.from_name("SiT-Tiny/2", input_size=8, in_channels=1, num_classes=3)
    base.load_state_dict(torch.load(base_file, weights_only=True)["model"])
    base.eval()
    traj = torch.from_numpy(np.stack([np.load(io.BytesIO(f["traj.npy"])) for _, f in samples]))
    labels = torch.tensor([int(f["cls"]) for _, f in samples])
    assert traj.shape == (10, 2, 5, 1, 8, 8) and traj.dtype == torch.float16
    assert set(labels.tolist()) <= {0, 1, 2, 3}  # 3 = the null class
    # the cached points are the base's Heun trajectories from the cached start
    states, velocities, _ = heun_trajectory(base, traj[:, 0, 0].float(), 4, y=labels)
    torch.testing.assert_close(traj[:, 0].float(), states, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(traj[:, 1].float(), velocities, atol=2e-3, rtol=2e-3)
    # val trajectories follow the train ones (indices 10-12): other noise, not a copy of train's
    val = [f for p in sorted((out / "val").glob("shard-*.tar")) for f in read_shard(p)]
    assert [k for k, _ in val] == [f"t{i:08d}" for i in range(10, 13)]
    val_starts = np.stack([np.load(io.BytesIO(f["traj.npy"]))[0, 0] for _, f in val])
    train_starts = traj[:, 0, 0].numpy()
    assert not any(np.array_equal(v, t) for v in val_starts for t in train_starts)


def test_cache_resumes_and_refuses_other_settings(base_file, tmp_path):
    out = tmp_path / "traj"
    cache_trajectories(cache_cfg(base_file, out))
    shard = out / "train" / "shard-000001.tar"
    before = shard.read_bytes()
    shard.unlink()  # as if the job died before writing it
    other = (out / "train" / "shard-000000.tar").stat().st_mtime_ns
    summary = cache_trajectories(cache_cfg(base_file, out))
    assert summary["train"]["complete"] and shard.read_bytes() == before  # same content
    assert summary["shards_written"] == 1
    assert (out / "train" / "shard-000000.tar").stat().st_mtime_ns == other  # not rewritten
    # shards cut or changed since they were written are written again, and only they
    cut, grown = out / "train" / "shard-000000.tar", out / "val" / "shard-000000.tar"
    whole = {p: p.read_bytes() for p in (cut, grown)}
    with tarfile.open(cut) as tar:
        cut.write_bytes(whole[cut][: tar.getmembers()[2].offset])  # after sample 0: a tar cut
    grown.write_bytes(whole[grown] + bytes(1024))  # a tar still, but not the one recorded
    kept = shard.stat().st_mtime_ns
    summary = cache_trajectories(cache_cfg(base_file, out))
    assert summary["shards_written"] == 2 and summary["train"]["complete"]
    assert all(p.read_bytes() == b for p, b in whole.items())
    assert shard.stat().st_mtime_ns == kept
    # damage the size does not show: the tar end overwritten in place, and a shard cut where
    # no manifest records its size (a shard of a run killed before its closing manifest)
    overwritten, uncut = out / "train" / "shard-000002.tar", out / "val" / "shard-000000.tar"
    whole = {p: p.read_bytes() for p in (overwritten, uncut)}
    overwritten.write_bytes(whole[overwritten][:-512] + b"\xff" * 512)
    with tarfile.open(uncut) as tar:
        uncut.write_bytes(whole[uncut][: tar.getmembers()[2].offset])
    (out / "val" / "manifest.json").unlink()
    summary = cache_trajectories(cache_cfg(base_file, out))
    assert summary["shards_written"] == 2 and summary["val"]["complete"]
    assert all(p.read_bytes() == b for p, b in whole.items())
    # every setting of the plan is part of the cache's identity
    for override, differs in (
        ("cache.steps=5", "steps"),
        ("cache.label_dropout=0.5", "label_dropout"),
        ("cache.per_shard=5", "per_shard"),
        ("cache.num_val=4", "counts"),
        ("seed=1", "seed"),
        ("cache.base_autocast=true", "base_precision"),
    ):
        with pytest.raises(RuntimeError, match=rf"differs in \['{differs}'\]"):
            cache_trajectories(cache_cfg(base_file, out, override))


@pytest.mark.parametrize(
    ("dropout", "fewest", "most"), [(0.0, 0, 0), (0.1, 60, 140), (1.0, 1000, 1000)]
)
def test_cached_labels_are_the_null_class_with_probability_label_dropout(dropout, fewest, most):
    """cache.label_dropout is the share of null-class trajectories (not of conditional ones);
    the draw changes neither a trajectory's noise nor its label when kept."""
    from flowturbo.lit.trajectories import TrajectoryCache

    def cache(label_dropout):
        settings = {"shape": (1, 2, 2), "num_classes": 3, "num_train": 1000, "num_val": 0}
        return TrajectoryCache(None, "unused", steps=4, label_dropout=label_dropout, **settings)

    drawn = [cache(dropout)._labels_and_noise(i) for i in range(1000)]
    kept = [cache(0.0)._labels_and_noise(i) for i in range(1000)]
    nulls = sum(label == 3 for label, _ in drawn)
    assert fewest <= nulls <= most, nulls
    for (label, noise), (kept_label, kept_noise) in zip(drawn, kept, strict=True):
        assert torch.equal(noise, kept_noise) and label in (kept_label, 3)


def test_a_flow_model_of_ones_own_caches_the_sits_trajectories(base_file, tmp_path, capsys):
    """tests/own_flow.py runs the same SiT from data to noise; adapted, it is the same base,
    but a folder it did not write is refused (the adapter is part of the base's identity)."""
    own = [
        "+cache.base.factory=own_flow.load_reversed_sit",
        "+cache.base.in_channels=1",
        "+cache.base.input_size=8",
        "+cache.base.num_classes=3",
        "+cache.base.time=data_to_noise",
        "+cache.base.time_scale=1000",
        "+cache.base.null_label=-1",
    ]
    cache_trajectories(cache_cfg(base_file, tmp_path / "sit"))
    capsys.readouterr()
    cache_trajectories(cache_cfg(base_file, tmp_path / "own", *own))
    hint = capsys.readouterr().out
    assert "experiment=own_refiner" in hint and "factory=own_flow.load_reversed_sit" in hint

    def read(folder):
        files = [f for p in sorted((folder / "train").glob("*.tar")) for _, f in read_shard(p)]
        traj = np.stack([np.load(io.BytesIO(f["traj.npy"])) for f in files])
        return torch.from_numpy(traj).float(), [int(f["cls"]) for f in files]

    (sit, sit_labels), (own_traj, own_labels) = read(tmp_path / "sit"), read(tmp_path / "own")
    assert own_labels == sit_labels
    torch.testing.assert_close(own_traj, sit, atol=4e-3, rtol=4e-3)  # float16 shards
    with pytest.raises(RuntimeError, match=r"differs in \['base'\]"):
        cache_trajectories(cache_cfg(base_file, tmp_path / "sit", *own))


def test_cache_is_split_across_ddp_ranks(base_file, tmp_path):
    out = tmp_path / "traj"
    extra = ["trainer.devices=2", "+trainer.strategy=ddp_spawn"]
    summary = cache_trajectories(cache_cfg(base_file, out, *extra))
    assert summary["train"]["trajectories"] == 10 and summary["val"]["complete"]
    assert summary["shards_written"] == len(list(out.glob("*/*.tar")))  # by both ranks
    single = tmp_path / "single"
    cache_trajectories(cache_cfg(base_file, single))
    for split in ("train", "val"):
        for p in sorted((single / split).glob("*.tar")):
            assert (out / split / p.name).read_bytes() == p.read_bytes()


def test_refiner_trains_from_the_cache_without_a_base(base_file, tmp_path):
    out = tmp_path / "traj"
    cache_trajectories(cache_cfg(base_file, out))
    data = ShardDataModule(
        str(out / "train"),
        str(out / "val"),
        kind="trajectory",
        batch_size=4,
        val_batch_size=3,
        num_workers=0,
        shuffle_buffer=4,
        steps_per_epoch=4,
        val_samples=4,
    )
    refiner = VelocityRefiner.from_name("SiT-Tiny/2", input_size=8, in_channels=1, num_classes=3)
    module = RefinerModule(  # a 4-step cache: its points are 0.25 apart
        refiner, None, lambda p: torch.optim.AdamW(p, lr=1e-3), target="trajectory", dt_max=0.25
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=1,
    )
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4
    assert data.num_classes == 3  # from the cache's manifest: labels are range-checked
    assert torch.isfinite(trainer.callback_metrics["val/error_ratio"])


def test_trajectory_pairs_respect_dt_max():
    refiner = VelocityRefiner.from_name("SiT-Tiny/2", input_size=8, in_channels=1, num_classes=3)
    module = RefinerModule(refiner, None, torch.optim.AdamW, target="trajectory", dt_max=0.12)
    steps = 30
    grid = torch.arange(steps + 1.0) / steps
    # states hold their own time, velocities their index: every pair can be read back
    traj = torch.zeros(256, 2, steps + 1, 1, 2, 2)
    traj[:, 0] = grid.view(1, -1, 1, 1, 1)
    traj[:, 1] = torch.arange(steps + 1.0).view(1, -1, 1, 1, 1)
    labels, ids = torch.zeros(256, dtype=torch.long), torch.arange(256)
    for sample_ids in (ids, None):  # validation (drawn from each sample's id), training
        examples, kw = module.examples(traj, labels, sample_ids)
        b = examples.x[:, 0, 0, 0] * steps
        a = examples.v[:, 0, 0, 0]
        gap = b - a
        assert torch.allclose(examples.t, examples.x[:, 0, 0, 0])
        assert gap.min() >= 1 and gap.max() <= 3
        assert set(gap.round().tolist()) == {1.0, 2.0, 3.0}
        assert a.min() >= 0 and b.max() <= steps
        assert torch.allclose(examples.target[:, 0, 0, 0], gap)  # v_b - v_a
        assert (kw["force_drop_ids"] == 0).all()
    # each example's pair depends on its sample's id alone
    first, _ = module.examples(traj[:10], labels[:10], ids[:10])
    again, _ = module.examples(traj[5:10], labels[5:10], ids[5:10])
    assert torch.equal(first.v[5:], again.v) and torch.equal(first.x[5:], again.x)
    # a cache coarser than dt_max has no pair close enough: refused, not stretched
    coarse = traj[:, :, ::6]  # 5 steps, 0.2 apart
    with pytest.raises(ValueError, match=r"5 steps, .* cache.steps >= 9, or raise model.dt_max"):
        module.examples(coarse, labels, ids)


def test_a_killed_run_leaves_a_cache_that_is_refused_until_rerun(base_file, tmp_path, monkeypatch):
    import flowturbo.lit.trajectories as trajectories

    out = tmp_path / "traj"
    stale = out / "train" / ".shard-000002.tar.tmp-999"  # as a killed writer leaves it
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    calls = []

    def dies_after_one_shard(path, records):
        calls.append(path)
        if len(calls) > 1:
            raise RuntimeError("killed")
        return write_tar(path, records)

    monkeypatch.setattr(trajectories, "write_tar", dies_after_one_shard)
    with pytest.raises(RuntimeError, match="killed"):
        cache_trajectories(cache_cfg(base_file, out))
    assert len(list(out.glob("*/shard-*.tar"))) == 1
    for split in ("train", "val"):
        with pytest.raises(RuntimeError, match="incomplete"):
            resolve_shards(str(out / split))
    assert not stale.exists()
    monkeypatch.undo()
    summary = cache_trajectories(cache_cfg(base_file, out))
    assert summary["shards_written"] == 3 and summary["train"]["complete"]
    assert len(resolve_shards(str(out / "train"))) == 3


def test_a_run_that_wrote_no_shard_does_not_lock_the_folder(base_file, tmp_path, monkeypatch):
    import flowturbo.lit.trajectories as trajectories

    def fails(path, records):
        raise RuntimeError("out of memory")

    out = tmp_path / "traj"
    monkeypatch.setattr(trajectories, "write_tar", fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        cache_trajectories(cache_cfg(base_file, out, "cache.steps=5"))
    monkeypatch.undo()
    summary = cache_trajectories(cache_cfg(base_file, out))  # corrected settings: plan replaced
    assert summary["train"]["complete"] and Manifest.load(out / "train").meta["steps"] == 4


@pytest.mark.parametrize(
    "override, message",
    [
        ("cache.batch_size=0", "batch_size must be >= 1, got 0"),
        ("cache.num_val=-5", "num_val must be >= 0, got -5"),
        ("cache.label_dropout=1.5", r"label_dropout must be in \[0, 1\], got 1.5"),
        ("cache.shape=[3,8,8]", r"cache.shape=\[3, 8, 8\] .* takes \[1, 8, 8\]"),
        ("cache.num_classes=5", "cache.num_classes=5 differs from the base's num_classes=3"),
    ],
)
def test_settings_the_base_cannot_take_are_refused(base_file, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        cache_trajectories(cache_cfg(base_file, tmp_path / "traj", override))
    assert not (tmp_path / "traj" / "plan.json").exists()


def test_label_dropout_needs_a_base_with_a_null_class(tmp_path):
    """A SiT built without label dropout has no null-class embedding: the cache failed with a
    bare IndexError after writing some shards."""
    net = SiT.from_name(
        "SiT-Tiny/2", input_size=8, in_channels=1, num_classes=3, class_dropout_prob=0
    )
    save_checkpoint(net, tmp_path / "no_null.pt")
    with pytest.raises(ValueError, match="cache.label_dropout=0.1 drops labels to the null class"):
        cache_trajectories(cache_cfg(tmp_path / "no_null.pt", tmp_path / "traj"))
    assert not (tmp_path / "traj" / "plan.json").exists()


def test_a_cache_without_a_val_split_prints_a_command_without_one(base_file, tmp_path, capsys):
    """num_val=0 printed data.val_shards=<out>/val, a folder of no shards that train.py
    refuses."""
    summary = cache_trajectories(cache_cfg(base_file, tmp_path / "traj", "cache.num_val=0"))
    assert summary["val"] == {"trajectories": 0, "shards": 0, "complete": True}
    command = capsys.readouterr().out.split("train a refiner on it: ")[1]
    assert "data.val_shards=null" in command and "/val" not in command


@pytest.mark.parametrize("cache", ["demo", "imagenet", "own"])
def test_the_printed_train_command_composes(cache):
    from flowturbo.train import OWN_TRAIN_COMMAND

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        name = "imagenet" if cache == "own" else cache
        command = compose("cache_trajectories", overrides=[f"cache={name}"]).cache.train_command
        if cache == "own":  # a factory in cache.base: own_refiner's command instead
            command = OWN_TRAIN_COMMAND
        args = command.format(out_dir="/x", base_path="/z", factory="own_flow.load_reversed_sit")
        program, *overrides = args.split()[1:]
        assert program == "train.py"
        cfg = compose("train", overrides=overrides)
    assert cfg.model.target == "trajectory" and cfg.data.kind == "trajectory"
    assert (cfg.data.train_shards, cfg.data.val_shards) == ("/x/train", "/x/val")
    assert not OmegaConf.missing_keys(cfg.model) | OmegaConf.missing_keys(cfg.data)


def test_a_missing_value_names_the_cache_config():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("cache_trajectories", overrides=["cache=imagenet"])
    with pytest.raises(ValueError, match="python cache_trajectories.py cache=imagenet cache.base"):
        cache_trajectories(cfg)
