"""generate.py: sampling, editing and inpainting jobs, resume, the sweep pick; tiny models."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from own_flow import OWN_BASE_ARCH
from PIL import Image

from flowturbo import generate as gen
from flowturbo.eval import entries, networks, sweep
from flowturbo.generate import generate_images, pick_row, resolve_labels
from flowturbo.inputs import load_masks, region_mask

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def read(path):
    return np.asarray(Image.open(path))


def digits_folder(root, n=5):
    """n random 1 x 32 x 32 grey PNGs under root (one in a subfolder) and one corrupt file."""
    rng = np.random.default_rng(0)
    names = [f"img{i}" for i in range(n - 1)] + ["sub/img9"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(root / f"{name}.png")
    (root / "broken.png").write_bytes(b"not a png")
    return names


def test_sample_job_writes_the_sweeps_images_and_resumes_only_whats_missing(
    tiny_models, generate_cfg, tmp_path, monkeypatch
):
    out = tmp_path / "gen"
    cfg = generate_cfg(out, "sampler.schedule=H1P2R2", "num_images=10", "npz=true")
    summary = generate_images(cfg)
    assert summary["images"] == 10 and summary["written"] == 10
    out = Path(summary["out_dir"])
    assert out == tmp_path / "gen" / "H1P2R2"  # a folder per sampler
    files = sorted((out / "images").glob("*.png"))
    assert [f.stem for f in files] == [f"{i:06d}" for i in range(10)]
    assert (out / "grid.png").is_file() and (out / "job.json").is_file()
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (10, 32, 32, 1) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].tolist() == [i % 3 for i in range(10)]

    # image i is image i of evaluate.py's FID set: same noise, label and sampler
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        ecfg = compose(
            "evaluate",
            overrides=[
                f"model.base_ckpt={tiny_models / 'base.pt'}",
                f"model.refiner_ckpt={tiny_models / 'refiner.pt'}",
                "vae=null",
                "sampler.batch_size=4",
                "progress=false",
            ],
        )
    entry = entries.parse_entry("H1P2R2")
    nets = networks.load_networks(ecfg, torch.device("cpu"), need_refiner=True)
    images, _ = sweep.generate(entry, nets, ecfg, 10)
    for i, f in enumerate(files):
        assert np.array_equal(read(f), images[i, 0].numpy())
    assert np.array_equal(npz["arr_0"][..., 0], images[:, 0].numpy())

    # a rerun samples only the deleted image, and writes it again byte for byte
    calls = []
    run_entry = gen.run_entry

    def counted(entry, nets, noise, *args, **kwargs):
        calls.append(len(noise))
        return run_entry(entry, nets, noise, *args, **kwargs)

    monkeypatch.setattr(gen, "run_entry", counted)
    before = files[3].read_bytes()
    files[3].unlink()
    assert generate_images(cfg)["written"] == 1 and calls == [1]
    assert files[3].read_bytes() == before
    assert npz["arr_1"].dtype == np.int64

    # the .npz is streamed from the PNGs: an odd one is named, and the last archive stays
    Image.new("L", (8, 8)).save(files[3])
    with pytest.raises(ValueError, match="000003.png is 1x8x8, not the job's 1x32x32"):
        generate_images(cfg)
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], npz["arr_0"])


def test_a_folder_made_with_other_settings_is_refused_and_more_images_extend_it(
    generate_cfg, tmp_path
):
    out = tmp_path / "gen"
    generate_images(generate_cfg(out, "sampler.schedule=H2", "num_images=4"))
    with pytest.raises(RuntimeError, match=r"other settings.*seed"):
        generate_images(generate_cfg(out, "sampler.schedule=H2", "num_images=4", "seed=1"))
    other = generate_images(generate_cfg(out, "sampler.schedule=H3", "num_images=4"))
    assert other["out_dir"] == str(out / "H3")  # another sampler: its own folder
    # more images are the same job: image i depends only on i
    assert (
        generate_images(generate_cfg(out, "sampler.schedule=H2", "num_images=6"))["written"] == 2
    )


def test_two_jobs_started_at_once_on_a_new_folder_do_not_mix(generate_cfg, tmp_path, monkeypatch):
    """Job B (seed 1) found no job.json; job A (seed 0) created it before B wrote its own: B
    wrote over A's record and both filled the folder with images of different seeds."""
    out = tmp_path / "gen"
    real_create, calls = gen.create_once, []

    def a_creates_first(path, text):  # B's check found no job.json, then A created it
        calls.append(path)
        if len(calls) == 1:  # B's call: A runs whole (its own call is the second)
            generate_images(generate_cfg(out, "sampler.schedule=H2", "num_images=2"))
        return real_create(path, text)

    monkeypatch.setattr(gen, "create_once", a_creates_first)
    with pytest.raises(RuntimeError, match=r"other settings.*seed"):
        generate_images(generate_cfg(out, "sampler.schedule=H2", "num_images=2", "seed=1"))
    assert json.loads((out / "H2" / "job.json").read_text())["seed"] == 0


