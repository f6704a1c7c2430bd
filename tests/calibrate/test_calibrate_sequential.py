"""Sequential onloading: block-wise calibration streamed from the teacher's shards, one block at a time."""

from __future__ import annotations

import pytest
import torch

from bitflux.calibrate import CalibConfig, calibrate, source as source_mod
from bitflux.calibrate.api import calibrate_sequential
from bitflux.calibrate.command import eval_settings
from bitflux.linear import TernaryLinear

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a red diamond", "one yellow star"]


def _pipe():
    from bitflux.toy.build import build_pipeline

    p = build_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The toy pipeline, its transformer saved in fp32 and bf16 as sharded directories, and a config."""
    torch.set_num_threads(1)
    pipe = _pipe()
    root = tmp_path_factory.mktemp("seq")
    pipe.transformer.save_pretrained(root / "fp32", max_shard_size="300KB")  # many shards, blocks split across them
    _pipe().transformer.to(dtype=torch.bfloat16).save_pretrained(root / "bf16", max_shard_size="300KB")
    kw, _ = eval_settings("toy")
    cfg = CalibConfig(prompts=4, traj_steps=2, steps=12, batch=2, pipe_kwargs=kw, mode="blockwise", train="all", record_batch=2)
    return pipe, root, cfg


def _equal(a, b) -> bool:
    x, y = a.state_dict(), b.state_dict()
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_streamed_equals_in_memory_blockwise_and_holds_one_teacher_block(setup, tmp_path, monkeypatch):
    pipe, root, cfg = setup
    ref, ref_stats = calibrate(pipe, PROMPTS, cfg, progress=False)

    base = _pipe()
    live: set[str] = set()
    peak = [0]
    events: list[str] = []
    real_load, real_release = source_mod.TransformerSource.load, source_mod.release

    def load(self, model, name, device="cpu"):
        if "blocks." in name:
            assert base.text_encoder is None and base.text_encoder_2 is None  # encoders freed before any block
            live.add(name)
            peak[0] = max(peak[0], len(live))
        events.append(name)
        return real_load(self, model, name, device)

    def release(module):
        live.difference_update({n for n in list(live)})
        real_release(module)

    monkeypatch.setattr(source_mod.TransformerSource, "load", load)
    monkeypatch.setattr(source_mod, "release", release)
    from bitflux.calibrate import sequential as seq

    monkeypatch.setattr(seq, "release", release)
    got, stats = calibrate_sequential(root / "fp32", PROMPTS, cfg, work_dir=tmp_path / "w", pipe=base, progress=False)
    assert _equal(ref, got)  # same recorded states, same block steps: bit-identical to the in-memory run
    assert stats["final_loss"] == ref_stats["final_loss"] and stats["recorded_calls"] == ref_stats["recorded_calls"]
    assert peak[0] == 1  # never two teacher blocks at once, in the trajectories or in training
    n_blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    n_calls = cfg.traj_steps * 2 * len(PROMPTS) // cfg.record_batch  # CFG: two transformer calls per step
    assert sum("blocks." in e for e in events) == n_blocks * (n_calls + 1)  # streamed per call, then once to train


def test_result_keeps_the_stored_dtype_and_takes_its_inputs(setup, tmp_path):
    pipe, root, cfg = setup
    model, _ = calibrate_sequential(root / "bf16", PROMPTS[:2], CalibConfig(**{**cfg.to_dict(), "prompts": 2, "steps": 6}),
                                    work_dir=tmp_path / "w", pipe=_pipe(), progress=False)
    assert any(isinstance(m, TernaryLinear) for m in model.modules())
    kept = {n: p.dtype for n, p in model.named_parameters()}
    assert kept and set(kept.values()) == {torch.bfloat16}  # no fp32 copies of the kept layers
    from bitflux.calibrate.states import record_states

    call = record_states(pipe, PROMPTS[:1], CalibConfig(**{**cfg.to_dict(), "mode": "joint"}), progress=False)[0]
    kw = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in call.items()}
    out = model(**kw, return_dict=False)[0]  # bf16 inputs, as the source model takes them
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


class Killed(BaseException):
    pass


def test_killed_streamed_run_resumes_to_the_same_result_and_reuses_the_prompt_cache(setup, tmp_path, monkeypatch):
    pipe, root, cfg = setup
    whole, stats = calibrate_sequential(root / "fp32", PROMPTS, cfg, work_dir=tmp_path / "a", pipe=_pipe(), progress=False)
    from bitflux.calibrate import sequential as seq

    real = seq.train_sequential

    def dying(*a, **kw):
        def on_block(i):
            assert (tmp_path / "b" / "pool").is_dir() and any((tmp_path / "b" / "pool").glob("stream-*.bin"))
            if i == 1:
                raise Killed

        return real(*a, **kw, on_block=on_block)

    with monkeypatch.context() as m:
        m.setattr(seq, "train_sequential", dying)
        with pytest.raises(Killed):
            calibrate_sequential(root / "fp32", PROMPTS, cfg, work_dir=tmp_path / "b", pipe=_pipe(), progress=False)
    assert (tmp_path / "b" / "embeddings.safetensors").exists()
    assert (tmp_path / "b" / "calls" / "index.json").exists()  # the trajectories were recorded to disk
    from bitflux.calibrate import states

    monkeypatch.setattr(states, "record_states", lambda *a, **k: pytest.fail("a resumed run re-recorded"))
    steps = []
    resumed, again = calibrate_sequential(root / "fp32", PROMPTS, cfg, work_dir=tmp_path / "b", pipe=None, progress=False,
                                          on_step=lambda s, _l: steps.append(s))  # no text encoders: the cache serves
    per = cfg.steps // (len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks))
    assert steps[0] == 2 * per + 1  # blocks 0 and 1 were not retrained
    assert _equal(whole, resumed) and again["final_loss"] == stats["final_loss"]


def test_recorded_calls_live_on_disk_and_a_recording_killed_midway_is_redone(setup, tmp_path, monkeypatch):
    pipe, root, cfg = setup
    from bitflux.calibrate import api
    from bitflux.calibrate.recorded import RecordedCalls
    from bitflux.calibrate.states import batch_calls, record_states

    joint = CalibConfig(**{**cfg.to_dict(), "mode": "joint"})
    in_ram = record_states(pipe, PROMPTS, joint, progress=False, batch=2)
    on_disk = record_states(pipe, PROMPTS, joint, progress=False, batch=2, into=RecordedCalls(tmp_path / "c"))
    assert isinstance(on_disk, RecordedCalls) and len(on_disk) == len(in_ram) == 2 * 2 * len(PROMPTS)
    idx = [0, 3, len(in_ram) - 1]
    a, b = batch_calls(in_ram, idx), batch_calls(on_disk, idx)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(RecordedCalls(tmp_path / "c")) == len(in_ram)  # reopened from its index

    calls_made = [0]
    real_add = RecordedCalls.add

    def dying_add(self, tensors):
        calls_made[0] += 1
        if calls_made[0] == 3:
            raise Killed
        real_add(self, tensors)

    with monkeypatch.context() as m:
        m.setattr(RecordedCalls, "add", dying_add)
        with pytest.raises(Killed):
            calibrate_sequential(root / "fp32", PROMPTS, cfg, work_dir=tmp_path / "w", pipe=_pipe(), progress=False)
    assert not (tmp_path / "w" / "calls" / "index.json").exists() and any((tmp_path / "w" / "calls").iterdir())
    got, _ = api.calibrate_sequential(root / "fp32", PROMPTS, cfg, work_dir=tmp_path / "w", pipe=_pipe(), progress=False)
    ref, _ = calibrate(pipe, PROMPTS, cfg, progress=False)
    assert _equal(ref, got)


def test_a_garbage_recorded_index_is_one_line_naming_the_file(tmp_path):
    from bitflux.calibrate.recorded import RecordedCalls
    from bitflux.errors import CheckpointError

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="index.json.*delete"):
        RecordedCalls(tmp_path / "c")
