"""Mamba family adapter: fused transforms, Quamba / Quamba2 / MambaQuant presets, checkpoints, runner.

Everything runs on tiny random models (perturbed away from their init so that norms, A_log, D,
dt biases are not trivial) on the CPU; the whole file runs in well under a minute.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import archquant as aq
from archquant.core.modules import unpack_nibbles
from archquant import RecipeOptions
from archquant.adapters import get_adapter
from archquant.adapters.mamba_recipes import MambaQuantSmooth, StateRotation, mambaquant, quamba2_groups
from archquant.core import hadamard
from archquant.core.modules import QuantLinear
from archquant.core.recipe import (OnlineHadamard, Quantize, Recipe, RotatePairs, RotateResidual, SmoothQuant,
                                   apply_recipe)
from archquant.core.transforms import ROTATION_KINDS, HadamardTransform, MatrixTransform
from archquant.models.mamba import MambaConfig, MambaLM, ScaledSiLU
from archquant.models.mamba_loading import save_mamba_hf
from cli_testing import one_error_line, run_cli
from conftest import perturbed_mamba, rel_err

ROOT = Path(__file__).resolve().parent.parent
ADAPTER = get_adapter("mamba")
FORWARD = ADAPTER.forward
VOCAB = 256
L0 = "backbone.layers.0.mixer"

MAMBA1_PRESETS = ["rtn_dynamic", "static_minmax", "smoothquant", "quamba", "mambaquant"]
MAMBA2_PRESETS = ["rtn_dynamic", "static_minmax", "smoothquant", "quamba", "quamba2"]
ROTATED_PRESETS = {"mambaquant", "quamba2"}  # presets with a residual-stream rotation (they untie the LM head)

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def _config(arch: str, tie: bool = True, **kw) -> MambaConfig:
    base = dict(arch=arch, vocab_size=VOCAB, hidden_size=64, num_layers=2, state_size=8, tie_embeddings=tie)
    if arch == "mamba2":
        base.update(head_dim=16, n_groups=2, chunk_size=16)
    base.update(kw)
    return MambaConfig(**base)


def _model(arch: str = "mamba1", seed: int = 0, tie: bool = True, scale: float = 0.1, **kw) -> MambaLM:
    """Standard init plus Gaussian noise on every parameter (conftest.perturbed_mamba), at _config's sizes."""
    fields = dataclasses.asdict(_config(arch, tie, **kw))
    del fields["arch"]
    return perturbed_mamba(arch, seed, noise_seed=seed + 1000, scale=scale, **fields)


def _batches(n: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (4, 64), generator=g) for _ in range(n)]


BATCHES = _batches()
X = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(7))  # held-out input


def _logits(model, x=X) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _apply(model, steps) -> None:
    apply_recipe(model, Recipe("test", list(steps)), ADAPTER.structure(model), calib_batches=BATCHES,
                 forward_fn=FORWARD, progress=False)


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters(remove_duplicate=False)}


def _changed(before: torch.Tensor, after: torch.Tensor) -> bool:
    return before.shape == after.shape and rel_err(after, before) > 1e-3


def _quantize(arch: str, options: RecipeOptions, tie: bool = True):
    """(quantized model, FP logits, quantized logits) for one preset on a fresh model."""
    model = _model(arch, tie=tie)
    fp = _logits(model)
    aq.quantize_(model, options, calib_data=BATCHES, family="mamba", progress=False)
    return model, fp, _logits(model)


def _saved_config(model, tmp_path) -> dict:
    directory = aq.save_quantized(model, tmp_path / "ckpt")
    return json.loads((Path(directory) / "quantization_config.json").read_text())


# ----------------------------------------------------------------------------------------
# 1. FP exactness of every fused transform (quantization off)
# ----------------------------------------------------------------------------------------


def _check_smooth(model, before, r, n, d):
    m = model.get_submodule(L0)
    assert isinstance(m.gate_act, ScaledSiLU) and m.gate_act.scale.shape == (d,)
    assert rel_err(m.gate_act.scale, torch.ones(d)) > 1e-3
    for p in ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj"):
        assert _changed(before[f"{L0}.{p}.weight"], model.get_submodule(f"{L0}.{p}").weight), p
    # S4 balances B against C: both row blocks of x_proj move
    w = model.get_submodule(f"{L0}.x_proj").weight
    assert _changed(before[f"{L0}.x_proj.weight"][r:r + n], w[r:r + n])
    assert _changed(before[f"{L0}.x_proj.weight"][r + n:], w[r + n:])


