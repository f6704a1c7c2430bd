import pytest
import torch

from bitflux import CheckpointError, TernaryLinear
from bitflux.calibrate import CalibConfig, _FakeTernaryLinear, build_student, calibrate
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
    import bitflux.calibrate as cal

    real, log = cal.record_states, []

    def spy(p, prompts, config, progress=True, batch=16):
        calls = real(p, prompts, config, progress, batch)
        log.append((any(isinstance(m, _FakeTernaryLinear) for m in p.transformer.modules()), len(calls)))
        return calls

    monkeypatch.setattr(cal, "record_states", spy)
    return log


def test_student_starts_at_the_initial_ternarisation():
    lin = torch.nn.Linear(40, 12)
    for init in ("absmean", "twn"):
        fake = _FakeTernaryLinear(lin, init)
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
    assert (work / "state.json").exists()
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
    assert not any(isinstance(m, _FakeTernaryLinear) for m in pipe.transformer.modules())  # teacher restored
    plain, _ = calibrate(pipe, PROMPTS, CalibConfig(**SMALL), progress=False)
    a, c = whole.state_dict(), plain.state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the extra states changed the result

    work = tmp_path / "work"
    _kill_after(pipe, cfg, work, 5)  # after the refresh (3) and the checkpoint at 4
    assert (work / "on_policy.safetensors").exists()
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
    assert (work / "on_policy.safetensors").exists() and (work / "on_policy-1.safetensors").exists()
    resumed, _ = calibrate(pipe, PROMPTS, cfg, work_dir=work, progress=False)
    b = resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_guided_loss_pairs_cfg_branches_and_resumes_exactly(pipe, tmp_path):
    """The (cond, uncond) pairs are found in the recorded states; the guided term changes the result."""
    from bitflux.calibrate import cfg_pairs, record_states

    kw = {**SMALL["pipe_kwargs"], "true_cfg_scale": 2.0, "negative_prompt": ""}
    cfg = CalibConfig(**{**SMALL, "pipe_kwargs": kw, "guided_weight": 1.0})
    calls = record_states(pipe, PROMPTS[:3], cfg, progress=False)
    pairs = cfg_pairs(calls)
    assert len(pairs) * 2 == len(calls) == 3 * 2 * SMALL["traj_steps"]
    for c, u in pairs:
        assert c < u and torch.equal(calls[c]["hidden_states"], calls[u]["hidden_states"])
    empty = calls[pairs[0][1]]["encoder_hidden_states"]  # every negative branch encodes the same ""
    assert all(torch.equal(calls[u]["encoder_hidden_states"], empty) for _, u in pairs)
    assert not any(torch.equal(calls[c]["encoder_hidden_states"], empty) for c, _ in pairs)
    assert cfg_pairs(calls[::2]) == []  # no partners, no pairs

    whole, _ = calibrate(pipe, PROMPTS, cfg, progress=False, calls=calls)
    plain, _ = calibrate(pipe, PROMPTS, CalibConfig(**{**SMALL, "pipe_kwargs": kw}), progress=False, calls=calls)
    a, c = whole.state_dict(), plain.state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)

    work = tmp_path / "work"
    _kill_after(pipe, cfg, work, 3, calls=calls)
    resumed, _ = calibrate(pipe, PROMPTS, cfg, work_dir=work, progress=False, calls=calls)
    b = resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(BitfluxError, match="classifier-free guidance"):
        CalibConfig(**{**SMALL, "guided_weight": 1.0})
    with pytest.raises(BitfluxError, match="joint mode"):
        CalibConfig(**{**SMALL, "pipe_kwargs": kw, "guided_weight": 1.0, "mode": "blockwise"})


