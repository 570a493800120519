r"""Sampler latency: ms per image, eager and compiled, for a few schedules.

CPU (default): the demo SiT (SiT-Demo/4 on 1x32x32 digits, the shipped demo base's size) and
SiT-S/2 (4x32x32 latent).
GPU: SiT-XL/2 at 256 px (4x32x32 latent), bf16 autocast, batch 1, 8 and 64. Random weights: the
latency does not depend on them. Classifier-free guidance (scale 1.5, all channels) doubles each
evaluation's batch, as in the paper's setting.

Modes: ``eager``; ``compiled``, each step kind compiled (``sample(..., compile=True)``, CUDA
graphs per step on a GPU); ``sampler``, the whole loop as one static program
(``compiled_sampler``, one CUDA graph on a GPU). ``--decode`` adds the SD VAE decoder (its
architecture, random weights; needs diffusers) to every mode; without it decoding is excluded.

    python benchmarks/bench_sampler.py
    python benchmarks/bench_sampler.py --models SiT-XL/2 --batch 1 8 64 --dtype bf16 --decode \
        --repeats 20

Prints a markdown table and writes it, with every setting, as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch

from flowturbo.cli import non_negative_int, positive_int
from flowturbo.eval.atomic import atomic_path
from flowturbo.eval.latency import measure_latencies
from flowturbo.models import SiT, VelocityRefiner
from flowturbo.sampling import (
    ClassifierFreeGuidance,
    compiled_sampler,
    decode_latents,
    parse_schedule,
    sample,
)
from flowturbo.sampling.compile import compiled_function, compiled_steps, default_compile_options
from flowturbo.sampling.graph import fell_back
from flowturbo.sampling.steps import step_kinds

# name -> (in_channels, num_classes): the data each model works on
MODELS = {
    "SiT-Demo/4": (1, 10),
    "SiT-Demo/2": (1, 10),
    "SiT-S/2": (4, 1000),
    "SiT-B/2": (4, 1000),
    "SiT-XL/2": (4, 1000),
}


def bench_model(
    name: str, batch: int, args: argparse.Namespace, device: torch.device
) -> Iterator[dict]:
    """Times the forwards, then yields one row per schedule as soon as it is measured."""
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
    decode = sd_vae_decoder(device) if args.decode else None

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()

    def timed_together(fns: dict) -> dict:  # interleaved rounds: fair ratios between them
        with torch.no_grad(), autocast():
            return measure_latencies(
                fns, batch=batch, device=device, warmup=args.warmup, repeats=args.repeats
            )

    v, t = torch.randn_like(noise), torch.rand(batch, device=device)
    forwards = {"base": lambda: g_base(noise, t, y=y), "refiner": lambda: g_ref(noise, t, v, y=y)}
    if decode is not None:
        forwards["decode"] = lambda: decode(noise)
    forwards = timed_together(forwards)
    fwd_base, fwd_ref, fwd_decode = forwards["base"], forwards["refiner"], forwards.get("decode")
    print(
        f"{name} batch {batch}: base forward {fwd_base.median_ms:.2f} ms, "
        f"refiner forward {fwd_ref.median_ms:.2f} ms "
        f"({fwd_ref.median_ms / fwd_base.median_ms:.1%}); "
        f"params {sum(p.numel() for p in base.parameters()) / 1e6:.1f} M / "
        f"{sum(p.numel() for p in refiner.parameters()) / 1e6:.2f} M"
        + (f"; VAE decode {fwd_decode.median_ms:.2f} ms" if fwd_decode else ""),
        flush=True,
    )
    for schedule in args.schedules:
        s = parse_schedule(schedule)
        forward_sum = s.base_nfe * fwd_base.median_ms + s.refiner_nfe * fwd_ref.median_ms
        forward_sum += fwd_decode.median_ms if fwd_decode else 0.0
        row = {
            "model": name,
            "schedule": s.text,
            "batch": batch,
            "base_nfe": s.base_nfe,
            "refiner_nfe": s.refiner_nfe,
            "forward_sum_ms_per_img": forward_sum / batch,
            "base_forward_ms": fwd_base.median_ms,  # one guided call on the whole batch
            "refiner_forward_ms": fwd_ref.median_ms,
            "decode_ms": fwd_decode.median_ms if fwd_decode else None,
            "decode": bool(decode),
        }
        calls = {m: sampler_call(m, s, g_base, g_ref, noise, y, decode) for m in args.modes}
        for mode, lat in timed_together(calls).items():
            row[f"{mode}_ms_per_img"] = lat.ms_per_image
            row[f"{mode}_min_ms_per_img"] = lat.min_ms / batch
        # a compiled mode that fell back to eager (one warning) timed eager code: say so
        if "compiled" in args.modes:
            steps = compiled_steps(default_compile_options(device))
            row["compiled_fell_back"] = any(steps[k].failed for k in step_kinds(s.plan))
        if "sampler" in args.modes:
            row["sampler_fell_back"] = fell_back(g_base)
        fallbacks = [m for m in ("compiled", "sampler") if row.get(f"{m}_fell_back")]
        print(
            "  "
            + f"{s.text:>8}: "
            + ", ".join(f"{m} {row[f'{m}_ms_per_img']:.2f}" for m in args.modes)
            + f" ms/img (sum of forwards {row['forward_sum_ms_per_img']:.2f})"
            + (f"; FELL BACK TO EAGER: {', '.join(fallbacks)}" if fallbacks else ""),
            flush=True,
        )
        yield row


def sampler_call(mode, schedule, model, refiner, noise, y, decode):
    """The call timed for one mode: sampling plus, with ``decode``, decoding."""
    if mode == "sampler":  # built by the first (warm-up) call, under the caller's autocast
        plan = schedule.plan
        return lambda: compiled_sampler(plan, model, noise, refiner=refiner, decode=decode, y=y)(
            noise, y=y
        )
    compile_ = mode == "compiled"
    if decode is not None and compile_:
        decode = compiled_function(decode, {"dynamic": False})

    def call():
        x = sample(model, noise, schedule, refiner=refiner, compile=compile_, y=y)
        return x if decode is None else decode(x)

    return call


def sd_vae_decoder(device: torch.device):
    """The SD VAE's decoder (sd-vae-ft-ema architecture, random weights) as ``z -> images``."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise SystemExit("--decode needs diffusers: pip install -e '.[vae]'") from e
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=256,
    )
    vae = vae.to(device).eval().requires_grad_(False)
    return lambda z: decode_latents(z, vae)


