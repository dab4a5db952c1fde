"""archquant.kernels.w8a8_gemm: int8 / fp8 scaled GEMMs vs PyTorch references.

Interpreter on CPU by default; ``TRITON_INTERPRET=0 pytest tests/test_kernels_*.py``
on a CUDA machine runs everything on the GPU (plus the ``gpu``-marked tests).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kernel_testing import DEVICE, needs_gpu, requires_backend, run_aot  # noqa: E402
from archquant.kernels.quantize import quantize_per_token_int8, quantize_static_int8  # noqa: E402
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


# --------------------------------------------------------------------------- fused int8 requantization

ROUND_TOS = [None, torch.float16, torch.bfloat16]
SENTINEL = -128  # never a code of the restricted range [-127, 127]: unwritten elements show


def int8_sentinel(m, n):
    return torch.full((m, n), SENTINEL, dtype=torch.int8, device=DEVICE)


def unfused_requant(a, b, a_s, b_s, bias, out_scale, round_to, **kw):
    """What the Quamba mixer does today: float GEMM output, then a second kernel."""
    y = w8a8_gemm(a, b, a_s, b_s, bias, round_to or torch.float32, **kw)
    return quantize_static_int8(y, out_scale)


def saturating_scale(a, b, a_s, b_s, bias, frac=0.9):
    """out_scale at which about 1 - frac of the outputs clamp to +-127."""
    y = w8a8_gemm_reference(a, b, a_s, b_s, bias, torch.float32)
    return y.abs().flatten().quantile(frac).item() / 127


@pytest.mark.parametrize("round_to", ROUND_TOS)
@pytest.mark.parametrize("mnk", [(1, 33, 40), (5, 16, 32), (17, 33, 200)])
def test_w8a8_requant_bit_identical_to_unfused(mnk, round_to):
    m, n, k = mnk  # K=40 / 200: a masked BLOCK_K tail (default configs use BLOCK_K=128)
    a, b, a_s, b_s, bias = int8_operands(m, n, k, seed=10)
    out_scale = saturating_scale(a, b, a_s, b_s, bias)
    q = w8a8_gemm(a, b, a_s, b_s, bias, torch.int8, out=int8_sentinel(m, n), out_scale=out_scale,
                  round_to=round_to)
    assert q.dtype == torch.int8 and q.shape == (m, n)
    assert torch.equal(q, unfused_requant(a, b, a_s, b_s, bias, out_scale, round_to))
    assert torch.equal(q, w8a8_gemm_reference(a, b, a_s, b_s, bias, torch.int8, out_scale=out_scale,
                                              round_to=round_to))
    assert (q != SENTINEL).all()
    assert (q.abs() == 127).any() and (q.abs() < 127).any()  # saturation exercised, not everywhere


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("b_layout", ["channel", "tensor"])
@pytest.mark.parametrize("a_layout", ["token", "tensor"])
def test_w8a8_requant_scale_layouts(a_layout, b_layout, with_bias):
    m, n, k = 9, 20, 64
    a, b, a_s, b_s, bias = int8_operands(m, n, k, seed=11)
    if a_layout == "tensor":
        a_s = 0.013
    if b_layout == "tensor":
        b_s = torch.tensor([0.0071], device=DEVICE)
    bias = bias if with_bias else None
    s = saturating_scale(a, b, a_s, b_s, bias, frac=0.95)
    # out_scale as a Python float, a 0-d and a (1, 1) fp32 tensor on the device
    for out_scale in (s, torch.tensor(s, device=DEVICE), torch.full((1, 1), s, device=DEVICE)):
        q = w8a8_gemm(a, b, a_s, b_s, bias, torch.int8, out_scale=out_scale, round_to=torch.float16)
        assert torch.equal(q, unfused_requant(a, b, a_s, b_s, bias, out_scale, torch.float16))
        assert torch.equal(q, w8a8_gemm_reference(a, b, a_s, b_s, bias, torch.int8, out_scale=out_scale,
                                                  round_to=torch.float16))


def test_w8a8_requant_rounding_ties_and_round_to():
    # Small codes and unit scales make the epilogue value an exact integer (+ bias).
    m, n, k = 6, 40, 40
    g = gen(12)
    a = torch.randint(-4, 5, (m, k), generator=g, dtype=torch.int8).to(DEVICE)
    b = torch.randint(-4, 5, (n, k), generator=g, dtype=torch.int8).to(DEVICE)
    acc = a.double() @ b.double().T
    # out_scale 2: every odd accumulator is an exact .5 tie -> round half to even.
    q = w8a8_gemm(a, b, 1.0, 1.0, None, torch.int8, out_scale=2.0)
    assert (acc % 2 == 1).any()
    assert torch.equal(q, torch.round(acc / 2).clamp(-127, 127).to(torch.int8))
    # bias 0.49, out_scale 1: in fp32 the codes are the accumulator; rounded to fp16/bf16
    # first (|v| >= 32), v becomes acc + 0.5 and half of those codes move up by one.
    bias = torch.full((n,), 0.49, device=DEVICE)
    res = {}
    for rt in ROUND_TOS:
        res[rt] = w8a8_gemm(a, b, 1.0, 1.0, bias, torch.int8, out_scale=1.0, round_to=rt)
        assert torch.equal(res[rt], unfused_requant(a, b, 1.0, 1.0, bias, 1.0, rt))
        assert torch.equal(res[rt], w8a8_gemm_reference(a, b, 1.0, 1.0, bias, torch.int8, out_scale=1.0,
                                                        round_to=rt))
    assert torch.equal(res[None], acc.clamp(-127, 127).to(torch.int8))
    assert (res[torch.float16] != res[None]).any() and (res[torch.bfloat16] != res[None]).any()
    assert torch.equal(w8a8_gemm(a, b, 1.0, 1.0, bias, torch.int8, out_scale=1.0, round_to=torch.float32),
                       res[None])


def test_w8a8_requant_saturation():
    m, n, k = 3, 16, 64
    a = torch.full((m, k), 127, dtype=torch.int8, device=DEVICE)
    b = torch.full((n, k), 127, dtype=torch.int8, device=DEVICE)
    b[1::2] = -127
    b[2::4, : k // 2] = 0  # acc 127 * 127 * 32: 0.5x the other magnitudes
    out_scale = 127 * 127 * k / 127 / 1.5  # |v| / out_scale: 190.5 (clamps) or 95.25 (-> 95)
    q = w8a8_gemm(a, b, 1.0, 1.0, None, torch.int8, out=int8_sentinel(m, n), out_scale=out_scale,
                  round_to=torch.bfloat16)
    expected = torch.tensor([95 if j % 4 == 2 else (127 if j % 2 == 0 else -127) for j in range(n)],
                            dtype=torch.int8, device=DEVICE).expand(m, n)
    assert torch.equal(q, expected)
    assert torch.equal(q, w8a8_gemm_reference(a, b, 1.0, 1.0, None, torch.int8, out_scale=out_scale,
                                              round_to=torch.bfloat16))


def test_w8a8_column_slice_activation_and_strided_int8_out():
    # The mixer slices x[:, :r] (stride (ld, 1)) out of a wider int8 tensor: no .contiguous().
    m, n, k, ld = 17, 33, 40, 104
    big, b, a_s, b_s, bias = int8_operands(m, n, ld, seed=13)
    b = b[:, :k].contiguous()
    for a in (big[:, :k], big[:, 27:27 + k]):  # the second starts at an odd address
        assert a.stride() == (ld, 1) and not a.is_contiguous()
        ac = a.contiguous()
        y = w8a8_gemm(a, b, a_s, b_s, bias, torch.float16, out=nan_out(m, n, torch.float16))
        assert torch.equal(y, w8a8_gemm_reference(ac, b, a_s, b_s, bias, torch.float16))
        s = saturating_scale(ac, b, a_s, b_s, bias)
        want = unfused_requant(ac, b, a_s, b_s, bias, s, torch.float16)
        out_big = torch.full((m, 2 * n), SENTINEL, dtype=torch.int8, device=DEVICE)
        q = w8a8_gemm(a, b, a_s, b_s, bias, torch.int8, out=out_big[:, ::2], out_scale=s,
                      round_to=torch.float16, config=SMALL_CONFIG)  # 2 x 3 tiles, 2 K steps
        assert torch.equal(q, want)
        assert (out_big[:, 1::2] == SENTINEL).all()  # untouched
        q_t = int8_sentinel(n, m).t()  # column-major output
        w8a8_gemm(a, b, a_s, b_s, bias, torch.int8, out=q_t, out_scale=s, round_to=torch.float16)
        assert torch.equal(q_t, want)


def test_w8a8_requant_empty_k_and_m():
    a, b, a_s, b_s, bias = int8_operands(3, 8, 32, seed=14)
    q = w8a8_gemm(a[:, :0], b[:, :0], a_s, b_s, bias, torch.int8, out_scale=0.01, round_to=torch.bfloat16)
    assert torch.equal(q, quantize_static_int8(bias.bfloat16().expand(3, 8), 0.01))
    q = w8a8_gemm(a[:, :0], b[:, :0], a_s, b_s, None, torch.int8, out_scale=0.01)
    assert torch.equal(q, torch.zeros(3, 8, dtype=torch.int8, device=DEVICE))
    assert w8a8_gemm(a[:0], b, a_s[:0], b_s, None, torch.int8, out_scale=0.01).shape == (0, 8)


def test_w8a8_requant_argument_checks():
    a, b, a_s, b_s, _ = int8_operands(4, 8, 32, seed=15)
    with pytest.raises(ValueError, match="out_dtype=torch.int8"):
        w8a8_gemm(a, b, a_s, b_s, out_scale=0.1)  # default float16 output
    with pytest.raises(ValueError, match="out_dtype=torch.int8"):
        w8a8_gemm(a, b, a_s, b_s, None, torch.float32, out_scale=0.1)
    with pytest.raises(ValueError, match="needs out_scale"):
        w8a8_gemm(a, b, a_s, b_s, None, torch.int8)
    with pytest.raises(ValueError, match="round_to only applies"):
        w8a8_gemm(a, b, a_s, b_s, None, torch.float16, round_to=torch.float16)
    with pytest.raises(ValueError, match="round_to must be"):
        w8a8_gemm(a, b, a_s, b_s, None, torch.int8, out_scale=0.1, round_to=torch.float64)
    for bad in (0.0, -0.5, float("nan"), float("inf"), 1e-50):  # 1e-50 is 0 in fp32
        with pytest.raises(ValueError, match="finite and > 0"):
            w8a8_gemm(a, b, a_s, b_s, None, torch.int8, out_scale=bad)
    with pytest.raises(ValueError, match="one value"):
        w8a8_gemm(a, b, a_s, b_s, None, torch.int8, out_scale=torch.full((4,), 0.1, device=DEVICE))
    with pytest.raises(TypeError, match="float"):
        w8a8_gemm(a, b, a_s, b_s, None, torch.int8, out_scale=torch.ones(1, dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError):
        w8a8_gemm(a, b, a_s, b_s, None, torch.int8, out_scale="0.1x")
    with pytest.raises(ValueError, match="int8"):  # a float buffer for an int8 result
        w8a8_gemm(a, b, a_s, b_s, None, torch.int8, out_scale=0.1, out=nan_out(4, 8, torch.float16))
    with pytest.raises(ValueError, match="out_dtype=torch.int8"):
        w8a8_gemm_reference(a, b, a_s, b_s, None, torch.float16, out_scale=0.1)
    fa, fb, fa_s, fb_s, _ = fp8_operands(4, 8, 32, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="only implemented for w8a8_gemm"):
        fp8_gemm(fa, fb, fa_s, fb_s, None, torch.int8, out_scale=0.1)
    with pytest.raises(ValueError, match="only implemented for w8a8_gemm"):
        fp8_gemm(fa, fb, fa_s, fb_s, out_scale=0.1)


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
@pytest.mark.parametrize("round_to", ROUND_TOS)
@pytest.mark.parametrize("mnk", [(1, 4096, 4096), (16, 512, 1000), (300, 520, 1000), (2048, 1024, 4096)])
def test_gpu_w8a8_requant_bit_exact(mnk, round_to):
    # The fused epilogue (tl.div_rn + round half even) must match the two-kernel path on the GPU too.
    m, n, k = mnk
    a, b, a_s, b_s, bias = int8_operands(m, n, k, seed=6)
    out_scale = torch.tensor([saturating_scale(a, b, a_s, b_s, bias)], device=DEVICE)
    q = w8a8_gemm(a, b, a_s, b_s, bias, torch.int8, out=int8_sentinel(m, n), out_scale=out_scale,
                  round_to=round_to)
    assert torch.equal(q, unfused_requant(a, b, a_s, b_s, bias, out_scale, round_to))
    assert torch.equal(q, w8a8_gemm_reference(a, b, a_s, b_s, bias, torch.int8, out_scale=out_scale,
                                              round_to=round_to))


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


GEMM_AOT_BODY = r"""
import triton.language as tl
from archquant.kernels import w8a8_gemm as G

