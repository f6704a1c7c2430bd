"""`bitflux eval`: GenEval-style scores of a toy-world model, and fidelity to the full-precision toy."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import argtypes
from ..errors import ModelError, OutputExistsError
from ..toy.world import CATEGORIES
from .runner import EvalConfig

_HELP = """Generate images for toy-world prompts with MODEL and score them with the rule-based
GenEval-style scorer (all-or-nothing per image). Prints per-category accuracy and `overall`
(mean over categories), plus fidelity to MODEL's own full-precision teacher at the same seeds:
mean PSNR of the images and the share of per-prompt verdicts that agree.

MODEL is `toy` (bundled), `toy-1.58bit` (bundled, if installed), a FluxPipeline directory, or
a bitflux quantised transformer directory (paired with the pipeline it was quantised from, else
the bundled toy). The teacher is that source pipeline (the bundled `toy` for `toy-1.58bit`); a
model trained on another toy world (`bitflux toy train --world`) is scored in that world."""


def _fmt(res: dict, label: str) -> str:
    lines = [f"{label}: overall {res['overall']:.3f}  ({res['n_prompts']} prompts x {res['seeds']} seeds, {res['steps']} steps)"]
    lines += [f"  {c.value:<14} {res[c.value]:.3f}" for c in CATEGORIES if c.value in res]
    fid = res.get("fidelity")
    if fid:
        lines.append(f"  fidelity vs {res.get('reference', 'toy')}: PSNR {fid['psnr_db']:.2f} dB, verdict agreement {fid['verdict_agreement']:.3f}")
    if "ratio" in res:
        lo, hi = res["ratio_ci95"]
        lines.append(f"  overall vs {res.get('reference', 'toy')}: {res['ratio']:.3f}x (95% bootstrap over prompts: {lo:.3f}-{hi:.3f})")
    lines.append(f"  generation took {res['generate_seconds']:.1f}s")
    if res.get("grid"):
        lines.append(f"  grid: {res['grid']}")
    return "\n".join(lines)


def _check_model(model: str) -> None:
    """MODEL must be a FLUX transformer (or pipeline) whose widths fit the toy pipeline's encoders/VAE."""
    from ..commands import check_model_dir
    from ..pipeline import bundled, resolve
    from ..safeio import read_json_object
    from ..validate import check_is_transformer, check_pipeline_fit

    check_model_dir(model)  # a broken config.json is named before anything classifies MODEL by it
    ref = resolve(model, fallback="toy")
    pipeline = bundled(ref.pipeline) or Path(ref.pipeline)
    config_path = Path(ref.transformer) / "config.json" if ref.transformer else pipeline / "transformer" / "config.json"
    if not config_path.is_file():
        return  # a hub id: nothing local to check
    config = read_json_object(config_path)
    check_is_transformer(config, model)
    check_pipeline_fit(config, pipeline, model)


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..cli import print_result
    from ..pipeline import resolve
    from ..toy import bundled_path
    from .grid import make_grid, pick_rows, save_image
    from .runner import evaluate, load_model, load_prompts, public, world_for

    if args.threads:
        torch.set_num_threads(args.threads)
    _check_model(args.model)
    if args.grid and Path(args.grid).exists():
        raise OutputExistsError(f"output path exists: {args.grid} (bitflux never overwrites)")
    if args.grid and not Path(args.grid).resolve().parent.is_dir():
        raise ModelError(f"output directory does not exist: {Path(args.grid).parent}")
    world = world_for(args.model)  # the model's toy world: its grammar, split and palette
    items = load_prompts(args.prompts, args.n, args.prompt_seed, world)
    cfg = EvalConfig(steps=args.steps, cfg_scale=args.cfg_scale)
    pipe = load_model(args.model, naive=args.naive, verify=not args.no_verify)
    if args.activations or args.backend:
        from ..quantize import set_activations, set_backend

        if args.activations:
            set_activations(pipe.transformer, args.activations)
        if args.backend:
            set_backend(pipe.transformer, args.backend)
    # the reference is the model's own full-precision pipeline: a quantised transformer's recorded
    # source (else the bundled toy), a pipeline directory itself; so a toy trained at another width
    # or in another world is compared with its own teacher, never with the bundled toy
    ref = resolve(args.model, fallback="toy")
    try:
        toy_dir: Path | None = Path(bundled_path("toy")).resolve()
    except ModelError:
        toy_dir = None
    teacher = _teacher(ref, toy_dir)
    reference = "toy" if teacher is not None and teacher.resolve() == toy_dir else str(teacher)
    is_toy = ref.transformer is None and not args.naive  # the reference itself
    if teacher is None and not args.no_fidelity:
        raise ModelError(f"{args.model}: no full-precision pipeline to compare with (install `toy`, or use --no-fidelity)")
    res = evaluate(pipe, items, args.seeds, cfg, progress=not args.json)
    if not args.no_fidelity:
        if is_toy:  # the reference itself: identical by construction
            res["fidelity"] = {"psnr_db": 100.0, "verdict_agreement": 1.0}
        else:
            ref_res = evaluate(load_model(str(teacher)), items, args.seeds, cfg, progress=not args.json)
            from .runner import fidelity, ratio_interval

            res["fidelity"] = fidelity(res["_images"], ref_res["_images"], res["_verdicts"], ref_res["_verdicts"])
            res["reference_overall"] = ref_res["overall"]
            res.update(ratio_interval(res["_verdicts"], ref_res["_verdicts"], items))
            res["_reference"] = ref_res["_images"]
    label = args.model + (" (naive absmean ternary)" if args.naive else "")
    if args.grid:
        rows = pick_rows([it.category.value for it in items])
        cols = {}
        if res.get("_reference") is not None:
            cols[f"{reference} (full precision)"] = res["_reference"][0][rows]
        cols[label] = res["_images"][0][rows]
        save_image(make_grid(cols, [items[i].text for i in rows]), args.grid)
        res["grid"] = str(args.grid)
    out = public(res)
    out = {"model": args.model, "naive": args.naive, "prompts": args.prompts, "world": world.name, "reference": reference, **out}
    print_result(out, args.json, _fmt(out, label))
    return 0


