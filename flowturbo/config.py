"""Hydra/OmegaConf helpers shared by the entry points (train.py, evaluate.py, ...)."""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flowturbo.assets import asset_path


def register_resolvers() -> None:
    """``${asset:demo_base.pt}``: the path of a file shipped in ``flowturbo/assets``;
    ``${job_dir:checkpoints/name}``: a folder of the job's own in a multirun (:func:`job_dir`)."""
    OmegaConf.register_new_resolver("asset", asset_path, replace=True)
    OmegaConf.register_new_resolver("job_dir", job_dir, replace=True)


def job_dir(root: str) -> str:
    """``root`` in a single run; in a multirun (``-m``), ``root/<the job's overrides>``.

    The job's folder is named after ``hydra.job.override_dirname``: its command-line overrides
    as typed, sorted, without the keys in ``hydra.job.config.override_dirname.exclude_keys``
    (:func:`job_folder_name`). The name depends on nothing else, so a requeued job and a
    relaunch of the same sweep find their folders again, while jobs of one sweep, which differ
    in at least one override, get folders of their own. A multirun job without overrides (or
    with only excluded ones) uses ``root``, as a single run does.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return root
    overrides = HydraConfig.get().job.override_dirname
    return f"{root}/{job_folder_name(overrides)}" if overrides else root


#: Longest folder name :func:`job_folder_name` gives (file systems allow 255 bytes).
MAX_FOLDER_NAME = 200
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")


def job_folder_name(overrides: str) -> str:
    """A folder name for ``overrides`` (``"a.b=1,c=x"``): itself when it is short and holds only
    letters, digits and ``._=,+-``; otherwise other characters (``/`` of paths, spaces, quotes,
    brackets) become ``_``, the name is cut to fit, and 8 hex digits of its hash are appended, so
    that two different sets of overrides never share a folder."""
    name = _UNSAFE.sub("_", overrides)
    if name == overrides and len(name) <= MAX_FOLDER_NAME:
        return name
    digest = hashlib.sha256(overrides.encode()).hexdigest()[:8]
    return f"{name[: MAX_FOLDER_NAME - 9]}-{digest}"


def command_line(script: str) -> str:
    """How the running Hydra job was started, for examples in messages:
    ``python {script} experiment=<the chosen experiment>`` (without it outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    experiment = None
    if HydraConfig.initialized():
        experiment = HydraConfig.get().runtime.choices.get("experiment")
    return f"python {script}" + (f" experiment={experiment}" if experiment else "")


def check_required(cfg: DictConfig, command: str) -> None:
    """Raises a readable error listing every ``???`` value the user still has to give.

    Args:
        cfg: the composed config.
        command: how the job was started, e.g. ``"python train.py experiment=sit_refiner"``,
            used in the example of the message.
    """
    missing = []
    for key in cfg:
        if key == "hydra":
            continue
        if OmegaConf.is_missing(cfg, key):
            missing.append(str(key))
        elif isinstance(cfg[key], DictConfig):
            missing += OmegaConf.missing_keys(cfg[key])  # full keys ("model.base.path")
    missing.sort()
    if missing:
        example = " ".join(f"{k}=..." for k in missing)
        factories = [k for k in missing if k.endswith("factory")]
        kinds = (
            f"{', '.join(factories)}: a function's dotted path (e.g. mypkg.flows.load_model), "
            "importable here; "
            if factories
            else ""
        )
        raise ValueError(
            f"these settings have no default and must be given: {', '.join(missing)}. "
            f"Add them to the command line, e.g. `{command} {example}` ({kinds}see the "
            "comment next to each in conf/ for what it expects)"
        )


def check_config(cfg: DictConfig, command: str, required: bool = True) -> None:
    """The checks every entry point runs on its composed config before any work:
    :func:`check_required` (unless ``required`` is False: a job that needs none of them, such
    as ``summarize_only``), :func:`check_text_booleans` and :func:`check_added_keys`."""
    if required:
        check_required(cfg, command)
    check_text_booleans(cfg)
    check_added_keys(cfg)


#: What YAML 1.1 reads as booleans but Hydra's override grammar keeps as text.
TEXT_BOOLEANS = ("yes", "no", "on", "off")


def check_text_booleans(cfg: DictConfig) -> None:
    """Refuses ``yes``/``no``/``on``/``off`` as values: Hydra keeps them as text, and every
    text counts as true where a switch is read, so ``resume=no`` would resume."""
    bad = [f"{key}={value}" for key, value in _leaves(cfg) if _is_text_boolean(value)]
    if bad:
        raise ValueError(
            f"{', '.join(bad)}: Hydra reads {'/'.join(TEXT_BOOLEANS)} as text, not as a switch "
            "(any text counts as true); write true or false"
        )


def _is_text_boolean(value: Any) -> bool:
    return isinstance(value, str) and value.lower() in TEXT_BOOLEANS


def _leaves(cfg: DictConfig) -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf outside ``hydra``, interpolations unresolved and
    missing values (``???``) as they are written."""

    def walk(node: Any, prefix: str) -> list[tuple[str, Any]]:
        if isinstance(node, dict | list):
            items = node.items() if isinstance(node, dict) else enumerate(node)
            return [leaf for k, v in items for leaf in walk(v, f"{prefix}{k}.")]
        return [(prefix[:-1], node)]

    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    return walk(tree, "")


def check_added_keys(cfg: DictConfig) -> None:
    """Refuses a ``+key=value`` override whose key is one letter or two away from a setting
    beside it (``+sampler.schedul=H8``): Hydra suggests the ``+`` for a mistyped key, and the
    new key is then read by nothing, so the run would silently use the default."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return
    typed = list(HydraConfig.get().overrides.task)
    for override in OverridesParser.create().parse_overrides(typed):
        key = override.key_or_group
        if not override.is_add() or "." not in key:
            continue  # only new values, not groups (+experiment=...)
        parent, _, name = key.rpartition(".")
        node = OmegaConf.select(cfg, parent)
        if not isinstance(node, DictConfig):
            continue
        close = difflib.get_close_matches(name, [str(k) for k in node if k != name], 1, 0.8)
        if close:
            raise ValueError(
                f"+{key}={override.get_value_element_as_str()} adds a setting that nothing "
                f"reads, and {parent} has {close[0]}: did you mean "
                f"{parent}.{close[0]}={override.get_value_element_as_str()} (without the +)?"
            )


def check_accelerator(trainer_cfg: Mapping[str, Any]) -> None:
    """Refuses ``trainer.accelerator=gpu`` (or ``cuda``) where torch sees no CUDA GPU (nor, for
    ``gpu``, Apple's MPS), in words: Lightning's own error, "No supported gpu backend found!",
    names no setting."""
    import torch

    accelerator = str(trainer_cfg.get("accelerator", "")).lower()
    mps = accelerator == "gpu" and torch.backends.mps.is_available()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available() and not mps:
        raise ValueError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible here "
            "(torch.cuda.is_available() is False): use trainer=cpu, or run on a GPU node"
        )


