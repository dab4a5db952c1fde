"""Quantized causal depthwise conv1d + SiLU for Mamba (Quamba-style): Triton + references.

API
---
``quant_causal_conv1d_silu(x_q, x_scale, w, w_scale, bias, out_scale, conv_state=None) -> y_q``
    Prefill.  ``x_q``: int8 (b, d, l) codes of the conv input (the mamba_ssm /
    ``causal_conv1d`` layout; any strides, so a ``(b, l, d)`` tensor passed as
    ``x.transpose(1, 2)`` works without a copy); ``x_scale``: its static per-tensor
    scale.  ``w``: depthwise weight (d, k) -- int8 codes with ``w_scale`` (one value
    or one per channel, shape (d,) / (d, 1)), or a float weight (fp32/fp16/bf16;
    ``w_scale`` then ``None`` or an extra multiplier); an ``nn.Conv1d`` weight of
    shape (d, 1, k) is accepted too.  ``bias``: (d,) float or None.
    ``out_scale``: the static scale of the output (Quamba: the percentile-clipped
    ``x_proj:input`` scale).  Returns int8 (b, d, l)
    ``y_q = quant(SiLU(bias + sum_j deq(w)[:, j] * deq(x)[:, t - k + 1 + j]), out_scale)``.

    ``conv_state`` (optional, int8 (b, d, k), updated in place): the decode cache,
    holding the codes of the last ``k`` conv inputs (newest last, as in mamba_ssm's
    ``Mamba.step``).  Its last ``k - 1`` columns are read as the history before
    ``x_q`` (a zero state == zero padding, i.e. no state), and on return it holds
    the last ``k`` inputs of ``history ++ x_q``.  So a zero-initialised state filled
    by a prefill continues seamlessly with :func:`quant_causal_conv1d_update`, and
    chunked prefill (``x1`` then ``x2`` with the same state) equals one call on
    ``x1 ++ x2``.  The state stores *codes*, so every chunk must use the same
    ``x_scale``.
``quant_causal_conv1d_update(x_q, conv_state, x_scale, w, w_scale, bias, out_scale) -> y_q``
    Decode, one token: ``x_q`` int8 (b, d); ``conv_state`` int8 (b, d, k) is rolled
    left by one and ``x_q`` written into its last column (in place); returns int8
    (b, d).  Same arithmetic, in the same order, as the prefill kernel, so running
    the update token by token is bit-identical to the prefill on the whole sequence.

``*_reference`` are plain-PyTorch fake-quant oracles: dequantize (``codes * scale``
in fp32, :mod:`archquant.core.formats`) -> ``F.conv1d`` (padding k-1, trimmed to l)
-> ``F.silu`` -> ``formats.quantize`` with the per-tensor ``out_scale``.

Scales may be Python floats or one-element tensors; for decode / CUDA graphs pass
one-element fp32 tensors on the device (a Python float costs a host->device copy
per call and cannot be captured).  Float weights are converted to fp32 per call
(tiny); int8 weights are used as they are.

Arithmetic and exactness
------------------------
Everything runs in fp32: ``xv = code * x_scale``, ``wv = code * w_scale``,
``acc = ((x_0 * w_0 + x_1 * w_1) + ...) + bias`` (taps in order, no FMA:
``enable_fp_fusion=False``), ``SiLU(a) = a * (1 / (1 + exp(-a)))``, codes =
``clamp(round_half_even(a / out_scale), -127, 127)`` (IEEE division, ties to even;
the restricted int8 range of the core).  ``F.conv1d`` sums the taps in its own order
(and ``exp`` differs by an ulp between backends), so the pre-rounding value can
differ in the last bits: an output code differs from the reference by at most 1,
and only where ``silu / out_scale`` lies within a few fp32 ulps of a ``.5``
rounding boundary (the tests check exactly that; on random data a handful per
million).  Outputs beyond ``±127 * out_scale`` saturate (clipped scales are the
point of Quamba's percentile calibration).

Kernels
-------
* prefill: grid ``(b, cdiv(d, BLOCK_D), cdiv(l, BLOCK_L))`` (default 32 x 32, 4 warps:
  112 registers on sm_90; 32 x 64 would need 253); each program computes a
  (BLOCK_D, BLOCK_L) output tile with ``k`` shifted (masked) loads of the input
  tile (neighbouring tiles overlap by k-1 columns; those re-reads hit L1/L2), the
  history columns coming from ``conv_state`` where ``t - k + 1 + j < 0``.  The
  programs only *read* the state; a second small launch (grid ``(b, cdiv(d,
  BLOCK_D))``) writes the new state afterwards, so no program overwrites history
  another program still needs.
* update: grid ``(b, cdiv(d, BLOCK_D))``; each program loads its (BLOCK_D, k) state
  rows and the new token, computes the output, then ``tl.debug_barrier()`` (a CTA
  barrier: all reads of the old state by every warp of the program happen before any
  write) and stores the shifted rows back.  ``k`` is a constexpr (taps unrolled).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from archquant.core.formats import QuantSpec, quantize

from ._triton_utils import check_launchable, next_pow2, prepare_out, quantize_int8_tile

__all__ = [
    "quant_causal_conv1d_silu",
    "quant_causal_conv1d_silu_reference",
    "quant_causal_conv1d_update",
    "quant_causal_conv1d_update_reference",
]

INT8_QMAX = 127
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _silu_quant(acc, out_scale, QMAX: tl.constexpr):
    """int8 codes of SiLU(acc) (fp32) for a per-tensor scale."""
    sig = tl.div_rn(1.0, 1.0 + tl.exp(-acc))
    return quantize_int8_tile(acc * sig, out_scale, QMAX)


@triton.jit
def _conv1d_silu_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, st_ptr, y_ptr, xs_ptr, os_ptr,
    D, L,
    s_xb, s_xd, s_xl,
    s_wd, s_wk, s_ws,
    s_sb, s_sd, s_sk,
    s_yb, s_yd, s_yl,
    KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, QMAX: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_l = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = offs_d < D
    d64 = offs_d.to(tl.int64)
    x_scale = tl.load(xs_ptr).to(tl.float32)
    out_scale = tl.load(os_ptr).to(tl.float32)

    x_base = x_ptr + pid_b * s_xb + d64[:, None] * s_xd
    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for j in tl.static_range(KW):
        w = tl.load(w_ptr + d64 * s_wd + j * s_wk, mask=mask_d, other=0.0).to(tl.float32)
        ws = tl.load(ws_ptr + d64 * s_ws, mask=mask_d, other=0.0).to(tl.float32)
        w = w * ws
        pos = offs_t - (KW - 1) + j  # input position feeding output t through tap j
        m = mask_d[:, None] & (pos[None, :] >= 0) & (pos[None, :] < L)
        xv = tl.load(x_base + pos[None, :].to(tl.int64) * s_xl, mask=m, other=0).to(tl.float32)
        if HAS_STATE:
            # pos in [-(KW-1), -1]: history column KW + pos of conv_state.
            mh = mask_d[:, None] & (pos[None, :] < 0) & (offs_t[None, :] < L)
            hv = tl.load(st_ptr + pid_b * s_sb + d64[:, None] * s_sd
                         + (pos[None, :] + KW).to(tl.int64) * s_sk, mask=mh, other=0)
            xv = xv + hv.to(tl.float32)  # disjoint masks: one of the two is 0
        acc = acc + (xv * x_scale) * w[:, None]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d64, mask=mask_d, other=0.0).to(tl.float32)
        acc = acc + bias[:, None]
    q = _silu_quant(acc, out_scale, QMAX)
    y_ptrs = y_ptr + pid_b * s_yb + d64[:, None] * s_yd + offs_t[None, :].to(tl.int64) * s_yl
    tl.store(y_ptrs, q, mask=mask_d[:, None] & (offs_t[None, :] < L))


@triton.jit
def _conv_state_write_kernel(
    x_ptr, st_ptr,
    D, L,
    s_xb, s_xd, s_xl,
    s_sb, s_sd, s_sk,
    KW: tl.constexpr, KW_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """conv_state <- last KW columns of (conv_state ++ x), in place (after the conv)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    d64 = offs_d.to(tl.int64)
    cols = tl.arange(0, KW_PAD)
    pos = L - KW + cols  # source position of new column c (negative: old state column KW + pos)
    mask_c = cols < KW
    mx = mask_d[:, None] & (mask_c & (pos >= 0))[None, :]
    ms = mask_d[:, None] & (mask_c & (pos < 0))[None, :]
    xv = tl.load(x_ptr + pid_b * s_xb + d64[:, None] * s_xd + pos[None, :].to(tl.int64) * s_xl,
                 mask=mx, other=0)
    st_rows = st_ptr + pid_b * s_sb + d64[:, None] * s_sd
    sv = tl.load(st_rows + (pos[None, :] + KW).to(tl.int64) * s_sk, mask=ms, other=0)
    new = tl.where(pos[None, :] >= 0, xv, sv)
    tl.debug_barrier()  # every read of the old state (all warps) before any write
    tl.store(st_rows + cols[None, :] * s_sk, new, mask=mask_d[:, None] & mask_c[None, :])


