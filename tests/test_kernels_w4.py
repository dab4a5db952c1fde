"""archquant.kernels.w4a16_gemm: packed int4 weight-only GEMM vs the PyTorch reference.

Interpreter on CPU by default; ``TRITON_INTERPRET=0 pytest tests/test_kernels_w4.py`` on a
CUDA machine runs everything on the GPU (plus the ``gpu``-marked tests).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from archquant.core import formats as Fmt  # noqa: E402
from archquant.kernels._triton_utils import INTERPRET_MODE  # noqa: E402
from kernel_testing import DEVICE, needs_gpu, requires_backend, run_aot  # noqa: E402
from archquant.kernels.w4a16_gemm import (  # noqa: E402
    dequantize_int4_reference,
    pack_int4,
    unpack_int4,
    w4a16_gemm,
    w4a16_gemm_reference,
)

pytestmark = requires_backend
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def operands(m, n, k, group, dtype, seed=0, lo=-7):
    g = gen(seed)
    codes = torch.randint(lo, 8, (n, k), generator=g, dtype=torch.int8)
    scales = torch.rand(n, k // group, generator=g) * 0.02 + 1e-3
    x = torch.randn(m, k, generator=g) * 2
    return x.to(dtype).to(DEVICE), pack_int4(codes).to(DEVICE), scales.to(DEVICE), codes.to(DEVICE)


def assert_gemm_close(y, y_ref, x, w_packed, scales, group, rel=2e-6):
    # fp32 summation-order error of sum |x| |W| (K <= 4096), plus one rounding of the output dtype
    w = dequantize_int4_reference(w_packed, scales, group)
    mag = x.float().abs() @ w.abs().T
    tol = rel * mag + ULP[y.dtype] * y_ref.float().abs() + 1e-30
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert not torch.isnan(y).any()
    assert bool(((y.float() - y_ref.float()).abs() <= tol).all())


def test_pack_nibble_order_and_roundtrip():
    codes = torch.tensor([[-8, 7, 0, 1], [-7, -1, 3, -2]], dtype=torch.int8)
    packed = pack_int4(codes)
    # low nibble = even column, high nibble = odd column, stored as code + 8
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0xF0, 0x98], [0x71, 0x6B]]
    assert torch.equal(unpack_int4(packed), codes)
    r = torch.randint(-8, 8, (33, 64), generator=gen(1), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(r)), r)
    with pytest.raises(ValueError):
        pack_int4(torch.full((2, 4), 8, dtype=torch.int8))
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mnkg", [(1, 1, 32, 32), (1, 50, 256, 32), (3, 33, 128, 64),
                                  (16, 40, 256, 128), (17, 20, 64, 32)])
def test_w4a16_matches_reference(mnkg, dtype):
    m, n, k, group = mnkg
    x, wp, sc, _ = operands(m, n, k, group, dtype, lo=-8)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    y = w4a16_gemm(x, wp, sc, group, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert_gemm_close(y, w4a16_gemm_reference(x, wp, sc, group), x, wp, sc, group)


@pytest.mark.parametrize("dtype", DTYPES)
def test_w4a16_core_format_end_to_end_and_layouts(dtype):
    # weights quantized by archquant.core.formats (int4 symmetric, group 64, codes in [-7, 7])
    m, n, k, group = 2, 24, 192, 64
    g = gen(2)
    w = torch.randn(n, k, generator=g) * 0.05
    spec = Fmt.QuantSpec(bits=4, granularity="group", group_size=group)
    params = Fmt.params_from_tensor(w, spec)
    codes = Fmt.quantize(w, spec, params)
    assert int(codes.min()) >= -7 and int(codes.max()) <= 7
    w_fq = Fmt.dequantize(codes, spec, params)
    wp, sc = pack_int4(codes).to(DEVICE), params["scale"].to(DEVICE)  # scale (n, k // group, 1)
    x_big = (torch.randn(m, 2 * k, generator=g)).to(dtype).to(DEVICE)
    x = x_big[:, ::2]  # strided activations
    out_big = torch.full((m, 2 * n), float("nan"), dtype=dtype, device=DEVICE)
    y = w4a16_gemm(x, wp, sc, group, out=out_big[:, 1::2], config=dict(BLOCK_N=16))
    expected = (x.float() @ w_fq.to(DEVICE).T).to(dtype)
    assert_gemm_close(y, expected, x, wp, sc.reshape(n, -1), group)
    assert torch.isnan(out_big[:, 0::2]).all()
    # a transposed (column-major) packed weight view works as well
    wp_t = wp.t().contiguous().t()
    assert torch.equal(w4a16_gemm(x, wp_t, sc, group, config=dict(BLOCK_N=16)), y)
    # two dot chunks per group (SUB=16 bytes of a 64-wide group)
    y2 = w4a16_gemm(x, wp, sc, group, config=dict(BLOCK_N=16, SUB=16))
    assert_gemm_close(y2, expected, x, wp, sc.reshape(n, -1), group)


def test_w4a16_fp32_tf32x3_and_larger_m():
    x, wp, sc, _ = operands(40, 24, 128, 32, torch.float32, seed=3)
    ref = w4a16_gemm_reference(x, wp, sc, 32)
    assert_gemm_close(w4a16_gemm(x, wp, sc, 32), ref, x, wp, sc, 32)  # 3 row tiles of 16
    y = w4a16_gemm(x, wp, sc, 32, input_precision="tf32x3")  # ~2^-22 on GPU; ieee in interpreter
    assert_gemm_close(y, ref, x, wp, sc, 32, rel=2e-6 if INTERPRET_MODE else 1e-5)


def test_w4a16_argument_checks():
    x, wp, sc, _ = operands(2, 8, 64, 32, torch.float16)
    with pytest.raises(ValueError):
        w4a16_gemm(x, wp, sc, 16)  # group < 32: half-group dot K would be < 16
    with pytest.raises(ValueError):
        w4a16_gemm(x, wp, sc, 48)
    with pytest.raises(ValueError):
        w4a16_gemm(x, wp, sc[:, :1], 32)
    with pytest.raises(ValueError):
        w4a16_gemm(x[:, :32], wp, sc, 32)
    with pytest.raises(TypeError):
        w4a16_gemm(x, wp.to(torch.int8), sc, 32)
    with pytest.raises(TypeError):
        w4a16_gemm(x.to(torch.int8), wp, sc, 32)
    with pytest.raises(ValueError):
        w4a16_gemm(x, wp, sc, 32, input_precision="bf16")
    with pytest.raises(ValueError):
        w4a16_gemm(x, wp, sc, 32, config=dict(SUB=32))  # more than group_size / 2
    assert w4a16_gemm(x[:0], wp, sc, 32).shape == (0, 8)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mnkg", [(1, 4096, 4096, 128), (16, 4096, 4096, 128), (5, 11008, 4096, 64),
                                  (3, 4096, 11008, 32)])
def test_gpu_w4a16(mnkg, dtype):
    m, n, k, group = mnkg
    x, wp, sc, _ = operands(m, n, k, group, dtype, seed=4)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    y = w4a16_gemm(x, wp, sc, group, out=out)
    assert_gemm_close(y, w4a16_gemm_reference(x, wp, sc, group), x, wp, sc, group, rel=1e-5)


# =========================================================================== sm_90 AOT compile (CPU)



W4_AOT_BODY = r"""
from archquant.kernels import w4a16_gemm as W

