"""Symmetric int8 activation quantization: Triton kernels + PyTorch references.

API
---
``quantize_per_token_int8(x) -> (q, scale)``
    Dynamic per-token (per-row) quantization.  ``x``: (..., K) float32 / float16 /
    bfloat16, any strides; ``q``: int8 with the shape of ``x``; ``scale``: float32
    of shape ``x.shape[:-1] + (1,)`` (the "token" range shape of
    :mod:`archquant.core.formats`).
``quantize_static_int8(x, scale) -> q``
    Quantization with a given scale: one value (per tensor) or one per token
    (``numel == x.numel() // K``, e.g. shape (M, 1)).

Both equal ``archquant.core.formats.quantize`` with ``QuantSpec(bits=8)`` (token
granularity, resp. tensor/token granularity for the given scale) bit for bit:

* restricted range: ``scale = max(amax / 127, 1e-8)``, codes in [-127, 127];
* IEEE division ``x / scale`` (``tl.div_rn``) and round-half-to-even
  (``torch.round``) built from ``tl.floor``/``tl.where`` (no libdevice, so the
  kernels also run in the Triton interpreter);
* loads of any float dtype are cast to fp32 first, as the core does.

The ``*_reference`` functions are the oracle: they call the core directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from archquant.core.formats import INT_MIN_SCALE, QuantSpec, params_from_tensor, quantize

from ._triton_utils import check_launchable, check_pow2, next_pow2, prepare_out, quantize_int8_tile

__all__ = [
    "INT8_QMAX",
    "quantize_per_token_int8",
    "quantize_per_token_int8_reference",
    "quantize_static_int8",
    "quantize_static_int8_reference",
]

INT8_QMAX = 127  # restricted symmetric range, as in archquant.core.formats.qrange
MIN_SCALE = INT_MIN_SCALE  # the core clamps scales to this (all-zero rows)

# One program handles BLOCK_M rows and walks K in chunks of BLOCK_K; a tile holds
# at most this many elements (keeps register use bounded on the GPU).
_MAX_TILE = 4096
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _per_token_int8_kernel(
    x_ptr, q_ptr, s_ptr,
    M, K,
    stride_xm, stride_xk, stride_qm, stride_qk,
    QMAX: tl.constexpr, MIN_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_K)

    # Pass 1: absmax per row (fp32).  Masked elements load as 0, which never
    # changes an absmax.
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        c = k0 + cols
        mask = row_mask[:, None] & (c[None, :] < K)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + c[None, :] * stride_xk,
                    mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))

    scale = tl.maximum(tl.div_rn(amax, QMAX * 1.0), MIN_SCALE)
    tl.store(s_ptr + rows64, scale, mask=row_mask)

    # Pass 2: quantize (the re-read hits L2 for the row sizes used in practice).
    for k0 in range(0, K, BLOCK_K):
        c = k0 + cols
        mask = row_mask[:, None] & (c[None, :] < K)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + c[None, :] * stride_xk,
                    mask=mask, other=0.0).to(tl.float32)
        q = quantize_int8_tile(x, scale[:, None], QMAX)
        tl.store(q_ptr + rows64[:, None] * stride_qm + c[None, :] * stride_qk, q, mask=mask)


@triton.jit
def _static_int8_kernel(
    x_ptr, q_ptr, s_ptr,
    M, K,
    stride_xm, stride_xk, stride_qm, stride_qk, stride_s,
    QMAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    mask = row_mask[:, None] & (cols[None, :] < K)
    # stride_s == 0: one scale for the whole tensor; 1: one per row.
    scale = tl.load(s_ptr + rows64 * stride_s, mask=row_mask, other=1.0).to(tl.float32)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xk,
                mask=mask, other=0.0).to(tl.float32)
    q = quantize_int8_tile(x, scale[:, None], QMAX)
    tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :] * stride_qk, q, mask=mask)


# --------------------------------------------------------------------------- wrappers


def _as_rows(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32/float16/bfloat16 tensor, got "
                        f"{getattr(x, 'dtype', type(x))}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} needs a non-empty last dimension, got shape {tuple(x.shape)}")
    # reshape keeps a view (and the strides the kernels honour) whenever possible.
    return x.reshape(-1, x.shape[-1])


def _blocks(m: int, k: int, block_m: int | None, block_k: int | None) -> tuple[int, int]:
    bk = block_k or min(next_pow2(k), _MAX_TILE)
    bm = block_m or max(1, min(next_pow2(m), _MAX_TILE // bk, 64))
    return check_pow2(bm, "block_m"), check_pow2(bk, "block_k")


def _rows_view(t: torch.Tensor, m: int, k: int, name: str) -> torch.Tensor:
    try:
        return t.view(m, k)
    except RuntimeError:
        raise ValueError(f"{name} must be viewable as ({m}, {k})") from None


def quantize_per_token_int8(
    x: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    block_m: int | None = None,
    block_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric int8: ``(codes int8 like x, scale fp32 x.shape[:-1]+(1,))``.

    ``out`` / ``out_scale`` (optional) are preallocated results (``out_scale``
    contiguous), e.g. for CUDA graphs.
    """
    x2 = _as_rows(x)
    m, k = x2.shape
    q_full = prepare_out(out, x.shape, torch.int8, x.device, "out")
    scale_full = prepare_out(out_scale, (*x.shape[:-1], 1), torch.float32, x.device, "out_scale",
                             contiguous=True)
    q, scale = _rows_view(q_full, m, k, "out"), scale_full.view(m, 1)
    check_launchable(x2, q, scale)
    if m:
        bm, bk = _blocks(m, k, block_m, block_k)
        _per_token_int8_kernel[(triton.cdiv(m, bm),)](
            x2, q, scale, m, k,
            x2.stride(0), x2.stride(1), q.stride(0), q.stride(1),
            QMAX=INT8_QMAX, MIN_SCALE=MIN_SCALE, BLOCK_M=bm, BLOCK_K=bk,
            num_warps=4, enable_fp_fusion=False,
        )
    return q_full, scale_full


