"""The real backend's kernel table (archquant/backends/dispatch.py): every kernel in it is reachable
from ``convert_to_real``, a module no kernel takes stays fake-quant with the reason.

The "cuda" rows run with ``kernels="triton"``: on a CPU that is Triton's interpreter (conftest sets
TRITON_INTERPRET=1), the very kernels the GPU runs, fp8 included (the interpreter computes fp8 dots
through numpy in fp32).

Tolerance, real vs fake twin (fp32 activations): both multiply the same dequantized values; the
fake module's F.linear sums K fp32 products (rounding error <= gamma_K * sum|x_q||w_q|, gamma_K ~
K * 2^-24), the real one sums exact code products (int8, fp8: 8-bit significands) or per-group FMAs
(int4) in fp32 and applies the scales afterwards (a few more roundings), or sums the fake module's
fp32 products in another order (twinlog: its level table is the fake module's dequantized
weight, up to the one-ulp differences of torch's vectorized and scalar exp2, far inside the bound). So per output
|y_real - y_fake| <= (2K + 8) * 2^-24 * (|x_q| @ |w_q|^T + |b|): a worst-case bound of fp32
rounding, ~1e-5 of the magnitude here, while any wrong code, scale or layout is off by O(|y|).
On a GPU the fp8 kernel accumulates with Hopper's reduced-precision fp8 sums: 1e-2 of the
magnitude there (the bound of the kernel's own GPU test).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from archquant.backends import (LINEAR_KERNELS, RealFP8Linear, RealQuantLinear, RealTwinLogLinear, RealW4A16Linear,
                                choose_linear_kernel, convert_to_real)
from archquant.core.formats import QuantSpec, get_format
from archquant.core.modules import ActQuantizer, QuantLinear

from kernel_testing import DEVICE, INTERPRET_MODE, requires_backend

K, N = 128, 48
REAL_TYPE = {"int8": RealQuantLinear, "int8 asymmetric": RealQuantLinear, "int4": RealW4A16Linear,
             "fp8_e4m3": RealFP8Linear, "fp8_e5m2": RealFP8Linear, "twinlog": RealTwinLogLinear}


def _act(fmt: str, kind: str) -> ActQuantizer:
    spec = (QuantSpec(bits=8, granularity="token" if kind == "dynamic_token" else "tensor") if fmt == "int8"
            else QuantSpec(format=fmt, granularity="token" if kind == "dynamic_token" else "tensor"))
    q = ActQuantizer(spec, dynamic=kind != "static_tensor")
    if kind == "static_tensor":  # a frozen calibrated scale (about amax / max code of the test inputs)
        q.params.set({"scale": torch.tensor(0.02 if fmt == "int8" else 6e-3)})
        q.mode = "quantize"
    return q


def _weight_spec(fmt: str, granularity: str = "channel", group_size: int = 32, bits: int = 4) -> QuantSpec:
    if fmt == "twinlog":  # per output row by definition; ``bits`` only matters here
        return QuantSpec(format="twinlog", bits=bits, granularity="channel", axis=0)
    if fmt in ("int8", "int8 asymmetric"):
        return QuantSpec(bits=8, granularity=granularity, symmetric=fmt == "int8")
    if fmt == "int4":
        return QuantSpec(bits=4, granularity="group", group_size=group_size)
    return QuantSpec(format=fmt, granularity=granularity)


def fake_linear(weight: str, act: str, kind: str = "dynamic_token", seed: int = 0, **weight_kw) -> QuantLinear:
    """A frozen fake-quant Linear (K -> N, with bias): ``weight`` and ``act`` formats ("none": float input)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(N, generator=g) * 0.1)
    spec = _weight_spec(weight, **weight_kw)
    m = QuantLinear.from_float(lin, weight_spec=spec, input_quantizer=None if act == "none" else _act(act, kind),
                               weight_observer=get_format(spec.format).weight_observer or "minmax")
    m.freeze()
    return m


def _inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 5, K, generator=torch.Generator().manual_seed(seed))


