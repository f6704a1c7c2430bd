"""diffusers offloading on the ternary toy gives the same output as no offloading.

No accelerator here, so every hook runs with onload and offload device "cpu": what is checked is
that diffusers' and accelerate's hooks move, wrap and restore TernaryLinear's packed buffers and
bf16 scales correctly (tensor moves, parameter re-creation, block grouping), not memory savings.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline
from toy_model import load_toy, toy_inputs

CPU = torch.device("cpu")


def _out(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _pipe(model: torch.nn.Module) -> FluxPipeline:
    return FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=model)


SEQUENTIAL_BROKEN = pytest.mark.xfail(
    raises=TypeError, strict=True,
    reason="accelerate's sequential offload fails the same way on an unquantised diffusers model here "
    "(torch 2.13 CPU: Parameter re-created as a plain Tensor for the kept nn.Linear layers); see "
    "test_sequential_offload_fails_without_bitflux_too",
)


@pytest.mark.parametrize("how", ["model", pytest.param("sequential", marks=SEQUENTIAL_BROKEN)])
def test_pipeline_cpu_offload(how: str) -> None:
    model = load_toy()
    inputs = toy_inputs(model)
    want = _out(model, inputs)
    pipe = _pipe(model)
    if how == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        pipe.enable_sequential_cpu_offload(device="cpu")
    assert hasattr(model, "_hf_hook")  # accelerate's hooks are really on the transformer
    assert torch.equal(_out(model, inputs), want)
    assert torch.equal(_out(model, inputs), want)  # and again, after the hooks offloaded once


@pytest.mark.parametrize("kind", ["block_level", "leaf_level"])
def test_group_offload(kind: str) -> None:
    model = load_toy()
    inputs = toy_inputs(model)
    want = _out(model, inputs)
    extra = {"num_blocks_per_group": 1} if kind == "block_level" else {}
    model.enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type=kind, use_stream=False, **extra)
    assert torch.equal(_out(model, inputs), want)
    assert torch.equal(_out(model, inputs), want)


def test_sequential_offload_fails_without_bitflux_too() -> None:
    """The upstream failure the xfail above stands for: no TernaryLinear involved."""
    from conftest import flux_inputs, tiny_flux

    model = tiny_flux()
    _pipe(model).enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(TypeError):
        _out(model, flux_inputs(model))
