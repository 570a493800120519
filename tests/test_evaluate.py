"""evaluate.py's sweep: entries, seeds, resume, summary, multirun; tiny model and extractor."""

import errno
import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from own_flow import OWN_BASE_ARCH
from PIL import Image

from flowturbo import lock as lock_mod
from flowturbo.eval import entries, networks, sweep
from flowturbo.eval import summary as summary_mod
from flowturbo.eval.atomic import remove_leftovers
from flowturbo.eval.digits import DigitClassifier, save_classifier
from flowturbo.eval.fidelity import fid_against_statistics, fidelity_metrics, load_reference
from flowturbo.eval.summary import acceleration_tables
from flowturbo.lit import load_frozen_base
from flowturbo.models import CheckpointError, SiT, VelocityRefiner, save_checkpoint
from flowturbo.sampling import clear_compile_cache

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
COLUMNS = [
    "sampler",
    "schedule",
    "steps",
    "base_nfe",
    "refiner_nfe",
    "fid",
    "isc_mean",
    "precision",
    "recall",
    "ref_error",
    "ms_per_image_eager",
    "ms_per_image_compiled",
    "batch",
    "device",
    "dtype",
    "seed",
    "num_images",
    "cfg_scale",
]


def _randomise(model: torch.nn.Module) -> None:
    """SiT starts with zero heads (velocity 0): give every zero tensor small random values."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny base and refiner (SiT-Tiny/4, 1 x 32 x 32, 3 classes), a random digit
    classifier as the extractor and 64 random blob images as the FID reference."""
    d = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    base = SiT.from_name(
        "SiT-Tiny/4", input_size=32, in_channels=1, num_classes=3, learn_sigma=False
    )
    refiner = VelocityRefiner.from_base(base)
    _randomise(base)
    _randomise(refiner)
    save_checkpoint(base, d / "base.pt")
    save_checkpoint(refiner, d / "refiner.pt")
    save_classifier(DigitClassifier(width=4, feature_dim=16), d / "digits.pt", accuracy=0.1)
    rng = np.random.default_rng(0)
    images = (rng.random((64, 32, 32)) > 0.7).astype(np.uint8) * 255
    np.savez(d / "ref.npz", arr_0=images)
    return d


def tiny(assets, out_dir, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("evaluate", overrides=tiny_overrides(assets, out_dir) + list(overrides))


def tiny_overrides(assets, out_dir):
    return [
        f"model.base_ckpt={assets / 'base.pt'}",
        f"model.refiner_ckpt={assets / 'refiner.pt'}",
        "vae=null",
        "device=cpu",
        "threads=1",
        f"out_dir={out_dir}",
        "sweep.schedules=[H2,H1P2R2]",
        "sweep.baselines.euler=[4]",
        "sampler.batch_size=32",
        "fid.num_images=64",
        f"fid.reference={assets / 'ref.npz'}",
        f"fid.weights={assets / 'digits.pt'}",
        f"fid.cache_root={out_dir}/../fidelity_cache",
        "fid.batch_size=64",
        "ref_error.num_images=8",
        "ref_error.steps=16",
        "latency.batch=4",
        "latency.warmup=0",
        "latency.repeats=1",
        "latency.compiled=false",
        "grid.num_images=6",
        "progress=false",
        "wandb.enabled=false",
    ]


class Counter:
    """Wraps a function of the sweep module and records the entries it was called for."""

    def __init__(self, monkeypatch, name):
        self.calls: list[str] = []
        fn = getattr(sweep, name)

        def wrapped(entry, *args, **kwargs):  # an entry, or a list of entries
            self.calls += [e.label for e in (entry if isinstance(entry, list) else [entry])]
            return fn(entry, *args, **kwargs)

        monkeypatch.setattr(sweep, name, wrapped)


def mtimes(out_dir):
    return {p.name: p.stat().st_mtime_ns for p in (out_dir / "rows").glob("*.json")}


# ----------------------------------------------------------------------------- entries


def test_entries_parse_schedules_and_baselines_into_families_with_nfe():
    cases = {
        "H8": ("heun", 16, 0, "H8"),
        "heun:8": ("heun", 16, 0, "H8"),
        "H3E1": ("heun_euler", 7, 0, "H3E1"),  # Heun, then one Euler step
        "H1E2": ("other", 4, 0, "H1E2"),
        "H1P7": ("pseudo", 9, 0, "H1P7"),
        "H2P4R3": ("flowturbo", 8, 6, "H2P4R3"),
        "euler:16": ("euler", 16, 0, "euler-16"),
        "midpoint:4": ("midpoint", 8, 0, "midpoint-4"),
        "multistep:12": ("multistep", 12, 0, "multistep-12"),
    }
    for text, (family, base_nfe, refiner_nfe, key) in cases.items():
        e = entries.parse_entry(text)
        assert (e.family, e.base_nfe, e.refiner_nfe, e.key) == (family, base_nfe, refiner_nfe, key)
    assert entries.parse_entry("H2P4R3").steps == 9
    with pytest.raises(ValueError, match="unknown solver 'rk4'"):
        entries.parse_entry("rk4:8")
    with pytest.raises(ValueError, match="positive integer"):
        entries.parse_entry("euler:0")
    with pytest.raises(ValueError, match="unknown step letter"):
        entries.parse_entry("H2X3")


def test_single_values_are_one_element_lists_and_step_counts_must_be_integers(assets, tmp_path):
    def labels(*overrides):
        return [e.label for e in entries.sweep_entries(tiny(assets, tmp_path, *overrides))]

    assert labels("sweep.schedules=H2P4R3") == ["H2P4R3", "euler:4"]  # not 'H', '2', ...
    assert labels("sweep.baselines.euler=4") == ["H2", "H1P2R2", "euler:4"]
    assert labels("sweep.baselines.euler=[4.0,8]") == ["H2", "H1P2R2", "euler:4", "euler:8"]
    for bad in ["[4.7]", "[true]", "[four]", "[0]", "2.5"]:
        with pytest.raises(ValueError, match=r"sweep\.baselines\.euler: step counts must be"):
            labels(f"sweep.baselines.euler={bad}")
    with pytest.raises(ValueError, match="positive integer"):
        entries.parse_entry("euler:\uff14")  # a full-width 4


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["fid.num_images=0"], r"fid\.num_images must be an integer >= 2"),
        (["fid.num_images=1"], r"fid\.num_images must be an integer >= 2"),
        (["fid.num_images=5"], r"needs at least 10 images .* set fid\.isc=false"),
        (["fid.num_images=3", "fid.isc=false"], r"more than 3 images .* set fid\.prc=false"),
        (["ref_error.dtype=float16"], r"ref_error\.dtype must be 'float64' or 'float32'"),
        (["latency.repeats=0"], r"latency\.repeats must be an integer >= 1, got 0"),
        (["latency.batch=0"], r"latency\.batch must be an integer >= 1, got 0"),
        (["latency.warmup=-1"], r"latency\.warmup must be an integer >= 0, got -1"),
        (["sampler.batch_size=0"], r"sampler\.batch_size must be an integer >= 1, got 0"),
        (["fid.batch_size=0"], r"fid\.batch_size must be an integer >= 1, got 0"),
        (["ref_error.steps=0"], r"ref_error\.steps must be an integer >= 1, got 0"),
        (["ref_error.num_images=-1"], r"ref_error\.num_images must be an integer >= 0"),
        (["fid.save_every=-1"], r"fid\.save_every must be an integer >= 0, got -1"),
        (["grid.num_images=-3"], r"grid\.num_images must be an integer >= 0 \(0: no grid\)"),
        (["threads=0"], r"threads must be an integer >= 1 \(null: torch's default\), got 0"),
        (["sampler.cfg_scale=abc"], r"sampler\.cfg_scale must be a number .* got 'abc'"),
        (["sampler.cfg_channels=0"], r"sampler\.cfg_channels must be null .* got 0"),
        (["device=gpu"], r"device=gpu is not a torch device: give auto, cpu, cuda"),
    ],
)
def test_bad_numbers_are_refused_before_any_model_is_loaded(
    assets, tmp_path, monkeypatch, overrides, names
):
    def load_networks(*args, **kwargs):
        raise AssertionError("loaded the models before checking the settings")

    monkeypatch.setattr(sweep, "load_networks", load_networks)
    with pytest.raises(ValueError, match=names):
        sweep.run_sweep(tiny(assets, tmp_path, *overrides))