def assert_matches_fake(real: nn.Module, fake: QuantLinear, x: torch.Tensor) -> None:
    with torch.no_grad():
        want = fake(x)
        got = real(x.to(DEVICE)).cpu()
        xq = x if fake.input_quantizer is None else fake.input_quantizer(x)
        mag = xq.double().abs() @ fake.effective_weight().double().abs().T + fake.bias.double().abs()
        zero = getattr(real, "weight_zero", None)
        if zero is not None and real._path(x) == "triton":
            # GEMM on the shifted codes q, then the zero-point term subtracted in fp32: both terms
            # are bounded by |x_q| @ (|q| + |z|) (times the scales), not by |x_q| @ |q - z|
            scale = real.weight_scale.double().cpu()
            mag = mag + xq.double().abs() @ ((real.weight_q.double().abs() + zero.double().abs().reshape(-1, 1))
                                             * scale.reshape(-1, 1)).cpu().T
    assert got.shape == want.shape and got.dtype == want.dtype
    rel = (2 * K + 8) * 2.0 ** -24
    if isinstance(real, RealFP8Linear) and not INTERPRET_MODE:  # Hopper's fast fp8 accumulation keeps
        rel = 1e-2  # ~14 mantissa bits (as tests/test_kernels_gemm.py::test_gpu_fp8 allows)
    bound = rel * mag
    err = (got.double() - want.double()).abs()
    assert bool((err <= bound).all()), float((err / bound).max())


def _convert_alone(fake: QuantLinear, kernels: str):
    model = nn.Sequential(fake)
    convert_to_real(model, kernels=kernels)
    return model[0], model._archquant_real


# ----------------------------------------------------------------------------------------
# CPU: what has no CPU kernel stays fake-quant, with the reason
# ----------------------------------------------------------------------------------------


def test_cpu_keeps_fp8_and_w4a16_linears_and_says_why():
    model = nn.Sequential(fake_linear("fp8_e4m3", "fp8_e4m3"), nn.ReLU(), nn.Linear(N, K),
                          fake_linear("int4", "none"), nn.Linear(N, K), fake_linear("int8", "int8"))
    x = _inputs()
    with torch.no_grad():
        want = model(x)
    convert_to_real(model)
    summary = model._archquant_real
    assert summary["kept"] == [("0", "fp8_e4m3 W8A8: no CPU kernel; kept in fake quant"),
                               ("3", "int4 W4A16: no CPU kernel; kept in fake quant")]
    assert isinstance(model[0], QuantLinear) and isinstance(model[3], QuantLinear)
    assert isinstance(model[5], RealQuantLinear) and summary["converted"] == 1
    assert summary["paths"] == {"5": "int8 W8A8 on torch CPU int8 ops (archquant/kernels/cpu_int8.py)"}
    with torch.no_grad():
        got = model(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()  # the int8 Linear at the end (fp32 sums)


@pytest.mark.parametrize("weight,act,kw,reason", [
    ("int4", "none", dict(group_size=16), "a power-of-two group size >= 32"),
    ("fp8_e4m3", "int8", {}, "weight fp8_e4m3 channel, input int8 token: no real kernel for this combination"),
    ("int4", "int8", {}, "weight int4 group, input int8 token: no real kernel for this combination"),
    ("fp8_e4m3", "fp8_e5m2", {}, "no real kernel for this combination"),
    ("int8", "fp8_e4m3", {}, "weight int8 channel, input fp8_e4m3 token: no real kernel"),
    ("twinlog", "none", dict(bits=8), "8-bit codes are stored one per byte; the LUT GEMM takes nibble-packed codes"),
    ("twinlog", "fp8_e4m3", {}, "weight twinlog channel, input fp8_e4m3 token: no real kernel for this combination"),
])
def test_triton_rows_refuse_what_their_kernel_cannot_take(weight, act, kw, reason):
    """The decision alone (no kernel runs): a CUDA row's layout check, or no row at all."""
    choice = choose_linear_kernel(fake_linear(weight, act, **kw), "triton")
    assert isinstance(choice, str) and reason in choice


def test_asymmetric_int4_and_unfrozen_weights_are_kept():
    asym = QuantLinear.from_float(nn.Linear(K, N), weight_spec=QuantSpec(bits=4, symmetric=False, granularity="group",
                                                                          group_size=32))
    asym.freeze()
    assert "weight int4 asymmetric group, float input: no real kernel" in choose_linear_kernel(asym, "triton")
    assert choose_linear_kernel(QuantLinear.from_float(nn.Linear(K, N), weight_spec=QuantSpec()),
                                "auto") == "weight not frozen"


def test_triton_choice_takes_the_cuda_row_for_cpu_modules():
    for key in LINEAR_KERNELS:
        weight, act, device = key
        choice = choose_linear_kernel(fake_linear(weight, act), "triton" if device == "cuda" else "auto")
        assert choice is LINEAR_KERNELS[key], (key, choice)


# ----------------------------------------------------------------------------------------
# every row of the table, reached through convert_to_real, matches the fake twin
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(LINEAR_KERNELS), ids=lambda k: "-".join(k).replace(" ", "_"))
def test_every_table_kernel_is_reachable_and_matches_the_fake_twin(key):
    weight, act, device = key
    if device == "cuda" and not (INTERPRET_MODE or torch.cuda.is_available()):
        pytest.skip("the Triton rows need TRITON_INTERPRET=1 or a CUDA device")
    kernels = "triton" if device == "cuda" else "auto"
    fake = fake_linear(weight, act)
    real, summary = _convert_alone(fake, kernels)
    assert type(real) is REAL_TYPE[weight]
    assert summary["kept"] == [] and summary["converted"] == 1
    assert summary["paths"] == {"0": LINEAR_KERNELS[key].description}
    assert_matches_fake(real.to(DEVICE), fake, _inputs())


