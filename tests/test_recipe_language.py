"""Recipes written as steps, presets as data, and the one pattern language for module selection."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import archquant as aq
from archquant.adapters import get_adapter
from archquant.api import resolve_recipe
from archquant.config import ConfigError, load_config
from archquant.core import matching
from archquant.core.presets import PRESETS, Preset, RecipeOptions
from archquant.core.recipe import Recipe, steps_from_config
from archquant.models.toy import ToyConfig, init_toy_model

get_adapter("mamba")  # registers the Mamba family's own steps and presets
ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
SMALL_DATA = ["calibration.num_samples=8", "calibration.batch_size=4", "calibration.options.seq_len=64",
              "evaluation.num_samples=4", "evaluation.batch_size=4", "evaluation.options.seq_len=64"]


# ---------------------------------------------------------------- matching
@pytest.mark.parametrize("name, pattern, expected", [
    ("layers.0.mixer.in_proj", "layers.0.mixer.in_proj", True),
    ("layers.0.mixer.in_proj", "layers.0.mixer", False),           # exact means exact, not a prefix
    ("layers.0.mixer.u_site", "*.u_site", True),
    ("layers.10.mixer.out_proj", "layers.?.mixer.out_proj", False),
    ("blocks.3.adaLN_modulation.1", "re:.*(embedder|adaLN).*", True),
    ("blocks.3.attn.qkv", "re:.*(embedder|adaLN).*", False),
    ("blocks.3.attn.qkv", "re:attn", False),                       # a regex matches the whole name
    ("x.in_proj:input", "*:input", True),
])
def test_pattern_kinds(name, pattern, expected):
    assert matching.matches(name, pattern) is expected


def test_bad_regex_is_named():
    with pytest.raises(ValueError, match=r"recipe.steps\[0\].Quantize.ignore\[0\]: pattern 're:\(' is not a valid"):
        steps_from_config([{"Quantize": {"ignore": ["re:("]}}])


# ---------------------------------------------------------------- steps in YAML
@pytest.mark.parametrize("steps, message", [
    ([], r"recipe.steps must be a non-empty list"),
    ("Quantize", r"recipe.steps must be a non-empty list"),
    ([{"Quantise": {}}], r"recipe.steps\[0\]: unknown recipe step 'Quantise': allowed .*Quantize"),
    ([{"SmoothQuant": {"alph": 0.5}}], r"recipe.steps\[0\].SmoothQuant: unknown key 'alph': allowed alpha"),
    ([{"SmoothQuant": {"alpha": "half"}}], r"recipe.steps\[0\].SmoothQuant.alpha must be a number, got 'half'"),
    ([{"OnlineHadamard": {}}, {"Quantize": {"weight": {"bitz": 8}}}],
     r"recipe.steps\[1\].Quantize.weight: QuantSpec has no field 'bitz'"),
    ([{"Quantize": {"weight": 8}}], r"recipe.steps\[0\].Quantize.weight must be a quantization spec mapping"),
    ([{"Quantize": {"act_observer": "histogram"}}], r"recipe.steps\[0\].Quantize.act_observer has value 'histogram'"),
    ([{"Quantize": {"overrides": {"*.u_site": {"obsrver": "percentile"}}}}],
     r"recipe.steps\[0\].Quantize.overrides\['\*.u_site'\]: unknown key 'obsrver'"),
    ([{"Quantize": {}, "SmoothQuant": {}}], r"recipe.steps\[0\] must be a mapping with one key"),
    ([{"Quantize": {"targets": "in_proj"}}], r"recipe.steps\[0\].Quantize.targets must be a list"),
    ([{"SmoothQuant": {"alpha": 1.5}}], r"recipe.steps\[0\].SmoothQuant.alpha has value 1.5: allowed values are in \[0.0, 1.0\]"),
    ([{"RotateResidual": {"rotation": "givens"}}], r"RotateResidual.rotation has value 'givens': allowed values are hadamard"),
    ([{"MambaQuantSmooth": {"alpha": -1}}], r"MambaQuantSmooth.alpha has value -1.0: allowed"),
    ([{"Quamba2Quantize": {"head_groups": 0}}], r"Quamba2Quantize.head_groups has value 0: allowed values are >= 1"),
])
def test_step_errors_name_the_step_and_key(steps, message):
    with pytest.raises(ValueError, match=message):
        steps_from_config(steps)


def test_steps_by_class_name_or_kind():
    a, b = steps_from_config([{"SmoothQuant": {"alpha": 0.7}}, {"smoothquant": {"alpha": 1}}])
    assert type(a) is type(b) and a.alpha == 0.7 and b.alpha == 1.0 and isinstance(b.alpha, float)


@pytest.mark.parametrize("family", ["mamba", "toy"])
def test_every_preset_round_trips_through_its_dict(family):
    for name, build in get_adapter(family).recipes().items():
        recipe = build(RecipeOptions(name=name))
        assert Recipe.from_dict(recipe.to_dict()).to_dict() == recipe.to_dict(), name


def _preset_of(builder):
    """The Preset behind a family's builder: a partial of ``Preset.recipe``, possibly inside the family's
    own wrapper (Mamba's adds the lm_head option: a partial whose first argument is that builder)."""
    while not isinstance(getattr(builder.func, "__self__", None), Preset):
        builder = builder.args[0]
    return builder.func.__self__


def test_presets_are_defined_once_and_shared():
    mamba, toy = get_adapter("mamba").recipes(), get_adapter("toy").recipes()
    assert set(PRESETS) >= set(mamba) | set(toy)
    for name in set(mamba) & set(toy):  # one definition; a family only changes defaults
        assert _preset_of(mamba[name]) is _preset_of(toy[name]) is PRESETS[name]
    # Mamba's static baselines quantize weights per tensor (as Quamba's table); the toy's per channel
    assert mamba["static_minmax"](RecipeOptions()).steps[-1].weight.granularity == "tensor"
    assert toy["static_minmax"](RecipeOptions()).steps[-1].weight.granularity == "channel"
    # a knob the user sets wins over the family's default
    assert mamba["static_minmax"](RecipeOptions(w_granularity="channel")).steps[-1].weight.granularity == "channel"


# ---------------------------------------------------------------- config
def _config(tmp_path, text: str, *overrides: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(path, list(overrides))


def test_steps_beside_preset_knobs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"config key .recipe.w_bits. has no effect beside recipe.steps"):
        _config(tmp_path, "family: toy\nrecipe:\n  w_bits: 4\n  steps: [{Quantize: {}}]\n")


def test_step_errors_from_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^recipe.steps\[1\].Quantize: unknown key 'wieght'"):
        _config(tmp_path, "family: toy\nrecipe:\n  steps:\n    - SmoothQuant: {}\n    - Quantize: {wieght: {}}\n")


def test_preset_options_belong_to_their_preset(tmp_path):
    data = "calibration: {source: stdlib}\nevaluation: {source: stdlib}\n"
    base = data + "family: mamba\nrecipe:\n  name: mambaquant\n"
    cfg = _config(tmp_path, base + "  options: {klt_sites: residual}\n")
    assert cfg.recipe.options == {"klt_sites": "residual"}
    # the older flat form still reads, as the option it now is
    assert _config(tmp_path, base + "  klt_sites: dt\n").recipe.options == {"klt_sites": "dt"}
    with pytest.raises(ConfigError, match=r"'recipe.options.klt_sites' has value 'residual,state': 'state' is not a site: allowed residual, dt, out"):
        _config(tmp_path, base + "  options: {klt_sites: 'residual,state'}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'recipe.options.klt_sites' for preset 'quamba'"):
        _config(tmp_path, data + "family: mamba\nrecipe:\n  name: quamba\n  options: {klt_sites: dt}\n")
    # a baseline in compare does not inherit the main preset's own options
    cfg = _config(tmp_path, base + "  options: {klt_sites: dt}\ncompare: [quamba]\n")
    assert cfg.compare == ["quamba"]


# ---------------------------------------------------------------- targets, ignore, overrides
def _toy():
    return init_toy_model(ToyConfig(hidden_size=64, intermediate_size=128, num_layers=2, seed=0))


def test_ignore_by_pattern_keeps_modules_in_fp():
    model = _toy()
    x = torch.randn(4, model.config.in_features)
    recipe = Recipe("w8", steps_from_config([{"Quantize": {
        "weight": {"bits": 8, "granularity": "channel"}, "activation": {"bits": 8, "granularity": "token", "axis": -1},
        "dynamic": True, "ignore": ["re:layers\\.0\\..*"]}}]))
    aq.quantize_(model, recipe, progress=False)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["layers.0.up_proj"] == "Linear" and kinds["layers.0.down_proj"] == "Linear"
    assert kinds["layers.1.up_proj"] == "QuantLinear"
    model(x)


@pytest.mark.parametrize("step, message", [
    ({"targets": ["layers.*.gate_proj"]}, r"quantize.targets: pattern 'layers.\*.gate_proj' selects nothing"),
    ({"ignore": ["layer.0.up_proj"]}, r"quantize.ignore: pattern 'layer.0.up_proj' selects nothing"),
    ({"optional_sites": ["*.state_site"]}, r"quantize.optional_sites: pattern '\*.state_site' selects nothing"),
])
def test_a_pattern_that_selects_nothing_is_refused(step, message):
    model = _toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = Recipe("w8", steps_from_config([{"Quantize": {
        "weight": {"bits": 8}, "activation": {"bits": 8, "granularity": "token", "axis": -1}, "dynamic": True, **step}}]))
    with pytest.raises(ValueError, match=message):
        aq.quantize_(model, recipe, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # left as it was


# ---------------------------------------------------------------- notes
def test_batch_dependent_setting_is_flagged():
    presets = get_adapter("mamba").recipes()
    assert presets["mambaquant"](RecipeOptions()).notes() == []
    notes = presets["mambaquant"](RecipeOptions(a_granularity="tensor")).notes()
    assert len(notes) == 1 and "depends on the other samples in its batch" in notes[0]


# ---------------------------------------------------------------- the acceptance check
def _quantized_tensors(config: str, tmp_path, label: str) -> dict[str, torch.Tensor]:
    cfg = load_config(ROOT / "configs" / config, SMALL_DATA)
    adapter = get_adapter(cfg.family)
    model, model_config = adapter.load_model(cfg.model.path, dict(cfg.model.options), cfg.model.dtype)
    calib = adapter.load_data(aq.config.to_dict(cfg)["calibration"], "calibration", model_config)
    aq.quantize_(model, resolve_recipe(cfg.recipe, adapter), calib_data=calib.batches, family=cfg.family,
                 progress=False)
    aq.save_quantized(model, tmp_path / label)
    return load_file(str(tmp_path / label / "model.safetensors"))


def test_steps_yaml_reproduces_the_quamba_preset_exactly(tmp_path):
    preset = _quantized_tensors("mamba_w8a8.yaml", tmp_path, "preset")
    steps = _quantized_tensors("mamba_w8a8_steps.yaml", tmp_path, "steps")
    assert preset.keys() == steps.keys() and len(preset) > 20
    different = [k for k in preset if preset[k].dtype != steps[k].dtype or not torch.equal(preset[k], steps[k])]
    assert different == []
