"""Real twins of a frozen ``QuantLinear``: int8 (W8A8 / W8A16), int4 W4A16, twin-log W4/W3 and fp8 W8A8.

Each holds the fake module's codes as they are stored (no requantization), reuses its online
transform and activation quantizers (specs and frozen static scales), and runs one kernel path:

* :class:`RealQuantLinear`: int8 codes; W8A8 through ``archquant/kernels/cpu_int8.py`` on the CPU and the
  Triton ``w8a8_gemm`` on CUDA (or forced); weight-only through ``int8_weight_only_linear``.
* :class:`RealW4A16Linear`: the fake module's packed int4 codes (two per byte, compressed-tensors'
  layout, which is the kernel's) and group scales, Triton ``w4a16_gemm``.
* :class:`RealTwinLogLinear`: the fake module's packed twin-log codes (W4 / W3 / W2, two per byte)
  and a per-row table of their levels, Triton ``twinlog_gemm`` (a LUT-dequantization GEMM);
  weight-only, or behind the fake module's own int8 input quantizer (activations fake-quantized
  to float: the weights are real, the int8 activation arithmetic is not).
* :class:`RealFP8Linear`: fp8 weight codes; the input quantized to fp8 by the core's own
  quantizer (torch ops on the device: no fp8 quantize kernel exists), Triton ``fp8_gemm``.

Which module a fake one becomes is the kernel table's decision (``dispatch.py``); the
``*_eligibility`` functions here say what each module can take.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..core import formats
from ..core.modules import QuantLinear
from ..core.ars import ChainTransform
from ..core.transforms import ChannelScale, HadamardTransform
from ..kernels.cpu_int8 import (Int8Weight, fake_quantize_int8_torch, int8_linear, int8_linear_dynamic,
                                int8_weight_only_linear, quantize_per_tensor_int8_torch, signed_asymmetric_codes,
                                quantize_per_token_int8_torch, quantize_static_int8_torch)
from .specs import (act_kind, check_kernels, format_label, input_kind, learned_clip_note, spec_name, static_scale,
                    use_triton)

__all__ = ["INT8_INPUT_PATHS", "Int8InputPath", "REAL_LINEAR_TYPES", "RealFP8Linear", "RealQuantLinear",
           "RealTwinLogLinear", "RealW4A16Linear", "fp8_eligibility", "frozen_quant_linear", "int8_eligibility",
           "real_eligibility", "twinlog_eligibility", "w4a16_eligibility"]


# ----------------------------------------------------------------------------------------
# eligibility
# ----------------------------------------------------------------------------------------


def frozen_quant_linear(module: nn.Module) -> str | None:
    """None if ``module`` is a frozen ``QuantLinear`` with a quantized weight, else why not."""
    if not isinstance(module, QuantLinear):
        return f"{type(module).__name__}: no real kernel, stays fake-quant"
    if module.weight_spec is None:
        return "weight not quantized"
    if not module.frozen:
        return "weight not frozen"
    return None


def _per_output_channel(spec) -> bool:
    """Per tensor, or per output channel of the (N, K) weight (axis 0; -2 is the same axis)."""
    return spec.granularity == "tensor" or (spec.granularity == "channel" and spec.axis % 2 == 0)


def int8_layout(module: QuantLinear) -> str | None:
    """What the int8 kernels need beyond a symmetric int8 weight: per tensor / per output channel
    scales, and an input that is float (weight-only) or symmetric int8 dynamic per token / tensor
    or static per tensor."""
    spec = module.weight_spec
    if not _per_output_channel(spec):
        return f"weight granularity {spec.granularity!r} (axis {spec.axis}): needs per tensor or per output channel"
    q = module.input_quantizer
    if q is not None and act_kind(q) is None:
        kind = ("dynamic" if q.dynamic else f"static (mode {q.mode})") + learned_clip_note(q)
        return f"input {spec_name(q.spec)} {kind}: needs symmetric int8, dynamic per token/tensor or static per tensor"
    return None


def int8_eligibility(module: nn.Module) -> str | None:
    """None if ``module`` can become a :class:`RealQuantLinear`, else the reason it cannot."""
    reason = frozen_quant_linear(module)
    if reason is not None:
        return reason
    spec = module.weight_spec
    if not (spec.format == "int" and spec.bits == 8):
        return f"weight {spec_name(spec)}: only int8 weights (symmetric or asymmetric) run on int8 kernels"
    return int8_layout(module)


#: the name older code imports (``archquant.real.real_eligibility``): the int8 module's eligibility
real_eligibility = int8_eligibility


def w4a16_layout(module: QuantLinear) -> str | None:
    """What ``w4a16_gemm`` needs beyond a symmetric int4 weight and a float input."""
    spec = module.weight_spec
    g = spec.group_size
    if spec.granularity != "group" or g < 32 or g & (g - 1):
        return (f"weight {spec_name(spec)} (group size {g}): W4A16 needs group scales along K, "
                "a power-of-two group size >= 32")
    if not module.weight_packed:  # packed whenever K is even, which a group size >= 32 implies
        return "weight codes are not packed two per byte"
    return None


def w4a16_eligibility(module: nn.Module) -> str | None:
    """None if ``module`` can become a :class:`RealW4A16Linear`, else the reason it cannot."""
    reason = frozen_quant_linear(module)
    if reason is not None:
        return reason
    spec = module.weight_spec
    if not (spec.format == "int" and spec.bits == 4 and spec.symmetric):
        return f"weight {spec_name(spec)}: W4A16 needs symmetric int4 weights"
    if module.input_quantizer is not None:
        return f"input quantized ({spec_name(module.input_quantizer.spec)}): W4A16 takes float activations"
    return w4a16_layout(module)


def twinlog_layout(module: QuantLinear) -> str | None:
    """What ``twinlog_gemm`` needs beyond a twin-log weight: its codes packed two per byte."""
    if module.weight_packed:
        return None
    bits = module.weight_spec.bits
    why = (f"{bits}-bit codes are stored one per byte" if bits > 4
           else f"codes are not packed (in_features={module.in_features} is odd)")
    return f"weight twinlog {bits}-bit: {why}; the LUT GEMM takes nibble-packed codes (<= 4 bits, even K)"


def twinlog_eligibility(module: nn.Module) -> str | None:
    """None if ``module`` can become a :class:`RealTwinLogLinear`, else the reason it cannot."""
    reason = frozen_quant_linear(module)
    if reason is not None:
        return reason
    spec, q = module.weight_spec, module.input_quantizer
    if spec.format != "twinlog":
        return f"weight {spec_name(spec)}: the LUT GEMM needs twin-log weights"
    if q is not None and format_label(q.spec) != "int8":
        return (f"input {spec_name(q.spec)}: the twin-log LUT GEMM takes float activations, or int8 ones "
                "fake-quantized to float")
    return twinlog_layout(module)


def fp8_layout(module: QuantLinear) -> str | None:
    """What ``fp8_gemm`` needs beyond fp8 weight and input of one format: per tensor / per output
    channel weight scales, an input quantized dynamic per token / tensor or static per tensor."""
    spec = module.weight_spec
    if not _per_output_channel(spec):
        return f"weight granularity {spec.granularity!r} (axis {spec.axis}): needs per tensor or per output channel"
    q = module.input_quantizer
    if input_kind(q) is None:
        return f"input {spec_name(q.spec)}{learned_clip_note(q)}: needs dynamic per token/tensor or static per tensor scales"
    return None


def fp8_eligibility(module: nn.Module) -> str | None:
    """None if ``module`` can become a :class:`RealFP8Linear`, else the reason it cannot."""
    reason = frozen_quant_linear(module)
    if reason is not None:
        return reason
    spec, q = module.weight_spec, module.input_quantizer
    if spec.format not in ("fp8_e4m3", "fp8_e5m2"):
        return f"weight {spec_name(spec)}: fp8 W8A8 needs fp8 weights"
    if q is None or q.spec.format != spec.format:
        return f"input {'float' if q is None else spec_name(q.spec)}: fp8 W8A8 needs {spec.format} activations"
    return fp8_layout(module)


def _output(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The fake module's output quantizer on ``y``: int8 ones (``module.out_kind``) through the
    shorter, bit-identical ``fake_quantize_int8_torch``, others run their module."""
    q, kind = module.output_quantizer, module.out_kind
    if q is None:
        return y
    if kind is None:
        return q(y)
    return fake_quantize_int8_torch(y, static_scale(q) if kind == "static_tensor" else None,
                                    per_token=kind == "dynamic_token")