@pytest.mark.parametrize("hard_links", [True, False])
def test_create_once_creates_a_file_exactly_once(tmp_path, monkeypatch, hard_links):
    if not hard_links:

        def no_link(src, dst):
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    path = tmp_path / "sub" / "job.json"
    assert gen.create_once(path, "first")
    assert not gen.create_once(path, "second")
    assert path.read_text() == "first"
    assert sorted(p.name for p in path.parent.iterdir()) == ["job.json"]  # no temporary left
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_a_killed_writers_leftovers_are_not_read_and_stale_summaries_are_dropped(
    generate_cfg, tmp_path, monkeypatch
):
    """kill -9 during a PNG's rename leaves .<name>.<random>.tmp.png; a larger job stopped
    half-way left the smaller job's samples.npz and grid.png as if they were its own."""
    from flowturbo.eval.fidelity import load_reference

    small = generate_images(
        generate_cfg(tmp_path, "sampler.schedule=H2", "num_images=4", "npz=true")
    )
    images = Path(small["out_dir"]) / "images"
    leftover = images / ".000004.k2j9x_0a.tmp.png"
    leftover.write_bytes((images / "000000.png").read_bytes())
    os.utime(leftover, (leftover.stat().st_mtime - 120,) * 2)  # a younger one may be in use
    assert len(load_reference(str(images))) == 4  # an FID reference does not count it
    summary = generate_images(
        generate_cfg(tmp_path / "in", f"input={images}", "task=edit", "sampler.schedule=H2")
    )
    assert summary["images"] == 4  # nor does generate.py's input=

    def stop(image, path):
        if path.name == "000006.png":
            raise RuntimeError("killed")
        save(image, path)

    save = gen.save_png
    monkeypatch.setattr(gen, "save_png", stop)
    with pytest.raises(RuntimeError, match="killed"):
        generate_images(generate_cfg(tmp_path, "sampler.schedule=H2", "num_images=8", "npz=true"))
    out = Path(small["out_dir"])
    assert not (out / "samples.npz").exists() and not (out / "grid.png").exists()
    monkeypatch.undo()
    generate_images(generate_cfg(tmp_path, "sampler.schedule=H2", "num_images=8", "npz=true"))
    assert len(np.load(out / "samples.npz")["arr_0"]) == 8 and not leftover.exists()


def test_fewer_images_than_processes_is_said_in_words(generate_cfg, tmp_path):
    """Lightning's predict sampler asserts one item per process, naming neither."""
    ddp = ["trainer.devices=2", "+trainer.strategy=ddp_spawn", "num_images=1"]
    with pytest.raises(ValueError, match=r"1 images for 2 processes: .* \(trainer.devices=1\)"):
        generate_images(generate_cfg(tmp_path, "sampler.schedule=H2", *ddp))


