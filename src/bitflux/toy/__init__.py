"""The toy world and the bundled tiny FLUX models trained on it (bitflux's quality ground truth).

`bundled_path("toy")` is the full-precision pipeline directory; `bundled_path("toy-1.58bit")`
the quantised transformer directory that pairs with it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED = {"toy": "toy", "toy-1.58bit": "toy-1.58bit"}


def bundled_path(name: str) -> Path:
    """Directory of a bundled model by name; ModelError if the name is unknown or not installed."""
    if name not in BUNDLED:
        raise ModelError(f"unknown bundled model {name!r}; known: {', '.join(sorted(BUNDLED))}")
    path = ASSETS / BUNDLED[name]
    if not (path / "config.json").exists() and not (path / "model_index.json").exists():
        raise ModelError(f"bundled model {name!r} is not installed at {path}")
    return path


__all__ = ["ASSETS", "BUNDLED", "bundled_path"]
