"""Real-quant Mamba1 mixer: a Quamba-quantized mixer whose every op runs on int8 codes.

``convert_to_real`` (``backends/real.py``) imports this module when it meets a Mamba model
and calls the converters registered here for each ``Mamba1Mixer`` of a quantized model. When
the mixer was quantized the Quamba way (static per-tensor int8 everywhere, see
``adapters/mamba.py``) the whole mixer is replaced:

    hidden ─▶ in_proj (W8A8 GEMM, epilogue requantizes x|z with their static scale)
    x_q ─▶ conv1d + SiLU (int8 in, int8 out: u_q, percentile-clipped scale)
    u_q ─▶ x_proj (W8A8 GEMM on u_q as is, epilogue requantizes dt_low|B|C)
    dt_low_q ─▶ dt_proj (W8A8 GEMM, bias, epilogue requantizes dt)
    (u_q, dt_q, B_q, C_q, z_q) ─▶ selective scan (fp32 state) · SiLU(z) ─▶ y
    y ─▶ Hadamard + quantize (one kernel) ─▶ out_proj (W8A8 GEMM)

so between the ops only int8 codes travel, and each scan input is quantized exactly once, where
the fake-quant model quantizes it. With a ``MambaLayerState`` the mixer keeps an int8 conv
window and an fp32 SSM state and decodes one token at a time (``quant_causal_conv1d_update``,
``quant_selective_state_update``), in place, so a decode step can be captured in a CUDA graph.

Kernels: on CUDA tensors (or ``kernels="triton"``) the Triton kernels of ``archquant/kernels/``; on the
CPU the same arithmetic through their PyTorch references and the CPU int8 GEMMs. Mixers
quantized otherwise (MambaQuant's dynamic per-tensor scales, S-SiLU gate, state quantization;
4-bit weights) are not replaced: the reason is reported and their Linears go real one by one.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.formats import QuantSpec
from ..core.modules import ActQuantizer, QuantConv1d, QuantLinear
from ..kernels import mamba_conv1d as conv_k
from ..kernels import mamba_scan as scan_k
from ..models.layers import RMSNorm
from ..models.mamba import Mamba1Mixer, MambaBlock, MambaLayerState
from .linear import RealQuantLinear, int8_eligibility
from .real import register_real_converter
from .specs import act_kind, is_int8_symmetric, static_scale, use_triton

__all__ = ["RealQuantMamba1Mixer", "real_mixer_eligibility"]


def _static_int8(q: ActQuantizer | None) -> bool:
    return act_kind(q) == "static_tensor"


def _int8_weight(spec: QuantSpec | None) -> bool:
    # conv taps (d, 1, k): per tensor or per output channel (axis 0)
    return spec is not None and is_int8_symmetric(spec) and spec.granularity in ("tensor", "channel") and spec.axis == 0


def real_mixer_eligibility(m: nn.Module) -> str | None:
    """None if the mixer can run entirely on int8 kernels, else why not (one line)."""
    if not isinstance(m, Mamba1Mixer):
        return f"{type(m).__name__}: only Mamba1 mixers have int8 conv/scan kernels"
    if m.state_rotation is not None or m.state_site.is_quantized:
        return "the SSM state is rotated or quantized (MambaQuant R4): the int8 scan keeps an fp32 state"
    if type(m.gate_act) is not nn.SiLU:
        return f"gate {type(m.gate_act).__name__}: the scan kernel's gate is SiLU"
    for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
        lin = getattr(m, name)
        if not isinstance(lin, QuantLinear):
            return f"{name} is not quantized"
        reason = int8_eligibility(lin)
        if reason is not None:
            return f"{name}: {reason}"
    for name in ("in_proj", "x_proj", "dt_proj"):
        if not _static_int8(getattr(m, name).output_quantizer):
            return f"{name} output needs a static per-tensor int8 quantizer (Quamba)"
    for name in ("x_proj", "dt_proj"):
        lin = getattr(m, name)
        if lin.input_quantizer is not None or lin.input_transform is not None:
            return f"{name} input must come straight from the previous op's int8 codes"
    if m.in_proj.input_quantizer is None or m.out_proj.input_quantizer is None:
        return "in_proj and out_proj need quantized inputs (W8A8)"
    if not _static_int8(m.u_site.quantizer):
        return "u (the SSM input) needs a static per-tensor int8 quantizer (Quamba)"
    conv = m.conv1d
    if isinstance(conv, QuantConv1d):
        if conv.input_quantizer is not None or conv.output_quantizer is not None:
            return "conv1d has its own activation quantizers; the kernel reads in_proj's codes"
        if conv.weight_spec is not None and not (_int8_weight(conv.weight_spec) and conv.frozen):
            return "conv1d weight must be frozen symmetric int8, per tensor or per channel"
    elif not isinstance(conv, nn.Conv1d):
        return f"conv1d is a {type(conv).__name__}"
    return None


def _conv_weight(conv: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (d, k), scale) as the conv kernels take them: int8 codes + scale, or float + None."""
    if isinstance(conv, QuantConv1d) and conv.weight_spec is not None:
        scale = conv.weight_params.as_dict()["scale"].detach().float().reshape(-1)
        return conv.weight_codes.detach()[:, 0, :].contiguous(), scale.clone()
    return conv.weight.detach()[:, 0, :].float().contiguous(), None


