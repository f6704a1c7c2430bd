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
from . import distributed
from .blockwise import blocks, train_blockwise
from .checkpoint import WorkDir
from .config import CalibConfig, Mode
from .joint import train
from .recorded import RECORDED, RecordedCalls
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
    teacher = pipe.transformer.eval()  # joint training computes in fp32: an fp32 teacher is used as it is
    if teacher.dtype != torch.float32:  # (block-wise `calibrate_sequential` keeps any stored dtype)
        teacher = copy.deepcopy(teacher).float().eval()
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
        "resolution": [config.pipe_kwargs.get("height"), config.pipe_kwargs.get("width")],
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


# FLUX.1-dev's scheduler (FlowMatchEulerDiscreteScheduler), used when no base pipeline is given
FLUX_DEV_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000,
    shift=3.0, use_dynamic_shifting=True,
)


def calibrate_sequential(
    transformer_dir: str | os.PathLike,
    prompts: list[str],
    config: CalibConfig,
    *,
    work_dir: str | os.PathLike,
    pipe=None,
    embeds: dict[str, torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    source_name: str = "",
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    grad_checkpoint: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Block-wise calibration of the transformer stored in `transformer_dir`, one teacher block at a time.

    `pipe`: a pipeline without its transformer (text encoders and scheduler; its transformer, if
    any, is never used). The prompts are encoded once and cached in `work_dir`, then the text
    encoders are freed; `embeds` (prompt_embeds, pooled_prompt_embeds, negative_*) replaces them.
    `grad_checkpoint` recomputes each child of the trained block in backward (less memory, ~1.3x time).
    Returns (quantised transformer with kept layers in the stored dtype, stats).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from .embeddings import CACHE, cached_embeddings, free_text_encoders
    from .sequential import block_names, streamed_teacher, train_sequential
    from .source import TransformerSource

    if config.mode is not Mode.BLOCKWISE:
        raise BitfluxError("sequential onloading is block-wise calibration: use mode='blockwise'")
    if not prompts:
        raise BitfluxError("no calibration prompts")
    prompts = prompts[: config.prompts]
    t0 = time.perf_counter()
    source = TransformerSource(transformer_dir)
    work = WorkDir(work_dir, config)
    if embeds is not None and not work.exists(CACHE):
        work.write(CACHE, embeds, {"prompts": len(prompts)})
    if pipe is None and not work.exists(CACHE):
        raise BitfluxError("a transformer alone needs a base pipeline (--base) or cached prompt embeddings")
    embeds = cached_embeddings(work, pipe, prompts, config, progress)
    if embeds["prompt_embeds"].shape[0] < len(prompts):
        raise BitfluxError(f"the prompt embeddings cover {embeds['prompt_embeds'].shape[0]} prompts, fewer than {len(prompts)}")
    scheduler = pipe.scheduler if pipe is not None else FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    if pipe is not None:
        free_text_encoders(pipe)  # before any transformer block is loaded
    embeds = {k: v.to(device=device, dtype=source.dtype) for k, v in embeds.items()}
    if distributed.is_main():  # the trajectories go to disk once; a resumed run reuses them
        calls = RecordedCalls(work.path / RECORDED)
        if not calls.complete:
            with streamed_teacher(source, device) as teacher:
                sampler = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                                       text_encoder_2=None, tokenizer_2=None, transformer=teacher)
                sampler.set_progress_bar_config(disable=True)
                record_states(sampler, prompts, config, progress, config.record_batch, embeds=embeds, into=calls)
                del sampler
    distributed.barrier()
    if not distributed.is_main():
        calls = RecordedCalls(work.path / RECORDED)
    t_rec = time.perf_counter() - t0
    per_block = max(1, config.steps // len(block_names(source.skeleton())))

    def _step(block: int, step: int, loss: float) -> None:
        if on_step is not None:
            on_step(block * per_block + step + 1, loss)

    model, losses = train_sequential(source, calls, config, work, device=device, progress=progress, on_step=_step,
                                     qsource=source_name, grad_checkpoint=grad_checkpoint)
    stats = {
        "prompts": len(prompts),
        "recorded_calls": len(calls),
        "resolution": [config.pipe_kwargs.get("height"), config.pipe_kwargs.get("width")],
        "record_seconds": round(t_rec, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "final_loss": losses[-1] if losses else None,
        "config": config.to_dict(),
    }
    return model, stats
