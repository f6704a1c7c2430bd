import json
import os
import random

import pytest

from bitflux.errors import CheckpointError
from bitflux.integrity import config_digest, file_digest, record, seal, verify


def _checkpoint(tmp_path, shards=2):
    d = tmp_path / "ck"
    d.mkdir()
    rng = random.Random(0)
    for i in range(shards):
        (d / f"m-{i}.safetensors").write_bytes(bytes(rng.randrange(256) for _ in range(3000 + i)))
    (d / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "m-0.safetensors"}}))
    (d / "calibration.json").write_text("{}")
    cfg = {"_class_name": "FluxTransformer2DModel", "num_layers": 2, "quantization_config": {"quant_method": "bitflux"}}
    (d / "config.json").write_text(json.dumps(cfg))
    seal(d)
    return d, json.loads((d / "config.json").read_text())


def test_seal_records_every_loadable_file(tmp_path):
    d, cfg = _checkpoint(tmp_path)
    entry = cfg["quantization_config"]["integrity"]
    assert entry["algorithm"] == "xxh3_128"
    assert sorted(entry["files"]) == ["calibration.json", "m-0.safetensors", "m-1.safetensors", "m.safetensors.index.json"]
    assert entry["files"]["m-1.safetensors"]["bytes"] == 3001
    assert verify(d, cfg) is True
    assert verify(d, {"quantization_config": {"quant_method": "bitflux"}}) is False  # nothing recorded


def test_every_single_bit_flip_is_caught_and_named(tmp_path):
    d, cfg = _checkpoint(tmp_path, shards=1)
    f = d / "m-0.safetensors"
    clean = f.read_bytes()
    for pos in range(0, len(clean), 97):
        for bit in (0, 7):
            data = bytearray(clean)
            data[pos] ^= 1 << bit
            f.write_bytes(bytes(data))
            with pytest.raises(CheckpointError) as e:
                verify(d, cfg)
            assert str(f) in str(e.value) and "recorded hash" in str(e.value)
    f.write_bytes(clean)
    assert verify(d, cfg)


def test_config_changes_are_caught(tmp_path):
    d, cfg = _checkpoint(tmp_path)
    for changed in ({**cfg, "num_layers": 3}, {**cfg, "extra": 1}, {k: v for k, v in cfg.items() if k != "num_layers"}):
        with pytest.raises(CheckpointError, match="config.json: content differs"):
            verify(d, changed)
    reindented = json.loads(json.dumps(cfg, indent=7))
    assert verify(d, reindented)
    assert config_digest(cfg) == cfg["quantization_config"]["integrity"]["config"]


def test_truncation_removal_addition_and_kinds(tmp_path):
    d, cfg = _checkpoint(tmp_path)
    f = d / "m-1.safetensors"
    clean = f.read_bytes()
    f.write_bytes(clean[:-1])
    with pytest.raises(CheckpointError, match=r"truncated or corrupted \(3,000 bytes, recorded 3,001\)"):
        verify(d, cfg)
    f.unlink()
    with pytest.raises(CheckpointError, match="m-1.safetensors: recorded in config.json but missing"):
        verify(d, cfg)
    os.mkfifo(f)
    with pytest.raises(CheckpointError, match="is a FIFO"):
        verify(d, cfg)
    f.unlink()
    f.mkdir()
    with pytest.raises(CheckpointError, match="is a directory"):
        verify(d, cfg)
    f.rmdir()
    f.write_bytes(clean)
    (d / "m-2.safetensors").write_bytes(b"new shard")
    with pytest.raises(CheckpointError, match="m-2.safetensors: not covered"):
        verify(d, cfg)


def test_file_digest_of_empty_and_large_files(tmp_path):
    (tmp_path / "e").write_bytes(b"")
    assert file_digest(tmp_path / "e")[0] == 0
    big = os.urandom(3 * 2**20 + 5)
    (tmp_path / "b").write_bytes(big)
    size, digest = file_digest(tmp_path / "b")
    import xxhash

    assert size == len(big) and digest == xxhash.xxh3_128(big).hexdigest()
    assert file_digest(tmp_path / "b", "sha256")[1] == __import__("hashlib").sha256(big).hexdigest()


def test_record_is_deterministic(tmp_path):
    d, cfg = _checkpoint(tmp_path)
    again = record(d, cfg)
    assert again == cfg["quantization_config"]["integrity"]
