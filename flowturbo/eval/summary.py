"""The summary of a sweep: merged rows, the Pareto plot, acceleration ratios, W&B.

Reads every row file that :mod:`flowturbo.eval.sweep` wrote to ``<out_dir>/rows`` (one per
entry, whichever job wrote it; dot-files such as the temporary file of a killed job's
unfinished write are not row files) and writes, atomically, into ``out_dir``:

- ``results.json`` / ``results.csv``: one flat row per entry (:func:`flat_row`);
- ``pareto.png``: FID against ms/img, eager and compiled panels, each with its front;
- ``acceleration.json``: for every Heun row (the paper's ratio) and every row of the baseline
  solvers in the sweep (Euler, midpoint, multistep), the fastest FlowTurbo (and
  pseudo-corrector) row whose FID (or error to the reference solution) is no worse, eager
  against eager and compiled against compiled (:func:`acceleration_tables`).

Latencies are fair to compare only when they were timed together: the summary names the
timing sessions when its rows come from more than one (:func:`latency_sessions`).

The jobs of a multirun summarise into one folder at the same time. Each holds
``out_dir/summary.lock`` (:data:`SUMMARY_LOCK`) from reading the rows to the last summary file
written, so a job that read fewer rows never replaces a later job's summary: the summary left
after the last job covers every row file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flowturbo.eval.atomic import atomic_path, remove_leftovers
from flowturbo.eval.entries import parse_entry
from flowturbo.eval.pareto import acceleration_ratios, plot_pareto_panels, write_results

log = logging.getLogger(__name__)

#: Sampler families in the order tables and plots list them.
FAMILIES = (
    "heun", "heun_euler", "pseudo", "flowturbo", "euler", "midpoint", "multistep", "other",
)  # fmt: skip
LATENCY_MODES = (("eager", "ms_per_image_eager"), ("compiled", "ms_per_image_compiled"))
#: A latent model's samplers followed by the VAE decode, timed as one call.
DECODE_MODES = (
    ("eager+decode", "ms_per_image_eager_with_decode"),
    ("compiled+decode", "ms_per_image_compiled_with_decode"),
)
#: Keys a FlowTurbo row must share with the Heun row it is compared with: the models and
#: guidance, how quality was measured (images, seed, extractor, reference) and where time was
#: (batch, device, machine). Rows of one folder can differ in them when a sweep was rerun with
#: other settings for some entries only.
QUALITY_SETTINGS = (
    "base_sha256", "cfg_scale", "cfg_channels", "dtype", "vae", "seed", "num_images",
    "extractor", "extractor_weights", "reference_hash",
)  # fmt: skip
LIKE_FOR_LIKE = (*QUALITY_SETTINGS, "batch", "device", "machine", "compile_mode")
#: What rows matched on their reference error must share besides: the reference solution
#: (solver, steps or tolerances, dtype) and how many images the error is over.
REF_ERROR_SETTINGS = ("ref_error_reference", "ref_error_images")
#: What the summary warns about when its rows disagree: the like-for-like keys, and the
#: refiner, which only FlowTurbo rows have (rows of two refiners are each compared with the
#: baselines, so a stale row of an earlier refiner would stand beside the new ones).
WARNED_SETTINGS = (*LIKE_FOR_LIKE, *REF_ERROR_SETTINGS, "refiner_sha256", "refiner_input")
#: Families FlowTurbo is compared with: Heun (the paper's ratio), then the
#: baseline solvers a sweep may hold, which can be stronger than Heun on some models.
BASELINE_FAMILIES = ("heun", "heun_euler", "euler", "midpoint", "multistep")
#: How the text summary names each baseline family.
BASELINE_NAMES = {
    "heun": "Heun",
    "heun_euler": "Heun with an Euler last step",
    "euler": "Euler",
    "midpoint": "the midpoint solver",
    "multistep": "the multistep solver",
}
#: The timing session of latencies stored before sessions were recorded.
UNKNOWN_SESSION = "unknown"
#: The lock file in ``out_dir`` that jobs hold while they read the rows and write the summary
#: (never a row or a result: neither in ``rows/`` nor one of atomic_path's temporary names).
SUMMARY_LOCK = "summary.lock"
#: The longest wait for another job's summary (writing one takes seconds, so a lock held this
#: long belongs to a stuck process).
SUMMARY_LOCK_TIMEOUT_S = 600.0


def settings_hash(settings: Any) -> str:
    """16 hex digits of the SHA-256 of the settings as canonical JSON."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_row(path: Path) -> dict[str, Any] | None:
    """A row file's contents, or None if it is missing or unreadable (then recomputed)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def finite(value: Any) -> Any:
    """``value`` with NaN and infinite floats (also inside dicts) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return value


