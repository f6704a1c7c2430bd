"""Teacher fragility: seeded weight noise on exactly the ternarised Linears, and the rows that score it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitflux.eval.fragility import compare, fragility_rows, perturb
from bitflux.eval.runner import PromptItem, load_prompts
from bitflux.policies import get_policy
from bitflux.toy.world import Category
from conftest import tiny_flux


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_perturb_touches_exactly_the_policy_linears_at_the_asked_level() -> None:
    model = tiny_flux(num_attention_heads=4, attention_head_dim=32)  # 128-wide blocks: std estimates are tight
    before = _weights(model)
    n = perturb(model, 0.2, seed=3)
    convert, _ = get_policy("flux").select(model)
    assert n == len(convert) > 0
    selected = {f"{name}.weight" for name in convert}
    for name, p in model.named_parameters():
        delta = p.detach() - before[name]
        if name in selected:
            rel = float(delta.std() / before[name].std())
            assert 0.17 < rel < 0.23, (name, rel)
        else:  # embedders, norm_out, proj_out, and every bias stay exact
            assert torch.equal(delta, torch.zeros_like(delta)), name


def test_perturb_is_seeded_per_matrix_and_zero_is_identity() -> None:
    a, b, c = tiny_flux(), tiny_flux(), tiny_flux()
    clean = _weights(a)
    perturb(a, 0.0)
    assert all(torch.equal(p, clean[n]) for n, p in a.named_parameters())
    perturb(a, 0.1, seed=1)
    perturb(b, 0.1, seed=1)
    perturb(c, 0.1, seed=2)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    assert any(not torch.equal(wa[n], wc[n]) for n in wa)
    with pytest.raises(ValueError):
        perturb(a, -0.1)


def test_compare_ratios_per_category() -> None:
    items = [PromptItem("a circle", Category.SINGLE_OBJECT), PromptItem("two purple diamonds", Category.COUNTING)]
    ref = np.zeros((2, 2, 48, 48, 3), np.uint8)  # 2 seeds x 2 prompts of blank images: the scorer fails them all
    row = compare("same", ref, ref, np.array([[True, True], [True, False]]), items)
    # the images are blank so every verdict is False: 0 of the reference's 2/2 and 1/2
    assert row["single_object"] == 0.0 and row["single_object_ratio"] == 0.0 and row["counting_ratio"] == 0.0
    assert row["psnr_db"] == 100.0 and row["verdict_agreement"] == 0.25 and row["worst_category_ratio"] == 0.0


@pytest.mark.slow
def test_rows_on_the_bundled_toy() -> None:
    torch.set_num_threads(1)
    items = load_prompts("heldout", 6)
    rows = fragility_rows("toy", [], [0.0, 0.5, 0.0], items, seeds=1)
    clean, noisy, again = rows
    assert clean["psnr_db"] == 100.0 and clean["ratio"] == 1.0 and clean["verdict_agreement"] == 1.0
    assert noisy["psnr_db"] < 60 and noisy["sigma"] == 0.5
    assert again == {**clean}  # the teacher is restored after each noisy row
