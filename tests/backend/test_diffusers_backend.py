"""bitflux as a diffusers quantization backend: every way into and out of diffusers.

Pre-quantised loads, quantise-while-loading (model, pipeline, single file), save_pretrained round
trips (sharded too, after dtype casts), and the one-line refusals of bad sources.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import flux_inputs, tiny_flux
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file, save_file

import bitflux
from bitflux import BitfluxConfig, CheckpointError, ModelError
from bitflux.linear import TernaryLinear
from bitflux.toy import bundled_path


def _state(model):
    return {k: v for k, v in model.state_dict().items()}


def _equal_states(a, b):
    a, b = _state(a), _state(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _out(model):
    with torch.no_grad():
        return model(**flux_inputs(model)).sample


@pytest.fixture
def dense_dir(tmp_path):
    d = tmp_path / "dense"
    tiny_flux(dtype=torch.bfloat16).save_pretrained(d)
    return d


@pytest.fixture
def packed_dir(tmp_path):
    return bitflux.save(bitflux.quantize(tiny_flux(dtype=torch.bfloat16), BitfluxConfig(init="twn")), tmp_path / "q")


def test_from_pretrained_loads_a_bitflux_checkpoint(packed_dir):
    ours = bitflux.load(packed_dir)
    theirs = FluxTransformer2DModel.from_pretrained(packed_dir, torch_dtype=torch.bfloat16)
    assert isinstance(theirs.transformer_blocks[0].attn.to_q, TernaryLinear)
    assert _equal_states(ours, theirs) and torch.equal(_out(ours), _out(theirs))
    # torch_dtype sets the kept layers' dtype; the packed codes and bf16 scales never change
    f32 = FluxTransformer2DModel.from_pretrained(packed_dir, torch_dtype=torch.float32)
    assert f32.x_embedder.weight.dtype == torch.float32
    q = f32.transformer_blocks[0].attn.to_q
    assert q.scale.dtype == torch.bfloat16 and torch.equal(q.scale, ours.transformer_blocks[0].attn.to_q.scale)


def test_pipeline_from_pretrained_with_a_bitflux_transformer(tmp_path):
    pipe_dir = tmp_path / "pipe"
    shutil.copytree(bundled_path("toy"), pipe_dir)
    shutil.rmtree(pipe_dir / "transformer")
    shutil.copytree(bundled_path("toy-1.58bit"), pipe_dir / "transformer")
    pipe = FluxPipeline.from_pretrained(pipe_dir)
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q, TernaryLinear)
    assert _equal_states(pipe.transformer, bitflux.load(bundled_path("toy-1.58bit"), torch_dtype=torch.float32))


def test_quantise_while_loading_equals_quantize(dense_dir):
    loaded = FluxTransformer2DModel.from_pretrained(dense_dir, quantization_config=BitfluxConfig(init="twn"), torch_dtype=torch.bfloat16)
    ref = bitflux.quantize(FluxTransformer2DModel.from_pretrained(dense_dir, torch_dtype=torch.bfloat16), BitfluxConfig(init="twn"))
    assert _equal_states(loaded, ref)
    assert not any(n.endswith(".weight") and isinstance(loaded.get_submodule(n[:-7]), TernaryLinear) for n in _state(loaded))
    assert loaded.bitflux_config.policy == "flux" and "x_embedder" in loaded.bitflux_config.modules_not_converted


def test_pipeline_quantization_config(tmp_path):
    from diffusers import PipelineQuantizationConfig

    qc = PipelineQuantizationConfig(quant_mapping={"transformer": BitfluxConfig(init="twn")})
    pipe = FluxPipeline.from_pretrained(bundled_path("toy"), quantization_config=qc)
    ref = bitflux.quantize(FluxTransformer2DModel.from_pretrained(bundled_path("toy"), subfolder="transformer"), BitfluxConfig(init="twn"))
    assert _equal_states(pipe.transformer, ref)
    assert not isinstance(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q, TernaryLinear)


def test_save_pretrained_round_trip_is_bit_identical_sharded_too(packed_dir, tmp_path):
    model = bitflux.load(packed_dir)
    for shard in ("10GB", "20KB"):
        out = tmp_path / f"re-{shard}"
        model.save_pretrained(out, max_shard_size=shard)
        assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "bitflux"
        back = FluxTransformer2DModel.from_pretrained(out, torch_dtype=torch.bfloat16)
        assert _equal_states(model, back) and torch.equal(_out(model), _out(back))
    assert len(list((tmp_path / "re-20KB").glob("*.safetensors"))) > 1


@pytest.mark.parametrize("cast", ["float", "half", "to"])
def test_dtype_casts_keep_the_packed_part_and_still_save(packed_dir, tmp_path, cast):
    model = bitflux.load(packed_dir)
    scales = {n: m.scale.clone() for n, m in model.named_modules() if isinstance(m, TernaryLinear)}
    model = {"float": lambda m: m.float(), "half": lambda m: m.half(), "to": lambda m: m.to(torch.float32)}[cast](model)
    want = torch.float16 if cast == "half" else torch.float32
    assert model.x_embedder.weight.dtype == want
    assert all(torch.equal(model.get_submodule(n).scale, s) for n, s in scales.items())
    bitflux.save(model, tmp_path / "cast")
    back = bitflux.load(tmp_path / "cast")
    assert back.x_embedder.weight.dtype == want and _equal_states(model, back)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "bitflux.cli", *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_cli_quantize_records_an_absolute_source_and_loads(tmp_path, dense_dir):
    out = tmp_path / "out"
    r = _cli("quantize", os.path.relpath(dense_dir), str(out), "--json")
    assert r.returncode == 0, r.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["source"] == str(dense_dir.resolve()) and "integrity" in qc
    assert _equal_states(bitflux.load(out), bitflux.quantize(tiny_flux(dtype=torch.bfloat16)))


@pytest.mark.parametrize(
    "case",
    ["offline hub id", "not flux-shaped", "another backend", "already bitflux", "not safetensors"],
)
def test_cli_quantize_bad_sources_one_line_nothing_written(tmp_path, dense_dir, packed_dir, case):
    env = None
    if case == "offline hub id":
        src, env = "black-forest-labs/FLUX.1-dev", {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    elif case == "not flux-shaped":
        src = str(bundled_path("toy") / "vae")
    elif case == "another backend":
        cfg = json.loads((dense_dir / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "bitsandbytes_4bit", "load_in_4bit": True}
        (dense_dir / "config.json").write_text(json.dumps(cfg))
        src = str(dense_dir)
    elif case == "already bitflux":
        src = str(packed_dir)
    else:
        (tmp_path / "w.bin").write_bytes(b"x")
        src = str(tmp_path / "w.bin")
    before = sorted(os.listdir(tmp_path))
    r = _cli("quantize", src, str(tmp_path / "out"))
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == before


def test_load_refuses_another_backends_config_and_unknown_versions(packed_dir):
    cfg = json.loads((packed_dir / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 7
    (packed_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(bitflux.FormatError, match="version 7"):
        bitflux.load(packed_dir)
    cfg["quantization_config"] = {"quant_method": "quanto", "weights_dtype": "int8"}
    (packed_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="not a bitflux checkpoint"):
        bitflux.load(packed_dir)


def test_backend_refuses_a_foreign_config_object():
    from bitflux.backend import BitfluxQuantizer

    with pytest.raises(ModelError, match="BitfluxConfig"):
        BitfluxQuantizer(object())


def test_missing_tensors_are_an_error_not_random_weights(packed_dir):
    f = packed_dir / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    del sd["transformer_blocks.0.attn.to_q.scale"]
    save_file(sd, f)
    with pytest.raises(CheckpointError):
        FluxTransformer2DModel.from_pretrained(packed_dir)


def test_device_map_and_low_cpu_mem_usage_behave_as_for_other_backends(packed_dir):
    ref = bitflux.load(packed_dir)
    mapped = FluxTransformer2DModel.from_pretrained(packed_dir, torch_dtype=torch.bfloat16, device_map="cpu")
    assert _equal_states(ref, mapped)
    with pytest.raises(ValueError, match="low_cpu_mem_usage"):  # diffusers' rule for every quantization backend
        FluxTransformer2DModel.from_pretrained(packed_dir, low_cpu_mem_usage=False)