def _check_residual(model, before, r, n, d):
    assert _changed(before["backbone.embeddings.weight"], model.backbone.embeddings.weight)
    assert _changed(before["lm_head.weight"], model.lm_head.weight)
    assert model.lm_head.weight is not model.backbone.embeddings.weight  # untied before fusing
    for i in range(2):
        assert _changed(before[f"backbone.layers.{i}.mixer.in_proj.weight"],
                        model.get_submodule(f"backbone.layers.{i}.mixer.in_proj").weight)
        assert _changed(before[f"backbone.layers.{i}.mixer.out_proj.weight"],
                        model.get_submodule(f"backbone.layers.{i}.mixer.out_proj").weight)
        assert torch.equal(model.backbone.layers[i].norm.weight, torch.ones(64))  # γ folded into in_proj
    assert torch.equal(model.backbone.norm_f.weight, torch.ones(64))


def _check_pairs(model, before, r, n, d):
    w = model.get_submodule(f"{L0}.x_proj").weight
    assert _changed(before[f"{L0}.x_proj.weight"][:r], w[:r])
    assert torch.equal(before[f"{L0}.x_proj.weight"][r:], w[r:])  # B, C rows untouched
    assert _changed(before[f"{L0}.dt_proj.weight"], model.get_submodule(f"{L0}.dt_proj").weight)


def _check_online(kind):
    def check(model, before, r, n, d):
        lin = model.get_submodule(f"{L0}.out_proj")
        assert isinstance(lin, QuantLinear) and isinstance(lin.input_transform, kind)
        assert lin.weight_spec is None and lin.input_quantizer is None  # quantization off
        assert _changed(before[f"{L0}.out_proj.weight"], lin.weight)
    return check


def _check_state(model, before, r, n, d):
    m = model.get_submodule(L0)
    assert isinstance(m.state_rotation, HadamardTransform) and m.state_rotation.size == n
    w = m.x_proj.weight
    assert torch.equal(before[f"{L0}.x_proj.weight"][:r + n], w[:r + n])  # dt and B rows untouched
    assert _changed(before[f"{L0}.x_proj.weight"][r + n:], w[r + n:])  # C' = C·R


MAMBA1_STEPS = (
    [pytest.param([MambaQuantSmooth(0.5)], _check_smooth, id="mambaquant_smooth")]
    + [pytest.param([RotateResidual(rotation=k, seed=3)], _check_residual, id=f"rotate_residual-{k}")
       for k in ROTATION_KINDS]
    + [pytest.param([RotatePairs(rotation=k, seed=3)], _check_pairs, id=f"rotate_pairs-{k}")
       for k in ("klt_hadamard", "random_hadamard")]
    + [pytest.param([OnlineHadamard(klt=False)], _check_online(HadamardTransform), id="online_hadamard"),
       pytest.param([OnlineHadamard(klt=True)], _check_online(MatrixTransform), id="online_hadamard-klt"),
       pytest.param([StateRotation(seed=3)], _check_state, id="state_rotation")]
)


@pytest.mark.parametrize("steps,check", MAMBA1_STEPS)
def test_mamba1_fused_transform_is_exact_in_fp(steps, check):
    model = _model("mamba1")
    ref = _logits(model)
    before = _params(model)
    _apply(model, steps)
    assert rel_err(_logits(model), ref) <= 1e-5
    cfg = model.config
    check(model, before, cfg.dt_rank, cfg.state_size, cfg.d_inner)


