"""Every named policy's tiny model survives save and diffusers' `<Class>.from_pretrained` unchanged:
same class, same ternary layers, and a forward equal to the model saved and to the dequantised reference."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import BUILDERS, build, dequantized_reference, forward

import bitflux
from bitflux import QuantConfig, TernaryLinear


def _ternary(model: torch.nn.Module) -> dict[str, TernaryLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TernaryLinear)}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_save_then_from_pretrained_round_trip(name: str, tmp_path) -> None:
    model, kw = build(name)
    float_model = copy.deepcopy(model)
    q = bitflux.quantize(model, QuantConfig(policy=name, activations="bf16", format="base3" if name in ("sd3", "wan") else "2bit"))
    bitflux.set_backend(q, "reference")
    out = bitflux.save(q, tmp_path / "q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitflux" and qc["policy"] == name

    loaded = type(q).from_pretrained(out)  # the ordinary diffusers class, through the bitflux backend
    bitflux.set_backend(loaded, "reference")
    assert set(_ternary(loaded)) == set(_ternary(q))
    for n, m in _ternary(loaded).items():
        assert torch.equal(m.qweight, _ternary(q)[n].qweight) and torch.equal(m.scale, _ternary(q)[n].scale)
    y = forward(loaded, kw)
    assert torch.equal(y, forward(q, kw))
    assert torch.equal(forward(bitflux.load(out, backend="reference"), kw), y)  # bitflux's own front-end too
    torch.testing.assert_close(y, forward(dequantized_reference(float_model, q), kw), rtol=1e-4, atol=1e-5)

    again = tmp_path / "again"
    loaded.save_pretrained(again)  # diffusers' own save of a loaded model writes a bitflux checkpoint too
    assert torch.equal(forward(bitflux.set_backend(type(q).from_pretrained(again), "reference"), kw), y)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_quantise_while_loading_equals_bitflux_quantize(name: str, tmp_path) -> None:
    """`from_pretrained(dense_dir, quantization_config=BitfluxConfig())` picks the class's policy by itself."""
    model, kw = build(name)
    model.save_pretrained(tmp_path / "dense")
    loaded = type(model).from_pretrained(tmp_path / "dense", quantization_config=bitflux.BitfluxConfig())
    q = bitflux.quantize(model, QuantConfig(policy=name))
    assert loaded.bitflux_config.policy == name
    assert set(_ternary(loaded)) == set(_ternary(q))
    for n, m in _ternary(loaded).items():
        assert torch.equal(m.qweight, _ternary(q)[n].qweight) and torch.equal(m.scale, _ternary(q)[n].scale)
    for m in (loaded, q):
        bitflux.set_backend(m, "reference")
    assert torch.equal(forward(loaded, kw), forward(q, kw))


@pytest.mark.parametrize("name", ["sd3", "wan"])
def test_inspect_predicts_the_stored_bytes_of_any_class(name: str, tmp_path) -> None:
    from bitflux.config import QuantConfig as QC
    from bitflux.inspect import inspect_path

    model, _ = build(name)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "dense")
    predicted = inspect_path(tmp_path / "dense", QC())
    assert predicted["quantized"] is False and predicted["policy"] == name
    bitflux.save(bitflux.quantize(model, QC(policy=name)), tmp_path / "q")
    stored = inspect_path(tmp_path / "q", QC())
    assert stored["quantized"] is True and stored["policy"] == name
    assert predicted["bytes"] == stored["bytes"] == stored["stored_bytes"]