def test_difference_loss_changes_the_result_and_resumes_exactly(pipe, tmp_path):
    """The CFG difference term changes the result and resumes exactly; it needs CFG pairs."""
    from bitflux.calibrate import record_states

    kw = {**SMALL["pipe_kwargs"], "true_cfg_scale": 2.0, "negative_prompt": ""}
    cfg = CalibConfig(**{**SMALL, "pipe_kwargs": kw, "diff_weight": 1.0, "time_weight": 1.0})
    calls = record_states(pipe, PROMPTS[:3], cfg, progress=False)
    whole, losses = calibrate(pipe, PROMPTS, cfg, progress=False, calls=calls)
    plain, plain_losses = calibrate(pipe, PROMPTS, CalibConfig(**{**SMALL, "pipe_kwargs": kw, "time_weight": 1.0}), progress=False, calls=calls)
    a, c = whole.state_dict(), plain.state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)

    work = tmp_path / "work"
    _kill_after(pipe, cfg, work, 3, calls=calls)
    resumed, _ = calibrate(pipe, PROMPTS, cfg, work_dir=work, progress=False, calls=calls)
    b = resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(BitfluxError, match="classifier-free guidance"):
        CalibConfig(**{**SMALL, "diff_weight": 1.0})
    with pytest.raises(BitfluxError, match="joint mode"):
        CalibConfig(**{**SMALL, "pipe_kwargs": kw, "diff_weight": 1.0, "mode": "blockwise"})
    with pytest.raises(BitfluxError, match="cond_mix"):
        CalibConfig(**{**SMALL, "pipe_kwargs": kw, "diff_weight": 1.0, "cond_mix": 0.5})
    with pytest.raises(BitfluxError, match="diff_weight"):
        CalibConfig(**{**SMALL, "pipe_kwargs": kw, "diff_weight": -1.0})


def test_gain_penalty_sees_only_the_shrinkage_of_the_cfg_difference():
    """0 for d_s = d_t plus error orthogonal to it; (1 - a)^2 for d_s = a d_t; pairs weighted by |d_t|^2."""
    from bitflux.calibrate import _gain_penalty

    g = torch.Generator().manual_seed(0)
    d_t = torch.randn(5, 9, 16, generator=g)
    noise = torch.randn(5, 9, 16, generator=g)
    flat_t, flat_n = d_t.flatten(1), noise.flatten(1)
    ortho = flat_n - (flat_n * flat_t).sum(1, keepdim=True) / flat_t.square().sum(1, keepdim=True) * flat_t
    assert _gain_penalty(d_t + ortho.reshape_as(d_t), d_t).item() < 1e-10
    for a in (0.0, 0.78, 1.3):
        assert _gain_penalty(a * d_t, d_t).item() == pytest.approx((1 - a) ** 2, rel=1e-5)
    big = d_t.clone()
    big[0] *= 10  # one pair with 100x the energy, whose gain alone is off
    scaled = big.clone()
    scaled[0] *= 0.5
    e = big.flatten(1).square().sum(1)
    assert _gain_penalty(scaled, big).item() == pytest.approx((e[0] * 0.25 / e.sum()).item(), rel=1e-5)
    assert _gain_penalty(big.requires_grad_(), big.detach()).requires_grad


def _pair_option_run(pipe, **option):
    """(state dict, config, calls) of a CFG-pair calibration with `option`, checked to differ from the same
    pair batches without it (a negligible difference weight only turns pair batching on)."""
    from bitflux.calibrate import record_states

    kw = {**SMALL["pipe_kwargs"], "true_cfg_scale": 2.0, "negative_prompt": ""}
    cfg = CalibConfig(**{**SMALL, "pipe_kwargs": kw, **option})
    calls = record_states(pipe, PROMPTS[:3], cfg, progress=False)
    with_option, _ = calibrate(pipe, PROMPTS, cfg, progress=False, calls=calls)
    plain, _ = calibrate(pipe, PROMPTS, CalibConfig(**{**SMALL, "pipe_kwargs": kw, "diff_weight": 1e-30}), progress=False, calls=calls)
    a, c = with_option.state_dict(), plain.state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)
    return a, cfg, calls


def test_gain_penalty_changes_the_result_and_needs_cfg(pipe):
    _, cfg, _ = _pair_option_run(pipe, gain_weight=1.0)
    kw = cfg.pipe_kwargs
    with pytest.raises(BitfluxError, match="classifier-free guidance"):
        CalibConfig(**{**SMALL, "gain_weight": 1.0})
    with pytest.raises(BitfluxError, match="joint mode"):
        CalibConfig(**{**SMALL, "pipe_kwargs": kw, "gain_weight": 1.0, "mode": "blockwise"})
    with pytest.raises(BitfluxError, match="gain_weight"):
        CalibConfig(**{**SMALL, "pipe_kwargs": kw, "gain_weight": -1.0})


