"""CPU int8 backend: archquant/kernels/cpu_int8.py (int8 GEMM paths, weight-only paths, activation
quantization) and archquant/backends/real.py (RealQuantLinear, convert_to_real, runner backend=real).

Tolerances, and why:
* int8 x int8 paths (``int_mm``, ``fbgemm``): bit-identical to the exact reference (int64
  product, then the same fp32 epilogue), because the int32 accumulator is exact and the
  epilogue does the same fp32 operations in the same order.
* ``split3`` weight-only: the activation is represented to amax·2^-24.9, about fp32
  resolution, so it is compared to a float64 reference at 1e-5 · max|y|.
* RealQuantLinear vs its fake-quant twin (fp32): both multiply the same integer codes; only
  the fake module's fp32 summation differs, so max|Δ| <= 1e-4 · max|y|.
* whole models: a last-ulp difference can move an activation that sits on a rounding
  boundary of a *later* quantizer by one code (with per-token dynamic output quantizers a
  1-ulp change of a token's amax moves its whole grid). Measured on the tiny Mamba1: static
  recipes (quamba) 3e-7 · max|logits|; rtn_dynamic 2e-3 (one code of layer 0's in_proj
  output quantizer flipped, then carried along the sequence by the scan). So logits must
  satisfy ||real - fake|| <= 1e-2 · ||fake|| and <= 0.1 · ||fake - FP||: the backend's
  difference is an order of magnitude below the quantization error itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import archquant as aq
from archquant.core.formats import QuantSpec
from archquant.core.modules import ActQuantizer, QuantConv1d, QuantLinear
from archquant.core.transforms import HadamardTransform
from archquant.kernels import cpu_int8 as K
from archquant.kernels.cpu_int8 import (Int8Weight, choose_path, choose_weight_only_path, fbgemm_available,
                                        int8_linear, onednn_available, onednn_exact, int8_linear_reference,
                                        int8_weight_only_linear,
                                        int8_weight_only_linear_reference, quantize_per_tensor_int8_torch,
                                        quantize_per_token_int8_torch, quantize_static_int8_torch)
from archquant.kernels.quantize import quantize_per_token_int8_reference, quantize_static_int8_reference
from archquant.models.mamba import MambaLM
from archquant.models.toy import ToyConfig, init_toy_model, toy_task
from archquant.backends.mamba import RealQuantMamba1Mixer
from archquant.backends import RealQuantLinear, convert_to_real, real_eligibility
from archquant.run import main

from conftest import perturbed_mamba

ROOT = Path(__file__).resolve().parent.parent
CPU_PATHS = ["int_mm"] + (["fbgemm"] if fbgemm_available() else []) + (["onednn"] if onednn_exact() else [])
MODEL_TOL = 1e-2  # whole-model logits, relative Frobenius error (see the module docstring)
LINEAR_TOL = 1e-4  # one RealQuantLinear vs its fake twin, fp32, relative to max|y|


pytestmark = pytest.mark.usefixtures("single_thread")


def _codes(*shape, seed=0):
    return torch.randint(-127, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


def _rel_max(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _assert_model_close(real, fake, fp):
    err = ((real - fake).norm() / fake.norm()).item()
    quant_err = ((fake - fp).norm() / fake.norm()).item()
    assert err <= MODEL_TOL and err <= 0.1 * quant_err, (err, quant_err)


# ----------------------------------------------------------------------------------------
# int8 x int8
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CPU_PATHS + [None])
@pytest.mark.parametrize("m", [1, 3, 17, 33])
@pytest.mark.parametrize("k,n", [(17, 9), (40, 33), (1, 5), (100, 24), (64, 1)])
def test_int8_linear_is_exact_for_odd_shapes(path, m, k, n):
    x_q, w_q = _codes(m, k, seed=m), _codes(n, k, seed=k + n)
    g = torch.Generator().manual_seed(1)
    x_s, w_s, bias = torch.rand(m, 1, generator=g) + 0.01, torch.rand(n, generator=g) + 0.01, torch.randn(n, generator=g)
    for b in (None, bias):
        y = int8_linear(x_q, w_q, x_s, w_s, bias=b, path=path)
        assert y.shape == (m, n) and y.dtype == torch.float32
        assert torch.equal(y, int8_linear_reference(x_q, w_q, x_s, w_s, bias=b))
    # the integer part alone, against int64 (scales 1, no bias)
    acc = int8_linear(x_q, w_q, 1.0, torch.ones(n), path=path)
    assert torch.equal(acc, (x_q.long() @ w_q.long().T).float())


@pytest.mark.parametrize("path", CPU_PATHS)
def test_epilogue_matches_the_triton_kernels_reference(path):
    """Same epilogue as archquant/kernels/w8a8_gemm (fp32, (acc·a)·b + bias, one rounding), incl. bf16/fp16 out."""
    from archquant.kernels.w8a8_gemm import w8a8_gemm_reference

    x_q, w_q = _codes(5, 72), _codes(19, 72, seed=3)
    bias = torch.randn(19)
    for x_s, w_s in [(torch.rand(5, 1) * 1e-2, torch.rand(19) * 1e-2), (torch.tensor(0.03), torch.tensor(0.002)),
                     (0.5, torch.rand(19))]:
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
            y = int8_linear(x_q, w_q, x_s, w_s, bias=bias, out_dtype=out_dtype, path=path)
            ref = w8a8_gemm_reference(x_q, w_q, x_s, w_s, bias=bias, out_dtype=out_dtype)
            assert y.dtype == out_dtype and torch.equal(y, ref)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_accumulator_beyond_fp32_integers_rounds_like_the_reference(path):
    """|acc| up to 127²·3000 > 2²⁴: the int32 sum is exact and its fp32 cast rounds as the reference's."""
    k = 3000
    x_q = torch.full((2, k), 127, dtype=torch.int8)
    x_q[1, ::2] = -127
    w_q = torch.cat([torch.full((1, k), 127, dtype=torch.int8), torch.full((1, k), -127, dtype=torch.int8),
                     _codes(3, k)])
    w_q[2, 7] = 126  # makes the sum odd, so the fp32 cast has to round
    y = int8_linear(x_q, w_q, 1.0, torch.ones(5), path=path)
    assert torch.equal(y, (x_q.long() @ w_q.long().T).float())


