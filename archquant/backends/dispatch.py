"""The kernel table: which real module (and kernel) a frozen fake-quant Linear becomes.

Key: (weight format, activation format, device), with formats as :func:`~.specs.format_label`
writes them ("int8", "int4", "fp8_e4m3", "int8 asymmetric", ...; activation "none" = float
input, weight-only) and device "cpu" or "cuda". ``kernels="triton"`` looks up the "cuda" row on
any device: the Triton kernels are the CUDA path, which on a CPU runs in Triton's interpreter.
The device is the one the module's codes are on at conversion (convert where the model runs).

A row's ``layout`` check says what else that kernel needs (granularities, activation kinds);
a module no row takes stays fake-quant, and :func:`choose_linear_kernel` says why: the
combination has a kernel on another device only ("fp8_e4m3 W8A8: no CPU kernel; kept in fake
quant"), none at all, or the row's check fails.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..core.modules import QuantLinear
from .linear import (RealFP8Linear, RealQuantLinear, RealTwinLogLinear, RealW4A16Linear, fp8_layout,
                     frozen_quant_linear, int8_layout, twinlog_layout, w4a16_layout)
from .specs import format_label, spec_name

__all__ = ["DEVICES", "LINEAR_KERNELS", "LinearKernel", "choose_linear_kernel", "kernel_device", "linear_key"]

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class LinearKernel:
    """One row of the table: ``label`` names the scheme ("int8 W8A8"), ``runs_on`` the kernel;
    ``build(qlinear, kernels)`` makes the real module; ``layout(qlinear)`` is None when the module
    fits the kernel, else the reason it does not."""

    label: str
    runs_on: str
    build: Callable[[QuantLinear, str], nn.Module]
    layout: Callable[[QuantLinear], "str | None"]

    @property
    def description(self) -> str:
        return f"{self.label} on {self.runs_on}"


_CPU_INT8 = "torch CPU int8 ops (archquant/kernels/cpu_int8.py)"
_W8A8 = "Triton w8a8_gemm (archquant/kernels/w8a8_gemm.py)"
_FP8 = "Triton fp8_gemm (archquant/kernels/w8a8_gemm.py)"
_TWINLOG = "Triton twinlog_gemm (archquant/kernels/twinlog_gemm.py)"

#: (weight format, activation format, device) -> kernel
LINEAR_KERNELS: dict[tuple[str, str, str], LinearKernel] = {
    ("int8", "int8", "cpu"): LinearKernel("int8 W8A8", _CPU_INT8, RealQuantLinear, int8_layout),
    ("int8", "int8", "cuda"): LinearKernel("int8 W8A8", _W8A8, RealQuantLinear, int8_layout),
    ("int8", "none", "cpu"): LinearKernel("int8 W8A16", _CPU_INT8, RealQuantLinear, int8_layout),
    ("int8", "none", "cuda"): LinearKernel("int8 W8A16", "int8 weights dequantized for torch's matmul",
                                           RealQuantLinear, int8_layout),
    # asymmetric int8 weights (MambaQuant's): the same GEMMs, minus rowsum(x_q) * zero point
    ("int8 asymmetric", "int8", "cpu"): LinearKernel("int8 W8A8 (asymmetric weights)", _CPU_INT8, RealQuantLinear,
                                                     int8_layout),
    ("int8 asymmetric", "int8", "cuda"): LinearKernel("int8 W8A8 (asymmetric weights)", _W8A8, RealQuantLinear,
                                                      int8_layout),
    ("int8 asymmetric", "none", "cpu"): LinearKernel("int8 W8A16 (asymmetric weights)", _CPU_INT8, RealQuantLinear,
                                                     int8_layout),
    ("int8 asymmetric", "none", "cuda"): LinearKernel("int8 W8A16 (asymmetric weights)",
                                                      "int8 weights dequantized for torch's matmul", RealQuantLinear,
                                                      int8_layout),
    ("int4", "none", "cuda"): LinearKernel("int4 W4A16", "Triton w4a16_gemm (archquant/kernels/w4a16_gemm.py)",
                                           RealW4A16Linear, w4a16_layout),
    # twin-log (LRQ-DiT's TLQ) codes of <= 4 bits, nibble-packed: a per-row level table gathered in the GEMM
    ("twinlog", "none", "cuda"): LinearKernel("twinlog W4A16/W3A16 LUT GEMM", _TWINLOG, RealTwinLogLinear,
                                              twinlog_layout),
    # LRQ-DiT's W4A8: the fake int8 input quantizer runs as it is (torch), then the same LUT GEMM
    ("twinlog", "int8", "cuda"): LinearKernel("twinlog W4A8/W3A8 LUT GEMM, int8 activations fake-quantized to float "
                                              "(real weights only)", _TWINLOG, RealTwinLogLinear, twinlog_layout),
    ("fp8_e4m3", "fp8_e4m3", "cuda"): LinearKernel("fp8_e4m3 W8A8", _FP8, RealFP8Linear, fp8_layout),
    ("fp8_e5m2", "fp8_e5m2", "cuda"): LinearKernel("fp8_e5m2 W8A8", _FP8, RealFP8Linear, fp8_layout),
}


def linear_key(module: QuantLinear) -> tuple[str, str]:
    """(weight format, activation format) of a quantized Linear."""
    q = module.input_quantizer
    return format_label(module.weight_spec), "none" if q is None else format_label(q.spec)


def kernel_device(module: QuantLinear, kernels: str) -> str:
    """The table's device for ``module``: where its codes are, "cuda" when Triton is forced."""
    return "cuda" if kernels == "triton" or module.weight_codes.is_cuda else "cpu"


def choose_linear_kernel(module: nn.Module, kernels: str) -> LinearKernel | str:
    """The table row ``module`` runs on, or why it stays fake-quant (one line)."""
    reason = frozen_quant_linear(module)
    if reason is not None:
        return reason
    weight, act = linear_key(module)
    device = kernel_device(module, kernels)
    row = LINEAR_KERNELS.get((weight, act, device))
    if row is None:
        elsewhere = [(d, k) for d in DEVICES if d != device and (k := LINEAR_KERNELS.get((weight, act, d)))]
        if elsewhere:
            return f"{elsewhere[0][1].label}: no {device.upper()} kernel; kept in fake quant"
        q = module.input_quantizer
        inp = "float input" if q is None else f"input {spec_name(q.spec)}"
        return (f"weight {spec_name(module.weight_spec)}, {inp}: no real kernel for this combination; kept in "
                f"fake quant (kernels: {', '.join(sorted({k.label for k in LINEAR_KERNELS.values()}))})")
    reason = row.layout(module)
    return row if reason is None else reason
