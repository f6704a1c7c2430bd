"""Loading a quantised checkpoint never allocates the dense weights: peak RSS grows by about the
packed size, not the bf16 size. Measured in a fresh process as the growth of the kernel's peak-RSS
mark (VmHWM, reset through /proc/self/clear_refs), next to a positive control (building the same
model densely) that shows the measurement can see a dense copy."""

import subprocess
import sys
import textwrap

import torch
from conftest import tiny_flux

import bitflux
from bitflux.checkpoint import tensor_bytes

WIDE = dict(
    attention_head_dim=128,
    num_attention_heads=8,
    joint_attention_dim=1024,
    pooled_projection_dim=256,
    num_layers=1,
    num_single_layers=1,
    axes_dims_rope=(16, 56, 56),
)

CHILD = textwrap.dedent(
    """
    import sys, torch, bitflux
    from diffusers import FluxTransformer2DModel
    def hwm():
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
        return int(line.split()[1]) * 1024
    cfg = {cfg!r}
    # warm the code paths (imports, meta construction), then reset the peak mark to current RSS
    with torch.device("meta"):
        FluxTransformer2DModel(**cfg)
    open("/proc/self/clear_refs", "w").write("5")
    base = hwm()
    if sys.argv[1] == "load":
        m = bitflux.load(sys.argv[2])
    else:
        m = FluxTransformer2DModel(**cfg).to(torch.bfloat16)
    print(hwm() - base)
    """
)


def _peak_growth(mode: str, path: str) -> int:
    code = CHILD.format(cfg=WIDE)
    out = subprocess.run([sys.executable, "-c", code, mode, path], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_load_peak_memory_is_near_packed_size(tmp_path):
    model = bitflux.quantize(tiny_flux(dtype=torch.bfloat16, **WIDE))
    packed = tensor_bytes(model.state_dict())
    dense = 2 * sum(p.numel() for p in tiny_flux(**WIDE).parameters())
    bitflux.save(model, tmp_path / "q")
    del model
    assert dense > 3.5 * packed  # the test is meaningful only if the two are far apart
    dense_growth = _peak_growth("dense", "")
    load_growth = _peak_growth("load", str(tmp_path / "q"))
    assert dense_growth > 0.8 * dense, "positive control: a dense build must show up in VmHWM"
    # packed tensors + the mmapped file pages they were read from; far below one dense copy
    assert load_growth < min(2.5 * packed, 0.6 * dense), (load_growth, packed, dense)
    print(f"load peak growth {load_growth/1e6:.1f} MB, packed {packed/1e6:.1f} MB, dense bf16 {dense/1e6:.1f} MB (control grew {dense_growth/1e6:.1f} MB)")
