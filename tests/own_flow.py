"""A stand-in for a user's own flow-model package, for tests/test_own_model.py.

Its networks run the other way from flowturbo: data at s = 0, noise at s = 1000, velocity
noise - data, and label -1 for "no class". Adapted with ``time="data_to_noise"``,
``time_scale=1000`` and ``null_label=-1``, :class:`ReversedSiT` must be the SiT it wraps.
"""

import torch
from torch import Tensor, nn

from flowturbo.flow.analytic import GaussianMixtureFlow
from flowturbo.models import build_from_checkpoint

# evaluate.py / generate.py override: the tiny test SiT (1 x 32 x 32, 3 classes) through this
# package, run from data to noise with -1 as its null label
OWN_BASE_ARCH = (
    "model.base_arch={factory:own_flow.load_reversed_sit,in_channels:1,input_size:32,"
    "num_classes:3,time:data_to_noise,time_scale:1000,null_label:-1}"
)


class ReversedSiT(nn.Module):
    """A SiT seen from the other end of the path, with -1 as its null label."""

    def __init__(self, sit: nn.Module):
        super().__init__()
        self.sit = sit

    def forward(self, x: Tensor, s: Tensor, y: Tensor) -> Tensor:
        self.last_labels = y
        y = torch.where(y < 0, self.sit.num_classes, y)
        return -self.sit(x, 1 - s / 1000, y)


def load_reversed_sit(path: str) -> ReversedSiT:
    """The factory a config names: ``own_flow.load_reversed_sit``."""
    return ReversedSiT(build_from_checkpoint(path))


class ReversedMixture(nn.Module):
    """The exact, unconditional velocity of a Gaussian mixture, run data -> noise on [0, 1]."""

    def __init__(self, flow: GaussianMixtureFlow):
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        return -self.flow(x, 1 - s)
