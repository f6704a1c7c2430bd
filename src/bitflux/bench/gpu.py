"""GPU benchmark for the Triton ternary kernels, on the full FLUX.1-dev architecture (issue 6).

Two parts, both measured against bf16 in the same run:
1. Linears: every distinct FLUX.1-dev block-linear shape (K, N) at M in {1, 512, 4608}: bf16
   `F.linear`, the 8-bit speed of light (`torch._int_mm` int8 / `torch._scaled_mm` fp8 with
   row-wise scales, on weights pre-expanded to 8 bits and activations pre-quantised), and our
   W1.58A16, W1.58A8-int8 and W1.58A8-fp8 kernels (A8 both with the separate quantisation pass and
   fused into the GEMM). Each kernel's output is also checked against the torch reference there.
2. Model: one denoising step of a randomly initialised `FluxTransformer2DModel` with the
   FLUX.1-dev config (no download) at 1024x1024 (4096 image + 512 text tokens), eager and
   `torch.compile`d: latency and peak memory for bf16, then the same model after
   `bitflux.quantize` (its block linears ternarised on the GPU, layer by layer, the bf16 weights
   freed as it goes) with bf16, int8 and fp8 activations.

Prints a table and writes JSON (machine, versions, every figure) under `bench/results/`.
`--dry-run` needs no GPU: it prints the plan and writes the JSON skeleton (used by the tests).
Run: `python -m bitflux.bench.gpu` (or `bitflux bench --device cuda`). M = 1 rows are padded to
16 for `_int_mm` / `_scaled_mm`, which reject smaller M (both are weight-bandwidth bound there).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from .common import FLUX_DEV_CONFIG, FLUX_LINEAR_SHAPES, default_out, result_path

M_VALUES = (1, 512, 4608)  # AdaLN rows per image; text tokens; image + text tokens at 1024 px
IMAGE_TOKENS, TEXT_TOKENS = 4096, 512  # 1024x1024: (1024 / 8 / 2)^2 latent patches; T5 length
LINEAR_METHODS = ("bf16", "int8_sol", "fp8_sol", "w158a16", "w158a8_int8", "w158a8_int8_fused", "w158a8_fp8", "w158a8_fp8_fused")
MODEL_VARIANTS = ("bf16", "w158a16", "w158a8_int8", "w158a8_fp8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the GPU benchmark (no --device: the caller owns that)."""
    parser.add_argument("--out", type=Path, default=default_out(), help="folder for the JSON result")
    parser.add_argument("--parts", default="linears,model", help="comma list of: linears, model")
    parser.add_argument("--m", type=int, nargs="+", default=list(M_VALUES), help="rows per linear")
    parser.add_argument("--no-compile", action="store_true", help="model: eager only")
    parser.add_argument("--iters", type=int, default=5, help="model: timed steps per variant")
    parser.add_argument("--tune", action="store_true", help="linears: sweep each kernel's AUTOTUNE_SPACE")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, write the JSON skeleton")


