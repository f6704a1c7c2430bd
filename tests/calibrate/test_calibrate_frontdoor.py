"""`bitflux calibrate` accepts what `bitflux quantize` accepts; device and resolution are options, printed."""

from __future__ import annotations

import time

import pytest
import torch

from bitflux.cli import main

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a red diamond"]
FAST = ["--num-prompts", "3", "--steps", "4", "--traj-steps", "2", "--batch", "2", "--checkpoint-every", "2",
        "--train", "all", "--threads", "1"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A prompt file and the toy's transformer as a bare directory, in fp32 and in bf16 (sharded)."""
    from bitflux.toy.build import build_pipeline

    root = tmp_path_factory.mktemp("front")
    (root / "prompts.txt").write_text("\n".join(PROMPTS))
    from diffusers import FluxTransformer2DModel

    from bitflux.toy import bundled_path

    t = FluxTransformer2DModel.from_pretrained(bundled_path("toy") / "transformer")
    t.save_pretrained(root / "fp32")
    t.to(dtype=torch.bfloat16).save_pretrained(root / "bf16", max_shard_size="300KB")
    del build_pipeline
    return root


def _run(argv, capsys) -> tuple[int, list[str], str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.err.strip().splitlines(), cap.out


def _tensors(out):
    from safetensors.torch import load_file

    return {k: v for p in sorted(out.glob("*.safetensors")) for k, v in load_file(str(p)).items()}


def test_bad_sources_are_one_line(dirs, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    prompts = str(dirs / "prompts.txt")
    cases = [
        (["calibrate", "black-forest-labs/FLUX.1-dev", str(tmp_path / "o"), "--prompts", prompts], "HF_HUB_OFFLINE"),
        (["calibrate", str(dirs / "fp32"), str(tmp_path / "o"), "--prompts", prompts], "needs --base"),
        (["calibrate", str(dirs / "fp32"), str(tmp_path / "o"), "--prompts", prompts, "--base", str(dirs / "fp32")], "not a diffusers pipeline"),
        (["calibrate", "toy-1.58bit", str(tmp_path / "o"), "--prompts", prompts], "already quantised"),
        (["calibrate", "toy", str(tmp_path / "o"), "--prompts", prompts, "--height", "40"], "multiples of 16"),
        (["calibrate", "toy", str(tmp_path / "o"), "--prompts", prompts, "--device", "nodevice"], "not a torch device"),
    ]
    for argv, msg in cases:
        t0 = time.perf_counter()
        rc, err, _ = _run(argv, capsys)
        assert rc == 2 and len(err) == 1 and msg in err[0], (argv, err)
        assert time.perf_counter() - t0 < 30  # fails fast (no network wait); generous for a loaded CI machine
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_transformer_dir_with_base_equals_the_pipeline_and_prints_the_resolution(dirs, tmp_path, capsys):
    prompts = str(dirs / "prompts.txt")
    rc, err, _ = _run(["calibrate", "toy", str(tmp_path / "a"), "--prompts", prompts, *FAST], capsys)
    assert rc == 0 and any("at 48x48 on cpu" in line for line in err), err  # the toy's eval size, printed
    rc, _, _ = _run(["calibrate", str(dirs / "fp32"), str(tmp_path / "b"), "--prompts", prompts, "--base", "toy", *FAST], capsys)
    assert rc == 0
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    # the same values; the kept layers in each source's stored dtype (the bundled toy's bf16, the dir's fp32)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)
    rc, err, _ = _run(["calibrate", "toy", str(tmp_path / "c"), "--prompts", prompts, *FAST, "--height", "32", "--width", "64"], capsys)
    assert rc == 0 and any("at 32x64" in line for line in err)


def test_blockwise_from_a_bf16_transformer_dir_keeps_bf16_and_takes_bf16_inputs(dirs, tmp_path, capsys):
    from bitflux.checkpoint import load

    prompts = str(dirs / "prompts.txt")
    out = tmp_path / "q"
    rc, err, _ = _run(["calibrate", str(dirs / "bf16"), str(out), "--prompts", prompts, "--base", "toy", "--mode",
                       "blockwise", "--grad-checkpoint", *FAST[:-4], "--threads", "1"], capsys)
    assert rc == 0, err
    assert not (tmp_path / "q.partial").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    model = load(out)
    dtypes = {p.dtype for n, p in model.named_parameters()}
    assert dtypes == {torch.bfloat16}, dtypes
    assert any("48x48" in line for line in err)
    cfg = model.config
    x = torch.randn(1, 9, cfg.in_channels, dtype=torch.bfloat16)
    enc = torch.randn(1, 4, cfg.joint_attention_dim, dtype=torch.bfloat16)
    kw = dict(hidden_states=x, encoder_hidden_states=enc, pooled_projections=torch.randn(1, cfg.pooled_projection_dim, dtype=torch.bfloat16),
              timestep=torch.tensor([0.5], dtype=torch.bfloat16), img_ids=torch.zeros(9, 3), txt_ids=torch.zeros(4, 3))
    if cfg.guidance_embeds:
        kw["guidance"] = torch.tensor([3.5])
    with torch.no_grad():
        y = model(**kw, return_dict=False)[0]
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_a_bare_transformer_with_cached_embeddings_needs_no_pipeline(dirs, tmp_path, capsys):
    """Block-wise from a transformer directory and an embeddings file: no text encoders are ever loaded."""
    from safetensors.torch import save_file

    from bitflux.calibrate import CalibConfig
    from bitflux.calibrate.command import eval_settings
    from bitflux.calibrate.embeddings import encode_prompts
    from bitflux.toy.build import build_pipeline

    kw, _ = eval_settings("toy")
    embeds = encode_prompts(build_pipeline(seed=0), PROMPTS, CalibConfig(prompts=3, pipe_kwargs=kw), progress=False)
    save_file(embeds, str(tmp_path / "e.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    prompts = str(dirs / "prompts.txt")
    args = ["--prompts", prompts, "--mode", "blockwise", "--height", "48", "--width", "48", *FAST[:-4], "--threads", "1"]
    rc, err, _ = _run(["calibrate", str(dirs / "fp32"), str(tmp_path / "x"), "--embeddings", str(tmp_path / "bad.safetensors"), *args], capsys)
    assert rc == 2 and len(err) == 1 and "bad.safetensors" in err[0], err
    rc, err, _ = _run(["calibrate", str(dirs / "fp32"), str(tmp_path / "q"), "--embeddings", str(tmp_path / "e.safetensors"), *args], capsys)
    assert rc == 0, err
    assert (tmp_path / "q" / "config.json").exists() and not (tmp_path / "q.partial").exists()
