"""Result tables of a sweep: the Pareto front, acceleration ratios, the plot and the files.

A row is one evaluated schedule: a dict with at least ``"sampler"`` (the family, e.g.
``"heun"``, ``"flowturbo"``), ``"schedule"`` (e.g. ``"H8"``, ``"H1P5R3"``), ``"fid"`` and a
latency in milliseconds per image (e.g. ``"ms_per_image"``, the key of
:meth:`flowturbo.eval.Latency.as_dict`). Lower is better for both FID and latency. Rows whose
value for a key is missing, None or NaN take no part in fronts or matches.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flowturbo.eval.atomic import atomic_path

LEADING_COLUMNS = ("sampler", "schedule", "fid")
"""Columns written first in results.csv, when present; the others follow in first-seen order."""


def _value(row: dict[str, Any], key: str) -> float | None:
    v = row.get(key)
    if v is None or isinstance(v, bool):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def pareto_front(
    rows: Sequence[dict[str, Any]], x: str = "ms_per_image", y: str = "fid"
) -> list[dict[str, Any]]:
    """The non-dominated rows, lower ``x`` and lower ``y`` being better.

    A row is dominated when another row is no worse on both keys and strictly better on one.
    Rows with equal (x, y) do not dominate each other: both stay.

    Args:
        rows: Result rows.
        x: Key of the first objective (a latency).
        y: Key of the second objective (a quality metric, lower is better).

    Returns:
        The front's rows (the same dict objects), sorted by ``x`` then ``y``.
    """
    points = [(r, _value(r, x), _value(r, y)) for r in rows]
    points = [(r, a, b) for r, a, b in points if a is not None and b is not None]
    front = [
        (r, a, b)
        for r, a, b in points
        if not any(a2 <= a and b2 <= b and (a2 < a or b2 < b) for _, a2, b2 in points)
    ]
    front.sort(key=lambda p: (p[1], p[2]))
    return [r for r, _, _ in front]


def acceleration_ratios(
    rows: Sequence[dict[str, Any]],
    *,
    latency_key: str,
    baseline: str = "heun",
    candidate: str = "flowturbo",
    quality_key: str = "fid",
    same: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Acceleration at matched quality: for each baseline row, the fastest candidate no worse.

    For every row of the ``baseline`` family (e.g. Heun-k), the candidate-family row with the
    lowest latency among those whose ``quality_key`` is <= the baseline's is its match, and
    ``ratio = 1 - latency(match) / latency(baseline)`` (the paper's acceleration ratio at
    matched quality). A baseline row without a match (or without quality/latency values) is
    kept with ``ratio`` None and a ``note`` saying why.

    Args:
        rows: Result rows with a ``"sampler"`` family field.
        latency_key: Latency key compared (e.g. ``"ms_per_image"``); compare like for like
            (both eager or both compiled) by choosing rows or keys accordingly.
        baseline: Sampler family of the baselines.
        candidate: Sampler family of the candidates.
        quality_key: Quality metric, lower is better.
        same: Keys whose values a match must share with its baseline (e.g. ``("compile",
            "batch")``).

    Returns:
        One dict per baseline row, ordered by baseline latency: ``baseline_schedule``,
        ``baseline_{quality_key}``, ``baseline_latency``, ``candidate_schedule``,
        ``candidate_{quality_key}``, ``candidate_latency`` (None without a match),
        ``latency_key``, ``ratio``, ``speedup`` (baseline / candidate latency) and ``note``.
    """
    cands = [
        r
        for r in rows
        if r.get("sampler") == candidate
        and _value(r, latency_key) is not None
        and _value(r, quality_key) is not None
    ]
    bases = [r for r in rows if r.get("sampler") == baseline]
    bases.sort(key=lambda r: (_value(r, latency_key) is None, _value(r, latency_key) or 0.0))
    out = []
    for base in bases:
        q, t = _value(base, quality_key), _value(base, latency_key)
        entry: dict[str, Any] = {
            "baseline_schedule": base.get("schedule"),
            f"baseline_{quality_key}": q,
            "baseline_latency": t,
            "candidate_schedule": None,
            f"candidate_{quality_key}": None,
            "candidate_latency": None,
            "latency_key": latency_key,
            "ratio": None,
            "speedup": None,
            "note": None,
        }
        if q is None or t is None:
            entry["note"] = f"baseline has no {quality_key} or {latency_key}"
            out.append(entry)
            continue
        better = [r for r in cands if _value(r, quality_key) <= q]
        matches = [r for r in better if all(r.get(k) == base.get(k) for k in same)]
        if not matches:
            entry["note"] = f"no {candidate} row with {quality_key} <= {q:g}"
            unlike = sorted({k for r in better for k in same if r.get(k) != base.get(k)})
            if unlike:
                entry["note"] += f" measured like it (such rows differ in {', '.join(unlike)})"
            out.append(entry)
            continue
        best = min(matches, key=lambda r: (_value(r, latency_key), _value(r, quality_key)))
        tc = _value(best, latency_key)
        entry.update(
            {
                "candidate_schedule": best.get("schedule"),
                f"candidate_{quality_key}": _value(best, quality_key),
                "candidate_latency": tc,
                "ratio": 1.0 - tc / t,
                "speedup": t / tc if tc > 0 else None,
            }
        )
        out.append(entry)
    return out


