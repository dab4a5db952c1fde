"""Twin-log (TLQ) weight-only GEMM: a per-row lookup-table dequantization in Triton + reference.

API
---
``twinlog_lut(params, bits) -> lut``
    The level table of a twin-log weight (``archquant.core.twinlog``, LRQ-DiT's TLQ): ``lut[n, c]``
    is what code ``c`` of row ``n`` dequantizes to, for every ``c`` in ``[0, 2^bits)``, computed by
    the core's own ``TwinLogFormat.dequantize`` (one source of truth: no formula is repeated here;
    equal to the core's dequantized weight up to one fp32 ulp of its exp2, see ``twinlog_lut``).
    ``params``: the format's per-row tensors ``eta, delta_pos, zero_pos, delta_neg, zero_neg``
    (shape (N, 1) as the core stores them, or (N,)).  ``lut``: float32 (N, 2^bits).
``twinlog_gemm(x, w_packed, lut, *, out=None, input_precision="ieee", config=None) -> (M, N)``
    ``x``: (M, K) float16 / bfloat16 / float32 (any strides), K even; ``w_packed``: uint8
    (N, K // 2), the core's nibble packing of twin-log codes
    (``archquant.core.modules.pack_nibbles(codes, signed=False)``: byte ``j`` of a row holds
    column ``2j`` in its **low** nibble and column ``2j + 1`` in its **high** nibble, no offset;
    a frozen ``QuantLinear``'s ``weight_codes`` at <= 4 bits, as stored); ``lut``: float32
    (N, L) with L = 2^bits in {4, 8, 16} (W2, W3, W4).  ``W[n, k] = lut[n, code[n, k]]`` and the
    result is ``x @ W.T`` (the ``nn.Linear`` layout) in x's dtype.  No bias: the module adds it.
``twinlog_gemm_reference(x, w_packed, lut)``
    Unpack, look the levels up, ``x.float() @ W.T`` in fp32, cast to x's dtype.

Kernel
------
Same tiling as ``w4a16_gemm`` (its module docstring): a ``BLOCK_M`` row tile, a grid over
``cdiv(N, BLOCK_N)`` column tiles, a loop over K in chunks of ``SUB`` packed bytes (2 * SUB
values of K).  Per chunk the (SUB, BLOCK_N) byte tile is split into its low and high nibbles,
which are the *even* and *odd* K columns, and each nibble is replaced by its level, gathered
from the row's table (``tl.load(lut + n * stride + code)``: the tables of a column tile are
BLOCK_N x L x 4 bytes, 2 KiB at W4 / BLOCK_N = 32, so the gathers hit L1).  x is read as its
even and odd columns, so no nibble interleaving is needed:

    acc += dot(x_even, lut[n, lo]) + dot(x_odd, lut[n, hi])        (fp32 accumulator)

Unlike int4 codes, twin-log levels are arbitrary fp32 values, so a 16-bit dot rounds them:
fp16 x -> levels rounded to fp16 (nearest even), fp16 dot; bf16 x -> levels rounded to bf16,
bf16 dot on the GPU; in the interpreter (no bf16 arithmetic) an fp32 dot on levels rounded to
bf16 nearest-even by ``round_to_dtype_code`` (the interpreter truncates on ``.to(bf16)``), so
both compute the same products.  That is what the fake-quant module does too: it casts its
dequantized weight to x's dtype before ``F.linear``.  fp32 x -> fp32 dot with
``input_precision`` ("ieee" default: exact products; "tf32x3" / "tf32" round the levels).
Each dot has K = SUB >= 16, the NVIDIA minimum for 16-bit operands (checked on the host and by
``tl.static_assert``), M = BLOCK_M >= 16 and N = BLOCK_N >= 16.

Numerics vs the reference: fp32 x agrees to fp32 summation order (each side's error is at most
~K * 2^-24 * ``sum |x| |W|``) plus nothing else; 16-bit x additionally differs by the rounding
of each level to x's dtype (relative 2^-11 fp16, 2^-8 bf16, of ``sum |x| |W|``) and by one
rounding of the output dtype.

Edges: ragged M and N are masked; K may be any even number: a K tail shorter than 2 * SUB is
masked (``EVEN_K`` drops the masks when K / 2 is a multiple of SUB, the usual case: DiT-XL's
1152 and 4608 are).  An odd K has no nibble packing (the core stores such codes one per byte)
and is refused with a ValueError.  Codes are masked to ``L - 1`` before the gather, so a byte
outside the format (which ``QuantLinear.check_loaded`` refuses) can never read another row's
table or past the end of ``lut``.

Launch: ``enable_fp_fusion=False``; ``config`` overrides ``BLOCK_M`` (default 16 for M <= 16,
decode; 64 above, so a prefill tile gathers its levels once for 64 rows), ``BLOCK_N`` (32),
``SUB`` (32 for 16-bit x, 16 for fp32), ``num_warps`` (4), ``num_stages`` (3).  Untuned: no GPU
was available when they were set; the sm_90 AOT compile of the tests checks they compile
without register spills.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import triton
import triton.language as tl

from archquant.core import formats
from archquant.core.formats import QuantSpec
from archquant.core.modules import unpack_nibbles
from archquant.core.twinlog import PARAM_NAMES

from ._triton_utils import INTERPRET_MODE, OUT_DTYPES, check_launchable, prepare_out, round_to_dtype_code

__all__ = [
    "LUT_WIDTHS",
    "dequantize_twinlog_reference",
    "twinlog_gemm",
    "twinlog_gemm_reference",
    "twinlog_lut",
]

#: table widths the kernel takes: 2^bits for the nibble-packed widths W2, W3, W4
LUT_WIDTHS = (4, 8, 16)
_PRECISIONS = ("ieee", "tf32x3", "tf32")
_DOT_FP32, _DOT_FP16, _DOT_BF16 = 0, 1, 2


# --------------------------------------------------------------------------- level table


def twinlog_lut(params: Mapping[str, torch.Tensor], bits: int) -> torch.Tensor:
    """fp32 (N, 2^bits): ``lut[n, c]`` = code ``c`` of row ``n`` dequantized by the core's format."""
    spec = QuantSpec(format="twinlog", bits=bits, granularity="channel", axis=0).validate()
    missing = [name for name in PARAM_NAMES if name not in params]
    if missing:
        raise ValueError(f"twin-log params lack {', '.join(missing)}: expected {', '.join(PARAM_NAMES)}")
    rows = {name: params[name].detach().to(torch.float32).reshape(-1, 1) for name in PARAM_NAMES}
    n = rows["eta"].shape[0]
    if any(t.shape[0] != n for t in rows.values()):
        raise ValueError(f"twin-log params disagree on the row count: "
                         f"{ {name: tuple(params[name].shape) for name in PARAM_NAMES} }")
    # every code, once per row: the elementwise arithmetic the fake module applies to its (N, K)
    # codes. Equal to its dequantized weight up to one fp32 ulp of exp2: torch's CPU exp2 rounds
    # differently in its vectorized and its scalar (tail) loop, so not even the core is
    # bit-reproducible across tensor shapes
    codes = torch.arange(2 ** bits, dtype=torch.uint8, device=rows["eta"].device).expand(n, -1)
    return formats.dequantize(codes, spec, rows)


