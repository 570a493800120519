"""Argument types shared by the scripts (benchmarks, experiments): argparse then names the flag
and the bad value itself, before any work is done."""

from __future__ import annotations

import argparse


def _int_at_least(least: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value

    parse.__name__ = f"int >= {least}"
    return parse


positive_int = _int_at_least(1)
"""An ``int`` >= 1 (sizes, counts, steps)."""
non_negative_int = _int_at_least(0)
"""An ``int`` >= 0 (warm-up calls, workers)."""