def _static_scale(scale, rows: int, device) -> tuple[torch.Tensor, int]:
    """Scale as a contiguous fp32 vector plus its row stride (0: per tensor)."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=device).reshape(-1).contiguous()
    if s.numel() == 1:
        return s, 0
    if s.numel() == rows:
        return s, 1
    raise ValueError(f"static scale must have 1 or {rows} (one per token) elements, got {s.numel()}")


def quantize_static_int8(
    x: torch.Tensor,
    scale,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """Symmetric int8 codes of ``x`` for a given scale (per tensor, or one per token)."""
    x2 = _as_rows(x)
    m, k = x2.shape
    s, stride_s = _static_scale(scale, m, x.device)
    q_full = prepare_out(out, x.shape, torch.int8, x.device, "out")
    q = _rows_view(q_full, m, k, "out")
    check_launchable(x2, s, q)
    if m:
        bm, bk = _blocks(m, k, block_m, block_k or min(next_pow2(k), 1024))
        grid = (triton.cdiv(m, bm), triton.cdiv(k, bk))
        _static_int8_kernel[grid](
            x2, q, s, m, k,
            x2.stride(0), x2.stride(1), q.stride(0), q.stride(1), stride_s,
            QMAX=INT8_QMAX, BLOCK_M=bm, BLOCK_K=bk, num_warps=4, enable_fp_fusion=False,
        )
    return q_full


# --------------------------------------------------------------------------- references


def quantize_per_token_int8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Core oracle: ``quantize(x, QuantSpec(bits=8, granularity="token"))`` and its scale."""
    spec = QuantSpec(bits=8, granularity="token")
    params = params_from_tensor(x, spec)
    return quantize(x, spec, params), params["scale"]


def quantize_static_int8_reference(x: torch.Tensor, scale) -> torch.Tensor:
    """Core oracle for a given scale (per tensor, or one per token)."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if s.numel() == 1:
        return quantize(x, QuantSpec(bits=8, granularity="tensor"), {"scale": s.reshape(())})
    spec = QuantSpec(bits=8, granularity="token")
    return quantize(x, spec, {"scale": s.reshape(*x.shape[:-1], 1)})
