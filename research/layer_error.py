"""Output error of each ternarised Linear of the toy on its real inputs, for formats the trunk could adopt.

What: records the full-precision `toy`'s sampling states on training prompts, collects the inputs
X of every Linear the FLUX policy ternarises, and reports ||X Q^T - X W^T||^2 / ||X W^T||^2 for
Q = twn ternary codes with one scale per row (the trunk format), one scale per group of 32 inputs,
and per-row twn after an input-side rotation (a random-sign Hadamard and a random orthogonal
matrix: W x = (W R)(R^T x), as QuIP#/QuaRot do). These are initial errors before calibration;
a lever that does not lower them much will not add many dB after it. Prints a table, writes JSON.

    python research/layer_error.py --out bench/results/layer-error.json
"""

from __future__ import annotations

import argparse
import math

import torch

from bitflux.calibrate import CalibConfig
from bitflux.calibrate.command import eval_settings
from bitflux.calibrate.states import batch_calls, record_states
from bitflux.eval.runner import load_model, load_prompts
from bitflux.policies import get_policy
from bitflux.ternary import dequantize, ternarize
from common import RESULTS, write_json

VARIANTS = ("row", "group32", "hadamard", "orthogonal")


def _ternary(w: torch.Tensor) -> torch.Tensor:
    return dequantize(*ternarize(w, "twn"))


def _hadamard(k: int) -> torch.Tensor | None:
    if k & (k - 1):
        return None
    h = torch.ones(1, 1)
    while h.shape[0] < k:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(k)


@torch.no_grad()
def measure(n_prompts: int, max_rows: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per Linear: the relative output error of each variant (None where the rotation needs K = 2^k)."""
    pipe = load_model("toy")
    pipe.set_progress_bar_config(disable=True)
    kwargs, steps = eval_settings("toy")
    calls = record_states(pipe, [p.text for p in load_prompts("train", n_prompts)], CalibConfig(pipe_kwargs=kwargs, traj_steps=steps), False)
    model = pipe.transformer.float().eval()
    names, _ = get_policy("flux").select(model)
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_m, args, _out) -> None:  # returns None: the module's output is left as it is
            inputs.setdefault(name, args[0].reshape(-1, args[0].shape[-1])[:max_rows].clone())

        return hook

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    model(**batch_calls(calls, list(range(0, len(calls), max(1, len(calls) // 64)))[:64]), return_dict=False)
    for h in handles:
        h.remove()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        w, x = model.get_submodule(name).weight.float(), inputs[name]
        y, k = x @ w.T, w.shape[1]
        rel = lambda approx: round(float((approx - y).square().sum() / y.square().sum()), 5)  # noqa: E731
        row: dict[str, float | None] = {"row": rel(x @ _ternary(w).T)}
        row["group32"] = rel(x @ torch.cat([_ternary(w[:, i : i + 32]) for i in range(0, k, 32)], 1).T)
        h = _hadamard(k)
        if h is not None:
            r = torch.diag(torch.randint(0, 2, (k,), generator=g).float() * 2 - 1) @ h
            row["hadamard"] = rel((x @ r) @ _ternary(w @ r).T)
        else:
            row["hadamard"] = None
        q, _ = torch.linalg.qr(torch.randn(k, k, generator=g))
        row["orthogonal"] = rel((x @ q) @ _ternary(w @ q).T)
        out[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16, help="training prompts whose states feed the layers")
    ap.add_argument("--rows", type=int, default=4096, help="input rows kept per layer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "layer-error.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure(args.n, args.rows)
    print(f"{'layer':<46}" + "".join(f"{v:>11}" for v in VARIANTS))
    for name, r in rows.items():
        print(f"{name:<46}" + "".join(f"{r[v]:11.4f}" if r[v] is not None else f"{'-':>11}" for v in VARIANTS))
    both = [r for r in rows.values() if r["hadamard"] is not None]
    mean = {v: sum(r[v] for r in both) / len(both) for v in VARIANTS}
    print(f"{'mean over the K = 2^k layers':<46}" + "".join(f"{mean[v]:11.4f}" for v in VARIANTS))
    out = write_json({"n": args.n, "rows": args.rows, "mean_pow2": mean, "layers": rows}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