@triton.jit
def _conv1d_update_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, st_ptr, y_ptr, xs_ptr, os_ptr,
    D,
    s_xb, s_xd,
    s_wd, s_wk, s_ws,
    s_sb, s_sd, s_sk,
    s_yb, s_yd,
    KW: tl.constexpr, KW_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, QMAX: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    d64 = offs_d.to(tl.int64)
    x_scale = tl.load(xs_ptr).to(tl.float32)
    out_scale = tl.load(os_ptr).to(tl.float32)
    st_rows = st_ptr + pid_b * s_sb + d64 * s_sd
    x_new = tl.load(x_ptr + pid_b * s_xb + d64 * s_xd, mask=mask_d, other=0)

    # Output: taps in the same order and with the same fp32 ops as the prefill kernel.
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in tl.static_range(KW):
        w = tl.load(w_ptr + d64 * s_wd + j * s_wk, mask=mask_d, other=0.0).to(tl.float32)
        ws = tl.load(ws_ptr + d64 * s_ws, mask=mask_d, other=0.0).to(tl.float32)
        w = w * ws
        if j < KW - 1:
            xv = tl.load(st_rows + (j + 1) * s_sk, mask=mask_d, other=0).to(tl.float32)
        else:
            xv = x_new.to(tl.float32)
        acc = acc + (xv * x_scale) * w
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + d64, mask=mask_d, other=0.0).to(tl.float32)
    q = _silu_quant(acc, out_scale, QMAX)
    tl.store(y_ptr + pid_b * s_yb + d64 * s_yd, q, mask=mask_d)

    # Rolled state: new[:, c] = old[:, c + 1] (c < KW - 1), new[:, KW - 1] = x.
    cols = tl.arange(0, KW_PAD)
    m_old = mask_d[:, None] & (cols[None, :] < KW - 1)
    old = tl.load(st_rows[:, None] + (cols[None, :] + 1) * s_sk, mask=m_old, other=0)
    new = tl.where(cols[None, :] == KW - 1, x_new[:, None], old)
    tl.debug_barrier()  # all reads of the old state before any write
    tl.store(st_rows[:, None] + cols[None, :] * s_sk, new, mask=mask_d[:, None] & (cols[None, :] < KW))


