"""The checks diffusers makes of its own quantization backends (bnb, torchao, quanto), for bitflux.

A tiny FLUX transformer is saved dense, then quantised while loading through
`from_pretrained(..., quantization_config=BitfluxConfig())`: memory footprint, kept-module dtype,
dtype casts and device moves, serialization round trip, LoRA, compile.
"""

from __future__ import annotations

import pytest
import torch
from conftest import flux_inputs, tiny_flux
from diffusers import FluxTransformer2DModel
from torch import nn

import bitflux
from bitflux import BitfluxConfig, TernaryLinear


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("dense") / "transformer"
    tiny_flux(dtype=torch.bfloat16).save_pretrained(path)
    return path


def _quantised(dense_dir, **kwargs) -> nn.Module:  # noqa: ANN001
    return FluxTransformer2DModel.from_pretrained(dense_dir, quantization_config=BitfluxConfig(), **kwargs).eval()


def _out(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def test_memory_footprint_smaller(dense_dir) -> None:  # noqa: ANN001
    dense = FluxTransformer2DModel.from_pretrained(dense_dir, torch_dtype=torch.bfloat16)
    quant = _quantised(dense_dir, torch_dtype=torch.bfloat16)
    ratio = dense.get_memory_footprint() / quant.get_memory_footprint()
    # block Linears shrink ~7x (2bit codes + bf16 scales); the kept embedders stay bf16
    assert ratio > 2.0, ratio
    assert any(isinstance(m, TernaryLinear) for m in quant.modules())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kept_modules_dtype(dense_dir, dtype: torch.dtype) -> None:  # noqa: ANN001
    model = _quantised(dense_dir, torch_dtype=dtype)
    for name, mod in model.named_modules():
        if isinstance(mod, TernaryLinear):
            assert mod.qweight.dtype == torch.uint8 and mod.scale.dtype == torch.bfloat16
            assert mod.bias is None or mod.bias.dtype == dtype
        elif isinstance(mod, nn.Linear):
            assert mod.weight.dtype == dtype, name
    assert set(model.config.quantization_config.modules_not_converted) == {
        n for n, m in model.named_modules() if type(m) is nn.Linear
    }


def test_dtype_cast_and_device_move_keep_packed_tensors(dense_dir) -> None:  # noqa: ANN001
    model = _quantised(dense_dir, torch_dtype=torch.bfloat16)
    inputs = flux_inputs(model)
    layer = next(m for m in model.modules() if isinstance(m, TernaryLinear))
    codes, scale = layer.qweight.clone(), layer.scale.clone()
    model.to(torch.float32)
    model.to("cpu")
    assert torch.equal(layer.qweight, codes) and torch.equal(layer.scale, scale)
    assert layer.scale.dtype == torch.bfloat16 and layer.bias.dtype == torch.float32
    assert torch.isfinite(_out(model, flux_inputs(model))).all()
    model.to(torch.bfloat16)
    assert torch.isfinite(_out(model, inputs)).all()


def test_serialization_round_trip(dense_dir, tmp_path) -> None:  # noqa: ANN001
    model = _quantised(dense_dir, torch_dtype=torch.bfloat16)
    inputs = flux_inputs(model)
    want = _out(model, inputs)
    model.save_pretrained(tmp_path / "q")
    again = FluxTransformer2DModel.from_pretrained(tmp_path / "q", torch_dtype=torch.bfloat16).eval()
    assert again.config.quantization_config.quant_method == "bitflux"
    assert torch.equal(_out(again, inputs), want)
    assert torch.equal(_out(bitflux.load(tmp_path / "q"), inputs), want)


def test_lora_and_compile_on_from_pretrained_model(dense_dir) -> None:  # noqa: ANN001
    pytest.importorskip("peft")
    from peft import LoraConfig

    model = _quantised(dense_dir, torch_dtype=torch.float32)
    inputs = flux_inputs(model)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k"], init_lora_weights=False))
    model.requires_grad_(False)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    want = _out(model, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(**inputs, return_dict=False)[0]
    assert torch.equal(out.detach(), want)
    out.square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
