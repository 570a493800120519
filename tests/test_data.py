"""Data package: shard writers (round trip, skips, resume), demo set, DataModule, DDP, latents."""

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

from flowturbo.data import (
    LATENT_SCALE,
    Manifest,
    ShardDataModule,
    ShardStream,
    center_crop_resize,
    default_cache_dir,
    demo_shards,
    read_shard,
    resolve_shards,
    write_image_shards,
    write_latent_shards,
    write_sample_shards,
)
from flowturbo.data.datamodule import SampleDecoder
from flowturbo.lit.callbacks import SeedEachRank


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _id_shards(
    out: Path, n: int, shard_size: int, bad: tuple[int, ...] = (), resume: bool = False
) -> Manifest:
    """Tiny 8x8 grayscale shards whose label is the sample's id; ids in ``bad`` get garbage."""
    samples = []
    for i in range(n):
        png = b"not a png" if i in bad else _png(np.full((8, 8), i % 256, np.uint8))
        samples.append((f"{'bad' if i in bad else 'ok'}{i:04d}", {"png": png, "cls": i}))
    return write_sample_shards(samples, out, shard_size=shard_size, resume=resume, progress=False)


# ----------------------------------------------------------------------------- shard writer


def _image_folder(root: Path) -> dict[str, tuple[int, str]]:
    """3 classes x 10 images (PNG/JPEG alternating, one BMP), one corrupt file, one .txt."""
    rng = np.random.default_rng(0)
    expected = {}
    for c, name in enumerate(["ant", "cat", "dog"]):  # sorted: ant=0, cat=1, dog=2
        (root / name).mkdir(parents=True)
        for i in range(10):
            img = Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
            ext = ".bmp" if (c, i) == (2, 9) else (".png" if i % 2 else ".JPEG")
            path = root / name / f"{name}_{i}{ext}"
            img.save(path, format={".bmp": "BMP", ".png": "PNG", ".JPEG": "JPEG"}[ext])
            expected[f"{name}_{i}"] = (c, ext)
    (root / "dog" / "broken.JPEG").write_bytes(b"\xff\xd8\xff definitely not a jpeg")
    (root / "cat" / "notes.txt").write_text("ignored: not an image extension")
    return expected


def test_image_shards_round_trip_skips_and_resume(tmp_path, caplog):
    root, out = tmp_path / "folder", tmp_path / "shards"
    expected = _image_folder(root)
    (root / "stray.png").write_bytes(b"")  # outside the class folders
    manifest = write_image_shards(root, out, shard_size=8, workers=2, progress=False)
    assert "left out 2 file(s)" in caplog.text and "cat/notes.txt, stray.png" in caplog.text

    # 31 image files -> 4 shards; the corrupt one is skipped, counted and named
    assert [s.count for s in manifest.shards] == [8, 7, 8, 7]  # broken.JPEG shuffled into 1
    assert manifest.total == 30 and manifest.complete and manifest.classes == ["ant", "cat", "dog"]
    assert manifest.num_skipped == 1 and "broken" in manifest.skipped[0]["source"]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["total"] == 30 and on_disk["num_skipped"] == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        *[f"shard-{i:06d}.tar" for i in range(4)],
    ]

    seen = {}
    for shard in manifest.shard_paths(out):
        for key, fields in read_shard(shard):
            stem = key.split("_", 1)[1]
            label, ext = expected[stem]
            assert int(fields["cls"]) == label
            source = root / ["ant", "cat", "dog"][label] / f"{stem}{ext}"
            if ext == ".JPEG":  # original bytes, not re-encoded
                assert fields["jpg"] == source.read_bytes()
            elif ext == ".png":
                assert fields["png"] == source.read_bytes()
            else:  # BMP re-encoded losslessly as PNG
                decoded = np.asarray(Image.open(io.BytesIO(fields["png"])))
                assert np.array_equal(decoded, np.asarray(Image.open(source)))
            seen[stem] = label
    assert len(seen) == 30

    # an interrupted run: last shard unrecorded and truncated, a temp file left behind
    stats = {p.name: os.stat(p) for p in out.glob("shard-*.tar")}
    broken = Manifest.load(out)
    broken.shards, broken.complete = broken.shards[:3], False
    broken.save(out / "manifest.json")
    last = out / "shard-000003.tar"
    last.write_bytes(last.read_bytes()[:700])
    (out / ".shard-000003.tar.tmp-12345").write_bytes(b"partial")

    resumed = write_image_shards(root, out, shard_size=8, workers=0, progress=False)
    for name in ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]:  # skipped
        now = os.stat(out / name)
        assert (now.st_ino, now.st_mtime_ns) == (stats[name].st_ino, stats[name].st_mtime_ns)
    assert os.stat(last).st_ino != stats[last.name].st_ino  # rewritten
    assert len(list(read_shard(last))) == 7
    assert resumed.complete and resumed.total == 30 and resumed.num_skipped == 1
    assert not list(out.glob(".*tmp*"))

    # resuming from other inputs is refused; resume=False rewrites
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "ant" / "zz.png")
    with pytest.raises(ValueError, match="resume=False"):
        write_image_shards(root, out, shard_size=8, workers=0, progress=False)
    again = write_image_shards(root, out, shard_size=8, workers=0, resume=False, progress=False)
    assert again.total == 31


