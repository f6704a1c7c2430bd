import json

import pytest
import torch
from conftest import tiny_flux

from bitflux.cli import main
from bitflux.toy.world import IMAGE_SIZE


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "src"
    tiny_flux(dtype=torch.bfloat16).save_pretrained(path)
    return path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_then_inspect_json(src, tmp_path, capsys):
    code, out, _ = _run(capsys, "quantize", src, tmp_path / "q", "--format", "base3", "--init", "twn", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["format"] == "base3" and report["ratio"] > 1
    code, out, _ = _run(capsys, "inspect", tmp_path / "q", "--json")
    info = json.loads(out)
    assert code == 0 and info["quantized"] is True
    for key in ("ternary_fraction", "bytes", "bf16_bytes", "ratio"):
        assert key in info
    assert info["bytes"] == info["stored_bytes"] == report["bytes"]  # counted = what is on disk
    assert info["bf16_bytes"] == 2 * sum(p.numel() for p in tiny_flux().parameters())


def test_inspect_flux_dev_architecture(capsys):
    code, out, _ = _run(capsys, "inspect", "--arch", "flux-dev", "--format", "2bit", "--json")
    r = json.loads(out)
    assert code == 0
    assert r["params"] == 11_901_408_320 and r["ternary_params"] == 11_834_228_736
    assert r["ternary_fraction"] > 0.99435 and r["bf16_bytes"] == 2 * r["params"]
    assert 7.6 < r["ratio"] < 7.7
    code, out, _ = _run(capsys, "inspect", "--arch", "flux-dev", "--format", "base3", "--json")
    assert 9.4 < json.loads(out)["ratio"] < 9.52


def test_inspect_plain_model_predicts_quantised_size(src, tmp_path, capsys):
    _, out, _ = _run(capsys, "inspect", src, "--json")
    predicted = json.loads(out)
    _run(capsys, "quantize", src, tmp_path / "q", "--json")
    _, out, _ = _run(capsys, "inspect", tmp_path / "q", "--json")
    assert predicted["quantized"] is False and predicted["bytes"] == json.loads(out)["stored_bytes"]


def _one_line_error(code, out, err, match):
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bitflux: error:") and match in lines[0], err


def test_cli_bad_inputs(src, tmp_path, capsys):
    _one_line_error(*_run(capsys, "quantize", tmp_path / "nope", tmp_path / "o"), "no such model")
    (tmp_path / "exists").mkdir()
    _one_line_error(*_run(capsys, "quantize", src, tmp_path / "exists"), "exists")
    _run(capsys, "quantize", src, tmp_path / "q")
    _one_line_error(*_run(capsys, "quantize", tmp_path / "q", tmp_path / "q2"), "already a bitflux checkpoint")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    _one_line_error(*_run(capsys, "quantize", tmp_path / "unet", tmp_path / "o"), "no policy for it")
    _one_line_error(*_run(capsys, "inspect", tmp_path / "nope"), "no such model")
    _one_line_error(*_run(capsys, "inspect"), "either PATH or --arch")
    (tmp_path / "q" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    _one_line_error(*_run(capsys, "inspect", tmp_path / "q"), "corrupted")
    _one_line_error(*_run(capsys, "generate", tmp_path / "q", "a red circle", "-o", tmp_path / "x.png"), "--base")
    _one_line_error(*_run(capsys, "toy", "train", tmp_path / "t", "--partial-captions", "1.5"), "--partial-captions")
    _one_line_error(*_run(capsys, "toy", "train", tmp_path / "t", "--absolute-positions", "1"), "--absolute-positions")
    _one_line_error(*_run(capsys, "toy", "train", tmp_path / "t", "--canonical-positions", "-0.1"), "--canonical-positions")
    assert not (tmp_path / "t").exists() and not (tmp_path / "t.work").exists()
    assert not (tmp_path / "o").exists() and not (tmp_path / "q2").exists() and not (tmp_path / "x.png").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_help_on_every_command(capsys):
    for cmd in ("quantize", "generate", "inspect"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: bitflux " + cmd in capsys.readouterr().out


def test_generate_bundled_and_quantised_toy(tmp_path, capsys):
    from PIL import Image

    code, out, _ = _run(capsys, "generate", "toy", "a red circle", "-o", tmp_path / "a.png", "--steps", "2", "--json")
    assert code == 0 and json.loads(out)["size"] == [IMAGE_SIZE, IMAGE_SIZE]
    assert _run(capsys, "quantize", "toy", tmp_path / "q", "--json")[0] == 0
    code, out, _ = _run(capsys, "generate", tmp_path / "q", "a red circle", "-o", tmp_path / "b.png", "--steps", "2", "--json")
    assert code == 0 and json.loads(out)["transformer"] == str(tmp_path / "q")
    assert Image.open(tmp_path / "b.png").size == (IMAGE_SIZE, IMAGE_SIZE)
    code, out, err = _run(capsys, "generate", "toy", "x", "-o", tmp_path / "a.png")
    assert code == 2 and "exists" in err
