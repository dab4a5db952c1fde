"""LRQ-DiT's adaptive rotation on the Triton W8A8 path: the "hadamard" branch (ChannelScale, then a
random full-width Hadamard) and the quarot preset's one-part chain run inside the fused
``hadamard_quant_int8`` kernel; the "duquant" branch stays on the separate ops.

Triton's interpreter on a CPU (conftest sets TRITON_INTERPRET=1), the kernels the GPU runs.

What "matches the fake twin" means here. Per Linear, on the input the fake module receives:

* codes: the kernel's rotation sums in another order than the core's butterfly, so y may differ in
  its last bit and a code by 1 where y / scale lies within an ulp of a rounding boundary; the
  channel scale's division is bit-identical (tests/test_kernels_hadamard.py). So the codes agree
  in >= 99.9% of the entries and differ by at most 1; the per-token scales (amax / 127) by a few
  fp32 ulps.
* output: both compute (codes * s_x) @ W_deq^T + b. With the same codes and scales the fp32 rounding
  bound of tests/test_kernels_dispatch.py holds, (2K + 8) * 2^-24 * (|x_q| @ |W_deq|^T + |b|); the
  scales' relative difference scales that magnitude, and each code that differs adds exactly
  |dq| * s_x * |W_deq|.

The whole model chains these Linears, so a code flip in an early layer moves everything after it by
about one quantization step of one input: the end-to-end check is a relative error far below the
W8A8 quantization error itself (the fake twin vs the float model).
"""
from __future__ import annotations

import copy

import pytest
import torch

import archquant as aq
from archquant.backends import RealQuantLinear, convert_to_real
from archquant.core import ars, formats
from archquant.core.formats import QuantSpec
from archquant.core.modules import QuantLinear
from archquant.core.recipe import Quantize, Recipe
from archquant.kernels import hadamard_quant
from archquant.models.toy import ToyConfig, init_toy_model, toy_task

from conftest import rel_err
from kernel_testing import requires_backend

pytestmark = [requires_backend, pytest.mark.usefixtures("single_thread")]

CFG = ToyConfig(hidden_size=64, intermediate_size=128, num_layers=2, seed=0)  # dense and factorised kernels
ACT = QuantSpec(bits=8, granularity="token", axis=-1)
DUQUANT_LAYER = "layers.1.down_proj"

#: ARS with every layer on the hadamard branch (J below a huge threshold) but one forced to DuQuant;
#: the quarot preset's step (no smoothing: each rotation alone in a one-part chain)
ARS_STEPS = {
    "ars": ars.AdaptiveRotation(threshold=1e9, block_size=32, max_steps=32, force={DUQUANT_LAYER: "duquant"}),
    "quarot": ars.AdaptiveRotation(smooth=False, force={"*": "hadamard"}),
}


def quantized_toy(step: ars.AdaptiveRotation):
    """(float model, fake W8A8 model, its real twin on the Triton kernels, test inputs)."""
    fp = init_toy_model(CFG)
    x, _ = toy_task(CFG, 128, split_seed=123)
    recipe = Recipe("ars_w8a8", [step, Quantize(weight=QuantSpec(bits=8, granularity="channel"),
                                                activation=ACT, dynamic=True)])
    fake = aq.quantize_(copy.deepcopy(fp), recipe, calib_data=list(x.split(64)), progress=False)
    real = convert_to_real(copy.deepcopy(fake), kernels="triton")
    return fp, fake, real, x[:48]  # the interpreter runs a program per row: few rows keep it quick


def linear_inputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each QuantLinear of ``model`` receives on ``x``, as (tokens, K) rows."""
    seen, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: seen.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def fake_codes(fake: QuantLinear, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fake module's own input path: its transform, then the core's int8 format."""
    y = fake.input_transform(x2)
    params = formats.params_from_tensor(y, ACT)
    return formats.quantize(y, ACT, params), params["scale"]