def test_inpaint_keeps_the_known_pixels_exactly_and_counts_unreadable_inputs(
    generate_cfg, tmp_path
):
    names = digits_folder(tmp_path / "in")
    out = tmp_path / "gen"
    common = [
        "task=inpaint",
        f"input={tmp_path / 'in'}",
        "num_images=null",
        "labels=1",
        "sampler.schedule=H1P2R2",
    ]
    summary = generate_images(generate_cfg(out, *common, "mask=bottom"))
    out = Path(summary["out_dir"])
    assert summary["images"] == len(names) and summary["skipped_inputs"] == 1
    for name in names:
        x, y = read(tmp_path / "in" / f"{name}.png"), read(out / "images" / f"{name}.png")
        assert np.array_equal(y[:16], x[:16])  # the top half is kept, exactly
        assert not np.array_equal(y[16:], x[16:])  # the bottom half is generated
    assert (out / "grid.png").is_file()

    # a folder of masks: one per input name, white = generate
    masks = tmp_path / "masks"
    for name in names:
        (masks / name).parent.mkdir(parents=True, exist_ok=True)
        m = np.zeros((32, 32), np.uint8)
        m[:, :8] = 255
        Image.fromarray(m).save(masks / f"{name}.png")
    out2 = tmp_path / "gen2"
    out2 = Path(generate_images(generate_cfg(out2, *common, f"mask={masks}"))["out_dir"])
    for name in names:
        x, y = read(tmp_path / "in" / f"{name}.png"), read(out2 / "images" / f"{name}.png")
        assert np.array_equal(y[:, 8:], x[:, 8:]) and not np.array_equal(y[:, :8], x[:, :8])
    (masks / "img0.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 5 inputs have no mask"):
        generate_images(generate_cfg(tmp_path / "gen3", *common, f"mask={masks}"))


def test_edit_at_full_strength_is_sampling_and_weak_edits_stay_close(generate_cfg, tmp_path):
    names = digits_folder(tmp_path / "in")
    generate_images(
        generate_cfg(tmp_path / "sampled", "sampler.schedule=H1P2R2", "num_images=5", "labels=2")
    )
    sampled, full, weak = (tmp_path / d / "H1P2R2" for d in ("sampled", "full", "weak"))
    common = [
        "task=edit",
        f"input={tmp_path / 'in'}",
        "num_images=null",
        "labels=2",
        "sampler.schedule=H1P2R2",
    ]
    generate_images(generate_cfg(tmp_path / "full", *common, "edit.strength=1.0"))
    for i, name in enumerate(names):  # input i gets image i's noise: strength 1 ignores the input
        assert np.array_equal(
            read(full / "images" / f"{name}.png"), read(sampled / "images" / f"{i:06d}.png")
        )
    generate_images(generate_cfg(tmp_path / "weak", *common, "edit.strength=0.1"))
    for name in names:
        x = read(tmp_path / "in" / f"{name}.png").astype(float)
        d_weak = np.abs(read(weak / "images" / f"{name}.png") - x).mean()
        d_full = np.abs(read(full / "images" / f"{name}.png") - x).mean()
        assert d_weak < 0.5 * d_full
    with pytest.raises(ValueError, match="strength"):
        generate_images(generate_cfg(tmp_path / "bad", *common, "edit.strength=0"))
    with pytest.raises(ValueError, match="baseline solver"):
        generate_images(
            generate_cfg(
                tmp_path / "bad",
                "task=edit",
                f"input={tmp_path / 'in'}",
                "sampler.schedule=euler:4",
            )
        )
    Image.open(tmp_path / "in" / "img0.png").save(tmp_path / "in" / "img0.jpg")
    with pytest.raises(ValueError, match=r"same PNG: \['img0'\]"):
        generate_images(generate_cfg(tmp_path / "bad", *common))
    with pytest.raises(ValueError, match="need the refiner"):
        generate_images(generate_cfg(tmp_path / "bad", "model.refiner_ckpt=null"))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        generate_images(generate_cfg(tmp_path / "bad", "task=edit", f"input={tmp_path / 'nope'}"))


ROWS = [
    {"schedule": "H8", "fid": 40.0, "ms_per_image_eager": 60.0, "ms_per_image_compiled": 50.0},
    {"schedule": "H1P2R2", "fid": 34.6, "ms_per_image_eager": 20.0, "ms_per_image_compiled": 18.0},
    {"schedule": "H1P3R3", "fid": 33.4, "ms_per_image_eager": 26.0, "ms_per_image_compiled": 19.0},
    {"schedule": "H2", "fid": 370.0, "ms_per_image_eager": 17.0, "ms_per_image_compiled": 14.0},
    {"schedule": "H4", "fid": 77.0, "ms_per_image_eager": 34.0, "ms_per_image_compiled": None},
]


