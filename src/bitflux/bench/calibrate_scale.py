"""`bitflux bench --parts calibrate-scale`: block-wise calibration of a FLUX.1-dev-shaped model, streamed.

What it measures (CPU): sequential-onloading calibration (`calibrate.api.calibrate_sequential`) of
a random-weight transformer with FLUX.1-dev's exact config (written once to `--cache` with
`bench.synth.write_random_flux`, bf16 shards, never held whole), at `--size`² with a tiny pool of
random cached prompt embeddings (T5 length 512; no text encoders) and `--steps-per-block` steps
per block: peak RSS beside the bf16 teacher's size (the baseline: what holding the teacher takes),
time per block-step beside one teacher-block forward timed in the same run, and the FLOPs of
every phase counted with torch's FlopCounterMode on meta tensors. Those FLOPs project the full
recipe (`--project-*`: the paper's 7,232 prompts at 1024²) to H100-hours at an assumed MFU.
Prints a table and writes JSON. The full-depth run is on demand; tests run it at reduced size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM (NVIDIA datasheet)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default="calibrate-scale", help="calibrate-scale (this benchmark)")
    p.add_argument("--model", help="a FLUX transformer directory to calibrate (default: FLUX.1-dev-shaped random weights in --cache)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "bitflux" / "synth"), help="where the random model is written once")
    p.add_argument("--layers", type=int, default=19, help="double-stream blocks of the random model (FLUX.1-dev: 19)")
    p.add_argument("--single-layers", type=int, default=38, help="single-stream blocks (FLUX.1-dev: 38)")
    p.add_argument("--size", type=int, default=256, help="image height = width in pixels (default 256)")
    p.add_argument("--prompts", type=int, default=1, help="calibration prompts: the pool is their recorded states")
    p.add_argument("--traj-steps", type=int, default=2, help="denoising steps per teacher trajectory")
    p.add_argument("--steps-per-block", type=int, default=2, help="optimiser steps per block (>= 2 to time a step)")
    p.add_argument("--batch", type=int, default=1, help="states per optimiser step")
    p.add_argument("--train", default="all", choices=["scales", "latent", "all"], help="what is trained")
    p.add_argument("--no-grad-checkpoint", action="store_true", help="keep every activation of the trained block")
    p.add_argument("--text-len", type=int, default=512, help="T5 tokens per prompt (FLUX.1-dev: 512)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--project-prompts", type=int, default=7232, help="prompts of the projected run (the paper's 7,232)")
    p.add_argument("--project-layers", type=int, default=19, help="double blocks of the projected model (FLUX.1-dev: 19)")
    p.add_argument("--project-single-layers", type=int, default=38, help="single blocks of the projected model (38)")
    p.add_argument("--project-size", type=int, default=1024, help="resolution of the projected run")
    p.add_argument("--project-traj-steps", type=int, default=8, help="denoising steps per trajectory (calibrate's default)")
    p.add_argument("--project-pool", type=int, default=4096, help="recorded states carried block to block")
    p.add_argument("--project-steps-per-block", type=int, default=200, help="optimiser steps per block")
    p.add_argument("--project-batch", type=int, default=16, help="states per optimiser step")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOP utilisation of an H100 (bf16)")
    p.add_argument("--out", help="JSON file (default bench/results/calibrate-scale-<time>.json)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _rss_gb() -> float:
    """Peak resident set of this process so far, GB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _tokens(size: int, config: dict) -> int:
    """Image tokens of a FLUX transformer at `size`² (VAE /8, 2x2 patches)."""
    return (size // 16) ** 2


def block_flops(config: dict, size: int, text_len: int) -> dict[str, float]:
    """FLOPs per sample of one double / single block (forward; forward + backward) and of the outer layers."""
    from diffusers import FluxTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg.update(num_layers=1, num_single_layers=1)
    with torch.device("meta"):
        m = FluxTransformer2DModel(**cfg)
    s, c = _tokens(size, config), cfg["num_attention_heads"] * cfg["attention_head_dim"]
    rot = m.pos_embed(torch.zeros(s + text_len, 3, device="meta"))
    out: dict[str, float] = {}
    for kind, blk in (("double", m.transformer_blocks[0]), ("single", m.single_transformer_blocks[0])):
        hid = torch.randn(1, s, c, device="meta", requires_grad=True)
        enc = torch.randn(1, text_len, c, device="meta", requires_grad=True)
        temb = torch.randn(1, c, device="meta")
        with FlopCounterMode(display=False) as fwd:
            e, h = blk(hidden_states=hid, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rot)
        with FlopCounterMode(display=False) as bwd:
            (e.sum() + h.sum()).backward()
        out[f"{kind}_forward"] = float(fwd.get_total_flops())
        out[f"{kind}_train_step"] = float(fwd.get_total_flops() + bwd.get_total_flops())
    n_d, n_s = config["num_layers"], config["num_single_layers"]
    out["model_forward"] = n_d * out["double_forward"] + n_s * out["single_forward"]  # the outer layers are < 0.1 %
    return out


def project(config: dict, args: argparse.Namespace) -> dict[str, Any]:
    """FLOPs of the full recipe, by phase, and the H100-hours they take at the assumed MFU.

    The projected model has the measured model's width and `--project-layers` + `--project-single-layers` blocks.
    """
    config = {**config, "num_layers": args.project_layers, "num_single_layers": args.project_single_layers}
    f = block_flops(config, args.project_size, args.text_len)
    cfg_calls = 1 if config.get("guidance_embeds") else 2  # FLUX.1-dev: distilled guidance, one call per step
    record = args.project_prompts * args.project_traj_steps * cfg_calls * f["model_forward"]
    pool = args.project_pool * f["model_forward"]  # the teacher's block passes over the carried pool
    train = args.project_steps_per_block * args.project_batch * (
        config["num_layers"] * f["double_train_step"] + config["num_single_layers"] * f["single_train_step"]
    )
    total = record + pool + train
    rate = H100_BF16_TFLOPS * 1e12 * args.mfu
    return {
        "flops": {"record": record, "pool_passes": pool, "train": train, "total": total},
        "per_sample": f,
        "h100_hours": total / rate / 3600,
        "assumptions": {
            "prompts": args.project_prompts, "size": args.project_size,
            "blocks": [args.project_layers, args.project_single_layers], "traj_steps": args.project_traj_steps,
            "transformer_calls_per_step": cfg_calls, "pool": args.project_pool,
            "steps_per_block": args.project_steps_per_block, "batch": args.project_batch,
            "h100_bf16_tflops": H100_BF16_TFLOPS, "mfu": args.mfu,
        },
    }


def _model_dir(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    from .synth import write_random_flux

    path = Path(args.cache) / f"flux-dev-random-{args.layers}x{args.single_layers}"
    if not (path / "config.json").exists():
        Path(args.cache).mkdir(parents=True, exist_ok=True)
        write_random_flux(path, num_layers=args.layers, num_single_layers=args.single_layers, progress=not args.json)
    return path


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def _mean_by_kind(times: list[float], kinds: list[str]) -> dict[str, float]:
    """Mean of the per-block `times` for each block kind that has any (times[i] belongs to kinds[i])."""
    groups: dict[str, list[float]] = {}
    for t, k in zip(times, kinds):
        groups.setdefault(k, []).append(t)
    return {k: sum(v) / len(v) for k, v in groups.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Calibrate the model block-wise with sequential onloading; measure memory, time and FLOPs."""
    from ..calibrate import CalibConfig
    from ..calibrate.api import calibrate_sequential
    from ..calibrate.source import TransformerSource

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = _model_dir(args)
    source = TransformerSource(model_dir)
    config = source.config
    n_blocks = config["num_layers"] + config["num_single_layers"]
    rss_start = _rss_gb()

    # baseline measured in the same run: one teacher block's forward at the bench size
    skel = source.skeleton()
    blk = source.load(skel, "transformer_blocks.0")
    s, c = _tokens(args.size, config), config["num_attention_heads"] * config["attention_head_dim"]
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(args.batch, s, c, generator=g).to(source.dtype),
              encoder_hidden_states=torch.randn(args.batch, args.text_len, c, generator=g).to(source.dtype),
              temb=torch.randn(args.batch, c, generator=g).to(source.dtype),
              image_rotary_emb=tuple(t.to(torch.float32) for t in skel.pos_embed(torch.zeros(s + args.text_len, 3))))
    t0 = time.perf_counter()
    with torch.no_grad():
        blk(**kw)
    teacher_block_s = time.perf_counter() - t0
    del blk, skel, kw

    embeds = {
        "prompt_embeds": torch.randn(args.prompts, args.text_len, config["joint_attention_dim"], generator=g).to(source.dtype),
        "pooled_prompt_embeds": torch.randn(args.prompts, config["pooled_projection_dim"], generator=g).to(source.dtype),
    }
    kwargs: dict[str, Any] = dict(height=args.size, width=args.size)
    if config.get("guidance_embeds"):
        kwargs["guidance_scale"] = 3.5
    cal = CalibConfig(mode="blockwise", prompts=args.prompts, traj_steps=args.traj_steps, steps=n_blocks * args.steps_per_block,
                      batch=args.batch, train=args.train, pipe_kwargs=kwargs, record_batch=args.prompts, checkpoint_every=0)
    stamps: list[tuple[int, int, float]] = []
    with tempfile.TemporaryDirectory(prefix="calibrate-scale-") as work:
        t0 = time.perf_counter()
        model, stats = calibrate_sequential(
            model_dir, [f"prompt {i}" for i in range(args.prompts)], cal, work_dir=Path(work) / "w", embeds=embeds,
            progress=not args.json, on_step=lambda step, _l: stamps.append((step, 0, time.perf_counter())),
            grad_checkpoint=not args.no_grad_checkpoint,
        )
        wall = time.perf_counter() - t0
    per = args.steps_per_block
    step_s = [b - a for (i, _, a), (j, _, b) in zip(stamps, stamps[1:]) if (i - 1) // per == (j - 1) // per]
    # wall time of each block, from the end of the one before (the first: from the end of recording):
    # teacher-block load, pool propagation, its optimiser steps, finalize and the block's checkpoint
    ends = [t0 + stats["record_seconds"]] + [t for i, _, t in stamps if i % per == 0]
    block_s = [b - a for a, b in zip(ends, ends[1:])]
    flops = block_flops(config, args.size, args.text_len)
    ternary = sum(1 for _ in model.modules() if type(_).__name__ == "TernaryLinear")
    teacher_bytes = _dir_bytes(model_dir)
    teacher_gb = teacher_bytes / 1e9
    peak = _rss_gb()
    step_mean = sum(step_s) / len(step_s) if step_s else None
    # this machine, full depth, at the bench size: the measured step of each block kind times its count
    kinds = ["double"] * config["num_layers"] + ["single"] * config["num_single_layers"]
    mean = _mean_by_kind(step_s, kinds)
    full_depth_train_h = (
        (args.project_layers * mean["double"] + args.project_single_layers * mean["single"]) * per / 3600
        if len(mean) == 2 else None
    )
    block_mean = _mean_by_kind(block_s, kinds)
    result = {
        "part": "calibrate-scale",
        "model": str(model_dir), "blocks": n_blocks, "double": config["num_layers"], "single": config["num_single_layers"],
        "size": args.size, "prompts": args.prompts, "traj_steps": args.traj_steps, "recorded_calls": stats["recorded_calls"],
        "steps_per_block": per, "batch": args.batch, "train": args.train, "grad_checkpoint": not args.no_grad_checkpoint,
        "teacher_bytes": teacher_bytes, "teacher_bf16_gb": round(teacher_gb, 6),
        "peak_rss_gb": round(peak, 3), "rss_before_model_gb": round(rss_start, 3),
        "peak_rss_vs_teacher": round(peak / teacher_gb, 4),
        "record_seconds": stats["record_seconds"], "total_seconds": round(wall, 1),
        "block_step_seconds_mean": round(step_mean, 3) if step_mean else None,
        "block_step_seconds": [round(x, 3) for x in step_s],
        "teacher_block_forward_seconds": round(teacher_block_s, 3),
        "block_step_seconds_by_kind": {k: round(v, 3) for k, v in mean.items()},
        "block_seconds": [round(x, 3) for x in block_s],
        "block_seconds_by_kind": {k: round(v, 3) for k, v in block_mean.items()},
        "blocks_seconds_total": round(sum(block_s), 1),
        "full_depth_train_hours_here": round(full_depth_train_h, 2) if full_depth_train_h else None,
        "block_step_vs_teacher_block_forward": round(step_mean / teacher_block_s, 2) if step_mean else None,
        "flops_per_sample_at_size": flops,
        "ternary_linears": ternary,
        "projection": project(config, args),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    return result


def _table(r: dict[str, Any]) -> str:
    p = r["projection"]
    untimed = "not timed (needs --steps-per-block >= 2)"
    rows = [
        ("model", f"{r['double']} double + {r['single']} single blocks, {r['teacher_bf16_gb']:.2f} GB bf16 on disk"),
        ("resolution / pool", f"{r['size']}² / {r['recorded_calls']} recorded states, {r['steps_per_block']} steps per block"),
        ("peak RSS", f"{r['peak_rss_gb']:.2f} GB = {r['peak_rss_vs_teacher']:.3f}x the bf16 teacher"),
        ("time per block-step", f"{r['block_step_seconds_mean']} s = {r['block_step_vs_teacher_block_forward']}x one teacher-block forward ({r['teacher_block_forward_seconds']} s)"
         if r["block_step_seconds_mean"] else untimed),
        ("time per block (all of it)", ", ".join(f"{k} {v} s" for k, v in r["block_seconds_by_kind"].items())
         + f"; {r['blocks_seconds_total']} s for {r['blocks']} blocks"),
        ("recording / total", f"{r['record_seconds']} s / {r['total_seconds']} s"),
        ("projected FLOPs", f"{p['flops']['total']:.3e} (record {p['flops']['record']:.2e}, pool {p['flops']['pool_passes']:.2e}, train {p['flops']['train']:.2e})"),
        ("train steps, full depth, here", f"{r['full_depth_train_hours_here']} h ({r['steps_per_block']} steps per block at {r['size']}²)"
         if r["full_depth_train_hours_here"] is not None else untimed),
        ("projected H100-hours", f"{p['h100_hours']:.1f} at MFU {p['assumptions']['mfu']} ({p['assumptions']['prompts']} prompts at {p['assumptions']['size']}², {sum(p['assumptions']['blocks'])} blocks)"),
    ]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def main(args: argparse.Namespace) -> int:
    from ..cli import print_result

    result = run(args)
    out = Path(args.out) if args.out else Path("bench/results") / f"calibrate-scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print_result({**result, "json": str(out)}, args.json, _table(result) + f"\nwrote {out}")
    return 0
