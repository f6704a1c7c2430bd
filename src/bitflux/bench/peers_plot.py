"""The peers benchmark's plot: quality ratio against bits per weight, drawn with Pillow only.

One point per row, coloured by library and labelled; full precision is the dashed line at 1.0.
(matplotlib is not a bitflux dependency; a scatter plot needs none.)
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

W, H = 760, 480
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 60  # margins, pixels
YCAP = 2.0  # ratios above are drawn at the cap
COLORS = {"bitflux": (200, 30, 30), "quanto": (30, 90, 200), "hqq": (30, 150, 60), "torchao": (150, 60, 180)}


def _font(px: int):
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _shown(ratio: float) -> float:
    """A ratio as drawn: within [0, YCAP] (a near-zero reference makes ratios meaningless and huge)."""
    return min(YCAP, max(0.0, ratio)) if math.isfinite(ratio) else 0.0


def plot(rows: list[dict], reference: dict, path: Path | str) -> Path:
    """Write the scatter plot of rows' `ratio` against `bits_per_weight` to `path` (PNG)."""
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    f, small = _font(14), _font(12)
    xmax = max(9.0, *(r["bits_per_weight"] + 0.5 for r in rows)) if rows else 9.0
    ys = [_shown(r["ratio"]) for r in rows] + [1.0]
    ymin = min(0.9, math.floor(min(ys) * 10) / 10)
    ymax = max(1.05, max(ys) + 0.02)

    def xy(bits: float, ratio: float) -> tuple[float, float]:
        x = LEFT + (W - LEFT - RIGHT) * bits / xmax
        y = TOP + (H - TOP - BOTTOM) * (ymax - _shown(ratio)) / (ymax - ymin)
        return x, y

    d.rectangle([LEFT, TOP, W - RIGHT, H - BOTTOM], outline=(0, 0, 0))
    for b in range(0, int(xmax) + 1):
        x, _ = xy(b, ymin)
        d.line([x, H - BOTTOM, x, H - BOTTOM + 5], fill=(0, 0, 0))
        d.text((x - 4, H - BOTTOM + 8), str(b), fill=(0, 0, 0), font=small)
    step = 0.05 if ymax - ymin <= 0.5 else 0.1 if ymax - ymin <= 1.2 else 0.25  # at most ~10 ticks
    v = math.ceil(ymin / step) * step
    while v <= ymax + 1e-9:
        _, y = xy(0, v)
        d.line([LEFT - 5, y, LEFT, y], fill=(0, 0, 0))
        d.line([LEFT, y, W - RIGHT, y], fill=(235, 235, 235))
        d.text((LEFT - 42, y - 7), f"{v:.2f}", fill=(0, 0, 0), font=small)
        v += step
    _, y1 = xy(0, 1.0)
    for x in range(LEFT, W - RIGHT, 12):
        d.line([x, y1, min(x + 6, W - RIGHT), y1], fill=(90, 90, 90))
    d.text((W - RIGHT - 260, y1 - 18), f"full precision = 1.0 (overall {reference['overall']:.3f})", fill=(90, 90, 90), font=small)
    placed: list[tuple[float, float, float, float]] = []  # label boxes so far: labels never overlap
    for r in sorted(rows, key=lambda r: (r["bits_per_weight"], -r["ratio"])):
        x, y = xy(r["bits_per_weight"], r["ratio"])
        c = COLORS.get(r.get("library", ""), (0, 0, 0))
        lo, hi = r.get("ratio_ci95", [r["ratio"], r["ratio"]])
        d.line([x, xy(0, lo)[1], x, xy(0, hi)[1]], fill=c)  # 95 % interval over prompts
        d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=c)
        label = str(r["model"])
        tw = d.textlength(label, font=small)
        lx = x + 8 if x + 8 + tw <= W - RIGHT else x - 8 - tw  # keep the label inside the frame
        ly = y - 7
        while any(lx < b[2] and lx + tw > b[0] and ly < b[3] and ly + 14 > b[1] for b in placed):
            ly += 14
        placed.append((lx, ly, lx + tw, ly + 14))
        d.text((lx, ly), label, fill=c, font=small)
    d.text((LEFT, 10), "quality (overall vs full precision) against bits per weight, toy held-out prompts", fill=(0, 0, 0), font=f)
    d.text((W // 2 - 150, H - 28), "bits per weight (codes + scales + zeros)", fill=(0, 0, 0), font=f)
    img.save(path, format="PNG")
    return Path(path)
