"""A GenEval-style scorer for toy-world images that needs no learned model.

Pixels are labelled by their nearest colour of the world's palette, same-colour pixels are grouped into
connected blobs, each blob's shape is the template (rendered by the world itself, optionally
blurred, since generated edges are soft) closest to its colour-membership map, and a prompt's verdict is all-or-nothing over what its Spec asks for.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from .world import BACKGROUND, DEFAULT_WORLD, IMAGE_SIZE, SHAPES, Category, Relation, Spec, World, shape_mask

MIN_AREA = 36  # pixels; a whole object covers 72..113, smaller blobs are noise
REL_MARGIN = 4.0  # pixels the centroids must differ by for a spatial relation (cells are 16 apart)


@lru_cache(maxsize=None)
def _palette(world: World) -> tuple[tuple[str, ...], np.ndarray]:
    """("background", colour words...) and their RGB rows (1 + colours, 3) float32."""
    return ("background", *(c for c, _ in world.colors)), np.array([BACKGROUND, *(rgb for _, rgb in world.colors)], dtype=np.float32)


_NAMES, _PALETTE = _palette(DEFAULT_WORLD)  # (7,), (7, 3)


@dataclass(frozen=True)
class Detection:
    """One blob: its colour, best-matching shape (or "unknown"), centroid (x, y), area, match."""

    color: str
    shape: str
    x: float
    y: float
    area: int
    iou: float


def _as_array(image) -> np.ndarray:
    """PIL or array image -> (H, W, 3) float32 in 0..255, resized to the world's size."""
    if isinstance(image, np.ndarray):
        arr = image.astype(np.float32)
        if arr.max() <= 1.0:
            arr = arr * 255.0
        image = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    return np.asarray(image, dtype=np.float32)


def label_colors(arr: np.ndarray, world: World = DEFAULT_WORLD) -> np.ndarray:
    """(H, W) palette index per pixel: 0 background, 1.. the world's colours in order."""
    palette = _palette(world)[1]
    d = ((arr[:, :, None, :] - palette[None, None]) ** 2).sum(-1)  # (H, W, 1 + colours)
    return d.argmin(-1)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean (H, W) mask, each as a boolean mask."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask, dtype=bool)
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp[y, x] = True
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(comp)
    return out


BLURS = (0.0, 0.7, 1.2)  # template blur sigmas (px): generated edges are soft
MAX_ERR = 0.45  # a blob whose best normalised template error exceeds this is "unknown"


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a (H, W) array."""
    if sigma <= 0:
        return img
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    out = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 0, img)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 1, out)


@lru_cache(maxsize=8192)
def _template(shape: str, cx2: int, cy2: int, sigma: float) -> np.ndarray:
    """Soft coverage of a shape centred at (cx2/2, cy2/2) (half-pixel grid), blurred (cached)."""
    return _blur(shape_mask(shape, cx2 / 2, cy2 / 2), sigma).astype(np.float32)


def membership(arr: np.ndarray, color: str, world: World = DEFAULT_WORLD) -> np.ndarray:
    """(H, W) in [0, 1]: how far each pixel lies from the background towards `color`."""
    bg = np.array(BACKGROUND, np.float32)
    d = np.array(world.palette[color], np.float32) - bg
    return (((arr - bg) @ d) / float(d @ d)).clip(0, 1)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(r):
        m = out.copy()
        m[1:] |= out[:-1]
        m[:-1] |= out[1:]
        m[:, 1:] |= out[:, :-1]
        m[:, :-1] |= out[:, 1:]
        out = m
    return out


def classify(comp: np.ndarray, soft: np.ndarray | None = None) -> tuple[str, float]:
    """(best shape, its match in [0, 1]) for one blob by soft template matching.

    soft: the colour membership map (defaults to the binary blob). Templates are tried at the
    bbox centre +-1 half-pixel and at a few blur levels; the score is 1 - normalised L2 error.
    """
    ys, xs = np.nonzero(comp)
    cx2 = int(round(xs.min() + xs.max() + 1))  # twice the bbox centre
    cy2 = int(round(ys.min() + ys.max() + 1))
    win = _dilate(comp, 2)
    a = (soft if soft is not None else comp.astype(np.float32)) * win  # (H, W)
    best, best_err = "unknown", np.inf
    for shape in SHAPES:
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for sigma in BLURS:
                    t = _template(shape, cx2 + dx, cy2 + dy, sigma)
                    err = float(((a - t * win) ** 2).sum() / max(1e-6, (t**2).sum()))
                    if err < best_err:
                        best, best_err = shape, err
    return (best if best_err <= MAX_ERR else "unknown"), max(0.0, 1.0 - best_err)


def detect(image, world: World = DEFAULT_WORLD) -> list[Detection]:
    """All blobs of any colour of the world's palette, with shape, centroid and area."""
    arr = _as_array(image)
    labels = label_colors(arr, world)
    names = _palette(world)[0]
    out = []
    for k in range(1, len(names)):
        for comp in components(labels == k):
            area = int(comp.sum())
            if area < MIN_AREA:
                continue
            ys, xs = np.nonzero(comp)
            shape, iou = classify(comp, membership(arr, names[k], world))
            out.append(Detection(names[k], shape, float(xs.mean() + 0.5), float(ys.mean() + 0.5), area, iou))
    return out


def _matches(d: Detection, shape: str, color: str | None) -> bool:
    return d.shape == shape and (color is None or d.color == color)


def _relation(rel: Relation, a: Detection, b: Detection) -> bool:
    return {
        Relation.LEFT: a.x < b.x - REL_MARGIN,
        Relation.RIGHT: a.x > b.x + REL_MARGIN,
        Relation.ABOVE: a.y < b.y - REL_MARGIN,
        Relation.BELOW: a.y > b.y + REL_MARGIN,
    }[rel]


def verdict_from_detections(dets: list[Detection], spec: Spec) -> bool:
    """GenEval's all-or-nothing rule for each category."""
    objs = spec.objects
    found = [[d for d in dets if _matches(d, o.shape, o.color)] for o in objs]
    if spec.category == Category.COUNTING:
        return len(found[0]) == objs[0].count
    if spec.category == Category.POSITION:
        assert spec.relation is not None
        return any(_relation(spec.relation, a, b) for a in found[0] for b in found[1])
    return all(len(f) >= 1 for f in found)


def score(image, spec: Spec, world: World = DEFAULT_WORLD) -> bool:
    """Does the image satisfy the prompt spec? (one verdict per image; `world`: the palette it was drawn in)"""
    return verdict_from_detections(detect(image, world), spec)
