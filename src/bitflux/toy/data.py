"""Training data for the toy model: rendered scenes, their captions and token ids.

Deterministic from a seed. No caption names a held-out composition (world.names_heldout). With
`partial` > 0, scenes come from the whole grammar and coloured objects are sometimes captioned
without their shape ("a red object"), always when they are a held-out pair: the images then show
every colour-shape pair in coloured scenes, as real captions name only part of what they show,
while the words of a held-out pair still never occur together. With `absolute` > 0, a share of
the scenes is one object at an edge of the grid captioned with a bare relation word ("a red circle
to the left"): it grounds the relation words in image position (see absolute_scene); with
`canonical` > 0, that share of relation scenes is drawn at fixed far-apart cells (canonical_scene).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from .world import (
    CATEGORIES,
    DEFAULT_WORLD,
    GENERIC,
    GRID,
    TEXT_LENGTH,
    Category,
    Placed,
    Relation,
    Scene,
    Spec,
    Split,
    World,
    caption,
    caption_spec,
    in_split,
    random_spec,
    render,
    sample_scene,
    sample_spec,
    scene_for_spec,
)

# Harder categories are sampled more often.
CATEGORY_WEIGHTS: dict[Category, float] = {
    Category.SINGLE_OBJECT: 1.0,
    Category.TWO_OBJECT: 1.0,
    Category.COUNTING: 2.0,
    Category.COLORS: 1.0,
    Category.POSITION: 2.0,
    Category.COLOR_ATTR: 2.0,
}


@dataclass
class ToyData:
    """Images (N, 3, H, W) in [-1, 1], captions, CLIP ids (N, 16), T5 ids (N, TEXT_LENGTH)."""

    images: torch.Tensor
    captions: list[str]
    clip_ids: torch.Tensor
    t5_ids: torch.Tensor


def images_to_tensor(imgs: list) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) float32 in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in imgs])  # (N, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tokenize(clip_tok: PreTrainedTokenizerFast, t5_tok: PreTrainedTokenizerFast, texts: list[str]):
    """(clip_ids (N, 16), t5_ids (N, TEXT_LENGTH)) exactly as FluxPipeline makes them."""
    c = clip_tok(texts, padding="max_length", max_length=clip_tok.model_max_length, truncation=True, return_tensors="pt")
    t = t5_tok(texts, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt")
    return c.input_ids, t.input_ids


def partial_caption(rng: random.Random, spec: Spec, p: float, world: World = DEFAULT_WORLD) -> str | None:
    """A caption of `spec` that names no held-out composition, or None if it has no such caption.

    Each coloured object is called GENERIC with probability p, and always if its colour-shape pair
    is held out; a held-out shape order loses one shape name. Uncoloured categories are as in
    the grammar (None if held out).
    """
    objs = spec.objects
    if spec.category in (Category.SINGLE_OBJECT, Category.TWO_OBJECT):
        return caption_spec(spec) if in_split(spec, Split.TRAIN, world) else None
    generic = [(o.color, o.shape) in world.heldout_color_shape or rng.random() < p for o in objs]
    if len(objs) == 2 and not any(generic) and (objs[0].shape, objs[1].shape) in world.heldout_order:
        generic[rng.randrange(2)] = True
    named = tuple(dataclasses.replace(o, shape=GENERIC) if g else o for o, g in zip(objs, generic))
    return caption_spec(dataclasses.replace(spec, objects=named))


def bare_relation(rel: Relation) -> str:
    """The relation phrase without its object: "to the left", "above"."""
    return rel.value.removesuffix(" of")


def at_edge(rel: Relation, cell: tuple[int, int]) -> bool:
    """Whether a grid cell (row, col) lies at the edge a bare relation word names."""
    return {
        Relation.LEFT: cell[1] == 0,
        Relation.RIGHT: cell[1] == GRID - 1,
        Relation.ABOVE: cell[0] == 0,
        Relation.BELOW: cell[0] == GRID - 1,
    }[rel]


def absolute_scene(rng: random.Random, world: World = DEFAULT_WORLD) -> tuple[Scene, str]:
    """One coloured training-split object at an edge of the grid, captioned with the bare relation
    ("a red circle to the left", "a blue square below").

    Two-object relation prompts only imply where each object goes ("a left of b" puts a in the
    left columns 2/3 of the time); this states it outright, in the grammar's own words, so a
    small model can ground the relation words in image position.
    """
    spec = sample_spec(rng, Category.COLORS, Split.TRAIN, world)
    rel = rng.choice(list(Relation))
    cell = rng.choice([(r, c) for r in range(GRID) for c in range(GRID) if at_edge(rel, (r, c))])
    obj = spec.objects[0]
    assert obj.color is not None
    return Scene(spec, (Placed(obj.shape, obj.color, cell),)), f"{caption_spec(spec)} {bare_relation(rel)}"


# Canonical cells (row, col) of the two objects of a relation prompt: far apart, centred.
CANONICAL = {
    Relation.LEFT: ((1, 0), (1, GRID - 1)),
    Relation.RIGHT: ((1, GRID - 1), (1, 0)),
    Relation.ABOVE: ((0, 1), (GRID - 1, 1)),
    Relation.BELOW: ((GRID - 1, 1), (0, 1)),
}


def canonical_scene(scene: Scene) -> Scene:
    """A relation scene redrawn at its canonical cells (CANONICAL): the first object at the named
    side, the second opposite. Random valid placements make the layout at high noise, where it is
    decided, nearly uninformative (each object 1/3 likely in a cell instead of 1/9); a share of
    canonical layouts gives the relation words a signal a small model picks up."""
    assert scene.spec.relation is not None and len(scene.objects) == 2
    cells = CANONICAL[scene.spec.relation]
    return Scene(scene.spec, tuple(dataclasses.replace(o, cell=c) for o, c in zip(scene.objects, cells)))


def _scenes(
    n: int, rng: random.Random, partial: float, absolute: float = 0.0, canonical: float = 0.0, world: World = DEFAULT_WORLD
) -> tuple[list[Scene], list[str]]:
    cats = list(CATEGORIES)
    weights = [CATEGORY_WEIGHTS[c] for c in cats]
    scenes, caps = [], []
    while len(scenes) < n:
        if absolute > 0 and rng.random() < absolute:  # no extra draw when off: default data unchanged
            scene, text = absolute_scene(rng, world)
        elif partial <= 0:
            scene = sample_scene(rng, rng.choices(cats, weights)[0], Split.TRAIN, world)
            text = caption(scene)
            if canonical > 0 and scene.spec.category == Category.POSITION and rng.random() < canonical:
                scene = canonical_scene(scene)
        else:
            spec = random_spec(rng, rng.choices(cats, weights)[0], world)
            text = partial_caption(rng, spec, partial, world)
            if text is None:
                continue
            scene = scene_for_spec(rng, spec, world)
        scenes.append(scene)
        caps.append(text)
    return scenes, caps


def make_data(
    n: int,
    seed: int,
    clip_tok: PreTrainedTokenizerFast,
    t5_tok: PreTrainedTokenizerFast,
    partial: float = 0.0,
    absolute: float = 0.0,
    canonical: float = 0.0,
    world: World = DEFAULT_WORLD,
) -> ToyData:
    """n scenes of `world` drawn with CATEGORY_WEIGHTS; partial > 0 uses partial captions, absolute
    > 0 that share of bare-relation scenes, canonical > 0 that share of relation scenes at
    canonical cells (module docstring)."""
    rng = random.Random(f"toy-data-{seed}")
    scenes, caps = _scenes(n, rng, partial, absolute, canonical, world)
    clip_ids, t5_ids = tokenize(clip_tok, t5_tok, caps)
    return ToyData(images_to_tensor([render(s, world) for s in scenes]), caps, clip_ids, t5_ids)


def make_vae_images(n: int, seed: int, world: World = DEFAULT_WORLD) -> torch.Tensor:
    """(n, 3, H, W) images whose objects are recoloured uniformly at random.

    The VAE is an image codec: it must reconstruct every colour-shape pair, including those that
    only held-out prompts name (no prompt is involved, so the prompt split stays intact).
    """
    rng = random.Random(f"toy-vae-{seed}")
    colors = [c for c, _ in world.colors]
    imgs = []
    for _ in range(n):
        s = sample_scene(rng, rng.choice(CATEGORIES), Split.TRAIN, world)
        objs = tuple(dataclasses.replace(o, color=rng.choice(colors)) for o in s.objects)
        imgs.append(render(Scene(s.spec, objs), world))
    return images_to_tensor(imgs)
