"""Mutations of a bitflux checkpoint folder, for the hostile-checkpoint corpus (test_corpus.py).

Each `Case` damages a copy of a clean checkpoint in one way: a config field, the index, a
safetensors header, tensor bytes, or the kind of a file (FIFO, symlink, directory). `reseal`
says whether the integrity record is recomputed afterwards, as a tool that rewrote the files
(or an attacker) would: then only the validators stand between the damage and a wrong result.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import bitflux
from bitflux.cli import main
from bitflux.integrity import DEFAULT_ALGORITHM, config_digest, file_digest

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"


@dataclass(frozen=True)
class Case:
    name: str
    mutate: Callable[[Path], None]
    reseal: bool = False
    sharded: bool = False  # applies to the sharded copy
    formats: tuple[str, ...] = ("2bit", "base3")


# ------------------------------------------------------------------------------------- helpers
def reseal(d: Path) -> None:
    """Recompute the integrity record for the folder as it now is (regular files only)."""
    cfg = json.loads((d / "config.json").read_text())
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict):
        return
    qc.pop("integrity", None)
    files = {}
    for p in sorted(d.iterdir()):
        if p.name != "config.json" and p.suffix in (".json", ".safetensors") and p.is_file():
            size, digest = file_digest(p)
            files[p.name] = {"bytes": size, "hash": digest}
    qc["integrity"] = {"algorithm": DEFAULT_ALGORITHM, "config": config_digest(cfg), "files": files}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))


def edit_config(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        fn(cfg)
        (d / "config.json").write_text(json.dumps(cfg, indent=2))

    return mutate


def set_key(key: str, value, qc: bool = False) -> Callable[[Path], None]:
    def fn(cfg: dict) -> None:
        target = cfg["quantization_config"] if qc else cfg
        if value is _DELETE:
            target.pop(key, None)
        else:
            target[key] = value

    return edit_config(fn)


_DELETE = object()


def write_bytes(name: str, data: bytes) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        target = d / name
        if target.is_symlink() or target.exists():
            target.unlink()
        target.write_bytes(data)

    return mutate


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(path: Path, header: dict, data: bytes, n: int | None = None) -> None:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text) if n is None else n) + text + data)


def first_shard(d: Path) -> Path:
    if (d / INDEX).exists():
        return d / sorted(set(json.loads((d / INDEX).read_text())["weight_map"].values()))[0]
    return d / WEIGHTS


def shard_of(d: Path, tensor: str) -> Path:
    if (d / INDEX).exists():
        return d / json.loads((d / INDEX).read_text())["weight_map"][tensor]
    return d / WEIGHTS


def edit_header(tensor: str, fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        path = shard_of(d, tensor)
        header, data = read_st(path)
        fn(header[tensor])
        write_st(path, header, data)

    return mutate


def edit_header_raw(fn: Callable[[dict, bytes], tuple[dict, bytes, int | None]]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        path = first_shard(d)
        header, data = read_st(path)
        write_st(path, *fn(header, data))

    return mutate


_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8}


def edit_tensor(tensor: str, fn: Callable[[torch.Tensor], None]) -> Callable[[Path], None]:
    """Change a stored tensor's values in place (same dtype and shape)."""

    def mutate(d: Path) -> None:
        path = shard_of(d, tensor)
        header, data = read_st(path)
        h = header[tensor]
        start, end = h["data_offsets"]
        buf = bytearray(data)
        t = torch.frombuffer(buf[start:end], dtype=_TORCH[h["dtype"]]).clone()
        fn(t)
        buf[start:end] = t.view(torch.uint8).numpy().tobytes()
        write_st(path, header, bytes(buf))

    return mutate


def flip_bit(pos_fraction: float, bit: int, name: str = WEIGHTS) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        path = d / name if name != WEIGHTS else first_shard(d)
        data = bytearray(path.read_bytes())
        data[int(pos_fraction * (len(data) - 1))] ^= 1 << bit
        path.write_bytes(bytes(data))

    return mutate


