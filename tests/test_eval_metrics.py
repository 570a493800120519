import csv
import importlib
import json
import math
import os
import sys

import pytest
import torch

from flowturbo.eval import digits
from flowturbo.eval import latency as latency_mod
from flowturbo.eval.digits import (
    DEFAULT_WEIGHTS,
    EXTRACTOR_NAME,
    DigitClassifier,
    DigitFeatureExtractor,
    load_classifier,
    save_classifier,
)
from flowturbo.eval.fidelity import UInt8Images, content_hash, fidelity_metrics
from flowturbo.eval.pareto import (
    acceleration_ratios,
    draw_pareto,
    pareto_front,
    plot_pareto,
    plot_pareto_panels,
    write_results,
)


class DriftingClock:
    """A fake ``time.perf_counter`` on a machine that gets slower: call n of any timed function
    takes n milliseconds."""

    def __init__(self):
        self.now, self.calls, self.order = 0.0, 0, []

    def perf_counter(self):
        return self.now

    def work(self, key):
        def fn():
            self.order.append(key)
            self.now += self.calls * 1e-3
            self.calls += 1

        return fn


def test_latencies_are_timed_in_interleaved_rounds_so_drift_hits_all_alike(monkeypatch):
    clock = DriftingClock()
    monkeypatch.setattr(latency_mod.time, "perf_counter", clock.perf_counter)
    fns = {key: clock.work(key) for key in "abc"}
    timed = latency_mod.measure_latencies(fns, batch=2, warmup=1, repeats=5)
    # warm-up of each, then rounds that start one later each time
    assert "".join(clock.order) == "abc" + "abc" + "bca" + "cab" + "abc" + "bca"
    medians = [timed[k].median_ms for k in "abc"]
    assert max(medians) - min(medians) <= 2.5  # the same work gets about the same time ...
    assert timed["a"].ms_per_image == timed["a"].median_ms / 2 and timed["a"].repeats == 5
    clock.__init__()
    one_by_one = [
        latency_mod.measure_latency(clock.work(k), batch=2, warmup=1, repeats=5) for k in "abc"
    ]
    spread = one_by_one[2].median_ms - one_by_one[0].median_ms
    assert spread >= 10.0  # ... where timing one after the other charges the drift to the last
    with pytest.raises(ValueError, match="repeats >= 1"):
        latency_mod.measure_latencies(fns, batch=1, repeats=0)
    assert latency_mod.measure_latencies({}, batch=1) == {}  # nothing to time


def row(sampler, schedule, fid, ms, **kw):
    return {"sampler": sampler, "schedule": schedule, "fid": fid, "ms_per_image": ms, **kw}


TABLE = [
    row("heun", "H4", 12.0, 4.0),
    row("heun", "H8", 6.0, 8.0),
    row("heun", "H16", 3.0, 16.0),
    row("flowturbo", "H1P3R2", 9.0, 2.5),
    row("flowturbo", "H2P4R4", 5.5, 5.0),
    row("flowturbo", "H3P6R5", 5.0, 7.0),  # dominated by nothing: slower but better than H2P4R4
    row("flowturbo", "H2P6R8", 6.0, 9.0),  # dominated by H2P4R4
    row("euler", "E8", 20.0, 4.0),  # dominated by H4 (same latency, worse FID)
]


def test_pareto_front_is_the_non_dominated_rows_sorted_by_latency():
    front = pareto_front(TABLE, x="ms_per_image", y="fid")
    assert [r["schedule"] for r in front] == ["H1P3R2", "H2P4R4", "H3P6R5", "H16"]
    assert all(r in TABLE for r in front)  # the same dicts
    # ties do not dominate each other; missing values take no part
    tied = [row("a", "x", 1.0, 1.0), row("b", "y", 1.0, 1.0), row("c", "z", None, 0.5)]
    tied.append(row("d", "w", float("nan"), 0.25))  # NaN is missing: never on the front
    assert [r["schedule"] for r in pareto_front(tied)] == ["x", "y"]
    assert pareto_front([]) == []


def test_acceleration_ratio_takes_the_fastest_match_and_keeps_unmatched_baselines():
    ratios = acceleration_ratios(TABLE, latency_key="ms_per_image")
    assert [r["baseline_schedule"] for r in ratios] == ["H4", "H8", "H16"]
    h4, h8, h16 = ratios
    assert h4["candidate_schedule"] == "H1P3R2" and h4["ratio"] == pytest.approx(1 - 2.5 / 4)
    assert h4["speedup"] == pytest.approx(4 / 2.5)
    # H8 (fid 6.0): H2P4R4 (5.5, 5 ms) beats H3P6R5 (5.0, 7 ms) and H2P6R8 (6.0, 9 ms)
    assert h8["candidate_schedule"] == "H2P4R4" and h8["ratio"] == pytest.approx(1 - 5 / 8)
    assert h8["candidate_fid"] == 5.5 and h8["baseline_fid"] == 6.0
    # no flowturbo schedule reaches fid 3.0: kept, with no ratio and a reason
    assert h16["candidate_schedule"] is None and h16["ratio"] is None
    assert "no flowturbo row" in h16["note"]


