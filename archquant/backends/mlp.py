"""A real MLP (Linear → activation → Linear) run over row chunks on the CPU.

Between the two Linears of a transformer MLP sits a (rows, 4C) activation: at VGGT-1B's 5,496
tokens, 90 MB in fp32. Unchunked, the real int8 path writes it (fc1's output), reads and writes
it again (GELU), reads it twice to quantize it (per-token max, then the codes) and writes the
codes: on a memory-bound CPU those passes, not the int8 GEMMs, are the MLP's cost. Run a few
hundred rows at a time and the intermediate stays in cache: measured on the 2-core Xeon this
project benchmarks on, one VGGT-1B MLP at 5,496 rows took 174–188 ms whole and 69–74 ms in
512-row chunks, with identical outputs (``torch.equal``).

Chunking is exact only when every op treats rows independently: the int8 Linears must quantize
their inputs per token (dynamic) or with a static per-tensor scale (a dynamic per-tensor scale
would depend on which rows share a chunk), and have no output quantizer. ``mlp_chunk_eligibility``
says why not otherwise; the converter then leaves the Linears to the per-Linear conversion. CUDA
tensors are never chunked (a GPU wants the whole GEMM).
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.modules import QuantLinear
from .dispatch import LinearKernel, choose_linear_kernel
from .specs import act_kind

#: rows per chunk on the CPU: 256, 512 and 1024 measured alike (69–78 ms), 2048 no longer fits (161 ms)
CPU_MLP_CHUNK_ROWS = 512
#: input kinds whose quantization of a row does not depend on the other rows
ROW_LOCAL_INPUTS = ("dynamic_token", "static_tensor", "weight_only")


def _input_kind(linear: nn.Module) -> str | None:
    q = getattr(linear, "input_quantizer", None)
    return "weight_only" if q is None else act_kind(q)


def _real_kernels(fc1: nn.Module, fc2: nn.Module, kernels: str) -> "dict[str, LinearKernel] | str":
    """The kernel each Linear goes real on, if both do and every op is row-local; else why not."""
    chosen = {}
    for name, linear in (("fc1", fc1), ("fc2", fc2)):
        if not isinstance(linear, QuantLinear):
            return f"{name} is not quantized"
        choice = choose_linear_kernel(linear, kernels)
        if isinstance(choice, str):
            return f"{name}: {choice}"
        if _input_kind(linear) not in ROW_LOCAL_INPUTS:
            return f"{name}: its input quantization is not per token or static"
        if linear.output_quantizer is not None:
            return f"{name} has an output quantizer"
        chosen[name] = choice
    return chosen


def mlp_chunk_eligibility(fc1: nn.Module, fc2: nn.Module, kernels: str) -> str | None:
    """None when both Linears go real and every op is row-local, else why the MLP is not chunked."""
    chosen = _real_kernels(fc1, fc2, kernels)
    return chosen if isinstance(chosen, str) else None


class RowChunkedMlp(nn.Module):
    """``fc2(act(fc1(x)))`` with real ``fc1`` / ``fc2``, over ``chunk_rows`` rows at a time on the CPU
    (module doc); the same outputs as the unchunked MLP, bit for bit."""

    def __init__(self, fc1: nn.Module, act: nn.Module, fc2: nn.Module, chunk_rows: int = CPU_MLP_CHUNK_ROWS) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2
        self.chunk_rows = chunk_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if x.is_cuda or rows <= self.chunk_rows:
            return self.fc2(self.act(self.fc1(x)))
        flat = x.reshape(rows, x.shape[-1])
        first = self.fc2(self.act(self.fc1(flat[: self.chunk_rows])))
        out = first.new_empty(rows, first.shape[-1])
        out[: self.chunk_rows] = first
        for start in range(self.chunk_rows, rows, self.chunk_rows):
            out[start: start + self.chunk_rows] = self.fc2(self.act(self.fc1(flat[start: start + self.chunk_rows])))
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        return f"chunk_rows={self.chunk_rows} (CPU)"


def convert_mlp(mlp: nn.Module, kernels: str):
    """A block converter for an MLP with ``fc1``, ``act`` and ``fc2``: a ``RowChunkedMlp`` of their real
    modules, or None (the per-Linear conversion then takes each Linear, or reports why not)."""
    chosen = _real_kernels(mlp.fc1, mlp.fc2, kernels)
    if isinstance(chosen, str):
        return None
    return RowChunkedMlp(chosen["fc1"].build(mlp.fc1, kernels), mlp.act, chosen["fc2"].build(mlp.fc2, kernels))
