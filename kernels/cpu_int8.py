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
``Int8Weight(q, scale)``
    A Linear weight as int8 codes ``q`` (N, K) and its fp32 scale (one value or one per
    output channel). Operator-specific packed copies are made on first use and cached.
``int8_linear(x_q, w, x_scale, w_scale=None, bias=None, out_dtype=torch.float32, path=None)``
    ``out = ((acc as fp32) * x_scale) * w_scale + bias`` with ``acc = x_q @ w_q.T`` exact in
    int32; ``x_q`` int8 (M, K), ``w`` an ``Int8Weight`` or int8 (N, K) codes (then ``w_scale``
    is required), ``x_scale`` (M, 1) / (M,) / one value. The epilogue is the one of
    ``kernels.w8a8_gemm`` (same operation order, fp32, one rounding to ``out_dtype``), so on
    the CPU the result equals ``int8_linear_reference`` bit for bit on every path.
``int8_weight_only_linear(x, w, bias=None, path=None)``
    ``x @ (w_q * w_scale).T + bias`` for float activations (no activation quantization).
``choose_path(m, k, n)`` / ``choose_weight_only_path(m, k, n, dtype)``
    The per-shape operator choice, with the measurements it is based on.

Paths (``path=``)
-----------------
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
import warnings

import torch
import torch.nn.functional as F

__all__ = [
    "INT8_QMAX",
    "Int8Weight",
    "quantize_per_token_int8_torch",
    "quantize_per_tensor_int8_torch",
    "quantize_static_int8_torch",
    "fake_quantize_int8_torch",
    "int8_linear",
    "int8_linear_reference",
    "int8_weight_only_linear",
    "int8_weight_only_linear_reference",
    "choose_path",
    "choose_weight_only_path",
    "fbgemm_available",
    "PATHS",
    "WEIGHT_ONLY_PATHS",
]

INT8_QMAX = 127  # restricted symmetric range, as archquant.core.formats.qrange
_MIN_SCALE = 1e-8  # archquant.core.formats._INT_MIN_SCALE
_SPLIT_BASE = 254.0  # digit base of the "split3" path: |remainder| <= 0.5 -> |digit| <= 127
_INT8PACK_K_MULTIPLE = 16  # aten._weight_int8pack_mm (bf16/fp16) is wrong, or crashes, otherwise
PATHS = ("int_mm", "fbgemm", "triton")
WEIGHT_ONLY_PATHS = ("split3", "int8pack", "dequant")

# --------------------------------------------------------------------------- decisions

#: fbgemm is chosen for 2 <= M <= FBGEMM_MAX_M on weights of at least FBGEMM_MIN_WEIGHT values,
#: and at M = 1 on weights of at least FBGEMM_M1_MIN_WEIGHT values (see ``choose_path``)
FBGEMM_MAX_M = 32
FBGEMM_MIN_WEIGHT = 1 << 21
FBGEMM_M1_MIN_WEIGHT = 1 << 24
#: smallest weight (N*K) for which fp32 weight-only layers use "split3" (see ``choose_weight_only_path``)
SPLIT3_MIN_WEIGHT = 1 << 20


