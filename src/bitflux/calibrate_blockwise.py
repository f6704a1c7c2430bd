"""Block-wise data-free calibration: train the ternary student one transformer block at a time.

Why: joint calibration (`calibrate.train`) keeps every block's fp32 latent weights, gradients and
Adam moments alive at once, ~16 bytes per ternarised parameter: ~189 GB for FLUX.1-dev's 11.83 B
block weights, more than one 80 GB GPU. Here block i (double blocks first, then single blocks) is
trained alone to reproduce the frozen teacher's block i on the teacher's own inputs at the
recorded states, so only one block's gradients + optimiser state (+ its activations) exist at a
time; the optimiser is dropped before the next block starts.

How each step of block i gets its data: a batch of recorded calls (chosen by a generator seeded
from (config.seed, i, step), so a run is a pure function of its inputs) is pushed through the
teacher under `torch.no_grad()`; a forward pre-hook on teacher block i captures its exact call
(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs) and a
forward hook its output (encoder_hidden_states, hidden_states), then raises `_Stop` so the rest of
the teacher is not run. With `input_source="student"` the block input is instead captured from
the student (whose blocks < i are already calibrated) while the target stays the teacher's block
output: the block then also learns to correct the error accumulated upstream.

The loss is the mean of the normalised MSEs (`calibrate._nmse`) of the block's two outputs;
`config.loss` is ignored (block matching is the method). Each block gets
max(1, config.steps // n_blocks) Adam steps with the cosine schedule of `calibrate.train`.

The returned student is the `build_student` module (every block trained), so `finalize` turns
it into trunk-format TernaryLinears unchanged.

Scale notes (FLUX.1-dev on one 80 GB GPU; see bench/calib_memory.py for measured numbers):
- the teacher may stay bf16 on the GPU (23.8 GB) and is never cast; block inputs are cast to the
  student's fp32 when handed to the student block;
- the student (`build_student` is a deep fp32 copy: ~47 GB of latents) should live in CPU memory:
  pass `device="cuda"` and only the block being trained is moved there and back;
- gradient checkpointing: whole-block checkpointing saves nothing when a single block is
  trained (its activations are needed for its own backward). `grad_checkpoint=True` instead
  checkpoints each parameterised child of the trained block (norms' modulation Linears, attn,
  ff, ff_context / proj_mlp, proj_out), so only child inputs/outputs are kept and a child's
  internals (incl. each ternary Linear's materialised fp32 weight) are recomputed in backward.
- `input_source="student"` runs the student's prefix where the student lives (CPU at scale):
  slow for late blocks; at scale carry the student's boundary activations instead.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from .calibrate import CalibConfig, _batch, _nmse, build_student

InputSource = Literal["teacher", "student"]


class _Stop(Exception):
    """Raised from a block hook to end a model forward once the needed block has run."""


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks in execution order: double-stream, then single-stream."""
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


def block_seed(seed: int, block: int, step: int) -> int:
    """Generator seed of block `block`'s batch at `step`: a pure function of its arguments."""
    return ((seed * 1_000_003 + block) * 1_000_033 + step) % (2**63)


