"""Trainer pieces: the padding emulation is exact, and a tiny run writes a loadable pipeline."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from bitflux.errors import OutputExistsError
from bitflux.toy.build import build_pipeline
from bitflux.toy.data import T5_TRAIN_LENGTH, tokenize
from bitflux.toy.train import TrainConfig, pad_bias, sample_sigmas, train


@torch.no_grad()
def test_pad_bias_equals_real_padding():
    """12 tokens + log-multiplicity bias == the pipeline's N-token padding, for the transformer output."""
    pipe = build_pipeline(0)
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        m.eval()  # T5 dropout would make pad embeddings differ
    texts = ["a red circle to the left of a blue square", "two cyan diamonds"]
    n_long = 40
    _, t_ids, t_len = tokenize(pipe.tokenizer, pipe.tokenizer_2, texts)
    long_ids = pipe.tokenizer_2(texts, padding="max_length", max_length=n_long, return_tensors="pt").input_ids
    c_ids = pipe.tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt").input_ids
    pooled = pipe.text_encoder(c_ids).pooler_output
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))  # (B, 4x4 tokens, 4 * 16 ch)
    img_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
    common = dict(hidden_states=x, timestep=torch.tensor([0.3, 0.7]), pooled_projections=pooled, img_ids=img_ids)
    ref = pipe.transformer(encoder_hidden_states=pipe.text_encoder_2(long_ids)[0], txt_ids=torch.zeros(n_long, 3), **common).sample
    short = pipe.text_encoder_2(t_ids)[0]
    bias = pad_bias(t_len, torch.full((2,), float(n_long)), 16)
    got = pipe.transformer(
        encoder_hidden_states=short, txt_ids=torch.zeros(T5_TRAIN_LENGTH, 3), joint_attention_kwargs={"attention_mask": bias}, **common
    ).sample
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    plain = pipe.transformer(encoder_hidden_states=short, txt_ids=torch.zeros(T5_TRAIN_LENGTH, 3), **common).sample
    assert (plain - ref).abs().max() > 1e-3  # without the bias the two differ: the test can fail


def test_sigmas_in_unit_interval():
    s = sample_sigmas(1000, torch.Generator().manual_seed(0), 16)
    assert s.min() > 0 and s.max() < 1 and 0.3 < s.mean() < 0.7


def test_tiny_training_run_writes_a_loadable_pipeline(tmp_path):
    out = tmp_path / "toy"
    cfg = TrainConfig(
        minutes=5, n_scenes=16, n_vae_images=16, vae_steps=2, steps=3, decoder_steps=2, vae_batch=2, batch=2, ckpt_every_s=1e9
    )
    train(out, cfg)
    pipe = FluxPipeline.from_pretrained(out)
    assert pipe.vae.config.scaling_factor > 0
    ckpt = load_file(str(tmp_path / "toy.work" / "ckpt.safetensors"))
    assert any(k.startswith("ema.transformer.") for k in ckpt)
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(OutputExistsError):
        train(out, cfg)
