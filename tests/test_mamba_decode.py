"""Recurrent decoding (``MambaCache``): feeding a sequence in pieces equals feeding it whole."""
from __future__ import annotations

import copy

import pytest
import torch

import archquant as aq
from archquant.models.mamba import MambaCache, MambaLM, greedy_generate

from conftest import perturbed_mamba, rel_err
from kernel_testing import DEVICE, requires_backend

VOCAB = 256


pytestmark = pytest.mark.usefixtures("single_thread")


def _model(arch: str, seed: int = 0) -> MambaLM:
    return perturbed_mamba(arch, seed, state_size=8, **({"chunk_size": 8} if arch == "mamba2" else {}))


IDS = torch.randint(0, VOCAB, (3, 29), generator=torch.Generator().manual_seed(5))


def _pieces(model, ids, splits) -> torch.Tensor:
    cache = model.new_cache()
    out, start = [], 0
    with torch.no_grad():
        for end in list(splits) + [ids.shape[1]]:
            out.append(model(ids[:, start:end], cache=cache))
            start = end
    assert cache.seqlen_offset == ids.shape[1]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("splits", [[1], [12], [5, 6, 7], list(range(1, 29)), [20, 21, 22]],
                         ids=["1+rest", "prefill12", "chunks", "token_by_token", "prefill+steps"])
def test_incremental_logits_equal_full_forward(arch, splits):
    model = _model(arch)
    with torch.no_grad():
        full = model(IDS)
    assert rel_err(_pieces(model, IDS, splits), full) < 1e-5


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_decode_updates_state_tensors_in_place(arch):
    """CUDA-graph decoding replays fixed buffers: after the prefill, steps must reuse the tensors."""
    model = _model(arch)
    cache = model.new_cache()
    with torch.no_grad():
        model(IDS[:, :10], cache=cache)
        ptrs = [(s.conv_state.data_ptr(), s.ssm_state.data_ptr()) for s in cache.layers]
        before = [s.ssm_state.clone() for s in cache.layers]
        model(IDS[:, 10:11], cache=cache)
    assert [(s.conv_state.data_ptr(), s.ssm_state.data_ptr()) for s in cache.layers] == ptrs
    assert all(not torch.equal(b, s.ssm_state) for b, s in zip(before, cache.layers))
    assert cache.layers[0].conv_state.shape[-1] == model.config.conv_kernel


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_greedy_generate_matches_uncached_argmax(arch):
    model = _model(arch)
    prompt = IDS[:, :7]
    got = greedy_generate(model, prompt, 6)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq[:, 7:])


def test_cache_layer_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="cache has 3 layers, the model 2"):
        _model("mamba1")(IDS, cache=MambaCache(3))


@pytest.mark.parametrize("arch,preset", [("mamba1", "quamba"), ("mamba1", "static_minmax"),
                                         ("mamba1", "rtn_dynamic"), ("mamba2", "quamba2")])
