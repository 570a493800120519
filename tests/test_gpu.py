"""GPU-only checks (skipped without CUDA): CUDA-graph compiled sampling equals eager, per step
kind and as one graph of the whole sampler."""

import pytest
import torch

from flowturbo.models import SiT, VelocityRefiner
from flowturbo.sampling import ClassifierFreeGuidance, sample

pytestmark = pytest.mark.gpu


def _tiny_pair():
    torch.manual_seed(0)
    base = SiT.from_name("SiT-Tiny/2", in_channels=4, num_classes=10).cuda().eval()
    refiner = VelocityRefiner.from_base(base).cuda().eval()
    for net in (base, refiner):  # non-zero heads so outputs are not trivially 0
        for p in net.final_layer.parameters():
            torch.nn.init.normal_(p, std=0.02)
    return ClassifierFreeGuidance(base, 1.5, 10), ClassifierFreeGuidance(refiner, 1.5, 10)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_sampling_equals_eager(dtype):
    v, r = _tiny_pair()
    noise = torch.randn(8, 4, 32, 32, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        eager = sample(v, noise, "H2P4R2", refiner=r, y=y)
        first = sample(v, noise, "H2P4R2", refiner=r, compile=True, y=y)
        second = sample(v, noise * 0.5, "H2P4R2", refiner=r, compile=True, y=y)
        again = sample(v, noise, "H2P4R2", refiner=r, compile=True, y=y)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(first.float(), eager.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(again, first)  # a replay overwrote no returned tensor
    assert not torch.allclose(second, first)


@torch.no_grad()
def test_a_callback_keeps_what_it_was_given_under_cuda_graphs():
    """A step's CUDA-graph outputs are overwritten by its next replay: a callback that keeps
    the states (a trajectory) must get tensors of its own."""
    v, r = _tiny_pair()
    noise = torch.randn(8, 4, 32, 32, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    kept = {False: [], True: []}
    for compile in (False, True):
        sample(v, noise, "H2P4R2", refiner=r, compile=compile, y=y,
               callback=lambda info, c=compile: kept[c].append(info["x"]))  # fmt: skip
    for eager, compiled in zip(kept[False], kept[True], strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_sampler_cuda_graph_equals_eager(dtype):
    from flowturbo.sampling import compiled_sampler

    v, r = _tiny_pair()
    decoder = torch.nn.Conv2d(4, 3, 3, padding=1).cuda().eval()  # stands in for the VAE
    noise = torch.randn(8, 4, 32, 32, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        eager = decoder(sample(v, noise, "H2P4R2", refiner=r, y=y))
        run = compiled_sampler("HHPPPPRR", v, noise, refiner=r, decode=decoder, y=y)
        assert run.graph is not None  # recorded, not the uncaptured fallback
        first = run(noise, y=y)
        second = run(noise * 0.5, y=y.flip(0))
        again = run(noise, y=y)
        via_sample = sample(v, noise, "H2P4R2", refiner=r, compile="sampler", y=y)
        plain = sample(v, noise, "H2P4R2", refiner=r, y=y)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(first.float(), eager.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(again, first)  # a replay overwrote no returned tensor
    assert not torch.allclose(second, first)
    torch.testing.assert_close(via_sample.float(), plain.float(), rtol=tol, atol=tol)


@torch.no_grad()
def test_a_graph_recorded_under_autocast_replays_after_the_region_ends():
    """Weights that require grad get cached bf16 copies under autocast; the recorded graph must
    not read them after the caller's autocast region has freed them."""
    from flowturbo.sampling import CompiledSampler

    v, r = _tiny_pair()
    for net in (v.fn, r.fn):
        net.requires_grad_(True)
    noise = torch.randn(8, 4, 32, 32, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = sample(v, noise, "H2P4R2", refiner=r, y=y)
        run = CompiledSampler("HHPPPPRR", v, noise, refiner=r, compile=False, y=y)
    assert run.graph is not None
    churn = [torch.randn(1 << 20, device="cuda") for _ in range(64)]  # reuse freed memory
    replayed = run(noise, y=y)
    del churn
    torch.testing.assert_close(replayed.float(), eager.float(), rtol=5e-2, atol=5e-2)


@torch.no_grad()
def test_compiled_inpainting_on_cuda_keeps_the_known_latents():
    """A pixel mask made on the CPU drives inpainting of CUDA latents, compiled per step kind."""
    from flowturbo.sampling import inpaint

    v, r = _tiny_pair()
    latents = torch.randn(4, 4, 32, 32, device="cuda")
    noise = torch.randn(4, 4, 32, 32, device="cuda")
    y = torch.randint(0, 10, (4,), device="cuda")
    pixels = torch.zeros(1, 1, 256, 256)
    pixels[..., 128:, :] = 1  # regenerate the bottom half of 256 px images
    eager = inpaint(v, latents, pixels, noise, "H1P3R2", refiner=r, y=y)
    compiled = inpaint(v, latents, pixels, noise, "H1P3R2", refiner=r, compile=True, y=y)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled[..., :16, :], latents[..., :16, :], rtol=0, atol=1e-6)
    assert not torch.allclose(compiled[..., 16:, :], latents[..., 16:, :])


def test_generate_py_on_one_gpu_matches_the_cpu(generate_cfg, tmp_path):
    """generate.py's job on CUDA (compiled steps, CUDA graphs) writes what the CPU writes,
    up to a grey level on a few pixels."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from flowturbo.generate import generate_images

    on_gpu = ["trainer=gpu", "trainer.devices=1", "sampler.compile=true"]
    outs = {}
    for device, extra in (("cpu", []), ("cuda", on_gpu)):
        cfg = generate_cfg(tmp_path / device, "sampler.schedule=H1P2R2", "num_images=16", *extra)
        outs[device] = Path(generate_images(cfg)["out_dir"])
    for f in sorted((outs["cpu"] / "images").glob("*.png")):
        a = np.asarray(Image.open(f)).astype(int)
        b = np.asarray(Image.open(outs["cuda"] / "images" / f.name)).astype(int)
        assert np.abs(a - b).max() <= 2 and (a != b).mean() < 0.05
