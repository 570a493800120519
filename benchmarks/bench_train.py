"""Refiner training throughput: examples/s with interpolant and with trajectory-cache targets.

Both modes run the real ``RefinerModule`` under a Lightning ``Trainer`` on the same refiner and
hardware; only the source of the examples differs:

- interpolant: batches of data (B, C, H, W); every example costs two frozen-base forward passes
  (no gradients) besides the refiner's forward and backward;
- trajectory: batches of cached trajectories (B, 2, K, C, H, W); no base evaluation.

The data are random tensors already in memory, so the figures are the model side of training
(the data pipeline is measured by ``bench_data.py``). The base's weights are random: its cost
does not depend on them. The first ``--warmup`` steps are not timed.

    python benchmarks/bench_train.py                                  # demo size, CPU
    python benchmarks/bench_train.py --model SiT-XL/2 --channels 4 --classes 1000 \\
        --learn-sigma --batch-size 18 --precision bf16-mixed --accelerator gpu  # the paper's

With ``--precision bf16-mixed`` the base makes the targets in float32 unless
``--base-autocast`` is given (``model.base_autocast``); time both to see what exact targets
cost.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import platform
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from flowturbo.cli import non_negative_int, positive_int
from flowturbo.eval.atomic import atomic_path
from flowturbo.lit import RefinerModule
from flowturbo.models import SIT_CONFIGS, SiT, VelocityRefiner


class StepTimer(L.Callback):
    """Wall time of every training step after the first ``warmup``, synchronised."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.times = warmup, None, []

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._sync(module)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._sync(module)
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self.start)


def run(args: argparse.Namespace, target: str) -> dict:
    torch.manual_seed(0)
    arch = dict(input_size=args.size, in_channels=args.channels, num_classes=args.classes)
    if args.learn_sigma:
        arch["learn_sigma"] = True
    base = SiT.from_name(args.model, **arch).eval().requires_grad_(False)
    refiner = VelocityRefiner.from_base(base, depth=args.refiner_depth)
    steps = args.warmup + args.steps
    n = args.batch_size * steps
    shape = (args.channels, args.size, args.size)
    if target == "interpolant":
        x = torch.randn(n, *shape)
    else:
        x = torch.randn(n, 2, args.grid + 1, *shape, dtype=torch.float16).float()
    y = torch.randint(0, args.classes, (n,))
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size)
    module = RefinerModule(
        refiner,
        (lambda: base) if target == "interpolant" else None,
        functools.partial(torch.optim.AdamW, lr=1e-4),
        target=target,
        base_autocast=args.base_autocast,
    )
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, loader)
    seconds = sorted(timer.times)[len(timer.times) // 2]
    return {
        "target": target,
        "ms_per_step": 1000 * seconds,
        "examples_per_s": args.batch_size / seconds,
        "steps_timed": len(timer.times),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="SiT-Demo/4")
    p.add_argument(
        "--size", type=positive_int, default=32, help="input_size (latent or pixel side)"
    )
    p.add_argument("--channels", type=positive_int, default=1)
    p.add_argument("--classes", type=positive_int, default=10)
    p.add_argument("--learn-sigma", action="store_true")
    p.add_argument("--refiner-depth", type=positive_int, default=1)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument(
        "--grid", type=positive_int, default=30, help="Heun steps of a cached trajectory"
    )
    p.add_argument("--warmup", type=non_negative_int, default=3)
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--precision", default="32-true")
    p.add_argument(
        "--base-autocast",
        action="store_true",
        help="the base makes interpolant targets under --precision (default: in float32)",
    )
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.model not in SIT_CONFIGS:
        p.error(f"--model {args.model!r} unknown; choose from {', '.join(SIT_CONFIGS)}")
    dt_max = inspect.signature(RefinerModule).parameters["dt_max"].default
    if int(dt_max * args.grid + 1e-6) < 1:  # RefinerModule's own condition
        p.error(
            f"--grid {args.grid}: cached points 1/{args.grid} apart exceed the refiner's "
            f"dt_max={dt_max}; use --grid >= {round(1 / dt_max + 0.5)}"
        )
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        p.error("--accelerator gpu: no CUDA device here")
    if args.out is not None and Path(args.out).is_dir():
        p.error(f"--out {args.out} is a folder; give the JSON file to write")

    rows = [run(args, t) for t in ("interpolant", "trajectory")]
    machine = {
        "device": torch.cuda.get_device_name()
        if args.accelerator == "gpu"
        else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(
        f"{args.model} refiner (depth {args.refiner_depth}), batch {args.batch_size}, "
        f"{args.precision}, {machine}"
    )
    for r in rows:
        print(
            f"  {r['target']:>11}: {r['ms_per_step']:8.1f} ms/step  "
            f"{r['examples_per_s']:8.1f} examples/s  ({r['steps_timed']} steps timed)"
        )
    ratio = rows[1]["examples_per_s"] / rows[0]["examples_per_s"]
    print(f"  trajectory / interpolant throughput: {ratio:.2f}x")
    if args.out:
        payload = {"settings": vars(args), "machine": machine, "rows": rows, "ratio": ratio}
        with atomic_path(args.out) as tmp:  # parent folders created
            tmp.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
