import json
import os
import threading

import pytest

from bitflux.errors import CheckpointError, ModelError
from bitflux.safeio import check_regular_file, json_depth, read_json_object


def _write(tmp_path, data: bytes, name="config.json"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_reads_an_object(tmp_path):
    assert read_json_object(_write(tmp_path, b'{"a": [1, {"b": 2}]}')) == {"a": [1, {"b": 2}]}


@pytest.mark.parametrize(
    "data, message",
    [
        (b"[1, 2]", "expected a JSON object, found list"),
        (b"null", "expected a JSON object, found NoneType"),
        (b"", "invalid JSON"),
        (b"{garbage", "invalid JSON"),
        (b'{"a": 1} trailing', "invalid JSON"),
        (b'{"a": NaN}', "NaN is not valid JSON"),
        (b'{"a": -Infinity}', "-Infinity is not valid JSON"),
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b'{"a": "\xff\xfe"}', "not UTF-8"),
        (b'{"a": ' + b"9" * 5000 + b"}", "invalid JSON"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", "nested too deeply"),
    ],
)
def test_bad_json_is_one_line_naming_the_file(tmp_path, data, message):
    p = _write(tmp_path, data)
    with pytest.raises(CheckpointError) as e:
        read_json_object(p)
    assert message in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_depth_limit_is_the_nesting_depth(tmp_path):
    ok = b'{"a": ' + b"[" * 30 + b"]" * 30 + b"}"  # depth 31
    assert json_depth(read_json_object(_write(tmp_path, ok))) == 31
    with pytest.raises(CheckpointError):
        read_json_object(_write(tmp_path, ok), max_depth=30)


def test_size_limit(tmp_path):
    p = _write(tmp_path, json.dumps({"a": "x" * 1000}).encode())
    with pytest.raises(CheckpointError, match="too large"):
        read_json_object(p, max_bytes=100)


def test_missing_file_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        read_json_object(tmp_path / "config.json")


def test_fifo_does_not_block(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    done = []

    def run():
        try:
            read_json_object(fifo)
        except CheckpointError as e:
            done.append(str(e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    assert done and "is a FIFO" in done[0]


def test_directory_device_and_symlinks(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="is a directory"):
        read_json_object(tmp_path / "d")
    with pytest.raises(CheckpointError, match="character device"):
        check_regular_file("/dev/zero")
    (tmp_path / "link").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="character device"):
        read_json_object(tmp_path / "link")
    target = _write(tmp_path, b'{"ok": true}', "real.json")
    (tmp_path / "good").symlink_to(target)  # the hub cache links files to blobs: fine
    assert read_json_object(tmp_path / "good") == {"ok": True}
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ModelError):
        read_json_object(tmp_path / "dangling")


def test_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    p = _write(tmp_path, b"{}")
    p.chmod(0)
    with pytest.raises(CheckpointError, match="cannot open"):
        read_json_object(p)
