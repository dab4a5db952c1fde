"""Layers shared by the model code we own (plain PyTorch; ``archquant.backends.fused`` swaps in
the Triton versions for inference)."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) · γ, normalised in fp32 (the HF Mamba / Llama convention: γ applied after the cast back)."""

    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``RMSNorm`` in PyTorch: normalised in fp32, cast back to x's dtype, then times γ (so the
    result has ``promote_types(weight.dtype, x.dtype)``). The kernels keep their own copy as
    their oracle (``archquant/kernels/rmsnorm_quant.py``: kernels import no model code)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)
