"""Grid of 40 samples (4 per class, columns = classes) from a checkpoint, fixed noise (seed 0).

python experiments/demo/sample_grid.py flowturbo/assets/demo_base.pt out.png [H16]
"""

import argparse

import torch
from torchvision.utils import save_image

from flowturbo.models import build_from_checkpoint
from flowturbo.sampling import sample

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("checkpoint", help="a demo base checkpoint (the project's format)")
parser.add_argument("out", help="the PNG to write")
parser.add_argument("schedule", nargs="?", default="H16", help="sampler schedule (H16)")
args = parser.parse_args()

torch.set_num_threads(1)
m = build_from_checkpoint(args.checkpoint)
g = torch.Generator().manual_seed(0)
noise = torch.randn(40, 1, 32, 32, generator=g)
y = torch.arange(40) % 10
with torch.no_grad():
    x = sample(m, noise, args.schedule, y=y)
save_image((x.clamp(-1, 1) + 1) / 2, args.out, nrow=10)