def _asymmetric_weight(n, k, seed=0, per_channel=True):
    """The core's asymmetric int8 layout: uint8 codes 0..255, integer zero points 0..255 (the
    extremes included, so the shifted int8 codes reach -128 and the correction |z - 128| = 128)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=g)
    codes[:3, 0] = torch.tensor([0, 255, 128], dtype=torch.uint8)[:n]
    zero = torch.randint(0, 256, (n if per_channel else 1,), generator=g).float()
    zero[0] = 0.0
    if per_channel and n > 1:
        zero[1] = 255.0
    scale = torch.rand(n if per_channel else 1, generator=g) * 1e-2 + 1e-4
    return codes, zero, scale


@pytest.mark.parametrize("path", ["int_mm", None])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("m,k,n", [(1, 17, 9), (5, 100, 24), (33, 1, 5)])
def test_asymmetric_weights_give_the_exact_integer_product(path, per_channel, m, k, n):
    """x_q @ (c - z).T with the core's uint8 codes c and zero points z, exactly (int64 reference),
    and the same epilogue as a symmetric weight."""
    codes, zero, scale = _asymmetric_weight(n, k, seed=k, per_channel=per_channel)
    w = Int8Weight.from_asymmetric(codes, scale, zero)
    assert w.q.dtype == torch.int8 and int(w.q.min()) >= -128
    want_w = codes.long() - zero.long().reshape(-1, 1)
    assert torch.equal(w.q.long() - w.zero.long().reshape(-1, 1), want_w)  # the shift changes no c - z
    x_q = _codes(m, k, seed=m)
    x_q[0, 0] = -127
    unit = Int8Weight.from_asymmetric(codes, torch.ones_like(scale), zero)
    acc = int8_linear(x_q, unit, 1.0, path=path)
    assert torch.equal(acc, (x_q.long() @ want_w.T).float())
    x_s, bias = torch.rand(m, 1) + 0.01, torch.randn(n)
    y = int8_linear(x_q, w, x_s, bias=bias, path=path)
    assert torch.equal(y, int8_linear_reference(x_q, w, x_s, bias=bias))
    assert torch.equal(w.dequantized(torch.float32),
                       (codes.float() - zero.reshape(-1, 1)) * scale.reshape(-1, 1))  # the core's dequantize


def test_asymmetric_weights_on_the_other_paths():
    codes, zero, scale = _asymmetric_weight(24, 100, seed=5)
    w = Int8Weight.from_asymmetric(codes, scale, zero)
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(24)
    ref = int8_weight_only_linear_reference(x, w, bias=bias)
    assert _rel_max(int8_weight_only_linear(x, w, bias=bias, path="split3"), ref) <= 1e-5
    assert _rel_max(int8_weight_only_linear(x, w, bias=bias, path="dequant"), ref) <= 1e-6
    assert int8_weight_only_linear(x.bfloat16(), w, bias=bias).dtype == torch.bfloat16  # auto: not int8pack
    with pytest.raises(ValueError, match="int8pack path takes symmetric weights"):
        int8_weight_only_linear(x.bfloat16(), w, bias=bias, path="int8pack")
    with pytest.raises(ValueError, match="'fbgemm' takes symmetric weights"):
        int8_linear(_codes(3, 100), w, 1.0, path="fbgemm")
    y = K.int8_linear_dynamic(x, w, bias=bias)  # per-token quantize + GEMM in one call
    x_q, x_s = quantize_per_token_int8_torch(x)
    assert torch.equal(y, int8_linear(x_q, w, x_s, bias=bias))
    with pytest.raises(ValueError, match="zero points must be integers"):
        Int8Weight.from_asymmetric(codes, scale, zero + 0.5)
    with pytest.raises(TypeError, match="must be uint8"):
        Int8Weight.from_asymmetric(codes.to(torch.int8), scale, zero)


def test_path_choice_is_a_measured_candidate_kept_per_shape():
    for m, k, n in ((1, 768, 3072), (4, 5120, 2560), (K.ONEDNN_MIN_M, 768, 3072), (1024, 1536, 768)):
        path = choose_path(m, k, n)
        assert path in K.path_candidates(m) and K._MEASURED_PATHS[(K.m_bucket(m), k, n)] == path
        assert choose_path(m, k, n) == path  # kept, not measured again
    assert "onednn" not in K.path_candidates(K.ONEDNN_MIN_M - 1)  # small M never takes oneDNN
    assert K.m_bucket(1) == 1 and K.m_bucket(3) == 4 and K.m_bucket(64) == 64 and K.m_bucket(65) == 128
    assert K.m_bucket(10**6) == K.PATH_MEASURE_MAX_M


def test_a_slow_onednn_is_not_a_candidate(monkeypatch):
    """oneDNN's s8 x s8 linear falls back to a reference kernel on CPUs without AMX (issue 14: a
    512-token prefill 11x slower than FP32); the probe keeps such a oneDNN out of the candidates."""
    monkeypatch.setattr(K, "onednn_exact", lambda: True)
    for ratio, allowed in ((2000.0, False), (0.5, True)):
        monkeypatch.setattr(K, "onednn_probe_ratio", lambda r=ratio: r)
        K.onednn_available.cache_clear()
        try:
            assert K.onednn_available() is allowed
            assert ("onednn" in K.path_candidates(512)) is allowed and "onednn" not in K.path_candidates(4)
        finally:
            K.onednn_available.cache_clear()


def test_the_fastest_candidate_is_chosen_per_shape(monkeypatch):
    """Stand-in kernels, each slow on purpose for some shapes: the measured choice follows them, per
    (M bucket, K, N), and a bucket is measured once. (On the AMX Xeon, the real cases: oneDNN took
    166 ms for M = 2048, K = 12 against 0.39 ms for _int_mm; fbgemm is 1.8x _int_mm on a 768 x 3072 GEMV.)"""
    import time as clock

    def kernel(slow_ks):
        def gemm(x, w):
            if x.shape[1] in slow_ks:
                clock.sleep(0.005)
            return (x.to(torch.int32) @ w.q.to(torch.int32).T).float()
        return gemm

    runs = []

    def acc(x, w, path):
        runs.append((path, x.shape[0], x.shape[1]))
        return {"onednn": kernel({12}), "int_mm": kernel({64, 96}), "fbgemm": kernel({12, 64})}[path](x, w)

    monkeypatch.setattr(K, "_acc_fp32", acc)
    monkeypatch.setattr(K, "_MEASURED_PATHS", {})
    monkeypatch.setattr(K, "onednn_available", lambda: True)
    monkeypatch.setattr(K, "fbgemm_available", lambda: True)
    assert choose_path(1500, 12, 40) == "int_mm"  # oneDNN and fbgemm slow there
    assert choose_path(100, 64, 32) == "onednn"  # _int_mm and fbgemm slow
    assert choose_path(1, 96, 32) == "fbgemm"  # oneDNN is no candidate at M = 1; _int_mm slow
    assert set(K._MEASURED_PATHS) == {(2048, 12, 40), (128, 64, 32), (1, 96, 32)}
    n = len(runs)
    assert choose_path(2000, 12, 40) == "int_mm" and choose_path(65, 64, 32) == "onednn" and len(runs) == n


def test_the_probe_times_both_kernels_on_real_calls(monkeypatch):
    calls = {"onednn": 0, "int_mm": 0}
    onednn, int_mm = K._onednn_acc, K._int_mm_acc
    monkeypatch.setattr(K, "_onednn_acc", lambda *a: (calls.__setitem__("onednn", calls["onednn"] + 1), onednn(*a))[1]
                        if onednn_exact() else int_mm(*a))
    monkeypatch.setattr(K, "_int_mm_acc", lambda *a: (calls.__setitem__("int_mm", calls["int_mm"] + 1), int_mm(*a))[1])
    ratio = K.onednn_probe_ratio()
    assert ratio > 0 and calls["int_mm"] == 6 and calls["onednn"] in ((2, 6) if onednn_exact() else (0,))


@pytest.mark.skipif(not fbgemm_available(), reason="fbgemm not usable here")
@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_gemv_path_equals_its_reference(m):
    """The decode (small-M) path: fbgemm's prepacked int8 GEMM, with a packed weight reused across calls."""
    w = Int8Weight(_codes(2560, 512, seed=5), torch.rand(2560) * 1e-3)
    for seed in range(2):
        x_q = _codes(m, 512, seed=seed)
        x_s = torch.rand(m, 1) * 0.1
        y = int8_linear(x_q, w, x_s, path="fbgemm")
        assert torch.equal(y, int8_linear_reference(x_q, w, x_s))
    assert "fbgemm" in w._cache  # packed once, reused


