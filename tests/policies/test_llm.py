"""A transformers causal LM (tiny Llama and Qwen2 configs built in code) through the same
`bitflux.quantize` mechanism: decoder layers' Linears ternary, embeddings and lm_head kept."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import dequantized_reference
from torch import nn

import bitflux
from bitflux import QuantConfig, TernaryLinear
from bitflux.policies import get_policy, policy_for

transformers = pytest.importorskip("transformers")

SIZES = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def tiny_lm(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES, tie_word_embeddings=False))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SIZES, tie_word_embeddings=False))
    return model.float().eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_llm_quantised_forward_equals_dequantised_reference(name: str) -> None:
    model = tiny_lm(name)
    assert policy_for(model) is get_policy(name)
    float_model = copy.deepcopy(model)
    n_layer_linears = sum(isinstance(m, nn.Linear) for m in model.model.layers.modules())
    q = bitflux.quantize(model, QuantConfig(policy=name))
    bitflux.set_backend(q, "reference")
    assert sum(isinstance(m, TernaryLinear) for m in q.modules()) == n_layer_linears == 2 * 7
    assert isinstance(q.lm_head, nn.Linear) and isinstance(q.model.embed_tokens, nn.Embedding)
    assert q.bitflux_config.modules_not_converted == ("lm_head",)
    ids = torch.randint(0, SIZES["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    y = logits(q, ids)
    torch.testing.assert_close(y, logits(dequantized_reference(float_model, q), ids), rtol=1e-4, atol=1e-5)
    assert (y - logits(float_model, ids)).abs().max() > 1e-3  # ternarisation changed the model
