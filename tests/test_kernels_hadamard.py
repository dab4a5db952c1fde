"""archquant.kernels.hadamard_quant: fused Hadamard + int8 quantization vs the core.

Interpreter on CPU by default; ``TRITON_INTERPRET=0 pytest tests/test_kernels_*.py``
on a CUDA machine runs everything on the GPU (plus the ``gpu``-marked tests).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from archquant.core.hadamard import factor_size, hadamard_matrix, random_signs  # noqa: E402
from archquant.core.transforms import ChannelScale  # noqa: E402
from kernel_testing import DEVICE, needs_gpu, requires_backend  # noqa: E402
from archquant.kernels.hadamard_quant import (  # noqa: E402
    hadamard_plan,
    hadamard_quant_int8,
    hadamard_quant_int8_reference,
)

pytestmark = requires_backend
POISON_Q = -128

# Powers of two (dense path and factorised), and K * 2^m for K = 12 (96, 1536),
# 20 (20: 20 * 2^m with m >= 1 resolves to K = 40 in the core), 28 (448) and
# 40 (160 = 40 * 4, 5120 = 40 * 128).
SIZES = [1, 16, 20, 64, 96, 128, 160, 448, 1536, 2048, 5120]


def activations(m, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g) * torch.rand(m, 1, generator=g).mul(5).add(0.01)
    x[:, torch.randint(0, n, (max(1, n // 64),), generator=g)] *= 30  # outlier channels
    return x.to(dtype).to(DEVICE)


def rows_for(n):
    return 17 if n <= 64 else 3  # dense path: two 16-row programs, the 2nd ragged


def assert_codes_close(q, s, q_ref, s_ref):
    """Codes equal except rare ±1 at rounding boundaries; scales equal up to an ulp."""
    assert q.dtype == torch.int8 and q.shape == q_ref.shape
    assert s.shape == s_ref.shape
    torch.testing.assert_close(s, s_ref, rtol=2e-6, atol=0)
    diff = (q.int() - q_ref.int()).abs()
    assert diff.max().item() <= 1
    assert (diff > 0).sum().item() <= 1 + 1e-3 * q.numel()
    deq, deq_ref = q.float() * s, q_ref.float() * s_ref
    assert torch.all((deq - deq_ref).abs() <= s * 1.0001)


@pytest.mark.parametrize("n", SIZES)
def test_plan_reproduces_core_matrix(n):
    plan = hadamard_plan(n)
    k, p = factor_size(n)
    assert (plan.K, plan.pow2) == (k, p) and plan.a * plan.b == n
    assert plan.a_pad >= 16 and plan.b_pad >= 16 or plan.dense
    h = hadamard_matrix(n, normalized=False, dtype=torch.int8)
    if plan.dense:
        got = plan.right[:n, :n]
    else:
        lt, r = plan.left[: plan.a, : plan.a], plan.right[: plan.b, : plan.b]
        got = torch.kron(lt.T.contiguous(), r)
        assert torch.all(plan.left[plan.a:] == 0) and torch.all(plan.left[:, plan.a:] == 0)
        assert torch.all(plan.right[plan.b:] == 0) and torch.all(plan.right[:, plan.b:] == 0)
    assert torch.equal(got, h)


def test_plan_shapes():
    assert (hadamard_plan(1536).a, hadamard_plan(1536).b) == (24, 64)
    assert (hadamard_plan(5120).a, hadamard_plan(5120).b) == (40, 128)
    assert (hadamard_plan(4096).a, hadamard_plan(4096).b) == (64, 64)
    assert hadamard_plan(64).dense and not hadamard_plan(128).dense


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("n", SIZES)
def test_index_order_one_hot(n, transpose):
    """e_j @ H_n is row j of H_n: every code must be exactly 127 * sign(H_n[j, i])."""
    rows = sorted({0, n // 3, n // 2, n - 1})
    x = torch.zeros(len(rows), n)
    x[torch.arange(len(rows)), rows] = 2.0
    q, s = hadamard_quant_int8(x.to(DEVICE), transpose=transpose)
    h = hadamard_matrix(n, normalized=False)
    h = h.T if transpose else h
    assert torch.equal(q.cpu(), (127 * h[rows]).to(torch.int8))
    expected_scale = (torch.tensor(2.0) * torch.tensor(1.0 / math.sqrt(n))) / 127
    torch.testing.assert_close(s.cpu(), expected_scale.expand(len(rows), 1), rtol=2e-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", SIZES)
def test_matches_core_reference(n, dtype):
    m = rows_for(n)
    x = activations(m, n, dtype=dtype, seed=n)
    out = torch.full((m, n), POISON_Q, dtype=torch.int8, device=DEVICE)
    out_scale = torch.full((m, 1), float("nan"), device=DEVICE)
    q, s = hadamard_quant_int8(x, out=out, out_scale=out_scale)
    assert q.data_ptr() == out.data_ptr() and s.data_ptr() == out_scale.data_ptr()
    assert_codes_close(q, s, *hadamard_quant_int8_reference(x))


@pytest.mark.parametrize("n", [20, 160, 1536])
def test_float16_input(n):
    x = activations(5, n, dtype=torch.float16, seed=1)
    assert_codes_close(*hadamard_quant_int8(x), *hadamard_quant_int8_reference(x))


@pytest.mark.parametrize("n", [48, 96, 1536, 5120])
def test_signs_and_transpose(n):
    x = activations(3, n, seed=2)
    signs = random_signs(n, seed=7).to(DEVICE)
    for transpose in (False, True):
        got = hadamard_quant_int8(x, signs=signs, transpose=transpose)
        ref = hadamard_quant_int8_reference(x, signs=signs, transpose=transpose)
        assert_codes_close(*got, *ref)
    # signs really act on the input: x @ diag(s) H == (x * s) @ H
    q_signed, _ = hadamard_quant_int8(x, signs=signs)
    q_manual, _ = hadamard_quant_int8(x * signs)
    assert torch.equal(q_signed, q_manual)


@pytest.mark.parametrize("n", [64, 160, 1536])
def test_static_scale(n):
    x = activations(7, n, seed=3)
    _, s_ref = hadamard_quant_int8_reference(x)
    for scale in (0.7 * s_ref.max().item(), s_ref * 0.8):  # both saturate some values
        q, s = hadamard_quant_int8(x, scale, out=torch.full((7, n), POISON_Q, dtype=torch.int8,
                                                             device=DEVICE))
        q_ref, s_ref2 = hadamard_quant_int8_reference(x, scale)
        assert torch.equal(s, s_ref2)
        diff = (q.int() - q_ref.int()).abs()
        assert diff.max().item() <= 1 and (diff > 0).sum().item() <= 1 + 1e-3 * q.numel()
        assert q.abs().max().item() == 127


def smoothing_scales(n, seed=0):
    """SmoothQuant-like per-channel scales over two decades, most not representable in 16 bits."""
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(n, generator=g)).to(DEVICE)


# 48: the dense kernel; 96, 160, 1152 = 36 * 32: the factorised one (A = 12, 40, 36)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [48, 96, 160, 1152])
def test_channel_scale_matches_core_reference(n, dtype):
    """LRQ-DiT's ChannelScale + random Hadamard in the kernel vs the core modules, both scale modes."""
    x = activations(rows_for(n), n, dtype=dtype, seed=n)
    signs, cs = random_signs(n, seed=3).to(DEVICE), smoothing_scales(n, seed=n)
    got = hadamard_quant_int8(x, signs=signs, channel_scale=cs)
    ref = hadamard_quant_int8_reference(x, signs=signs, channel_scale=cs)
    assert_codes_close(*got, *ref)
    static = 0.8 * ref[1].max().item()  # saturates the largest rows
    q, _ = hadamard_quant_int8(x, static, signs=signs, channel_scale=cs)
    q_ref, _ = hadamard_quant_int8_reference(x, static, signs=signs, channel_scale=cs)
    diff = (q.int() - q_ref.int()).abs()
    assert diff.max().item() <= 1 and (diff > 0).sum().item() <= 1 + 1e-3 * q.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [48, 1152])