# ----------------------------------------------------------------------------------------
# int8
# ----------------------------------------------------------------------------------------


def _torch_per_token(x2, scale):
    return quantize_per_token_int8_torch(x2)


def _torch_per_tensor(x2, scale):
    return quantize_per_tensor_int8_torch(x2)


def _torch_static(x2, scale):
    return quantize_static_int8_torch(x2, scale), scale


def _triton_per_token(x2, scale):
    from ..kernels.quantize import quantize_per_token_int8

    return quantize_per_token_int8(x2)


def _triton_static(x2, scale):
    from ..kernels.quantize import quantize_static_int8

    return quantize_static_int8(x2, scale), scale


def _weight_only(x2, w, bias, out_dtype, path):
    # the Triton path is the CUDA one: dequantize and matmul (no int8 x float kernel)
    return int8_weight_only_linear(x2, w, bias=bias, path="dequant" if path == "triton" else None)


def _dynamic_cpu(x2, w, bias, out_dtype, path):
    # quantize + GEMM + epilogue in one call (same bits, fewer small ops at M = 1)
    return int8_linear_dynamic(x2, w, bias=bias, out_dtype=out_dtype)


@dataclass(frozen=True)
class Int8InputPath:
    """How a :class:`RealQuantLinear` takes its float input rows on one path.

    ``quantize(rows, static scale or None) -> (codes, scale)`` of the transformed rows (None:
    weight-only); ``linear(rows, Int8Weight, bias, out_dtype, path) -> y``, the whole Linear in
    one call where the path has one; ``fuses_hadamard``: the quantize kernel can apply a
    full-width online Hadamard itself (``archquant/kernels/hadamard_quant.py``)."""

    quantize: Callable | None
    linear: Callable | None = None
    fuses_hadamard: bool = False


