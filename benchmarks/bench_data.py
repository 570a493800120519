"""Data-pipeline throughput: images/s and batches/s read from shards by ShardDataModule.

Two shard sets: the MNIST demo pixels (PNG decode, 1 x 32 x 32) and latent shards of random
float16 arrays (``latent.npy`` + ``latent_flip.npy``, 4 x 32 x 32 by default, written with
``write_sample_shards``). Each is read as a training stream (resampled shards, shuffle buffer,
decode, batch) and as one exact validation pass over the same shards (the demo's 4,500 training
digits), with each requested worker count. The first ``--warmup`` training batches (worker
start, shuffle-buffer fill) and the first validation pass are not timed.

    python benchmarks/bench_data.py                     # 0 and 2 workers
    python benchmarks/bench_data.py --workers 0 4 8 --batch-size 256 --batches 100
    python benchmarks/bench_data.py --out experiments/data/cpu_2workers.json   # also as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from flowturbo.cli import non_negative_int, positive_int
from flowturbo.data import ShardDataModule, demo_shards, write_sample_shards
from flowturbo.eval.atomic import atomic_path


def _latent_shards(out: Path, n: int, shape: tuple[int, ...], shard_size: int) -> Path:
    rng = np.random.default_rng(0)

    def samples() -> Iterable[tuple[str, dict]]:
        for i in range(n):
            z = rng.standard_normal((2, *shape), dtype=np.float32).astype(np.float16)
            yield f"{i:07d}", {"latent.npy": z[0], "latent_flip.npy": z[1], "cls": i % 1000}

    write_sample_shards(samples(), out, shard_size=shard_size, kind="latent", progress=False)
    return out


def _time(batches: Iterable[tuple[torch.Tensor, ...]], warmup: int) -> tuple[int, int, float]:
    """(timed batches, timed samples, seconds) after ``warmup`` batches."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    n_batches = n_samples = 0
    start = time.perf_counter()
    for batch in it:  # (x, y), or (x, y, ids) in validation
        n_batches += 1
        n_samples += len(batch[1])
    return n_batches, n_samples, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=non_negative_int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--batches", type=positive_int, default=60, help="timed training batches")
    parser.add_argument("--warmup", type=non_negative_int, default=5)
    parser.add_argument("--shuffle-buffer", type=positive_int, default=1000)
    parser.add_argument("--cache-dir", default=None, help="demo cache root (default: a temp dir)")
    parser.add_argument("--latent-samples", type=positive_int, default=8192)
    parser.add_argument("--latent-shape", type=positive_int, nargs=3, default=[4, 32, 32])
    parser.add_argument("--shard-size", type=positive_int, default=1000)
    parser.add_argument("--out", help="also write the table as JSON here")
    args = parser.parse_args(argv)
    if args.out is not None and Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a folder; give the JSON file to write")

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache_dir) if args.cache_dir else Path(tmp) / "cache"
        start = time.perf_counter()
        demo = demo_shards(cache)
        print(f"demo shards ready in {time.perf_counter() - start:.1f} s: {demo}")
        start = time.perf_counter()
        latents = _latent_shards(
            Path(tmp) / "latents", args.latent_samples, tuple(args.latent_shape), args.shard_size
        )
        print(f"latent shards written in {time.perf_counter() - start:.1f} s")
        sets = {
            "demo pixels 1x32x32 (PNG)": dict(
                train_shards=str(demo / "train"), val_shards=str(demo / "train"), channels=1
            ),
            f"latents {'x'.join(map(str, args.latent_shape))} (fp16 npy)": dict(
                train_shards=str(latents), val_shards=str(latents), kind="latent"
            ),
        }
        machine = {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        }
        print(
            f"\nmachine: {machine['cpu']}, {machine['cpus']} CPUs, torch {machine['torch']}; "
            f"batch {args.batch_size}, {args.batches} timed batches"
        )
        rows = []
        print(f"{'data':32s} {'pass':6s} {'workers':>7s} {'images/s':>10s} {'batches/s':>10s}")
        for name, kwargs in sets.items():
            for workers in args.workers:
                dm = ShardDataModule(
                    batch_size=args.batch_size,
                    num_workers=workers,
                    shuffle_buffer=args.shuffle_buffer,
                    steps_per_epoch=args.warmup + args.batches,
                    **kwargs,
                )
                dm.setup("fit")
                train, val = dm.train_dataloader(), dm.val_dataloader()
                for _ in val:  # start the workers; the second pass is timed
                    pass
                for split, loader, warmup in (("train", train, args.warmup), ("val", val, 0)):
                    n_batches, n_samples, seconds = _time(loader, warmup)
                    rows.append(
                        dict(
                            data=name,
                            split=split,
                            workers=workers,
                            images_per_s=n_samples / seconds,
                            batches_per_s=n_batches / seconds,
                            batches_timed=n_batches,
                        )
                    )
                    print(
                        f"{name:32s} {split:6s} {workers:7d} {n_samples / seconds:10.0f} "
                        f"{n_batches / seconds:10.1f}"
                    )
                dm.teardown("fit")
    if args.out:
        payload = {"settings": vars(args), "machine": machine, "rows": rows}
        with atomic_path(args.out) as tmp:  # parent folders created
            tmp.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
