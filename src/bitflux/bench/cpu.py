"""CPU benchmark for the int8 ternary backend (issue 7): linears, a whole toy generation, memory.

Three parts, each against torch's float paths measured in the same run with the same threads:
1. linears: every distinct FLUX.1-dev block-linear shape (K, N) at M in {1, 64, 256}: torch bf16
   and fp32 `F.linear` (dense weights, bias) vs `kernels.cpu_int8.ternary_linear` (packed codes,
   per-token int8 activations, scale and bias). Methods run round-robin, each cell's best of
   `--iters` is kept, and `speedup_vs_best_float` = min(bf16, fp32) / ternary.
2. toy: one whole generation of the bundled toy pipeline (`bitflux.toy.bundled_path("toy")`),
   bf16 vs its transformer ternarised with int8 activations; skipped if the toy is not installed.
3. memory: bytes of the weight tensors (parameters + buffers) of the toy transformer and of the
   whole FLUX.1-dev transformer (built on the meta device), bf16 vs ternary.

Prints tables; writes JSON (machine: lscpu model and ISA flags, load, versions, threads, every
figure) under `bench/results/`. `--json` prints that object instead of the tables.
Run: `python -m bitflux.bench.cpu` or `bitflux bench --device cpu [--json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .common import FLUX_LINEAR_SHAPES, default_out, result_path

# (where it occurs, K = in_features, N = out_features): the distinct FLUX.1-dev block-linear shapes
FLUX_SHAPES: tuple[tuple[str, int, int], ...] = tuple((s.name, s.k, s.n) for s in FLUX_LINEAR_SHAPES)
M_VALUES = (1, 64, 256)
METHODS = ("bf16", "fp32", "ternary")
_ISA_FLAGS = (  # lscpu flags that decide int8 / bf16 GEMM speed
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
    "amx_bf16",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the CPU benchmark (no --device: the caller owns that)."""
    parser.add_argument("--out", type=Path, default=default_out(), help="folder for the JSON result")
    parser.add_argument("--parts", default="linears,toy,memory", help="comma list of: linears, toy, memory")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--m", type=int, nargs="+", default=list(M_VALUES), help="activation rows per linear")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="KxN", help="linear shapes (default: FLUX.1-dev)")
    parser.add_argument("--fmt", default="2bit", choices=("2bit", "base3"), help="packing of the ternary weights")
    parser.add_argument("--iters", type=int, default=5, help="timed repetitions per cell (best is kept)")
    parser.add_argument("--toy-steps", type=int, default=8, help="toy: denoising steps per generation")
    parser.add_argument("--toy-iters", type=int, default=2, help="toy: timed generations per variant")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


# ------------------------------------------------------------------------------------ bookkeeping
def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines()) if v}