def _cast(obj: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """Move tensors (nested in tuples/lists/dicts) to `device`; floating ones also to `dtype`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype if obj.is_floating_point() else obj.dtype)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype, device) for k, v in obj.items()}
    return obj


def _first_param(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


def capture_block(
    model: nn.Module, index: int, kw: dict[str, torch.Tensor], need_output: bool = True
) -> tuple[tuple, dict[str, Any], tuple[torch.Tensor, ...] | None]:
    """Run `model(**kw)` under no_grad only as far as block `index`; return its (args, kwargs, output).

    The block's call arguments come from a forward pre-hook; with `need_output` the block runs and
    its output tuple (encoder_hidden_states (B, S_txt, C), hidden_states (B, S_img, C)) is taken
    from a forward hook, else the forward stops before the block. Later blocks never run.
    """
    p = _first_param(model)
    kw = _cast(kw, p.dtype, p.device)
    blk = blocks(model)[index]
    got: dict[str, Any] = {}

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        got["args"], got["kwargs"] = args, kwargs
        if not need_output:
            raise _Stop

    def post(_m: nn.Module, _args: tuple, out: Any) -> None:
        got["out"] = out if isinstance(out, tuple) else (out,)
        raise _Stop

    handles = [blk.register_forward_pre_hook(pre, with_kwargs=True), blk.register_forward_hook(post)]
    try:
        with torch.no_grad():
            model(**kw, return_dict=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if "args" not in got:
        raise RuntimeError(f"block {index} was not called by the model's forward")
    return got["args"], got["kwargs"], got.get("out")


class _Checkpointed(nn.Module):
    """Runs `inner` under activation checkpointing (non-reentrant, keyword arguments allowed)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.inner(*args, **kwargs)
        return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


def checkpoint_children(block: nn.Module) -> Callable[[], None]:
    """Wrap every parameterised direct child of `block` in `_Checkpointed`; returns an undo function."""
    wrapped = {n: c for n, c in block.named_children() if any(True for _ in c.parameters())}
    for n, c in wrapped.items():
        setattr(block, n, _Checkpointed(c))

    def undo() -> None:
        for n, c in wrapped.items():
            setattr(block, n, c)

    return undo


def block_loss(
    s_out: tuple[torch.Tensor, ...], t_out: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """Mean normalised MSE over the block's outputs (text and image streams)."""
    return sum(_nmse(s, t) for s, t in zip(s_out, t_out)) / len(t_out)


def block_losses(
    teacher: nn.Module,
    student: nn.Module,
    calls: list[dict[str, torch.Tensor]],
    idx: list[int] | None = None,
    input_source: InputSource = "teacher",
) -> list[float]:
    """Per-block reconstruction loss of `student` vs `teacher` on the calls `idx` (all by default)."""
    idx = list(range(len(calls))) if idx is None else idx
    kw = _batch(calls, idx)
    out = []
    for i, blk in enumerate(blocks(student)):
        args, kwargs, t_out = capture_block(teacher, i, kw)
        if input_source == "student":
            args, kwargs, _ = capture_block(student, i, kw, need_output=False)
        p = _first_param(blk)
        with torch.no_grad():
            s_out = blk(*_cast(args, p.dtype, p.device), **_cast(kwargs, p.dtype, p.device))
            out.append(block_loss(s_out, _cast(t_out, p.dtype, p.device)).item())
    return out


def train_blockwise(
    teacher: nn.Module,
    calls: list[dict[str, torch.Tensor]],
    config: CalibConfig,
    progress: bool = True,
    input_source: InputSource = "teacher",
    *,
    device: torch.device | str | None = None,
    grad_checkpoint: bool = False,
    on_step: Callable[[int, int, float], None] | None = None,
    on_block: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """Calibrate a `build_student` copy of `teacher` block by block; returns the student.

    `calls` are `record_states` entries. The teacher is only put in eval mode (dtype and device
    kept). `device`: where the trained block and its optimiser live (default: the teacher's);
    the block is moved back to the student's device afterwards. `on_step(block, step, loss)`
    after every step; `on_block(block, student)` after each block is done.
    """
    if input_source not in ("teacher", "student"):
        raise ValueError(f"input_source must be 'teacher' or 'student', not {input_source!r}")
    if not calls:
        raise ValueError("no recorded calls")
    teacher.eval()
    student = build_student(teacher, config).eval()
    t_blocks, s_blocks = blocks(teacher), blocks(student)
    assert len(t_blocks) == len(s_blocks)
    n = len(s_blocks)
    steps = max(1, config.steps // n)
    dev = torch.device(device) if device is not None else _first_param(teacher).device
    bar = tqdm(total=n * steps, desc="calibrate (block-wise)", disable=not progress)
    for i, blk in enumerate(s_blocks):
        home = _first_param(blk).device
        blk.to(dev)
        dtype = _first_param(blk).dtype  # fp32
        params = [p for p in blk.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=config.lr)
        undo = checkpoint_children(blk) if grad_checkpoint else None
        try:
            for step in range(steps):
                g = torch.Generator().manual_seed(block_seed(config.seed, i, step))
                kw = _batch(calls, torch.randint(len(calls), (config.batch,), generator=g).tolist())
                args, kwargs, t_out = capture_block(teacher, i, kw)  # t_out: (enc (B,S_txt,C), img (B,S_img,C))
                if input_source == "student":  # upstream student blocks (already calibrated) feed block i
                    args, kwargs, _ = capture_block(student, i, kw, need_output=False)
                args, kwargs, t_out = _cast((args, kwargs, t_out), dtype, dev)
                loss = block_loss(blk(*args, **kwargs), t_out)
                for group in opt.param_groups:  # cosine decay to 10 %, as calibrate.train
                    group["lr"] = config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                value = loss.item()
                bar.update(1)
                bar.set_postfix(block=i, loss=f"{value:.4f}")
                if on_step is not None:
                    on_step(i, step, value)
        finally:
            if undo is not None:
                undo()
            opt.zero_grad(set_to_none=True)
            del opt  # this block's Adam moments are freed before the next block
            blk.to(home)
        if on_block is not None:
            on_block(i, student)
    bar.close()
    return student