def flat_row(row: dict[str, Any]) -> dict[str, Any]:
    """One results.csv row from a row file: identity, NFE, quality, error, latency, settings.

    ``ms_per_image_compiled`` is None where compilation failed (the eager fallback's time
    is not a compiled latency).
    """
    parts = row.get("parts", {})
    q = parts.get("quality", {}).get("result", {})
    qs = parts.get("quality", {}).get("settings", {})
    e = parts.get("ref_error", {}).get("result", {})
    reference_solution = parts.get("ref_error", {}).get("settings", {}).get("reference")
    lat = parts.get("latency", {}).get("result", {})
    lat_settings = parts.get("latency", {}).get("settings", {})
    any_settings = qs or lat_settings or parts.get("ref_error", {}).get("settings", {})
    compiled = lat.get("compiled")
    decode = lat.get("decode", {}).get("ms_per_image")
    ok = compiled is not None and compiled["compiled"]
    return {
        "sampler": _family(row),
        "schedule": row.get("entry"),
        "steps": row.get("steps"),
        "base_nfe": row.get("base_nfe"),
        "refiner_nfe": row.get("refiner_nfe"),
        "fid": q.get("fid"),
        "isc_mean": q.get("isc_mean"),
        "isc_std": q.get("isc_std"),
        "precision": q.get("precision"),
        "recall": q.get("recall"),
        "ref_error": e.get("ref_error"),
        "ms_per_image_eager": lat.get("eager", {}).get("ms_per_image"),
        "ms_per_image_compiled": compiled["ms_per_image"]
        if compiled and compiled["compiled"]
        else None,
        "compiled": None if compiled is None else compiled["compiled"],
        "compile_s": None if compiled is None else compiled.get("compile_s"),
        "decode_ms_per_image": decode,
        "ms_per_image_eager_with_decode": lat.get("eager_decode", {}).get("ms_per_image"),
        "ms_per_image_compiled_with_decode": lat.get("compiled_decode", {}).get("ms_per_image")
        if ok
        else None,
        "latency_session": lat.get("session"),
        "batch": lat.get("batch"),
        "device": lat.get("device") or any_settings.get("device"),
        "machine": lat.get("machine"),
        "dtype": any_settings.get("dtype"),
        "seed": qs.get("seed"),
        "num_images": q.get("num_generated"),
        "ref_error_images": e.get("ref_error_images"),
        "ref_error_reference": None
        if reference_solution is None
        else settings_hash(reference_solution),
        "cfg_scale": any_settings.get("cfg_scale"),
        "cfg_channels": any_settings.get("cfg_channels"),
        "vae": any_settings.get("vae"),
        "refiner_input": any_settings.get("refiner_input"),
        "extractor": q.get("extractor"),
        "extractor_weights": q.get("extractor_weights"),
        "reference": q.get("reference"),
        "reference_hash": q.get("reference_hash"),
        "compile_mode": lat_settings.get("compile_mode"),
        "base_sha256": any_settings.get("base", {}).get("sha256"),
        "refiner_sha256": (any_settings.get("refiner") or {}).get("sha256"),
        "settings_hash": row.get("settings_hash"),
    }


