"""Sequential onloading: block-wise calibration that never holds more than one teacher block.

The teacher stays on disk (`source.TransformerSource`, bf16 shards). Only the small layers
outside the blocks are resident. Two phases:

1. Trajectories (`streamed_teacher`): the ordinary pipeline samples with a skeleton transformer
   whose blocks are loaded from the shards by a forward pre-hook and released by a forward hook,
   so each transformer call streams the blocks through memory once. Prompts come from the
   embedding cache (embeddings.py); the text encoders are gone by then.
2. Training (`train_sequential`): the pooled block-0 inputs are written to a disk-backed pool
   (pool.py). For block i: load teacher block i, push the pool through it (its outputs are block
   i's targets and block i+1's inputs, a new pool stream), build student block i from it, train it
   (blockwise._train_block, the same steps as in-memory block-wise), turn it into trunk-format
   TernaryLinears in the stored dtype, write that block to the work dir, free everything.

Peak memory: one teacher block (stored dtype) + one fp32 student block + its Adam state + the
activations of a batch + the resident outer layers + the pool rows a batch touches. The result
is assembled from the finished blocks; the teacher is never copied whole.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import QuantConfig
from ..quantize import quantize
from .blockwise import _Stop, _cast, _train_block, pool_indices
from . import distributed
from .checkpoint import WorkDir
from .config import CalibConfig
from .pool import DiskPool
from .source import TransformerSource, release
from .states import batch_calls
from .student import build_student_block, converted_in, finalize_block

_STREAMS = ("hidden_states", "encoder_hidden_states")


def block_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's blocks in execution order (double-stream, then single)."""
    return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))] + [
        f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks))
    ]


@contextmanager
def streamed_teacher(source: TransformerSource, device: torch.device | str = "cpu") -> Iterator[nn.Module]:
    """The teacher transformer with its outer layers resident and each block loaded only while it runs."""
    model = source.skeleton()
    source.load_outer(model, device)
    handles = []

    def onload(name: str):
        def pre(_m: nn.Module, _args: tuple) -> None:
            source.load(model, name, device)

        return pre

    for name in block_names(model):
        blk = model.get_submodule(name)
        handles.append(blk.register_forward_pre_hook(onload(name)))
        handles.append(blk.register_forward_hook(lambda m, _a, _o: release(m)))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _block0_inputs(model: nn.Module, kw: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Block 0's keyword call for the batch `kw` (the forward stops before block 0 runs)."""
    got: dict[str, Any] = {}

    def pre(_m, _args, kwargs):
        got.update(kwargs)
        raise _Stop

    p = next(model.x_embedder.parameters())
    h = model.transformer_blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**_cast(kw, p.dtype, p.device), return_dict=False)
    except _Stop:
        pass
    finally:
        h.remove()
    return got


def _first_stream(model: nn.Module, calls, pool: list[int], store: DiskPool, chunk: int) -> tuple[torch.Tensor, dict]:
    """Write block 0's pooled inputs as pool stream 0; returns (temb (P, D), shared kwargs)."""
    first = _block0_inputs(model, batch_calls(calls, pool[:1]))
    shared = {k: v for k, v in first.items() if k not in (*_STREAMS, "temb")}
    if distributed.is_main() and not store.exists("stream-000-hidden_states"):
        outs = {k: store.create(f"stream-000-{k}", (len(pool), *first[k].shape[1:]), first[k].dtype) for k in _STREAMS}
        temb = store.create("temb", (len(pool), *first["temb"].shape[1:]), first["temb"].dtype)
        for c0 in range(0, len(pool), chunk):
            got = _block0_inputs(model, batch_calls(calls, pool[c0 : c0 + chunk]))
            for k in _STREAMS:
                outs[k][c0 : c0 + chunk] = got[k]
            temb[c0 : c0 + chunk] = got["temb"]
        store.finish("temb")
        for k in _STREAMS:
            store.finish(f"stream-000-{k}")
    distributed.barrier()  # the other processes read what rank 0 wrote
    return store.open("temb"), shared


