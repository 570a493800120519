"""The images that ``generate.py`` edits or inpaints, and the masks of what it regenerates.

Inputs are ``demo:train`` / ``demo:val`` (the shipped digits), an image file or a folder of
them, read at the model's pixel resolution with the training shards' center crop and resize.
Masks are a fixed region (:data:`MASK_REGIONS`), one mask image for every input, or a folder
with ``<input name>.png`` per input (white = generate, as in diffusers).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch import Tensor

from flowturbo.data.shards import IMG_EXTENSIONS, image_files

log = logging.getLogger(__name__)

#: ``mask=`` names of fixed regions to regenerate (of the image at the model's resolution).
MASK_REGIONS = ("bottom", "top", "left", "right", "center")


def load_image(path: str | Path, channels: int, size: int) -> Tensor:
    """An image file as (channels, size, size) uint8: grey or RGB, center-cropped and resized
    as the training shards are (:func:`flowturbo.data.shards.center_crop_resize`)."""
    from flowturbo.data.shards import center_crop_resize

    if channels not in (1, 3):
        raise ValueError(f"images have 1 or 3 channels; this model's images have {channels}")
    with Image.open(path) as img:
        img = center_crop_resize(_pixels(img).convert("L" if channels == 1 else "RGB"), size)
        array = np.asarray(img)
    tensor = torch.from_numpy(array.copy())
    return tensor[None] if channels == 1 else tensor.permute(2, 0, 1)


@dataclass
class Inputs:
    """The images a job edits or inpaints, at the model's pixel resolution.

    Attributes:
        names: output names (relative paths without suffix), one per image.
        files: the image files, or None for in-memory images (the demo digits).
        images: (N, C, H, W) uint8 for in-memory images, else None.
        labels: (N,) the images' own labels where the source has them (the demo digits).
        skipped: unreadable files and why; they are left out of ``names``.
        sizes: (width, height) of each image as stored, before its crop and resize.
    """

    names: list[str]
    files: list[Path] | None = None
    images: Tensor | None = None
    labels: Tensor | None = None
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    sizes: list[tuple[int, int]] | None = None

    def load(self, indices: Sequence[int], channels: int, size: int) -> Tensor:
        if self.images is not None:
            return self.images[list(indices)]
        return torch.stack([load_image(self.files[i], channels, size) for i in indices])


def _pixels(img: Image.Image) -> Image.Image:
    """An image as it is shown: turned by its EXIF orientation (a phone's photo is stored
    sideways with a tag saying so; a mask drawn on the photo as shown would miss it), and
    16-bit grey scaled to 8 bits (PIL's conversion to "L" would clip it)."""
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16"):
        array = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(array.round().clip(0, 255).astype(np.uint8))
    return img


def _shown_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as shown, from the header: swapped by an EXIF rotation."""
    w, h = img.size
    return (h, w) if img.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8) else (w, h)


def load_inputs(spec: str, channels: int, size: int, limit: int | None = None) -> Inputs:
    """``demo:train`` / ``demo:val`` (the shipped digits), an image file, or a folder of them.

    Folders are read recursively in sorted order; an output keeps its input's relative path.
    Files that cannot be read are skipped and reported (``Inputs.skipped``), not dropped
    silently. ``limit`` keeps the first images.
    """
    spec = str(spec)
    if spec.startswith("demo:"):
        from flowturbo.eval.digits import load_demo_split

        split = spec.removeprefix("demo:")
        if split not in ("train", "val"):
            raise ValueError(f"input={spec}: the demo splits are demo:train and demo:val")
        if (channels, size) != (1, 32):
            raise ValueError(
                f"input={spec}: the demo digits are 1 x 32 x 32 images, this model makes "
                f"{channels} x {size} x {size} ones; give a folder of images instead"
            )
        images, labels = load_demo_split(split)
        n = len(images) if limit is None else min(limit, len(images))
        names = [f"{split}{i:05d}" for i in range(n)]
        sizes = [(size, size)] * n
        return Inputs(names, images=images[:n, None], labels=labels[:n], sizes=sizes)
    root = Path(spec)
    if root.is_file():
        files, base = [root], root.parent
    elif root.is_dir():
        files, base = image_files(root, f"input={spec}"), root
    else:
        raise FileNotFoundError(
            f"input={spec}: no such file or folder. Give a folder of images "
            f"({', '.join(IMG_EXTENSIONS)}), one image, or demo:val / demo:train"
        )
    good, sizes, skipped = [], [], {}
    for f in files:
        if limit is not None and len(good) >= limit:
            break
        try:
            with Image.open(f) as img:
                img.load()
                shown = _shown_size(img)
            good.append(f)
            sizes.append(shown)
        except (OSError, ValueError, Image.DecompressionBombError) as exn:
            skipped[str(f)] = f"{type(exn).__name__}: {exn}"
    if not good:
        raise FileNotFoundError(
            f"input={spec}: no readable image ({', '.join(IMG_EXTENSIONS)}) there"
            + (f"; unreadable: {skipped}" if skipped else "")
        )
    names = [f.relative_to(base).with_suffix("").as_posix() for f in good]
    twins = sorted(n for n, k in Counter(names).items() if k > 1)
    if twins:
        raise ValueError(
            f"input={spec}: files differing only in their suffix would write one output each "
            f"to the same PNG: {twins[:5]}; rename or move them"
        )
    return Inputs(names, files=good, skipped=skipped, sizes=sizes)


def region_mask(region: str, size: int) -> Tensor:
    """A (1, 1, size, size) mask, 1 on the named region (:data:`MASK_REGIONS`)."""
    mask = torch.zeros(1, 1, size, size)
    half, quarter = size // 2, size // 4
    if region == "bottom":
        mask[..., half:, :] = 1
    elif region == "top":
        mask[..., :half, :] = 1
    elif region == "left":
        mask[..., :half] = 1
    elif region == "right":
        mask[..., half:] = 1
    elif region == "center":
        mask[..., quarter : size - quarter, quarter : size - quarter] = 1
    else:
        raise ValueError(f"unknown mask region {region!r}; known: {', '.join(MASK_REGIONS)}")
    return mask


@dataclass
class Masks:
    """Where to generate, per image: one mask for all (``shared``) or a file per name.

    ``is_file``: the mask setting names a file or folder (not a region).
    """

    size: int
    shared: Tensor | None = None
    files: list[Path] | None = None
    is_file: bool = False

    def load(self, indices: Sequence[int]) -> Tensor:
        """(B or 1, 1, size, size) float masks, 1 = generate."""
        if self.shared is not None:
            return self.shared
        return torch.cat([_read_mask(self.files[i], self.size) for i in indices])


#: How a mask image is read, restated by the errors about one.
MASK_CONVENTION = (
    "white (>= 128) = generate, black = keep; an image with transparency is read by its alpha "
    "channel, opaque = generate, transparent = keep"
)


def _alpha(img: Image.Image) -> Image.Image | None:
    """The alpha channel of an image with transparency, or None when it is opaque everywhere."""
    if img.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in img.info:
        return None
    alpha = img.convert("RGBA").getchannel("A")
    return None if alpha.getextrema() == (255, 255) else alpha


def _read_mask(path: Path, size: int) -> Tensor:
    """A mask image as (1, 1, size, size) floats, 1 = generate.

    White (>= 128 after the inputs' crop and resize) = generate, black = keep. An image with
    transparency that is not opaque everywhere (strokes on an empty layer, as image editors
    export them) is read by its alpha channel instead: opaque = generate, whatever the colour.

    Raises:
        ValueError: the file is not a readable image, or its mask marks no pixel.
    """
    from flowturbo.data.shards import center_crop_resize

    try:
        with Image.open(path) as img:
            img = _pixels(img)
            alpha = _alpha(img)
            grey = center_crop_resize(img.convert("L") if alpha is None else alpha, size)
            array = np.asarray(grey) >= 128
    except (OSError, ValueError, Image.DecompressionBombError) as exn:
        raise ValueError(
            f"mask={path} is not a readable image ({type(exn).__name__}: {exn}); give a mask "
            f"image (white = generate), a folder of them or a region ({', '.join(MASK_REGIONS)})"
        ) from None
    if not array.any():
        read = "its alpha channel is transparent" if alpha is not None else "it is black"
        raise ValueError(
            f"mask={path} marks no pixel to generate: {read} everywhere once center-cropped "
            f"and resized to {size} x {size}, so the output would be the input. A mask is read "
            f"as: {MASK_CONVENTION}"
        )
    return torch.from_numpy(array).float()[None, None]


def _warn_odd_aspects(
    files: Sequence[Path], names: Sequence[str], input_sizes: Sequence[tuple[int, int]]
) -> None:
    """Logs masks whose aspect ratio is not their input's: both are center-cropped to a square
    and resized, so such a mask marks another region of its input than it shows.

    Args:
        files: the mask file of each input (the same file for a shared mask).
        names: the inputs' names.
        input_sizes: (width, height) of each input as stored.
    """
    odd, mask_sizes = [], {}
    for f, name, (iw, ih) in zip(files, names, input_sizes, strict=True):
        if f not in mask_sizes:
            try:
                with Image.open(f) as img:  # the header only
                    mask_sizes[f] = _shown_size(img)
            except (OSError, ValueError, Image.DecompressionBombError):
                mask_sizes[f] = None  # named when it is read
        if mask_sizes[f] is not None:
            w, h = mask_sizes[f]
            if not math.isclose(w * ih, h * iw, rel_tol=0.01):
                odd.append((f, w, h, name, iw, ih))
    if not odd:
        return
    if len(set(files)) == 1:  # one mask for all
        f, w, h = odd[0][:3]
        what = (
            f"mask={f} is {w} x {h}; {len(odd)} of {len(files)} inputs have another aspect ratio"
        )
        examples = [f"{name} is {iw} x {ih}" for *_, name, iw, ih in odd[:3]]
    else:
        what = f"{len(odd)} of {len(files)} masks have another aspect ratio than their input"
        examples = [f"{f} is {w} x {h}, {name} {iw} x {ih}" for f, w, h, name, iw, ih in odd[:3]]
    log.warning(
        "%s (e.g. %s): masks and inputs are both center-cropped to a square and resized, so "
        "such a mask marks another region of its input than it shows; give each input a mask "
        "of its own shape",
        what,
        "; ".join(examples),
    )


def load_masks(
    spec: str,
    names: Sequence[str],
    size: int,
    input_sizes: Sequence[tuple[int, int]] | None = None,
) -> Masks:
    """``mask=``: a region name, one mask image for every input, or a folder with
    ``<name>.png`` for every input name (white = generate, as in diffusers; an image with
    transparency: opaque = generate).

    Args:
        spec: the ``mask`` setting.
        names: the inputs' names.
        size: the side of the square the inputs are cropped and resized to.
        input_sizes: (width, height) of each input as stored (None: square inputs); a mask of
            another aspect ratio than its input's is logged.

    Raises:
        FileNotFoundError: no such region, file or folder, or an input without a mask.
        ValueError: a mask image that is unreadable or marks no pixel (a folder's masks are
            read when their images are made).
    """
    spec = str(spec)
    if spec in MASK_REGIONS:
        return Masks(size, shared=region_mask(spec, size))
    path = Path(spec)
    if path.is_file():
        masks = Masks(size, shared=_read_mask(path, size), is_file=True)
        files = [path] * len(names)
    elif path.is_dir():
        files = [path / f"{name}.png" for name in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"mask={spec}: {len(missing)} of {len(files)} inputs have no mask, e.g. "
                f"{missing[:3]}; the folder needs <input name>.png for every input"
            )
        masks = Masks(size, files=files, is_file=True)
    else:
        raise FileNotFoundError(
            f"mask={spec}: not a region ({', '.join(MASK_REGIONS)}), an image or a folder of masks"
        )
    _warn_odd_aspects(files, names, input_sizes or [(size, size)] * len(names))
    return masks
