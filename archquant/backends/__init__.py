"""Real-quant execution: fake-quant modules swapped for low-bit kernels (``convert_to_real``).

``real``: the conversion and the block-converter registry; ``dispatch``: the kernel table
((weight format, activation format, device) -> real module); ``linear``: the real Linears;
``specs``: what the backend reads off quantizers. Family backends (``mamba``) are imported by the
conversion when it meets one of their models, so importing this package loads no Triton kernel.
"""
from .dispatch import LINEAR_KERNELS, choose_linear_kernel
from .linear import RealFP8Linear, RealQuantLinear, RealTwinLogLinear, RealW4A16Linear, real_eligibility
from .real import convert_to_real, register_family_backend, register_real_converter
from .specs import KERNELS, check_kernels

__all__ = ["KERNELS", "LINEAR_KERNELS", "RealFP8Linear", "RealQuantLinear", "RealTwinLogLinear", "RealW4A16Linear",
           "check_kernels", "choose_linear_kernel", "convert_to_real", "real_eligibility", "register_family_backend",
           "register_real_converter"]