@torch.no_grad()
def _advance(blk: nn.Module, store: DiskPool, i: int, temb: torch.Tensor, shared: dict, chunk: int) -> None:
    """Pool stream i+1 = teacher block i applied to stream i, chunk by chunk, written to disk."""
    src = {k: store.open(f"stream-{i:03d}-{k}") for k in _STREAMS}
    dst = {k: store.create(f"stream-{i + 1:03d}-{k}", tuple(src[k].shape), src[k].dtype) for k in _STREAMS}
    p = next(blk.parameters())
    fixed = _cast(shared, p.dtype, p.device)
    for c0 in range(0, len(temb), chunk):
        sl = slice(c0, c0 + chunk)
        kw = {k: src[k][sl] for k in _STREAMS} | {"temb": temb[sl]}
        enc, hid = blk(**_cast(kw, p.dtype, p.device), **fixed)
        dst["encoder_hidden_states"][sl] = enc.to(dst["encoder_hidden_states"].dtype).cpu()
        dst["hidden_states"][sl] = hid.to(dst["hidden_states"].dtype).cpu()
    for k in _STREAMS:
        store.finish(f"stream-{i + 1:03d}-{k}")


def train_sequential(
    source: TransformerSource,
    calls: list[dict[str, torch.Tensor]],
    config: CalibConfig,
    work: WorkDir,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    on_step: Callable[[int, int, float], None] | None = None,
    on_block: Callable[[int], None] | None = None,
    chunk: int = 16,
    grad_checkpoint: bool = False,
    qsource: str = "",
) -> tuple[nn.Module, list[float]]:
    """Block-wise calibration streamed from `source`; returns (trunk-format quantised model, loss history).

    Resumable per block in `work` (finished blocks are `block-NNN.safetensors`, the pool streams
    live in `work/pool/`). `on_block(i)` after block i is written (tests kill runs there).
    """
    dev = torch.device(device)
    model = source.skeleton()
    source.load_outer(model, dev)
    names = block_names(model)
    n = len(names)
    steps = max(1, config.steps // n)
    store = DiskPool(work.path / "pool", clean=distributed.is_main())
    distributed.barrier()
    pool = pool_indices(len(calls), config.block_pool, config.seed)
    temb, shared = _first_stream(model, calls, pool, store, chunk)
    history: list[float] = []
    bar = tqdm(total=n * steps, desc="calibrate (block-wise, streamed)", disable=not progress)
    for i, name in enumerate(names):
        fname = f"block-{i:03d}.safetensors"
        if work.exists(fname):
            _, meta = work.read(fname)
            history += [float(v) for v in meta.get("losses", [])]
            bar.update(steps)
            continue
        teacher_blk = source.load(model, name, dev)
        if distributed.is_main() and not store.exists(f"stream-{i + 1:03d}-hidden_states"):
            _advance(teacher_blk, store, i, temb, shared, chunk)
        distributed.barrier()
        inputs = {k: store.open(f"stream-{i:03d}-{k}") for k in _STREAMS}
        target = {k: store.open(f"stream-{i + 1:03d}-{k}") for k in _STREAMS}
        student = build_student_block(teacher_blk, converted_in(model, name), config)
        losses = _train_block(i, student, inputs, temb, shared, target, config, steps, dev, grad_checkpoint, bar, on_step)
        done = finalize_block(teacher_blk, student, config)
        work.write(fname, done.state_dict(), {"block": i, "losses": losses})
        history += losses
        del student, done, inputs, target
        release(teacher_blk)
        for k in _STREAMS:  # block i's inputs are no longer needed (the write above was a barrier)
            if distributed.is_main():
                store.delete(f"stream-{i:03d}-{k}")
        if on_block is not None:
            on_block(i)
    bar.close()
    return assemble(source, model, config, work, qsource), history


def assemble(source: TransformerSource, model: nn.Module, config: CalibConfig, work: WorkDir, qsource: str = "") -> nn.Module:
    """The quantised model: the skeleton's outer layers (stored dtype) plus every finished block."""
    # the blocks are quantised on the meta device (shapes only), then filled from the block files
    quantize(model, QuantConfig(format=config.format, init=config.init, source=qsource))
    for i, name in enumerate(block_names(model)):
        blk = model.get_submodule(name)
        tensors, _ = work.read(f"block-{i:03d}.safetensors", set(blk.state_dict()))
        blk.load_state_dict(tensors, assign=True)
    return model