def _family(row: dict[str, Any]) -> Any:
    """The row's family as this code derives it (a row file keeps the one of its day)."""
    try:
        return parse_entry(str(row["entry"])).family
    except (KeyError, ValueError):
        return row.get("family")


def row_files(folder: Path) -> list[Path]:
    """The row files in ``folder``: ``*.json`` except dot-files (pathlib's glob matches those),
    such as the ``.<entry>.<random>.tmp.json`` of a write that never finished."""
    return sorted(p for p in folder.glob("*.json") if not p.name.startswith("."))


def load_rows(out_dir: Path) -> list[dict[str, Any]]:
    """Flat rows of every row file in ``out_dir/rows``, ordered by family, then cost."""
    rows = []
    for path in row_files(out_dir / "rows"):
        data = read_row(path)
        if data is None:
            log.warning("unreadable row file %s skipped", path)
            continue
        rows.append(flat_row(data))
    order = {f: i for i, f in enumerate(FAMILIES)}
    rows.sort(
        key=lambda r: (
            order.get(r["sampler"], len(order)),
            (r["base_nfe"] or 0) + (r["refiner_nfe"] or 0) / 100,
            r["schedule"],
        )
    )
    return rows


def mixed_settings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """For each setting of :data:`WARNED_SETTINGS` on which the rows disagree, which rows have
    which value (e.g. ``"cfg_scale: 1.0 (H2, euler:4), 3.0 (H1P2R2)"``); empty when all agree.
    Latency sessions are named by :func:`latency_sessions` instead."""
    out = []
    for key in WARNED_SETTINGS:
        groups: dict[str, list[str]] = {}
        for r in rows:
            if r.get(key) is not None:
                groups.setdefault(str(r[key]), []).append(str(r["schedule"]))
        if len(groups) > 1:
            parts = (
                f"{v} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
                for v, names in groups.items()
            )
            out.append(f"{key}: {', '.join(parts)}")
    return out


