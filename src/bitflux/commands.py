"""The trunk's sub-commands: `quantize`, `generate`, `inspect`."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from . import argtypes
from .cli import print_result
from .config import ActPrecision, Backend, InitMethod, PackFormat, QuantConfig
from .errors import ModelError, OutputExistsError
from .archs import ARCHS
from .inspect import inspect_arch, inspect_path, markdown_table

_DTYPES = {"keep": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _torch_dtype(name: str):
    import torch

    return None if _DTYPES[name] is None else getattr(torch, _DTYPES[name])


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def _size_text(r: dict) -> str:
    return (
        f"{r['model']}: {r['params']:,} params, {r['ternary_fraction']:.4%} ternary ({r['format']}), "
        f"{_fmt_bytes(r['bytes'])} vs {_fmt_bytes(r['bf16_bytes'])} bf16 = {r['ratio']:.3f}x smaller"
    )


# ---------------------------------------------------------------------------------------- quantize
def _quantize(args: argparse.Namespace) -> int:
    from .atomic import remove_stale_temps
    from .checkpoint import save
    from .inspect import size_report
    from .sources import quantize_from

    out = Path(args.out)
    if out.exists():
        raise OutputExistsError(f"output path exists: {args.out} (bitflux never overwrites)")
    if not out.parent.is_dir():
        raise ModelError(f"output directory does not exist: {out.parent}")
    remove_stale_temps(out)
    t0 = time.perf_counter()
    cfg = QuantConfig(format=args.format, init=args.init, activations=args.activations)
    model = quantize_from(args.src, cfg, torch_dtype=_torch_dtype(args.dtype), device=args.device, single_file_config=args.config)
    save(model, out, max_shard_bytes=args.max_shard_mb * 1000**2)
    report = {"out": args.out, **size_report(model), "seconds": round(time.perf_counter() - t0, 2)}
    print_result(report, args.json, f"wrote {args.out}\n" + _size_text({**report, "model": args.src}))
    return 0


# ---------------------------------------------------------------------------------------- generate
def _generate(args: argparse.Namespace) -> int:
    import torch

    from .eval.grid import save_image
    from .pipeline import load_pipeline, load_transformer, resolve

    out = Path(args.output)
    if out.exists():
        raise OutputExistsError(f"output path exists: {out} (bitflux never overwrites)")
    if not out.parent.exists():
        raise ModelError(f"output directory does not exist: {out.parent}")
    check_model_dir(args.model)
    ref = resolve(args.model, args.base)
    _check_fit(ref, args.model)
    patch = _patch_pixels(ref.pipeline)
    argtypes.check_multiple("height", args.height, patch)
    argtypes.check_multiple("width", args.width, patch)
    transformer = load_transformer(ref, activations=args.activations, backend=args.backend, verify=not args.no_verify)
    pipe = load_pipeline(ref, transformer)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    kwargs = {k: getattr(args, k) for k in ("height", "width", "guidance_scale") if getattr(args, k) is not None}
    kwargs = {**_pipeline_defaults(ref.pipeline), **kwargs}
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else kwargs.pop("cfg_scale", None)
    kwargs.pop("cfg_scale", None)
    if cfg_scale is not None and cfg_scale > 1:  # real classifier-free guidance, empty negative prompt
        kwargs.update(true_cfg_scale=cfg_scale, negative_prompt="")
    image = pipe(
        args.prompt,
        num_inference_steps=args.steps,
        generator=torch.Generator().manual_seed(args.seed),
        callback_on_step_end=_refuse_non_finite,
        **kwargs,
    ).images[0]
    seconds = time.perf_counter() - t0
    save_image(image, out)  # temp name + rename, never overwrites
    report = {
        "output": str(out),
        "pipeline": ref.pipeline,
        "transformer": ref.transformer or "full precision",
        "size": list(image.size),
        "seconds": round(seconds, 2),
    }
    print_result(report, args.json, f"wrote {out} ({image.size[0]}x{image.size[1]}) in {seconds:.1f}s")
    return 0


def check_model_dir(model: str) -> None:
    """A MODEL folder's config.json must be readable JSON before anything classifies it by it."""
    from .pipeline import bundled
    from .safeio import read_json_object

    path = bundled(model) or Path(model)
    if (path / "model_index.json").exists():
        read_json_object(path / "model_index.json")
        path = path / "transformer"
    if os.path.lexists(path / "config.json"):
        read_json_object(path / "config.json")


