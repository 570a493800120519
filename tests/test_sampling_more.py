"""Behaviour the rest of the suite left unchecked, found by mutation testing of sampling/edit.py,
sampling/guidance.py, sampling/solvers.py, generate.py and inputs.py: each test here fails on a
plausible one-line bug in those modules that every other test let through."""

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from flowturbo import generate as gen
from flowturbo.eval.entries import parse_entry
from flowturbo.flow.analytic import ExactRefiner, GaussianMixtureFlow
from flowturbo.generate import pick_row, resolve_labels
from flowturbo.inputs import load_image, load_inputs, load_masks, region_mask
from flowturbo.sampling import (
    ClassifierFreeGuidance,
    baseline_nfe,
    dopri5,
    edit,
    euler,
    inpaint,
    integrate,
    midpoint,
    resize_mask,
    sample,
)


@pytest.fixture(scope="module")
def flow() -> GaussianMixtureFlow:
    """Two modes on 1 x 4 x 4 images: a velocity that depends on x and t non-linearly."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    return GaussianMixtureFlow(means, torch.tensor([0.3, 0.5]))


def gaussian(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- guidance


def test_guidance_refuses_zero_channels() -> None:
    """channels=0 would guide nothing and return the conditional velocity: refused by name."""
    with pytest.raises(ValueError, match=r"channels must be None \(all\) or >= 1, got 0"):
        ClassifierFreeGuidance(lambda x, t, y: x, 1.5, 3, channels=0)


def test_guidance_at_scale_one_passes_the_refiners_velocity_on() -> None:
    """With scale 1 the wrapper calls the refiner once, with its velocity argument v."""

    def refiner(x: torch.Tensor, t: torch.Tensor, v: torch.Tensor, *, y: torch.Tensor):
        return 2 * x + 3 * v + y.view(-1, 1, 1, 1)

    x, v = gaussian(2, 1, 2, 2, seed=1), gaussian(2, 1, 2, 2, seed=2)
    t, y = torch.rand(2), torch.tensor([0, 1])
    out = ClassifierFreeGuidance(refiner, 1.0, 3)(x, t, v, y=y)
    torch.testing.assert_close(out, refiner(x, t, v, y=y), rtol=0, atol=0)


# ---------------------------------------------------------------- edit and inpaint


def test_edit_passes_refiner_input_on(flow: GaussianMixtureFlow) -> None:
    """edit(refiner_input="cache") is the cache variant of the R steps on [t0, 1], not d0's."""
    image, noise = gaussian(3, 1, 4, 4, seed=3), gaussian(3, 1, 4, 4, seed=4)
    refiner = ExactRefiner(flow)
    x_t0 = 0.5 * image + 0.5 * noise  # strength 0.5: t0 = 0.5
    grid = [0.5, 0.625, 0.75, 0.875, 1.0]
    out = {
        mode: edit(flow, image, noise, "H1P1R2", strength=0.5, refiner=refiner, refiner_input=mode)
        for mode in ("d0", "cache")
    }
    expected = integrate(
        "HPRR", flow, x_t0, refiner=refiner, timesteps=grid, refiner_input="cache"
    )
    torch.testing.assert_close(out["cache"], expected, rtol=0, atol=1e-12)
    assert (out["cache"] - out["d0"]).abs().max() > 1e-4  # the two variants differ here


@pytest.mark.parametrize("refiner_input", ["d0", "cache"])
def test_inpaint_passes_refiner_input_on(flow: GaussianMixtureFlow, refiner_input: str) -> None:
    """With every pixel generated, inpaint is sample with the same refiner_input."""
    image, noise = gaussian(3, 1, 4, 4, seed=5), gaussian(3, 1, 4, 4, seed=6)
    refiner = ExactRefiner(flow)
    mask = torch.ones(4, 4)
    out = inpaint(flow, image, mask, noise, "H1P1R2", refiner=refiner, refiner_input=refiner_input)
    expected = sample(flow, noise, "H1P1R2", refiner=refiner, refiner_input=refiner_input)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_inpaint_runs_on_the_given_time_grid(flow: GaussianMixtureFlow) -> None:
    """A custom grid is used, not silently replaced by the uniform one."""
    image, noise = gaussian(3, 1, 4, 4, seed=7), gaussian(3, 1, 4, 4, seed=8)
    grid = [0.0, 0.05, 0.2, 0.5, 1.0]
    seen: list[dict] = []
    out = inpaint(
        flow, image, torch.ones(4, 4), noise, "H2P2", timesteps=grid, callback=seen.append
    )
    assert [s["t"] for s in seen] == pytest.approx(grid[1:])
    torch.testing.assert_close(out, sample(flow, noise, "H2P2", timesteps=grid), rtol=0, atol=0)


