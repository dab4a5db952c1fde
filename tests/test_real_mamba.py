"""Real-quant Mamba: the whole Quamba mixer on int8 kernels (archquant/backends/mamba.py),
RealQuantLinear on the Triton kernels (``kernels="triton"``: the interpreter on a CPU, the GPU
path itself on CUDA), and recurrent decoding of a real model.

Tolerances: the real mixer multiplies the same integer codes as its fake-quant twin and
requantizes with the same static scales, so the two differ only where an fp32 summation order
moves a value across a rounding boundary (one code). Measured on these tiny models: logits
within 2e-8 relative (CPU torch path and Triton interpreter alike). Asserted: 1e-4 relative,
an order below any quantization error (~1e-2 here).
"""
from __future__ import annotations

import copy

import pytest
import torch

import archquant as aq
from archquant.backends.mamba import RealQuantMamba1Mixer, RealQuantMambaBlock, real_mixer_eligibility
from archquant.core.formats import QuantSpec
from archquant.core.modules import ActQuantizer, QuantLinear
from archquant.core.transforms import HadamardTransform
from archquant.models.mamba import MambaLM, greedy_generate
from archquant.backends import RealQuantLinear, check_kernels, convert_to_real

from conftest import perturbed_mamba, rel_err
from kernel_testing import DEVICE, requires_backend

VOCAB = 256
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("single_thread")


def _mamba(arch: str = "mamba1", seed: int = 0) -> MambaLM:
    return perturbed_mamba(arch, seed, state_size=16, **({"chunk_size": 16} if arch == "mamba2" else {}))


CALIB = [torch.randint(0, VOCAB, (4, 48), generator=torch.Generator().manual_seed(i)) for i in range(2)]
IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(9))


def _quantized(preset: str = "quamba", arch: str = "mamba1") -> MambaLM:
    model = _mamba(arch)
    aq.quantize_(model, preset, calib_data=CALIB, family="mamba", progress=False)
    return model


@pytest.fixture(scope="module")
def quamba() -> MambaLM:
    """The Quamba-quantized model every test here starts from (tests convert deep copies of it)."""
    return _quantized()


def _logits(model, ids=IDS, cache=None):
    with torch.no_grad():
        return model(ids.to(model.lm_head.weight.device), cache=cache)


# ----------------------------------------------------------------------------------------
# the real mixer on the CPU path
# ----------------------------------------------------------------------------------------


def test_quamba_mixers_become_int8_mixers_and_match_the_fake_twin(quamba):
    fake = _logits(quamba)
    real = convert_to_real(copy.deepcopy(quamba))
    summary = real._archquant_real
    assert summary["blocks"] == ["backbone.layers.0", "backbone.layers.1"]  # norm + mixer, fused
    assert isinstance(real.backbone.layers[0], RealQuantMambaBlock)
    assert summary["kept"] == [] and summary["converted"] == 8 and summary["kernels"] == "auto"
    mixer = real.backbone.layers[0].mixer
    assert isinstance(mixer, RealQuantMamba1Mixer)
    # int8 storage: every weight of the mixer, including the conv taps
    assert mixer.conv_weight.dtype == torch.int8
    assert all(getattr(mixer, p).weight_q.dtype == torch.int8 for p in ("in_proj", "x_proj", "dt_proj", "out_proj"))
    assert not any(p.is_floating_point() and p.dim() == 2 and p.numel() > 64 * 16
                   for n, p in mixer.named_buffers() if n != "A")
    got = _logits(real)
    assert rel_err(got, fake) < TOL
    assert rel_err(fake, _logits(_mamba())) > 100 * TOL  # the tolerance is far below the quantization error


def test_real_mixer_uses_the_fake_models_static_scales(quamba):
    real = convert_to_real(copy.deepcopy(quamba))
    fake_mixer, real_mixer = quamba.backbone.layers[1].mixer, real.backbone.layers[1].mixer
    scale = lambda q: q.params.as_dict()["scale"].reshape(1)  # noqa: E731
    assert torch.equal(real_mixer.u_scale, scale(fake_mixer.u_site.quantizer))
    assert torch.equal(real_mixer.xz_scale, scale(fake_mixer.in_proj.output_quantizer))
    assert torch.equal(real_mixer.dbc_scale, scale(fake_mixer.x_proj.output_quantizer))
    assert torch.equal(real_mixer.dt_scale, scale(fake_mixer.dt_proj.output_quantizer))
    assert torch.equal(real_mixer.D, fake_mixer.D.float())


