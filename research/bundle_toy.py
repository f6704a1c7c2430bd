"""Install a trained toy teacher and its calibrated student as the bundled `toy` / `toy-1.58bit`.

    python research/bundle_toy.py --teacher runs/toy-w --student runs/toy-w-1.58bit

The teacher is a `bitflux toy train` pipeline directory (transformer stored in bf16 to keep the
asset under 20 MiB); the student's recorded source becomes `toy` and its hashes are resealed.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "src" / "bitflux" / "assets"


def main() -> int:
    from bitflux.integrity import seal

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, help="pipeline directory to install as `toy`")
    p.add_argument("--student", type=Path, help="calibrated transformer directory to install as `toy-1.58bit`")
    args = p.parse_args()
    if args.teacher:
        shutil.rmtree(ASSETS / "toy")
        shutil.copytree(args.teacher, ASSETS / "toy")
    if args.student:
        dst = ASSETS / "toy-1.58bit"
        shutil.rmtree(dst)
        shutil.copytree(args.student, dst)
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"].pop("integrity", None)
        cfg["quantization_config"]["source"] = "toy"
        (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        seal(dst)
    size = sum(f.stat().st_size for f in (ASSETS / "toy").rglob("*") if f.is_file())
    print(f"bundled toy: {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
