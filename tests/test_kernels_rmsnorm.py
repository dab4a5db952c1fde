"""archquant.kernels.rmsnorm_quant: fused (residual add +) RMSNorm + int8 quantization.

Oracle: ``rmsnorm_reference`` (checked against the float64 formula and the model's ``RMSNorm``) followed by
``archquant.core.formats.quantize``.
Interpreter on CPU by default; ``TRITON_INTERPRET=0 pytest tests/test_kernels_rmsnorm.py``
on a CUDA machine runs everything on the GPU (plus the ``gpu``-marked test).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from archquant.core.formats import QuantSpec, quantize  # noqa: E402
from archquant.models.layers import RMSNorm  # noqa: E402
from kernel_testing import DEVICE, needs_gpu, requires_backend, run_aot  # noqa: E402
from archquant.kernels.quantize import quantize_per_token_int8_reference  # noqa: E402
from archquant.kernels.rmsnorm_quant import (  # noqa: E402
    rmsnorm_quant_int8,
    rmsnorm_quant_int8_reference,
    rmsnorm_reference,
    rmsnorm_triton,
)

pytestmark = requires_backend
POISON_Q = -128  # never produced: the symmetric range is [-127, 127]
EPS = 1e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MAX_RSTD_ULPS = 4  # observed up to 4 (fp32, interpreter): only dynamic fp32 scales moved


def activations(m, n, dtype=torch.float32, seed=0, scale=1.0):
    """Rows of very different magnitudes with a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g) * torch.rand(m, 1, generator=g).mul(10).add(0.01) * scale
    x[:, torch.randint(0, n, (max(1, n // 50),), generator=g)] *= 20
    return x.to(dtype).to(DEVICE)


def gamma(n, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g).mul(1.5).add(0.25)
    w[torch.randint(0, n, (max(1, n // 20),), generator=g)] *= -4  # outlier / negative γ
    return w.to(dtype).to(DEVICE)


def poisoned(shape, dtype):
    fill = POISON_Q if dtype == torch.int8 else float("nan")
    return torch.full(shape, fill, dtype=dtype, device=DEVICE)


def static_scale_for(x, w, residual=None, residual_in_fp32=True, frac=0.8):
    """A per-tensor scale that saturates the largest values (amax * frac / 127)."""
    _, s, _ = rmsnorm_quant_int8_reference(x, w, EPS, residual=residual, residual_in_fp32=residual_in_fp32)
    return float(s.max()) * frac


def _nudge(t, k):
    for _ in range(abs(k)):
        t = torch.nextafter(t, torch.full_like(t, float("inf") if k > 0 else float("-inf")))
    return t


def _reference_with_rstd_nudge(x, w, scale, residual, residual_in_fp32, k):
    """The reference with each row's rstd moved by k ulps (what a different sum order can do)."""
    a = x
    if residual is not None:
        h = x.float() + residual.float()
        a = (h if residual_in_fp32 else h.to(x.dtype)).to(x.dtype)
    af = a.float()
    rstd = _nudge(torch.rsqrt(af.pow(2).mean(-1, keepdim=True) + EPS), k)
    v = w * (af * rstd).to(a.dtype)
    if scale is None:
        return quantize_per_token_int8_reference(v)
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return quantize(v, QuantSpec(bits=8, granularity="tensor"), {"scale": s.reshape(())}), s


def assert_matches_reference(x, w, scale=None, residual=None, residual_in_fp32=True, got=None, **kw):
    """Kernel == reference, except rows whose codes/scale equal the reference with rstd moved
    by <= MAX_RSTD_ULPS ulps (sum-of-squares order).  Returns the number of such rows."""
    if got is None:
        got = rmsnorm_quant_int8(x, w, EPS, scale, residual=residual, residual_in_fp32=residual_in_fp32, **kw)
    q, s, ro = got
    q_ref, s_ref, ro_ref = rmsnorm_quant_int8_reference(x, w, EPS, scale, residual=residual,
                                                        residual_in_fp32=residual_in_fp32)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == s_ref.shape
    assert int(q.min()) >= -127  # also: no poisoned element left
    if residual is None:
        assert ro is None
    else:  # always bit exact
        assert ro.dtype == (torch.float32 if residual_in_fp32 else x.dtype)
        assert torch.equal(ro, ro_ref)
    assert int((q.int() - q_ref.int()).abs().max()) <= 1
    n = x.shape[-1]
    q2, q_ref2 = q.reshape(-1, n), q_ref.reshape(-1, n)
    bad = (q2 != q_ref2).any(dim=1)
    if scale is None:
        bad |= (s.reshape(-1) != s_ref.reshape(-1))
    else:
        assert torch.equal(s, s_ref)
    nudged = {}  # k -> reference with rstd moved by k ulps, computed once
    for row in bad.nonzero().flatten().tolist():
        ok = False
        for k in sorted(range(-MAX_RSTD_ULPS, MAX_RSTD_ULPS + 1), key=abs):
            if k not in nudged:
                qk, sk = _reference_with_rstd_nudge(x, w, scale, residual, residual_in_fp32, k)
                nudged[k] = qk.reshape(-1, n), sk.reshape(-1)
            qk, sk = nudged[k]
            if torch.equal(qk[row], q2[row]) and (scale is not None or sk[row] == s.reshape(-1)[row]):
                ok = True
                break
        assert ok, f"row {row} differs beyond a {MAX_RSTD_ULPS}-ulp change of rstd"
    return int(bad.sum())


# --------------------------------------------------------------------------- reference


def test_tolerance_is_not_vacuous():
    """The row criterion rejects a reference whose rstd is off by more than MAX_RSTD_ULPS."""
    x, w = activations(8, 96, seed=18), gamma(96)
    far = _reference_with_rstd_nudge(x, w, None, None, True, 4 * MAX_RSTD_ULPS)
    with pytest.raises(AssertionError, match="ulp change of rstd"):
        assert_matches_reference(x, w, got=(*far, None))




EPS_OF = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.mark.parametrize("model_dtype", DTYPES)
def test_reference_is_rmsnorm_and_what_the_model_computes(model_dtype):
    """rmsnorm_reference against the formula in float64, γ · x / sqrt(mean(x²) + eps): the reference
    rounds the normalised value to x's dtype and the product to the promoted dtype (one rounding
    each, <= eps of that dtype relative) on top of fp32 arithmetic; and it is, bit for bit, what the
    model's own RMSNorm module (separate code in models/layers.py) computes."""
    n = 96
    norm = RMSNorm(n, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(gamma(n).cpu())
    norm = norm.to(model_dtype).to(DEVICE)
    w = norm.weight.detach()
    for x_dtype in DTYPES:  # incl. mixed: fp32 γ * fp16 y promotes to fp32, as the module does
        x = activations(5, n, x_dtype)
        got = rmsnorm_reference(x, w, EPS)
        out_dtype = torch.promote_types(model_dtype, x_dtype)
        assert got.dtype == out_dtype
        x64 = x.double()
        want = w.double() * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
        tol = want.abs() * (EPS_OF[x_dtype] + EPS_OF[out_dtype] + 8 * 2.0**-23) + 1e-30
        assert bool(((got.double() - want).abs() <= tol).all())
        with torch.no_grad():
            assert torch.equal(got, norm(x))


# --------------------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [5, 48, 96, 768, 2560])
@pytest.mark.parametrize("static", [False, True])
def test_matches_reference(n, dtype, static):
    for m in (1, 17):
        x = activations(m, n, dtype, seed=n + m)
        w = gamma(n)
        scale = static_scale_for(x, w) if static else None
        assert_matches_reference(x, w, scale, out=poisoned(x.shape, torch.int8),
                                 out_scale=None if static else poisoned((m, 1), torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual_in_fp32", [True, False])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("n", [48, 768])
def test_fused_residual(n, dtype, residual_in_fp32, static):
    m = 17
    x = activations(m, n, dtype, seed=2)
    # the residual stream: fp32 with residual_in_fp32, else the activation dtype
    residual = activations(m, n, torch.float32 if residual_in_fp32 else dtype, seed=3)
    w = gamma(n, dtype)
    scale = static_scale_for(x, w, residual, residual_in_fp32) if static else None
    res_dtype = torch.float32 if residual_in_fp32 else dtype
    got = rmsnorm_quant_int8(x, w, EPS, scale, residual=residual, residual_in_fp32=residual_in_fp32,
                             out=poisoned(x.shape, torch.int8), out_residual=poisoned(x.shape, res_dtype),
                             out_scale=None if static else poisoned((m, 1), torch.float32))
    assert_matches_reference(x, w, scale, residual, residual_in_fp32, got=got)


def test_residual_of_other_dtype_and_in_place():
    x = activations(3, 2560, torch.float16, seed=4)
    w = gamma(2560, torch.float16)
    residual = activations(3, 2560, torch.bfloat16, seed=5)  # any float dtype is added in fp32
    assert_matches_reference(x, w, 0.05, residual, residual_in_fp32=False)
    # in place: the fp32 residual stream is updated where it lies
    res32 = activations(3, 2560, torch.float32, seed=6)
    expected = rmsnorm_quant_int8_reference(x, w, EPS, residual=res32)
    stream = res32.clone()
    q, s, ro = rmsnorm_quant_int8(x, w, EPS, residual=stream, out_residual=stream)
    assert ro is stream and torch.equal(stream, expected[2])
    assert torch.equal(q, expected[0]) and torch.equal(s, expected[1])


# --------------------------------------------------------------------------- oracle: module + core


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float16])
def test_equals_rmsnorm_module_then_core_quantize(model_dtype):
    """What a quantized Mamba block does: norm (fp32 model or .half() model), then static int8."""
    n = 768
    norm = RMSNorm(n, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(gamma(n).cpu())
    norm = norm.to(model_dtype).to(DEVICE)
    spec = QuantSpec(bits=8, granularity="tensor")
    for x_dtype in {model_dtype, torch.bfloat16}:  # bf16 with an fp32/fp16 γ: promoted to fp32
        x = activations(17, n, x_dtype, seed=7)
        with torch.no_grad():
            normed = norm(x)
        s = torch.tensor(float(normed.float().abs().max()) / 127 * 0.9, device=DEVICE)
        q_ref = quantize(normed, spec, {"scale": s})
        q, s_out, _ = rmsnorm_quant_int8(x, norm.weight.detach(), EPS, s)
        assert torch.equal(s_out, s)
        assert int((q.int() - q_ref.int()).abs().max()) <= 1
        assert_matches_reference(x, norm.weight.detach(), s, got=(q, s_out, None))


def test_equals_mamba_block_residual_step():
    """MambaBlock: hidden = (residual + out).to(residual.dtype); norm(hidden.to(γ dtype))."""
    n = 96
    norm = RMSNorm(n, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(gamma(n).cpu())
    norm = norm.half().to(DEVICE)
    out = activations(17, n, torch.float16, seed=8)  # mixer output of the previous layer
    residual = activations(17, n, torch.float32, seed=9)
    hidden = (residual + out).to(residual.dtype)
    with torch.no_grad():
        normed = norm(hidden.to(norm.weight.dtype))
    s = torch.tensor(0.04, device=DEVICE)
    q_ref = quantize(normed, QuantSpec(bits=8, granularity="tensor"), {"scale": s})
    q, _, new_residual = rmsnorm_quant_int8(out, norm.weight.detach(), EPS, s, residual=residual)
    assert torch.equal(new_residual, hidden)
    assert torch.equal(q, q_ref)


# --------------------------------------------------------------------------- layouts


def test_leading_dims_and_strides():
    n = 96
    w = gamma(n)
    x3 = activations(6, n, torch.float16, seed=10).reshape(2, 3, n)
    q, s, _ = rmsnorm_quant_int8(x3, w, EPS)
    assert q.shape == (2, 3, n) and s.shape == (2, 3, 1)
    assert_matches_reference(x3, w, got=(q, s, None))
    r3 = activations(6, n, seed=11).reshape(2, 3, n)
    assert_matches_reference(x3, w, 0.03, r3)

    big = activations(5, 2 * n + 3, torch.bfloat16, seed=12)
    for x in (big[:, 1:n + 1],  # strided rows (row stride 2n+3)
              big[:, ::2][:, :n],  # strided columns
              big[:, :n].t().contiguous().t()):  # column-major
        assert_matches_reference(x, w)
        assert_matches_reference(x, w, 0.05, residual=big[:, n:2 * n])
    # writing into strided output views (the gaps stay poisoned)
    x = big[:, :n]
    q_big, r_big = poisoned((5, 2 * n), torch.int8), poisoned((5, 2 * n), torch.float32)
    q, s, ro = rmsnorm_quant_int8(x, w, EPS, 0.05, residual=big[:, n:2 * n],
                                  out=q_big[:, ::2], out_residual=r_big[:, 1::2])
    assert_matches_reference(x, w, 0.05, big[:, n:2 * n], got=(q, s, ro))
    assert torch.all(q_big[:, 1::2] == POISON_Q) and torch.all(r_big[:, ::2].isnan())


@pytest.mark.parametrize("static", [False, True])
def test_column_chunks(static):
    """The looping kernel: n > 8192, and small chunks with a ragged tail."""
    for n, m, block_n, dtype in ((9000, 2, None, torch.float16), (768, 3, 256, torch.bfloat16),
                                 (100, 5, 32, torch.float32)):
        x = activations(m, n, dtype, seed=n)
        w = gamma(n, dtype)
        res = activations(m, n, seed=n + 1)
        scale = static_scale_for(x, w) if static else None
        assert_matches_reference(x, w, scale, block_n=block_n, out=poisoned(x.shape, torch.int8))
        scale = static_scale_for(x, w, res) if static else None
        assert_matches_reference(x, w, scale, res, block_n=block_n,
                                 out_residual=poisoned(x.shape, torch.float32))
    # in place through the chunked kernel (later passes re-read residual_out)
    x, res = activations(2, 300, torch.float16, seed=13), activations(2, 300, seed=14)
    expected = rmsnorm_quant_int8_reference(x, gamma(300), EPS, residual=res)
    q, s, ro = rmsnorm_quant_int8(x, gamma(300), EPS, residual=res, out_residual=res, block_n=64)
    assert ro is res and torch.equal(res, expected[2])
    assert torch.equal(q, expected[0]) and torch.equal(s, expected[1])


# --------------------------------------------------------------------------- edge cases


def test_saturation_and_tiny_scale():
    x = activations(4, 48, torch.float16, seed=15)
    w = gamma(48)
    q, _, _ = rmsnorm_quant_int8(x, w, EPS, 1e-3)
    assert int(q.max()) == 127 and int(q.min()) == -127
    assert_matches_reference(x, w, 1e-3, got=(q, torch.tensor(1e-3, device=DEVICE), None))
    assert_matches_reference(x, w, torch.tensor([0.5], device=DEVICE))  # one-element tensor


def test_zero_rows_and_empty():
    x = activations(3, 40)
    x[1] = 0.0
    w = gamma(40)
    q, s, _ = rmsnorm_quant_int8(x, w, EPS)
    assert s[1].item() == torch.tensor(1e-8).item() and torch.all(q[1] == 0)
    assert_matches_reference(x, w, got=(q, s, None))
    q, s, ro = rmsnorm_quant_int8(torch.zeros(0, 8, device=DEVICE), gamma(8), EPS,
                                  residual=torch.zeros(0, 8, device=DEVICE))
    assert q.shape == (0, 8) and s.shape == (0, 1) and ro.shape == (0, 8)


def test_bad_arguments():
    x, w = activations(4, 8), gamma(8)
    with pytest.raises(TypeError):
        rmsnorm_quant_int8(x.to(torch.int32), w, EPS)
    with pytest.raises(TypeError):
        rmsnorm_quant_int8(x, w.double(), EPS)
    with pytest.raises(TypeError):
        rmsnorm_quant_int8(x, w, EPS, residual=x.to(torch.int32))
    with pytest.raises(ValueError, match="weight"):
        rmsnorm_quant_int8(x, gamma(9), EPS)
    with pytest.raises(ValueError, match="weight"):
        rmsnorm_quant_int8(x, w.reshape(2, 4), EPS)
    with pytest.raises(ValueError, match="scale"):
        rmsnorm_quant_int8(x, w, EPS, torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match="out_scale"):
        rmsnorm_quant_int8(x, w, EPS, 0.1, out_scale=torch.empty(4, 1, device=DEVICE))
    with pytest.raises(ValueError, match="residual"):
        rmsnorm_quant_int8(x, w, EPS, residual=activations(4, 9))
    with pytest.raises(ValueError, match="out_residual"):
        rmsnorm_quant_int8(x, w, EPS, out_residual=torch.empty_like(x))
    with pytest.raises(ValueError, match="out_residual"):  # fp32 expected with residual_in_fp32
        rmsnorm_quant_int8(x.half(), w, EPS, residual=x, out_residual=torch.empty_like(x.half()))
    with pytest.raises(ValueError, match="out"):
        rmsnorm_quant_int8(x, w, EPS, out=torch.empty(4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="block_n"):
        rmsnorm_quant_int8(x, w, EPS, block_n=24)
    with pytest.raises(ValueError):
        rmsnorm_quant_int8(torch.zeros(4, 0, device=DEVICE), torch.ones(0, device=DEVICE), EPS)


# --------------------------------------------------------------------------- GPU / sm_90


# ----------------------------------------------------------------------------------------
# rmsnorm_triton: the same kernels without quantization (the FP models' norm on CUDA)
# ----------------------------------------------------------------------------------------


def assert_norm_close(got, want):
    """Only the sum-of-squares order differs (rstd within a few fp32 ulps): after rounding to a
    16-bit dtype at most one ulp of the output; in fp32 a few ulps."""
    assert got.dtype == want.dtype and got.shape == want.shape
    g, w = got.float(), want.float()
    ulp = torch.finfo(want.dtype).eps * w.abs().clamp_min(torch.finfo(want.dtype).tiny)
    k = 8 if want.dtype == torch.float32 else 1
    assert bool(((g - w).abs() <= k * ulp).all()), float(((g - w).abs() / ulp).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [5, 96, 2560])
def test_unquantized_norm_matches_the_module(n, dtype):
    x = activations(17, n, dtype=dtype, seed=n)
    for w_dtype in {dtype, torch.float32}:  # an fp32 γ with a 16-bit x returns fp32, as the module does
        w = gamma(n, w_dtype)
        out = poisoned((17, n), torch.promote_types(w_dtype, dtype))
        y, res = rmsnorm_triton(x, w, EPS, out=out)
        assert y is out and res is None
        assert_norm_close(y, rmsnorm_reference(x, w, EPS))


@pytest.mark.parametrize("residual_in_fp32", [True, False])
def test_unquantized_norm_with_fused_residual_and_chunks(residual_in_fp32):
    x = activations(3, 300, dtype=torch.float16, seed=3)
    r = activations(3, 300, dtype=torch.float32 if residual_in_fp32 else torch.float16, seed=4)
    w = gamma(300, torch.float16)
    h = (x.float() + r.float()).to(r.dtype)
    for block_n in (None, 64):  # one tile, then the chunked kernel
        y, res = rmsnorm_triton(x, w, EPS, residual=r, residual_in_fp32=residual_in_fp32, block_n=block_n)
        assert torch.equal(res, h)
        assert_norm_close(y, rmsnorm_reference(h.to(x.dtype), w, EPS))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2560, 4096, 8192, 12000])
def test_gpu_large_shapes(n, dtype):
    x = activations(257, n, dtype, seed=16)
    w = gamma(n, dtype)
    res = activations(257, n, seed=17)
    assert_matches_reference(x, w)
    assert_matches_reference(x, w, static_scale_for(x, w, res), res)


# Triton passes a Python float argument as fp32; the shared aot() helper types every
# non-pointer argument as i32, so the eps argument is retyped here.
RMSNORM_AOT_BODY = r'''
from archquant.kernels import rmsnorm_quant as R

_ASTSource = triton.compiler.ASTSource
def _with_fp32_eps(fn, signature, constexprs):
    return _ASTSource(fn=fn, signature=dict(signature, eps="fp32"), constexprs=constexprs)
triton.compiler.ASTSource = _with_fp32_eps

unit = ("s_xn", "s_rn", "s_on", "s_w", "s_qn")
# the wrapper's tiles: n = 2560 (Mamba-2.8B), 8192, 768 (Mamba-130m), 96 (M > 8); chunked n > 8192
TILES = ((1, 4096), (1, 8192), (4, 1024), (16, 128), (1, None))


def check(x_ty, code, has_res, static, bm, bn, quant=True):
    cx = dict(HAS_RESIDUAL=has_res, RES_CODE=0, X_CODE=code, V_CODE=code, STATIC=static, QMAX=127,
              MIN_SCALE=1e-8, QUANT=quant)
    ptrs = dict(x_ptr=x_ty, w_ptr=x_ty, q_ptr="i8" if quant else x_ty, r_ptr="fp32", ro_ptr="fp32")
    if bn is None:
        aot(R._rmsnorm_quant_chunked_kernel, dict(cx, BLOCK_N=R._CHUNK_N), ptrs, ones=unit,
            num_warps=R._num_warps(R._CHUNK_N))
    else:
        aot(R._rmsnorm_quant_kernel, dict(cx, BLOCK_M=bm, BLOCK_N=bn), ptrs, ones=unit,
            num_warps=R._num_warps(bm * bn))


# every tile in every input dtype (dynamic scale, fp32 residual: the most live values);
# all residual/static variants at the Mamba-2.8B and n = 8192 tiles in fp16
for x_ty, code in (("fp16", 1), ("bf16", 2), ("fp32", 0)):
    for bm, bn in TILES:
        check(x_ty, code, True, False, bm, bn)
for has_res, static in ((False, False), (False, True), (True, True)):
    for bm, bn in TILES[:2]:
        check("fp16", 1, has_res, static, bm, bn)
check("bf16", 2, False, False, 1, None)  # the variant that spilled with 8 warps per 4096-chunk
# the unquantized norm (rmsnorm_triton: the FP16 models' norm on CUDA)
for x_ty, code in (("fp16", 1), ("bf16", 2)):
    for has_res in (False, True):
        for bm, bn in TILES[:1] + TILES[2:]:
            check(x_ty, code, has_res, True, bm, bn, quant=False)
# generic strides, mixed dtypes (fp32 γ with fp16 x: v stays fp32; residual kept in fp16)
aot(R._rmsnorm_quant_kernel, dict(HAS_RESIDUAL=True, RES_CODE=1, X_CODE=1, V_CODE=0, STATIC=False,
                                  QMAX=127, MIN_SCALE=1e-8, QUANT=True, BLOCK_M=1, BLOCK_N=4096),
    dict(x_ptr="fp16", w_ptr="fp32", q_ptr="i8", r_ptr="fp16", ro_ptr="fp16"), num_warps=16)
'''


def test_kernels_compile_for_sm90(tmp_path):
    run_aot(tmp_path, RMSNORM_AOT_BODY)