def _teacher(ref, toy_dir: Path | None) -> Path | None:
    """The full-precision pipeline MODEL is compared with (see `run`); None if unknown."""
    from ..pipeline import bundled
    from ..safeio import read_json_object

    if ref.transformer is None:
        return Path(ref.pipeline)
    src = read_json_object(Path(ref.transformer) / "config.json").get("quantization_config", {}).get("source") or ""
    path = bundled(src) or Path(src)
    return path if src and (path / "model_index.json").is_file() else toy_dir


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `eval` sub-command."""
    p = sub.add_parser(
        "eval",
        help="score a toy-world model GenEval-style (per category + overall) and its fidelity to toy",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = EvalConfig()
    p.add_argument("model", metavar="MODEL", help="toy | toy-1.58bit | pipeline dir | quantised transformer dir")
    p.add_argument(
        "--prompts",
        default="heldout",
        help="'heldout' (compositions never trained on; default), 'train', or a text file with one prompt a line",
    )
    p.add_argument("--n", type=argtypes.positive_int, default=96, help="prompts drawn for train/heldout, round-robin over categories (default 96)")
    p.add_argument("--prompt-seed", type=argtypes.seed, default=0, help="seed of the drawn prompt list (default 0)")
    p.add_argument("--seeds", type=argtypes.positive_int, default=4, help="images per prompt (default 4: 64 images per category)")
    p.add_argument("--steps", type=argtypes.positive_int, default=d.steps, help=f"Euler sampling steps (default {d.steps})")
    p.add_argument(
        "--cfg-scale",
        type=argtypes.scale,
        default=d.cfg_scale,
        help=f"real classifier-free guidance scale, FluxPipeline's true_cfg_scale (default {d.cfg_scale}; 1 disables)",
    )
    p.add_argument("--activations", choices=["auto", "bf16", "int8", "fp8"], help="override the ternary layers' activation precision")
    p.add_argument("--backend", choices=["auto", "reference", "triton", "cpu"], help="force a kernel backend")
    p.add_argument("--naive", action="store_true", help="ternarise the model in memory by plain absmean rounding first")
    p.add_argument("--grid", metavar="PNG", help="save a grid: toy (full precision) vs MODEL on a few prompts")
    p.add_argument("--no-fidelity", action="store_true", help="skip generating the toy reference (halves the time)")
    p.add_argument("--no-verify", action="store_true", help="skip the check of the checkpoint's recorded file hashes")
    p.add_argument("--threads", type=argtypes.nonneg_int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object (overall, one key per category, fidelity)")
    p.set_defaults(func=_run)
