"""The "real" backend: run frozen fake-quant modules on low-bit kernels.

The fake-quant model stays the interchange format (checkpoints, evaluation of accuracy);
``convert_to_real`` turns a quantized model into one whose eligible ``QuantLinear``s compute
with their codes, on the kernel the table of ``dispatch.py`` gives for (weight format,
activation format, device): int8 W8A8 / W8A16 with symmetric or asymmetric weights
(``archquant/kernels/cpu_int8.py`` on the CPU,
the Triton ``w8a8_gemm`` on CUDA), and on CUDA only int4 W4A16 (``w4a16_gemm``), twin-log W4/W3
weights (``twinlog_gemm``, a per-row LUT GEMM; float or fake-quantized int8 inputs) and fp8 W8A8
(``fp8_gemm``):

    model = aq.load_quantized("out/ckpt")
    convert_to_real(model)            # in place; returns the model
    model._archquant_real             # {"converted": n, "blocks": [...], "kept": [(name, reason), ...],
                                      #  "kernels": ..., "paths": {name: kernel}}

Kernels (``kernels=``): ``"auto"`` runs CUDA tensors on the Triton kernels (``archquant/kernels/``) and CPU
tensors on torch's CPU int8 operators (``archquant/kernels/cpu_int8.py``); ``"triton"`` runs the Triton
kernels everywhere, which on a CPU means Triton's interpreter (``TRITON_INTERPRET=1`` set before
anything imports Triton): slow, but the very code that runs on the GPU, so the CUDA path can be
checked against the fake-quant twin on a machine without one.

Families add converters for whole blocks (``register_real_converter``) in their own backend
module, which ``convert_to_real`` imports the first time it meets one of the family's models
(``FAMILY_BACKENDS``): importing a family's adapter or model code loads no kernel. The Mamba
backend (``backends/mamba.py``) turns a Quamba-quantized Mamba1 mixer into one whose conv1d and
selective scan run on int8 codes.

Anything no kernel takes (4-bit weights on a CPU, asymmetric activations, int8 groups, ...) keeps its
fake-quant module, and the summary says why. A real module gives the fake one's outputs up to
fp32 summation order (the int8 products are exact; see ``tests/test_cpu_int8.py`` and
``tests/test_kernels_dispatch.py`` for the tolerances).
"""
from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from ..core.modules import QuantConv1d, QuantLinear, QuantMatmul
from ..core.recipe import get_submodule, set_submodule
from .dispatch import LINEAR_KERNELS, LinearKernel, choose_linear_kernel
from .linear import (REAL_LINEAR_TYPES, RealFP8Linear, RealQuantLinear, RealTwinLogLinear, RealW4A16Linear,
                     real_eligibility)
from .specs import KERNELS, act_kind, check_kernels, is_int8_symmetric, static_scale, use_triton

__all__ = ["FAMILY_BACKENDS", "KERNELS", "LINEAR_KERNELS", "LinearKernel", "RealFP8Linear", "RealQuantLinear",
           "RealTwinLogLinear", "RealW4A16Linear", "act_kind", "check_kernels", "choose_linear_kernel",
           "convert_to_real", "is_int8_symmetric", "load_family_backends", "real_eligibility",
           "register_family_backend", "register_real_converter", "static_scale", "use_triton"]


#: (module type, converter): converter(module, kernels) returns the real module, a string saying
#: why this module stays as it is (its Linears are then converted one by one), or None to leave
#: the module to the converters of its children
_CONVERTERS: list[tuple[type, Callable[[nn.Module, str], "nn.Module | str"]]] = []


def register_real_converter(module_type: type):
    """Decorator for a family's block converter (e.g. a whole Mamba mixer onto int8 kernels)."""
    def deco(fn):
        _CONVERTERS.append((module_type, fn))
        return fn
    return deco


#: model-code module -> the backend module holding its family's block converters; imported on
#: demand by ``convert_to_real`` (a model is matched through the classes its modules derive from)
FAMILY_BACKENDS: dict[str, str] = {"archquant.models.mamba": "archquant.backends.mamba",
                                   "archquant.models.vggt.layers": "archquant.backends.vggt"}


def register_family_backend(model_module: str, backend_module: str) -> None:
    """Let ``convert_to_real`` import ``backend_module`` (its ``register_real_converter`` calls)
    for models with modules defined in ``model_module``."""
    FAMILY_BACKENDS[model_module] = backend_module


def load_family_backends(model: nn.Module) -> list[str]:
    """Import the backend modules of the families ``model`` is built from; returns their names."""
    wanted = {FAMILY_BACKENDS[cls.__module__] for m in model.modules() for cls in type(m).__mro__
              if cls.__module__ in FAMILY_BACKENDS}
    for name in sorted(wanted):
        importlib.import_module(name)
    return sorted(wanted)


def _block_converter(module: nn.Module):
    for module_type, fn in _CONVERTERS:
        if isinstance(module, module_type):
            return fn
    return None


def _summary(converted: int, blocks: list, kept: list, kernels: str, paths: dict) -> dict:
    return {"converted": converted, "blocks": blocks, "kept": kept, "kernels": kernels, "paths": paths}


def convert_to_real(model: nn.Module, kernels: str = "auto") -> nn.Module:
    """Swap the eligible quantized modules of ``model`` for real ones, in place.

    Registered block converters go first (a converted block takes its Linears with it); then
    every remaining ``QuantLinear`` the kernel table takes becomes its real module. Returns
    ``model`` (or the new module, if ``model`` is itself a QuantLinear);
    ``model._archquant_real`` holds the summary ``{"converted": n, "blocks": [names],
    "kept": [(name, reason), ...], "kernels": kernels, "paths": {name: kernel}}`` (converted:
    real Linears, those inside converted blocks included; kept: quantized modules left as
    fake-quant, and blocks whose inner ops could not go real; paths: the kernel of each
    converted Linear, or the real type of each converted block).
    """
    check_kernels(kernels)
    load_family_backends(model)
    kept, blocks, paths = [], [], {}
    for name, module in list(model.named_modules()):
        fn = _block_converter(module)
        if fn is None or not name:
            continue
        if any(name.startswith(b + ".") for b in blocks):
            continue
        result = fn(module, kernels)
        if result is None:  # not this converter's business (an inner converter may still apply)
            continue
        if isinstance(result, str):
            kept.append((name, result))
            continue
        set_submodule(model, name, result)
        blocks.append(name)
        paths[name] = type(result).__name__
    converted = sum(isinstance(m, REAL_LINEAR_TYPES) for b in blocks for m in get_submodule(model, b).modules())
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            choice = choose_linear_kernel(module, kernels)
            if isinstance(choice, str):
                kept.append((name, choice))
                continue
            real = choice.build(module, kernels)
            if not name:  # the model is itself a QuantLinear
                real._archquant_real = _summary(1, [], [], kernels, {"": choice.description})
                return real
            set_submodule(model, name, real)
            paths[name] = choice.description
            converted += 1
        elif isinstance(module, (QuantConv1d, QuantMatmul)):
            kept.append((name, f"{type(module).__name__}: no real kernel, stays fake-quant"))
    model._archquant_real = _summary(converted, blocks, kept, kernels, paths)
    return model
