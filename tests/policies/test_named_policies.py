"""Each named policy on a tiny model of its class: what it keeps, and a quantised forward that
equals the float model with every ternarised Linear's weight replaced by its dequantised weight."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import BUILDERS, build, dequantized_reference, forward

import bitflux
from bitflux import QuantConfig, TernaryLinear
from bitflux.policies import generic, get_policy, policy_for

# Linears each policy must keep in full precision (the reasons are in each policy's file).
KEPT = {
    "flux": {"x_embedder", "context_embedder", "norm_out.linear", "proj_out", "time_text_embed.guidance_embedder.linear_1"},
    "flux2": {"double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
              "single_stream_modulation.linear", "x_embedder", "context_embedder", "norm_out.linear", "proj_out"},
    "sd3": {"context_embedder", "norm_out.linear", "proj_out", "time_text_embed.text_embedder.linear_1"},
    "qwenimage": {"img_in", "txt_in", "norm_out.linear", "proj_out", "time_text_embed.timestep_embedder.linear_1"},
    "wan": {"condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1", "proj_out"},
    "chroma": {"distilled_guidance_layer.in_proj", "distilled_guidance_layer.out_proj", "x_embedder",
               "context_embedder", "proj_out"},
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_policy_keeps_the_stated_linears_and_ternarises_the_blocks(name: str) -> None:
    model, _ = build(name)
    policy = get_policy(name)
    assert policy.model_class == type(model).__name__
    convert, keep = policy.select(model)
    assert KEPT[name] <= set(keep), KEPT[name] - set(keep)
    blocks = {n for n in convert if "blocks." in n}
    assert convert and blocks == set(convert)  # only block Linears are ternarised ...
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n for n in linears if "blocks." in n} == set(convert)  # ... and every one of them


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_quantised_forward_equals_dequantised_reference(name: str) -> None:
    model, kw = build(name)
    float_model = copy.deepcopy(model)
    q = bitflux.quantize(model, QuantConfig(policy=name, activations="bf16"))
    bitflux.set_backend(q, "reference")
    assert q.bitflux_config.policy == name
    n_ternary = sum(isinstance(m, TernaryLinear) for m in q.modules())
    assert n_ternary == len(get_policy(name).select(float_model)[0])
    y = forward(q, kw)
    ref = forward(dequantized_reference(float_model, q), kw)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    # Ternarisation really changed the model, so the equality above is not vacuous.
    assert (y - forward(float_model, kw)).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(set(BUILDERS) - {"sd3"}))
def test_named_policy_selects_what_the_generic_one_does(name: str) -> None:
    """For classes with `_repeated_blocks`, the named policy is the generic choice, pinned as data."""
    model, _ = build(name)
    assert get_policy(name).select(model) == generic(model).select(model)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_policy_for_picks_the_named_policy_of_the_class(name: str) -> None:
    model, _ = build(name)
    assert policy_for(model) is get_policy(name)
    assert policy_for(model, "auto") is get_policy(name)
