"""Crash-safe resume: a kill at any write, the final save included, resumes to the uninterrupted result;
a torn, truncated or garbage checkpoint is one line naming the file and how to start over."""

from __future__ import annotations

import pytest
import torch

from bitflux.calibrate import CalibConfig, calibrate, checkpoint
from bitflux.cli import main
from bitflux.errors import CheckpointError
from bitflux.toy.world import IMAGE_SIZE

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a red diamond"]
SMALL = dict(prompts=3, traj_steps=2, steps=6, batch=2, checkpoint_every=2, pipe_kwargs=dict(height=IMAGE_SIZE, width=IMAGE_SIZE, max_sequence_length=16))


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the calibration code catches it."""


@pytest.fixture(scope="module")
def pipe():
    from bitflux.toy.build import build_pipeline

    torch.set_num_threads(1)
    p = build_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def calls(pipe):
    """The teacher's recorded states, shared by every run here (recording is the same each time)."""
    from bitflux.calibrate.states import record_states

    return record_states(pipe, PROMPTS, CalibConfig(**SMALL), progress=False)


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x, y = a.state_dict(), b.state_dict()
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _leftovers(work) -> list[str]:
    return sorted(p.name for p in work.iterdir() if ".tmp-" in p.name)


def _kill_at_write(monkeypatch, n: int, after_rename: bool) -> list[str]:
    """Make the n-th atomic write of the work dir die before (or just after) its rename; returns the log."""
    real, log = checkpoint._atomic_write, []

    def write(path, fn):
        log.append(path.name)
        if len(log) - 1 == n and not after_rename:
            fn(path.with_name(f".{path.name}.tmp-4242"))  # the temporary is on disk, the rename never happens
            raise Killed
        real(path, fn)
        if len(log) - 1 == n:
            raise Killed

    monkeypatch.setattr(checkpoint, "_atomic_write", write)
    return log


@pytest.mark.parametrize("mode", ["joint", "blockwise"])
def test_a_kill_at_any_write_resumes_to_the_uninterrupted_result(pipe, calls, tmp_path, monkeypatch, mode):
    extra = {"on_policy_at": 0.5} if mode == "joint" else {"mode": "blockwise", "steps": 12}
    cfg = CalibConfig(**{**SMALL, **extra})
    whole, stats = calibrate(pipe, PROMPTS, cfg, progress=False, calls=calls)
    with monkeypatch.context() as m:
        writes = _kill_at_write(m, 10**9, False)
        calibrate(pipe, PROMPTS, cfg, work_dir=tmp_path / "count", progress=False, calls=calls)
    if mode == "joint":  # config, states at 2, the snapshot at the refresh (3), states at 4 and 6
        assert writes == ["config.json", "state-0000002.safetensors", "on_policy-0.safetensors",
                          "state-0000004.safetensors", "state-0000006.safetensors"]
    else:
        assert writes[0] == "config.json" and writes[1:] == [f"block-{i:03d}.safetensors" for i in range(len(writes) - 1)]
    last = len(writes) - 1  # each kind of write, killed before and after its rename (not every pair: time)
    points = [(0, False), (1, True), (2, False), (2, True), (3, False), (last, False), (last, True)]
    if mode == "blockwise":
        points = [(0, True), (1, False), (last, False), (last, True)]
    for n, after in points:
        work = tmp_path / f"w{n}{int(after)}"
        with monkeypatch.context() as m:
            _kill_at_write(m, n, after)
            with pytest.raises(Killed):
                calibrate(pipe, PROMPTS, cfg, work_dir=work, progress=False, calls=calls)
        resumed, again = calibrate(pipe, PROMPTS, cfg, work_dir=work, progress=False, calls=calls)
        assert _equal(whole, resumed), (writes[n], after)
        assert again["final_loss"] == stats["final_loss"], (writes[n], after)
        assert _leftovers(work) == [] and len(list(work.glob("state-*"))) == (mode == "joint")


def _killed_run(pipe, calls, work, cfg, kill_step: int) -> None:
    def die(s, _loss):
        if s == kill_step:
            raise Killed

    with pytest.raises(Killed):
        calibrate(pipe, PROMPTS, cfg, work_dir=work, progress=False, on_step=die, calls=calls)


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "torn header":
        path.write_bytes(data[:5])
    elif how == "garbage":
        path.write_bytes(b"\x00garbage" * 50)
    elif how == "empty":
        path.write_bytes(b"")