def assert_codes_agree(q, s, q_ref, s_ref):
    diff = (q.int() - q_ref.to(torch.int32)).abs()
    assert diff.max().item() <= 1
    assert (diff == 0).float().mean().item() >= 0.999
    torch.testing.assert_close(s.reshape(-1), s_ref.reshape(-1).float(), rtol=2e-6, atol=0)


def assert_output_within_bound(real: RealQuantLinear, fake: QuantLinear, x2: torch.Tensor):
    with torch.no_grad():
        got, want = real(x2), fake(x2)
        q, s = (t.double() for t in real.quantize_input(x2))
        q_ref, s_ref = (t.double() for t in fake_codes(fake, x2))
        w = fake.effective_weight().double().abs()
        mag = (q.abs() * s) @ w.T + fake.bias.double().abs()
        rescaled = (s - s_ref.reshape(s.shape)).abs() / s  # the per-token scales' few ulps, relative
        flips = (q - q_ref).abs() * s  # each code that differs: one step
        bound = ((2 * real.in_features + 8) * 2.0 ** -24 + rescaled) * mag + flips @ w.T
    assert bool(((got.double() - want.double()).abs() <= bound).all())


@pytest.mark.parametrize("recipe", list(ARS_STEPS))
def test_ars_hadamard_layers_run_the_fused_kernel_and_match_the_fake_twin(recipe, monkeypatch):
    fp, fake, real, x = quantized_toy(ARS_STEPS[recipe])
    fakes = {n: m for n, m in fake.named_modules() if isinstance(m, QuantLinear)}
    reals = {n: m for n, m in real.named_modules() if isinstance(m, RealQuantLinear)}
    assert set(reals) == set(fakes) and len(reals) == 2 * CFG.num_layers
    branch = {n: m.input_transform.label["ars"] for n, m in fakes.items()}
    hadamard = [n for n in reals if branch[n] == "hadamard"]
    assert hadamard == [n for n in reals if recipe == "quarot" or n != DUQUANT_LAYER]

    for name in hadamard:  # what the kernel gets: the chain's own scale and signs
        fused = reals[name]._fused_transform()
        assert fused is not None, f"{name}: its {branch[name]} transform is not fused"
        scale, had = fused
        parts = list(reals[name].input_transform.parts)
        assert had is parts[-1] and (scale is None if recipe == "quarot" else scale is parts[0])
    for name in set(reals) - set(hadamard):
        assert reals[name]._fused_transform() is None and reals[name]._fused_hadamard() is None

    calls, fused_kernel = [], hadamard_quant.hadamard_quant_int8

    def counted_kernel(*args, **kwargs):
        calls.append(kwargs)
        return fused_kernel(*args, **kwargs)

    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(hadamard_quant, "hadamard_quant_int8", counted_kernel)
        got, want, ref = real(x), fake(x), fp(x)
    assert len(calls) == len(hadamard)  # one fused call per hadamard-branch Linear, none for DuQuant
    assert all((k["channel_scale"] is None) == (recipe == "quarot") for k in calls)

    inputs = linear_inputs(fake, x)
    for name, real_linear in reals.items():
        for dtype in (torch.float32, torch.bfloat16):  # bf16: the twin's 16-bit divide and rotation
            x2 = inputs[name].to(dtype)
            with torch.no_grad():
                assert_codes_agree(*real_linear.quantize_input(x2), *fake_codes(fakes[name], x2))
        assert_output_within_bound(real_linear, fakes[name], inputs[name])
    # End to end: W8A8 moves every input element by up to half a quantization step (~step/sqrt(12)
    # RMS); the <= 0.1% of codes that may flip move one element by a step each: sqrt(0.001 * 12)
    # ~ 0.11 of that. Without flips (as here) the difference is fp32 rounding: ~3e-7.
    assert rel_err(got, want) < 0.2 * rel_err(want, ref)