def test_mambaquant_transforms_combined_are_exact_in_fp():
    recipe = mambaquant(RecipeOptions(name="mambaquant"))
    *steps, last = recipe.steps
    assert [s.kind for s in steps] == ["mambaquant_smooth", "rotate_residual", "rotate_pairs", "online_hadamard",
                                       "state_rotation"]
    assert isinstance(last, Quantize)
    assert steps[3].klt and steps[1].rotation == steps[2].rotation == "klt_hadamard"
    model = _model("mamba1")
    ref = _logits(model)
    before = _params(model)
    _apply(model, steps)
    assert rel_err(_logits(model), ref) <= 1e-5
    m = model.get_submodule(L0)
    assert isinstance(m.gate_act, ScaledSiLU) and isinstance(m.state_rotation, HadamardTransform)
    assert isinstance(m.out_proj.input_transform, MatrixTransform)
    for name in ("backbone.embeddings.weight", "lm_head.weight", f"{L0}.in_proj.weight", f"{L0}.x_proj.weight",
                 f"{L0}.dt_proj.weight", f"{L0}.out_proj.weight", f"{L0}.conv1d.weight"):
        assert _changed(before[name], model.get_submodule(name.rsplit(".", 1)[0]).weight), name


MAMBA2_STEPS = (
    [pytest.param([RotateResidual(rotation=k, seed=3)], id=f"rotate_residual-{k}") for k in ROTATION_KINDS]
    + [pytest.param([OnlineHadamard()], id="online_hadamard"),
       pytest.param([RotateResidual(rotation="random_hadamard"), OnlineHadamard()], id="rotate_residual+online")]
)


@pytest.mark.parametrize("steps", MAMBA2_STEPS)
def test_mamba2_fused_transforms_are_exact_in_fp(steps):
    model = _model("mamba2")
    ref = _logits(model)
    before = _params(model)
    _apply(model, steps)
    assert rel_err(_logits(model), ref) <= 1e-5
    if any(isinstance(s, RotateResidual) for s in steps):
        assert _changed(before["backbone.embeddings.weight"], model.backbone.embeddings.weight)
        assert _changed(before[f"{L0}.in_proj.weight"], model.get_submodule(f"{L0}.in_proj").weight)
    out_proj = model.get_submodule(f"{L0}.out_proj")
    assert _changed(before[f"{L0}.out_proj.weight"], out_proj.weight)
    if any(isinstance(s, OnlineHadamard) for s in steps):
        assert isinstance(out_proj.input_transform, HadamardTransform) and out_proj.input_transform.size == 128


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_smoothquant_step_is_exact_in_fp_with_tied_embeddings(arch):
    model = _model(arch)
    ref = _logits(model)
    _apply(model, [SmoothQuant(0.5)])
    assert rel_err(_logits(model), ref) <= 1e-5


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_smoothquant_step_is_exact_in_fp_with_untied_embeddings(arch):
    model = _model(arch, tie=False)
    ref = _logits(model)
    emb = model.backbone.embeddings.weight.detach().clone()
    _apply(model, [SmoothQuant(0.5)])
    assert rel_err(_logits(model), ref) <= 1e-5
    assert torch.equal(model.backbone.embeddings.weight, emb)


# ----------------------------------------------------------------------------------------
# 2. every preset quantizes, close to FP
# ----------------------------------------------------------------------------------------


def _preset_params():
    return [pytest.param(arch, name, id=f"{arch}-{name}")
            for arch, names in (("mamba1", MAMBA1_PRESETS), ("mamba2", MAMBA2_PRESETS)) for name in names]


def test_preset_lists_cover_every_preset():
    assert set(ADAPTER.recipes()) == set(MAMBA1_PRESETS) | set(MAMBA2_PRESETS)


@pytest.mark.parametrize("arch,name", _preset_params())
def test_preset_quantizes_close_to_fp(arch, name):
    model, fp, q = _quantize(arch, RecipeOptions(name=name))
    assert model._archquant_recipe["name"] == name
    assert torch.isfinite(q).all()
    err = rel_err(q, fp)
    assert 1e-5 < err < 0.1, err


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_smoothquant_preset_close_to_fp_with_untied_embeddings(arch):
    _, fp, q = _quantize(arch, RecipeOptions(name="smoothquant"), tie=False)
    assert torch.isfinite(q).all()
    assert 1e-5 < rel_err(q, fp) < 0.1