def _scale_buffer(q: ActQuantizer) -> torch.Tensor:
    # one-element fp32 tensors on the module's device: a decode step passes them to the kernels
    # without a host-to-device copy (which a CUDA graph could not capture)
    return q.params.as_dict()["scale"].detach().float().reshape(1).clone()


class RealQuantMamba1Mixer(nn.Module):
    """int8 twin of a Quamba-quantized ``Mamba1Mixer`` (see the module docstring)."""

    def __init__(self, mixer: Mamba1Mixer, kernels: str = "auto") -> None:
        super().__init__()
        reason = real_mixer_eligibility(mixer)
        if reason is not None:
            raise ValueError(f"cannot convert the Mamba mixer to int8 kernels: {reason}")
        self.kernels = kernels
        self.d_inner, self.state_size, self.dt_rank = mixer.d_inner, mixer.state_size, mixer.dt_rank
        self.in_proj = RealQuantLinear(mixer.in_proj, kernels)
        self.x_proj = RealQuantLinear(mixer.x_proj, kernels)
        self.dt_proj = RealQuantLinear(mixer.dt_proj, kernels)
        self.out_proj = RealQuantLinear(mixer.out_proj, kernels)
        w, w_scale = _conv_weight(mixer.conv1d)
        self.conv_kernel = w.shape[1]
        self.register_buffer("conv_weight", w)
        self.register_buffer("conv_weight_scale", w_scale)
        bias = mixer.conv1d.bias
        self.register_buffer("conv_bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("xz_scale", _scale_buffer(mixer.in_proj.output_quantizer))
        self.register_buffer("u_scale", _scale_buffer(mixer.u_site.quantizer))
        self.register_buffer("dbc_scale", _scale_buffer(mixer.x_proj.output_quantizer))
        self.register_buffer("dt_scale", _scale_buffer(mixer.dt_proj.output_quantizer))
        self.register_buffer("A", -torch.exp(mixer.A_log.detach().float()))  # as the FP mixer computes it
        self.register_buffer("D", mixer.D.detach().float().clone())

    # ------------------------------------------------------------------ ops (Triton or torch)
    def _conv(self, x_q: torch.Tensor, conv_state: torch.Tensor | None, triton: bool,
              out: torch.Tensor | None) -> torch.Tensor:
        args = (self.xz_scale, self.conv_weight, self.conv_weight_scale, self.conv_bias, self.u_scale)
        if triton:
            return conv_k.quant_causal_conv1d_silu(x_q, *args, conv_state=conv_state, out=out)
        y = conv_k.quant_causal_conv1d_silu_reference(x_q, *args, conv_state=conv_state)
        if out is not None:
            out.copy_(y)
            return out
        return y

    # ------------------------------------------------------------------ forward
    def forward(self, hidden: torch.Tensor, state: MambaLayerState | None = None) -> torch.Tensor:
        b, l, _ = hidden.shape
        h_q, h_scale = self.in_proj.quantize_input(hidden.reshape(b * l, -1))
        return self.forward_codes(h_q, h_scale, b, l, hidden.dtype, state)

    def forward_codes(self, h_q: torch.Tensor, h_scale: torch.Tensor, b: int, l: int, dtype: torch.dtype,
                      state: MambaLayerState | None = None) -> torch.Tensor:
        """The mixer from in_proj's quantized input: ``h_q`` int8 (b*l, d_model) codes, ``h_scale``
        their scale; ``dtype`` the model's activation dtype (GEMM outputs, scan output)."""
        d, n, r = self.d_inner, self.state_size, self.dt_rank
        device = h_q.device
        triton = use_triton(self.kernels, h_q)
        if state is not None and state.empty:  # zero history == the conv's zero padding, h0 = 0
            state.conv_state = torch.zeros(b, d, self.conv_kernel, dtype=torch.int8, device=device)
            state.ssm_state = torch.zeros(b, d, n, dtype=torch.float32, device=device)
        decode = state is not None and l == 1

        # in_proj: W8A8 GEMM, then x | z requantized with their shared static scale
        xz_q = self.in_proj.matmul_requant(h_q, h_scale, self.xz_scale, dtype).view(b, l, 2 * d)
        x_q, z_q = xz_q[..., :d], xz_q[..., d:]

        # conv1d + SiLU -> u codes, laid out (b, l, d) so that x_proj reads its rows in place
        if decode:
            update = conv_k.quant_causal_conv1d_update if triton else conv_k.quant_causal_conv1d_update_reference
            u_rows = update(x_q[:, 0], state.conv_state, self.xz_scale, self.conv_weight, self.conv_weight_scale,
                            self.conv_bias, self.u_scale).view(b, 1, d)
        else:
            u_rows = torch.empty(b, l, d, dtype=torch.int8, device=device)
            self._conv(x_q.transpose(1, 2), None if state is None else state.conv_state, triton,
                       u_rows.transpose(1, 2))

        # x_proj on u's codes -> dt_low | B | C codes; dt_proj (with its bias) -> dt codes
        dbc_q = self.x_proj.matmul_requant(u_rows.view(b * l, d), self.u_scale, self.dbc_scale, dtype)
        dt_q = self.dt_proj.matmul_requant(dbc_q[:, :r], self.dbc_scale, self.dt_scale, dtype)
        B_q, C_q = dbc_q[:, r:r + n], dbc_q[:, r + n:]
        scales = dict(u_scale=self.u_scale, dt_scale=self.dt_scale, dt_bias=None, A=self.A, B_scale=self.dbc_scale,
                      C_scale=self.dbc_scale, D=self.D, z_scale=self.xz_scale, out_dtype=dtype)

        # selective scan (fp32 state) with the SiLU(z) gate
        if decode:
            update = scan_k.quant_selective_state_update if triton else scan_k.quant_selective_state_update_reference
            y = update(state.ssm_state, u_q=u_rows[:, 0], dt_q=dt_q, B_q=B_q, C_q=C_q, z_q=z_q[:, 0],
                       **scales).view(b, 1, d)
        else:
            scan = scan_k.quant_selective_scan if triton else scan_k.quant_selective_scan_reference
            as_bdl = lambda t, c: t.reshape(b, l, c).transpose(1, 2)  # noqa: E731 - (b, l, c) rows as (b, c, l)
            y, h = scan(u_q=u_rows.transpose(1, 2), dt_q=as_bdl(dt_q, d), B_q=as_bdl(B_q, n), C_q=as_bdl(C_q, n),
                        z_q=z_q.transpose(1, 2), h0=None if state is None else state.ssm_state,
                        return_state=True, **scales)
            y = y.transpose(1, 2)  # (b, l, d)
            if state is not None:
                state.store("ssm_state", h)
        return self.out_proj(y)

    def extra_repr(self) -> str:
        return f"d_inner={self.d_inner}, state={self.state_size}, dt_rank={self.dt_rank}, kernels={self.kernels}"


class RealQuantMambaBlock(nn.Module):
    """A Mamba1 block whose pre-mixer RMSNorm and in_proj input quantization are one kernel
    (``archquant/kernels/rmsnorm_quant.py``) on the Triton path, feeding a :class:`RealQuantMamba1Mixer`.
    Same function as ``MambaBlock``: residual + mixer(norm(hidden))."""

    def __init__(self, block: MambaBlock, kernels: str = "auto") -> None:
        super().__init__()
        self.residual_in_fp32 = block.residual_in_fp32
        self.norm = block.norm
        self.mixer = RealQuantMamba1Mixer(block.mixer, kernels)
        self.kernels = kernels

    def _normed_codes(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden.to(self.norm.weight.dtype)
        in_proj = self.mixer.in_proj
        if use_triton(self.kernels, x):
            from ..kernels.rmsnorm_quant import rmsnorm_quant_int8

            scale = static_scale(in_proj.input_quantizer) if in_proj.act_kind == "static_tensor" else None
            codes, scale, _ = rmsnorm_quant_int8(x.reshape(-1, x.shape[-1]), self.norm.weight, self.norm.eps, scale)
            return codes, scale
        return in_proj.quantize_input(self.norm(x).reshape(-1, x.shape[-1]))

    def forward(self, hidden: torch.Tensor, state: MambaLayerState | None = None) -> torch.Tensor:
        residual = hidden.float() if self.residual_in_fp32 else hidden
        b, l, _ = hidden.shape
        h_q, h_scale = self._normed_codes(hidden)
        out = self.mixer.forward_codes(h_q, h_scale, b, l, self.norm.weight.dtype, state)
        return (residual + out).to(residual.dtype)


def _fusable_norm(block: MambaBlock) -> bool:
    in_proj = block.mixer.in_proj
    fused_kinds = ("static_tensor", "dynamic_token")  # what rmsnorm_quant_int8 produces
    return (isinstance(block.norm, RMSNorm) and in_proj.input_transform is None
            and int8_eligibility(in_proj) is None and act_kind(in_proj.input_quantizer) in fused_kinds)


@register_real_converter(MambaBlock)
def _convert_mamba_block(block: MambaBlock, kernels: str):
    if real_mixer_eligibility(block.mixer) is not None or not _fusable_norm(block):
        return None  # the mixer converter decides (and reports) on its own
    return RealQuantMambaBlock(block, kernels)


@register_real_converter(Mamba1Mixer)
def _convert_mamba1_mixer(mixer: Mamba1Mixer, kernels: str):
    reason = real_mixer_eligibility(mixer)
    return reason if reason is not None else RealQuantMamba1Mixer(mixer, kernels)
