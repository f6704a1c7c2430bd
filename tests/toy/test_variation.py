"""World variations: another held-out split or palette, recorded in a trained pipeline and picked
up by eval; the default world's data, prompts and scores stay byte-identical."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random

import numpy as np
import pytest

from bitflux.errors import ModelError
from bitflux.toy import scorer, world as w
from bitflux.toy.build import build_tokenizer
from bitflux.toy.data import make_data, make_vae_images
from bitflux.toy.variants import HELDOUT_B, PALETTE_B, WORLDS, get_world, world_of


def _digest(*parts) -> str:
    m = hashlib.sha256()
    for p in parts:
        if hasattr(p, "numpy"):
            p = p.numpy()
        m.update(np.ascontiguousarray(p).tobytes() if isinstance(p, np.ndarray) else json.dumps(p).encode())
    return m.hexdigest()[:16]


def test_default_world_is_byte_identical_to_before_worlds_existed():
    """Digests taken before `World` was introduced: the bundled recipe's data, the VAE images, the
    prompt lists, the vocabulary and the scorer's detections must not move."""
    d = make_data(48, 0, build_tokenizer("clip"), build_tokenizer("t5"), 0.0, 0.15, 0.5)
    assert _digest(d.images, d.captions, d.clip_ids, d.t5_ids) == "0ed6b59f2fd3799a"
    d = make_data(32, 1, build_tokenizer("clip", True), build_tokenizer("t5", True), partial=0.25)
    assert _digest(d.images, d.captions, d.clip_ids, d.t5_ids) == "cfa21d435b43360e"
    assert _digest(make_vae_images(16, 0)) == "062ca87af3b82ff5"
    items = w.prompts("heldout", 96, 0) + w.prompts("train", 256, 0)
    assert _digest([[t, c.value] for t, c in items]) == "be6887ebb9e712ca"
    assert _digest(w.vocabulary() + w.vocabulary(True)) == "a02423a9159475d0"
    rng = random.Random(5)
    scenes = [w.sample_scene(rng, c, "heldout") for c in w.CATEGORIES for _ in range(3)]
    dets = [[(d.color, d.shape, round(d.x, 3), round(d.y, 3), d.area) for d in scorer.detect(w.render(s))] for s in scenes]
    assert _digest(dets) == "c201abe1ecb0b491"
    # the explicit default world is the module constants
    assert w.DEFAULT_WORLD.palette == w.COLORS and w.DEFAULT_WORLD.heldout_color_shape == w.HELDOUT_COLOR_SHAPE
    assert w.prompts("heldout", 30, 2, w.DEFAULT_WORLD) == w.prompts("heldout", 30, 2)


def test_registry_and_cli_choices_agree():
    from bitflux.toy.commands import _WORLD_ARG

    assert set(_WORLD_ARG["choices"]) == set(WORLDS) and _WORLD_ARG["default"] == "default"
    assert get_world("palette-b") is PALETTE_B
    with pytest.raises(ModelError, match="palette-b"):
        get_world("palette-z")


def _compositions(world: w.World, split: str, n: int) -> set[str]:
    return {t for t, c in w.prompts(split, n, 0, world) if c != w.Category.SINGLE_OBJECT}


def test_heldout_b_holds_out_other_pairs_and_orders():
    assert HELDOUT_B.palette == w.COLORS
    assert not HELDOUT_B.heldout_color_shape & w.HELDOUT_COLOR_SHAPE
    assert not HELDOUT_B.heldout_order & w.HELDOUT_ORDER
    held, train = _compositions(HELDOUT_B, "heldout", 300), _compositions(HELDOUT_B, "train", 600)
    assert held and train and not held & train
    for t in held:
        assert w.is_heldout(w.parse_prompt(t), HELDOUT_B)
    for t in train:
        assert not w.is_heldout(w.parse_prompt(t), HELDOUT_B) and not w.names_heldout(t, HELDOUT_B)
    # the default held-out compositions are training material in heldout-b, and vice versa
    assert any(w.is_heldout(w.parse_prompt(t)) for t in train)
    assert held != _compositions(w.DEFAULT_WORLD, "heldout", 300)
    assert w.names_heldout("a red square and a blue circle", HELDOUT_B)
    assert not w.names_heldout("a red square and a blue circle")
    assert w.names_heldout("a diamond and a circle", HELDOUT_B) and not w.names_heldout("a circle and a square", HELDOUT_B)