def test_mambaquant_w4_runs():
    model, fp, q4 = _quantize("mamba1", RecipeOptions(name="mambaquant", w_bits=4))
    _, _, q8 = _quantize("mamba1", RecipeOptions(name="mambaquant"))
    assert torch.isfinite(q4).all()
    assert rel_err(q8, fp) < rel_err(q4, fp) < 0.3
    in_proj = model.get_submodule(f"{L0}.in_proj")
    assert in_proj.weight_spec.bits == 4 and not in_proj.weight_spec.symmetric
    # 4-bit codes are stored two per byte: half the elements, each nibble a code in [0, 15]
    assert in_proj.weight_packed and in_proj.weight_codes.dtype == torch.uint8
    assert in_proj.weight_codes.numel() * 2 == in_proj.in_features * in_proj.out_features
    assert int(unpack_nibbles(in_proj.weight_codes, signed=False).max()) <= 15
    assert "zero_point" in in_proj.weight_params.as_dict()


# ----------------------------------------------------------------------------------------
# 3. checkpoints: bit-identical reload, and what quantization_config.json records
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,name", _preset_params())
def test_save_load_bit_identical(arch, name, tmp_path):
    model, _, q = _quantize(arch, RecipeOptions(name=name))
    aq.save_quantized(model, tmp_path / "ckpt")
    loaded = aq.load_quantized(tmp_path / "ckpt")
    assert torch.equal(_logits(loaded), q)
    assert loaded._archquant_recipe["name"] == name


@pytest.mark.parametrize("options", [RecipeOptions(name="mambaquant", w_bits=4),
                                     RecipeOptions(name="quamba", rotation="random_hadamard")],
                         ids=["mambaquant-w4", "quamba-rotated"])
def test_save_load_bit_identical_other_rotated_options(options, tmp_path):
    model, _, q = _quantize("mamba1", options)
    aq.save_quantized(model, tmp_path / "ckpt")
    assert torch.equal(_logits(aq.load_quantized(tmp_path / "ckpt")), q)


@pytest.mark.parametrize("arch,options", [
    ("mamba1", RecipeOptions(name="mambaquant")),
    ("mamba1", RecipeOptions(name="mambaquant", w_bits=4)),
    ("mamba1", RecipeOptions(name="quamba", rotation="random_hadamard")),
    ("mamba2", RecipeOptions(name="quamba2")),
], ids=["mambaquant", "mambaquant-w4", "quamba-rotated", "quamba2"])
@pytest.mark.parametrize("how", ["untied-model", "adapter-model-config"])
def test_rotated_presets_reload_bit_identically(arch, options, how, tmp_path):
    """The checkpoint path itself is sound: an untied model, or the adapter's model_config, reload exactly."""
    model, _, q = _quantize(arch, options, tie=how != "untied-model")
    kwargs = {"model_config": ADAPTER.model_config(model)} if how == "adapter-model-config" else {}
    aq.save_quantized(model, tmp_path / "ckpt", **kwargs)
    loaded = aq.load_quantized(tmp_path / "ckpt")
    assert torch.equal(_logits(loaded), q)
    if options.name == "mambaquant":
        m = loaded.get_submodule(L0)
        assert isinstance(m.gate_act, ScaledSiLU) and isinstance(m.state_rotation, HadamardTransform)
        assert torch.equal(m.gate_act.scale, model.get_submodule(L0).gate_act.scale)


def test_quamba_config_records_percentile_u_and_hadamard(tmp_path):
    model, _, _ = _quantize("mamba1", RecipeOptions(name="quamba"))
    mods = _saved_config(model, tmp_path)["modules"]
    d = model.config.d_inner
    for i in range(2):
        mixer = f"backbone.layers.{i}.mixer"
        u = mods[f"{mixer}.u_site"]["quantizer"]
        assert u["observer"] == "percentile" and u["observer_kwargs"] == {"alpha": 0.99999}
        assert u["dynamic"] is False and u["spec"]["granularity"] == "tensor"
        out = mods[f"{mixer}.out_proj"]
        assert out["input_transform"]["type"] == "hadamard" and out["input_transform"]["size"] == d
        assert out["input_quantizer"]["observer"] == "minmax" and out["input_quantizer"]["dynamic"] is False
        for p in ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj"):
            spec = mods[f"{mixer}.{p}"]["weight"]["spec"]
            assert (spec["bits"], spec["symmetric"], spec["granularity"]) == (8, True, "tensor"), p
        assert mods[f"{mixer}.in_proj"]["output_quantizer"] is not None  # x and z share a scale
        assert mods[f"{mixer}.x_proj"]["output_quantizer"] is not None  # dt_low | B | C: one scale
        assert mods[f"{mixer}.dt_proj"]["output_quantizer"] is not None
    assert "lm_head" not in mods


