"""FLUX.1-dev's exact config (width 3072, 24 heads, the real embedders) at 1 double + 1 single
block, written as sharded bf16 safetensors with random weights: quantised while loading, loaded and
saved again, each in a fresh process whose peak-RSS growth must stay below the packed size plus
one shard (plus the transient of ternarising the largest tensor), never near the bf16 size."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

pytestmark = pytest.mark.slow

SHARD = 200_000_000

CHILD = textwrap.dedent(
    """
    import json, sys, torch, bitflux
    from bitflux.sources import quantize_from
    def hwm():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
    open("/proc/self/clear_refs", "w").write("5")
    base = hwm()
    mode, src, out = sys.argv[1:4]
    if mode == "quantize":
        m = quantize_from(src, bitflux.QuantConfig())
        bitflux.save(m, out, max_shard_bytes=100_000_000)
    elif mode == "load":
        m = bitflux.load(src)
    else:
        m = bitflux.load(src)
        m.save_pretrained(out, max_shard_size="100MB")
    x = {"growth": hwm() - base}
    if mode != "save":
        torch.manual_seed(0)
        cfg = m.config
        with torch.no_grad():
            y = m(hidden_states=torch.randn(1, 16, cfg.in_channels, dtype=m.dtype),
                  encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, dtype=m.dtype),
                  pooled_projections=torch.randn(1, cfg.pooled_projection_dim, dtype=m.dtype),
                  timestep=torch.tensor([0.5], dtype=m.dtype), guidance=torch.tensor([3.5], dtype=m.dtype),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3)).sample
        torch.save(y, out + ".y.pt") if mode == "quantize" else torch.save(y, src + ".y2.pt")
    print(json.dumps(x))
    """
)


def _run(mode: str, src: str, out: str, env: dict | None = None) -> int:
    r = subprocess.run([sys.executable, "-c", CHILD, mode, src, out], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["growth"]


def _bytes(files) -> tuple[int, int]:
    """(total bytes, largest tensor bytes) from safetensors headers."""
    total = largest = 0
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                t = fh.get_slice(k)
                n = torch.empty(0, dtype={"BF16": torch.bfloat16, "U8": torch.uint8, "F32": torch.float32}[t.get_dtype()]).element_size()
                for d in t.get_shape():
                    n *= d
                total += n
                largest = max(largest, n)
    return total, largest


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    from bitflux.bench.synth import write_random_flux

    return write_random_flux(tmp_path_factory.mktemp("real") / "dense", num_layers=1, num_single_layers=1, shard_bytes=SHARD)


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    """The same model in BFL's one-file layout (1.09 GB), written once; the tests only read it."""
    from bitflux.bench.synth import write_random_flux_single_file

    return write_random_flux_single_file(tmp_path_factory.mktemp("real1") / "flux1-dev-1+1.safetensors",
                                         num_layers=1, num_single_layers=1)


def test_single_file_in_bfl_layout_quantises_like_the_sharded_dir(dense, single_file):
    """BFL's one-file layout (fused qkv, linear1/linear2) through from_single_file, config derived offline."""
    import bitflux
    from bitflux.sources import quantize_from

    a = quantize_from(str(single_file), bitflux.QuantConfig()).state_dict()
    b = quantize_from(str(dense), bitflux.QuantConfig()).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_real_width_quantise_load_save_stay_near_packed_size(dense, tmp_path):
    src = dense
    dense, largest = _bytes(sorted(src.glob("*.safetensors")))
    q = tmp_path / "q"
    grow_q = _run("quantize", str(src), str(q))
    packed, _ = _bytes(sorted(q.glob("*.safetensors")))
    assert dense > 3.5 * packed  # the bounds below are meaningful only if the two are far apart
    # one shard mapped + the fp32 transient of ternarising its largest tensor + the packed model
    assert grow_q < packed + SHARD + 3 * 2 * largest, (grow_q, packed, dense)
    assert grow_q < 0.75 * dense
    grow_l = _run("load", str(q), str(tmp_path / "unused"))
    assert grow_l < 1.6 * packed, (grow_l, packed)
    grow_s = _run("save", str(q), str(tmp_path / "q2"))
    assert grow_s < 1.6 * packed + 100_000_000, (grow_s, packed)
    # the loaded model computes what the freshly quantised one did, and the re-save is bit-identical
    assert torch.equal(torch.load(str(q) + ".y.pt"), torch.load(str(q) + ".y2.pt"))
    from safetensors.torch import load_file

    a, b = {}, {}
    for f in q.glob("*.safetensors"):
        a.update(load_file(f))
    for f in (tmp_path / "q2").glob("*.safetensors"):
        b.update(load_file(f))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"dense {dense/1e6:.0f} MB, packed {packed/1e6:.0f} MB: peak growth quantise {grow_q/1e6:.0f} MB, load {grow_l/1e6:.0f} MB, save {grow_s/1e6:.0f} MB")