def test_acceleration_ratio_matches_an_equal_fid_and_takes_nan_as_missing():
    """A candidate exactly as good as the baseline is its match (FID <=, not <), and a NaN
    FID or latency (a failed measurement) is missing: such a candidate is never a match, such
    a baseline has no value to match."""
    rows = [
        row("heun", "H8", 6.0, 8.0),
        row("heun", "H4", float("nan"), 4.0),
        row("flowturbo", "H1P2R2", float("nan"), 1.0),  # the fastest, but no FID
        row("flowturbo", "H1P5R3", 5.0, float("nan")),  # the best FID, but no latency
        row("flowturbo", "H1P3R2", 6.0, 2.0),  # the FID of H8, no better
    ]
    h4, h8 = acceleration_ratios(rows, latency_key="ms_per_image")
    assert h8["candidate_schedule"] == "H1P3R2" and h8["ratio"] == pytest.approx(0.75)
    assert h8["candidate_fid"] == h8["baseline_fid"] == 6.0
    assert h4["baseline_schedule"] == "H4" and h4["candidate_schedule"] is None
    assert h4["baseline_fid"] is None and h4["note"] == "baseline has no fid or ms_per_image"


def test_acceleration_ratio_matches_like_for_like():
    rows = [
        row("heun", "H8", 6.0, 8.0, compile=False),
        row("flowturbo", "H1P3R2", 5.0, 2.0, compile=True),
        row("flowturbo", "H1P3R2", 5.0, 4.0, compile=False),
    ]
    (r,) = acceleration_ratios(rows, latency_key="ms_per_image", same=("compile",))
    assert r["candidate_latency"] == 4.0 and r["ratio"] == pytest.approx(0.5)
    (r,) = acceleration_ratios(rows, latency_key="ms_per_image")
    assert r["candidate_latency"] == 2.0


def flat(sampler, schedule, fid, ms, **settings):
    """A flat results row with an eager latency and the given settings."""
    r = {"sampler": sampler, "schedule": schedule, "fid": fid, "ref_error": None}
    return r | {"ms_per_image_eager": ms, "ms_per_image_compiled": None, **settings}


def eager_vs_heun(rows):
    """The one row of the eager, matched-FID table of FlowTurbo against Heun."""
    from flowturbo.eval.summary import acceleration_tables

    (table,) = [
        t for t in acceleration_tables(rows)
        if (t["baseline"], t["candidate"], t["quality_key"], t["mode"])
        == ("heun", "flowturbo", "fid", "eager")
    ]  # fmt: skip
    (r,) = table["rows"]
    return r


def test_sweep_tables_pair_only_rows_measured_alike():
    """A rerun into the same folder with other guidance for one entry leaves rows of two
    settings side by side: they must not be paired, and the summary must say so."""
    from flowturbo.eval.summary import mixed_settings

    rows = [
        flat("heun", "H8", 6.0, 8.0, cfg_scale=1.0),
        flat("flowturbo", "H1P3R2", 5.0, 2.0, cfg_scale=3.0),
    ]
    r = eager_vs_heun(rows)
    assert r["candidate_schedule"] is None and "differ in cfg_scale" in r["note"]
    assert mixed_settings(rows) == ["cfg_scale: 1.0 (H8), 3.0 (H1P3R2)"]
    rows[1]["cfg_scale"] = 1.0
    assert mixed_settings(rows) == []
    r = eager_vs_heun(rows)
    assert r["candidate_schedule"] == "H1P3R2" and r["ratio"] == pytest.approx(0.75)

    # a stale row of an earlier refiner is compared like the others, and named
    rows.append(flat("flowturbo", "H1P2R2", 5.5, 1.0, cfg_scale=1.0, refiner_sha256="old"))
    rows[1]["refiner_sha256"] = "new"
    assert mixed_settings(rows) == ["refiner_sha256: new (H1P3R2), old (H1P2R2)"]


#: The settings a FlowTurbo row must share with the baseline row it is compared with, written
#: out here (not read from summary.LIKE_FOR_LIKE) so that a key dropped there fails its case.
MEASURED_ALIKE = (
    "base_sha256", "cfg_scale", "cfg_channels", "dtype", "vae", "seed", "num_images",
    "extractor", "extractor_weights", "reference_hash", "batch", "device", "machine",
    "compile_mode",
)  # fmt: skip