def test_fake_quant_models_decode_like_their_full_forward(arch, preset):
    """Static per-tensor and per-token quantizers do not depend on where a token sits, so a
    quantized model's cached decode equals its full forward (per-tensor *dynamic* scales, as in
    MambaQuant, legitimately differ). Not bit for bit: a matmul over 1 row and over 29 rows may
    round the last fp32 bit differently, which can move a value across a rounding boundary (one
    int8 step, ~4e-4 relative in the logits here); a broken cache is off by O(1)."""
    model = _model(arch)
    calib = [torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    aq.quantize_(model, preset, calib_data=calib, family="mamba", progress=False)
    with torch.no_grad():
        full = model(IDS)
    assert rel_err(_pieces(model, IDS, [9] + list(range(10, 29))), full) < 3e-3


@requires_backend
@pytest.mark.parametrize("arch,gate", [("mamba1", "silu"), ("mamba1", "scaled_silu"), ("mamba2", "gated_norm")])
def test_fp_path_on_the_triton_kernels_equals_pytorch(monkeypatch, arch, gate):
    """``apply_fused_kernels`` puts the FP model's RMSNorms, conv (+ SiLU) and, for Mamba1, the
    selective scan on the Triton kernels (the int8 model's kernels fed floats: the FP16 baseline of
    the end-to-end benchmark). Same logits as PyTorch, whole and decoded token by token; a non-SiLU
    gate is applied outside the scan kernel. Every one of those kernels is called (prefill and
    decode variants), and no other path is taken."""
    from archquant.backends.fused import apply_fused_kernels
    from archquant.kernels import mamba_conv1d, mamba_scan, rmsnorm_quant
    from archquant.models.mamba import ScaledSiLU

    model = _model(arch)
    if gate == "scaled_silu":
        for layer in model.backbone.layers:
            layer.mixer.gate_act = ScaledSiLU(torch.full((layer.mixer.d_inner,), 1.5))
    ids = IDS[:2, :10]
    with torch.no_grad():
        want = model(ids)
    calls = []
    kernels = [(mamba_conv1d, "causal_conv1d_silu_triton"), (mamba_conv1d, "causal_conv1d_update_triton"),
               (rmsnorm_quant, "rmsnorm_triton"), (mamba_scan, "selective_scan_triton"),
               (mamba_scan, "selective_state_update_triton")]
    for mod, name in kernels:
        orig = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _o=orig, _n=name, **k: calls.append(_n) or _o(*a, **k))
    fused = apply_fused_kernels(model, "triton")
    layers = range(model.config.num_layers)
    assert sorted(fused) == sorted([f"backbone.layers.{i}.{m}" for i in layers for m in ("norm", "mixer")]
                                   + ["backbone.norm_f"])
    model = model.to(DEVICE)
    ids = ids.to(DEVICE)
    with torch.no_grad():
        got = model(ids)
        cache = model.new_cache()
        inc = torch.cat([model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(4, 10)], 1)
    assert rel_err(got.cpu(), want) < 1e-5
    assert rel_err(inc.cpu(), want) < 1e-5
    expected = {"causal_conv1d_silu_triton", "causal_conv1d_update_triton", "rmsnorm_triton"}
    if arch == "mamba1":  # Mamba2's SSD scan has no kernel
        expected |= {"selective_scan_triton", "selective_state_update_triton"}
    assert set(calls) == expected


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_cached_ssm_parameters_follow_in_place_edits(arch):
    """A = -exp(A_log) and D are cached for inference; editing them (in place, as recipes and
    load_state_dict do) must reach the next forward."""
    model = _model(arch)
    ids = IDS[:1, :9]
    with torch.no_grad():
        before = model(ids)
        model.backbone.layers[0].mixer.A_log.add_(0.5)
        model.backbone.layers[1].mixer.D.mul_(-1.0)
        after = model(ids)
        fresh = copy.deepcopy(model)
        fresh.__dict__.pop("_ssm_cache", None)
        for layer in fresh.backbone.layers:
            layer.mixer.__dict__.pop("_ssm_cache", None)
        want = fresh(ids)
        model.load_state_dict(_model(arch).state_dict())  # copy_ into the same tensors
        restored = model(ids)
    assert rel_err(after, before) > 1e-3
    assert torch.equal(after, want)
    assert torch.equal(restored, before)


def test_fused_swap_keeps_the_model_and_auto_stays_on_pytorch_on_a_cpu(monkeypatch):
    """The swap changes classes only: same parameters and state-dict names; with kernels="auto"
    CPU tensors still run PyTorch (no kernel call), and a swapped, Quamba-quantized model still
    converts whole blocks to the real backend."""
    from archquant.backends import convert_to_real
    from archquant.backends.fused import FusedMamba1Mixer, FusedRMSNorm, apply_fused_kernels
    from archquant.kernels import mamba_conv1d, mamba_scan, rmsnorm_quant

    model = _model("mamba1")
    keys = list(model.state_dict())
    ids = IDS[:1, :9]
    with torch.no_grad():
        want = model(ids)
    for mod in (mamba_conv1d, mamba_scan, rmsnorm_quant):
        for name in mod.__all__:
            monkeypatch.setattr(mod, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} called"))
    apply_fused_kernels(model)
    assert type(model.backbone.layers[0].mixer) is FusedMamba1Mixer
    assert type(model.backbone.norm_f) is FusedRMSNorm and model.backbone.norm_f.fused_kernels == "auto"
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(ids), want)
    monkeypatch.undo()
    calib = [torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))]
    aq.quantize_(model, "quamba", calib_data=calib, family="mamba", progress=False)
    convert_to_real(model)
    assert model._archquant_real["blocks"] == ["backbone.layers.0", "backbone.layers.1"]
