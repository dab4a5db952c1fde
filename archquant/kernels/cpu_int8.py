"""Int8 linear layers on the CPU (and the CUDA dispatch): kernels from torch's CPU ops + references.

Nothing here is compiled: every path calls an operator that ships with the torch CPU wheel,
and this module adds the parts those operators lack (activation quantization that matches
``archquant.core.formats`` bit for bit, the per-token x per-channel scale epilogue, padding,
the choice of operator per shape).

API
---
``quantize_per_token_int8_torch(x) -> (q, scale)`` / ``quantize_static_int8_torch(x, scale) -> q``
    Symmetric int8 (codes in [-127, 127], ``scale = max(amax / 127, 1e-8)``, round half to
    even), equal to ``archquant.core.formats.quantize`` with ``QuantSpec(bits=8)``; same
    shapes as ``kernels.quantize`` (the Triton versions). Also ``quantize_per_tensor_int8_torch``
    and ``fake_quantize_int8_torch`` (quantize-dequantize, for fake-quant output quantizers).
``Int8Weight(q, scale, zero_point=None)``
    A Linear weight as int8 codes ``q`` (N, K), its fp32 scale (one value or one per
    output channel) and, for asymmetric weights, an integer zero point (one value or one per
    output channel): ``W = scale * (q - zero_point)``. ``Int8Weight.from_asymmetric`` takes the
    core's asymmetric codes (uint8 0..255, zero point 0..255) and shifts both by 128 into int8,
    which changes no ``q - zero_point``. Operator-specific packed copies are made on first use.
``int8_linear(x_q, w, x_scale, w_scale=None, bias=None, out_dtype=torch.float32, path=None)``
    ``out = ((acc as fp32) * x_scale) * w_scale + bias`` with ``acc = x_q @ w_q.T`` exact in
    int32; ``x_q`` int8 (M, K), ``w`` an ``Int8Weight`` or int8 (N, K) codes (then ``w_scale``
    is required), ``x_scale`` (M, 1) / (M,) / one value. The epilogue is the one of
    ``kernels.w8a8_gemm`` (same operation order, fp32, one rounding to ``out_dtype``), so on
    the CPU the result equals ``int8_linear_reference`` bit for bit on every path.
``int8_linear_dynamic(x, w, w_scale=None, bias=None, out_dtype=None, path=None)``
    The whole W8A8 Linear for float ``x`` with dynamic per-token activation quantization:
    ``quantize_per_token_int8_torch`` + ``int8_linear`` in one call, bit-identical to the
    two, with less per-call overhead (what matters at M = 1, see ``choose_path``).
``int8_weight_only_linear(x, w, bias=None, path=None)``
    ``x @ (w_q * w_scale).T + bias`` for float activations (no activation quantization).
``choose_path(m, k, n)`` / ``choose_weight_only_path(m, k, n, dtype)``
    The per-shape operator choice, with the measurements it is based on.

Paths (``path=``)
-----------------
Asymmetric weights: ``x_q @ (q - z).T = x_q @ q.T - rowsum(x_q) z``, both terms exact in int32
(|z| <= 128), so the accumulator is the same integer as for a symmetric weight. On the CPU they
take the ``"int_mm"`` path (fbgemm's packing here has unit scales and no weight zero points);
on the Triton path the GEMM runs on ``q`` and the correction ``x_scale * rowsum * (w_scale * z)``
is subtracted in fp32 after its epilogue (a few more fp32 roundings, no fused requantization).

``"int_mm"``  ``torch._int_mm(x_q, w_q.t())``: oneDNN s8 x s8 -> s32 (VNNI/AMX brgemm).
    On the CPU it accepts every shape (M = 1, K and N odd: checked in the tests); the
    CUDA constraints (M > 16, K and N multiples of 8, spec §4.2) do not apply, but
    K = 1 returns garbage (torch 2.13), so K = 1 is zero-padded to 2. The weight is passed
    as the transposed view of the (N, K) codes: oneDNN reads it in place, and at M = 1
    this layout is 4-9x faster than a contiguous (K, N) copy.
``"fbgemm"``  fbgemm's prepacked int8 GEMM (the engine behind ``quantized::linear``),
    called through ``quantized::linear_with_input_q_dq_qweight_dq_output_fp32`` with the
    codes as an integer-valued fp32 input, input scale 1 and zero point 128 (fbgemm wants
    u8 activations; it removes the offset exactly with the weight's column sums) and unit
    weight scales: its output is then exactly ``float(acc)``, and the scales go in our own
    epilogue. Used only when a one-time self-test on extreme codes confirms it is exact
    (u8 x s8 kernels without VNNI can saturate int16 pair sums, the reason fbgemm has
    ``reduce_range``); otherwise everything goes to ``"int_mm"``.
``"onednn"``  oneDNN's int8 linear (``onednn::qlinear_pointwise``, the op behind PyTorch 2's x86
    quantization; AMX / VNNI) on a prepacked weight, with unit input and weight scales and zero
    points 0: its fp32 output is then exactly ``float(acc)`` (checked once, like fbgemm), and the
    scales go in our own epilogue. Reading a blocked, prepacked weight instead of the (N, K)
    codes in place, it is about 2x ``"int_mm"`` from M = 64 on (1500 x 1536 x 8960, Wan's FFN:
    58 vs 109 ms; 512 x 1152 x 4608, DiT-XL/2's: 7.3 vs 19.7 ms; 2 threads, Intel Xeon with AMX)
    and equal at M <= 16. Symmetric weights only.
``"triton"``  CUDA tensors: ``kernels.w8a8_gemm.w8a8_gemm`` (same epilogue, same results).

Weight-only paths: ``"int8pack"`` (``aten._weight_int8pack_mm``, bf16/fp16 activations;
torchao's CPU int8 weight-only op; K zero-padded to a multiple of 16, since torch 2.13's
kernel returns wrong values, or crashes, for other K), ``"split3"`` (fp32 activations: each row of x written
as three int8 digits, x = s·(d1 + d2/254 + d3/254²) with |error| <= 2^-24·amax, and one int8
GEMM of 3M rows; an Ozaki-style splitting), ``"dequant"`` (dequantize the codes and use
``F.linear``: bit-identical to the fake-quant module; small weights keep the fp32 copy).
"""

