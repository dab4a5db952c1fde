"""Scaled 8-bit GEMMs (W8A8 int8 and FP8 e4m3): Triton kernels + PyTorch references.

API
---
``w8a8_gemm(a_q, b_q, a_scale, b_scale, bias=None, out_dtype=torch.float16, *, out=None,
config=None, out_scale=None, round_to=None) -> (M, N)``
    ``a_q``: int8 (M, K) activation codes, any strides (e.g. a column slice
    ``x[:, :r]`` of a wider tensor, no ``.contiguous()`` needed); ``b_q``: int8
    (N, K) weight codes (the ``nn.Linear`` weight layout, so the product is
    ``a_q @ b_q.T``), any strides;
    ``a_scale``: fp32 per-token (M, 1) / (M,) or one value; ``b_scale``: fp32
    per-output-channel (N,) / (N, 1) / (1, N) or one value; ``bias``: (N,) any
    float dtype or None; ``out_dtype``: float16, bfloat16 or float32.
    Computes ``out = ((acc_int32 as fp32) * a_scale) * b_scale + bias`` with an exact
    int32 accumulator (tl.dot int8 x int8 -> int32), everything after the dot in
    fp32, one final rounding to ``out_dtype`` (nearest even).  ``out``: optional
    preallocated (M, N) result of ``out_dtype``, any strides.

    Fused static requantization (the Quamba in_proj / x_proj / dt_proj outputs):
    ``out_scale`` set requires ``out_dtype=torch.int8`` (ValueError otherwise, and
    for int8 without ``out_scale``); the kernel then writes int8 codes
    ``clamp(round_half_even(div_rn(v, out_scale)), -127, 127)`` of the fp32 epilogue
    value ``v`` first rounded to ``round_to`` (None / float32: kept in fp32;
    float16 / bfloat16: nearest even, what storing the float GEMM output does).
    Bit for bit ``quantize_static_int8(w8a8_gemm(..., out_dtype=round_to or
    torch.float32), out_scale)`` (same jit helpers), in one launch and without the
    float round trip through memory.  ``out_scale``: per tensor only, a Python
    float (checked finite and > 0 in fp32, copied to the device) or a one-element
    float tensor on the device, read by the kernel (no host copy or sync: CUDA-graph
    friendly; its value is not checked).  ``round_to`` without ``out_scale`` is a
    ValueError.
``fp8_gemm(a, b, a_scale, b_scale, bias=None, out_dtype=torch.bfloat16, fast_accum=True)``
    Same with ``torch.float8_e4m3fn`` operands (also e5m2) and an fp32 accumulator.
    No fused requantization (``out_scale`` / int8 output raise ValueError).

``w8a8_gemm_reference`` (same ``out_scale`` / ``round_to`` keywords, composed with
``quantize_static_int8_reference``) is exact (float64 matmul of integers); ``fp8_gemm_reference``
dequantizes to fp32 and uses a float64 matmul, so only the kernel's fp32 summation
order differs from it.

Blocking
--------
A small fixed config table picked by M (``_pick_config``); pass ``config=dict(
BLOCK_M=..., BLOCK_N=..., BLOCK_K=..., GROUP_M=..., num_warps=..., num_stages=...)``
to override.  Program ids are grouped along M (GROUP_M) for L2 reuse of the B
tiles.  Every load is masked, so M, N, K need not be multiples of the blocks.
``BLOCK_K >= 32`` is required (asserted on the host and with ``tl.static_assert``):
the NVIDIA backend rejects 8-bit ``tl.dot`` operands with K < 32, which the
interpreter does not check.

Notes: the int32 accumulator is exact up to K = 133143 (127 * 127 * K < 2**31;
codes of -128 lower that slightly); the epilogue is launched with
``enable_fp_fusion=False`` so no FMA contraction changes the last bit.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_utils import (
    OUT_DTYPES,
    check_launchable,
    prepare_out,
    quantize_int8_tile,
    round_to_dtype_code,
)
from .quantize import INT8_QMAX, quantize_static_int8, quantize_static_int8_reference

__all__ = [
    "w8a8_gemm",
    "w8a8_gemm_reference",
    "fp8_gemm",
    "fp8_gemm_reference",
    "GEMM_CONFIGS",
    "GEMM_SWEEP",
]

_MIN_BLOCK_K_8BIT = 32  # NVIDIA min_dot_size K for 8-bit operands (Triton 3.9)

# (max M, config), first match wins.  Small M (decode): 16-row tiles; large M: 128x128
# (a 128x256 fp32 epilogue tile could exceed shared memory during the layout
# conversion, so it is avoided).  Untuned: no GPU was available when these were set; the
# GPU benchmark's config sweep (``eval/bench_gpu.py``, section gemm) times alternatives.
# Register spills in the offline sm_90 compile (fp16 out): 128x128x64 / 8 warps 8 bytes;
# 128x128x128 / 8 warps 1080 bytes, 128x256x64 936, 64x128x128 / 4 warps 560 -- hence
# BLOCK_K = 64 for the large tiles.
GEMM_CONFIGS: tuple[tuple[int, dict], ...] = (
    (16, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)),
    (64, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=4, num_warps=4, num_stages=4)),
    (1 << 62, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)),
)
#: alternatives the GPU benchmark times against the table above for large M
GEMM_SWEEP: tuple[dict, ...] = (
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
)
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@triton.jit
def _scaled_mm_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, os_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_as, stride_bs, stride_bias,
    HAS_BIAS: tl.constexpr, IS_INT: tl.constexpr, FP8_TYPE: tl.constexpr, OUT_CODE: tl.constexpr,
    QUANT_OUT: tl.constexpr, QMAX: tl.constexpr, MAX_IMPRECISE_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    tl.static_assert(BLOCK_K >= 32, "8-bit tl.dot needs K >= 32 on NVIDIA GPUs")
    # Grouped ordering: GROUP_M row-tiles share each column tile while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_size
    pid_n = (pid % num_in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # b is (N, K) row-major-ish: the (BLOCK_K, BLOCK_N) tile is read transposed.
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn

    if IS_INT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0)
        if IS_INT:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # explicit: Triton < 3.9 asserts acc dtype == out_dtype (default fp32)
        else:
            # fp8 operands arrive as raw uint8 bytes (masked lanes = 0x00 = +0.0):
            # the interpreter cannot cast a fill value to fp8, a bitcast is free.
            a = a.to(FP8_TYPE, bitcast=True)
            b = b.to(FP8_TYPE, bitcast=True)
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=MAX_IMPRECISE_ACC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Epilogue in fp32: ((acc * a_scale) * b_scale) + bias, rounded once.
    a_s = tl.load(as_ptr + offs_m * stride_as, mask=mask_m, other=0.0).to(tl.float32)
    b_s = tl.load(bs_ptr + offs_n * stride_bs, mask=mask_n, other=0.0).to(tl.float32)
    out = acc.to(tl.float32) * a_s[:, None]
    out = out * b_s[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)
        out = out + bias[None, :]
    # OUT_CODE: the output dtype, or with QUANT_OUT the intermediate ``round_to`` dtype.
    out = round_to_dtype_code(out, OUT_CODE)
    if QUANT_OUT:
        # Fused static requantization, the arithmetic of quantize_static_int8.
        out = quantize_int8_tile(out, tl.load(os_ptr).to(tl.float32), QMAX)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------- host side


def _pick_config(m: int, config: dict | None) -> dict:
    if config is None:
        config = next(c for max_m, c in GEMM_CONFIGS if m <= max_m)
    cfg = dict(GROUP_M=1, num_warps=4, num_stages=3)
    cfg.update(config)
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        b = cfg[key]
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"{key}={b} must be a power of two >= 16")
    if cfg["BLOCK_K"] < _MIN_BLOCK_K_8BIT:
        raise ValueError(
            f"BLOCK_K={cfg['BLOCK_K']} too small: 8-bit tl.dot needs K >= {_MIN_BLOCK_K_8BIT} on GPU"
        )
    return cfg


def _scale_vector(scale, length: int, name: str, device) -> tuple[torch.Tensor, int]:
    """fp32 contiguous vector and stride (0 = broadcast one value)."""
    s = torch.as_tensor(scale, device=device)
    if not s.is_floating_point():
        raise TypeError(f"{name} must be a float tensor/number, got {s.dtype}")
    s = s.to(torch.float32).reshape(-1).contiguous()
    if s.numel() == 1:
        return s, 0
    if s.numel() == length:
        return s, 1
    raise ValueError(f"{name} must have 1 or {length} elements, got shape {tuple(s.shape)}")


def _check_operands(a, b, dtypes, what):
    if a.dtype not in dtypes or b.dtype not in dtypes:
        raise TypeError(f"{what} needs {dtypes} operands, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"{what} needs 2-D operands, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{what}: K mismatch, a {tuple(a.shape)} vs b (N, K) {tuple(b.shape)}")


_ROUND_TO = {None: 0, torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _requant_args(out_dtype, out_scale, round_to, device, what):
    """Validate the fused-requantization arguments; ``None`` or (fp32 1-element scale, round code).

    A Python number is checked (finite, > 0 in fp32) and copied to the device; a
    tensor is used where it lies (no host sync, no copy: CUDA-graph friendly), so
    its value is not checked.
    """
    if out_scale is None:
        if out_dtype == torch.int8:
            raise ValueError(f"{what}: out_dtype=torch.int8 needs out_scale (the static requantization scale)")
        if round_to is not None:
            raise ValueError(f"{what}: round_to only applies together with out_scale (int8 output)")
        return None
    if out_dtype != torch.int8:
        raise ValueError(
            f"{what}: out_scale given, so the output is int8 codes: pass out_dtype=torch.int8 "
            f"(got {out_dtype}); use round_to= for the intermediate float rounding"
        )
    if round_to not in _ROUND_TO:
        raise ValueError(f"{what}: round_to must be None, torch.float32, torch.float16 or "
                         f"torch.bfloat16, got {round_to}")
    if isinstance(out_scale, torch.Tensor):
        if not out_scale.is_floating_point():
            raise TypeError(f"{what}: out_scale must be a float tensor/number, got {out_scale.dtype}")
        if out_scale.numel() != 1:
            raise ValueError(f"{what}: out_scale must be one value (per-tensor static scale), "
                             f"got shape {tuple(out_scale.shape)}")
        s = out_scale.reshape(1).to(torch.float32)  # no-op for an fp32 tensor
    else:
        try:
            v = float(out_scale)
        except (TypeError, ValueError):
            raise TypeError(f"{what}: out_scale must be a float or a one-element tensor, "
                            f"got {type(out_scale).__name__}") from None
        s = torch.tensor([v], dtype=torch.float32)
        if not (math.isfinite(v) and s.item() > 0 and math.isfinite(s.item())):
            raise ValueError(f"{what}: out_scale must be finite and > 0 (as fp32), got {v}")
        s = s.to(device)
    return s, _ROUND_TO[round_to]


def _launch(a, b, a_scale, b_scale, bias, out_dtype, config, is_int, max_imprecise, out,
            out_scale=None, round_to=None, what="w8a8_gemm"):
    requant = _requant_args(out_dtype, out_scale, round_to, a.device, what)
    if requant is None and out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {list(OUT_DTYPES)} (or torch.int8 with out_scale), "
                         f"got {out_dtype}")
    m, k = a.shape
    n = b.shape[0]
    a_s, stride_as = _scale_vector(a_scale, m, "a_scale", a.device)
    b_s, stride_bs = _scale_vector(b_scale, n, "b_scale", a.device)
    if bias is not None:
        if bias.numel() != n:
            raise ValueError(f"bias must have {n} elements, got shape {tuple(bias.shape)}")
        bias = bias.reshape(-1)
    out = prepare_out(out, (m, n), out_dtype, a.device, "out")
    o_s = requant[0] if requant is not None else None
    check_launchable(a, b, a_s, b_s, bias, out, o_s)
    if m == 0 or n == 0:
        return out
    if k == 0:
        v = (bias.to(torch.float32).expand(m, n) if bias is not None
             else torch.zeros(m, n, device=a.device))
        if requant is None:
            out.copy_(v.to(out_dtype))
        else:
            quantize_static_int8(v.to(round_to or torch.float32), o_s, out=out)
        return out
    cfg = _pick_config(m, config)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    fp8_type = None
    if not is_int:  # pass the bytes; the kernel bitcasts them back (see the kernel)
        fp8_type = tl.float8e4nv if a.dtype == torch.float8_e4m3fn else tl.float8e5
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    _scaled_mm_kernel[grid](
        a, b, out, a_s, b_s, bias if bias is not None else a_s, o_s if o_s is not None else a_s,
        m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        stride_as, stride_bs, bias.stride(0) if bias is not None else 0,
        HAS_BIAS=bias is not None, IS_INT=is_int, FP8_TYPE=fp8_type,
        OUT_CODE=OUT_DTYPES[out_dtype] if requant is None else requant[1],
        QUANT_OUT=requant is not None, QMAX=INT8_QMAX,
        MAX_IMPRECISE_ACC=max_imprecise,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        enable_fp_fusion=False,
    )
    return out


def w8a8_gemm(
    a_q: torch.Tensor,
    b_q: torch.Tensor,
    a_scale,
    b_scale,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    out_scale: float | torch.Tensor | None = None,
    round_to: torch.dtype | None = None,
) -> torch.Tensor:
    """``(a_q @ b_q.T) * a_scale * b_scale + bias`` with an int32 accumulator, as out_dtype.

    ``out``: optional preallocated (M, N) result of ``out_dtype`` (any strides).

    ``out_scale`` (with ``out_dtype=torch.int8``): fused static per-tensor
    requantization.  The fp32 epilogue value is rounded to ``round_to`` (None /
    float32: kept, float16 / bfloat16: nearest even) and written as int8 codes
    ``clamp(round_half_even(v / out_scale), -127, 127)``, bit for bit
    ``quantize_static_int8(w8a8_gemm(..., out_dtype=round_to or torch.float32), out_scale)``.
    ``out_scale``: a positive Python float, or a one-element float tensor on the
    device (read by the kernel: no copy or sync, CUDA-graph friendly; not checked).
    """
    _check_operands(a_q, b_q, (torch.int8,), "w8a8_gemm")
    return _launch(a_q, b_q, a_scale, b_scale, bias, out_dtype, config, True, None, out,
                   out_scale, round_to)


def fp8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale,
    b_scale,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    fast_accum: bool = True,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    out_scale=None,
) -> torch.Tensor:
    """FP8 x FP8 -> fp32 accumulate, same scaled epilogue as :func:`w8a8_gemm`.

    ``fast_accum=True`` keeps Triton's sm_90 default (wgmma's reduced-precision fp8
    accumulation, like ``_scaled_mm(use_fast_accum=True)``); ``False`` promotes the
    partial sums to the fp32 accumulator once per ``BLOCK_K`` (``max_num_imprecise_acc``).
    No effect in the interpreter, which accumulates in fp32 anyway.

    ``out_scale`` (fused int8 requantization) is not supported here: it raises.
    """
    if out_scale is not None or out_dtype == torch.int8:
        raise ValueError("fp8_gemm: fused int8 requantization (out_scale / out_dtype=torch.int8) is "
                         "only implemented for w8a8_gemm; quantize the float output instead")
    _check_operands(a, b, _FP8_DTYPES, "fp8_gemm")
    if a.dtype != b.dtype:
        raise TypeError(f"fp8_gemm needs equal operand dtypes, got {a.dtype} and {b.dtype}")
    max_imprecise = None
    if not fast_accum:
        max_imprecise = _pick_config(a.shape[0], config)["BLOCK_K"]
    return _launch(a, b, a_scale, b_scale, bias, out_dtype, config, False, max_imprecise, out)


# --------------------------------------------------------------------------- references


def _epilogue_reference(acc, a_scale, b_scale, bias, out_dtype, m, n):
    a_s = torch.as_tensor(a_scale, dtype=torch.float32, device=acc.device).reshape(-1)
    b_s = torch.as_tensor(b_scale, dtype=torch.float32, device=acc.device).reshape(-1)
    a_s = a_s.reshape(m, 1) if a_s.numel() == m and m != 1 else a_s.reshape(1, 1)
    b_s = b_s.reshape(1, n) if b_s.numel() == n and n != 1 else b_s.reshape(1, 1)
    out = (acc.to(torch.float32) * a_s) * b_s
    if bias is not None:
        out = out + bias.reshape(1, n).to(torch.float32)
    return out.to(out_dtype)


def w8a8_gemm_reference(a_q, b_q, a_scale, b_scale, bias=None, out_dtype=torch.float16, *,
                        out_scale=None, round_to=None):
    """Exact integer product, then the same fp32 epilogue.

    The product runs in float64, which is exact here (every partial sum is an
    integer below 2**53) and, unlike int64 matmul, also available on CUDA.
    With ``out_scale`` (and ``out_dtype=torch.int8``, as for :func:`w8a8_gemm`):
    the epilogue rounded to ``round_to`` (None = fp32), then
    ``quantize_static_int8_reference`` (the core's per-tensor int8 quantizer).
    """
    requant = _requant_args(out_dtype, out_scale, round_to, a_q.device, "w8a8_gemm_reference")
    acc = a_q.to(torch.float64) @ b_q.to(torch.float64).T
    m, n = a_q.shape[0], b_q.shape[0]
    if requant is None:
        return _epilogue_reference(acc, a_scale, b_scale, bias, out_dtype, m, n)
    v = _epilogue_reference(acc, a_scale, b_scale, bias, round_to or torch.float32, m, n)
    return quantize_static_int8_reference(v, requant[0])


def fp8_gemm_reference(a, b, a_scale, b_scale, bias=None, out_dtype=torch.bfloat16):
    """Dequantized operands, float64 product rounded to fp32, then the same epilogue."""
    acc = (a.to(torch.float64) @ b.to(torch.float64).T).to(torch.float32)
    return _epilogue_reference(acc, a_scale, b_scale, bias, out_dtype, a.shape[0], b.shape[0])
