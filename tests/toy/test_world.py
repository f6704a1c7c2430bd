"""The toy world: deterministic rendering, a disjoint held-out split, a parseable grammar."""

from __future__ import annotations

import random

import numpy as np
import pytest

from bitflux.errors import BitfluxError
from bitflux.toy import world as w


def test_render_is_deterministic_from_seed():
    a = [w.render(w.sample_scene(random.Random(7), c, "train")) for c in w.CATEGORIES]
    b = [w.render(w.sample_scene(random.Random(7), c, "train")) for c in w.CATEGORIES]
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    c = [w.render(w.sample_scene(random.Random(8), cat, "train")) for cat in w.CATEGORIES]
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, c))
    assert a[0].size == (w.IMAGE_SIZE, w.IMAGE_SIZE) and a[0].mode == "RGB"


def test_scene_realises_its_spec():
    rng = random.Random(0)
    for _ in range(200):
        cat = rng.choice(w.CATEGORIES)
        s = w.sample_scene(rng, cat, rng.choice(["train", "heldout"]))
        want = sum(o.count for o in s.spec.objects)
        assert len(s.objects) == want
        cells = [o.cell for o in s.objects]
        assert len(set(cells)) == len(cells)
        if s.spec.relation is not None:
            assert w._relation_holds(s.spec.relation, cells[0], cells[1])


def test_prompts_are_deterministic():
    assert w.prompts("heldout", 30, seed=3) == w.prompts("heldout", 30, seed=3)
    assert w.prompts("heldout", 30, seed=3) != w.prompts("heldout", 30, seed=4)


def test_heldout_split_is_disjoint_from_train():
    train = w.prompts("train", 600, seed=0)
    held = w.prompts("heldout", 300, seed=0)
    comp_train = {t for t, c in train if c != w.Category.SINGLE_OBJECT}
    comp_held = {t for t, c in held if c != w.Category.SINGLE_OBJECT}
    assert comp_held and comp_train
    assert not comp_train & comp_held
    for t in comp_held:
        assert w.is_heldout(w.parse_prompt(t))
    for t in comp_train:
        assert not w.is_heldout(w.parse_prompt(t))
        for color, shape in w.HELDOUT_COLOR_SHAPE:
            assert f"{color} {shape}" not in t
    # every category is present in both splits
    assert {c for _, c in held} == set(w.CATEGORIES) == {c for _, c in train}


def test_training_data_never_sees_heldout_prompts():
    from bitflux.toy.build import build_tokenizer
    from bitflux.toy.data import make_data

    d = make_data(300, 0, build_tokenizer("clip"), build_tokenizer("t5"))
    assert not any(w.is_heldout(w.parse_prompt(t)) or w.names_heldout(t) for t in d.captions)
    assert d.images.shape == (300, 3, w.IMAGE_SIZE, w.IMAGE_SIZE)
    assert d.images.min() >= -1 and d.images.max() <= 1


@pytest.mark.parametrize(
    "text, held",
    [
        ("a red triangle and a blue square", True),
        ("two red triangles", True),
        ("a blue circle to the left of a red square", True),  # held-out order
        ("a circle and a square", True),
        ("a square and a circle", False),
        ("a red object and a blue triangle", False),
        ("a red object to the left of a green object", False),
        ("three yellow objects", False),
        ("a triangle", False),
    ],
)
def test_names_heldout(text, held):
    assert w.names_heldout(text) == held


def test_partial_captions_name_no_heldout_composition():
    from bitflux.toy.data import partial_caption

    rng = random.Random(3)
    generic = 0
    for _ in range(2000):
        spec = w.random_spec(rng, rng.choice(w.CATEGORIES))
        text = partial_caption(rng, spec, 0.5)
        full = w.caption_spec(spec)
        if text is None:  # only uncoloured held-out specs have no partial caption
            assert spec.category in (w.Category.SINGLE_OBJECT, w.Category.TWO_OBJECT) and w.names_heldout(full)
            continue
        assert not w.names_heldout(text)
        # the same words, except that some shape names became "object(s)"
        for t, f in zip(text.split(), full.split(), strict=True):
            assert t == f or (t.rstrip("s") == w.GENERIC and f.rstrip("s") in w.SHAPES)
        generic += w.GENERIC in text
        if any((o.color, o.shape) in w.HELDOUT_COLOR_SHAPE for o in spec.objects):
            assert w.GENERIC in text
    assert 300 < generic < 1500


def test_partial_training_data_shows_heldout_pairs_but_never_names_them():
    from bitflux.toy.build import build_tokenizer
    from bitflux.toy.data import make_data

    d = make_data(200, 0, build_tokenizer("clip", generic=True), build_tokenizer("t5", generic=True), partial=0.25)
    assert not any(w.names_heldout(t) for t in d.captions)
    assert any(w.GENERIC in t for t in d.captions)
    assert (d.t5_ids == 1).sum() == 0  # no <unk>: "object(s)" are in the vocabulary


