"""The generic policy (Linears inside `_repeated_blocks`), its glob overrides, and `policy_for`'s choice."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import build, dequantized_reference, forward
from torch import nn

import bitflux
from bitflux import BitfluxError, ModelError, QuantConfig, TernaryLinear
from bitflux.policies import generic, get_policy, policy_for
from bitflux.policies.generic import block_globs


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.inner = Inner()  # a repeated-block class nested in a block: covered by the outer glob


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ff = nn.Linear(8, 8)


class Toy(nn.Module):
    """Blocks in a full ModuleList, in a mixed one, and alone; Linears outside any block."""

    _repeated_blocks = ["Block", "Inner"]

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.mixed = nn.ModuleList([Block(), nn.Linear(8, 8)])
        self.last = Block()
        self.out = nn.Linear(8, 4)


def test_block_globs_collapse_full_containers_and_skip_nested_blocks() -> None:
    assert block_globs(Toy(), {"Block", "Inner"}) == ("blocks.*", "mixed.0.*", "last.*")


def test_generic_selects_exactly_the_block_linears() -> None:
    convert, keep = generic(Toy()).select(Toy())
    assert keep == ["embed", "mixed.1", "out"]
    assert convert == [
        "blocks.0.attn", "blocks.0.inner.ff", "blocks.1.attn", "blocks.1.inner.ff",
        "mixed.0.attn", "mixed.0.inner.ff", "last.attn", "last.inner.ff",
    ]


def test_overrides_add_and_remove_linears() -> None:
    policy = generic(Toy(), include=("out",), exclude=("*.inner.*",))
    convert, keep = policy.select(Toy())
    assert "out" in convert and not any(".inner." in n for n in convert)
    assert {"blocks.0.inner.ff", "last.inner.ff", "embed"} <= set(keep)
    # named policies take the same overrides
    model, _ = build("flux")
    named = policy_for(model, "flux", exclude=("single_transformer_blocks.*",))
    assert named.name == "flux" and not any(n.startswith("single_") for n in named.select(model)[0])


def test_a_model_without_blocks_needs_include_globs() -> None:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(ModelError, match="declares no _repeated_blocks") as e:
        policy_for(Plain())
    assert "\n" not in str(e.value)
    assert generic(Plain(), include=("layers.*",)).select(Plain()) == (["layers.0"], [])


def test_sd3_declares_no_blocks_so_only_its_named_policy_serves_it() -> None:
    model, _ = build("sd3")
    assert model._repeated_blocks == []
    with pytest.raises(ModelError, match="SD3Transformer2DModel declares no _repeated_blocks"):
        policy_for(model, "generic")
    assert policy_for(model) is get_policy("sd3")


def test_named_policy_for_another_class_and_unknown_names_are_refused() -> None:
    model, _ = build("sd3")
    with pytest.raises(ModelError, match="policy 'flux' is for FluxTransformer2DModel, got SD3Transformer2DModel"):
        bitflux.quantize(model, QuantConfig(policy="flux"))
    assert not any(isinstance(m, TernaryLinear) for m in model.modules())  # nothing half-converted
    with pytest.raises(BitfluxError, match="unknown policy 'nope'.*generic"):
        policy_for(model, "nope")


def test_classes_without_a_named_policy_get_the_generic_one() -> None:
    from diffusers import LTXVideoTransformer3DModel

    with torch.device("meta"):
        model = LTXVideoTransformer3DModel(num_layers=2, num_attention_heads=2, attention_head_dim=8,
                                           cross_attention_dim=16, caption_channels=8)
    policy = policy_for(model)
    assert policy.name == "generic" and policy.model_class == "LTXVideoTransformer3DModel"
    assert policy.include == ("transformer_blocks.*",)
    n_block_linears = sum(isinstance(m, nn.Linear) for m in model.transformer_blocks.modules())
    bitflux.quantize(model, QuantConfig())  # meta device: shapes only
    assert model.bitflux_config.policy == "generic"
    assert sum(isinstance(m, TernaryLinear) for m in model.modules()) == n_block_linears > 0


def test_generic_quantisation_with_an_exclude_glob_equals_the_dequantised_reference() -> None:
    model, kw = build("chroma")
    float_model = copy.deepcopy(model)
    policy = policy_for(model, "generic", exclude=("*.ff_context.*",))
    q = bitflux.quantize(model, QuantConfig(activations="bf16"), policy=policy)
    bitflux.set_backend(q, "reference")
    assert isinstance(q.transformer_blocks[0].ff_context.net[2], nn.Linear)
    assert isinstance(q.transformer_blocks[0].ff.net[2], TernaryLinear)
    assert "transformer_blocks.0.ff_context.net.2" in q.bitflux_config.modules_not_converted
    torch.testing.assert_close(forward(q, kw), forward(dequantized_reference(float_model, q), kw), rtol=1e-4, atol=1e-5)