from __future__ import annotations

import functools
import time
import warnings

import torch
import torch.nn.functional as F

from archquant.core.formats import INT_MIN_SCALE

__all__ = [
    "INT8_QMAX",
    "Int8Weight",
    "quantize_per_token_int8_torch",
    "quantize_per_tensor_int8_torch",
    "quantize_static_int8_torch",
    "fake_quantize_int8_torch",
    "int8_linear",
    "signed_asymmetric_codes",
    "int8_linear_dynamic",
    "int8_linear_reference",
    "int8_weight_only_linear",
    "int8_weight_only_linear_reference",
    "choose_path",
    "choose_weight_only_path",
    "fbgemm_available",
    "onednn_available",
    "onednn_exact",
    "path_candidates",
    "onednn_probe_ratio",
    "PATHS",
    "WEIGHT_ONLY_PATHS",
]

INT8_QMAX = 127  # restricted symmetric range, as archquant.core.formats.qrange
_MIN_SCALE = INT_MIN_SCALE  # the core's clamp of all-zero rows' scales
_SPLIT_BASE = 254.0  # digit base of the "split3" path: |remainder| <= 0.5 -> |digit| <= 127
_INT8PACK_K_MULTIPLE = 16  # aten._weight_int8pack_mm (bf16/fp16) is wrong, or crashes, otherwise
PATHS = ("int_mm", "fbgemm", "onednn", "triton")
# 0-dim constants for the per-call scale arithmetic: a tensor operand skips the Python-scalar
# wrapping, which costs ~1 us per op (a third of a small elementwise op); same fp32 values.
# Read-only: never used as the destination of an in-place op.
_QMAX_T = torch.tensor(float(INT8_QMAX), dtype=torch.float32)
_MIN_SCALE_T = torch.tensor(_MIN_SCALE, dtype=torch.float32)
WEIGHT_ONLY_PATHS = ("split3", "int8pack", "dequant")

# --------------------------------------------------------------------------- decisions

#: smallest M from which the oneDNN int8 linear is used when it is available (see ``choose_path``)
ONEDNN_MIN_M = 64
#: smallest weight (N*K) for which fp32 weight-only layers use "split3" (see ``choose_weight_only_path``)
SPLIT3_MIN_WEIGHT = 1 << 20


def choose_path(m: int, k: int, n: int) -> str:
    """The int8 x int8 operator for an (M, K) x (K, N) product on the CPU: the fastest of
    ``path_candidates(m)`` on this machine, each candidate timed once per (M bucket, K, N) on random
    codes of that shape (best of 3 calls after a warm-up), the choice then kept for the process.

    Why measured: the same operators rank differently on different CPUs. On an AMD EPYC, measured with
    ``python -m archquant.eval.bench_cpu --paths --threads 2 --no-model --ms
    1,2,4,16,32,64,256`` (AMD EPYC with AVX512-VNNI, torch 2.13 CPU, 2 threads, no other busy
    process during the run, 2026-11-26 06:26 UTC; median ms of the whole W8A8 Linear as
    ``int8_linear_dynamic`` runs it: per-token quantization + GEMM + epilogue; fp32 =
    ``torch.matmul``):

    ==========  ===========  =====  =====  =====  =====  =====  =====  =====
    K x N       op           M=1    2      4      16     32     64     256
    ==========  ===========  =====  =====  =====  =====  =====  =====  =====
    768x3072    fp32         0.175  0.340  0.532  0.846  1.36   2.31   7.10
                int_mm       0.044  0.092  0.104  0.187  0.294  0.454  1.73
                fbgemm       0.066  0.069  0.079  0.166  0.284  0.486  2.13
    1536x768    fp32         0.078  0.171  0.223  0.313  0.551  0.913  3.16
                int_mm       0.027  0.051  0.057  0.101  0.150  0.247  0.965
                fbgemm       0.054  0.058  0.065  0.119  0.175  0.294  1.22
    2560x10240  fp32         6.05   13.0   14.8   17.3   22.7   34.1   93.0
                int_mm       0.770  1.46   1.78   2.38   3.32   5.88   18.1
                fbgemm       0.419  0.874  0.762  1.43   2.66   5.41   20.0
    5120x2560   fp32         2.42   5.09   5.25   5.69   7.81   12.3   39.0
                int_mm       0.122  0.582  0.654  1.14   1.63   2.86   10.1
                fbgemm       0.149  0.148  0.194  0.684  1.23   2.52   9.53
    ==========  ===========  =====  =====  =====  =====  =====  =====  =====

    There ``_int_mm`` won at M = 1 except on the largest weight, fbgemm for 2 <= M <= 32 on big weights,
    and the two were even from M = 64; oneDNN's prepacked linear was about 2x both from M = 64 on an
    Intel Xeon with AMX. A fixed rule from those numbers (the dispatch until 2026-12-08) sent in_proj's
    GEMV to ``_int_mm`` on the AMX Xeon, where fbgemm is 1.8x faster, and prefill GEMMs to oneDNN on CPUs
    where oneDNN runs a reference kernel (``onednn_probe_ratio``; issue 14). oneDNN, fast for most
    prefill shapes on the AMX Xeon, also has shapes without a fast kernel there (M = 2048, K = 12:
    166 ms vs 0.39 ms for ``_int_mm``).

    Measuring costs a few milliseconds per new shape (about 0.3 s for the largest, 4096 x 4096 x 1024).
    Where two candidates are within ~20 % of each other the choice can differ between processes
    (768 x 3072 at M = 1 on the AMX Xeon: fbgemm 129-155 us, ``_int_mm`` 175-187 us, fp32 228-241 us
    for the whole Linear); either is then a fine one.
    """
    candidates = path_candidates(m)
    if len(candidates) == 1:
        return candidates[0]
    key = (m_bucket(m), k, n)
    if key not in _MEASURED_PATHS:
        x, w = _random_product(*key)
        times = {p: _best_time(lambda p=p: _acc_fp32(x, w, p), 3) for p in candidates}
        _MEASURED_PATHS[key] = min(candidates, key=times.__getitem__)
    return _MEASURED_PATHS[key]


