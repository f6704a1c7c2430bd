"""A transformers causal LM (tiny Llama and Qwen2 configs built in code) quantised by the same
policies: through `bitflux.quantize`, and through transformers' own quantizer hooks
(`bitflux.transformers_backend`): decoder layers' Linears ternary, embeddings and lm_head kept."""

from __future__ import annotations

import copy
import json

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
    q = bitflux.quantize(model, QuantConfig(policy=name, activations="bf16"))
    bitflux.set_backend(q, "reference")
    assert sum(isinstance(m, TernaryLinear) for m in q.modules()) == n_layer_linears == 2 * 7
    assert isinstance(q.lm_head, nn.Linear) and isinstance(q.model.embed_tokens, nn.Embedding)
    assert q.bitflux_config.modules_not_converted == ("lm_head",)
    ids = torch.randint(0, SIZES["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    y = logits(q, ids)
    torch.testing.assert_close(y, logits(dequantized_reference(float_model, q), ids), rtol=1e-4, atol=1e-5)
    assert (y - logits(float_model, ids)).abs().max() > 1e-3  # ternarisation changed the model


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_llm_through_transformers_quantizer_hooks(name: str, tmp_path) -> None:
    """from_pretrained(dense, quantization_config=...) ternarises while loading, exactly as
    bitflux.quantize does; save_pretrained writes a checkpoint that from_pretrained loads packed."""
    from bitflux.transformers_backend import BitfluxLMConfig, attach

    model = tiny_lm(name)
    cls = type(model)
    model.save_pretrained(tmp_path / "dense")
    loaded = cls.from_pretrained(tmp_path / "dense", quantization_config=BitfluxLMConfig())  # policy "auto"
    q = bitflux.quantize(model, QuantConfig(policy=name))
    assert loaded.bitflux_config.policy == name
    ternary = {n: m for n, m in q.named_modules() if isinstance(m, TernaryLinear)}
    for n, m in loaded.named_modules():
        if isinstance(m, TernaryLinear):
            assert "weight" not in m._parameters  # the pending dense weight is gone
            assert torch.equal(m.qweight, ternary.pop(n).qweight)
    assert not ternary  # the same layers, no more, no fewer
    ids = torch.randint(0, SIZES["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(2))
    y = logits(q, ids)
    assert torch.equal(logits(loaded, ids), y)

    attach(q).save_pretrained(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["policy"] == name
    again = cls.from_pretrained(tmp_path / "q")
    assert isinstance(again.model.layers[0].mlp.up_proj, TernaryLinear)
    assert torch.equal(logits(again, ids), y)
    loaded.save_pretrained(tmp_path / "q2")  # a model quantised while loading saves too
    assert torch.equal(logits(cls.from_pretrained(tmp_path / "q2"), ids), y)
