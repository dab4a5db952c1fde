"""``quantize_`` refuses bad input before touching the model, and a failure leaves it intact.

Bad input (calibration data that is missing, empty, exhausted or malformed; a model no family
recognises; a recipe for another architecture; NaN/Inf weights; invalid recipe options; a
model with no layers) is a one-line ``ValueError`` raised before anything changes. A step that
fails later (injected here after in-place rotations and fusions) is undone exactly: same module
objects, same parameters bit for bit, no quantized modules, hooks or attributes left behind.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import archquant as aq
from archquant import RecipeOptions
from archquant.core.calibration import NonFiniteActivationError
from archquant.core.modules import ActQuantizer, QuantConv1d, QuantLinear
from archquant.core.presets import weight_spec
from archquant.core.recipe import Quantize, Recipe, apply_recipe
from archquant.core.structure import ModelStructure
from archquant.models.toy import ToyConfig, init_toy_model, toy_task

from conftest import perturbed_mamba

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 256
TOY = ToyConfig(hidden_size=64, intermediate_size=128, num_layers=2, seed=0)


def _mamba(arch: str = "mamba1", **config) -> nn.Module:
    config = {"hidden_size": 32, "state_size": 8, **config}
    if arch == "mamba2":
        config.setdefault("head_dim", 16)
    return perturbed_mamba(arch, **config)


def _ids(n: int = 2, seed: int = 1, shape=(2, 16)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, shape, generator=g) for _ in range(n)]


def _toy(**kw) -> nn.Module:
    return init_toy_model(ToyConfig(**{**TOY.to_dict(), **kw}))


def _toy_batches(n: int = 2) -> list[torch.Tensor]:
    x, _ = toy_task(TOY, 32 * n, split_seed=123)
    return list(x.split(32))


X_MAMBA = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))
X_TOY = toy_task(TOY, 16, split_seed=9)[0]


def _out(model, x):
    with torch.no_grad():
        return model(x)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bytes (so that NaN == NaN and -0.0 != 0.0)."""
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.is_floating_point() else t


