"""`calibrate(pipe, prompts, config)`: the entry point that records, trains and re-ternarises.

Data-free: the teacher pipeline samples its own trajectories from text prompts; the student (the
same transformer with fake-ternary Linears, see student.py) is trained jointly (joint.py) or block
by block (blockwise.py) to match it, then `finalize` turns it into ordinary `TernaryLinear`s.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from typing import Any, Callable

import torch
from torch import nn

from ..errors import BitfluxError
from ..linear import TernaryLinear
from .blockwise import blocks, train_blockwise
from .checkpoint import WorkDir
from .config import CalibConfig, Mode
from .joint import train
from .states import record_states
from .student import finalize


def calibrate(
    pipe,
    prompts: list[str],
    config: CalibConfig | None = None,
    *,
    work_dir: str | os.PathLike | None = None,
    source: str = "",
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    calls: list[dict[str, torch.Tensor]] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Calibrate `pipe.transformer` into a ternary model; returns (quantised transformer, stats).

    `pipe` is the full-precision FluxPipeline (the teacher). With `work_dir`, progress is
    checkpointed there and an existing checkpoint of the same config is resumed. `calls`
    reuses states already recorded by `record_states` for the same prompts and config.
    `on_step(step, loss)` after every optimiser step (block-wise: steps counted over all blocks).
    """
    config = config or CalibConfig()
    if any(isinstance(m, TernaryLinear) for m in pipe.transformer.modules()):
        raise BitfluxError("the source transformer is already quantised; calibrate needs the full-precision model")
    if not prompts:
        raise BitfluxError("no calibration prompts")
    prompts = prompts[: config.prompts]
    t0 = time.perf_counter()
    work = WorkDir(work_dir, config) if work_dir is not None else None  # refuses another config's run
    if calls is None:
        calls = record_states(pipe, prompts, config, progress, config.record_batch)
    t_rec = time.perf_counter() - t0
    teacher = copy.deepcopy(pipe.transformer).float().eval()
    if config.mode is Mode.BLOCKWISE:  # resumable per finished block
        per_block = max(1, config.steps // len(blocks(teacher)))

        def _step(block: int, step: int, loss: float) -> None:
            if on_step is not None:
                on_step(block * per_block + step + 1, loss)

        student, losses = train_blockwise(teacher, calls, config, progress, on_step=_step, work=work)
    else:

        def resample(student: nn.Module, k: int) -> list[dict[str, torch.Tensor]]:
            if pipe.transformer.dtype != torch.float32:
                raise BitfluxError("on-policy calibration samples with the fp32 student: load the teacher pipeline in fp32")
            teacher_module = pipe.transformer
            pipe.transformer = student
            try:
                return record_states(pipe, prompts, config, progress, config.record_batch)
            finally:
                pipe.transformer = teacher_module

        student, losses = train(teacher, calls, config, work, progress, on_step, resample)
    model = finalize(pipe.transformer, student, config, source)
    stats = {
        "prompts": len(prompts),
        "recorded_calls": len(calls),
        "on_policy_steps": config.on_policy_steps(),
        "record_seconds": round(t_rec, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "final_loss": losses[-1] if losses else None,
        "config": config.to_dict(),
    }
    return model, stats


def finish_work_dir(work: str | os.PathLike) -> None:
    """Remove a finished run's checkpoints (after its result is saved)."""
    shutil.rmtree(work, ignore_errors=True)
