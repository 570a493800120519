"""Loading and saving SiT and refiner weights.

``load_checkpoint`` reads the public formats: a bare state dict, SiT ``train.py`` checkpoints
(weights under ``"ema"``, preferred, and ``"model"``), Lightning checkpoints (``"state_dict"``),
with DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes stripped. Loading is
strict; a mismatch raises ``CheckpointError`` saying what differs and, where it can, why.

``save_checkpoint`` / ``build_from_checkpoint`` are the project's own format:
``{"model": state_dict, "config": model.config, "class": "SiT" | "VelocityRefiner", **extra}``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowturbo.models.sit import SIT_CONFIGS, SiT, VelocityRefiner

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "build_from_checkpoint", "load_checkpoint", "save_checkpoint"]

_WEIGHT_KEYS = ("ema", "model", "state_dict")  # in order of preference
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
_MODEL_CLASSES: dict[str, type[SiT]] = {"SiT": SiT, "VelocityRefiner": VelocityRefiner}
_MAX_LISTED = 12


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model, explained in words."""


def _read(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # SiT's train.py stores its argparse arguments beside the weights.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling raises many kinds; all mean the same
        raise CheckpointError(
            f"{path} could not be read as a PyTorch checkpoint ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:600] or 'no detail'}): is it the right file, and "
            "complete (not truncated by an interrupted copy)?"
        ) from err


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(v, Tensor) for v in obj.values())
    )


def _select_weights(ckpt: Mapping[str, Any], key: str | None) -> dict[str, Tensor]:
    """The state dict inside a loaded checkpoint: under ``key``, a known key, or ``ckpt``."""
    if key is not None:
        if key not in ckpt:
            raise CheckpointError(f"no {key!r} in the checkpoint; its keys: {sorted(ckpt)}")
        weights = ckpt[key]
    elif _is_state_dict(ckpt):
        weights = ckpt
    else:
        found = [k for k in _WEIGHT_KEYS if _is_state_dict(ckpt.get(k))]
        if not found:
            raise CheckpointError(
                "found no weights in the checkpoint: it is not a state dict and has none of "
                f"{list(_WEIGHT_KEYS)}; its keys: {sorted(ckpt)[:_MAX_LISTED]}"
            )
        weights = ckpt[found[0]]
    if not _is_state_dict(weights):
        raise CheckpointError(f"the checkpoint's {key!r} entry is not a state dict")
    return dict(weights)


def _strip_prefixes(sd: dict[str, Tensor], prefix: str | None) -> dict[str, Tensor]:
    """Drop wrapper prefixes; with ``prefix``, keep only that submodule's keys, unprefixed."""
    out = {}
    for name, value in sd.items():
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        out[name] = value
    if prefix is not None:
        out = {k[len(prefix) :]: v for k, v in out.items() if k.startswith(prefix)}
        if not out:
            raise CheckpointError(f"no key in the checkpoint starts with prefix {prefix!r}")
    return out


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"    ... and {len(items) - len(shown)} more\n" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "".join(f"    {s}\n" for s in shown) + more


def _depth(names: Any) -> int:
    blocks = {int(m.group(1)) for n in names if (m := re.match(r"blocks\.(\d+)\.", n))}
    return max(blocks) + 1 if blocks else 0


def _common_prefix_hint(missing: list[str], unexpected: list[str]) -> str | None:
    """A prefix that, stripped from the unexpected keys, gives the missing ones."""
    heads = {k.split(".", 1)[0] + "." for k in unexpected if "." in k}
    for head in sorted(heads):
        stripped = {k[len(head) :] for k in unexpected if k.startswith(head)}
        if set(missing) <= stripped:
            return (
                f"the weights sit under {head!r} in this checkpoint: pass prefix={head!r} "
                "(load_checkpoint(..., prefix=...))"
            )
    return None


def _named_size(found: dict[str, tuple]) -> str | None:
    """The ``SIT_CONFIGS`` name whose depth, width and patch the checkpoint's weights have."""
    emb = found.get("x_embedder.proj.weight")
    heads = found.get("blocks.0.attn.qkv.weight")
    if emb is None or heads is None:
        return None
    hidden, patch, depth = emb[0], emb[2], _depth(found)
    names = [
        n
        for n, c in SIT_CONFIGS.items()
        if (c["hidden_size"], c["patch_size"], c["depth"]) == (hidden, patch, depth)
    ]
    return names[0] if names else None