def check_int(cfg: DictConfig, key: str, minimum: int, why: str = "") -> int:
    """The setting ``key``, an integer >= ``minimum``; anything else is an error naming the key
    (and ``why``, when given)."""
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        why = f" {why}" if why else ""
        raise ValueError(f"{key} must be an integer >= {minimum}{why}, got {value!r}")
    return value


def check_enough_work(items: int, world_size: int, what: str) -> None:
    """Lightning deals ``items`` out to ``world_size`` processes and needs one for each: say
    so in words (its own assertion names neither)."""
    if items < world_size:
        raise ValueError(
            f"{items} {what} for {world_size} processes: every process needs at least one; "
            f"run on {items} device(s) (trainer.devices={items}) or give more {what}"
        )


def check_ddp_launch(trainer: Any) -> None:
    """Refuses a Hydra multirun (``-m``) whose Lightning Trainer would start its DDP ranks
    itself (``strategy=ddp`` on several devices, outside SLURM and torchrun).

    Lightning starts each further rank by running the command line again, ``-m`` and the
    sweep's values included, so every rank would run the whole sweep and the ranks' jobs would
    not match. Under SLURM (one task per GPU) the ranks exist before the Trainer and nothing is
    run again.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:  # Lightning's private launcher class: a release that renames it skips this check
        from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
    except ImportError:
        return
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    launcher = getattr(trainer.strategy, "launcher", None)
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if getattr(environment, "creates_processes_externally", False):
        return  # SLURM's tasks or torchrun's processes are the ranks: nothing is run again
    if isinstance(launcher, _SubprocessScriptLauncher) and launcher.num_processes > 1:
        raise ValueError(
            f"a multirun (-m) cannot start {launcher.num_processes} DDP processes per node "
            "(trainer.strategy=ddp): Lightning starts each further rank by running the command "
            "again, sweep included, so every rank would run the whole sweep. Launch the sweep "
            "on SLURM (hydra/launcher=slurm: one task per GPU), run its jobs one at a time "
            "without -m, or set trainer.strategy=ddp_spawn"
        )
