"""Mamba1 selective scan, quantized (Quamba-style int8 inputs) or float, fp32 state: Triton + references.

API
---
``quant_selective_scan(u_q, u_scale, dt_q, dt_scale, dt_bias, A, B_q, B_scale, C_q, C_scale,
D, z_q, z_scale, out_dtype=torch.float16, h0=None, return_state=False) -> y | (y, h_last)``
    Prefill.  Layout (mamba_ssm's ``selective_scan_fn``): ``u_q``, ``dt_q``, ``z_q``
    (b, d, l); ``B_q``, ``C_q`` (b, n, l).  Each of these five is, independently,
    int8 codes (its scale required) or a float16 / bfloat16 / float32 tensor (its
    scale ``None`` = 1.0, no multiply, or a value to multiply by): all-float inputs
    with ``None`` scales make this the unquantized (FP16 baseline) scan, the same
    kernel and arithmetic as the int8 path.  Any other dtype, or an int8 input
    with a ``None`` scale, is a ``ValueError``.  Any strides: our model's
    natural (b, l, d) / (b, l, n) tensors (e.g. column slices of the in_proj / x_proj
    outputs) are passed as ``.transpose(1, 2)`` views without a copy, and that memory
    layout (channels contiguous) is also the fast one for this kernel, whose loop
    over l loads one time step (BLOCK_D channels, n states) at a time.
    Scales: per-tensor static (a float or a one-element tensor, or None for a
    float input).  ``dt_bias`` (d,)
    float or None; ``A`` (d, n) fp32 (already ``-exp(A_log)``); ``D`` (d,) float or
    None; ``z_q`` may be None (no gate).  ``h0``: optional initial state (b, d, n)
    fp32.  Returns ``y`` (b, d, l) of ``out_dtype`` (fp16/bf16/fp32; laid out like
    ``u_q``, i.e. ``torch.empty_like``), and with ``return_state=True`` also the
    final state (b, d, n) fp32.
    Per step (all fp32; every input is cast to fp32 right after its load): ``u =
    u_q * u_scale``, ``dt = softplus(dt_q * dt_scale +
    dt_bias)`` (skipped with ``dt_softplus=False``), ``h = h * exp(dt * A) + (dt *
    u) * B``, ``y = sum_n h * C + D * u``, ``y = y * SiLU(z)``; one rounding to
    ``out_dtype`` at the end (nearest even).
``quant_selective_state_update(state, u_q, u_scale, dt_q, dt_scale, dt_bias, A, B_q, B_scale,
C_q, C_scale, D, z_q, z_scale, out_dtype=torch.float16) -> y (b, d)``
    Decode, one token: ``state`` (b, d, n) fp32 updated in place; ``u_q``, ``dt_q``,
    ``z_q`` (b, d); ``B_q``, ``C_q`` (b, n); int8 or float with the same rules as the
    prefill.  The per-step code is the same
    jit function as in the prefill kernel, so token-by-token updates reproduce the
    prefill outputs and final state (bit for bit in the interpreter; on a GPU the
    ``sum_n`` reduction may be ordered differently, i.e. within fp32 rounding).

``selective_scan_triton`` / ``selective_state_update_triton`` are aliases of the two
functions, the names to use where the inputs are float (the FP16 baseline).

``*_reference`` dequantize (``codes * scale`` in fp32; a float input with scale None is
just cast to fp32), apply ``F.softplus`` and call :func:`selective_scan_reference` (the fp32
Mamba1 recurrence, kept here so the kernels own their oracle), then ``y * F.silu(z)``.
The kernel performs the same operations in the same order except the ``sum_n`` (``bmm``
in the reference), ``exp``/``log``/SiLU (backend ulps) and softplus's ``log1p`` (see
below): fp32 outputs agree to ~1e-6 relative (tests: 1e-5), 16-bit outputs to one ulp of
the output dtype.

Scales may be Python floats or one-element tensors; for decode / CUDA graphs pass
one-element fp32 tensors on the device (no host->device copy per call).  A ``None``
scale (float input) costs nothing: no tensor is made, and the kernel skips that multiply
(the ``SCALED`` constexpr bit mask: u 1, dt 2, B 4, C 8, z 16).

Softplus is torch's (beta 1, threshold 20): ``v`` for ``v > 20``, else ``log1p(exp(v))``,
with ``log1p(e) = log(1 + e) * (e / ((1 + e) - 1))`` (exact-correction formula, no
libdevice, so it runs in the interpreter) and ``e`` where ``1 + e`` rounds to 1.

Kernels
-------
Grid ``(b, cdiv(d, BLOCK_D))`` (BLOCK_D 16 or 32, 4 warps); each program keeps its
(BLOCK_D, n_pad) fp32 state tile in registers and loops over the sequence, one time
step per iteration (per-channel values as (BLOCK_D, 1) tiles, B/C rows as (1, n_pad)).
n is padded to a power of two; padded lanes have A = B = C = 0 and stay 0.  The
decode kernel loads a state tile, does one step, then ``tl.debug_barrier()`` and
stores it.  This is the simple form: the sequential loop is latency-bound (a few
small shared-memory layout conversions per step on sm_90), well behind a chunked /
associative-scan kernel like mamba_ssm's for long prefills.

Input dtypes are launch-time specialisations of the same kernels (one compile per
dtype combination).  Every load is cast to fp32 at once (``tl.load(...).to(tl.float32)``),
so bf16 inputs also run under the interpreter (which has no bf16 arithmetic but converts
loaded bf16 to fp32 correctly; the tests check bf16 inputs against the reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._triton_utils import (OUT_DTYPES, check_launchable, check_pow2, dequantize_reference, load_scale, next_pow2,
                            prepare_out, round_to_dtype_code)

__all__ = [
    "quant_selective_scan",
    "quant_selective_scan_reference",
    "quant_selective_state_update",
    "quant_selective_state_update_reference",
    "selective_scan_reference",
    "selective_scan_triton",
    "selective_state_update_triton",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def _softplus(v):
    """torch.nn.functional.softplus(v) (beta=1, threshold=20) in fp32."""
    e = tl.exp(tl.minimum(v, 20.0))
    p = 1.0 + e
    pm1 = p - 1.0  # exact
    tiny = pm1 == 0.0  # 1 + e rounds to 1: log1p(e) = e to fp32 precision
    lp = tl.where(tiny, e, tl.log(p) * tl.div_rn(e, tl.where(tiny, 1.0, pm1)))
    return tl.where(v > 20.0, v, lp)


@triton.jit
def _load_scaled(p, mask, scale, SCALED: tl.constexpr):
    """Load (int8 codes or fp16/bf16/fp32 values), cast to fp32 at once (the interpreter
    has no bf16 arithmetic), then ``* scale`` unless the input has no scale (``SCALED``
    False: the multiply by 1.0 is skipped, and ``scale`` is a placeholder)."""
    x = tl.load(p, mask=mask, other=0).to(tl.float32)
    if SCALED:
        x = x * scale
    return x


@triton.jit
def _load_step(
    p_u, p_dt, p_z, p_b, p_c,
    mask_d, mask_n, u_scale, dt_scale, dt_bias, B_scale, C_scale, z_scale,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, SCALED: tl.constexpr,
):
    """Dequantized inputs of time step t (fp32): u, dt (softplus'ed), z, B, C.

    ``SCALED``: bit mask of the inputs that have a scale (``_SCALE_BITS``: u 1, dt 2,
    B 4, C 8, z 16).
    """
    u = _load_scaled(p_u, mask_d, u_scale, (SCALED & 1) != 0)
    dt = _load_scaled(p_dt, mask_d, dt_scale, (SCALED & 2) != 0)
    if HAS_DT_BIAS:
        dt = dt + dt_bias
    if DT_SOFTPLUS:
        dt = _softplus(dt)
    if HAS_Z:
        z = _load_scaled(p_z, mask_d, z_scale, (SCALED & 16) != 0)
    else:
        z = u
    bv = _load_scaled(p_b, mask_n, B_scale, (SCALED & 4) != 0)
    cv = _load_scaled(p_c, mask_n, C_scale, (SCALED & 8) != 0)
    return u, dt, z, bv, cv


@triton.jit
def _ssm_step(h, u, dt, z, bv, cv, A, Dv, HAS_D: tl.constexpr, HAS_Z: tl.constexpr):
    """One recurrence step on a (BLOCK_D, N) fp32 state tile; returns (h, y (BLOCK_D, 1)).

    Per-channel values are (BLOCK_D, 1) and B, C rows (1, N) tiles: everything stays in
    the state tile's layout (no layout conversion through shared memory per step).
    """
    dA = tl.exp(dt * A)
    dBu = (dt * u) * bv
    h = h * dA + dBu
    y = tl.sum(h * cv, axis=1, keep_dims=True)
    if HAS_D:
        y = y + u * Dv
    if HAS_Z:
        y = y * (z * tl.div_rn(1.0, 1.0 + tl.exp(-z)))
    return h, y


@triton.jit
def _program_tiles(DIM, NST, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's batch row and 2-D index tiles: channels (BLOCK_D, 1), states (1, BLOCK_N),
    as int64 offsets, with their masks."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)[:, None]
    offs_n = tl.arange(0, BLOCK_N)[None, :]
    mask_d = offs_d < DIM
    mask_n = offs_n < NST
    return pid_b, offs_d.to(tl.int64), offs_n.to(tl.int64), mask_d, mask_n, mask_d & mask_n


@triton.jit
def _load_params(a_ptr, d_ptr, dtb_ptr, d64, n64, s_ad, s_an, mask_d, mask_dn,
                 HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (BLOCK_D, N), D and dt_bias (BLOCK_D, 1) as fp32 (zeros when absent)."""
    A = tl.load(a_ptr + d64 * s_ad + n64 * s_an, mask=mask_dn, other=0.0)
    Dv = tl.zeros((BLOCK_D, 1), tl.float32)
    if HAS_D:
        Dv = tl.load(d_ptr + d64, mask=mask_d, other=0.0)
    dt_bias = tl.zeros((BLOCK_D, 1), tl.float32)
    if HAS_DT_BIAS:
        dt_bias = tl.load(dtb_ptr + d64, mask=mask_d, other=0.0)
    return A, Dv, dt_bias


@triton.jit
def _load_scalars(us_ptr, dts_ptr, bs_ptr, cs_ptr, zs_ptr, SCALED: tl.constexpr):
    """The per-tensor scales of u, dt, B, C, z (loaded once, outside the time loop)."""
    return (load_scale(us_ptr, (SCALED & 1) != 0), load_scale(dts_ptr, (SCALED & 2) != 0),
            load_scale(bs_ptr, (SCALED & 4) != 0), load_scale(cs_ptr, (SCALED & 8) != 0),
            load_scale(zs_ptr, (SCALED & 16) != 0))


# --------------------------------------------------------------------------- kernels


@triton.jit
def _selective_scan_kernel(
    u_ptr, dt_ptr, z_ptr, b_ptr, c_ptr, a_ptr, d_ptr, dtb_ptr, h0_ptr, y_ptr, hout_ptr,
    us_ptr, dts_ptr, bs_ptr, cs_ptr, zs_ptr,
    DIM, NST, L,
    s_ub, s_ud, s_ul, s_dtb, s_dtd, s_dtl, s_zb, s_zd, s_zl,
    s_bb, s_bn, s_bl, s_cb, s_cn, s_cl,
    s_ad, s_an, s_hb, s_hd, s_hn, s_yb, s_yd, s_yl, s_ob, s_od, s_on,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr, STORE_STATE: tl.constexpr,
    OUT_CODE: tl.constexpr, SCALED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b, d64, n64, mask_d, mask_n, mask_dn = _program_tiles(DIM, NST, BLOCK_D, BLOCK_N)

    u_scale, dt_scale, B_scale, C_scale, z_scale = _load_scalars(us_ptr, dts_ptr, bs_ptr, cs_ptr, zs_ptr, SCALED)
    A, Dv, dt_bias = _load_params(a_ptr, d_ptr, dtb_ptr, d64, n64, s_ad, s_an, mask_d, mask_dn,
                                  HAS_D, HAS_DT_BIAS, BLOCK_D)
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * s_hb + d64 * s_hd + n64 * s_hn, mask=mask_dn, other=0.0)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)

    # Pointers of time step t, advanced by one step per iteration (64-bit pointer
    # arithmetic, so t * stride never overflows int32).
    p_u = u_ptr + pid_b * s_ub + d64 * s_ud
    p_dt = dt_ptr + pid_b * s_dtb + d64 * s_dtd
    p_z = z_ptr + pid_b * s_zb + d64 * s_zd
    p_b = b_ptr + pid_b * s_bb + n64 * s_bn
    p_c = c_ptr + pid_b * s_cb + n64 * s_cn
    p_y = y_ptr + pid_b * s_yb + d64 * s_yd
    for _t in range(0, L):
        u, dt, z, bv, cv = _load_step(
            p_u, p_dt, p_z, p_b, p_c,
            mask_d, mask_n, u_scale, dt_scale, dt_bias, B_scale, C_scale, z_scale,
            HAS_DT_BIAS, DT_SOFTPLUS, HAS_Z, SCALED)
        h, y = _ssm_step(h, u, dt, z, bv, cv, A, Dv, HAS_D, HAS_Z)
        y = round_to_dtype_code(y, OUT_CODE)
        tl.store(p_y, y.to(y_ptr.dtype.element_ty), mask=mask_d)
        p_u += s_ul
        p_dt += s_dtl
        p_z += s_zl
        p_b += s_bl
        p_c += s_cl
        p_y += s_yl
    if STORE_STATE:
        tl.store(hout_ptr + pid_b * s_ob + d64 * s_od + n64 * s_on, h, mask=mask_dn)


