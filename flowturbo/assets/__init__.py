"""Small files shipped with the package: the demo base model and the demo digit classifier.

Each file's docstring entry says which command reproduces it (README, "Shipped models").
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent


def asset_path(name: str) -> str:
    """Path of a shipped file, e.g. ``asset_path("demo_base.pt")``.

    Raises:
        FileNotFoundError: no such file, with the list of what is shipped.
    """
    path = ASSETS_DIR / name
    if not path.is_file():
        shipped = sorted(p.name for p in ASSETS_DIR.iterdir() if p.suffix == ".pt")
        raise FileNotFoundError(
            f"no shipped file {name!r} in {ASSETS_DIR}; shipped: {shipped or 'none'}"
        )
    return str(path)
