"""Grid of 40 samples (4 per class, columns = classes) from a checkpoint, fixed noise (seed 0).

python experiments/demo/sample_grid.py flowturbo/assets/demo_base.pt out.png [H16]
"""

import sys

import torch
from torchvision.utils import save_image

from flowturbo.models import build_from_checkpoint
from flowturbo.sampling import sample

torch.set_num_threads(1)
m = build_from_checkpoint(sys.argv[1])
g = torch.Generator().manual_seed(0)
noise = torch.randn(40, 1, 32, 32, generator=g)
y = torch.arange(40) % 10
with torch.no_grad():
    x = sample(m, noise, sys.argv[3] if len(sys.argv) > 3 else "H16", y=y)
save_image((x.clamp(-1, 1) + 1) / 2, sys.argv[2], nrow=10)
