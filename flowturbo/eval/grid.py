"""What ``evaluate.py`` runs today: one schedule, a sample grid and its latency."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

from flowturbo.eval.latency import measure_latency
from flowturbo.models import build_from_checkpoint
from flowturbo.sampling import ClassifierFreeGuidance, decode_latents, parse_schedule, sample


def sample_grid(cfg: DictConfig) -> dict:
    """Samples ``cfg.num_images`` with ``cfg.schedule``; writes samples.png and result.json."""
    device = torch.device(cfg.device)
    schedule = parse_schedule(cfg.schedule)
    if schedule.uses_refiner and not cfg.refiner_ckpt:
        raise ValueError(f"schedule {schedule.text} has R steps: set refiner_ckpt=...")
    base = build_from_checkpoint(cfg.base_ckpt).to(device)
    classes = base.num_classes
    v = ClassifierFreeGuidance(base, cfg.cfg_scale, classes)
    r = None
    if schedule.uses_refiner:
        refiner = build_from_checkpoint(cfg.refiner_ckpt).to(device)
        r = ClassifierFreeGuidance(refiner, cfg.cfg_scale, classes)

    g = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.num_images, base.in_channels, base.input_size, base.input_size)
    noise = torch.randn(shape, generator=g).to(device)
    y = (torch.arange(cfg.num_images) % classes).to(device)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return sample(
                v,
                noise,
                schedule,
                refiner=r,
                refiner_input=cfg.refiner_input,
                compile=cfg.compile,
                progress=False,
                y=y,
            )

    images = decode_latents(run())
    latency = measure_latency(
        run, batch=cfg.num_images, device=device, warmup=1, repeats=cfg.latency_repeats
    )
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nrow = min(classes, cfg.num_images)
    save_image((images.float().clamp(-1, 1) + 1) / 2, out / "samples.png", nrow=nrow)
    result = {
        "schedule": schedule.text,
        "base_nfe": schedule.base_nfe,
        "refiner_nfe": schedule.refiner_nfe,
        **latency.as_dict(),
        "settings": OmegaConf.to_container(cfg, resolve=True),
    }
    with tempfile.NamedTemporaryFile("w", dir=out, delete=False, suffix=".json") as f:
        json.dump(result, f, indent=2)
    os.replace(f.name, out / "result.json")
    print(
        f"{schedule.text}: base NFE {schedule.base_nfe}, refiner NFE {schedule.refiner_nfe}, "
        f"{latency.ms_per_image:.2f} ms/img (batch {cfg.num_images}, {device}); {out}"
    )
    return result
