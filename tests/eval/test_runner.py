"""Pure helpers of the eval runner: PSNR, per-category summary, grids."""

from __future__ import annotations

import numpy as np

from bitflux.eval.grid import make_grid, pick_rows
from bitflux.eval.runner import PromptItem, fidelity, psnr, summarize
from bitflux.toy.world import Category


def test_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    assert psnr(a, a) == 100.0
    b = a.copy()
    b[0, 0, 0] = 255  # mse = 255^2 / 48
    assert abs(psnr(a, b) - 10 * np.log10(48)) < 1e-9


def test_summarize_is_mean_over_categories():
    items = [PromptItem("a circle", Category.SINGLE_OBJECT)] * 3 + [PromptItem("a red circle", Category.COLORS)]
    v = np.array([[True, True, False, False]])
    res = summarize(v, items)
    assert res["single_object"] == round(2 / 3, 4) and res["colors"] == 0.0
    assert res["overall"] == round((2 / 3) / 2, 4)


def test_fidelity_agreement():
    imgs = np.zeros((1, 2, 4, 4, 3), np.uint8)
    f = fidelity(imgs, imgs, np.array([[True, False]]), np.array([[True, True]]))
    assert f == {"psnr_db": 100.0, "verdict_agreement": 0.5}


def test_grid_layout_and_rows():
    from bitflux.eval.grid import GAP

    cols = {"a": np.zeros((3, 32, 32, 3), np.uint8), "b": np.full((3, 32, 32, 3), 200, np.uint8)}
    long = "a green triangle to the left of a yellow diamond and three purple circles"
    g = make_grid(cols, ["p1", long, "p3"])
    tile = 32 * 4
    assert g.width == tile + 2 * (tile + GAP)  # the prompt column is one tile wide, however long the prompt
    head = g.height - 3 * (tile + GAP)
    assert 0 < head < tile
    px = np.asarray(g)
    assert (px[head + tile // 2, tile + GAP + tile // 2] == 0).all()  # column a, row 0
    assert (px[head + 2 * (tile + GAP) + tile // 2, tile + 2 * GAP + tile + tile // 2] == 200).all()  # column b, row 2
    assert (px[head : head + tile, :tile] < 128).any()  # the long prompt is drawn, wrapped into its column
    assert pick_rows(["x", "x", "y", "z"], 3) == [0, 2, 3]


def test_ratio_interval_is_paired_and_brackets_the_ratio():
    from bitflux.eval.runner import ratio_interval

    rng = np.random.default_rng(0)
    items = [PromptItem(f"p{i}", c) for c in Category for i in range(20)]
    ref = rng.random((4, len(items))) < 0.6
    same = ratio_interval(ref, ref, items)
    assert same["ratio"] == 1.0 and same["ratio_ci95"] == [1.0, 1.0]  # paired: identical verdicts never differ
    worse = ref & (rng.random(ref.shape) < 0.8)  # drops ~20 % of the reference's successes
    r = ratio_interval(worse, ref, items)
    lo, hi = r["ratio_ci95"]
    assert lo <= r["ratio"] <= hi < 1.0
    assert abs(r["ratio"] - summarize(worse, items)["overall"] / summarize(ref, items)["overall"]) < 1e-3
    few = ratio_interval(worse[:, ::4], ref[:, ::4], items[::4])  # fewer prompts: a wider interval
    assert few["ratio_ci95"][1] - few["ratio_ci95"][0] > hi - lo