def latency_sessions(rows: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """The schedules whose latencies were timed together, per timing session (a pass of the
    sweep that timed them in the same rounds), the unknown session and then the oldest first.

    Rows without a latency are left out; rows whose latency has no session (stored before
    sessions were recorded) form one session, :data:`UNKNOWN_SESSION`.
    """
    sessions: dict[str, list[str]] = {}
    for r in rows:
        timed = ("ms_per_image_eager", "ms_per_image_compiled", "decode_ms_per_image")
        timed += tuple(k for _, k in DECODE_MODES)
        if all(r.get(k) is None for k in timed):
            continue
        session = str(r.get("latency_session") or UNKNOWN_SESSION)
        sessions.setdefault(session, []).append(str(r["schedule"]))
    return {
        s: sorted(sessions[s]) for s in sorted(sessions, key=lambda s: (s != UNKNOWN_SESSION, s))
    }


def format_sessions(sessions: dict[str, list[str]]) -> str:
    """Two lines naming the timing sessions and how to time every entry together; empty for
    at most one session."""
    if len(sessions) <= 1:
        return ""
    named = "; ".join(f"{s}: {', '.join(names)}" for s, names in sessions.items())
    return (
        f"latencies from {len(sessions)} timing sessions, not timed together ({named}): "
        "latencies and acceleration ratios across sessions are not like for like.\n"
        "To time every schedule together, rerun the whole sweep in one job (not one job per "
        "schedule) with latency.retime_all=true: every latency is then measured again, in "
        "the same rounds."
    )


def acceleration_tables(
    rows: Sequence[dict[str, Any]],
    *,
    candidates: Sequence[str] = ("flowturbo", "pseudo"),
    quality_keys: Sequence[str] = ("fid", "ref_error"),
) -> list[dict[str, Any]]:
    """Acceleration at matched quality versus every Heun row and every baseline-solver row of
    the sweep, like for like.

    Eager latencies are compared with eager ones and compiled with compiled ones (only rows
    whose compilation succeeded), and a match must share :data:`LIKE_FOR_LIKE`. Where a latent
    model's samplers were also timed with the VAE decode (:data:`DECODE_MODES`), those are
    compared too: the ratios of what a deployed sampler costs, decode included.

    Returns:
        One table per (baseline family present, candidate family, quality key, mode):
        ``baseline``, ``candidate``, ``quality_key``, ``mode``, ``latency_key`` and ``rows``
        from :func:`flowturbo.eval.pareto.acceleration_ratios`; Heun's tables come first.
    """
    present = {r.get("sampler") for r in rows}
    decoded = [(m, k) for m, k in DECODE_MODES if any(r.get(k) is not None for r in rows)]
    tables = []
    for baseline in [b for b in BASELINE_FAMILIES if b == "heun" or b in present]:
        for candidate in candidates:
            for quality_key in quality_keys:
                for mode, key in (*LATENCY_MODES, *decoded):
                    ratios = acceleration_ratios(
                        rows,
                        latency_key=key,
                        baseline=baseline,
                        candidate=candidate,
                        quality_key=quality_key,
                        same=LIKE_FOR_LIKE
                        + (REF_ERROR_SETTINGS if quality_key == "ref_error" else ()),
                    )
                    tables.append(
                        {
                            "baseline": baseline,
                            "candidate": candidate,
                            "quality_key": quality_key,
                            "mode": mode,
                            "latency_key": key,
                            "rows": ratios,
                        }
                    )
    return tables


def format_acceleration(tables: Sequence[dict[str, Any]], candidate: str = "flowturbo") -> str:
    """A text table: per baseline row (Heun first) and quality key, the matched candidate in
    each mode."""
    lines = []
    keys = dict.fromkeys((t.get("baseline", "heun"), t["quality_key"]) for t in tables)
    for baseline, quality_key in keys:
        chosen = [
            t
            for t in tables
            if (t.get("baseline", "heun"), t["candidate"], t["quality_key"])
            == (baseline, candidate, quality_key)
        ]
        if not chosen or not chosen[0]["rows"]:
            continue
        name = BASELINE_NAMES.get(baseline, f"the {baseline} baseline")
        lines.append(f"acceleration of {candidate} at matched {quality_key} versus {name}:")
        head = f"  {baseline:<14}{quality_key:>10}"
        for t in chosen:
            head += f" | {t['mode'] + ': match':<16}{quality_key:>10}{'ms/img':>9}{'ratio':>8}"
        lines.append(head)
        for i, base in enumerate(chosen[0]["rows"]):
            line = f"  {base['baseline_schedule']:<14}{_num(base[f'baseline_{quality_key}']):>10}"
            for t in chosen:
                r = t["rows"][i] if i < len(t["rows"]) else {}
                ratio = r.get("ratio")
                line += (
                    f" | {str(r.get('candidate_schedule') or '-'):<16}"
                    f"{_num(r.get(f'candidate_{quality_key}')):>10}"
                    f"{_num(r.get('candidate_latency')):>9}"
                    f"{'-' if ratio is None else f'{100 * ratio:.1f}%':>8}"
                )
            lines.append(line)
    return "\n".join(lines)


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """A text table of the results: schedule, family, NFE, FID, error, ms/img."""
    head = (
        f"{'schedule':<14}{'sampler':<11}{'NFE':>7}{'FID':>9}{'IS':>7}{'ref_err':>10}"
        f"{'eager':>9}{'compiled':>10}"
    )
    lines = [head]
    for r in rows:
        nfe = f"{r['base_nfe']}+{r['refiner_nfe']}" if r["refiner_nfe"] else f"{r['base_nfe']}"
        lines.append(
            f"{r['schedule']:<14}{r['sampler']:<11}{nfe:>7}{_num(r['fid']):>9}"
            f"{_num(r['isc_mean']):>7}{_num(r['ref_error']):>10}"
            f"{_num(r['ms_per_image_eager']):>9}{_num(r['ms_per_image_compiled']):>10}"
        )
    return "\n".join(lines)


def _num(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    return f"{v:.4f}" if abs(v) < 0.1 else f"{v:.3g}" if abs(v) >= 1000 else f"{v:.2f}"


def summarize(
    out_dir: str | os.PathLike,
    cfg: DictConfig | None = None,
    *,
    lock_timeout_s: float = SUMMARY_LOCK_TIMEOUT_S,
) -> dict[str, Any]:
    """Merges ``out_dir/rows/*.json`` into results.json/csv, pareto.png, acceleration.json and
    summary.txt (the printed tables).

    Concurrent jobs of a multirun share ``out_dir``: each reads the rows and writes the summary
    holding ``out_dir/summary.lock`` (:func:`flowturbo.lock.waiting_lock`), so the job that
    summarises last has seen every row written before, and no summary from fewer rows
    replaces its own.

    Prints summary.txt: the results, the timing sessions when there are several (also a
    warning), the acceleration tables and a note when the rows were not measured alike (also a
    warning); logs them to W&B when ``cfg.wandb`` enables it (offline unless
    configured or ``WANDB_MODE`` says otherwise) and the job covers the whole sweep (not a
    single ``sampler.schedule`` job). Printing and logging come after the lock is released.

    Args:
        out_dir: the sweep folder.
        cfg: the sweep config (W&B settings, ``sampler.schedule``); None: no W&B.
        lock_timeout_s: the longest wait for another job's summary.

    Returns:
        ``{"rows": [...], "acceleration": [...], "out_dir": str}``.

    Raises:
        FileNotFoundError: no row file in ``out_dir/rows``.
        flowturbo.lock.LockTimeoutError: another job held the summary's lock for longer than
            ``lock_timeout_s``.
    """
    from flowturbo.lock import waiting_lock

    out_dir = Path(out_dir)
    missing = FileNotFoundError(
        f"no results in {out_dir / 'rows'}: run the sweep first (without summarize_only)"
    )
    if not (out_dir / "rows").is_dir():
        raise missing  # before the lock file: no folder made for a mistyped name
    to_wandb = cfg is not None and cfg.get("sampler", {}).get("schedule") is None
    to_wandb = to_wandb and wandb_mode(cfg) is not None
    what_to_do = (
        f"this job's rows are saved in {out_dir / 'rows'}: once that process has ended (or "
        "you have ended it), write the summary with evaluate.py summarize_only=true and this "
        "job's name= (or out_dir=)"
    )
    with waiting_lock(
        out_dir / SUMMARY_LOCK,
        timeout_s=lock_timeout_s,
        what=f"writing the summary of {out_dir}",
        what_to_do=what_to_do,
        without_flock="jobs running at once may leave a summary that misses rows: after the "
        "last job, write it again with evaluate.py summarize_only=true",
    ):
        remove_leftovers(out_dir)  # a killed summary's temporary results.json, pareto.png
        rows = load_rows(out_dir)
        if not rows:
            raise missing
        write_results(rows, out_dir)
        tables = acceleration_tables(rows)
        with atomic_path(out_dir / "acceleration.json") as tmp:
            tmp.write_text(json.dumps(finite(tables), indent=2, allow_nan=False) + "\n")
        images = sorted({r["num_images"] for r in rows if r.get("num_images")})
        title = f"{out_dir.name}: {'/'.join(map(str, images)) or '?'} images per schedule"
        plot_sweep(rows, out_dir / "pareto.png", title=title)
        # the plot of these rows, for W&B: another job may replace pareto.png once unlocked
        pareto = _read_image(out_dir / "pareto.png") if to_wandb else None
        unlike = mixed_settings(rows)
        mixed = (
            f"the rows of {out_dir} were not all measured alike: {'; '.join(unlike)}. The "
            "table and the plot show them together; acceleration.json pairs only rows "
            "measured alike (rows of different refiners are each compared with the "
            "baselines). Rerun the sweep with one set of settings (or another name=) for a "
            "clean front."
            if unlike
            else ""
        )
        sessions = format_sessions(latency_sessions(rows))
        n = len(rows)
        parts = [f"{n} {'schedule' if n == 1 else 'schedules'} in {out_dir}:\n{format_rows(rows)}"]
        parts += [text for text in (sessions, format_acceleration(tables), mixed) if text]
        summary = "\n\n".join(parts) + "\n"
        with atomic_path(out_dir / "summary.txt") as tmp:
            tmp.write_text(summary)
    if mixed:
        log.warning(mixed)
    if sessions:
        log.warning("%s: %s", out_dir, sessions.replace("\n", " "))
    print(f"\n{summary}", end="")
    if to_wandb:
        log_to_wandb(rows, tables, out_dir, cfg, pareto=pareto)
    return {"rows": rows, "acceleration": tables, "out_dir": str(out_dir)}


def _read_image(path: Path) -> Any:
    """The image file at ``path``, read into memory (a PIL image)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.copy()


def plot_sweep(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """``pareto.png``: FID (top) and, where measured, the error to the reference ODE solution
    (bottom) against ms/img, eager and compiled columns, fronts highlighted."""
    first = next((r for r in rows if r.get("batch")), rows[0])
    setting = f"batch {first.get('batch')}, {first.get('device')}, {first.get('dtype')}"
    measured = [q for q in ("fid", "ref_error") if any(finite(r.get(q)) is not None for r in rows)]
    return plot_pareto_panels(
        rows,
        path,
        [(key, f"{mode} ({setting})") for mode, key in LATENCY_MODES],
        quality_key=measured or ["fid"],
        suptitle=title,
    )


def wandb_mode(cfg: DictConfig) -> str | None:
    """The W&B mode a summary logs in (``"offline"``, ``"online"``), or None: no logging.

    Off unless ``cfg.wandb.enabled``; ``WANDB_MODE`` (disabled, offline, online) wins over
    ``cfg.wandb.offline``.
    """
    w = cfg.get("wandb")
    mode = os.environ.get("WANDB_MODE")
    if not w or not w.get("enabled") or mode == "disabled":
        return None
    return mode or ("offline" if w.get("offline", True) else "online")


def log_to_wandb(
    rows: Sequence[dict[str, Any]],
    tables: Sequence[dict[str, Any]],
    out_dir: Path,
    cfg: DictConfig,
    pareto: Any = None,
) -> None:
    """Logs the results table, the acceleration table and pareto.png to a W&B run, when
    :func:`wandb_mode` says so.

    ``pareto``: the plot of these rows (a PIL image, read while the summary was locked);
    None: ``out_dir/pareto.png`` as it is now.
    """
    mode = wandb_mode(cfg)
    if mode is None:
        return
    import wandb

    w = cfg.get("wandb")
    run = wandb.init(
        project=w.get("project", "flowturbo"),
        name=str(cfg.get("name", out_dir.name)),
        dir=str(out_dir),
        mode=mode,
        job_type="evaluate",
        config=_plain_config(cfg),
    )
    columns = list(dict.fromkeys(k for r in rows for k in r))
    ratios = [
        {k: t[k] for k in ("baseline", "candidate", "quality_key", "mode")} | r
        for t in tables
        for r in t["rows"]
    ]
    ratio_columns = list(dict.fromkeys(k for r in ratios for k in r))
    run.log(
        {
            "sweep/results": wandb.Table(
                columns=columns, data=[[r.get(c) for c in columns] for r in rows]
            ),
            "sweep/acceleration": wandb.Table(
                columns=ratio_columns, data=[[r.get(c) for c in ratio_columns] for r in ratios]
            ),
            "sweep/pareto": wandb.Image(str(out_dir / "pareto.png") if pareto is None else pareto),
        }
    )
    run.finish()


def _plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain values for the record; unresolvable values stay as written."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - e.g. a shipped asset not there when only summarising
        return OmegaConf.to_container(cfg, resolve=False)
