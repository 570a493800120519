"""A digit classifier for the demo data and the torch-fidelity feature extractor built on it.

FID on the demo set (MNIST digits, 1 x 32 x 32) is measured with features of a small CNN trained
by the project on the demo train split, not with InceptionV3 (trained on ImageNet photographs,
nothing like 32 x 32 digits, and a download). Importing this module registers the extractor
with torch-fidelity under :data:`EXTRACTOR_NAME`; its weights come from a file written by::

    python -m flowturbo.eval.digits --out flowturbo/assets/digits_classifier.pt

The file holds the state dict, the architecture, the held-out accuracy on the demo val split
(500 digits) and the command with every setting that produced it.

Features provided to torch-fidelity (defaults per metric in brackets):

- ``"features"`` (B, D) float32: penultimate layer after its ReLU [fid, kid, prc];
- ``"logits"`` (B, 10) float32: the classifier's logits [isc];
- ``"logits_unbiased"`` (B, 10) float32: the logits without the head's bias, the analogue of
  InceptionV3's feature of that name.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from tqdm.auto import tqdm

from flowturbo.cli import positive_int
from flowturbo.data.demo import demo_shards
from flowturbo.data.shards import image_field, read_shard, resolve_shards
from flowturbo.eval.atomic import atomic_path

EXTRACTOR_NAME = "flowturbo-digits"
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "digits_classifier.pt"
"""Where the shipped classifier lives: ``flowturbo/assets/digits_classifier.pt``."""
IMAGE_SIZE = 32
NUM_CLASSES = 10
TRAIN_IMAGES = 4500
"""Digits in the demo train split."""


def train_command(out_path: str | os.PathLike) -> str:
    """The shell command that writes the classifier weights to ``out_path``."""
    return f"python -m flowturbo.eval.digits --out {shlex.quote(str(out_path))}"


# ----------------------------------------------------------------------------- the classifier


class DigitClassifier(nn.Module):
    """A small CNN for 1 x 32 x 32 digits in [-1, 1]: three conv stages, pooled features, head.

    Stages at 32, 16 and 8 pixels of ``width``, ``2 * width`` and ``4 * width`` channels (conv,
    batch norm, ReLU), global average pooling, a ``feature_dim`` layer with ReLU (the features
    used for FID) and a linear head to the class logits.

    Args:
        width: Channels of the first stage.
        feature_dim: Size of the penultimate (feature) layer.
        num_classes: Number of classes.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes}
        c1, c2, c3 = width, 2 * width, 4 * width
        self.stem = nn.Sequential(_conv(1, c1), _conv(c1, c1), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(_conv(c1, c2), _conv(c2, c2), nn.MaxPool2d(2))
        self.stage3 = nn.Sequential(_conv(c2, c3), _conv(c3, c3))
        self.fc = nn.Linear(c3, feature_dim)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features.

        Args:
            x: (B, 1, 32, 32) float images in [-1, 1].

        Returns:
            (B, feature_dim) non-negative features.
        """
        x = self.stem(x)  # (B, c1, 16, 16)
        x = self.stage2(x)  # (B, c2, 8, 8)
        x = self.stage3(x).mean(dim=(2, 3))  # (B, c3)
        return F.relu(self.fc(x))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, num_classes) of (B, 1, 32, 32) images in [-1, 1]."""
        return self.head(self.dropout(self.features(x)))


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


def weights_file(path: str | os.PathLike | None = None) -> Path:
    """The classifier weights file (``path``, default :data:`DEFAULT_WEIGHTS`), checked to exist.

    Raises:
        FileNotFoundError: The file is missing; the message names it and the command that
            creates it.
    """
    file = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(
            f"digit classifier weights not found: expected the file {file} (the weights of "
            f"torch-fidelity feature extractor {EXTRACTOR_NAME!r}); create it with "
            f"`{train_command(file)}` (trains on the demo data, a few minutes on a CPU)"
        )
    return file


def load_classifier(
    path: str | os.PathLike | None = None,
) -> tuple[DigitClassifier, dict[str, Any]]:
    """Build the classifier a weights file describes and load it strictly, in eval mode.

    Args:
        path: A file written by :func:`train_classifier` (or :func:`save_classifier`);
            default :data:`DEFAULT_WEIGHTS`.

    Returns:
        (model on the CPU, the file's other entries: accuracy, command, settings, ...).

    Raises:
        FileNotFoundError: The file does not exist (see :func:`weights_file`).
    """
    state = torch.load(weights_file(path), map_location="cpu", weights_only=True)
    model = DigitClassifier(**state["config"])
    model.load_state_dict(state["model"])
    model.eval().requires_grad_(False)
    info = {k: v for k, v in state.items() if k not in ("model", "config")}
    return model, info


def save_classifier(model: DigitClassifier, path: str | os.PathLike, **extra: Any) -> None:
    """Write ``{"model", "config", **extra}`` to ``path`` atomically (tmp file + os.replace).

    ``extra`` holds plain Python values, so that ``torch.load(weights_only=True)`` reads it.
    """
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": dict(model.config),
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# ----------------------------------------------------------------------------- torch-fidelity


class DigitFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor on :class:`DigitClassifier` (name ``flowturbo-digits``).

    torch-fidelity builds it as ``cls(name, features_list, **calculate_metrics_kwargs)`` and
    loads the weights here, in the constructor, as its own extractors do.

    Input: (B, 3, 32, 32) uint8, grayscale repeated to 3 channels; channel 0 is used.
    Output: a tuple of the requested features, in ``features_list`` order (see the module
    docstring for the names and shapes).

    Args:
        name: The registered name.
        features_list: Requested feature names.
        feature_extractor_weights_path: The classifier weights file (default: the shipped
            :data:`DEFAULT_WEIGHTS`); a missing file is a FileNotFoundError.
    """

    def __init__(
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(name, features_list)
        self.classifier, self.info = load_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits", "logits_unbiased")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return True

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if not (torch.is_tensor(x) and x.dtype == torch.uint8):
            raise ValueError(
                f"{EXTRACTOR_NAME} expects uint8 images, got {getattr(x, 'dtype', x)}"
            )
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"{EXTRACTOR_NAME} expects (B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) images, got "
                f"{tuple(x.shape)}"
            )
        images = x[:, :1].float() / 127.5 - 1.0  # (B, 1, 32, 32) in [-1, 1]
        feats = self.classifier.features(images)
        head = self.classifier.head
        out = {"features": feats}
        if "logits" in self.features_list:
            out["logits"] = head(feats)
        if "logits_unbiased" in self.features_list:
            out["logits_unbiased"] = feats @ head.weight.T
        return tuple(out[name].float() for name in self.features_list)


def register() -> None:
    """Register :class:`DigitFeatureExtractor` with torch-fidelity; safe to call repeatedly.

    A registration left by an earlier import of this module (e.g. ``importlib.reload``) is
    replaced; a different extractor under the same name is an error.
    """
    current = FEATURE_EXTRACTORS_REGISTRY.get(EXTRACTOR_NAME)
    if current is None:
        register_feature_extractor(EXTRACTOR_NAME, DigitFeatureExtractor)
    elif current is not DigitFeatureExtractor:
        same = (current.__module__, current.__qualname__) == (
            DigitFeatureExtractor.__module__,
            DigitFeatureExtractor.__qualname__,
        )
        if not same:
            raise ValueError(
                f"torch-fidelity already has a feature extractor named {EXTRACTOR_NAME!r}: "
                f"{current.__module__}.{current.__qualname__}"
            )
        FEATURE_EXTRACTORS_REGISTRY[EXTRACTOR_NAME] = DigitFeatureExtractor  # a reload


if __name__ != "__main__":  # the training command needs no registration
    register()


# ----------------------------------------------------------------------------- training


def load_demo_split(
    split: str, cache_dir: str | os.PathLike | None = None
) -> tuple[Tensor, Tensor]:
    """All images and labels of one demo split, read from its shards.

    Args:
        split: "train" (4,500 digits) or "val" (500 digits).
        cache_dir: Cache root for :func:`flowturbo.data.demo.demo_shards` (written on first use).

    Returns:
        images (N, 32, 32) uint8 and labels (N,) int64, in shard order.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    images, labels = [], []
    for shard in resolve_shards(demo_shards(cache_dir) / split):
        for _, fields in read_shard(shard):
            with Image.open(io.BytesIO(image_field(fields))) as img:
                images.append(np.asarray(img.convert("L")))
            labels.append(int(fields["cls"]))
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


def _to_model_input(images: Tensor) -> Tensor:
    """(N, H, W) uint8 -> (N, 1, H, W) float32 in [-1, 1], as the project stores images."""
    return images[:, None].float() / 127.5 - 1.0


def _augment(x: Tensor, g: torch.Generator, shift: float, degrees: float, scale: float) -> Tensor:
    """Random small affine maps (shift in pixels, rotation, zoom) of (B, 1, H, W) images.

    The background (-1) is kept: images are shifted to [0, 2] so that grid_sample's zero
    padding is black.
    """
    b, _, h, _ = x.shape
    angle = (torch.rand(b, generator=g) * 2 - 1) * math.radians(degrees)
    zoom = 1 + (torch.rand(b, generator=g) * 2 - 1) * scale
    move = (torch.rand(b, 2, generator=g) * 2 - 1) * (2 * shift / h)  # pixels -> grid units
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin, move[:, 0]], 1), torch.stack([sin, cos, move[:, 1]], 1)], 1
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False) - 1


