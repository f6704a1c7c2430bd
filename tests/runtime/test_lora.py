"""LoRA on the ternary toy through peft, as diffusers drives it (no downloads: LoRAs are built in code).

Each wrapped layer must compute base(x) + weight * scale * B(A(x)) to float tolerance; adapters
toggle, combine, unload and train in every activation mode; fusing is refused in one line.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline
from torch import nn
from toy_model import load_toy, toy_inputs

import bitflux
from bitflux import ModelError, TernaryLinear

pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402

MODES = ["auto", "bf16", "int8", "fp8"]
_CFG = load_toy().config
D = _CFG.num_attention_heads * _CFG.attention_head_dim  # the bundled toy's inner width


def _pipe(model: nn.Module) -> FluxPipeline:
    return FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=model)


def _out(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _diffusers_lora(seed: int, r: int = 4) -> dict[str, torch.Tensor]:
    """A diffusers-format FLUX LoRA on ternary layers of both block kinds."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"transformer_blocks.0.attn.to_q": (D, D), "transformer_blocks.1.ff.net.2": (4 * D, D),
              "single_transformer_blocks.0.attn.to_k": (D, D), "single_transformer_blocks.1.proj_mlp": (D, 4 * D)}
    sd = {}
    for name, (k, n) in shapes.items():
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(r, k, generator=g) * 0.1
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(n, r, generator=g) * 0.1
    return sd


