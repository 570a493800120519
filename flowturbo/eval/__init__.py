"""Measuring samplers: latency, FID/IS/precision-recall and the tables and plots of a sweep.

The demo data's feature extractor lives in :mod:`flowturbo.eval.digits` (imported on use, so
that ``python -m flowturbo.eval.digits`` runs cleanly). The sweep behind ``evaluate.py`` is
:mod:`flowturbo.eval.sweep` (entries, generation, resume) and :mod:`flowturbo.eval.summary`
(results files, Pareto plot, acceleration ratios, W&B).
"""

import importlib
from typing import Any

from flowturbo.eval.latency import Latency, measure_latencies, measure_latency

#: Imported on first use: torch-fidelity and matplotlib are not needed to time a sampler, and
#: the GPU benchmarks (which import flowturbo.eval.atomic and .latency) run without them.
_LAZY = {
    "Reference": "fidelity",
    "UInt8Images": "fidelity",
    "content_hash": "fidelity",
    "fid_against_statistics": "fidelity",
    "fidelity_metrics": "fidelity",
    "load_reference": "fidelity",
    "acceleration_ratios": "pareto",
    "pareto_front": "pareto",
    "plot_pareto": "pareto",
    "plot_pareto_panels": "pareto",
    "write_results": "pareto",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"flowturbo.eval.{_LAZY[name]}"), name)


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