def test_pick_row_meets_the_target_at_the_least_cost():
    assert pick_row(ROWS, max_fid=35)["schedule"] == "H1P2R2"  # fastest at FID <= 35
    assert pick_row(ROWS, max_fid=34)["schedule"] == "H1P3R3"
    assert pick_row(ROWS, max_ms=18.5)["schedule"] == "H1P2R2"  # best FID at <= 18.5 ms
    assert pick_row(ROWS, max_ms=15)["schedule"] == "H2"
    assert pick_row(ROWS, max_fid=100, max_ms=30, latency="eager")["schedule"] == "H1P2R2"
    assert pick_row(ROWS, max_fid=100, max_ms=30)["schedule"] == "H1P2R2"
    assert pick_row(ROWS, max_fid=80, latency="eager")["schedule"] == "H1P2R2"
    with pytest.raises(ValueError, match=r"has FID <= 30; its best FID is 33.4 \(H1P3R3"):
        pick_row(ROWS, max_fid=30)
    with pytest.raises(ValueError, match=r"has compiled latency <= 5 ms/img; its best FID"):
        pick_row(ROWS, max_ms=5)
    with pytest.raises(ValueError, match="max_fid"):
        pick_row(ROWS)
    with pytest.raises(ValueError, match="latency"):
        pick_row(ROWS, max_fid=40, latency="fast")


def test_pick_from_a_sweep_of_these_models_only(tiny_models, generate_cfg, tmp_path, caplog):
    results = sweep_of_these_models(tiny_models, tmp_path / "sweep", ROWS) / "results.json"
    rows = json.loads(results.read_text())
    rows[1]["refiner_sha256"] = "another refiner"  # H1P2R2 measured with another refiner
    results.write_text(json.dumps(rows))
    pick = [f"pick.sweep={tmp_path / 'sweep'}", "pick.max_fid=35", "num_images=3"]
    with caplog.at_level("WARNING", logger="flowturbo.generate"):
        summary = generate_images(generate_cfg(tmp_path / "gen", *pick))
    assert summary["sampler"] == "H1P3R3" and summary["picked"]["fid"] == 33.4
    assert "1 of" in caplog.text and "left out of the pick" in caplog.text
    assert "another refiner" in caplog.text and ": H1P2R2" in caplog.text
    rows[1]["refiner_sha256"] = rows[2]["refiner_sha256"]  # this job's refiner again
    rows[1]["cfg_channels"] = 3  # guided on 3 channels: not this job's sampler
    results.write_text(json.dumps(rows))
    caplog.clear()
    with caplog.at_level("WARNING", logger="flowturbo.generate"):
        summary = generate_images(generate_cfg(tmp_path / "gen1", *pick))
    assert summary["sampler"] == "H1P3R3" and ": H1P2R2" in caplog.text
    for r in rows:
        r["base_sha256"] = "another base"
    (tmp_path / "sweep" / "results.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="measured with these models"):
        generate_images(generate_cfg(tmp_path / "gen2", *pick))


def test_labels_and_mask_regions():
    assert resolve_labels(None, 5, 3, task="sample").tolist() == [0, 1, 2, 0, 1]
    assert resolve_labels(None, 3, 3, task="edit").tolist() == [3, 3, 3]  # the null class
    own = torch.tensor([2, 0, 1])
    assert resolve_labels(None, 3, 3, task="inpaint", own=own).tolist() == [2, 0, 1]
    assert resolve_labels([1, 2], 3, 3, task="edit").tolist() == [1, 2, 1]
    assert resolve_labels("null", 2, 3, task="sample").tolist() == [3, 3]
    with pytest.raises(ValueError, match=r"labels must be"):
        resolve_labels(7, 2, 3, task="sample")
    m = region_mask("bottom", 8)
    assert m.shape == (1, 1, 8, 8) and m[..., 4:, :].all() and not m[..., :4, :].any()
    assert region_mask("center", 8)[0, 0].sum() == 16
    with pytest.raises(ValueError, match="known: bottom"):
        region_mask("middle", 8)


def test_images_are_dealt_across_ddp_ranks(generate_cfg, tmp_path):
    single, spread = tmp_path / "single", tmp_path / "spread"
    sched = ["sampler.schedule=H2", "num_images=7", "sampler.batch_size=2"]
    generate_images(generate_cfg(single, *sched))
    ddp = ["trainer.devices=2", "+trainer.strategy=ddp_spawn"]
    generate_images(generate_cfg(spread, *sched, *ddp))
    files = sorted((single / "H2" / "images").glob("*.png"))
    assert len(files) == 7 and (spread / "H2" / "grid.png").is_file()
    for f in files:
        assert (spread / "H2" / "images" / f.name).read_bytes() == f.read_bytes()


def test_latent_model_goes_through_the_vae(generate_cfg, tiny_latent_model, tmp_path):
    """A 4-channel model: inputs are encoded, outputs decoded to RGB at the VAE's scale."""
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for i in range(3):  # RGB inputs of another size: center-cropped and resized to 16 x 16
        image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / "in" / f"in{i}.png")
    paths = [
        f"model.base_ckpt={tiny_latent_model / 'base.pt'}",
        f"vae={tiny_latent_model / 'vae'}",
    ]
    common = [*paths, "sampler.schedule=H2", "num_images=3", "npz=true"]
    summary = generate_images(generate_cfg(tmp_path / "s", *common))
    npz = np.load(Path(summary["out_dir"]) / "samples.npz")
    assert npz["arr_0"].shape == (3, 16, 16, 3)
    inpainted = [f"input={tmp_path / 'in'}", "task=inpaint", "mask=left", "labels=null"]
    summary = generate_images(generate_cfg(tmp_path / "i", *common, *inpainted))
    out = Path(summary["out_dir"])
    assert summary["images"] == 3 and read(out / "images" / "in0.png").shape == (16, 16, 3)
    # the known right half is the input's, exactly (it was the VAE's reconstruction of it)
    from flowturbo.inputs import load_image

    kept = load_image(tmp_path / "in" / "in0.png", 3, 16).permute(1, 2, 0).numpy()
    assert np.array_equal(read(out / "images" / "in0.png")[:, 8:], kept[:, 8:])
    assert read(out / "grid.png").shape[:2] == (3 * 17 + 1, 3 * 17 + 1)  # 3 rows of 3, padded