def test_absolute_scenes_put_the_object_at_the_named_edge():
    from bitflux.toy.data import absolute_scene
    from bitflux.toy.scorer import detect

    rng = random.Random(4)
    seen = set()
    for _ in range(300):
        scene, text = absolute_scene(rng)
        (obj,) = scene.objects
        words = text.split()
        assert not w.names_heldout(text) and set(words) <= set(w.vocabulary())
        rel = next(r for r in w.Relation if text.endswith(r.value.removesuffix(" of")))
        seen.add(rel)
        assert w.parse_prompt(text.removesuffix(" " + rel.value.removesuffix(" of"))) == scene.spec
        row, col = obj.cell
        assert {w.Relation.LEFT: col == 0, w.Relation.RIGHT: col == w.GRID - 1,
                w.Relation.ABOVE: row == 0, w.Relation.BELOW: row == w.GRID - 1}[rel], (text, obj.cell)
        (det,) = detect(w.render(scene))  # the scene is drawn where the caption says
        assert (det.color, det.shape) == (obj.color, obj.shape)
        assert abs(det.x - obj.centre[0]) < 3 and abs(det.y - obj.centre[1]) < 3  # cells are 16 px apart
    assert seen == set(w.Relation)


def test_absolute_share_of_training_data():
    from bitflux.toy.build import build_tokenizer
    from bitflux.toy.data import make_data

    d = make_data(400, 0, build_tokenizer("clip"), build_tokenizer("t5"), absolute=0.25)
    bare = [t for t in d.captions if t.endswith(("to the left", "to the right", "above", "below"))]
    assert 60 < len(bare) < 140
    assert not any(w.names_heldout(t) for t in d.captions)
    assert (d.t5_ids == 1).sum() == 0  # no <unk>: the vocabulary is unchanged


def test_canonical_relation_scenes_still_satisfy_their_prompt():
    from bitflux.toy.data import canonical_scene
    from bitflux.toy.scorer import score

    rng = random.Random(6)
    for _ in range(100):
        scene = canonical_scene(w.sample_scene(rng, w.Category.POSITION))
        a, b = scene.objects
        assert w._relation_holds(scene.spec.relation, a.cell, b.cell) and a.cell != b.cell
        assert score(w.render(scene), scene.spec)


def test_canonical_share_of_relation_scenes():
    from bitflux.toy.data import CANONICAL, _scenes

    for share, lo, hi in ((1.0, 1.0, 1.0), (0.5, 0.3, 0.7), (0.0, 0.0, 0.05)):
        scenes, caps = _scenes(600, random.Random(0), 0.0, canonical=share)
        rel = [sc for sc in scenes if sc.spec.category == w.Category.POSITION]
        at = [tuple(o.cell for o in sc.objects) == CANONICAL[sc.spec.relation] for sc in rel]
        assert len(rel) > 60 and lo <= np.mean(at) <= hi, (share, np.mean(at))
        assert caps == [w.caption(sc) for sc in scenes]


def test_parse_round_trip():
    rng = random.Random(1)
    for _ in range(500):
        spec = w.sample_spec(rng, rng.choice(w.CATEGORIES), rng.choice(["train", "heldout"]))
        text = w.caption_spec(spec)
        assert w.parse_prompt(text) == spec
        assert w.parse_prompt("  " + text.upper() + ". ") == spec


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a dog",
        "five red circles",
        "two red circle",
        "one red circles",
        "a red circle and a blue circle",
        "a red circle and a red square",
        "a red circle and a square",
        "a red circle to the left of a red square",
        "a circle to the left of a square",
        "a red circle near a blue square",
    ],
)
def test_out_of_grammar_prompt_raises_typed_error(bad):
    with pytest.raises(w.PromptError) as e:
        w.parse_prompt(bad)
    assert isinstance(e.value, BitfluxError)


def test_grammar_covers_six_categories():
    assert w.parse_prompt("a circle").category == w.Category.SINGLE_OBJECT
    assert w.parse_prompt("a circle and a square").category == w.Category.TWO_OBJECT
    assert w.parse_prompt("three red triangles").objects[0].count == 3
    assert w.parse_prompt("a cyan diamond").category == w.Category.COLORS
    p = w.parse_prompt("a red circle to the left of a blue square")
    assert p.category == w.Category.POSITION and p.relation == w.Relation.LEFT
    assert w.parse_prompt("a red circle and a blue square").category == w.Category.COLOR_ATTR
    assert len(w.SHAPES) >= 4 and len(w.COLORS) >= 6