@triton.jit
def _state_update_kernel(
    u_ptr, dt_ptr, z_ptr, b_ptr, c_ptr, a_ptr, d_ptr, dtb_ptr, st_ptr, y_ptr,
    us_ptr, dts_ptr, bs_ptr, cs_ptr, zs_ptr,
    DIM, NST,
    s_ub, s_ud, s_dtb, s_dtd, s_zb, s_zd, s_bb, s_bn, s_cb, s_cn,
    s_ad, s_an, s_sb, s_sd, s_sn, s_yb, s_yd,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr, OUT_CODE: tl.constexpr, SCALED: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b, d64, n64, mask_d, mask_n, mask_dn = _program_tiles(DIM, NST, BLOCK_D, BLOCK_N)

    u_scale, dt_scale, B_scale, C_scale, z_scale = _load_scalars(us_ptr, dts_ptr, bs_ptr, cs_ptr, zs_ptr, SCALED)
    A, Dv, dt_bias = _load_params(a_ptr, d_ptr, dtb_ptr, d64, n64, s_ad, s_an, mask_d, mask_dn,
                                  HAS_D, HAS_DT_BIAS, BLOCK_D)
    st_ptrs = st_ptr + pid_b * s_sb + d64 * s_sd + n64 * s_sn
    h = tl.load(st_ptrs, mask=mask_dn, other=0.0)
    u, dt, z, bv, cv = _load_step(
        u_ptr + pid_b * s_ub + d64 * s_ud, dt_ptr + pid_b * s_dtb + d64 * s_dtd,
        z_ptr + pid_b * s_zb + d64 * s_zd, b_ptr + pid_b * s_bb + n64 * s_bn,
        c_ptr + pid_b * s_cb + n64 * s_cn,
        mask_d, mask_n, u_scale, dt_scale, dt_bias, B_scale, C_scale, z_scale,
        HAS_DT_BIAS, DT_SOFTPLUS, HAS_Z, SCALED)
    h, y = _ssm_step(h, u, dt, z, bv, cv, A, Dv, HAS_D, HAS_Z)
    y = round_to_dtype_code(y, OUT_CODE)
    tl.store(y_ptr + pid_b * s_yb + d64 * s_yd, y.to(y_ptr.dtype.element_ty), mask=mask_d)
    tl.debug_barrier()  # every warp has read its old state before any is overwritten
    tl.store(st_ptrs, h, mask=mask_dn)


# --------------------------------------------------------------------------- host side


# Bits of the kernels' ``SCALED`` constexpr: which of u, dt, B, C, z are multiplied by a scale.
_SCALE_BITS = {"u_q": 1, "dt_q": 2, "B_q": 4, "C_q": 8, "z_q": 16}
_INPUT_DTYPES_TEXT = "int8 (codes, with a scale) or float16/bfloat16/float32"


def _scale(scale, name, device, t=None, t_name=None) -> torch.Tensor | None:
    """One-element fp32 scale tensor; ``None`` (= 1.0, no multiply) allowed when the input
    ``t`` (named ``t_name``) is a float tensor, an error for int8 codes."""
    if scale is None and t is not None:
        if t.dtype == torch.int8:
            raise ValueError(f"{name} is required for int8 {t_name} (got None); "
                             f"None (no scale) is only allowed for float inputs")
        return None
    s = torch.as_tensor(scale, device=device)
    if not s.is_floating_point() or s.numel() != 1:
        raise ValueError(f"{name} must be one float (per-tensor scale), got {scale!r}")
    return s.to(torch.float32).reshape(1).contiguous()


def _check_input_dtype(t, name):
    if isinstance(t, torch.Tensor) and t.dtype != torch.int8 and t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be {_INPUT_DTYPES_TEXT}, got {t.dtype}")


def _rank_error(t, name, dims):
    """The error for a non-tensor / wrong-rank activation (int8 wording as before)."""
    _check_input_dtype(t, name)
    kind = "int8" if getattr(t, "dtype", torch.int8) == torch.int8 else "int8 or float"
    return ValueError(f"{name} must be an {kind} tensor {dims}")


def _codes(t, name, shape):
    """int8 codes, or a float16/bfloat16/float32 tensor, of this shape (any strides)."""
    _check_input_dtype(t, name)
    if isinstance(t, torch.Tensor) and t.dtype in _FLOAT_DTYPES:
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must be a tensor of shape {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")
        return t
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int8 or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must be an int8 tensor of shape {tuple(shape)}, got "
                         f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    return t


def _scales(device, inputs):
    """Scale tensors of (u, dt, B, C, z) (None where a float input has none, and for an
    absent z) and the ``SCALED`` bit mask.  ``inputs``: (tensor | None, scale, name, scale name)."""
    out, mask = [], 0
    for t, sc, nm, snm in inputs:
        st = _scale(sc, snm, device, t, nm) if t is not None else None
        if st is not None:
            mask |= _SCALE_BITS[nm]
        out.append(st)
    return out, mask


def _scale_ptrs(scales, dummy):
    """Kernel arguments: a dummy fp32 tensor (never read) where there is no scale."""
    return [s if s is not None else dummy for s in scales]


def _vector(t, name, d):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES or t.numel() != d:
        raise ValueError(f"{name} must be a float tensor with {d} elements or None")
    return t.reshape(-1).to(torch.float32)


def _check_A(A, d):
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[0] != d or A.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"A must be a float tensor (d={d}, n), got {getattr(A, 'shape', type(A))}")
    return A.to(torch.float32)


def _check_out_dtype(out_dtype):
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {list(OUT_DTYPES)}, got {out_dtype}")


def _block_d(block_d, b, d):
    # 32 channels per program, or 16 when that leaves fewer than ~2 programs per SM of
    # an H100 (132 SMs): the loop over l is latency-bound, so more programs help.
    return check_pow2(block_d or (32 if b * triton.cdiv(d, 32) >= 264 else 16), "block_d")


def quant_selective_scan(
    u_q, u_scale, dt_q, dt_scale, dt_bias, A, B_q, B_scale, C_q, C_scale, D, z_q, z_scale,
    out_dtype: torch.dtype = torch.float16,
    h0: torch.Tensor | None = None,
    return_state: bool = False,
    *,
    dt_softplus: bool = True,
    out: torch.Tensor | None = None,
    block_d: int | None = None,
):
    """Quantized selective scan over a whole sequence (see the module docstring)."""
    _check_out_dtype(out_dtype)
    if not isinstance(u_q, torch.Tensor) or u_q.dim() != 3:
        raise _rank_error(u_q, "u_q", "(b, d, l)")
    b, d, l = u_q.shape
    _codes(u_q, "u_q", (b, d, l))
    _codes(dt_q, "dt_q", (b, d, l))
    A = _check_A(A, d)
    n = A.shape[1]
    _codes(B_q, "B_q", (b, n, l))
    _codes(C_q, "C_q", (b, n, l))
    if z_q is not None:
        _codes(z_q, "z_q", (b, d, l))
    dev = u_q.device
    dt_bias, D = _vector(dt_bias, "dt_bias", d), _vector(D, "D", d)
    scales, scaled = _scales(dev, ((u_q, u_scale, "u_q", "u_scale"), (dt_q, dt_scale, "dt_q", "dt_scale"),
                                   (B_q, B_scale, "B_q", "B_scale"), (C_q, C_scale, "C_q", "C_scale"),
                                   (z_q, z_scale, "z_q", "z_scale")))
    if h0 is not None:
        if not isinstance(h0, torch.Tensor) or tuple(h0.shape) != (b, d, n) or h0.dtype != torch.float32:
            raise ValueError(f"h0 must be a float32 tensor of shape {(b, d, n)}")
    if out is None:
        y = torch.empty_like(u_q, dtype=out_dtype)  # same memory layout as u_q
    else:
        y = prepare_out(out, (b, d, l), out_dtype, dev, "out")
    h_last = torch.empty(b, d, n, dtype=torch.float32, device=dev) if return_state else None
    check_launchable(u_q, dt_q, A, B_q, C_q, z_q, dt_bias, D, h0, y, *scales)
    if b and d and l:
        bd = _block_d(block_d, b, d)
        bn = max(2, next_pow2(n))
        zt = z_q if z_q is not None else u_q
        dummy = A  # fp32, never read (its HAS_*/SCALED flag is off)
        hs = h0.stride() if h0 is not None else (0, 0, 0)
        os_ = h_last.stride() if h_last is not None else (0, 0, 0)
        _selective_scan_kernel[(b, triton.cdiv(d, bd))](
            u_q, dt_q, zt, B_q, C_q, A, D if D is not None else dummy,
            dt_bias if dt_bias is not None else dummy, h0 if h0 is not None else dummy, y,
            h_last if h_last is not None else dummy, *_scale_ptrs(scales, dummy),
            d, n, l,
            *u_q.stride(), *dt_q.stride(), *zt.stride(), *B_q.stride(), *C_q.stride(),
            *A.stride(), *hs, *y.stride(), *os_,
            HAS_D=D is not None, HAS_Z=z_q is not None, HAS_DT_BIAS=dt_bias is not None,
            DT_SOFTPLUS=dt_softplus, HAS_H0=h0 is not None, STORE_STATE=return_state,
            OUT_CODE=OUT_DTYPES[out_dtype], SCALED=scaled, BLOCK_D=bd, BLOCK_N=bn,
            num_warps=4, enable_fp_fusion=False,
        )
    elif return_state:
        h_last.copy_(h0 if h0 is not None else torch.zeros_like(h_last))
    return (y, h_last) if return_state else y


def quant_selective_state_update(
    state, u_q, u_scale, dt_q, dt_scale, dt_bias, A, B_q, B_scale, C_q, C_scale, D, z_q, z_scale,
    out_dtype: torch.dtype = torch.float16,
    *,
    dt_softplus: bool = True,
    out: torch.Tensor | None = None,
    block_d: int | None = None,
):
    """One decode step: ``state`` (b, d, n) fp32 updated in place, returns y (b, d)."""
    _check_out_dtype(out_dtype)
    if not isinstance(u_q, torch.Tensor) or u_q.dim() != 2:
        raise _rank_error(u_q, "u_q", "(b, d)")
    b, d = u_q.shape
    _codes(u_q, "u_q", (b, d))
    _codes(dt_q, "dt_q", (b, d))
    A = _check_A(A, d)
    n = A.shape[1]
    if (not isinstance(state, torch.Tensor) or tuple(state.shape) != (b, d, n)
            or state.dtype != torch.float32):
        raise ValueError(f"state must be a float32 tensor of shape {(b, d, n)}")
    _codes(B_q, "B_q", (b, n))
    _codes(C_q, "C_q", (b, n))
    if z_q is not None:
        _codes(z_q, "z_q", (b, d))
    dev = u_q.device
    dt_bias, D = _vector(dt_bias, "dt_bias", d), _vector(D, "D", d)
    scales, scaled = _scales(dev, ((u_q, u_scale, "u_q", "u_scale"), (dt_q, dt_scale, "dt_q", "dt_scale"),
                                   (B_q, B_scale, "B_q", "B_scale"), (C_q, C_scale, "C_q", "C_scale"),
                                   (z_q, z_scale, "z_q", "z_scale")))
    y = prepare_out(out, (b, d), out_dtype, dev, "out")
    check_launchable(state, u_q, dt_q, A, B_q, C_q, z_q, dt_bias, D, y, *scales)
    if b and d:
        bd = _block_d(block_d, b, d)
        bn = max(2, next_pow2(n))
        zt = z_q if z_q is not None else u_q
        dummy = A  # fp32, never read (its HAS_*/SCALED flag is off)
        _state_update_kernel[(b, triton.cdiv(d, bd))](
            u_q, dt_q, zt, B_q, C_q, A, D if D is not None else dummy,
            dt_bias if dt_bias is not None else dummy, state, y, *_scale_ptrs(scales, dummy),
            d, n,
            *u_q.stride(), *dt_q.stride(), *zt.stride(), *B_q.stride(), *C_q.stride(),
            *A.stride(), *state.stride(), *y.stride(),
            HAS_D=D is not None, HAS_Z=z_q is not None, HAS_DT_BIAS=dt_bias is not None,
            DT_SOFTPLUS=dt_softplus, OUT_CODE=OUT_DTYPES[out_dtype], SCALED=scaled, BLOCK_D=bd, BLOCK_N=bn,
            num_warps=4, enable_fp_fusion=False,
        )
    return y


#: Plain names for the float (unquantized, e.g. FP16 baseline) use of the same kernels.
selective_scan_triton = quant_selective_scan
selective_state_update_triton = quant_selective_state_update


# --------------------------------------------------------------------------- references


def _ref_dt(dt_q, dt_scale, dt_bias, dt_softplus, bias_shape):
    dt = dequantize_reference(dt_q, dt_scale)
    if dt_bias is not None:
        dt = dt + dt_bias.to(torch.float32).reshape(bias_shape)
    return F.softplus(dt) if dt_softplus else dt


def selective_scan_reference(u, dt, A, B, C, D=None, h0=None, *, block: int = 64):
    """The Mamba1 recurrence in fp32 PyTorch: ``h_t = exp(dt_t A) h_{t-1} + (dt_t u_t) B_t``,
    ``y_t = h_t C_t + D u_t``.

    u, dt (already softplus'ed): (b, l, d); A: (d, n); B, C: (b, l, n); D: (d,) or None; h0:
    (b, d, n) or None (zeros). Returns ``(y (b, l, d), h_last (b, d, n))``, both fp32. In place
    on one state, ``block`` time steps of ``exp(dt A)`` and ``(dt u) B`` materialised at a time
    (cache-sized, instead of (b, l, d, n) at once): this is also what the real Mamba mixer runs
    on a CPU, so it is written for speed as well as clarity.
    """
    u, dt, A, B, C = (t.to(torch.float32) for t in (u, dt, A, B, C))
    b, l, d = u.shape
    h = (torch.zeros(b, d, A.shape[-1], dtype=torch.float32, device=u.device) if h0 is None
         else h0.to(torch.float32).clone())
    y = u.new_empty(b, l, d)
    for t0 in range(0, l, block):
        t1 = min(t0 + block, l)
        dA = torch.exp(dt[:, t0:t1].unsqueeze(-1) * A)
        dBu = (dt[:, t0:t1] * u[:, t0:t1]).unsqueeze(-1) * B[:, t0:t1].unsqueeze(2)
        for i in range(t1 - t0):
            h.mul_(dA[:, i]).add_(dBu[:, i])
            y[:, t0 + i] = torch.bmm(h, C[:, t0 + i].unsqueeze(-1)).squeeze(-1)
    if D is not None:
        y = y + u * D.to(torch.float32)
    return y, h


def quant_selective_scan_reference(
    u_q, u_scale, dt_q, dt_scale, dt_bias, A, B_q, B_scale, C_q, C_scale, D, z_q, z_scale,
    out_dtype=torch.float16, h0=None, return_state=False, *, dt_softplus=True,
):
    """Dequantize, softplus, :func:`selective_scan_reference`, gate (fp32)."""
    u = dequantize_reference(u_q, u_scale).transpose(1, 2)  # (b, l, d)
    dt = _ref_dt(dt_q, dt_scale, dt_bias, dt_softplus, (1, -1, 1)).transpose(1, 2)
    Bf = dequantize_reference(B_q, B_scale).transpose(1, 2)  # (b, l, n)
    Cf = dequantize_reference(C_q, C_scale).transpose(1, 2)
    y, h = selective_scan_reference(u, dt, A, Bf, Cf, D, h0)
    y = y.transpose(1, 2)
    if z_q is not None:
        y = y * F.silu(dequantize_reference(z_q, z_scale))
    y = y.to(out_dtype)
    return (y, h) if return_state else y


def quant_selective_state_update_reference(
    state, u_q, u_scale, dt_q, dt_scale, dt_bias, A, B_q, B_scale, C_q, C_scale, D, z_q, z_scale,
    out_dtype=torch.float16, *, dt_softplus=True,
):
    """One recurrence step in torch (as mamba_ssm's ``selective_state_update``); updates ``state``."""
    u = dequantize_reference(u_q, u_scale)  # (b, d)
    dt = _ref_dt(dt_q, dt_scale, dt_bias, dt_softplus, (1, -1))
    Bf, Cf = dequantize_reference(B_q, B_scale), dequantize_reference(C_q, C_scale)  # (b, n)
    dA = torch.exp(dt.unsqueeze(-1) * A.to(torch.float32))
    dBu = (dt * u).unsqueeze(-1) * Bf.unsqueeze(1)
    state.mul_(dA).add_(dBu)
    y = torch.bmm(state, Cf.unsqueeze(-1)).squeeze(-1)
    if D is not None:
        y = y + u * D.to(torch.float32)
    if z_q is not None:
        y = y * F.silu(dequantize_reference(z_q, z_scale))
    return y.to(out_dtype)
