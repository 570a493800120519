"""Inpainting with P and R steps needs the cached velocity on the known pixels' path.

The two-mode flow of tests/test_edit.py (8x8 images: a random pattern or its negative, plus
N(0, 0.3^2) per pixel; exact velocity, exact refiner R = V - v). The right half of 512 images
is generated from the left half, whose mode is certain. For each schedule: the fraction of
completions in the left half's mode, and the RMS distance to Euler-256 inpainting from the same
noise, with ``flowturbo.sampling.inpaint`` (known pixels and the cached velocity put back on
the path after every step) and with the known pixels alone put back.

    python experiments/edit/inpaint_cache.py > experiments/edit/inpaint_cache.txt
"""

import torch

from flowturbo.flow.analytic import ExactRefiner, GaussianMixtureFlow
from flowturbo.sampling import inpaint, integrate, parse_schedule

g = torch.Generator().manual_seed(0)
pattern = torch.randn(1, 1, 8, 8, generator=g, dtype=torch.float64)
flow = GaussianMixtureFlow(torch.cat([pattern, -pattern]), torch.tensor([0.3, 0.3]))
refiner = ExactRefiner(flow)
n = 512
sign = (1 - 2 * (torch.arange(n) % 2)).double().view(-1, 1, 1, 1)
image = sign * pattern + 0.3 * torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
noise = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
mask = torch.zeros(1, 1, 8, 8)
mask[..., 4:] = 1  # generate the right half


def pixels_only(schedule):
    """Replacement of the known pixels alone; the cache keeps the model's velocity."""

    def constrain(x, c, t):
        return mask * x + (1 - mask) * (t * image + (1 - t) * noise), c

    plan = parse_schedule(schedule).plan
    return integrate(plan, flow, noise, refiner=refiner, constrain=constrain)


def describe(out, reference):
    right = out[..., 4:]
    own = (right - sign * pattern[..., 4:]).pow(2).mean((1, 2, 3))
    other = (right + sign * pattern[..., 4:]).pow(2).mean((1, 2, 3))
    consistent = float((own < other).double().mean())
    error = float((out - reference).pow(2).mean().sqrt())
    return f"{consistent:10.3f} {error:9.4f}"


reference = inpaint(flow, image, mask, noise, "E256")
print(f"{n} images, right half generated; reference: Euler-256 inpainting, same noise")
print(f"{'':8} {'known pixels and cache':>20} | {'known pixels only':>20}")
print(f"{'schedule':8} {'consistent':>10} {'RMS':>9} | {'consistent':>10} {'RMS':>9}")
for schedule in ["H4", "H8", "H1P3", "H1P5", "H1P7", "H1P3R2", "H2P4R2"]:
    ours = describe(inpaint(flow, image, mask, noise, schedule, refiner=refiner), reference)
    print(f"{schedule:8} {ours} | {describe(pixels_only(schedule), reference)}")
