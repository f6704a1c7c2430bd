"""Data-free calibration: the full-precision transformer teaches its own ternary copy.

No images are used. The teacher pipeline samples its own trajectories from text prompts with the
pipeline's scheduler; a forward hook records every transformer call (latents, timestep, text
states: exactly what the model sees at inference, classifier-free-guidance branches included).
The student is the same transformer with each policy-selected Linear replaced by a
`_FakeTernaryLinear`: a latent full-precision matrix U and per-row scales s, used as
s * clip(round(U), -1, 1) with a straight-through gradient. It is trained to match the teacher's
output (and optionally every block's output) at the recorded states, then re-ternarised into
ordinary `TernaryLinear`s: the saved result is pure ternary codes + scales in the trunk's format.

Runs are resumable: every `checkpoint_every` steps the trainable tensors, the optimiser state and
the step are written atomically to `<OUT>.partial/`; the batch at each step is a pure function of
(seed, step), so a killed and re-run calibration ends with exactly the uninterrupted result.

This file holds the config, the training loop and the entry point; the student and its
re-ternarisation are in `calibrate_student.py`, checkpoints in `calibrate_checkpoint.py`, the
teacher trajectories in `calibrate_record.py` and the loss terms in `calibrate_losses.py`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from .calibrate_checkpoint import _load_ckpt, _load_params, _save_ckpt, _save_params, _snapshot_name
from .calibrate_losses import _extrapolate, _gain_penalty, _nmse, _time_weights  # noqa: F401 (re-exported)
from .calibrate_record import _batch, _mix_conditioning, cfg_pairs, record_states, sample_latents  # noqa: F401 (re-exported)
from .calibrate_student import TrainWhat, _FakeTernaryLinear, _trainable, build_student, finalize  # noqa: F401 (re-exported)
from .config import InitMethod, PackFormat
from .errors import BitfluxError
from .linear import TernaryLinear


class Mode(str, Enum):
    """How the student is trained."""

    JOINT = "joint"
    """The whole student at once (fp32 latents + Adam for every layer in memory)."""
    BLOCKWISE = "blockwise"
    """One block at a time against the teacher's own block inputs/outputs (fits 12B on one GPU)."""


class LossKind(str, Enum):
    """What the student matches."""

    OUTPUT = "output"
    """The transformer's output (the velocity) at each recorded state."""
    BLOCKS = "blocks"
    """The output plus every double/single block's hidden states (feature matching)."""