def test_image_shards_mix_the_classes(tmp_path):
    """Sorted, ImageNet's shards held one or two classes each; a training stream mixes a few
    shards at a time, so its batches held few classes, and a validation subset (the first
    samples of each shard) few classes too."""
    root = tmp_path / "folder"
    _image_folder(root)

    def classes_per_shard(out, **kw):
        manifest = write_image_shards(root, out, shard_size=8, workers=0, progress=False, **kw)
        return [len({int(f["cls"]) for _, f in read_shard(p)}) for p in manifest.shard_paths(out)]

    assert classes_per_shard(tmp_path / "sorted", shuffle_seed=None) == [1, 2, 2, 1]
    mixed = classes_per_shard(tmp_path / "mixed")  # the default: shuffled, seed 0
    assert min(mixed) >= 2 and sum(mixed) >= 10
    with pytest.raises(ValueError, match="order"):  # another order is another shard set
        write_image_shards(root, tmp_path / "mixed", shard_size=8, workers=0, shuffle_seed=1)


def test_shards_of_unknown_inputs_are_not_resumed_into(tmp_path):
    """Samples written by write_sample_shards (no fingerprint), then write_image_shards into the
    same folder: it resumed, keeping the old shards beside its own, one 'complete' set."""
    root, out = tmp_path / "folder", tmp_path / "shards"
    _image_folder(root)
    old = [(f"old{i}", {"cls": 0, "png": b"x"}) for i in range(8)]
    write_sample_shards(old, out, shard_size=8, kind="image", progress=False)
    with pytest.raises(ValueError, match="no fingerprint of its inputs.*resume=False"):
        write_image_shards(root, out, shard_size=8, workers=0, progress=False)
    fresh = write_image_shards(root, out, shard_size=8, workers=0, resume=False, progress=False)
    assert fresh.total == 30 and not any(
        k.startswith("old") for k, _ in read_shard(out / "shard-000000.tar")
    )


def test_resume_rewrites_a_recorded_shard_that_was_cut_short(tmp_path):
    """A shard the manifest lists whose file is shorter than recorded (a copy cut off, a full
    disk) is written again on resume, not kept because it exists; the others are kept."""
    _id_shards(tmp_path, 12, 4)
    cut = tmp_path / "shard-000001.tar"
    whole = cut.read_bytes()
    stats = {p.name: os.stat(p) for p in tmp_path.glob("shard-*.tar")}
    cut.write_bytes(whole[:700])
    resumed = _id_shards(tmp_path, 12, 4, resume=True)
    assert cut.read_bytes() == whole and len(list(read_shard(cut))) == 4
    for name in ["shard-000000.tar", "shard-000002.tar"]:  # skipped
        now = os.stat(tmp_path / name)
        assert (now.st_ino, now.st_mtime_ns) == (stats[name].st_ino, stats[name].st_mtime_ns)
    assert resumed.complete and resumed.total == 12


def test_a_rewrite_from_fewer_inputs_leaves_no_shard_of_the_longer_set(tmp_path):
    """resume=False into the folder of a longer set deletes the shards past the new plan, so
    that a reader of shard-*.tar (a glob, no manifest) never mixes in the old samples."""
    _id_shards(tmp_path, 12, 4)
    manifest = _id_shards(tmp_path, 5, 4)
    shards = sorted(p.name for p in tmp_path.glob("shard-*.tar"))
    assert shards == ["shard-000000.tar", "shard-000001.tar"] and manifest.total == 5
    ids = [int(f["cls"]) for s in shards for _, f in read_shard(tmp_path / s)]
    assert ids == list(range(5))


def _interrupt(out: Path, keep: int) -> None:
    """Make ``out`` look like a run stopped after ``keep`` shards."""
    manifest = Manifest.load(out)
    for s in manifest.shards[keep:]:
        (out / s.name).unlink()
    manifest.shards, manifest.complete = manifest.shards[:keep], False
    manifest.save(out / "manifest.json")


