"""Why Heun is a weak baseline on the demo base: the velocity field near t = 1.

Near the data end the exact velocity is v(x, t) = (E[x1 | x_t] - x_t) / (1 - t), and at t = 1
it is v(x, 1) = x (the noise is independent of the data). Prints, for 64 final states of a
Heun-64 solution, how far the base's v(x, t) is from x for t near 1, and the RMS error (to
Heun-64 from the same noise) of Heun, midpoint (never evaluates near t = 1 with a coarse step)
and Heun with the base's v at exactly t = 1 replaced by the exact v(x, 1) = x (against its own
Heun-64 solution).

    python experiments/demo/heun_near_data.py > experiments/demo/heun_near_data.txt
"""

import torch

from flowturbo.assets import asset_path
from flowturbo.models import build_from_checkpoint
from flowturbo.sampling import BASELINES


def rms(a, b):
    return float((a.double() - b.double()).pow(2).mean().sqrt())


class ExactAtOne(torch.nn.Module):
    """The base, except v(x, 1) = x, the exact velocity at t = 1."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x, t, y):
        return torch.where((t >= 1).view(-1, 1, 1, 1), x, self.base(x, t, y=y))


torch.manual_seed(0)
base = build_from_checkpoint(asset_path("demo_base.pt")).float().eval()
noise, y = torch.randn(64, 1, 32, 32), torch.arange(64) % 10
heun, midpoint = BASELINES["heun"], BASELINES["midpoint"]
with torch.no_grad():
    ref = heun(base, noise, 64, y=y)
    print("demo_base.pt, 64 images, references: Heun-64 from the same noise (float32)")
    for t in (1.0, 0.99, 0.95, 0.9):
        v = base(ref, torch.full((64,), t), y=y)
        print(f"t = {t}: RMS(v(x, t) - x) = {rms(v, ref):.4f}, RMS(v) = {rms(v, 0 * v):.4f}")
    exact = ExactAtOne(base)
    ref_exact = heun(exact, noise, 64, y=y)
    for n in (4, 6, 8):
        print(
            f"{2 * n} NFE: Heun-{n} {rms(heun(base, noise, n, y=y), ref):.4f}, "
            f"midpoint-{n} {rms(midpoint(base, noise, n, y=y), ref):.4f}, "
            f"Heun-{n} with exact v(x, 1) {rms(heun(exact, noise, n, y=y), ref_exact):.4f}"
        )
