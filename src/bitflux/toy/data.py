"""Training data for the toy model: rendered training-split scenes, their captions and token ids.

Deterministic from a seed; held-out compositions never appear (the split is enforced by world).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from .world import CATEGORIES, COLORS, TEXT_LENGTH, Category, Scene, Split, caption, render, sample_scene

# Harder categories are sampled more often.
CATEGORY_WEIGHTS: dict[Category, float] = {
    Category.SINGLE_OBJECT: 1.0,
    Category.TWO_OBJECT: 1.0,
    Category.COUNTING: 2.0,
    Category.COLORS: 1.0,
    Category.POSITION: 2.0,
    Category.COLOR_ATTR: 2.0,
}


@dataclass
class ToyData:
    """Images (N, 3, H, W) in [-1, 1], captions, CLIP ids (N, 16), T5 ids (N, TEXT_LENGTH)."""

    images: torch.Tensor
    captions: list[str]
    clip_ids: torch.Tensor
    t5_ids: torch.Tensor


def images_to_tensor(imgs: list) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) float32 in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in imgs])  # (N, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tokenize(clip_tok: PreTrainedTokenizerFast, t5_tok: PreTrainedTokenizerFast, texts: list[str]):
    """(clip_ids (N, 16), t5_ids (N, TEXT_LENGTH)) exactly as FluxPipeline makes them."""
    c = clip_tok(texts, padding="max_length", max_length=clip_tok.model_max_length, truncation=True, return_tensors="pt")
    t = t5_tok(texts, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt")
    return c.input_ids, t.input_ids


def make_data(n: int, seed: int, clip_tok: PreTrainedTokenizerFast, t5_tok: PreTrainedTokenizerFast) -> ToyData:
    """n training-split scenes drawn with CATEGORY_WEIGHTS."""
    rng = random.Random(f"toy-data-{seed}")
    cats = list(CATEGORIES)
    weights = [CATEGORY_WEIGHTS[c] for c in cats]
    scenes = [sample_scene(rng, rng.choices(cats, weights)[0], Split.TRAIN) for _ in range(n)]
    caps = [caption(s) for s in scenes]
    clip_ids, t5_ids = tokenize(clip_tok, t5_tok, caps)
    return ToyData(images_to_tensor([render(s) for s in scenes]), caps, clip_ids, t5_ids)


def make_vae_images(n: int, seed: int) -> torch.Tensor:
    """(n, 3, H, W) images whose objects are recoloured uniformly at random.

    The VAE is an image codec: it must reconstruct every colour-shape pair, including those that
    only held-out prompts name (no prompt is involved, so the prompt split stays intact).
    """
    rng = random.Random(f"toy-vae-{seed}")
    colors = list(COLORS)
    imgs = []
    for _ in range(n):
        s = sample_scene(rng, rng.choice(CATEGORIES), Split.TRAIN)
        objs = tuple(dataclasses.replace(o, color=rng.choice(colors)) for o in s.objects)
        imgs.append(render(Scene(s.spec, objs)))
    return images_to_tensor(imgs)
