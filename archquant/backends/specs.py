"""What the real backend reads off fake-quant modules: kernel choice, format names, activation kinds.

Small helpers shared by the real modules (``linear.py``), the kernel table (``dispatch.py``) and
the family backends (``mamba.py``); nothing here imports a kernel.
"""
from __future__ import annotations

import torch

from ..core.formats import QuantSpec
from ..core.modules import ActQuantizer

__all__ = ["KERNELS", "act_kind", "check_kernels", "format_label", "input_kind", "is_int8_symmetric",
           "learned_clip_note", "spec_name", "static_scale", "use_triton"]

#: ``kernels=`` choices: "auto" (Triton for CUDA tensors, torch's CPU int8 ops for CPU ones) or
#: "triton" (the Triton kernels everywhere; on a CPU through TRITON_INTERPRET=1)
KERNELS = ("auto", "triton")


def check_kernels(kernels: str) -> str:
    """Validate a ``kernels=`` choice; "triton" on a machine without CUDA needs the interpreter."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r} not allowed: one of {', '.join(KERNELS)}")
    if kernels == "triton" and not torch.cuda.is_available():
        from ..kernels._triton_utils import INTERPRET_MODE

        if not INTERPRET_MODE:
            raise ValueError("kernels='triton' without CUDA needs Triton's interpreter: set TRITON_INTERPRET=1 "
                             "before starting Python")
    return kernels


def use_triton(kernels: str, x: torch.Tensor) -> bool:
    """Whether a real module runs ``x`` on the Triton kernels (CUDA, or forced)."""
    return x.is_cuda or kernels == "triton"


def static_scale(q: ActQuantizer) -> torch.Tensor:
    """The frozen scale of a static quantizer."""
    return q.params.as_dict()["scale"]


def is_int8_symmetric(spec: QuantSpec) -> bool:
    return spec.format == "int" and spec.bits == 8 and spec.symmetric


def format_label(spec: QuantSpec) -> str:
    """The number format alone: "int8", "int4 asymmetric", "fp8_e4m3", ... (a key of the kernel table)."""
    fmt = f"int{spec.bits}" if spec.format == "int" else spec.format
    return fmt if spec.symmetric or spec.format != "int" else f"{fmt} asymmetric"


def spec_name(spec: QuantSpec) -> str:
    """Format and granularity, for messages: "int4 asymmetric channel", "fp8_e4m3 token", ..."""
    return f"{format_label(spec)} {spec.granularity}"


def learned_clip_note(q: ActQuantizer | None) -> str:
    """The words a refusal adds for a quantizer with a learned clip ratio (no kernel applies one), else ""."""
    return f" with a learned clip ({q.clip_ratio:.3f})" if q is not None and q.clip_ratio != 1.0 else ""


def input_kind(q: ActQuantizer | None) -> str | None:
    """How a kernel can quantize this activation, whatever its format: "dynamic_token",
    "dynamic_tensor", "static_tensor", or None (no quantizer, not quantizing, other granularity)."""
    if q is None or q.mode != "quantize":
        return None
    if q.dynamic:
        if q.clip_ratio != 1.0:  # no kernel shrinks the per-token range: the module stays fake-quant
            return None
        return {"token": "dynamic_token", "tensor": "dynamic_tensor"}.get(q.spec.granularity)
    if q.spec.granularity == "tensor" and "scale" in q.params.as_dict():
        return "static_tensor"
    return None


def act_kind(q: ActQuantizer | None) -> str | None:
    """:func:`input_kind` of a symmetric int8 quantizer (what the int8 kernels read), else None."""
    return input_kind(q) if q is not None and is_int8_symmetric(q.spec) else None