def test_quamba_keeps_ssm_state_in_floating_point(tmp_path):
    model, _, _ = _quantize("mamba1", RecipeOptions(name="quamba"))
    mods = _saved_config(model, tmp_path)["modules"]
    assert f"{L0}.state_site" not in mods


def test_mambaquant_config_records_gates_state_rotation_and_asymmetric_weights(tmp_path):
    model, _, _ = _quantize("mamba1", RecipeOptions(name="mambaquant"))
    qconfig = _saved_config(model, tmp_path)
    mods = qconfig["modules"]
    cfg = model.config
    for i in range(2):
        mixer = f"backbone.layers.{i}.mixer"
        assert mods[f"{mixer}.gate_act"] == {"type": "ScaledSiLU", "size": cfg.d_inner}
        assert mods[f"{mixer}.state_rotation"] == {"type": "hadamard", "size": cfg.state_size, "seed": 0,
                                                   "block": None}
        for p in ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj"):
            spec = mods[f"{mixer}.{p}"]["weight"]["spec"]
            assert (spec["symmetric"], spec["granularity"], spec["axis"]) == (False, "channel", 0), p
        assert mods[f"{mixer}.out_proj"]["input_transform"] == {"type": "matrix", "size": cfg.d_inner,
                                                                "name": "klt_hadamard"}
        state = mods[f"{mixer}.state_site"]["quantizer"]
        assert state["dynamic"] is True and state["spec"]["granularity"] == "token"
        assert mods[f"{mixer}.x_proj"]["output_quantizer"]["spec"]["granularity"] == "token"
        assert mods[f"{mixer}.in_proj"]["input_quantizer"]["dynamic"] is True
        # per token by default, so a sequence's result does not depend on its batch
        assert mods[f"{mixer}.in_proj"]["input_quantizer"]["spec"]["granularity"] == "token"
    assert [s["kind"] for s in qconfig["recipe"]["steps"]] == [
        "mambaquant_smooth", "rotate_residual", "rotate_pairs", "online_hadamard", "state_rotation", "quantize"]


def test_mambaquant_reference_setting_is_per_tensor_but_keeps_hc_inputs_per_token(tmp_path):
    model, _, _ = _quantize("mamba1", RecipeOptions(name="mambaquant", a_granularity="tensor"))
    mods = _saved_config(model, tmp_path)["modules"]
    for i in range(2):
        mixer = f"backbone.layers.{i}.mixer"
        assert mods[f"{mixer}.in_proj"]["input_quantizer"]["spec"]["granularity"] == "tensor"
        assert mods[f"{mixer}.state_site"]["quantizer"]["spec"]["granularity"] == "token"
        assert mods[f"{mixer}.x_proj"]["output_quantizer"]["spec"]["granularity"] == "token"


def test_quamba2_config_records_grouped_xbc_scales(tmp_path):
    model, _, _ = _quantize("mamba2", RecipeOptions(name="quamba2"))
    mods = _saved_config(model, tmp_path)["modules"]
    cfg = model.config
    d, gn = cfg.d_inner, cfg.n_groups * cfg.state_size
    for i in range(2):
        mixer = f"backbone.layers.{i}.mixer"
        xbc = mods[f"{mixer}.xbc_site"]["quantizer"]
        assert xbc["observer"] == "grouped_minmax" and xbc["dynamic"] is False
        assert (xbc["spec"]["granularity"], xbc["spec"]["axis"]) == ("channel", -1)
        groups = xbc["observer_kwargs"]["groups"]
        assert len(groups) == d + 2 * gn
        x_ids = set(groups[:d])
        assert len(x_ids) <= cfg.n_groups * 4 * 4  # SSD groups × head groups × channel groups
        bc = [groups[d + k * cfg.state_size: d + (k + 1) * cfg.state_size] for k in range(2 * cfg.n_groups)]
        assert all(len(set(b)) == 1 for b in bc)  # one scale per SSD group for B and for C
        assert len({b[0] for b in bc}) == 2 * cfg.n_groups and not x_ids & {b[0] for b in bc}
        assert mods[f"{mixer}.out_proj"]["input_transform"]["type"] == "hadamard"
        assert mods[f"{mixer}.in_proj"]["weight"]["spec"]["granularity"] == "channel"
    # the scales really are grouped: channels of one group share one scale
    site = model.get_submodule(f"{L0}.xbc_site").quantizer
    scale = site.params.as_dict()["scale"].reshape(-1)
    groups = torch.tensor(mods[f"{L0}.xbc_site"]["quantizer"]["observer_kwargs"]["groups"])
    for gid in groups.unique():
        assert scale[groups == gid].unique().numel() == 1


