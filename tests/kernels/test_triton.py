"""Triton ternary kernels vs the torch reference, on the GPU or, without one, in the Triton interpreter.

Without CUDA, the kernels must run in the Triton interpreter, and triton decides interpreted vs
compiled when each `@triton.jit` function (its own `tl.cdiv`, `tl.max` included) is decorated,
i.e. at import. This module sets `TRITON_INTERPRET=1` before importing the kernels; if triton was
already imported in this process without it (diffusers imports triton, and tests/conftest.py
imports diffusers), the file re-runs itself in a fresh process with the variable set from the
start (one test, ~1 min). `test_really_interpreted` checks the kernels really are interpreted.

Tolerances: int8 activations are exact (ternary x int8 sums in int32), compared with torch.equal;
fp32 activations within 1e-5 relative (summation order); fp16 within 5e-3 relative (the reference
rounds its fp16 matmul to fp16 before scaling, the kernel keeps fp32 until the store).
Interpreter inputs are fp32 / fp16 (it loads bf16 as garbage); bf16 runs only on a GPU.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
ON_GPU = torch.cuda.is_available()
if not ON_GPU and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

from bitflux import kernels  # noqa: E402
from bitflux.config import ActPrecision, Backend, PackFormat  # noqa: E402
from bitflux.errors import BitfluxError  # noqa: E402
from bitflux.kernels import reference, triton_dispatch, triton_w158a8, triton_w158a16  # noqa: E402
from bitflux.packing import pack  # noqa: E402

DEV = "cuda" if ON_GPU else "cpu"
# No GPU, and triton was imported (e.g. by diffusers, via conftest) before TRITON_INTERPRET was set.
STALE = not ON_GPU and not triton_dispatch.interpreter_usable()

if STALE:

    def test_in_fresh_interpreter_process() -> None:
        """Triton was imported before TRITON_INTERPRET was set: run this file in a fresh process."""
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


# (M, N, K): M = 1 (AdaLN rows), 7, 300; K, N off the block sizes; K < 4 and K % 4 != 0 included.
SHAPES = [(1, 200, 301), (7, 70, 130), (3, 33, 3), (16, 64, 256), (300, 150, 257)]
SMALL_SHAPES = SHAPES[:4]
FP8_ACCUM_RTOL = 1e-5


def _problem(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    codes[0] = 0  # an all-zero channel
    qweight = pack(codes, PackFormat.TWO_BIT)
    scale = (torch.rand(n, generator=g) + 0.25).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    move = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    return move(x), move(qweight), move(scale), move(b)


def _ref(x, qweight, scale, bias, act: ActPrecision) -> torch.Tensor:
    k = x.shape[-1]
    return reference.ternary_linear(x, qweight, scale, bias, fmt=PackFormat.TWO_BIT, in_features=k, act=act)


def _triton(x, qweight, scale, bias, act: ActPrecision) -> torch.Tensor:
    k = x.shape[-1]
    return kernels.ternary_linear(
        x, qweight, scale, bias, fmt=PackFormat.TWO_BIT, in_features=k, act=act, backend=Backend.TRITON
    )


def _rel_err(y: torch.Tensor, r: torch.Tensor) -> float:
    return ((y.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-12)).item()


def _scale_for_launch(scale: torch.Tensor) -> torch.Tensor:
    """Direct kernel calls bypass the dispatcher, which widens bf16 scales for the interpreter."""
    return scale.float() if triton_dispatch.interpreted() else scale


skip_stale = pytest.mark.skipif(STALE, reason="re-run in a fresh process (see test_in_fresh_interpreter_process)")
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs CUDA")


@skip_stale
def test_really_interpreted() -> None:
    x = torch.zeros(2, 8, device=DEV)
    assert triton_dispatch.interpreted() == (not ON_GPU)
    assert triton_dispatch.supports(x, PackFormat.TWO_BIT, ActPrecision.BF16)
    assert triton_dispatch.supports(x, PackFormat.TWO_BIT, ActPrecision.INT8)
    assert not triton_dispatch.supports(x, PackFormat.BASE3, ActPrecision.BF16)
    if not ON_GPU:
        assert not triton_dispatch.supports(x, PackFormat.TWO_BIT, ActPrecision.FP8)
        assert not triton_dispatch.supports(x.bfloat16(), PackFormat.TWO_BIT, ActPrecision.BF16)


@skip_stale
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
def test_w158a16_matches_reference(m: int, n: int, k: int, dtype: torch.dtype, rtol: float) -> None:
    if m == 300 and dtype == torch.float16:
        pytest.skip("one large-M case per path keeps the interpreter run short")
    x, qw, s, b = _problem(m, n, k, dtype, bias=True)
    y = _triton(x, qw, s, b, ActPrecision.BF16)
    assert y.dtype == dtype and y.shape == (m, n)
    assert _rel_err(y, _ref(x, qw, s, b, ActPrecision.BF16)) < rtol


@skip_stale
@pytest.mark.parametrize(
    "split_k,split_dots,m,k", [(2, False, 5, 1000), (3, False, 5, 1000), (1, True, 7, 1001), (3, True, 1, 999)]
)
def test_w158a16_configs(split_k: int, split_dots: bool, m: int, k: int) -> None:
    """Split-K (atomic fp32 partial sums) and the 4-dots-per-step unpacking, K % 4 != 0 included."""
    x, qw, s, b = _problem(m, 40, k, torch.float32, bias=True, seed=1)
    cfg = triton_w158a16.TileConfig(16, 32, 64, split_k=split_k, split_dots=split_dots)
    y = triton_w158a16.w158a16_forward(x, qw, _scale_for_launch(s), b, k, cfg)
    assert _rel_err(y, _ref(x, qw, s, b, ActPrecision.BF16)) < 1e-5


@skip_stale
def test_leading_dims_and_no_bias() -> None:
    x, qw, s, _ = _problem(6, 24, 40, torch.float32, bias=False, seed=2)
    x3 = x.reshape(2, 3, 40)
    for act in (ActPrecision.BF16, ActPrecision.INT8):
        y = _triton(x3, qw, s, None, act)
        assert y.shape == (2, 3, 24)
        assert _rel_err(y, _ref(x3, qw, s, None, act)) < 1e-5


@skip_stale
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("fuse", [False, True], ids=["separate", "fused"])
def test_w158a8_int8_exact(m: int, n: int, k: int, fuse: bool) -> None:
    x, qw, s, b = _problem(m, n, k, torch.float32, bias=True, seed=3)
    amax = x.abs().amax(dim=1, keepdim=True)
    x[:, :3] = amax * torch.tensor([0.5, 1.5, -2.5], device=DEV) / 127  # exact .5 ties: round half to even
    cfg = triton_w158a8.A8Config(**{**triton_w158a8.pick_config(m, n, k).__dict__, "fuse_quant": fuse})
    y = triton_w158a8.w158a8_forward(x, qw, _scale_for_launch(s), b, k, fp8=False, config=cfg)
    r = _ref(x, qw, s, b, ActPrecision.INT8)
    if ON_GPU:  # the GPU may contract the epilogue's multiply-add into an fma
        assert _rel_err(y, r) < 1e-6
    else:
        assert torch.equal(y, r)


@skip_stale
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_w158a8_int8_dispatch_exact(dtype: torch.dtype) -> None:
    x, qw, s, _ = _problem(9, 48, 200, dtype, bias=False, seed=4)
    y = _triton(x, qw, s, None, ActPrecision.INT8)  # no bias: the epilogue is two multiplies, exact
    assert y.dtype == dtype
    assert torch.equal(y, _ref(x, qw, s, None, ActPrecision.INT8))


@skip_stale
def test_quantize_rows_int8_exact() -> None:
    x, *_ = _problem(5, 1, 3000, torch.float32, bias=False, seed=5)
    x[1] = 0.0  # an all-zero row hits the 1e-8 clamp
    x[2, :2] = x[2].abs().max() * torch.tensor([0.5, -3.5], device=DEV) / 127
    xq, xs = triton_w158a8.quantize_rows(x, fp8=False, block=512)
    rq, rs = reference.quantize_act_int8(x)
    assert torch.equal(xs, rs) and torch.equal(xq, rq)


@skip_stale
@pytest.mark.parametrize("m,n,k", SMALL_SHAPES)
def test_w158a8_fp8_gemm_on_reference_quantised(m: int, n: int, k: int) -> None:
    """The fp8 GEMM fed torch-quantised activations (runs in the interpreter too)."""
    x, qw, s, b = _problem(m, n, k, torch.float32, bias=True, seed=6)
    xq, xs = reference.quantize_act_fp8(x)
    cfg = triton_w158a8.pick_config(m, n, k)
    y = triton_w158a8.w158a8_gemm(xq, xs, qw, _scale_for_launch(s), b, torch.float32, fp8=True, config=cfg)
    assert _rel_err(y, _ref(x, qw, s, b, ActPrecision.FP8)) < FP8_ACCUM_RTOL


@skip_stale
@pytest.mark.skipif(not ON_GPU, reason="the interpreter's fp32->e4m3 cast does not round to nearest-even")
@pytest.mark.parametrize("fuse", [False, True], ids=["separate", "fused"])
def test_w158a8_fp8_end_to_end(fuse: bool) -> None:
    x, qw, s, b = _problem(300, 150, 257, torch.bfloat16, bias=True, seed=7)
    rq, rs = reference.quantize_act_fp8(x)
    xq, xs = triton_w158a8.quantize_rows(x, fp8=True)
    assert torch.equal(xs, rs) and torch.equal(xq.view(torch.uint8), rq.view(torch.uint8))
    cfg = triton_w158a8.A8Config(**{**triton_w158a8.pick_config(300, 150, 257).__dict__, "fuse_quant": fuse})
    y = triton_w158a8.w158a8_forward(x, qw, s, b, 257, fp8=True, config=cfg)
    assert _rel_err(y, _ref(x, qw, s, b, ActPrecision.FP8)) < 1e-2  # bf16 output rounding


@skip_stale
def test_forced_backend_refuses_what_it_cannot_run() -> None:
    x, qw, s, b = _problem(2, 8, 10, torch.float32, bias=False)
    with pytest.raises(BitfluxError):
        kernels.ternary_linear(
            x, qw, s, b, fmt=PackFormat.BASE3, in_features=10, act=ActPrecision.BF16, backend=Backend.TRITON
        )


@skip_stale
def test_compiles_as_one_op() -> None:
    x, qw, s, b = _problem(4, 24, 40, torch.float32, bias=True, seed=8)

    def f(inp: torch.Tensor) -> torch.Tensor:
        y = kernels.ternary_linear(
            inp, qw, s, b, fmt=PackFormat.TWO_BIT, in_features=40, act=ActPrecision.INT8, backend=Backend.TRITON
        )
        return y * 2

    explain = torch._dynamo.explain(f)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), f(x))


@skip_stale
@gpu_only
@pytest.mark.parametrize("m,n,k", [(1, 18432, 3072), (4608, 3072, 3072), (4608, 3072, 15360), (512, 12288, 3072)])
@pytest.mark.parametrize("act", [a for a in ActPrecision if a is not ActPrecision.AUTO])
def test_flux_shapes_on_gpu(m: int, n: int, k: int, act: ActPrecision) -> None:
    x, qw, s, b = _problem(m, n, k, torch.bfloat16, bias=True, seed=9)
    y = _triton(x, qw, s, b, act)
    assert _rel_err(y, _ref(x, qw, s, b, act)) < 1e-2