def test_int8_linear_input_checks():
    w = _codes(4, 8)
    with pytest.raises(ValueError, match="need w_scale"):
        int8_linear(_codes(2, 8), w, 1.0)
    with pytest.raises(ValueError, match="K mismatch"):
        int8_linear(_codes(2, 9), w, 1.0, 1.0)
    with pytest.raises(TypeError, match="int8"):
        int8_linear(torch.zeros(2, 8), w, 1.0, 1.0)
    with pytest.raises(ValueError, match="x_scale must have 1 or 2"):
        int8_linear(_codes(2, 8), w, torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="unknown CPU int8 path"):
        int8_linear(_codes(2, 8), w, 1.0, 1.0, path="mkl")
    assert int8_linear(_codes(0, 8), w, torch.ones(0), 1.0).shape == (0, 4)


def _dynamic_reference(x, w_q, w_s, bias=None, out_dtype=torch.float32):
    """The core's per-token codes and scale, then the exact int64 product and the fp32 epilogue."""
    x_q, x_s = quantize_per_token_int8_reference(x)
    return int8_linear_reference(x_q, w_q, x_s, w_s, bias=bias, out_dtype=out_dtype)


@pytest.mark.parametrize("path", CPU_PATHS + [None])
@pytest.mark.parametrize("m", [1, 3, 17, 33])
@pytest.mark.parametrize("k,n", [(17, 9), (40, 33), (1, 5), (100, 24), (64, 1)])
def test_int8_linear_dynamic_is_exact(path, m, k, n):
    """The fused W8A8 Linear (per-token quantization + GEMM + epilogue) = core quantizer + exact reference."""
    g = torch.Generator().manual_seed(m * 100 + k)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 1, k)
    x[0, :] = 0.0  # an all-zero token: clamped scale, zero row
    w_q, w_s, bias = _codes(n, k, seed=k + n), torch.rand(n, generator=g) * 1e-2, torch.randn(n, generator=g)
    w = Int8Weight(w_q, w_s)
    for b in (None, bias):
        y = K.int8_linear_dynamic(x, w, bias=b, path=path)
        assert y.shape == (m, n) and y.dtype == torch.float32
        assert torch.equal(y, _dynamic_reference(x, w_q, w_s, bias=b))
        q, s = quantize_per_token_int8_torch(x)  # and the two-call form it replaces
        assert torch.equal(y, int8_linear(q, w, s, bias=b, path=path))
    # raw codes + w_scale; a transposed (non-contiguous) x; bf16 in and out
    assert torch.equal(K.int8_linear_dynamic(x, w_q, w_s, path=path), _dynamic_reference(x, w_q, w_s))
    xt = x.t().contiguous().t()
    assert not xt.is_contiguous() or m == 1 or k == 1
    assert torch.equal(K.int8_linear_dynamic(xt, w, bias=bias, path=path), _dynamic_reference(x, w_q, w_s, bias))
    xb = x.bfloat16()
    yb = K.int8_linear_dynamic(xb, w, bias=bias, path=path)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, _dynamic_reference(xb, w_q, w_s, bias, torch.bfloat16))