# --------------------------------------------------------------------------- host side


def _scalar_scale(scale, name: str, device) -> torch.Tensor:
    s = torch.as_tensor(scale, device=device)
    if not s.is_floating_point() or s.numel() != 1:
        raise ValueError(f"{name} must be one float (per-tensor scale), got {scale!r}")
    return s.to(torch.float32).reshape(1).contiguous()


def _weight_and_scale(w: torch.Tensor, w_scale, d: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(weight (d, k) int8 or fp32, fp32 scale vector, scale stride 0|1)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a tensor, got {type(w)}")
    if w.dim() == 3 and w.shape[1] == 1:  # nn.Conv1d depthwise weight (d, 1, k)
        w = w[:, 0, :]
    if w.dim() != 2 or w.shape[0] != d or w.shape[1] < 1:
        raise ValueError(f"w must have shape ({d}, k), got {tuple(w.shape)}")
    if w.dtype == torch.int8:
        if w_scale is None:
            raise ValueError("int8 weight codes need w_scale")
    elif w.dtype in _FLOAT_DTYPES:
        w = w.to(torch.float32)  # tiny; the interpreter cannot do bf16 arithmetic
        if w_scale is None:
            w_scale = 1.0
    else:
        raise TypeError(f"w must be int8 codes or a float tensor, got {w.dtype}")
    s = torch.as_tensor(w_scale, device=device)
    if not s.is_floating_point():
        raise TypeError(f"w_scale must be float, got {s.dtype}")
    s = s.to(torch.float32).reshape(-1).contiguous()
    if s.numel() not in (1, d):
        raise ValueError(f"w_scale must have 1 or {d} (per channel) elements, got {s.numel()}")
    return w, s, 0 if s.numel() == 1 else 1


def _check_bias(bias, d):
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor) or bias.dtype not in _FLOAT_DTYPES or bias.numel() != d:
        raise ValueError(f"bias must be a float tensor with {d} elements or None")
    return bias.reshape(-1).to(torch.float32)


