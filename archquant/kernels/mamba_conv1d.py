"""Causal depthwise conv1d + SiLU for Mamba, quantized (Quamba-style int8) or float: Triton + references.

API
---
``quant_causal_conv1d_silu(x_q, x_scale, w, w_scale, bias, out_scale, conv_state=None, *,
out_dtype=None, out=None, block_d=None, block_l=None) -> y``
    Prefill.  ``x_q``: the conv input (b, d, l) (the mamba_ssm / ``causal_conv1d``
    layout; any strides, so a ``(b, l, d)`` tensor passed as ``x.transpose(1, 2)``
    works without a copy): int8 codes with ``x_scale`` (required; its static
    per-tensor scale), or a float16 / bfloat16 / float32 tensor with ``x_scale``
    ``None`` (= 1.0: no tensor is made and the kernel skips the multiply) or a value
    to multiply by.  Any other dtype is a ``TypeError``.  ``w``: depthwise weight
    (d, k) -- int8 codes with ``w_scale`` (one value or one per channel, shape (d,) /
    (d, 1)), or a float weight (fp32/fp16/bf16; ``w_scale`` then ``None`` -- no
    multiply -- or an extra multiplier); an ``nn.Conv1d`` weight of shape (d, 1, k)
    is accepted too.  ``bias``: (d,) float or None.  Float weights and biases are
    read in their own dtype (cast to fp32 in the kernel: no per-call conversion).
    ``out_scale``: the static scale of the output (Quamba: the percentile-clipped
    ``x_proj:input`` scale) -> int8 (b, d, l)
    ``y_q = quant(SiLU(bias + sum_j deq(w)[:, j] * deq(x)[:, t - k + 1 + j]), out_scale)``
    (``out_dtype`` None or ``torch.int8``).  ``out_scale=None``: float output, the
    same SiLU value rounded once (nearest even) to ``out_dtype`` (float32 / float16 /
    bfloat16); its default is x's dtype for a float x, and for int8 x it must be
    given (a forgotten ``out_scale`` is an error, not a silent float output).  The
    output is a new contiguous (b, d, l) tensor, or ``out`` (any strides).

    ``conv_state`` (optional, (b, d, k), updated in place): the decode cache, holding
    the last ``k`` conv inputs (newest last, as in mamba_ssm's ``Mamba.step``), in
    x's dtype: int8 *codes* for int8 x, the float dtype of x for float x (mamba_ssm
    keeps it in the activation dtype); any other dtype is a ``ValueError``.  Its last
    ``k - 1`` columns are read as the history before ``x_q`` (a zero state == zero
    padding, i.e. no state), and on return it holds the last ``k`` inputs of
    ``history ++ x_q`` (values copied as they are, unscaled).  So a zero-initialised
    state filled by a prefill continues seamlessly with
    :func:`quant_causal_conv1d_update`, and chunked prefill (``x1`` then ``x2`` with
    the same state) equals one call on ``x1 ++ x2``.  The state stores the inputs
    unscaled, so every chunk must use the same ``x_scale``.
``quant_causal_conv1d_update(x_q, conv_state, x_scale, w, w_scale, bias, out_scale, *,
out_dtype=None, out=None, block_d=None) -> y``
    Decode, one token: ``x_q`` (b, d) int8 or float (same rules as the prefill);
    ``conv_state`` (b, d, k) of x's dtype is rolled left by one and ``x_q`` written
    into its last column (in place); returns (b, d) int8 codes or, with
    ``out_scale=None``, ``out_dtype``.  Same arithmetic, in the same order, as the
    prefill kernel, so running the update token by token is bit-identical to the
    prefill on the whole sequence (int8 and float alike).

``causal_conv1d_silu_triton`` / ``causal_conv1d_update_triton`` are aliases of the two
functions, the names to use where x is float and the output too (the unquantized FP16
baseline: ``causal_conv1d_silu_triton(x, None, w, None, bias, None)`` == mamba_ssm's
``causal_conv1d_fn(x, w, bias, activation="silu")``, one fused kernel as in the W8A8 model).

``*_reference`` are plain-PyTorch fake-quant oracles: dequantize (``codes * scale``
in fp32, :mod:`archquant.core.formats`; a float x with scale None is just cast to
fp32) -> ``F.conv1d`` (padding k-1, trimmed to l) -> ``F.silu`` -> ``formats.quantize``
with the per-tensor ``out_scale``, or (``out_scale=None``) a cast to ``out_dtype``.
The state is handled as by the kernels.

Scales may be Python floats or one-element tensors; for decode / CUDA graphs pass
one-element fp32 tensors on the device (a Python float costs a host->device copy
per call and cannot be captured).  ``None`` scales (float x, float weight, float
output) cost nothing: constexpr flags (``X_SCALED``, ``W_SCALED``, ``OUT_CODE``) drop
the load and the multiply.  Int8 weights and float weights are used as they are.

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

Float paths: every load (int8, fp16, bf16, fp32) is cast to fp32 at once (the
interpreter has no bf16 arithmetic); ``xv = x`` (no scale) or ``x * x_scale``, then
the same tap sum, bias and SiLU; a float output is ``round_to_dtype_code(SiLU(a))``,
one nearest-even rounding to ``out_dtype``.  Against the reference: fp32 outputs
within ~1e-6 relative (of ``sum_j |x w| + |bias|``), 16-bit outputs within one ulp
of the output dtype (the fp32 values may straddle a rounding boundary).  A float x
holding int8 codes, with the same scales, gives bit-identical outputs to the int8 path.

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

from ._triton_utils import (
    OUT_DTYPES,
    check_launchable,
    check_pow2,
    dequantize_reference,
    load_scale,
    next_pow2,
    prepare_out,
    quantize_int8_tile,
    round_to_dtype_code,
)

__all__ = [
    "causal_conv1d_silu_triton",
    "causal_conv1d_update_triton",
    "quant_causal_conv1d_silu",
    "quant_causal_conv1d_silu_reference",
    "quant_causal_conv1d_update",
    "quant_causal_conv1d_update_reference",
]

INT8_QMAX = 127
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- kernels

# OUT_CODE of the kernels: OUT_DTYPES' codes (0 fp32, 1 fp16, 2 bf16: SiLU(conv) rounded
# once to that dtype), or this one: int8 codes requantized with out_scale.
_OUT_INT8 = -1


@triton.jit
def _silu_out(acc, out_scale, QMAX: tl.constexpr, OUT_CODE: tl.constexpr):
    """SiLU(acc) (fp32) as int8 codes for a per-tensor scale (OUT_CODE < 0), or rounded
    once to the float output dtype (OUT_CODE: 0 fp32, 1 fp16, 2 bf16; held in fp32)."""
    sig = tl.div_rn(1.0, 1.0 + tl.exp(-acc))
    y = acc * sig
    if OUT_CODE < 0:
        r = quantize_int8_tile(y, out_scale, QMAX)
    else:
        r = round_to_dtype_code(y, OUT_CODE)
    return r


@triton.jit
def _conv1d_silu_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, st_ptr, y_ptr, xs_ptr, os_ptr,
    D, L,
    s_xb, s_xd, s_xl,
    s_wd, s_wk, s_ws,
    s_sb, s_sd, s_sk,
    s_yb, s_yd, s_yl,
    KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, QMAX: tl.constexpr,
    X_SCALED: tl.constexpr, W_SCALED: tl.constexpr, OUT_CODE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_l = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = offs_d < D
    d64 = offs_d.to(tl.int64)
    x_scale = load_scale(xs_ptr, X_SCALED)
    out_scale = load_scale(os_ptr, OUT_CODE < 0)

    x_base = x_ptr + pid_b * s_xb + d64[:, None] * s_xd
    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for j in tl.static_range(KW):
        w = tl.load(w_ptr + d64 * s_wd + j * s_wk, mask=mask_d, other=0.0).to(tl.float32)
        if W_SCALED:
            ws = tl.load(ws_ptr + d64 * s_ws, mask=mask_d, other=0.0).to(tl.float32)
            w = w * ws
        pos = offs_t - (KW - 1) + j  # input position feeding output t through tap j
        m = mask_d[:, None] & (pos[None, :] >= 0) & (pos[None, :] < L)
        xv = tl.load(x_base + pos[None, :].to(tl.int64) * s_xl, mask=m, other=0).to(tl.float32)
        if HAS_STATE:
            # pos in [-(KW-1), -1]: history column KW + pos of conv_state.
            mh = mask_d[:, None] & (pos[None, :] < 0) & (offs_t[None, :] < L)
            hv = tl.load(st_ptr + pid_b * s_sb + d64[:, None] * s_sd
                         + (pos[None, :] + KW).to(tl.int64) * s_sk, mask=mh, other=0).to(tl.float32)
            xv = xv + hv  # disjoint masks: one of the two is 0
        if X_SCALED:
            xv = xv * x_scale
        acc = acc + xv * w[:, None]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d64, mask=mask_d, other=0.0).to(tl.float32)
        acc = acc + bias[:, None]
    q = _silu_out(acc, out_scale, QMAX, OUT_CODE)
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
    """conv_state <- last KW columns of (conv_state ++ x), in place (after the conv).

    Values are only moved (x and the state have one dtype), never computed with."""
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
    X_SCALED: tl.constexpr, W_SCALED: tl.constexpr, OUT_CODE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    d64 = offs_d.to(tl.int64)
    x_scale = load_scale(xs_ptr, X_SCALED)
    out_scale = load_scale(os_ptr, OUT_CODE < 0)
    st_rows = st_ptr + pid_b * s_sb + d64 * s_sd
    x_new = tl.load(x_ptr + pid_b * s_xb + d64 * s_xd, mask=mask_d, other=0)  # raw: also stored

    # Output: taps in the same order and with the same fp32 ops as the prefill kernel.
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in tl.static_range(KW):
        w = tl.load(w_ptr + d64 * s_wd + j * s_wk, mask=mask_d, other=0.0).to(tl.float32)
        if W_SCALED:
            ws = tl.load(ws_ptr + d64 * s_ws, mask=mask_d, other=0.0).to(tl.float32)
            w = w * ws
        if j < KW - 1:
            xv = tl.load(st_rows + (j + 1) * s_sk, mask=mask_d, other=0).to(tl.float32)
        else:
            xv = x_new.to(tl.float32)
        if X_SCALED:
            xv = xv * x_scale
        acc = acc + xv * w
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + d64, mask=mask_d, other=0.0).to(tl.float32)
    q = _silu_out(acc, out_scale, QMAX, OUT_CODE)
    tl.store(y_ptr + pid_b * s_yb + d64 * s_yd, q, mask=mask_d)

    # Rolled state: new[:, c] = old[:, c + 1] (c < KW - 1), new[:, KW - 1] = x (values moved as they are).
    cols = tl.arange(0, KW_PAD)
    m_old = mask_d[:, None] & (cols[None, :] < KW - 1)
    old = tl.load(st_rows[:, None] + (cols[None, :] + 1) * s_sk, mask=m_old, other=0)
    new = tl.where(cols[None, :] == KW - 1, x_new[:, None], old)
    tl.debug_barrier()  # all reads of the old state before any write
    tl.store(st_rows[:, None] + cols[None, :] * s_sk, new, mask=mask_d[:, None] & (cols[None, :] < KW))


# --------------------------------------------------------------------------- host side

_INPUT_DTYPES_TEXT = "int8 (codes, with x_scale) or float16/bfloat16/float32"


def _check_x(x, name, dims, shape_text):
    """int8 codes (message as before) or a float16/bfloat16/float32 tensor of rank ``dims``."""
    dtype = getattr(x, "dtype", None)
    if isinstance(x, torch.Tensor) and dtype in _FLOAT_DTYPES:
        if x.dim() != dims:
            raise TypeError(f"{name} must be a float tensor {shape_text}, got {dtype} {tuple(x.shape)}")
        return x
    if isinstance(x, torch.Tensor) and dtype != torch.int8:
        raise TypeError(f"{name} must be {_INPUT_DTYPES_TEXT} {shape_text}, got {dtype} {tuple(x.shape)}")
    if not isinstance(x, torch.Tensor) or x.dim() != dims:
        raise TypeError(f"{name} must be an int8 tensor {shape_text}, got "
                        f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    return x


def _scalar_scale(scale, name: str, device) -> torch.Tensor:
    s = torch.as_tensor(scale, device=device)
    if not s.is_floating_point() or s.numel() != 1:
        raise ValueError(f"{name} must be one float (per-tensor scale), got {scale!r}")
    return s.to(torch.float32).reshape(1).contiguous()


def _x_scale(x_scale, x, device) -> torch.Tensor | None:
    """One-element fp32 tensor, or None (= 1.0: no tensor, the kernel skips the multiply)
    for a float ``x``; int8 codes need a scale."""
    if x_scale is None:
        if x.dtype == torch.int8:
            raise ValueError("x_scale is required for int8 x_q (got None); "
                             "None (no scale) is only allowed for float inputs")
        return None
    return _scalar_scale(x_scale, "x_scale", device)


def _out_spec(x, out_scale, out_dtype, device) -> tuple[torch.Tensor | None, torch.dtype, int]:
    """(out_scale tensor | None, output dtype, OUT_CODE of the kernels)."""
    if out_scale is not None:
        if out_dtype is not None and out_dtype != torch.int8:
            raise ValueError(f"out_scale is given (int8 output), but out_dtype={out_dtype}; "
                             "pass out_scale=None for a float output")
        return _scalar_scale(out_scale, "out_scale", device), torch.int8, _OUT_INT8
    if out_dtype is None:
        if x.dtype == torch.int8:
            raise ValueError("out_scale=None (float output) with int8 x_q: pass out_dtype "
                             "(float32/float16/bfloat16), or out_scale for int8 codes")
        out_dtype = x.dtype
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {list(OUT_DTYPES)} when out_scale is None "
                         f"(int8 output needs out_scale), got {out_dtype}")
    return None, out_dtype, OUT_DTYPES[out_dtype]


def _weight_and_scale(w: torch.Tensor, w_scale, d: int, device) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(weight (d, k) int8 or float, as given; fp32 scale vector or None (float weight without
    scale: no tensor, no multiply); scale stride 0|1)."""
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
        if w_scale is None:  # loaded in its dtype and cast to fp32 in the kernel
            return w, None, 0
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
    return bias.reshape(-1).contiguous()  # any float dtype: cast to fp32 in the kernel