def test_channel_scale_divides_exactly_as_the_core(n, dtype):
    """The kernel's x / s (s and the quotient rounded to x's dtype) is bit for bit ChannelScale's:
    scaling inside the kernel or before it gives the very same codes."""
    x = activations(rows_for(n), n, dtype=dtype, seed=n + 1)
    cs = smoothing_scales(n, seed=n + 1)
    fused = hadamard_quant_int8(x, channel_scale=cs)
    separate = hadamard_quant_int8(ChannelScale(cs)(x))
    assert torch.equal(fused[0], separate[0]) and torch.equal(fused[1], separate[1])


def test_bf16_without_rounding_to_input_dtype():
    x = activations(3, 1536, dtype=torch.bfloat16, seed=4)
    got = hadamard_quant_int8(x, round_to_input_dtype=False)
    ref = hadamard_quant_int8_reference(x, round_to_input_dtype=False)
    assert_codes_close(*got, *ref)
    cs = smoothing_scales(1536)  # then the scale and the quotient stay fp32 too
    got = hadamard_quant_int8(x, channel_scale=cs, round_to_input_dtype=False)
    assert_codes_close(*got, *hadamard_quant_int8_reference(x, channel_scale=cs, round_to_input_dtype=False))
    assert torch.equal(got[0], hadamard_quant_int8(x.float() / cs, round_to_input_dtype=False)[0])


@pytest.mark.parametrize("n", [160, 2048])
def test_rows_per_program_tail_and_precisions(n):
    x = activations(7, n, seed=5)
    ref = hadamard_quant_int8_reference(x)
    out = torch.full((7, n), POISON_Q, dtype=torch.int8, device=DEVICE)
    assert_codes_close(*hadamard_quant_int8(x, rows_per_program=3, out=out), *ref)
    assert_codes_close(*hadamard_quant_int8(x, input_precision="tf32x3"), *ref)


