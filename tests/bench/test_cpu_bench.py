"""CPU benchmark plumbing on tiny shapes: options, JSON record, table; no timing asserts."""

from __future__ import annotations

import argparse
import json

import pytest

from bitflux.bench import cpu
from bitflux.kernels import cpu_int8


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cpu.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_flux_shapes_are_the_dev_block_linears() -> None:
    assert len({(k, n) for _, k, n in cpu.FLUX_SHAPES}) == len(cpu.FLUX_SHAPES) == 6
    assert {(3072, 3072), (3072, 12288), (12288, 3072), (3072, 18432), (3072, 9216), (15360, 3072)} == {
        (k, n) for _, k, n in cpu.FLUX_SHAPES
    }
    assert _args().m == [1, 64, 256]


@pytest.mark.skipif(cpu_int8.default_engine(64) is None, reason="no int8 GEMM engine on this CPU")
@pytest.mark.parametrize("fmt", ["2bit", "base3"])
def test_json_run_on_tiny_shapes(tmp_path, capsys, fmt: str) -> None:
    args = _args("--shapes", "64x48", "40x33", "--m", "1", "5", "--iters", "1", "--threads", "1",
                 "--parts", "linears,memory", "--fmt", fmt, "--out", str(tmp_path), "--json")
    assert cpu.main(args) == 0
    printed = json.loads(capsys.readouterr().out)  # --json: stdout is exactly one JSON object
    (path,) = tmp_path.glob("cpu-*.json")
    result = json.loads(path.read_text())
    assert printed == result
    assert result["threads"] == 1 and result["fmt"] == fmt
    m = result["machine"]
    assert {"cpu_model", "isa_flags", "torch", "loadavg_start", "loadavg_end", "int8_engine_m64"} <= set(m)
    assert "avx512_vnni" in m["isa_flags"] and "amx_tile" in m["isa_flags"]
    rows = result["linears"]
    assert [(r["k"], r["n"], r["m"]) for r in rows] == [(64, 48, 1), (64, 48, 5), (40, 33, 1), (40, 33, 5)]
    for r in rows:
        assert {"bf16_ms", "fp32_ms", "ternary_ms", "speedup_vs_best_float", "best_float"} <= set(r)
        assert r["speedup_vs_best_float"] > 0 and r["best_float"] in ("bf16", "fp32")
        assert r["rel_err_vs_fp32"] < 0.02  # the kernel computed the layer (int8 rounding only)
    assert set(result["speedup_vs_best_float"]) == {"64x48", "40x33"}
    assert set(result["speedup_vs_best_float"]["64x48"]) == {"1", "5"}
    mem = result["memory_flux_dev"]
    assert 0 < mem["ratio"] < 1 / 7  # the whole ternary FLUX.1-dev transformer vs bf16


def test_table_and_toy_skip(tmp_path, capsys, monkeypatch) -> None:
    from bitflux.errors import ModelError

    def missing(name: str):
        raise ModelError(f"bundled model {name!r} is not installed")

    monkeypatch.setattr("bitflux.toy.bundled_path", missing)
    assert cpu.main(_args("--parts", "toy", "--out", str(tmp_path))) == 0
    out = capsys.readouterr().out
    assert "toy: skipped" in out and "wrote" in out
    (path,) = tmp_path.glob("cpu-*.json")
    assert "skipped" in json.loads(path.read_text())["toy"]
    row = dict(k=8, n=4, m=2, bf16_ms=2.0, fp32_ms=1.0, ternary_ms=0.5, ternary_gops=1.0, speedup_vs_best_float=2.0)
    assert "2.00x" in cpu.format_linear_table([row])


@pytest.mark.slow
@pytest.mark.skipif(cpu_int8.default_engine(64) is None, reason="no int8 GEMM engine on this CPU")
def test_toy_part_on_an_untrained_toy(tmp_path, monkeypatch) -> None:
    # The bundled toy's architecture, untrained (speed does not depend on the weights).
    from bitflux.toy.build import build_pipeline
    from bitflux.toy.world import IMAGE_SIZE

    build_pipeline(seed=0).save_pretrained(tmp_path / "toy")
    monkeypatch.setattr("bitflux.toy.bundled_path", lambda name: tmp_path / "toy")
    res = cpu.run_toy(steps=1, iters=1)
    assert res["bf16_s"] > 0 and res["ternary_s"] > 0 and res["size"] == IMAGE_SIZE
    assert res["transformer_weight_bytes_ternary"] < res["transformer_weight_bytes_bf16"]
