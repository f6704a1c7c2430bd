"""A compositional toy world: coloured shapes on a 3x3 grid, captions from a GenEval-like grammar.

Everything is deterministic from a seed. The prompt space is split so held-out prompts contain
colour-shape pairs and object orders that never occur in training (or calibration) prompts.
A `World` fixes the palette and those held-out compositions; the module constants are the default
world's, every function takes `world=` (toy.variants names the others).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from ..errors import BitfluxError

IMAGE_SIZE = 48  # pixels per side
TEXT_LENGTH = 16  # T5 tokens the toy is trained and used with (FluxPipeline's max_sequence_length)
GRID = 3  # cells per side
CELL = IMAGE_SIZE // GRID  # 16 px: one cell is exactly one packed FLUX image token (VAE 8x, 2x2 patch)
CELL_CENTRES = tuple(CELL * (i + 0.5) for i in range(GRID))  # (8, 24, 40): pixel centre of each row/column
OBJECT_SIZE = 12.0  # bounding-box side of one object, pixels (neighbouring objects keep a 4 px gap)
SUPERSAMPLE = 4  # draw at 4x then box-filter down: anti-aliased edges

BACKGROUND = (128, 128, 128)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "yellow": (240, 220, 20),
    "green": (30, 190, 40),
    "cyan": (20, 210, 220),
    "blue": (30, 60, 235),
    "purple": (190, 30, 220),
}
SHAPES = ("circle", "square", "triangle", "diamond")
PLURALS = {s: s + "s" for s in SHAPES}
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4}
NUMBER_WORDS = {v: k for k, v in NUMBERS.items()}


class PromptError(BitfluxError):
    """A prompt that the toy world's grammar cannot parse."""


class Category(str, Enum):
    """GenEval's six task categories."""

    SINGLE_OBJECT = "single_object"
    TWO_OBJECT = "two_object"
    COUNTING = "counting"
    COLORS = "colors"
    POSITION = "position"
    COLOR_ATTR = "color_attr"


class Relation(str, Enum):
    """Spatial relation of the first object to the second."""

    LEFT = "to the left of"
    RIGHT = "to the right of"
    ABOVE = "above"
    BELOW = "below"


class Split(str, Enum):
    TRAIN = "train"
    HELDOUT = "heldout"


CATEGORIES = tuple(Category)

# Compositions that only held-out prompts contain.
HELDOUT_COLOR_SHAPE = frozenset(
    {("red", "triangle"), ("green", "circle"), ("blue", "diamond"), ("yellow", "square")}
)
HELDOUT_ORDER = frozenset({("circle", "square"), ("triangle", "diamond")})  # (first, second) shapes
GENERIC = "object"  # training captions may say "a red object" instead of naming the shape (never in eval prompts)


@dataclass(frozen=True)
class World:
    """One variation of the toy world: its palette and the compositions only held-out prompts contain.

    Shapes, counts, relations, grid and background are shared by every world. A trained model
    records its world (toy.variants), so eval, calibration and the scorer use the same one.
    """

    name: str
    colors: tuple[tuple[str, tuple[int, int, int]], ...]  # (word, RGB) in palette order
    heldout_color_shape: frozenset[tuple[str, str]]  # (colour, shape) pairs only held-out prompts name
    heldout_order: frozenset[tuple[str, str]]  # (first, second) shapes only held-out prompts put in this order

    @property
    def palette(self) -> dict[str, tuple[int, int, int]]:
        """Colour word -> RGB, in palette order."""
        return dict(self.colors)

    def record(self) -> dict:
        """The JSON-able definition a trained pipeline stores (bitflux_toy.json "world")."""
        return {
            "name": self.name,
            "colors": {c: list(rgb) for c, rgb in self.colors},
            "heldout_color_shape": sorted(list(p) for p in self.heldout_color_shape),
            "heldout_order": sorted(list(p) for p in self.heldout_order),
        }


DEFAULT_WORLD = World("default", tuple(COLORS.items()), HELDOUT_COLOR_SHAPE, HELDOUT_ORDER)


