"""Short calibration probes: does a CalibConfig change help, measured in about a minute per row.

What: calibrates the bundled `toy` at ablation scale (128 training prompts, 400 steps, on-policy
states in 3 rounds from 25 % unless a row overrides it) through `bitflux ablate`'s sweep (rows
that record the same trajectories share one teacher recording), and scores each on 96 held-out
prompts x 1 seed with PSNR to the full-precision model at the same seeds; seconds exclude scoring. At this size the overall ratio moves by several points by chance; PSNR is the
steadier signal. Prints a table and writes bench/results/calib-probe.json.

    python research/calib_probe.py --rows base lr=0.004 lr=0.001 batch=32 train=full train=all
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from bitflux.ablate import run_sweep
from bitflux.calibrate import CalibConfig
from bitflux.calibrate.command import eval_settings
from common import RESULTS, write_json
from overrides import parse_row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", default=["base", "train=all"])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "calib-probe.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe_kwargs, traj_steps = eval_settings("toy")
    base = CalibConfig(prompts=args.prompts, steps=args.steps, traj_steps=traj_steps, pipe_kwargs=pipe_kwargs,
                       checkpoint_every=0, on_policy_at=0.25, on_policy_rounds=3)
    specs = [(r, replace(base, **parse_row(r, base))) for r in args.rows]  # fail on a typo before any work
    with tempfile.TemporaryDirectory() as work:  # the ablation sweep's machinery, with these rows
        bf16, *scored = run_sweep(Path(work), base, n_eval=96, progress=False, specs=specs)
    rows = [{"row": r["row"], "overall": r["overall"], "ratio": r["ratio_vs_bf16"], "psnr_db": r["psnr_db"],
             "seconds": r["seconds"]} for r in scored]
    for x in rows:
        print(f"{x['row']:<24} overall {x['overall']:.3f}  ratio {x['ratio']:.3f}  PSNR {x['psnr_db']:.2f} dB  {x['seconds']}s")
    out = write_json({"bf16_overall": bf16["overall"], "base": base.to_dict(), "rows": rows}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