def write_results(out: Path, machine: dict, args: argparse.Namespace, rows: list[dict]) -> None:
    """Writes the rows so far, with the machine and every setting, as JSON (atomically)."""
    payload = {"machine": machine, "settings": vars(args) | {"out": str(out)}, "rows": rows}
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    on_gpu = torch.cuda.is_available()
    p.add_argument(
        "--models", nargs="+", default=["SiT-XL/2"] if on_gpu else ["SiT-Demo/4", "SiT-S/2"]
    )
    p.add_argument("--batch", nargs="+", type=positive_int, default=[1, 8, 64] if on_gpu else [8])
    p.add_argument("--schedules", nargs="+", default=["H8", "H1P7", "H2P4R3", "H1P5R3"])
    p.add_argument(
        "--modes",
        nargs="+",
        default=["eager", "compiled", "sampler"],
        choices=["eager", "compiled", "sampler"],
    )
    p.add_argument("--decode", action="store_true", help="include the SD VAE decode (latents)")
    p.add_argument(
        "--dtype", default="bf16" if on_gpu else "fp32", choices=["fp32", "bf16", "fp16"]
    )
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--warmup", type=non_negative_int, default=2)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = p.parse_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    if args.decode and any(MODELS[m][0] != 4 for m in args.models):
        p.error("--decode decodes 4-channel latents: use it with latent (4-channel) models only")
    for schedule in args.schedules:
        try:
            parse_schedule(schedule)
        except ValueError as e:
            p.error(f"--schedules: {e}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device {args.device!r}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here (use --device cpu)")
    if args.out is not None and args.out.is_dir():
        p.error(f"--out {args.out} is a folder; give the JSON file to write")
    if args.warmup < 1 and {"compiled", "sampler"} & set(args.modes):
        p.error("--warmup 0 would time the compilation: give --warmup >= 1 with compiled modes")
    machine = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    print(f"machine: {machine}; dtype {args.dtype}; cfg {args.cfg}; repeats {args.repeats}")
    rows = []
    for name in args.models:
        for batch in args.batch:
            for row in bench_model(name, batch, args, device):
                rows.append(row)
                if args.out:  # after every row: a run stopped early keeps what it measured
                    write_results(args.out, machine, args, rows)

    cols = ["model", "batch", "schedule", "base_nfe", "refiner_nfe", "forward_sum_ms_per_img"]
    cols += [f"{m}_ms_per_img" for m in args.modes]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print(
            "| "
            + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols)
            + " |"
        )


if __name__ == "__main__":
    main()