def _hints(model: nn.Module, expected: dict[str, tuple], found: dict[str, tuple]) -> list[str]:
    """Likely reasons for a mismatch, from the shapes of a few telltale parameters."""
    hints = []
    is_refiner = isinstance(model, VelocityRefiner)
    name = _named_size(found)
    if name is not None and not is_refiner and _named_size(expected) != name:
        hints.append(
            f"the checkpoint's depth, width and patch are those of {name}: build "
            f"SiT.from_name({name!r}, ...) for it"
        )
    emb = "x_embedder.proj.weight"
    if emb in expected and emb in found:
        (d_m, c_m, p_m, _), (d_c, c_c, p_c, _) = expected[emb], found[emb]
        if d_m != d_c:
            hints.append(f"wrong model size: hidden {d_m} expected, checkpoint has {d_c}")
        if p_m != p_c:
            hints.append(f"wrong patch size: {p_m} expected, checkpoint has {p_c}")
        if c_c == 2 * c_m:
            hints.append(
                f"is this a refiner checkpoint? its x_embedder takes 2C = {c_c} channels; "
                "load it into a VelocityRefiner"
            )
        elif 2 * c_c == c_m and is_refiner:
            hints.append(
                f"is this a base SiT checkpoint? its x_embedder takes {c_c} channels, a refiner's "
                f"takes 2C = {c_m}"
            )
        elif c_c != c_m:
            hints.append(f"wrong in_channels: {c_m} expected, checkpoint has {c_c}")
    d_m, d_c = _depth(expected), _depth(found)
    if d_m != d_c:
        hint = f"wrong depth: the model has {d_m} blocks, the checkpoint {d_c}"
        if d_c == 1 and not is_refiner:
            hint += " (a one-block refiner checkpoint?)"
        hints.append(hint)
    pos = "pos_embed"
    if pos in expected and pos in found and expected[pos][1] != found[pos][1]:
        hints.append(
            f"wrong input_size / patch_size: {expected[pos][1]} tokens expected, "
            f"checkpoint has {found[pos][1]}"
        )
    head = "final_layer.linear.weight"
    if head in expected and head in found and expected[head][0] != found[head][0]:
        ratio = found[head][0] / expected[head][0]
        if ratio in (2.0, 0.5):
            hints.append(
                f"learn_sigma differs: the head has {expected[head][0]} outputs, the checkpoint "
                f"{found[head][0]}"
            )
    table = "y_embedder.embedding_table.weight"
    if table in expected and table in found and expected[table][0] != found[table][0]:
        hints.append(
            f"label table has {expected[table][0]} rows, checkpoint {found[table][0]}: check "
            "num_classes and class_dropout_prob (> 0 adds the null class row)"
        )
    return hints


