"""The bundled `toy` pipeline: resolvable by name, loads with FluxPipeline offline, generates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from bitflux.errors import ModelError
from bitflux.toy import bundled_path
from bitflux.toy.world import IMAGE_SIZE

VAE_FLOOR = 0.95  # measured 0.98 on 96 held-out scenes for the bundled 48x48 toy (2,000 VAE steps + decoder refinement)


def test_bundled_path_resolves_and_rejects_unknown_names():
    p = bundled_path("toy")
    assert (p / "model_index.json").is_file()
    with pytest.raises(ModelError):
        bundled_path("flux-dev")


def test_bundled_toy_is_small_and_safetensors_only():
    p = bundled_path("toy")
    files = [f for f in p.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 20 * 2**20
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert any(f.suffix == ".safetensors" for f in files)


def test_toy_transformer_config_has_both_block_kinds():
    cfg = json.loads((bundled_path("toy") / "transformer" / "config.json").read_text())
    assert cfg["num_layers"] >= 1 and cfg["num_single_layers"] >= 1
    t = FluxTransformer2DModel.from_pretrained(bundled_path("toy") / "transformer")
    for name, m in t.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith(("transformer_blocks", "single_transformer_blocks")):
            assert m.in_features >= 32 and m.in_features % 4 == 0 and m.out_features % 4 == 0, name


def test_bundled_pipeline_generates_with_plain_flux_pipeline():
    pipe = FluxPipeline.from_pretrained(bundled_path("toy"))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=3, guidance_scale=1.0, output_type="np")
    a = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    c = pipe("a red circle", generator=torch.Generator().manual_seed(1), **kw).images
    assert a.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # real CFG through the standard API works too
    d = pipe("a red circle", negative_prompt="", true_cfg_scale=3.0, generator=torch.Generator().manual_seed(0), **kw)
    assert d.images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)


@torch.no_grad()
def test_bundled_vae_keeps_what_the_scorer_checks():
    """The codec caps every model's score: ground-truth scenes survive a VAE round trip."""
    import random

    from diffusers import AutoencoderKL

    from bitflux.toy.data import images_to_tensor
    from bitflux.toy.scorer import score
    from bitflux.toy.world import Split, parse_prompt, prompts, render, scene_for_spec

    rng = random.Random(1)
    scenes = [scene_for_spec(rng, parse_prompt(t)) for t, _ in prompts(Split.HELDOUT, 96, 0)]
    x = images_to_tensor([render(s) for s in scenes])
    vae = AutoencoderKL.from_pretrained(bundled_path("toy") / "vae").eval()
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    arr = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    acc = np.mean([score(a, s.spec) for a, s in zip(arr, scenes)])
    assert acc >= VAE_FLOOR, acc


def test_bundled_tokenizers_match_the_builder():
    """`bitflux toy train` with its defaults builds the vocabulary the bundled toy was trained with."""
    from transformers import PreTrainedTokenizerFast

    from bitflux.toy.build import build_tokenizer

    for sub, kind in (("tokenizer", "clip"), ("tokenizer_2", "t5")):
        saved = PreTrainedTokenizerFast.from_pretrained(bundled_path("toy") / sub)
        assert saved.get_vocab() == build_tokenizer(kind).get_vocab()


def test_bundled_ternary_toy_was_calibrated_from_the_bundled_toy():
    """`toy-1.58bit` pairs with `toy`'s text encoders, so it must come from this very teacher:
    every layer kept in full precision equals the bundled toy's (calibration trains only the
    ternary layers by default), and its record names the teacher."""
    from safetensors.torch import load_file

    from bitflux.linear import TernaryLinear
    from bitflux.checkpoint import load

    student = load(bundled_path("toy-1.58bit"))
    teacher = FluxTransformer2DModel.from_pretrained(bundled_path("toy") / "transformer").state_dict()
    ternary = {n for n, m in student.named_modules() if isinstance(m, TernaryLinear)}
    kept = {k: v for k, v in load_file(str(bundled_path("toy-1.58bit") / "diffusion_pytorch_model.safetensors")).items()
            if k.rpartition(".")[0] not in ternary}
    assert ternary and kept
    for k, v in kept.items():
        assert torch.equal(v.float(), teacher[k].float()), k
    record = json.loads((bundled_path("toy-1.58bit") / "calibration.json").read_text())
    assert record["config"]["train"] != "full" and record["prompts"] >= 256