def test_leading_dims_noncontiguous_and_empty():
    base = activations(6, 2 * 96, seed=6)
    x = base[:, ::2]  # strided rows
    assert_codes_close(*hadamard_quant_int8(x), *hadamard_quant_int8_reference(x))
    x3 = base[:, :96].reshape(2, 3, 96)
    q, s = hadamard_quant_int8(x3)
    assert q.shape == (2, 3, 96) and s.shape == (2, 3, 1)
    assert_codes_close(q, s, *hadamard_quant_int8_reference(x3))
    q, s = hadamard_quant_int8(torch.zeros(0, 96, device=DEVICE))
    assert q.shape == (0, 96) and s.shape == (0, 1)


def test_unsupported_sizes_and_arguments():
    with pytest.raises(ValueError):
        hadamard_quant_int8(torch.zeros(2, 11008, device=DEVICE))  # 172 * 64: no H_172
    with pytest.raises(ValueError):
        hadamard_quant_int8(torch.zeros(1, 1 << 20, device=DEVICE))  # tile too large
    x = activations(2, 64)
    with pytest.raises(ValueError):
        hadamard_quant_int8(x, signs=torch.ones(63, device=DEVICE))
    with pytest.raises(ValueError, match="channel_scale"):
        hadamard_quant_int8(x, channel_scale=torch.ones(65, device=DEVICE))
    with pytest.raises(ValueError):
        hadamard_quant_int8(x, input_precision="bf16")
    with pytest.raises(ValueError):
        hadamard_quant_int8(x, 0.1, out_scale=torch.empty(2, 1, device=DEVICE))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", SIZES + [4096, 14336])
def test_gpu_matches_core_reference(n, dtype):
    x = activations(1031, n, dtype=dtype, seed=n)  # > 1024 rows: 4 rows per program
    out = torch.full((1031, n), POISON_Q, dtype=torch.int8, device=DEVICE)
    q, s = hadamard_quant_int8(x, out=out)
    assert_codes_close(q, s, *hadamard_quant_int8_reference(x))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("n", [96, 1536, 4096, 5120])
def test_gpu_tf32x3_tensor_cores(n):
    x = activations(257, n, dtype=torch.bfloat16, seed=n)
    q, s = hadamard_quant_int8(x, input_precision="tf32x3")
    assert_codes_close(q, s, *hadamard_quant_int8_reference(x))


# sm_90 compile (and no register spills) of the shapes the Mamba models use: the interpreter
# never compiles, and the NVIDIA backend checks what it does not (dot sizes, types, spills).
HADAMARD_AOT_BODY = r'''
import math
from archquant.kernels import hadamard_quant as H
from archquant.kernels import quantize as Q

ptrs = dict(x_ptr="bf16", l_ptr="i8", r_ptr="i8", sign_ptr="fp32", cs_ptr="fp32", q_ptr="i8", s_ptr="fp32")
for n in (160, 1536, 2560, 4096, 5120, 8192):  # incl. Mamba-130m / 2.8B d_model and d_inner
    p = H.hadamard_plan(n)
    precision, warps = H.launch_params(p)  # what the wrapper launches
    for static, signs in ((False, False), (True, True)):  # the second with ARS's channel scale too
        aot(H._hadamard_quant_kron_kernel,
            dict(A=p.a, B=p.b, A_PAD=p.a_pad, B_PAD=p.b_pad, NORM=1.0 / math.sqrt(n), HAS_SIGNS=signs,
                 HAS_CHANNEL_SCALE=signs, STATIC=static, Y_ROUND=2, QMAX=127, MIN_SCALE=1e-8, PRECISION=precision, ROWS_PER_PROG=1),
            ptrs, ones=("stride_xk", "stride_qk", "stride_s"), num_warps=warps)
p = H.hadamard_plan(48)
aot(H._hadamard_quant_dense_kernel,
    dict(N=48, N_PAD=p.b_pad, NORM=1.0 / math.sqrt(48), HAS_SIGNS=False, HAS_CHANNEL_SCALE=True, STATIC=False, Y_ROUND=1, QMAX=127,
         MIN_SCALE=1e-8, PRECISION="ieee", BLOCK_M=16), dict(ptrs, x_ptr="fp16"), ones=("stride_xk", "stride_qk"))
# the quantize kernels with the blocks their wrappers pick (archquant/kernels/quantize.py _blocks), 4 warps
for bm, bk in ((1, 4096), (4, 1024), (16, 256)):  # e.g. K = 5120 / 10240 / 160
    aot(Q._per_token_int8_kernel, dict(QMAX=127, MIN_SCALE=1e-8, BLOCK_M=bm, BLOCK_K=bk),
        dict(x_ptr="bf16", q_ptr="i8", s_ptr="fp32"), ones=("stride_xk", "stride_qk"))
    aot(Q._static_int8_kernel, dict(QMAX=127, BLOCK_M=bm, BLOCK_K=bk),
        dict(x_ptr="fp16", q_ptr="i8", s_ptr="fp32"), ones=("stride_xk", "stride_qk"))
'''


def test_kernels_compile_for_sm90(tmp_path):
    from kernel_testing import run_aot
    run_aot(tmp_path, HADAMARD_AOT_BODY)
