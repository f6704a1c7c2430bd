"""Block-wise data-free calibration: train the ternary student one transformer block at a time.

Why: joint calibration (`joint.train`) keeps every block's fp32 latent weights, gradients and
Adam moments alive at once, ~16 bytes per ternarised parameter: ~189 GB for FLUX.1-dev's 11.83 B
block weights, more than one 80 GB GPU. Here block i (double blocks first, then single blocks) is
trained alone to reproduce the frozen teacher's block i on the teacher's own inputs at the
recorded states, so only one block's gradients + optimiser state (+ its activations) exist at a
time; the optimiser is dropped before the next block starts.

How block i gets its data: a pool of recorded calls (`CalibConfig.block_pool`, 0 = all) is pushed
through the teacher once as far as block 0 (a forward pre-hook captures the block's exact keyword
call and raises `_Stop`, so the rest of the model never runs). The pool's hidden states are then
carried forward: block i's targets are the frozen teacher block i applied to the teacher stream,
and they become block i+1's inputs. With `input_source="student"` a second stream advances
through each trained student block instead, so later blocks also learn to correct the error
accumulated upstream (the targets stay the teacher's). Each step draws a batch from the pool with
a generator seeded from (config.seed, i, step), so a run is a pure function of its inputs.

The loss is the mean of the normalised MSEs (`losses.block_loss`) of the block's two outputs;
`config.loss` is ignored (block matching is the method). Each block gets
max(1, config.steps // n_blocks) Adam steps with the cosine schedule of `joint.train`.

The returned student is the `build_student` module (every block trained), so `finalize` turns
it into trunk-format TernaryLinears unchanged.

Resumable per block: with `work` (a checkpoint.WorkDir), each finished block's trained tensors and
losses are written atomically to `block-NNN.safetensors`; its presence marks the block done (the
work dir's config.json refuses a mismatched resume). A killed run re-run with the same `work` reloads the
finished blocks and continues with the next one; since each block's batches are a pure function of
(seed, block, step), the result equals an uninterrupted run's.

Scale notes (FLUX.1-dev on one 80 GB GPU; see research/calib_memory.py for measured numbers):
- the teacher may stay bf16 on the GPU (23.8 GB) and is never cast; block inputs are cast to the
  student's fp32 when handed to the student block;
- the student (`build_student` is a deep fp32 copy: ~47 GB of latents) should live in CPU memory:
  pass `device="cuda"` and only the block being trained is moved there and back;
- gradient checkpointing: whole-block checkpointing saves nothing when a single block is
  trained (its activations are needed for its own backward). `grad_checkpoint=True` instead
  checkpoints each parameterised child of the trained block (norms' modulation Linears, attn,
  ff, ff_context / proj_mlp, proj_out), so only child inputs/outputs are kept and a child's
  internals (incl. each ternary Linear's materialised fp32 weight) are recomputed in backward.
- the carried streams cost 2 x pool x tokens x width values (bf16 at scale: 28 MB per state at
  4608 tokens, so a pool of 256 is 7 GB per stream, kept where the teacher is or in host RAM).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import WorkDir
from .config import CalibConfig
from .losses import block_loss, cosine_lr
from .states import batch_calls
from .student import build_student

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


def block_losses(
    teacher: nn.Module,
    student: nn.Module,
    calls: list[dict[str, torch.Tensor]],
    idx: list[int] | None = None,
    input_source: InputSource = "teacher",
) -> list[float]:
    """Per-block reconstruction loss of `student` vs `teacher` on the calls `idx` (all by default)."""
    idx = list(range(len(calls))) if idx is None else idx
    kw = batch_calls(calls, idx)
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


def _trained(blk: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in blk.named_parameters() if p.requires_grad}


def _blocks_done(work: WorkDir, n_blocks: int) -> int:
    """How many blocks, from block 0 on, a previous run in `work` finished."""
    done = 0
    while done < n_blocks and work.exists(f"block-{done:03d}.safetensors"):
        done += 1
    return done


def _save_block(work: WorkDir, i: int, blk: nn.Module, losses: list[float]) -> None:
    """Block i's trained tensors and its loss history, in one atomic file (its presence marks i done)."""
    work.write(f"block-{i:03d}.safetensors", _trained(blk), {"block": i, "losses": losses})


def _load_block(work: WorkDir, i: int, blk: nn.Module) -> list[float]:
    """Load block i's trained tensors; returns its loss history."""
    tensors, meta = work.read(f"block-{i:03d}.safetensors", set(_trained(blk)))
    with torch.no_grad():
        for n, p in _trained(blk).items():
            p.copy_(tensors[n])
    return [float(v) for v in meta.get("losses", [])]


Stream = dict[str, torch.Tensor]  # "hidden_states" (P, S_img, C), "encoder_hidden_states" (P, S_txt, C)


def pool_indices(n_calls: int, pool: int, seed: int) -> list[int]:
    """The recorded calls carried block to block: all of them, or a seeded sorted subset of `pool`."""
    if pool <= 0 or pool >= n_calls:
        return list(range(n_calls))
    g = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    return sorted(torch.randperm(n_calls, generator=g)[:pool].tolist())