def test_real_mixer_takes_the_decay_rates_of_the_model(quamba):
    """A = -exp(A_log): with A_log set to the logs of chosen rates, the real mixer's A must be
    minus those rates (an independent value, not the constructor's formula again)."""
    model = copy.deepcopy(quamba)
    mixer = model.backbone.layers[0].mixer
    rates = torch.linspace(0.25, 8.0, mixer.A_log.numel(), dtype=torch.float64).reshape(mixer.A_log.shape)
    with torch.no_grad():
        mixer.A_log.copy_(rates.log())
    real = convert_to_real(model)
    assert torch.allclose(real.backbone.layers[0].mixer.A.double(), -rates, rtol=1e-6, atol=0)


@pytest.mark.parametrize("splits", [[1], [10], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]],
                         ids=["1+rest", "prefill+chunk", "prefill+steps"])
def test_real_model_decodes_like_its_full_forward(quamba, splits):
    real = convert_to_real(copy.deepcopy(quamba))
    full = _logits(real)
    cache, out, start = real.new_cache(), [], 0
    for end in splits + [IDS.shape[1]]:
        out.append(_logits(real, IDS[:, start:end], cache))
        start = end
    assert rel_err(torch.cat(out, 1), full) < TOL
    state = cache.layers[0]
    assert state.conv_state.dtype == torch.int8 and state.ssm_state.dtype == torch.float32


def test_real_decode_keeps_state_tensors_in_place(quamba):
    real = convert_to_real(copy.deepcopy(quamba))
    cache = real.new_cache()
    _logits(real, IDS[:, :6], cache)
    ptrs = [(s.conv_state.data_ptr(), s.ssm_state.data_ptr()) for s in cache.layers]
    _logits(real, IDS[:, 6:7], cache)
    assert [(s.conv_state.data_ptr(), s.ssm_state.data_ptr()) for s in cache.layers] == ptrs


def test_greedy_generation_real_equals_fake(quamba):
    real = convert_to_real(copy.deepcopy(quamba))
    prompt = IDS[:, :8]
    assert torch.equal(greedy_generate(real, prompt, 8), greedy_generate(quamba, prompt, 8))


def test_mixer_alone_goes_real_when_the_norm_cannot_fuse(quamba):
    """A per-tensor *dynamic* in_proj input has no fused norm+quantize kernel: the block stays,
    the mixer still runs on int8 kernels (its own input quantization)."""
    model = copy.deepcopy(quamba)
    for layer in model.backbone.layers:
        q = layer.mixer.in_proj.input_quantizer
        q.dynamic, q.observer = True, None
    fake = _logits(model)
    convert_to_real(model)
    assert model._archquant_real["blocks"] == ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]
    assert model._archquant_real["kept"] == []
    assert isinstance(model.backbone.layers[0].mixer, RealQuantMamba1Mixer)
    assert rel_err(_logits(model), fake) < TOL


def test_mambaquant_mixer_stays_and_says_why():
    model = _quantized("mambaquant")
    convert_to_real(model)
    kept = dict(model._archquant_real["kept"])
    assert model._archquant_real["blocks"] == []
    assert "rotated or quantized" in kept["backbone.layers.0.mixer"]
    assert not isinstance(model.backbone.layers[0].mixer, RealQuantMamba1Mixer)


def test_mamba2_mixers_keep_fp_scan_with_real_linears():
    model = _quantized("quamba2", arch="mamba2")
    fake = _logits(model)
    convert_to_real(model)
    assert model._archquant_real["blocks"] == [] and model._archquant_real["converted"] == 4
    assert isinstance(model.backbone.layers[0].mixer.in_proj, RealQuantLinear)
    assert rel_err(_logits(model), fake) < TOL


@pytest.mark.parametrize("mutate,reason", [
    (lambda m: setattr(m.u_site.quantizer, "dynamic", True), "u (the SSM input) needs a static"),
    (lambda m: setattr(m.x_proj, "output_quantizer", None), "x_proj output needs a static per-tensor int8"),
    (lambda m: setattr(m, "gate_act", torch.nn.GELU()), "gate GELU"),
    (lambda m: setattr(m, "state_rotation", torch.nn.Identity()), "rotated or quantized"),
    (lambda m: setattr(m.out_proj, "input_quantizer", None), "in_proj and out_proj need quantized inputs"),
])
def test_ineligible_mixers_name_the_reason(quamba, mutate, reason):
    mixer = copy.deepcopy(quamba.backbone.layers[0].mixer)
    assert real_mixer_eligibility(mixer) is None
    mutate(mixer)
    assert reason in real_mixer_eligibility(mixer)
    with pytest.raises(ValueError, match="cannot convert the Mamba mixer"):
        RealQuantMamba1Mixer(mixer)