def test_inpaint_takes_one_mask_per_image(flow: GaussianMixtureFlow) -> None:
    """A (B, 1, H, W) mask gives each image its own region to keep."""
    image, noise = gaussian(2, 1, 4, 4, seed=9), gaussian(2, 1, 4, 4, seed=10)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, :2] = 1  # image 0: generate the top half, keep the bottom
    mask[1, :, :, 2:] = 1  # image 1: generate the right half, keep the left
    out = inpaint(flow, image, mask, noise, "H2")
    torch.testing.assert_close(out[0, :, 2:], image[0, :, 2:], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1, :, :, :2], image[1, :, :, :2], rtol=0, atol=1e-12)
    assert (out[0, :, :2] - image[0, :, :2]).abs().max() > 1e-3  # generated, not kept


def test_a_mask_with_the_wrong_number_of_channels_is_named() -> None:
    with pytest.raises(ValueError, match=r"mask must have shape .* got \(1, 2, 4, 4\)"):
        resize_mask(torch.ones(1, 2, 4, 4), (2, 4, 4, 4))


def test_any_non_zero_mask_value_means_generate(flow: GaussianMixtureFlow) -> None:
    """A 0/255 (or any non-zero) mask is read as 0/1, not used as a weight."""
    mask = torch.tensor([[0.0, 255.0], [0.5, -1.0]])
    assert resize_mask(mask, (1, 1, 2, 2)).tolist() == [[[[0.0, 1.0], [1.0, 1.0]]]]
    image, noise = gaussian(2, 1, 4, 4, seed=11), gaussian(2, 1, 4, 4, seed=12)
    pixels = torch.zeros(4, 4, dtype=torch.uint8)
    pixels[2:] = 255
    out = inpaint(flow, image, pixels, noise, "H2")
    torch.testing.assert_close(out, inpaint(flow, image, pixels / 255, noise, "H2"))
    torch.testing.assert_close(out[..., :2, :], image[..., :2, :], rtol=0, atol=1e-12)


# ---------------------------------------------------------------- baseline solvers


def test_fixed_step_solvers_refuse_zero_steps() -> None:
    with pytest.raises(ValueError, match="euler: steps must be >= 1, got 0"):
        euler(lambda x, t: -x, torch.zeros(1, 1, 2, 2), 0)


def test_midpoint_step_by_hand() -> None:
    """Explicit midpoint on v = t - x^2: x += h v(x + h/2 v(x, t0), t0 + h/2), per step
    (a velocity non-linear in x: on a linear one every two-stage second-order method,
    Heun's included, gives the same numbers)."""
    model = lambda x, t: t.view(-1, 1, 1, 1) - x**2  # noqa: E731
    x0 = gaussian(2, 1, 2, 2, seed=13)
    x, h = x0.clone(), 0.5
    for t0 in (0.0, 0.5):
        k1 = t0 - x**2
        x = x + h * ((t0 + h / 2) - (x + h / 2 * k1) ** 2)
    torch.testing.assert_close(midpoint(model, x0, 2), x, rtol=0, atol=1e-14)


def test_baseline_nfe_names_an_unknown_solver() -> None:
    with pytest.raises(ValueError, match="unknown baseline solver 'rk4'; known: euler, heun"):
        baseline_nfe("rk4", 4)


# ---------------------------------------------------------------- dopri5


def single_gaussian() -> tuple[GaussianMixtureFlow, torch.Tensor]:
    flow = GaussianMixtureFlow(torch.ones(1, 1, 2, 2) * 2.0, torch.tensor([0.3]))
    return flow, gaussian(16, 1, 2, 2, seed=2)


@pytest.mark.parametrize("tol", [1e-4, 1e-6])
def test_dopri5_meets_its_tolerance(tol: float) -> None:
    """With rtol = atol = tol the end point is within a few tol of the closed form."""
    flow, x0 = single_gaussian()
    error = (dopri5(flow, x0, rtol=tol, atol=tol) - flow.exact_solution(x0)).abs().max()
    assert float(error) < 5 * tol


def test_dopri5_reports_its_steps_and_evaluations() -> None:
    """The callback numbers accepted steps from 0, ends at t_end, and its base_nfe is the
    number of model calls (first-same-as-last: 6 new calls per attempted step)."""
    flow, x0 = single_gaussian()
    calls = 0

    def counted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return flow(x, t)

    seen: list[dict] = []
    dopri5(counted, x0, rtol=1e-6, atol=1e-6, callback=seen.append)
    assert [s["step"] for s in seen] == list(range(len(seen)))
    assert seen[-1]["t"] == pytest.approx(1.0, abs=1e-12)
    assert seen[-1]["base_nfe"] == calls and (calls - 1) % 6 == 0


