"""GPU latency of SiT-XL/2 sampling: eager, per-step compiled, whole sampler compiled.

The measurement of the GPU fast path (issue 6): SiT-XL/2 at 256 px with random weights (the
latency does not depend on them), bf16 autocast, classifier-free guidance 1.5 on all channels,
the SD VAE decode included, batch 1 and 8, median of 20 timed calls after warm-up (CUDA events,
synchronised). For each schedule: eager, ``compiled`` (each step kind compiled, CUDA graphs per
step) and ``sampler`` (the whole loop and the decode as one CUDA graph), and the sum of the
measured forward times (base, refiner, decode), so the sampler's own overhead is visible.
With ``--profile``, a torch profiler table of one whole-sampler call per batch size is saved
beside the results: where the time goes, kernel by kernel.

    PYTHONPATH=. python benchmarks/bench_gpu.py --batch 8     # one device call each
    PYTHONPATH=. python benchmarks/bench_gpu.py --batch 1
    PYTHONPATH=. python benchmarks/bench_gpu.py --batch 8 --profile   # a call of its own: it
                                                                      # compiles once more

Results go to experiments/gpu/bench_gpu_b<batch>.json (``--out`` to change); any other option
of bench_sampler.py may follow and overrides the presets (e.g. ``--repeats 50``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_sampler  # noqa: E402

from flowturbo.cli import positive_int  # noqa: E402

PRESET = [
    "--models", "SiT-XL/2",
    # paper pairs first: H8 / H2P4R2 compile every step kind, then the fastest, the slowest
    "--schedules", "H8", "H2P4R2", "H1P5R3", "H8P9R5", "H24",
    "--modes", "eager", "compiled", "sampler",
    "--dtype", "bf16",
    "--cfg", "1.5",
    "--decode",
    "--warmup", "3",
    "--repeats", "20",
]  # fmt: skip


def profile(out: Path, batch: int, schedule: str = "H1P5R3") -> Path:
    """Profiles one whole-sampler call of ``schedule``; writes the top kernels as a table."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from flowturbo.models import SiT, VelocityRefiner
    from flowturbo.sampling import ClassifierFreeGuidance, compiled_sampler, parse_schedule

    torch.manual_seed(0)
    base = SiT.from_name("SiT-XL/2", in_channels=4, num_classes=1000).cuda().eval()
    refiner = VelocityRefiner.from_base(base).cuda().eval()
    v, r = (ClassifierFreeGuidance(m.requires_grad_(False), 1.5, 1000) for m in (base, refiner))
    noise = torch.randn(batch, 4, 32, 32, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    decode = bench_sampler.sd_vae_decoder(torch.device("cuda"))
    plan = parse_schedule(schedule).plan
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        run = compiled_sampler(plan, v, noise, refiner=r, decode=decode, y=y)
        for _ in range(3):
            run(noise, y=y)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run(noise, y=y)
            torch.cuda.synchronize()
    path = out.parent / f"profile_{schedule}_b{batch}.txt"
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    head = f"SiT-XL/2 {schedule} batch {batch}, bf16, cfg 1.5, decode included, one call"
    path.write_text(f"{head}\n\n{table}\n")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--profile", action="store_true", help="save a profiler table per batch")
    p.add_argument("--batch", nargs="+", type=positive_int, default=[1, 8])
    p.add_argument(
        "--out", type=Path, default=None, help="default experiments/gpu/bench_gpu_b<batch>.json"
    )
    known, rest = p.parse_known_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py measures the GPU path: no CUDA device here")
    tag = "_".join(map(str, known.batch))
    out = known.out or Path(f"experiments/gpu/bench_gpu_b{tag}.json")
    batches = [str(b) for b in known.batch]
    bench_sampler.main([*PRESET, "--batch", *batches, "--out", str(out), *rest])
    if known.profile:
        for batch in known.batch:
            print(f"profile written to {profile(out, batch)}", flush=True)


if __name__ == "__main__":
    main()
