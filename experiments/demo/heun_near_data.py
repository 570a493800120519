"""Why Heun is a weak baseline on the demo base: its last corrector evaluates at t = 1.

On data with exactly constant pixels (the digits' background is -1), the exact velocity near the
data end is (E[x1 | x_t] - x_t) / (1 - t): in the background, a straight line to -1 whose
slope reacts to a change of x_t by 1 / (1 - t). The field stiffens as t -> 1, and every Heun
step's corrector evaluates it at the step's end time, the last one at t = 1, where an error of
the predictor is multiplied by about h/2 |dv/dx|.

Prints, for 64 images (seed 0) and errors as RMS distance to Heun-64 from the same noise:
- the share of background pixels (below -0.95) in the Heun-64 images;
- the error of 8- and 6-step plans that differ only in their last step (H Heun, E Euler,
  M midpoint; E and M never evaluate at t = 1);
- the base's sensitivity |v(x + d, t) - v(x, t)| / |d| for small random d (RMS 1e-3) at states
  on the Heun-64 path at time t.

    python experiments/demo/heun_near_data.py > experiments/demo/heun_near_data.txt
"""

import torch

from flowturbo.assets import asset_path
from flowturbo.models import build_from_checkpoint
from flowturbo.sampling import BASELINES, integrate, plan_nfe


def rms(a, b):
    return float((a.double() - b.double()).pow(2).mean().sqrt())


torch.manual_seed(0)
base = build_from_checkpoint(asset_path("demo_base.pt")).float().eval()
noise, y = torch.randn(64, 1, 32, 32), torch.arange(64) % 10
heun = BASELINES["heun"]
with torch.no_grad():
    ref = heun(base, noise, 64, y=y)
    print("demo_base.pt, 64 images, errors: RMS distance to Heun-64 from the same noise")
    background = float((ref < -0.95).float().mean())
    print(f"pixels of the Heun-64 images below -0.95 (background): {background:.3f}")
    print(f"{'plan':10} {'NFE':>4} {'error':>8}")
    plans = ["HHHHHHHH", "HHHHHHHE", "HHHHHHHM", "MMMMMMMM", "MMMMMMMH"]
    for plan in [*plans, "HHHHHH", "HHHHHE", "MMMMMM"]:
        error = rms(integrate(plan, base, noise, y=y), ref)
        print(f"{plan:10} {plan_nfe(plan)[0]:4d} {error:8.4f}")

    print("\nsensitivity of the base's velocity on the path (1 / (1 - t) for comparison)")
    g = torch.Generator().manual_seed(1)
    for t in (0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0):
        path = torch.linspace(0, t, 65)
        xt = integrate("H" * 64, base, noise, y=y, timesteps=path) if t > 0 else noise
        tt = torch.full((64,), t)
        v = base(xt, tt, y=y)
        d = 1e-3 * torch.randn(xt.shape, generator=g)
        sensitivity = rms(base(xt + d, tt, y=y), v) / rms(d, 0 * d)
        inverse = f"{1 / (1 - t):7.1f}" if t < 1 else "    inf"
        print(f"t = {t:4}: |dv| / |dx| = {sensitivity:5.1f}   1 / (1 - t) = {inverse}")
