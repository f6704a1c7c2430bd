"""How fragile a full-precision model's verdicts are: its scores under random weight noise.

A ternary student is judged by the share of the teacher's score it keeps. That share depends on
the student's error *and* on how close the teacher's own verdicts sit to their decision edges.
`perturb` adds seeded Gaussian noise, sigma x each matrix's own weight std, to exactly the Linears
the policy ternarises; `fragility_rows` scores such noisy copies of the teacher beside the given
students on the same prompts and seeds. A category that random noise at a student's PSNR already
loses is out of reach for any recipe of that fidelity: it measures the teacher, not calibration.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..policies import get_policy
from ..toy.world import CATEGORIES
from .runner import EvalConfig, PromptItem, as_pipeline, fidelity, generate, ratio_interval, score_images, summarize


@torch.no_grad()
def perturb(transformer: nn.Module, sigma: float, seed: int = 0, policy: str = "flux") -> int:
    """Add N(0, (sigma * std(W))^2) to the weight W of every policy-selected Linear, in place.

    Returns the number of matrices perturbed. The noise of each matrix is a pure function of
    (seed, its name), so a row is reproducible whatever else was perturbed before it.
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    names, _ = get_policy(policy).select(transformer)
    for name in names:
        w = transformer.get_submodule(name).weight
        g = torch.Generator().manual_seed(seed * 1_000_003 + sum(ord(c) * 31**i for i, c in enumerate(name)) % 2**31)
        noise = torch.randn(w.shape, generator=g, dtype=torch.float32)
        w.add_((noise * (sigma * w.float().std())).to(w.dtype))
    return len(names)


def compare(
    label: str, images: np.ndarray, ref_images: np.ndarray, ref_verdicts: np.ndarray, items: list[PromptItem]
) -> dict:
    """One row: scores, per-category and overall ratios to the reference, PSNR, agreement, 95 % interval."""
    verdicts = score_images(images, items)
    res, ref = summarize(verdicts, items), summarize(ref_verdicts, items)
    row: dict = {"model": label, **res}
    for c in CATEGORIES:
        if c.value in res:
            row[f"{c.value}_ratio"] = round(res[c.value] / ref[c.value], 4) if ref[c.value] else None
    row.update(fidelity(images, ref_images, verdicts, ref_verdicts))
    row.update(ratio_interval(verdicts, ref_verdicts, items))
    worst = [row[f"{c.value}_ratio"] for c in CATEGORIES if row.get(f"{c.value}_ratio") is not None]
    row["worst_category_ratio"] = min(worst) if worst else None
    return row


def fragility_rows(
    teacher: str, students: list[str], sigmas: list[float], items: list[PromptItem], seeds: int,
    cfg: EvalConfig = EvalConfig(), noise_seed: int = 0,
) -> list[dict]:
    """Rows for the teacher perturbed at each sigma, then each student, all against the clean teacher."""
    pipe = as_pipeline(teacher)
    ref_images = generate(pipe, items, seeds, cfg)
    ref_verdicts = score_images(ref_images, items)
    clean = copy.deepcopy(pipe.transformer.state_dict())
    rows = []
    for sigma in sigmas:
        perturb(pipe.transformer, sigma, noise_seed)
        rows.append({**compare(f"{teacher} + noise {sigma:g}", generate(pipe, items, seeds, cfg), ref_images, ref_verdicts, items), "sigma": sigma})
        pipe.transformer.load_state_dict(clean)
    for name in students:
        rows.append({**compare(name, generate(as_pipeline(name), items, seeds, cfg), ref_images, ref_verdicts, items), "sigma": None})
    return rows