@pytest.mark.parametrize("key", MEASURED_ALIKE)
def test_rows_differing_in_any_one_measurement_setting_are_not_paired(key):
    """Every like-for-like setting on its own keeps a FlowTurbo row from a baseline row, and
    the summary names it: a key left out of LIKE_FOR_LIKE (device, cfg_channels, ...) would
    pair rows timed on another device or guided on other channels (or FIDs against another
    reference folder's files: reference_hash)."""
    from flowturbo.eval.summary import flat_row, mixed_settings

    assert key in flat_row({"entry": "H8"})  # a column of results.csv
    rows = [
        flat("heun", "H8", 6.0, 8.0, **{key: "a"}),
        flat("flowturbo", "H1P3R2", 5.0, 2.0, **{key: "b"}),
    ]
    r = eager_vs_heun(rows)
    assert r["candidate_schedule"] is None and r["note"].endswith(f"differ in {key})")
    assert mixed_settings(rows) == [f"{key}: a (H8), b (H1P3R2)"]
    rows[1][key] = "a"
    r = eager_vs_heun(rows)
    assert r["candidate_schedule"] == "H1P3R2" and r["ratio"] == pytest.approx(0.75)
    assert mixed_settings(rows) == []


@pytest.mark.parametrize("key", ["ref_error_reference", "ref_error_images"])
def test_reference_errors_pair_only_against_the_same_reference_solution(key):
    """A rerun of some entries with another ref_error.steps (or images) left errors against two
    reference solutions side by side, paired silently (an H2 measured against an H2 reference
    had error 0). They are not paired on the error, and the summary names the setting; their
    FIDs, which do not depend on it, still are."""
    from flowturbo.eval.summary import acceleration_tables, flat_row, mixed_settings

    assert key in flat_row({"entry": "H8"})
    rows = [
        flat("heun", "H8", 6.0, 8.0, **{key: "a"}) | {"ref_error": 0.3},
        flat("flowturbo", "H1P3R2", 5.0, 2.0, **{key: "b"}) | {"ref_error": 0.2},
    ]

    def matched(quality_key):
        (table,) = [
            t for t in acceleration_tables(rows)
            if (t["baseline"], t["candidate"], t["quality_key"], t["mode"])
            == ("heun", "flowturbo", quality_key, "eager")
        ]  # fmt: skip
        return table["rows"][0]["candidate_schedule"]

    assert matched("ref_error") is None and matched("fid") == "H1P3R2"
    assert mixed_settings(rows) == [f"{key}: a (H8), b (H1P3R2)"]
    rows[1][key] = "a"
    assert matched("ref_error") == "H1P3R2"


def test_the_reference_solutions_settings_reach_the_flat_row():
    from flowturbo.eval.summary import flat_row

    def row(steps):
        settings = {"reference": {"solver": "heun", "steps": steps, "dtype": "float64"}}
        return flat_row({"entry": "H8", "parts": {"ref_error": {"settings": settings}}})

    assert row(64)["ref_error_reference"] == row(64)["ref_error_reference"] is not None
    assert row(64)["ref_error_reference"] != row(2)["ref_error_reference"]
    assert flat_row({"entry": "H8"})["ref_error_reference"] is None


def test_a_failed_compilation_has_no_compiled_latency_with_the_decode_either():
    """Where torch.compile failed, the sampler ran eagerly: its "compiled" times, with the VAE
    decode or without, are no compiled latencies (the flat row has None for both)."""
    from flowturbo.eval.summary import flat_row

    def flattened(ok):
        result = {
            "eager": {"ms_per_image": 4.0},
            "compiled": {"ms_per_image": 3.0, "compiled": ok, "compile_s": 9.0},
            "decode": {"ms_per_image": 2.0},
            "eager_decode": {"ms_per_image": 6.0},
            "compiled_decode": {"ms_per_image": 5.0, "compiled": ok},
        }
        return flat_row({"entry": "H8", "parts": {"latency": {"result": result}}})

    ok, failed = flattened(True), flattened(False)
    assert (ok["ms_per_image_compiled"], ok["ms_per_image_compiled_with_decode"]) == (3.0, 5.0)
    assert failed["compiled"] is False and failed["ms_per_image_compiled"] is None
    assert failed["ms_per_image_compiled_with_decode"] is None
    assert failed["ms_per_image_eager_with_decode"] == 6.0 and failed["decode_ms_per_image"] == 2.0