# ------------------------------------------------------------------------------------ bookkeeping
def machine_info() -> dict[str, Any]:
    """Machine and library versions, for the JSON record."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for lib in ("triton", "diffusers", "bitflux"):
        try:
            info[lib] = __import__(lib).__version__
        except Exception:  # noqa: BLE001 - a missing optional library is recorded, not fatal
            info[lib] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    gpu_mem_gib=round(p.total_memory / 2**30, 1))
    return info


def plan(ms: list[int]) -> list[dict[str, Any]]:
    """The (shape, M, method) cells the linear part measures."""
    return [dict(shape=s.name, k=s.k, n=s.n, m=m, method=meth) for s in FLUX_LINEAR_SHAPES for m in ms for meth in LINEAR_METHODS]


def format_linear_table(rows: list[dict[str, Any]]) -> str:
    """One line per (shape, M): microseconds per method and speed-up vs bf16."""
    cells: dict[tuple[int, int, int], dict[str, float]] = {}
    for r in rows:
        if r.get("us") is not None:
            cells.setdefault((r["k"], r["n"], r["m"]), {})[r["method"]] = r["us"]
    head = f"{'K':>6} {'N':>6} {'M':>5} | " + " ".join(f"{m:>17}" for m in LINEAR_METHODS)
    lines = [head, "-" * len(head)]
    for (k, n, m), c in cells.items():
        base = c.get("bf16")
        fmt = lambda t: f"{t:8.1f}us {base / t:5.2f}x" if t and base else f"{'-':>17}"  # noqa: E731
        lines.append(f"{k:>6} {n:>6} {m:>5} | " + " ".join(fmt(c.get(meth)) for meth in LINEAR_METHODS))
    return "\n".join(lines)


def format_model_table(rows: list[dict[str, Any]]) -> str:
    """One line per model variant and mode: latency, ratio vs bf16 in the same mode, peak memory."""
    base = {r["mode"]: r["ms"] for r in rows if r["variant"] == "bf16"}
    lines = [f"{'variant':>12} {'mode':>8} {'ms/step':>9} {'vs bf16':>8} {'peak GiB':>9} {'weights GiB':>11}"]
    for r in rows:
        ratio = base.get(r["mode"], 0) / r["ms"] if r["ms"] else 0
        lines.append(f"{r['variant']:>12} {r['mode']:>8} {r['ms']:9.1f} {ratio:7.2f}x {r['peak_gib']:9.2f} {r['weights_gib']:11.2f}")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


# ---------------------------------------------------------------------------------------- linears
def _bench_us(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e3


def _rel_err(y: torch.Tensor, r: torch.Tensor) -> float:
    return ((y.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-12)).item()


def _linear_cell_fns(k: int, n: int, m: int, dev: str) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, Callable[[], torch.Tensor]]]:
    """Benchmark closures per method, and reference closures for the ternary ones."""
    from ..config import ActPrecision, PackFormat
    from ..kernels import reference, triton_w158a8, triton_w158a16
    from ..packing import pack

    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    codes = torch.randint(-1, 2, (n, k), device=dev, dtype=torch.int8)
    qw = pack(codes, PackFormat.TWO_BIT)
    scale = (torch.rand(n, device=dev) * 0.02 + 0.01).to(torch.bfloat16)
    bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
    w_bf16 = codes.to(torch.bfloat16) * scale[:, None]  # (N, K)
    mp = max(m, 16)  # _int_mm / _scaled_mm need M >= 16 (> 16 for _int_mm): pad tiny M
    mp = mp + 1 if mp == 16 else mp
    xq8 = torch.randint(-127, 128, (mp, k), device=dev, dtype=torch.int8)
    w8_t = codes.t()  # (K, N) column-major view of the int8 codes, as _int_mm wants
    xf8 = torch.randn(mp - (mp % 16), k, device=dev).to(torch.float8_e4m3fn)
    wf8_t = codes.to(torch.float8_e4m3fn).t()  # (K, N) column-major
    sa = torch.rand(xf8.shape[0], 1, device=dev)
    sb = torch.rand(1, n, device=dev)
    a8cfg = triton_w158a8.pick_config(m, n, k)
    fused = triton_w158a8.A8Config(**{**a8cfg.__dict__, "fuse_quant": True})
    fns: dict[str, Callable[[], torch.Tensor]] = {
        "bf16": lambda: torch.nn.functional.linear(x, w_bf16, bias),
        "int8_sol": lambda: torch._int_mm(xq8, w8_t),
        "fp8_sol": lambda: torch._scaled_mm(xf8, wf8_t, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
        "w158a16": lambda: triton_w158a16.w158a16_forward(x, qw, scale, bias, k),
        "w158a8_int8": lambda: triton_w158a8.w158a8_forward(x, qw, scale, bias, k, fp8=False),
        "w158a8_int8_fused": lambda: triton_w158a8.w158a8_forward(x, qw, scale, bias, k, fp8=False, config=fused),
        "w158a8_fp8": lambda: triton_w158a8.w158a8_forward(x, qw, scale, bias, k, fp8=True),
        "w158a8_fp8_fused": lambda: triton_w158a8.w158a8_forward(x, qw, scale, bias, k, fp8=True, config=fused),
    }
    ref = lambda act: lambda: reference.ternary_linear(x, qw, scale, bias, fmt=PackFormat.TWO_BIT, in_features=k, act=act)  # noqa: E731
    refs = {"w158a16": ref(ActPrecision.BF16), "w158a8_int8": ref(ActPrecision.INT8), "w158a8_fp8": ref(ActPrecision.FP8)}
    refs |= {"w158a8_int8_fused": refs["w158a8_int8"], "w158a8_fp8_fused": refs["w158a8_fp8"]}
    return fns, refs


def _tune(k: int, n: int, m: int, dev: str) -> dict[str, Any]:
    """Best config of each kernel's AUTOTUNE_SPACE at one shape (winners go into DEFAULT_CONFIGS)."""
    from ..kernels import triton_w158a8, triton_w158a16
    from ..packing import pack

    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    qw = pack(torch.randint(-1, 2, (n, k), device=dev, dtype=torch.int8), "2bit")
    scale = torch.ones(n, device=dev, dtype=torch.bfloat16)
    out: dict[str, Any] = {}
    spaces = {
        "w158a16": [(c, lambda c=c: triton_w158a16.w158a16_forward(x, qw, scale, None, k, c)) for c in triton_w158a16.AUTOTUNE_SPACE],
        "w158a8_int8": [(c, lambda c=c: triton_w158a8.w158a8_forward(x, qw, scale, None, k, False, c)) for c in triton_w158a8.AUTOTUNE_SPACE],
        "w158a8_fp8": [(c, lambda c=c: triton_w158a8.w158a8_forward(x, qw, scale, None, k, True, c)) for c in triton_w158a8.AUTOTUNE_SPACE],
    }
    for kernel, cands in spaces.items():
        timed = []
        for cfg, fn in cands:
            try:
                timed.append((_bench_us(fn), asdict(cfg)))
            except Exception as e:  # noqa: BLE001 - a config can exceed shared memory: skip it
                print(f"  tune {kernel} {cfg}: {type(e).__name__}", file=sys.stderr)
        if timed:
            us, cfg = min(timed, key=lambda t: t[0])
            out[kernel] = {"us": us, "config": cfg, "tried": len(timed)}
    return out


