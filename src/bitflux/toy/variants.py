"""Named variations of the toy world, and which one a trained pipeline was made on.

A second model trained on another world checks that a result is not a property of one palette
or one held-out split. `bitflux toy train --world NAME` records the world in the pipeline's
bitflux_toy.json; `world_of(pipeline_dir)` reads it back, so `bitflux eval`, `bitflux calibrate
--prompts toy` and the scorer use the right grammar, split and palette without being told.

- `default`: the bundled toy's world (world.DEFAULT_WORLD).
- `heldout-b`: the default palette; other held-out colour-shape pairs and object orders (disjoint
  from the default's, each shape and order still held out once).
- `palette-b`: six other colours, the default hues turned by 30 degrees, with new colour words;
  the held-out pairs are the default's with each colour replaced by its turned neighbour.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelError
from .world import DEFAULT_WORLD, HELDOUT_COLOR_SHAPE, HELDOUT_ORDER, World

HELDOUT_B = World(
    "heldout-b",
    DEFAULT_WORLD.colors,
    frozenset({("red", "square"), ("yellow", "diamond"), ("cyan", "circle"), ("purple", "triangle")}),
    frozenset({("square", "triangle"), ("diamond", "circle")}),
)

_TURNED = {  # default colour -> the palette-b colour 30 degrees of hue further (RGB far from grey and each other)
    "red": ("orange", (245, 130, 20)),
    "yellow": ("lime", (150, 230, 20)),
    "green": ("teal", (20, 200, 140)),
    "cyan": ("sky", (20, 140, 240)),
    "blue": ("violet", (120, 40, 230)),
    "purple": ("pink", (240, 40, 160)),
}
PALETTE_B = World(
    "palette-b",
    tuple(_TURNED[c] for c, _ in DEFAULT_WORLD.colors),
    frozenset((_TURNED[c][0], s) for c, s in HELDOUT_COLOR_SHAPE),
    HELDOUT_ORDER,
)

WORLDS: dict[str, World] = {w.name: w for w in (DEFAULT_WORLD, HELDOUT_B, PALETTE_B)}
INFO_FILE = "bitflux_toy.json"  # what `toy train` writes into the pipeline directory


def get_world(name: str) -> World:
    """The world of that name; ModelError naming the known ones otherwise."""
    try:
        return WORLDS[name]
    except (KeyError, TypeError):
        raise ModelError(f"unknown toy world {name!r}; known: {', '.join(WORLDS)}") from None


def world_of(pipeline: str | Path) -> World:
    """The world a pipeline directory was trained on (its bitflux_toy.json), else the default.

    Pipelines trained before worlds existed, and pipelines that are not toys, record none: they
    get the default world. A recorded definition that differs from the named world's is refused,
    since scoring with another palette or split would be silently wrong.
    """
    info = Path(pipeline) / INFO_FILE
    if not info.is_file():
        return DEFAULT_WORLD
    try:
        rec = json.loads(info.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{info}: unreadable ({e})") from None
    stored = rec.get("world") if isinstance(rec, dict) else None
    if stored is None:
        name = (rec.get("config") or {}).get("world", DEFAULT_WORLD.name) if isinstance(rec, dict) else DEFAULT_WORLD.name
        return get_world(name)
    if not isinstance(stored, dict) or "name" not in stored:
        raise ModelError(f"{info}: 'world' must be an object with a 'name'")
    world = get_world(stored["name"])
    if stored != world.record():
        raise ModelError(f"{info}: world {world.name!r} is recorded with another definition than this bitflux's")
    return world


__all__ = ["HELDOUT_B", "PALETTE_B", "WORLDS", "get_world", "world_of"]