for dt, code in (("fp16", 1), ("bf16", 2), ("fp32", 0)):
    for group in (32, 64, 128):
        sub = min(16 if code == 0 else 32, group // 2)  # the wrapper's defaults
        for prec in (("ieee", "tf32x3") if code == 0 else ("ieee",)):
            aot(W._w4a16_kernel, dict(GROUP=group, SUB=sub, DOT_CODE=code, OUT_CODE=code, PRECISION=prec,
                                      BLOCK_M=16, BLOCK_N=32),
                dict(x_ptr=dt, w_ptr="u8", y_ptr=dt), ones=("s_xk", "s_wk", "s_sg", "s_yn"))
aot(W._w4a16_kernel, dict(GROUP=64, SUB=16, DOT_CODE=1, OUT_CODE=1, PRECISION="ieee", BLOCK_M=16, BLOCK_N=64),
    dict(x_ptr="fp16", w_ptr="u8", y_ptr="fp16"))  # generic strides
# negative controls: the checks bite (dot K = 8 < 16: static_assert; a tile that spills)
for bad, what in ((dict(GROUP=16, SUB=8, DOT_CODE=1, OUT_CODE=1, PRECISION="ieee", BLOCK_M=16, BLOCK_N=32), "K"),
                  (dict(GROUP=128, SUB=32, DOT_CODE=0, OUT_CODE=0, PRECISION="ieee", BLOCK_M=16, BLOCK_N=64),
                   "spill")):
    try:
        aot(W._w4a16_kernel, bad, dict(x_ptr="fp16" if what == "K" else "fp32", w_ptr="u8",
                                       y_ptr="fp16" if what == "K" else "fp32"), ones=("s_xk", "s_wk", "s_sg", "s_yn"))
    except Exception as e:  # CompilationError / AssertionError
        print("expected failure:", what, type(e).__name__)
    else:
        raise SystemExit(f"negative control {what} compiled")
"""


def test_kernel_compiles_for_sm90(tmp_path):
    run_aot(tmp_path, W4_AOT_BODY)