@pytest.mark.parametrize("k,n", [(1536, 768), (768, 3072), (1000, 250)])
def test_int8_linear_dynamic_decode_shapes(k, n):
    """M = 1 at the benchmarked Mamba widths (and a K that is not a multiple of 16), every path."""
    g = torch.Generator().manual_seed(k)
    w_q, w_s = _codes(n, k, seed=n), torch.rand(n, generator=g) * 1e-3
    w = Int8Weight(w_q, w_s)
    for seed in range(3):
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(seed)) * 10 ** (seed - 1)
        ref = _dynamic_reference(x, w_q, w_s)
        for path in CPU_PATHS + [None]:
            assert torch.equal(K.int8_linear_dynamic(x, w, path=path), ref)


def test_int8_linear_dynamic_input_checks():
    w = Int8Weight(_codes(4, 8), torch.ones(4))
    with pytest.raises(ValueError, match=r"x must be \(M, 8\)"):
        K.int8_linear_dynamic(torch.zeros(2, 9), w)
    with pytest.raises(ValueError, match="bias must have 4"):
        K.int8_linear_dynamic(torch.zeros(2, 8), w, bias=torch.zeros(3))
    with pytest.raises(ValueError, match="need w_scale"):
        K.int8_linear_dynamic(torch.zeros(2, 8), _codes(4, 8))
    with pytest.raises(ValueError, match="unknown CPU int8 path"):
        K.int8_linear_dynamic(torch.ones(2, 8), w, path="mkl")
    assert K.int8_linear_dynamic(torch.zeros(0, 8), w).shape == (0, 4)


