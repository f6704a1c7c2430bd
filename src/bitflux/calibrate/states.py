"""Teacher trajectories: the pool of recorded transformer calls calibration trains on.

`record_states` logs every transformer call of ordinary pipeline runs (CFG branches included);
`batch_calls` turns pool entries into one batched call; `cfg_pairs` finds the (cond, uncond) pairs
(used by research/cfg_gain.py's guidance analysis).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import CalibConfig
from .recorded import RecordedCalls


def record_states(
    pipe,
    prompts: list[str],
    config: CalibConfig,
    progress: bool = True,
    batch: int = 16,
    embeds: dict[str, torch.Tensor] | None = None,
    into: RecordedCalls | None = None,
) -> Sequence[dict[str, torch.Tensor]]:
    """Run the teacher pipeline on the prompts and record every transformer call's inputs.

    Returns one entry per sample and call (a batched call is split along its batch dimension;
    the 2-D position ids are shared). Prompt i always gets the noise of seed (config.seed, i).
    `embeds` (embeddings.encode_prompts of the same prompts) replaces the text encoders.
    `into`: a disk store to append to (and finish) instead of a list in RAM.
    """
    calls: list[dict[str, torch.Tensor]] = []

    def hook(_mod, _args, kwargs):
        tensors = {k: v.detach() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        if into is not None:
            into.add(tensors)
            return
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
            text: dict = {"prompt": part}
            if embeds is not None:  # cached embeddings: the text encoders may be gone
                kwargs.pop("negative_prompt", None)
                kwargs.pop("max_sequence_length", None)
                text = {k: v[i : i + batch] for k, v in embeds.items()}
            with torch.no_grad():
                pipe(**text, num_inference_steps=config.traj_steps, generator=gens, output_type="latent", **kwargs)
    finally:
        handle.remove()
    if into is not None:
        into.finish()
        return into
    return calls


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


def batch_calls(calls: list[dict[str, torch.Tensor]], idx: list[int]) -> dict[str, torch.Tensor]:
    """Concatenate recorded calls along the batch dimension (ids tensors are shared, not batched)."""
    first = calls[idx[0]]
    out = {}
    for k, v in first.items():
        if k in ("img_ids", "txt_ids"):
            out[k] = v
        else:
            out[k] = torch.cat([calls[i][k] for i in idx])
    return out