def test_a_flow_model_of_ones_own_generates_the_images_of_the_sit_it_adapts(
    generate_cfg, tmp_path
):
    args = ("sampler.schedule=H1P2R2", "num_images=6")
    sit = Path(generate_images(generate_cfg(tmp_path / "sit", *args))["out_dir"])
    own = Path(generate_images(generate_cfg(tmp_path / "own", *args, OWN_BASE_ARCH))["out_dir"])
    for a in sorted((sit / "images").glob("*.png")):
        diff = np.abs(read(a).astype(int) - read(own / "images" / a.name).astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, a.name
    jobs = [json.loads((d / "job.json").read_text()) for d in (sit, own)]
    assert jobs[0]["base"] != jobs[1]["base"]  # a rerun of the other kind would be refused


def sweep_of_these_models(tiny_models, folder, rows):
    """folder/results.json: rows measured with the tiny models, no guidance."""
    fp = networks.fingerprint(str(tiny_models / "base.pt"))
    rfp = networks.fingerprint(str(tiny_models / "refiner.pt"))
    rows = [
        {**r, "base_sha256": fp, "cfg_scale": 1.0, "refiner_nfe": 4 if "R" in r["schedule"] else 0}
        for r in rows
    ]
    for r in rows:
        r.update(refiner_sha256=rfp if r["refiner_nfe"] else None, refiner_input="d0")
    folder.mkdir(exist_ok=True)
    (folder / "results.json").write_text(json.dumps(rows))
    return folder


def test_edit_and_inpaint_pick_only_schedules_from_a_sweep(tiny_models, generate_cfg, tmp_path):
    euler = {"schedule": "euler:4", "fid": 30.0, "ms_per_image_eager": 5.0}
    rows = [{**euler, "ms_per_image_compiled": 4.0}, *ROWS]
    sweep_dir = sweep_of_these_models(tiny_models, tmp_path / "sweep", rows)
    pick = [f"pick.sweep={sweep_dir}", "pick.max_ms=1000"]
    entry, _ = gen.choose_entry(generate_cfg(tmp_path / "gen", *pick))
    assert entry.label == "euler:4"  # sampling may deploy a baseline
    for task in ("edit", "inpaint"):
        entry, row = gen.choose_entry(generate_cfg(tmp_path / "gen", *pick, f"task={task}"))
        assert entry.label == "H1P3R3" and row["fid"] == 33.4  # the best schedule
    with pytest.raises(ValueError, match=r"best FID is 33.4 \(H1P3R3.*baseline solvers left out"):
        pick_row(rows, max_fid=31, schedules_only=True)
    with pytest.raises(ValueError, match="no schedule.*only baseline solvers"):
        pick_row(rows[:1], max_fid=31, schedules_only=True)


def test_num_images_below_one_is_refused_for_every_task(generate_cfg, tmp_path, capsys):
    digits_folder(tmp_path / "in")
    for args in (
        ["task=edit", "input=demo:val"],
        ["task=inpaint", f"input={tmp_path / 'in'}"],
        ["task=sample"],
    ):
        with pytest.raises(ValueError, match="num_images"):
            generate_images(
                generate_cfg(tmp_path / "gen", "sampler.schedule=H2", "num_images=0", *args)
            )
    assert not (tmp_path / "gen").exists()
    # no grid asked for: the summary does not mention one
    summary = generate_images(
        generate_cfg(tmp_path / "gen", "sampler.schedule=H2", "num_images=2", "grid.num_images=0")
    )
    assert summary["grid"] is None and "grid" not in capsys.readouterr().out
    assert not (tmp_path / "gen" / "H2" / "grid.png").exists()


def test_labels_must_be_classes_not_floats_or_booleans():
    for spec in (3.5, True, [1, False], "two", {"a": 1}):
        with pytest.raises(ValueError, match=r"labels must be"):
            resolve_labels(spec, 2, 3, task="sample")
    assert resolve_labels((0, 2), 3, 3, task="sample").tolist() == [0, 2, 0]


def test_a_broken_sweep_or_mask_file_is_named(tiny_models, generate_cfg, tmp_path):
    results = tmp_path / "sweep" / "results.json"
    results.parent.mkdir()
    pick = [f"pick.sweep={results.parent}", "pick.max_fid=35"]
    for text, match in (
        ('[{"schedule": "H2", "fid"', "not valid JSON"),
        ('"H2"', "not a list of rows"),
        ('["H2"]', "not a list of rows"),
        ("[]", "no rows yet.*evaluate.py"),
    ):
        results.write_text(text)
        with pytest.raises(ValueError, match=match):
            gen.choose_entry(generate_cfg(tmp_path / "gen", *pick))
    sweep_of_these_models(tiny_models, results.parent, ROWS)
    with pytest.raises(ValueError, match="pick.max_fid must be a number, got 'abc'"):
        gen.choose_entry(generate_cfg(tmp_path / "gen", *pick, "pick.max_fid=abc"))
    with pytest.raises(ValueError, match="pick.max_ms must be a number"):
        pick_row(ROWS, max_ms=True)

    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"mask=.*notes.txt.*not a readable image"):
        generate_images(
            generate_cfg(
                tmp_path / "gen",
                "task=inpaint",
                "input=demo:val",
                "num_images=2",
                "sampler.schedule=H2",
                f"mask={tmp_path / 'notes.txt'}",
            )
        )