def test_image_shards_resumed_from_another_folder_with_the_same_layout_are_refused(tmp_path):
    first, second, out = tmp_path / "a", tmp_path / "b", tmp_path / "shards"
    _image_folder(first)
    write_image_shards(first, out, shard_size=8, workers=0, progress=False)
    _interrupt(out, 2)
    _image_folder(second)  # same names, classes and pixels: another folder, other files
    with pytest.raises(ValueError, match="resume=False") as err:
        write_image_shards(second, out, shard_size=8, workers=0, progress=False)
    assert f"source {str(first.resolve())!r}, now {str(second.resolve())!r}" in str(err.value)
    assert not Manifest.load(out).complete  # nothing written from the second folder

    # a manifest of the older writer (no recorded parts) is refused too
    old = Manifest.load(out)
    del old.meta["fingerprint_parts"]
    old.fingerprint = "0" * 64
    old.save(out / "manifest.json")
    with pytest.raises(ValueError, match="older writer's.*resume=False"):
        write_image_shards(first, out, shard_size=8, workers=0, progress=False)


def test_image_shards_refuse_to_resume_after_a_file_changed(tmp_path):
    root, out = tmp_path / "folder", tmp_path / "shards"
    _image_folder(root)
    write_image_shards(root, out, shard_size=8, workers=0, progress=False)
    _interrupt(out, 3)
    changed = root / "ant" / "ant_0.JPEG"  # in the first, finished shard
    before = changed.stat()
    changed.write_bytes(changed.read_bytes()[::-1])  # same size, other bytes
    assert changed.stat().st_size == before.st_size
    assert changed.stat().st_mtime_ns != before.st_mtime_ns
    with pytest.raises(ValueError, match="files '[0-9a-f]+', now '[0-9a-f]+'.*resume=False"):
        write_image_shards(root, out, shard_size=8, workers=0, progress=False)
    rewritten = write_image_shards(
        root, out, shard_size=8, workers=0, resume=False, progress=False
    )
    assert rewritten.complete and rewritten.num_skipped == 2  # broken.JPEG and the reversed file


# ----------------------------------------------------------------------------- demo set


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return demo_shards(tmp_path_factory.mktemp("cache"))


def test_demo_shards_counts_balance_pixels_and_cache(demo_root):
    assert demo_root.name == "demo-mnist"
    keys = {}
    for split, total, shards, per_class in [("train", 4500, 9, 450), ("val", 500, 1, 50)]:
        manifest = Manifest.load(demo_root / split)
        assert manifest.total == total and len(manifest.shards) == shards
        labels, images = [], []
        for path in manifest.shard_paths(demo_root / split):
            for key, fields in read_shard(path):
                labels.append(int(fields["cls"]))
                images.append(np.asarray(Image.open(io.BytesIO(fields["png"]))))
                keys[key] = split
        assert np.bincount(labels).tolist() == [per_class] * 10
        images = np.stack(images)
        assert images.shape == (total, 32, 32) and images.dtype == np.uint8
        assert images.max() == 255 and images.min() == 0
        assert not images[:, :2].any() and not images[:, -2:].any()  # zero padding
        assert not images[:, :, :2].any() and not images[:, :, -2:].any()
        # shards are mixed, not sorted by class
        first = [int(f["cls"]) for _, f in read_shard(manifest.shard_paths(demo_root / split)[0])]
        assert len(set(first)) == 10
    assert len(keys) == 5000  # train and val are disjoint

    before = os.stat(demo_root / "train" / "shard-000000.tar").st_mtime_ns
    assert demo_shards(demo_root.parent) == demo_root  # cached: nothing rewritten
    assert os.stat(demo_root / "train" / "shard-000000.tar").st_mtime_ns == before


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWTURBO_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FLOWTURBO_CACHE")
    assert default_cache_dir() == Path("~/.cache/flowturbo").expanduser()


# ----------------------------------------------------------------------------- DataModule


@pytest.mark.parametrize("num_workers", [0, 2])
def test_demo_batches_shapes_ranges_and_exact_epochs(demo_root, num_workers):
    dm = ShardDataModule(
        source="demo",
        cache_dir=str(demo_root.parent),
        batch_size=32,
        num_workers=num_workers,
        steps_per_epoch=7,
        shuffle_buffer=200,
    )
    dm.setup("fit")
    assert dm.num_classes == 10
    loader = dm.train_dataloader()
    assert len(loader) == 7
    epochs = [list(loader) for _ in range(2)]
    for batches in epochs:
        assert len(batches) == 7
        for x, y in batches:
            assert x.shape == (32, 1, 32, 32) and x.dtype == torch.float32
            assert y.shape == (32,) and y.dtype == torch.int64
            assert x.min() >= -1 and x.max() <= 1 and x.min() == -1
            assert y.min() >= 0 and y.max() <= 9
    assert not torch.equal(epochs[0][0][1], epochs[1][0][1])  # epochs are seeded differently
    val = list(dm.val_dataloader())
    labels = torch.cat([y for _, y, _ in val])
    assert len(labels) == 500 and torch.bincount(labels).tolist() == [50] * 10
    assert dm.skipped == 0


