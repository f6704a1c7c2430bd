"""Resumable calibration state: the trainable tensors, the optimiser state and the step, written
atomically to `<OUT>.partial/`, plus the student snapshots taken at on-policy refreshes.

A checkpoint records the whole calibration config; resuming with another config is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from .config import CalibConfig
from .student import trainable


def _save_ckpt(
    work: Path, student: nn.Module, opt: torch.optim.Optimizer, step: int, config: CalibConfig,
    ema: dict[str, torch.Tensor] | None = None,
) -> None:
    params = trainable(student)
    tensors = {f"param/{n}": p.detach().contiguous() for n, p in params.items()}
    tensors.update({f"ema/{n}": t.contiguous() for n, t in (ema or {}).items()})
    names = {id(p): n for n, p in params.items()}
    for p, st in opt.state.items():
        for k, v in st.items():
            tensors[f"opt/{names[id(p)]}/{k}"] = v.detach().reshape(-1) if v.dim() == 0 else v.detach().contiguous()
    tmp = work / f".state.tmp-{os.getpid()}"
    save_file(tensors, str(tmp))
    os.replace(tmp, work / "state.safetensors")
    meta = {"step": step, "config": config.to_dict()}
    (work / ".state.json.tmp").write_text(json.dumps(meta))
    os.replace(work / ".state.json.tmp", work / "state.json")


def _save_params(student: nn.Module, path: Path) -> None:
    """The student's trainable tensors, written atomically (the on-policy snapshot)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({n: p.detach().contiguous() for n, p in trainable(student).items()}, str(tmp))
    os.replace(tmp, path)


def _snapshot_name(k: int) -> str:
    """File of the student snapshot taken at on-policy refresh k."""
    return "on_policy.safetensors" if k == 0 else f"on_policy-{k}.safetensors"


def _load_params(student: nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Copy `prefix + name` tensors into the student's trainable parameters."""
    with torch.no_grad():
        for n, p in trainable(student).items():
            p.copy_(tensors[prefix + n])


def _load_ckpt(
    work: Path, student: nn.Module, opt: torch.optim.Optimizer, config: CalibConfig,
    ema: dict[str, torch.Tensor] | None = None,
) -> int:
    meta = json.loads((work / "state.json").read_text())
    if meta.get("config") != config.to_dict():
        raise CheckpointError(f"{work}: resume checkpoint was made with a different calibration config")
    tensors = load_file(str(work / "state.safetensors"))
    _load_params(student, tensors, "param/")
    for n in ema or {}:
        ema[n].copy_(tensors[f"ema/{n}"])
    for n, p in trainable(student).items():
        st = {k.rsplit("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"opt/{n}/")}
        if st:
            if "step" in st:
                st["step"] = st["step"].reshape(())
            opt.state[p] = st
    return int(meta["step"])