def test_a_refiner_made_for_another_base_is_refused_naming_both_checkpoints(
    tiny_models, generate_cfg, tmp_path
):
    from flowturbo.models import VelocityRefiner, build_from_checkpoint, save_checkpoint

    base = build_from_checkpoint(str(tiny_models / "base.pt"))
    for overrides, match in (
        ({"num_classes": 5}, "refiner has 5 classes, the base 3"),
        ({"in_channels": 3}, "refiner takes 6 channels.*have 1"),
        ({"input_size": 16}, "refiner works at 16 x 16, the base at 32 x 32"),
    ):
        path = tmp_path / f"{next(iter(overrides))}.pt"
        save_checkpoint(VelocityRefiner.from_base(base, **overrides), path)
        cfg = generate_cfg(tmp_path / "gen", f"model.refiner_ckpt={path}")
        with pytest.raises(ValueError, match=rf"model\.refiner_ckpt=.*model\.base_ckpt=.*{match}"):
            networks.load_networks(cfg, torch.device("cpu"), need_refiner=True)
    cfg = generate_cfg(tmp_path / "gen", f"model.refiner_ckpt={tiny_models / 'base.pt'}")
    with pytest.raises(ValueError, match=r"model\.refiner_ckpt=.*holds a SiT.*model\.base_ckpt"):
        networks.load_networks(cfg, torch.device("cpu"), need_refiner=True)