def test_missing_shards_error_names_pattern(tmp_path):
    pattern = str(tmp_path / "nowhere" / "shard-{000000..000003}.tar")
    with pytest.raises(FileNotFoundError, match="do not exist") as err:
        ShardDataModule(train_shards=pattern).setup("fit")
    assert "nowhere" in str(err.value)
    with pytest.raises(FileNotFoundError, match="write_image_shards") as err:
        resolve_shards(str(tmp_path / "none-*.tar"))
    # the brace pattern hint is quoted as a Hydra override (unquoted, Hydra cannot parse it)
    assert """'data.train_shards="DIR/shard-{000000..000009}.tar"'""" in str(err.value)


def test_a_missing_shard_folder_is_named_with_its_setting(tmp_path, monkeypatch):
    folder = tmp_path / "nowhere" / "train"
    with pytest.raises(FileNotFoundError) as err:
        ShardDataModule(train_shards=str(folder)).setup("fit")
    assert str(err.value).startswith(
        f"data.train_shards={folder}: shard folder not found: {folder}: give the folder that "
        "write_image_shards / write_latent_shards / cache_trajectories.py wrote (it holds "
        "manifest.json and the .tar shards)"
    )
    assert "do not exist" not in str(err.value)
    assert "cache_trajectories.py` first" not in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"^data\.val_shards=.*: shard file not found"):
        ShardDataModule(val_shards=str(tmp_path / "shard-000000.tar")).setup("validate")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        ShardDataModule(train_shards="trajectories/demo/train", kind="trajectory").setup("fit")
    message = str(err.value)
    assert message.startswith("data.train_shards=trajectories/demo/train: shard folder not found")
    assert f"(relative to {tmp_path})" in message
    assert "run `python cache_trajectories.py` first" in message


