import os
import signal
import subprocess
import sys
import time

import pytest

from bitflux.atomic import atomic_dir, remove_stale_temps, stale_temps, temp_name, writing_dir
from bitflux.errors import ModelError, OutputExistsError

_WRITER = """
import sys, time
from bitflux.atomic import atomic_dir
out, tmp = atomic_dir(sys.argv[1])
(tmp / "part.safetensors").write_bytes(b"x" * 1000)
print(tmp, flush=True)
time.sleep(600)
"""


def _killed_writer(out):
    """Run a writer in a real process, SIGKILL it mid-write; returns the temp folder it left."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        tmp = proc.stdout.readline().strip()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert tmp and os.path.isdir(tmp)
    return tmp


def test_a_killed_writers_temp_is_removed_by_the_next_run(tmp_path, caplog):
    out = tmp_path / "q"
    left = _killed_writer(out)
    assert not out.exists() and stale_temps(out) == [type(out)(left)]
    with writing_dir(out) as tmp:
        assert not os.path.exists(left)  # cleaned before this run writes
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").read_text() == "{}"
    assert sorted(os.listdir(tmp_path)) == ["q"]
    assert "left by an interrupted run" in caplog.text


def test_a_live_writers_temp_is_left_alone(tmp_path):
    out = tmp_path / "q"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live = temp_name(out, sleeper.pid)
        live.mkdir()
        assert stale_temps(out) == []
        assert remove_stale_temps(out) == []
        assert live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert stale_temps(out) == [live]


def test_a_reused_pid_does_not_keep_a_temp_alive(tmp_path):
    out = tmp_path / "q"
    old = temp_name(out, 999_999_999)  # no such process
    old.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        reused = temp_name(out, sleeper.pid)
        reused.mkdir()
        past = time.time() - 3600  # written an hour before this process started: not its writer
        os.utime(reused, (past, past))
        assert stale_temps(out) == sorted([old, reused])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_failure_inside_leaves_nothing(tmp_path):
    out = tmp_path / "q"
    with pytest.raises(RuntimeError):
        with writing_dir(out) as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):
        with writing_dir(out):
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_refusals(tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        atomic_dir(tmp_path / "exists")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")  # a dangling symlink is still in the way
    with pytest.raises(OutputExistsError):
        atomic_dir(tmp_path / "link")
    with pytest.raises(ModelError, match="parent directory does not exist"):
        atomic_dir(tmp_path / "no" / "q")
    # a file named like a temp that is not ours or a directory: removed like any stale temp
    (tmp_path / ".q.tmp-999999999").write_text("junk")
    out, tmp = atomic_dir(tmp_path / "q")
    assert sorted(os.listdir(tmp_path)) == sorted(["exists", "link", tmp.name])


_QUANTIZE = """
import sys
from diffusers import FluxTransformer2DModel
import bitflux
from bitflux.toy import bundled_path
model = FluxTransformer2DModel.from_pretrained(bundled_path("toy") / "transformer")
bitflux.quantize(model, bitflux.QuantConfig())
print("saving", flush=True)
bitflux.save(model, sys.argv[1], max_shard_bytes=20_000)  # many small shards: a long window to kill in
"""


def test_a_killed_quantize_leaves_nothing_a_later_run_trips_on(tmp_path):
    out = tmp_path / "q"
    proc = subprocess.Popen([sys.executable, "-c", _QUANTIZE, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saving"
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".q.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)  # right after the temporary folder appears
    finally:
        proc.kill()
        proc.wait(30)
    if out.exists():
        pytest.skip("the save finished before the kill landed")
    assert len(list(tmp_path.glob(".q.tmp-*"))) == 1
    from bitflux.cli import main

    assert main(["quantize", "toy", str(out), "--json"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["q"]
    import bitflux

    bitflux.load(out)