@requires_backend
@pytest.mark.parametrize("kind", ["dynamic_token", "dynamic_tensor", "static_tensor"])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_fp8_activation_kinds_and_weight_scales(kind, granularity):
    fake = fake_linear("fp8_e4m3", "fp8_e4m3", kind=kind, granularity=granularity, seed=3)
    real, summary = _convert_alone(fake, "triton")
    assert isinstance(real, RealFP8Linear) and real.weight_q.dtype == torch.float8_e4m3fn
    assert real.weight_scale.numel() == (N if granularity == "channel" else 1)
    assert_matches_fake(real.to(DEVICE), fake, _inputs(seed=4))


@requires_backend
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_w4a16_group_sizes_and_stored_codes(group_size):
    fake = fake_linear("int4", "none", group_size=group_size, seed=5)
    real, _ = _convert_alone(fake, "triton")
    assert isinstance(real, RealW4A16Linear) and real.group_size == group_size
    # the packed codes are the fake module's storage, unchanged (no repacking on conversion)
    assert torch.equal(real.weight_packed, fake.weight_codes) and real.weight_packed.dtype == torch.uint8
    assert tuple(real.weight_scale.shape) == (N, K // group_size)
    assert_matches_fake(real.to(DEVICE), fake, _inputs(seed=6))


@requires_backend
def test_w4a16_keeps_the_output_quantizer():
    """An output quantizer of the fake module is applied to the real result as well."""
    fake = fake_linear("int4", "none", seed=7)
    fake.output_quantizer = _act("int8", "dynamic_token")
    real, _ = _convert_alone(fake, "triton")
    x = _inputs(seed=8)
    with torch.no_grad():
        want, got = fake(x), real.to(DEVICE)(x.to(DEVICE)).cpu()
    step = want.abs().amax(-1, keepdim=True) / 127  # one int8 step of each token's grid
    assert ((got - want).abs() <= step * 1.001).all()  # rounding boundaries may move by one code
    assert torch.allclose(got / step, torch.round(got / step), atol=1e-3)  # on the int8 grid