def test_a_mask_that_marks_nothing_is_refused_and_transparency_is_read_by_its_alpha(
    generate_cfg, tmp_path, caplog
):
    grey = np.zeros((32, 32), np.uint8)
    Image.fromarray(grey).save(tmp_path / "black.png")
    with pytest.raises(ValueError, match=r"black.png marks no pixel.*white \(>= 128\) = generate"):
        load_masks(str(tmp_path / "black.png"), ["a"], 32)
    rgba = np.full((32, 32, 4), 255, np.uint8)
    rgba[..., 3] = 0  # white, but transparent everywhere
    Image.fromarray(rgba).save(tmp_path / "clear.png")
    with pytest.raises(ValueError, match="clear.png marks no pixel.*alpha channel"):
        load_masks(str(tmp_path / "clear.png"), ["a"], 32)

    # black strokes on an empty layer: the opaque bottom half is generated, as with mask=bottom
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[16:, :, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "layer.png")
    common = ["task=inpaint", "input=demo:val", "num_images=2", "sampler.schedule=H2"]
    outs = [
        Path(generate_images(generate_cfg(tmp_path / d, *common, f"mask={m}"))["out_dir"])
        for d, m in (("layer", tmp_path / "layer.png"), ("bottom", "bottom"))
    ]
    for name in ("val00000", "val00001"):
        a, b = (read(d / "images" / f"{name}.png") for d in outs)
        assert np.array_equal(a, b)

    # masks are cropped to a square as the inputs are: another aspect ratio is logged
    tall = np.zeros((50, 7), np.uint8)
    tall[25:] = 255
    Image.fromarray(tall).save(tmp_path / "tall.png")
    with caplog.at_level("WARNING", logger="flowturbo.inputs"):
        load_masks(str(tmp_path / "tall.png"), ["a", "b"], 32, [(32, 32), (7, 50)])
    assert "tall.png is 7 x 50; 1 of 2 inputs have another aspect ratio (e.g. a is 32" in (
        caplog.text
    )
    caplog.clear()
    (tmp_path / "masks").mkdir()
    Image.fromarray(tall).save(tmp_path / "masks" / "a.png")
    Image.fromarray(tall[:14]).save(tmp_path / "masks" / "b.png")
    with caplog.at_level("WARNING", logger="flowturbo.inputs"):
        load_masks(str(tmp_path / "masks"), ["a", "b"], 32, [(7, 50), (32, 32)])
    assert "1 of 2 masks have another aspect ratio than their input" in caplog.text
    assert "b.png is 7 x 14, b 32 x 32" in caplog.text and "a.png" not in caplog.text


def test_a_pick_target_without_a_sweep_is_refused(generate_cfg, tmp_path):
    for key in ("max_fid", "max_ms"):
        cfg = generate_cfg(tmp_path / "gen", "sampler.schedule=H2", f"pick.{key}=40")
        with pytest.raises(ValueError, match=rf"pick\.{key}=40 without pick\.sweep"):
            gen.choose_entry(cfg)


def test_a_vae_for_a_pixel_model_is_dropped_with_a_warning(generate_cfg, tmp_path, caplog):
    args = ["sampler.schedule=H2", "num_images=2"]
    with caplog.at_level("WARNING", logger="flowturbo.eval.networks"):
        summary = generate_images(generate_cfg(tmp_path / "gen", *args, f"vae={tmp_path}"))
    assert "ignored: the base works in pixel space (1 x 32 x 32 states)" in caplog.text
    assert json.loads((Path(summary["out_dir"]) / "job.json").read_text())["vae"] is None
    assert generate_images(generate_cfg(tmp_path / "gen", *args))["written"] == 0  # same job


def test_config_mistakes_name_their_setting(generate_cfg, tmp_path):
    for args, match in (
        (["sampler.batch_size=0"], r"sampler\.batch_size must be an integer >= 1, got 0"),
        (["sampler.batch_size=2.5"], r"sampler\.batch_size must be"),
        (["grid.num_images=many"], r"grid\.num_images must be"),
        (["task=edit", "input=demo:val", "edit.strength=high"], r"edit\.strength .*got 'high'"),
        (["task=edit", "input=demo:val", "edit.strength=1.5"], r"edit\.strength must be"),
        (["seed=abc"], r"seed must be an integer >= 0, got 'abc'"),
        (["threads=abc"], r"threads must be an integer >= 1"),
        (["sampler.cfg_scale=abc"], r"sampler\.cfg_scale must be a number"),
        (["sampler.cfg_channels=7"], r"sampler\.cfg_channels must be null .* or 1\.\.1"),
        (["sampler.schedule=H1P1R2", "sampler.refiner_input=foo"], r"refiner_input must be"),
        (["task=edit", "input=demo:vall"], r"input=demo:vall: the demo splits are demo:train"),
    ):
        with pytest.raises(ValueError, match=match):
            generate_images(
                generate_cfg(tmp_path / "gen", "sampler.schedule=H2", "num_images=2", *args)
            )
    assert not (tmp_path / "gen").exists()


