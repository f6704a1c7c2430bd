"""`bitflux bench --parts peers`: other weight quantisers on the same work as bitflux, one run.

The bundled `toy`'s block Linears (the FLUX policy's: transformer_blocks.* and
single_transformer_blocks.*) are quantised by optimum-quanto (qint2/4/8), hqq (1-4 bits, group
size --hqq-group-size) and torchao (int8 weight-only), beside bitflux's naive absmean ternary
(`bitflux eval --naive`) and the calibrated `toy-1.58bit`. Each is scored exactly as `bitflux eval`
scores (eval.runner.generate + eval.fragility.compare against full precision on the same prompts
and seeds) and one transformer forward is timed against the full-precision forward, interleaved
in the same run. Bits per weight count everything a quantised weight needs (codes + scales +
zeros): integer tensors as stored, floating-point scales/zeros at 16 bits (how each library stores
them beside bf16 weights; `bits_in_memory` is what this fp32 run holds). The peers are optional
(`pip install bitflux[peers]`); a missing one is named and skipped.
Prints a table, writes bench/results/peers-<time>.json and a PNG plot (quality ratio vs bits).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import BitfluxError
from .common import default_out, result_path

PEER_MODULES = {"quanto": "optimum.quanto", "hqq": "hqq", "torchao": "torchao"}  # library -> import name
PEER_PIP = {"quanto": "optimum-quanto", "hqq": "hqq", "torchao": "torchao"}
BASE = "toy"  # the bundled full-precision pipeline every row quantises


@dataclass(frozen=True)
class Variant:
    """One row: a quantiser of the block Linears (`library` "bitflux" needs no extra package)."""

    name: str  # row label and --methods key, e.g. "quanto-qint4"
    library: str  # bitflux | quanto | hqq | torchao
    code_bits: float  # nominal bits of one weight's code
    build: Callable[["_Ctx"], Any]  # -> a FluxPipeline whose transformer is quantised


@dataclass(frozen=True)
class _Ctx:
    hqq_group_size: int


# ------------------------------------------------------------------------------------- builders
def _toy():
    from ..eval.runner import load_model

    return load_model(BASE)


def block_linears(transformer: nn.Module) -> list[str]:
    """The Linears bitflux ternarises in a FLUX transformer (the `flux` policy), by name."""
    from ..policies import get_policy

    names, _ = get_policy("flux").select(transformer)
    if not names:
        raise BitfluxError("the toy transformer has no block Linears to quantise")
    return names


def _quanto(qtype: str) -> Callable[[_Ctx], Any]:
    def build(_ctx: _Ctx):
        import optimum.quanto as quanto

        pipe = _toy()
        quanto.quantize(pipe.transformer, weights=getattr(quanto, qtype), include=block_linears(pipe.transformer))
        quanto.freeze(pipe.transformer)
        return pipe

    return build


def _hqq(nbits: int) -> Callable[[_Ctx], Any]:
    def build(ctx: _Ctx):
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        pipe = _toy()
        t = pipe.transformer
        cfg = BaseQuantizeConfig(nbits=nbits, group_size=ctx.hqq_group_size)
        dtype = next(t.parameters()).dtype
        for name in block_linears(t):
            parent, _, child = name.rpartition(".")
            lin = t.get_submodule(name)
            setattr(t.get_submodule(parent), child, HQQLinear(lin, cfg, compute_dtype=dtype, device="cpu"))
        return pipe

    return build


def _torchao_int8(_ctx: _Ctx):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    pipe = _toy()
    names = set(block_linears(pipe.transformer))
    quantize_(pipe.transformer, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in names)
    return pipe


def _bitflux(naive: bool) -> Callable[[_Ctx], Any]:
    def build(_ctx: _Ctx):
        from ..eval.runner import load_model

        return load_model(BASE, naive=True) if naive else load_model("toy-1.58bit")

    return build


VARIANTS: tuple[Variant, ...] = (
    Variant("bitflux-naive", "bitflux", 1.58, _bitflux(naive=True)),
    Variant("bitflux-calibrated", "bitflux", 1.58, _bitflux(naive=False)),
    *(Variant(f"quanto-{q}", "quanto", b, _quanto(q)) for q, b in (("qint2", 2), ("qint4", 4), ("qint8", 8))),
    *(Variant(f"hqq-{b}bit", "hqq", b, _hqq(b)) for b in (1, 2, 3, 4)),
    Variant("torchao-int8wo", "torchao", 8, _torchao_int8),
)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package ("optimum" of "optimum.quanto")
        return False


def missing_peers() -> dict[str, str]:
    """Peer libraries that are not installed -> the pip name to install."""
    return {lib: PEER_PIP[lib] for lib, mod in PEER_MODULES.items() if not _installed(mod)}


# ------------------------------------------------------------------------------ bits per weight
def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """Plain tensors inside a tensor subclass (quanto, torchao) via __tensor_flatten__, recursively."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:
        return [t]
    names, _ = flatten()
    return [leaf for n in names for leaf in _leaves(getattr(t, n))]


