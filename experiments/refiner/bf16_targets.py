"""How exact the refiner's interpolant targets are when the base runs under bfloat16 autocast.

The target delta = V(x', t') - v is a small difference of two base velocities. This computes
it for 64 held-out demo digits (seed 0, dt_max 0.12) with the shipped demo base twice, in
float32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)``, and prints the RMS of the
target and of the difference. Usage: ``python experiments/refiner/bf16_targets.py``.
"""

import torch

from flowturbo.assets import asset_path
from flowturbo.eval.digits import load_demo_split
from flowturbo.flow import interpolant_refiner_batch, sample_step_sizes
from flowturbo.lit import load_frozen_base


def rms(t: torch.Tensor) -> float:
    return t.float().pow(2).mean().sqrt().item()


def main() -> None:
    torch.manual_seed(0)
    base = load_frozen_base(str(asset_path("demo_base.pt"))).float()
    images, labels = load_demo_split("val")
    x1 = images[:64, None].float() / 127.5 - 1
    y = labels[:64].long()
    x0, t = torch.randn_like(x1), torch.rand(64)
    dt = sample_step_sizes(t, 0.12, torch.rand(64))
    kw = dict(y=y, force_drop_ids=torch.zeros_like(y))
    with torch.no_grad():
        exact = interpolant_refiner_batch(base, x1, x0, t, dt, **kw).target
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = interpolant_refiner_batch(base, x1, x0, t, dt, **kw).target
    error = rms(rounded.float() - exact)
    print(f"RMS of the target in float32: {rms(exact):.4f}")
    print(
        f"under bf16 autocast ({rounded.dtype}): RMS error {error:.4f}, "
        f"{100 * error / rms(exact):.1f} % of the target"
    )


if __name__ == "__main__":
    main()
