"""Generate toy-world images with a FLUX pipeline and score them GenEval-style.

`evaluate` returns per-category and overall accuracy, and (given reference images from the
full-precision `toy` model at the same seeds) fidelity: PSNR and per-prompt verdict agreement.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import BitfluxError, ModelError
from ..toy.scorer import score
from ..toy.variants import world_of
from ..toy.world import CATEGORIES, DEFAULT_WORLD, IMAGE_SIZE, TEXT_LENGTH, Category, Split, World, parse_prompt, prompts


@dataclass(frozen=True)
class EvalConfig:
    """How images are generated for scoring (the defaults take about a minute for `toy`)."""

    steps: int = 12  # Euler steps
    seeds: int = 1  # images per prompt
    cfg_scale: float = 3.0  # real classifier-free guidance (true_cfg_scale, negative prompt "")
    max_sequence_length: int = TEXT_LENGTH  # T5 padding the toy is trained and used with
    batch: int = 24  # prompts per pipeline call
    size: int = IMAGE_SIZE


@dataclass(frozen=True)
class PromptItem:
    """One prompt with its category (from the grammar) and the toy world it is scored in."""

    text: str
    category: Category
    world: World = DEFAULT_WORLD


def load_prompts(source: str, n: int = 96, seed: int = 0, world: World = DEFAULT_WORLD) -> list[PromptItem]:
    """"train" / "heldout" (n prompts of `world`, round-robin over categories) or a text file, one prompt a line."""
    if source in (Split.TRAIN.value, Split.HELDOUT.value):
        return [PromptItem(t, c, world) for t, c in prompts(source, n, seed, world)]
    path = Path(source)
    if not path.is_file():
        raise BitfluxError(f"--prompts must be 'train', 'heldout' or a text file; {source!r} is none of these")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise BitfluxError(f"{source}: no prompts")
    return [PromptItem(t, parse_prompt(t, world).category, world) for t in lines]  # PromptError outside the grammar


def _generators(n_prompts: int, seed: int) -> list[torch.Generator]:
    """One generator per (prompt index, seed): the same noise for every model compared."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(n_prompts)]


@torch.no_grad()
def generate(pipe, items: list[PromptItem], seeds: int, cfg: EvalConfig, progress: bool = False) -> np.ndarray:
    """Images (seeds, n_prompts, H, W, 3) uint8, seed-major."""
    pipe.set_progress_bar_config(disable=True)
    texts = [it.text for it in items]
    out = np.zeros((seeds, len(texts), cfg.size, cfg.size, 3), dtype=np.uint8)
    chunks = [(s, i) for s in range(seeds) for i in range(0, len(texts), cfg.batch)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(chunks), desc="eval", mininterval=5)
    for s, i in chunks:
        part = texts[i : i + cfg.batch]
        gens = _generators(len(texts), s)[i : i + cfg.batch]
        kwargs = {}
        if cfg.cfg_scale > 1:
            kwargs = {"true_cfg_scale": cfg.cfg_scale, "negative_prompt": [""] * len(part)}
        imgs = pipe(
            part,
            height=cfg.size,
            width=cfg.size,
            num_inference_steps=cfg.steps,
            generator=gens,
            max_sequence_length=cfg.max_sequence_length,
            output_type="np",
            **kwargs,
        ).images  # (b, H, W, 3) float in [0, 1]
        out[s, i : i + len(part)] = (np.asarray(imgs) * 255).round().clip(0, 255).astype(np.uint8)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of uint8 images in dB (capped at 100 for identical images)."""
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 100.0 if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def score_images(images: np.ndarray, items: list[PromptItem]) -> np.ndarray:
    """Verdicts (seeds, n_prompts) bool, each prompt scored in its own world's grammar and palette."""
    specs = [parse_prompt(it.text, it.world) for it in items]
    return np.array([[score(img, spec, it.world) for img, spec, it in zip(row, specs, items)] for row in images], dtype=bool)


def summarize(verdicts: np.ndarray, items: list[PromptItem]) -> dict:
    """Per-category accuracy and `overall` = mean of the category accuracies (GenEval's rule)."""
    res: dict = {}
    for c in CATEGORIES:
        cols = [i for i, it in enumerate(items) if it.category == c]
        if cols:
            res[c.value] = round(float(verdicts[:, cols].mean()), 4)
    res["overall"] = round(float(np.mean([res[c.value] for c in CATEGORIES if c.value in res])), 4)
    return res


def fidelity(images: np.ndarray, ref: np.ndarray, verdicts: np.ndarray, ref_verdicts: np.ndarray) -> dict:
    """PSNR vs the reference images and agreement of per-prompt verdicts, same seeds."""
    vals = [psnr(a, b) for a, b in zip(images.reshape(-1, *images.shape[2:]), ref.reshape(-1, *ref.shape[2:]))]
    return {"psnr_db": round(float(np.mean(vals)), 2), "verdict_agreement": round(float((verdicts == ref_verdicts).mean()), 4)}


