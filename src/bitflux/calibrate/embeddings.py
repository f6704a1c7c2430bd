"""Prompt embeddings, computed once and cached on disk, so the text encoders can be freed.

T5-XXL alone is 9.5 GB in bf16: block-wise calibration encodes every prompt (and the negative
prompt of real CFG) once, in the batches the trajectories use, writes them to the work dir, and
drops the encoders before any transformer block is loaded. A resumed run reads the cache.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import WorkDir
from .config import CalibConfig

Embeds = dict[str, torch.Tensor]  # prompt_embeds (P, S, D), pooled_prompt_embeds (P, D2), negative_* likewise
CACHE = "embeddings.safetensors"


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], config: CalibConfig, progress: bool = True) -> Embeds:
    """Every prompt's (and, with real CFG, the negative prompt's) embeddings, in record batches."""
    kw = config.pipe_kwargs
    max_len = int(kw.get("max_sequence_length", 512))
    negative = kw.get("negative_prompt") if float(kw.get("true_cfg_scale", 1.0)) > 1 else None
    parts: dict[str, list[torch.Tensor]] = {}
    for i in tqdm(range(0, len(prompts), config.record_batch), desc="encode prompts", disable=not progress):
        part = prompts[i : i + config.record_batch]
        runs = [("", part)] + ([("negative_", [negative] * len(part))] if negative is not None else [])
        for prefix, texts in runs:
            embeds, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, max_sequence_length=max_len)
            parts.setdefault(f"{prefix}prompt_embeds", []).append(embeds)
            parts.setdefault(f"{prefix}pooled_prompt_embeds", []).append(pooled)
    return {k: torch.cat(v) for k, v in parts.items()}


def cached_embeddings(work: WorkDir | None, pipe, prompts: list[str], config: CalibConfig, progress: bool = True) -> Embeds:
    """The prompts' embeddings from the work dir's cache, computed and cached first if absent."""
    if work is not None and work.exists(CACHE):
        tensors, _ = work.read(CACHE, {"prompt_embeds", "pooled_prompt_embeds"})
        # fresh, aligned memory: a file-backed tensor's alignment can change the BLAS path and so the
        # last bits of the trajectories; a resumed run must see what the first run saw
        return {k: v.clone() for k, v in tensors.items()}
    embeds = encode_prompts(pipe, prompts, config, progress)
    if work is not None:
        work.write(CACHE, embeds, {"prompts": len(prompts)})
    return embeds


def free_text_encoders(pipe) -> None:
    """Drop the pipeline's text encoders and tokenizers (their memory returns once unreferenced)."""
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        if isinstance(getattr(pipe, name, None), (nn.Module, object)) and getattr(pipe, name, None) is not None:
            setattr(pipe, name, None)
