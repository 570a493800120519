"""Measuring samplers: latency, FID/IS/precision-recall and the tables and plots of a sweep.

The demo data's feature extractor lives in :mod:`flowturbo.eval.digits` (imported on use, so
that ``python -m flowturbo.eval.digits`` runs cleanly).
"""

from flowturbo.eval.fidelity import UInt8Images, content_hash, fidelity_metrics
from flowturbo.eval.latency import Latency, measure_latency
from flowturbo.eval.pareto import acceleration_ratios, pareto_front, plot_pareto, write_results

__all__ = [
    "Latency",
    "UInt8Images",
    "acceleration_ratios",
    "content_hash",
    "fidelity_metrics",
    "measure_latency",
    "pareto_front",
    "plot_pareto",
    "write_results",
]