def _check_fit(ref, model: str) -> None:
    """A separate transformer must be a FLUX transformer whose widths fit the pipeline's encoders/VAE."""
    from .pipeline import bundled
    from .safeio import read_json_object
    from .validate import check_is_transformer, check_pipeline_fit

    if ref.transformer is None:
        return
    config = read_json_object(Path(ref.transformer) / "config.json")
    check_is_transformer(config, model)
    check_pipeline_fit(config, bundled(ref.pipeline) or Path(ref.pipeline), model)


def _patch_pixels(pipeline: str) -> int:
    """Pixels per transformer token side: VAE downscale x FluxPipeline's 2x2 latent packing (FLUX: 16).

    Read from the VAE's config as FluxPipeline computes it (2 ** (len(block_out_channels) - 1)).
    """
    from .pipeline import bundled
    from .safeio import read_json_object

    vae = (bundled(pipeline) or Path(pipeline)) / "vae" / "config.json"
    blocks = read_json_object(vae).get("block_out_channels") if vae.is_file() else None
    return 2 ** (len(blocks) - 1) * 2 if isinstance(blocks, list) and blocks else 16


def _refuse_non_finite(pipe, step: int, timestep, kwargs: dict) -> dict:
    """Stop at the first denoising step whose latents hold NaN/inf (else the PNG is silently black)."""
    import torch

    latents = kwargs.get("latents")
    if latents is not None and not bool(torch.isfinite(latents).all()):
        raise ModelError(f"the model produced non-finite values at step {step + 1}: its weights are damaged or out of range")
    return {}


def _pipeline_defaults(pipeline: str) -> dict:
    """Generation defaults a toy pipeline records (image size, guidance, text length), else none."""
    info = Path(pipeline) / "bitflux_toy.json"
    if not info.is_file():
        return {}
    from .safeio import read_json_object as read_json
    from .toy.world import TEXT_LENGTH

    rec = read_json(info)
    size = rec.get("image_size")
    if not size:
        return {}
    return {"height": size, "width": size, "cfg_scale": 3.0, "max_sequence_length": rec.get("max_sequence_length", TEXT_LENGTH)}


