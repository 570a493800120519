"""Measuring samplers: latency here; FID and sweeps build on it (evaluate.py)."""

from flowturbo.eval.latency import Latency, measure_latency

__all__ = ["Latency", "measure_latency"]
