"""Editing (SDEdit) and inpainting on flows whose velocity is known exactly."""

import pytest
import torch

from flowturbo.flow.analytic import ExactRefiner, GaussianMixtureFlow
from flowturbo.sampling import edit, inpaint, resize_mask, sample

STD = 0.3


@pytest.fixture(scope="module")
def pattern():
    return torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture(scope="module")
def two_modes(pattern):
    """Data: the pattern or its negative, plus N(0, STD^2) noise per pixel."""
    return GaussianMixtureFlow(torch.cat([pattern, -pattern]), torch.tensor([STD, STD]))


def draws(pattern, n=64, seed=1):
    """n images from alternating modes (+, -, +, ...), the sign of each, and noise."""
    g = torch.Generator().manual_seed(seed)
    sign = (1 - 2 * (torch.arange(n) % 2)).double().view(-1, 1, 1, 1)
    image = sign * pattern + STD * torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    return image, sign, torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)


def rms_per_image(a, b):
    return (a - b).pow(2).mean((1, 2, 3)).sqrt()


# ---------------------------------------------------------------- inpainting


@pytest.mark.parametrize("schedule", ["H8", "H1P5", "H1P5R2"])
def test_inpaint_keeps_the_known_half_and_completes_the_other_consistently(
    two_modes, pattern, schedule
):
    """Given the left half of an image, its mode is certain: the right half must follow it.

    Replacement is not exact conditioning (early on, the known half is mostly noise), so a
    few completions may pick the other mode; nearly all must not.
    """
    image, sign, noise = draws(pattern)
    mask = torch.zeros(8, 8)
    mask[:, 4:] = 1  # generate the right half
    out = inpaint(two_modes, image, mask, noise, schedule, refiner=ExactRefiner(two_modes))
    assert torch.equal(out[..., :4], image[..., :4])
    right = out[..., 4:]
    own = rms_per_image(right, sign * pattern[..., 4:])
    other = rms_per_image(right, -sign * pattern[..., 4:])
    consistent = own < other
    assert float(consistent.double().mean()) >= 0.95, (own, other)
    # A sample of the conditional: within the mode, pixels spread by STD around the mean.
    assert 0.6 * STD < float(own[consistent].mean()) < 1.4 * STD, own


def test_inpaint_with_nothing_or_everything_masked(two_modes, pattern):
    image, _, noise = draws(pattern, n=8)
    everything = inpaint(two_modes, image, torch.ones(1, 1, 8, 8), noise, "H2P2")
    torch.testing.assert_close(everything, sample(two_modes, noise, "H2P2"), rtol=0, atol=0)
    nothing = inpaint(two_modes, image, torch.zeros(8, 8), noise, "H2P2")
    torch.testing.assert_close(nothing, image, rtol=0, atol=1e-12)


def test_inpaint_puts_the_cache_on_the_known_path(two_modes, pattern):
    """After each step the known pixels sit on x_t = t x1 + (1 - t) x0 with velocity x1 - x0."""
    image, _, noise = draws(pattern, n=4)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :3, :] = 1
    seen = []
    inpaint(two_modes, image, mask, noise, "H1P2R1", refiner=ExactRefiner(two_modes),
            callback=seen.append)  # fmt: skip
    assert [s["t"] for s in seen] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for s in seen:
        known = (s["t"] * image + (1 - s["t"]) * noise)[..., 3:, :]
        torch.testing.assert_close(s["x"][..., 3:, :], known, rtol=0, atol=1e-12)
        torch.testing.assert_close(s["velocity"][..., 3:, :], (image - noise)[..., 3:, :])


def test_inpaint_compiled_steps_equal_eager(two_modes, pattern):
    image, _, noise = draws(pattern, n=4)
    mask = torch.zeros(8, 8)
    mask[2:6, 2:6] = 1
    eager = inpaint(two_modes, image, mask, noise, "H1P3")
    compiled = inpaint(two_modes, image, mask, noise, "H1P3", compile={"backend": "eager"})
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-12)


def test_inpaint_refuses_what_it_cannot_do(two_modes, pattern):
    image, _, noise = draws(pattern, n=2)
    mask = torch.ones(8, 8)
    with pytest.raises(ValueError, match="compile=True"):
        inpaint(two_modes, image, mask, noise, "H2", compile="sampler")
    with pytest.raises(ValueError, match="start at 0 and end at 1, got 0.2 to 1"):
        inpaint(two_modes, image, mask, noise, "H2", timesteps=[0.2, 0.6, 1.0])
    with pytest.raises(ValueError, match="got 0 to 0.9"):  # kept pixels would not be the image
        inpaint(two_modes, image, mask, noise, "H2", timesteps=[0.0, 0.5, 0.9])
    with pytest.raises(ValueError, match=r"mask must have shape .* got \(3, 1, 8, 8\)"):
        inpaint(two_modes, image, torch.ones(3, 1, 8, 8), noise, "H2")
    with pytest.raises(ValueError, match=r"image \(2, 1, 8, 8\), noise \(2, 1, 4, 4\)"):
        inpaint(two_modes, image, mask, noise[..., :4, :4], "H2")
    with pytest.raises(ValueError, match="refiner"):
        inpaint(two_modes, image, mask, noise, "H2R1")