def test_a_damaged_job_json_or_output_image_is_named(generate_cfg, tmp_path):
    cfg = generate_cfg(tmp_path / "gen", "sampler.schedule=H2", "num_images=3")
    out = Path(generate_images(cfg)["out_dir"])
    job = (out / "job.json").read_text()
    for text in (job[:20], "[1, 2]"):
        (out / "job.json").write_text(text)
        with pytest.raises(RuntimeError, match=r"job.json is damaged.*delete that folder"):
            generate_images(cfg)
    (out / "job.json").write_text(job)

    image = out / "images" / "000001.png"
    before = image.read_bytes()
    image.write_bytes(b"")  # an empty file is not an image: it is written again
    assert generate_images(cfg)["written"] == 1 and image.read_bytes() == before
    image.write_bytes(before[:40])
    with pytest.raises(ValueError, match=r"000001.png is not a readable image.*delete it"):
        generate_images(cfg)


def test_other_masks_or_inputs_at_the_same_path_are_another_job(generate_cfg, tmp_path):
    """job.json kept only the paths: a redrawn mask file resumed the folder, so its first
    images had one mask and the rest another."""
    mask = np.zeros((32, 32), np.uint8)
    mask[16:] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    job = ["sampler.schedule=H2", "task=inpaint", "input=demo:val", f"mask={tmp_path / 'm.png'}"]
    generate_images(generate_cfg(tmp_path / "gen", *job, "num_images=1"))
    Image.fromarray(mask[::-1].copy()).save(tmp_path / "m.png")  # now the top half
    with pytest.raises(RuntimeError, match=r"other settings \(differs in \['mask_files'\]\)"):
        generate_images(generate_cfg(tmp_path / "gen", *job, "num_images=3"))


def test_inputs_are_read_as_shown_exif_turned_and_16_bit_scaled(tmp_path):
    """A phone photo is stored sideways with an EXIF orientation: it was read sideways (and its
    mask, drawn on the photo as shown, missed it); 16-bit grey was clipped to white."""
    from flowturbo.inputs import load_image, load_inputs

    stored = np.zeros((32, 48), np.uint8)  # 48 wide, 32 high as stored
    stored[:, :20] = 255  # the stored left edge: the top once turned by orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    shown = load_image(tmp_path / "photo.png", 1, 32)[0].float()  # 32 x 48 shown, cropped
    assert shown[:4].mean() > 200 and shown[-4:].mean() < 50  # bright top (was: left)
    assert load_inputs(str(tmp_path / "photo.png"), 1, 32).sizes == [(32, 48)]

    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert abs(load_image(tmp_path / "deep.png", 1, 32).float().mean() - 127.5) < 2


def test_image_files_of_other_formats_are_read_or_named_not_dropped(tmp_path, caplog):
    """Input and reference folders listed only .png/.jpg/.jpeg/.webp/.bmp: a folder's .tiff
    images were left out without a word (and the shard writer took .tif, so lists disagreed)."""
    from flowturbo.eval.fidelity import ImageFolderImages
    from flowturbo.inputs import load_inputs

    grey = Image.fromarray(np.full((32, 32), 128, np.uint8))
    for name in ("a.png", "b.TIFF", "c.ppm", "sub/d.jpeg", "e.gif"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        grey.convert("RGB").save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / ".hidden").write_text("not counted\n")
    with caplog.at_level("WARNING"):
        inputs = load_inputs(str(tmp_path), 1, 32)
    assert inputs.names == ["a", "b", "c", "sub/d"]
    assert "input=" in caplog.text and "left out 2 file(s)" in caplog.text
    assert "e.gif, notes.txt" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        reference = ImageFolderImages.from_folder(tmp_path)
    assert [p.name for p in reference.files] == ["a.png", "b.TIFF", "c.ppm", "d.jpeg"]
    assert "the reference folder" in caplog.text and "left out 2 file(s)" in caplog.text