ones = ("stride_ak", "stride_bk", "stride_cn", "stride_as", "stride_bs", "stride_bias")
base = dict(HAS_BIAS=True, IS_INT=True, FP8_TYPE=None, QMAX=127, MAX_IMPRECISE_ACC=None)
i8 = dict(a_ptr="i8", b_ptr="i8")
small = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1)  # the decode config
# float outputs, and int8 codes (QUANT_OUT) after rounding to fp32 / fp16 / bf16
for quant, code, c_ty in ((False, 1, "fp16"), (False, 2, "bf16"), (False, 0, "fp32"),
                          (True, 0, "i8"), (True, 1, "i8"), (True, 2, "i8")):
    aot(G._scaled_mm_kernel, dict(base, **small, OUT_CODE=code, QUANT_OUT=quant), dict(i8, c_ptr=c_ty),
        ones=ones, num_warps=4, num_stages=4)
aot(G._scaled_mm_kernel, dict(base, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=4, OUT_CODE=1, QUANT_OUT=True),
    dict(i8, c_ptr="i8"), ones=ones, num_warps=4, num_stages=4)
aot(G._scaled_mm_kernel, dict(base, **small, OUT_CODE=1, QUANT_OUT=True, HAS_BIAS=False),
    dict(i8, c_ptr="i8"))  # no bias, generic strides (strided a_q / out)
aot(G._scaled_mm_kernel, dict(base, **small, OUT_CODE=2, QUANT_OUT=False, IS_INT=False,
                                   FP8_TYPE=tl.float8e4nv), dict(a_ptr="u8", b_ptr="u8", c_ptr="bf16"), ones=ones)
# The large-M default (128 x 128 x 64, 8 warps) spills 8 bytes in this offline compile; the
# sweep's alternatives spill more (up to ~1.3 KiB): only that they compile is checked.
for cfg in [c for _, c in G.GEMM_CONFIGS if c["BLOCK_M"] == 128] + list(G.GEMM_SWEEP):
    cfg = dict(cfg)
    nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
    try:
        aot(G._scaled_mm_kernel, dict(base, **cfg, OUT_CODE=1, QUANT_OUT=True), dict(i8, c_ptr="i8"),
            ones=ones, num_warps=nw, num_stages=ns)
    except AssertionError as e:
        assert "register spills" in str(e), e
        print("known spill:", str(e)[-40:])
"""


def test_kernel_compiles_for_sm90(tmp_path):
    run_aot(tmp_path, GEMM_AOT_BODY)