def test_write_results_and_plot(tmp_path):
    rows = [dict(r, settings={"batch": 8}) for r in TABLE]
    rows[0]["fid"] = float("nan")
    rows[1]["extra"] = "only here"
    json_path, csv_path = write_results(rows, tmp_path / "out")
    saved = json.loads(json_path.read_text())
    assert len(saved) == len(rows) and saved[0]["fid"] is None
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:3] == ["sampler", "schedule", "fid"]
    assert "extra" in table[0] and table[0]["extra"] == "" and table[1]["extra"] == "only here"
    assert json.loads(table[0]["settings"]) == {"batch": 8}

    png = plot_pareto(TABLE, tmp_path / "out" / "p.png", latency_key="ms_per_image", title="t")
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "p.png",
        "results.csv",
        "results.json",
    ]  # no temporary files left


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_file(tmp_path):
    """atomic_path replaces its target only when the block finishes: a writer that raises
    half-way leaves the previous file whole and nothing beside it."""
    from flowturbo.eval.atomic import atomic_path

    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_pareto_axes_go_logarithmic_only_for_a_wide_quality_range(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wide = [*TABLE, row("heun", "H2", 370.0, 2.0)]  # one very coarse schedule: 3 to 370
    fig, (narrow_ax, wide_ax) = plt.subplots(1, 2)
    draw_pareto(narrow_ax, TABLE, latency_key="ms_per_image", title="narrow")
    draw_pareto(wide_ax, wide, latency_key="ms_per_image", title="wide")
    assert narrow_ax.get_yscale() == "linear" and wide_ax.get_yscale() == "log"
    assert "log scale" in wide_ax.get_ylabel()
    plt.close(fig)

    # one row of panels per quality key, one column per latency key, in one file
    rows = [dict(r, ref_error=r["fid"] / 100, compiled=r["ms_per_image"] / 2) for r in TABLE]
    png = plot_pareto_panels(
        rows,
        tmp_path / "grid.png",
        [("ms_per_image", "eager"), ("compiled", "compiled")],
        quality_key=("fid", "ref_error"),
    )
    from PIL import Image

    width, height = Image.open(png).size
    assert (width, height) == (2 * 7 * 120, 2 * 5 * 120)


# ----------------------------------------------------------------------------- FID


def blobs(n: int, seed: int) -> torch.Tensor:
    """(n, 1, 32, 32) uint8 white rectangles on black: a stand-in for digits."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, 32, 32, dtype=torch.uint8)
    for i in range(n):
        y0, x0 = torch.randint(2, 16, (2,), generator=g).tolist()
        h, w = torch.randint(4, 14, (2,), generator=g).tolist()
        images[i, 0, y0 : y0 + h, x0 : x0 + w] = 255
    return images


@pytest.fixture
def tiny_weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny_digits.pt"
    save_classifier(DigitClassifier(width=4, feature_dim=16), path, accuracy=0.1)
    return path


def test_uint8_images_repeat_gray_to_rgb():
    ds = UInt8Images(blobs(3, 0))
    assert len(ds) == 3 and ds[1].shape == (3, 32, 32) and ds[1].dtype == torch.uint8
    assert torch.equal(ds[1][0], ds[1][2])
    with pytest.raises(TypeError, match="uint8"):
        UInt8Images(torch.zeros(2, 1, 32, 32))


def test_extractor_provides_every_metric_layer(tiny_weights):
    names = DigitFeatureExtractor.get_provided_features_list()
    for metric in ("fid", "isc", "kid", "prc"):
        assert DigitFeatureExtractor.get_default_feature_layer_for_metric(metric) in names
    fe = DigitFeatureExtractor(EXTRACTOR_NAME, list(names), str(tiny_weights))
    x = UInt8Images(blobs(5, 0)).images.expand(-1, 3, -1, -1)
    feats, logits, unbiased = fe(x)
    assert feats.shape == (5, 16) and logits.shape == unbiased.shape == (5, 10)
    assert torch.allclose(logits - unbiased, fe.classifier.head.bias.expand(5, -1))
    # registration is idempotent, also across a reload
    digits.register()
    importlib.reload(digits)
    digits.register()


def test_fid_self_is_zero_and_noise_is_far(tiny_weights, tmp_path):
    ref = blobs(200, 0)
    kw = dict(extractor=EXTRACTOR_NAME, weights_path=tiny_weights, cache_root=tmp_path / "cache")
    same = fidelity_metrics(ref, ref, reference_cache_name=None, **kw)
    other = fidelity_metrics(blobs(200, 1), ref, reference_cache_name=None, isc=False, **kw)
    noise = torch.randint(0, 256, (200, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    far = fidelity_metrics(noise.to(torch.uint8), ref, reference_cache_name=None, **kw)
    # an untrained network's features are small, so compare FIDs with each other
    assert abs(same["fid"]) <= 1e-6 * far["fid"]
    assert far["fid"] > 10 * other["fid"] > 0
    assert same["precision"] == same["recall"] == 1.0
    assert math.isfinite(same["isc_mean"]) and same["isc_mean"] >= 1.0
    assert "isc_mean" not in other and far["precision"] < 0.5
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_reference_cache_is_keyed_by_content(tiny_weights, tmp_path):
    cache = tmp_path / "cache"
    kw = dict(extractor=EXTRACTOR_NAME, weights_path=tiny_weights, cache_root=cache)
    ref, gen = blobs(64, 0), blobs(64, 1)
    a = fidelity_metrics(gen, ref, reference_cache_name="blobs", prc=False, isc=False, **kw)
    files = sorted(p.name for p in cache.iterdir())
    assert files and all(f.startswith(f"blobs-{a['reference_hash']}-w") for f in files)
    b = fidelity_metrics(gen, ref, reference_cache_name="blobs", prc=False, isc=False, **kw)
    assert b["fid"] == pytest.approx(a["fid"]) and sorted(p.name for p in cache.iterdir()) == files
    # a changed reference gets its own entries, never the stale ones
    ref2 = ref.clone()
    ref2[0, 0, 0, 0] = 1
    c = fidelity_metrics(gen, ref2, reference_cache_name="blobs", prc=False, isc=False, **kw)
    assert c["reference_hash"] != a["reference_hash"] and len(list(cache.iterdir())) > len(files)
    # so does the same reference seen through another weights file (other features)
    files = sorted(p.name for p in cache.iterdir())
    torch.manual_seed(1)
    other = tmp_path / "other_digits.pt"
    save_classifier(DigitClassifier(width=4, feature_dim=16), other, accuracy=0.1)
    kw["weights_path"] = other
    d = fidelity_metrics(gen, ref, reference_cache_name="blobs", prc=False, isc=False, **kw)
    fresh = fidelity_metrics(gen, ref, reference_cache_name=None, prc=False, isc=False, **kw)
    assert d["fid"] == pytest.approx(fresh["fid"])  # not from the first weights' features
    assert d["extractor_weights"] != a["extractor_weights"]
    assert len(list(cache.iterdir())) > len(files)


def test_content_hash_changes_with_content_shape_and_dtype():
    x = blobs(4, 0)
    assert content_hash(x) == content_hash(x.clone())
    y = x.clone()
    y[3, 0, 31, 31] ^= 1
    assert content_hash(y) != content_hash(x)
    assert content_hash(x.reshape(2, 2, 32, 32)) != content_hash(x)
    assert content_hash(x.view(torch.int8)) != content_hash(x)  # same bytes, other dtype
    assert content_hash(UInt8Images(x)) != content_hash(UInt8Images(y))


def test_a_tensor_is_hashed_once_until_it_is_written_to(monkeypatch):
    """A sweep measures every schedule against one reference tensor: it is read for its hash
    once (ADM's 10,000 images took 2 s per schedule), and again only after an in-place write."""
    import flowturbo.eval.fidelity as fidelity

    x = blobs(4, 0)
    first = content_hash(x)
    reads = []
    monkeypatch.setattr(fidelity, "_update", lambda h, t: reads.append(t) or h.update(b"x"))
    assert content_hash(x) == first and reads == []
    x[3, 0, 31, 31] ^= 1  # the same tensor, other contents
    assert content_hash(x) != first and len(reads) == 1
    with torch.inference_mode():  # inference tensors keep no version counter: read each time
        y = x.clone()
    assert content_hash(y) == content_hash(y) and len(reads) == 3


def test_missing_weights_name_the_file_and_the_command(tmp_path):
    gen = blobs(16, 0)
    missing = tmp_path / "nowhere" / "digits.pt"
    expected = r"nowhere/digits\.pt.*python -m flowturbo\.eval\.digits"
    with pytest.raises(FileNotFoundError, match=expected):
        fidelity_metrics(
            gen,
            gen,
            extractor=EXTRACTOR_NAME,
            weights_path=missing,
            reference_cache_name=None,
            cache_root=tmp_path,
        )
    with pytest.raises(FileNotFoundError, match="python -m flowturbo.eval.digits"):
        DigitFeatureExtractor(EXTRACTOR_NAME, ["features"], str(missing))
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05"):
        fidelity_metrics(
            gen,
            gen,
            extractor="inception-v3-compat",
            weights_path=None,
            reference_cache_name=None,
            cache_root=tmp_path,
        )


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped classifier not written yet")
def test_shipped_classifier_is_accurate_and_small():
    model, info = load_classifier()
    assert info["accuracy"] >= 0.97 and info["val_images"] == 500
    assert "python -m flowturbo.eval.digits" in info["command"]
    assert DEFAULT_WEIGHTS.stat().st_size < 2 * 2**20
    assert not model.training


# ----------------------------------------------------------------------------- argument checks


def test_digits_command_refuses_bad_settings_before_reading_data(monkeypatch, capsys):
    def no_data(*a, **k):
        raise AssertionError("the data must not be read")

    monkeypatch.setattr(digits, "load_demo_split", no_data)
    for argv, flag in (
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "5000"], "--batch-size"),  # no step would run: OneCycleLR crashed
        (["--lr", "-1"], "--lr"),
        (["--threads", "-2"], "--threads"),
    ):
        with pytest.raises(SystemExit) as e:
            digits.main(argv)
        assert e.value.code == 2 and flag in capsys.readouterr().err


