"""The "real" backend: run frozen fake-quant int8 Linears with int8 arithmetic.

The fake-quant model stays the interchange format (checkpoints, evaluation of accuracy);
``convert_to_real`` turns a quantized model into one whose eligible ``QuantLinear``s compute
with int8 codes (``kernels/cpu_int8.py`` on the CPU, the Triton ``w8a8_gemm`` on CUDA):

    model = aq.load_quantized("out/ckpt")
    convert_to_real(model)            # in place; returns the model
    model._archquant_real             # {"converted": n, "kept": [(name, reason), ...], "kernels": ...}

Kernels (``kernels=``): ``"auto"`` runs CUDA tensors on the Triton kernels (``kernels/``) and CPU
tensors on torch's CPU int8 operators (``kernels/cpu_int8.py``); ``"triton"`` runs the Triton
kernels everywhere, which on a CPU means Triton's interpreter (``TRITON_INTERPRET=1`` set before
anything imports Triton): slow, but the very code that runs on the GPU, so the CUDA path can be
checked against the fake-quant twin on a machine without one.

Families add converters for whole blocks (``register_real_converter``) in their own backend
module, which ``convert_to_real`` imports the first time it meets one of the family's models
(``FAMILY_BACKENDS``): importing a family's adapter or model code loads no kernel. The Mamba
backend (``backends/mamba.py``) turns a Quamba-quantized Mamba1 mixer into one whose conv1d and
selective scan run on int8 codes.

Eligible: weight int8 symmetric, per tensor or per output channel, frozen; input quantizer
int8 symmetric, dynamic per token / per tensor or static per tensor (frozen), or none
(weight-only). Anything else (4-bit, fp8, asymmetric, groups, …) keeps its fake-quant module,
and the summary says why. A real module gives the fake one's outputs up to fp32 summation
order (the int8 products are exact; see ``tests/test_cpu_int8.py`` for the tolerances).
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

from ..core.formats import QuantSpec
from ..core.modules import ActQuantizer, QuantConv1d, QuantLinear, QuantMatmul
from ..core.recipe import get_submodule, set_submodule
from ..core.transforms import HadamardTransform
from ..kernels.cpu_int8 import (Int8Weight, fake_quantize_int8_torch, int8_linear, int8_linear_dynamic,
                               int8_weight_only_linear,
                               quantize_per_tensor_int8_torch, quantize_per_token_int8_torch,
                               quantize_static_int8_torch)

__all__ = ["FAMILY_BACKENDS", "KERNELS", "RealQuantLinear", "act_kind", "check_kernels", "convert_to_real",
           "is_int8_symmetric", "load_family_backends", "real_eligibility", "register_family_backend",
           "register_real_converter", "static_scale", "use_triton"]

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


def _spec_name(spec: QuantSpec) -> str:
    fmt = f"int{spec.bits}" if spec.format == "int" else spec.format
    return f"{fmt}{'' if spec.symmetric else ' asymmetric'} {spec.granularity}"


def act_kind(q: ActQuantizer | None) -> str | None:
    """How int8 kernels quantize this activation: "dynamic_token", "dynamic_tensor",
    "static_tensor", or None if they cannot (or there is no quantizer)."""
    if q is None or not is_int8_symmetric(q.spec) or q.mode != "quantize":
        return None
    if q.dynamic:
        return {"token": "dynamic_token", "tensor": "dynamic_tensor"}.get(q.spec.granularity)
    if q.spec.granularity == "tensor" and "scale" in q.params.as_dict():
        return "static_tensor"
    return None


def real_eligibility(module: nn.Module) -> str | None:
    """None if ``module`` can become a :class:`RealQuantLinear`, else the reason it cannot."""
    if not isinstance(module, QuantLinear):
        return f"{type(module).__name__}: no real kernel, stays fake-quant"
    spec = module.weight_spec
    if spec is None:
        return "weight not quantized"
    if not module.frozen:
        return "weight not frozen"
    if not is_int8_symmetric(spec):
        return f"weight {_spec_name(spec)}: only symmetric int8 weights run on int8 kernels"
    if spec.granularity not in ("tensor", "channel") or (spec.granularity == "channel" and spec.axis % 2 != 0):
        return f"weight granularity {spec.granularity!r} (axis {spec.axis}): needs per tensor or per output channel"
    q = module.input_quantizer
    if q is not None and act_kind(q) is None:
        kind = "dynamic" if q.dynamic else f"static (mode {q.mode})"
        return f"input {_spec_name(q.spec)} {kind}: needs symmetric int8, dynamic per token/tensor or static per tensor"
    return None


class RealQuantLinear(nn.Module):
    """int8 twin of a frozen ``QuantLinear``: y = Q_out(int8_linear(Q_in(T(x)), W_q)).

    Holds the int8 codes (``weight_q``, (N, K)) and fp32 scale (``weight_scale``, 1 or N
    values) as buffers, reuses the fake module's online transform and quantizers (their
    specs and frozen static scales), and computes in int8: W8A8 through ``int8_linear``,
    weight-only through ``int8_weight_only_linear``. The output quantizer, if any, is
    applied as in the fake module (fake-quant of the result; for int8 quantizers through
    ``fake_quantize_int8_torch``, the same values in fewer tensor ops).
    """

    def __init__(self, qlinear: QuantLinear, kernels: str = "auto") -> None:
        super().__init__()
        reason = real_eligibility(qlinear)
        if reason is not None:
            raise ValueError(f"cannot convert to a real int8 Linear: {reason}")
        self.kernels = check_kernels(kernels)
        self.in_features, self.out_features = qlinear.in_features, qlinear.out_features
        self.register_buffer("weight_q", qlinear.weight_codes.detach().contiguous())
        scale = qlinear.weight_params.as_dict()["scale"].detach().to(torch.float32).reshape(-1)
        self.register_buffer("weight_scale", scale.clone())
        self.register_buffer("bias", None if qlinear.bias is None else qlinear.bias.detach().clone())
        self.input_transform = qlinear.input_transform
        self.input_quantizer = qlinear.input_quantizer
        self.output_quantizer = qlinear.output_quantizer
        self.act_kind = "weight_only" if qlinear.input_quantizer is None else act_kind(qlinear.input_quantizer)
        # int8 output quantizers take a shorter, bit-identical fake-quant (others run their module)
        self.out_kind = None if qlinear.output_quantizer is None else act_kind(qlinear.output_quantizer)
        self._packed: Int8Weight | None = None

    @classmethod
    def from_quant_linear(cls, qlinear: QuantLinear, kernels: str = "auto") -> "RealQuantLinear":
        return cls(qlinear, kernels)

    def _apply(self, fn, *args, **kwargs):
        self._packed = None  # packings follow the buffers (device/dtype moves)
        return super()._apply(fn, *args, **kwargs)

    @property
    def packed(self) -> Int8Weight:
        if self._packed is None:
            self._packed = Int8Weight(self.weight_q, self.weight_scale)
        return self._packed

    def _fused_hadamard(self) -> HadamardTransform | None:
        """The online Hadamard the Triton path fuses with the quantization, if it can."""
        t = self.input_transform
        if (isinstance(t, HadamardTransform) and t.block is None and t.size == self.in_features
                and self.act_kind in ("dynamic_token", "static_tensor")):
            return t
        return None

    def quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 codes and scale of the rows x2 (M, K): online transform, then the input quantizer.

        On the Triton path an online Hadamard and the quantization run as one kernel
        (``kernels/hadamard_quant.py``, the same matrices as the offline fusion)."""
        if use_triton(self.kernels, x2):
            from ..kernels.quantize import quantize_per_token_int8, quantize_static_int8

            had = self._fused_hadamard()
            if had is not None:
                from ..kernels.hadamard_quant import hadamard_quant_int8

                scale = static_scale(self.input_quantizer) if self.act_kind == "static_tensor" else None
                return hadamard_quant_int8(x2, scale, signs=had.signs)
            if self.input_transform is not None:
                x2 = self.input_transform(x2)
            if self.act_kind == "dynamic_token":
                return quantize_per_token_int8(x2)
            if self.act_kind == "static_tensor":
                scale = static_scale(self.input_quantizer)
                return quantize_static_int8(x2, scale), scale
            return quantize_per_tensor_int8_torch(x2)
        if self.input_transform is not None:
            x2 = self.input_transform(x2)
        if self.act_kind == "dynamic_token":
            return quantize_per_token_int8_torch(x2)
        if self.act_kind == "dynamic_tensor":
            return quantize_per_tensor_int8_torch(x2)
        scale = static_scale(self.input_quantizer)
        return quantize_static_int8_torch(x2, scale), scale

    def matmul_codes(self, x_q: torch.Tensor, x_scale, out_dtype: torch.dtype) -> torch.Tensor:
        """``(x_q @ W_q.T) * x_scale * w_scale + bias`` for int8 rows x_q (M, K): the GEMM alone,
        for callers that already hold codes (e.g. a Mamba mixer's x_proj input)."""
        path = "triton" if use_triton(self.kernels, x_q) else None
        return int8_linear(x_q, self.packed, x_scale, bias=self.bias, out_dtype=out_dtype, path=path)

    def matmul_requant(self, x_q: torch.Tensor, x_scale, out_scale: torch.Tensor,
                       round_to: torch.dtype) -> torch.Tensor:
        """int8 codes of ``matmul_codes(x_q, x_scale, round_to)`` requantized with the static
        per-tensor ``out_scale``: on the Triton path one kernel (the GEMM's epilogue writes the
        codes, bit for bit what the two steps give), elsewhere the GEMM then a quantize pass."""
        if use_triton(self.kernels, x_q):
            from ..kernels.w8a8_gemm import w8a8_gemm

            return w8a8_gemm(x_q, self.weight_q, x_scale, self.weight_scale, self.bias, out_dtype=torch.int8,
                             out_scale=out_scale, round_to=round_to)
        return quantize_static_int8_torch(self.matmul_codes(x_q, x_scale, round_to), out_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.act_kind == "weight_only":
            if self.input_transform is not None:
                x2 = self.input_transform(x2)
            y = int8_weight_only_linear(x2, self.packed, bias=self.bias)
        elif self.act_kind == "dynamic_token" and not use_triton(self.kernels, x2):
            # CPU: quantize + GEMM + epilogue in one call (same bits, fewer small ops at M = 1)
            if self.input_transform is not None:
                x2 = self.input_transform(x2)
            y = int8_linear_dynamic(x2, self.packed, bias=self.bias, out_dtype=x.dtype)
        else:
            x_q, x_scale = self.quantize_input(x2)
            y = self.matmul_codes(x_q, x_scale, x.dtype)
        y = y.reshape(*lead, self.out_features)
        if self.output_quantizer is None:
            return y
        if self.out_kind is None:
            return self.output_quantizer(y)
        scale = static_scale(self.output_quantizer) if self.out_kind == "static_tensor" else None
        return fake_quantize_int8_torch(y, scale, per_token=self.out_kind == "dynamic_token")

    def extra_repr(self) -> str:
        w = "per-channel" if self.weight_scale.numel() > 1 else "per-tensor"
        return (f"in={self.in_features}, out={self.out_features}, weight=int8/{w}, input={self.act_kind}, "
                f"kernels={self.kernels}")


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
FAMILY_BACKENDS: dict[str, str] = {"archquant.models.mamba": "archquant.backends.mamba"}


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


def convert_to_real(model: nn.Module, kernels: str = "auto") -> nn.Module:
    """Swap the eligible quantized modules of ``model`` for real int8 ones, in place.

    Registered block converters go first (a converted block takes its Linears with it); then
    every remaining eligible ``QuantLinear`` becomes a :class:`RealQuantLinear`. Returns
    ``model`` (or the new module, if ``model`` is itself a QuantLinear);
    ``model._archquant_real`` holds the summary ``{"converted": n, "blocks": [names],
    "kept": [(name, reason), ...], "kernels": kernels}`` (kept: quantized modules left as
    fake-quant, and blocks whose inner ops could not go real).
    """
    check_kernels(kernels)
    load_family_backends(model)
    converted, kept, blocks = 0, [], []
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
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            reason = real_eligibility(module)
            if reason is None:
                real = RealQuantLinear(module, kernels)
                if not name:  # the model is itself a QuantLinear
                    real._archquant_real = {"converted": 1, "blocks": [], "kept": [], "kernels": kernels}
                    return real
                set_submodule(model, name, real)
                converted += 1
                continue
            kept.append((name, reason))
        elif isinstance(module, (QuantConv1d, QuantMatmul)):
            kept.append((name, real_eligibility(module)))
    converted += sum(isinstance(m, RealQuantLinear) for b in blocks for m in get_submodule(model, b).modules())
    model._archquant_real = {"converted": converted, "blocks": blocks, "kept": kept, "kernels": kernels}
    return model