def replace_with(name: str, kind: str) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        path = first_shard(d) if name == WEIGHTS else d / name
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        elif os.path.lexists(path):
            path.unlink()
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "dir":
            path.mkdir()
        elif kind == "devzero":
            path.symlink_to("/dev/zero")
        elif kind == "dangling":
            path.symlink_to(d / "nowhere")
        elif kind == "loop":
            path.symlink_to(path)
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "sparse":  # 100 MB of zeros on disk for free: beyond the JSON size limit
            with open(path, "wb") as f:
                f.truncate(100 * 1024**2)
        elif kind != "missing":
            raise ValueError(kind)

    return mutate


def truncate(name: str, keep: float) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        path = first_shard(d) if name == WEIGHTS else d / name
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    return mutate


def edit_index(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        index = json.loads((d / INDEX).read_text())
        fn(index)
        (d / INDEX).write_text(json.dumps(index))

    return mutate


# --------------------------------------------------------------------------------------- cases
KEPT_BIAS = "x_embedder.bias"
TERNARY_BIAS = "transformer_blocks.0.attn.to_q.bias"
EMBEDDER = "time_text_embed.timestep_embedder.linear_1.weight"
NORM = "transformer_blocks.0.attn.norm_q.weight"
SCALE = "single_transformer_blocks.1.proj_out.scale"
QWEIGHT = "transformer_blocks.1.ff.net.0.proj.qweight"

MODEL_KEYS = (
    "patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers", "attention_head_dim",
    "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "axes_dims_rope",
)  # fmt: skip
BAD_VALUES = (None, -1, 0, 3, 99, 1_000_000, 2.5, True, "64", [], {"a": 1}, _DELETE)
QC_VALUES = {
    "quant_method": ("bnb", None, 1, _DELETE),
    "format": ("4bit", None, 2, "BASE3", _DELETE),
    "format_version": (0, 2, "1", True, 1.0, None, _DELETE),
    "init": ("magic", None, 1),
    "activations": ("int4", None, ["bf16"]),
    "policy": (None, 3, "nosuch", "generic", ""),
    "modules_not_converted": (None, 3, "proj_out", [1], ["a..b"], [], ["proj_out", "proj_out"], ["transformer_blocks.0.attn.to_q"]),
    "source": (3, None, ["toy"]),
    "integrity": (None, [], {"algorithm": "md5"}),
    "extra_key": (1,),
}


def _config_cases() -> list[Case]:
    cases = []
    for i, key in enumerate(MODEL_KEYS):
        for j, v in enumerate(BAD_VALUES):
            label = "delete" if v is _DELETE else json.dumps(v)
            fmt = ("2bit", "base3")[(i + j) % 2]  # the schema decides before the format matters: one each
            cases.append(Case(f"config.{key}={label}", set_key(key, v), reseal=True, formats=(fmt,)))
    for axes in ([8, 8, 8], [8, 12], [8, 12, 12, 0], [4, 14, 14], [7, 13, 12], [16, 8, 8]):
        cases.append(Case(f"config.axes_dims_rope={axes}", set_key("axes_dims_rope", axes), reseal=True))
    cases.append(Case("config._class_name=AutoencoderKL", set_key("_class_name", "AutoencoderKL"), reseal=True))
    cases.append(Case("config._class_name=os.system", set_key("_class_name", "os.system"), reseal=True))
    cases.append(Case("config._class_name=5", set_key("_class_name", 5), reseal=True))
    cases.append(Case("config.unknown_key", set_key("unknown_key", 1), reseal=True))
    cases.append(Case("config.heads_x_dim_swapped", edit_config(lambda c: c.update(num_attention_heads=c["attention_head_dim"], attention_head_dim=c["num_attention_heads"])), reseal=True))
    for key, values in QC_VALUES.items():
        for v in values:
            label = "delete" if v is _DELETE else json.dumps(v)
            cases.append(Case(f"qc.{key}={label}", set_key(key, v, qc=True), reseal=key != "integrity"))
    cases.append(Case("qc=null", set_key("quantization_config", None), reseal=False))
    cases.append(Case("qc=list", set_key("quantization_config", [1]), reseal=False))
    # unsealed config edits: the recorded config hash must catch them
    cases.append(Case("config.num_layers=3 unsealed", set_key("num_layers", 3)))
    cases.append(Case("config.source unsealed", set_key("source", "elsewhere", qc=True)))
    cases.append(Case("config reindented", edit_config(lambda c: None)))  # same content: must load
    return cases


def _file_cases() -> list[Case]:
    deep = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    cases = [
        Case("config.json=garbage", write_bytes("config.json", b"garbage{")),
        Case("config.json=empty", write_bytes("config.json", b"")),
        Case("config.json=not-utf8", write_bytes("config.json", b'{"a": "\xff\xfe"}')),
        Case("config.json=array", write_bytes("config.json", b"[1, 2]")),
        Case("config.json=deep", write_bytes("config.json", deep)),
        Case("config.json=NaN", write_bytes("config.json", b'{"num_layers": NaN}')),
        Case("config.json=dupkey", write_bytes("config.json", b'{"_class_name": "FluxTransformer2DModel", "_class_name": "X"}')),
    ]
    for kind in ("fifo", "dir", "devzero", "dangling", "loop", "missing", "empty", "sparse"):
        cases.append(Case(f"config.json->{kind}", replace_with("config.json", kind)))
    for kind in ("fifo", "dir", "devzero", "dangling", "loop", "missing", "empty"):
        cases.append(Case(f"weights->{kind}", replace_with(WEIGHTS, kind)))
        cases.append(Case(f"weights->{kind} resealed", replace_with(WEIGHTS, kind), reseal=kind in ("empty", "missing")))
    for keep in (0.0001, 0.5, 0.999):
        cases.append(Case(f"weights truncated to {keep}", truncate(WEIGHTS, keep)))
        cases.append(Case(f"weights truncated to {keep} resealed", truncate(WEIGHTS, keep), reseal=True))
    cases.append(Case("extra unrecorded shard", write_bytes("extra.safetensors", b"\0" * 16)))
    cases.append(Case("extra json garbage", write_bytes("calibration.json", b"garbage")))
    cases.append(Case("extra README (not loaded)", write_bytes("README.md", b"# hi")))
    return cases


def _header_cases() -> list[Case]:
    def dtype(name, new):
        return edit_header(name, lambda h: h.update(dtype=new))

    def shape(name, fn):
        return edit_header(name, lambda h: h.update(shape=fn(h["shape"])))

    cases = []
    for tensor, lie in (
        (KEPT_BIAS, "I32"), (TERNARY_BIAS, "I32"), (EMBEDDER, "I32"), (NORM, "U32"), (KEPT_BIAS, "F64_"),
        (SCALE, "F16"), (SCALE, "I16"), (SCALE, "U16"), (QWEIGHT, "I8"), (QWEIGHT, "BOOL"), (QWEIGHT, "F8_E4M3"),
    ):  # fmt: skip
        for sealed in (False, True):
            cases.append(Case(f"header {tensor} dtype->{lie}{' resealed' if sealed else ''}", dtype(tensor, lie), reseal=sealed))
    for tensor in (KEPT_BIAS, SCALE, QWEIGHT, EMBEDDER):
        for sealed in (False, True):
            tag = " resealed" if sealed else ""
            cases.append(Case(f"header {tensor} shape split{tag}", shape(tensor, lambda s: [s[0] // 2, 2 * math_prod(s[1:])]), reseal=sealed))
            cases.append(Case(f"header {tensor} shape reversed{tag}", shape(tensor, lambda s: list(reversed(s)) if len(s) > 1 else [1, s[0]]), reseal=sealed))
            cases.append(Case(f"header {tensor} shape negative{tag}", shape(tensor, lambda s: [-s[0], *s[1:]]), reseal=sealed))
    cases += [
        Case("header offsets overlap", edit_header(KEPT_BIAS, lambda h: h.update(data_offsets=[0, h["data_offsets"][1] - h["data_offsets"][0]])), reseal=True),
        Case("header offsets past end", edit_header(KEPT_BIAS, lambda h: h.update(data_offsets=[h["data_offsets"][0], 10**12])), reseal=True),
        Case("header length huge", edit_header_raw(lambda h, d: (h, d, 2**62)), reseal=True),
        Case("header length zero", edit_header_raw(lambda h, d: (h, d, 0)), reseal=True),
        Case("header length past end", edit_header_raw(lambda h, d: (h, d[:100], 10**6)), reseal=True),
        Case("header tensor renamed", edit_header_raw(lambda h, d: ({("evil" if k == KEPT_BIAS else k): v for k, v in h.items()}, d, None)), reseal=True),
        Case("header tensor dropped", edit_header_raw(lambda h, d: (_drop(h, d, KEPT_BIAS), d, None)), reseal=True),
        Case("header metadata not str", edit_header_raw(lambda h, d: ({**h, "__metadata__": {"format": 1}}, d, None)), reseal=True),
        Case("header is a list", lambda d: first_shard(d).write_bytes(struct.pack("<Q", 8) + b"[1,2,3] " + b"\0" * 8), reseal=True),
    ]
    return cases


def math_prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _drop(header: dict, data: bytes, name: str) -> dict:
    # Leave the bytes in place and move nothing: the header no longer covers the buffer exactly.
    return {k: v for k, v in header.items() if k != name}


def _value_cases() -> list[Case]:
    def nan_at(i):
        return lambda t: t.view(-1).__setitem__(i, float("nan"))

    cases = []
    for tensor in (KEPT_BIAS, TERNARY_BIAS, EMBEDDER, NORM):
        for val in ("nan", "inf", "-inf"):
            fn = (lambda v: lambda t: t.view(-1).__setitem__(3, float(v)))(val)
            cases.append(Case(f"{tensor}[3]={val}", edit_tensor(tensor, fn)))
            cases.append(Case(f"{tensor}[3]={val} resealed", edit_tensor(tensor, fn), reseal=True))
    for val in ("nan", "inf", "-0.5", "3e4", "1e30"):
        fn = (lambda v: lambda t: t.view(-1).__setitem__(2, float(v)))(val)
        cases.append(Case(f"scale[2]={val}", edit_tensor(SCALE, fn)))
        cases.append(Case(f"scale[2]={val} resealed", edit_tensor(SCALE, fn), reseal=True))

    def top_exponent_flip(t):
        t.view(torch.int16)[4] ^= 1 << 14

    cases.append(Case("scale top exponent bit flipped", edit_tensor(SCALE, top_exponent_flip)))
    cases.append(Case("scale top exponent bit flipped resealed", edit_tensor(SCALE, top_exponent_flip), reseal=True))
    cases.append(Case("2bit qweight 0xFF resealed", edit_tensor(QWEIGHT, lambda t: t.view(-1).__setitem__(7, 0xFF)), reseal=True, formats=("2bit",)))
    cases.append(Case("base3 qweight invalid byte resealed", edit_tensor(QWEIGHT, lambda t: t.view(-1).__setitem__(7, _invalid_base3())), reseal=True, formats=("base3",)))
    cases.append(Case("all weight bytes zero", lambda d: first_shard(d).write_bytes(b"\0" * first_shard(d).stat().st_size)))
    rng = random.Random(24)
    for i in range(24):  # single flipped bits anywhere in the file: only the hash can see most of them
        cases.append(Case(f"bit flip #{i}", flip_bit(rng.random(), rng.randrange(8))))
    for i in range(4):
        cases.append(Case(f"config.json bit flip #{i}", flip_bit(rng.random(), rng.randrange(7), "config.json")))
    return cases


def _invalid_base3() -> int:
    from bitflux.packing import _VALID_BASE3

    return int((~_VALID_BASE3).nonzero()[0])


def _index_cases() -> list[Case]:
    def wm(fn):
        return edit_index(lambda i: i.update(weight_map=fn(i["weight_map"])))

    cases = [
        Case("index weight_map=list", wm(lambda m: list(m.items()))),
        Case("index weight_map=null", wm(lambda m: None)),
        Case("index weight_map={}", wm(lambda m: {})),
        Case("index weight_map int values", wm(lambda m: {k: 1 for k in m})),
        Case("index weight_map ../x", wm(lambda m: {**m, KEPT_BIAS: "../" + m[KEPT_BIAS]})),
        Case("index weight_map absolute", wm(lambda m: {**m, KEPT_BIAS: "/etc/passwd"})),
        Case("index weight_map missing file", wm(lambda m: {**m, KEPT_BIAS: "nothere.safetensors"})),
        Case("index weight_map wrong shard", wm(lambda m: {**m, KEPT_BIAS: sorted(set(m.values()))[-1] if m[KEPT_BIAS] != sorted(set(m.values()))[-1] else sorted(set(m.values()))[0]})),
        Case("index weight_map drops a tensor", wm(lambda m: {k: v for k, v in m.items() if k != KEPT_BIAS})),
        Case("index weight_map extra tensor", wm(lambda m: {**m, "evil": next(iter(m.values()))})),
        Case("index total_size wrong", edit_index(lambda i: i["metadata"].update(total_size=i["metadata"]["total_size"] + 1))),
        Case("index total_size str", edit_index(lambda i: i["metadata"].update(total_size="1"))),
        Case("index metadata list", edit_index(lambda i: i.update(metadata=[]))),
        Case("index = garbage", write_bytes(INDEX, b"garbage")),
        Case("index = array", write_bytes(INDEX, b"[]")),
        Case("index -> fifo", replace_with(INDEX, "fifo")),
        Case("index -> devzero", replace_with(INDEX, "devzero")),
        Case("index -> missing", replace_with(INDEX, "missing")),
        Case("second shard -> fifo", lambda d: replace_with(sorted(p.name for p in d.glob("*-of-*.safetensors"))[-1], "fifo")(d)),
        Case("second shard missing", lambda d: replace_with(sorted(p.name for p in d.glob("*-of-*.safetensors"))[-1], "missing")(d)),
    ]
    out = []
    for c in cases:
        out.append(Case(c.name, c.mutate, reseal=False, sharded=True))
        out.append(Case(c.name + " resealed", c.mutate, reseal=True, sharded=True))
    return out


def all_cases() -> list[Case]:
    return _config_cases() + _file_cases() + _header_cases() + _value_cases() + _index_cases()


# ------------------------------------------------------------------------------ clean models
def build_clean(root: Path) -> dict:
    """Per format: a sealed checkpoint of the bundled toy, a sharded copy, their output and inspect report."""
    from diffusers import FluxTransformer2DModel

    from bitflux.toy import bundled_path

    toy = bundled_path("toy")
    out = {}
    for fmt in ("2bit", "base3"):
        full = FluxTransformer2DModel.from_pretrained(toy / "transformer")
        model = bitflux.quantize(full, bitflux.QuantConfig(format=fmt, source=str(toy)))
        single = bitflux.save(model, root / fmt)
        sharded = bitflux.save(model, root / f"{fmt}-sharded", max_shard_bytes=300_000)
        assert len(list(sharded.glob("*.safetensors"))) > 1
        y = forward(bitflux.load(single))
        assert torch.isfinite(y).all()
        assert torch.equal(forward(bitflux.load(sharded)), y)
        out[fmt] = {
            "single": single,
            "sharded": sharded,
            "output": y,
            "single-inspect": inspect_json(single)[1],
            "sharded-inspect": inspect_json(sharded)[1],
        }
    return out


def forward(model) -> torch.Tensor:
    """One transformer forward on fixed random inputs."""
    c = model.config
    g = torch.Generator().manual_seed(0)
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(1, 9, c.in_channels, generator=g).to(dtype),
            encoder_hidden_states=torch.randn(1, 4, c.joint_attention_dim, generator=g).to(dtype),
            pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g).to(dtype),
            timestep=torch.tensor([0.5], dtype=dtype),
            img_ids=torch.zeros(9, 3),
            txt_ids=torch.zeros(4, 3),
        ).sample


def inspect_json(path: Path) -> tuple[int, dict | str]:
    """`bitflux inspect PATH --json` in-process: (0, report without its path) or (rc, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(["inspect", str(path), "--json"])
        except SystemExit as e:
            rc = e.code
    if rc == 0:
        report = json.loads(out.getvalue())
        report.pop("model", None)
        return rc, report
    return rc, err.getvalue().strip()


class Hang(Exception):
    """A case ran past its deadline."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise Hang in this thread after `seconds` (SIGALRM interrupts a blocking open/read too)."""

    def fire(signum, frame):
        raise Hang(f"no result after {seconds}s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def one_line(message: str) -> None:
    """An error message fit for the CLI: one line, no traceback."""
    assert message and "\n" not in message.strip() and "Traceback" not in message, message