@dataclass(frozen=True)
class ObjSpec:
    """One noun phrase: a shape, an optional colour, a count."""

    shape: str
    color: str | None = None
    count: int = 1


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for: its category, noun phrases, and an optional relation."""

    category: Category
    objects: tuple[ObjSpec, ...]
    relation: Relation | None = None


@dataclass(frozen=True)
class Placed:
    """An object drawn in the image: shape, colour and grid cell (row, col)."""

    shape: str
    color: str
    cell: tuple[int, int]

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) pixel centre."""
        return CELL_CENTRES[self.cell[1]], CELL_CENTRES[self.cell[0]]


@dataclass(frozen=True)
class Scene:
    """A spec plus the objects that realise it."""

    spec: Spec
    objects: tuple[Placed, ...] = field(default_factory=tuple)


# ----------------------------------------------------------------------------- grammar


def _np(o: ObjSpec) -> str:
    col = f"{o.color} " if o.color else ""
    return f"a {col}{o.shape}"


def caption_spec(spec: Spec) -> str:
    """The canonical prompt text of a spec."""
    c = spec.category
    o = spec.objects
    if c in (Category.SINGLE_OBJECT, Category.COLORS):
        return _np(o[0])
    if c in (Category.TWO_OBJECT, Category.COLOR_ATTR):
        return f"{_np(o[0])} and {_np(o[1])}"
    if c == Category.POSITION:
        assert spec.relation is not None
        return f"{_np(o[0])} {spec.relation.value} {_np(o[1])}"
    if c == Category.COUNTING:
        n = o[0].count
        noun = o[0].shape if n == 1 else PLURALS.get(o[0].shape, o[0].shape + "s")  # GENERIC too
        return f"{NUMBER_WORDS[n]} {o[0].color} {noun}"
    raise ValueError(c)


def caption(scene: Scene) -> str:
    """The prompt a scene was drawn for."""
    return caption_spec(scene.spec)


@lru_cache(maxsize=None)
def _patterns(world: World) -> tuple[tuple[str, re.Pattern], ...]:
    """The grammar's regular expressions over a world's colour words."""
    color = "|".join(c for c, _ in world.colors)
    shape = "|".join(SHAPES)
    np_ = rf"a (?:({color}) )?({shape})"
    rel = "|".join(re.escape(r.value) for r in Relation)
    return (
        ("pos", re.compile(rf"^{np_} ({rel}) {np_}$")),
        ("and", re.compile(rf"^{np_} and {np_}$")),
        ("one", re.compile(rf"^{np_}$")),
        ("count", re.compile(rf"^({'|'.join(NUMBERS)}) ({color}) ({shape}|{'|'.join(PLURALS.values())})$")),
    )


_PATTERNS = _patterns(DEFAULT_WORLD)


def parse_prompt(text: str, world: World = DEFAULT_WORLD) -> Spec:
    """Parse a prompt of the world's grammar into a Spec; raise PromptError otherwise."""
    t = " ".join(text.strip().lower().rstrip(".").split())
    for kind, pat in _patterns(world):
        m = pat.match(t)
        if not m:
            continue
        g = m.groups()
        if kind == "one":
            cat = Category.COLORS if g[0] else Category.SINGLE_OBJECT
            return Spec(cat, (ObjSpec(g[1], g[0]),))
        if kind == "and":
            a, b = ObjSpec(g[1], g[0]), ObjSpec(g[3], g[2])
            if (a.color is None) != (b.color is None):
                break
            if a.shape == b.shape:
                break
            cat = Category.COLOR_ATTR if a.color else Category.TWO_OBJECT
            if cat == Category.COLOR_ATTR and a.color == b.color:
                break
            return Spec(cat, (a, b))
        if kind == "pos":
            a, b = ObjSpec(g[1], g[0]), ObjSpec(g[4], g[3])
            if a.color is None or b.color is None or a.shape == b.shape or a.color == b.color:
                break
            return Spec(Category.POSITION, (a, b), Relation(g[2]))
        if kind == "count":
            n = NUMBERS[g[0]]
            noun = g[2]
            singular = noun[:-1] if noun.endswith("s") and noun[:-1] in SHAPES else noun
            if (n == 1) != (noun == singular):
                break
            return Spec(Category.COUNTING, (ObjSpec(singular, g[1], n),))
    world_note = "" if world == DEFAULT_WORLD else f" of world {world.name!r}"
    raise PromptError(f"prompt outside the toy grammar{world_note}: {text!r} (see bitflux.toy.world for the grammar)")


