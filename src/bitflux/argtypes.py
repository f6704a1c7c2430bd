"""argparse `type=` checks shared by the commands: a bad value is refused while parsing.

Each returns the parsed value or raises `argparse.ArgumentTypeError`, which the CLI prints as
one line and exit 2 (`argument --steps: must be an integer >= 1, got '0'`).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit value
MAX_IMAGE_SIDE = 8192  # FLUX.1 is trained up to ~2 MP; beyond this a step takes hours on any machine


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer in [low, high] (no upper bound if high is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text!r}")
        return value

    parse.__name__ = "int"
    return parse


def float_range(low: float, high: float = math.inf) -> Callable[[str], float]:
    """A finite number in [low, high] (nan and inf refused: they turn every pixel black)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            bound = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}")
        return value

    parse.__name__ = "float"
    return parse


positive_int = int_range(1)
nonneg_int = int_range(0)
seed = int_range(0, MAX_SEED)
image_side = int_range(1, MAX_IMAGE_SIDE)
scale = float_range(0.0, 1e3)  # guidance / CFG scales: FLUX uses 1-10


def check_multiple(name: str, value: int | None, multiple: int) -> None:
    """Refuse an image side the pipeline would silently resize (FluxPipeline rounds it down)."""
    if value is not None and value % multiple:
        from .errors import BitfluxError

        lo = max(multiple, value // multiple * multiple)
        raise BitfluxError(
            f"--{name} {value} is not a multiple of {multiple} (the pipeline's VAE scale x patch); use {lo} or {lo + multiple}"
        )