# --------------------------------------------------------------------------- kernel


@triton.jit
def _dot_levels(xv, levels, acc, DOT_CODE: tl.constexpr, OUT_CODE: tl.constexpr, PRECISION: tl.constexpr):
    """acc + xv @ levels, the levels rounded to x's dtype (OUT_CODE) as the GPU's 16-bit dot sees them."""
    if DOT_CODE == 1:
        acc = tl.dot(xv.to(tl.float16), levels.to(tl.float16), acc)
    elif DOT_CODE == 2:
        acc = tl.dot(xv.to(tl.bfloat16), levels.to(tl.bfloat16), acc)
    else:
        # fp32 x: OUT_CODE 0 leaves the levels as they are; bf16 x in the interpreter: levels
        # rounded to bf16 nearest-even (x is bf16-valued already), the GPU bf16 dot's products
        acc = tl.dot(xv, round_to_dtype_code(levels, OUT_CODE), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _twinlog_kernel(
    x_ptr, w_ptr, lut_ptr, y_ptr,
    M, N, K_HALF,
    s_xm, s_xk, s_wn, s_wk, s_ln, s_lc, s_ym, s_yn,
    LEVELS: tl.constexpr, SUB: tl.constexpr, EVEN_K: tl.constexpr, DOT_CODE: tl.constexpr,
    OUT_CODE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tl.static_assert(SUB >= 16, "tl.dot needs K >= 16 for 16-bit operands on NVIDIA GPUs")
    tl.static_assert(LEVELS == 4 or LEVELS == 8 or LEVELS == 16, "a nibble code indexes 4, 8 or 16 levels")
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, SUB)
    mask_m = offs_m < M
    mask_n = offs_n < N
    m64 = offs_m.to(tl.int64)
    n64 = offs_n.to(tl.int64)

    # x even columns k = 2h, odd k = 2h + 1 of the current chunk; packed byte h.
    x_even = x_ptr + m64[:, None] * s_xm + (2 * offs_h)[None, :] * s_xk
    w_ptrs = w_ptr + offs_h[:, None] * s_wk + n64[None, :] * s_wn  # (SUB, BLOCK_N), transposed read
    lut_rows = lut_ptr + n64[None, :] * s_ln  # (1, BLOCK_N): each column's table

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h0 in range(0, K_HALF, SUB):
        if EVEN_K:
            mask_x = mask_m[:, None]
            mask_w = mask_n[None, :]
        else:  # the K tail: masked bytes gather level 0.0 and meet x = 0
            in_k = (h0 + offs_h) < K_HALF
            mask_x = mask_m[:, None] & in_k[None, :]
            mask_w = in_k[:, None] & mask_n[None, :]
        xe = tl.load(x_even, mask=mask_x, other=0.0).to(tl.float32)
        xo = tl.load(x_even + s_xk, mask=mask_x, other=0.0).to(tl.float32)
        p = tl.load(w_ptrs, mask=mask_w, other=0).to(tl.int32)
        # & (LEVELS - 1): a code outside the format stays inside its own row's table
        lo = tl.load(lut_rows + (p & (LEVELS - 1)) * s_lc, mask=mask_w, other=0.0)  # even columns
        hi = tl.load(lut_rows + ((p >> 4) & (LEVELS - 1)) * s_lc, mask=mask_w, other=0.0)  # odd columns
        acc = _dot_levels(xe, lo, acc, DOT_CODE, OUT_CODE, PRECISION)
        acc = _dot_levels(xo, hi, acc, DOT_CODE, OUT_CODE, PRECISION)
        x_even += 2 * SUB * s_xk
        w_ptrs += SUB * s_wk

    out = round_to_dtype_code(acc, OUT_CODE)
    y_ptrs = y_ptr + m64[:, None] * s_ym + n64[None, :] * s_yn
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------- host side


def _check(x, w_packed, lut) -> tuple[int, int, int]:
    """(M, N, K) of valid operands, else a TypeError (kind of tensor) or ValueError (shapes)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in OUT_DTYPES or x.dim() != 2:
        raise TypeError(f"x must be a 2-D float16/bfloat16/float32 tensor, got "
                        f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(w_packed, torch.Tensor) or w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise TypeError(f"w_packed must be a 2-D uint8 tensor (N, K // 2) of nibble-packed codes, got "
                        f"{getattr(w_packed, 'dtype', type(w_packed))} {tuple(getattr(w_packed, 'shape', ()))}")
    if not isinstance(lut, torch.Tensor) or lut.dtype != torch.float32 or lut.dim() != 2:
        raise TypeError(f"lut must be a 2-D float32 tensor (N, 2^bits) (see twinlog_lut), got "
                        f"{getattr(lut, 'dtype', type(lut))} {tuple(getattr(lut, 'shape', ()))}")
    m, k = x.shape
    n = w_packed.shape[0]
    if k % 2:
        raise ValueError(f"K={k} is odd: nibble-packed codes hold two K columns per byte")
    if w_packed.shape[1] * 2 != k:
        raise ValueError(f"K mismatch: x has K={k}, w_packed {tuple(w_packed.shape)} holds {2 * w_packed.shape[1]}")
    if lut.shape[0] != n or lut.shape[1] not in LUT_WIDTHS:
        raise ValueError(f"lut must have shape ({n}, L) with L = 2^bits in {LUT_WIDTHS} (W2/W3/W4), "
                         f"got {tuple(lut.shape)}")
    return m, n, k


def _dot_code(dtype: torch.dtype) -> int:
    if dtype == torch.float16:
        return _DOT_FP16
    if dtype == torch.bfloat16 and not INTERPRET_MODE:
        return _DOT_BF16
    return _DOT_FP32  # fp32 x; bf16 x in the interpreter (which has no bf16 arithmetic)


def _launch_config(m: int, dtype: torch.dtype, config: dict | None) -> dict:
    """Block sizes and launch options: defaults (module docstring) updated by ``config``, checked."""
    cfg = dict(BLOCK_M=16 if m <= 16 else 64, BLOCK_N=32, SUB=16 if dtype == torch.float32 else 32,
               num_warps=4, num_stages=3)
    unknown = sorted(set(config or {}) - set(cfg))
    if unknown:
        raise ValueError(f"unknown config key {unknown[0]!r}: allowed {', '.join(cfg)}")
    cfg.update(config or {})
    for key in ("BLOCK_M", "BLOCK_N", "SUB"):
        v = cfg[key]
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"{key}={v} must be a power of two >= 16 (a tl.dot dimension)")
    return cfg


def twinlog_gemm(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    lut: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    input_precision: str = "ieee",
    config: dict | None = None,
) -> torch.Tensor:
    """``x @ lut[n, unpack(w_packed)[n, k]].T`` in x's dtype (see the module docstring)."""
    m, n, k = _check(x, w_packed, lut)
    if input_precision not in _PRECISIONS:
        raise ValueError(f"input_precision must be one of {_PRECISIONS}, got {input_precision!r}")
    cfg = _launch_config(m, x.dtype, config)
    y = prepare_out(out, (m, n), x.dtype, x.device, "out")
    check_launchable(x, w_packed, lut, y)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_()
    k_half, sub = k // 2, cfg["SUB"]
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]))
    _twinlog_kernel[grid](
        x, w_packed, lut, y,
        m, n, k_half,
        x.stride(0), x.stride(1), w_packed.stride(0), w_packed.stride(1),
        lut.stride(0), lut.stride(1), y.stride(0), y.stride(1),
        LEVELS=lut.shape[1], SUB=sub, EVEN_K=k_half % sub == 0, DOT_CODE=_dot_code(x.dtype),
        OUT_CODE=OUT_DTYPES[x.dtype], PRECISION=input_precision, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=False,
    )
    return y


# --------------------------------------------------------------------------- reference


def dequantize_twinlog_reference(w_packed: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """fp32 (N, K) weight: each nibble code replaced by its row's level."""
    codes = unpack_nibbles(w_packed, signed=False).long()
    return torch.gather(lut.to(torch.float32), 1, codes)


def twinlog_gemm_reference(x: torch.Tensor, w_packed: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Unpack, look up in fp32, fp32 matmul, cast to x's dtype."""
    w = dequantize_twinlog_reference(w_packed, lut)
    return (x.to(torch.float32) @ w.T).to(x.dtype)
