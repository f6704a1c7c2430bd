"""Side-by-side image grids: one row per prompt, one column per model, upscaled for viewing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import OutputExistsError

SCALE = 4  # nearest-neighbour upscaling of the toy images
FONT_PX = 16  # label font size: legible at 100 % beside 192-px tiles
PAD = 6  # pixels around label text
GAP = 4  # white gutter between tiles, so neighbouring images stay apart


def _font(px: int = FONT_PX) -> ImageFont.ImageFont:
    """Pillow's bundled scalable font (no system font needed); the bitmap font if FreeType is absent."""
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: fixed ~11 px bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap of `text` into lines at most `width` pixels wide (a long word gets its own line)."""
    lines: list[str] = []
    for word in text.split():
        cand = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(cand) <= width:
            lines[-1] = cand
        else:
            lines.append(word)
    return lines or [""]


def make_grid(columns: dict[str, np.ndarray], prompts: list[str]) -> Image.Image:
    """columns: label -> images (n, H, W, 3) uint8, same n; prompts label the rows (printed left).

    The prompt column is exactly one tile wide and the column headers one tile wide each, with
    labels word-wrapped to fit, so the labels never dominate the images they label.
    """
    labels = list(columns)
    n, h, w = next(iter(columns.values())).shape[:3]
    cw, ch = w * SCALE, h * SCALE
    font = _font()
    line_h = int(font.getbbox("Ag")[3]) + 3
    heads = [_wrap(lab, font, cw - 2 * PAD) for lab in labels]
    head_h = 2 * PAD + line_h * max((len(x) for x in heads), default=1)
    text_w = cw  # the prompt column is as wide as one image column
    grid = Image.new("RGB", (text_w + (cw + GAP) * len(labels), head_h + (ch + GAP) * n), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, lab in enumerate(labels):
        for k, line in enumerate(heads[j]):
            draw.text((text_w + GAP + j * (cw + GAP) + PAD, PAD + k * line_h), line, fill=(0, 0, 0), font=font)
        for i in range(n):
            tile = Image.fromarray(columns[lab][i]).resize((cw, ch), Image.NEAREST)
            grid.paste(tile, (text_w + GAP + j * (cw + GAP), head_h + i * (ch + GAP)))
    for i, p in enumerate(prompts):
        lines = _wrap(p, font, text_w - 2 * PAD)
        top = head_h + i * (ch + GAP) + (ch - line_h * len(lines)) // 2
        for k, line in enumerate(lines):
            draw.text((PAD, top + k * line_h), line, fill=(0, 0, 0), font=font)
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