def ratio_interval(verdicts: np.ndarray, ref_verdicts: np.ndarray, items: list[PromptItem], n_boot: int = 2000, seed: int = 0) -> dict:
    """overall / reference overall, with a 95 % paired bootstrap interval over prompts.

    Prompts are resampled within each category (a prompt keeps all its seeds, and the model and
    the reference are scored on the same resample), so the interval says how much the ratio
    depends on which prompts were drawn. verdicts: (seeds, n_prompts) bool, same for ref_verdicts.
    """
    rng = np.random.default_rng(seed)
    model_means, ref_means = [], []
    for c in CATEGORIES:
        cols = [i for i, it in enumerate(items) if it.category == c]
        if not cols:
            continue
        m, r = verdicts[:, cols].mean(0), ref_verdicts[:, cols].mean(0)  # (n_c,) per-prompt accuracy
        idx = rng.integers(0, len(cols), (n_boot, len(cols)))  # (B, n_c)
        model_means.append(m[idx].mean(1))
        ref_means.append(r[idx].mean(1))
    num, den = np.mean(model_means, 0), np.mean(ref_means, 0)  # (B,) overall per resample
    boot = num[den > 0] / den[den > 0]
    point = summarize(verdicts, items)["overall"] / max(1e-12, summarize(ref_verdicts, items)["overall"])
    lo, hi = (np.percentile(boot, [2.5, 97.5]) if boot.size else (float("nan"), float("nan")))
    return {"ratio": round(float(point), 4), "ratio_ci95": [round(float(lo), 4), round(float(hi), 4)]}


def as_pipeline(model):
    """A FluxPipeline from a pipeline, a transformer module (paired with bundled `toy`), or a MODEL string."""
    from diffusers import FluxPipeline

    if isinstance(model, FluxPipeline):
        return model
    if isinstance(model, nn.Module):
        base = load_model("toy")
        base.transformer = model
        return base
    if isinstance(model, (str, Path)):
        return load_model(str(model))
    raise ModelError(f"cannot evaluate a {type(model).__name__}")


def world_for(model) -> World:
    """The toy world MODEL (bundled name, directory, or a pipeline loaded from one) was trained on."""
    from diffusers import FluxPipeline

    if isinstance(model, FluxPipeline):
        path = getattr(model.config, "_name_or_path", None)
        return world_of(path) if path and Path(path).is_dir() else DEFAULT_WORLD
    if isinstance(model, (str, Path)):
        from ..pipeline import resolve

        pipeline = resolve(str(model), fallback="toy").pipeline
        return world_of(pipeline) if Path(pipeline).is_dir() else DEFAULT_WORLD
    return DEFAULT_WORLD  # a bare transformer module is paired with the bundled toy


def _quiet_loading() -> None:
    """No per-component loading bars from diffusers/transformers (they clutter eval output)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def load_model(model: str, naive: bool = False, verify: bool = True):
    """The pipeline for MODEL (bundled name, pipeline dir, quantised transformer dir).

    naive=True ternarises the full-precision transformer in memory by plain absmean rounding.
    """
    from ..pipeline import load_pipeline, load_transformer, resolve

    _quiet_loading()
    ref = resolve(model, fallback="toy")
    try:
        transformer = load_transformer(ref, verify=verify)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"cannot load transformer {ref.transformer}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if naive:
        if transformer is not None:
            raise ModelError(f"{model}: already quantised; --naive applies to a full-precision model")
        from .. import QuantConfig, quantize

        pipe = load_pipeline(ref)
        quantize(pipe.transformer, QuantConfig(init="absmean"))
        return pipe
    return load_pipeline(ref, transformer)


def evaluate(
    model,
    items: list[PromptItem] | str = "heldout",
    seeds: int = 1,
    cfg: EvalConfig = EvalConfig(),
    reference=None,
    n: int = 96,
    progress: bool = False,
) -> dict:
    """Score `model` (pipeline, transformer module or MODEL string) on prompts.

    `items` as a string ("heldout", "train", a file) draws prompts of the model's world (world_for).
    `reference`: a pipeline, MODEL string or precomputed images (seeds, n, H, W, 3) for fidelity;
    None skips fidelity. Returns scores, fidelity, timings, and the raw images and verdicts.
    """
    if isinstance(items, str):
        items = load_prompts(items, n, world=world_for(model))
    cfg = EvalConfig(**{**asdict(cfg), "seeds": seeds})
    pipe = as_pipeline(model)
    t0 = time.perf_counter()
    images = generate(pipe, items, seeds, cfg, progress)
    seconds = time.perf_counter() - t0
    verdicts = score_images(images, items)
    res = summarize(verdicts, items)
    res.update({"n_prompts": len(items), "seeds": seeds, "steps": cfg.steps, "cfg_scale": cfg.cfg_scale})
    res["generate_seconds"] = round(seconds, 1)
    res["fidelity"] = None
    ref_images = None
    if reference is not None:
        if isinstance(reference, np.ndarray):
            ref_images = reference
        else:
            ref_images = generate(as_pipeline(reference), items, seeds, cfg, progress)
        res["fidelity"] = fidelity(images, ref_images, verdicts, score_images(ref_images, items))
    res["_images"], res["_reference"], res["_verdicts"], res["_items"] = images, ref_images, verdicts, items
    return res


def public(res: dict) -> dict:
    """The JSON-able part of an `evaluate` result (drops the raw arrays)."""
    return {k: v for k, v in res.items() if not k.startswith("_")}