def test_fid_refuses_unusable_inputs_naming_them(tiny_weights, tmp_path):
    import numpy as np

    from flowturbo.eval.fidelity import fid_against_statistics, load_reference

    kw = dict(extractor=EXTRACTOR_NAME, weights_path=tiny_weights, cache_root=tmp_path / "c")
    one = dict(isc=False, prc=False, reference_cache_name=None, **kw)
    with pytest.raises(ValueError, match="at least 2 images"):  # the FID was NaN
        fidelity_metrics(blobs(1, 0), blobs(8, 1), **one)
    ref28 = blobs(8, 1)[..., :28, :28].contiguous()
    with pytest.raises(ValueError, match="reference images are 28 x 28"):
        fidelity_metrics(blobs(8, 0), ref28, **one)
    mu, sigma = np.zeros(16), np.eye(16)
    sigma[3, 3] = np.nan
    with pytest.raises(ValueError, match="not finite: 0 NaN/inf entries in mu, 1 in sigma"):
        fid_against_statistics(
            blobs(8, 0), mu, sigma, isc=False, extractor=EXTRACTOR_NAME, weights_path=tiny_weights
        )
    rgba = tmp_path / "rgba.npz"
    np.savez(rgba, arr_0=np.zeros((4, 32, 32, 4), np.uint8))
    with pytest.raises(ValueError, match="C = 1 or 3 channels last"):
        load_reference(str(rgba))