def run_linears(ms: list[int], tune: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for s in FLUX_LINEAR_SHAPES:
        for m in ms:
            fns, refs = _linear_cell_fns(s.k, s.n, m, "cuda")
            for meth, fn in fns.items():
                row: dict[str, Any] = dict(shape=s.name, k=s.k, n=s.n, m=m, method=meth)
                try:
                    row["us"] = _bench_us(fn)
                    row["tflops"] = 2 * m * s.n * s.k / row["us"] / 1e6
                    if meth in refs:
                        row["rel_err_vs_reference"] = _rel_err(fn(), refs[meth]())
                except Exception as e:  # noqa: BLE001 - record the failure, keep measuring the rest
                    row["us"], row["error"] = None, f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                print(f"  K={s.k:>5} N={s.n:>5} M={m:>4} {meth:>18}: {row.get('us') or float('nan'):9.1f} us"
                      f"  err={row.get('rel_err_vs_reference', '')}", flush=True)
            if tune:
                rows.append(dict(shape=s.name, k=s.k, n=s.n, m=m, method="tune", best=_tune(s.k, s.n, m, "cuda")))
            del fns, refs
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------ model
def _flux_inputs(dev: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    cfg = FLUX_DEV_CONFIG
    g = torch.Generator(device=dev).manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, IMAGE_TOKENS, cfg["in_channels"], device=dev, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, TEXT_TOKENS, cfg["joint_attention_dim"], device=dev, generator=g).to(dtype),
        pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], device=dev, generator=g).to(dtype),
        timestep=torch.tensor([0.5], device=dev, dtype=dtype),
        guidance=torch.tensor([3.5], device=dev, dtype=dtype),
        img_ids=torch.zeros(IMAGE_TOKENS, 3, device=dev),
        txt_ids=torch.zeros(TEXT_TOKENS, 3, device=dev),
    )