def _first_inputs(teacher: nn.Module, calls: list[dict[str, torch.Tensor]], pool: list[int], chunk: int):
    """Block 0's inputs for every pooled call: (stream, temb (P, D), shared kwargs)."""
    parts: list[dict[str, Any]] = []
    for c0 in range(0, len(pool), chunk):
        args, kwargs, _ = capture_block(teacher, 0, batch_calls(calls, pool[c0 : c0 + chunk]), need_output=False)
        if args:
            raise RuntimeError("expected the model to call its blocks with keyword arguments only")
        parts.append(kwargs)
    stream = {k: torch.cat([p[k] for p in parts]) for k in ("hidden_states", "encoder_hidden_states")}
    temb = torch.cat([p["temb"] for p in parts])
    shared = {k: v for k, v in parts[0].items() if k not in ("hidden_states", "encoder_hidden_states", "temb")}
    return stream, temb, shared


@torch.no_grad()
def _run_block(blk: nn.Module, stream: Stream, temb: torch.Tensor, shared: dict[str, Any], chunk: int) -> Stream:
    """Block outputs for the whole pool, chunk by chunk, in the stream's dtype and device."""
    p = _first_param(blk)
    enc, hid = [], []
    for c0 in range(0, len(temb), chunk):
        sl = slice(c0, c0 + chunk)
        kw = {"hidden_states": stream["hidden_states"][sl], "encoder_hidden_states": stream["encoder_hidden_states"][sl], "temb": temb[sl]}
        e, h = blk(**_cast(kw, p.dtype, p.device), **_cast(shared, p.dtype, p.device))
        ref = stream["hidden_states"]
        enc.append(e.to(ref.dtype).to(ref.device))
        hid.append(h.to(ref.dtype).to(ref.device))
    return {"hidden_states": torch.cat(hid), "encoder_hidden_states": torch.cat(enc)}


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
    work: WorkDir | None = None,
    chunk: int = 64,
) -> tuple[nn.Module, list[float]]:
    """Calibrate a `build_student` copy of `teacher` block by block; returns (student, loss history).

    Block inputs are carried forward, not recomputed: a pool of recorded calls
    (`config.block_pool`, 0 = all) is pushed through the teacher once up to block 0; after block i
    is trained, the pool's teacher stream advances through teacher block i (its outputs are block
    i's targets and block i+1's inputs), and with `input_source="student"` a second stream advances
    through the trained student block. So each block costs one teacher-block pass over the pool
    plus its own training steps, instead of re-running the teacher's prefix every step.

    `calls` are `record_states` entries (one resolution). The teacher is only put in eval mode
    (dtype and device kept); streams live where the teacher does, in its dtype. `device`: where the
    trained block and its optimiser live (default: the teacher's). `on_step(block, step, loss)`
    after every step; `on_block(block, student)` after each block is done. `work`: directory for
    per-block checkpoints; blocks a previous run there finished are loaded, not retrained. `chunk`:
    pool entries per no-grad block pass.
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
    done = _blocks_done(work, n) if work is not None else 0
    history: list[float] = []
    pool = pool_indices(len(calls), config.block_pool, config.seed)
    t_stream, temb, shared = _first_inputs(teacher, calls, pool, chunk)
    s_stream = t_stream
    bar = tqdm(total=n * steps, desc="calibrate (block-wise)", disable=not progress, initial=done * steps)
    for i, blk in enumerate(s_blocks):
        target = _run_block(t_blocks[i], t_stream, temb, shared, chunk)  # block i's teacher outputs
        if i < done:
            history += _load_block(work, i, blk)  # type: ignore[union-attr]
        else:
            losses = _train_block(i, blk, s_stream, temb, shared, target, config, steps, dev, grad_checkpoint, bar, on_step)
            history += losses
            if work is not None:
                _save_block(work, i, blk, losses)
            if on_block is not None:
                on_block(i, student)
        if input_source == "student":  # the next block learns to correct the calibrated prefix's error
            s_stream = _run_block(blk, s_stream, temb, shared, chunk)
        t_stream = target
        if input_source == "teacher":
            s_stream = t_stream
    bar.close()
    return student, history


def _train_block(
    i: int,
    blk: nn.Module,
    inputs: Stream,
    temb: torch.Tensor,
    shared: dict[str, Any],
    target: Stream,
    config: CalibConfig,
    steps: int,
    dev: torch.device,
    grad_checkpoint: bool,
    bar: Any,
    on_step: Callable[[int, int, float], None] | None,
) -> list[float]:
    """Adam on block i's trainable tensors: match the teacher block's outputs on pooled inputs; returns the losses."""
    home = _first_param(blk).device
    blk.to(dev)
    dtype = _first_param(blk).dtype  # fp32
    params = [p for p in blk.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr)
    undo = checkpoint_children(blk) if grad_checkpoint else None
    fixed = _cast(shared, dtype, dev)
    n_pool = len(temb)
    losses: list[float] = []
    try:
        for step in range(steps):
            g = torch.Generator().manual_seed(block_seed(config.seed, i, step))
            idx = distributed.shard(torch.randint(n_pool, (config.batch,), generator=g))  # the global batch's share
            kw = {"hidden_states": inputs["hidden_states"][idx], "encoder_hidden_states": inputs["encoder_hidden_states"][idx], "temb": temb[idx]}
            t_out = (target["encoder_hidden_states"][idx], target["hidden_states"][idx])
            kw, t_out = _cast((kw, t_out), dtype, dev)
            if distributed.active():  # each process: its samples' part of the global batch loss
                loss = distributed.sharded_block_loss(blk(**kw, **fixed), t_out)
            else:
                loss = block_loss(blk(**kw, **fixed), t_out)
            for group in opt.param_groups:  # cosine decay to 10 %, as joint.train
                group["lr"] = cosine_lr(config.lr, step, steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.all_reduce_grads(params)  # the global batch's gradient, on every process
            opt.step()
            value = distributed.all_reduce_sum(loss.detach().clone()).item()
            losses.append(value)
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
    return losses