def is_heldout(spec: Spec, world: World = DEFAULT_WORLD) -> bool:
    """True if the spec contains a held-out colour-shape pair or a held-out object order."""
    if any((o.color, o.shape) in world.heldout_color_shape for o in spec.objects):
        return True
    if len(spec.objects) == 2 and (spec.objects[0].shape, spec.objects[1].shape) in world.heldout_order:
        return True
    return False


def names_heldout(text: str, world: World = DEFAULT_WORLD) -> bool:
    """True if a caption (grammar or partial, see data.partial_caption) names a held-out composition:
    a held-out colour directly before its held-out shape, or two shapes in a held-out order."""
    words = text.lower().split()
    singular = [w[:-1] if w[:-1] in SHAPES else w for w in words]
    if any((a, b) in world.heldout_color_shape for a, b in zip(singular, singular[1:])):
        return True
    shapes = tuple(w for w in singular if w in SHAPES)
    return len(shapes) == 2 and shapes in world.heldout_order


def in_split(spec: Spec, split: Split | str, world: World = DEFAULT_WORLD) -> bool:
    """Whether a spec belongs to a split. single_object has no composition: it is in both."""
    if spec.category == Category.SINGLE_OBJECT:
        return True
    return is_heldout(spec, world) == (Split(split) == Split.HELDOUT)


# ----------------------------------------------------------------------------- sampling


def random_spec(rng: random.Random, category: Category, world: World = DEFAULT_WORLD) -> Spec:
    """A random spec of a category from the whole grammar (either split)."""
    colors, shapes = [c for c, _ in world.colors], list(SHAPES)
    if category == Category.SINGLE_OBJECT:
        return Spec(category, (ObjSpec(rng.choice(shapes)),))
    if category == Category.COLORS:
        return Spec(category, (ObjSpec(rng.choice(shapes), rng.choice(colors)),))
    if category == Category.COUNTING:
        return Spec(category, (ObjSpec(rng.choice(shapes), rng.choice(colors), rng.randint(1, 4)),))
    s1, s2 = rng.sample(shapes, 2)
    if category == Category.TWO_OBJECT:
        return Spec(category, (ObjSpec(s1), ObjSpec(s2)))
    c1, c2 = rng.sample(colors, 2)
    objs = (ObjSpec(s1, c1), ObjSpec(s2, c2))
    if category == Category.COLOR_ATTR:
        return Spec(category, objs)
    return Spec(category, objs, rng.choice(list(Relation)))


def sample_spec(rng: random.Random, category: Category | str, split: Split | str, world: World = DEFAULT_WORLD) -> Spec:
    """A random spec of a category from a split (rejection sampling over the grammar)."""
    category = Category(category)
    for _ in range(10_000):
        spec = random_spec(rng, category, world)
        if in_split(spec, split, world):
            return spec
    raise RuntimeError("split has no prompt of this category")  # pragma: no cover