class Payload:
    """Pickles as a call of ``os.makedirs(path)``: what an untrusted file could run on loading."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_bad_reference_files_are_errors_naming_the_file_and_the_format(tmp_path):
    import numpy as np

    from flowturbo.eval.fidelity import load_reference

    text = tmp_path / "text.npz"
    text.write_text("mu sigma\n")
    with pytest.raises(ValueError, match=r"text\.npz is not an \.npz archive .* with arr_0"):
        load_reference(str(text))  # was numpy's "allow_pickle" error
    np.savez(tmp_path / "whole.npz", arr_0=blobs(8, 0)[:, 0].numpy())
    cut = tmp_path / "cut.npz"
    cut.write_bytes((tmp_path / "whole.npz").read_bytes()[:-200])
    with pytest.raises(ValueError, match=r"cut\.npz is not an \.npz archive .*truncated"):
        load_reference(str(cut))  # was zipfile.BadZipFile
    np.savez(tmp_path / "other.npz", images=np.zeros(3))
    with pytest.raises(ValueError, match=r"neither arr_0 .* its arrays: images"):
        load_reference(str(tmp_path / "other.npz"))

    bad_pt = tmp_path / "stats.pt"
    bad_pt.write_bytes(b"\x80\x02not a pickle")
    with pytest.raises(ValueError, match=r"stats\.pt could not be read as a torch-fidelity stat"):
        load_reference(str(bad_pt))  # was an UnpicklingError
    marker = tmp_path / "ran"
    torch.save({"mu": np.zeros(4), "sigma": np.eye(4), "x": Payload(marker)}, bad_pt)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_reference(str(bad_pt))
    assert not marker.exists()  # read with weights_only=False, the file ran os.makedirs

    # torch-fidelity's own statistics (NumPy arrays) still load, as float32 / float64
    good = tmp_path / "good.pt"
    torch.save({"mu": np.ones(4, np.float32), "sigma": np.eye(4)}, good)
    ref = load_reference(str(good))
    assert ref.is_statistics and ref.mu.dtype == np.float32 and ref.sigma.dtype == np.float64
    torch.save({"mu": np.ones(4), "sigma": np.eye(3)}, good)
    with pytest.raises(ValueError, match=r"good\.pt: statistics must be mu \(D,\)"):
        load_reference(str(good))


def _png(path, image):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.numpy()).save(path)
    return path


def test_reference_folders_skip_and_count_unreadable_images(tmp_path, caplog, monkeypatch):
    from flowturbo.eval.fidelity import ImageFolderImages, load_reference

    folder = tmp_path / "ref"
    images = blobs(5, 0)[:, 0]  # (5, 32, 32)
    for i, image in enumerate(images):
        _png(folder / f"{i}.png", image)
    (folder / "garbage.png").write_text("not an image")
    whole = _png(tmp_path / "whole.png", images[0]).read_bytes()
    (folder / "sub").mkdir()
    (folder / "sub" / "cut.png").write_bytes(whole[: len(whole) // 2])
    with caplog.at_level("WARNING"):
        ref = load_reference(str(folder))  # was a PIL.UnidentifiedImageError, later
    assert len(ref) == 5 and ref.skipped == 2
    assert "skipped 2 of 7 image files" in caplog.text and "garbage.png" in caplog.text
    assert torch.equal(ref.images[3][0], images[3])
    # the hash was computed while the files were checked: not read again, and the same
    expected = content_hash([ref.images[i] for i in range(5)])
    read, get = [], ImageFolderImages.__getitem__
    monkeypatch.setattr(ImageFolderImages, "__getitem__", lambda s, i: read.append(i) or get(s, i))
    assert content_hash(ref.images) == expected and read == []

    _png(folder / "odd.png", blobs(1, 1)[0, 0, :28])  # 28 x 32
    with pytest.raises(ValueError, match=r"odd\.png is 28 x 32, but \S+0\.png is 32 x 32"):
        load_reference(str(folder))  # was torch.stack's "equal size"
    for file in folder.rglob("*.png"):
        file.write_text("")
    with pytest.raises(FileNotFoundError, match="none of the 8 image files .* could be read"):
        load_reference(str(folder))


def test_extractors_are_checked_with_one_tiny_image(tiny_weights, tmp_path):
    from flowturbo.eval.fidelity import check_extractor, check_registered

    assert check_extractor(EXTRACTOR_NAME, tiny_weights) == 16  # its FID feature width
    with pytest.raises(ValueError, match="no feature extractor named 'inception': use 'incep"):
        check_registered("inception")
    torch.save({"model": {}}, tmp_path / "base.pt")
    with pytest.raises(ValueError, match=r"could not be built from the weights file .*base"):
        check_extractor(EXTRACTOR_NAME, tmp_path / "base.pt")
    marker = tmp_path / "ran"
    torch.save({"fc.weight": Payload(marker)}, tmp_path / "inception.pth")
    with pytest.raises(ValueError, match="could not be read as InceptionV3 weights"):
        check_extractor("inception-v3-compat", tmp_path / "inception.pth")
    assert not marker.exists()  # torch-fidelity reads the file with weights_only=False


def test_adm_reference_batches_give_fid_against_their_statistics(
    tiny_weights, tmp_path, monkeypatch
):
    """An .npz with images and statistics (ADM's VIRTUAL_imagenet256_labeled.npz: 10,000
    images, mu/sigma of all of ImageNet): FID against the statistics, as ADM's evaluator and
    the published FIDs have it (was: against the 10,000 images); the images give
    precision/recall; each set passes through the extractor once."""
    import numpy as np
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    from flowturbo.eval.fidelity import fid_against_statistics, load_reference

    ref, gen = blobs(64, 0), blobs(48, 1)
    fe = DigitFeatureExtractor(EXTRACTOR_NAME, ["features"], str(tiny_weights))
    (feats,) = fe(UInt8Images(blobs(200, 2)).images.expand(-1, 3, -1, -1))  # "the data set"
    mu, sigma = feats.numpy().mean(0), np.cov(feats.numpy(), rowvar=False)
    np.savez(tmp_path / "batch.npz", arr_0=ref[:, 0].numpy(), mu=mu, sigma=sigma)
    batch = load_reference(str(tmp_path / "batch.npz"))
    assert batch.is_statistics and torch.equal(batch.images, ref) and len(batch) == 64
    kw = dict(extractor=EXTRACTOR_NAME, weights_path=tiny_weights, isc=False)
    on_images = fidelity_metrics(gen, ref, reference_cache_name=None, cache_root=tmp_path, **kw)
    on_statistics = fid_against_statistics(gen, mu, sigma, **kw)
    assert abs(on_statistics["fid"] - on_images["fid"]) > 1e-3 * on_images["fid"]

    seen, cls = [], FEATURE_EXTRACTORS_REGISTRY[EXTRACTOR_NAME]
    forward = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, x: seen.append(len(x)) or forward(self, x))
    cache = tmp_path / "cache"
    both = dict(prc_reference=batch.images, reference_cache_name="batch", cache_root=cache)
    got = fid_against_statistics(gen, batch.mu, batch.sigma, **both, **kw)
    assert got["fid"] == pytest.approx(on_statistics["fid"], rel=1e-6)
    assert got["precision"] == pytest.approx(on_images["precision"], rel=1e-6)
    assert got["recall"] == pytest.approx(on_images["recall"], rel=1e-6)
    assert got["num_reference"] == 64 and sum(seen) == 48 + 64
    seen.clear()
    again = fid_against_statistics(gen, batch.mu, batch.sigma, **both, **kw)
    assert again == got and sum(seen) == 48  # the reference's features came from the cache


def test_fid_against_statistics_reads_the_generated_images_once(
    tiny_weights, tmp_path, monkeypatch
):
    import numpy as np

    from flowturbo.eval.fidelity import fid_against_statistics

    ref, gen = blobs(64, 0), blobs(64, 1)
    fe = DigitFeatureExtractor(EXTRACTOR_NAME, ["features"], str(tiny_weights))
    (feats,) = fe(UInt8Images(ref).images.expand(-1, 3, -1, -1))
    mu, sigma = feats.numpy().mean(0), np.cov(feats.numpy(), rowvar=False)
    kw = dict(extractor=EXTRACTOR_NAME, weights_path=tiny_weights)
    want = fidelity_metrics(
        gen, ref, reference_cache_name=None, cache_root=tmp_path, prc=False, isc_splits=4, **kw
    )
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    seen, cls = [], FEATURE_EXTRACTORS_REGISTRY[EXTRACTOR_NAME]
    forward = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, x: seen.append(len(x)) or forward(self, x))
    got = fid_against_statistics(gen, mu, sigma, isc=True, isc_splits=4, **kw)
    assert got["fid"] == pytest.approx(want["fid"], rel=1e-4)
    assert got["isc_mean"] == pytest.approx(want["isc_mean"], rel=1e-4)
    assert got["isc_std"] == pytest.approx(want["isc_std"], rel=1e-4)
    assert sum(seen) == 64  # FID and IS from one pass (was two: 128 images)
    # the record names the statistics, mean and covariance both
    same = fid_against_statistics(gen, mu.copy(), sigma.copy(), isc=False, **kw)
    assert same["reference_hash"] == got["reference_hash"]
    wider = fid_against_statistics(gen, mu, 2 * sigma, isc=False, **kw)
    assert wider["reference_hash"] != got["reference_hash"] and wider["fid"] != got["fid"]
    with pytest.raises(ValueError, match="3 features, the extractor"):
        fid_against_statistics(gen, mu[:3], sigma[:3, :3], isc=False, **kw)
    with pytest.raises(ValueError, match="isc_splits=100"):
        fid_against_statistics(gen, mu, sigma, isc=True, isc_splits=100, **kw)


def test_fid_cache_entries_shared_and_read_only_roots(tiny_weights, tmp_path, monkeypatch):

    from flowturbo.eval import fidelity

    cache = tmp_path / "cache"
    kw = dict(extractor=EXTRACTOR_NAME, weights_path=tiny_weights, isc=False, prc=False)
    ref, gen = blobs(32, 0), blobs(32, 1)
    a = fidelity_metrics(gen, ref, reference_cache_name="b", cache_root=cache, **kw)
    modes = {p.name: p.stat().st_mode & 0o777 for p in cache.iterdir()}
    assert modes and all(m & 0o044 == 0o044 for m in modes.values()), modes  # was 0600

    # a cache root this process cannot write to: no caching (was a PermissionError)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        fidelity.os, "access", lambda p, m: False if str(p) == str(locked) else real_access(p, m)
    )
    with pytest.warns(UserWarning, match="not writable"):
        b = fidelity_metrics(gen, ref, reference_cache_name="b", cache_root=locked, **kw)
    assert b["fid"] == pytest.approx(a["fid"]) and not any(locked.iterdir())


def _script(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / name
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


@pytest.mark.parametrize(
    "script, argv, flag",
    [
        ("benchmarks/bench_sampler.py", ["--schedules", "X9"], "--schedules"),
        ("benchmarks/bench_sampler.py", ["--batch", "0"], "--batch"),
        ("benchmarks/bench_sampler.py", ["--repeats", "0"], "--repeats"),
        ("benchmarks/bench_sampler.py", ["--device", "cuda:7"], "--device"),
        ("benchmarks/bench_train.py", ["--steps", "0"], "--steps"),
        ("benchmarks/bench_train.py", ["--grid", "2"], "--grid"),
        ("benchmarks/bench_train.py", ["--model", "SiT-Foo/2"], "--model"),
        ("benchmarks/bench_data.py", ["--batch-size", "0"], "--batch-size"),
        ("benchmarks/bench_gpu.py", ["--batch", "0"], "--batch"),
        ("experiments/refiner_error.py", ["--refiners", "x.pt", "--samples", "0"], "--samples"),
        ("experiments/refiner_error.py", ["--refiners", "nowhere.pt"], "nowhere.pt"),
    ],
)
def test_scripts_refuse_bad_arguments_naming_them(script, argv, flag, capsys, monkeypatch):
    if "--device" in argv and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    module = _script(script)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_bench_gpu_help_works_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        _script("benchmarks/bench_gpu.py").main(["--help"])
    assert e.value.code == 0 and "--profile" in capsys.readouterr().out


def test_bench_train_writes_its_results_into_a_new_folder(tmp_path, monkeypatch):
    module = _script("benchmarks/bench_train.py")
    monkeypatch.setattr(
        module,
        "run",
        lambda args, t: {
            "target": t,
            "ms_per_step": 1.0,
            "examples_per_s": 2.0,
            "steps_timed": 1,
        },  # fmt: skip
    )
    out = tmp_path / "new" / "train.json"
    module.main(["--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["ratio"] == 1.0 and [p.name for p in out.parent.iterdir()] == ["train.json"]