@pytest.mark.parametrize("partial", [0.0, 0.3])
def test_varied_training_data_never_names_its_heldout_compositions(partial):
    for world in (HELDOUT_B, PALETTE_B):
        tok = dict(generic=partial > 0, world=world)
        d = make_data(150, 0, build_tokenizer("clip", **tok), build_tokenizer("t5", **tok), partial, world=world)
        assert not any(w.names_heldout(t, world) for t in d.captions)
        assert (d.t5_ids == 1).sum() == 0  # no <unk>: the world's words are in its vocabulary
        if partial == 0:  # grammar captions: each parses in the world and lies in its training split
            assert not any(w.is_heldout(w.parse_prompt(t, world), world) for t in d.captions)


def test_palette_b_has_its_own_colours_and_words():
    assert len(PALETTE_B.colors) == len(w.COLORS)
    assert not set(PALETTE_B.palette) & set(w.COLORS)
    assert not set(PALETTE_B.palette.values()) & set(w.COLORS.values())
    vocab = w.vocabulary(world=PALETTE_B)
    assert set(PALETTE_B.palette) <= set(vocab) and not set(w.COLORS) & set(vocab)
    spec = w.parse_prompt("two orange squares", PALETTE_B)
    assert spec.objects[0].color == "orange"
    with pytest.raises(w.PromptError, match="palette-b"):
        w.parse_prompt("a red circle", PALETTE_B)
    with pytest.raises(w.PromptError):
        w.parse_prompt("a orange circle")
    # a rendered object is filled with the palette-b colour
    scene = w.Scene(spec, (w.Placed("square", "orange", (1, 1)),))
    assert tuple(np.asarray(w.render(scene, PALETTE_B))[24, 24]) == PALETTE_B.palette["orange"]
    # held-out pairs: the default's with each colour turned to its palette-b neighbour
    assert {s for _, s in PALETTE_B.heldout_color_shape} == {s for _, s in w.HELDOUT_COLOR_SHAPE}
    assert {c for c, _ in PALETTE_B.heldout_color_shape} <= set(PALETTE_B.palette)


def _blurred(img, rng: np.random.Generator) -> np.ndarray:
    """A softened, slightly noisy copy: generated images are not crisp renders."""
    from PIL import ImageFilter

    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32)
    return (arr + rng.normal(0, 4, arr.shape)).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("category", list(w.CATEGORIES))
def test_scorer_recognises_palette_b_renders(category):
    rng, noise = random.Random(f"pal-b-{category.value}"), np.random.default_rng(0)
    ok = wrong_default = 0
    n = 40
    for i in range(n):
        s = w.sample_scene(rng, category, "heldout" if i % 2 else "train", PALETTE_B)
        img = w.render(s, PALETTE_B)
        ok += scorer.score(img, s.spec, PALETTE_B) and scorer.score(_blurred(img, noise), s.spec, PALETTE_B)
        dets = scorer.detect(img)  # the default palette's scorer sees other colours
        wrong_default += any(d.color != o.color for d, o in zip(sorted(dets, key=lambda d: (d.y, d.x)), s.objects))
    assert ok / n >= 0.97
    if category != w.Category.SINGLE_OBJECT:
        assert wrong_default == n  # default colour words never match palette-b objects


def test_scorer_rejects_wrong_palette_b_colours():
    rng = random.Random(9)
    for _ in range(40):
        s = w.sample_scene(rng, w.Category.COLORS, "train", PALETTE_B)
        (o,) = s.spec.objects
        other = rng.choice([c for c in PALETTE_B.palette if c != o.color])
        assert not scorer.score(w.render(s, PALETTE_B), dataclasses.replace(s.spec, objects=(dataclasses.replace(o, color=other),)), PALETTE_B)


