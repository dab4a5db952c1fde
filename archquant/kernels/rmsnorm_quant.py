"""Fused (residual add +) RMSNorm + symmetric int8 quantization (Triton + reference).

Mamba's pre-mixer ``RMSNorm`` followed by the static int8 quantization of
``in_proj``'s input is ~6 small torch kernels (cast, square, mean, add eps,
rsqrt, mul, cast, mul by γ) plus a quantize kernel; a decode step on a GPU is
launch-bound, so this module does it all in one launch.

API
---
``rmsnorm_quant_int8(x, weight, eps, scale=None, *, residual=None,
residual_in_fp32=True, out=None, out_scale=None, out_residual=None, block_n=None)
-> (codes, scale, residual_out)``
    ``x``: (..., n) float32/float16/bfloat16 rows (any leading shape, any row
    and column strides).  ``weight``: (n,) γ, float32/float16/bfloat16.
    ``eps``: float.  ``codes``: int8 with the shape of ``x``.
    ``scale``: a float or one-element tensor (static per-tensor scale, returned
    as an fp32 tensor of the given shape), or ``None`` for dynamic per-token
    scales ``max(amax / 127, 1e-8)``, returned as fp32 of shape
    ``x.shape[:-1] + (1,)``.  ``residual`` (optional, shape of ``x``, float
    dtype): fused residual add, see below; ``residual_out`` is ``None`` without it.
    ``out`` / ``out_scale`` (dynamic mode, contiguous) / ``out_residual``:
    optional preallocated results (e.g. for CUDA graphs); ``out_residual`` may be
    ``residual`` itself (in-place update of the residual stream).
    ``block_n``: column chunk (power of two); the default is one tile of
    ``next_pow2(n)`` columns up to n = 8192, chunks of 4096 beyond.
``rmsnorm_quant_int8_reference(...)``
    The same with PyTorch ops: :func:`rmsnorm_reference` (what
    ``archquant.models.layers.RMSNorm`` computes) + ``archquant.core.formats.quantize``.

Semantics and rounding order
----------------------------
Per row, with ``dt = x.dtype`` and ``pt = torch.promote_types(weight.dtype, dt)``
(the dtype ``RMSNorm.forward`` returns):

1. residual (optional): ``h32 = fp32(x) + fp32(residual)`` (one fp32 add);
   ``h = h32`` if ``residual_in_fp32`` else ``h32`` rounded to ``dt``;
   ``residual_out = h`` (stored as fp32, resp. ``dt``: exact).  The norm input
   is ``h`` rounded to ``dt`` (no-op unless ``residual_in_fp32`` and ``dt`` is
   16-bit) -- exactly ``models.mamba.MambaBlock``, which computes
   ``hidden = (residual + out).to(residual.dtype)`` and then
   ``norm(hidden.to(norm.weight.dtype))`` for a model in one dtype.
   Without ``residual`` the norm input is ``x``.
2. ``RMSNorm.forward`` of the norm input ``a`` (fp32 values):
   ``ms = sum(a*a) / n`` (fp32; ``torch.mean`` is sum then divide),
   ``rstd = 1 / sqrt(ms + fp32(eps))`` (correctly rounded sqrt and division, as
   ``torch.rsqrt`` on a CPU; ``tl.rsqrt`` would be an approximation on the GPU),
   ``y = a * rstd`` rounded to ``dt``, ``v = fp32(weight) * y`` rounded to ``pt``.
   (The product of two 16-bit floats is exact in fp32, so rounding it once to
   ``pt`` is what PyTorch's half/bf16 multiply gives; an fp32 γ times a 16-bit
   ``y`` stays fp32 by promotion, as in the module.)
3. Quantization of ``v`` as :mod:`archquant.kernels.quantize`: ``tl.div_rn(v,
   scale)``, round half to even, clamp to [-127, 127].

All arithmetic is fp32 (loads are cast right away), 16-bit roundings go through
``round_to_dtype_code`` (nearest even on every backend), and the kernels are
launched with ``enable_fp_fusion=False`` (no FMA contraction).

Exactness
---------
Every step is a correctly rounded IEEE operation identical to the reference,
except the order of the fp32 sum of squares (the kernel's tree reduction vs
torch's cascade sum).  When ``ms`` comes out the same, codes, scales and the
residual are bit-identical.  When it differs (by a few ulps, moving ``rstd`` by
a few ulps), a code can differ by 1 where the reference's value is at a
rounding boundary (``v / scale`` near a .5 tie, or ``a * rstd`` near a 16-bit
rounding midpoint), and a dynamic fp32-input scale by a few ulps.
``residual_out`` is always exact.  The tests check precisely that: every row
equals the reference computed with ``rstd`` nudged by at most 4 ulps.  In the
interpreter no code has been seen to differ; only dynamic scales of fp32 inputs
(in ~20% of rows, by up to 3 ulps; fp16/bf16 ``y`` absorbs the rstd difference).

Kernel layout
-------------
``_rmsnorm_quant_kernel`` (n <= 8192): one program per ``BLOCK_M`` rows, the
whole row tile (``BLOCK_M x BLOCK_N``, ``BLOCK_N = next_pow2(n)``, at most 4096
elements unless one row needs more) stays in registers: load x (+ residual),
store the residual, row sum of squares, normalise, γ, amax (dynamic), quantize,
store codes.  Decode (M = 1..batch) is a single launch of a few programs.
``_rmsnorm_quant_chunked_kernel`` (n > 8192, or a smaller ``block_n``): one
program per row, column chunks of ``BLOCK_N``; pass 1 adds the residual, stores
it and accumulates the sum of squares; pass 2 (dynamic only) the amax of ``v``;
the last pass quantizes.  Later passes re-read the norm input from
``residual_out`` (exact, and correct when it aliases ``residual``) or from ``x``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from archquant.core.formats import QuantSpec, quantize

from ._triton_utils import (
    OUT_DTYPES,
    check_launchable,
    check_pow2,
    next_pow2,
    prepare_out,
    quantize_int8_tile,
    round_to_dtype_code,
)
from .quantize import (
    INT8_QMAX,
    MIN_SCALE,
    _rows_view,
    quantize_per_token_int8_reference,
)

__all__ = [
    "MAX_SINGLE_TILE_N",
    "rmsnorm_quant_int8",
    "rmsnorm_quant_int8_reference",
    "rmsnorm_reference",
    "rmsnorm_triton",
]

MAX_SINGLE_TILE_N = 8192  # rows up to this length are one register tile
_CHUNK_N = 4096  # column chunk of the looping kernel
_MAX_TILE = 4096  # elements of a multi-row tile
_MAX_BLOCK_M = 16
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _load_norm_input(x_ptr, r_ptr, ro_ptr, offs_x, offs_r, offs_ro, mask,
                     HAS_RESIDUAL: tl.constexpr, RES_CODE: tl.constexpr, X_CODE: tl.constexpr):
    """fp32 norm input (rounded to x's dtype); with a residual, adds it and stores residual_out."""
    a = tl.load(x_ptr + offs_x, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        a = a + tl.load(r_ptr + offs_r, mask=mask, other=0.0).to(tl.float32)
        a = round_to_dtype_code(a, RES_CODE)
        tl.store(ro_ptr + offs_ro, a.to(ro_ptr.dtype.element_ty), mask=mask)
        a = round_to_dtype_code(a, X_CODE)
    return a


@triton.jit
def _reload_norm_input(x_row, o_row, offs_x, offs_o, mask, HAS_RESIDUAL: tl.constexpr, X_CODE: tl.constexpr):
    """The norm input again: from the stored residual_out (exact), or from x."""
    if HAS_RESIDUAL:
        a = round_to_dtype_code(tl.load(o_row + offs_o, mask=mask, other=0.0).to(tl.float32), X_CODE)
    else:
        a = tl.load(x_row + offs_x, mask=mask, other=0.0).to(tl.float32)
    return a


@triton.jit
def _norm_values(a, rstd, w, X_CODE: tl.constexpr, V_CODE: tl.constexpr):
    """RMSNorm.forward from the row factor: ``pt(w * dt(a * rstd))`` as fp32."""
    y = round_to_dtype_code(a * rstd, X_CODE)
    return round_to_dtype_code(w * y, V_CODE)


@triton.jit
def _rstd(sumsq, N, eps):
    ms = tl.div_rn(sumsq, N * 1.0)
    return tl.div_rn(1.0, tl.sqrt_rn(ms + eps))


@triton.jit
def _rmsnorm_quant_kernel(
    x_ptr, r_ptr, ro_ptr, w_ptr, q_ptr, s_ptr,
    M, N, eps,
    s_xm, s_xn, s_rm, s_rn, s_om, s_on, s_w, s_qm, s_qn,
    HAS_RESIDUAL: tl.constexpr, RES_CODE: tl.constexpr, X_CODE: tl.constexpr, V_CODE: tl.constexpr,
    STATIC: tl.constexpr, QMAX: tl.constexpr, MIN_SCALE: tl.constexpr, QUANT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    r2, c2 = rows64[:, None], cols[None, :]

    # Masked elements load as 0: they add nothing to the sum of squares, give
    # v = 0 (never raises an amax) and are not stored.
    a = _load_norm_input(x_ptr, r_ptr, ro_ptr, r2 * s_xm + c2 * s_xn, r2 * s_rm + c2 * s_rn,
                         r2 * s_om + c2 * s_on, mask, HAS_RESIDUAL, RES_CODE, X_CODE)
    rstd = _rstd(tl.sum(a * a, axis=1), N, eps)
    w = tl.load(w_ptr + cols * s_w, mask=col_mask, other=0.0).to(tl.float32)
    v = _norm_values(a, rstd[:, None], w[None, :], X_CODE, V_CODE)
    if not QUANT:  # plain (fused add +) RMSNorm: the normalised values themselves
        tl.store(q_ptr + r2 * s_qm + c2 * s_qn, v.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        if STATIC:
            scale = tl.load(s_ptr).to(tl.float32)
            q = quantize_int8_tile(v, scale, QMAX)
        else:
            amax = tl.max(tl.abs(v), axis=1)
            scale = tl.maximum(tl.div_rn(amax, QMAX * 1.0), MIN_SCALE)
            tl.store(s_ptr + rows64, scale, mask=row_mask)
            q = quantize_int8_tile(v, scale[:, None], QMAX)
        tl.store(q_ptr + r2 * s_qm + c2 * s_qn, q, mask=mask)


@triton.jit
def _rmsnorm_quant_chunked_kernel(
    x_ptr, r_ptr, ro_ptr, w_ptr, q_ptr, s_ptr,
    M, N, eps,
    s_xm, s_xn, s_rm, s_rn, s_om, s_on, s_w, s_qm, s_qn,
    HAS_RESIDUAL: tl.constexpr, RES_CODE: tl.constexpr, X_CODE: tl.constexpr, V_CODE: tl.constexpr,
    STATIC: tl.constexpr, QMAX: tl.constexpr, MIN_SCALE: tl.constexpr, QUANT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row64 = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    x_row, r_row, o_row = x_ptr + row64 * s_xm, r_ptr + row64 * s_rm, ro_ptr + row64 * s_om

    # Pass 1: residual add + store, sum of squares (per-lane partial sums, then one tree).
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        c = n0 + cols
        mask = c < N
        a = _load_norm_input(x_row, r_row, o_row, c * s_xn, c * s_rn, c * s_on, mask,
                             HAS_RESIDUAL, RES_CODE, X_CODE)
        acc += a * a
    rstd = _rstd(tl.sum(acc, axis=0), N, eps)
    # Later passes read the norm input back from residual_out (the stored h is
    # exact); each element is re-read by the thread that wrote it, the barrier
    # is belt and braces.
    tl.debug_barrier()

    if not QUANT:
        scale = 1.0  # unused: the normalised values are stored as they are
    elif STATIC:
        scale = tl.load(s_ptr).to(tl.float32)
    else:
        amax = tl.zeros([BLOCK_N], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            c = n0 + cols
            mask = c < N
            a = _reload_norm_input(x_row, o_row, c * s_xn, c * s_on, mask, HAS_RESIDUAL, X_CODE)
            w = tl.load(w_ptr + c * s_w, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(_norm_values(a, rstd, w, X_CODE, V_CODE)))
        scale = tl.maximum(tl.div_rn(tl.max(amax, axis=0), QMAX * 1.0), MIN_SCALE)
        tl.store(s_ptr + row64, scale)

    for n0 in range(0, N, BLOCK_N):
        c = n0 + cols
        mask = c < N
        a = _reload_norm_input(x_row, o_row, c * s_xn, c * s_on, mask, HAS_RESIDUAL, X_CODE)
        w = tl.load(w_ptr + c * s_w, mask=mask, other=0.0).to(tl.float32)
        v = _norm_values(a, rstd, w, X_CODE, V_CODE)
        if QUANT:
            tl.store(q_ptr + row64 * s_qm + c * s_qn, quantize_int8_tile(v, scale, QMAX), mask=mask)
        else:
            tl.store(q_ptr + row64 * s_qm + c * s_qn, v.to(q_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- wrapper


def _num_warps(tile: int) -> int:
    # <= 8 elements of the tile per thread: no register spills on sm_90 for any
    # dtype/residual/static variant (16 per thread left an 8-byte stack in some).
    return min(16, max(4, tile // 256))


def _check_float(t, name: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32/float16/bfloat16 tensor, got "
                        f"{getattr(t, 'dtype', type(t))}")


def _check_args(x, weight, residual, scale) -> None:
    _check_float(x, "x")
    _check_float(weight, "weight")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x needs a non-empty last dimension, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n:
        raise ValueError(f"weight must have shape ({n},), got {tuple(weight.shape)}")
    if residual is not None:
        _check_float(residual, "residual")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    if scale is not None:
        numel = scale.numel() if isinstance(scale, torch.Tensor) else 1
        if numel != 1:
            raise ValueError(f"static scale must be one value (per tensor), got {numel} elements")


def _launch(x2, r2, ro, w, out2, s, eps, *, residual: bool, res_dtype, x_dtype, static: bool, quant: bool,
            block_n: int | None) -> None:
    m, n = x2.shape
    bn = check_pow2(block_n or (next_pow2(n) if n <= MAX_SINGLE_TILE_N else _CHUNK_N), "block_n")
    if m == 0:
        return
    common = dict(
        HAS_RESIDUAL=residual, RES_CODE=OUT_DTYPES[res_dtype], X_CODE=OUT_DTYPES[x_dtype],
        V_CODE=OUT_DTYPES[torch.promote_types(w.dtype, x_dtype)],
        STATIC=static, QMAX=INT8_QMAX, MIN_SCALE=MIN_SCALE, QUANT=quant, enable_fp_fusion=False,
    )
    args = (x2, r2, ro, w, out2, s, m, n, float(eps),
            x2.stride(0), x2.stride(1), r2.stride(0), r2.stride(1), ro.stride(0), ro.stride(1),
            w.stride(0), out2.stride(0), out2.stride(1))
    if bn >= n:  # one register tile per row block
        bm = max(1, min(next_pow2(m), _MAX_TILE // bn, _MAX_BLOCK_M))
        _rmsnorm_quant_kernel[(triton.cdiv(m, bm),)](
            *args, BLOCK_M=bm, BLOCK_N=bn, num_warps=_num_warps(bm * bn), **common)
    else:
        _rmsnorm_quant_chunked_kernel[(m,)](
            *args, BLOCK_N=bn, num_warps=_num_warps(bn), **common)


def _residual_views(x, x2, residual, residual_in_fp32, out_residual):
    n = x.shape[-1]
    if residual is not None:
        res_dtype = torch.float32 if residual_in_fp32 else x.dtype
        r2 = residual.reshape(-1, n)
        ro_full = prepare_out(out_residual, x.shape, res_dtype, x.device, "out_residual")
        return res_dtype, r2, ro_full, _rows_view(ro_full, x2.shape[0], n, "out_residual")
    if out_residual is not None:
        raise ValueError("out_residual needs residual")
    return x.dtype, x2, None, x2  # dummies, never touched


def rmsnorm_quant_int8(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    scale=None,
    *,
    residual: torch.Tensor | None = None,
    residual_in_fp32: bool = True,
    out: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    out_residual: torch.Tensor | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``quantize_int8(RMSNorm(x [+ residual]))`` in one kernel: ``(codes, scale, residual_out)``.

    See the module docstring for the exact semantics and rounding order.
    """
    _check_args(x, weight, residual, scale)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)  # a view (strides honoured) whenever possible
    m = x2.shape[0]
    device = x.device
    static = scale is not None
    if static:
        if out_scale is not None:
            raise ValueError("out_scale is only used with dynamic (per-token) scales")
        out_scale = torch.as_tensor(scale, dtype=torch.float32, device=device)  # handed back as given
        s = out_scale.reshape(1)
    else:
        out_scale = prepare_out(out_scale, (*x.shape[:-1], 1), torch.float32, device, "out_scale",
                                contiguous=True)
        s = out_scale.view(m, 1)
    q_full = prepare_out(out, x.shape, torch.int8, device, "out")
    q = _rows_view(q_full, m, n, "out")
    res_dtype, r2, ro_full, ro = _residual_views(x, x2, residual, residual_in_fp32, out_residual)
    check_launchable(x2, r2, ro, weight, q, s)
    _launch(x2, r2, ro, weight, q, s, eps, residual=residual is not None, res_dtype=res_dtype, x_dtype=x.dtype,
            static=static, quant=True, block_n=block_n)
    return q_full, out_scale, ro_full


def rmsnorm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    residual: torch.Tensor | None = None,
    residual_in_fp32: bool = True,
    out: torch.Tensor | None = None,
    out_residual: torch.Tensor | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``RMSNorm(x [+ residual])`` without quantization, in one kernel: ``(y, residual_out)``.

    ``y`` has ``RMSNorm.forward``'s dtype (``promote_types(weight.dtype, x.dtype)``) and the same
    values bit for bit up to the sum-of-squares order (see the module docstring). The unquantized
    models' norm on CUDA: a fair FP baseline gets the same fusion as the int8 path.
    """
    _check_args(x, weight, residual, None)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    y_full = prepare_out(out, x.shape, torch.promote_types(weight.dtype, x.dtype), x.device, "out")
    y = _rows_view(y_full, x2.shape[0], n, "out")
    res_dtype, r2, ro_full, ro = _residual_views(x, x2, residual, residual_in_fp32, out_residual)
    check_launchable(x2, r2, ro, weight, y)
    _launch(x2, r2, ro, weight, y, y, eps, residual=residual is not None, res_dtype=res_dtype, x_dtype=x.dtype,
            static=True, quant=False, block_n=block_n)
    return y_full, ro_full


# --------------------------------------------------------------------------- references


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in PyTorch, the oracle of both kernels here: normalised in fp32, cast back to x's
    dtype, then times γ (the result has ``promote_types(weight.dtype, x.dtype)``), which is what
    ``archquant.models.layers.RMSNorm`` computes (HF Mamba / Llama convention)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rmsnorm_quant_int8_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    scale=None,
    *,
    residual: torch.Tensor | None = None,
    residual_in_fp32: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """PyTorch oracle of :func:`rmsnorm_quant_int8` (same rounding order, core quantizer)."""
    residual_out = None
    a = x
    if residual is not None:
        h = x.float() + residual.float()
        residual_out = h if residual_in_fp32 else h.to(x.dtype)
        a = residual_out.to(x.dtype)
    v = rmsnorm_reference(a, weight, eps)
    if scale is None:
        q, s = quantize_per_token_int8_reference(v)
        return q, s, residual_out
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    q = quantize(v, QuantSpec(bits=8, granularity="tensor"), {"scale": s.reshape(())})
    return q, s, residual_out