def test_dopri5_refuses_an_empty_or_backward_interval() -> None:
    for start, end in ((0.5, 0.5), (0.8, 0.2)):
        with pytest.raises(ValueError, match=rf"t_end \({end}\) must be greater than t_start"):
            dopri5(lambda x, t: -x, torch.ones(1, 1, 1, 1), t_start=start, t_end=end)


def test_dopri5_gives_up_after_max_steps() -> None:
    flow, x0 = single_gaussian()
    with pytest.raises(RuntimeError, match=r"dopri5 did not reach t=1.0 in 3 steps \(at t=0\.\d"):
        dopri5(flow, x0, rtol=1e-10, atol=1e-10, max_steps=3)


def test_dopri5_may_finish_on_its_last_allowed_step() -> None:
    """Given exactly the attempts it needs, dopri5 finishes. The loop checked for t_end only
    before each attempt, so reaching it on the last allowed one raised 'did not reach t=1.0 in
    N steps (at t=1)'."""
    nfe = []
    x0 = torch.zeros(1, 1, 1, 1)
    first = dopri5(lambda x, t: torch.ones_like(x) + t[:, None, None, None], x0, first_step=0.25,
                   callback=lambda info: nfe.append(info["base_nfe"]))  # fmt: skip
    attempts = (nfe[-1] - 1) // 6  # one evaluation at the start, six per attempt
    again = dopri5(lambda x, t: torch.ones_like(x) + t[:, None, None, None], x0, first_step=0.25,
                   max_steps=attempts)  # fmt: skip
    assert torch.equal(again, first) and first.item() == pytest.approx(1.5)


def test_dopri5_passes_model_kwargs_on() -> None:
    """dx/dt = -y x solved to t = 1: exp(-y) per sample."""
    y = torch.tensor([0.5, 2.0], dtype=torch.float64)
    model = lambda x, t, *, y: -y.view(-1, 1, 1, 1) * x  # noqa: E731
    out = dopri5(model, torch.ones(2, 1, 1, 1, dtype=torch.float64), rtol=1e-9, atol=1e-9, y=y)
    torch.testing.assert_close(out.flatten(), torch.exp(-y), rtol=1e-7, atol=1e-7)


# ---------------------------------------------------------------- generate.py


ROWS = [
    {"schedule": "H8", "fid": 40.0, "ms_per_image_eager": 60.0, "ms_per_image_compiled": 50.0},
    {"schedule": "H1P2R2", "fid": 34.6, "ms_per_image_eager": 20.0, "ms_per_image_compiled": 18.0},
    {"schedule": "H1P3R3", "fid": 33.4, "ms_per_image_eager": 26.0, "ms_per_image_compiled": 19.0},
]


def test_pick_targets_are_inclusive() -> None:
    """'FID at most max_fid' and 'at most max_ms ms/img' include a row exactly on the target."""
    assert pick_row(ROWS, max_fid=33.4)["schedule"] == "H1P3R3"
    assert pick_row(ROWS, max_ms=18.0)["schedule"] == "H1P2R2"


def test_pick_ignores_rows_whose_fid_is_not_finite() -> None:
    """A failed evaluation (FID NaN or inf) is never deployed, whatever its latency."""
    failed = [
        {"schedule": "E2", "fid": math.nan, "ms_per_image_compiled": 1.0},
        {"schedule": "E3", "fid": math.inf, "ms_per_image_compiled": 1.5},
    ]
    assert pick_row([*failed, *ROWS], max_ms=30)["schedule"] == "H1P3R3"


def test_labels_are_classes_0_to_the_null_class() -> None:
    assert resolve_labels(3, 2, 3, task="sample").tolist() == [3, 3]  # the null class
    for bad in (-1, [0, -2]):
        with pytest.raises(ValueError, match=r"a class in \[0, 3\]"):
            resolve_labels(bad, 2, 3, task="sample")


NETS = SimpleNamespace(shape=(1, 32, 32), vae=None, num_classes=3)


