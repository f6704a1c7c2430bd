"""`bitflux bench --parts scale`: FLUX.1-dev at full size on this machine, end to end.

1. Stream a random-weight FLUX.1-dev (19 + 38 blocks by default) bf16 checkpoint to a scratch
   directory in the hub's sharded layout (and, with `--entries file`, BFL's single file).
2. Quantise it through each entry point (transformer dir, pipeline dir, single file), each in a
   fresh process: wall time, peak RSS (VmHWM) and output bytes.
3. Load the result in a fresh process: wall time and peak RSS.
4. One transformer step at each `--sizes` on CPU, ternary against torch float in the same run.
   The float model does not fit in RAM at full size (23.8 GB bf16), so float is timed on one
   double and one single block (bf16 and fp32, the faster kept) and scaled by the block counts;
   ternary is timed the same way, beside the measured whole-model ternary step when it fits.

On demand only (it writes ~24 GB per source kind and runs for a long time); tests run it at 1 + 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import default_out, result_path

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from bitflux.cli import main
rc = main(sys.argv[1:])
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print("BENCH " + json.dumps({"rc": rc, "peak_rss": hwm, "seconds": time.perf_counter() - t0}))
"""

_LOAD = r"""
import json, sys, time
t0 = time.perf_counter()
import bitflux
m = bitflux.load(sys.argv[1], verify=sys.argv[2] == "1")
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print("BENCH " + json.dumps({"peak_rss": hwm, "seconds": time.perf_counter() - t0}))
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default="scale", help="scale (this benchmark)")
    p.add_argument("--layers", type=int, default=19, help="double blocks (default 19, FLUX.1-dev)")
    p.add_argument("--single-layers", type=int, default=38, help="single blocks (default 38, FLUX.1-dev)")
    p.add_argument("--entries", default="dir,pipeline", help="comma list of dir, pipeline, file (file writes a second ~24 GB source)")
    p.add_argument("--sizes", default="256,512", help="image sides for the one-step timing (default 256,512)")
    p.add_argument("--full-step", action="store_true", help="also time the whole quantised model's step (minutes at full size)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir under /tmp, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _run(code: str, *argv: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if r.returncode != 0 or line is None:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{argv[:2]} failed: {tail}")
    return json.loads(line[6:])


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _inputs(cfg, side: int, dtype: torch.dtype, text: int = 512) -> dict:
    from .synth import flux_inputs

    return flux_inputs(cfg, (side // 16) ** 2, text, dtype)  # 8x VAE, 2x2 patches


def _time(fn, repeats: int = 2) -> float:
    fn()  # warm-up (kernel build, allocator)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _step_times(packed: Path, sides: list[int], full_step: bool) -> list[dict]:
    """Ternary vs float on the real-width 1 + 1 model (embedders + one block of each kind: 87 % of
    its weights are block Linears), plus the whole quantised model's step when asked."""
    from diffusers import FluxTransformer2DModel

    import bitflux

    from .synth import flux_dev_config

    small_cfg = {k: v for k, v in flux_dev_config(1, 1).items() if not k.startswith("_")}
    rows = []
    torch.manual_seed(0)
    floats = {dt: FluxTransformer2DModel.from_config(small_cfg).to(dt).eval() for dt in (torch.bfloat16, torch.float32)}
    tern = bitflux.quantize(FluxTransformer2DModel.from_config(small_cfg).to(torch.bfloat16).eval())
    full = bitflux.load(packed) if full_step else None
    for side in sides:
        row: dict = {"side": side, "image_tokens": (side // 16) ** 2, "text_tokens": 512}
        with torch.no_grad():
            for name, m in [("float_bf16", floats[torch.bfloat16]), ("float_fp32", floats[torch.float32]), ("ternary", tern)]:
                kw = _inputs(m.config, side, m.dtype)
                row[f"{name}_1+1_s"] = round(_time(lambda m=m, kw=kw: m(**kw)), 3)
            if full is not None:
                kw = _inputs(full.config, side, full.dtype)
                row["ternary_full_s"] = round(_time(lambda: full(**kw), repeats=1), 3)
        best_float = min(row["float_bf16_1+1_s"], row["float_fp32_1+1_s"])
        row["best_float"] = "bf16" if row["float_bf16_1+1_s"] <= row["float_fp32_1+1_s"] else "fp32"
        row["ternary_vs_best_float"] = round(best_float / row["ternary_1+1_s"], 3)
        rows.append(row)
    return rows


def main(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .synth import write_random_flux, write_random_flux_single_file

    if args.threads:
        torch.set_num_threads(args.threads)
    entries = [e.strip() for e in args.entries.split(",") if e.strip()]
    bad = set(entries) - {"dir", "pipeline", "file"}
    if bad:
        raise SystemExit(f"bitflux bench: unknown --entries {sorted(bad)} (dir, pipeline, file)")
    sides = [int(s) for s in args.sizes.split(",") if s.strip()]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bitflux-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "model": {"num_layers": args.layers, "num_single_layers": args.single_layers},
        "quantize": {},
    }
    try:
        t0 = time.perf_counter()
        pipe = work / "pipeline"
        dense = pipe / "transformer"
        if not dense.exists():
            write_random_flux(dense, num_layers=args.layers, num_single_layers=args.single_layers, progress=not args.json)
            (pipe / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}))
        res["write"] = {"seconds": round(time.perf_counter() - t0, 1), "bytes": _dir_bytes(dense)}
        sources = {"dir": dense, "pipeline": pipe}
        if "file" in entries:
            f = work / "flux1-dev.safetensors"
            if not f.exists():
                write_random_flux_single_file(f, num_layers=args.layers, num_single_layers=args.single_layers, progress=not args.json)
            sources["file"] = f
        packed = None
        for entry in tqdm(entries, desc="quantize", disable=args.json):
            out = work / f"q-{entry}"
            shutil.rmtree(out, ignore_errors=True)
            r = _run(_CHILD, "quantize", str(sources[entry]), str(out), "--json")
            r["bytes"] = _dir_bytes(out)
            res["quantize"][entry] = r
            packed = packed or out
        res["load"] = _run(_LOAD, str(packed), "1")
        res["load_no_verify"] = _run(_LOAD, str(packed), "0")
        res["bf16_bytes"] = res["write"]["bytes"]
        res["steps"] = _step_times(packed, sides, args.full_step)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    out_dir = Path(args.out) if args.out else default_out()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = result_path(out_dir, f"scale-{args.layers}+{args.single_layers}")
    path.write_text(json.dumps(res, indent=2) + "\n")
    if args.json:
        print(json.dumps({**res, "results": str(path)}))
        return 0
    gb = 1e9
    print(f"FLUX.1-dev-config {args.layers}+{args.single_layers} blocks, bf16 source {res['bf16_bytes']/gb:.2f} GB written in {res['write']['seconds']:.0f} s")
    print("| step | wall s | peak RSS GB | output GB |\n|---|---|---|---|")
    for entry, r in res["quantize"].items():
        print(f"| quantize ({entry}) | {r['seconds']:.0f} | {r['peak_rss']/gb:.2f} | {r['bytes']/gb:.2f} |")
    for key in ("load", "load_no_verify"):
        print(f"| {key.replace('_', ' ')} | {res[key]['seconds']:.1f} | {res[key]['peak_rss']/gb:.2f} | |")
    print("\n| side | float bf16 1+1 s | float fp32 1+1 s | ternary 1+1 s | ternary vs best float | ternary full s |\n|---|---|---|---|---|---|")
    for r in res["steps"]:
        print(f"| {r['side']} | {r['float_bf16_1+1_s']} | {r['float_fp32_1+1_s']} | {r['ternary_1+1_s']} | {r['ternary_vs_best_float']}x | {r.get('ternary_full_s', '-')} |")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # python -m bitflux.bench.scale
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    raise SystemExit(main(ap.parse_args()))