def path_candidates(m: int) -> list[str]:
    """The int8 x int8 operators that may run an M-row product here: ``_int_mm`` always, fbgemm where it
    works, oneDNN's prepacked linear from ``ONEDNN_MIN_M`` rows where it is exact and passed the probe."""
    out = ["int_mm"]
    if fbgemm_available():
        out.append("fbgemm")
    if m >= ONEDNN_MIN_M and onednn_available():
        out.append("onednn")
    return out


#: (M rounded up to a power of two, at most PATH_MEASURE_MAX_M; K; N) -> the fastest operator measured there
_MEASURED_PATHS: dict[tuple[int, int, int], str] = {}
PATH_MEASURE_MAX_M = 4096


def m_bucket(m: int) -> int:
    """M rounded up to a power of two (at most ``PATH_MEASURE_MAX_M``): products in one bucket share a choice."""
    return min(1 << max(m - 1, 0).bit_length(), PATH_MEASURE_MAX_M)


def choose_weight_only_path(m: int, k: int, n: int, dtype: torch.dtype) -> str:
    """Operator for ``x @ dequant(w).T`` with float activations of ``dtype``.

    bf16/fp16: ``aten._weight_int8pack_mm`` (its AVX512 kernel; K padded to a multiple of 16).
    fp32: that op only has a scalar fallback here (5120x2560, M = 1: 11 ms vs 2.6 ms for
    fp32 ``F.linear``; M = 16: 227 ms), so fp32 uses "split3": three int8 digits per
    activation, one int8 GEMM with 3M rows (5120x2560, M = 1: about 0.3 ms). Its digit
    extraction costs ~8 elementwise passes over x plus ~0.1 ms of fixed overhead, which
    only pays off against big weights. Measured (1 thread, ms, dequant / split3 / fp32):
    768x3072 M=1 1.06 / 0.16 / 0.17, M=16 11.9 / 0.75 / 1.12, M=512 28.9 / 21.8 / 28.3;
    Mamba's x_proj 1536x80 M=1 0.039 / 0.12 / 0.009, M=512 1.36 / 6.1 / 1.32. Small
    weights (< 2^20 values) therefore use "dequant", the fake-quant arithmetic itself, with
    the dequantized fp32 weight kept after the first call (at most 4 MiB per layer).
    """
    if dtype in (torch.bfloat16, torch.float16):
        return "int8pack"
    return "split3" if n * k >= SPLIT3_MIN_WEIGHT else "dequant"


# --------------------------------------------------------------------------- activation quantization


def quantize_per_token_int8_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric int8: ``(codes int8 like x, scale fp32 x.shape[:-1] + (1,))``.

    Same arithmetic as the core: fp32 ``amax / 127`` clamped to 1e-8, IEEE division,
    ``torch.round`` (half to even), clamp to ±127.
    """
    x = x.float()  # x itself if already fp32 (.float(): less call overhead than .to(torch.float32))
    scale = _dynamic_scale_(x.abs().amax(-1, True))
    return _round_dynamic_codes(x.div(scale)), scale


def quantize_per_tensor_int8_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor symmetric int8: ``(codes, scale)`` with a 0-dim fp32 scale."""
    x = x.float()
    scale = _dynamic_scale_(x.abs().amax())
    return _round_dynamic_codes(x.div(scale)), scale


def quantize_static_int8_torch(x: torch.Tensor, scale) -> torch.Tensor:
    """Symmetric int8 codes of ``x`` for a given fp32 scale: one value, or one per token."""
    x = x.to(torch.float32)
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if s.numel() == 1:
        s = s.reshape(())
    elif s.numel() * x.shape[-1] == x.numel():
        s = s.reshape(*x.shape[:-1], 1)
    else:
        raise ValueError(f"static scale must have 1 or {x.numel() // x.shape[-1]} elements, got {s.numel()}")
    return _round_codes(x / s)


