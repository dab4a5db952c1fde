"""Weight-only int4 GEMM for decode (W4A16, group scales along K): Triton kernel + reference.

API
---
``pack_int4(codes) -> packed`` / ``unpack_int4(packed) -> codes``
    ``codes``: int8 (N, K), K even, values in [-8, 7] (the symmetric int4 format of
    :mod:`archquant.core.formats`, ``QuantSpec(bits=4, granularity="group")``,
    produces [-7, 7]).  ``packed``: uint8 (N, K // 2).  Byte ``j`` of a row holds
    column ``2j`` in its **low** nibble and column ``2j + 1`` in its **high** nibble,
    each stored with an offset of +8 (``nibble = code + 8`` in [0, 15]; 0 only for
    -8).  This is the nibble order and offset of compressed-tensors'
    ``pack-quantized`` (there eight per int32, low bits first), two per byte here.
``w4a16_gemm(x, w_packed, scales, group_size, *, out=None, input_precision="ieee") -> (M, N)``
    ``x``: (M, K) float16 / bfloat16 / float32 (any strides); ``w_packed``: uint8
    (N, K // 2) (the ``nn.Linear`` weight layout, so the result is ``x @ W.T``);
    ``scales``: (N, K // group_size) or the core's range shape (N, K // group_size, 1),
    any float dtype; ``group_size``: a power of two >= 32 dividing K (32/64/128 ...).
    ``W[n, k] = code[n, k] * scales[n, k // group_size]``.  Output: x's dtype.
``w4a16_gemm_reference(x, w_packed, scales, group_size)``
    Unpack, dequantize in fp32, ``x.float() @ W.T`` in fp32, cast to x's dtype.

Kernel
------
Built for decode (M <= 16, the regime where a 4-bit weight read pays off): one
``BLOCK_M = 16`` row tile (ragged M masked; larger M gets more row tiles), a grid
over ``cdiv(N, BLOCK_N)`` column tiles, and a loop over the K groups.  Per group the
packed (group/2, BLOCK_N) byte tile is split into its low and high nibbles, which
are the *even* and *odd* K columns; x is read as its even and odd columns (two
strided loads of a tiny tile, L1/L2 hits), so no nibble interleaving is needed:

    part = sum over chunks of dot(x_even, lo) + dot(x_odd, hi)   (fp32 accumulator)
    acc += part * scale[group, n]                                 (fp32)

The integer codes are exact in fp16/bf16, so the tensor-core dot is exact per
product and the group scale is applied once per group in fp32 (no dequantized
16-bit weight is ever rounded).  Operands: fp16 x -> fp16 dot; bf16 x -> bf16 dot
on the GPU, but fp32 in the interpreter (which cannot do bf16 arithmetic; the
values are the same, only the instruction differs); fp32 x -> fp32 dot with
``input_precision`` ("ieee": exact fp32 FMA path, the default; "tf32x3": tensor
cores, ~2^-22 relative error on x since the codes are exact in tf32).  Each dot has
K = SUB >= 16, the NVIDIA minimum for 16-bit operands (checked on the host and
by ``tl.static_assert``), and M = 16, N = BLOCK_N >= 16.  Summation order differs from the reference
(per group, fp32), so results agree to fp32 rounding (~1e-6 relative to
``sum |x| |W|``) plus one rounding of the output dtype.

Each group is summed in chunks of ``SUB`` packed bytes (dot K = SUB, 2 * SUB values
of K; default 32 for 16-bit x, 16 for fp32 x, at most group_size / 2), so the
register tiles do not grow with the group size (sm_90 AOT compile, BLOCK_N = 32,
4 warps: 56-126 registers for 16-bit x, ~140 for fp32 "ieee", no spills).

Launch: ``enable_fp_fusion=False``; ``config`` overrides ``BLOCK_N`` / ``SUB`` /
``num_warps`` / ``num_stages`` (untuned defaults: no GPU was available when they
were set).  For a 4096 x 4096 layer, N / 32 = 128 programs each stream 32 rows x
2 KiB of weights; split-K (more programs for small N) is not implemented.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from archquant.core.modules import pack_nibbles, unpack_nibbles

from ._triton_utils import INTERPRET_MODE, OUT_DTYPES, check_launchable, prepare_out, round_to_dtype_code

__all__ = [
    "pack_int4",
    "unpack_int4",
    "w4a16_gemm",
    "w4a16_gemm_reference",
    "dequantize_int4_reference",
    "INT4_OFFSET",
]

INT4_OFFSET = 8  # stored nibble = code + 8 (the core's signed nibbles; the kernel subtracts it)
_PRECISIONS = ("ieee", "tf32x3", "tf32")
_DOT_FP32, _DOT_FP16, _DOT_BF16 = 0, 1, 2


# --------------------------------------------------------------------------- packing


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes (N, K) in [-8, 7] -> uint8 (N, K // 2), low nibble = even column, +8 offset.

    The packing is the core's (``archquant.core.modules.pack_nibbles``, how a frozen 4-bit
    ``QuantLinear`` stores its codes, so its ``weight_codes`` feed this kernel as they are); this
    adds the checks a kernel input needs."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int8 or codes.dim() != 2:
        raise TypeError(f"codes must be a 2-D int8 tensor, got {getattr(codes, 'dtype', type(codes))}")
    if codes.shape[1] % 2:
        raise ValueError(f"K={codes.shape[1]} must be even to pack two codes per byte")
    if codes.numel() and (codes.min() < -INT4_OFFSET or codes.max() > INT4_OFFSET - 1):
        raise ValueError("int4 codes must lie in [-8, 7]")
    return pack_nibbles(codes, signed=True).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K // 2) -> int8 codes (N, K); inverse of :func:`pack_int4`."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"packed must be a 2-D uint8 tensor, got {getattr(packed, 'dtype', type(packed))}")
    return unpack_nibbles(packed, signed=True)


# --------------------------------------------------------------------------- kernel


@triton.jit
def _w4a16_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr,
    M, N, NUM_GROUPS,
    s_xm, s_xk, s_wn, s_wk, s_sn, s_sg, s_ym, s_yn,
    GROUP: tl.constexpr, SUB: tl.constexpr, DOT_CODE: tl.constexpr, OUT_CODE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    HALF: tl.constexpr = GROUP // 2  # packed bytes per row and group
    tl.static_assert(SUB >= 16, "tl.dot needs K >= 16 for 16-bit operands on NVIDIA GPUs")
    tl.static_assert(HALF % SUB == 0, "SUB must divide group_size / 2")
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
    s_ptrs = s_ptr + n64 * s_sn
    mask_x = mask_m[:, None]
    mask_w = mask_n[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _g in range(0, NUM_GROUPS):
        # Sum of the group in fp32 (exact integer codes times x), in chunks of SUB bytes
        # (2 * SUB values of K) so the register tiles do not grow with the group size.
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c in tl.static_range(HALF // SUB):
            xe = tl.load(x_even + (2 * SUB * c) * s_xk, mask=mask_x, other=0.0).to(tl.float32)
            xo = tl.load(x_even + (2 * SUB * c + 1) * s_xk, mask=mask_x, other=0.0).to(tl.float32)
            p = tl.load(w_ptrs + (SUB * c) * s_wk, mask=mask_w, other=0x88).to(tl.int32)  # masked: code 0
            lo = ((p & 15) - 8).to(tl.float32)  # even columns
            hi = ((p >> 4) - 8).to(tl.float32)  # odd columns
            if DOT_CODE == 1:
                part = tl.dot(xe.to(tl.float16), lo.to(tl.float16), part)
                part = tl.dot(xo.to(tl.float16), hi.to(tl.float16), part)
            elif DOT_CODE == 2:
                part = tl.dot(xe.to(tl.bfloat16), lo.to(tl.bfloat16), part)
                part = tl.dot(xo.to(tl.bfloat16), hi.to(tl.bfloat16), part)
            else:
                part = tl.dot(xe, lo, part, input_precision=PRECISION)
                part = tl.dot(xo, hi, part, input_precision=PRECISION)
        sc = tl.load(s_ptrs, mask=mask_n, other=0.0).to(tl.float32)
        acc += part * sc[None, :]
        x_even += GROUP * s_xk
        w_ptrs += HALF * s_wk
        s_ptrs += s_sg

    out = round_to_dtype_code(acc, OUT_CODE)
    y_ptrs = y_ptr + m64[:, None] * s_ym + n64[None, :] * s_yn
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask_x & mask_w)


# --------------------------------------------------------------------------- host side


def _check(x, w_packed, scales, group_size):
    if not isinstance(x, torch.Tensor) or x.dtype not in OUT_DTYPES or x.dim() != 2:
        raise TypeError(f"x must be a 2-D float16/bfloat16/float32 tensor, got "
                        f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(w_packed, torch.Tensor) or w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise TypeError("w_packed must be a 2-D uint8 tensor (N, K // 2)")
    m, k = x.shape
    n = w_packed.shape[0]
    if w_packed.shape[1] * 2 != k:
        raise ValueError(f"K mismatch: x has K={k}, w_packed {tuple(w_packed.shape)} "
                         f"holds {2 * w_packed.shape[1]}")
    if not isinstance(group_size, int) or group_size < 32 or group_size & (group_size - 1):
        raise ValueError(f"group_size={group_size} must be a power of two >= 32 "
                         "(each half-group is a tl.dot K dimension, >= 16 on GPU)")
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of group_size={group_size}")
    if not isinstance(scales, torch.Tensor) or not scales.is_floating_point():
        raise TypeError("scales must be a float tensor (N, K // group_size)")
    g = k // group_size
    if scales.dim() == 3 and scales.shape[-1] == 1:
        scales = scales[..., 0]
    if tuple(scales.shape) != (n, g):
        raise ValueError(f"scales must have shape ({n}, {g}) (or ({n}, {g}, 1)), got {tuple(scales.shape)}")
    return m, n, k, g, scales


def w4a16_gemm(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    *,
    out: torch.Tensor | None = None,
    input_precision: str = "ieee",
    config: dict | None = None,
) -> torch.Tensor:
    """``x @ (unpack(w_packed) * scales).T`` in x's dtype (see the module docstring)."""
    m, n, k, g, scales = _check(x, w_packed, scales, group_size)
    if input_precision not in _PRECISIONS:
        raise ValueError(f"input_precision must be one of {_PRECISIONS}, got {input_precision!r}")
    y = prepare_out(out, (m, n), x.dtype, x.device, "out")
    check_launchable(x, w_packed, scales, y)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_()
    if x.dtype == torch.float16:
        dot_code = _DOT_FP16
    elif x.dtype == torch.bfloat16 and not INTERPRET_MODE:
        dot_code = _DOT_BF16
    else:
        dot_code = _DOT_FP32
    # SUB: packed bytes per dot (dot K); fp32 operands use smaller tiles (FMA path).
    sub = 16 if x.dtype == torch.float32 else 32
    cfg = dict(BLOCK_N=32, SUB=min(sub, group_size // 2), num_warps=4, num_stages=3)
    cfg.update(config or {})
    bn, sub = cfg["BLOCK_N"], cfg["SUB"]
    if bn < 16 or bn & (bn - 1):
        raise ValueError(f"BLOCK_N={bn} must be a power of two >= 16")
    if sub < 16 or sub & (sub - 1) or (group_size // 2) % sub:
        raise ValueError(f"SUB={sub} must be a power of two >= 16 dividing group_size / 2")
    block_m = 16
    grid = (triton.cdiv(n, bn), triton.cdiv(m, block_m))
    _w4a16_kernel[grid](
        x, w_packed, scales, y,
        m, n, g,
        x.stride(0), x.stride(1), w_packed.stride(0), w_packed.stride(1),
        scales.stride(0), scales.stride(1), y.stride(0), y.stride(1),
        GROUP=group_size, SUB=sub, DOT_CODE=dot_code, OUT_CODE=OUT_DTYPES[x.dtype], PRECISION=input_precision,
        BLOCK_M=block_m, BLOCK_N=bn, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        enable_fp_fusion=False,
    )
    return y


# --------------------------------------------------------------------------- reference


def dequantize_int4_reference(w_packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """fp32 (N, K) weight ``code * scale`` of a packed int4 tensor."""
    codes = unpack_int4(w_packed).to(torch.float32)
    n, k = codes.shape
    s = scales.reshape(n, k // group_size, 1).to(torch.float32)
    return (codes.reshape(n, k // group_size, group_size) * s).reshape(n, k)


def w4a16_gemm_reference(x, w_packed, scales, group_size):
    """Unpack, dequantize in fp32, fp32 matmul, cast to x's dtype."""
    w = dequantize_int4_reference(w_packed, scales, group_size)
    return (x.to(torch.float32) @ w.T).to(x.dtype)
