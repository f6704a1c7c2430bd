import copy
import json
from pathlib import Path

import pytest

from bitflux.errors import BitfluxError, CheckpointError, FormatError, ModelError
from bitflux.validate import (
    check_index,
    check_is_transformer,
    check_model_config,
    check_pipeline_fit,
    check_quantization_config,
    matches,
    shard_files,
)

ASSETS = Path(__file__).resolve().parents[2] / "src" / "bitflux" / "assets"
TOY_Q = json.loads((ASSETS / "toy-1.58bit" / "config.json").read_text())


def _cfg(**changes):
    cfg = copy.deepcopy(TOY_Q)
    for k, v in changes.items():
        if v is KeyError:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return cfg


def test_the_bundled_configs_pass():
    assert check_model_config(TOY_Q, "x").__name__ == "FluxTransformer2DModel"
    check_quantization_config(TOY_Q["quantization_config"], "x")
    for name in ("transformer", "vae"):
        check_model_config(json.loads((ASSETS / "toy" / name / "config.json").read_text()), name)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"in_channels": -1}, "in_channels must be an integer in [1, 65536]"),
        ({"in_channels": 0}, "in_channels"),
        ({"in_channels": True}, "in_channels must be an integer"),
        ({"in_channels": 64.0}, "in_channels must be an integer"),
        ({"in_channels": "64"}, "in_channels must be an integer"),
        ({"num_layers": 99999}, "num_layers"),
        ({"num_layers": -1}, "num_layers"),
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"attention_head_dim": 1_000_000}, "attention_head_dim"),
        ({"num_attention_heads": 4000, "attention_head_dim": 32}, "wider than any FLUX model"),
        ({"axes_dims_rope": [8, 8, 8]}, f"sums to 24, but attention_head_dim is {TOY_Q['attention_head_dim']}"),
        ({"axes_dims_rope": [8, 12]}, "axes_dims_rope must be"),
        ({"axes_dims_rope": [8, 11, 13]}, "3 positive even integers"),
        ({"axes_dims_rope": [0, 16, 16]}, "3 positive even integers"),
        ({"axes_dims_rope": "8,12,12"}, "axes_dims_rope must be"),
        ({"out_channels": 0}, "out_channels"),
        ({"guidance_embeds": "yes"}, "guidance_embeds must be true or false"),
        ({"guidance_embeds": 1}, "guidance_embeds must be true or false"),
        ({"_class_name": 5}, "_class_name must name"),
        ({"_class_name": "os.system"}, "is not a diffusers model class"),
        ({"_class_name": "FluxPipeline"}, "is not a diffusers model class"),
        ({"_class_name": KeyError}, "_class_name must name"),
    ],
)
def test_model_config_errors(changes, message):
    with pytest.raises(BitfluxError) as e:
        check_model_config(_cfg(**changes), "cfg.json")
    assert message in str(e.value) and str(e.value).startswith("cfg.json:")


def test_model_config_must_be_an_object():
    with pytest.raises(CheckpointError, match="found list"):
        check_model_config([1], "c")


def test_other_classes_get_their_init_types_checked():
    vae = json.loads((ASSETS / "toy" / "vae" / "config.json").read_text())
    check_model_config(vae, "vae")
    for key, bad in (("latent_channels", "16"), ("block_out_channels", 8), ("scaling_factor", "x"), ("act_fn", 3)):
        with pytest.raises(CheckpointError, match=key):
            check_model_config({**vae, key: bad}, "vae")
    with pytest.raises(CheckpointError, match="out of range"):
        check_model_config({**vae, "block_out_channels": [8, 2**40]}, "vae")


def test_type_matching():
    assert matches([1, 2, 3], tuple[int, int, int]) and not matches([1, 2], tuple[int, int, int])
    assert matches(None, int | None) and matches(3, int | None) and not matches("3", int | None)
    assert matches(1, float) and not matches(float("nan"), float) and not matches(True, float)
    assert matches(["a", "b"], tuple[str]) and not matches(["a", 1], tuple[str])


QC = TOY_Q["quantization_config"]


