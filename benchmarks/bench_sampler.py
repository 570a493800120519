"""Sampler latency: ms per image, eager and compiled, for a few schedules.

CPU (default): the demo SiT (SiT-Demo/4 on 1x32x32 digits, the shipped demo base's size) and
SiT-S/2 (4x32x32 latent).
GPU: SiT-XL/2 at 256 px (4x32x32 latent), bf16 autocast, batch 8 and 64. Random weights: the
latency does not depend on them. Classifier-free guidance (scale 1.5, all channels) doubles each
evaluation's batch, as in the paper's setting. VAE decoding is not included.

    python benchmarks/bench_sampler.py
    python benchmarks/bench_sampler.py --models SiT-XL/2 --batch 8 64 --dtype bf16 --repeats 20

Prints a markdown table and writes it, with every setting, as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

from flowturbo.eval import measure_latency
from flowturbo.models import SiT, VelocityRefiner
from flowturbo.sampling import ClassifierFreeGuidance, parse_schedule, sample

# name -> (in_channels, num_classes): the data each model works on
MODELS = {
    "SiT-Demo/4": (1, 10),
    "SiT-Demo/2": (1, 10),
    "SiT-S/2": (4, 1000),
    "SiT-B/2": (4, 1000),
    "SiT-XL/2": (4, 1000),
}


def bench_model(name: str, batch: int, args: argparse.Namespace, device: torch.device) -> list:
    in_ch, classes = MODELS[name]
    torch.manual_seed(0)
    base = SiT.from_name(name, in_channels=in_ch, num_classes=classes).to(device).eval()
    refiner = VelocityRefiner.from_base(base).to(device).eval()
    for m in (base, refiner):
        m.requires_grad_(False)
    g_base = ClassifierFreeGuidance(base, args.cfg, classes)
    g_ref = ClassifierFreeGuidance(refiner, args.cfg, classes)
    noise = torch.randn(batch, in_ch, 32, 32, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()

    def timed(fn):
        with torch.no_grad(), autocast():
            return measure_latency(
                fn, batch=batch, device=device, warmup=args.warmup, repeats=args.repeats
            )

    rows = []
    fwd_base = timed(lambda: g_base(noise, torch.rand(batch, device=device), y=y))
    v = torch.randn_like(noise)
    fwd_ref = timed(lambda: g_ref(noise, torch.rand(batch, device=device), v, y=y))
    print(
        f"{name} batch {batch}: base forward {fwd_base.median_ms:.2f} ms, "
        f"refiner forward {fwd_ref.median_ms:.2f} ms "
        f"({fwd_ref.median_ms / fwd_base.median_ms:.1%}); "
        f"params {sum(p.numel() for p in base.parameters()) / 1e6:.1f} M / "
        f"{sum(p.numel() for p in refiner.parameters()) / 1e6:.2f} M",
        flush=True,
    )
    for schedule in args.schedules:
        s = parse_schedule(schedule)
        forward_sum = s.base_nfe * fwd_base.median_ms + s.refiner_nfe * fwd_ref.median_ms
        row = {
            "model": name,
            "schedule": s.text,
            "batch": batch,
            "base_nfe": s.base_nfe,
            "refiner_nfe": s.refiner_nfe,
            "forward_sum_ms_per_img": forward_sum / batch,
        }
        for mode in args.modes:
            compile_ = mode == "compiled"
            lat = timed(
                lambda s=s, c=compile_: sample(g_base, noise, s, refiner=g_ref, compile=c, y=y)
            )
            row[f"{mode}_ms_per_img"] = lat.ms_per_image
            row[f"{mode}_min_ms_per_img"] = lat.min_ms / batch
        rows.append(row)
        print(
            "  "
            + f"{s.text:>8}: "
            + ", ".join(f"{m} {row[f'{m}_ms_per_img']:.2f}" for m in args.modes)
            + f" ms/img (sum of forwards {row['forward_sum_ms_per_img']:.2f})",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    on_gpu = torch.cuda.is_available()
    p.add_argument(
        "--models", nargs="+", default=["SiT-XL/2"] if on_gpu else ["SiT-Demo/4", "SiT-S/2"]
    )
    p.add_argument("--batch", nargs="+", type=int, default=[8, 64] if on_gpu else [8])
    p.add_argument("--schedules", nargs="+", default=["H8", "H1P7", "H2P4R3", "H1P5R3"])
    p.add_argument(
        "--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"]
    )
    p.add_argument(
        "--dtype", default="bf16" if on_gpu else "fp32", choices=["fp32", "bf16", "fp16"]
    )
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = p.parse_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    device = torch.device(args.device)
    machine = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    print(f"machine: {machine}; dtype {args.dtype}; cfg {args.cfg}; repeats {args.repeats}")
    rows = [r for m in args.models for b in args.batch for r in bench_model(m, b, args, device)]

    cols = ["model", "batch", "schedule", "base_nfe", "refiner_nfe", "forward_sum_ms_per_img"]
    cols += [f"{m}_ms_per_img" for m in args.modes]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print(
            "| "
            + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols)
            + " |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "machine": machine,
            "settings": vars(args) | {"out": str(args.out)},
            "rows": rows,
        }
        with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False) as f:
            json.dump(payload, f, indent=2)
        os.replace(f.name, args.out)


if __name__ == "__main__":
    main()