# ----------------------------------------------------------------------------------------
# 4. clear errors
# ----------------------------------------------------------------------------------------


def test_mambaquant_on_mamba2_raises_a_clear_value_error():
    model = _model("mamba2")
    before = _params(model)
    with pytest.raises(ValueError, match="Mamba1"):
        aq.quantize_(model, RecipeOptions(name="mambaquant"), calib_data=BATCHES, family="mamba", progress=False)
    assert all(torch.equal(v, dict(model.named_parameters(remove_duplicate=False))[k]) for k, v in before.items())


@pytest.mark.parametrize("dt_rank", [3, 5])
@pytest.mark.parametrize("rotation", ["random_hadamard", "klt_hadamard"])
def test_rotation_with_unsupported_dt_rank_names_the_size(dt_rank, rotation):
    model = _model("mamba1", dt_rank=dt_rank)
    with pytest.raises(ValueError, match=f"no Hadamard matrix of size {dt_rank}\\b"):
        _apply(model, [RotatePairs(rotation=rotation)])
    model = _model("mamba1", dt_rank=dt_rank)
    with pytest.raises(ValueError, match=f"size {dt_rank}\\b"):
        aq.quantize_(model, RecipeOptions(name="mambaquant", rotation=rotation), calib_data=BATCHES,
                     family="mamba", progress=False)


# ----------------------------------------------------------------------------------------
# 5. Quamba2's sort-and-cluster groups
# ----------------------------------------------------------------------------------------


def test_quamba2_groups_on_a_hand_made_statistic():
    num_heads, head_dim, n_groups, state_size = 8, 4, 2, 3
    d = num_heads * head_dim
    # heads 0,1 | 2,3 (SSD group 0) and 4,5 | 6,7 (group 1) have clearly different magnitudes;
    # inside a head, channels 0,1 are small and 2,3 large
    head_level = torch.tensor([1.0, 1.1, 10.0, 10.5, 2.0, 2.1, 30.0, 31.0])
    chan_level = torch.tensor([1.0, 1.05, 5.0, 5.2])
    x = (head_level[:, None] * chan_level[None, :]).reshape(-1)
    mean_abs = torch.cat([x, torch.rand(2 * n_groups * state_size, generator=torch.Generator().manual_seed(0))])
    ids = quamba2_groups(mean_abs, num_heads, head_dim, n_groups, state_size, head_groups=2, channel_groups=2)
    assert ids == quamba2_groups(mean_abs, num_heads, head_dim, n_groups, state_size, 2, 2)  # deterministic
    assert len(ids) == d + 2 * n_groups * state_size and all(isinstance(i, int) for i in ids)
    xi = torch.tensor(ids[:d]).reshape(num_heads, head_dim)
    assert xi.unique().numel() <= n_groups * 2 * 2
    # SSD groups never share an x group
    assert not set(xi[:4].flatten().tolist()) & set(xi[4:].flatten().tolist())
    # the designed clusters: heads (0,1), (2,3), (4,5), (6,7); channels (0,1), (2,3)
    for h0, h1 in ((0, 1), (2, 3), (4, 5), (6, 7)):
        assert torch.equal(xi[h0], xi[h1])
        assert xi[h0, 0] == xi[h0, 1] != xi[h0, 2] == xi[h0, 3]
    assert xi[0, 0] != xi[2, 0] and xi[4, 0] != xi[6, 0]
    assert xi.unique().numel() == 8
    # B then C: one id per SSD group each, all new
    bc = ids[d:]
    blocks = [bc[k * state_size:(k + 1) * state_size] for k in range(2 * n_groups)]
    assert all(len(set(b)) == 1 for b in blocks)
    bc_ids = [b[0] for b in blocks]
    assert len(set(bc_ids)) == 2 * n_groups and min(bc_ids) > int(xi.max())


