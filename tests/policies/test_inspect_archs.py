"""`bitflux inspect --arch NAME` for every full-size config: counts checked against plain arithmetic
on the unquantised meta model (no packing code involved), and the CLI's text, JSON and table."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
from torch import nn

from bitflux.archs import ARCHS, build_meta_model
from bitflux.cli import main
from bitflux.config import QuantConfig
from bitflux.inspect import inspect_arch, markdown_table
from bitflux.policies import policy_for

PER_BYTE = {"2bit": 4, "base3": 5}  # ternary codes per stored byte


def expected(arch: str) -> dict:
    """Params and bytes of `arch` by arithmetic: ternary rows packed, scales bf16, the rest bf16."""
    model = build_meta_model(ARCHS[arch])
    convert, _ = policy_for(model).select(model)
    elems = sum(t.numel() for t in model.state_dict().values())  # what save writes, unquantised
    ternary = {n: model.get_submodule(n) for n in convert}
    tern_elems = sum(m.weight.numel() for m in ternary.values())
    nn_params = sum(p.numel() for p in model.parameters())
    out = {"params": elems, "nn_params": nn_params, "ternary_params": tern_elems, "policy": policy_for(model).name}
    for fmt, per in PER_BYTE.items():
        packed = sum(m.out_features * (math.ceil(m.in_features / per) + 2) for m in ternary.values())
        out[f"bytes_{fmt}"] = packed + 2 * (elems - tern_elems)
    return out


# nn.Parameter counts in billions; the cards say 12B, 32B, 4B, 8.1B, 20B, 14B and 8.9B (Chroma: 8.9B).
PUBLISHED = {"flux-dev": 11.90, "flux2-dev": 32.22, "flux2-klein-4b": 3.88, "sd3.5-large": 8.06,
             "qwen-image": 20.43, "wan2.1-t2v-14b": 14.29, "chroma1-hd": 8.90}


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def table() -> dict[str, dict]:
    """`bitflux inspect --arch all --json`, by architecture (each model is built once)."""
    code, out, _ = _run("inspect", "--arch", "all", "--json")
    assert code == 0
    return {r["model"]: r for r in json.loads(out)["architectures"]}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_inspect_arch_counts_match_arithmetic(arch: str, table: dict[str, dict]) -> None:
    r = table[arch]
    want = expected(arch)
    assert r["class"] == ARCHS[arch]["_class_name"] and r["policy"] == want["policy"]
    assert r["params"] == want["params"] and r["ternary_params"] == want["ternary_params"]
    assert r["bytes"] == r["bytes_2bit"] == want["bytes_2bit"] and r["bytes_base3"] == want["bytes_base3"]
    assert r["ratio_2bit"] == pytest.approx(2 * want["params"] / want["bytes_2bit"])
    assert 0.9 < r["ternary_fraction"] < 1 and 5 < r["ratio_2bit"] < r["ratio_base3"] < 10
    if arch in PUBLISHED:
        assert round(want["nn_params"] / 1e9, 2) == PUBLISHED[arch]


def test_cli_arch_text_json_and_table() -> None:
    code, out, _ = _run("inspect", "--arch", "wan2.1-t2v-14b")
    assert code == 0 and out.startswith("wan2.1-t2v-14b: 14,") and "base3:" in out and "2bit:" in out
    code, out, _ = _run("inspect", "--arch", "sd3.5-large", "--format", "base3", "--json")
    r = json.loads(out)
    assert code == 0 and r["format"] == "base3" and r["bytes"] == r["bytes_base3"] < r["bytes_2bit"]
    reports = [inspect_arch(a, QuantConfig()) for a in ("flux-dev", "qwen-image")]
    rows = markdown_table(reports).splitlines()
    assert len(rows) == 4 and rows[2].startswith("| flux-dev | FluxTransformer2DModel | flux | 11.90B | 99.44% ")
    assert rows[3].startswith("| qwen-image | QwenImageTransformer2DModel | qwenimage | 20.43B")


def test_cli_policy_for_another_class_is_one_line() -> None:
    code, out, err = _run("inspect", "--arch", "sd3.5-large", "--policy", "flux")
    assert code == 2 and out == ""
    assert err.strip() == "bitflux: error: policy 'flux' is for FluxTransformer2DModel, got SD3Transformer2DModel"


def test_generic_policy_on_an_arch_matches_the_named_one_where_blocks_are_declared() -> None:
    a = inspect_arch("flux2-klein-4b", QuantConfig(policy="generic"))
    b = inspect_arch("flux2-klein-4b", QuantConfig())
    assert a["policy"] == "generic" and b["policy"] == "flux2"
    assert a["bytes"] == b["bytes"] and a["ternary_params"] == b["ternary_params"]


def test_meta_build_allocates_nothing() -> None:
    model = build_meta_model(ARCHS["flux2-dev"])
    assert all(t.is_meta for t in model.state_dict().values())
    assert isinstance(model, nn.Module) and next(model.parameters()).dtype == torch.bfloat16
