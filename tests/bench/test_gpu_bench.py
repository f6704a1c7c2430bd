"""The GPU benchmark's CPU-side parts: the FLUX.1-dev shape list, the plan, tables and JSON."""

import argparse
import json

import pytest

from bitflux.bench import gpu


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_shapes_cover_flux_dev_blocks() -> None:
    # Every block linear of FLUX.1-dev once: 11.83 B of its ~11.9 B parameters.
    params = sum(s.k * s.n * s.count for s in gpu.FLUX_LINEAR_SHAPES)
    assert params == 19 * (2 * 3072 * 18432 + 8 * 3072**2 + 4 * 3072 * 12288) + 38 * (
        3072 * 9216 + 3 * 3072**2 + 3072 * 12288 + 15360 * 3072
    )
    assert len({(s.k, s.n) for s in gpu.FLUX_LINEAR_SHAPES}) == len(gpu.FLUX_LINEAR_SHAPES)
    assert gpu.FLUX_DEV_CONFIG["num_layers"] == 19 and gpu.FLUX_DEV_CONFIG["num_single_layers"] == 38


def test_dry_run_writes_plan_json(tmp_path, capsys) -> None:
    assert gpu.main(_args("--dry-run", "--out", str(tmp_path), "--m", "1", "4608")) == 0
    (path,) = tmp_path.glob("gpu-*.json")
    result = json.loads(path.read_text())
    assert len(result["plan"]) == len(gpu.FLUX_LINEAR_SHAPES) * 2 * len(gpu.LINEAR_METHODS)
    assert result["machine"]["torch"] and result["flux_config"]["attention_head_dim"] == 128
    assert "dry run" in capsys.readouterr().out


def test_tables_show_ratios_vs_bf16() -> None:
    rows = [dict(k=3072, n=3072, m=512, method="bf16", us=100.0), dict(k=3072, n=3072, m=512, method="w158a16", us=50.0)]
    table = gpu.format_linear_table(rows)
    assert "2.00x" in table and "1.00x" in table
    model = [
        dict(variant="bf16", mode="eager", ms=300.0, peak_gib=30.0, weights_gib=23.8),
        dict(variant="w158a16", mode="eager", ms=200.0, peak_gib=9.0, weights_gib=3.1),
    ]
    assert "1.50x" in gpu.format_model_table(model)


def test_without_cuda_it_refuses(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    assert gpu.main(_args("--out", str(tmp_path))) == 2
