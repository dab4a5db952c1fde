"""Layers shared by the model code we own."""
from __future__ import annotations

import torch
from torch import nn


#: where the FP models' fusable ops run (RMSNorm here; Mamba's conv1d + SiLU and selective scan):
#: "auto" (the Triton kernels of ``kernels/`` for CUDA tensors, PyTorch on a CPU), "torch"
#: (always PyTorch) or "triton" (always the kernels; on a CPU through TRITON_INTERPRET=1).
#: The int8 models run the same kernels, so FP-vs-int8 timings compare like with like.
FP_KERNELS = "auto"


def use_fp_kernels(t: torch.Tensor) -> bool:
    """Whether an FP op on ``t`` runs on its Triton kernel (never while autograd records)."""
    if FP_KERNELS == "torch" or (torch.is_grad_enabled() and t.requires_grad):
        return False
    return t.is_cuda or FP_KERNELS == "triton"


class RMSNorm(nn.Module):
    """x / rms(x) · γ, normalised in fp32 (the HF Mamba / Llama convention: γ applied after the cast back)."""

    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fp_kernels(x) and not (torch.is_grad_enabled() and self.weight.requires_grad):
            from archquant.kernels.rmsnorm_quant import rmsnorm_triton  # one kernel, same values

            return rmsnorm_triton(x, self.weight, self.eps)[0]
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``RMSNorm`` in PyTorch: normalised in fp32, cast back to x's dtype, then times γ (so the
    result has ``promote_types(weight.dtype, x.dtype)``). The kernels keep their own copy as
    their oracle (``kernels/rmsnorm_quant.py``: kernels import no model code)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)
