"""`bitflux ablate`: the calibration ablation sweep on the toy world, as one command.

Each row calibrates the bundled `toy` model with one setting changed from the default (or not at
all: naive rounding), scores it on held-out prompts, and reports the score ratio vs bf16, size
and time. Writes `ablations.json` and `ablations.md` into OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .calibrate import CalibConfig, calibrate
from .calibrate.command import eval_settings
from .cli import print_result
from .config import QuantConfig
from .errors import OutputExistsError


def default_rows(base: CalibConfig) -> list[tuple[str, CalibConfig | str]]:
    """(name, config or naive init method) for every row of the sweep."""
    if base.on_policy_at:
        flip_policy = ("teacher states only", replace(base, on_policy_at=0.0))
    else:
        flip_policy = ("on-policy states at 50%", replace(base, on_policy_at=0.5))
    # Rows of options that were tried and removed (guided / CFG-difference / gain losses, CFG
    # targets, time weights, text-token mixing, rollout steps) stay in bench/results/ablations-toy128.json (the 128-wide toy).
    return [
        ("naive absmean", "absmean"),
        ("naive twn", "twn"),
        ("calibrated (default)", base),
        ("init absmean", replace(base, init="absmean")),
        ("train scales only", replace(base, train="scales")),
        ("train latent+scales+bias", replace(base, train="all")),
        ("loss output only", replace(base, loss="output")),
        ("block-wise", replace(base, mode="blockwise", on_policy_at=0.0)),
        flip_policy,
        (f"prompts {max(8, base.prompts // 8)}", replace(base, prompts=max(8, base.prompts // 8))),
        (f"steps {max(10, base.steps // 4)}", replace(base, steps=max(10, base.steps // 4))),
        ("on-policy, 3 rounds from 25%", replace(base, on_policy_at=0.25, on_policy_rounds=3)),
    ]


def _row(name: str, model, bf16: dict, seconds: float, items, cfg_eval, extra: dict) -> dict[str, Any]:
    from .eval.runner import evaluate, public
    from .inspect import size_report

    res = public(evaluate(model, items, reference=bf16["_images"], cfg=cfg_eval))
    size = size_report(model)
    from .toy.world import CATEGORIES

    cats = {c.value: res[c.value] for c in CATEGORIES if c.value in res}
    return {
        "row": name,
        "overall": res["overall"],
        "ratio_vs_bf16": res["overall"] / max(bf16["overall"], 1e-9),
        "min_category_ratio": min((v / bf16[k] for k, v in cats.items() if bf16[k] > 0), default=None),
        **{f"cat_{k}": v for k, v in cats.items()},
        "psnr_db": (res.get("fidelity") or {}).get("psnr_db"),
        "bytes": size["bytes"],
        "ratio_size": size["ratio"],
        "seconds": round(seconds, 1),
        **extra,
    }


def run_sweep(
    out: Path,
    base: CalibConfig,
    rows: list[str] | None = None,
    n_eval: int = 96,
    progress: bool = True,
    specs: list[tuple[str, CalibConfig | str]] | None = None,
) -> list[dict]:
    """Run the sweep (optionally only the named rows) and write JSON + markdown tables into `out`.

    `specs` replaces `default_rows(base)`: (name, config or naive init method) per row.
    """
    from .eval.runner import EvalConfig, evaluate, load_model, load_prompts
    from .quantize import quantize
    from .toy.world import prompts as world_prompts

    cfg_eval = EvalConfig()
    items = load_prompts("heldout", n_eval)
    bf16_pipe = load_model("toy")
    bf16 = evaluate(bf16_pipe, items, cfg=cfg_eval)
    results = [{"row": "bf16", "overall": bf16["overall"], "ratio_vs_bf16": 1.0, "seconds": 0.0}]
    from .calibrate.states import record_states

    calib_prompts = [p for p, _ in world_prompts("train", base.prompts, seed=base.seed)]
    recorded: dict[str, list] = {}  # teacher states, shared by rows that record the same trajectories
    for name, spec in specs if specs is not None else default_rows(base):
        if rows and name not in rows:
            continue
        t0 = time.perf_counter()
        pipe = load_model("toy")
        if isinstance(spec, str):
            model = quantize(pipe.transformer, QuantConfig(init=spec, source="toy"))
            extra = {"config": {"naive": spec}}
        else:
            ps = calib_prompts[: spec.prompts]
            key = json.dumps([spec.prompts, spec.seed, spec.traj_steps, spec.record_batch, spec.pipe_kwargs], sort_keys=True)
            if key not in recorded:
                recorded[key] = record_states(pipe, ps, spec, progress, spec.record_batch)
            model, stats = calibrate(pipe, ps, spec, source="toy", progress=progress, calls=recorded[key])
            extra = {"config": spec.to_dict(), "final_loss": stats["final_loss"]}
        results.append(_row(name, model, bf16, time.perf_counter() - t0, items, cfg_eval, extra))
        _write(out, results)
        if progress:
            print(f"{name}: overall {results[-1]['overall']:.3f} ({results[-1]['ratio_vs_bf16']:.3f} of bf16)")
    return results


def _write(out: Path, results: list[dict]) -> None:
    tmp = out / ".ablations.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out / "ablations.json")
    lines = ["| row | overall | ratio vs bf16 | worst category ratio | PSNR dB | MB | time s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        mb = f"{r['bytes'] / 1e6:.2f}" if "bytes" in r else ""
        worst = f"{r['min_category_ratio']:.3f}" if r.get("min_category_ratio") is not None else ""
        psnr = f"{r['psnr_db']:.1f}" if r.get("psnr_db") is not None else ""
        lines.append(f"| {r['row']} | {r['overall']:.3f} | {r['ratio_vs_bf16']:.3f} | {worst} | {psnr} | {mb} | {r['seconds']} |")
    (out / "ablations.md").write_text("\n".join(lines) + "\n")


def _ablate(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.resume:
        raise OutputExistsError(f"output path exists: {out} (use --resume to add rows to it)")
    out.mkdir(parents=True, exist_ok=True)
    pipe_kwargs, traj_steps = eval_settings("toy")
    base = CalibConfig(
        prompts=args.num_prompts, steps=args.steps, traj_steps=traj_steps or 8, pipe_kwargs=pipe_kwargs, checkpoint_every=0
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    results = run_sweep(out, base, args.rows, args.eval_prompts, progress=not args.json)
    print_result({"rows": results}, args.json, (out / "ablations.md").read_text())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    d = CalibConfig()
    p = sub.add_parser(
        "ablate",
        help="calibration ablation sweep on the toy world (JSON + markdown table)",
        description="Calibrate the bundled toy model with one setting changed per row (init, what is trained, "
        "loss, number of prompts and steps), plus naive rounding rows; score each on held-out prompts.",
    )
    p.add_argument("out", help="directory for ablations.json and ablations.md")
    p.add_argument("--num-prompts", type=int, default=d.prompts, help="calibration prompts of the default row")
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps of the default row")
    p.add_argument("--eval-prompts", type=int, default=96, help="held-out prompts scored per row")
    p.add_argument("--rows", nargs="*", help="only these rows (names as in the table)")
    p.add_argument("--resume", action="store_true", help="allow an existing OUT (rows are recomputed)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_ablate)
