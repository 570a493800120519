import json

import pytest
import torch
from omegaconf import OmegaConf

from flowturbo.eval.grid import sample_grid
from flowturbo.models import SiT, VelocityRefiner, save_checkpoint


def test_sample_grid_writes_images_and_latency(tmp_path):
    torch.manual_seed(0)
    base = SiT.from_name("SiT-Tiny/2", input_size=8, in_channels=1, num_classes=3)
    refiner = VelocityRefiner.from_base(base)
    save_checkpoint(base, tmp_path / "base.pt")
    save_checkpoint(refiner, tmp_path / "refiner.pt")
    cfg = OmegaConf.create(
        dict(
            base_ckpt=str(tmp_path / "base.pt"),
            refiner_ckpt=str(tmp_path / "refiner.pt"),
            schedule="H1P2R2",
            refiner_input="d0",
            cfg_scale=1.5,
            num_images=6,
            seed=0,
            compile=False,
            latency_repeats=1,
            device="cpu",
            out_dir=str(tmp_path / "out"),
        )
    )
    result = sample_grid(cfg)
    assert (tmp_path / "out" / "samples.png").is_file()
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["base_nfe"] == 4 and saved["refiner_nfe"] == 4 and saved["batch"] == 6
    assert saved["ms_per_image"] == result["ms_per_image"] > 0
    cfg.refiner_ckpt = None
    with pytest.raises(ValueError, match="refiner_ckpt"):
        sample_grid(cfg)