def _weight_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every tensor one quantised Linear keeps for its weight (codes, scales, zeros; not the bias)."""
    out = [p for n, p in list(module.named_parameters()) + list(module.named_buffers()) if n != "bias"]
    meta = getattr(module, "meta", None)  # hqq keeps scale and zero in a dict
    if isinstance(meta, dict):
        out += [v for k, v in meta.items() if torch.is_tensor(v) and k in ("scale", "zero")]
    return [leaf for t in out for leaf in _leaves(t)]


def weight_bits(transformer: nn.Module, names: list[str], n_weights: int) -> dict[str, float]:
    """Bits per weight over the named Linears: floats at 16 bits (deployment) and as held in memory."""
    b16 = mem = 0
    for name in names:
        for t in _weight_tensors(transformer.get_submodule(name)):
            n = t.numel()
            mem += n * t.element_size()
            b16 += n * (2 if t.is_floating_point() else t.element_size())
    return {"bits_per_weight": round(8 * b16 / n_weights, 3), "bits_in_memory": round(8 * mem / n_weights, 3)}


# ----------------------------------------------------------------------------------- forward time
def forward_inputs(transformer: nn.Module, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Transformer inputs shaped as one toy denoising call: 3x3 image tokens, 16 text tokens."""
    from ..toy.world import GRID, TEXT_LENGTH

    cfg = transformer.config
    dtype = next(p for p in transformer.parameters() if p.is_floating_point()).dtype
    g = torch.Generator().manual_seed(seed)
    tokens = GRID * GRID
    return dict(
        hidden_states=torch.randn(batch, tokens, cfg.in_channels, generator=g).to(dtype),  # (B, 9, 64)
        encoder_hidden_states=torch.randn(batch, TEXT_LENGTH, cfg.joint_attention_dim, generator=g).to(dtype),  # (B, 16, D)
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dtype),  # (B, D)
        timestep=torch.full((batch,), 0.5, dtype=dtype),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(TEXT_LENGTH, 3),
    )


@torch.no_grad()
def time_forward(ref: nn.Module, model: nn.Module, inputs: dict, iters: int) -> dict[str, float]:
    """Best-of-iters ms of one forward, reference and model interleaved (load hits both alike)."""
    fns = {"ref": lambda: ref(**inputs, return_dict=False), "model": lambda: model(**inputs, return_dict=False)}
    for fn in fns.values():
        fn()  # warm-up
    best = {k: float("inf") for k in fns}
    for _ in range(max(1, iters)):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return {"forward_ms": round(best["model"] * 1e3, 3), "reference_forward_ms": round(best["ref"] * 1e3, 3),
            "forward_vs_reference": round(best["model"] / best["ref"], 3)}