def _file(path, text="not what it should be\n"):
    path.write_text(text)
    return path


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


#: A bad FID setting: (overrides from the assets and a folder, error, what it must say).
BAD_FID = {
    "unregistered extractor": (
        lambda a, d: ["fid.extractor=inception"],
        ValueError,
        r"fid\.extractor=inception: torch-fidelity has no feature extractor named 'inception'",
    ),
    "missing InceptionV3 weights": (
        lambda a, d: ["fid.extractor=inception-v3-compat", f"+fid.inception_weights={d}/no.pth"],
        FileNotFoundError,
        r"fid\.inception_weights=\S+no\.pth: InceptionV3 weights not found",
    ),
    "InceptionV3 without the weights key": (
        lambda a, d: ["fid.extractor=inception-v3-compat"],
        FileNotFoundError,
        r"add \+fid\.inception_weights=<path to weights-inception-2015-12-05-6726825d\.pth>",
    ),
    "corrupt InceptionV3 weights": (
        lambda a, d: [
            "fid.extractor=inception-v3-compat",
            f"+fid.inception_weights={_file(d / 'w.pth')}",
        ],
        ValueError,
        r"fid\.inception_weights=\S+w\.pth: \S+ could not be read as InceptionV3 weights",
    ),
    "wrong extractor weights": (
        lambda a, d: [f"fid.weights={a / 'base.pt'}"],
        ValueError,
        r"fid\.weights=\S+base\.pt: feature extractor 'flowturbo-digits' could not be built",
    ),
    "reference images of the wrong size": (
        lambda a, d: [f"fid.reference={_npz(d / 'r.npz', arr_0=np.zeros((8, 28, 28), np.uint8))}"],
        ValueError,
        r"fid\.reference=\S+r\.npz: the reference images are 28 x 28",
    ),
    "reference statistics of the wrong width": (
        lambda a, d: [f"fid.reference={_npz(d / 's.npz', mu=np.zeros(8), sigma=np.eye(8))}"],
        ValueError,
        r"fid\.reference=\S+s\.npz: the reference statistics have 8 features, but feature "
        r"extractor 'flowturbo-digits' gives 16",
    ),
    "a text file as the reference": (
        lambda a, d: [f"fid.reference={_file(d / 'ref.npz')}"],
        ValueError,
        r"fid\.reference=\S+ref\.npz: \S+ is not an \.npz archive",
    ),
    "too few reference images for precision/recall": (
        lambda a, d: [f"fid.reference={_npz(d / 'r.npz', arr_0=np.zeros((3, 32, 32), np.uint8))}"],
        ValueError,
        r"fid\.reference=\S+r\.npz: precision/recall need more than 3 reference images, it has "
        r"3: give more or set fid\.prc=false",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FID))
def test_bad_fid_settings_are_refused_before_any_image_is_generated(
    assets, tmp_path, monkeypatch, case
):
    """Found after the images, a bad FID setting threw them away (50,000 for SiT-XL)."""
    overrides, error, message = BAD_FID[case]

    def load_networks(*args, **kwargs):
        raise AssertionError("loaded the models (to generate) before checking the FID settings")

    monkeypatch.setattr(sweep, "load_networks", load_networks)
    with pytest.raises(error, match=message):
        sweep.run_sweep(tiny(assets, tmp_path / "sweep", *overrides(assets, tmp_path)))


def test_precision_recall_asked_of_statistics_is_said_to_be_left_out(assets, tmp_path, caplog):
    stats = _npz(tmp_path / "s.npz", mu=np.zeros(16), sigma=np.eye(16))
    cfg = tiny(assets, tmp_path / "sweep", f"fid.reference={stats}", "fid.prc=true")
    assert sweep.check_fid(cfg).is_statistics
    assert "precision and recall need reference images" in caplog.text


def test_a_reference_folders_unreadable_images_are_counted_in_the_row(assets, tmp_path):
    from PIL import Image

    folder = tmp_path / "ref"
    folder.mkdir()
    for i, image in enumerate(load_reference(str(assets / "ref.npz")).images[:12, 0]):
        Image.fromarray(image.numpy()).save(folder / f"{i:02d}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    small = ["sweep.schedules=[H1]", "sweep.baselines.euler=[]", "fid.num_images=16"]
    off = ["ref_error.num_images=0", "latency.eager=false", "grid.num_images=0"]
    cfg = tiny(assets, tmp_path / "sweep", *small, *off, f"fid.reference={folder}")
    (row,) = sweep.run_sweep(cfg)["rows"]  # was a PIL.UnidentifiedImageError after the images
    assert row["fid"] is not None
    stored = json.loads((tmp_path / "sweep" / "rows" / "H1.json").read_text())
    quality = stored["parts"]["quality"]["result"]
    assert quality["num_reference"] == 12 and quality["reference_skipped"] == 1


def test_latency_settings_are_not_checked_when_no_latency_is_measured(assets, tmp_path):
    off = ["latency.eager=false", "latency.repeats=0", "latency.batch=0", "latency.warmup=-1"]
    small = ["sweep.schedules=[H1]", "sweep.baselines.euler=[]", "fid.num_images=16"]
    (row,) = sweep.run_sweep(tiny(assets, tmp_path, *small, *off, "grid.num_images=0"))["rows"]
    assert row["fid"] is not None and row["ms_per_image_eager"] is None
    # the fewest images each metric takes
    sweep.check_settings(tiny(assets, tmp_path, "fid.num_images=10", "fid.prc=true"))
    sweep.check_settings(tiny(assets, tmp_path, "fid.num_images=4", "fid.isc=false"))
    sweep.check_settings(
        tiny(assets, tmp_path, "fid.num_images=2", "fid.isc=false", "fid.prc=false")
    )


def test_base_checkpoint_errors_name_evaluates_settings(assets, tmp_path):
    bare = tmp_path / "state_dict.pt"
    torch.save(load_frozen_base(str(assets / "base.pt")).state_dict(), bare)
    with pytest.raises(CheckpointError, match=r"set model\.base_arch\.name \(e\.g\. SiT-XL/2\)"):
        sweep.run_sweep(tiny(assets, tmp_path / "a", f"model.base_ckpt={bare}"))
    with pytest.raises(CheckpointError, match=r"not a base flow model: set model\.base_ckpt to"):
        sweep.run_sweep(tiny(assets, tmp_path / "b", f"model.base_ckpt={assets / 'refiner.pt'}"))


def test_noise_depends_only_on_seed_and_index():
    a = networks.seeded_noise(0, range(6), (1, 4, 4))
    b = torch.cat(
        [networks.seeded_noise(0, [4, 5], (1, 4, 4)), networks.seeded_noise(0, [0], (1, 4, 4))]
    )
    assert torch.equal(a[4:], b[:2]) and torch.equal(a[0], b[2])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, networks.seeded_noise(1, range(6), (1, 4, 4)))


