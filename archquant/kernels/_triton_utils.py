"""Helpers shared by the Triton kernels of :mod:`archquant.kernels`.

Everything here is written for two targets at once:

* real GPUs (sm_90 in mind), and
* the Triton interpreter (``TRITON_INTERPRET=1``, numpy simulation on CPU), which
  is how the kernels are tested in CI.

Hence the restrictions (see ``shared/specs/kernels.md`` §5): no libdevice or inline
asm (rounding is done with ``tl.floor``/``tl.where``), no bf16 arithmetic (tiles
are cast to fp32 right after loading), and an explicit round-to-nearest-even
fp32 -> bf16 conversion, because the interpreter *truncates* on ``.to(tl.bfloat16)``
while the GPU rounds to nearest even.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRET_MODE",
    "check_launchable",
    "next_pow2",
    "prepare_out",
    "OUT_DTYPES",
    "round_half_even",
    "quantize_int8_tile",
    "round_fp32_to_bf16",
    "round_to_dtype_code",
    "load_scale",
    "dequantize_reference",
]

# out_dtype argument -> small integer code used as a constexpr by the kernels
# (0: float32, 1: float16, 2: bfloat16).
OUT_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def check_launchable(*tensors: torch.Tensor | None) -> None:
    """Raise a clear error instead of an obscure Triton one for unusable inputs."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on the same device, got {sorted(map(str, devices))}")
    (device,) = devices
    if device.type != "cuda" and not INTERPRET_MODE:
        raise RuntimeError(
            f"archquant.kernels: tensors on {device} need the Triton interpreter; set "
            "TRITON_INTERPRET=1 before importing triton / archquant.kernels, or use CUDA tensors"
        )


def prepare_out(out, shape, dtype, device, name: str, *, contiguous: bool = False):
    """``out`` checked against the expected shape/dtype/device, or a new empty tensor.

    Kernels write through the tensor's strides, so views are fine unless
    ``contiguous`` is required.  Tests pass sentinel-filled buffers here to catch
    elements a kernel forgot to write.
    """
    shape = torch.Size(shape)
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(out, torch.Tensor) or out.shape != shape or out.dtype != dtype:
        raise ValueError(
            f"{name} must be a {dtype} tensor of shape {tuple(shape)}, got "
            f"{getattr(out, 'dtype', type(out))} {tuple(getattr(out, 'shape', ()))}"
        )
    if out.device != torch.device(device):
        raise ValueError(f"{name} is on {out.device}, expected {device}")
    if contiguous and not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return out


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_pow2(v: int, name: str) -> int:
    """``v`` if it is a power of two (a block size), else a ValueError naming it."""
    if v < 1 or v & (v - 1):
        raise ValueError(f"{name}={v} must be a power of two")
    return v


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def round_half_even(v):
    """Round fp32 ``v`` to the nearest integer, ties to even (== ``torch.round``).

    ``v - floor(v)`` is exact in fp32, so the tie test is exact; values with
    ``|v| >= 2**23`` are already integers (frac = 0) and stay unchanged.
    """
    r = tl.floor(v)
    frac = v - r
    half = r * 0.5
    r_is_odd = tl.floor(half) != half
    up = (frac > 0.5) | ((frac == 0.5) & r_is_odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def quantize_int8_tile(y, scale, QMAX: tl.constexpr):
    """int8 codes ``clamp(round_half_even(y / scale), -QMAX, QMAX)``.

    ``tl.div_rn`` is IEEE round-to-nearest division (plain ``/`` lowers to the
    approximate ``div.full.f32`` on NVIDIA), so the codes match
    ``archquant.core.formats`` bit for bit.  ``y`` and ``scale`` must be fp32 and
    broadcast against each other.
    """
    v = tl.div_rn(y, scale)
    r = round_half_even(v)
    r = tl.minimum(tl.maximum(r, -QMAX), QMAX)
    return r.to(tl.int8)


@triton.jit
def round_fp32_to_bf16(y):
    """fp32 -> nearest-even bf16 value, still held in fp32 (exactly representable).

    Integer trick on the bit pattern; NaN is passed through untouched (the carry
    could otherwise turn a NaN into an infinity).  A later ``.to(tl.bfloat16)`` is
    then exact on every backend.
    """
    u = y.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    r = u.to(tl.float32, bitcast=True)
    return tl.where(y != y, y, r)


@triton.jit
def round_to_dtype_code(y, CODE: tl.constexpr):
    """Round fp32 ``y`` to float16 (CODE 1) / bfloat16 (CODE 2) precision, as fp32."""
    if CODE == 1:
        y = y.to(tl.float16).to(tl.float32)
    elif CODE == 2:
        y = round_fp32_to_bf16(y)
    return y


@triton.jit
def load_scale(s_ptr, SCALED: tl.constexpr):
    """A per-tensor scale as fp32, loaded only if the input has one (``SCALED``); otherwise 1.0, a
    placeholder the caller never multiplies by (the pointer may be a dummy tensor)."""
    s = 1.0
    if SCALED:
        s = tl.load(s_ptr).to(tl.float32)
    return s


def dequantize_reference(codes: torch.Tensor, scale) -> torch.Tensor:
    """The references' dequantization: fp32 ``codes * scale``; a float input with scale None is
    just cast to fp32 (int8 codes without a scale are an error)."""
    if scale is None:
        if codes.dtype == torch.int8:
            raise ValueError("int8 codes need a scale (got None)")
        return codes.to(torch.float32)
    return codes.to(torch.float32) * torch.as_tensor(scale, dtype=torch.float32, device=codes.device)


# Whether the kernels of this package were decorated in interpreter mode: that,
# not the current value of the environment variable, decides how they run.
INTERPRET_MODE = type(round_half_even).__name__ == "InterpretedFunction"
