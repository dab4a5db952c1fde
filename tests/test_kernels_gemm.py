"""archquant.kernels.w8a8_gemm: int8 / fp8 scaled GEMMs vs PyTorch references.

Interpreter on CPU by default; ``TRITON_INTERPRET=0 pytest tests/test_kernels_*.py``
on a CUDA machine runs everything on the GPU (plus the ``gpu``-marked tests).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kernel_testing import DEVICE, needs_gpu, requires_backend  # noqa: E402
from archquant.kernels.quantize import quantize_per_token_int8  # noqa: E402
from archquant.kernels.w8a8_gemm import (  # noqa: E402
    fp8_gemm,
    fp8_gemm_reference,
    w8a8_gemm,
    w8a8_gemm_reference,
)

pytestmark = requires_backend
OUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SMALL_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=2, num_stages=2)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def int8_operands(m, n, k, seed=0):
    g = gen(seed)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    a_scale = torch.rand(m, 1, generator=g) * 0.02 + 1e-3
    b_scale = torch.rand(n, generator=g) * 0.02 + 1e-3
    bias = torch.randn(n, generator=g)
    return [t.to(DEVICE) for t in (a, b, a_scale, b_scale, bias)]


def nan_out(m, n, dtype):
    return torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("mnk", [(1, 1, 1), (1, 33, 40), (5, 16, 32), (17, 70, 200), (33, 96, 256)])
def test_w8a8_matches_reference(mnk, out_dtype):
    m, n, k = mnk
    a, b, a_s, b_s, bias = int8_operands(m, n, k)
    out = w8a8_gemm(a, b, a_s, b_s, bias, out_dtype, out=nan_out(m, n, out_dtype))
    ref = w8a8_gemm_reference(a, b, a_s, b_s, bias, out_dtype)
    assert out.dtype == out_dtype and out.shape == (m, n)
    assert torch.equal(out, ref)  # NaN poison would make this fail


@pytest.mark.parametrize(
    "scales",
    ["scalar_scalar", "vec_m_vec_n", "n1_col", "row_1n"],
)
def test_w8a8_scale_layouts_and_bias_dtypes(scales):
    m, n, k = 9, 20, 64
    a, b, a_s, b_s, bias = int8_operands(m, n, k, seed=1)
    if scales == "scalar_scalar":
        a_s, b_s = 0.01, torch.tensor(0.02, device=DEVICE)
    elif scales == "vec_m_vec_n":
        a_s = a_s.reshape(m)
    elif scales == "n1_col":
        b_s = b_s.reshape(n, 1)
    else:
        b_s = b_s.reshape(1, n)
    for bias_ in (None, bias.half(), bias.bfloat16()):
        out = w8a8_gemm(a, b, a_s, b_s, bias_, torch.float32)
        assert torch.equal(out, w8a8_gemm_reference(a, b, a_s, b_s, bias_, torch.float32))


def test_w8a8_many_tiles_ragged_and_strided():
    # 3 x 4 tiles with GROUP_M=2 (ragged last group), 4 K-steps with a ragged tail,
    # a strided activation view and a transposed weight (non-contiguous operands).
    m, n, k = 33, 50, 100
    a, b, a_s, b_s, bias = int8_operands(m, n, 2 * k, seed=2)
    a = a[:, ::2]
    b = b[:, :k].t().contiguous().t()  # (n, k) view with strides (1, n)
    assert not a.is_contiguous() and not b.is_contiguous()
    out_big = torch.full((m, 2 * n), float("nan"), dtype=torch.float16, device=DEVICE)
    out = w8a8_gemm(a, b, a_s, b_s, bias, torch.float16, out=out_big[:, ::2], config=SMALL_CONFIG)
    assert torch.equal(out, w8a8_gemm_reference(a, b, a_s, b_s, bias, torch.float16))
    assert torch.isnan(out_big[:, 1::2]).all()  # untouched


def test_w8a8_extreme_codes_exact_accumulator():
    m, n, k = 4, 16, 256
    a = torch.full((m, k), 127, dtype=torch.int8, device=DEVICE)
    b = torch.full((n, k), -127, dtype=torch.int8, device=DEVICE)
    b[1::2] = -128  # the int8 minimum also works in the GEMM
    out = w8a8_gemm(a, b, 1.0, 1.0, out_dtype=torch.float32)
    expected = (a.double() @ b.double().T).float()
    assert torch.equal(out, expected)
    assert out[0, 0].item() == -127 * 127 * k


def test_w8a8_end_to_end_with_quantize_kernel():
    g = gen(3)
    x = (torch.randn(7, 96, generator=g) * 2).to(DEVICE)
    w = (torch.randn(40, 96, generator=g) * 0.05).to(DEVICE)
    xq, xs = quantize_per_token_int8(x)
    w_scale = w.abs().amax(dim=1) / 127
    wq = torch.round(w / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
    y = w8a8_gemm(xq, wq, xs, w_scale, out_dtype=torch.float32)
    exact = x @ w.T
    assert ((y - exact).norm() / exact.norm()).item() < 0.02


def test_gemm_argument_checks():
    a, b, a_s, b_s, _ = int8_operands(4, 8, 32)
    with pytest.raises(ValueError, match="BLOCK_K"):
        w8a8_gemm(a, b, a_s, b_s, config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16))
    with pytest.raises(ValueError):
        w8a8_gemm(a, b[:, :16], a_s, b_s)  # K mismatch
    with pytest.raises(TypeError):
        w8a8_gemm(a.float(), b, a_s, b_s)
    with pytest.raises(ValueError):
        w8a8_gemm(a, b, a_s, b_s, out_dtype=torch.int32)
    with pytest.raises(ValueError):
        w8a8_gemm(a, b, torch.ones(3, device=DEVICE), b_s)
    empty = w8a8_gemm(a[:0], b, a_s[:0], b_s)
    assert empty.shape == (0, 8)


def fp8_operands(m, n, k, dtype, seed=0):
    g = gen(seed)
    a = (torch.randn(m, k, generator=g) * 3).to(dtype)
    b = (torch.randn(n, k, generator=g) * 3).to(dtype)
    a_s = torch.rand(m, 1, generator=g) * 0.01 + 1e-3
    b_s = torch.rand(n, generator=g) * 0.01 + 1e-3
    bias = torch.randn(n, generator=g)
    return [t.to(DEVICE) for t in (a, b, a_s, b_s, bias)]


def assert_fp8_close(out, ref, a, b, a_s, b_s, rel=1e-5):
    # Bound: fp32 summation-order error of sum |a||b|, plus one rounding of out's dtype.
    mag = (a.float().abs() @ b.float().abs().T) * a_s.reshape(-1, 1).abs() * b_s.reshape(1, -1).abs()
    ulp = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[out.dtype]
    tol = rel * mag + ulp * ref.float().abs() + 1e-6
    assert not torch.isnan(out).any()
    assert torch.all((out.float() - ref.float()).abs() <= tol)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("mnk", [(1, 24, 48), (17, 70, 200)])
def test_fp8_matches_reference(mnk, out_dtype, fp8):
    m, n, k = mnk
    a, b, a_s, b_s, bias = fp8_operands(m, n, k, fp8)
    out = fp8_gemm(a, b, a_s, b_s, bias, out_dtype, out=nan_out(m, n, out_dtype))
    ref = fp8_gemm_reference(a, b, a_s, b_s, bias, out_dtype)
    assert_fp8_close(out, ref, a, b, a_s, b_s)


def test_fp8_small_config_precise_accum_and_checks():
    a, b, a_s, b_s, bias = fp8_operands(33, 50, 100, torch.float8_e4m3fn, seed=1)
    out = fp8_gemm(a, b, a_s, b_s, bias, torch.float32, fast_accum=False, config=SMALL_CONFIG)
    assert_fp8_close(out, fp8_gemm_reference(a, b, a_s, b_s, bias, torch.float32), a, b, a_s, b_s)
    with pytest.raises(TypeError):
        fp8_gemm(a, b.to(torch.float8_e5m2), a_s, b_s)
    with pytest.raises(TypeError):
        fp8_gemm(a.float(), b, a_s, b_s)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("mnk", [(1, 4096, 4096), (16, 512, 1000), (300, 520, 1000), (2048, 1024, 4096)])
def test_gpu_w8a8_bit_exact(mnk, out_dtype):
    m, n, k = mnk
    a, b, a_s, b_s, bias = int8_operands(m, n, k, seed=4)
    out = w8a8_gemm(a, b, a_s, b_s, bias, out_dtype, out=nan_out(m, n, out_dtype))
    assert torch.equal(out, w8a8_gemm_reference(a, b, a_s, b_s, bias, out_dtype))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fast_accum", [True, False])
@pytest.mark.parametrize("mnk", [(1, 4096, 4096), (300, 520, 1000), (2048, 1024, 4096)])
def test_gpu_fp8(mnk, fast_accum):
    m, n, k = mnk
    a, b, a_s, b_s, bias = fp8_operands(m, n, k, torch.float8_e4m3fn, seed=5)
    out = fp8_gemm(a, b, a_s, b_s, bias, torch.bfloat16, fast_accum=fast_accum)
    ref = fp8_gemm_reference(a, b, a_s, b_s, bias, torch.bfloat16)
    # Hopper's fp8 wgmma accumulates with ~14 mantissa bits (biased truncation), so
    # the error grows with K; promotion every BLOCK_K keeps it to one block's worth.
    assert_fp8_close(out, ref, a, b, a_s, b_s, rel=1e-2 if fast_accum else 2e-3)
