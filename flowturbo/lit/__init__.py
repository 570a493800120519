"""Lightning modules: a base flow model and the velocity refiner."""

from flowturbo.lit.base import FlowMatchingModule
from flowturbo.lit.refiner import RefinerModule, load_frozen_base

__all__ = ["FlowMatchingModule", "RefinerModule", "load_frozen_base"]
