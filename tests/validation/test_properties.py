"""Property tests (hypothesis): any config.json edit and any CLI value ends well.

"Well" means a one-line BitfluxError, a usage error (exit 2, one line), or a working result;
never another exception, a hang, or non-finite output.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil

import pytest
import torch
from corpus import MODEL_KEYS, QC_VALUES, build_clean, deadline, forward, inspect_json, one_line, reseal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bitflux
from bitflux.argtypes import MAX_IMAGE_SIDE, MAX_SEED
from bitflux.cli import build_parser
from bitflux.errors import BitfluxError

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, 3, 4, 8, 12, 16, 32, 64, 128, -1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
config_keys = st.sampled_from([*MODEL_KEYS, "_class_name", "unknown"] + [f"qc.{k}" for k in QC_VALUES])
edits = st.lists(st.tuples(config_keys, json_values | st.just("__delete__")), min_size=1, max_size=3)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return build_clean(tmp_path_factory.mktemp("clean"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=edits, fmt=st.sampled_from(["2bit", "base3"]), sealed=st.booleans())
def test_any_config_edit_ends_well(clean, tmp_path_factory, edits, fmt, sealed):
    d = tmp_path_factory.mktemp("prop") / "ck"
    shutil.copytree(clean[fmt]["single"], d)
    cfg = json.loads((d / "config.json").read_text())
    for key, value in edits:
        target, name = (cfg["quantization_config"], key[3:]) if key.startswith("qc.") else (cfg, key)
        if value == "__delete__":
            target.pop(name, None)
        else:
            target[name] = value
    (d / "config.json").write_text(json.dumps(cfg))
    if sealed:
        reseal(d)
    with deadline(60):
        try:
            y = forward(bitflux.load(d))
        except BitfluxError as e:
            one_line(str(e))
            y = None
        rc, report = inspect_json(d)
    if y is not None:
        assert torch.isfinite(y).all()
        if not sealed:  # the recorded config hash lets nothing but a no-op edit through
            assert torch.equal(y, clean[fmt]["output"])
    assert rc in (0, 2)
    if rc == 2:
        one_line(report)


def _parse(argv: list[str]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return build_parser().parse_args(argv), ""
        except SystemExit as e:
            assert e.code == 2
            return None, err.getvalue()


tokens = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["0", "1", "16", "47", "48", "nan", "inf", "-inf", "", "x", "1e9", "-0", "0x10", " 3"]),
    st.text(max_size=6),
)
GENERATE_FLAGS = ["--steps", "--seed", "--height", "--width", "--guidance-scale", "--cfg-scale", "--threads", "--activations", "--backend"]
EVAL_FLAGS = ["--steps", "--seeds", "--n", "--prompt-seed", "--cfg-scale", "--threads", "--activations", "--backend"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(GENERATE_FLAGS), tokens), max_size=4))
def test_generate_arguments(pairs):
    argv = ["generate", "toy", "a prompt", "-o", "out.png"] + [f"{flag}={value}" for flag, value in pairs]
    args, err = _parse(argv)
    if args is None:  # refused while parsing: one line, naming the option
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
        return
    assert args.steps >= 1 and 0 <= args.seed <= MAX_SEED
    for side in (args.height, args.width):
        assert side is None or 1 <= side <= MAX_IMAGE_SIDE
    for scale in (args.guidance_scale, args.cfg_scale):
        assert scale is None or (math.isfinite(scale) and scale >= 0)
    assert args.threads is None or args.threads >= 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(EVAL_FLAGS), tokens), max_size=4))
def test_eval_arguments(pairs):
    args, err = _parse(["eval", "toy"] + [f"{flag}={value}" for flag, value in pairs])
    if args is None:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
        return
    assert args.steps >= 1 and args.seeds >= 1 and args.n >= 1 and 0 <= args.prompt_seed <= MAX_SEED
    assert math.isfinite(args.cfg_scale) and args.cfg_scale >= 0 and args.threads >= 0