@dataclass(frozen=True)
class CalibConfig:
    """Calibration options; the whole config is recorded in checkpoints to refuse mismatched resumes."""

    init: InitMethod = InitMethod.TWN  # initial codes/scales
    train: TrainWhat = TrainWhat.LATENT  # what is trained
    loss: LossKind = LossKind.BLOCKS  # what is matched
    format: PackFormat = PackFormat.TWO_BIT  # packing of the saved result
    prompts: int = 256  # number of calibration prompts used
    traj_steps: int = 8  # denoising steps of each teacher trajectory
    steps: int = 600  # optimiser steps
    batch: int = 16  # recorded transformer calls per step
    lr: float = 2e-3  # Adam learning rate (latents live on a unit scale, see _FakeTernaryLinear)
    seed: int = 0  # trajectories, batches
    checkpoint_every: int = 100  # steps between resumable checkpoints (0: never)
    pipe_kwargs: dict[str, Any] = field(default_factory=dict)  # extra FluxPipeline call arguments
    record_batch: int = 16  # prompts per teacher pipeline call
    mode: Mode = Mode.JOINT  # joint or block-wise training (see calibrate_blockwise.py)
    block_pool: int = 0  # block-wise: recorded calls carried from block to block (0: all)
    on_policy_at: float = 0.0  # joint: after this share of the steps, the states the student itself
    # visits (same prompts and noise, teacher targets) join the pool; 0: teacher states only
    on_policy_rounds: int = 1  # on-policy refreshes, evenly spaced from on_policy_at to the end (DAgger)
    guided_weight: float = 0.0  # joint: weight of a loss on the CFG-combined velocity u + g (c - u) of
    # recorded (cond, uncond) pairs, g = pipe_kwargs' true_cfg_scale; 0: branches matched separately only
    diff_weight: float = 0.0  # joint: weight of a loss on the CFG difference c - u of recorded (cond, uncond) pairs,
    # over its own energy: the prompt's share of the velocity is 1-10 % of its energy, so the branch losses barely
    # see it, and a student trained without this term keeps ~0.78 of it (bench/cfg_gain.py); tried, not adopted
    gain_weight: float = 0.0  # joint: weight of a penalty on the CFG gain g_i = <d_s, d_t> / |d_t|^2 of each (cond, uncond)
    # pair (d = c - u), sum_i |d_t,i|^2 (1 - g_i)^2 / sum_i |d_t,i|^2: MSE losses shrink the part of d a ternary student
    # cannot represent (g ~ 0.78 without this term), which weakens guidance; this asks for an unbiased d instead
    diff_scale: float = 1.0  # joint: the conditional branch's targets (output and image-token block states) are
    # u + K (c - u) of its (cond, uncond) pair: MSE training shrinks the CFG difference (a student keeps ~0.78 of it),
    # so a target with K ~ 1 / 0.78 makes the shrunk estimate land at the teacher's guidance strength; 1: off
    on_policy_fresh: bool = False  # on-policy rounds sample with new noise (round k: seed + k + 1), not the teacher's
    cond_mix: float = 0.0  # joint: share of each batch whose text tokens are recombined with another recorded
    # call's (each token and the pooled vector from either, teacher targets on the same inputs): conditioning
    # the prompts alone never produce, so the student matches the teacher beyond the prompt set
    time_weight: float = 0.0  # joint: each state's loss weighted by t**p (t in [0, 1], 1 = pure noise), mean 1 per
    # batch; p > 0 favours the high-noise steps where layout and counts are decided; 0: uniform
    rollout_steps: int = 0  # joint: optimiser steps after `steps` on whole trajectories: the student samples from
    # fresh noise and matches the teacher's latents after every denoising step, backpropagated through the sampler;
    # the codes stay fixed in these steps, only scales and biases move
    rollout_batch: int = 8  # calibration prompts per rollout step
    rollout_lr: float = 1e-4  # peak learning rate of the rollout phase (cosine decay to 10 %)
    ema: float = 0.0  # decay of an exponential moving average of the trained tensors, used for the result; 0: off

    def on_policy_steps(self) -> list[int]:
        """The steps at which student-visited states join the pool (empty: never)."""
        if self.on_policy_at <= 0:
            return []
        gap = (1.0 - self.on_policy_at) / self.on_policy_rounds
        return [round((self.on_policy_at + k * gap) * self.steps) for k in range(self.on_policy_rounds)]

    def guidance_scale(self) -> float:
        """The real-CFG scale the recorded trajectories use (1.0: no guidance, no negative branch)."""
        return float(self.pipe_kwargs.get("true_cfg_scale", 1.0))

    def uses_pairs(self) -> bool:
        """Whether batches are built of (cond, uncond) pairs (every CFG-pair loss term or target needs them)."""
        return self.guided_weight > 0 or self.diff_weight > 0 or self.gain_weight > 0 or self.diff_scale != 1.0

    def on_policy_step(self) -> int | None:
        """The first on-policy refresh step (None: never)."""
        steps = self.on_policy_steps()
        return steps[0] if steps else None

    def __post_init__(self) -> None:
        enums = (("init", InitMethod), ("train", TrainWhat), ("loss", LossKind), ("format", PackFormat), ("mode", Mode))
        for name, enum in enums:
            object.__setattr__(self, name, enum(getattr(self, name)))
        if not 0.0 <= self.on_policy_at < 1.0:
            raise BitfluxError(f"on_policy_at must be in [0, 1), got {self.on_policy_at}")
        if self.on_policy_rounds < 1:
            raise BitfluxError(f"on_policy_rounds must be >= 1, got {self.on_policy_rounds}")
        if self.train is TrainWhat.FULL and self.mode is Mode.BLOCKWISE:
            raise BitfluxError("--train full needs joint mode (the kept layers lie outside the blocks)")
        if self.guided_weight < 0:
            raise BitfluxError(f"guided_weight must be >= 0, got {self.guided_weight}")
        if self.guided_weight > 0 and self.mode is Mode.BLOCKWISE:
            raise BitfluxError("the guided loss needs joint mode (it matches the whole model's combined velocity)")
        if self.guided_weight > 0 and self.guidance_scale() <= 1.0:
            raise BitfluxError("the guided loss needs classifier-free guidance: pipe_kwargs true_cfg_scale > 1")
        if self.diff_weight < 0:
            raise BitfluxError(f"diff_weight must be >= 0, got {self.diff_weight}")
        if self.gain_weight < 0:
            raise BitfluxError(f"gain_weight must be >= 0, got {self.gain_weight}")
        if self.diff_scale <= 0:
            raise BitfluxError(f"diff_scale must be > 0, got {self.diff_scale}")
        pair_options = (("the CFG difference loss", self.diff_weight > 0), ("the CFG gain penalty", self.gain_weight > 0),
                        ("diff_scale", self.diff_scale != 1.0))
        for what, on in pair_options:
            if on and (self.mode is Mode.BLOCKWISE or self.guidance_scale() <= 1.0):
                raise BitfluxError(f"{what} needs joint mode and classifier-free guidance (true_cfg_scale > 1)")
        if not 0.0 <= self.cond_mix <= 1.0:
            raise BitfluxError(f"cond_mix must be in [0, 1], got {self.cond_mix}")
        if self.cond_mix > 0 and (self.mode is Mode.BLOCKWISE or self.uses_pairs()):
            raise BitfluxError("cond_mix needs joint mode without the guided or difference loss (mixing breaks (cond, uncond) pairs)")
        if self.time_weight < 0 or (self.time_weight > 0 and self.mode is Mode.BLOCKWISE):
            raise BitfluxError(f"time_weight must be >= 0 and needs joint mode, got {self.time_weight} ({self.mode.value})")
        if self.rollout_steps < 0 or self.rollout_batch < 1:
            raise BitfluxError(f"rollout_steps must be >= 0 and rollout_batch >= 1, got {self.rollout_steps}, {self.rollout_batch}")
        if self.rollout_steps and self.mode is Mode.BLOCKWISE:
            raise BitfluxError("rollout steps need joint mode (they sample with the whole student)")
        if not 0.0 <= self.ema < 1.0:
            raise BitfluxError(f"ema must be in [0, 1), got {self.ema}")
        if self.ema > 0 and self.mode is Mode.BLOCKWISE:
            raise BitfluxError("ema needs joint mode")
        if self.on_policy_at > 0 and self.mode is Mode.BLOCKWISE:
            raise BitfluxError("on-policy states need joint mode (block-wise training has no whole student to sample with)")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=lambda e: e.value))


