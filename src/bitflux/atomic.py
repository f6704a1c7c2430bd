"""Write an output folder all at once: into a hidden temporary sibling, then one rename.

A run that fails cleans its temporary folder up; a run that is killed (SIGKILL, power loss)
cannot, so it leaves `.OUT.tmp-PID`. The next run for the same OUT removes such folders once
their process is gone, and says so on stderr; a folder whose process still runs is left alone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ModelError, OutputExistsError

_log = logging.getLogger("bitflux")


def temp_name(out: Path, pid: int | None = None) -> Path:
    """The temporary sibling a process writes `out` into."""
    return out.parent / f".{out.name}.tmp-{os.getpid() if pid is None else pid}"


def _start_time(pid: int) -> float | None:
    """Seconds since boot at which `pid` started (Linux /proc), or None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5), after "pid (comm)"
    except (OSError, ValueError, IndexError):
        return None


def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def _alive_since(pid: int, created: float) -> bool:
    """True if process `pid` exists and could have created a folder at time `created`.

    A PID is reused once its process is gone; a process that started after the folder was
    created cannot be the one writing it (checked where /proc tells start times).
    """
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    start, boot = _start_time(pid), _boot_time()
    if start is not None and boot is not None and boot + start > created + 1.0:
        return False
    return True


def stale_temps(out: str | os.PathLike) -> list[Path]:
    """Temporary siblings `.OUT.tmp-PID` of `out` whose writing process is gone."""
    out = Path(out)
    pattern = re.compile(re.escape(f".{out.name}.tmp-") + r"(\d+)")
    stale = []
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return []
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if not m:
            continue
        try:
            created = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if not _alive_since(int(m.group(1)), created):
            stale.append(Path(entry.path))
    return sorted(stale)


def remove_stale_temps(out: str | os.PathLike) -> list[Path]:
    """Remove the stale temporary siblings of `out` (see `stale_temps`); returns what was removed."""
    removed = []
    for path in stale_temps(out):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if not os.path.lexists(path):
            _log.warning("bitflux: removed %s, left by an interrupted run", path)
            removed.append(path)
    return removed


def atomic_dir(out: str | os.PathLike) -> tuple[Path, Path]:
    """(final path, new empty temporary sibling to write into); raises if the final path exists.

    Removes stale temporaries of `out` first. The caller renames the temporary to the final
    path when done (`os.rename`) and removes it on failure; `writing_dir` does both.
    """
    out = Path(out)
    if os.path.lexists(out):
        raise OutputExistsError(f"output path exists: {out} (bitflux never overwrites)")
    if not out.parent.is_dir():
        raise ModelError(f"parent directory does not exist: {out.parent}")
    remove_stale_temps(out)
    tmp = temp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)  # our own PID: a leftover of a previous life of this PID
    try:
        tmp.mkdir()
    except OSError as e:
        raise ModelError(f"cannot create {tmp}: {e.strerror or e}") from None
    return out, tmp


def finish(tmp: Path, out: Path) -> Path:
    """Move the finished temporary folder to `out`; never replaces something created meanwhile."""
    if os.path.lexists(out):
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputExistsError(f"output path exists: {out} (created while writing; bitflux never overwrites)")
    os.rename(tmp, out)
    return out


@contextmanager
def writing_dir(out: str | os.PathLike) -> Iterator[Path]:
    """`with writing_dir(out) as tmp:` write into tmp; on success it becomes `out`, else vanishes."""
    out, tmp = atomic_dir(out)
    try:
        yield tmp
        finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
