"""`bitflux bench --device cpu|cuda`: hands its remaining options to `bitflux.bench.<device>`."""

from __future__ import annotations

import argparse
import importlib

from ..errors import BitfluxError

_MODULES = {"cpu": "bitflux.bench.cpu", "cuda": "bitflux.bench.gpu"}


def _parts(extra: list[str]) -> set[str]:
    """The --parts values among the device benchmark's options."""
    vals = [b for a, b in zip(extra, extra[1:]) if a == "--parts"] + [a.split("=", 1)[1] for a in extra if a.startswith("--parts=")]
    return {p.strip() for v in vals for p in v.split(",") if p.strip()}


def _bench(args: argparse.Namespace) -> int:
    module = _MODULES[args.device]
    if "peers" in _parts(args.extra):  # other quantisers on the toy (CPU): bitflux.bench.peers
        module = "bitflux.bench.peers"
    if "calibrate-scale" in _parts(args.extra):  # block-wise calibration of a FLUX.1-dev-shaped model (CPU)
        module = "bitflux.bench.calibrate_scale"
    if "modes" in _parts(args.extra):  # the default activation mode vs each mode on the toy: speed + eval
        module = "bitflux.bench.modes"
    if "scale" in _parts(args.extra):  # FLUX.1-dev at full size: write, quantise, load, one step (CPU)
        module = "bitflux.bench.scale"
    if "checks" in _parts(args.extra):  # what checking a full-size checkpoint costs (CPU)
        module = "bitflux.bench.checks"
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise BitfluxError(f"the {args.device} benchmark cannot be imported: {e}") from None
    parser = argparse.ArgumentParser(prog=f"bitflux bench --device {args.device}")
    mod.add_arguments(parser)
    if args.device_help:
        parser.print_help()
        return 0
    try:
        margs = parser.parse_args(args.extra)
    except SystemExit as e:  # argparse already printed the one-line usage error
        raise BitfluxError("bad bench options (see `bitflux bench --device DEV --device-help`)") from e
    return int(mod.main(margs) or 0)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure kernel and whole-model speed and memory (CPU or GPU)",
        description="Benchmark ternary kernels against torch's float (and 8-bit) baselines measured in the "
        "same run, then a whole model. Options after --device go to the device's benchmark; list them "
        "with --device-help. Example: bitflux bench --device cpu --json. `bitflux bench --parts peers` "
        "scores and times other quantisers (optimum-quanto, hqq, torchao) beside bitflux on the toy "
        "(options: bitflux bench --parts peers --device-help).",
    )
    p.add_argument("--device", choices=sorted(_MODULES), default="cpu", help="which benchmark (default cpu)")
    p.add_argument("--device-help", action="store_true", help="list the chosen device benchmark's options")
    p.set_defaults(func=_bench, passthrough=True)
