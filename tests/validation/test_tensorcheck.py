import pytest
import torch
from conftest import tiny_flux
from safetensors.torch import save_file

import bitflux
from bitflux.errors import CheckpointError, FormatError
from bitflux.tensorcheck import (
    SCALE_MAX,
    SCALE_SPREAD,
    check_headers,
    check_index_headers,
    check_scale,
    check_values,
    expected_state,
    read_headers,
)


@pytest.fixture(scope="module")
def model():
    return bitflux.quantize(tiny_flux(dtype=torch.float32), bitflux.QuantConfig(format="2bit", init="twn"))


def _save(tmp_path, state, name="m.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_clean_checkpoint_passes_and_reports_its_float_dtype(tmp_path, model):
    headers = read_headers([_save(tmp_path, model.state_dict())])
    assert check_headers(expected_state(model), headers, "ck") == torch.float32
    half = {k: (v.half() if k.endswith((".weight", ".bias")) else v) for k, v in model.state_dict().items()}
    assert check_headers(expected_state(model), read_headers([_save(tmp_path, half, "h.safetensors")]), "ck") == torch.float16


def _mutated(model, name, fn):
    state = dict(model.state_dict())
    state[name] = fn(state[name])
    return state


BIAS = "transformer_blocks.0.attn.to_q.bias"  # a ternary layer's bias
KEPT = "x_embedder.bias"  # a kept layer


@pytest.mark.parametrize(
    "name, fn, message",
    [
        (BIAS, lambda t: t.view(torch.int32), "is stored as I32, expected a float dtype"),
        (KEPT, lambda t: t.view(torch.int32), "is stored as I32, expected a float dtype"),
        (KEPT, lambda t: t.half(), "one float dtype per checkpoint"),
        (KEPT, lambda t: t.double(), "expected a float dtype"),
        ("transformer_blocks.0.attn.to_q.qweight", lambda t: t.view(torch.int8), "stored as I8, expected U8"),
        ("transformer_blocks.0.attn.to_q.scale", lambda t: t.float(), "stored as F32, expected BF16"),
        ("transformer_blocks.0.attn.to_q.scale", lambda t: t[:-1], "has shape"),
        ("transformer_blocks.0.attn.to_q.qweight", lambda t: t[:, :-1], "has shape"),
        ("proj_out.weight", lambda t: t.t(), "has shape"),
    ],
)
def test_header_lies_are_refused(tmp_path, model, name, fn, message):
    headers = read_headers([_save(tmp_path, _mutated(model, name, fn))])
    with pytest.raises(CheckpointError) as e:
        check_headers(expected_state(model), headers, "ck")
    assert message in str(e.value) and name in str(e.value)


def test_missing_and_extra_tensors(tmp_path, model):
    state = dict(model.state_dict())
    state.pop(KEPT)
    with pytest.raises(CheckpointError, match="missing"):
        check_headers(expected_state(model), read_headers([_save(tmp_path, state)]), "ck")
    state = {**model.state_dict(), "evil": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="unexpected"):
        check_headers(expected_state(model), read_headers([_save(tmp_path, state, "e.safetensors")]), "ck")


def test_corrupted_files(tmp_path, model):
    path = _save(tmp_path, model.state_dict())
    data = path.read_bytes()
    for i, bad in enumerate((data[:100], data[:8], b"", b"\xff" * 64, data[:8] + b"[" + data[9:])):
        p = tmp_path / f"bad{i}.safetensors"
        p.write_bytes(bad)
        with pytest.raises(CheckpointError, match="truncated or corrupted"):
            read_headers([p])


def test_a_tensor_in_two_shards(tmp_path, model):
    a = _save(tmp_path, {KEPT: model.state_dict()[KEPT]}, "a.safetensors")
    b = _save(tmp_path, {KEPT: model.state_dict()[KEPT]}, "b.safetensors")
    with pytest.raises(CheckpointError, match="also stored in a.safetensors"):
        read_headers([a, b])


def test_index_against_shards(tmp_path, model):
    sd = model.state_dict()
    names = sorted(sd)
    a = _save(tmp_path, {k: sd[k] for k in names[:10]}, "a.safetensors")
    b = _save(tmp_path, {k: sd[k] for k in names[10:]}, "b.safetensors")
    headers = read_headers([a, b])
    wm = {k: ("a.safetensors" if i < 10 else "b.safetensors") for i, k in enumerate(names)}
    total = sum(v.numel() * v.element_size() for v in sd.values())
    check_index_headers(wm, headers, total, "idx")
    with pytest.raises(CheckpointError, match="total_size"):
        check_index_headers(wm, headers, total + 1, "idx")
    with pytest.raises(CheckpointError, match="index puts"):
        check_index_headers({**wm, names[0]: "b.safetensors"}, headers, None, "idx")
    with pytest.raises(CheckpointError, match="does not list"):
        check_index_headers({k: v for k, v in wm.items() if k != names[0]}, headers, None, "idx")
    with pytest.raises(CheckpointError, match="no shard stores"):
        check_index_headers({**wm, "ghost": "a.safetensors"}, headers, None, "idx")


def test_scale_bounds():
    ok = torch.tensor([0.0, 8e-5, 0.02, 0.05, 0.25], dtype=torch.bfloat16)
    check_scale("s", ok, "ck")
    for bad, message in (
        ([0.02, float("nan")], "non-finite"),
        ([0.02, float("inf")], "non-finite"),
        ([0.02, -0.01], "negative"),
        ([1e3, 2 * SCALE_MAX], "above any trained weight"),
        ([0.02, 0.02, 0.02 * 2**16], "x its layer's median"),
    ):
        with pytest.raises(FormatError, match=message):
            check_scale("s", torch.tensor(bad, dtype=torch.bfloat16), "ck")


@pytest.mark.parametrize("value", [8e-5, 0.02, 0.25, 3.0])
def test_flipped_bits_that_blow_a_scale_up_are_caught(value):
    # Each of the 16 single-bit flips of one scale: every flip that multiplies it by more than
    # the allowed spread (or makes it inf/NaN) is refused; the top exponent bit is always one.
    scales = torch.full((64,), value, dtype=torch.bfloat16)
    refused = []
    for bit in range(16):
        bad = scales.clone()
        bad.view(torch.int16)[5] ^= 1 << bit
        new = float(bad[5])
        must = not (abs(new) < float("inf")) or new < 0 or new >= SCALE_MAX or new > SCALE_SPREAD * float(scales[0])
        try:
            check_scale("s", bad, "ck")
        except FormatError:
            refused.append(bit)
            continue
        assert not must, (bit, new)
    assert 14 in refused or 15 in refused  # top exponent bit (x 2^128) or the sign bit
    assert 15 in refused  # a negative scale


def test_values_after_load(model):
    check_values(model, "ck")
    for name, poison in ((KEPT, float("nan")), (BIAS, float("inf")), ("norm_out.linear.weight", float("nan"))):
        m = bitflux.quantize(tiny_flux(dtype=torch.float32), bitflux.QuantConfig(format="base3"))
        with torch.no_grad():
            dict(m.named_parameters())[name].view(-1)[3] = poison
        with pytest.raises(FormatError, match=name):
            check_values(m, "ck")
    m = bitflux.quantize(tiny_flux(dtype=torch.float32), bitflux.QuantConfig(format="2bit"))
    m.transformer_blocks[0].attn.to_q.qweight[0, 0] = 0xFF  # 0b11 is no 2-bit code
    with pytest.raises(FormatError, match="invalid 2bit code"):
        check_values(m, "ck")
    m = bitflux.quantize(tiny_flux(dtype=torch.float32), bitflux.QuantConfig(format="2bit"))
    m.transformer_blocks[0].attn.to_q.scale[0] = 3e4
    with pytest.raises(FormatError, match="to_q.scale"):
        check_values(m, "ck")


@pytest.mark.parametrize("fmt", ["2bit", "base3"])
def test_codes_valid_agrees_with_the_packing_checks(fmt):
    from bitflux.packing import invalid_2bit, invalid_base3, pack
    from bitflux.tensorcheck import codes_valid

    invalid = invalid_2bit if fmt == "2bit" else invalid_base3
    g = torch.Generator().manual_seed(0)
    for n, k in ((1, 1), (3, 7), (17, 33), (64, 250)):
        packed = pack(torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8), fmt)
        assert codes_valid(packed, fmt) and not invalid(packed)
    for byte in range(256):  # every byte value alone: both checks say the same
        t = torch.tensor([[byte]], dtype=torch.uint8)
        assert codes_valid(t, fmt) == (not invalid(t)), byte


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_check_finds_one_bad_value_anywhere(dtype):
    from bitflux.tensorcheck import _finite

    g = torch.Generator().manual_seed(1)
    for n in (1, 7, 1000, 70_001):
        x = torch.randn(n, generator=g).to(dtype)
        assert _finite(x)
        for pos in {0, n // 2, n - 1, int(torch.randint(0, n, (1,), generator=g))}:
            for bad in (float("nan"), float("inf"), float("-inf")):
                y = x.clone()
                y[pos] = bad
                assert not _finite(y), (n, pos, bad)
                assert not _finite(y.reshape(1, -1).expand(3, -1))  # non-contiguous views too
    assert _finite(torch.empty(0, dtype=dtype))
