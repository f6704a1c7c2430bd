"""`make demo`: the main job end to end on the bundled model, with no download.

Quantises the bundled `toy` FLUX, saves it packed, reloads it (checking the reloaded model is
bit-identical), then draws a few prompts with full precision, naive ternary and the calibrated
`toy-1.58bit` side by side into out/demo.png, and prints the sizes.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from . import _quiet

_quiet.install()

OUT = Path("out")
PROMPTS = [
    "a red circle",
    "two blue squares",
    "a green triangle to the left of a yellow diamond",
    "three purple circles",
]
COLUMN_NOTES = {  # what each column of out/demo.png is, printed after it is written
    "full precision": "the bundled toy FLUX transformer, stored in bf16 and run in fp32 (the reference)",
    "naive 1.58-bit": "the same weights ternarised per row (absmean), packed 2bit, saved and reloaded; no calibration",
    "calibrated 1.58-bit": "the bundled toy-1.58bit, calibrated without image data (same packed size)",
}


def main() -> int:
    from . import QuantConfig, load, quantize, save
    from .eval.grid import make_grid
    from .eval.runner import EvalConfig, PromptItem, generate, load_model
    from .inspect import size_report
    from .pipeline import bundled
    from .toy.world import parse_prompt

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    OUT.mkdir(exist_ok=True)
    items = [PromptItem(p, parse_prompt(p).category) for p in PROMPTS]
    cfg = EvalConfig(batch=len(PROMPTS))
    pipe = load_model("toy")
    columns = {"full precision": generate(pipe, items, 1, cfg)[0]}

    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        quantize(pipe.transformer, QuantConfig(format="2bit", init="absmean", source="toy"))
        path = save(pipe.transformer, Path(tmp) / "toy-2bit")
        reloaded = load(path)
        x = _probe(reloaded)
        with torch.no_grad():
            same = torch.equal(pipe.transformer(**x).sample, reloaded(**x).sample)
        print(f"quantised, saved to disk and reloaded: outputs bit-identical = {same}")
        naive = size_report(reloaded)
        pipe.transformer = reloaded
        columns["naive 1.58-bit"] = generate(pipe, items, 1, cfg)[0]

    if bundled("toy-1.58bit") is not None:
        calibrated = load_model("toy-1.58bit")
        columns["calibrated 1.58-bit"] = generate(calibrated, items, 1, cfg)[0]
    grid = make_grid(columns, PROMPTS)
    tmp_png = OUT / f".demo.png.tmp-{os.getpid()}.png"
    grid.save(tmp_png)
    os.replace(tmp_png, OUT / "demo.png")
    print(
        f"toy transformer: {naive['params']:,} params, {naive['ternary_fraction']:.2%} ternary, "
        f"{naive['bytes'] / 1e6:.2f} MB packed vs {naive['bf16_bytes'] / 1e6:.2f} MB bf16 ({naive['ratio']:.2f}x)"
    )
    print(f"\nwrote {(OUT / 'demo.png').resolve()} in {time.perf_counter() - t0:.0f}s")
    print(f"  rows: {len(PROMPTS)} prompts of the toy world (48x48 images, one seed each, shown 4x)")
    for label, what in COLUMN_NOTES.items():
        if label in columns:
            print(f"  column {label!r}: {what}")
    return 0 if same else 1


def _probe(model) -> dict:
    """A small deterministic transformer input for the reload check."""
    cfg, dt = model.config, model.dtype
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g).to(dt),
        encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, generator=g).to(dt),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(dt),
        timestep=torch.tensor([0.5], dtype=dt),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
    )


if __name__ == "__main__":
    raise SystemExit(main())
