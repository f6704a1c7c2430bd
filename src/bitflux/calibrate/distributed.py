"""Data-parallel calibration on torch.distributed: one process per device, gradients all-reduced per block.

Launch the ordinary command under `torchrun --nproc-per-node N` (or `accelerate launch`): every
process records the same trajectories (they are a pure function of the seed), draws the same
global batch each step and takes its share of it (`shard`). The loss is the global batch's
normalised MSE, sum(err) / sum(target^2), split so each process holds the part of the numerator
its samples contribute over the global denominator; summing the gradients over processes
(`all_reduce_grads`) then gives exactly the single-process gradient of the same global batch, up
to float summation order. Only rank 0 writes checkpoints; `barrier` keeps the others in step.
Without an initialised process group every helper is the single-process no-op.

Joint mode with `shard=True` puts the student on FSDP2 instead (`shard_model`): each process holds
1/N of every student tensor and of its Adam state, whole blocks are gathered only while they run,
and the gradients are reduce-scattered (averaged, so each loss share is scaled by the number of
processes first). Checkpoints gather one tensor at a time (`gather`); rank 0 writes them, and a resumed run
scatters them back (`distribute_like`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """The process that writes (rank 0, or the only one)."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def shard(idx: torch.Tensor) -> torch.Tensor:
    """This process's share of a global batch of indices (strided, so every share differs by at most one)."""
    return idx[rank() :: world()] if active() else idx


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over processes (in place; returned for chaining)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Sum every parameter's gradient over processes, flattened into one bucket per dtype (one call each)."""
    if not active():
        return
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def sharded_block_loss(s_out: tuple[torch.Tensor, ...], t_out: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """This process's part of the global batch's block loss: mean over streams of sum(err) / global sum(t^2).

    Summed over processes it equals `losses.block_loss` of the whole global batch.
    """
    total = torch.zeros((), dtype=torch.float32, device=s_out[0].device)
    for s, t in zip(s_out, t_out):
        energy = all_reduce_sum(t.float().square().sum().detach().clone())
        total = total + (s.float() - t.float()).square().sum() / energy.clamp_min(1e-8 * _global_numel(t))
    return total / len(t_out)


def _global_numel(t: torch.Tensor) -> float:
    return float(all_reduce_sum(torch.tensor(float(t.numel()))).item())


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_model(model: nn.Module) -> nn.Module:
    """Put a FLUX-like transformer on FSDP2: each block, then the rest, sharded over all processes.

    FSDP2 averages the gradients over processes; the caller scales its loss share by `world()`
    (`sharded_block_loss` shares add up to the global loss), so the result is their sum. Gloo has
    no pre-multiplied sum to ask FSDP2 for that directly."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    # diffusers' blocks return views; FSDP2 warns in case a caller edits them in place (none does:
    # the two-process test equals one process)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for name in ("transformer_blocks", "single_transformer_blocks"):
        for block in getattr(model, name, []):
            fully_shard(block, reshard_after_forward=True)
    fully_shard(model)
    return model


def gather(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) one, on every process (a collective); others as they are."""
    return t.full_tensor() if _is_dtensor(t) else t


def distribute_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` cut the way `like` is sharded (this process's part, as a DTensor); `full` itself if `like` is plain."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements)