def fake_quantize_int8_torch(x: torch.Tensor, scale=None, per_token: bool = True) -> torch.Tensor:
    """Quantize-dequantize to symmetric int8 in ``x.dtype``, without materializing int8 codes.

    ``scale=None``: dynamic, per token (``per_token``) or per tensor; else the given fp32
    scale (one value or one per token). Equal to ``archquant.core.formats.fake_quantize``
    with ``QuantSpec(bits=8)`` bit for bit (codes are exact in fp32), in ~7 tensor ops
    instead of ~15: this is what a real module runs for a fake-quant output quantizer.
    """
    x32 = x.to(torch.float32)
    if scale is None:
        amax = x32.abs().amax(dim=-1, keepdim=True) if per_token else x32.abs().amax()
        s = (amax / INT8_QMAX).clamp_min_(_MIN_SCALE)
    else:
        s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
        s = s.reshape(()) if s.numel() == 1 else s.reshape(*x.shape[:-1], 1)
    return (x32 / s).round_().clamp_(-INT8_QMAX, INT8_QMAX).mul_(s).to(x.dtype)


def _round_codes(t: torch.Tensor) -> torch.Tensor:
    """round half to even, clamp to the restricted range, int8 (``t`` is a fresh temporary)."""
    return t.round_().clamp_(-INT8_QMAX, INT8_QMAX).char()


def _dynamic_scale_(amax: torch.Tensor) -> torch.Tensor:
    """``max(amax / 127, 1e-8)`` in fp32, in place on the fresh ``amax``."""
    if amax.is_cuda:  # Python scalars there, as before (CUDA divides by a CPU scalar via its reciprocal either way)
        return amax.div_(INT8_QMAX).clamp_min_(_MIN_SCALE)
    return amax.div_(_QMAX_T).clamp_min_(_MIN_SCALE_T)


def _round_dynamic_codes(t: torch.Tensor) -> torch.Tensor:
    """``_round_codes`` for ``t = x / scale`` with the dynamic ``scale = max(fp32(amax / 127), 1e-8)``.

    The clamp is dropped because it cannot change anything there: fp32 division is correctly
    rounded, so ``scale >= (amax / 127)(1 - 2^-24)`` (or ``scale = 1e-8 > amax / 127``) and
    ``|x / scale| <= 127 (1 + 2^-22) < 127.5`` rounds to at most 127; NaN/inf inputs give NaN
    with or without the clamp. (Saves one elementwise op, ~1.5 us of a ~30 us decode GEMV.)
    """
    return t.round_().char()


# --------------------------------------------------------------------------- weights