def test_quamba2_groups_bounds_and_single_groups():
    num_heads, head_dim, n_groups, state_size = 8, 16, 2, 8
    mean_abs = torch.rand(num_heads * head_dim + 2 * n_groups * state_size,
                          generator=torch.Generator().manual_seed(3)) * 5
    d = num_heads * head_dim
    for hg, cg in ((4, 4), (2, 3), (8, 8), (1, 1)):
        ids = quamba2_groups(mean_abs, num_heads, head_dim, n_groups, state_size, hg, cg)
        assert len(set(ids[:d])) <= n_groups * min(hg, num_heads // n_groups) * cg
    ids = quamba2_groups(mean_abs, num_heads, head_dim, n_groups, state_size, 1, 1)
    assert ids[:d] == [0] * (d // 2) + [1] * (d // 2)
    assert ids[d:] == sum(([2 + k] * state_size for k in range(2 * n_groups)), [])


# ----------------------------------------------------------------------------------------
# 6. real model widths: Hadamard sizes 12·128 and 40·128
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden,k", [(768, 12), (2560, 40)])
def test_quamba_at_real_widths(hidden, k, tmp_path):
    model = perturbed_mamba("mamba1", 0, noise_seed=1000, scale=0.01, vocab_size=16, hidden_size=hidden, num_layers=1)
    cfg = model.config
    assert hadamard.factor_size(cfg.d_inner) == (k, 128)
    x = torch.randint(0, 16, (1, 8), generator=torch.Generator().manual_seed(0))
    mixer_out = []  # the residual dominates the logits of a 1-layer model: also compare the mixer's output
    model.get_submodule(L0).register_forward_hook(lambda _m, _a, out: mixer_out.append(out))
    fp = _logits(model, x)
    aq.quantize_(model, RecipeOptions(name="quamba"), calib_data=[x], family="mamba", progress=False)
    q = _logits(model, x)
    assert torch.isfinite(q).all() and 0 < rel_err(q, fp) < 0.1
    assert rel_err(mixer_out[-1], mixer_out[0]) < 0.1
    out_proj = model.get_submodule(f"{L0}.out_proj")
    assert out_proj.input_transform.size == cfg.d_inner
    aq.save_quantized(model, tmp_path / "ckpt")
    del model
    loaded = aq.load_quantized(tmp_path / "ckpt")
    assert torch.equal(_logits(loaded, x), q)
    assert loaded.get_submodule(f"{L0}.out_proj").input_transform.size == cfg.d_inner


# ----------------------------------------------------------------------------------------
# 7. the runner on a saved Mamba1
# ----------------------------------------------------------------------------------------

SMALL = ["calibration.num_samples=4", "calibration.seq_len=32", "calibration.batch_size=2",
         "evaluation.num_samples=4", "evaluation.seq_len=32", "evaluation.batch_size=2",
         "evaluation.task_examples=8", "progress=false"]
CONFIG = ROOT / "configs" / "mamba_w8a8.yaml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_mamba_hf(_model("mamba1"), tmp_path_factory.mktemp("mamba1") / "model")


def _one_line_error(code, err, *fragments):
    assert code == 2, err
    line = one_error_line(err)
    assert line.startswith("archquant: error:"), line
    for f in fragments:
        assert f in line, line
    return line


def test_runner_end_to_end_on_a_saved_mamba1(model_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, CONFIG, f"model.path={model_dir}", *SMALL, f"output_dir={out_dir}")
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    assert report["family"] == "mamba" and report["method"]["name"] == "quamba"
    for which in ("fp", "quantized"):
        metrics = report["metrics"][which]
        assert set(metrics) == {"perplexity", "last_token_accuracy"}
        assert 1.0 < metrics["perplexity"] < float("inf")
        assert 0.0 <= metrics["last_token_accuracy"] <= 1.0
    assert set(report["compare"]) == {"static_minmax", "smoothquant"}
    for name, entry in report["compare"].items():
        assert entry["method"]["name"] == name
        assert set(entry["metrics"]) == {"perplexity", "last_token_accuracy"}
        assert entry["bytes"] > 0
    assert report["reload"]["identical"] is True
    assert report["reload"]["metrics"] == report["metrics"]["quantized"]
    assert report["data"]["calibration"] == "stdlib/calibration"
    assert report["data"]["evaluation"] == "stdlib/evaluation"
    assert report["model"]["path"] == str(model_dir)
    loaded = aq.load_quantized(out_dir / "checkpoint")
    assert loaded._archquant_recipe["name"] == "quamba"
    assert loaded.get_submodule(f"{L0}.out_proj").input_transform.size == 128
    assert "| **quamba** |" in out
    # the demo config also evaluates a copy on real int8 kernels: whole Mamba blocks, same metrics
    real = report["real"]
    assert real["blocks"] == ["backbone.layers.0", "backbone.layers.1"] and real["kept"] == []
    q_ppl, r_ppl = report["metrics"]["quantized"]["perplexity"], report["metrics"]["real"]["perplexity"]
    assert abs(r_ppl - q_ppl) <= 1e-3 * q_ppl
    assert "| quamba (real int8) |" in out and "2 whole blocks" in out


def test_runner_refuses_overlapping_calibration_and_evaluation(model_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, CONFIG, f"model.path={model_dir}", *SMALL, f"output_dir={tmp_path / 'o'}",
                           "calibration.split=evaluation")
    _one_line_error(code, err, "overlap")
    assert not (tmp_path / "o" / "checkpoint").exists()


def test_runner_bad_compare_and_reference_exit_2(model_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, CONFIG, f"model.path={model_dir}", *SMALL, f"output_dir={tmp_path / 'o'}",
                           "compare=[nope]")
    _one_line_error(code, err, "'compare' has value 'nope'")
    code, _, err = run_cli(capsys, CONFIG, *SMALL, f"output_dir={tmp_path / 'o'}", "model.options.reference=nope")
    _one_line_error(code, err, "'model.options.reference' has value 'nope'", "mamba1-byte")
    assert not (tmp_path / "o").exists()


def test_runner_corrupt_model_dir_exits_2_naming_the_file(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((model_dir / "config.json").read_text())
    data = (model_dir / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, CONFIG, f"model.path={bad}", *SMALL, f"output_dir={tmp_path / 'o'}")
    line = _one_line_error(code, err, str(bad / "model.safetensors"))
    assert "Traceback" not in err and "cannot read weights" in line
    assert not (tmp_path / "o" / "checkpoint").exists()


# ----------------------------------------------------------------------------------------
# the int8 LM head option
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,arch", [("quamba", "mamba1"), ("mambaquant", "mamba1"), ("quamba2", "mamba2")])
def test_int8_lm_head_option_stores_the_head_in_int8_and_reloads_bit_identically(preset, arch, tmp_path):
    from archquant.backends import RealQuantLinear, convert_to_real

    plain, _, plain_logits = _quantize(arch, RecipeOptions(name=preset))
    model, fp, logits = _quantize(arch, RecipeOptions(name=preset, options={"lm_head": "int8"}))
    head = model.lm_head
    assert isinstance(plain.lm_head, torch.nn.Linear) and isinstance(head, QuantLinear) and head.frozen
    assert head.weight_spec.bits == 8 and head.weight_spec.granularity == "channel" and head.input_quantizer is None
    assert isinstance(model.backbone.embeddings, torch.nn.Embedding)  # the tied embedding keeps its FP table
    # only the head changed, by about an int8 rounding of its weight
    err, plain_err = rel_err(logits, fp), rel_err(plain_logits, fp)
    assert logits.shape == plain_logits.shape and 0 < rel_err(logits, plain_logits) < 0.05
    assert err < plain_err + 0.05, (err, plain_err)
    directory = aq.save_quantized(model, tmp_path / "ckpt", family="mamba")
    assert torch.equal(_logits(aq.load_quantized(directory)), logits)
    real = convert_to_real(aq.load_quantized(directory))
    assert isinstance(real.lm_head, RealQuantLinear) and real.lm_head.act_kind == "weight_only"
    assert rel_err(_logits(real), logits) < 1e-2


def test_an_unknown_lm_head_value_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"recipe.options.lm_head.*'int4'.*allowed.*fp.*int8"):
        _quantize("mamba1", RecipeOptions(name="quamba", options={"lm_head": "int4"}))