def choose_path(m: int, k: int, n: int) -> str:
    """The int8 x int8 operator for an (M, K) x (K, N) product on the CPU.

    Measured with ``python -m archquant.eval.bench_cpu --paths --no-model --ms ...`` (AMD
    EPYC with AVX512-VNNI, torch 2.13 CPU, 2 threads, quiet box; median ms of the whole
    W8A8 Linear: per-token quantization + GEMM + epilogue; fp32 = ``torch.matmul``):

    ==========  ===========  =====  =====  =====  =====  =====  =====  =====
    K x N       op           M=1    2      4      16     32     64     256
    ==========  ===========  =====  =====  =====  =====  =====  =====  =====
    768x3072    fp32         0.384  0.548  0.747  0.857  1.26   2.11   7.26
                int_mm       0.113  0.181  0.192  0.300  0.294  0.645  1.84
                fbgemm       0.165  0.159  0.165  0.252  0.293  0.518  2.04
    1536x768    fp32         0.124  0.160  0.225  0.318  0.516  0.882  3.28
                int_mm       0.058  0.079  0.082  0.129  0.181  0.278  1.02
                fbgemm       0.075  0.080  0.090  0.143  0.197  0.328  1.17
    2560x10240  fp32         7.08   14.8   15.9   21.0   29.1   37.9   105
                int_mm       0.843  1.41   1.60   2.85   3.80   6.44   18.8
                fbgemm       0.589  0.647  0.848  1.84   3.16   5.55   20.7
    5120x2560   fp32         2.64   5.60   5.62   5.94   8.42   13.2   38.8
                int_mm       0.159  0.649  0.719  1.16   1.79   2.78   9.62
                fbgemm       0.178  0.185  0.228  0.993  1.40   2.52   10.1
    ==========  ===========  =====  =====  =====  =====  =====  =====  =====

    A second run agreed (M = 1: int_mm 0.130 / 0.048 / 0.667 / 0.162 vs fbgemm 0.175 /
    0.076 / 0.394 / 0.183; M = 64 to 128 within ±12 % of each other). So: at M = 1
    oneDNN's ``_int_mm`` (reading the (N, K) codes in place) wins except on the largest
    weight; for 2 <= M <= 32 fbgemm's prepacked small-M kernels win by up to 3.5x, except
    on a weight as small as 1536x768, where they are ~5-10 % slower; from M = 64 on the
    two are within noise of each other and ``_int_mm`` needs no packed copy. Both beat
    fp32 at M = 1, by 2-17x (5120x2560: 0.159 ms vs 2.64 ms, 17x).
    """
    if not fbgemm_available():
        return "int_mm"
    size = n * k
    if m == 1:
        return "fbgemm" if size >= FBGEMM_M1_MIN_WEIGHT else "int_mm"
    if m <= FBGEMM_MAX_M and size >= FBGEMM_MIN_WEIGHT:
        return "fbgemm"
    return "int_mm"


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
    x = x.to(torch.float32)
    scale = (x.abs().amax(dim=-1, keepdim=True) / INT8_QMAX).clamp_min_(_MIN_SCALE)
    return _round_codes(x / scale), scale