def _check_state(conv_state, b, d, k):
    if conv_state is None:
        return None
    if (not isinstance(conv_state, torch.Tensor) or conv_state.dtype != torch.int8
            or tuple(conv_state.shape) != (b, d, k)):
        raise ValueError(f"conv_state must be an int8 tensor of shape {(b, d, k)}, got "
                         f"{getattr(conv_state, 'dtype', type(conv_state))} "
                         f"{tuple(getattr(conv_state, 'shape', ()))}")
    return conv_state


def _pow2(v, name):
    if v < 1 or v & (v - 1):
        raise ValueError(f"{name}={v} must be a power of two")
    return v


def quant_causal_conv1d_silu(
    x_q: torch.Tensor,
    x_scale,
    w: torch.Tensor,
    w_scale,
    bias: torch.Tensor | None,
    out_scale,
    conv_state: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    block_d: int | None = None,
    block_l: int | None = None,
) -> torch.Tensor:
    """int8 (b, d, l) -> int8 (b, d, l): SiLU(causal depthwise conv) requantized (see module doc)."""
    if not isinstance(x_q, torch.Tensor) or x_q.dtype != torch.int8 or x_q.dim() != 3:
        raise TypeError(f"x_q must be an int8 tensor (b, d, l), got "
                        f"{getattr(x_q, 'dtype', type(x_q))} {tuple(getattr(x_q, 'shape', ()))}")
    b, d, l = x_q.shape
    dev = x_q.device
    w, ws, s_ws = _weight_and_scale(w, w_scale, d, dev)
    k = w.shape[1]
    bias = _check_bias(bias, d)
    xs = _scalar_scale(x_scale, "x_scale", dev)
    os_ = _scalar_scale(out_scale, "out_scale", dev)
    conv_state = _check_state(conv_state, b, d, k)
    y = prepare_out(out, (b, d, l), torch.int8, dev, "out")
    check_launchable(x_q, w, ws, bias, xs, os_, conv_state, y)
    if b == 0 or d == 0 or l == 0:
        return y
    bd = _pow2(block_d or 32, "block_d")
    bl = _pow2(block_l or min(32, max(16, next_pow2(l))), "block_l")
    st = conv_state if conv_state is not None else x_q  # dummy pointer when unused
    s_st = conv_state.stride() if conv_state is not None else (0, 0, 0)
    _conv1d_silu_kernel[(b, triton.cdiv(d, bd), triton.cdiv(l, bl))](
        x_q, w, ws, bias if bias is not None else ws, st, y, xs, os_,
        d, l,
        *x_q.stride(), w.stride(0), w.stride(1), s_ws, *s_st, *y.stride(),
        KW=k, HAS_BIAS=bias is not None, HAS_STATE=conv_state is not None, QMAX=INT8_QMAX,
        BLOCK_D=bd, BLOCK_L=bl, num_warps=4, enable_fp_fusion=False,
    )
    if conv_state is not None:
        _conv_state_write_kernel[(b, triton.cdiv(d, bd))](
            x_q, conv_state, d, l, *x_q.stride(), *conv_state.stride(),
            KW=k, KW_PAD=next_pow2(k), BLOCK_D=bd, num_warps=4,
        )
    return y


