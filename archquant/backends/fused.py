"""Fused Triton kernels for the unquantized (FP) parts of a model, by swapping modules.

The model code in ``models/`` is plain PyTorch. ``apply_fused_kernels(model)`` (as
Liger-Kernel's ``apply_liger_kernel_to_*``) turns, in place, every module with a fused
counterpart into that counterpart: a subclass that keeps the parameters, buffers, children and
state-dict names and overrides only the fusable piece:

* ``RMSNorm`` -> :class:`FusedRMSNorm`: one kernel (``rmsnorm_triton``), same values up to the
  sum-of-squares order;
* ``Mamba1Mixer`` -> :class:`FusedMamba1Mixer`: conv1d + SiLU (``causal_conv1d_silu_triton`` /
  ``causal_conv1d_update_triton``) and the selective scan with softplus and, for a plain SiLU
  gate, the gating fused (``selective_scan_triton`` / ``selective_state_update_triton``);
* ``Mamba2Mixer`` -> :class:`FusedMamba2Mixer`: conv1d + SiLU (its SSD scan stays PyTorch).

These are the int8 model's kernels fed floats, so FP-vs-int8 timings compare like with like.
``kernels``: "auto" runs CUDA tensors on the kernels and CPU tensors on the PyTorch code, decided
per call (a swapped model can move between devices); "triton" runs the kernels everywhere (on a
CPU through TRITON_INTERPRET=1). Never while autograd records (the kernels have no backward),
and the pieces a kernel cannot do (a quantized conv input, a rotated or quantized SSM state)
stay on PyTorch.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.layers import RMSNorm
from ..models.mamba import Mamba1Mixer, Mamba2Mixer, MambaLayerState, causal_conv_silu
from .specs import check_kernels, use_triton

__all__ = ["FUSED_MODULES", "FusedMamba1Mixer", "FusedMamba2Mixer", "FusedRMSNorm", "apply_fused_kernels"]


def _on_kernel(kernels: str, t: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether this call runs on the Triton kernel: CUDA (or forced) and no autograd recording."""
    if torch.is_grad_enabled() and (t.requires_grad or any(p.requires_grad for p in params)):
        return False
    return use_triton(kernels, t)


class FusedRMSNorm(RMSNorm):
    """``RMSNorm`` on the fused kernel of ``archquant/kernels/rmsnorm_quant.py``."""

    fused_kernels = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _on_kernel(self.fused_kernels, x, self.weight):
            from ..kernels import rmsnorm_quant

            return rmsnorm_quant.rmsnorm_triton(x, self.weight, self.eps)[0]
        return super().forward(x)


def _plain_conv(conv: nn.Module) -> bool:
    """A conv the fused kernel can run: an nn.Conv1d, or a quantized one without activation
    quantizers (its dequantized weight is then what the kernel multiplies by)."""
    if isinstance(conv, nn.Conv1d):
        return True
    return (getattr(conv, "input_quantizer", False) is None and getattr(conv, "output_quantizer", False) is None
            and hasattr(conv, "effective_weight"))


def _fused_conv_silu(conv: nn.Module, x: torch.Tensor, state: MambaLayerState | None, kernels: str) -> torch.Tensor:
    """``causal_conv_silu`` on the Triton conv kernels: one launch for conv + bias + SiLU, the state
    window updated in place (decode: one token, ``causal_conv1d_update``)."""
    if not (_plain_conv(conv) and _on_kernel(kernels, x)):
        return causal_conv_silu(conv, x, state)
    from ..kernels import mamba_conv1d

    w = conv.weight if isinstance(conv, nn.Conv1d) else conv.effective_weight()
    b, c, l = x.shape
    if state is not None and state.conv_state is None:
        state.conv_state = x.new_zeros(b, c, w.shape[-1])  # zero history = the conv's zero padding
    if state is not None and l == 1:
        y = mamba_conv1d.causal_conv1d_update_triton(x[..., 0], state.conv_state, None, w, None, conv.bias, None,
                                                      out_dtype=x.dtype)
        return y.unsqueeze(-1)
    # written (b, l, c)-contiguous, the layout the mixer continues in
    out = torch.empty(b, l, c, dtype=x.dtype, device=x.device).transpose(1, 2)
    return mamba_conv1d.causal_conv1d_silu_triton(x, None, w, None, conv.bias, None,
                                                  None if state is None else state.conv_state,
                                                  out_dtype=x.dtype, out=out)


class FusedMamba1Mixer(Mamba1Mixer):
    """``Mamba1Mixer`` whose conv1d + SiLU and selective scan run on the Triton kernels."""

    fused_kernels = "auto"

    def conv_silu(self, x: torch.Tensor, state: MambaLayerState | None) -> torch.Tensor:
        return _fused_conv_silu(self.conv1d, x, state, self.fused_kernels)

    def gated_scan(self, u, dt_raw, A, D, B, C, z, h0, decode: bool):
        if self._state_readout() is not None or not _on_kernel(self.fused_kernels, u, A, D):
            return super().gated_scan(u, dt_raw, A, D, B, C, z, h0, decode)
        from ..kernels import mamba_scan

        silu_gate = type(self.gate_act) is nn.SiLU  # fused in the kernel; any other gate is applied after
        zk = z if silu_gate else None
        if decode:
            h = h0 if h0 is not None else u.new_zeros(u.shape[0], self.d_inner, self.state_size, dtype=torch.float32)
            y = mamba_scan.selective_state_update_triton(h, u[:, 0], None, dt_raw[:, 0], None, None, A, B[:, 0], None,
                                                         C[:, 0], None, D, None if zk is None else zk[:, 0], None,
                                                         out_dtype=u.dtype).unsqueeze(1)
        else:
            t = lambda v: v.transpose(1, 2)  # noqa: E731 - (b, l, c) as the kernel's (b, c, l) view
            y, h = mamba_scan.selective_scan_triton(t(u), None, t(dt_raw), None, None, A, t(B), None, t(C), None, D,
                                                    None if zk is None else t(zk), None, out_dtype=u.dtype, h0=h0,
                                                    return_state=True)
            y = y.transpose(1, 2)
        return (y, h) if silu_gate else (y * self.gate_act(z), h)


class FusedMamba2Mixer(Mamba2Mixer):
    """``Mamba2Mixer`` whose conv1d + SiLU runs on the Triton kernel."""

    fused_kernels = "auto"

    def conv_silu(self, x: torch.Tensor, state: MambaLayerState | None) -> torch.Tensor:
        return _fused_conv_silu(self.conv1d, x, state, self.fused_kernels)


#: model class -> its fused subclass (exact types: a subclass of the model's is left alone)
FUSED_MODULES: dict[type, type] = {RMSNorm: FusedRMSNorm, Mamba1Mixer: FusedMamba1Mixer,
                                   Mamba2Mixer: FusedMamba2Mixer}


def apply_fused_kernels(model: nn.Module, kernels: str = "auto") -> list[str]:
    """Swap, in place, every module of ``model`` that has a fused counterpart (``FUSED_MODULES``)
    for it; a module swapped before takes the new ``kernels``. Returns the names of the fused
    modules ("" for ``model`` itself)."""
    check_kernels(kernels)
    fused_types = tuple(FUSED_MODULES.values())
    names = []
    for name, module in model.named_modules():
        cls = FUSED_MODULES.get(type(module))
        if cls is not None:
            module.__class__ = cls  # same object: parameters, hooks and state-dict names stay
        if isinstance(module, fused_types):
            module.fused_kernels = kernels
            names.append(name)
    return names