@pytest.mark.parametrize(
    "changes, error, message",
    [
        ({"quant_method": "bnb"}, ModelError, "not a bitflux checkpoint"),
        ({"quant_method": KeyError}, ModelError, "not a bitflux checkpoint"),
        ({"format": "4bit"}, FormatError, "unknown packing format"),
        ({"format": None}, FormatError, "unknown packing format"),
        ({"format_version": 2}, FormatError, "version 2 is not supported"),
        ({"format_version": "1"}, FormatError, "not supported"),
        ({"format_version": True}, FormatError, "not supported"),
        ({"init": "magic"}, CheckpointError, "init must be one of"),
        ({"activations": 8}, CheckpointError, "activations must be one of"),
        ({"modules_not_converted": None}, CheckpointError, "must be a list of module names"),
        ({"modules_not_converted": 3}, CheckpointError, "must be a list of module names"),
        ({"modules_not_converted": [1]}, CheckpointError, "must be a list of module names"),
        ({"modules_not_converted": ["a..b"]}, CheckpointError, "not a module name"),
        ({"modules_not_converted": ["x_embedder", "x_embedder"]}, CheckpointError, "repeats"),
        ({"source": 3}, CheckpointError, "source must be a string"),
        ({"policy": ["flux"]}, CheckpointError, "policy must be a string"),
        ({"extra": 1}, CheckpointError, "unknown keys ['extra']"),
        ({"include": "x_*"}, CheckpointError, "include must be a list of name globs"),
        ({"exclude": [1]}, CheckpointError, "exclude must be a list of name globs"),
        ({"integrity": []}, CheckpointError, "integrity must be an object"),
        ({"integrity": {"algorithm": "md5", "config": "", "files": {}}}, CheckpointError, "algorithm"),
        ({"integrity": {"algorithm": "xxh3_128", "config": "", "files": {"../x": {"bytes": 1, "hash": ""}}}}, CheckpointError, "not a plain file name"),
        ({"integrity": {"algorithm": "xxh3_128", "config": "", "files": {"x": {"bytes": -1, "hash": ""}}}}, CheckpointError, "must be"),
    ],
)
def test_quantization_config_errors(changes, error, message):
    qc = {k: v for k, v in {**QC, **changes}.items() if v is not KeyError}
    with pytest.raises(error) as e:
        check_quantization_config(qc, "q")
    assert message in str(e.value)


def test_quantization_config_must_be_an_object():
    for qc in (None, [], "bitflux"):
        with pytest.raises(ModelError, match="not a bitflux checkpoint"):
            check_quantization_config(qc, "q")


def test_index(tmp_path):
    good = {"metadata": {"total_size": 10}, "weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}
    assert check_index(good, "i") == good["weight_map"]
    bad = [
        ({"weight_map": []}, "weight_map must be"),
        ({"weight_map": None}, "weight_map must be"),
        ({"weight_map": {}}, "weight_map must be"),
        ({}, "weight_map must be"),
        ({"weight_map": {"a": 1}}, "is not a file name"),
        ({"weight_map": {"a": "../x.safetensors"}}, "is not a file name"),
        ({"weight_map": {"a": "/etc/x.safetensors"}}, "is not a file name"),
        ({"weight_map": {"a": ".."}}, "is not a file name"),
        ({"weight_map": {"a": "config.json"}}, "not a .safetensors file"),
        ({"weight_map": {"a": "m.safetensors"}, "metadata": []}, "metadata must be an object"),
        ({"weight_map": {"a": "m.safetensors"}, "metadata": {"total_size": -1}}, "total_size"),
        ({"weight_map": {"a": "m.safetensors"}, "metadata": {"total_size": "9"}}, "total_size"),
        ([], "expected a JSON object"),
    ]
    for index, message in bad:
        with pytest.raises(CheckpointError) as e:
            check_index(index, "i")
        assert message in str(e.value), index


def test_shard_files_must_be_regular_files_that_exist(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"x")
    assert shard_files(tmp_path, {"t": "a.safetensors", "u": "a.safetensors"}) == [tmp_path / "a.safetensors"]
    with pytest.raises(CheckpointError, match="missing weight file b.safetensors"):
        shard_files(tmp_path, {"t": "b.safetensors"})
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="is a directory"):
        shard_files(tmp_path, {"t": "d.safetensors"})


def test_pipeline_fit():
    toy = ASSETS / "toy"
    cfg = json.loads((toy / "transformer" / "config.json").read_text())
    check_pipeline_fit(cfg, toy, "m")
    for key, what in (("joint_attention_dim", "T5 d_model"), ("pooled_projection_dim", "CLIP hidden_size"), ("in_channels", "latent")):
        with pytest.raises(ModelError, match=what):
            check_pipeline_fit({**cfg, key: cfg[key] * 2}, toy, "m")
    with pytest.raises(ModelError, match="AutoencoderKL"):
        check_is_transformer(json.loads((toy / "vae" / "config.json").read_text()), "vae")


def test_every_key_bitflux_writes_is_accepted():
    # What QuantConfig.to_dict writes (with every optional key present) must pass the schema.
    from bitflux import QuantConfig

    fields = QuantConfig.__dataclass_fields__
    kw = {k: ("x_*",) for k in ("include", "exclude") if k in fields}
    qc = QuantConfig(format="base3", modules_not_converted=("proj_out",), source="/abs/toy", **kw).to_dict()
    check_quantization_config(qc, "q")
    assert set(kw) <= set(qc)
