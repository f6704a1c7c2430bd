import pytest
import torch

from bitflux import CheckpointError, TernaryLinear
from bitflux.calibrate import CalibConfig, api, calibrate
from bitflux.calibrate.student import FakeTernaryLinear, build_student
from bitflux.cli import main
from bitflux.errors import BitfluxError
from bitflux.ternary import ternarize
from bitflux.toy.world import IMAGE_SIZE

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a red diamond"]
SMALL = dict(prompts=3, traj_steps=2, steps=6, batch=2, checkpoint_every=2, pipe_kwargs=dict(height=IMAGE_SIZE, width=IMAGE_SIZE, max_sequence_length=16))


@pytest.fixture(scope="module")
def pipe():
    from bitflux.toy.build import build_pipeline

    p = build_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def _kill_after(pipe, cfg, work, step, **kw):
    """Run a calibration into `work` and kill it (KeyboardInterrupt) once step `step` is done."""

    def die(s, _loss):
        if s == step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        calibrate(pipe, PROMPTS, cfg, work_dir=work, progress=False, on_step=die, **kw)


@pytest.fixture
def recordings(monkeypatch):
    """Log of record_states calls: (did a ternary student sample?, states recorded), in order."""
    real, log = api.record_states, []

    def spy(p, prompts, config, progress=True, batch=16):
        calls = real(p, prompts, config, progress, batch)
        log.append((any(isinstance(m, FakeTernaryLinear) for m in p.transformer.modules()), len(calls)))
        return calls

    monkeypatch.setattr(api, "record_states", spy)
    return log


def test_student_starts_at_the_initial_ternarisation():
    lin = torch.nn.Linear(40, 12)
    for init in ("absmean", "twn"):
        fake = FakeTernaryLinear(lin, init)
        codes, scale = ternarize(lin.weight.detach(), init)
        assert torch.equal(fake.codes(), codes) and torch.allclose(fake.scale, scale)


def test_calibration_lowers_the_loss_and_saves_pure_ternary(pipe):
    cfg = CalibConfig(**{**SMALL, "steps": 16, "batch": 4, "lr": 5e-3})
    losses = []
    model, stats = calibrate(pipe, PROMPTS, cfg, progress=False, on_step=lambda s, loss: losses.append(loss))
    assert stats["recorded_calls"] == 3 * 2 and len(losses) == 16
    assert sum(losses[-5:]) < sum(losses[:5])
    tls = [m for m in model.modules() if isinstance(m, TernaryLinear)]
    assert tls and all(set(t.codes().unique().tolist()) <= {-1, 0, 1} for t in tls)
    assert not any(p.dtype == torch.float32 and p.dim() == 2 for n, p in model.named_parameters() if "blocks" in n)


def test_killed_run_resumes_to_the_same_result(pipe, tmp_path):
    cfg = CalibConfig(**SMALL)
    whole, _ = calibrate(pipe, PROMPTS, cfg, progress=False)

    work = tmp_path / "work"
    _kill_after(pipe, cfg, work, 5)  # after the checkpoint at step 4, before the end
    assert [p.name for p in work.glob("state-*")] == ["state-0000004.safetensors"]
    steps_after_resume = []
    resumed, _ = calibrate(pipe, PROMPTS, cfg, work_dir=work, progress=False, on_step=lambda s, _l: steps_after_resume.append(s))
    assert steps_after_resume == [5, 6]  # continued from the step-4 checkpoint
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mismatched_resume_is_refused(pipe, tmp_path):
    work = tmp_path / "work"
    calibrate(pipe, PROMPTS, CalibConfig(**SMALL), work_dir=work, progress=False)
    with pytest.raises(CheckpointError, match="different calibration config"):
        calibrate(pipe, PROMPTS, CalibConfig(**{**SMALL, "lr": 1e-4}), work_dir=work, progress=False)


def test_scales_only_keeps_codes(pipe):
    cfg = CalibConfig(**{**SMALL, "train": "scales", "steps": 3, "checkpoint_every": 0})
    student = build_student(pipe.transformer, cfg)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".scale") for n in trainable)


def test_quantised_source_and_no_prompts_are_refused(pipe):
    with pytest.raises(BitfluxError, match="no calibration prompts"):
        calibrate(pipe, [], CalibConfig(**SMALL), progress=False)


