"""pipeline.resolve pairs a bare transformer with the right text encoders and VAE."""

from __future__ import annotations

import json

import pytest

from bitflux.errors import ModelError
from bitflux.pipeline import resolve


def _dirs(tmp_path, source: str):
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    q = tmp_path / "q"
    q.mkdir()
    (q / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bitflux", "source": source}}))
    return pipe, plain, q


def test_plain_transformer_takes_base_then_fallback_else_one_error(tmp_path):
    pipe, plain, _ = _dirs(tmp_path, "")
    other = tmp_path / "other"
    assert resolve(str(plain), base=str(other), fallback=str(pipe)).pipeline == str(other)
    assert resolve(str(plain), fallback=str(pipe)).pipeline == str(pipe)
    with pytest.raises(ModelError, match="needs --base"):
        resolve(str(plain))


def test_quantised_transformer_prefers_base_then_its_recorded_source_then_fallback(tmp_path):
    from bitflux.checkpoint import is_bitflux_dir

    pipe, _, q = _dirs(tmp_path, "")
    assert is_bitflux_dir(q)
    fallback = tmp_path / "fb"
    fallback.mkdir()
    (fallback / "model_index.json").write_text("{}")
    assert resolve(str(q), fallback=str(fallback)).pipeline == str(fallback)
    (q / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bitflux", "source": str(pipe)}}))
    assert resolve(str(q), fallback=str(fallback)).pipeline == str(pipe)
    assert resolve(str(q), base=str(fallback)).pipeline == str(fallback)