def test_a_damaged_checkpoint_is_one_line_naming_the_file(pipe, calls, tmp_path):
    import shutil

    cfg = CalibConfig(**{**SMALL, "on_policy_at": 0.5})
    killed = tmp_path / "killed"
    _killed_run(pipe, calls, killed, cfg, 5)  # state at 4, snapshot at 3
    for how in ("truncated", "torn header", "garbage", "empty"):
        for name in ("state-0000004.safetensors", "on_policy-0.safetensors"):
            work = tmp_path / f"{how}-{name}"
            shutil.copytree(killed, work)
            _damage(work / name, how)
            with pytest.raises(CheckpointError) as e:
                calibrate(pipe, PROMPTS, cfg, work_dir=work, progress=False, calls=calls)
            msg = str(e.value)
            assert name in msg and f"delete {work} to start over" in msg and "\n" not in msg, msg
    (killed / "on_policy-0.safetensors").unlink()
    with pytest.raises(CheckpointError, match="on_policy-0.safetensors: missing"):
        calibrate(pipe, PROMPTS, cfg, work_dir=killed, progress=False, calls=calls)


def test_garbage_config_and_a_damaged_block_are_reported(pipe, calls, tmp_path):
    work = tmp_path / "work"
    cfg = CalibConfig(**{**SMALL, "mode": "blockwise", "steps": 12})
    _killed_run(pipe, calls, work, cfg, 5)
    block = sorted(work.glob("block-*.safetensors"))[-1]
    _damage(block, "truncated")
    with pytest.raises(CheckpointError, match=f"{block.name}.*delete .* to start over"):
        calibrate(pipe, PROMPTS, cfg, work_dir=work, progress=False, calls=calls)
    (work / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json.*garbage.*to start over"):
        calibrate(pipe, PROMPTS, cfg, work_dir=work, progress=False, calls=calls)
    (work / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        calibrate(pipe, PROMPTS, cfg, work_dir=work, progress=False, calls=calls)


ARGS = ["--prompts", "PROMPTS", "--num-prompts", "3", "--steps", "4", "--traj-steps", "2", "--batch", "2",
        "--checkpoint-every", "2", "--train", "all", "--threads", "1", "--json"]


def _cli(tmp_path, out, capsys) -> int:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    rc = main(["calibrate", "toy", str(out), *[str(prompts) if a == "PROMPTS" else a for a in ARGS]])
    capsys.readouterr()
    return rc


def _tensors(out):
    from safetensors.torch import load_file

    return {p.name: load_file(str(p)) for p in sorted(out.glob("*.safetensors"))}


def test_a_kill_during_or_after_the_final_save_resumes_and_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """The issue's failure: a kill in the final save, then a re-run that crashed on the missing loss."""
    import bitflux.checkpoint as ckpt

    ref = tmp_path / "ref"
    assert _cli(tmp_path, ref, capsys) == 0
    real = ckpt.save
    for when in ("before", "after"):
        out = tmp_path / when

        def dying_save(model, path, *a, **kw):
            if when == "after":
                real(model, path, *a, **kw)
            raise Killed

        with monkeypatch.context() as m:
            m.setattr(ckpt, "save", dying_save)
            with pytest.raises(Killed):
                _cli(tmp_path, out, capsys)
        assert (tmp_path / f"{when}.partial").is_dir()
        if when == "before":  # what a SIGKILL inside the save leaves: its temporary folder, its process gone
            (tmp_path / f".{when}.tmp-999999999").mkdir()
            (tmp_path / f".{when}.tmp-999999999" / "config.json").write_text("{}")
        assert _cli(tmp_path, out, capsys) == 0
        a, b = _tensors(ref), _tensors(out)
        assert a.keys() == b.keys() and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])
        assert not (tmp_path / f"{when}.partial").exists()
        assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_damaged_checkpoint_is_one_line_from_the_cli(tmp_path, capsys):
    out = tmp_path / "out"
    work = tmp_path / "out.partial"
    work.mkdir()
    (work / "config.json").write_text("\x00\x01")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    assert main(["calibrate", "toy", str(out), *[str(prompts) if a == "PROMPTS" else a for a in ARGS]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0] and "to start over" in err[0], err
    assert not out.exists()
