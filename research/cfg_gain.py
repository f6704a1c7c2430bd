"""How much of the teacher's classifier-free-guidance signal a ternary student keeps, per timestep.

What: records the full-precision `toy`'s sampling trajectories on toy-world prompts (CFG on, as
`bitflux eval` samples), runs teacher and student on the same recorded states and compares, for
each (cond, uncond) pair, the velocities c, u, the CFG difference d = c - u (what the prompt adds)
and the guided velocity v = u + g d the sampler uses. `gain` = <d_s, d_t> / |d_t|^2 (1 = the
student applies the teacher's guidance at full strength); nmse(x) = |x_s - x_t|^2 / |x_t|^2.
Prints a table per timestep and writes JSON.

    python research/cfg_gain.py toy-1.58bit --prompts heldout --out bench/results/cfg-gain-bundled.json
"""

from __future__ import annotations

import argparse

import torch

from bitflux.calibrate import CalibConfig
from bitflux.calibrate.command import eval_settings
from bitflux.calibrate.states import batch_calls, cfg_pairs, record_states
from bitflux.eval.runner import load_model, load_prompts
from common import RESULTS, write_json

COLUMNS = ("gain", "nmse_d", "nmse_c", "nmse_u", "nmse_v", "d_share")


def _ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.flatten(1).square().sum(1) / b.flatten(1).square().sum(1).clamp_min(1e-12)


@torch.no_grad()
def measure(model: str, split: str, n: int) -> dict[float, dict[str, float]]:
    """Per-timestep means of COLUMNS over the (cond, uncond) pairs of `n` prompts' teacher trajectories."""
    teacher_pipe, student = load_model("toy"), load_model(model).transformer.eval()
    kwargs, steps = eval_settings("toy")
    config = CalibConfig(pipe_kwargs=kwargs, traj_steps=steps)
    g = float(kwargs.get("true_cfg_scale", 1.0))  # the real-CFG scale the trajectories use (1: no guidance)
    teacher_pipe.set_progress_bar_config(disable=True)
    calls = record_states(teacher_pipe, [it.text for it in load_prompts(split, n)], config, progress=False)
    pairs, teacher = cfg_pairs(calls), teacher_pipe.transformer.float().eval()
    sums: dict[float, dict[str, float]] = {}
    counts: dict[float, int] = {}
    for a in range(0, len(pairs), 32):
        part = pairs[a : a + 32]
        kw = batch_calls(calls, [c for c, _ in part] + [u for _, u in part])
        t_out, s_out = (m(**kw, return_dict=False)[0].float() for m in (teacher, student))
        h = len(part)
        (tc, tu), (sc, su) = (t_out[:h], t_out[h:]), (s_out[:h], s_out[h:])
        dt, ds = tc - tu, sc - su
        cols = {
            "gain": (ds * dt).flatten(1).sum(1) / dt.flatten(1).square().sum(1).clamp_min(1e-12),
            "nmse_d": _ratio(ds - dt, dt),
            "nmse_c": _ratio(sc - tc, tc),
            "nmse_u": _ratio(su - tu, tu),
            "nmse_v": _ratio((su + g * ds) - (tu + g * dt), tu + g * dt),
            "d_share": _ratio(dt, tc),
        }
        for j in range(h):
            t = round(float(kw["timestep"][j]), 3)
            row = sums.setdefault(t, dict.fromkeys(COLUMNS, 0.0))
            for k in COLUMNS:
                row[k] += float(cols[k][j])
            counts[t] = counts.get(t, 0) + 1
    return {t: {k: v / counts[t] for k, v in row.items()} for t, row in sorted(sums.items(), reverse=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="student: toy-1.58bit or a quantised transformer directory")
    ap.add_argument("--prompts", default="heldout", choices=["heldout", "train"])
    ap.add_argument("--n", type=int, default=48, help="prompts (one trajectory each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "cfg-gain.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure(args.model, args.prompts, args.n)
    print("t      " + "  ".join(f"{c:>8}" for c in COLUMNS))
    for t, row in rows.items():
        print(f"{t:.3f}  " + "  ".join(f"{row[c]:8.4f}" for c in COLUMNS))
    mean = {c: sum(r[c] for r in rows.values()) / len(rows) for c in COLUMNS}
    print("mean   " + "  ".join(f"{mean[c]:8.4f}" for c in COLUMNS))
    doc = {"model": args.model, "prompts": args.prompts, "n": args.n, "mean": mean, "per_timestep": {str(t): r for t, r in rows.items()}}
    out = write_json(doc, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