def test_diff_scale_extrapolates_only_the_conditional_half():
    from bitflux.calibrate import _extrapolate

    c, u = torch.randn(3, 9, 8), torch.randn(3, 9, 8)
    out = _extrapolate(torch.cat([c, u]), 1.25)
    assert torch.allclose(out[:3], u + 1.25 * (c - u)) and torch.equal(out[3:], u)
    assert torch.allclose(_extrapolate(torch.cat([c, u]), 1.0)[:3], c, atol=1e-6)


def test_diff_scale_changes_the_result_resumes_exactly_and_needs_cfg(pipe, tmp_path):
    a, cfg, calls = _pair_option_run(pipe, diff_scale=1.3)
    kw = cfg.pipe_kwargs
    work = tmp_path / "work"
    _kill_after(pipe, cfg, work, 3, calls=calls)
    resumed, _ = calibrate(pipe, PROMPTS, cfg, work_dir=work, progress=False, calls=calls)
    assert all(torch.equal(a[k], v) for k, v in resumed.state_dict().items())
    with pytest.raises(BitfluxError, match="classifier-free guidance"):
        CalibConfig(**{**SMALL, "diff_scale": 1.3})
    with pytest.raises(BitfluxError, match="diff_scale"):
        CalibConfig(**{**SMALL, "pipe_kwargs": kw, "diff_scale": 0.0})


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


def test_cond_mix_takes_each_token_from_the_call_or_a_donor():
    from bitflux.calibrate import _mix_conditioning

    def call(v):
        return {"hidden_states": torch.zeros(1, 4, 8), "encoder_hidden_states": torch.full((1, 6, 8), v),
                "pooled_projections": torch.full((1, 8), v)}

    calls = [call(float(v)) for v in range(10, 20)]
    kw = {k: torch.cat([call(float(i))[k] for i in range(4)]) for k in calls[0]}
    same = _mix_conditioning(kw, calls, 0.0, torch.Generator().manual_seed(0))
    assert all(torch.equal(same[k], kw[k]) for k in kw)
    mixed = _mix_conditioning(kw, calls, 1.0, torch.Generator().manual_seed(0))
    again = _mix_conditioning(kw, calls, 1.0, torch.Generator().manual_seed(0))
    assert all(torch.equal(mixed[k], again[k]) for k in kw)  # a pure function of the generator
    enc = mixed["encoder_hidden_states"]
    assert torch.equal(mixed["hidden_states"], kw["hidden_states"])  # only the text side changes
    for i in range(4):
        vals = set(enc[i, :, 0].tolist())
        assert all(torch.all(enc[i, t] == enc[i, t, 0]) for t in range(6))  # whole token vectors move
        assert vals <= {float(i)} | set(range(10, 20)) and len(vals - {float(i)}) <= 1  # self or one donor
        assert mixed["pooled_projections"][i, 0].item() in {float(i)} | set(range(10, 20))
    assert not torch.equal(enc, kw["encoder_hidden_states"])


def test_ema_and_cond_mix_change_the_result_and_resume_exactly(pipe, tmp_path):
    cfg = CalibConfig(**{**SMALL, "ema": 0.5, "cond_mix": 0.5, "lr": 1e-2})
    whole, _ = calibrate(pipe, PROMPTS, cfg, progress=False)
    for other in ({"ema": 0.0}, {"cond_mix": 0.0}):
        plain, _ = calibrate(pipe, PROMPTS, CalibConfig(**{**SMALL, "ema": 0.5, "cond_mix": 0.5, "lr": 1e-2, **other}), progress=False)
        a, c = whole.state_dict(), plain.state_dict()
        assert any(not torch.equal(a[k], c[k]) for k in a), other
    work = tmp_path / "work"
    _kill_after(pipe, cfg, work, 5)
    resumed, _ = calibrate(pipe, PROMPTS, cfg, work_dir=work, progress=False)
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(BitfluxError, match="cond_mix"):
        CalibConfig(cond_mix=1.5)
    with pytest.raises(BitfluxError, match="ema"):
        CalibConfig(ema=1.0)
    with pytest.raises(BitfluxError, match="joint mode"):
        CalibConfig(cond_mix=0.5, mode="blockwise")


