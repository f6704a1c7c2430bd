"""`bitflux bench --parts checks`: what checking a checkpoint costs at FLUX.1-dev's full size.

Writes a packed 2-bit bitflux checkpoint of FLUX.1-dev's exact config (random valid codes and
scales, 19 + 38 blocks by default, ~3.1 GB, in 1 GB shards: never the dense model), seals it, then
times in one run: the hash check alone (`integrity.verify`), the header checks, `bitflux.load`
with and without `verify` (alternating, fastest of each), and the value checks on the loaded
model (part of every load). The baseline is the load without hash verification, measured in
the same run; the table reports each check against it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path("bench/results")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default="checks", help="checks (this benchmark)")
    p.add_argument("--layers", type=int, default=19, help="double blocks (FLUX.1-dev: 19)")
    p.add_argument("--single-layers", type=int, default=38, help="single blocks (FLUX.1-dev: 38)")
    p.add_argument("--scratch", help="folder for the checkpoint (default: a temporary one, removed after)")
    p.add_argument("--out", help="JSON file (default bench/results/checks-<time>.json)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _valid_codes(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random bytes a 2-bit packing can hold (no 0b11 field), drawn per tensor."""
    b = torch.arange(256)
    table = b[(b & (b >> 1) & 0x55) == 0].to(torch.uint8)  # the 81 valid bytes
    return table[torch.randint(0, len(table), shape, generator=g)]


def write_packed_flux(out: Path, layers: int, single_layers: int, shard_bytes: int = 1000**3) -> Path:
    """A sealed bitflux 2bit checkpoint of FLUX.1-dev's config with random codes, shard by shard."""
    from safetensors.torch import save_file

    import bitflux

    from ..checkpoint import model_config_dict
    from ..integrity import seal
    from .synth import flux_dev_config

    config = flux_dev_config(layers, single_layers)
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        meta = FluxTransformer2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")}).to(torch.bfloat16)
    bitflux.quantize(meta, bitflux.QuantConfig(format="2bit", source="random"))
    cfg = {**model_config_dict(meta), "quantization_config": meta.bitflux_config.to_dict()}
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    weight_map: dict[str, str] = {}
    names: list[list[str]] = [[]]
    specs = {k: (tuple(v.shape), v.dtype) for k, v in meta.state_dict().items()}
    for name, (shape, dtype) in specs.items():  # plan shards by bytes, then write one at a time
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if names[-1] and size + n > shard_bytes:
            names.append([])
            size = 0
        names[-1].append(name)
        size += n
    total = 0
    for i, group in enumerate(names, 1):
        fname = f"diffusion_pytorch_model-{i:05d}-of-{len(names):05d}.safetensors"
        shard = {}
        for name in group:
            shape, dtype = specs[name]
            if dtype == torch.uint8:
                shard[name] = _valid_codes(shape, g)
            elif name.endswith(".scale"):
                shard[name] = (torch.rand(shape, generator=g) * 0.02 + 0.01).to(dtype)
            else:
                shard[name] = (torch.randn(shape, generator=g) * 0.02).to(dtype)
            total += shard[name].numel() * shard[name].element_size()
            weight_map[name] = fname
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        del shard
    (out / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    seal(out)
    return out


def _timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def _value_parts(model, where) -> dict:
    """check_values' three parts timed apart: packed codes, scales, finiteness of float tensors."""
    from ..linear import TernaryLinear
    from ..tensorcheck import _finite, check_scale, codes_valid

    ternary = [(n, m) for n, m in model.named_modules() if isinstance(m, TernaryLinear)]
    _, codes = _timed(lambda: all(codes_valid(m.qweight, m.fmt) for _, m in ternary))
    _, scales = _timed(lambda: [check_scale(f"{n}.scale", m.scale, where) for n, m in ternary])
    tensors = [t for _, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_floating_point()]
    _, finite = _timed(lambda: all(_finite(t) for t in tensors))
    return {"values_codes_s": codes, "values_scales_s": scales, "values_finite_s": finite}


def measure(path: Path, repeats: int = 2) -> dict:
    """Times of each check and of the loads, all on the same checkpoint in this process.

    Loads alternate verify=False / verify=True `repeats` times and keep each one's fastest, so
    a busy machine's noise does not land on one side only.
    """
    import gc

    import bitflux

    from ..integrity import verify
    from ..safeio import read_json_object
    from ..tensorcheck import check_headers, check_values, expected_state, read_headers

    config = read_json_object(path / "config.json")
    files = sorted(path.glob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in files)
    verify(path, config)  # warm the page cache once: every timing below reads from memory
    _, t_hash = _timed(lambda: verify(path, config))
    loads: dict[bool, list[float]] = {False: [], True: []}
    parts: dict = {}
    for _ in range(repeats):
        for v in (False, True):
            model, t = _timed(lambda v=v: bitflux.load(path, verify=v))
            loads[v].append(t)
            if not parts:
                _, parts["values_s"] = _timed(lambda: check_values(model, path))
                parts.update(_value_parts(model, path))
                _, parts["headers_s"] = _timed(lambda: check_headers(expected_state(model), read_headers(files), path))
            del model
            gc.collect()
    return {
        "checkpoint_bytes": nbytes,
        "files": len(files),
        "load_no_verify_s": min(loads[False]),
        "load_verify_s": min(loads[True]),
        "loads_s": {"verify=False": loads[False], "verify=True": loads[True]},
        "hash_s": t_hash,
        "hash_gb_per_s": nbytes / t_hash / 1e9,
        **parts,
    }


def main(args: argparse.Namespace) -> int:
    from ..cli import print_result

    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="bitflux-checks-"))
    path = scratch / "packed"
    try:
        if not (path / "config.json").is_file():
            if path.exists():
                shutil.rmtree(path)
            write_packed_flux(path, args.layers, args.single_layers)
        res = measure(path)
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    base = res["load_no_verify_s"]
    report = {
        "bench": "checks",
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "blocks": [args.layers, args.single_layers],
        **res,
        "verify_adds_x": (res["load_verify_s"] - base) / base,
    }
    out = Path(args.out) if args.out else RESULTS / f"checks-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    rows = [
        ("load, verify=False (baseline)", base),
        ("load, verify=True", res["load_verify_s"]),
        ("hash check alone", res["hash_s"]),
        ("header checks", res["headers_s"]),
        ("value checks, in both loads", res["values_s"]),
        ("  of which packed codes", res["values_codes_s"]),
        ("  of which scales", res["values_scales_s"]),
        ("  of which finite floats", res["values_finite_s"]),
    ]
    text = [f"checkpoint: {res['checkpoint_bytes'] / 1e9:.2f} GB in {res['files']} files, blocks {args.layers}+{args.single_layers}"]
    text += [f"{'step':<38} {'seconds':>8} {'x baseline':>11}"]
    text += [f"{name:<38} {s:>8.2f} {s / base:>11.2f}" for name, s in rows]
    text += [f"hash throughput {res['hash_gb_per_s']:.2f} GB/s; verify adds {report['verify_adds_x']:.1%} to a load", f"wrote {out}"]
    print_result(report, args.json, "\n".join(text))
    return 0