def machine_info() -> dict[str, Any]:
    """CPU model, ISA flags that matter for int8/bf16 GEMMs, load, and library versions."""
    from ..kernels import cpu_int8

    cpu = _lscpu()
    flags = set(cpu.get("Flags", "").split())
    info: dict[str, Any] = {
        "cpu_model": cpu.get("Model name") or platform.processor(),
        "isa_flags": {f: f in flags for f in _ISA_FLAGS},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "l2_cache": cpu.get("L2 cache"),
        "l3_cache": cpu.get("L3 cache"),
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "int8_engine_m64": getattr(cpu_int8.default_engine(64), "value", None),
        "int8_engine_m1": getattr(cpu_int8.default_engine(1), "value", None),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for lib in ("diffusers", "bitflux"):
        try:
            info[lib] = __import__(lib).__version__
        except Exception:  # noqa: BLE001 - a missing optional library is recorded, not fatal
            info[lib] = None
    return info


def _shapes(spec: list[str] | None) -> list[tuple[str, int, int]]:
    if not spec:
        return list(FLUX_SHAPES)
    out = []
    for s in spec:
        k, _, n = s.lower().partition("x")
        out.append((s, int(k), int(n)))
    return out


def _best_s(fns: dict[str, Callable[[], Any]], iters: int) -> dict[str, float]:
    """Best wall time (s) per method; methods alternate so background load hits them alike."""
    for fn in fns.values():
        fn()  # warm-up: allocations, oneDNN primitive creation
    best = {k: float("inf") for k in fns}
    for _ in range(max(1, iters)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------------------------------- linears
def run_linears(shapes: list[tuple[str, int, int]], ms: list[int], fmt: str, iters: int) -> list[dict[str, Any]]:
    """One row per (shape, M): ms per method, GOP/s, and speed-up of ternary vs the best float."""
    from ..config import ActPrecision, PackFormat
    from ..kernels import cpu_int8
    from ..packing import pack

    pf = PackFormat(fmt)
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, k, n in shapes:
        codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)  # (N, K)
        scale = (torch.rand(n, generator=g) * 0.02 + 0.01).to(torch.bfloat16)  # (N,)
        bias = torch.randn(n, generator=g).to(torch.bfloat16)  # (N,)
        qw = pack(codes, pf)  # (N, ceil(K/per)) u8
        w32 = codes.float() * scale.float()[:, None]  # (N, K) dense baselines
        w16, b32 = w32.to(torch.bfloat16), bias.float()
        del codes
        for m in ms:
            x16 = torch.randn(m, k, generator=g).to(torch.bfloat16)  # (M, K)
            x32 = x16.float()
            fns = {
                "bf16": lambda: F.linear(x16, w16, bias),
                "fp32": lambda: F.linear(x32, w32, b32),
                "ternary": lambda: cpu_int8.ternary_linear(
                    x16, qw, scale, bias, fmt=pf, in_features=k, act=ActPrecision.INT8
                ),
            }
            t = _best_s(fns, iters)
            best_float = min(t["bf16"], t["fp32"])
            y, ref = fns["ternary"]().float(), fns["fp32"]()  # sanity: int8-activation error only
            rel_err = ((y - ref).norm() / ref.norm().clamp_min(1e-12)).item()
            rows.append(
                dict(
                    shape=name, k=k, n=n, m=m,
                    **{f"{meth}_ms": round(t[meth] * 1e3, 4) for meth in METHODS},
                    **{f"{meth}_gops": round(2 * m * k * n / t[meth] / 1e9, 2) for meth in METHODS},
                    best_float="bf16" if t["bf16"] <= t["fp32"] else "fp32",
                    speedup_vs_best_float=round(best_float / t["ternary"], 3),
                    speedup_vs_bf16=round(t["bf16"] / t["ternary"], 3),
                    rel_err_vs_fp32=round(rel_err, 5),
                )
            )
        del w32, w16
    return rows


def format_linear_table(rows: list[dict[str, Any]]) -> str:
    """One line per (K, N, M): ms per method, and the ternary speed-up vs the best float path."""
    head = (f"{'K':>6} {'N':>6} {'M':>4} | {'bf16 ms':>9} {'fp32 ms':>9} {'tern ms':>9} | "
            f"{'tern GOP/s':>10} {'vs best float':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['k']:>6} {r['n']:>6} {r['m']:>4} | {r['bf16_ms']:9.3f} {r['fp32_ms']:9.3f} {r['ternary_ms']:9.3f} | "
            f"{r['ternary_gops']:10.1f} {r['speedup_vs_best_float']:12.2f}x"
        )
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- toy
def _weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (what stays resident for inference)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def run_toy(steps: int, iters: int) -> dict[str, Any]:
    """Whole generation of the bundled toy pipeline, bf16 then ternary (int8 activations)."""
    from .. import quantize
    from ..config import ActPrecision, QuantConfig
    from ..errors import ModelError
    from ..toy import bundled_path

    try:
        path = bundled_path("toy")
    except ModelError as e:
        return dict(skipped=f"toy pipeline not installed ({e})")
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(path), dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle left of a blue square"

    from ..toy.world import IMAGE_SIZE, TEXT_LENGTH

    def generate() -> None:  # the toy's native size (the pipeline default would be 512 px)
        pipe(prompt, num_inference_steps=steps, height=IMAGE_SIZE, width=IMAGE_SIZE, max_sequence_length=TEXT_LENGTH,
             generator=torch.Generator().manual_seed(0), output_type="np")

    res: dict[str, Any] = dict(path=str(path), steps=steps, prompt=prompt, size=IMAGE_SIZE)
    bytes_bf16 = _weight_bytes(pipe.transformer)
    times_bf16 = _best_s({"g": generate}, iters)["g"]
    quantize(pipe.transformer, QuantConfig(activations=ActPrecision.INT8))
    bytes_tern = _weight_bytes(pipe.transformer)
    times_tern = _best_s({"g": generate}, iters)["g"]
    res.update(
        bf16_s=round(times_bf16, 4),
        ternary_s=round(times_tern, 4),
        speedup=round(times_bf16 / times_tern, 3),
        transformer_weight_bytes_bf16=bytes_bf16,
        transformer_weight_bytes_ternary=bytes_tern,
    )
    return res


# ----------------------------------------------------------------------------------------- memory
def flux_memory(fmt: str) -> dict[str, Any]:
    """Weight bytes of the whole FLUX.1-dev transformer (built on the meta device): bf16 vs ternary.

    The ternary bytes are those `save` writes, kept bf16 layers (embedders, norm_out, proj_out)
    included (`bitflux.inspect`); nothing is allocated.
    """
    from ..config import QuantConfig
    from ..inspect import inspect_arch

    r = inspect_arch("flux-dev", QuantConfig(format=fmt))
    return dict(model="FLUX.1-dev transformer", fmt=fmt, bf16_bytes=r["bf16_bytes"], ternary_bytes=r["bytes"],
                ratio=round(r["bytes"] / r["bf16_bytes"], 4))


# ------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> int:
    from ..kernels import cpu_int8

    torch.set_num_threads(max(1, args.threads))
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    result: dict[str, Any] = dict(
        benchmark="bitflux.bench.cpu",
        machine=machine_info(),
        threads=torch.get_num_threads(),
        fmt=args.fmt,
        iters=args.iters,
        timing="best of iters, methods interleaved; speedup_vs_best_float = min(bf16, fp32) / ternary",
    )
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))  # noqa: E731
    say(f"{result['machine']['cpu_model']}, {result['threads']} threads, engine "
        f"{result['machine']['int8_engine_m64']}, load {result['machine']['loadavg_start']}")
    if "linears" in parts:
        if cpu_int8.default_engine(64) is None:
            result["linears"] = []
            result["linears_skipped"] = "no int8 GEMM engine on this CPU (cpu_int8.supports is False)"
        else:
            result["linears"] = run_linears(_shapes(args.shapes), args.m, args.fmt, args.iters)
            per_shape: dict[str, dict[str, float]] = {}
            for r in result["linears"]:
                per_shape.setdefault(f"{r['k']}x{r['n']}", {})[str(r["m"])] = r["speedup_vs_best_float"]
            result["speedup_vs_best_float"] = per_shape
            say(format_linear_table(result["linears"]))
    if "toy" in parts:
        result["toy"] = run_toy(args.toy_steps, args.toy_iters)
        t = result["toy"]
        say(f"toy: skipped: {t['skipped']}" if "skipped" in t else
            f"toy generation ({t['steps']} steps): bf16 {t['bf16_s']:.3f}s, ternary {t['ternary_s']:.3f}s "
            f"({t['speedup']:.2f}x); transformer weights {t['transformer_weight_bytes_bf16']} -> "
            f"{t['transformer_weight_bytes_ternary']} bytes")
    if "memory" in parts:
        result["memory_flux_dev"] = flux_memory(args.fmt)
        mem = result["memory_flux_dev"]
        say(f"FLUX.1-dev transformer weights: bf16 {mem['bf16_bytes'] / 2**30:.2f} GiB, ternary "
            f"{mem['ternary_bytes'] / 2**30:.2f} GiB ({mem['ratio']:.3f} of bf16)")
    result["machine"]["loadavg_end"] = os.getloadavg()
    path = result_path(args.out, "cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m bitflux.bench.cpu", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
