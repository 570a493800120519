"""Networks: the SiT velocity predictor and FlowTurbo's velocity refiner, and their checkpoints.

Both keep the public SiT state-dict layout, so ``SiT-XL-2-256x256.pt`` and the public refiner
``SiT-XL-2-Refiner.pt`` load with ``load_checkpoint``. ``FlowModel`` adapts a velocity network
of the user's own to the same call.
"""

from flowturbo.models.checkpoint import (
    CheckpointError,
    build_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from flowturbo.models.flow_model import FlowModel, load_flow_model
from flowturbo.models.sit import SIT_CONFIGS, SiT, VelocityRefiner

__all__ = [
    "SIT_CONFIGS",
    "CheckpointError",
    "FlowModel",
    "SiT",
    "VelocityRefiner",
    "build_from_checkpoint",
    "load_checkpoint",
    "load_flow_model",
    "save_checkpoint",
]