def test_real_width_single_file_quantise_stays_near_packed_size(single_file, tmp_path):
    """The BFL single file is rewritten shard by shard (bfl.SHARD_BYTES) and quantised as a directory:
    its peak growth is bounded like the directory's plus one conversion shard, never the whole file."""
    from bitflux.bfl import SHARD_BYTES

    f = single_file
    size, largest = _bytes([f])
    q = tmp_path / "q"
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    grow = _run("quantize", str(f), str(q), env={**os.environ, "TMPDIR": str(tmp)})
    packed, _ = _bytes(sorted(q.glob("*.safetensors")))
    assert grow < packed + 2 * SHARD_BYTES + 3 * 2 * largest, (grow, packed, size)
    assert grow < 0.8 * size, (grow, size)
    assert not any(tmp.iterdir())  # the converted copy went to TMPDIR and is gone
    print(f"single file {size/1e6:.0f} MB, packed {packed/1e6:.0f} MB: peak growth quantise {grow/1e6:.0f} MB")


def test_kohya_and_bfl_prefixed_loras_land_on_the_real_width_ternary_layers(dense):
    """diffusers' FLUX LoRA converters hard-code FLUX.1's widths (linear1 split 3072 x 3 + 12288):
    at real width, a kohya LoRA on single_blocks.0.linear1 and a BFL-named (`diffusion_model.`) one
    on double_blocks.0.img_attn.qkv reach the ternary q/k/v/proj_mlp as base + scale * B A x."""
    pytest.importorskip("peft")
    from diffusers import FluxPipeline

    import bitflux
    from bitflux import TernaryLinear
    from bitflux.sources import quantize_from

    model = quantize_from(str(dense), bitflux.QuantConfig())
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=model)
    g = torch.Generator().manual_seed(0)
    d, r, alpha = 3072, 4, 2.0
    down1, up1 = torch.randn(r, d, generator=g) * 0.05, torch.randn(3 * d + 4 * d, r, generator=g) * 0.05
    down2, up2 = torch.randn(r, d, generator=g) * 0.05, torch.randn(3 * d, r, generator=g) * 0.05
    pipe.load_lora_weights({
        "lora_unet_single_blocks_0_linear1.lora_down.weight": down1,
        "lora_unet_single_blocks_0_linear1.lora_up.weight": up1,
        "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(alpha),
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": down2,
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": up2,
        "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(alpha),
    }, adapter_name="real")
    single, double = model.single_transformer_blocks[0], model.transformer_blocks[0].attn
    targets = [(single.attn.to_q, down1, up1[:d]), (single.attn.to_k, down1, up1[d : 2 * d]),
               (single.attn.to_v, down1, up1[2 * d : 3 * d]), (single.proj_mlp, down1, up1[3 * d :]),
               (double.to_q, down2, up2[:d]), (double.to_k, down2, up2[d : 2 * d]), (double.to_v, down2, up2[2 * d :])]
    x = torch.randn(2, 3, d, generator=g)
    for layer, a, b in targets:
        assert isinstance(layer.base_layer, TernaryLinear)
        with torch.no_grad():
            got, base = layer(x).float(), layer.base_layer(x).float()
        delta = alpha / r * (x @ a.T @ b.T)  # the LoRA's own term, checked on its own scale
        assert (got - base - delta).abs().max() <= 1e-2 * delta.abs().max(), layer


def test_streamed_bfl_conversion_equals_the_sharded_dir_tensor_for_tensor(dense, single_file, tmp_path):
    """bfl.to_diffusers_dir (the low-memory single-file path) splits and renames exactly."""
    from safetensors.torch import load_file

    from bitflux.bfl import to_diffusers_dir

    seen = []
    out = to_diffusers_dir(single_file, tmp_path / "conv", shard_bytes=200_000_000, progress=seen.append)
    assert len(list(out.glob("*.safetensors"))) == len(seen) > 1  # really sharded, one call per shard
    want = {}
    for p in sorted(dense.glob("*.safetensors")):
        want.update(load_file(str(p)))
    got = {}
    for p in sorted(out.glob("*.safetensors")):
        got.update(load_file(str(p)))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((out / "config.json").read_text()) == json.loads((dense / "config.json").read_text()) | {"_class_name": "FluxTransformer2DModel"}