# ----------------------------------------------------------------------------- the sweep


def test_tiny_sweep_writes_every_file_with_the_expected_columns(
    assets, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "sweep"
    generated = Counter(monkeypatch, "generate")
    result = sweep.run_sweep(tiny(assets, out))

    assert generated.calls == ["H2", "H1P2R2", "euler:4"]
    for name in ["results.json", "results.csv", "pareto.png", "acceleration.json", "summary.txt"]:
        assert (out / name).is_file(), name
    summary = (out / "summary.txt").read_text()  # what was printed, kept
    assert summary.startswith("3 schedules in ") and summary in capsys.readouterr().out
    assert all(name in summary for name in ("H2", "H1P2R2", "euler:4", "acceleration"))
    assert sorted(p.name for p in (out / "rows").iterdir()) == [
        "H1P2R2.json",
        "H2.json",
        "euler-4.json",
    ]
    assert len(list((out / "grids").glob("*.png"))) == 3
    assert len(list((out / "reference").glob("ref-*.pt"))) == 1  # computed once, shared

    rows = {r["schedule"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(rows) == {"H2", "H1P2R2", "euler:4"}
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert set(COLUMNS) <= set(header) and header[:3] == ["sampler", "schedule", "fid"]
    h2, ft, eu = rows["H2"], rows["H1P2R2"], rows["euler:4"]
    assert (h2["sampler"], h2["base_nfe"], h2["refiner_nfe"], h2["steps"]) == ("heun", 4, 0, 2)
    assert (ft["sampler"], ft["base_nfe"], ft["refiner_nfe"], ft["steps"]) == (
        "flowturbo",
        4,
        4,
        5,
    )
    assert (eu["sampler"], eu["base_nfe"], eu["refiner_nfe"]) == ("euler", 4, 0)
    for r in rows.values():
        assert r["num_images"] == 64 and r["seed"] == 0 and r["batch"] == 4
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["cfg_scale"] == 1.0
        assert r["fid"] is not None and r["fid"] >= 0 and r["isc_mean"] > 0
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        assert r["ms_per_image_eager"] > 0
        assert r["ms_per_image_compiled"] is None  # latency.compiled=false
        assert r["ref_error"] > 0 and r["ref_error_images"] == 8
    assert ft["refiner_input"] == "d0" and h2["refiner_input"] is None
    assert eu["ref_error"] > h2["ref_error"]  # first order vs second order, same NFE

    tables = json.loads((out / "acceleration.json").read_text())
    modes = {(t["baseline"], t["candidate"], t["quality_key"], t["mode"]) for t in tables}
    assert ("heun", "flowturbo", "fid", "eager") in modes
    assert ("heun", "flowturbo", "fid", "compiled") in modes
    assert ("euler", "flowturbo", "fid", "eager") in modes  # the sweep's baseline solver too
    assert tables[0]["baseline"] == "heun"
    eager = next(
        t
        for t in tables
        if (t["baseline"], t["candidate"], t["quality_key"], t["mode"]) == modes_key("eager")
    )
    assert [r["baseline_schedule"] for r in eager["rows"]] == ["H2"]
    assert result["rows"] and result["acceleration"] == tables


def modes_key(mode):
    return ("heun", "flowturbo", "fid", mode)


def test_interrupted_sweep_resumes_without_redoing_finished_parts(assets, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    real_generate, real_latency = sweep.generate, sweep.measure_entries_latency

    def interrupted(entry, *args, **kwargs):
        if entry.label == "H1P2R2":
            raise KeyboardInterrupt  # the job dies during the second entry's images
        return real_generate(entry, *args, **kwargs)

    monkeypatch.setattr(sweep, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(tiny(assets, out))
    first = mtimes(out)
    assert set(first) == {"H2.json"}
    partial = json.loads((out / "rows" / "H2.json").read_text())
    assert set(partial["parts"]) == {"quality", "ref_error"}  # latency comes last, for all

    def no_latency(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "generate", real_generate)
    generated = Counter(monkeypatch, "generate")
    monkeypatch.setattr(sweep, "measure_entries_latency", no_latency)
    with pytest.raises(KeyboardInterrupt):  # now it dies while timing: the images are kept
        sweep.run_sweep(tiny(assets, out))
    assert generated.calls == ["H1P2R2", "euler:4"]  # only the entries that never finished
    assert mtimes(out)["H2.json"] == first["H2.json"]  # finished parts: not even rewritten

    monkeypatch.setattr(sweep, "measure_entries_latency", real_latency)
    timed = Counter(monkeypatch, "measure_entries_latency")
    sweep.run_sweep(tiny(assets, out))
    assert generated.calls == ["H1P2R2", "euler:4"]  # nothing generated again
    assert timed.calls == ["H2", "H1P2R2", "euler:4"]  # all three timed in one set of rounds
    rows = json.loads((out / "results.json").read_text())
    assert all(r["ms_per_image_eager"] for r in rows) and len(rows) == 3

    # a third run has nothing to do and loads no model
    monkeypatch.setattr(sweep, "load_networks", _no_models)
    before = mtimes(out)
    sweep.run_sweep(tiny(assets, out))
    assert mtimes(out) == before


#: One FlowTurbo entry of 64 images in batches of 8, saved every 16.
SAVED_EVERY_16 = [
    "sweep.schedules=[H1P2R2]", "sweep.baselines.euler=[]", "sampler.batch_size=8",
    "fid.save_every=16", "latency.eager=false",
]  # fmt: skip


def _killed_after_32_images(assets, out, monkeypatch) -> list[int]:
    """Runs SAVED_EVERY_16 into ``out`` and kills it in its sixth batch (32 images saved, 40
    made); returns the list in which the patched sampler records each batch's first image
    from then on (``sweep._sample_indices.__wrapped__`` is the real one)."""
    real = sweep._sample_indices
    made: list[int] = []
    killed = []

    @functools.wraps(real)
    def sample(entry, nets, cfg, idx, compile=False):
        if int(idx[0]) == 40 and not killed:
            killed.append(True)
            raise KeyboardInterrupt
        made.append(int(idx[0]))
        return real(entry, nets, cfg, idx, compile)

    monkeypatch.setattr(sweep, "_sample_indices", sample)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(tiny(assets, out, *SAVED_EVERY_16))
    made.clear()
    return made


def test_saved_images_serve_a_rerun_that_changes_only_how_they_are_scored(
    assets, tmp_path, monkeypatch
):
    """The saved images were keyed by every quality setting: a job killed mid-entry and rerun
    with, say, fid.prc=false made all its images again. Only what decides the images counts."""
    out = tmp_path / "sweep"
    made = _killed_after_32_images(assets, out, monkeypatch)
    sweep.run_sweep(tiny(assets, out, *SAVED_EVERY_16, "fid.prc=false", "fid.isc=false"))
    assert made[:4] == [32, 40, 48, 56]  # from the first unsaved image on
    made.clear()
    sweep.run_sweep(tiny(assets, out, *SAVED_EVERY_16, "sampler.cfg_channels=1"))
    assert made[:2] == [0, 8]  # other images: all made again


def test_an_entry_interrupted_mid_generation_resumes_from_its_saved_images(
    assets, tmp_path, monkeypatch
):
    """An entry's images lived only in memory until its FID: a job killed after hours of an
    entry's 50,000 images (a SLURM time limit) made them all again, and forever if the limit
    was shorter than one entry. Saved every fid.save_every images, they are read back."""
    whole = sweep.run_sweep(tiny(assets, tmp_path / "whole", *SAVED_EVERY_16))["rows"][0]
    out = tmp_path / "sweep"
    made = _killed_after_32_images(assets, out, monkeypatch)
    settings = SAVED_EVERY_16
    real = sweep._sample_indices.__wrapped__
    (folder,) = (out / "partial").iterdir()
    assert folder.name.startswith("H1P2R2-")
    assert sorted(p.name for p in folder.iterdir()) == [
        "images-00000000-00000016.pt",
        "images-00000016-00000032.pt",
    ]
    made.clear()
    resumed = sweep.run_sweep(tiny(assets, out, *settings))["rows"][0]
    assert made[:4] == [32, 40, 48, 56]  # the rest of the images, then the reference error's
    for key in ("fid", "isc_mean", "precision", "recall", "ref_error"):
        assert resumed[key] == whole[key], key  # the same images and kept outputs
    assert not (out / "partial").exists()  # removed once the quality is stored

    # saved for a run that kept no sampler outputs: the reference error's are made again
    made.clear()
    monkeypatch.setattr(sweep, "_sample_indices", real)
    chunk = {"images": torch.zeros(16, 1, 32, 32, dtype=torch.uint8), "kept": None}
    folder.mkdir(parents=True)
    torch.save(chunk, folder / "images-00000000-00000016.pt")
    images, kept, done = sweep._read_chunks(folder, 64, keep=8)
    assert done == 0 and images is None and kept == []
    images, kept, done = sweep._read_chunks(folder, 64, keep=0)
    assert done == 16 and images.shape == (64, 1, 32, 32) and kept == []


def test_summarize_only_written_as_text_is_refused_not_taken_as_true(assets, tmp_path):
    """summarize_only=no (text, so true) merged the rows and never ran the sweep."""
    with pytest.raises(ValueError, match=r"summarize_only=no: .* write true or false"):
        sweep.run_sweep(tiny(assets, tmp_path / "sweep", "summarize_only=no"))


def test_a_folder_that_cannot_be_written_is_named_before_any_image_is_made(
    assets, tmp_path, monkeypatch
):
    monkeypatch.setattr(sweep, "load_networks", _no_models)
    (tmp_path / "a-file").write_text("not a folder\n")
    out = tmp_path / "a-file" / "sweep"
    with pytest.raises(OSError, match=r"out_dir=.*a-file/sweep: the sweep's results cannot be"):
        sweep.run_sweep(tiny(assets, out))


def test_a_latent_models_vae_decode_is_timed_with_its_sampler(assets, tiny_latent_model, tmp_path):
    latent = [
        f"model.base_ckpt={tiny_latent_model / 'base.pt'}",
        f"vae={tiny_latent_model / 'vae'}",
    ]
    cfg = tiny(assets, tmp_path / "sweep", *latent, "latency.repeats=2")
    nets = networks.load_networks(cfg, torch.device("cpu"), need_refiner=False)
    timed = sweep.measure_entries_latency(
        [entries.parse_entry("H2"), entries.parse_entry("euler:4")], nets, cfg
    )
    assert set(timed) == {"H2", "euler-4"}
    for result in timed.values():
        modes = {"eager", "decode", "eager_decode"}  # and the sampler then the decode, one call
        assert set(result) == {"batch", "device", "machine", *modes}
        assert result["decode"]["repeats"] == 2 and result["decode"]["ms_per_image"] > 0
        assert result["eager"]["batch"] == 4 and result["eager_decode"]["ms_per_image"] > 0
    assert timed["H2"]["decode"] == timed["euler-4"]["decode"]  # one decode, timed once
    assert timed["H2"]["eager_decode"] != timed["euler-4"]["eager_decode"]

    # the summary compares what deployed samplers cost, decode included, where it was timed
    from flowturbo.eval.summary import acceleration_tables, flat_row

    rows = [
        flat_row({"entry": e, "parts": {"latency": {"result": timed[k]}}})
        for e, k in (("H2", "H2"), ("euler:4", "euler-4"))
    ]
    assert all(r["ms_per_image_eager_with_decode"] > 0 for r in rows)
    modes = {t["mode"] for t in acceleration_tables(rows)}
    assert modes == {"eager", "compiled", "eager+decode"}  # latency.compiled is off here
    for r in rows:
        r["ms_per_image_eager_with_decode"] = None  # a pixel model's rows
    assert {t["mode"] for t in acceleration_tables(rows)} == {"eager", "compiled"}


def _no_models(*args, **kwargs):
    raise AssertionError("nothing to compute: no model should be loaded")


def test_a_changed_setting_recomputes_only_what_it_affects(assets, tmp_path, monkeypatch, caplog):
    out = tmp_path / "sweep"
    settings = ["sweep.baselines.euler=[]"]
    sweep.run_sweep(tiny(assets, out, *settings))
    old = json.loads((out / "rows" / "H2.json").read_text())

    generated = Counter(monkeypatch, "generate")
    timed = Counter(monkeypatch, "measure_entries_latency")
    settings.append("latency.batch=2")  # latency only
    sweep.run_sweep(tiny(assets, out, *settings))
    assert generated.calls == [] and timed.calls == ["H2", "H1P2R2"]
    new = json.loads((out / "rows" / "H2.json").read_text())
    assert new["parts"]["quality"] == old["parts"]["quality"]
    assert new["parts"]["ref_error"] == old["parts"]["ref_error"]
    assert new["parts"]["latency"]["result"]["batch"] == 2
    assert new["settings_hash"] != old["settings_hash"]

    settings.append("fid.num_images=48")  # images and FID only
    sweep.run_sweep(tiny(assets, out, *settings))
    assert generated.calls == ["H2", "H1P2R2"] and len(timed.calls) == 2
    rows = json.loads((out / "results.json").read_text())
    assert {r["num_images"] for r in rows} == {48}

    generated.calls.clear()
    timed.calls.clear()
    sweep.run_sweep(tiny(assets, out, *settings, "sampler.cfg_channels=1"))  # every part
    assert generated.calls == ["H2", "H1P2R2"] and timed.calls == ["H2", "H1P2R2"]
    sweep.run_sweep(tiny(assets, out, *settings))  # and back
    assert generated.calls == ["H2", "H1P2R2"] * 2 and len(timed.calls) == 4
    generated.calls[:] = ["H2", "H1P2R2"]
    timed.calls[:] = ["H2", "H1P2R2"]

    # another refiner changes the FlowTurbo row only, all of it
    torch.manual_seed(1)
    other = VelocityRefiner.from_base(
        SiT.from_name("SiT-Tiny/4", input_size=32, in_channels=1, num_classes=3, learn_sigma=False)
    )
    _randomise(other)
    save_checkpoint(other, tmp_path / "refiner2.pt")
    settings.append(f"model.refiner_ckpt={tmp_path / 'refiner2.pt'}")
    sweep.run_sweep(tiny(assets, out, *settings))
    assert generated.calls[2:] == ["H1P2R2"] and timed.calls[2:] == ["H1P2R2"]

    # no latency at all: only the latency parts are redone, and they hold no timing
    settings += ["latency.eager=false", "latency.compiled=false"]
    sweep.run_sweep(tiny(assets, out, *settings))
    assert generated.calls[3:] == [] and timed.calls[3:] == ["H2", "H1P2R2"]
    rows = json.loads((out / "results.json").read_text())
    assert [r["ms_per_image_eager"] for r in rows] == [None, None]
    assert all(r["fid"] is not None for r in rows)

    # a VAE given for this pixel model plays no part: a warning, nothing recomputed
    before = mtimes(out)
    vae_dir = tmp_path / "some-vae"
    vae_dir.mkdir()
    with caplog.at_level("WARNING", logger="flowturbo.eval.networks"):
        sweep.run_sweep(tiny(assets, out, *settings, f"vae={vae_dir}"))
    assert "ignored: the base works in pixel space (1 x 32 x 32 states)" in caplog.text
    assert generated.calls[3:] == [] and timed.calls[5:] == [] and mtimes(out) == before


#: A quick sweep: one image batch per entry, no reference error, no grid.
QUICK = [
    "sweep.baselines.euler=[]",
    "fid.num_images=16",
    "ref_error.num_images=0",
    "grid.num_images=0",
]


def test_the_same_reference_given_another_way_is_not_measured_again(assets, tmp_path, monkeypatch):
    """The quality settings held the reference's path as typed: a relative path or a link to
    the same file threw away every entry's FID (hours for FID-50K), and the summary would not
    pair rows of the two."""
    out = tmp_path / "sweep"
    sweep.run_sweep(tiny(assets, out, *QUICK))
    generated = Counter(monkeypatch, "generate")
    (tmp_path / "link.npz").symlink_to(assets / "ref.npz")
    sweep.run_sweep(tiny(assets, out, *QUICK, f"fid.reference={tmp_path / 'link.npz'}"))
    monkeypatch.chdir(assets)
    sweep.run_sweep(tiny(assets, out, *QUICK, "fid.reference=ref.npz"))
    assert generated.calls == []
    np.savez(tmp_path / "other.npz", arr_0=np.zeros((64, 32, 32), np.uint8))
    sweep.run_sweep(tiny(assets, out, *QUICK, f"fid.reference={tmp_path / 'other.npz'}"))
    assert generated.calls == ["H2", "H1P2R2"]  # other content: measured again


def test_without_a_reference_error_its_settings_are_not_read(assets, tmp_path):
    """ref_error.num_images=0 turns the reference error off, but its other settings were
    still read: ref_error.steps=null was a bare TypeError."""
    for bad in ("ref_error.steps=null", "ref_error.solver=none"):
        rows = sweep.run_sweep(tiny(assets, tmp_path / "sweep", *QUICK, bad))["rows"]
        assert [r["ref_error"] for r in rows] == [None, None]


def test_images_the_extractor_cannot_take_are_refused_before_any_is_made(
    assets, tmp_path, monkeypatch
):
    """A 16 x 16 model with the 32 x 32 digit classifier failed only after all its images
    had been generated."""
    torch.manual_seed(0)
    small = SiT.from_name("SiT-Tiny/4", input_size=16, in_channels=1, num_classes=3)
    save_checkpoint(small, tmp_path / "small.pt")
    generated = Counter(monkeypatch, "generate")
    with pytest.raises(ValueError, match="the generated images are 16 x 16, but feature"):
        sweep.run_sweep(
            tiny(
                assets,
                tmp_path / "sweep",
                *QUICK,
                f"model.base_ckpt={tmp_path / 'small.pt'}",
                "sweep.schedules=[H2]",
            )
        )
    assert generated.calls == []


def test_a_half_written_row_file_is_not_summarised_and_is_removed(assets, tmp_path, monkeypatch):
    """A job killed while writing a row left rows/.<entry>.<random>.tmp.json (atomic_path's
    temporary file): every later summary showed the entry twice, once without its latency."""
    out = tmp_path / "sweep"
    sweep.run_sweep(tiny(assets, out, "sweep.schedules=[H2]", *QUICK))
    stored = json.loads((out / "rows" / "H2.json").read_text())
    del stored["parts"]["latency"]  # killed before the latency was stored
    stale = out / "rows" / ".H2.k3x_9q2a.tmp.json"
    stale.write_text(json.dumps(stored))
    long_ago = time.time() - 3600
    os.utime(stale, (long_ago, long_ago))
    writing = out / "rows" / ".H2.abcd1234.tmp.json"  # another job is writing it now
    writing.write_text(json.dumps(stored))
    others = [out / "grids" / ".H2.k3x_9q2a.tmp.png", out / "reference" / ".ref-1.k3x_9q2a.tmp.pt"]
    for path in others:  # a killed job's grid and reference-error solution
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"cut off")
        os.utime(path, (long_ago, long_ago))

    monkeypatch.setattr(sweep, "load_networks", _no_models)
    result = sweep.run_sweep(tiny(assets, out, "sweep.schedules=[H2]", *QUICK))
    assert [r["schedule"] for r in result["rows"]] == ["H2"]
    assert result["rows"][0]["ms_per_image_eager"] > 0
    assert [r["schedule"] for r in json.loads((out / "results.json").read_text())] == ["H2"]
    assert not stale.exists() and writing.exists()
    assert not any(p.exists() for p in others)
    assert sorted(p.name for p in (out / "rows").iterdir()) == [writing.name, "H2.json"]
    assert [r["schedule"] for r in summary_mod.load_rows(out)] == ["H2"]


def test_latencies_timed_in_different_sessions_are_named_in_the_summary(
    assets, tmp_path, caplog, capsys, monkeypatch
):
    """A rerun times only the entries it recomputes: their latencies are not comparable with the
    others' (another session, another load on the machine), and the summary says so."""
    out = tmp_path / "sweep"
    first = sweep.run_sweep(tiny(assets, out, "sweep.schedules=[H2,H1]", *QUICK))
    sessions = {r["schedule"]: r["latency_session"] for r in first["rows"]}
    assert sessions["H1"] == sessions["H2"] and sessions["H2"]  # timed together
    assert "timing sessions" not in caplog.text + capsys.readouterr().out

    second = sweep.run_sweep(tiny(assets, out, "sweep.schedules=[H2,H1,H3]", *QUICK))
    again = {r["schedule"]: r["latency_session"] for r in second["rows"]}
    assert again["H1"] == again["H2"] == sessions["H2"] != again["H3"]  # only H3 timed
    stored = json.loads((out / "rows" / "H3.json").read_text())
    assert stored["parts"]["latency"]["result"]["session"] == again["H3"]
    assert "latencies from 2 timing sessions" in caplog.text
    (line,) = [s for s in capsys.readouterr().out.splitlines() if "2 timing sessions" in s]
    assert f"{again['H2']}: H1, H2" in line and f"{again['H3']}: H3" in line

    # a row written before sessions were recorded: one unknown session, no crash
    path = out / "rows" / "H2.json"
    old = json.loads(path.read_text())
    del old["parts"]["latency"]["result"]["session"]
    path.write_text(json.dumps(old))
    caplog.clear()
    third = sweep.run_sweep(tiny(assets, out, "sweep.schedules=[H2,H1,H3]", *QUICK))
    assert [r["latency_session"] for r in third["rows"] if r["schedule"] == "H2"] == [None]
    assert "latencies from 3 timing sessions" in caplog.text
    assert "unknown: H2" in capsys.readouterr().out

    # latency.retime_all: every latency again, in one session; nothing else recomputed
    generated = Counter(monkeypatch, "generate")
    retimed = sweep.run_sweep(
        tiny(assets, out, "sweep.schedules=[H2,H1,H3]", *QUICK, "latency.retime_all=true")
    )
    assert len({r["latency_session"] for r in retimed["rows"]}) == 1 and not generated.calls
    assert "timing sessions" not in capsys.readouterr().out


def test_single_schedule_jobs_share_the_folder_and_the_summary(assets, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    first = sweep.run_sweep(tiny(assets, out, "sampler.schedule=H1P2R2"))
    assert [r["schedule"] for r in first["rows"]] == ["H1P2R2"]
    generated = Counter(monkeypatch, "generate")
    second = sweep.run_sweep(tiny(assets, out, "sampler.schedule=heun:2"))
    assert generated.calls == ["H2"]  # heun:2 is H2
    assert [r["schedule"] for r in second["rows"]] == ["H2", "H1P2R2"]  # heun first
    assert sorted(p.name for p in (out / "rows").iterdir()) == ["H1P2R2.json", "H2.json"]


def test_a_cuda_device_without_a_gpu_is_named(assets, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device=cuda, but no CUDA GPU is visible.*device=cpu"):
        sweep.run_sweep(tiny(assets, tmp_path / "sweep", "device=cuda"))
    assert sweep.resolve_device("auto").type == "cpu"


def test_a_part_stored_by_another_job_meanwhile_is_kept(assets, tmp_path, monkeypatch):
    """Two jobs of one multirun evaluate the same entry (heun:2 is H2). Job A read H2's row
    before computing its FID; job B meanwhile stored H2's latency; A's row, written from what it
    had read, dropped B's latency."""
    out = tmp_path / "sweep"
    real_quality = sweep.measure_quality
    job_b_ran = []

    def quality_while_b_runs(entry, *args, **kwargs):
        if not job_b_ran:  # job A is computing: job B runs whole, latency included
            job_b_ran.append(True)
            sweep.run_sweep(tiny(assets, out, "sampler.schedule=heun:2", "ref_error.num_images=0"))
            b_row = json.loads((out / "rows" / "H2.json").read_text())
            assert set(b_row["parts"]) == {"quality", "latency"}
        return real_quality(entry, *args, **kwargs)

    def a_dies_before_timing(*args, **kwargs):
        if job_b_ran == [True, "timed"]:
            raise KeyboardInterrupt
        job_b_ran.append("timed")
        return real_latency(*args, **kwargs)

    real_latency = sweep.measure_entries_latency
    monkeypatch.setattr(sweep, "measure_quality", quality_while_b_runs)
    monkeypatch.setattr(sweep, "measure_entries_latency", a_dies_before_timing)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(tiny(assets, out, "sampler.schedule=H2", "ref_error.num_images=0"))
    row = json.loads((out / "rows" / "H2.json").read_text())
    assert set(row["parts"]) == {"quality", "latency"}  # A's FID and B's latency
    assert (out / sweep.ROWS_LOCK).exists() and not (out / "rows" / sweep.ROWS_LOCK).exists()


def test_a_row_never_pairs_parts_measured_with_different_settings(assets, tmp_path, monkeypatch):
    """A rerun with other guidance stores the entry's new FID, then is killed before timing: the
    row kept the old guidance's latency beside the new FID, and a summary paired them."""
    out = tmp_path / "sweep"
    sweep.run_sweep(tiny(assets, out, "sampler.schedule=H2", *QUICK))
    old = json.loads((out / "rows" / "H2.json").read_text())
    assert set(old["parts"]) == {"quality", "latency"}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "measure_entries_latency", killed)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(tiny(assets, out, "sampler.schedule=H2", "sampler.cfg_scale=2.0", *QUICK))
    row = json.loads((out / "rows" / "H2.json").read_text())
    assert set(row["parts"]) == {"quality"}
    assert row["parts"]["quality"]["settings"]["cfg_scale"] == 2.0


def test_summarize_only_merges_the_rows_without_models(assets, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    with pytest.raises(FileNotFoundError, match="run the sweep first"):
        sweep.run_sweep(tiny(assets, out, "summarize_only=true"))
    sweep.run_sweep(tiny(assets, out, "sweep.baselines.euler=[]"))
    for name in ["results.json", "results.csv", "pareto.png", "acceleration.json"]:
        (out / name).unlink()
    monkeypatch.setattr(sweep, "load_networks", _no_models)
    result = sweep.run_sweep(tiny(assets, out, "summarize_only=true", "model.base_ckpt=gone.pt"))
    assert [r["schedule"] for r in result["rows"]] == ["H2", "H1P2R2"]
    for name in ["results.json", "results.csv", "pareto.png", "acceleration.json"]:
        assert (out / name).is_file()
    # a row file written when H2 was another family is summarised under today's name
    stored = json.loads((out / "rows" / "H2.json").read_text())
    (out / "rows" / "H2.json").write_text(json.dumps({**stored, "family": "other"}))
    assert summary_mod.load_rows(out)[0]["sampler"] == "heun"


# ----------------------------------------------------------------------------- concurrent jobs


def _row_file(out_dir, text, fid, ms):
    """A finished row file of ``text`` (FID and eager ms/img only), as a job writes it."""
    entry = entries.parse_entry(text)
    row = {
        "entry": entry.label,
        "key": entry.key,
        "family": entry.family,
        "plan": entry.plan,
        "steps": entry.steps,
        "base_nfe": entry.base_nfe,
        "refiner_nfe": entry.refiner_nfe,
        "parts": {
            "quality": {"result": {"fid": fid, "num_generated": 16}},
            "latency": {"result": {"eager": {"ms_per_image": ms}, "batch": 4, "session": "s"}},
        },
    }
    sweep.write_row(sweep.row_path(out_dir, entry), row)


class Job(threading.Thread):
    """A job's summary in a thread; its result or exception is kept for the test."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as exn:  # noqa: BLE001 - re-raised by the test
            self.error = exn

    def outcome(self):
        self.join(60)
        assert not self.is_alive(), "a summary never finished"
        if self.error is not None:
            raise self.error
        return self.result


def test_concurrent_jobs_leave_the_summary_of_every_row(tmp_path, monkeypatch):
    """SLURM runs a multirun's jobs at once, into one folder. Job A read the rows before job B's
    existed; B wrote its row and the summary of both; then A's summary of its row alone
    replaced B's: results.json missed B's schedule for good."""
    out = tmp_path / "sweep"
    _row_file(out, "H2", fid=30.0, ms=2.0)  # job A's row
    a_read, b_done_or_waiting = threading.Event(), threading.Event()
    real_load_rows, real_lock = summary_mod.load_rows, getattr(lock_mod, "waiting_lock", None)

    def load_rows(folder):
        rows = real_load_rows(folder)
        if threading.current_thread() is job_a:  # A has read the rows: B's is not there yet
            a_read.set()
            assert b_done_or_waiting.wait(60)
        return rows

    def waiting_lock(*args, **kwargs):
        if threading.current_thread() is job_b:  # B is about to wait for A's summary
            b_done_or_waiting.set()
        return real_lock(*args, **kwargs)

    def summarize_b():
        try:
            return summary_mod.summarize(out)
        finally:
            b_done_or_waiting.set()

    monkeypatch.setattr(summary_mod, "load_rows", load_rows)
    monkeypatch.setattr(lock_mod, "waiting_lock", waiting_lock, raising=False)
    job_a, job_b = Job(lambda: summary_mod.summarize(out)), Job(summarize_b)
    job_a.start()
    assert a_read.wait(60)
    _row_file(out, "H1P2R2", fid=25.0, ms=1.5)  # job B's row, then its summary
    job_b.start()
    assert [r["schedule"] for r in job_a.outcome()["rows"]] == ["H2"]
    assert [r["schedule"] for r in job_b.outcome()["rows"]] == ["H2", "H1P2R2"]

    assert [r["schedule"] for r in json.loads((out / "results.json").read_text())] == [
        "H2",
        "H1P2R2",
    ]
    assert len((out / "results.csv").read_text().splitlines()) == 3
    (vs_heun,) = json.loads((out / "acceleration.json").read_text())[0]["rows"]
    assert vs_heun["candidate_schedule"] == "H1P2R2"


def test_a_summary_lock_held_too_long_is_a_clear_error(tmp_path):
    """A stuck holder (the kernel frees the lock of a process that ends): the waiting job says
    whose lock it is and how to summarise later, and writes nothing."""
    out = tmp_path / "sweep"
    _row_file(out, "H2", fid=30.0, ms=2.0)
    held = out / summary_mod.SUMMARY_LOCK
    with (
        lock_mod.waiting_lock(held, timeout_s=1, what="holding it", what_to_do="-"),
        pytest.raises(lock_mod.LockTimeoutError) as waited,
    ):
        summary_mod.summarize(out, lock_timeout_s=0.2)
    message = str(waited.value)
    assert f"waited 0.2 s for {held} before writing the summary of {out}" in message
    assert f"(pid {os.getpid()} on host" in message and "the holder looks stuck" in message
    assert f"this job's rows are saved in {out / 'rows'}" in message
    assert "summarize_only=true" in message
    assert not (out / "results.json").exists()
    assert summary_mod.summarize(out, lock_timeout_s=0.2)["rows"]  # free again


def test_without_flock_the_summary_is_written_with_a_warning(tmp_path, monkeypatch, caplog):
    """A sweep folder on a file system without flock locks (Lustre without -o flock) still gets
    its summary: the rows were computed, only the turn-taking is lost, and the log says so."""
    import filelock

    class NoFlock:
        def __init__(self, path, **kwargs):
            pass

        def acquire(self, **kwargs):
            raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(filelock, "FileLock", NoFlock)
    out = tmp_path / "sweep"
    _row_file(out, "H2", fid=30.0, ms=2.0)
    assert [r["schedule"] for r in summary_mod.summarize(out)["rows"]] == ["H2"]
    assert (out / "results.json").is_file()
    assert "does not support flock locks" in caplog.text
    assert "after the last job, write it again with evaluate.py summarize_only=true" in caplog.text


def test_the_summary_lock_is_neither_a_row_nor_a_leftover(assets, tmp_path):
    """The lock file stays in the sweep folder: nothing that reads the folder takes it for a row,
    a result or a killed writer's file; a killed summary's temporary files are removed."""
    out = tmp_path / "sweep"
    _row_file(out, "H2", fid=30.0, ms=2.0)
    killed = out / ".pareto.k3x_9q2a.tmp.png"  # a summary killed while plotting
    killed.write_bytes(b"half a png")
    long_ago = time.time() - 3600
    os.utime(killed, (long_ago, long_ago))
    sweep.run_sweep(tiny(assets, out, "summarize_only=true"))
    lock_file = out / summary_mod.SUMMARY_LOCK
    assert lock_file.is_file() and lock_file.read_text() == ""  # released: no holder
    assert not killed.exists()
    assert sorted(p.name for p in (out / "rows").iterdir()) == ["H2.json"]
    assert remove_leftovers(out, older_than_s=0) == [] and lock_file.exists()
    assert [r["schedule"] for r in summary_mod.load_rows(out)] == ["H2"]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "acceleration.json",
        "pareto.png",
        "results.csv",
        "results.json",
        "summary.lock",
        "summary.txt",
    ]


@pytest.mark.parametrize("mode", ["steps", "sampler"])
def test_a_failed_compilation_is_recorded_not_reported_as_compiled(
    assets, tmp_path, monkeypatch, mode
):
    from flowturbo.sampling import compile as compile_mod

    clear_compile_cache()
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    monkeypatch.setattr(compile_mod, "_WARNED", set())
    overrides = ["sampler.schedule=H2", "latency.compiled=true", f"latency.compile_mode={mode}"]
    try:
        with pytest.warns(RuntimeWarning, match="eagerly"):
            result = sweep.run_sweep(tiny(assets, tmp_path / "s", *overrides))
    finally:
        clear_compile_cache()
    (row,) = result["rows"]
    assert row["compiled"] is False and row["ms_per_image_compiled"] is None
    assert row["ms_per_image_eager"] > 0
    stored = json.loads((tmp_path / "s" / "rows" / "H2.json").read_text())
    assert stored["parts"]["latency"]["result"]["compiled"]["ms_per_image"] > 0  # kept raw


def test_missing_checkpoints_and_values_are_clear_errors(assets, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.base_ckpt"):
        sweep.run_sweep(tiny(assets, tmp_path / "a", "model.base_ckpt=nope.pt"))
    with pytest.raises(ValueError, match=r"model\.refiner_ckpt"):
        sweep.run_sweep(tiny(assets, tmp_path / "b", "model.refiner_ckpt=null"))
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("evaluate", overrides=["experiment=sit_xl_sweep"])
    keys = ["fid.inception_weights", "fid.reference", "model.base_ckpt", "model.refiner_ckpt"]
    with pytest.raises(ValueError, match=", ".join(keys) + ", vae"):
        sweep.run_sweep(cfg)


def test_a_flow_model_of_ones_own_is_swept_like_the_sit_it_adapts(assets, tmp_path):
    only = ["sweep.schedules=[H1P2R2]", "sweep.baselines.euler=[]", "grid.num_images=0"]
    (sit,) = sweep.run_sweep(tiny(assets, tmp_path / "sit", *only))["rows"]
    (own,) = sweep.run_sweep(tiny(assets, tmp_path / "own", *only, OWN_BASE_ARCH))["rows"]
    assert own["fid"] == pytest.approx(sit["fid"], rel=1e-3)
    assert own["ref_error"] == pytest.approx(sit["ref_error"], rel=1e-4)
    assert own["ms_per_image_eager"] > 0
    assert own["base_sha256"] != sit["base_sha256"]  # the same file, called another way
    stored = json.loads((tmp_path / "own" / "rows" / "H1P2R2.json").read_text())
    assert stored["parts"]["quality"]["settings"]["base"]["arch"]["factory"] == (
        "own_flow.load_reversed_sit"
    )


# ----------------------------------------------------------------------------- summary parts


def row(sampler, schedule, fid, eager, compiled, ok=True, **kw):
    return {
        "sampler": sampler,
        "schedule": schedule,
        "fid": fid,
        "ref_error": fid / 100,
        "ms_per_image_eager": eager,
        "ms_per_image_compiled": compiled if ok else None,
        "compiled": ok,
        "batch": 8,
        "device": "cpu",
        "dtype": "float32",
        **kw,
    }


def test_acceleration_is_like_for_like_eager_and_compiled():
    rows = [
        row("heun", "H4", 10.0, 8.0, 6.0),
        row("heun", "H8", 5.0, 16.0, 12.0),
        row("flowturbo", "H1P3R2", 9.0, 4.0, 3.0),
        row("flowturbo", "H2P4R2", 4.5, 7.0, 2.0, ok=False),  # compilation failed
        row("flowturbo", "H1P5R3", 4.0, 9.0, 7.0, batch=64),  # another batch size
        row("multistep", "multistep:12", 8.0, 12.0, 9.0),
        row("heun_euler", "H3E1", 9.5, 7.5, 5.0),
    ]
    all_tables = acceleration_tables(rows)
    tables = {(t["baseline"], t["candidate"], t["quality_key"], t["mode"]): t for t in all_tables}
    # no midpoint/euler rows: no table for them
    assert {k[0] for k in tables} == {"heun", "heun_euler", "multistep"}
    (vs_heun_euler,) = tables["heun_euler", "flowturbo", "fid", "compiled"]["rows"]
    assert vs_heun_euler["candidate_schedule"] == "H1P3R2"  # FID 9 <= 9.5; H2P4R2 not compiled
    assert vs_heun_euler["ratio"] == pytest.approx(1 - 3 / 5)
    (vs_multistep,) = tables["multistep", "flowturbo", "fid", "eager"]["rows"]
    assert vs_multistep["candidate_schedule"] == "H2P4R2"  # fastest with FID <= 8
    assert vs_multistep["ratio"] == pytest.approx(1 - 7 / 12)
    tables = {k[1:]: t for k, t in tables.items() if k[0] == "heun"}
    eager = tables["flowturbo", "fid", "eager"]["rows"]
    assert [(r["baseline_schedule"], r["candidate_schedule"]) for r in eager] == [
        ("H4", "H1P3R2"),
        ("H8", "H2P4R2"),
    ]
    assert eager[1]["ratio"] == pytest.approx(1 - 7 / 16)
    compiled = tables["flowturbo", "fid", "compiled"]["rows"]
    assert compiled[0]["ratio"] == pytest.approx(1 - 3 / 6)
    assert compiled[1]["candidate_schedule"] is None  # H2P4R2 did not compile, H1P5R3 is b64
    assert tables["flowturbo", "ref_error", "eager"]["rows"][1]["candidate_schedule"] == "H2P4R2"
    assert "versus Heun with an Euler last step:" in summary_mod.format_acceleration(all_tables)
    text = summary_mod.format_acceleration(list(tables.values()))
    assert "H2P4R2" in text and "56.2%" in text and "50.0%" in text


class FakeWandb:
    """Records what would be logged to W&B (no process, no files)."""

    def __init__(self):
        self.init_kwargs, self.logged, self.finished = None, {}, False

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return self

    def log(self, data):
        self.logged.update(data)

    def finish(self):
        self.finished = True

    def Table(self, columns, data):  # noqa: N802 - wandb's name
        return {"columns": columns, "data": data}

    def Image(self, path):  # noqa: N802 - wandb's name
        return {"image": path}


def test_wandb_gets_the_table_and_the_plot_and_honours_wandb_mode(assets, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    sweep.run_sweep(tiny(assets, out, "sweep.baselines.euler=[]"))
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    sweep.run_sweep(tiny(assets, out, "summarize_only=true", "wandb.enabled=true"))
    assert fake.init_kwargs["mode"] == "offline" and fake.finished
    table = fake.logged["sweep/results"]
    assert table["columns"][:2] == ["sampler", "schedule"] and len(table["data"]) == 2
    pareto = fake.logged["sweep/pareto"]["image"]  # read while the summary was locked
    with Image.open(out / "pareto.png") as on_disk:
        assert pareto.size == on_disk.size and pareto.tobytes() == on_disk.tobytes()
    assert fake.logged["sweep/acceleration"]["data"]

    for env, enabled in [("disabled", "true"), (None, "false")]:
        fake = FakeWandb()
        monkeypatch.setitem(sys.modules, "wandb", fake)
        if env:
            monkeypatch.setenv("WANDB_MODE", env)
        sweep.run_sweep(tiny(assets, out, "summarize_only=true", f"wandb.enabled={enabled}"))
        assert fake.init_kwargs is None
        monkeypatch.delenv("WANDB_MODE", raising=False)
    # a single-schedule (multirun) job leaves logging to the summary
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sweep.run_sweep(tiny(assets, out, "sampler.schedule=H2", "wandb.enabled=true"))
    assert fake.init_kwargs is None


# ----------------------------------------------------------------------------- references


def test_fid_against_statistics_equals_fid_against_the_images(assets, tmp_path):
    ref = load_reference(str(assets / "ref.npz"))
    assert ref.images.shape == (64, 1, 32, 32) and ref.images.dtype == torch.uint8
    gen = ref.images.flip(-1)[:40]
    cache = tmp_path / "cache"
    full = fidelity_metrics(
        gen,
        ref.images,
        extractor="flowturbo-digits",
        weights_path=assets / "digits.pt",
        reference_cache_name="blobs",
        cache_root=cache,
        isc=False,
        prc=False,
    )
    (stat_file,) = cache.glob("blobs-*-stat-fid-features.pt")
    stats = torch.load(stat_file, weights_only=False)
    np.savez(tmp_path / "stats.npz", mu=stats["mu"], sigma=stats["sigma"])
    only = load_reference(str(tmp_path / "stats.npz"))
    assert only.is_statistics
    fid = fid_against_statistics(
        gen,
        only.mu,
        only.sigma,
        extractor="flowturbo-digits",
        weights_path=assets / "digits.pt",
        isc=False,
    )
    assert fid["fid"] == pytest.approx(full["fid"], rel=1e-6)
    with pytest.raises(FileNotFoundError, match="FID reference not found"):
        load_reference(str(tmp_path / "missing.npz"))


def test_a_folder_is_fingerprinted_by_its_files(tmp_path):
    """A reference folder's (or a VAE's) hash follows its files, so a rerun measures the rows
    again once they change (it was the folder's path: stale FIDs were reused)."""
    from flowturbo.eval import networks

    def fresh(folder):  # as a later process sees it
        networks._cached_folder_hash.cache_clear()
        return networks.fingerprint(folder)

    folder = tmp_path / "ref"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(b"1" * 10)
    (folder / "sub" / "b.png").write_bytes(b"2" * 10)
    first = fresh(folder)
    assert first.startswith("folder:") and str(folder) not in first
    (folder / ".a.png.1234.tmp").write_bytes(b"x")  # a killed writer's: hidden
    (folder / "sub" / "__pycache__").mkdir()
    (folder / "sub" / "__pycache__" / "m.pyc").write_bytes(b"x")
    assert fresh(folder) == first
    (folder / "sub" / "b.png").write_bytes(b"3" * 11)  # rewritten
    second = fresh(folder)
    assert second != first
    (folder / "sub" / "b.png").rename(folder / "sub" / "c.png")
    assert fresh(folder) != second


# ----------------------------------------------------------------------------- evaluate.py


def test_evaluate_py_multirun_then_summarize_only(assets, tmp_path):
    """The Hydra app itself: -m sampler.schedule=a,b runs one job per schedule into one folder."""
    out = tmp_path / "sweep"
    args = [a for a in tiny_overrides(assets, out) if not a.startswith("sweep.")]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    run = [sys.executable, str(ROOT / "evaluate.py")]
    hydra_dirs = [f"hydra.sweep.dir={tmp_path / 'multirun'}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(
        [*run, "-m", *args, *hydra_dirs, "sampler.schedule=H2,H1P2R2"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "rows").iterdir()) == ["H1P2R2.json", "H2.json"]
    (out / "results.csv").unlink()
    proc = subprocess.run(
        [*run, *args, *hydra_dirs, "summarize_only=true"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "acceleration of flowturbo at matched fid versus Heun" in proc.stdout
    assert len((out / "results.csv").read_text().splitlines()) == 3