# ---------------------------------------------------------------------------------------- training
def _block_outputs(model: nn.Module, store: list[torch.Tensor]) -> list:
    def hook(_m, _a, out):
        for t in out if isinstance(out, tuple) else (out,):
            store.append(t)

    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    return [b.register_forward_hook(hook) for b in blocks]


def _cosine(peak: float, step: int, steps: int) -> float:
    """Learning rate at `step` of a cosine decay from `peak` to 10 % of it over `steps`."""
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, steps))))


def train(
    teacher: nn.Module,
    calls: list[dict[str, torch.Tensor]],
    config: CalibConfig,
    work: Path | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    resample: Callable[[nn.Module, int], list[dict[str, torch.Tensor]]] | None = None,
    rollout: Callable[[nn.Module, int], torch.Tensor] | None = None,
) -> tuple[nn.Module, list[float]]:
    """Train a student to match `teacher` on the recorded `calls`; returns (student, loss history).

    `resample(student, k)` records the states a student visits at refresh k; it is called at each of
    `config.on_policy_steps()`, and its states join the pool (exposure bias: the student learns the
    teacher's answer where its own trajectories drift, not only on the teacher's). `rollout(student,
    step)` is the trajectory loss of each of the `config.rollout_steps` steps after `config.steps`.
    """
    student = build_student(teacher, config)
    teacher = teacher.float().eval()
    trainable = _trainable(student)
    opt = torch.optim.Adam(list(trainable.values()), lr=config.lr)
    ema = {n: p.detach().clone() for n, p in trainable.items()} if config.ema > 0 else None
    latents = [m.latent for m in student.modules() if isinstance(m, _FakeTernaryLinear)]
    start = 0
    if work is not None and (work / "state.json").exists():
        start = _load_ckpt(work, student, opt, config, ema)
    refresh = config.on_policy_steps()
    if refresh and resample is None:
        raise BitfluxError("on-policy calibration needs a pipeline to sample the student's trajectories")
    if config.rollout_steps and rollout is None:
        raise BitfluxError("rollout steps need a pipeline to sample the student's trajectories")
    total = config.steps + config.rollout_steps
    for k, at in enumerate(refresh):
        if start > at:  # resumed past this refresh: rebuild the same pool from its snapshot
            assert work is not None
            snapshot = build_student(teacher, config)
            _load_params(snapshot, load_file(str(work / _snapshot_name(k))))
            calls = calls + resample(snapshot, k)
    t_store: list[torch.Tensor] = []
    s_store: list[torch.Tensor] = []
    handles = []
    if config.loss is LossKind.BLOCKS:
        handles = _block_outputs(teacher, t_store) + _block_outputs(student, s_store)
    guidance = config.guidance_scale()
    pairs = cfg_pairs(calls) if config.uses_pairs() else []
    if config.uses_pairs() and not pairs:
        raise BitfluxError("the guided / difference loss found no (cond, uncond) pairs among the recorded states")
    losses: list[float] = []
    bar = tqdm(range(start, total), desc="calibrate", disable=not progress, initial=start, total=total)
    try:
        for step in bar:
            if step in refresh:
                if work is not None:
                    _save_params(student, work / _snapshot_name(refresh.index(step)))
                calls = calls + resample(student, refresh.index(step))
                pairs = cfg_pairs(calls) if config.uses_pairs() else []
            t_store.clear()
            s_store.clear()
            if step >= config.steps:  # the rollout phase: whole trajectories, its own cosine schedule
                assert rollout is not None
                loss = rollout(student, step)
                s_store.clear()  # block outputs of the sampled trajectory: not part of this loss
                lr = _cosine(config.rollout_lr, step - config.steps, config.rollout_steps)
            else:
                g = torch.Generator().manual_seed(config.seed * 7919 + step)
                if pairs:  # half the batch conditional, the other half their unconditional partners
                    chosen = torch.randint(len(pairs), (max(1, config.batch // 2),), generator=g).tolist()
                    idx = [pairs[j][0] for j in chosen] + [pairs[j][1] for j in chosen]
                else:
                    idx = torch.randint(len(calls), (config.batch,), generator=g).tolist()
                kw = _batch(calls, idx)
                if config.cond_mix > 0:
                    kw = _mix_conditioning(kw, calls, config.cond_mix, g)
                with torch.no_grad():
                    t_out = teacher(**kw, return_dict=False)[0]
                    if pairs and config.diff_scale != 1.0:  # cond targets u + K (c - u); text-token states kept
                        t_out = _extrapolate(t_out, config.diff_scale)
                        t_store[1::2] = [_extrapolate(t, config.diff_scale) for t in t_store[1::2]]
                s_out = student(**kw, return_dict=False)[0]
                weight = _time_weights(kw["timestep"], config.time_weight)
                loss = _nmse(s_out, t_out, weight)
                if pairs:
                    half = len(idx) // 2
                    d_s, d_t = s_out[:half] - s_out[half:], t_out[:half] - t_out[half:]  # the CFG differences c - u
                    if config.guided_weight > 0:
                        loss = loss + config.guided_weight * _nmse(s_out[half:] + guidance * d_s, t_out[half:] + guidance * d_t)
                    if config.diff_weight > 0:
                        d_w = None if weight is None else weight[:half] / weight[:half].mean()
                        loss = loss + config.diff_weight * _nmse(d_s, d_t, d_w)
                    if config.gain_weight > 0:
                        loss = loss + config.gain_weight * _gain_penalty(d_s, d_t)
                if s_store:
                    loss = loss + sum(_nmse(s, t, weight) for s, t in zip(s_store, t_store)) / len(s_store)
                lr = _cosine(config.lr, step, config.steps)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if step >= config.steps:  # rollout steps move scales and biases only: their noisy gradients
                for latent in latents:  # flipped codes near the rounding boundary (31 dB when they could)
                    latent.grad = None
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    for n, p in trainable.items():
                        ema[n].lerp_(p, 1.0 - config.ema)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if work is not None and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                _save_ckpt(work, student, opt, step + 1, config, ema)
            if on_step is not None:
                on_step(step + 1, losses[-1])
    finally:
        for h in handles:
            h.remove()
    if ema is not None:  # the result is the average, not the last iterate
        _load_params(student, ema)
    return student, losses


# ------------------------------------------------------------------------------------------- entry
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
    """
    import time

    config = config or CalibConfig()
    if any(isinstance(m, TernaryLinear) for m in pipe.transformer.modules()):
        raise BitfluxError("the source transformer is already quantised; calibrate needs the full-precision model")
    if not prompts:
        raise BitfluxError("no calibration prompts")
    prompts = prompts[: config.prompts]
    t0 = time.perf_counter()
    work = Path(work_dir) if work_dir is not None else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    if calls is None:
        calls = record_states(pipe, prompts, config, progress, config.record_batch)
    t_rec = time.perf_counter() - t0
    teacher = copy.deepcopy(pipe.transformer).float().eval()
    if config.mode is Mode.BLOCKWISE:  # resumable per finished block (see calibrate_blockwise)
        from .calibrate_blockwise import train_blockwise

        losses: list[float] = []
        per_block = max(1, config.steps // max(1, len(teacher.transformer_blocks) + len(teacher.single_transformer_blocks)))

        def _step(block: int, step: int, loss: float) -> None:
            losses.append(loss)
            if on_step is not None:
                on_step(block * per_block + step + 1, loss)

        student = train_blockwise(teacher, calls, config, progress, on_step=_step, work=work)
    else:

        def resample(student: nn.Module, k: int) -> list[dict[str, torch.Tensor]]:
            if pipe.transformer.dtype != torch.float32:
                raise BitfluxError("on-policy calibration samples with the fp32 student: load the teacher pipeline in fp32")
            teacher_module = pipe.transformer
            pipe.transformer = student
            try:
                noise = replace(config, seed=config.seed + k + 1) if config.on_policy_fresh else config
                return record_states(pipe, prompts, noise, progress, config.record_batch)
            finally:
                pipe.transformer = teacher_module

        def rollout(student: nn.Module, step: int) -> torch.Tensor:
            if pipe.transformer.dtype != torch.float32:
                raise BitfluxError("rollout steps sample with the fp32 student: load the teacher pipeline in fp32")
            g = torch.Generator().manual_seed(config.seed * 7919 + step)
            part = [prompts[i] for i in torch.randint(len(prompts), (config.rollout_batch,), generator=g).tolist()]
            seeds = [config.seed * 1_000_003 + 10**9 + step * config.rollout_batch + j for j in range(len(part))]
            with torch.no_grad():
                target = sample_latents(pipe, part, seeds, config)
            teacher_module = pipe.transformer
            pipe.transformer = student
            try:
                got = sample_latents(pipe, part, seeds, config, grad=True)
            finally:
                pipe.transformer = teacher_module
            return sum(_nmse(a, b) for a, b in zip(got, target)) / len(target)

        student, losses = train(teacher, calls, config, work, progress, on_step, resample, rollout)
    model = finalize(pipe.transformer, student, config, source)
    stats = {
        "prompts": len(prompts),
        "recorded_calls": len(calls),
        "on_policy_step": config.on_policy_step(),
        "on_policy_steps": config.on_policy_steps(),
        "rollout_steps": config.rollout_steps,
        "record_seconds": round(t_rec, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "final_loss": losses[-1] if losses else None,
        "config": config.to_dict(),
    }
    return model, stats


def finish_work_dir(work: Path) -> None:
    """Remove a finished run's checkpoints."""
    shutil.rmtree(work, ignore_errors=True)
