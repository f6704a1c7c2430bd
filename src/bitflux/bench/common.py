"""What the CPU and GPU benchmarks share: FLUX.1-dev's block-linear shapes and where results go."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..inspect import FLUX_DEV_CONFIG as _ARCH

# FluxTransformer2DModel(**FLUX_DEV_CONFIG) builds FLUX.1-dev (one source: bitflux.inspect).
FLUX_DEV_CONFIG: dict[str, Any] = {k: v for k, v in _ARCH.items() if not k.startswith("_")}
HIDDEN = _ARCH["num_attention_heads"] * _ARCH["attention_head_dim"]  # 3072
MLP = 4 * HIDDEN
DOUBLE_BLOCKS, SINGLE_BLOCKS = _ARCH["num_layers"], _ARCH["num_single_layers"]


@dataclass(frozen=True)
class LinearShape:
    """A distinct block-linear shape of FLUX.1-dev and where it occurs."""

    name: str
    k: int  # in_features
    n: int  # out_features
    count: int  # how many block linears have this shape
    rows: str  # rows it sees in one 1024 px denoising step (batch 1)


FLUX_LINEAR_SHAPES: tuple[LinearShape, ...] = (
    LinearShape("double norm1/norm1_context.linear (AdaLN)", HIDDEN, 6 * HIDDEN, 2 * DOUBLE_BLOCKS, "1"),
    LinearShape("single norm.linear (AdaLN)", HIDDEN, 3 * HIDDEN, SINGLE_BLOCKS, "1"),
    LinearShape("attn q/k/v/out, add_*_proj, to_add_out", HIDDEN, HIDDEN, 8 * DOUBLE_BLOCKS + 3 * SINGLE_BLOCKS, "4096|512|4608"),
    LinearShape("ff(.context).net.0.proj, single proj_mlp", HIDDEN, MLP, 2 * DOUBLE_BLOCKS + SINGLE_BLOCKS, "4096|512|4608"),
    LinearShape("ff(.context).net.2", MLP, HIDDEN, 2 * DOUBLE_BLOCKS, "4096|512"),
    LinearShape("single proj_out", HIDDEN + MLP, HIDDEN, SINGLE_BLOCKS, "4608"),
)


def default_out() -> Path:
    """bench/results of the repository when run from a checkout, else ./bench/results."""
    repo = Path(__file__).resolve().parents[3]  # src/bitflux/bench/common.py -> repo root
    return repo / "bench" / "results" if (repo / "pyproject.toml").exists() else Path("bench/results")


def result_path(out: Path, prefix: str) -> Path:
    """One JSON file per run, named by device prefix and UTC start time."""
    return out / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
