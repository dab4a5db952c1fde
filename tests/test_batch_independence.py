"""A quantized Mamba gives each sequence the same logits whatever its batch and however it is fed.

Per-token dynamic scales and calibrated static scales are functions of one row (one token) or
of nothing at run time, so a sequence's logits do not depend on the other sequences of its
batch, nor on whether it is run whole or as a prefill followed by cached decode steps. Dynamic
*per-tensor* scales (MambaQuant's reference setting: one scale over batch × sequence; the
mambaquant preset's default until commit 680a831) do: the test below that asserts this proves
the check can fail.

Tolerance. With row-wise quantizers the math is identical; what can still differ is fp32
rounding between differently shaped computations (a 1-row vs a 4-row matmul, one decode step
vs a 40-token scan, the scan's chunking): ~1e-7 relative in the FP model
(``test_fp_model_is_batch_and_chunk_independent``). When such a difference lands on a
rounding boundary, an element moves by one int8 step: ~1e-4 .. 1e-3 relative in these logits
(measured: rtn_dynamic's cached decode 6e-4, every other preset <= 3e-7 and exactly 0 alone vs
batch). ``TOL`` = 3e-3 leaves room for several such flips (the same bound as test_mamba_decode's
quantized-decode test); per-tensor dynamic scales move every element: 2.3e-2 .. 3.8e-2 on this
model, 0.12 on the demo's, so the negative test demands ``> 3 × TOL``.
"""
from __future__ import annotations

import functools

import pytest
import torch

import archquant as aq
from archquant import RecipeOptions
from archquant.adapters import get_adapter
from archquant.core.formats import QuantSpec
from archquant.core.recipe import OnlineHadamard, Quantize, Recipe, RotatePairs, RotateResidual

from conftest import perturbed_mamba, rel_err

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 256
SEQ_LEN = 40
TOL = 3e-3

PRESETS = sorted(get_adapter("mamba").recipes())
#: presets that need a Mamba2 model; every other preset runs on Mamba1
MAMBA2_ONLY = {"quamba2"}

_g = torch.Generator().manual_seed(11)
CALIB = [torch.randint(0, VOCAB, (4, 32), generator=_g) for _ in range(3)]
# four different sequences; the one under test sits in the middle of the batch, not first
BATCH = torch.randint(0, VOCAB, (4, SEQ_LEN), generator=_g)
ROW = 1
SEQ = BATCH[ROW:ROW + 1]
# prefill of 9 tokens, one chunk of 7, then one token at a time (crosses the 16-token Mamba2 chunks)
SPLITS = [9, 16] + list(range(17, SEQ_LEN))


def _arch(preset: str) -> str:
    return "mamba2" if preset in MAMBA2_ONLY else "mamba1"


def _fp_model(arch: str):
    # chunk_size 16 < SEQ_LEN: the full Mamba2 forward runs several chunks of its scan
    return perturbed_mamba(arch, seed=0, state_size=8, **({"chunk_size": 16} if arch == "mamba2" else {}))


@functools.lru_cache(maxsize=None)
def _quantized(preset: str):
    """One quantized model per preset, shared by the two tests (they only run forwards)."""
    model = _fp_model(_arch(preset))
    return aq.quantize_(model, preset, calib_data=CALIB, family="mamba", progress=False)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def _cached(model, ids: torch.Tensor, splits=SPLITS) -> torch.Tensor:
    """Logits of ``ids`` fed in pieces through the recurrent cache."""
    cache, out, start = model.new_cache(), [], 0
    with torch.no_grad():
        for end in list(splits) + [ids.shape[1]]:
            out.append(model(ids[:, start:end], cache=cache))
            start = end
    return torch.cat(out, dim=1)


def _alone_vs_batch(model) -> float:
    return rel_err(_logits(model, SEQ)[0], _logits(model, BATCH)[ROW])


def _cached_vs_full(model) -> float:
    return rel_err(_cached(model, SEQ), _logits(model, SEQ))


def test_the_batch_mixes_different_sequences():
    """Otherwise "alone equals in the batch" would hold for any scale."""
    others = [r for r in range(len(BATCH)) if r != ROW]
    assert all((BATCH[r] != BATCH[ROW]).float().mean() > 0.9 for r in others)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_fp_model_is_batch_and_chunk_independent(arch):
    """The floor under TOL: the unquantized model differs only by fp32 rounding."""
    model = _fp_model(arch)
    assert _alone_vs_batch(model) < 1e-5
    assert _cached_vs_full(model) < 1e-5


@pytest.mark.parametrize("preset", PRESETS)
def test_a_sequence_alone_equals_it_inside_a_batch(preset):
    assert _alone_vs_batch(_quantized(preset)) < TOL


@pytest.mark.parametrize("preset", PRESETS)
def test_cached_decode_equals_the_full_forward(preset):
    assert _cached_vs_full(_quantized(preset)) < TOL


def _per_tensor_dynamic() -> Recipe:
    """Per-channel int8 weights, int8 activations with one scale per tensor per call; no transform."""
    return Recipe("per_tensor_dynamic", [
        Quantize(weight=QuantSpec(granularity="channel", axis=0), activation=QuantSpec(granularity="tensor", axis=-1),
                 dynamic=True)])


def _mambaquant_reference() -> Recipe:
    """MambaQuant as its reference code runs it: smoothing, KLT-Hadamard rotations R1/R5/R2, state
    rotation R4, asymmetric per-channel weights, activations dynamic per tensor (h·C inputs per token)."""
    from archquant.adapters.mamba_recipes import MambaQuantSmooth, StateRotation

    token = QuantSpec(granularity="token", axis=-1).to_dict()
    return Recipe("mambaquant_reference", [
        MambaQuantSmooth(),
        RotateResidual(rotation="klt_hadamard"),
        RotatePairs(rotation="klt_hadamard"),
        OnlineHadamard(klt=True),
        StateRotation(),
        Quantize(weight=QuantSpec(symmetric=False, granularity="channel", axis=0),
                 activation=QuantSpec(granularity="tensor", axis=-1), dynamic=True,
                 optional_sites=["*.state_site"],
                 overrides={"*.state_site": {"activation": token}, "*.x_proj:output": {"activation": token}}),
    ])


def _mambaquant_per_tensor_option() -> RecipeOptions:
    """The preset's own switch to the reference setting."""
    return RecipeOptions(name="mambaquant", a_granularity="tensor")


@pytest.mark.parametrize("recipe", [_per_tensor_dynamic, _mambaquant_reference, _mambaquant_per_tensor_option],
                         ids=lambda f: f.__name__[1:])
def test_per_tensor_dynamic_scales_fail_the_check(recipe):
    """One scale over batch × sequence couples the sequences and the decode steps: the check above
    must see it, with margin."""
    model = aq.quantize_(_fp_model("mamba1"), recipe(), calib_data=CALIB, family="mamba", progress=False)
    assert _alone_vs_batch(model) > 3 * TOL
    assert _cached_vs_full(model) > 3 * TOL
