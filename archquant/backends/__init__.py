"""Real-quant execution: fake-quant modules swapped for low-bit kernels (``convert_to_real``).

``real``: the conversion, the kernel table and the block-converter registry; family backends
(``mamba``) are imported by the conversion when it meets one of their models, so importing this
package loads no Triton kernel.
"""
from .real import (KERNELS, RealQuantLinear, check_kernels, convert_to_real, real_eligibility,
                   register_family_backend, register_real_converter)

__all__ = ["KERNELS", "RealQuantLinear", "check_kernels", "convert_to_real", "real_eligibility",
           "register_family_backend", "register_real_converter"]