def test_a_missing_latent_source_is_named(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        write_latent_shards(tmp_path / "imagenet" / "train", tmp_path / "out", tmp_path / "vae")
    message = str(err.value)
    assert message.startswith(f"source not found: {tmp_path / 'imagenet' / 'train'}: ")
    assert "ImageFolder" in message and "re-run" not in message


def test_resolve_shards_accepts_a_hydra_list(tmp_path):
    _id_shards(tmp_path, 4, 2)
    paths = [str(tmp_path / f"shard-{i:06d}.tar") for i in range(2)]
    assert resolve_shards(OmegaConf.create(paths)) == paths  # '+data.val_shards=[a,b]'
    assert resolve_shards(tuple(paths)) == paths


def test_resolve_shards_takes_a_list_of_sets_and_a_manifest_path(tmp_path, monkeypatch):
    """A list of shard folders was refused as "2 of 2 shard files ... do not exist", and the
    path of a manifest.json as a tar without its end-of-archive marker."""
    monkeypatch.setenv("HOME", str(tmp_path))
    _id_shards(tmp_path / "a", 4, 2)
    _id_shards(tmp_path / "b", 2, 2)
    a, b = resolve_shards(str(tmp_path / "a")), resolve_shards(str(tmp_path / "b"))
    assert resolve_shards(["~/a", str(tmp_path / "b")]) == a + b
    assert resolve_shards(OmegaConf.create([str(tmp_path / "b"), "~/a"])) == b + a
    assert resolve_shards(str(tmp_path / "a" / "manifest.json")) == a
    (tmp_path / "a" / a[1]).unlink()  # a set's own checks still apply
    with pytest.raises(FileNotFoundError, match="1 of 2 shard files named by .*/a' do not"):
        resolve_shards([str(tmp_path / "a"), str(tmp_path / "b")])


def test_a_damaged_manifest_is_named(tmp_path):
    _id_shards(tmp_path / "set", 4, 2)
    (tmp_path / "set" / "manifest.json").write_text('{"kind": "image", "shard')
    with pytest.raises(ValueError, match=r"set/manifest.json is not a shard-set manifest"):
        Manifest.load(tmp_path / "set")
    with pytest.raises(ValueError, match="write the folder again"):
        resolve_shards(str(tmp_path / "set"))


def test_truncated_shard_in_a_manifest_set_is_refused(tmp_path):
    _id_shards(tmp_path, 30, 10)
    shard = tmp_path / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(RuntimeError, match="shard-000001.tar") as err:
        ShardDataModule(val_shards=str(tmp_path), channels=1).setup("validate")
    message = str(err.value)
    assert message.startswith(f"data.val_shards={tmp_path}: ")
    assert "shard-000000" not in message and "re-run the command that wrote" in message


def test_shard_ending_early_without_manifest_is_recorded(tmp_path):
    _id_shards(tmp_path, 20, 10)
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[6].offset_data + 10  # inside sample 3's png
    shard.write_bytes(shard.read_bytes()[:cut])
    # a local cut shard is refused up front (below); a streamed one is found while reading
    dm = ShardDataModule(
        val_shards=OmegaConf.create([f"pipe:cat {shard}", str(tmp_path / "shard-000001.tar")]),
        channels=1,
        num_workers=0,
    )
    seen = torch.cat([y for _, y, _ in dm.val_dataloader()]).tolist()
    assert sorted(seen) == [0, 1, 2, *range(10, 20)]  # samples 3-9 are lost
    assert dm.val_skips.count == 1  # webdataset reports the read error twice: counted once
    assert "shard ended early" in dm.val_skips.examples[0]
    assert "shard-000000.tar" in dm.val_skips.examples[0]


def test_local_shards_cut_between_samples_are_refused_by_name(tmp_path):
    _id_shards(tmp_path, 20, 10)
    shard = tmp_path / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[8].offset  # the header of sample 14: samples 10-13 are whole
    shard.write_bytes(shard.read_bytes()[:cut])
    (tmp_path / "manifest.json").unlink()
    for spec in (str(tmp_path), str(tmp_path / "shard-{000000..000001}.tar")):
        with pytest.raises(RuntimeError, match=r"1 of 2 .* end-of-archive .*shard-000001.tar"):
            resolve_shards(spec)
    # webdataset itself reads such a shard to the cut and stops without an error
    assert len(list(wds.WebDataset(str(shard), shardshuffle=False))) == 4
    assert resolve_shards(str(tmp_path / "shard-000000.tar"))  # whole shards pass


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_samples_are_skipped_and_counted(tmp_path, num_workers):
    bad = (3, 17, 30)
    _id_shards(tmp_path / "val", 40, 10, bad=bad)
    dm = ShardDataModule(
        train_shards=str(tmp_path / "val"),
        val_shards=str(tmp_path / "val"),
        channels=1,
        batch_size=4,
        num_workers=num_workers,
        steps_per_epoch=20,
        shuffle_buffer=8,
    )
    dm.setup("fit")
    seen = torch.cat([y for _, y, _ in dm.val_dataloader()]).tolist()
    assert sorted(seen) == [i for i in range(40) if i not in bad]  # exact pass, bad ones out
    assert dm.val_skips.count == 3 and len(dm.val_skips.examples) == 3
    assert all("bad" in e for e in dm.val_skips.examples)

    batches = list(dm.train_dataloader())
    assert len(batches) == 20 and all(len(y) == 4 for _, y in batches)
    seen = torch.cat([y for _, y in batches])
    assert not set(seen.tolist()) & set(bad)
    assert dm.train_skips.count > 0  # 80 samples drawn from 4 shards: the bad ones were met
    assert dm.skipped_summary() == {
        "data/skipped": dm.train_skips.count + 3,
        "data/skipped_train": dm.train_skips.count,
        "data/skipped_val": 3,
    }


def test_a_cut_shard_counts_once_whatever_the_number_of_ranks(tmp_path):
    """Where every rank reads every shard (shards not a multiple of the ranks), each rank
    counted a cut shard's end: the skips summed over ranks grew with the ranks."""
    _id_shards(tmp_path, 25, 5)  # 5 shards
    cut = tmp_path / "shard-000001.tar"
    cut.write_bytes(cut.read_bytes()[:700])
    urls = [str(tmp_path / f"shard-{i:06d}.tar") for i in range(5)]

    def summed(world: int) -> tuple[int, int]:
        samples = skips = 0
        for rank in range(world):
            stream = ShardStream(
                urls, SampleDecoder(channels=1), batch_size=4, train=False, rank=rank,
                world_size=world,
            )  # fmt: skip
            for batch in stream:
                skips += batch.skipped
                samples += 0 if batch.y is None else len(batch.y)
        return samples, skips

    one = summed(1)
    assert one[1] >= 1 and summed(2) == one and summed(3) == one and summed(5) == one


@pytest.mark.parametrize("num_shards", [4, 3])  # split by shard / by sample position
def test_validation_split_is_exact_and_disjoint(tmp_path, num_shards):
    n = 37
    _id_shards(tmp_path, n, -(-n // num_shards))
    urls = resolve_shards(str(tmp_path))
    assert len(urls) == num_shards
    per_rank = []
    for rank in range(2):
        stream = ShardStream(
            urls, SampleDecoder(channels=1), batch_size=5, train=False, rank=rank, world_size=2
        )
        per_rank.append([i for batch in stream for i in batch.y.tolist()])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(n))
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 10

    # every sample keeps its id (its place in the set) however the pass is split, and a
    # subset (val_samples) is the same samples for any number of ranks and batch size
    def ids(world: int, batch: int, samples: int | None = None) -> dict[int, int]:
        decoder = SampleDecoder(channels=1)
        streams = [
            ShardStream(
                urls, decoder, batch_size=batch, train=False, rank=r, world_size=world,
                samples=samples,
            )
            for r in range(world)
        ]  # fmt: skip
        batches = [b for s in streams for b in s]
        pairs = [p for b in batches for p in zip(b.ids.tolist(), b.y.tolist(), strict=True)]
        assert len(pairs) == (samples or n)
        return dict(pairs)

    one = ids(1, 5)
    assert len(set(one.values())) == n  # one id per sample
    assert ids(2, 5) == one and ids(3, 2) == one
    subset = ids(1, 5, samples=10)
    assert ids(2, 3, samples=10) == subset and ids(3, 4, samples=10) == subset
    per_shard = -(-n // num_shards)  # ids are shard * 2**32 + position; labels count up
    first = [(i >> 32) * per_shard + (i & 0xFFFFFFFF) for i in sorted(subset)]
    assert first == sorted(subset.values())  # each shard's first samples
    assert [(i >> 32) for i in sorted(subset)].count(0) == -(-10 // num_shards)


def test_labels_outside_the_classes_are_skipped_and_counted(tmp_path):
    samples = [
        (f"s{i:02d}", {"png": _png(np.full((8, 8), i, np.uint8)), "cls": 42 if i == 7 else i % 10})
        for i in range(20)
    ]
    classes = [str(d) for d in range(10)]
    write_sample_shards(samples, tmp_path, shard_size=10, classes=classes, progress=False)
    paths = [str(tmp_path / f"shard-{i:06d}.tar") for i in range(2)]
    for spec, num_classes in [(str(tmp_path), None), (paths, 10)]:  # manifest / argument
        dm = ShardDataModule(val_shards=spec, channels=1, num_workers=0, num_classes=num_classes)
        dm.setup("validate")
        seen = torch.cat([y for _, y, _ in dm.val_dataloader()]).tolist()
        assert len(seen) == 19 and 42 not in seen and dm.num_classes == 10
        assert dm.val_skips.count == 1
        assert "s07" in dm.val_skips.examples[0] and "label 42" in dm.val_skips.examples[0]
        assert "[0, 10)" in dm.val_skips.examples[0]
    unchecked = ShardDataModule(val_shards=paths, channels=1, num_workers=0)  # nothing known
    assert 42 in torch.cat([y for _, y, _ in unchecked.val_dataloader()]).tolist()
    with pytest.raises(ValueError, match="num_classes=5 but the shards' manifest lists 10"):
        ShardDataModule(val_shards=str(tmp_path), num_classes=5).setup("validate")
    with pytest.raises(ValueError, match="val_samples must be positive"):
        ShardDataModule(val_shards=str(tmp_path), val_samples=0)

    # a trajectory cache may hold the null class (label num_classes), other kinds may not
    array = io.BytesIO()
    np.save(array, np.zeros((2, 3), np.float16))
    rng = np.random.default_rng(0)
    trajectory = SampleDecoder(kind="trajectory", num_classes=10)
    assert trajectory({"traj.npy": array.getvalue(), "cls": b"10"}, rng)[1] == 10
    with pytest.raises(ValueError, match=r"label 11 is outside \[0, 10\]"):
        trajectory({"traj.npy": array.getvalue(), "cls": b"11"}, rng)
    with pytest.raises(ValueError, match=r"label 10 is outside \[0, 10\)"):
        SampleDecoder(kind="latent", num_classes=10)({"latent.npy": b"", "cls": b"10"}, rng)


def test_train_and_val_shards_of_other_class_folders_are_refused(tmp_path):
    """A label is its class's place in its own set's sorted class folders: a val folder without
    'ant' read val's 'cat' (0) as train's 'ant' (0), silently."""
    for split, names in (("train", ["ant", "cat", "dog"]), ("val", ["cat", "dog"])):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / split / name / "a.png")
        write_image_shards(tmp_path / split, tmp_path / f"{split}_sh", workers=0, progress=False)
    train, val = str(tmp_path / "train_sh"), str(tmp_path / "val_sh")
    with pytest.raises(
        ValueError, match="different class folders.*only in data.train_shards: ant"
    ):
        ShardDataModule(train, val, num_workers=0).setup("fit")
    ShardDataModule(train, train, num_workers=0).setup("fit")  # the same classes pass


def test_shard_writers_expand_home_and_refuse_a_bad_shard_size_or_a_repeated_key(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("HOME", str(tmp_path))
    _image_folder(tmp_path / "folder")
    manifest = write_image_shards("~/folder", tmp_path / "out", workers=0, progress=False)
    assert manifest.total == 30
    for size in (0, -1, 2.5):
        with pytest.raises(ValueError, match="shard_size must be an integer >= 1"):
            write_image_shards("~/folder", tmp_path / "bad", shard_size=size, progress=False)
        with pytest.raises(ValueError, match="shard_size must be an integer >= 1"):
            write_sample_shards([], tmp_path / "bad", shard_size=size, progress=False)
    twice = [("a", {"cls": 0}), ("b", {"cls": 1}), ("a", {"cls": 2})]
    with pytest.raises(ValueError, match="sample key 'a' is given twice"):
        write_sample_shards(twice, tmp_path / "twice", progress=False)


def test_rgb_image_shards_resize_and_flip(tmp_path):
    root = tmp_path / "folder"
    _image_folder(root)
    write_image_shards(root, tmp_path / "shards", shard_size=8, workers=0, progress=False)
    dm = ShardDataModule(
        train_shards=str(tmp_path / "shards" / "shard-{000000..000003}.tar"),
        resolution=8,
        batch_size=5,
        num_workers=0,
        steps_per_epoch=3,
    )
    dm.setup("fit")
    assert dm.classes is None  # a brace pattern carries no manifest
    for x, y in dm.train_dataloader():
        assert x.shape == (5, 3, 8, 8) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1 and set(y.tolist()) <= {0, 1, 2}


# ----------------------------------------------------------------------------- DDP (gloo)


class _Recorder(L.LightningModule):
    """Records the labels (= sample ids) each rank trains and validates on, and one draw of
    torch's generator per training step (as noise would be drawn), to a file."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.train_ids: list[list[int]] = []
        self.draws: list[float] = []
        self.val_ids: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.train_ids.append(y.tolist())
        self.draws.append(torch.rand(()).item())
        return (self.w * x.mean()).sum() + self.w.pow(2).sum()

    def on_validation_epoch_start(self):
        self.val_ids = []

    def validation_step(self, batch, batch_idx):
        self.val_ids.extend(batch[1].tolist())

    def on_fit_end(self):
        record = {
            "rank": self.global_rank,
            "world": self.trainer.world_size,
            "train": self.train_ids,
            "draws": self.draws,
            "val": self.val_ids,
        }
        Path(self.out_dir, f"rank{self.global_rank}.json").write_text(json.dumps(record))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_ddp_spawn_two_ranks_equal_batches_exact_validation(tmp_path):
    n_val = 31
    _id_shards(tmp_path / "train", 60, 10)
    _id_shards(tmp_path / "val", n_val, 11)  # 3 shards: not divisible by 2 ranks
    dm = ShardDataModule(
        train_shards=str(tmp_path / "train"),
        val_shards=str(tmp_path / "val"),
        channels=1,
        batch_size=4,
        val_batch_size=3,
        num_workers=1,
        multiprocessing_context="fork",  # ddp_spawn ranks default to spawn: slow worker start
        steps_per_epoch=3,
        shuffle_buffer=8,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=6,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SeedEachRank(0)],  # as train.py adds it
    )
    trainer.fit(_Recorder(str(tmp_path)), datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert [len(r["train"]) for r in ranks] == [6, 6]  # 2 epochs x 3 batches on each rank
    assert ranks[0]["train"] != ranks[1]["train"]  # ranks draw different streams
    assert ranks[0]["draws"] != ranks[1]["draws"]  # and different noise for them
    val0, val1 = ranks[0]["val"], ranks[1]["val"]
    assert not set(val0) & set(val1) and sorted(val0 + val1) == list(range(n_val))


def test_a_run_resumed_mid_epoch_draws_new_batches_and_noise(tmp_path):
    """Lightning restores the loader's state from the checkpoint: a run resumed at step 2 of a
    4-step epoch must not replay the epoch's first batches, nor the noise of step 0."""
    _id_shards(tmp_path / "train", 60, 10)

    def fit(ckpt_path=None):
        dm = ShardDataModule(
            train_shards=str(tmp_path / "train"),
            channels=1,
            batch_size=4,
            steps_per_epoch=4,
            shuffle_buffer=8,
        )
        torch.manual_seed(0)
        module = _Recorder(str(tmp_path))
        ckpt = L.pytorch.callbacks.ModelCheckpoint(
            tmp_path / "ckpt", "{step}", save_top_k=-1, every_n_train_steps=2
        )
        L.Trainer(
            accelerator="cpu",
            max_steps=4,
            logger=False,
            callbacks=[ckpt, SeedEachRank(0)],
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        ).fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return module

    first = fit()
    state = torch.load(tmp_path / "ckpt" / "step=2.ckpt", weights_only=False)
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"delivered": 2}]
    resumed = fit(str(tmp_path / "ckpt" / "step=2.ckpt"))
    assert len(first.train_ids) == 4 and len(resumed.train_ids) == 2
    assert resumed.train_ids != first.train_ids[:2]
    assert resumed.draws != first.draws[:2]
    again = fit(str(tmp_path / "ckpt" / "step=2.ckpt"))
    assert again.train_ids == resumed.train_ids and again.draws == resumed.draws  # reproducible


# ----------------------------------------------------------------------------- latents


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32,),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path, vae.eval()


def test_latent_shards_shapes_scale_flip_and_datamodule(tmp_path, tiny_vae):
    vae_path, vae = tiny_vae
    root = tmp_path / "folder"
    _image_folder(root)
    write_image_shards(root, tmp_path / "images", shard_size=16, workers=0, progress=False)
    manifest = write_latent_shards(
        tmp_path / "images",
        tmp_path / "latents",
        vae_path,
        resolution=16,
        batch_size=4,
        device="cpu",
        progress=False,
    )
    assert manifest.kind == "latent" and manifest.total == 30 and len(manifest.shards) == 2
    assert manifest.classes == ["ant", "cat", "dog"]
    assert manifest.meta["latent_shape"] == [4, 16, 16] and manifest.meta["posterior"] == "mean"

    key, fields = next(read_shard(tmp_path / "latents" / "shard-000000.tar"))
    latent = np.load(io.BytesIO(fields["latent.npy"]))
    flipped = np.load(io.BytesIO(fields["latent_flip.npy"]))
    assert latent.shape == flipped.shape == (4, 16, 16) and latent.dtype == np.float16
    image_fields = dict(read_shard(tmp_path / "images" / "shard-000000.tar"))[key]
    assert int(fields["cls"]) == int(image_fields["cls"])
    with Image.open(io.BytesIO(image_fields.get("jpg") or image_fields["png"])) as img:
        pixels = np.asarray(center_crop_resize(img.convert("RGB"), 16))
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean[0] * LATENT_SCALE
        mean_flip = vae.encode(x.flip(3)).latent_dist.mean[0] * LATENT_SCALE
    assert np.allclose(latent, mean.numpy(), atol=2e-3)
    assert np.allclose(flipped, mean_flip.numpy(), atol=2e-3)

    dm = ShardDataModule(
        train_shards=str(tmp_path / "latents"),
        val_shards=str(tmp_path / "latents"),
        kind="latent",
        batch_size=6,
        num_workers=0,
        steps_per_epoch=2,
    )
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (6, 4, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert sum(len(y) for _, y, _ in dm.val_dataloader()) == 30


def test_latent_shards_read_a_source_under_home(tmp_path, tiny_vae, monkeypatch):
    """'~/images' was expanded to list the files but not to read them: every image was
    skipped as unreadable and the set recorded complete with 0 latents."""
    monkeypatch.setenv("HOME", str(tmp_path))
    _image_folder(tmp_path / "images")
    manifest = write_latent_shards(
        "~/images", tmp_path / "latents", tiny_vae[0], resolution=16, device="cpu",
        flip=False, progress=False,
    )  # fmt: skip
    assert manifest.total == 30 and len(manifest.skipped) == 1  # the corrupt file only


def test_latent_shards_refuse_to_resume_with_another_vae_dtype_scale_or_weights(
    tmp_path, tiny_vae
):
    from diffusers import AutoencoderKL

    vae_path = tmp_path / "vae"
    shutil.copytree(tiny_vae[0], vae_path)
    _id_shards(tmp_path / "images", 12, 4)
    out = tmp_path / "latents"

    def encode(**kwargs):
        settings = dict(resolution=8, batch_size=4, flip=False, device="cpu", progress=False)
        return write_latent_shards(tmp_path / "images", out, vae_path, **settings, **kwargs)

    encode()
    _interrupt(out, 1)
    with pytest.raises(ValueError, match="vae_dtype 'float32', now 'bfloat16'.*resume=False"):
        encode(vae_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"scale 0\.18215, now 0\.5.*resume=False"):
        encode(scale=0.5)  # latents of another scale would be mixed into one set

    # other weights saved to the same folder
    torch.manual_seed(1)
    AutoencoderKL(block_out_channels=(32,), latent_channels=4, sample_size=32).save_pretrained(
        vae_path
    )
    with pytest.raises(ValueError, match="vae_weights '[0-9a-f]+', now '[0-9a-f]+'"):
        encode()
    assert encode(resume=False).total == 12


def test_missing_vae_folder_says_how_to_get_it(tmp_path):
    sample = ("a", {"png": _png(np.zeros((8, 8), np.uint8)), "cls": 0})
    write_sample_shards([sample], tmp_path, progress=False)
    with pytest.raises(FileNotFoundError) as err:
        write_latent_shards(tmp_path, tmp_path / "out", tmp_path / "no-vae", progress=False)
    message = str(err.value)
    assert "no-vae" in message and 'pip install "flowturbo[vae]"' in message
    assert "sd-vae-ft-ema" in message


def test_corrupt_tar_member_injected_into_a_written_shard(tmp_path):
    """A shard with an appended garbage member pair (bad.png + bad.cls) reads around it."""
    _id_shards(tmp_path, 6, 6)
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "a") as tar:
        for name, data in [("bad.png", b"\x89PNG garbage"), ("bad.cls", b"1")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stream = ShardStream([str(shard)], SampleDecoder(channels=1), batch_size=4, train=False)
    batches = list(stream)
    assert sorted(i for b in batches if b.y is not None for i in b.y.tolist()) == list(range(6))
    assert sum(b.skipped for b in batches) == 1