class Int8Weight:
    """int8 codes (N, K) + fp32 scale (1 or N values), with cached operator-specific packings.

    The codes tensor is kept as given (it can be a module buffer); packings are derived
    data, rebuilt whenever a new ``Int8Weight`` is made (e.g. after ``.to(device)``).
    """

    def __init__(self, q: torch.Tensor, scale, zero_point=None) -> None:
        if q.dtype != torch.int8 or q.dim() != 2:
            raise TypeError(f"Int8Weight needs int8 (N, K) codes, got {q.dtype} {tuple(q.shape)}")
        self.zero = None if zero_point is None else _zero_points(zero_point, q)
        self.q = q.contiguous()
        s = torch.as_tensor(scale, device=q.device)
        if not s.is_floating_point():
            raise TypeError(f"weight scale must be a float tensor, got {s.dtype}")
        s = s.to(torch.float32).reshape(-1)
        if s.numel() not in (1, q.shape[0]):
            raise ValueError(f"weight scale must have 1 or {q.shape[0]} elements, got {s.numel()}")
        self.scale = s
        self.qt = self.q.t()  # the (K, N) view ``_int_mm`` reads; kept (making it costs ~1 us a call)
        self._shape = tuple(self.q.shape)
        self._cache: dict = {}

    @classmethod
    def from_asymmetric(cls, codes: torch.Tensor, scale, zero_point) -> "Int8Weight":
        """The core's asymmetric int8 weight (uint8 codes 0..255, zero points 0..255) as int8
        codes and zero points, both shifted by -128 (the same ``codes - zero_point``)."""
        q, z = signed_asymmetric_codes(codes, zero_point)
        return cls(q, scale, z)

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    def zero_correction(self, x_q: torch.Tensor) -> torch.Tensor:
        """``rowsum(x_q) * zero_point`` as int32 (M, N): what ``x_q @ q.T`` has beyond ``x_q @ (q - z).T``."""
        return x_q.sum(1, keepdim=True, dtype=torch.int32) * self.zero

    def fbgemm_packed(self):
        """fbgemm's prepacked weight with unit scales (built once)."""
        if "fbgemm" not in self._cache:
            self._cache["fbgemm"] = _fbgemm_pack(self.q)
        return self._cache["fbgemm"]

    def onednn_packed(self):
        """(oneDNN's prepacked weight, unit weight scales, zero points) for ``onednn::qlinear_pointwise``
        (built once)."""
        if "onednn" not in self._cache:
            n, k = self.q.shape
            packed = torch.ops.onednn.qlinear_prepack(self.q.contiguous(), [ONEDNN_MIN_M, k])
            self._cache["onednn"] = (packed, torch.ones(n), torch.zeros(n, dtype=torch.int32))
        return self._cache["onednn"]

    def int8pack(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes with K zero-padded to a multiple of 16 and the per-channel scale in ``dtype``."""
        if self.zero is not None:
            raise ValueError("the int8pack path takes symmetric weights only (no zero points)")
        key = ("int8pack", dtype)
        if key not in self._cache:
            n, k = self.q.shape
            pad = (-k) % _INT8PACK_K_MULTIPLE
            q = F.pad(self.q, (0, pad)) if pad else self.q
            self._cache[key] = (q.contiguous(), self.scale.expand(n).to(dtype).contiguous())
        return self._cache[key]

    def dequantized(self, dtype: torch.dtype, cache: bool = False) -> torch.Tensor:
        """``codes * scale`` in fp32, then ``dtype``: the fake-quant module's effective weight.

        ``cache=True`` keeps it (the "dequant" path does so for small weights only).
        """
        key = ("dequant", dtype)
        if key in self._cache:
            return self._cache[key]
        s = self.scale.reshape(-1, 1) if self.scale.numel() > 1 else self.scale.reshape(())
        q = self.q.to(torch.float32)
        if self.zero is not None:
            q = q - self.zero.reshape(-1, 1).to(torch.float32)  # exact: integers below 2^9
        w = (q * s).to(dtype)
        if cache:
            self._cache[key] = w
        return w


def signed_asymmetric_codes(codes: torch.Tensor, zero_point) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes (0..255) and zero points (0..255, integer-valued) -> int8 codes and int32 zero
    points, both minus 128."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"asymmetric int8 codes must be uint8, got {codes.dtype}")
    q = (codes.to(torch.int16) - 128).to(torch.int8)
    z = torch.as_tensor(zero_point, device=codes.device).reshape(-1)
    if z.is_floating_point() and not bool((z == torch.round(z)).all()):
        raise ValueError("zero points must be integers")
    return q, z.to(torch.int32) - 128


def _zero_points(zero_point, q: torch.Tensor) -> torch.Tensor:
    z = torch.as_tensor(zero_point, device=q.device).reshape(-1)
    if z.numel() not in (1, q.shape[0]):
        raise ValueError(f"zero point must have 1 or {q.shape[0]} elements, got {z.numel()}")
    if z.is_floating_point() and not bool((z == torch.round(z)).all()):
        raise ValueError("zero points must be integers")
    z = z.to(torch.int32)
    if z.numel() and (int(z.min()) < -128 or int(z.max()) > 127):
        raise ValueError("int8 zero points must lie in [-128, 127]")
    return z


def _as_weight(w, w_scale) -> Int8Weight:
    if isinstance(w, Int8Weight):
        if w_scale is not None:
            raise ValueError("w_scale is given by the Int8Weight; pass w_scale=None")
        return w
    if w_scale is None:
        raise ValueError("int8 weight codes need w_scale")
    return Int8Weight(w, w_scale)


# --------------------------------------------------------------------------- fbgemm


def _fbgemm_pack(q: torch.Tensor):
    n = q.shape[0]
    engine = torch.backends.quantized.engine
    with warnings.catch_warnings():  # the quantized-tensor constructors are deprecated, still shipped
        warnings.simplefilter("ignore")
        try:
            torch.backends.quantized.engine = "fbgemm"
            qw = torch._make_per_channel_quantized_tensor(
                q.contiguous(), torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.int64), 0)
            return torch.ops.quantized.linear_prepack(qw, None)
        finally:
            torch.backends.quantized.engine = engine


def _fbgemm_acc(x_q: torch.Tensor, packed) -> torch.Tensor:
    """``float(x_q @ w_q.T)`` (fp32) through fbgemm: codes + 128 as u8, exact int32 accumulation."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x_q.to(torch.float32), 1.0, 128, packed)


@functools.lru_cache(maxsize=None)
def fbgemm_available() -> bool:
    """True if fbgemm's int8 GEMM is present and exact here (checked once, on extreme codes)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        g = torch.Generator().manual_seed(0)
        k, n = 200, 24
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        w[0], w[1] = 127, -127  # all-extreme rows: a saturating u8 x s8 pair sum shows here
        x = torch.randint(-127, 128, (5, k), dtype=torch.int8, generator=g)
        x[0], x[1] = 127, -127
        acc = _fbgemm_acc(x, _fbgemm_pack(w))
        ref = (x.to(torch.int64) @ w.to(torch.int64).T).to(torch.float32)
        return bool(torch.equal(acc, ref))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


# --------------------------------------------------------------------------- oneDNN


def _onednn_acc(x_q: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """``float(x_q @ w_q.T)`` (fp32) through oneDNN's int8 linear: exact int32 accumulation, output
    scaled by 1 x 1 (unit input and weight scales, zero points 0)."""
    packed, ones, zeros = w.onednn_packed()
    return torch.ops.onednn.qlinear_pointwise(x_q, 1.0, 0, packed, ones, zeros, None, 1.0, 0, torch.float32,
                                              "none", [], "")


@functools.lru_cache(maxsize=None)
def onednn_exact() -> bool:
    """True if oneDNN's int8 linear is present and gives exactly ``float(acc)`` here (checked once,
    on extreme codes, at M below and above ``ONEDNN_MIN_M``)."""
    if not hasattr(torch.ops.onednn, "qlinear_pointwise") or not hasattr(torch.ops.onednn, "qlinear_prepack"):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        k, n = 200, 24
        w = Int8Weight(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g), torch.ones(n))
        w.q[0], w.q[1] = 127, -127
        for m in (5, ONEDNN_MIN_M + 3):
            x = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
            x[0], x[1] = 127, -127
            ref = (x.to(torch.int64) @ w.q.to(torch.int64).T).to(torch.float32)
            if not torch.equal(_onednn_acc(x, w), ref):
                return False
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


#: oneDNN's int8 linear is dispatched to only if, on the probe, it takes at most this many times
#: ``_int_mm``'s time (where it is the right kernel it is faster; where it is the wrong one, ~1000x slower)
ONEDNN_MAX_SLOWDOWN = 4.0
#: the probe: (M, K, N) of an int8 GEMM, 8 M multiply-adds (~0.2 s on oneDNN's reference kernel, ~0.3 ms on AMX)
ONEDNN_PROBE = (ONEDNN_MIN_M, 512, 256)


def onednn_probe_ratio() -> float:
    """oneDNN's time over ``_int_mm``'s on the ``ONEDNN_PROBE`` GEMM (best of a few calls each).

    oneDNN's s8 x s8 linear is only fast where it has a JIT kernel for signed activations: on
    Xeons with AMX. Elsewhere it can fall back to its reference kernel. Measured on the AMX Xeon
    with ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI`` (what a VNNI-only CPU gets), 512 x 768 x 3072:
    oneDNN 31,632 ms, ``_int_mm`` 24 ms, fp32 20 ms; on AMX: oneDNN 5.1 ms, ``_int_mm`` 48 ms. That
    fallback made a quantized mamba-130m prefill of 512 tokens 11x slower than FP32 (issue 14).
    """
    x, w = _random_product(*ONEDNN_PROBE)
    int_mm = _best_time(lambda: _int_mm_acc(x, w), 5)
    first = _best_time(lambda: _onednn_acc(x, w), 1)
    if first > ONEDNN_MAX_SLOWDOWN * 10 * int_mm:  # hopeless: do not spend more calls on it
        return first / int_mm
    return min(first, _best_time(lambda: _onednn_acc(x, w), 4, warmup=False)) / int_mm


def _random_product(m: int, k: int, n: int) -> tuple[torch.Tensor, "Int8Weight"]:
    """Seeded random int8 codes (M, K) and an int8 weight (N, K) with unit scales: what timings run on."""
    g = torch.Generator().manual_seed(0)
    w = Int8Weight(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g), torch.ones(n))
    return torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g), w


def _best_time(fn, calls: int, warmup: bool = True) -> float:
    """The shortest of ``calls`` timed calls of ``fn``, after one untimed call (oneDNN: the weight packing)."""
    if warmup:
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """True if oneDNN's int8 linear is exact here (``onednn_exact``) AND fast (``onednn_probe_ratio``
    at most ``ONEDNN_MAX_SLOWDOWN``): only then is it a candidate of ``choose_path``. Decided once per
    process. The probe is cheap where oneDNN is a reference kernel, which ``choose_path`` would
    otherwise time on full prefill shapes (seconds to minutes each)."""
    return onednn_exact() and onednn_probe_ratio() <= ONEDNN_MAX_SLOWDOWN


# --------------------------------------------------------------------------- int8 x int8


def _int_mm_acc_raw(x_q: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """``x_q @ w_q.T`` as int32 via ``torch._int_mm``; pads to the CUDA constraints if refused."""
    w_t = w.qt
    if x_q.shape[1] == 1:
        # K = 1: torch 2.13's CPU _int_mm returns uninitialised memory (size-1 dims give the
        # operands strides oneDNN misreads); a zero column makes K = 2 and the product exact.
        x_q, w_t = F.pad(x_q, (0, 1)), F.pad(w.q, (0, 1)).t()
    try:
        acc = torch._int_mm(x_q, w_t)
    except RuntimeError:
        # Not needed by the CPU build this was written on (it takes any shape), but an
        # operator build with cuBLAS-like constraints (M > 16, K and N multiples of 8)
        # gets zero padding, which leaves the integer products unchanged.
        m, k = x_q.shape
        n = w_t.shape[1]
        pk, pn, pm = (-k) % 8, (-n) % 8, max(0, 17 - m)
        acc = torch._int_mm(F.pad(x_q, (0, pk, 0, pm)), F.pad(w_t.t(), (0, pk, 0, pn)).t())[:m, :n]
    return acc


def _int_mm_acc(x_q: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """``x_q @ (w_q - zero_point).T`` as int32 (exact)."""
    acc = _int_mm_acc_raw(x_q, w)
    return acc if w.zero is None else acc.sub_(w.zero_correction(x_q))


def _acc_fp32(x_q: torch.Tensor, w: Int8Weight, path: str) -> torch.Tensor:
    """The accumulator ``x_q @ w_q.T`` as a fresh fp32 tensor (exactly ``acc_int32.to(fp32)``)."""
    if path == "fbgemm":
        if w.zero is not None:
            raise ValueError("path 'fbgemm' takes symmetric weights only (its packing has no zero points): "
                             "use 'int_mm'")
        return _fbgemm_acc(x_q, w.fbgemm_packed())
    if path == "onednn":
        if w.zero is not None:
            raise ValueError("path 'onednn' takes symmetric weights only: use 'int_mm'")
        return _onednn_acc(x_q, w)
    if path == "int_mm":
        return _int_mm_acc(x_q, w).float()  # .float(): ~1 us less call overhead than .to(torch.float32)
    raise ValueError(f"unknown CPU int8 path {path!r}: allowed 'int_mm', 'fbgemm', 'onednn'")


def _epilogue_(out: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias, out_dtype) -> torch.Tensor:
    """In place on the fp32 accumulator: ``(out * x_scale) * w_scale + bias``, then ``out_dtype``."""
    out.mul_(x_scale).mul_(w_scale)
    if bias is not None:
        out.add_(bias if bias.dtype == torch.float32 else bias.float())
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def _row_scale(x_scale, m: int, device) -> torch.Tensor:
    if (isinstance(x_scale, torch.Tensor) and x_scale.dtype == torch.float32 and x_scale.shape == (m, 1)
            and x_scale.device == device):
        return x_scale  # what the per-token quantizers return: no conversions (~3 us at M = 1)
    s = torch.as_tensor(x_scale, device=device)
    if not s.is_floating_point():
        raise TypeError(f"x_scale must be a float tensor/number, got {s.dtype}")
    s = s.to(torch.float32).reshape(-1)
    if s.numel() == 1:
        return s.reshape(())
    if s.numel() == m:
        return s.reshape(m, 1)
    raise ValueError(f"x_scale must have 1 or {m} elements, got {s.numel()}")


def _check_x(x_q: torch.Tensor, k: int) -> None:
    if x_q.dtype != torch.int8 or x_q.dim() != 2:
        raise TypeError(f"x_q must be int8 (M, K), got {x_q.dtype} {tuple(x_q.shape)}")
    if x_q.shape[1] != k:
        raise ValueError(f"K mismatch: x_q {tuple(x_q.shape)} vs weight (N, K) with K={k}")


def _cpu_path(path: str | None, m: int, k: int, n: int, w: Int8Weight) -> str:
    if path is not None:
        return path
    return "int_mm" if w.zero is not None else choose_path(m, k, n)


def _triton_linear(x_q, w: Int8Weight, x_scale, bias, out_dtype) -> torch.Tensor:
    from .w8a8_gemm import w8a8_gemm  # Triton; compiled for CUDA tensors

    if w.zero is None:
        return w8a8_gemm(x_q, w.q, x_scale, w.scale, bias, out_dtype=out_dtype)
    # the kernel has no zero points: GEMM on q, then subtract x_scale * rowsum * (w_scale * z)
    out = w8a8_gemm(x_q, w.q, x_scale, w.scale, None, out_dtype=torch.float32)
    m = x_q.shape[0]
    corr = w.zero_correction(x_q).float()
    out.sub_(corr.mul_(_row_scale(x_scale, m, x_q.device)).mul_(w.scale))
    if bias is not None:
        out.add_(bias.float())
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def int8_linear(x_q: torch.Tensor, w, x_scale, w_scale=None, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.float32, path: str | None = None) -> torch.Tensor:
    """``((x_q @ w_q.T) as fp32 * x_scale) * w_scale + bias`` as ``out_dtype``, (M, N)."""
    w = _as_weight(w, w_scale)
    n, k = w.shape
    _check_x(x_q, k)
    m = x_q.shape[0]
    if bias is not None and bias.numel() != n:
        raise ValueError(f"bias must have {n} elements, got shape {tuple(bias.shape)}")
    if x_q.is_cuda or path == "triton":
        return _triton_linear(x_q, w, x_scale, bias, out_dtype)
    if m == 0 or k == 0:
        out = torch.zeros(m, n, dtype=torch.float32, device=x_q.device)
    else:
        out = _acc_fp32(x_q.contiguous(), w, _cpu_path(path, m, k, n, w))
    return _epilogue_(out, _row_scale(x_scale, m, x_q.device), w.scale, bias, out_dtype)


def int8_linear_dynamic(x: torch.Tensor, w, w_scale=None, bias: torch.Tensor | None = None,
                        out_dtype: torch.dtype | None = None, path: str | None = None) -> torch.Tensor:
    """The whole W8A8 Linear with dynamic per-token activations, in one call, (M, N).

    Equal, bit for bit, to ``q, s = quantize_per_token_int8_torch(x)`` followed by
    ``int8_linear(q, w, s, bias=bias, out_dtype=out_dtype or x.dtype, path=path)`` (on CUDA
    it is exactly that, with the Triton quantizer): the same tensor operations, without
    the argument checks and conversions the two general entry points need. That matters at
    M = 1 on the CPU, where the whole Linear is ~12 small tensor ops of 1-2.5 us around one
    int8 GEMV of 12-17 us (1536x768, 2 threads: 27.9 us vs 29.4 us for the two calls; the
    two calls took 48.4 us before their per-op overhead was trimmed, fp32 matmul 79 us).
    ``x`` (M, K) float; ``w`` an ``Int8Weight`` or int8 (N, K) codes with ``w_scale``.
    """
    w = w if w_scale is None and isinstance(w, Int8Weight) else _as_weight(w, w_scale)
    n, k = w.shape
    shape = x.shape
    if len(shape) != 2 or shape[1] != k:
        raise ValueError(f"x must be (M, {k}), got {tuple(shape)}")
    m = shape[0]
    if out_dtype is None:
        out_dtype = x.dtype
    if x.is_cuda or path == "triton" or m == 0 or k <= 1:
        if x.is_cuda:
            from .quantize import quantize_per_token_int8  # Triton, same codes

            x_q, x_scale = quantize_per_token_int8(x)
        else:
            x_q, x_scale = quantize_per_token_int8_torch(x)
        return int8_linear(x_q, w, x_scale, bias=bias, out_dtype=out_dtype, path=path)
    if bias is not None and bias.numel() != n:
        raise ValueError(f"bias must have {n} elements, got shape {tuple(bias.shape)}")
    # quantize_per_token_int8_torch, inlined
    x = x.float()
    x_scale = x.abs().amax(-1, True).div_(_QMAX_T).clamp_min_(_MIN_SCALE_T)  # CPU here: tensor constants
    x_q = x.div(x_scale).round_().char()  # the layout of x: contiguous unless x is a strided view
    path = _cpu_path(path, m, k, n, w)
    out = None
    if path == "int_mm" and x_q.is_contiguous() and w.zero is None:
        try:
            out = torch._int_mm(x_q, w.qt).float()  # K >= 2 here: the CPU op needs no padding
        except RuntimeError:
            pass
    if out is None:
        out = _acc_fp32(x_q.contiguous(), w, path)
    out.mul_(x_scale).mul_(w.scale)  # _epilogue_, inlined
    if bias is not None:
        out.add_(bias if bias.dtype == torch.float32 else bias.float())
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def int8_linear_reference(x_q, w, x_scale, w_scale=None, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """Exact integer product (int64), then the same fp32 epilogue (unfused, out of place)."""
    w = _as_weight(w, w_scale)
    wq = w.q.to(torch.int64) - (0 if w.zero is None else w.zero.to(torch.int64).reshape(-1, 1))
    acc = (x_q.to(torch.int64) @ wq.T).to(torch.float32)
    a_s = _row_scale(x_scale, x_q.shape[0], x_q.device)
    out = (acc * a_s) * w.scale
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


# --------------------------------------------------------------------------- weight-only


def _split3_digits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (digits int8 (3M, K), scale (M, 1)): x ≈ s·(d1 + d2/254 + d3/254²).

    d1 are the per-token int8 codes of x; each next digit codes the previous remainder
    (|r| <= 0.5) at 254x resolution, so every digit lies in [-127, 127] and the error is at
    most s·0.5/254² = amax·2^-24.9 per element.
    """
    t = x.to(torch.float32)
    scale = (t.abs().amax(dim=-1, keepdim=True) / INT8_QMAX).clamp_min_(_MIN_SCALE)
    t = t / scale
    digits = torch.empty((3,) + tuple(t.shape), dtype=torch.int8, device=x.device)
    for i in range(3):
        d = torch.round(t).clamp_(-INT8_QMAX, INT8_QMAX)
        digits[i] = d.to(torch.int8)
        if i < 2:
            t.sub_(d).mul_(_SPLIT_BASE)
    return digits.reshape(-1, x.shape[-1]), scale