@torch.no_grad()
def accuracy(
    model: DigitClassifier, images: Tensor, labels: Tensor, batch_size: int = 500
) -> float:
    """Fraction of (N, 32, 32) uint8 ``images`` whose predicted class equals ``labels`` (N,)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(_to_model_input(images[i : i + batch_size]))
        correct += int((logits.argmax(1) == labels[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / len(images)


def train_classifier(
    out_path: str | os.PathLike,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    cache_dir: str | os.PathLike | None = None,
    weight_decay: float = 5e-4,
    width: int = 32,
    feature_dim: int = 128,
    shift: float = 2.0,
    degrees: float = 10.0,
    scale: float = 0.1,
    progress: bool = True,
) -> dict[str, Any]:
    """Train :class:`DigitClassifier` on the demo train split; write it with its val accuracy.

    AdamW with a one-cycle learning-rate schedule, cross-entropy, random small affine
    augmentation (``shift`` pixels, ``degrees`` rotation, ``scale`` zoom). The held-out
    accuracy is measured once, after training, on the 500 demo val digits.

    Args:
        out_path: Weights file to write (atomically: tmp file + os.replace).
        epochs: Passes over the 4,500 training digits.
        batch_size: Images per step.
        lr: Peak learning rate.
        seed: Seeds initialisation, shuffling, dropout and augmentation.
        cache_dir: Cache root of the demo shards (default: the project cache).
        weight_decay: AdamW weight decay.
        width: Channels of the first conv stage.
        feature_dim: Size of the feature layer.
        shift: Largest random shift in pixels.
        degrees: Largest random rotation in degrees.
        scale: Largest relative random zoom.
        progress: Show a tqdm bar over the steps.

    Returns:
        The settings and results written to the file: ``accuracy`` (held-out), ``val_images``,
        ``train_accuracy``, ``command``, ``settings``, ``wall_s``, ``path``.
    """
    start = time.perf_counter()
    settings = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "weight_decay": weight_decay,
        "width": width,
        "feature_dim": feature_dim,
        "shift": shift,
        "degrees": degrees,
        "scale": scale,
    }
    train_images, train_labels = load_demo_split("train", cache_dir)
    val_images, val_labels = load_demo_split("val", cache_dir)

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitClassifier(width=width, feature_dim=feature_dim)
    steps_per_epoch = len(train_images) // batch_size  # drop the last partial batch
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    x_all = _to_model_input(train_images)

    model.train()
    bar = tqdm(total=total, desc="digits classifier", disable=not progress)
    for epoch in range(epochs):
        order = torch.randperm(len(x_all), generator=g)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            x = _augment(x_all[idx], g, shift, degrees, scale)
            loss = F.cross_entropy(model(x), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
    bar.close()

    model.eval()
    result = {
        "accuracy": accuracy(model, val_images, val_labels),
        "val_images": len(val_images),
        "train_accuracy": accuracy(model, train_images, train_labels),
        "command": _full_command(out_path, settings, cache_dir),
        "settings": settings,
        "torch": str(torch.__version__),
    }
    save_classifier(model, out_path, **result)
    return {**result, "wall_s": time.perf_counter() - start, "path": str(out_path)}


def _full_command(
    out_path: str | os.PathLike, settings: dict[str, Any], cache_dir: str | os.PathLike | None
) -> str:
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items())
    cache = f" --cache-dir {shlex.quote(str(cache_dir))}" if cache_dir is not None else ""
    return f"{train_command(out_path)} {flags}{cache}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: ``python -m flowturbo.eval.digits --out FILE [settings]``."""
    p = argparse.ArgumentParser(
        prog="python -m flowturbo.eval.digits",
        description="Train the demo-data digit classifier used as the FID feature extractor.",
    )
    p.add_argument("--out", default=str(DEFAULT_WEIGHTS), help="weights file to write")
    p.add_argument("--epochs", type=positive_int, default=15)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--width", type=positive_int, default=32)
    p.add_argument("--feature-dim", type=positive_int, default=128)
    p.add_argument("--shift", type=float, default=2.0)
    p.add_argument("--degrees", type=float, default=10.0)
    p.add_argument("--scale", type=float, default=0.1)
    p.add_argument("--cache-dir", default=None, help="demo shard cache root")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if not args.lr > 0:  # also NaN
        p.error(f"--lr must be positive, got {args.lr}")
    if args.batch_size > TRAIN_IMAGES:
        p.error(
            f"--batch-size {args.batch_size} exceeds the {TRAIN_IMAGES} demo training digits "
            "(the last partial batch is dropped, so no step would run)"
        )
    for flag, value in {
        "--weight-decay": args.weight_decay,
        "--shift": args.shift,
        "--degrees": args.degrees,
        "--scale": args.scale,
    }.items():
        if not value >= 0:
            p.error(f"{flag} must be >= 0, got {value}")
    if args.scale >= 1:
        p.error(f"--scale must be below 1 (a relative zoom), got {args.scale}")
    if Path(args.out).is_dir():
        p.error(f"--out {args.out} is a folder; give the weights file to write")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train_classifier(
        args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        cache_dir=args.cache_dir,
        weight_decay=args.weight_decay,
        width=args.width,
        feature_dim=args.feature_dim,
        shift=args.shift,
        degrees=args.degrees,
        scale=args.scale,
    )
    print(
        f"held-out accuracy {result['accuracy']:.4f} on {result['val_images']} val digits "
        f"(train {result['train_accuracy']:.4f}), {result['wall_s']:.0f} s -> {result['path']}"
    )
    return result


if __name__ == "__main__":
    main()
