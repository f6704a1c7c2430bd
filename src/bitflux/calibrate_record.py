"""Teacher trajectories and the pool of recorded states calibration trains on.

`record_states` logs every transformer call of ordinary pipeline runs (CFG branches included);
`sample_latents` returns a run's latents step by step, optionally with gradients (rollout steps);
`cfg_pairs`, `_batch` and `_mix_conditioning` turn the pool into training batches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import BitfluxError

if TYPE_CHECKING:
    from .calibrate import CalibConfig


def record_states(
    pipe, prompts: list[str], config: CalibConfig, progress: bool = True, batch: int = 16
) -> list[dict[str, torch.Tensor]]:
    """Run the teacher pipeline on the prompts and record every transformer call's inputs.

    Returns one entry per sample and call (a batched call is split along its batch dimension;
    the 2-D position ids are shared). Prompt i always gets the noise of seed (config.seed, i).
    """
    calls: list[dict[str, torch.Tensor]] = []

    def hook(_mod, _args, kwargs):
        tensors = {k: v.detach() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        b = tensors["hidden_states"].shape[0]
        for j in range(b):
            calls.append({k: v.clone() if k.endswith("_ids") else v[j : j + 1].clone() for k, v in tensors.items()})

    for comp in pipe.components.values():  # dropout off: trajectories must be deterministic
        if isinstance(comp, nn.Module):
            comp.eval()
    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        starts = range(0, len(prompts), batch)
        for i in tqdm(starts, desc="teacher trajectories", disable=not progress):
            part = prompts[i : i + batch]
            gens = [torch.Generator().manual_seed(config.seed * 1_000_003 + i + j) for j in range(len(part))]
            kwargs = dict(config.pipe_kwargs)
            if "negative_prompt" in kwargs and isinstance(kwargs["negative_prompt"], str):
                kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(part)
            with torch.no_grad():
                pipe(part, num_inference_steps=config.traj_steps, generator=gens, output_type="latent", **kwargs)
    finally:
        handle.remove()
    return calls


def sample_latents(pipe, prompts: list[str], seeds: list[int], config: CalibConfig, grad: bool = False) -> list[torch.Tensor]:
    """The latents after every denoising step of `pipe` on the prompts (prompt j from noise seed seeds[j]).

    With grad=True the sampler runs with autograd on, so a loss on the result trains the transformer
    through the whole trajectory (the pipeline's own __call__ is wrapped in no_grad).
    """
    call = type(pipe).__call__
    if grad:
        call = getattr(call, "__wrapped__", None)
        if call is None:
            raise BitfluxError(f"{type(pipe).__name__} cannot sample with gradients (no undecorated __call__)")
    out: list[torch.Tensor] = []

    def keep(_pipe, _i, _t, tensors):
        out.append(tensors["latents"])
        return {}

    kwargs = dict(config.pipe_kwargs)
    if isinstance(kwargs.get("negative_prompt"), str):
        kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(prompts)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    call(pipe, prompts, num_inference_steps=config.traj_steps, generator=gens, output_type="latent", callback_on_step_end=keep, **kwargs)
    return out


def cfg_pairs(calls: list[dict[str, torch.Tensor]]) -> list[tuple[int, int]]:
    """(cond, uncond) index pairs: recorded calls that saw the same latents at the same timestep.

    FluxPipeline's true CFG runs the prompt branch, then the negative branch, on identical inputs,
    so the first of two calls with equal (hidden_states, timestep) is the conditional one.
    """
    first: dict[bytes, int] = {}
    pairs = []
    for i, c in enumerate(calls):
        key = c["hidden_states"].float().numpy().tobytes() + c["timestep"].float().numpy().tobytes()
        if key in first:
            pairs.append((first.pop(key), i))
        else:
            first[key] = i
    return pairs


def _batch(calls: list[dict[str, torch.Tensor]], idx: list[int]) -> dict[str, torch.Tensor]:
    """Concatenate recorded calls along the batch dimension (ids tensors are shared, not batched)."""
    first = calls[idx[0]]
    out = {}
    for k, v in first.items():
        if k in ("img_ids", "txt_ids"):
            out[k] = v
        else:
            out[k] = torch.cat([calls[i][k] for i in idx])
    return out


def _mix_conditioning(
    kw: dict[str, torch.Tensor], calls: list[dict[str, torch.Tensor]], share: float, g: torch.Generator
) -> dict[str, torch.Tensor]:
    """Recombine the text states of a `share` of the batch with random donor calls, token by token."""
    b = kw["hidden_states"].shape[0]
    rows = torch.rand(b, generator=g) < share
    donors = torch.randint(len(calls), (b,), generator=g).tolist()
    enc, pooled = kw["encoder_hidden_states"], kw["pooled_projections"]
    tokens = torch.rand(enc.shape[:2], generator=g)[..., None] < 0.5
    whole = torch.rand(b, generator=g)[:, None] < 0.5
    if not rows.any():
        return kw
    d_enc = torch.cat([calls[i]["encoder_hidden_states"] for i in donors])
    d_pooled = torch.cat([calls[i]["pooled_projections"] for i in donors])
    r = rows[:, None]
    out = dict(kw)
    out["encoder_hidden_states"] = torch.where(r[..., None] & tokens, d_enc.to(enc.dtype), enc)
    out["pooled_projections"] = torch.where(r & whole, d_pooled.to(pooled.dtype), pooled)
    return out
