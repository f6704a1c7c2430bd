"""Does a wider toy survive ternary weights better? Short toys of two widths, each calibrated and scored.

What: trains toy pipelines from scratch (`bitflux toy train`'s code, the bundled toy's options, a
short budget) at each width (attention heads x 32), then for each: calibrates a ternary student at
probe scale (128 training prompts, 400 steps, the bundled recipe's options), adds random weight
noise (sigma 0.2 of each matrix's std) to a copy of the teacher, and scores both against their own
teacher on held-out prompts (PSNR, verdict agreement, per-category and overall ratios). Short
toys score lower than the bundled one, so read the PSNR columns first: they say how close a
ternary student of each width gets to its own teacher under the same training.

    python research/width_probe.py --heads 4 8 --steps 3000 --work /tmp/width --out bench/results/width-probe.json

A smoke run in minutes: --heads 2 --steps 3 --vae-steps 3 --decoder-steps 3 --calib-steps 2 --n 6 --seeds 1.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bitflux.calibrate import calibrate
from bitflux.eval.fragility import compare, perturb
from bitflux.eval.runner import EvalConfig, generate, load_model, load_prompts, score_images
from bitflux.toy.build import ToyConfig
from bitflux.toy.train import TrainConfig, train
from bitflux.toy.world import prompts as world_prompts
from common import RESULTS, bundled_probe_config, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", nargs="+", type=int, default=[4, 8], help="attention heads of 32 dims (4 = the bundled width 128)")
    ap.add_argument("--steps", type=int, default=3000, help="transformer training steps per toy")
    ap.add_argument("--vae-steps", type=int, default=1000)
    ap.add_argument("--decoder-steps", type=int, default=400, help="VAE decoder refinement steps (toy train's default)")
    ap.add_argument("--calib-steps", type=int, default=400)
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", required=True, help="directory for the trained toys (reused if present)")
    ap.add_argument("--out", default=str(RESULTS / "width-probe.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = bundled_probe_config(128, args.calib_steps)
    items = load_prompts("heldout", args.n)
    rows = []
    for heads in args.heads:
        path = Path(args.work) / f"toy-w{heads * 32}"
        t0 = time.perf_counter()
        if not path.exists():
            cfg = TrainConfig(steps=args.steps, vae_steps=args.vae_steps, decoder_steps=args.decoder_steps, minutes=600, logit_mean=0.7,
                              absolute_positions=0.15, canonical_positions=0.5)
            train(path, cfg, resume=(path.parent / f"{path.name}.work").exists(), model_cfg=ToyConfig(width_heads=heads))
        train_s = time.perf_counter() - t0
        pipe = load_model(str(path))
        pipe.set_progress_bar_config(disable=True)
        ref = generate(pipe, items, args.seeds, EvalConfig())
        ref_verdicts = score_images(ref, items)
        base = {"width": heads * 32, "train_seconds": round(train_s, 1), "teacher": {k: v for k, v in compare("teacher", ref, ref, ref_verdicts, items).items() if not k.endswith("ratio")}}
        t0 = time.perf_counter()
        student, _ = calibrate(pipe, [p for p, _ in world_prompts("train", 128)], config, progress=False)
        calib_s = time.perf_counter() - t0
        teacher = pipe.transformer
        pipe.transformer = student
        s_row = compare("ternary", generate(pipe, items, args.seeds, EvalConfig()), ref, ref_verdicts, items)
        pipe.transformer = teacher
        perturb(teacher, 0.2)
        n_row = compare("noise 0.2", generate(pipe, items, args.seeds, EvalConfig()), ref, ref_verdicts, items)
        rows.append({**base, "calib_seconds": round(calib_s, 1), "ternary": s_row, "noise_0.2": n_row})
        print(f"width {heads * 32}: teacher overall {base['teacher']['overall']:.3f}; ternary {s_row['psnr_db']:.2f} dB ratio {s_row['ratio']:.3f} "
              f"(agree {s_row['verdict_agreement']:.3f}); noise 0.2 {n_row['psnr_db']:.2f} dB ratio {n_row['ratio']:.3f}", flush=True)
        write_json({"steps": args.steps, "vae_steps": args.vae_steps, "n": args.n, "seeds": args.seeds, "rows": rows}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
