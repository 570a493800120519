"""Measuring samplers: latency, FID/IS/precision-recall and the tables and plots of a sweep.

The demo data's feature extractor lives in :mod:`flowturbo.eval.digits` (imported on use, so
that ``python -m flowturbo.eval.digits`` runs cleanly). The sweep behind ``evaluate.py`` is
:mod:`flowturbo.eval.sweep` (entries, generation, resume) and :mod:`flowturbo.eval.summary`
(results files, Pareto plot, acceleration ratios, W&B).
"""

from flowturbo.eval.fidelity import (
    Reference,
    UInt8Images,
    content_hash,
    fid_against_statistics,
    fidelity_metrics,
    load_reference,
)
from flowturbo.eval.latency import Latency, measure_latencies, measure_latency
from flowturbo.eval.pareto import (
    acceleration_ratios,
    pareto_front,
    plot_pareto,
    plot_pareto_panels,
    write_results,
)

__all__ = [
    "Latency",
    "Reference",
    "UInt8Images",
    "acceleration_ratios",
    "content_hash",
    "fid_against_statistics",
    "fidelity_metrics",
    "load_reference",
    "measure_latencies",
    "measure_latency",
    "pareto_front",
    "plot_pareto",
    "plot_pareto_panels",
    "write_results",
]
