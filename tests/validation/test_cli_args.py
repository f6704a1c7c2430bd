"""Bad command-line values: one line on stderr, exit 2, nothing written, no model run needlessly."""

import pytest
import torch
from conftest import TINY
from diffusers import FluxTransformer2DModel

from bitflux.cli import main


def _run(capsys, *argv):
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse exits for usage errors
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.err.strip()


def _one_line_error(rc, err, *needles):
    """Exit 2 and one error line, the last one (progress bars of loading may come before it)."""
    assert rc == 2, err
    lines = err.splitlines()
    assert "Traceback" not in err and [ln for ln in lines if "error" in ln.lower()] == lines[-1:], err
    err = lines[-1]
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--steps", "0"], "--steps: must be an integer >= 1, got '0'"),
        (["--steps", "-3"], "--steps"),
        (["--steps", "2.5"], "--steps: must be an integer"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**64)], "--seed"),
        (["--height", "0"], "--height"),
        (["--width", "-16"], "--width"),
        (["--height", "100000"], "--height"),
        (["--guidance-scale", "nan"], "--guidance-scale: must be a finite number"),
        (["--cfg-scale", "inf"], "--cfg-scale"),
        (["--cfg-scale", "-1"], "--cfg-scale"),
        (["--threads", "0"], "--threads"),
        (["--activations", "int4"], "--activations"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_generate_refuses_bad_values_while_parsing(capsys, tmp_path, argv, needle):
    out = tmp_path / "a.png"
    rc, err = _run(capsys, "generate", "toy", "a red circle", "-o", str(out), *argv)
    _one_line_error(rc, err, needle)
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--steps", "0"], "--steps"),
        (["--n", "0"], "--n"),
        (["--seeds", "-2"], "--seeds"),
        (["--prompt-seed", "-1"], "--prompt-seed"),
        (["--cfg-scale", "nan"], "--cfg-scale"),
        (["--threads", "-1"], "--threads"),
    ],
)
def test_eval_refuses_bad_values_while_parsing(capsys, argv, needle):
    _one_line_error(*_run(capsys, "eval", "toy", *argv), needle)


@pytest.mark.parametrize("side", ["47", "40", "8"])
def test_generate_refuses_sizes_the_pipeline_would_round(capsys, tmp_path, side):
    out = tmp_path / "a.png"
    rc, err = _run(capsys, "generate", "toy", "a red circle", "-o", str(out), "--steps", "1", "--height", side)
    _one_line_error(rc, err, f"--height {side} is not a multiple of 16")
    assert not out.exists()


def test_generate_accepts_a_multiple_of_the_patch(capsys, tmp_path):
    out = tmp_path / "a.png"
    rc, err = _run(capsys, "generate", "toy", "a red circle", "-o", str(out), "--steps", "1", "--height", "32", "--json")
    assert rc == 0, err
    assert out.exists()


@pytest.fixture(scope="module")
def wide_text(tmp_path_factory):
    """A plain FLUX transformer whose text width (joint_attention_dim 32) is not the toy's (64)."""
    d = tmp_path_factory.mktemp("wide") / "transformer"
    torch.manual_seed(0)
    FluxTransformer2DModel(**TINY).save_pretrained(d)
    return d


def test_eval_on_a_transformer_of_another_width(capsys, wide_text):
    rc, err = _run(capsys, "eval", str(wide_text), "--n", "1", "--seeds", "1", "--steps", "1", "--no-fidelity")
    _one_line_error(rc, err, "joint_attention_dim is 32", "does not fit")


def test_generate_with_a_transformer_of_another_width(capsys, wide_text, tmp_path):
    from bitflux.toy import bundled_path

    base = str(bundled_path("toy"))
    rc, err = _run(capsys, "generate", str(wide_text), "x", "--base", base, "-o", str(tmp_path / "a.png"), "--steps", "1")
    _one_line_error(rc, err, "does not fit")


def test_eval_on_something_that_is_not_a_model(capsys, tmp_path):
    from bitflux.toy import bundled_path

    vae = bundled_path("toy") / "vae"
    _one_line_error(*_run(capsys, "eval", str(vae), "--n", "1", "--no-fidelity"), "AutoencoderKL", "not a FluxTransformer2DModel")
    (tmp_path / "empty").mkdir()
    _one_line_error(*_run(capsys, "eval", str(tmp_path / "empty"), "--n", "1"), "not a diffusers pipeline or model directory")


@pytest.mark.parametrize("content", [b"", b"garbage", b"\xff\xfe{}", b"[1]"])
def test_generate_names_a_broken_config(capsys, tmp_path, content):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_bytes(content)
    rc, err = _run(capsys, "generate", str(d), "x", "-o", str(tmp_path / "a.png"), "--steps", "1")
    _one_line_error(rc, err, str(d / "config.json"))
    assert "--base" not in err


def test_generate_stops_on_non_finite_latents(capsys, tmp_path):
    # A full-precision transformer with one NaN weight: the run must fail, not write a black PNG.
    from bitflux.toy import bundled_path

    src = bundled_path("toy") / "transformer"
    model = FluxTransformer2DModel.from_pretrained(src)
    with torch.no_grad():
        model.proj_out.bias[0] = float("nan")
    model.save_pretrained(tmp_path / "t")
    out = tmp_path / "a.png"
    base = str(bundled_path("toy"))
    rc, err = _run(capsys, "generate", str(tmp_path / "t"), "x", "--base", base, "-o", str(out), "--steps", "2")
    _one_line_error(rc, err, "non-finite values at step 1")
    assert not out.exists()


@pytest.mark.parametrize("command", ["eval", "generate", "inspect"])
def test_a_deeply_nested_config_is_one_line_everywhere(capsys, tmp_path, command):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    argv = {"eval": ["eval", str(d), "--n", "1"], "generate": ["generate", str(d), "x", "-o", str(tmp_path / "a.png")], "inspect": ["inspect", str(d)]}
    _one_line_error(*_run(capsys, *argv[command]), "nested too deeply")


def test_generate_no_verify_skips_the_hash_check(capsys, tmp_path):
    import shutil

    from bitflux.toy import bundled_path

    d = tmp_path / "q"
    assert main(["quantize", "toy", str(d), "--json"]) == 0
    capsys.readouterr()
    (d / "calibration.json").write_text("{}")  # a file the record does not cover
    base = str(bundled_path("toy"))
    rc, err = _run(capsys, "generate", str(d), "x", "--base", base, "-o", str(tmp_path / "a.png"), "--steps", "1")
    _one_line_error(rc, err, "not covered by the recorded hashes")
    rc, err = _run(capsys, "generate", str(d), "x", "--base", base, "-o", str(tmp_path / "a.png"), "--steps", "1", "--no-verify")
    assert rc == 0 and (tmp_path / "a.png").exists(), err
    shutil.rmtree(d)
