"""Open checkpoint files without trusting them: regular files only, bounded size, bounded JSON.

A checkpoint is a folder someone else wrote. `open(path).read()` on it can block forever (a FIFO
named `config.json`), read without end (`/dev/zero` behind a symlink), or hand `json.loads` a
nesting deep enough to blow the stack. Everything here opens with `O_NONBLOCK` and checks the
opened descriptor with `fstat` (so the check and the read see the same file), reads at most a
fixed number of bytes, and turns every problem into one `CheckpointError` line naming the file.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ModelError

MAX_JSON_BYTES = 64 * 1024**2  # FLUX.1-dev's index is ~90 KB; a config is ~1 KB
MAX_JSON_DEPTH = 32  # diffusers configs nest 3 deep; the bound only stops stack abuse
_KIND = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor for `path`, which must be a regular file (symlinks to one are fine).

    `O_NONBLOCK` makes opening a FIFO return at once instead of waiting for a writer; `fstat` on
    the descriptor then refuses anything but a regular file. The caller closes the descriptor.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ModelError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a regular file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror or _first_line(e)})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = _KIND.get(stat.S_IFMT(mode), "not a regular file")
        raise CheckpointError(f"{path}: is {kind}, expected a regular file")
    return fd


def check_regular_file(path: str | os.PathLike) -> int:
    """Raise unless `path` is a regular file (without blocking); return its size in bytes.

    For files handed to another reader (safetensors' `safe_open` opens by path itself).
    """
    fd = open_regular(path)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def read_bytes(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The whole content of the regular file `path`, refusing more than `max_bytes`."""
    path = Path(path)
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise CheckpointError(f"{path}: {size:,} bytes is too large (limit {max_bytes:,})")
        chunks, total = [], 0
        while True:  # read to EOF, never past the limit even if the file grows meanwhile
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise CheckpointError(f"{path}: more than {max_bytes:,} bytes (limit)")
        return b"".join(chunks)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or _first_line(e)})") from None
    finally:
        os.close(fd)


def json_depth(obj: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, `[]` is 1), computed without recursion."""
    depth, stack = 0, [(obj, 0)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            depth = max(depth, d + 1)
            stack.extend((child, d + 1) for child in node)
    return depth


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers may keep different copies of a repeated key; refuse the ambiguity.
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(data: bytes, where: str | os.PathLike, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """Parse `data` as a strict JSON object (UTF-8, no NaN/Infinity, no duplicate keys)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{where}: not UTF-8 text (byte {e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise CheckpointError(f"{where}: JSON nested too deeply (limit {max_depth})") from None
    except ValueError as e:  # duplicate keys, NaN, over-long integers
        raise CheckpointError(f"{where}: invalid JSON ({_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    if json_depth(obj) > max_depth:
        raise CheckpointError(f"{where}: JSON nested too deeply (limit {max_depth})")
    return obj


def read_json_object(
    path: str | os.PathLike,
    *,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
) -> dict[str, Any]:
    """Read a JSON object from the regular file `path`; every failure is one line naming it.

    A missing file raises `ModelError` (the folder is not what the caller thought); anything
    else (FIFO, device, directory, too large, not UTF-8, bad JSON, too deep, not an object)
    raises `CheckpointError`.
    """
    return parse_json_object(read_bytes(path, max_bytes), path, max_depth)