# ----------------------------------------------------------------------------------------- inspect
def _inspect(args: argparse.Namespace) -> int:
    if (args.path is None) == (args.arch is None):
        raise ModelError("give either PATH or --arch NAME")
    qconfig = QuantConfig(format=args.format, policy=args.policy)
    if args.arch == "all":  # the README table: every known architecture
        reports = [inspect_arch(a, qconfig) for a in ARCHS]
        print_result({"architectures": reports}, args.json, markdown_table(reports))
        return 0
    if args.arch is not None:
        report = inspect_arch(args.arch, qconfig)
    else:
        from .pipeline import bundled

        path = bundled(args.path) or Path(args.path)
        if not path.is_dir():
            raise ModelError(f"no such model directory: {args.path}")
        report = inspect_path(path, qconfig)
    text = _size_text(report)
    if "bytes_base3" in report:  # --arch reports both packing formats
        text += "".join(f"\n  {f}: {_fmt_bytes(report[f'bytes_{f}'])} = {report[f'ratio_{f}']:.3f}x" for f in ("2bit", "base3"))
    print_result(report, args.json, text)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    choices = lambda enum: [e.value for e in enum]  # noqa: E731

    p = sub.add_parser(
        "quantize",
        help="ternarise a diffusers transformer while loading it and save it packed",
        description="Ternarise the block Linears of a diffusers transformer (FLUX and other DiTs; no data "
        "needed) while it loads, shard by shard, and write a bitflux checkpoint directory: config.json "
        "+ packed safetensors. The full-precision model is never held in memory.",
    )
    p.add_argument("src", help="pipeline dir, transformer dir, single .safetensors file (BFL layout; rewritten shard by shard into TMPDIR, which needs the file's size free), bundled name (toy) or hub id")
    p.add_argument("out", help="new output directory (must not exist)")
    p.add_argument("--format", default="2bit", choices=choices(PackFormat), help="packing format (default 2bit)")
    p.add_argument("--init", default="absmean", choices=choices(InitMethod), help="ternarisation (default absmean)")
    p.add_argument("--activations", default="auto", choices=choices(ActPrecision), help="activation precision (auto: int8 on CPUs with the int8 kernels, bf16 elsewhere; chosen at run time)")
    p.add_argument("--dtype", default="keep", choices=list(_DTYPES), help="dtype of kept layers (default: as stored)")
    p.add_argument("--device", default=None, help="where to ternarise as tensors stream in, e.g. cuda (default cpu)")
    p.add_argument("--config", default=None, help="single-file SRC only: directory (or hub id) holding its config.json")
    p.add_argument("--max-shard-mb", type=argtypes.positive_int, default=5000, help="largest output shard in MB (default 5000)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_quantize)

    p = sub.add_parser(
        "generate",
        help="generate an image with a (quantised) FLUX pipeline",
        description="Generate one image. MODEL is a bundled name (toy, toy-1.58bit), a pipeline "
        "directory, or a bitflux transformer directory (paired with --base or its recorded source).",
    )
    p.add_argument("model", help="bundled name, pipeline directory or quantised transformer directory")
    p.add_argument("prompt", help="text prompt")
    p.add_argument("-o", "--output", required=True, help="image file to write (must not exist)")
    p.add_argument("--base", help="pipeline (dir or hub id) giving text encoders and VAE for a bare transformer")
    p.add_argument("--steps", type=argtypes.positive_int, default=20, help="denoising steps, >= 1 (default 20)")
    p.add_argument("--seed", type=argtypes.seed, default=0, help="random seed, >= 0 (default 0)")
    p.add_argument("--height", type=argtypes.image_side, help="image height, a multiple of 16 for FLUX (default: the pipeline's)")
    p.add_argument("--width", type=argtypes.image_side, help="image width, a multiple of 16 for FLUX (default: the pipeline's)")
    p.add_argument("--guidance-scale", dest="guidance_scale", type=argtypes.scale, help="guidance (default: pipeline's)")
    p.add_argument("--cfg-scale", dest="cfg_scale", type=argtypes.scale, help="real CFG scale with an empty negative prompt (toy: 3)")
    p.add_argument("--activations", choices=choices(ActPrecision), help="override activation precision")
    p.add_argument("--backend", choices=choices(Backend), help="force a kernel backend (default auto)")
    p.add_argument("--threads", type=argtypes.positive_int, help="CPU threads for torch")
    p.add_argument("--no-verify", action="store_true", help="skip the check of the checkpoint's recorded file hashes")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_generate)

    p = sub.add_parser(
        "inspect",
        help="parameter counts, ternary fraction and bytes vs bf16",
        description="Size report of a model directory (as stored if quantised, else as it would be) or "
        "of a named architecture built on the meta device (no download).",
    )
    p.add_argument("path", nargs="?", help="model/pipeline directory or bundled name")
    p.add_argument("--arch", choices=[*ARCHS, "all"], help="a known full-size architecture instead of PATH ('all': a table)")
    p.add_argument("--policy", default="auto", help="module policy (default auto: the one for the model's class, else generic)")
    p.add_argument("--format", default="2bit", choices=choices(PackFormat), help="format for unquantised models")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_inspect)