def _relation_holds(rel: Relation, a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Cell a (row, col) stands in `rel` to cell b."""
    return {
        Relation.LEFT: a[1] < b[1],
        Relation.RIGHT: a[1] > b[1],
        Relation.ABOVE: a[0] < b[0],
        Relation.BELOW: a[0] > b[0],
    }[rel]


def _place(rng: random.Random, n: int, rel: Relation | None) -> list[tuple[int, int]]:
    """n distinct cells (objects in neighbouring cells still keep a gap); rel holds for cells 0, 1."""
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    while True:
        pick = rng.sample(cells, n)
        if rel is not None and not _relation_holds(rel, pick[0], pick[1]):
            continue
        return pick


def scene_for_spec(rng: random.Random, spec: Spec, world: World = DEFAULT_WORLD) -> Scene:
    """Place objects that satisfy the spec; uncoloured objects get a random colour of the world."""
    items: list[tuple[str, str]] = []
    for o in spec.objects:
        for _ in range(o.count):
            items.append((o.shape, o.color or rng.choice([c for c, _ in world.colors])))
    cells = _place(rng, len(items), spec.relation)
    return Scene(spec, tuple(Placed(s, c, cell) for (s, c), cell in zip(items, cells)))


def sample_scene(
    rng: random.Random, category: Category | str, split: Split | str = Split.TRAIN, world: World = DEFAULT_WORLD
) -> Scene:
    """A random scene of a category from a split."""
    return scene_for_spec(rng, sample_spec(rng, category, split, world), world)


def prompts(split: Split | str, n: int, seed: int = 0, world: World = DEFAULT_WORLD) -> list[tuple[str, Category]]:
    """n distinct-as-possible (prompt, category) pairs, round-robin over categories."""
    rng = random.Random(f"prompts-{Split(split).value}-{seed}")
    out: list[tuple[str, Category]] = []
    seen: set[str] = set()
    for i in range(n):
        cat = CATEGORIES[i % len(CATEGORIES)]
        text = caption_spec(sample_spec(rng, cat, split, world))
        for _ in range(50):  # prefer unseen prompts; small categories repeat
            if text not in seen:
                break
            text = caption_spec(sample_spec(rng, cat, split, world))
        seen.add(text)
        out.append((text, cat))
    return out


# ----------------------------------------------------------------------------- rendering


def shape_polygon(shape: str, cx: float, cy: float, size: float = OBJECT_SIZE) -> list[tuple[float, float]] | None:
    """Polygon vertices of a shape centred at (cx, cy); None for the circle (drawn as an ellipse)."""
    h = size / 2
    if shape == "circle":
        return None
    if shape == "square":
        q = h * 0.85
        return [(cx - q, cy - q), (cx + q, cy - q), (cx + q, cy + q), (cx - q, cy + q)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    raise ValueError(shape)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, fill, scale: float = 1.0) -> None:
    """Draw one shape (coordinates in output pixels, multiplied by `scale`)."""
    poly = shape_polygon(shape, cx, cy)
    if poly is None:
        h = OBJECT_SIZE / 2
        draw.ellipse([(cx - h) * scale, (cy - h) * scale, (cx + h) * scale, (cy + h) * scale], fill=fill)
    else:
        draw.polygon([(x * scale, y * scale) for x, y in poly], fill=fill)


def shape_mask(shape: str, cx: float, cy: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], (size, size) float32, of one shape."""
    s = SUPERSAMPLE
    img = Image.new("L", (size * s, size * s), 0)
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, 255, s)
    img = img.resize((size, size), Image.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


def render(scene: Scene, world: World = DEFAULT_WORLD) -> Image.Image:
    """The scene as an RGB image of IMAGE_SIZE x IMAGE_SIZE, in the world's palette."""
    s = SUPERSAMPLE
    palette = world.palette
    img = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy = o.centre
        draw_shape(draw, o.shape, cx, cy, palette[o.color], s)
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


def vocabulary(generic: bool = False, world: World = DEFAULT_WORLD) -> list[str]:
    """Every word the world's grammar uses (the tokenizers' vocabulary, before special tokens);
    `generic` adds GENERIC and its plural, for models trained on partial captions."""
    words = ["a", "and", "to", "the", "left", "right", "of", "above", "below"]
    words += [c for c, _ in world.colors] + list(SHAPES) + list(PLURALS.values()) + list(NUMBERS)
    words += [GENERIC, GENERIC + "s"] if generic else []
    return sorted(set(words))