def _check_compatible(model: nn.Module, sd: dict[str, Tensor], source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    mismatched = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    if not (missing or unexpected or mismatched):
        return
    parts = [f"checkpoint {source} does not fit {type(model).__name__}:\n"]
    if missing:
        parts.append(_listing("missing keys (in the model, not in the checkpoint)", missing))
    if unexpected:
        parts.append(_listing("unexpected keys (in the checkpoint, not in the model)", unexpected))
    if mismatched:
        parts.append(
            _listing(
                "shape mismatches",
                [
                    f"{k}: model expects {expected[k]}, checkpoint has {found[k]}"
                    for k in mismatched
                ],
            )
        )
    hints = _hints(model, expected, found)
    prefix_hint = _common_prefix_hint(missing, unexpected) if missing and unexpected else None
    if prefix_hint is not None:
        hints.insert(0, prefix_hint)
    parts.extend(f"  hint: {h}\n" for h in hints)
    raise CheckpointError("".join(parts).rstrip())


def load_checkpoint(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    key: str | None = None,
    prefix: str | None = None,
) -> nn.Module:
    """Load weights into ``model`` strictly, from a file or an already-loaded checkpoint.

    A model whose parameters are on the meta device (built under ``torch.device("meta")``) takes
    the checkpoint's tensors directly (``assign=True``), so the weights exist once in memory.

    Args:
        model: the module to fill, e.g. a ``SiT`` or ``VelocityRefiner``.
        source: a checkpoint path, or its loaded contents: a bare state dict or a dict with the
            weights under ``"ema"`` (preferred), ``"model"`` or ``"state_dict"``.
        key: take the weights from this entry instead (e.g. ``"model"`` for the raw weights of a
            train.py checkpoint).
        prefix: keep only keys starting with this prefix and strip it (e.g. ``"ema_model."`` or
            ``"net."`` in a Lightning checkpoint). ``module.`` and ``_orig_mod.`` are always
            stripped.

    Returns:
        ``model``, loaded.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        CheckpointError: no weights found, or missing, unexpected or mis-shaped keys.
    """
    if isinstance(source, Mapping):
        ckpt, name = source, "(in memory)"
    else:
        ckpt, name = _read(source), str(source)
    if key is None and isinstance(model, VelocityRefiner) and {"ema", "model"} <= set(ckpt):
        # SiT's train.py checkpoints hold both and SiT reads "ema"; the public FlowTurbo code
        # reads a refiner file's "model" first
        log.warning(
            "%s holds both 'ema' and 'model' weights: loading 'ema'. The public FlowTurbo code "
            "reads 'model' first; to load those, give the key (model.refiner_arch.key=model in "
            "evaluate.py and generate.py, key='model' in load_checkpoint)",
            name,
        )
    sd = _strip_prefixes(_select_weights(ckpt, key), prefix)
    _check_compatible(model, sd, name)
    assign = any(p.is_meta for p in model.parameters())
    if assign:  # assign=True would keep the checkpoint's dtype (e.g. float16 storage)
        dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        sd = {k: v.to(dtypes[k]) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=assign)
    return model


def save_checkpoint(
    model: SiT, path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, **extra: Any
) -> None:
    """Write ``{"model", "config", "class", **extra}`` to ``path`` atomically (tmp + rename).

    Args:
        model: a ``SiT`` or ``VelocityRefiner`` (anything with a ``config`` dict).
        path: destination file; parent folders are created.
        dtype: store floating-point weights in this dtype (e.g. ``"float16"`` halves the file;
            loading casts back to the model's dtype); None keeps them as they are.
        **extra: more entries, e.g. ``step=1000``; plain Python values and tensors only, so that
            ``torch.load(weights_only=True)`` reads them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": {k: _stored(v.detach().cpu(), dtype) for k, v in model.state_dict().items()},
        "config": dict(model.config),
        "class": type(model).__name__,
        **extra,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; checkpoints are shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _stored(value: Tensor, dtype: torch.dtype | str | None) -> Tensor:
    if dtype is None or not value.is_floating_point():
        return value
    return value.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)


def build_from_checkpoint(path: str | os.PathLike, *, key: str | None = None) -> SiT:
    """Build the model a ``save_checkpoint`` file describes and load its weights.

    The model is built on the meta device and takes the file's tensors, so the weights are held
    once. It is returned in eval mode on the CPU.

    Args:
        path: a file written by ``save_checkpoint``.
        key: the entry holding the weights; default ``"ema"`` if present, else ``"model"``.

    Returns:
        The ``SiT`` or ``VelocityRefiner``.
    """
    ckpt = _read(path)
    if "config" not in ckpt or "class" not in ckpt:
        raise CheckpointError(
            f"{path} has no 'config'/'class' entries (not written by save_checkpoint); build the "
            "model yourself (e.g. SiT.from_name('SiT-XL/2')) and call load_checkpoint"
        )
    if ckpt["class"] not in _MODEL_CLASSES:
        raise CheckpointError(
            f"{path}: unknown model class {ckpt['class']!r}; known: {sorted(_MODEL_CLASSES)}"
        )
    with torch.device("meta"):
        model = _MODEL_CLASSES[ckpt["class"]](**ckpt["config"])
    load_checkpoint(model, ckpt, key=key)
    return model.eval()
