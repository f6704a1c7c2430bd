"""How many weight levels the toy needs: the same calibration with 3 (ternary), 5, 7, ... levels per weight.

What: runs `bitflux calibrate`'s joint training on the bundled `toy` with the block Linears'
weights as s * clip(round(U), -L, L) (2L + 1 levels, log2(2L + 1) bits; L = 1 is the ternary
student exactly as `bitflux calibrate` trains it), one shared teacher recording, and scores each
trained student (before packing: L > 1 has no trunk format) on held-out prompts like `bitflux eval`:
per-category ratios, overall ratio with its 95 % interval, PSNR and verdict agreement to the
full-precision toy at the same seeds. Read it beside research/fragility.py: it says how much fidelity
more weight precision buys at this width, under the same training. Prints a table, writes JSON.

    python research/capacity.py --levels 1 2 3 7 --out bench/results/capacity-probe.json

For L > 1 the step of each row is the mean-squared-error optimum over a grid (the latent U is w / step,
so the rounding boundaries sit at +-0.5, +-1.5, ...); the training code is calibrate's, with only the
student Linear swapped (see `_levels_linear`).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from bitflux.calibrate import api as cal_api
from bitflux.calibrate import student as cal_student
from bitflux.calibrate import CalibConfig, calibrate
from bitflux.calibrate.states import record_states
from bitflux.eval.fragility import compare
from bitflux.eval.runner import EvalConfig, as_pipeline, generate, load_model, load_prompts, score_images
from bitflux.toy.world import CATEGORIES
from bitflux.toy.world import prompts as world_prompts
from common import RESULTS, bundled_probe_config, write_json


def _levels_linear(levels: int) -> type:
    """A drop-in for calibrate's `FakeTernaryLinear` with weights s * clip(round(U), -levels, levels)."""

    class FakeLevelsLinear(cal_student.FakeTernaryLinear):
        def __init__(self, linear: nn.Linear, init) -> None:
            super().__init__(linear, init)
            w = linear.weight.detach().float()
            std = w.std(1, keepdim=True).clamp_min(1e-12)
            best_err, step = None, None
            for c in torch.linspace(0.05, 3.0, 60) / levels:
                d = c * std
                err = (w - d * torch.round(w / d).clamp(-levels, levels)).square().sum(1, keepdim=True)
                step = d if best_err is None else torch.where(err < best_err, d, step)
                best_err = err if best_err is None else torch.minimum(err, best_err)
            with torch.no_grad():
                self.latent.copy_(w / step)
                self.scale.copy_(step[:, 0])

    FakeLevelsLinear.levels = levels
    return FakeLevelsLinear


def train_student(pipe, prompts: list[str], config: CalibConfig, levels: int, calls) -> nn.Module:
    """calibrate()'s joint training with `levels`; returns the trained float student (not packed)."""
    fake, final = cal_student.FakeTernaryLinear, cal_api.finalize  # build_student (student.py) and calibrate (api.py) look them up there
    if levels > 1:
        cal_student.FakeTernaryLinear = _levels_linear(levels)
    cal_api.finalize = lambda _teacher, student, _config, _source="": student.eval()
    try:
        student, _ = calibrate(pipe, prompts, config, progress=False, calls=calls)
    finally:
        cal_student.FakeTernaryLinear, cal_api.finalize = fake, final
    return student


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", nargs="+", type=int, default=[1, 2, 3, 7], help="L: 2L + 1 weight levels (1 = ternary)")
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--n", type=int, default=96, help="held-out prompts scored")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "capacity-probe.json"))
    args = ap.parse_args()
    if any(level < 1 for level in args.levels):
        ap.error("--levels must be >= 1")
    torch.set_num_threads(args.threads)
    config = bundled_probe_config(args.num_prompts, args.steps)
    prompts = [p for p, _ in world_prompts("train", config.prompts, seed=config.seed)]
    items = load_prompts("heldout", args.n)
    pipe = load_model("toy")
    pipe.set_progress_bar_config(disable=True)
    ref = generate(pipe, items, args.seeds, EvalConfig())
    ref_verdicts = score_images(ref, items)
    calls = record_states(pipe, prompts, config, False, config.record_batch)
    rows = []
    for levels in args.levels:
        t0 = time.perf_counter()
        student = train_student(pipe, prompts, config, levels, calls)
        seconds = round(time.perf_counter() - t0, 1)
        images = generate(as_pipeline(student), items, args.seeds, EvalConfig())
        row = {**compare(f"L={levels}", images, ref, ref_verdicts, items), "levels": 2 * levels + 1,
               "bits": round(math.log2(2 * levels + 1), 2), "train_seconds": seconds}
        rows.append(row)
        write_json({"config": config.to_dict(), "n": args.n, "seeds": args.seeds, "rows": rows}, args.out)
        cats = " ".join(f"{c.value[:8]} {row[c.value + '_ratio']:.3f}" for c in CATEGORIES if row.get(c.value + "_ratio") is not None)
        lo, hi = row["ratio_ci95"]
        print(f"{row['levels']} levels ({row['bits']} bits): PSNR {row['psnr_db']:.2f} dB  agree {row['verdict_agreement']:.3f}  "
              f"ratio {row['ratio']:.3f} [{lo:.3f}, {hi:.3f}]  {cats}  ({seconds}s)", flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