def digits(folder: Path, n: int = 3) -> Path:
    """n grey 32 x 32 PNGs, a.png, b.png, ..., in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(folder / f"{'abcdef'[i]}.png")
    return folder


def make_job(generate_cfg, out: Path, *overrides: str) -> gen.Job:
    cfg = generate_cfg(out, *overrides)
    return gen.make_job(cfg, parse_entry(str(cfg.sampler.schedule)), NETS)


@pytest.mark.parametrize(
    ("first", "second", "key"),
    [
        ("edit.strength=0.5", "edit.strength=0.6", "strength"),
        ("sampler.cfg_channels=null", "sampler.cfg_channels=3", "cfg_channels"),
        ("sampler.refiner_input=d0", "sampler.refiner_input=cache", "refiner_input"),
    ],
)
def test_a_rerun_with_another_edit_setting_is_another_job(
    generate_cfg, tmp_path: Path, first: str, second: str, key: str
) -> None:
    """Resuming into a folder made with another strength, guidance or refiner input is refused
    (its images would mix two settings)."""
    job = ["task=edit", f"input={digits(tmp_path / 'in')}", "sampler.schedule=H1P2R2"]
    make_job(generate_cfg, tmp_path / "gen", *job, first).check_folder()
    other = make_job(generate_cfg, tmp_path / "gen", *job, second)
    with pytest.raises(RuntimeError, match=rf"other settings \(differs in \['{key}'\]\)"):
        other.check_folder()


def test_edit_strength_must_be_a_number_not_a_boolean(generate_cfg, tmp_path: Path) -> None:
    job = ["task=edit", f"input={digits(tmp_path / 'in')}", "sampler.schedule=H2"]
    with pytest.raises(ValueError, match=r"edit.strength must be a number in \(0, 1\].*True"):
        make_job(generate_cfg, tmp_path / "gen", *job, "edit.strength=true")


def test_edit_with_a_baseline_is_refused_before_any_output(generate_cfg, tmp_path: Path) -> None:
    """The job is refused when it is made: no sampler folder or job.json is left behind."""
    job = ["task=edit", f"input={digits(tmp_path / 'in')}", "sampler.schedule=euler:4"]
    with pytest.raises(ValueError, match="edit runs FlowTurbo schedules; euler:4 is a baseline"):
        gen.generate_images(generate_cfg(tmp_path / "gen", *job))
    assert not (tmp_path / "gen").exists()


# ---------------------------------------------------------------- inputs.py


def test_mask_regions_exactly() -> None:
    size, half, quarter = 8, 4, 2
    expected = {region: torch.zeros(size, size) for region in ("bottom", "top", "left", "right")}
    expected["bottom"][half:] = 1
    expected["top"][:half] = 1
    expected["left"][:, :half] = 1
    expected["right"][:, half:] = 1
    expected["center"] = torch.zeros(size, size)
    expected["center"][quarter:-quarter, quarter:-quarter] = 1
    for region, mask in expected.items():
        assert torch.equal(region_mask(region, size)[0, 0], mask), region


def test_a_folder_of_inputs_is_cut_at_the_limit(tmp_path: Path) -> None:
    folder = digits(tmp_path / "in", n=4)
    assert load_inputs(str(folder), 1, 32, limit=2).names == ["a", "b"]
    assert load_inputs("demo:val", 1, 32, limit=2).names == ["val00000", "val00001"]


def test_the_demo_digits_refuse_a_model_of_another_shape() -> None:
    with pytest.raises(ValueError, match="demo digits are 1 x 32 x 32 images.* 3 x 32 x 32"):
        load_inputs("demo:val", 3, 32)


def test_a_folder_of_masks_gives_each_input_its_own(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    top, left = np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)
    top[:4], left[:, :4] = 255, 255
    Image.fromarray(top).save(tmp_path / "m" / "a.png")
    Image.fromarray(left).save(tmp_path / "m" / "b.png")
    masks = load_masks(str(tmp_path / "m"), ["a", "b"], 8).load([1, 0])
    assert torch.equal(masks, torch.from_numpy(np.stack([left, top]) / 255).float()[:, None])


def test_mask_pixels_of_128_and_above_are_generated(tmp_path: Path) -> None:
    grey = np.full((8, 8), 127, np.uint8)
    grey[4:] = 128
    Image.fromarray(grey).save(tmp_path / "m.png")
    mask = load_masks(str(tmp_path / "m.png"), ["a"], 8).load([0])
    assert torch.equal(mask[0, 0], torch.from_numpy(grey >= 128).float())


def test_an_opaque_mask_with_an_alpha_channel_is_read_by_its_colour(tmp_path: Path) -> None:
    """Alpha is read only where the image has transparency: an RGBA mask that is opaque
    everywhere is read as white = generate, black = keep."""
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[:, 4:, :3] = 255  # white right half
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "m.png")
    mask = load_masks(str(tmp_path / "m.png"), ["a"], 8).load([0])
    assert torch.equal(mask[0, 0], torch.from_numpy(rgba[..., 0] / 255).float())


def test_16_bit_grey_maps_65535_to_255_exactly(tmp_path: Path) -> None:
    """16-bit values scale by 255 / 65535: 257 k reads as k."""
    Image.fromarray(np.full((32, 32), 257 * 200, np.uint16)).save(tmp_path / "deep.png")
    assert load_image(tmp_path / "deep.png", 1, 32).unique().tolist() == [200]
