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


# --parts that are benchmarks of their own (CPU), by module
_PART_MODULES = {
    "peers": "bitflux.bench.peers",  # other quantisers on the toy
    "calibrate-scale": "bitflux.bench.calibrate_scale",  # block-wise calibration, FLUX.1-dev shapes
    "modes": "bitflux.bench.modes",  # the default activation mode vs each mode on the toy
    "scale": "bitflux.bench.scale",  # FLUX.1-dev at full size: write, quantise, load, one step
    "checks": "bitflux.bench.checks",  # what checking a full-size checkpoint costs
}


def module_for(device: str, extra: list[str]) -> str:
    """The benchmark module that the --device and --parts among `extra` name."""
    for part, module in _PART_MODULES.items():
        if part in _parts(extra):
            return module
    return _MODULES[device]


def _bench(args: argparse.Namespace) -> int:
    module = module_for(args.device, args.extra)
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