def _check_layer(layer: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """layer(x) == base(x) + scale * B A x, to float tolerance (1e-5 of the output scale)."""
    x = torch.randn(3, 5, layer.in_features)
    with torch.no_grad():
        got, base = layer(x), layer.base_layer(x)
    want = base + scale * (x @ a.T @ b.T)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_add_adapter_targets_ternary_layers() -> None:
    model = load_toy()
    inputs = toy_inputs(model)
    base = _out(model, inputs)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layer = model.transformer_blocks[0].attn.to_q
    assert isinstance(layer.base_layer, TernaryLinear)
    assert torch.equal(_out(model, inputs), base)  # peft initialises B = 0
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    _check_layer(layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight, 8 / 4)
    assert not torch.equal(_out(model, inputs), base)
    model.disable_adapters()
    assert torch.equal(_out(model, inputs), base)


def test_load_lora_weights_diffusers_format_set_adapters_unload() -> None:
    model = load_toy()
    inputs = toy_inputs(model)
    pipe = _pipe(model)
    base = _out(model, inputs)
    one, two = _diffusers_lora(1), _diffusers_lora(2)
    pipe.load_lora_weights(one, adapter_name="one")
    pipe.load_lora_weights(two, adapter_name="two")
    layer = model.single_transformer_blocks[1].proj_mlp
    key = "transformer.single_transformer_blocks.1.proj_mlp.lora_{}.weight"
    pipe.set_adapters(["one"], adapter_weights=[0.7])
    _check_layer(layer, one[key.format("A")], one[key.format("B")], 0.7)
    pipe.set_adapters(["one", "two"], adapter_weights=[0.5, 1.5])  # several at once: the sum
    x = torch.randn(2, layer.in_features)
    with torch.no_grad():
        got = layer(x)
        want = layer.base_layer(x) + sum(w * (x @ sd[key.format("A")].T @ sd[key.format("B")].T)
                                         for w, sd in ((0.5, one), (1.5, two)))
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    both = _out(model, inputs)
    assert not torch.equal(both, base)
    pipe.disable_lora()
    assert torch.equal(_out(model, inputs), base)
    pipe.enable_lora()
    assert torch.equal(_out(model, inputs), both)
    pipe.unload_lora_weights()
    assert isinstance(model.single_transformer_blocks[1].proj_mlp, TernaryLinear)
    assert torch.equal(_out(model, inputs), base)


def test_load_lora_weights_kohya_format() -> None:
    """kohya keys (fused qkv, alpha) are converted by diffusers, then land on the ternary q/k/v."""
    model = load_toy()
    pipe = _pipe(model)
    g = torch.Generator().manual_seed(3)
    r, alpha = 4, 2.0
    down, up = torch.randn(r, D, generator=g) * 0.1, torch.randn(3 * D, r, generator=g) * 0.1
    pipe.load_lora_weights({
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(alpha),
    }, adapter_name="kohya")
    for i, name in enumerate(["to_q", "to_k", "to_v"]):
        layer = getattr(model.transformer_blocks[0].attn, name)
        assert isinstance(layer.base_layer, TernaryLinear)
        _check_layer(layer, down, up[i * D : (i + 1) * D], alpha / r)


def test_load_lora_weights_xlabs_format() -> None:
    """XLabs keys (processor.qkv_lora1 / proj_lora1) are converted by diffusers onto the ternary layers."""
    model = load_toy()
    pipe = _pipe(model)
    g = torch.Generator().manual_seed(4)
    r = 4
    qkv_down, qkv_up = torch.randn(r, D, generator=g) * 0.1, torch.randn(3 * D, r, generator=g) * 0.1
    out_down, out_up = torch.randn(r, D, generator=g) * 0.1, torch.randn(D, r, generator=g) * 0.1
    pipe.load_lora_weights({
        "double_blocks.1.processor.qkv_lora1.down.weight": qkv_down,
        "double_blocks.1.processor.qkv_lora1.up.weight": qkv_up,
        "double_blocks.1.processor.proj_lora1.down.weight": out_down,
        "double_blocks.1.processor.proj_lora1.up.weight": out_up,
    }, adapter_name="xlabs")
    attn = model.transformer_blocks[1].attn
    for i, name in enumerate(["to_q", "to_k", "to_v"]):
        layer = getattr(attn, name)
        assert isinstance(layer.base_layer, TernaryLinear)
        _check_layer(layer, qkv_down, qkv_up[i * D : (i + 1) * D], 1.0)
    _check_layer(attn.to_out[0], out_down, out_up, 1.0)


def test_fuse_lora_is_refused_in_one_line() -> None:
    model = load_toy()
    inputs = toy_inputs(model)
    pipe = _pipe(model)
    pipe.load_lora_weights(_diffusers_lora(1), adapter_name="one")
    before = _out(model, inputs)
    with pytest.raises(ModelError, match="cannot be fused") as err:
        pipe.fuse_lora()
    assert "\n" not in str(err.value)
    assert torch.equal(_out(model, inputs), before)  # nothing changed, nothing requantised


def test_wrong_lora_shape_is_one_line() -> None:
    model = load_toy()
    sd = _diffusers_lora(1)
    sd["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.randn(4, D + 1)
    with pytest.raises(ModelError, match="to_q.lora_A.weight has shape"):
        _pipe(model).load_lora_weights(sd)


@pytest.mark.parametrize("mode", MODES)
def test_training_lora_through_ternary_layers(mode: str) -> None:
    """Every adapter gets a finite gradient, the first block's too (it flows back through later
    ternary layers), and the ternary base stays frozen."""
    model = load_toy(mode)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "proj_mlp"], init_lora_weights=False))
    inputs = toy_inputs(model)
    loss = model(**inputs, return_dict=False)[0].square().mean()
    loss.backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora.values())
    assert lora["transformer_blocks.0.attn.to_q.lora_A.default.weight"].grad.abs().sum() > 0
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("mode", MODES)
def test_lora_gradient_equals_dense_model(mode: str) -> None:
    """Two ternary layers, LoRA on the first: with a loss linear in the output, the LoRA gradient is
    the dense model's (the backward uses diag(scale) T exactly, straight through activation rounding)."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(33, 20), nn.Linear(20, 7))
    tern = nn.Sequential(*(TernaryLinear.from_linear(l, act=mode) for l in dense))
    for d, t in zip(dense, tern):
        d.weight.data = t.dequantized_weight()
    cfg = dict(r=3, lora_alpha=3, target_modules=["0"], init_lora_weights=False)
    from peft import inject_adapter_in_model

    torch.manual_seed(1)
    inject_adapter_in_model(LoraConfig(**cfg), tern)
    torch.manual_seed(1)
    inject_adapter_in_model(LoraConfig(**cfg), dense)
    x, g = torch.randn(4, 33), torch.randn(4, 7)
    for model in (tern, dense):
        (model(x) * g).sum().backward()
    for name in ("lora_A", "lora_B"):  # both reach the loss only through layer 1's exact backward
        gt, gd = getattr(tern[0], name)["default"].weight.grad, getattr(dense[0], name)["default"].weight.grad
        assert (gt - gd).abs().max() <= 1e-5 * gd.abs().max()
