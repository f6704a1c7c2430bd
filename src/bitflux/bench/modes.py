"""`bitflux bench --parts modes`: the default activation mode against each mode, on the bundled toy.

For `toy-1.58bit` with activations `auto` (the default), `bf16`, `int8` and `fp8`, and for the
full-precision `toy` transformer as the baseline measured in the same run:

* speed: one transformer forward on the inputs the toy pipeline feeds it (batch 1, captured from a
  real generation), modes round-robin, best of `--iters`; reported as ms and as a ratio to the
  full-precision forward;
* quality: `bitflux eval`'s scores (`eval.runner.evaluate`, held-out prompts) and the ratio of
  `overall` to the full-precision toy's, at the same seeds.

What `auto` resolved to on this machine is recorded; if its output equals (torch.equal) that
mode's, its quality row is that mode's (same numerics, so the same images) instead of a rerun.
Prints a table; writes bench/results/modes-<time>.json (`--json` prints the object instead).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

from .common import default_out, result_path

MODES = ("auto", "bf16", "int8", "fp8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", default="modes", help="modes (this benchmark)")
    parser.add_argument("--iters", type=int, default=20, help="timed forwards per mode (best kept; default 20)")
    parser.add_argument("--n", type=int, default=96, help="eval: held-out prompts (default 96, as `bitflux eval`)")
    parser.add_argument("--seeds", type=int, default=4, help="eval: images per prompt (default 4, as `bitflux eval`)")
    parser.add_argument("--no-eval", action="store_true", help="speed only")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(default_out()), help="results directory")
    parser.add_argument("--json", action="store_true", help="print the JSON object instead of the table")


def _captured_inputs(pipe) -> dict[str, Any]:  # noqa: ANN001
    """The kwargs of the transformer's first call in a one-prompt toy generation."""
    from ..toy.world import IMAGE_SIZE, TEXT_LENGTH

    seen: dict[str, Any] = {}

    def hook(_mod, args, kwargs):  # noqa: ANN001, ANN202
        if not seen:
            seen.update({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe("a red circle left of a blue square", num_inference_steps=1, height=IMAGE_SIZE, width=IMAGE_SIZE,
             max_sequence_length=TEXT_LENGTH, generator=torch.Generator().manual_seed(0), output_type="np")
    finally:
        handle.remove()
    seen["return_dict"] = False
    return seen


def _best_ms(fns: dict[str, Any], iters: int) -> dict[str, float]:
    best = {k: float("inf") for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()  # warm-up (the AVX2 kernel builds on first use)
        for _ in range(iters):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t0)
    return {k: round(v * 1e3, 3) for k, v in best.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from .. import set_activations
    from ..eval.runner import evaluate, load_model, load_prompts, public
    from ..kernels import resolve_act
    from ..config import PackFormat, ActPrecision
    from ..pipeline import load_transformer, resolve

    if args.threads:
        torch.set_num_threads(args.threads)
    toy_pipe = load_model("toy")
    toy_pipe.set_progress_bar_config(disable=True)
    inputs = _captured_inputs(toy_pipe)
    tern = load_transformer(resolve("toy-1.58bit"))
    stored = tern.bitflux_config.activations.value
    x = inputs["hidden_states"]
    resolved = resolve_act(x, PackFormat(tern.bitflux_config.format), ActPrecision.AUTO).value

    def forward_fn(model, mode=None):  # noqa: ANN001, ANN202
        def f() -> torch.Tensor:
            if mode is not None:
                set_activations(model, mode)
            return model(**inputs)[0]
        return f

    fns = {"full precision": forward_fn(toy_pipe.transformer)} | {m: forward_fn(tern, m) for m in MODES}
    ms = _best_ms(fns, args.iters)
    with torch.no_grad():
        outs = {m: fns[m]() for m in MODES}
    auto_same = torch.equal(outs["auto"], outs[resolved])
    rows: dict[str, dict[str, Any]] = {}
    for name in fns:
        rows[name] = {"forward_ms": ms[name], "speed_vs_full_precision": round(ms["full precision"] / ms[name], 3)}
    result: dict[str, Any] = {
        "bench": "modes", "model": "toy-1.58bit", "stored_activations": stored, "auto_resolves_to": resolved,
        "auto_output_equals_resolved": auto_same, "threads": torch.get_num_threads(), "iters": args.iters,
        "loadavg_start": os.getloadavg(), "torch": torch.__version__, "tokens": int(x.shape[1]), "rows": rows,
    }
    if not args.no_eval:
        from ..toy.world import DEFAULT_WORLD

        items = load_prompts("heldout", args.n, 0, DEFAULT_WORLD)
        full = evaluate(toy_pipe, items, args.seeds)
        rows["full precision"].update(overall=full["overall"], quality_vs_full_precision=1.0)
        q_pipe = load_model("toy-1.58bit")
        q_pipe.set_progress_bar_config(disable=True)
        for mode in sorted(MODES, key=lambda m: m == "auto"):  # auto last: it may reuse its mode's row
            if mode == "auto" and auto_same and resolved in MODES:
                rows["auto"].update({k: v for k, v in rows[resolved].items() if k not in ("forward_ms", "speed_vs_full_precision")})
                rows["auto"]["quality_from"] = resolved
                continue
            set_activations(q_pipe.transformer, mode)
            res = evaluate(q_pipe, items, args.seeds, reference=full["_images"])
            rows[mode].update(overall=res["overall"], quality_vs_full_precision=round(res["overall"] / full["overall"], 4),
                              psnr_db=round(res["fidelity"]["psnr_db"], 2), eval=public(res))
        result.update(eval_prompts=args.n, eval_seeds=args.seeds)
    result["loadavg_end"] = os.getloadavg()
    return result


def table(result: dict[str, Any]) -> str:
    lines = [f"toy-1.58bit, activations: default 'auto' -> {result['auto_resolves_to']} here "
             f"(stored in the checkpoint: {result['stored_activations']}); {result['threads']} threads"]
    lines.append(f"{'mode':<16}{'forward ms':>11}{'speed vs fp':>13}{'eval overall':>14}{'vs fp':>8}")
    for name, r in result["rows"].items():
        q = f"{r['overall']:>14.3f}{r['quality_vs_full_precision']:>7.3f}x" if "overall" in r else ""
        label = name + (" (default)" if name == "auto" else "")
        lines.append(f"{label:<16}{r['forward_ms']:>11.2f}{r['speed_vs_full_precision']:>12.2f}x{q}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = result_path(out, "modes")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table(result))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m bitflux.bench.modes")
    add_arguments(p)
    raise SystemExit(main(p.parse_args()))