def quant_causal_conv1d_update(
    x_q: torch.Tensor,
    conv_state: torch.Tensor,
    x_scale,
    w: torch.Tensor,
    w_scale,
    bias: torch.Tensor | None,
    out_scale,
    *,
    out: torch.Tensor | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """One decode step: int8 (b, d) -> int8 (b, d); ``conv_state`` (b, d, k) rolled in place."""
    if not isinstance(x_q, torch.Tensor) or x_q.dtype != torch.int8 or x_q.dim() != 2:
        raise TypeError(f"x_q must be an int8 tensor (b, d), got "
                        f"{getattr(x_q, 'dtype', type(x_q))} {tuple(getattr(x_q, 'shape', ()))}")
    b, d = x_q.shape
    dev = x_q.device
    w, ws, s_ws = _weight_and_scale(w, w_scale, d, dev)
    k = w.shape[1]
    bias = _check_bias(bias, d)
    xs = _scalar_scale(x_scale, "x_scale", dev)
    os_ = _scalar_scale(out_scale, "out_scale", dev)
    if conv_state is None:
        raise ValueError("quant_causal_conv1d_update needs conv_state")
    conv_state = _check_state(conv_state, b, d, k)
    y = prepare_out(out, (b, d), torch.int8, dev, "out")
    check_launchable(x_q, w, ws, bias, xs, os_, conv_state, y)
    if b == 0 or d == 0:
        return y
    bd = _pow2(block_d or 64, "block_d")
    _conv1d_update_kernel[(b, triton.cdiv(d, bd))](
        x_q, w, ws, bias if bias is not None else ws, conv_state, y, xs, os_,
        d,
        *x_q.stride(), w.stride(0), w.stride(1), s_ws, *conv_state.stride(), *y.stride(),
        KW=k, KW_PAD=next_pow2(k), HAS_BIAS=bias is not None, QMAX=INT8_QMAX,
        BLOCK_D=bd, num_warps=4, enable_fp_fusion=False,
    )
    return y


# --------------------------------------------------------------------------- references


def _deq(codes: torch.Tensor, scale) -> torch.Tensor:
    s = torch.as_tensor(scale, dtype=torch.float32, device=codes.device)
    return codes.to(torch.float32) * s


def _ref_weight(w, w_scale, d):
    if w.dim() == 3:
        w = w[:, 0, :]
    wf = w.to(torch.float32)
    if w.dtype == torch.int8 or w_scale is not None:
        s = torch.as_tensor(w_scale, dtype=torch.float32, device=w.device).reshape(-1)
        wf = wf * (s.reshape(d, 1) if s.numel() == d and d != 1 else s.reshape(1, 1))
    return wf


def _ref_quant(y: torch.Tensor, out_scale) -> torch.Tensor:
    s = torch.as_tensor(out_scale, dtype=torch.float32, device=y.device).reshape(())
    return quantize(y, QuantSpec(bits=8, granularity="tensor"), {"scale": s})


def quant_causal_conv1d_silu_reference(x_q, x_scale, w, w_scale, bias, out_scale, conv_state=None,
                                       *, return_float: bool = False):
    """Fake-quant oracle.  Returns ``y_q`` (and updates ``conv_state`` in place like the kernel).

    ``return_float=True`` returns ``(y_q, silu_value)``: the fp32 SiLU output before
    requantization (used by the tests to locate rounding ties).
    """
    b, d, l = x_q.shape
    wf = _ref_weight(w, w_scale, d)
    k = wf.shape[1]
    x = _deq(x_q, x_scale)
    if conv_state is not None:
        hist = _deq(conv_state[..., 1:], x_scale)
        y = F.conv1d(torch.cat([hist, x], dim=-1), wf[:, None, :],
                     None if bias is None else bias.to(torch.float32), groups=d)
        conv_state.copy_(torch.cat([conv_state, x_q], dim=-1)[..., -k:])
    else:
        y = F.conv1d(x, wf[:, None, :], None if bias is None else bias.to(torch.float32),
                     padding=k - 1, groups=d)[..., :l]
    y = F.silu(y)
    q = _ref_quant(y, out_scale)
    return (q, y) if return_float else q


def quant_causal_conv1d_update_reference(x_q, conv_state, x_scale, w, w_scale, bias, out_scale,
                                         *, return_float: bool = False):
    """One decode step as in mamba_ssm ``Mamba.step``: roll the state, dot with the taps, SiLU."""
    d = x_q.shape[1]
    wf = _ref_weight(w, w_scale, d)
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x_q
    y = torch.sum(_deq(conv_state, x_scale) * wf, dim=-1)
    if bias is not None:
        y = y + bias.to(torch.float32)
    y = F.silu(y)
    q = _ref_quant(y, out_scale)
    return (q, y) if return_float else q