def test_world_of_reads_the_record(tmp_path):
    assert world_of(tmp_path) is w.DEFAULT_WORLD  # no bitflux_toy.json: not a toy, default world
    info = tmp_path / "bitflux_toy.json"
    info.write_text(json.dumps({"config": {"seed": 0}}))
    assert world_of(tmp_path) is w.DEFAULT_WORLD  # trained before worlds existed
    info.write_text(json.dumps({"config": {"world": "heldout-b"}}))
    assert world_of(tmp_path) is HELDOUT_B
    info.write_text(json.dumps({"world": PALETTE_B.record()}))
    assert world_of(tmp_path) is PALETTE_B
    changed = {**PALETTE_B.record(), "colors": {**PALETTE_B.record()["colors"], "orange": [1, 2, 3]}}
    info.write_text(json.dumps({"world": changed}))
    with pytest.raises(ModelError, match="another definition"):
        world_of(tmp_path)
    info.write_text(json.dumps({"world": {"name": "nope"}}))
    with pytest.raises(ModelError, match="unknown toy world"):
        world_of(tmp_path)
    info.write_text("{not json")
    with pytest.raises(ModelError, match="unreadable"):
        world_of(tmp_path)


def test_load_prompts_uses_the_world(tmp_path):
    from bitflux.eval.runner import load_prompts, score_images

    items = load_prompts("heldout", 12, 0, PALETTE_B)
    assert all(it.world is PALETTE_B for it in items)
    assert any(c in it.text for it in items for c in PALETTE_B.palette)
    f = tmp_path / "p.txt"
    f.write_text("a teal diamond\ntwo pink circles\n")
    items = load_prompts(str(f), world=PALETTE_B)
    assert [it.category for it in items] == [w.Category.COLORS, w.Category.COUNTING]
    # score_images scores each prompt in its world: ground-truth palette-b renders pass
    rng = random.Random(0)
    imgs = np.stack([np.asarray(w.render(w.scene_for_spec(rng, w.parse_prompt(it.text, PALETTE_B), PALETTE_B), PALETTE_B)) for it in items])
    assert score_images(imgs[None], items).all()


def test_a_tiny_palette_b_run_records_its_world_and_eval_uses_it(tmp_path, capsys):
    from bitflux.cli import main
    from bitflux.eval.runner import world_for
    from bitflux.toy.train import TrainConfig, _check_world, train

    cfg = TrainConfig(
        minutes=5, n_scenes=16, n_vae_images=16, vae_steps=2, steps=2, decoder_steps=1, vae_batch=2, batch=2,
        ckpt_every_s=1e9, world="palette-b",
    )
    out = train(tmp_path / "toy-b", cfg)
    rec = json.loads((out / "bitflux_toy.json").read_text())
    assert rec["world"] == PALETTE_B.record() and rec["config"]["world"] == "palette-b"
    assert world_of(out) is PALETTE_B and world_for(str(out)) is PALETTE_B
    vocab = json.loads((out / "tokenizer_2" / "tokenizer.json").read_text())["model"]["vocab"]
    assert "orange" in vocab and "red" not in vocab
    # a resume must ask for the same world; a run started before worlds existed resumes as default
    assert json.loads((tmp_path / "toy-b.work" / "world.json").read_text()) == {"name": "palette-b"}
    (tmp_path / "r.work").mkdir()
    (tmp_path / "r.work" / "world.json").write_text(json.dumps({"name": "palette-b"}))
    with pytest.raises(ModelError, match="--world palette-b"):
        train(tmp_path / "r", dataclasses.replace(cfg, world="default"), resume=True)
    before = tmp_path / "before.work"  # like a run started before worlds existed: no world.json
    before.mkdir()
    _check_world(before, w.DEFAULT_WORLD, resume=True)
    assert json.loads((before / "world.json").read_text()) == {"name": "default"}
    with pytest.raises(ModelError, match="--world default"):
        _check_world(before, PALETTE_B, resume=True)
    # `bitflux calibrate OUT --prompts toy` draws the training split of OUT's world, at the toy's eval settings
    from bitflux.calibrate.command import eval_settings, read_prompts

    calib = read_prompts("toy", 24, 0, str(out))
    assert calib == [t for t, _ in w.prompts("train", 24, 0, PALETTE_B)] and calib != read_prompts("toy", 24, 0)
    assert eval_settings(str(out))[0]["height"] == w.IMAGE_SIZE
    assert main(["eval", str(out), "--n", "6", "--seeds", "1", "--steps", "1", "--naive", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["world"] == "palette-b" and res["reference"] == str(out)
    assert res["n_prompts"] == 6 and "ratio" in res and res["fidelity"]["psnr_db"] < 100