def test_int8_weight_keeps_the_transposed_view():
    q = _codes(5, 3)
    w = Int8Weight(q, torch.ones(5))
    assert w.shape == (5, 3) and w.qt.shape == (3, 5) and w.qt.data_ptr() == w.q.data_ptr()
    assert torch.equal(w.qt, q.t())


# ----------------------------------------------------------------------------------------
# activation quantization (torch versions) vs the core
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_quantizers_match_the_core_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 7, 33, generator=g) * torch.logspace(-3, 2, 33)).to(dtype)
    x[0, 0] = 0.0  # an all-zero token: clamped scale
    q, s = quantize_per_token_int8_torch(x)
    q_ref, s_ref = quantize_per_token_int8_reference(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref) and s.shape == (3, 7, 1)
    for scale in (torch.tensor(0.37), torch.rand(3, 7, 1) + 0.1):
        assert torch.equal(quantize_static_int8_torch(x, scale), quantize_static_int8_reference(x, scale))
    spec = QuantSpec(bits=8, granularity="tensor")
    q, s = quantize_per_tensor_int8_torch(x)
    params = aq.core.formats.params_from_tensor(x, spec)
    assert torch.equal(s, params["scale"]) and torch.equal(q, aq.core.formats.quantize(x, spec, params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_int8_torch_matches_the_core(dtype):
    from archquant.core.formats import fake_quantize

    x = (torch.randn(4, 9, 40, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    token, tensor = QuantSpec(bits=8, granularity="token"), QuantSpec(bits=8, granularity="tensor")
    assert torch.equal(K.fake_quantize_int8_torch(x), fake_quantize(x, token))
    assert torch.equal(K.fake_quantize_int8_torch(x, per_token=False), fake_quantize(x, tensor))
    s = torch.tensor(0.021)
    assert torch.equal(K.fake_quantize_int8_torch(x, s), fake_quantize(x, tensor, {"scale": s}))


def test_dynamic_quantizers_need_no_clamp_at_the_range_edge():
    """The dynamic quantizers skip the clamp to ±127 (|x / scale| < 127.5 by construction): check
    against the core, which clamps, on the token maximum itself across the whole fp32 range
    (normal, subnormal, near the clamped 1e-8 scale, near fp32 max), and on values 1 ulp from it."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0x00000001, 0x7F7FFFFF, (20000,), generator=g, dtype=torch.int64).to(torch.int32)
    amax = bits.view(torch.float32)
    edges = torch.tensor([1.27e-6, 1.2699999e-6, 1.2700001e-6, 127.0, 1.0, 3.4028235e38, 1e-45, 0.0])
    amax = torch.cat([amax, edges])
    below = torch.nextafter(amax, torch.zeros(()))
    x = torch.stack([amax, -amax, below, -below, amax * 0.5, amax * (126.5 / 127)], dim=1)
    x = x * torch.where(torch.rand(x.shape[0], 1, generator=g) < 0.5, 1.0, -1.0)
    q, s = quantize_per_token_int8_torch(x)
    q_ref, s_ref = quantize_per_token_int8_reference(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert q.abs().max().item() == 127
    spec = QuantSpec(bits=8, granularity="tensor")
    for row in (x[:50], x[-8:-1], x[-2:-1]):
        q, s = quantize_per_tensor_int8_torch(row)
        params = aq.core.formats.params_from_tensor(row, spec)
        assert torch.equal(s, params["scale"]) and torch.equal(q, aq.core.formats.quantize(row, spec, params))


def test_ties_round_half_to_even_and_clamp():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 127.5, 300.0, -300.0]])
    q = quantize_static_int8_torch(x, 1.0)
    assert q.tolist() == [[0, 2, 2, 0, -2, 126, 127, 127, -127]]
    assert torch.equal(q, quantize_static_int8_reference(x, 1.0))


# ----------------------------------------------------------------------------------------
# weight-only
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n", [(1, 17, 9), (3, 100, 24), (17, 48, 33), (33, 64, 7)])
def test_weight_only_paths(m, k, n):
    g = torch.Generator().manual_seed(m + k)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 1, k)  # uneven channels
    w = Int8Weight(_codes(n, k, seed=n), torch.rand(n, generator=g) * 1e-2)
    bias = torch.randn(n, generator=g)
    ref = int8_weight_only_linear_reference(x, w, bias=bias)
    # split3: x to ~2^-25·amax, products exact, fp32 combination
    y = int8_weight_only_linear(x, w, bias=bias, path="split3")
    assert y.dtype == torch.float32 and _rel_max(y, ref) <= 1e-5
    # dequant: the fake-quant module's arithmetic (dequantize in fp32, F.linear)
    y = int8_weight_only_linear(x, w, bias=bias, path="dequant")
    assert torch.equal(y, torch.nn.functional.linear(x, w.dequantized(torch.float32), bias))
    # int8pack (bf16): K is padded to a multiple of 16 (unpadded, torch's op is wrong for these K)
    y = int8_weight_only_linear(x.bfloat16(), w, bias=bias, path="int8pack")
    assert y.dtype == torch.bfloat16 and _rel_max(y, ref) <= 2e-2


def test_weight_only_choice():
    assert choose_weight_only_path(1, 5120, 2560, torch.float32) == "split3"
    assert choose_weight_only_path(512, 1536, 80, torch.float32) == "dequant"
    assert choose_weight_only_path(1, 5120, 2560, torch.bfloat16) == "int8pack"


# ----------------------------------------------------------------------------------------
# RealQuantLinear vs its fake-quant twin
# ----------------------------------------------------------------------------------------


def _quant_linear(act: str | None, hadamard: bool, w_gran: str = "channel", k: int = 64, n: int = 48,
                  seed: int = 0, w_symmetric: bool = True) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(n, generator=g))
    inq = None
    if act == "token":
        inq = ActQuantizer(QuantSpec(bits=8, granularity="token"), dynamic=True)
    elif act == "tensor_dynamic":
        inq = ActQuantizer(QuantSpec(bits=8, granularity="tensor"), dynamic=True)
    elif act == "static":
        inq = ActQuantizer(QuantSpec(bits=8, granularity="tensor"))
    q = QuantLinear.from_float(lin, weight_spec=QuantSpec(bits=8, granularity=w_gran, symmetric=w_symmetric),
                               input_quantizer=inq,
                               input_transform=HadamardTransform(k, seed=3) if hadamard else None)
    q.freeze_weight()
    if act == "static":
        inq.mode = "calibrate"
        q(torch.randn(64, k, generator=g) * 2)
        inq.freeze()
    return q


@pytest.mark.parametrize("hadamard", [False, True])
@pytest.mark.parametrize("act", ["token", "static", "tensor_dynamic", None])
@pytest.mark.parametrize("w_gran", ["channel", "tensor", "channel-asymmetric", "tensor-asymmetric"])
def test_real_linear_matches_fake_twin(act, hadamard, w_gran):
    gran, _, asym = w_gran.partition("-")
    fake = _quant_linear(act, hadamard, gran, w_symmetric=not asym)
    real = RealQuantLinear(fake)
    assert real.weight_q.dtype == torch.int8 and (real.weight_zero is None) == (not asym)
    for m in (1, 5, 40):  # decode-sized and prefill-sized inputs, 3-D
        x = torch.randn(2, m, 64, generator=torch.Generator().manual_seed(m)) * 2
        with torch.no_grad():
            y_fake, y_real = fake(x), real(x)
        assert y_real.shape == y_fake.shape == (2, m, 48)
        assert (y_real - y_fake).abs().max() <= LINEAR_TOL * y_fake.abs().max()


@pytest.mark.parametrize("out", ["token", "static"])
@pytest.mark.parametrize("act", ["token", None])
def test_real_linear_output_quantizer(act, out):
    """Output fake-quant on top: same grid as the fake twin; an output that the fp32 summation
    order moves across a rounding boundary may land one step (= its scale) away, nothing more."""
    fake = _quant_linear(act, False)
    fake.output_quantizer = ActQuantizer(QuantSpec(bits=8, granularity="token" if out == "token" else "tensor"),
                                         dynamic=out == "token")
    x = torch.randn(3, 30, 64, generator=torch.Generator().manual_seed(4)) * 2
    if out == "static":
        fake.output_quantizer.mode = "calibrate"
        fake(x)
        fake.output_quantizer.freeze()
    real = RealQuantLinear(fake)
    assert real.out_kind == ("dynamic_token" if out == "token" else "static_tensor")
    with torch.no_grad():
        y_fake, y_real = fake(x), real(x)
    step = (y_fake.abs().amax(-1, keepdim=True) if out == "token" else y_fake.abs().amax()) / 127
    diff = (y_real - y_fake).abs()
    assert (diff <= 1.001 * step).all()
    assert (diff > 1e-4 * step).float().mean() <= 0.01


def test_real_linear_weight_only_big_layer_uses_split3_and_matches():
    fake = _quant_linear(None, False, k=1024, n=1024)
    real = RealQuantLinear(fake)
    x = torch.randn(3, 1024)
    with torch.no_grad():
        assert (real(x) - fake(x)).abs().max() <= LINEAR_TOL * fake(x).abs().max()
    assert choose_weight_only_path(3, 1024, 1024, torch.float32) == "split3"


def test_real_linear_bf16_activations():
    fake = _quant_linear("token", True)
    real = RealQuantLinear(fake)
    x = torch.randn(4, 64).bfloat16()
    y_real = real(x)
    assert y_real.dtype == torch.bfloat16
    # the fake module computes in bf16; the real one accumulates exactly and rounds once
    assert _rel_max(y_real, fake(x.float())) <= 1e-2


def test_eligibility_reasons():
    w4 = QuantLinear.from_float(nn.Linear(32, 8), weight_spec=QuantSpec(bits=4, granularity="channel"))
    asym = QuantLinear.from_float(nn.Linear(32, 8), weight_spec=QuantSpec(bits=8, symmetric=False))
    group = QuantLinear.from_float(nn.Linear(32, 8), weight_spec=QuantSpec(bits=8, granularity="group", group_size=16))
    fp8_act = QuantLinear.from_float(nn.Linear(32, 8), weight_spec=QuantSpec(bits=8),
                                     input_quantizer=ActQuantizer(QuantSpec(format="fp8_e4m3"), dynamic=True))
    asym_act = QuantLinear.from_float(nn.Linear(32, 8), weight_spec=QuantSpec(bits=8),
                                      input_quantizer=ActQuantizer(QuantSpec(bits=8, symmetric=False), dynamic=True))
    for m in (w4, asym, group, fp8_act, asym_act):
        m.freeze_weight()
    assert "int4" in real_eligibility(w4)
    assert real_eligibility(asym) is None  # asymmetric int8 weights: zero-point correction (MambaQuant's)
    assert "needs symmetric int8" in real_eligibility(asym_act)
    assert "granularity 'group'" in real_eligibility(group)
    assert "fp8_e4m3" in real_eligibility(fp8_act)
    assert "not frozen" in real_eligibility(QuantLinear.from_float(nn.Linear(32, 8), weight_spec=QuantSpec(bits=8)))
    with pytest.raises(ValueError, match="cannot convert"):
        RealQuantLinear(w4)

    model = nn.Sequential(_quant_linear("token", False), nn.ReLU(), w4)
    model[2] = QuantLinear.from_float(nn.Linear(48, 8), weight_spec=QuantSpec(bits=4, granularity="channel"))
    model[2].freeze_weight()
    out = convert_to_real(model)
    assert out is model and isinstance(model[0], RealQuantLinear) and isinstance(model[2], QuantLinear)
    assert model._archquant_real["converted"] == 1
    assert [name for name, _ in model._archquant_real["kept"]] == ["2"]


# ----------------------------------------------------------------------------------------
# whole models
# ----------------------------------------------------------------------------------------


def _toy():
    cfg = ToyConfig(hidden_size=64, intermediate_size=128, num_layers=2, seed=0)
    x, _ = toy_task(cfg, 320, split_seed=123)
    return init_toy_model(cfg), list(x[:256].split(64)), x[256:]


@pytest.mark.parametrize("recipe", ["rtn_dynamic", "hadamard_static", "smoothquant"])
def test_convert_toy_model(recipe):
    model, calib, x = _toy()
    with torch.no_grad():
        fp = model(x)
    aq.quantize_(model, recipe, calib_data=calib, family="toy", progress=False)
    with torch.no_grad():
        fake = model(x)
        convert_to_real(model)
        real = model(x)
    summary = model._archquant_real
    assert summary["converted"] == 4 and summary["kept"] == []  # up/down_proj per layer
    _assert_model_close(real, fake, fp)


def _mamba(seed: int = 0) -> MambaLM:
    return perturbed_mamba("mamba1", seed)


@pytest.mark.parametrize("recipe", ["rtn_dynamic", "quamba", "mambaquant"])
def test_convert_tiny_mamba1(recipe):
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 256, (4, 64), generator=g) for _ in range(2)]
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(7))
    model = _mamba()
    with torch.no_grad():
        fp = model(ids)
    aq.quantize_(model, recipe, calib_data=calib if recipe != "rtn_dynamic" else None, family="mamba", progress=False)
    with torch.no_grad():
        fake = model(ids)
        convert_to_real(model)
        real = model(ids)
    summary = model._archquant_real
    # per layer: in_proj, x_proj, dt_proj, out_proj (Hadamard input for quamba) on int8
    assert summary["converted"] == 8
    if recipe == "quamba":  # whole mixers on int8 kernels (conv1d and scan included)
        assert summary["blocks"] == [f"backbone.layers.{i}" for i in range(2)] and summary["kept"] == []
        mixer = model.backbone.layers[0].mixer
        assert isinstance(mixer, RealQuantMamba1Mixer) and mixer.conv_weight.dtype == torch.int8
        assert mixer.out_proj.input_transform is not None and mixer.out_proj.act_kind == "static_tensor"
    else:  # dynamic scales (MambaQuant: also a rotated state): the mixer stays, its Linears go real one by one
        assert summary["blocks"] == []
        reasons = {reason for _, reason in summary["kept"]}
        assert ("in_proj output needs a static per-tensor int8 quantizer (Quamba)" if recipe == "rtn_dynamic" else
                "the SSM state is rotated or quantized (MambaQuant R4): the int8 scan keeps an fp32 state") in reasons
        assert {reason.split(":")[0] for reason in reasons} >= {"QuantConv1d"}
        mixer = model.backbone.layers[0].mixer
        assert isinstance(mixer.in_proj, RealQuantLinear) and mixer.x_proj.act_kind == "weight_only"
        assert isinstance(mixer.conv1d, QuantConv1d)
        # MambaQuant's weights are asymmetric per channel: int8 codes with zero points
        assert (mixer.in_proj.weight_zero is not None) == (recipe == "mambaquant")
    _assert_model_close(real, fake, fp)


# ----------------------------------------------------------------------------------------
# runner
# ----------------------------------------------------------------------------------------


def test_runner_backend_real_reports_real_metrics(tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text((ROOT / "configs" / "toy_w8a8.yaml").read_text())
    out_dir = tmp_path / "out"
    code = main([str(cfg), "model.options.train_steps=20", "calibration.num_samples=64", "evaluation.num_samples=256",
                 "progress=false", f"output_dir={out_dir}", "backend=real"])
    _, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    assert set(report["metrics"]) == {"fp", "quantized", "real"}
    real, q = report["metrics"]["real"], report["metrics"]["quantized"]
    assert set(real) == set(q) and abs(real["cross_entropy"] - q["cross_entropy"]) <= 1e-3 * abs(q["cross_entropy"])
    assert report["real"]["converted"] == 4 and set(report["real"]["eval_seconds"]) == {"fake", "real"}
    assert {"convert to real", "evaluate real"} <= set(report["timings"])
    assert "(real int8)" in (out_dir / "report.md").read_text()
    # the checkpoint is still the fake-quant interchange format
    assert report["reload"]["identical"] is True
    assert isinstance(aq.load_quantized(out_dir / "checkpoint").layers[0].up_proj, QuantLinear)


# ----------------------------------------------------------------------------------------
# CUDA branch (runs only where a GPU is present)
# ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_linear_on_cuda_matches_cpu():
    fake = _quant_linear("token", True)
    real = RealQuantLinear(fake)
    x = torch.randn(33, 64)
    y_cpu = real(x)
    y_cuda = real.cuda()(x.cuda())
    assert (y_cuda.cpu() - y_cpu).abs().max() <= 1e-5 * y_cpu.abs().max()