def plot_pareto(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    *,
    latency_key: str,
    title: str,
    quality_key: str = "fid",
) -> Path:
    """Plot quality against latency, one series per sampler family, the front as a step line.

    Every point is annotated with its schedule. Written atomically (a temporary file in the
    same folder, then ``os.replace``); the format follows ``path``'s suffix (png, pdf, svg).

    Args:
        rows: Result rows (``"sampler"``, ``"schedule"``, ``quality_key``, ``latency_key``).
        path: Image file to write.
        latency_key: Key of the x axis (milliseconds per image).
        title: Figure title (say batch size, device, dtype, eager/compiled).
        quality_key: Key of the y axis.

    Returns:
        ``path``.
    """
    return plot_pareto_panels(rows, path, [(latency_key, title)], quality_key=quality_key)


def plot_pareto_panels(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    panels: Sequence[tuple[str, str]],
    *,
    quality_key: str | Sequence[str] = "fid",
    suptitle: str | None = None,
) -> Path:
    """Quality-versus-latency panels in one file: a column per latency, a row per quality.

    Each panel is drawn as :func:`plot_pareto` draws its one; a sampler family keeps its
    colour and marker in every panel. Written atomically.

    Args:
        rows: Result rows.
        path: Image file to write.
        panels: ``(latency_key, title)`` per column, left to right (e.g. eager, compiled).
        quality_key: Key of the y axes, or several keys, one row of panels each, top to bottom
            (e.g. ``("fid", "ref_error")``).
        suptitle: Title above all panels.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qualities = [quality_key] if isinstance(quality_key, str) else list(quality_key)
    families = list(dict.fromkeys(str(r.get("sampler")) for r in rows))
    fig, axes = plt.subplots(
        len(qualities),
        len(panels),
        figsize=(7 * len(panels), 5 * len(qualities)),
        dpi=120,
        squeeze=False,
    )
    try:
        for ax_row, quality in zip(axes, qualities, strict=True):
            for ax, (latency_key, title) in zip(ax_row, panels, strict=True):
                draw_pareto(
                    ax,
                    rows,
                    latency_key=latency_key,
                    title=title,
                    quality_key=quality,
                    families=families,
                )
        if suptitle:
            fig.suptitle(suptitle)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return Path(path)


def draw_pareto(
    ax: Any,
    rows: Sequence[dict[str, Any]],
    *,
    latency_key: str,
    title: str,
    quality_key: str = "fid",
    families: Sequence[str] | None = None,
) -> None:
    """Draw one quality-versus-latency panel on a matplotlib ``ax``.

    Args:
        ax: The axes to draw on.
        rows: Result rows; those without both values are left out.
        latency_key: Key of the x axis.
        title: Panel title.
        quality_key: Key of the y axis.
        families: Sampler families in colour order (default: first-seen order in ``rows``).
    """
    usable = [
        r
        for r in rows
        if _value(r, latency_key) is not None and _value(r, quality_key) is not None
    ]
    if families is None:
        families = list(dict.fromkeys(str(r.get("sampler")) for r in usable))
    markers = "osD^v<>Pp*hX"
    for i, family in enumerate(families):
        pts = [r for r in usable if str(r.get("sampler")) == family]
        if not pts:
            continue
        pts.sort(key=lambda r: _value(r, latency_key))
        ax.plot(
            [_value(r, latency_key) for r in pts],
            [_value(r, quality_key) for r in pts],
            marker=markers[i % len(markers)],
            color=f"C{i % 10}",
            linestyle=":",
            linewidth=0.8,
            label=family,
        )
        for r in pts:
            ax.annotate(
                str(r.get("schedule", "")),
                (_value(r, latency_key), _value(r, quality_key)),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    front = pareto_front(usable, x=latency_key, y=quality_key)
    if front:
        ax.step(
            [_value(r, latency_key) for r in front],
            [_value(r, quality_key) for r in front],
            where="post",
            color="black",
            alpha=0.5,
            linewidth=1.5,
            label="Pareto front",
        )
    ax.set_xlabel(f"{latency_key} (ms / image)")
    label = quality_key.upper() if quality_key == "fid" else quality_key
    values = [_value(r, quality_key) for r in usable]
    if values and min(values) > 0 and max(values) > 10 * min(values):
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")  # a few very coarse schedules would flatten everything else
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        label += " (log scale)"
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if usable:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no rows with both values", ha="center", transform=ax.transAxes)


def _plain(v: Any) -> Any:
    """JSON-ready values: NaN -> None, numpy/torch scalars -> Python numbers."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, dict | list):
        return json.dumps(v, sort_keys=True)
    return v


def write_results(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.csv`` (one row per schedule) atomically.

    The csv's columns are the union of the rows' keys: :data:`LEADING_COLUMNS` first (when
    present), then the others in first-seen order; nested values are JSON text, missing ones
    empty. The json is the list of rows, NaN written as null.

    Args:
        rows: Result rows.
        out_dir: Folder to write to (created).

    Returns:
        (path of results.json, path of results.csv).
    """
    out = Path(out_dir)
    rows = [_plain(dict(r)) for r in rows]
    seen = list(dict.fromkeys(k for r in rows for k in r))
    columns = [k for k in LEADING_COLUMNS if k in seen] + [
        k for k in seen if k not in LEADING_COLUMNS
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _csv_cell(r.get(k)) for k in columns})

    json_path, csv_path = out / "results.json", out / "results.csv"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(rows, indent=2, allow_nan=False) + "\n")
    with atomic_path(csv_path) as tmp:
        tmp.write_text(buf.getvalue())
    return json_path, csv_path