class Fingerprint:
    """What must survive a failed ``quantize_``: module and parameter objects, values bit for
    bit, attributes, hooks, training flags, and the outputs."""

    def __init__(self, model: nn.Module, x: torch.Tensor | None) -> None:
        self.out = None if x is None else _out(model, x)  # first: a forward may cache things on modules
        self.modules = {n: (id(m), type(m), m.training, sorted(m.__dict__), sorted(m._modules),
                            len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
        self.params = {n: id(p) for n, p in model.named_parameters(remove_duplicate=False)}
        self.state = {k: (v.dtype, tuple(v.shape), _bits(v).clone()) for k, v in model.state_dict().items()}

    def assert_same(self, model: nn.Module, x: torch.Tensor | None) -> None:
        after = Fingerprint(model, x)
        assert after.modules == self.modules
        assert after.params == self.params
        assert after.state.keys() == self.state.keys()
        for k, (dtype, shape, bits) in self.state.items():
            assert after.state[k][:2] == (dtype, shape), k
            assert torch.equal(after.state[k][2], bits), k
        assert not any(isinstance(m, (QuantLinear, QuantConv1d, ActQuantizer)) for m in model.modules())
        if x is not None:
            assert torch.equal(_bits(after.out), _bits(self.out))


# ----------------------------------------------------------------------------------------
# calibration data: generators work; missing / empty / malformed data is refused up front
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["smoothquant", "hadamard_static"])
def test_generator_calibrates_every_step_like_a_list(preset):
    batches = _toy_batches(3)
    ref, gen = _toy(), _toy()
    aq.quantize_(ref, preset, calib_data=batches, progress=False)
    aq.quantize_(gen, preset, calib_data=(b for b in batches), progress=False)  # single use
    assert torch.equal(_out(gen, X_TOY), _out(ref, X_TOY))


def test_generator_works_for_mamba_recipes_that_calibrate_several_times():
    batches = _ids()
    ref, gen = _mamba(), _mamba()
    aq.quantize_(ref, "smoothquant", calib_data=batches, progress=False)
    aq.quantize_(gen, "smoothquant", calib_data=iter(batches), progress=False)
    assert torch.equal(_out(gen, X_MAMBA), _out(ref, X_MAMBA))


def _exhausted():
    g = (b for b in _ids())
    list(g)
    return g


MAMBA_BAD_DATA = [
    (None, r"recipe 'quamba' \(step 'quantize'\) needs calibration data, but calib_data is None"),
    ([], r"calibration data is empty: .*got an empty list"),
    (_exhausted, r"calibration data is empty: .*iterator yielded no batch .*generator can be read only once"),
    ([torch.rand(2, 16)], r"calibration batch 0: token ids must be torch.int64 or torch.int32, got torch.float32"),
    ([torch.randint(0, VOCAB, (16,))], r"calibration batch 0: token ids must have shape \(batch, seq_len\).*\(16,\)"),
    ([torch.randint(0, VOCAB, (2, 2, 8))], r"calibration batch 0: token ids must have shape .*\(2, 2, 8\)"),
    (_ids(1) + [torch.full((2, 16), VOCAB)], r"calibration batch 1: token id 256 is outside .*vocabulary \[0, 256\)"),
    ([torch.full((2, 16), -1)], r"calibration batch 0: token id -1 is outside"),
    ([{"input_ids": _ids(1)[0]}], r"calibration batch 0: expected a tensor of token ids .*got a dict"),
    (_ids(1)[0], r"calib_data is a single tensor of shape \(2, 16\)"),
    (5, r"calib_data must be an iterable of batches .*got a int"),
]


@pytest.mark.parametrize("data,message", MAMBA_BAD_DATA)
def test_bad_mamba_calibration_data_is_refused_before_touching_the_model(data, message):
    model = _mamba()
    before = Fingerprint(model, X_MAMBA)
    with pytest.raises(ValueError, match=message):
        aq.quantize_(model, "quamba", calib_data=data() if callable(data) else data, progress=False)
    before.assert_same(model, X_MAMBA)


@pytest.mark.parametrize("data,message", [
    ([torch.ones(4, 32, dtype=torch.long)], r"calibration batch 0: inputs must be a floating-point tensor"),
    ([torch.ones(4, 31)], r"calibration batch 0: inputs must have shape \(batch, 32\), got \(4, 31\)"),
    ([torch.ones(4, 32), torch.full((4, 32), float("nan"))], r"calibration batch 1: inputs hold NaN/Inf"),
    ([], r"calibration data is empty"),
])
def test_bad_toy_calibration_data_is_refused(data, message):
    model = _toy()
    before = Fingerprint(model, X_TOY)
    with pytest.raises(ValueError, match=message):
        aq.quantize_(model, "smoothquant", calib_data=data, progress=False)
    before.assert_same(model, X_TOY)


@pytest.mark.parametrize("preset", ["rtn_dynamic", "weight_only"])
def test_recipes_that_do_not_calibrate_need_no_data(preset):
    model = _toy(intermediate_size=128, hidden_size=128)
    aq.quantize_(model, preset, calib_data=None, progress=False)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    aq.quantize_(_mamba(), "rtn_dynamic", progress=False)


def test_a_custom_forward_fn_takes_batches_the_family_would_refuse():
    model = _mamba()
    dicts = [{"ids": b} for b in _ids()]
    aq.quantize_(model, "static_minmax", calib_data=dicts, forward_fn=lambda m, b: m(b["ids"]), progress=False)
    assert torch.isfinite(_out(model, X_MAMBA)).all()


# ----------------------------------------------------------------------------------------
# models and recipes the family does not handle
# ----------------------------------------------------------------------------------------


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = None
        self.norm = nn.LayerNorm(16)
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(self.norm(x))


def _bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    return transformers.BertModel(cfg).eval()


@pytest.mark.parametrize("make,family,message", [
    (lambda: nn.Sequential(nn.Linear(4, 4)), None, r"no family recognises a model of class Sequential"),
    (_bert, None, r"no family recognises a model of class BertModel"),
    (_bert, "mamba", r"family 'mamba' does not recognise a model of class BertModel"),
    (_Custom, "toy", r"family 'toy' does not recognise a model of class _Custom"),
    (lambda: _toy(), "mamba", r"family 'mamba' does not recognise a model of class ToyResMLP"),
])
def test_unrecognised_models_are_a_value_error(make, family, message):
    model = make()
    before = Fingerprint(model, None)
    with pytest.raises(ValueError, match=message):
        aq.quantize_(model, "quamba" if family != "toy" else "smoothquant", family=family, progress=False)
    before.assert_same(model, None)


def test_explicit_structure_and_recipe_work_for_any_model():
    model = _Custom()
    recipe = Recipe("w8", [Quantize(weight=aq.QuantSpec(granularity="channel"), activation=None)])
    aq.quantize_(model, recipe, structure=ModelStructure(hidden_size=16, quantize=["proj"]), progress=False)
    assert isinstance(model.proj, QuantLinear)


@pytest.mark.parametrize("arch,preset,message", [
    ("mamba1", "quamba2", r"recipe 'quamba2' is for Mamba2 models \(step 'quamba2_quantize'\), "
                          r"but this MambaLM is a Mamba1 model"),
    ("mamba2", "mambaquant", r"recipe 'mambaquant' is for Mamba1 models \(step 'mambaquant_smooth'\), "
                             r"but this MambaLM is a Mamba2 model"),
])
def test_recipe_for_another_architecture_is_refused(arch, preset, message):
    model = _mamba(arch)
    before = Fingerprint(model, X_MAMBA)
    with pytest.raises(ValueError, match=message):
        aq.quantize_(model, preset, calib_data=_ids(), progress=False)
    before.assert_same(model, X_MAMBA)


def test_recipe_architectures_come_from_the_steps():
    presets = aq.adapters.get_adapter("mamba").recipes()
    o = RecipeOptions()
    assert presets["quamba2"](o).architectures() == ("mamba2",)
    assert presets["mambaquant"](o).architectures() == ("mamba1",)
    assert presets["quamba"](o).architectures() is None


# ----------------------------------------------------------------------------------------
# non-finite weights, invalid options, nothing to quantize
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["rtn_dynamic", "static_minmax", "quamba", "mambaquant"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_for_every_recipe(preset, value):
    model = _mamba()
    with torch.no_grad():
        model.backbone.layers[1].mixer.x_proj.weight[0, 3] = value
    before = Fingerprint(model, None)
    with pytest.raises(ValueError, match=r"parameter 'backbone\.layers\.1\.mixer\.x_proj\.weight' of MambaLM has 1 "
                                         r"NaN/Inf value"):
        aq.quantize_(model, preset, calib_data=_ids(), progress=False)
    before.assert_same(model, None)


def test_non_finite_weights_are_refused_for_weight_only():
    model = _toy()
    with torch.no_grad():
        model.layers[0].down_proj.bias[2] = float("-inf")
    with pytest.raises(ValueError, match=r"parameter 'layers\.0\.down_proj\.bias' of ToyResMLP"):
        aq.quantize_(model, RecipeOptions(name="weight_only", w_group_size=32), progress=False)


@pytest.mark.parametrize("value,message", [
    (-5, r"recipe\.w_group_size has value -5: allowed values are positive integers"),
    (0, r"recipe\.w_group_size has value 0: allowed values are positive integers"),
    (1.5, r"recipe\.w_group_size has value 1\.5: allowed values are integers"),
    (True, r"recipe\.w_group_size has value True: allowed values are integers"),
])
def test_invalid_group_size_is_refused_not_replaced(value, message):
    with pytest.raises(ValueError, match=message):
        RecipeOptions(name="weight_only", w_group_size=value).validate()
    model = _toy()
    with pytest.raises(ValueError, match=message):
        aq.quantize_(model, RecipeOptions(name="weight_only", w_group_size=value), progress=False)
    with pytest.raises(ValueError, match=r"recipe\.w_group_size has value -5"):
        weight_spec(RecipeOptions(w_group_size=-5), "group")  # presets refuse it even unvalidated


def test_group_size_default_and_explicit():
    assert weight_spec(RecipeOptions(), "group").group_size == 128
    assert weight_spec(RecipeOptions(w_group_size=32), "group").group_size == 32
    assert weight_spec(RecipeOptions(w_group_size=32), "channel").group_size == 0  # only used by groups


@pytest.mark.parametrize("make,preset,data", [
    (lambda: _mamba(num_layers=0), "quamba", _ids()),
    (lambda: _mamba(num_layers=0), "rtn_dynamic", None),
    (lambda: _mamba("mamba2", num_layers=0), "quamba2", _ids()),
    (lambda: _toy(num_layers=0), "smoothquant", _toy_batches()),
])
def test_a_model_without_layers_has_nothing_to_quantize(make, preset, data):
    model = make()
    before = Fingerprint(model, None)
    with pytest.raises(ValueError, match=rf"nothing to quantize: {type(model).__name__} has no layers"):
        aq.quantize_(model, preset, calib_data=data, progress=False)
    before.assert_same(model, None)


# ----------------------------------------------------------------------------------------
# a step that fails late leaves the model exactly as it was
# ----------------------------------------------------------------------------------------


def _fail_in_quantize(monkeypatch, after: bool = True):
    """Make every Quantize step raise, after it wrapped and calibrated (``after``) or before."""
    original = Quantize.apply

    def apply(self, model, ctx):
        if after:
            original(self, model, ctx)
        raise RuntimeError("injected failure")

    monkeypatch.setattr(Quantize, "apply", apply)


@pytest.mark.parametrize("arch,options", [
    ("mamba1", RecipeOptions(name="quamba", rotation="random_hadamard")),  # rotation fused in place first
    ("mamba1", RecipeOptions(name="mambaquant")),  # smoothing, S-SiLU, state rotation, KLT rotations
    ("mamba2", RecipeOptions(name="quamba2")),
])
def test_late_failure_restores_the_model_exactly(monkeypatch, arch, options):
    model = _mamba(arch, tie_embeddings=True)
    model.backbone.layers[0].register_forward_hook(lambda *a: None)  # the caller's own hook survives
    fp = _out(model, X_MAMBA)
    model.train()
    before = Fingerprint(model, None)
    _fail_in_quantize(monkeypatch)
    with pytest.raises(RuntimeError, match="injected failure"):
        aq.quantize_(model, options, calib_data=(b for b in _ids()), progress=False)
    before.assert_same(model, None)
    assert model.training and model.lm_head.weight is model.backbone.embeddings.weight
    model.eval()
    assert torch.equal(_out(model, X_MAMBA), fp)
    assert not hasattr(model, "_archquant_recipe")

    # the restored model quantizes exactly like a fresh copy
    monkeypatch.undo()
    fresh = _mamba(arch, tie_embeddings=True)
    aq.quantize_(model, options, calib_data=_ids(), progress=False)
    aq.quantize_(fresh, options, calib_data=_ids(), progress=False)
    assert torch.equal(_out(model, X_MAMBA), _out(fresh, X_MAMBA))


def test_non_finite_activation_during_calibration_restores_the_model():
    # finite weights whose rotated copy overflows: the failure comes after the in-place rotation
    model = _toy()
    with torch.no_grad():
        model.head.weight.fill_(3e38)
    before = Fingerprint(model, None)
    with pytest.raises(NonFiniteActivationError, match="non-finite activation"):
        aq.quantize_(model, "hadamard_static", calib_data=_toy_batches(), progress=False)
    before.assert_same(model, None)


def test_apply_recipe_restores_too_and_can_be_told_not_to(monkeypatch):
    _fail_in_quantize(monkeypatch)
    model = _toy()
    adapter = aq.adapters.get_adapter("toy")
    recipe = adapter.recipes()["hadamard_static"](RecipeOptions())
    before = Fingerprint(model, X_TOY)
    with pytest.raises(RuntimeError, match="injected"):
        apply_recipe(model, recipe, adapter.structure(model), calib_batches=_toy_batches(), progress=False)
    before.assert_same(model, X_TOY)
    scratch = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="injected"):
        apply_recipe(scratch, recipe, adapter.structure(scratch), calib_batches=_toy_batches(), progress=False,
                     restore_on_failure=False)
    assert any(isinstance(m, QuantLinear) for m in scratch.modules())  # left as the failure found it
