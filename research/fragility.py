"""How much of its own score the full-precision toy keeps under random weight noise, beside students.

What: adds seeded Gaussian noise (sigma x each matrix's weight std) to exactly the Linears the FLUX
policy ternarises in the bundled `toy`, scores each noisy copy like `bitflux eval` (same prompts,
seeds, sampler), then scores the given students, all against the clean `toy`. Each row has PSNR to
the clean teacher, verdict agreement, per-category ratios and the overall ratio with its 95 %
paired bootstrap interval. Read a student's row beside the noise row of similar PSNR: if random
noise that close to the teacher already loses a category, that category measures the teacher's
fragility, not the calibration. Prints a table and writes JSON.

    python research/fragility.py toy-1.58bit --sigmas 0 0.05 0.1 0.2 0.3 --out bench/results/fragility-default.json
    python research/fragility.py toy-1.58bit --n 192 --seeds 8 --prompt-seed 1 --out bench/results/fragility-larger.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from bitflux.eval.fragility import fragility_rows
from bitflux.eval.runner import EvalConfig, load_prompts
from bitflux.toy.world import CATEGORIES
from common import RESULTS, write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("students", nargs="*", help="ternary models to score beside the noise rows (e.g. toy-1.58bit)")
    ap.add_argument("--sigmas", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.3], help="noise levels (x weight std)")
    ap.add_argument("--prompts", default="heldout", choices=["heldout", "train"])
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--prompt-seed", type=int, default=0)
    ap.add_argument("--noise-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "fragility.json"))
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = ap.parse_args(argv)
    if any(s < 0 for s in args.sigmas) or args.n < 1 or args.seeds < 1:
        print("fragility: error: --sigmas must be >= 0, --n and --seeds positive", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    items = load_prompts(args.prompts, args.n, args.prompt_seed)
    rows = fragility_rows("toy", args.students, args.sigmas, items, args.seeds, EvalConfig(), args.noise_seed)
    doc = {"prompts": args.prompts, "n": args.n, "seeds": args.seeds, "prompt_seed": args.prompt_seed,
           "noise_seed": args.noise_seed, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    out = write_json(doc, args.out)
    if args.json:
        print(json.dumps(doc))
        return 0
    cats = [c.value for c in CATEGORIES]
    print(f"{'model':<24} {'PSNR':>6} {'agree':>6} " + " ".join(f"{c[:8]:>8}" for c in cats) + f" {'overall':>8}  95% CI")
    for r in rows:
        per = " ".join(f"{r[c + '_ratio']:8.3f}" if r.get(c + "_ratio") is not None else f"{'-':>8}" for c in cats)
        lo, hi = r["ratio_ci95"]
        print(f"{r['model']:<24} {r['psnr_db']:6.2f} {r['verdict_agreement']:6.3f} {per} {r['ratio']:8.3f}  [{lo:.3f}, {hi:.3f}]")
    print(f"(ratios of each category and of overall to the clean toy; {len(items)} prompts x {args.seeds} seeds) wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
