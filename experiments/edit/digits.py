"""Inpainting and editing the 500 held-out demo digits with the shipped base and refiner.

Inpainting: the bottom half of every digit (rows 16-31) is generated, the top half kept, with
the digit's own label. Editing: every digit is re-generated towards the label (y + 5) mod 10 from
its noised state at strengths 0.3-0.9 (SDEdit). The shipped digit classifier (99 % held-out
accuracy) reads the results: for inpainting, how often the completed digit is still its own
class; for editing, how often it became the target class, and how far it moved (RMS in [-1, 1]
pixels). Also the RMS distance of each inpainting to an H32 inpainting from the same noise
(the solver's error). Noise: seed 0, one draw per digit, the same for every row. Writes the
table (stdout) and digits.png (rows: originals, the kept top halves, inpainted with H1P5R3 and
H8, edited with H1P5R3 at strengths 0.5 and 0.7; one digit of each class).

    python experiments/edit/digits.py experiments/edit/digits.png > experiments/edit/digits.txt
"""

import argparse

import torch
from torchvision.utils import save_image

from flowturbo.assets import asset_path
from flowturbo.eval.digits import load_classifier, load_demo_split
from flowturbo.models import build_from_checkpoint
from flowturbo.sampling import edit, inpaint, parse_schedule, plan_nfe

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("figure", nargs="?", help="where to write digits.png (none: no figure)")
args = parser.parse_args()

torch.manual_seed(0)
base = build_from_checkpoint(asset_path("demo_base.pt")).float().eval()
refiner = build_from_checkpoint(asset_path("demo_refiner.pt")).float().eval()
classifier, _ = load_classifier(asset_path("digits_classifier.pt"))
images, labels = load_demo_split("val")
x1 = images[:, None].float() / 127.5 - 1.0  # (500, 1, 32, 32) in [-1, 1]
noise = torch.randn(x1.shape, generator=torch.Generator().manual_seed(0))
mask = torch.zeros(32, 32)
mask[16:] = 1  # generate the bottom half


def predicted(x):
    return classifier(x.clamp(-1, 1)).argmax(1)


def rms(a, b):
    return float((a - b).pow(2).mean().sqrt())


def nfe(schedule):
    base_nfe, refiner_nfe = plan_nfe(parse_schedule(schedule).plan)
    return f"{base_nfe}+{refiner_nfe}" if refiner_nfe else f"{base_nfe}"


results = {}
with torch.no_grad():
    print("500 held-out demo digits; shipped demo_base.pt, demo_refiner.pt, digits_classifier.pt")
    print(f"classifier on the originals: {float((predicted(x1) == labels).float().mean()):.3f}")
    top_only = torch.where(mask.bool(), torch.full_like(x1, -1.0), x1)
    acc = float((predicted(top_only) == labels).float().mean())
    print(f"classifier on the top halves alone (bottom blank): {acc:.3f}")

    print("\ninpainting the bottom half, own label")
    print(f"{'schedule':10} {'NFE':>6} {'own class':>10} {'RMS to H32':>11}")
    reference = inpaint(base, x1, mask, noise, "H32", y=labels)
    for schedule in ["H4", "H8", "H1P5", "H1P2R2", "H1P5R3", "H2P4R2"]:
        out = inpaint(base, x1, mask, noise, schedule, refiner=refiner, y=labels)
        results[("inpaint", schedule)] = out
        acc = float((predicted(out) == labels).float().mean())
        print(f"{schedule:10} {nfe(schedule):>6} {acc:10.3f} {rms(out, reference):11.4f}")

    target = (labels + 5) % 10
    print("\nediting towards label (y + 5) mod 10")
    print(f"{'schedule':10} {'NFE':>6} {'strength':>8} {'target':>7} {'own':>6} {'RMS moved':>10}")
    for schedule in ["H8", "H1P5R3"]:
        for strength in (0.3, 0.5, 0.7, 0.9):
            out = edit(base, x1, noise, schedule, strength=strength, refiner=refiner, y=target)
            results[("edit", schedule, strength)] = out
            p = predicted(out)
            print(f"{schedule:10} {nfe(schedule):>6} {strength:8.1f} "
                  f"{float((p == target).float().mean()):7.3f} "
                  f"{float((p == labels).float().mean()):6.3f} {rms(out, x1):10.3f}")  # fmt: skip

if args.figure:
    first = torch.tensor([int((labels == c).nonzero()[0]) for c in range(10)])
    rows = [x1, top_only, results[("inpaint", "H1P5R3")], results[("inpaint", "H8")],
            results[("edit", "H1P5R3", 0.5)], results[("edit", "H1P5R3", 0.7)]]  # fmt: skip
    grid = torch.cat([r[first] for r in rows])
    save_image((grid.clamp(-1, 1) + 1) / 2, args.figure, nrow=10, padding=2, pad_value=0.5)
