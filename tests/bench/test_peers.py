"""Peers benchmark: each installed quantiser replaces exactly the block Linears, bits per weight are
counted from the stored tensors, a tiny run writes JSON + PNG, and missing peers are named."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from PIL import Image

from bitflux.bench import peers
from bitflux.bench.commands import _parts
from bitflux.errors import BitfluxError

MISSING = peers.missing_peers()
TINY = ("--n", "6", "--seeds", "1", "--steps", "1", "--iters", "1")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    peers.add_arguments(parser)
    return parser.parse_args(list(argv))


def _needs(lib: str):
    return pytest.mark.skipif(lib in MISSING, reason=f"{peers.PEER_PIP[lib]} not installed (pip install bitflux[peers])")


# Expected bits per weight on the toy's block Linears (in_features 128 or 512; floats counted at 16 bits).
def _expected_bits(variant: str, ref: torch.nn.Module, names: list[str]) -> float:
    total = bits = 0
    for n in names:
        k, o = ref.get_submodule(n).in_features, ref.get_submodule(n).out_features
        total += k * o
        if variant == "bitflux-naive":  # 2-bit codes, one bf16 scale a row
            bits += o * (2 * k + 16)
        elif variant.startswith("quanto-qint"):  # codes; qint2/4: scale + shift per group of 128, qint8: scale a row
            b = int(variant[-1])
            bits += o * (b * k + (32 * (k // 128) if b < 8 else 16))
        elif variant.startswith("hqq-"):  # codes (3 bits: 10 per int32), scale + zero per group of 64
            b = int(variant[4])
            codes = 32 * -(-k * o // (10 * 64)) * 64 if b == 3 else b * k * o
            bits += codes + 32 * (k * o // 64)
        elif variant == "torchao-int8wo":  # int8 codes, a scale and an int8 zero point a row
            bits += o * (8 * k + 16 + 8)
    return bits / total


@pytest.fixture(scope="module")
def toy():
    return peers._toy()


@pytest.mark.parametrize("name", [v.name for v in peers.VARIANTS if v.name != "bitflux-calibrated"])
def test_each_quantiser_replaces_exactly_the_block_linears(name, toy):
    variant = next(v for v in peers.VARIANTS if v.name == name)
    if variant.library in MISSING:
        pytest.skip(f"{peers.PEER_PIP[variant.library]} not installed")
    ref = toy.transformer
    names = peers.block_linears(ref)
    assert names and all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in names)
    pipe = variant.build(peers._Ctx(hqq_group_size=64))
    t = pipe.transformer
    for n in names:  # every block Linear holds quantised codes now, not a float matrix
        leaves = peers._weight_tensors(t.get_submodule(n))
        assert not any(x.is_floating_point() and x.numel() >= 0.5 * ref.get_submodule(n).weight.numel() for x in leaves), n
    for n, m in ref.named_modules():  # the Linears outside the blocks stay as they were
        if isinstance(m, torch.nn.Linear) and n not in names:
            assert torch.equal(t.get_submodule(n).weight, m.weight), n
    n_weights = sum(ref.get_submodule(n).weight.numel() for n in names)
    got = peers.weight_bits(t, names, n_weights)["bits_per_weight"]
    assert got == pytest.approx(_expected_bits(name, ref, names), abs=2e-3)
    # the quantised forward approximates full precision, closer with more bits
    inputs = peers.forward_inputs(ref, batch=2)
    with torch.no_grad():
        y0, y1 = ref(**inputs).sample, t(**inputs).sample
    rel = float((y1 - y0).norm() / y0.norm())
    assert rel < {1: 2.0, 2: 1.0, 3: 0.4, 4: 0.3, 8: 0.05}.get(round(variant.code_bits), 1.0), rel
    if variant.code_bits >= 8:
        assert rel < 0.05
    t_ms = peers.time_forward(ref, t, inputs, iters=1)
    assert t_ms["forward_ms"] > 0 and t_ms["forward_vs_reference"] > 0


def test_full_precision_counts_sixteen_bits():
    lin = torch.nn.Sequential(torch.nn.Linear(8, 4))
    assert peers.weight_bits(lin, ["0"], 32) == {"bits_per_weight": 16.0, "bits_in_memory": 32.0}


def test_tiny_run_writes_json_table_and_plot(tmp_path, capsys):
    methods = "bitflux-naive" + ("" if "quanto" in MISSING else ",quanto-qint8")
    assert peers.main(_args(*TINY, "--methods", methods, "--out", str(tmp_path), "--json")) == 0
    printed = json.loads(capsys.readouterr().out)
    (path,) = tmp_path.glob("peers-*.json")
    result = json.loads(path.read_text())
    assert printed == result
    assert result["prompts"] == 6 and result["seeds"] == 1 and result["steps"] == 1
    assert [r["model"] for r in result["rows"]] == methods.split(",")
    for r in result["rows"]:
        assert {"overall", "ratio", "ratio_ci95", "psnr_db", "bits_per_weight", "forward_vs_reference",
                "generate_vs_reference", "worst_category_ratio"} <= set(r)
        assert 0 <= r["overall"] <= 1 and r["forward_ms"] > 0
    naive = result["rows"][0]
    assert 2.0 < naive["bits_per_weight"] < 2.2 and naive["psnr_db"] < 100
    assert result["reference"]["bits_per_weight"] == 16.0
    png = Image.open(result["plot"])
    assert png.format == "PNG" and png.size == (760, 480)
    assert not list(tmp_path.glob(".*tmp*"))
    assert "bitflux-naive" in peers.format_rows(result["rows"])


def test_missing_peer_is_named_and_skipped(tmp_path, capsys, monkeypatch):
    real = peers._installed
    monkeypatch.setattr(peers, "_installed", lambda mod: False if mod == "hqq" else real(mod))
    assert peers.main(_args(*TINY, "--methods", "hqq-2bit", "--out", str(tmp_path))) == 0
    out = capsys.readouterr().out
    assert "missing peers (skipped): hqq" in out and "pip install bitflux[peers]" in out
    assert "hqq-2bit: skipped: hqq not installed" in out
    result = json.loads(next(tmp_path.glob("peers-*.json")).read_text())
    assert result["rows"] == [] and "hqq-2bit" in result["skipped"] and result["missing"]["hqq"] == "hqq"


@pytest.mark.parametrize(
    "argv, msg",
    [
        (("--parts", "peers,toy"), "runs alone"),
        (("--methods", "quanto-qint3"), "unknown --methods quanto-qint3"),
        (("--n", "0"), "must be positive"),
        (("--hqq-group-size", "0"), "hqq-group-size"),
    ],
)
def test_bad_options(argv, msg, tmp_path):
    with pytest.raises(BitfluxError, match=msg):
        peers.main(_args(*argv, "--out", str(tmp_path)))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_bench_command_routes_peers(capsys):
    from bitflux.cli import main

    assert _parts(["--parts", "peers", "--n", "3"]) == {"peers"} and _parts(["--parts=toy,memory"]) == {"toy", "memory"}
    assert main(["bench", "--parts", "peers", "--device-help"]) == 0
    assert "--hqq-group-size" in capsys.readouterr().out
    assert main(["bench", "--parts", "peers", "--methods", "nope"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown --methods nope" in err[0]


def test_plot_survives_meaningless_ratios(tmp_path):
    """A tiny run can score the reference 0: ratios are then huge or NaN and are drawn at the cap."""
    from bitflux.bench.peers_plot import plot

    rows = [dict(model="a", library="hqq", bits_per_weight=2.5, ratio=1e11, ratio_ci95=[0.0, 1e12]),
            dict(model="b", library="quanto", bits_per_weight=4.25, ratio=float("nan"), ratio_ci95=[0.0, 0.0])]
    out = plot(rows, {"overall": 0.0}, tmp_path / "p.png")
    assert Image.open(out).size == (760, 480)
