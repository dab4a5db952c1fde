"""Fused online Hadamard rotation + symmetric int8 quantization (Triton + reference).

API
---
``hadamard_quant_int8(x, scale=None, *, signs=None, channel_scale=None, transpose=False,
round_to_input_dtype=True, input_precision=None) -> (q, scale)``
    ``x``: (..., n) float32/float16/bfloat16 rows.  Computes ``y = x @ H_n`` (or
    ``x @ H_n.T`` with ``transpose=True``; with ``signs`` a ±1 vector of length n,
    ``y = (x * signs) @ H_n``, i.e. ``x @ random_hadamard_matrix``; with
    ``channel_scale`` a positive vector s of length n, ``y = ((x / s) * signs) @ H_n``,
    the SmoothQuant scale of LRQ-DiT's adaptive rotation: ``ChannelScale(s)`` then
    ``HadamardTransform``), with ``H_n`` the
    normalised matrix of :func:`archquant.core.hadamard.hadamard_matrix`, and
    quantizes ``y`` to int8 codes (restricted range ±127) in the same kernel:
    per token (``scale=None``: ``scale = max(amax / 127, 1e-8)``, returned with
    shape ``x.shape[:-1] + (1,)``) or with a given static scale (one value or one
    per token; returned unchanged as fp32).
``hadamard_quant_int8_reference(x, scale=None, ...)``
    ``quantize(apply_hadamard(ChannelScale(s)(x) * signs))`` with the core modules.
``hadamard_plan(n, transpose=False)``
    The factorisation and the (padded) ±1 matrices the kernel uses.

Which matrix
------------
The kernel never builds its own Hadamard matrix: the factors come from
:mod:`archquant.core.hadamard` (``hadamard_base`` and ``hadamard_matrix``).  With
``(K, P) = factor_size(n)`` and ``H_n = kron(H_K, H_P)`` (index ``i = a*P + b``),
the power-of-two factor is split further, ``H_P = kron(H_P1, H_B)`` (true for
Sylvester matrices in natural order), giving

    H_n = kron(L, R),   L = kron(H_K, H_P1)  (A x A, A = K*P1),   R = H_B  (B x B),

and row element ``i = a*B + b`` (a < A, b < B).  Viewing one row as the (A, B)
matrix X (row-major), ``x @ H_n`` is ``L^T X R``: the kernel computes
``t = L^T X`` and ``y = t R`` as two ``tl.dot``'s on one register tile, then
multiplies by ``fp32(1/sqrt(n))`` exactly as ``apply_hadamard`` does.  For
``transpose=True`` the kernel gets ``L`` instead of ``L^T`` and ``R^T`` (= R).
Small sizes (``n <= 64``, padded to a power of two >= 16) use ``A = 1``: one dense
``tl.dot`` of a (BLOCK_M=16, n_pad) tile of 16 rows with ``H_n`` (or ``H_n^T``).

The split P1 is chosen by ``hadamard_plan`` to minimise the padded work
``A_pad * B_pad * (A_pad + B_pad)`` with A_pad, B_pad powers of two >= 16 (the
NVIDIA minimum dot size) and ``A_pad * B_pad <= 16384`` elements per tile (e.g.
1536 = 12*128 -> A=24 (pad 32) x B=64; 5120 = 40*128 -> A=40 (pad 64) x B=128;
4096 -> 64 x 64; 160 = 40*4 -> A=40 (pad 64) x B=4 (pad 16)).  The matrices
are passed as zero-padded int8 ±1/0 tensors, so padded rows/columns contribute
nothing and padded outputs are 0 (they never raise the absmax).

Precision and rounding
----------------------
Loads are cast to fp32.  ``input_precision="ieee"`` runs the dots as true fp32
products and sums; on sm_90 that is the FMA path, not tensor cores, which holds
both operand tiles in registers.  ``"tf32x3"`` is the tensor-core alternative:
the ±1 matrices are exact in tf32, so only the 3-way split of x loses ~2^-22
relative (far below the 16-bit rounding of y that follows); ``"tf32"`` would lose
~2^-11 and is not recommended.  The default (``None``) is :func:`launch_params`'
choice per plan: "ieee" for tiles under 4096 elements, "tf32x3" from there on,
because the offline sm_90 compile of the FMA path spills registers on the large
tiles (n = 5120, tile 64 x 128: 12-14 KB of spills with 8 warps, none with
tf32x3; n = 2560/4096, 64 x 64: ~200 B with 4 warps, none with 8).  In the
interpreter every precision is a plain fp32 matmul.  Like ``apply_hadamard`` (which returns the input
dtype), the rotated values are rounded to the input dtype first when x is
fp16/bf16 (``round_to_input_dtype=True``); then ``tl.div_rn`` + round-half-even
(floor/where) reproduce ``archquant.core.formats`` exactly for a given ``y``.
Because the kernel's fp32 summation order differs from the core's butterfly, a
``y`` may differ in the last bit, so a code can differ by 1 where ``y / scale``
lies within an ulp of a rounding boundary (rare).

The channel scale copies ``ChannelScale.forward`` (``x / s.to(x)``, computed in x's
dtype): with ``round_to_input_dtype=True`` and a 16-bit x, the kernel rounds s to
x's dtype, divides in fp32 with ``tl.div_rn`` and rounds the quotient to x's dtype,
which is what torch's 16-bit division gives (it divides in fp32 and rounds once; the
fp32 quotient of two 16-bit values rounds to the same 16-bit value as the exact one,
since 24 >= 2 * 11 + 2 bits).  For fp32 x (or ``round_to_input_dtype=False``, whose
reference runs everything in fp32) it is the one IEEE fp32 division torch does.  So
the rotation's input is bit-identical to the separate ops'; the ±1 signs are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from archquant.core.hadamard import apply_hadamard, factor_size, hadamard_base, hadamard_matrix
from archquant.core.transforms import ChannelScale

from ._triton_utils import (
    OUT_DTYPES,
    check_launchable,
    next_pow2,
    prepare_out,
    quantize_int8_tile,
    round_to_dtype_code,
)
from .quantize import (
    INT8_QMAX,
    MIN_SCALE,
    _as_rows,
    _rows_view,
    _static_scale,
    quantize_per_token_int8_reference,
    quantize_static_int8_reference,
)

__all__ = [
    "HadamardPlan",
    "hadamard_plan",
    "hadamard_quant_int8",
    "launch_params",
    "hadamard_quant_int8_reference",
]

_MIN_DOT = 16  # dot dims padded to >= 16: above the NVIDIA minimum K (8 for fp32/tf32, 16 for 16-bit)
_MAX_DENSE = 64  # dense single-dot path up to this padded size
_MAX_TILE = 16384  # fp32 elements of one (A_pad, B_pad) row tile
_MAX_SIDE = 256
_DENSE_BLOCK_M = 16
_PRECISIONS = ("ieee", "tf32x3", "tf32")


@dataclass(frozen=True)
class HadamardPlan:
    """How ``hadamard_quant_int8`` applies ``H_n = kron(L, R)`` (see the module doc).

    ``a == 1`` means the dense path (``R = H_n``).  ``left`` is the (a_pad, a_pad)
    matrix multiplied from the left (``L^T``, or ``L`` for transpose), ``right`` the
    (b_pad, b_pad) one from the right; both int8 ±1, zero padded, on the CPU.
    """

    n: int
    K: int
    pow2: int
    a: int
    b: int
    a_pad: int
    b_pad: int
    transpose: bool
    left: torch.Tensor | None
    right: torch.Tensor

    @property
    def dense(self) -> bool:
        return self.a == 1


def _pad_int8(m: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.zeros((size, size), dtype=torch.int8)
    out[: m.shape[0], : m.shape[1]] = m.round().to(torch.int8)
    return out


def _choose_split(n: int) -> tuple[int, int]:
    """(A, B) with n = A * B, H_n = kron(L_A, R_B); A == 1 for the dense path."""
    k, p = factor_size(n)
    best = None  # (cost, a, b)
    n_pad = max(_MIN_DOT, next_pow2(n))
    if n_pad <= _MAX_DENSE:
        best = (n_pad * n_pad, 1, n)
    p1 = 1
    while p1 <= p:
        a, b = k * p1, p // p1
        if a > 1:
            ap, bp = max(_MIN_DOT, next_pow2(a)), max(_MIN_DOT, next_pow2(b))
            if ap <= _MAX_SIDE and bp <= _MAX_SIDE and ap * bp <= _MAX_TILE:
                cost = ap * bp * (ap + bp)
                if best is None or cost < best[0]:  # ties keep the larger (contiguous) B
                    best = (cost, a, b)
        p1 *= 2
    if best is None:
        raise ValueError(
            f"hadamard_quant_int8: n={n} needs a row tile larger than {_MAX_TILE} elements; "
            "use a block-Hadamard transform (archquant.core.hadamard.apply_block_hadamard)"
        )
    return best[1], best[2]


@lru_cache(maxsize=64)
def hadamard_plan(n: int, transpose: bool = False) -> HadamardPlan:
    """Factorisation and padded int8 matrices for ``n`` (cached, CPU tensors)."""
    k, p = factor_size(n)
    a, b = _choose_split(n)
    if a == 1:
        h = hadamard_matrix(n, normalized=False)
        right = _pad_int8(h.T if transpose else h, max(_MIN_DOT, next_pow2(n)))
        return HadamardPlan(n, k, p, 1, n, 1, right.shape[0], transpose, None, right)
    p1 = a // k
    # L = kron(H_K, H_P1) and R = H_B: with H_P = kron(H_P1, H_B) this is H_n's order.
    left = torch.kron(hadamard_base(k), hadamard_matrix(p1, normalized=False))
    right = hadamard_matrix(b, normalized=False)
    a_pad, b_pad = max(_MIN_DOT, next_pow2(a)), max(_MIN_DOT, next_pow2(b))
    left_used = left if transpose else left.T  # multiplied from the left
    right_used = right.T if transpose else right  # Sylvester: symmetric anyway
    return HadamardPlan(
        n, k, p, a, b, a_pad, b_pad, transpose, _pad_int8(left_used, a_pad), _pad_int8(right_used, b_pad)
    )


_DEVICE_MATS: dict = {}


def _device_mats(plan: HadamardPlan, device: torch.device):
    key = (plan.n, plan.transpose, str(device))
    mats = _DEVICE_MATS.get(key)
    if mats is None:
        left = plan.left.to(device) if plan.left is not None else None
        mats = (left, plan.right.to(device))
        if len(_DEVICE_MATS) > 64:
            _DEVICE_MATS.clear()
        _DEVICE_MATS[key] = mats
    return mats


# --------------------------------------------------------------------------- kernels


@triton.jit
def _finish_rows(y, s_ptr, rows64, row_mask, stride_s,
                 STATIC: tl.constexpr, QMAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    """Per-row scale (computed and stored, or loaded) for a (BLOCK_M, N) tile; codes."""
    if STATIC:
        scale = tl.load(s_ptr + rows64 * stride_s, mask=row_mask, other=1.0).to(tl.float32)
    else:
        amax = tl.max(tl.abs(y), axis=1)
        scale = tl.maximum(tl.div_rn(amax, QMAX * 1.0), MIN_SCALE)
        tl.store(s_ptr + rows64, scale, mask=row_mask)
    return quantize_int8_tile(y, scale[:, None], QMAX)


@triton.jit
def _divide_channels(x, cs, ROUND: tl.constexpr):
    """``x / s`` as ``ChannelScale`` computes it in x's dtype (code ``ROUND``, see the module doc):
    s and the quotient rounded to that dtype, the division IEEE (plain ``/`` is approximate on
    NVIDIA).  Padded lanes load s = 1, so they stay 0 instead of 0 / 0 = NaN, which the ±1/0
    matrices would spread over the whole row."""
    s = round_to_dtype_code(cs.to(tl.float32), ROUND)
    return round_to_dtype_code(tl.div_rn(x, s), ROUND)


@triton.jit
def _hadamard_quant_dense_kernel(
    x_ptr, r_ptr, sign_ptr, cs_ptr, q_ptr, s_ptr,
    M, stride_xm, stride_xk, stride_qm, stride_qk, stride_s,
    N: tl.constexpr, N_PAD: tl.constexpr, NORM: tl.constexpr,
    HAS_SIGNS: tl.constexpr, HAS_CHANNEL_SCALE: tl.constexpr, STATIC: tl.constexpr, Y_ROUND: tl.constexpr,
    QMAX: tl.constexpr, MIN_SCALE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, N_PAD)
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xk,
                mask=mask, other=0.0).to(tl.float32)
    if HAS_CHANNEL_SCALE:
        cs = tl.load(cs_ptr + cols, mask=col_mask, other=1.0)
        x = _divide_channels(x, cs[None, :], Y_ROUND)
    if HAS_SIGNS:
        x = x * tl.load(sign_ptr + cols, mask=col_mask, other=0.0)[None, :]
    h = tl.load(r_ptr + cols[:, None] * N_PAD + cols[None, :]).to(tl.float32)
    y = tl.dot(x, h, input_precision=PRECISION) * NORM
    y = round_to_dtype_code(y, Y_ROUND)
    q = _finish_rows(y, s_ptr, rows64, row_mask, stride_s, STATIC, QMAX, MIN_SCALE)
    tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :] * stride_qk, q, mask=mask)


@triton.jit
def _hadamard_quant_kron_kernel(
    x_ptr, l_ptr, r_ptr, sign_ptr, cs_ptr, q_ptr, s_ptr,
    M, stride_xm, stride_xk, stride_qm, stride_qk, stride_s,
    A: tl.constexpr, B: tl.constexpr, A_PAD: tl.constexpr, B_PAD: tl.constexpr,
    NORM: tl.constexpr,
    HAS_SIGNS: tl.constexpr, HAS_CHANNEL_SCALE: tl.constexpr, STATIC: tl.constexpr, Y_ROUND: tl.constexpr,
    QMAX: tl.constexpr, MIN_SCALE: tl.constexpr, PRECISION: tl.constexpr,
    ROWS_PER_PROG: tl.constexpr,
):
    ia = tl.arange(0, A_PAD)
    ib = tl.arange(0, B_PAD)
    tile_mask = (ia < A)[:, None] & (ib < B)[None, :]
    idx = ia[:, None] * B + ib[None, :]  # element i = a*B + b of the row
    # The ±1 factors are loaded once per program and reused for all its rows.
    lmat = tl.load(l_ptr + ia[:, None] * A_PAD + ia[None, :]).to(tl.float32)
    rmat = tl.load(r_ptr + ib[:, None] * B_PAD + ib[None, :]).to(tl.float32)
    if HAS_SIGNS:
        sgn = tl.load(sign_ptr + idx, mask=tile_mask, other=0.0)
    if HAS_CHANNEL_SCALE:
        cs = tl.load(cs_ptr + idx, mask=tile_mask, other=1.0)
    pid = tl.program_id(0)
    for i in range(ROWS_PER_PROG):
        # Rows past the end are clamped to the last row instead of masked (scalar
        # masks trip the interpreter): the tail program recomputes row M-1 and
        # writes the very same bytes again, which is harmless.
        row = tl.minimum(pid * ROWS_PER_PROG + i, M - 1)
        row64 = row.to(tl.int64)
        x = tl.load(x_ptr + row64 * stride_xm + idx * stride_xk,
                    mask=tile_mask, other=0.0).to(tl.float32)
        if HAS_CHANNEL_SCALE:
            x = _divide_channels(x, cs, Y_ROUND)
        if HAS_SIGNS:
            x = x * sgn
        t = tl.dot(lmat, x, input_precision=PRECISION)  # L^T X   (A_PAD, B_PAD)
        y = tl.dot(t, rmat, input_precision=PRECISION) * NORM  # (L^T X) R
        y = round_to_dtype_code(y, Y_ROUND)
        if STATIC:
            scale = tl.load(s_ptr + row64 * stride_s).to(tl.float32)
        else:
            amax = tl.max(tl.max(tl.abs(y), axis=1), axis=0)
            scale = tl.maximum(tl.div_rn(amax, QMAX * 1.0), MIN_SCALE)
            tl.store(s_ptr + row64, scale)
        q = quantize_int8_tile(y, scale, QMAX)
        tl.store(q_ptr + row64 * stride_qm + idx * stride_qk, q, mask=tile_mask)


# --------------------------------------------------------------------------- wrapper


def launch_params(plan: HadamardPlan, input_precision: str | None = None) -> tuple[str, int]:
    """(dot precision, num_warps) for a plan: the combination that compiles without register
    spills for sm_90 (checked offline by ``tests/test_kernels_hadamard.py``)."""
    if plan.dense:
        return input_precision or "ieee", 4
    large = plan.a_pad * plan.b_pad >= 4096
    return input_precision or ("tf32x3" if large else "ieee"), 8 if large else 4


def _channel_vector(v, n: int, device: torch.device, name: str) -> torch.Tensor | None:
    """``v`` as the kernel reads it: n contiguous fp32 values on ``device`` (None stays None)."""
    if v is None:
        return None
    v = torch.as_tensor(v, dtype=torch.float32, device=device).reshape(-1).contiguous()
    if v.numel() != n:
        raise ValueError(f"{name} must have {n} elements, got {v.numel()}")
    return v


def hadamard_quant_int8(
    x: torch.Tensor,
    scale=None,
    *,
    signs: torch.Tensor | None = None,
    channel_scale: torch.Tensor | None = None,
    transpose: bool = False,
    round_to_input_dtype: bool = True,
    input_precision: str | None = None,
    rows_per_program: int | None = None,
    out: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of ``x @ H_n`` (n = x.shape[-1]) and their scales, in one kernel.

    ``signs`` / ``channel_scale``: n values each, x's columns are divided by ``channel_scale``
    and then multiplied by ``signs`` before the rotation (see the module doc).
    ``out`` / ``out_scale`` (per-token mode only, contiguous): optional preallocated
    results.  ``rows_per_program``: rows handled by one program of the factorised
    kernel (default 1, or 4 for more than 1024 rows).
    """
    x2 = _as_rows(x)
    m, n = x2.shape
    if input_precision is not None and input_precision not in _PRECISIONS:
        raise ValueError(f"input_precision must be one of {_PRECISIONS} or None, got {input_precision!r}")
    plan = hadamard_plan(n, bool(transpose))
    input_precision, num_warps = launch_params(plan, input_precision)
    device = x.device
    signs = _channel_vector(signs, n, device, "signs")
    channel_scale = _channel_vector(channel_scale, n, device, "channel_scale")
    static = scale is not None
    if static:
        if out_scale is not None:
            raise ValueError("out_scale is only used with dynamic (per-token) scales")
        s, stride_s = _static_scale(scale, m, device)
        out_scale = torch.as_tensor(scale, dtype=torch.float32, device=device)  # handed back as given
    else:
        out_scale = prepare_out(out_scale, (*x.shape[:-1], 1), torch.float32, device, "out_scale",
                                contiguous=True)
        s, stride_s = out_scale.view(m, 1), 1
    q_full = prepare_out(out, x.shape, torch.int8, device, "out")
    q = _rows_view(q_full, m, n, "out")
    check_launchable(x2, s, signs, channel_scale, q)
    if m == 0:
        return q_full, out_scale
    left, right = _device_mats(plan, device)
    y_round = OUT_DTYPES[x.dtype] if round_to_input_dtype else 0
    norm = float(torch.tensor(1.0 / math.sqrt(n), dtype=torch.float32))  # what apply_hadamard uses
    common = dict(
        HAS_SIGNS=signs is not None, HAS_CHANNEL_SCALE=channel_scale is not None, STATIC=static, Y_ROUND=y_round,
        QMAX=INT8_QMAX, MIN_SCALE=MIN_SCALE, PRECISION=input_precision,
        enable_fp_fusion=False,
    )
    # an absent vector's pointer is never read (its HAS_ flag is off): any fp32 tensor will do
    sign_arg = signs if signs is not None else s
    channel_scale_arg = channel_scale if channel_scale is not None else s
    strides = (m, x2.stride(0), x2.stride(1), q.stride(0), q.stride(1), stride_s)
    if plan.dense:
        _hadamard_quant_dense_kernel[(triton.cdiv(m, _DENSE_BLOCK_M),)](
            x2, right, sign_arg, channel_scale_arg, q, s, *strides,
            N=n, N_PAD=plan.b_pad, NORM=norm, BLOCK_M=_DENSE_BLOCK_M,
            num_warps=num_warps, **common,
        )
    else:
        rpp = rows_per_program or (1 if m <= 1024 else 4)
        if not isinstance(rpp, int) or rpp < 1:
            raise ValueError(f"rows_per_program must be a positive int, got {rows_per_program!r}")
        _hadamard_quant_kron_kernel[(triton.cdiv(m, rpp),)](
            x2, left, right, sign_arg, channel_scale_arg, q, s, *strides,
            A=plan.a, B=plan.b, A_PAD=plan.a_pad, B_PAD=plan.b_pad, NORM=norm,
            ROWS_PER_PROG=rpp, num_warps=num_warps, **common,
        )
    return q_full, out_scale


def hadamard_quant_int8_reference(
    x: torch.Tensor,
    scale=None,
    *,
    signs: torch.Tensor | None = None,
    channel_scale: torch.Tensor | None = None,
    transpose: bool = False,
    round_to_input_dtype: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Core oracle: ``quantize(apply_hadamard(ChannelScale(channel_scale)(x) * signs))`` (per
    token or static scale); without rounding to the input dtype, all of it in fp32."""
    xin = x if round_to_input_dtype else x.to(torch.float32)
    if channel_scale is not None:
        xin = ChannelScale(torch.as_tensor(channel_scale).reshape(-1)).to(x.device)(xin)
    if signs is not None:
        xin = xin * torch.as_tensor(signs, device=x.device).to(xin.dtype)  # ±1: exact
    y = apply_hadamard(xin, transpose=transpose)
    if scale is None:
        return quantize_per_token_int8_reference(y)
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return quantize_static_int8_reference(y, s), s