def int8_weight_only_linear(x: torch.Tensor, w, w_scale=None, bias: torch.Tensor | None = None,
                            path: str | None = None) -> torch.Tensor:
    """``x @ (w_q * w_scale).T + bias`` for float ``x`` (M, K); result in ``x.dtype``."""
    w = _as_weight(w, w_scale)
    n, k = w.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be (M, {k}), got {tuple(x.shape)}")
    m = x.shape[0]
    if path is None:
        path = "dequant" if x.is_cuda else choose_weight_only_path(m, k, n, x.dtype)
        if path == "int8pack" and w.zero is not None:  # aten's int8pack op has no zero points
            path = "dequant"
    if path == "dequant" or m == 0:
        small = n * k < SPLIT3_MIN_WEIGHT  # <= 4 MiB in fp32: kept, instead of converted every call
        return F.linear(x, w.dequantized(x.dtype, cache=small), None if bias is None else bias.to(x.dtype))
    if path == "int8pack":
        q, s = w.int8pack(x.dtype)
        xp = F.pad(x, (0, q.shape[1] - k)) if q.shape[1] != k else x
        y = torch.ops.aten._weight_int8pack_mm(xp.contiguous(), q, s)
        return y if bias is None else y + bias.to(y.dtype)
    if path == "split3":
        digits, scale = _split3_digits(x)
        acc = _acc_fp32(digits, w, _cpu_path(None, 3 * m, k, n, w)).view(3, m, n)
        out = acc[2].div_(_SPLIT_BASE).add_(acc[1]).div_(_SPLIT_BASE).add_(acc[0])  # Horner, fp32
        return _epilogue_(out, scale, w.scale, bias, x.dtype)
    raise ValueError(f"unknown weight-only path {path!r}: allowed {', '.join(WEIGHT_ONLY_PATHS)}")


def int8_weight_only_linear_reference(x, w, w_scale=None, bias=None) -> torch.Tensor:
    """float64 ``x @ (w_q * w_scale).T + bias``, returned as float64."""
    w = _as_weight(w, w_scale)
    s = w.scale.to(torch.float64)
    q = w.q.to(torch.float64) - (0 if w.zero is None else w.zero.to(torch.float64).reshape(-1, 1))
    wd = q * (s.reshape(-1, 1) if s.numel() > 1 else s)
    y = x.to(torch.float64) @ wd.T
    return y if bias is None else y + bias.to(torch.float64)