#: (activation kind, path) -> input path; path "torch" (CPU tensors, kernels="auto") or "triton"
INT8_INPUT_PATHS: dict[tuple[str, str], Int8InputPath] = {
    ("weight_only", "torch"): Int8InputPath(None, linear=_weight_only),
    ("weight_only", "triton"): Int8InputPath(None, linear=_weight_only),
    ("dynamic_token", "torch"): Int8InputPath(_torch_per_token, linear=_dynamic_cpu),
    ("dynamic_tensor", "torch"): Int8InputPath(_torch_per_tensor),
    ("static_tensor", "torch"): Int8InputPath(_torch_static),
    ("dynamic_token", "triton"): Int8InputPath(_triton_per_token, fuses_hadamard=True),
    # no kernel for one amax over the whole tensor: torch ops, on the tensor's device
    ("dynamic_tensor", "triton"): Int8InputPath(_torch_per_tensor),
    ("static_tensor", "triton"): Int8InputPath(_triton_static, fuses_hadamard=True),
}


class RealQuantLinear(nn.Module):
    """int8 twin of a frozen ``QuantLinear``: y = Q_out(int8_linear(Q_in(T(x)), W_q)).

    Holds the int8 codes (``weight_q``, (N, K)) and fp32 scale (``weight_scale``, 1 or N
    values) as buffers, and for an asymmetric weight its zero points (``weight_zero``, int32:
    the core's uint8 codes and zero points both shifted by -128, so ``q - z`` is unchanged and
    the GEMM subtracts ``rowsum(x_q) * z`` exactly in int32), and computes in int8: W8A8 through ``int8_linear``, weight-only through
    ``int8_weight_only_linear``; how the input gets there is ``INT8_INPUT_PATHS``. The output
    quantizer, if any, is applied as in the fake module.
    """

    def __init__(self, qlinear: QuantLinear, kernels: str = "auto") -> None:
        super().__init__()
        reason = int8_eligibility(qlinear)
        if reason is not None:
            raise ValueError(f"cannot convert to a real int8 Linear: {reason}")
        self.kernels = check_kernels(kernels)
        self.in_features, self.out_features = qlinear.in_features, qlinear.out_features
        params = qlinear.weight_params.as_dict()
        codes, zero = qlinear.weight_codes.detach(), None
        if not qlinear.weight_spec.symmetric:  # uint8 codes + zero points -> int8 codes - 128, same q - z
            codes, zero = signed_asymmetric_codes(codes, params["zero_point"].detach())
        self.register_buffer("weight_q", codes.contiguous())
        self.register_buffer("weight_zero", zero)  # int32, 1 or N values; None for symmetric weights
        self.register_buffer("weight_scale", params["scale"].detach().to(torch.float32).reshape(-1).clone())
        self.register_buffer("bias", None if qlinear.bias is None else qlinear.bias.detach().clone())
        self.input_transform = qlinear.input_transform
        self.input_quantizer = qlinear.input_quantizer
        self.output_quantizer = qlinear.output_quantizer
        self.out_kind = act_kind(qlinear.output_quantizer)  # see _output
        self.act_kind = "weight_only" if qlinear.input_quantizer is None else act_kind(qlinear.input_quantizer)
        self._packed: Int8Weight | None = None

    def _apply(self, fn, *args, **kwargs):
        self._packed = None  # packings follow the buffers (device/dtype moves)
        return super()._apply(fn, *args, **kwargs)

    @property
    def packed(self) -> Int8Weight:
        if self._packed is None:
            self._packed = Int8Weight(self.weight_q, self.weight_scale, self.weight_zero)
        return self._packed

    def _path(self, x: torch.Tensor) -> str:
        return "triton" if use_triton(self.kernels, x) else "torch"

    def _input_path(self, x: torch.Tensor) -> tuple[str, Int8InputPath]:
        path = self._path(x)
        return path, INT8_INPUT_PATHS[(self.act_kind, path)]

    def _transform(self, x2: torch.Tensor) -> torch.Tensor:
        return x2 if self.input_transform is None else self.input_transform(x2)

    def _fused_transform(self) -> tuple[ChannelScale | None, HadamardTransform] | None:
        """(channel scale or None, Hadamard) of an input transform the Triton path fuses with the
        quantization: a full-width Hadamard, alone or in a chain, after a ``ChannelScale`` or not
        (ARS's "hadamard" branch; the quarot preset's one-part chain). None for anything else."""
        if not INT8_INPUT_PATHS[(self.act_kind, "triton")].fuses_hadamard:
            return None
        t = self.input_transform
        parts = list(t.parts) if isinstance(t, ChainTransform) else [t]
        scale = parts.pop(0) if len(parts) == 2 and isinstance(parts[0], ChannelScale) else None
        had = parts[0] if len(parts) == 1 else None
        if isinstance(had, HadamardTransform) and had.block is None and had.size == self.in_features:
            return scale, had
        return None

    def _fused_hadamard(self) -> HadamardTransform | None:
        """The online Hadamard the Triton path fuses with the quantization, if it can."""
        fused = self._fused_transform()
        return None if fused is None else fused[1]

    def quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 codes and scale of the rows x2 (M, K): online transform, then the input quantizer.

        On the Triton path an online Hadamard (with the channel scale before it, if any) and the
        quantization run as one kernel (``archquant/kernels/hadamard_quant.py``, the same matrices
        as the offline fusion)."""
        path, how = self._input_path(x2)
        if how.quantize is None:
            raise ValueError("a weight-only int8 Linear takes float inputs: it has no input quantizer")
        scale = static_scale(self.input_quantizer) if self.act_kind == "static_tensor" else None
        fused = self._fused_transform() if path == "triton" else None
        if fused is not None:
            from ..kernels.hadamard_quant import hadamard_quant_int8

            channel_scale, had = fused
            return hadamard_quant_int8(x2, scale, signs=had.signs,
                                       channel_scale=None if channel_scale is None else channel_scale.scale)
        return how.quantize(self._transform(x2), scale)

    def matmul_codes(self, x_q: torch.Tensor, x_scale, out_dtype: torch.dtype) -> torch.Tensor:
        """``(x_q @ W_q.T) * x_scale * w_scale + bias`` for int8 rows x_q (M, K): the GEMM alone,
        for callers that already hold codes (e.g. a Mamba mixer's x_proj input)."""
        path = "triton" if self._path(x_q) == "triton" else None
        return int8_linear(x_q, self.packed, x_scale, bias=self.bias, out_dtype=out_dtype, path=path)

    def matmul_requant(self, x_q: torch.Tensor, x_scale, out_scale: torch.Tensor,
                       round_to: torch.dtype) -> torch.Tensor:
        """int8 codes of ``matmul_codes(x_q, x_scale, round_to)`` requantized with the static
        per-tensor ``out_scale``: on the Triton path one kernel (the GEMM's epilogue writes the
        codes, bit for bit what the two steps give), elsewhere the GEMM then a quantize pass."""
        if self._path(x_q) == "triton" and self.weight_zero is None:  # the fused epilogue has no zero points
            from ..kernels.w8a8_gemm import w8a8_gemm

            return w8a8_gemm(x_q, self.weight_q, x_scale, self.weight_scale, self.bias, out_dtype=torch.int8,
                             out_scale=out_scale, round_to=round_to)
        return quantize_static_int8_torch(self.matmul_codes(x_q, x_scale, round_to), out_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        path, how = self._input_path(x2)
        if how.linear is not None:
            y = how.linear(self._transform(x2), self.packed, self.bias, x.dtype, path)
        else:
            y = self.matmul_codes(*self.quantize_input(x2), x.dtype)
        return _output(self, y.reshape(*lead, self.out_features))

    def extra_repr(self) -> str:
        w = "per-channel" if self.weight_scale.numel() > 1 else "per-tensor"
        w += "" if self.weight_zero is None else " asymmetric"
        return (f"in={self.in_features}, out={self.out_features}, weight=int8/{w}, input={self.act_kind}, "
                f"kernels={self.kernels}")


# ----------------------------------------------------------------------------------------
# int4 weight-only
# ----------------------------------------------------------------------------------------


class RealW4A16Linear(nn.Module):
    """int4 weight-only twin of a frozen ``QuantLinear``: y = Q_out(w4a16_gemm(T(x), W4) + b).

    ``weight_packed`` is the fake module's ``weight_codes`` as stored (uint8 (N, K/2), low nibble =
    even column, +8 offset: the kernel's layout), ``weight_scale`` its fp32 group scales
    (N, K / group_size). Runs on the Triton kernel only (CUDA, or the interpreter on a CPU).
    """

    def __init__(self, qlinear: QuantLinear, kernels: str = "auto") -> None:
        super().__init__()
        reason = w4a16_eligibility(qlinear)
        if reason is not None:
            raise ValueError(f"cannot convert to a real W4A16 Linear: {reason}")
        self.kernels = check_kernels(kernels)
        self.in_features, self.out_features = qlinear.in_features, qlinear.out_features
        self.group_size = qlinear.weight_spec.group_size
        self.register_buffer("weight_packed", qlinear.weight_codes.detach().contiguous())
        scale = qlinear.weight_params.as_dict()["scale"].detach().to(torch.float32)
        self.register_buffer("weight_scale", scale.reshape(self.out_features, -1).clone())
        self.register_buffer("bias", None if qlinear.bias is None else qlinear.bias.detach().clone())
        self.input_transform = qlinear.input_transform
        self.output_quantizer = qlinear.output_quantizer
        self.out_kind = act_kind(qlinear.output_quantizer)  # see _output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.w4a16_gemm import w4a16_gemm

        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.input_transform is not None:
            x2 = self.input_transform(x2)
        y = w4a16_gemm(x2, self.weight_packed, self.weight_scale, self.group_size)
        if self.bias is not None:  # the fake module adds it in x's dtype too
            y = y + self.bias.to(y.dtype)
        return _output(self, y.reshape(*lead, self.out_features))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, weight=int4/group{self.group_size}, "
                f"kernels={self.kernels}")


# ----------------------------------------------------------------------------------------
# twin-log weights (LUT GEMM)
# ----------------------------------------------------------------------------------------


def _twinlog_levels(qlinear: QuantLinear) -> torch.Tensor:
    """fp32 (N, 2^bits): each row's code levels, rounded to the weight dtype the fake module
    dequantizes to (its ``effective_weight``), so both multiply x by the same values (up to one
    fp32 ulp of exp2, which torch's vectorized and scalar CPU loops round differently)."""
    from ..kernels.twinlog_gemm import twinlog_lut

    lut = twinlog_lut(qlinear.weight_params.as_dict(), qlinear.weight_spec.bits)
    return lut.to(qlinear.weight_dtype).to(torch.float32).contiguous()


class RealTwinLogLinear(nn.Module):
    """Twin-log twin of a frozen ``QuantLinear``: y = Q_out(twinlog_gemm(Q_in(T(x)), W) + b).

    ``weight_packed``: the fake module's ``weight_codes`` as stored (uint8 (N, K/2), low nibble =
    even column, unsigned: the kernel's layout); ``weight_lut``: fp32 (N, 2^bits), what each code
    of each row stands for. Weight-only (``Q_in`` absent), or with the fake module's int8 input
    quantizer run as it is (quantize-dequantize in torch), so the GEMM gets exactly the fake
    module's float input: only the weight side is real (4 or 3 bits per weight in memory). Runs on
    the Triton kernel only (CUDA, or the interpreter on a CPU). Twin-log weights of more than 4
    bits are stored one code per byte and stay fake-quant (``twinlog_layout``).
    """

    def __init__(self, qlinear: QuantLinear, kernels: str = "auto") -> None:
        super().__init__()
        reason = twinlog_eligibility(qlinear)
        if reason is not None:
            raise ValueError(f"cannot convert to a real twin-log Linear: {reason}")
        self.kernels = check_kernels(kernels)
        self.in_features, self.out_features = qlinear.in_features, qlinear.out_features
        self.bits = qlinear.weight_spec.bits
        self.register_buffer("weight_packed", qlinear.weight_codes.detach().contiguous())
        self.register_buffer("weight_lut", _twinlog_levels(qlinear))
        self.register_buffer("bias", None if qlinear.bias is None else qlinear.bias.detach().clone())
        self.input_transform = qlinear.input_transform
        self.input_quantizer = qlinear.input_quantizer
        self.output_quantizer = qlinear.output_quantizer
        self.out_kind = act_kind(qlinear.output_quantizer)  # see _output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.twinlog_gemm import twinlog_gemm

        # transform and quantizer on x as it comes, as the fake module calls them (a quantizer's
        # axes refer to that shape); the quantizer leaves int8 values held in float
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        lead = x.shape[:-1]
        y = twinlog_gemm(x.reshape(-1, x.shape[-1]), self.weight_packed, self.weight_lut)
        if self.bias is not None:  # the fake module adds it in x's dtype too
            y = y + self.bias.to(y.dtype)
        return _output(self, y.reshape(*lead, self.out_features))

    def extra_repr(self) -> str:
        inp = "float" if self.input_quantizer is None else "int8 fake-quantized"
        return (f"in={self.in_features}, out={self.out_features}, weight=twinlog{self.bits}/LUT{2 ** self.bits}, "
                f"input={inp}, kernels={self.kernels}")


# ----------------------------------------------------------------------------------------
# fp8 W8A8
# ----------------------------------------------------------------------------------------


class RealFP8Linear(nn.Module):
    """fp8 twin of a frozen ``QuantLinear``: y = Q_out(fp8_gemm(Q_in(T(x)), W8)).

    ``weight_q``: the fake module's fp8 codes (N, K); ``weight_scale``: fp32, 1 or N values. The
    input is quantized exactly as the fake input quantizer quantizes it (the core's fp8 format,
    dynamic or with its frozen scale), then one fp8 x fp8 GEMM with an fp32 accumulator and the
    scaled epilogue. Runs on the Triton kernel only (CUDA, or the interpreter on a CPU).
    """

    def __init__(self, qlinear: QuantLinear, kernels: str = "auto") -> None:
        super().__init__()
        reason = fp8_eligibility(qlinear)
        if reason is not None:
            raise ValueError(f"cannot convert to a real fp8 Linear: {reason}")
        self.kernels = check_kernels(kernels)
        self.in_features, self.out_features = qlinear.in_features, qlinear.out_features
        self.register_buffer("weight_q", qlinear.weight_codes.detach().contiguous())
        scale = qlinear.weight_params.as_dict()["scale"].detach().to(torch.float32).reshape(-1)
        self.register_buffer("weight_scale", scale.clone())
        self.register_buffer("bias", None if qlinear.bias is None else qlinear.bias.detach().clone())
        self.input_transform = qlinear.input_transform
        self.input_quantizer = qlinear.input_quantizer
        self.output_quantizer = qlinear.output_quantizer
        self.out_kind = act_kind(qlinear.output_quantizer)  # see _output

    def quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp8 codes (M, K) and scale (one value, or (M, 1) per token) of the transformed rows."""
        q = self.input_quantizer
        params = q.params.as_dict() if not q.dynamic else formats.params_from_tensor(x2, q.spec)
        return formats.quantize(x2, q.spec, params), params["scale"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.w8a8_gemm import fp8_gemm

        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.input_transform is not None:
            x2 = self.input_transform(x2)
        codes, scale = self.quantize_input(x2)
        y = fp8_gemm(codes, self.weight_q, scale, self.weight_scale, self.bias, out_dtype=x.dtype)
        return _output(self, y.reshape(*lead, self.out_features))

    def extra_repr(self) -> str:
        w = "per-channel" if self.weight_scale.numel() > 1 else "per-tensor"
        return (f"in={self.in_features}, out={self.out_features}, weight={self.weight_q.dtype}/{w}, "
                f"input={input_kind(self.input_quantizer)}, kernels={self.kernels}")


#: every real Linear type (a converted block's Linears are counted with these)
REAL_LINEAR_TYPES = (RealQuantLinear, RealW4A16Linear, RealTwinLogLinear, RealFP8Linear)
