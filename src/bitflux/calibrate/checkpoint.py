"""Crash-safe resumable state of one calibration run: the work directory `<OUT>.partial/`.

Layout (every file appears in one atomic step: written to `.NAME.tmp-PID`, flushed to disk, then
renamed over `NAME`, so a kill at any moment leaves either the old file or the new one):
- `config.json`: the calibration config; a resume with another config is refused;
- `state-SSSSSSS.safetensors` (joint): trainable tensors, optimiser state and, in the header's
  metadata, the step and the loss history; only the newest is kept;
- `on_policy-K.safetensors` (joint): the student at on-policy refresh K;
- `block-NNN.safetensors` (block-wise): block NNN's trained tensors and its losses.
Because each checkpoint is a single file, its tensors and its step can never disagree. Leftover
temporaries and superseded states are removed when the directory is opened. A file that is
torn, truncated or garbage raises `CheckpointError` naming the file and how to start over.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError
from . import distributed
from .config import CalibConfig
from .student import trainable

_STATE = re.compile(r"state-(\d{7})\.safetensors")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Call `write(tmp)` on a temporary sibling, flush it to disk, then rename it to `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class WorkDir:
    """The resumable state of one calibration run (see the module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike, config: CalibConfig) -> None:
        self.path = Path(path)
        self.config = config
        if not distributed.is_main():  # rank 0 prepares the directory; the others then read it
            distributed.barrier()
            self._check_config()
            return
        try:
            self._prepare()
        finally:
            distributed.barrier()

    def _prepare(self) -> None:
        """Create or check the directory and drop what a killed run left half-done (rank 0 only)."""
        config = self.config
        self.path.mkdir(parents=True, exist_ok=True)
        for entry in self.path.iterdir():  # temporaries of a killed write: never part of the state
            if entry.name.startswith(".") and ".tmp-" in entry.name:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
        cfg = self.path / "config.json"
        if cfg.exists():
            self._check_config()
        else:
            if any(self.path.iterdir()):
                raise self._error(cfg, "missing, but the directory holds other files")
            _atomic_write(cfg, lambda tmp: tmp.write_text(json.dumps(config.to_dict(), indent=1)))
        states = self._states()
        for old in states[:-1]:  # superseded by the newest (a kill may have left them)
            old.unlink(missing_ok=True)

    def _check_config(self) -> None:
        cfg = self.path / "config.json"
        try:
            recorded = json.loads(cfg.read_text())
        except FileNotFoundError:
            raise self._error(cfg, "missing") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise self._error(cfg, "not a calibration config (garbage JSON)") from None

        def computed(cfg: dict) -> dict:  # `shard` is how a run is spread over processes, not what it computes
            return {k: v for k, v in cfg.items() if k != "shard"}

        if computed(recorded) != computed(self.config.to_dict()):
            raise CheckpointError(
                f"{self.path}: resume checkpoint was made with a different calibration config "
                f"(delete {self.path} to start over, or run with the options it was made with)"
            )

    def _error(self, file: Path, why: str) -> CheckpointError:
        return CheckpointError(f"{file}: {why}; delete {self.path} to start over")

    # ------------------------------------------------------------------ single tensor files
    def write(self, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
        """Write `name` (a .safetensors file) atomically, with `meta` as JSON in its header (rank 0 writes)."""
        if distributed.is_main():
            flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            header = {"bitflux": json.dumps(meta or {})}
            _atomic_write(self.path / name, lambda tmp: save_file(flat, str(tmp), metadata=header))
        distributed.barrier()

    def exists(self, name: str) -> bool:
        return (self.path / name).is_file()

    def read(self, name: str, expected: set[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, meta) of `name`; a torn, truncated or garbage file raises `CheckpointError`."""
        path = self.path / name
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = json.loads(header["bitflux"])
        except FileNotFoundError:
            raise self._error(path, "missing") from None
        except Exception as e:  # safetensors raises its own error types for torn headers and short data
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise self._error(path, f"unreadable checkpoint ({reason})") from None
        if not isinstance(meta, dict):
            raise self._error(path, "unreadable checkpoint (bad metadata)")
        if expected is not None and not expected <= tensors.keys():
            missing = sorted(expected - tensors.keys())[0]
            raise self._error(path, f"checkpoint lacks tensor {missing}")
        return tensors, meta

    # ------------------------------------------------------------------ joint training state
    def _states(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if _STATE.fullmatch(p.name))

    def save_state(self, student: nn.Module, opt: torch.optim.Optimizer, step: int, losses: list[float]) -> None:
        """The trainable tensors, Adam state, step and loss history; then drop the older states."""
        params = trainable(student)
        keep = distributed.is_main()  # a sharded student is gathered tensor by tensor; only rank 0 keeps them
        tensors = {}
        for n, p in params.items():
            full = distributed.gather(p.detach())
            if keep:
                tensors[f"param/{n}"] = full
        names = {id(p): n for n, p in params.items()}
        for p, st in opt.state.items():
            for k, v in st.items():
                full = distributed.gather(v)
                if keep:
                    tensors[f"opt/{names[id(p)]}/{k}"] = full.reshape(-1) if full.dim() == 0 else full
        self.write(f"state-{step:07d}.safetensors", tensors, {"step": step, "losses": losses})
        for old in self._states():
            if old.name != f"state-{step:07d}.safetensors":
                old.unlink(missing_ok=True)

    def load_state(self, student: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list[float]]:
        """Restore the newest state into `student` and `opt`; (step, loss history), (0, []) if none."""
        states = self._states()
        if not states:
            return 0, []
        params = trainable(student)
        tensors, meta = self.read(states[-1].name, {f"param/{n}" for n in params})
        step, losses = meta.get("step"), meta.get("losses")
        if not isinstance(step, int) or not isinstance(losses, list) or len(losses) != step:
            raise self._error(states[-1], "unreadable checkpoint (bad step or loss history)")
        load_params(student, tensors, "param/")
        for n, p in params.items():
            st = {k.rsplit("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"opt/{n}/")}
            if st:
                if "step" in st:
                    st["step"] = st["step"].reshape(())
                opt.state[p] = {k: v if k == "step" else distributed.distribute_like(v, p) for k, v in st.items()}
        return step, [float(v) for v in losses]

    # ------------------------------------------------------------------ on-policy snapshots
    def save_snapshot(self, k: int, student: nn.Module) -> None:
        self.write(f"on_policy-{k}.safetensors", gathered(student), {"refresh": k})

    def load_snapshot(self, k: int, student: nn.Module) -> None:
        tensors, _ = self.read(f"on_policy-{k}.safetensors", set(trainable(student)))
        load_params(student, tensors)


def load_params(student: nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Copy `prefix + name` tensors into the student's trainable parameters (this process's part if sharded)."""
    with torch.no_grad():
        for n, p in trainable(student).items():
            p.copy_(distributed.distribute_like(tensors[prefix + n], p))


def gathered(student: nn.Module) -> dict[str, torch.Tensor]:
    """The student's trainable tensors, whole on every process (a collective when the student is sharded)."""
    return {n: distributed.gather(p.detach()) for n, p in trainable(student).items()}
