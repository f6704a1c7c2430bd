import json
import os

import pytest
import torch
from conftest import flux_inputs, tiny_flux
from safetensors.torch import load_file, save_file

import bitflux
from bitflux import CheckpointError, FormatError, ModelError, OutputExistsError, QuantConfig
from bitflux.checkpoint import INDEX_NAME, WEIGHTS_NAME
from bitflux.linear import TernaryLinear


def _quantised(fmt="2bit", **kw):
    return bitflux.quantize(tiny_flux(**kw), QuantConfig(format=fmt, init="twn", source="test"))


@pytest.mark.parametrize("fmt", ["2bit", "base3"])
def test_reload_equals_in_memory_model(tmp_path, fmt):
    model = _quantised(fmt)
    with torch.no_grad():
        want = model(**flux_inputs(model)).sample
    bitflux.save(model, tmp_path / "q")
    loaded = bitflux.load(tmp_path / "q")
    with torch.no_grad():
        got = loaded(**flux_inputs(loaded)).sample
    assert torch.equal(got, want)
    assert type(loaded).__name__ == "FluxTransformer2DModel"
    assert loaded.bitflux_config.format.value == fmt and loaded.bitflux_config.source == "test"


def test_policy_converts_exactly_the_block_linears(tmp_path):
    model = _quantised()
    names = {n for n, m in model.named_modules() if isinstance(m, TernaryLinear)}
    assert names and all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in names)
    kept = set(model.bitflux_config.modules_not_converted)
    assert {"proj_out", "norm_out.linear", "x_embedder", "context_embedder"} <= kept
    assert not any(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in kept)
    cfg = json.loads((bitflux.save(model, tmp_path / "q") / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "bitflux" and qc["format"] == "2bit" and qc["format_version"] == 1
    assert qc["init"] == "twn" and qc["policy"] == "flux" and set(qc["modules_not_converted"]) == kept
    assert cfg["_class_name"] == "FluxTransformer2DModel" and cfg["num_layers"] == 1


def test_sharded_save(tmp_path):
    model = _quantised()
    out = bitflux.save(model, tmp_path / "q", max_shard_bytes=20_000)
    index = json.loads((out / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = bitflux.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(**flux_inputs(loaded)).sample, model(**flux_inputs(model)).sample)


def test_stored_tensors_are_packed(tmp_path):
    out = bitflux.save(_quantised(), tmp_path / "q")
    sd = load_file(out / WEIGHTS_NAME)
    q = sd["transformer_blocks.0.attn.to_q.qweight"]
    assert q.dtype == torch.uint8 and q.shape == (32, 8)
    assert sd["transformer_blocks.0.attn.to_q.scale"].dtype == torch.bfloat16
    assert "transformer_blocks.0.attn.to_q.weight" not in sd


def test_activation_override_at_load(tmp_path):
    bitflux.save(_quantised(), tmp_path / "q")
    m = bitflux.load(tmp_path / "q", activations="int8")
    assert m.transformer_blocks[0].attn.to_q.act.value == "int8"
    assert m.bitflux_config.activations.value == "int8"


# ------------------------------------------------------------------------------------ bad input
@pytest.fixture
def saved(tmp_path):
    return bitflux.save(_quantised(), tmp_path / "q")


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    f = path / WEIGHTS_NAME
    sd = load_file(f)
    fn(sd)
    save_file(sd, f)


def _code3(sd):
    sd["transformer_blocks.0.attn.to_q.qweight"][0, 0] = 0xFF


def _nan_scale(sd):
    sd["single_transformer_blocks.0.proj_out.scale"][3] = float("nan")


def _wrong_shape(sd):
    sd["transformer_blocks.0.attn.to_k.qweight"] = sd["transformer_blocks.0.attn.to_k.qweight"][:, :4].clone()


def _drop(sd):
    del sd["proj_out.weight"]


def _truncate(path):
    f = path / WEIGHTS_NAME
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _garbage_header(path):
    f = path / WEIGHTS_NAME
    f.write_bytes(b"\xff" * 8 + f.read_bytes()[8:])


BAD = {
    "code 3": (lambda p: _edit_tensors(p, _code3), FormatError, "invalid 2bit"),
    "nan scale": (lambda p: _edit_tensors(p, _nan_scale), FormatError, "non-finite"),
    "shape": (lambda p: _edit_tensors(p, _wrong_shape), CheckpointError, "shape"),
    "missing tensor": (lambda p: _edit_tensors(p, _drop), CheckpointError, "disagree"),
    "config disagrees": (lambda p: _edit_config(p, lambda c: c.update(num_layers=2)), CheckpointError, "disagree"),
    "truncated": (_truncate, CheckpointError, "truncated or corrupted"),
    "corrupted": (_garbage_header, CheckpointError, "truncated or corrupted"),
    "unknown format": (
        lambda p: _edit_config(p, lambda c: c["quantization_config"].update(format="1bit")),
        FormatError,
        "unknown packing format",
    ),
    "unknown version": (
        lambda p: _edit_config(p, lambda c: c["quantization_config"].update(format_version=99)),
        FormatError,
        "version 99",
    ),
    "not a model class": (lambda p: _edit_config(p, lambda c: c.update(_class_name="NotAModel")), ModelError, "not a diffusers model class"),
    "another class": (lambda p: _edit_config(p, lambda c: c.update(_class_name="UNet2DModel")), CheckpointError, "must be"),
    "bad json": (lambda p: (p / "config.json").write_text("{nope"), CheckpointError, "invalid JSON"),
    "not quantised": (lambda p: _edit_config(p, lambda c: c.pop("quantization_config")), ModelError, "not a bitflux"),
    "no weights": (lambda p: (p / WEIGHTS_NAME).unlink(), CheckpointError, "missing weight file"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_raises_typed_error(saved, case):
    """Each check behind the hashes (verify=False skips them) refuses its kind of damage."""
    corrupt, exc, match = BAD[case]
    corrupt(saved)
    with pytest.raises(exc, match=match):
        bitflux.load(saved, verify=False)


@pytest.mark.parametrize("case", ["code 3", "nan scale", "shape", "missing tensor", "truncated", "corrupted"])
def test_recorded_hashes_catch_damaged_weights(saved, case):
    BAD[case][0](saved)
    with pytest.raises(CheckpointError, match=WEIGHTS_NAME):
        bitflux.load(saved)


def test_one_flipped_bit_anywhere_is_caught(saved):
    import random

    rng = random.Random(0)
    for name in (WEIGHTS_NAME, "config.json"):
        f = saved / name
        clean = f.read_bytes()
        for _ in range(5):
            data = bytearray(clean)
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
            f.write_bytes(bytes(data))
            with pytest.raises(bitflux.BitfluxError):
                bitflux.load(saved)
        f.write_bytes(clean)
    bitflux.load(saved)  # restored: loads again


def test_bad_paths(tmp_path):
    with pytest.raises(ModelError, match="no such path"):
        bitflux.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        bitflux.load(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelError, match="not a directory"):
        bitflux.load(tmp_path / "file")


def test_existing_output_is_never_touched(saved):
    before = sorted(os.listdir(saved))
    with pytest.raises(OutputExistsError):
        bitflux.save(_quantised(), saved)
    assert sorted(os.listdir(saved)) == before


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import bitflux.checkpoint as ck

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck, "seal", boom, raising=False)
    import bitflux.integrity

    monkeypatch.setattr(bitflux.integrity, "seal", boom)
    with pytest.raises(RuntimeError):
        bitflux.save(_quantised(), tmp_path / "q")
    assert os.listdir(tmp_path) == []


def test_quantising_twice_is_refused():
    with pytest.raises(ModelError, match="already quantised"):
        bitflux.quantize(_quantised())
