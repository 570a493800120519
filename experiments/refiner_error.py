"""Held-out one-step velocity error of trained refiners, against keeping the velocity unchanged.

For each refiner file, on two fixed held-out sets of examples (the same for every refiner):

- interpolant: the demo validation digits, x_t on the path, v = V(x_t, t), one step dt along v
  (the refiner's second call in an R step);
- trajectory: pairs of points of held-out cached base trajectories at most dt_max apart, the
  earlier velocity given (the refiner's first call in an R step);

it reports MSE(R(x', t', v), V(x', t') - v) and the same with R = 0 (the cached velocity used
unchanged), and their ratio (< 1: the refiner helps). Each example's noise, time and step are
drawn from its sample's id, as in training's validation; ``--draws K`` repeats the measurement
with K different draws (ids offset by k * 2**48) and reports the spread of the ratio, to show
how much of a difference between two figures is the draw.

    python experiments/refiner_error.py --refiners checkpoints/demo_refiner/ema.pt \\
        checkpoints/demo_refiner_traj/ema.pt --trajectories trajectories/demo/val
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch

from flowturbo.assets import asset_path
from flowturbo.cli import positive_int
from flowturbo.data import ShardDataModule
from flowturbo.eval.atomic import atomic_path
from flowturbo.flow import refiner_loss
from flowturbo.lit import RefinerModule, load_frozen_base
from flowturbo.models import build_from_checkpoint


@torch.no_grad()
def errors(module: RefinerModule, loader, refiner, draw: int = 0) -> dict:
    total = {"refined": 0.0, "unrefined": 0.0, "n": 0}
    for x, y, ids in loader:  # each example's randomness drawn from its sample's id
        examples, kw = module.examples(x, y, ids + draw * 2**48)
        n = examples.x.shape[0]
        total["refined"] += float(refiner_loss(refiner, examples, **kw)) * n
        total["unrefined"] += float(examples.target.float().pow(2).mean()) * n
        total["n"] += n
    mse, base = total["refined"] / total["n"], total["unrefined"] / total["n"]
    return {"mse_refined": mse, "mse_unrefined": base, "ratio": mse / base, "examples": total["n"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=asset_path("demo_base.pt"))
    p.add_argument("--refiners", nargs="+", required=True)
    p.add_argument("--trajectories", default="trajectories/demo/val")
    p.add_argument("--dt-max", type=float, default=0.12)
    p.add_argument("--samples", type=positive_int, default=512, help="held-out samples per set")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--draws", type=positive_int, default=1, help="noise draws per set")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if not 0 < args.dt_max <= 1:
        p.error(f"--dt-max must be in (0, 1], got {args.dt_max}")
    missing = [f for f in (args.base, *args.refiners) if not Path(f).is_file()]
    if missing:
        p.error(f"checkpoint file(s) not found: {', '.join(map(str, missing))}")
    if args.out is not None and Path(args.out).is_dir():
        p.error(f"--out {args.out} is a folder; give the JSON file to write")

    torch.manual_seed(0)
    base = functools.partial(load_frozen_base, args.base)
    sets = {
        "interpolant": ShardDataModule(
            source="demo", val_batch_size=args.batch_size, num_workers=0, val_samples=args.samples
        ),
        "trajectory": ShardDataModule(
            val_shards=args.trajectories,
            kind="trajectory",
            val_batch_size=args.batch_size,
            num_workers=0,
            val_samples=args.samples,
        ),
    }
    results = {}
    for path in args.refiners:
        refiner = build_from_checkpoint(path)
        row = {}
        for target, data in sets.items():
            data.setup("validate")
            module = RefinerModule(
                refiner, base, torch.optim.AdamW, target=target, dt_max=args.dt_max
            )
            module.setup("validate")
            if module._base is not None:
                module.base.eval()
            draws = [errors(module, data.val_dataloader(), refiner, k) for k in range(args.draws)]
            row[target] = {**draws[0], "ratio_draws": [d["ratio"] for d in draws]}
        results[path] = row
        for target, r in row.items():
            spread = r["ratio_draws"]
            print(
                f"{path} [{target}]: refined {r['mse_refined']:.5f}, unrefined "
                f"{r['mse_unrefined']:.5f}, ratio {r['ratio']:.3f} ({r['examples']} examples)"
                + (
                    f"; {len(spread)} draws: {min(spread):.3f}-{max(spread):.3f}"
                    if args.draws > 1
                    else ""
                )
            )
    if args.out:
        with atomic_path(args.out) as tmp:  # parent folders created
            tmp.write_text(json.dumps({"settings": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
