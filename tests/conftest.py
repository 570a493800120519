import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
CONF = str(Path(__file__).resolve().parents[1] / "conf")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Folder with base.pt and refiner.pt: SiT-Tiny/4 on 1 x 32 x 32 images, 3 classes, every
    weight random (SiT starts with zero heads, a velocity of 0)."""
    from flowturbo.models import SiT, VelocityRefiner, save_checkpoint

    d = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    base = SiT.from_name(
        "SiT-Tiny/4", input_size=32, in_channels=1, num_classes=3, learn_sigma=False
    )
    refiner = VelocityRefiner.from_base(base)
    with torch.no_grad():
        for p in [*base.parameters(), *refiner.parameters()]:
            p.normal_(0, 0.05)
    save_checkpoint(base, d / "base.pt")
    save_checkpoint(refiner, d / "refiner.pt")
    return d


@pytest.fixture(scope="session")
def tiny_latent_model(tmp_path_factory):
    """Folder with a latent base.pt (SiT-Tiny/4 on 4 x 8 x 8 latents, 3 classes) and vae/, a
    two-level diffusers AutoencoderKL (random weights) whose images are 3 x 16 x 16."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    from flowturbo.models import SiT, save_checkpoint

    d = tmp_path_factory.mktemp("tiny_latent_model")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 32),  # two levels: images are 2x the latents
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    )
    vae.save_pretrained(d / "vae")
    save_checkpoint(
        SiT.from_name("SiT-Tiny/4", input_size=8, in_channels=4, num_classes=3), d / "base.pt"
    )
    return d


@pytest.fixture(scope="session")
def generate_cfg(tiny_models):
    """``generate_cfg(out_dir, *overrides)``: conf/generate.yaml composed for the tiny models
    (one thread, no progress bar, batches of 4); later overrides win."""
    from hydra import compose, initialize_config_dir

    def compose_generate(out_dir, *overrides):
        common = [
            f"model.base_ckpt={tiny_models / 'base.pt'}",
            f"model.refiner_ckpt={tiny_models / 'refiner.pt'}",
            "vae=null",
            f"out_dir={out_dir}",
            "threads=1",
            "progress=false",
            "sampler.batch_size=4",
        ]
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return compose("generate", overrides=[*common, *overrides])

    return compose_generate