def test_resize_mask_generates_every_cell_that_covers_a_masked_pixel():
    pixels = torch.zeros(1, 1, 16, 16)
    pixels[..., 5, 9] = 1  # one pixel -> the latent cell (1, 2) at factor 4
    cells = resize_mask(pixels, (2, 4, 4, 4))
    expected = torch.zeros(1, 1, 4, 4)
    expected[..., 1, 2] = 1
    assert torch.equal(cells, expected)
    up = resize_mask(torch.tensor([[1, 0], [0, 0]]), (1, 1, 4, 4))
    assert up[0, 0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


# ---------------------------------------------------------------- editing


class ModeOfLabel:
    """A class-conditional flow: label 0 draws the pattern's mode, label 1 its negative."""

    def __init__(self, pattern):
        self.flows = [GaussianMixtureFlow(s * pattern, torch.tensor([STD])) for s in (1, -1)]

    def __call__(self, x, t, y):
        pos, neg = self.flows[0](x, t), self.flows[1](x, t)
        return torch.where((y == 0).view(-1, 1, 1, 1), pos, neg)


def test_edit_strength_trades_the_image_for_the_label(pattern):
    """Images of mode +, edited towards label 1 (mode -): weak edits stay, full ones switch."""
    model = ModeOfLabel(pattern)
    image, _, noise = draws(pattern, n=32)
    image = image.abs() * pattern.sign()  # every image in mode +
    to_minus = torch.ones(32, dtype=torch.long)

    def closer_to_minus(out):
        return (rms_per_image(out, -pattern) < rms_per_image(out, pattern)).float().mean()

    weak = edit(model, image, noise, "H4", strength=0.05, y=to_minus)
    assert float(rms_per_image(weak, image).max()) < 0.2
    assert float(closer_to_minus(weak)) == 0.0
    strong = edit(model, image, noise, "H4", strength=0.9, y=to_minus)
    assert float(closer_to_minus(strong)) == 1.0
    full = edit(model, image, noise, "H4", strength=1.0, y=to_minus)
    torch.testing.assert_close(full, sample(model, noise, "H4", y=to_minus), rtol=0, atol=0)


def test_edit_spends_every_step_on_the_remaining_path(two_modes, pattern):
    image, _, noise = draws(pattern, n=4)
    seen = []
    edit(two_modes, image, noise, "H1P2R1", strength=0.4, refiner=ExactRefiner(two_modes),
         callback=seen.append)  # fmt: skip
    assert [s["t"] for s in seen] == pytest.approx([0.7, 0.8, 0.9, 1.0])
    assert (seen[-1]["base_nfe"], seen[-1]["refiner_nfe"]) == (4, 2)
    # The start is the noised image: the first H step runs from x_0.6 = 0.6 x1 + 0.4 x0.
    x = 0.6 * image + 0.4 * noise
    h, t = 0.1, torch.full((4,), 0.6, dtype=torch.float64)
    d0 = two_modes(x, t)
    d1 = two_modes(x + h * d0, t + h)
    torch.testing.assert_close(seen[0]["x"], x + h / 2 * (d0 + d1))


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5])
def test_edit_rejects_strengths_outside_0_1(two_modes, pattern, strength):
    image, _, noise = draws(pattern, n=2)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        edit(two_modes, image, noise, "H2", strength=strength)


def test_edit_runs_as_one_compiled_program(pattern):
    """The edit's grid [t0, 1] is part of the compiled sampler's setting."""
    from flowturbo.sampling import compile as compile_mod

    model = ModeOfLabel(pattern)
    image, _, noise = draws(pattern, n=4)
    y = torch.tensor([1, 0, 1, 0])
    eager = edit(model, image, noise, "H1P2", strength=0.6, y=y)
    compile_mod.SAMPLERS.clear()
    try:
        whole = edit(model, image, noise, "H1P2", strength=0.6, compile="sampler", y=y)
        ((run, *_),) = compile_mod.SAMPLERS.values()
        assert run.ts.tolist() == pytest.approx([0.4, 0.6, 0.8, 1.0])
    finally:
        compile_mod.SAMPLERS.clear()
    torch.testing.assert_close(whole, eager, rtol=1e-9, atol=1e-9)


def test_uint8_images_and_unbatched_images_are_named(two_modes) -> None:
    noise = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    pixels = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    with pytest.raises(TypeError, match="from_uint8"):  # 0..255 were used as model values
        edit(two_modes, pixels, noise, "H2", strength=0.5)
    with pytest.raises(TypeError, match="from_uint8"):
        inpaint(two_modes, pixels, torch.ones(8, 8), noise, "H2")
    with pytest.raises(ValueError, match=r"image\[None\]"):
        inpaint(two_modes, noise[0], torch.ones(8, 8), noise[0], "H2")