def test_on_policy_fresh_samples_the_student_with_new_noise(pipe, monkeypatch):
    import bitflux.calibrate as cal

    real, seeds = cal.record_states, []

    def spy(p, prompts, config, progress=True, batch=16):
        seeds.append(config.seed)
        return real(p, prompts, config, progress, batch)

    monkeypatch.setattr(cal, "record_states", spy)
    calibrate(pipe, PROMPTS, CalibConfig(**{**SMALL, "steps": 8, "on_policy_at": 0.25, "on_policy_rounds": 2}), progress=False)
    calibrate(pipe, PROMPTS, CalibConfig(**{**SMALL, "steps": 8, "on_policy_at": 0.25, "on_policy_rounds": 2, "on_policy_fresh": True}), progress=False)
    assert seeds == [0, 0, 0, 0, 1, 2]  # teacher, then rounds 0 and 1: same noise, then fresh noise


def test_time_weight_favours_high_noise_states(pipe):
    from bitflux.calibrate import _nmse, _time_weights

    t = torch.tensor([1.0, 0.5, 0.25, 0.125])
    assert _time_weights(t, 0.0) is None
    w = _time_weights(t, 2.0)
    assert torch.allclose(w.mean(), torch.tensor(1.0)) and torch.all(w[:-1] > w[1:])
    a, b = torch.zeros(4, 3), torch.ones(4, 3)
    a[0] = 1.0  # no error on the high-noise sample: weighting lowers the loss
    assert _nmse(a, b, w) < _nmse(a, b)
    assert torch.allclose(_nmse(a, b, torch.ones(4)), _nmse(a, b))
    weighted, _ = calibrate(pipe, PROMPTS, CalibConfig(**{**SMALL, "time_weight": 2.0, "lr": 1e-2}), progress=False)
    plain, _ = calibrate(pipe, PROMPTS, CalibConfig(**{**SMALL, "lr": 1e-2}), progress=False)
    x, y = weighted.state_dict(), plain.state_dict()
    assert any(not torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(BitfluxError, match="time_weight"):
        CalibConfig(time_weight=-1.0)
    with pytest.raises(BitfluxError, match="time_weight"):
        CalibConfig(time_weight=1.0, mode="blockwise")


def test_rollout_steps_train_through_the_sampler_and_resume_exactly(pipe, tmp_path):
    """After the state-matching steps, rollout steps match whole trajectories (gradients flow through
    every denoising step); a run killed inside the rollout phase resumes bit-identically."""
    from bitflux.calibrate import sample_latents

    cfg = CalibConfig(**{**SMALL, "steps": 4, "rollout_steps": 4, "rollout_batch": 2, "rollout_lr": 1e-2})
    teacher = sample_latents(pipe, PROMPTS[:2], [1, 2], cfg)
    assert len(teacher) == cfg.traj_steps and not teacher[-1].requires_grad
    assert torch.equal(sample_latents(pipe, PROMPTS[:2], [1, 2], cfg)[-1], teacher[-1])  # noise is the seeds'
    for p in pipe.transformer.parameters():
        p.requires_grad_(True)
    try:
        out = sample_latents(pipe, PROMPTS[:2], [1, 2], cfg, grad=True)[-1]
        out.square().mean().backward()
        assert pipe.transformer.x_embedder.weight.grad.abs().sum() > 0
    finally:
        for p in pipe.transformer.parameters():
            p.requires_grad_(False)
            p.grad = None

    losses = []
    whole, stats = calibrate(pipe, PROMPTS, cfg, progress=False, on_step=lambda s, loss: losses.append(s))
    assert losses == list(range(1, 9)) and stats["rollout_steps"] == 4
    plain, _ = calibrate(pipe, PROMPTS, CalibConfig(**{**SMALL, "steps": 4}), progress=False)
    a, c = whole.state_dict(), plain.state_dict()
    codes = [k for k in a if k.endswith("qweight")]
    assert codes and all(torch.equal(a[k], c[k]) for k in codes)  # rollout steps keep the codes
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith(".scale"))  # and move the scales
    work = tmp_path / "work"
    _kill_after(pipe, cfg, work, 7)  # after the checkpoint at step 6, inside the rollout phase
    resumed, _ = calibrate(pipe, PROMPTS, cfg, work_dir=work, progress=False)
    b = resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(BitfluxError, match="joint mode"):
        CalibConfig(rollout_steps=2, mode="blockwise")
    with pytest.raises(BitfluxError, match="rollout"):
        CalibConfig(rollout_steps=-1)
