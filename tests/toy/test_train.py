"""Trainer pieces: training sees text exactly as the pipeline makes it, and a tiny run writes a loadable pipeline."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from bitflux.errors import OutputExistsError
from bitflux.toy.build import build_pipeline
from bitflux.toy.world import TEXT_LENGTH
from bitflux.toy.data import tokenize
from bitflux.toy.train import TrainConfig, sample_sigmas, train


@torch.no_grad()
def test_training_text_path_equals_the_pipelines():
    """The trainer encodes prompts exactly as FluxPipeline.encode_prompt does at the toy's text length."""
    pipe = build_pipeline(0)
    texts = ["a red circle to the left of a blue square", "two cyan diamonds"]
    c_ids, t_ids = tokenize(pipe.tokenizer, pipe.tokenizer_2, texts)
    embeds, pooled, _ = pipe.encode_prompt(texts, None, max_sequence_length=TEXT_LENGTH)
    torch.testing.assert_close(pipe.text_encoder_2(t_ids)[0], embeds)
    torch.testing.assert_close(pipe.text_encoder(c_ids).pooler_output, pooled)


@torch.no_grad()
def test_t5_binds_words_by_position():
    """T5 has layers, so a word's state depends on its neighbours: colour binds to shape."""
    pipe = build_pipeline(0)
    a, b = ("a red circle and a blue square", "a blue circle and a red square")
    e, _, _ = pipe.encode_prompt([a, b], None, max_sequence_length=TEXT_LENGTH)
    assert (e[0, 2] - e[1, 2]).abs().max() > 1e-3  # "circle" differs with its colour


def test_sigmas_in_unit_interval():
    s = sample_sigmas(1000, torch.Generator().manual_seed(0), 16)
    assert s.min() > 0 and s.max() < 1 and 0.3 < s.mean() < 0.7
    shifted = sample_sigmas(1000, torch.Generator().manual_seed(0), 16, logit_mean=0.7)
    assert shifted.mean() > s.mean() + 0.05 and shifted.max() < 1


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


def test_a_killed_training_run_resumes_to_the_same_pipeline(tmp_path, monkeypatch):
    """Killed mid-way through the transformer phase (after a checkpoint), `resume=True` ends with
    the same weights, bit for bit, as an uninterrupted run."""
    from bitflux.toy import train as train_mod

    cfg = TrainConfig(minutes=5, n_scenes=16, n_vae_images=16, vae_steps=2, steps=6, decoder_steps=2, vae_batch=2,
                      batch=2, ckpt_every_s=0.0)  # a checkpoint after every step
    train(tmp_path / "whole", cfg)

    class Killed(BaseException):
        pass

    real = train_mod.flow_loss
    calls = [0]

    def dying(*a, **k):
        calls[0] += 1
        if calls[0] == 4:  # during step 4 of 6: steps 0-2 are checkpointed
            raise Killed
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "flow_loss", dying)
    with pytest.raises(Killed):
        train(tmp_path / "cut", cfg)
    monkeypatch.setattr(train_mod, "flow_loss", real)
    import json

    assert json.loads((tmp_path / "cut.work" / "state.json").read_text())["step"] == 3
    train(tmp_path / "cut", cfg, resume=True)
    for sub in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        a = load_file(str(next((tmp_path / "whole" / sub).glob("*.safetensors"))))
        b = load_file(str(next((tmp_path / "cut" / sub).glob("*.safetensors"))))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


def test_a_finished_run_copied_and_extended_trains_on(tmp_path):
    """`extend_to` continues a finished run's checkpoints to more steps (its schedule re-planned);
    asking for no more steps than trained, or extending without resume, is one clear error."""
    import json
    import shutil

    from bitflux.errors import ModelError

    cfg = TrainConfig(minutes=5, n_scenes=16, n_vae_images=16, vae_steps=2, steps=3, decoder_steps=2, vae_batch=2,
                      batch=2, ckpt_every_s=1e9)
    train(tmp_path / "short", cfg)
    shutil.copytree(tmp_path / "short.work", tmp_path / "long.work")
    with pytest.raises(ModelError, match="not past the 3 steps"):
        train(tmp_path / "long", cfg, resume=True, extend_to=3)
    with pytest.raises(ModelError, match="pass --resume"):
        train(tmp_path / "other", cfg, extend_to=5)
    train(tmp_path / "long", cfg, resume=True, extend_to=5)
    state = json.loads((tmp_path / "long.work" / "state.json").read_text())
    assert state["step"] == 5 and state["total"] == 5 and state["extended_from"] == [3] and len(state["losses"]) == 5
    short = json.loads((tmp_path / "short.work" / "state.json").read_text())
    assert state["losses"][:3] == short["losses"]  # the first three steps are the short run's, not retrained
    a = load_file(str(next((tmp_path / "short" / "transformer").glob("*.safetensors"))))
    b = load_file(str(next((tmp_path / "long" / "transformer").glob("*.safetensors"))))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    va = load_file(str(next((tmp_path / "short" / "vae").glob("*.safetensors"))))
    vb = load_file(str(next((tmp_path / "long" / "vae").glob("*.safetensors"))))
    assert all(torch.equal(va[k], vb[k]) for k in va)  # the VAE phase is reused, not redone