def test_cli_bad_inputs(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    (tmp_path / "exists").mkdir()
    cases = [
        (["calibrate", "toy", str(tmp_path / "o"), "--prompts", str(empty)], "prompt file is empty"),
        (["calibrate", "toy", str(tmp_path / "o"), "--prompts", str(tmp_path / "nope.txt")], "prompt file not found"),
        (["calibrate", "toy", str(tmp_path / "exists"), "--prompts", "toy"], "exists"),
        (["calibrate", str(tmp_path / "nope"), str(tmp_path / "o"), "--prompts", "toy"], "no such model"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "o").exists()


def test_blockwise_mode_through_calibrate(pipe):
    steps = []
    cfg = CalibConfig(**{**SMALL, "mode": "blockwise", "checkpoint_every": 0})
    model, stats = calibrate(pipe, PROMPTS, cfg, progress=False, on_step=lambda s, _l: steps.append(s))
    n_blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    assert steps == list(range(1, n_blocks * max(1, cfg.steps // n_blocks) + 1))
    assert any(isinstance(m, TernaryLinear) for m in model.modules()) and stats["final_loss"] is not None


def test_killed_blockwise_run_resumes_from_the_last_finished_block(pipe, tmp_path):
    cfg = CalibConfig(**{**SMALL, "mode": "blockwise", "steps": 12, "checkpoint_every": 0})
    n_blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    per = max(1, cfg.steps // n_blocks)
    whole, _ = calibrate(pipe, PROMPTS, cfg, progress=False)

    work = tmp_path / "work"
    _kill_after(pipe, cfg, work, 2 * per + 1)  # first step of block 2: blocks 0 and 1 are saved
    assert sorted(p.name for p in work.glob("block-*.safetensors")) == ["block-000.safetensors", "block-001.safetensors"]
    steps = []
    resumed, _ = calibrate(pipe, PROMPTS, cfg, work_dir=work, progress=False, on_step=lambda s, _l: steps.append(s))
    assert steps[0] == 2 * per + 1 and steps[-1] == n_blocks * per  # blocks 0, 1 were not retrained
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="different calibration config"):
        calibrate(pipe, PROMPTS, CalibConfig(**{**SMALL, "mode": "blockwise", "steps": 12, "lr": 1e-4}), work_dir=work, progress=False)


def test_on_policy_states_join_the_pool_and_resume_exactly(pipe, tmp_path, recordings):
    """Student-visited states are added at the refresh step; a run killed after it resumes bit-identically."""
    cfg = CalibConfig(**{**SMALL, "on_policy_at": 0.5})  # refresh at step 3, checkpoints at 2, 4, 6
    assert cfg.on_policy_step() == 3
    whole, stats = calibrate(pipe, PROMPTS, cfg, progress=False)
    assert [s[0] for s in recordings] == [False, True]  # teacher first, then the student at step 3
    assert not any(isinstance(m, FakeTernaryLinear) for m in pipe.transformer.modules())  # teacher restored
    plain, _ = calibrate(pipe, PROMPTS, CalibConfig(**SMALL), progress=False)
    a, c = whole.state_dict(), plain.state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the extra states changed the result

    work = tmp_path / "work"
    _kill_after(pipe, cfg, work, 5)  # after the refresh (3) and the checkpoint at 4
    assert (work / "on_policy-0.safetensors").exists()
    resumed, _ = calibrate(pipe, PROMPTS, cfg, work_dir=work, progress=False)
    b = resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_on_policy_rounds_add_states_at_each_refresh_and_resume_exactly(pipe, tmp_path, recordings):
    """Two refreshes (DAgger rounds): the pool grows twice; a run killed after both resumes bit-identically."""
    cfg = CalibConfig(**{**SMALL, "steps": 8, "on_policy_at": 0.25, "on_policy_rounds": 2})
    assert cfg.on_policy_steps() == [2, 5]
    whole, stats = calibrate(pipe, PROMPTS, cfg, progress=False)
    sizes = [n for _, n in recordings]
    assert len(sizes) == 3 and stats["recorded_calls"] == sizes[0]  # teacher, then two student rounds
    assert stats["on_policy_steps"] == [2, 5]
    one, _ = calibrate(pipe, PROMPTS, CalibConfig(**{**SMALL, "steps": 8, "on_policy_at": 0.25}), progress=False)
    a, c = whole.state_dict(), one.state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the second round changed the result

    work = tmp_path / "work"
    _kill_after(pipe, cfg, work, 7)  # after both refreshes and the checkpoint at 6
    assert (work / "on_policy-0.safetensors").exists() and (work / "on_policy-1.safetensors").exists()
    resumed, _ = calibrate(pipe, PROMPTS, cfg, work_dir=work, progress=False)
    b = resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cfg_pairs_finds_the_conditional_and_unconditional_branches(pipe):
    """The (cond, uncond) pairs of real-CFG trajectories are found by their identical inputs."""
    from bitflux.calibrate.states import cfg_pairs, record_states

    kw = {**SMALL["pipe_kwargs"], "true_cfg_scale": 2.0, "negative_prompt": ""}
    calls = record_states(pipe, PROMPTS[:3], CalibConfig(**{**SMALL, "pipe_kwargs": kw}), progress=False)
    pairs = cfg_pairs(calls)
    assert len(pairs) * 2 == len(calls) == 3 * 2 * SMALL["traj_steps"]
    for c, u in pairs:
        assert c < u and torch.equal(calls[c]["hidden_states"], calls[u]["hidden_states"])
    empty = calls[pairs[0][1]]["encoder_hidden_states"]  # every negative branch encodes the same ""
    assert all(torch.equal(calls[u]["encoder_hidden_states"], empty) for _, u in pairs)
    assert not any(torch.equal(calls[c]["encoder_hidden_states"], empty) for c, _ in pairs)
    assert cfg_pairs(calls[::2]) == []  # no partners, no pairs


def test_train_full_updates_the_kept_layers_and_nothing_else_changes_format(pipe):
    """`full` also trains embedders/norm_out/proj_out; `all` leaves them the teacher's."""
    full, _ = calibrate(pipe, PROMPTS, CalibConfig(**{**SMALL, "train": "full", "lr": 1e-2}), progress=False)
    part, _ = calibrate(pipe, PROMPTS, CalibConfig(**{**SMALL, "train": "all", "lr": 1e-2}), progress=False)
    teacher = pipe.transformer.state_dict()
    for name in ("x_embedder.weight", "context_embedder.weight", "proj_out.weight", "norm_out.linear.weight"):
        assert torch.equal(part.state_dict()[name], teacher[name])
        assert not torch.equal(full.state_dict()[name], teacher[name]), name
        assert full.state_dict()[name].dtype == teacher[name].dtype
    assert full.state_dict().keys() == part.state_dict().keys()
    assert sum(isinstance(m, TernaryLinear) for m in full.modules()) == sum(isinstance(m, TernaryLinear) for m in part.modules())
    with pytest.raises(BitfluxError, match="joint mode"):
        CalibConfig(train="full", mode="blockwise")


def test_on_policy_is_refused_where_it_cannot_work():
    with pytest.raises(BitfluxError, match="joint mode"):
        CalibConfig(on_policy_at=0.5, mode="blockwise")
    with pytest.raises(BitfluxError, match="on_policy_at"):
        CalibConfig(on_policy_at=1.0)
    with pytest.raises(BitfluxError, match="on_policy_rounds"):
        CalibConfig(on_policy_at=0.5, on_policy_rounds=0)


def test_sharding_is_refused_in_block_wise_mode(capsys, tmp_path):
    """FSDP2 sharding is joint mode's, in the config and on the command line (one line, exit 2)."""
    from bitflux.cli import main

    with pytest.raises(BitfluxError, match="--shard is for joint mode"):
        CalibConfig(shard=True, mode="blockwise")
    rc = main(["calibrate", "toy", str(tmp_path / "x"), "--prompts", "toy", "--mode", "blockwise", "--shard"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--shard is for joint mode" in err[0]


def test_removed_options_are_gone_from_the_cli_and_the_config(capsys):
    """Options whose ablation rows showed no gain were removed; their rows stay in the record."""
    import json
    from pathlib import Path

    for flag in ("--cond-mix", "--time-weight", "--rollout-steps", "--diff-weight", "--gain-weight", "--diff-scale",
                 "--guided-weight", "--ema", "--on-policy-fresh"):
        with pytest.raises(SystemExit):
            main(["calibrate", "toy", "o", "--prompts", "toy", flag, "1"])
        assert "unrecognized arguments" in capsys.readouterr().err
    for name in ("cond_mix", "time_weight", "rollout_steps", "diff_weight", "gain_weight", "diff_scale", "guided_weight", "ema"):
        with pytest.raises(TypeError):
            CalibConfig(**{name: 1})
    record = Path(__file__).parents[2] / "bench" / "results" / "ablations-toy128.json"
    if record.exists():  # the research record keeps the measured rows
        assert "text-token mixing 25%" in {r["row"] for r in json.loads(record.read_text())}


def test_a_work_dir_resumes_sharded_or_not_but_not_with_other_settings(tmp_path):
    """`shard` only spreads a run over processes (the checkpoint files are the same), so it is not
    part of the config a resume must match; any setting that changes the result is."""
    from bitflux.calibrate.checkpoint import WorkDir

    WorkDir(tmp_path / "w", CalibConfig(shard=True))
    WorkDir(tmp_path / "w", CalibConfig(shard=False))  # no error
    with pytest.raises(CheckpointError, match="different calibration config"):
        WorkDir(tmp_path / "w", CalibConfig(shard=True, lr=1e-4))
