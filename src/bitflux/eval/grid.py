"""Side-by-side image grids: one row per prompt, one column per model, upscaled for viewing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import OutputExistsError

SCALE = 4  # nearest-neighbour upscaling of the toy images
LABEL_H = 14  # pixels of the column-label strip


def make_grid(columns: dict[str, np.ndarray], prompts: list[str]) -> Image.Image:
    """columns: label -> images (n, H, W, 3) uint8, same n; prompts label the rows (printed left)."""
    labels = list(columns)
    n, h, w = next(iter(columns.values())).shape[:3]
    cw, ch = w * SCALE, h * SCALE
    text_w = 6 * max((len(p) for p in prompts), default=0) + 8
    grid = Image.new("RGB", (text_w + cw * len(labels), LABEL_H + ch * n), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, lab in enumerate(labels):
        draw.text((text_w + j * cw + 2, 1), lab[: cw // 6], fill=(0, 0, 0))
        for i in range(n):
            tile = Image.fromarray(columns[lab][i]).resize((cw, ch), Image.NEAREST)
            grid.paste(tile, (text_w + j * cw, LABEL_H + i * ch))
    for i, p in enumerate(prompts):
        draw.text((4, LABEL_H + i * ch + ch // 2 - 5), p, fill=(0, 0, 0))
    return grid


def save_image(img: Image.Image, out: str | os.PathLike) -> Path:
    """Write to a temp name, then rename; never overwrite."""
    out = Path(out)
    if out.exists():
        raise OutputExistsError(f"output path exists: {out} (bitflux never overwrites)")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}{out.suffix}")
    try:
        img.save(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def pick_rows(categories: list[str], k: int = 6) -> list[int]:
    """Indices of up to k prompts, one per category first."""
    seen: dict[str, int] = {}
    for i, c in enumerate(categories):
        seen.setdefault(c, i)
    rows = list(seen.values())[:k]
    rows += [i for i in range(len(categories)) if i not in rows][: k - len(rows)]
    return sorted(rows)