def quantize_per_tensor_int8_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor symmetric int8: ``(codes, scale)`` with a 0-dim fp32 scale."""
    x = x.to(torch.float32)
    scale = (x.abs().amax() / INT8_QMAX).clamp_min(_MIN_SCALE)
    return _round_codes(x / scale), scale


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
    return t.round_().clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)


# --------------------------------------------------------------------------- weights


class Int8Weight:
    """int8 codes (N, K) + fp32 scale (1 or N values), with cached operator-specific packings.

    The codes tensor is kept as given (it can be a module buffer); packings are derived
    data, rebuilt whenever a new ``Int8Weight`` is made (e.g. after ``.to(device)``).
    """

    def __init__(self, q: torch.Tensor, scale) -> None:
        if q.dtype != torch.int8 or q.dim() != 2:
            raise TypeError(f"Int8Weight needs int8 (N, K) codes, got {q.dtype} {tuple(q.shape)}")
        self.q = q.contiguous()
        s = torch.as_tensor(scale, device=q.device)
        if not s.is_floating_point():
            raise TypeError(f"weight scale must be a float tensor, got {s.dtype}")
        s = s.to(torch.float32).reshape(-1)
        if s.numel() not in (1, q.shape[0]):
            raise ValueError(f"weight scale must have 1 or {q.shape[0]} elements, got {s.numel()}")
        self.scale = s
        self._cache: dict = {}

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def fbgemm_packed(self):
        """fbgemm's prepacked weight with unit scales (built once)."""
        if "fbgemm" not in self._cache:
            self._cache["fbgemm"] = _fbgemm_pack(self.q)
        return self._cache["fbgemm"]

    def int8pack(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes with K zero-padded to a multiple of 16 and the per-channel scale in ``dtype``."""
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
        w = (self.q.to(torch.float32) * s).to(dtype)
        if cache:
            self._cache[key] = w
        return w


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


# --------------------------------------------------------------------------- int8 x int8


def _int_mm_acc(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """``x_q @ w_q.T`` as int32 via ``torch._int_mm``; pads to the CUDA constraints if refused."""
    if x_q.shape[1] == 1:
        # K = 1: torch 2.13's CPU _int_mm returns uninitialised memory (size-1 dims give the
        # operands strides oneDNN misreads); a zero column makes K = 2 and the product exact.
        x_q, w_q = F.pad(x_q, (0, 1)), F.pad(w_q, (0, 1))
    try:
        return torch._int_mm(x_q, w_q.t())
    except RuntimeError:
        # Not needed by the CPU build this was written on (it takes any shape), but an
        # operator build with cuBLAS-like constraints (M > 16, K and N multiples of 8)
        # gets zero padding, which leaves the integer products unchanged.
        m, k = x_q.shape
        n = w_q.shape[0]
        pk, pn, pm = (-k) % 8, (-n) % 8, max(0, 17 - m)
        acc = torch._int_mm(F.pad(x_q, (0, pk, 0, pm)), F.pad(w_q, (0, pk, 0, pn)).t())
        return acc[:m, :n]


def _acc_fp32(x_q: torch.Tensor, w: Int8Weight, path: str) -> torch.Tensor:
    """The accumulator ``x_q @ w_q.T`` as a fresh fp32 tensor (exactly ``acc_int32.to(fp32)``)."""
    if path == "fbgemm":
        return _fbgemm_acc(x_q, w.fbgemm_packed())
    if path == "int_mm":
        return _int_mm_acc(x_q, w.q).to(torch.float32)
    raise ValueError(f"unknown CPU int8 path {path!r}: allowed 'int_mm', 'fbgemm'")


def _epilogue_(out: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias, out_dtype) -> torch.Tensor:
    """In place on the fp32 accumulator: ``(out * x_scale) * w_scale + bias``, then ``out_dtype``."""
    out.mul_(x_scale).mul_(w_scale)
    if bias is not None:
        out.add_(bias.to(torch.float32))
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def _row_scale(x_scale, m: int, device) -> torch.Tensor:
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
        from .w8a8_gemm import w8a8_gemm  # Triton; compiled for CUDA tensors

        return w8a8_gemm(x_q, w.q, x_scale, w.scale, bias, out_dtype=out_dtype)
    if m == 0 or k == 0:
        out = torch.zeros(m, n, dtype=torch.float32, device=x_q.device)
    else:
        out = _acc_fp32(x_q.contiguous(), w, path or choose_path(m, k, n))
    return _epilogue_(out, _row_scale(x_scale, m, x_q.device), w.scale, bias, out_dtype)


def int8_linear_reference(x_q, w, x_scale, w_scale=None, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """Exact integer product (int64), then the same fp32 epilogue (unfused, out of place)."""
    w = _as_weight(w, w_scale)
    acc = (x_q.to(torch.int64) @ w.q.to(torch.int64).T).to(torch.float32)
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
    path = path or ("dequant" if x.is_cuda else choose_weight_only_path(m, k, n, x.dtype))
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
        acc = _acc_fp32(digits, w, choose_path(3 * m, k, n)).view(3, m, n)
        out = acc[2].div_(_SPLIT_BASE).add_(acc[1]).div_(_SPLIT_BASE).add_(acc[0])  # Horner, fp32
        return _epilogue_(out, scale, w.scale, bias, x.dtype)
    raise ValueError(f"unknown weight-only path {path!r}: allowed {', '.join(WEIGHT_ONLY_PATHS)}")


def int8_weight_only_linear_reference(x, w, w_scale=None, bias=None) -> torch.Tensor:
    """float64 ``x @ (w_q * w_scale).T + bias``, returned as float64."""
    w = _as_weight(w, w_scale)
    s = w.scale.to(torch.float64)
    wd = w.q.to(torch.float64) * (s.reshape(-1, 1) if s.numel() > 1 else s)
    y = x.to(torch.float64) @ wd.T
    return y if bias is None else y + bias.to(torch.float64)
