"""`bitflux calibrate SRC OUT --prompts FILE|toy`: data-free calibration from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli import print_result
from ..config import InitMethod, PackFormat
from ..errors import BitfluxError, ModelError, OutputExistsError
from .api import calibrate, finish_work_dir
from . import distributed
from .checkpoint import WorkDir
from .config import CalibConfig, LossKind, Mode, TrainWhat


def read_prompts(spec: str, n: int, seed: int, pipeline: str | None = None) -> list[str]:
    """Prompts from a file (one per line) or `toy` (the training split of the toy world `pipeline` was trained on)."""
    if spec == "toy":
        from ..toy.variants import world_of
        from ..toy.world import DEFAULT_WORLD, prompts

        world = world_of(pipeline) if pipeline and Path(pipeline).is_dir() else DEFAULT_WORLD
        return [p for p, _ in prompts("train", n, seed=seed, world=world)]
    path = Path(spec)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise BitfluxError(f"prompt file not found: {spec}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BitfluxError(f"cannot read prompt file {spec}: {e}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise BitfluxError(f"prompt file is empty: {spec}")
    return prompts


def eval_settings(src: str) -> tuple[dict, int | None]:
    """(pipeline kwargs, denoising steps) of `bitflux eval` for bundled toy models, else ({}, None).

    Teacher trajectories should visit the states the model will see when it is used and scored.
    """
    from ..toy.variants import INFO_FILE

    if not src.startswith("toy") and not (Path(src) / INFO_FILE).is_file():  # bundled or `bitflux toy train` output
        return {}, None
    from ..eval.runner import EvalConfig

    e = EvalConfig()
    kwargs = dict(height=e.size, width=e.size, max_sequence_length=e.max_sequence_length)
    if e.cfg_scale > 1:
        kwargs.update(true_cfg_scale=e.cfg_scale, negative_prompt="")
    return kwargs, e.steps


def _finished(out: Path, config: CalibConfig) -> dict | None:
    """The stats of a result a killed run of this config saved at `out` before removing its work dir."""
    try:
        stats = json.loads((out / "calibration.json").read_text())
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) and stats.get("config") == config.to_dict() else None


def _resolution(args: argparse.Namespace, pipe_kwargs: dict) -> tuple[int, int]:
    """(height, width): the options, else the toy's eval size, else FLUX's 1024; always printed."""
    default = pipe_kwargs.get("height", 1024), pipe_kwargs.get("width", 1024)
    h, w = args.height or default[0], args.width or default[1]
    if h % 16 or w % 16 or h <= 0 or w <= 0:
        raise BitfluxError(f"--height/--width must be positive multiples of 16, got {h}x{w}")
    return h, w


def _calibrate(args: argparse.Namespace) -> int:
    import sys

    import torch

    from ..checkpoint import save
    from ..inspect import size_report
    from .resolve import resolve_source

    out = Path(args.out)
    work = out.parent / f"{out.name}.partial"
    source = resolve_source(args.src, args.base)
    pipe_kwargs, traj_steps = eval_settings(args.src if args.src.startswith("toy") or not args.base else args.base)
    height, width = _resolution(args, pipe_kwargs)
    pipe_kwargs.update(height=height, width=width)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise BitfluxError(f"--device {args.device}: not a torch device") from None
    config = CalibConfig(
        init=args.init,
        train=args.train,
        loss=args.loss,
        format=args.format,
        prompts=args.num_prompts,
        traj_steps=args.traj_steps or traj_steps or CalibConfig().traj_steps,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        mode=args.mode,
        on_policy_at=args.on_policy_at,
        on_policy_rounds=args.on_policy_rounds,
        checkpoint_every=args.checkpoint_every,
        pipe_kwargs=pipe_kwargs,
        shard=args.shard,
    )
    if out.exists():
        stats = _finished(out, config) if work.exists() else None
        if stats is None:
            raise OutputExistsError(f"output path exists: {out} (bitflux never overwrites)")
        finish_work_dir(work)  # killed after its result was saved: only the cleanup was left
        print_result({"out": str(out), **stats}, args.json, f"{out} was already written by this calibration; removed {work}")
        return 0
    if not out.parent.is_dir():
        raise ModelError(f"output directory does not exist: {out.parent}")
    prompts = read_prompts(args.prompts, args.num_prompts, args.seed, source.pipeline)
    if work.exists():  # a damaged or mismatched checkpoint fails before any model is loaded
        WorkDir(work, config)
    embeds = _read_embeddings(args.embeddings) if args.embeddings else None
    cached = embeds is not None or (work / "embeddings.safetensors").exists()
    if source.pipeline is None and (config.mode is Mode.JOINT or not cached):
        raise ModelError(f"{args.src}: a transformer directory needs --base PIPELINE (text encoders, scheduler)"
                         + ("" if config.mode is Mode.JOINT else " or --embeddings FILE"))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _init_distributed(device)
    if distributed.is_main():
        print(f"bitflux: calibrating {args.src} at {height}x{width} on {device} ({config.mode.value}"
              f"{f', {distributed.world()} processes' if distributed.active() else ''})", file=sys.stderr)
    dtype = _stored_dtype(source.transformer)
    if config.mode is Mode.BLOCKWISE:  # one teacher block at a time, streamed from its shards
        from .api import calibrate_sequential

        pipe = _load(source.pipeline, dtype, transformer=None, vae=None) if source.pipeline else None
        model, stats = calibrate_sequential(source.transformer, prompts, config, work_dir=work, pipe=pipe, embeds=embeds, device=device,
                                            source_name=args.src, progress=not args.json and distributed.is_main(),
                                            grad_checkpoint=args.grad_checkpoint)
    else:
        extra = {}
        if Path(source.transformer).parent != Path(source.pipeline):  # a bare transformer with --base
            from diffusers import FluxTransformer2DModel

            extra["transformer"] = FluxTransformer2DModel.from_pretrained(source.transformer)
        pipe = _load(source.pipeline, None, **extra).to(device)
        model, stats = calibrate(pipe, prompts, config, work_dir=work, source=args.src,
                                 progress=not args.json and distributed.is_main())
        torch.nn.Module.to(model, dtype=dtype)  # kept layers in the stored dtype (ternary codes and scales unchanged)
    if not distributed.is_main():  # rank 0 writes the result
        distributed.barrier()
        return 0
    from ..atomic import remove_stale_temps

    remove_stale_temps(out)  # `.OUT.tmp-PID` of a save that was killed (its process gone)
    save(model, out, extra_json={"calibration.json": stats})
    finish_work_dir(work)
    distributed.barrier()
    report = {"out": str(out), **stats, **size_report(model)}
    loss = "n/a" if stats["final_loss"] is None else f"{stats['final_loss']:.4g}"
    text = f"wrote {out}: {stats['prompts']} prompts, {config.steps} steps at {height}x{width} in {stats['seconds']}s, final loss {loss}"
    print_result(report, args.json, text)
    return 0


def _read_embeddings(path: str) -> dict:
    """Prompt embeddings from a safetensors file (prompt_embeds (P, S, D), pooled_prompt_embeds (P, D2), negative_*)."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except FileNotFoundError:
        raise BitfluxError(f"embeddings file not found: {path}") from None
    except Exception as e:  # safetensors' own error types for torn or foreign files
        raise BitfluxError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if not {"prompt_embeds", "pooled_prompt_embeds"} <= tensors.keys():
        raise BitfluxError(f"{path}: needs tensors prompt_embeds and pooled_prompt_embeds")
    return tensors