# -------------------------------------------------------------------------------------- the run
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the peers benchmark."""
    names = [v.name for v in VARIANTS]
    parser.add_argument("--parts", default="peers", help="must be 'peers' (this benchmark runs alone)")
    parser.add_argument("--methods", default=",".join(names), help=f"comma list of rows (default all: {','.join(names)})")
    parser.add_argument("--n", type=int, default=96, help="held-out prompts, as `bitflux eval --n` (default 96)")
    parser.add_argument("--seeds", type=int, default=4, help="images per prompt, as `bitflux eval --seeds` (default 4)")
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default: bitflux eval's)")
    parser.add_argument("--prompt-seed", type=int, default=0, help="seed of the held-out prompt list (default 0)")
    parser.add_argument("--hqq-group-size", type=int, default=64, help="hqq group size (default 64)")
    parser.add_argument("--iters", type=int, default=10, help="timed forwards per row, best kept (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable timings)")
    parser.add_argument("--out", type=Path, default=default_out(), help="folder for the JSON and PNG results")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _check(args: argparse.Namespace) -> list[Variant]:
    if {p.strip() for p in args.parts.split(",") if p.strip()} != {"peers"}:
        raise BitfluxError("--parts peers runs alone; run the other parts in a separate `bitflux bench`")
    if args.n < 1 or args.seeds < 1 or args.iters < 1 or args.threads < 1 or (args.steps is not None and args.steps < 1):
        raise BitfluxError("--n, --seeds, --steps, --iters and --threads must be positive")
    if args.hqq_group_size < 1:
        raise BitfluxError("--hqq-group-size must be positive")
    known = {v.name: v for v in VARIANTS}
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in wanted if m not in known]
    if bad or not wanted:
        raise BitfluxError(f"unknown --methods {', '.join(bad) or '(none)'}; known: {', '.join(known)}")
    return [known[m] for m in wanted]


def run(variants: list[Variant], args: argparse.Namespace, say: Callable[..., None]) -> dict[str, Any]:
    """Score and time every variant against the full-precision toy; missing peers are skipped."""
    from ..eval.fragility import compare
    from ..eval.runner import EvalConfig, generate, load_prompts, score_images, summarize, world_for

    torch.set_num_threads(args.threads)
    missing = missing_peers()
    cfg = EvalConfig(**({"steps": args.steps} if args.steps else {}))
    items = load_prompts("heldout", args.n, args.prompt_seed, world_for(BASE))
    ref_pipe = _toy()
    ref_t = ref_pipe.transformer
    names = block_linears(ref_t)
    n_weights = sum(ref_t.get_submodule(n).weight.numel() for n in names)
    inputs = forward_inputs(ref_t, cfg.batch)
    t0 = time.perf_counter()
    ref_images = generate(ref_pipe, items, args.seeds, cfg)
    ref_seconds = time.perf_counter() - t0
    ref_verdicts = score_images(ref_images, items)
    reference = {"model": f"{BASE} (full precision)", **summarize(ref_verdicts, items), "generate_seconds": round(ref_seconds, 1),
                 **weight_bits(ref_t, names, n_weights)}
    say(f"{BASE}: {len(names)} block Linears, {n_weights} weights; {len(items)} prompts x {args.seeds} seeds, "
        f"{cfg.steps} steps; full precision overall {reference['overall']:.3f} ({ref_seconds:.0f}s)")
    rows, skipped = [], {}
    for v in variants:
        if v.library in missing:
            skipped[v.name] = f"{PEER_PIP[v.library]} not installed (pip install bitflux[peers])"
            say(f"{v.name}: skipped: {skipped[v.name]}")
            continue
        pipe = v.build(_Ctx(args.hqq_group_size))
        t0 = time.perf_counter()
        images = generate(pipe, items, args.seeds, cfg)
        seconds = time.perf_counter() - t0
        row = compare(v.name, images, ref_images, ref_verdicts, items)
        row.update(library=v.library, code_bits=v.code_bits, **weight_bits(pipe.transformer, names, n_weights),
                   generate_seconds=round(seconds, 1), generate_vs_reference=round(seconds / ref_seconds, 3),
                   **time_forward(ref_t, pipe.transformer, inputs, args.iters))
        rows.append(row)
        say(format_rows([row], header=not rows[:-1]))
        del pipe
    return dict(reference=reference, rows=rows, skipped=skipped, missing=missing, n_block_linears=len(names),
                n_weights=n_weights, prompts=len(items), seeds=args.seeds, steps=cfg.steps, cfg_scale=cfg.cfg_scale,
                prompt_seed=args.prompt_seed, hqq_group_size=args.hqq_group_size, threads=args.threads, iters=args.iters)


def format_rows(rows: list[dict], header: bool = True) -> str:
    """Table lines: bits, overall, ratio with its 95 % interval, worst category, PSNR, forward time."""
    head = (f"{'method':<20} {'bits/w':>6} {'overall':>7} {'ratio':>6} {'95% CI':>13} {'worst cat':>9} "
            f"{'PSNR dB':>7} {'fwd ms':>7} {'fwd vs fp':>9}")
    lines = [head, "-" * len(head)] if header else []
    for r in rows:
        lo, hi = r["ratio_ci95"]
        lines.append(f"{r['model']:<20} {r['bits_per_weight']:6.2f} {r['overall']:7.3f} {r['ratio']:6.3f} "
                     f"{f'{lo:.3f}-{hi:.3f}':>13} {r['worst_category_ratio'] or 0:9.3f} {r['psnr_db']:7.2f} "
                     f"{r['forward_ms']:7.2f} {r['forward_vs_reference']:8.2f}x")
    return "\n".join(lines)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(args: argparse.Namespace) -> int:
    from .cpu import machine_info
    from .peers_plot import plot

    variants = _check(args)
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))  # noqa: E731
    missing = missing_peers()
    if missing:
        say(f"missing peers (skipped): {', '.join(sorted(set(missing.values())))}; install with: pip install bitflux[peers]")
    result: dict[str, Any] = dict(benchmark="bitflux.bench.peers", machine=machine_info(), base=BASE,
                                  bits_rule="codes + scales + zeros; integer tensors as stored, float tensors at 16 bits")
    versions = {}
    for lib, mod in PEER_MODULES.items():
        if lib not in missing:
            from importlib.metadata import PackageNotFoundError, version

            try:
                versions[lib] = version(PEER_PIP[lib])
            except PackageNotFoundError:
                versions[lib] = None
    result["peer_versions"] = versions
    result.update(run(variants, args, say))
    result["machine"]["loadavg_end"] = os.getloadavg()
    path = result_path(args.out, "peers")
    path.parent.mkdir(parents=True, exist_ok=True)
    png = path.with_suffix(".png")
    result["plot"] = str(png)
    _write_atomic(png, lambda p: plot(result["rows"], result["reference"], p))
    _write_atomic(path, lambda p: p.write_text(json.dumps(result, indent=2, default=str)))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(f"wrote {path} and {png}")
    return 0