def _check_state(conv_state, b, d, k, x_dtype=torch.int8):
    """``conv_state`` (b, d, k) of x's dtype: int8 codes for int8 x, else x's float dtype."""
    if conv_state is None:
        return None
    if x_dtype == torch.int8:
        if (not isinstance(conv_state, torch.Tensor) or conv_state.dtype != torch.int8
                or tuple(conv_state.shape) != (b, d, k)):
            raise ValueError(f"conv_state must be an int8 tensor of shape {(b, d, k)}, got "
                             f"{getattr(conv_state, 'dtype', type(conv_state))} "
                             f"{tuple(getattr(conv_state, 'shape', ()))}")
        return conv_state
    if (not isinstance(conv_state, torch.Tensor) or conv_state.dtype != x_dtype
            or tuple(conv_state.shape) != (b, d, k)):
        raise ValueError(f"conv_state must be a {x_dtype} tensor of shape {(b, d, k)} (the state holds "
                         f"the conv inputs, in x_q's dtype), got {getattr(conv_state, 'dtype', type(conv_state))} "
                         f"{tuple(getattr(conv_state, 'shape', ()))}")
    return conv_state


def quant_causal_conv1d_silu(
    x_q: torch.Tensor,
    x_scale,
    w: torch.Tensor,
    w_scale,
    bias: torch.Tensor | None,
    out_scale,
    conv_state: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    block_d: int | None = None,
    block_l: int | None = None,
) -> torch.Tensor:
    """(b, d, l) int8 codes or float -> (b, d, l) int8 codes (``out_scale``) or float
    (``out_scale=None``, ``out_dtype``): SiLU(causal depthwise conv) (see module doc)."""
    x_q = _check_x(x_q, "x_q", 3, "(b, d, l)")
    b, d, l = x_q.shape
    dev = x_q.device
    w, ws, s_ws = _weight_and_scale(w, w_scale, d, dev)
    k = w.shape[1]
    bias = _check_bias(bias, d)
    xs = _x_scale(x_scale, x_q, dev)
    os_, y_dtype, out_code = _out_spec(x_q, out_scale, out_dtype, dev)
    conv_state = _check_state(conv_state, b, d, k, x_q.dtype)
    y = prepare_out(out, (b, d, l), y_dtype, dev, "out")
    check_launchable(x_q, w, ws, bias, xs, os_, conv_state, y)
    if b == 0 or d == 0 or l == 0:
        return y
    bd = check_pow2(block_d or 32, "block_d")
    bl = check_pow2(block_l or min(32, max(16, next_pow2(l))), "block_l")
    st = conv_state if conv_state is not None else x_q  # dummy pointer when unused
    s_st = conv_state.stride() if conv_state is not None else (0, 0, 0)
    _conv1d_silu_kernel[(b, triton.cdiv(d, bd), triton.cdiv(l, bl))](
        x_q, w, *(t if t is not None else w for t in (ws, bias)), st, y,
        *(t if t is not None else w for t in (xs, os_)),  # dummies (w) are never read
        d, l,
        *x_q.stride(), w.stride(0), w.stride(1), s_ws, *s_st, *y.stride(),
        KW=k, HAS_BIAS=bias is not None, HAS_STATE=conv_state is not None, QMAX=INT8_QMAX,
        X_SCALED=xs is not None, W_SCALED=ws is not None, OUT_CODE=out_code,
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
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """One decode step: (b, d) int8 codes or float -> (b, d) int8 codes or float (as the
    prefill); ``conv_state`` (b, d, k) of x's dtype rolled in place."""
    x_q = _check_x(x_q, "x_q", 2, "(b, d)")
    b, d = x_q.shape
    dev = x_q.device
    w, ws, s_ws = _weight_and_scale(w, w_scale, d, dev)
    k = w.shape[1]
    bias = _check_bias(bias, d)
    xs = _x_scale(x_scale, x_q, dev)
    os_, y_dtype, out_code = _out_spec(x_q, out_scale, out_dtype, dev)
    if conv_state is None:
        raise ValueError("quant_causal_conv1d_update needs conv_state")
    conv_state = _check_state(conv_state, b, d, k, x_q.dtype)
    y = prepare_out(out, (b, d), y_dtype, dev, "out")
    check_launchable(x_q, w, ws, bias, xs, os_, conv_state, y)
    if b == 0 or d == 0:
        return y
    bd = check_pow2(block_d or 64, "block_d")
    _conv1d_update_kernel[(b, triton.cdiv(d, bd))](
        x_q, w, *(t if t is not None else w for t in (ws, bias)), conv_state, y,
        *(t if t is not None else w for t in (xs, os_)),  # dummies (w) are never read
        d,
        *x_q.stride(), w.stride(0), w.stride(1), s_ws, *conv_state.stride(), *y.stride(),
        KW=k, KW_PAD=next_pow2(k), HAS_BIAS=bias is not None, QMAX=INT8_QMAX,
        X_SCALED=xs is not None, W_SCALED=ws is not None, OUT_CODE=out_code,
        BLOCK_D=bd, num_warps=4, enable_fp_fusion=False,
    )
    return y


#: The names to use where x is float (the unquantized FP16 / BF16 model): the same functions,
#: like mamba_ssm's ``causal_conv1d_fn`` (with ``activation="silu"``) / ``causal_conv1d_update``.
causal_conv1d_silu_triton = quant_causal_conv1d_silu
causal_conv1d_update_triton = quant_causal_conv1d_update


# --------------------------------------------------------------------------- references


def _ref_weight(w, w_scale, d):
    if w.dim() == 3:
        w = w[:, 0, :]
    wf = w.to(torch.float32)
    if w.dtype == torch.int8 or w_scale is not None:
        s = torch.as_tensor(w_scale, dtype=torch.float32, device=w.device).reshape(-1)
        wf = wf * (s.reshape(d, 1) if s.numel() == d and d != 1 else s.reshape(1, 1))
    return wf


def _ref_out(y: torch.Tensor, x: torch.Tensor, out_scale, out_dtype) -> torch.Tensor:
    """int8 codes with ``out_scale``; else ``y`` cast to ``out_dtype`` (default: x's float dtype)."""
    if out_scale is None:
        if out_dtype is None:
            if x.dtype == torch.int8:
                raise ValueError("out_scale=None (float output) with int8 x_q: pass out_dtype")
            out_dtype = x.dtype
        return y.to(out_dtype)
    s = torch.as_tensor(out_scale, dtype=torch.float32, device=y.device).reshape(())
    return quantize(y, QuantSpec(bits=8, granularity="tensor"), {"scale": s})


def quant_causal_conv1d_silu_reference(x_q, x_scale, w, w_scale, bias, out_scale, conv_state=None,
                                       *, out_dtype=None, return_float: bool = False):
    """Fake-quant oracle.  Returns ``y_q`` (and updates ``conv_state`` in place like the kernel):
    int8 codes, or with ``out_scale=None`` the SiLU output cast to ``out_dtype``.

    ``return_float=True`` returns ``(y_q, silu_value)``: the fp32 SiLU output before
    requantization / the cast (used by the tests to locate rounding ties).
    """
    b, d, l = x_q.shape
    wf = _ref_weight(w, w_scale, d)
    k = wf.shape[1]
    x = dequantize_reference(x_q, x_scale)
    if conv_state is not None:
        hist = dequantize_reference(conv_state[..., 1:], x_scale)
        y = F.conv1d(torch.cat([hist, x], dim=-1), wf[:, None, :],
                     None if bias is None else bias.to(torch.float32), groups=d)
        conv_state.copy_(torch.cat([conv_state, x_q], dim=-1)[..., -k:])
    else:
        y = F.conv1d(x, wf[:, None, :], None if bias is None else bias.to(torch.float32),
                     padding=k - 1, groups=d)[..., :l]
    y = F.silu(y)
    q = _ref_out(y, x_q, out_scale, out_dtype)
    return (q, y) if return_float else q


def quant_causal_conv1d_update_reference(x_q, conv_state, x_scale, w, w_scale, bias, out_scale,
                                         *, out_dtype=None, return_float: bool = False):
    """One decode step as in mamba_ssm ``Mamba.step``: roll the state, dot with the taps, SiLU."""
    d = x_q.shape[1]
    wf = _ref_weight(w, w_scale, d)
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x_q
    y = torch.sum(dequantize_reference(conv_state, x_scale) * wf, dim=-1)
    if bias is not None:
        y = y + bias.to(torch.float32)
    y = F.silu(y)
    q = _ref_out(y, x_q, out_scale, out_dtype)
    return (q, y) if return_float else q