def _init_distributed(device):
    """Join the process group torchrun / accelerate launch describe (WORLD_SIZE > 1); one device per process."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def _stored_dtype(transformer_dir: str):
    from ..checkpoint import stored_float_dtype

    return stored_float_dtype(Path(transformer_dir))


def _load(pipeline: str, dtype, **components):
    """The FluxPipeline at `pipeline` (components given as None are not loaded), quietly."""
    from diffusers import FluxPipeline

    kwargs = dict(components)
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        pipe = FluxPipeline.from_pretrained(pipeline, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelError(f"cannot load pipeline {pipeline}: {str(e).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def register(sub: argparse._SubParsersAction) -> None:
    choices = lambda enum: [e.value for e in enum]  # noqa: E731
    d = CalibConfig()
    p = sub.add_parser(
        "calibrate",
        help="data-free calibration: the full-precision model teaches its ternary copy",
        description="Ternarise SRC's transformer and train its codes and scales to match the full-precision "
        "model on trajectories it samples from text prompts (no images). Resumable: checkpoints go to "
        "OUT.partial/ and re-running the same command continues from the last one; a damaged checkpoint is "
        "reported with the file to delete to start over.",
    )
    p.add_argument("src", help="full-precision model: bundled name (toy), pipeline directory, transformer directory "
                   "(with --base) or hub id (local Hugging Face cache only; bitflux never downloads)")
    p.add_argument("--base", help="pipeline (directory or cached hub id) whose text encoders and scheduler a bare "
                   "transformer directory SRC uses")
    p.add_argument("out", help="new output directory for the ternary transformer")
    p.add_argument("--prompts", required=True, help="prompt file (one per line) or 'toy' (toy world, train split)")
    p.add_argument("--num-prompts", type=int, default=d.prompts, help=f"prompts used (default {d.prompts})")
    p.add_argument("--init", default=d.init.value, choices=choices(InitMethod), help="initial ternarisation")
    p.add_argument("--train", default=d.train.value, choices=choices(TrainWhat), help="what is trained")
    p.add_argument("--loss", default=d.loss.value, choices=choices(LossKind), help="what is matched")
    p.add_argument("--format", default=d.format.value, choices=choices(PackFormat), help="packing of the result")
    p.add_argument("--mode", default=d.mode.value, choices=choices(Mode), help="joint or block-wise training")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimiser steps (default {d.steps})")
    p.add_argument(
        "--on-policy-at",
        type=float,
        default=d.on_policy_at,
        help="share of the steps after which states the student itself visits join the pool "
        f"(joint mode; 0 = teacher states only; default {d.on_policy_at})",
    )
    p.add_argument(
        "--on-policy-rounds",
        type=int,
        default=d.on_policy_rounds,
        help="on-policy refreshes, evenly spaced from --on-policy-at to the end; each adds the current "
        f"student's states (default {d.on_policy_rounds})",
    )
    p.add_argument("--traj-steps", type=int, help="denoising steps per teacher trajectory (default: eval's for toy)")
    p.add_argument("--batch", type=int, default=d.batch, help="recorded states per step")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for prompts, trajectories, batches")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--embeddings", help="block-wise, without --base: a safetensors file of the prompts' embeddings "
                   "(prompt_embeds (P, S, D), pooled_prompt_embeds (P, D2); negative_* for real CFG) instead of text encoders")
    p.add_argument("--height", type=int, help="image height of the teacher trajectories (default: toy's eval size, else 1024)")
    p.add_argument("--width", type=int, help="image width (default: toy's eval size, else 1024)")
    p.add_argument("--device", default="cpu", help="torch device that trains (and, block-wise, holds the current block)")
    p.add_argument("--shard", action="store_true", help="joint mode under torchrun: shard the student and its "
                   "Adam state over the processes with FSDP2 (each holds 1/N), instead of a whole copy on each")
    p.add_argument("--grad-checkpoint", action="store_true", help="block-wise: recompute each child of the trained "
                   "block in backward (less memory, more time)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_calibrate)
