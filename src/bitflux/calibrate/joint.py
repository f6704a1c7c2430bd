"""Joint calibration: the whole student trained at once against the teacher on recorded states.

Each step takes a batch of recorded transformer calls (a pure function of (seed, step)), runs the
teacher and the student on it and matches the output (and, with `LossKind.BLOCKS`, every block's
hidden states). On-policy refreshes add the states the student itself visits (DAgger rounds).
Every `checkpoint_every` steps the trainable tensors, the optimiser state and the step are saved,
so a killed and re-run calibration ends bit-identical to an uninterrupted one. Under
torch.distributed each process takes its share of every global batch and the gradients are summed
(distributed.py): the student is replicated, so each process holds the whole model, or, with
`config.shard`, put on FSDP2 so each holds 1/N of it and of its Adam state (the teacher stays whole).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import BitfluxError
from . import distributed
from .checkpoint import WorkDir, gathered, load_params
from .config import CalibConfig, LossKind
from .losses import cosine_lr, nmse
from .states import batch_calls
from .student import build_student, trainable

Calls = list[dict[str, torch.Tensor]]


def _block_outputs(model: nn.Module, store: list[torch.Tensor]) -> list:
    """Hooks appending every block's output tensors to `store` (feature-matching targets)."""

    def hook(_m, _a, out):
        for t in out if isinstance(out, tuple) else (out,):
            store.append(t)

    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    return [b.register_forward_hook(hook) for b in blocks]


def _loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """nmse of the global batch; under torch.distributed this process's share of it (see distributed.py)."""
    return distributed.sharded_block_loss((s,), (t,)) if distributed.active() else nmse(s, t)


def train(
    teacher: nn.Module,
    calls: Calls,
    config: CalibConfig,
    work: WorkDir | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    resample: Callable[[nn.Module, int], Calls] | None = None,
) -> tuple[nn.Module, list[float]]:
    """Train a student to match the fp32 `teacher` on the recorded `calls`; returns (student, loss history).

    `resample(student, k)` records the states a student visits at refresh k; it is called at each of
    `config.on_policy_steps()`, and its states join the pool (exposure bias: the student learns the
    teacher's answer where its own trajectories drift, not only on the teacher's). With `work`, the
    state is saved every `config.checkpoint_every` steps and after the last one, and a saved state
    is resumed: the loss history returned is then the whole run's.
    """
    student = build_student(teacher, config)
    teacher = teacher.eval()
    sharded = config.shard and distributed.active()
    if sharded:
        distributed.shard_model(student)
    params = trainable(student)
    opt = torch.optim.Adam(list(params.values()), lr=config.lr)
    start, losses = work.load_state(student, opt) if work is not None else (0, [])
    refresh = config.on_policy_steps()
    if refresh and resample is None:
        raise BitfluxError("on-policy calibration needs a pipeline to sample the student's trajectories")
    for k, at in enumerate(refresh):
        if start > at:  # resumed past this refresh: rebuild the same pool from its snapshot
            assert work is not None
            snapshot = build_student(teacher, config)
            work.load_snapshot(k, snapshot)
            calls = calls + resample(snapshot, k)
    t_store: list[torch.Tensor] = []
    s_store: list[torch.Tensor] = []
    handles = []
    if config.loss is LossKind.BLOCKS:
        handles = _block_outputs(teacher, t_store) + _block_outputs(student, s_store)
    bar = tqdm(range(start, config.steps), desc="calibrate", disable=not progress or not distributed.is_main(), initial=start, total=config.steps)
    try:
        for step in bar:
            if step in refresh:
                if work is not None:
                    work.save_snapshot(refresh.index(step), student)
                calls = calls + resample(student, refresh.index(step))
            t_store.clear()
            s_store.clear()
            g = torch.Generator().manual_seed(config.seed * 7919 + step)
            idx = distributed.shard(torch.randint(len(calls), (config.batch,), generator=g)).tolist()
            kw = batch_calls(calls, idx)  # this process's share of the global batch
            with torch.no_grad():
                t_out = teacher(**kw, return_dict=False)[0]
            s_out = student(**kw, return_dict=False)[0]
            loss = _loss(s_out, t_out)
            if s_store:
                loss = loss + sum(_loss(s, t) for s, t in zip(s_store, t_store)) / len(s_store)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(config.lr, step, config.steps)
            opt.zero_grad(set_to_none=True)
            (loss * distributed.world() if sharded else loss).backward()  # FSDP2 averages: undo it
            if not sharded:  # FSDP2 reduce-scatters the summed gradients itself
                distributed.all_reduce_grads(list(params.values()))  # the global batch's gradient
            opt.step()
            losses.append(distributed.all_reduce_sum(loss.detach().clone()).item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            every = config.checkpoint_every
            if work is not None and ((every and (step + 1) % every == 0) or step + 1 == config.steps):
                work.save_state(student, opt, step + 1, losses)
            if on_step is not None:
                on_step(step + 1, losses[-1])
    finally:
        for h in handles:
            h.remove()
    if sharded:  # a whole, unsharded student for finalize (every process; the weights gathered once)
        whole = build_student(teacher, config)
        load_params(whole, gathered(student))
        student = whole
    return student, losses