def test_unknown_kernels_choice_is_an_error(quamba):
    with pytest.raises(ValueError, match="kernels='cuda' not allowed: one of auto, triton"):
        check_kernels("cuda")
    with pytest.raises(ValueError, match="kernels='cuda'"):
        convert_to_real(copy.deepcopy(quamba), kernels="cuda")


# ----------------------------------------------------------------------------------------
# the Triton path (interpreter on a CPU, the GPU itself on CUDA)
# ----------------------------------------------------------------------------------------


@requires_backend
def test_triton_real_mamba_matches_fake_and_cpu_path(quamba):
    ids = IDS[:1, :12]  # the interpreter runs every program instance in Python: keep it short
    fake = _logits(copy.deepcopy(quamba).to(DEVICE), ids)
    real = convert_to_real(copy.deepcopy(quamba), kernels="triton").to(DEVICE)
    assert real._archquant_real["kernels"] == "triton"
    got = _logits(real, ids)
    assert rel_err(got.cpu(), fake.cpu()) < TOL
    cache = real.new_cache()
    inc = torch.cat([_logits(real, ids[:, :8], cache)] + [_logits(real, ids[:, t:t + 1], cache)
                                                         for t in range(8, 12)], 1)
    assert rel_err(inc.cpu(), got.cpu()) < TOL


@requires_backend
def test_triton_real_mamba_calls_the_kernels(quamba, monkeypatch):
    """The Triton path really runs the fused norm+quantize, int8 GEMM, conv, scan and fused
    Hadamard+quantize kernels (and nothing falls back to the torch references)."""
    from archquant.kernels import hadamard_quant, mamba_conv1d, mamba_scan, rmsnorm_quant, w8a8_gemm
    calls = []
    for mod, name in ((mamba_conv1d, "quant_causal_conv1d_silu"), (mamba_conv1d, "quant_causal_conv1d_update"),
                      (mamba_scan, "quant_selective_scan"), (mamba_scan, "quant_selective_state_update"),
                      (hadamard_quant, "hadamard_quant_int8"), (rmsnorm_quant, "rmsnorm_quant_int8"),
                      (w8a8_gemm, "w8a8_gemm")):
        orig = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _o=orig, _n=name, **k: calls.append(_n) or _o(*a, **k))
    def no_fallback(*a, **k):
        raise AssertionError("the Triton path fell back to a torch reference")
    for mod, name in ((mamba_conv1d, "quant_causal_conv1d_silu_reference"),
                      (mamba_conv1d, "quant_causal_conv1d_update_reference"),
                      (mamba_scan, "quant_selective_scan_reference"),
                      (mamba_scan, "quant_selective_state_update_reference")):
        monkeypatch.setattr(mod, name, no_fallback)
    real = convert_to_real(copy.deepcopy(quamba), kernels="triton").to(DEVICE)
    cache = real.new_cache()
    _logits(real, IDS[:1, :5], cache)
    _logits(real, IDS[:1, 5:6], cache)
    assert sorted(set(calls)) == ["hadamard_quant_int8", "quant_causal_conv1d_silu", "quant_causal_conv1d_update",
                                  "quant_selective_scan", "quant_selective_state_update", "rmsnorm_quant_int8",
                                  "w8a8_gemm"]


def _qlinear(k: int, n: int, act: str, transform=None, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    dynamic = act == "dynamic_token"
    q = ActQuantizer(QuantSpec(bits=8, granularity="token" if dynamic else "tensor"), dynamic=dynamic)
    if not dynamic:
        q.params.set({"scale": torch.tensor(0.02)})
        q.mode = "quantize"
    m = QuantLinear.from_float(lin, weight_spec=QuantSpec(bits=8, granularity="channel"), input_quantizer=q,
                               input_transform=transform)
    if transform is not None:  # keep the FP function: fold the inverse rotation into the weight
        with torch.no_grad():
            m.weight.copy_(m.weight @ transform.matrix().float())
    m.freeze()
    return m


@requires_backend
@pytest.mark.parametrize("act", ["dynamic_token", "static_tensor"])
@pytest.mark.parametrize("transform", [None, "hadamard", "hadamard_signs"])
@pytest.mark.parametrize("k", [96, 128])
def test_triton_real_linear_matches_fake(act, transform, k):
    t = {None: None, "hadamard": HadamardTransform(k), "hadamard_signs": HadamardTransform(k, seed=3)}[transform]
    fake = _qlinear(k, 40, act, t)
    x = torch.randn(2, 7, k, generator=torch.Generator().manual_seed(1))
    want = fake(x)
    real = RealQuantLinear(fake, kernels="triton").to(DEVICE)
    got = real(x.to(DEVICE)).cpu()
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    if transform is not None:
        assert real._fused_hadamard() is not None  # one kernel: rotate + quantize