def _time_step(model: torch.nn.Module, inputs: dict[str, torch.Tensor], iters: int) -> tuple[float, float, float]:
    """(median ms per step, peak GiB during the timed steps, seconds of the first call)."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(**inputs, return_dict=False)  # first call: compiles when model is compiled
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        model(**inputs, return_dict=False)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            model(**inputs, return_dict=False)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30, first_s


def run_model(iters: int, compile_: bool) -> list[dict[str, Any]]:
    from diffusers import FluxTransformer2DModel

    from .. import QuantConfig, quantize, set_activations
    from ..config import ActPrecision

    dtype = torch.bfloat16
    t0 = time.perf_counter()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # random init straight into bf16 on the GPU: 24 GB, not 48
    try:
        with torch.device("cuda"):
            model = FluxTransformer2DModel(**FLUX_DEV_CONFIG).eval()
    finally:
        torch.set_default_dtype(prev)
    print(f"  built FLUX.1-dev architecture in {time.perf_counter() - t0:.1f}s", flush=True)
    inputs = _flux_inputs("cuda", dtype)
    rows: list[dict[str, Any]] = []
    for variant in MODEL_VARIANTS:
        if variant == "w158a16":
            t0 = time.perf_counter()
            quantize(model, QuantConfig(activations=ActPrecision.BF16))
            torch.cuda.empty_cache()
            print(f"  quantised on the GPU in {time.perf_counter() - t0:.1f}s", flush=True)
        elif variant != "bf16":
            set_activations(model, "int8" if variant == "w158a8_int8" else "fp8")
        weights_gib = torch.cuda.memory_allocated() / 2**30
        for mode in ("eager", "compile") if compile_ else ("eager",):
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            runner = torch.compile(model) if mode == "compile" else model
            row: dict[str, Any] = dict(variant=variant, mode=mode, weights_gib=weights_gib)
            try:
                ms, peak, first = _time_step(runner, inputs, iters)
                row.update(ms=ms, peak_gib=peak, first_call_s=first)
                if mode == "compile":  # graph breaks cost launches and fusions: record them
                    row["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
            except Exception as e:  # noqa: BLE001 - record, go on with the next variant
                row.update(ms=0.0, peak_gib=0.0, error=f"{type(e).__name__}: {e}"[:500])
            rows.append(row)
            print(f"  {variant:>12} {mode:>8}: {row['ms']:.1f} ms/step, peak {row['peak_gib']:.2f} GiB", flush=True)
    del model
    torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> int:
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    path = result_path(args.out, "gpu")
    result: dict[str, Any] = dict(
        benchmark="bitflux.bench.gpu",
        machine=machine_info(),
        args={k: str(v) for k, v in vars(args).items() if k != "func"},
        flux_config=FLUX_DEV_CONFIG,
        shapes=[asdict(s) for s in FLUX_LINEAR_SHAPES],
        tokens=dict(image=IMAGE_TOKENS, text=TEXT_TOKENS),
    )
    if args.dry_run:
        result["plan"] = plan(args.m)
        print(f"dry run: {len(result['plan'])} linear cells ({len(FLUX_LINEAR_SHAPES)} shapes x M {args.m} x "
              f"{len(LINEAR_METHODS)} methods); model variants {', '.join(MODEL_VARIANTS)}")
        for s in FLUX_LINEAR_SHAPES:
            print(f"  K={s.k:>5} N={s.n:>5} x{s.count:<3} rows/step={s.rows:<13} {s.name}")
        print(f"wrote {write_json(result, path)}")
        return 0
    if not torch.cuda.is_available():
        print("bitflux.bench.gpu: no CUDA device (use --dry-run to check the plan)", file=sys.stderr)
        return 2
    if "linears" in parts:
        print("linears:", flush=True)
        result["linears"] = run_linears(args.m, args.tune)
        write_json(result, path)  # keep part 1 even if the model part dies
        print(format_linear_table(result["linears"]))
    if "model" in parts:
        print("model (one denoising step, 1024x1024):", flush=True)
        result["model"] = run_model(args.iters, not args.no_compile)
        print(format_model_table(result["model"]))
    print(f"wrote {write_json(result, path)}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m bitflux.bench.gpu", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
