"""The rule-based scorer agrees with the renderer's ground truth and rejects wrong prompts."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from bitflux.toy import scorer, world as w

N = 50


@pytest.mark.parametrize("category", list(w.CATEGORIES))
def test_scorer_accuracy_on_ground_truth(category):
    rng = random.Random(f"scorer-{category.value}")
    ok = 0
    for i in range(N):
        s = w.sample_scene(rng, category, "heldout" if i % 2 else "train")
        ok += scorer.score(w.render(s), s.spec)
    assert ok / N >= 0.98


def _wrong(spec: w.Spec, rng: random.Random) -> w.Spec:
    """A spec the scene does not satisfy: another colour, shape, count or the opposite relation."""
    o = spec.objects[0]
    if spec.category == w.Category.COUNTING:
        return dataclasses.replace(spec, objects=(dataclasses.replace(o, count=o.count % 4 + 1),))
    if spec.category == w.Category.POSITION:
        flip = {w.Relation.LEFT: w.Relation.RIGHT, w.Relation.RIGHT: w.Relation.LEFT,
                w.Relation.ABOVE: w.Relation.BELOW, w.Relation.BELOW: w.Relation.ABOVE}
        return dataclasses.replace(spec, relation=flip[spec.relation])
    if spec.category in (w.Category.COLORS, w.Category.COLOR_ATTR):
        taken = {x.color for x in spec.objects}
        other = rng.choice([c for c in w.COLORS if c not in taken])
        return dataclasses.replace(spec, objects=(dataclasses.replace(o, color=other), *spec.objects[1:]))
    taken = {x.shape for x in spec.objects}
    other = rng.choice([s for s in w.SHAPES if s not in taken])
    return dataclasses.replace(spec, objects=(dataclasses.replace(o, shape=other), *spec.objects[1:]))


@pytest.mark.parametrize("category", list(w.CATEGORIES))
def test_scorer_rejects_wrong_prompts(category):
    rng = random.Random(f"neg-{category.value}")
    rejected = 0
    for _ in range(N):
        s = w.sample_scene(rng, category, "train")
        rejected += not scorer.score(w.render(s), _wrong(s.spec, rng))
    assert rejected / N >= 0.98


def test_blank_and_noise_images_fail():
    blank = np.full((w.IMAGE_SIZE, w.IMAGE_SIZE, 3), w.BACKGROUND, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (w.IMAGE_SIZE, w.IMAGE_SIZE, 3), dtype=np.uint8)
    for img in (blank, noise):
        for t in ("a circle", "a red circle", "one red circle", "a red circle and a blue square"):
            assert not scorer.score(img, w.parse_prompt(t))


def test_detect_finds_objects_with_shape_colour_and_position():
    spec = w.parse_prompt("a red circle to the left of a blue square")
    scene = w.Scene(spec, (w.Placed("circle", "red", (1, 0)), w.Placed("square", "blue", (1, 2))))
    dets = sorted(scorer.detect(w.render(scene)), key=lambda d: d.x)
    assert [(d.color, d.shape) for d in dets] == [("red", "circle"), ("blue", "square")]
    assert abs(dets[0].x - w.CELL_CENTRES[0]) < 1 and abs(dets[1].x - w.CELL_CENTRES[2]) < 1
    # float [0, 1] arrays and upscaled images are accepted too
    arr = np.asarray(w.render(scene), dtype=np.float32) / 255
    assert scorer.score(arr, spec)
    assert scorer.score(w.render(scene).resize((128, 128)), spec)
