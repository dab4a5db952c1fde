"""Smoothing folds 1/s wherever the architecture can absorb it (structure.FoldTarget), exactly in FP.

Each test builds a small module by hand in float64, smooths it through the SmoothQuant step, and
checks (a) the output is unchanged and (b) the smoothing really happened: with alpha = 0.5,
SmoothQuant makes every channel's max|X_j| equal to its max|W_j| (both become sqrt(a_j·w_j)),
which holds only if the activation was divided by exactly the s the weights were multiplied by.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from archquant.core import transforms as T
from archquant.core.calibration import collect_stats
from archquant.core.modules import QuantLinear, module_from_config
from archquant.core.observers import ChannelAbsMaxObserver
from archquant.core.recipe import Recipe, SmoothQuant, apply_recipe
from archquant.core.structure import FoldTarget, LinearGroup, ModelStructure, SmoothingGroup
from archquant.models.layers import RMSNorm

from conftest import rel_err

D = 16


def _outliers(linear: nn.Linear, rows, factor: float = 25.0) -> None:
    """Give a producer a few large output channels, so the scales are far from 1."""
    with torch.no_grad():
        linear.weight[rows] *= factor


def _smooth(model, groups, batches):
    ref = copy.deepcopy(model)
    structure = ModelStructure(hidden_size=D, smoothing=groups)
    apply_recipe(model, Recipe("smooth", [SmoothQuant(alpha=0.5)]), structure, calib_batches=batches, progress=False)
    return ref


def _outputs(model, batches):
    with torch.no_grad():
        return torch.cat([(model(*b) if isinstance(b, tuple) else model(b)).flatten() for b in batches])


def _input_amax(model, name, batches):
    """max|·| per channel of what the Linear ``name`` multiplies by its weight (after an online scale)."""
    lin = model.get_submodule(name)
    site = f"{name}.input_transform:output" if getattr(lin, "input_transform", None) is not None else f"{name}:input"
    return collect_stats(model, batches, {site: ChannelAbsMaxObserver()}, progress=False)[site].amax


def _check_balanced(model, group: SmoothingGroup, batches):
    a = _input_amax(model, group.linears[0], batches)
    w = torch.stack([model.get_submodule(n).weight.detach().abs().amax(0).float() for n in group.linears]).amax(0)
    assert torch.allclose(a, w, rtol=1e-5), "activation and weight maxima are not balanced: 1/s went astray"


# ------------------------------------------------------------------------------- norm


class NormReaders(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.q, self.k = nn.Linear(D, 8), nn.Linear(D, 12, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return torch.cat([self.q(h), self.k(h)], -1)


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("spelling", ["norm=", "fold_into="])
def test_fold_into_norm(norm, spelling):
    torch.manual_seed(0)
    model = NormReaders(RMSNorm(D) if norm == "rms" else nn.LayerNorm(D)).double()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 2.0)
        model.norm.weight[[1, 7]] = 30.0
        if norm == "layer":
            model.norm.bias.uniform_(-1, 1)
    batches = [torch.randn(4, 5, D, dtype=torch.float64) for _ in range(3)]
    group = (SmoothingGroup(["q", "k"], norm="norm") if spelling == "norm="
             else SmoothingGroup(["q", "k"], fold_into=FoldTarget("norm", "norm")))
    ref = _smooth(model, [group], batches)
    assert rel_err(_outputs(model, batches), _outputs(ref, batches)) < 1e-10
    assert not torch.allclose(model.norm.weight, ref.norm.weight)
    _check_balanced(model, group, batches)


def test_default_groups_are_the_residual_readers_with_a_norm():
    s = ModelStructure(hidden_size=D, residual_readers=[LinearGroup("n0", ["a", "b"]), LinearGroup(None, ["c"]),
                                                        LinearGroup("nf", ["head"])], skip=["head"])
    groups = s.smoothing_groups()
    assert [(g.linears, g.fold_into) for g in groups] == [(["a", "b"], FoldTarget("norm", "n0"))]
    assert groups[0].norm == "n0"


def test_norm_without_affine_weight_is_refused_naming_it():
    model = NormReaders(nn.LayerNorm(D, elementwise_affine=False)).double()
    batches = [torch.randn(4, D, dtype=torch.float64)]
    with pytest.raises(ValueError, match="norm 'norm' has no affine weight"):
        _smooth(model, [SmoothingGroup(["q", "k"], norm="norm")], batches)


# ------------------------------------------------------------------------------- linear (v_proj → o_proj)


class Attention(nn.Module):
    """Multi-head self-attention, with separate projections or a fused qkv Linear."""

    def __init__(self, heads: int = 2, fused: bool = False):
        super().__init__()
        self.heads, self.fused = heads, fused
        if fused:
            self.qkv = nn.Linear(D, 3 * D)
        else:
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.o_proj = nn.Linear(D, D)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, -1) if self.fused else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q, k, v = (y.reshape(b, t, self.heads, -1).transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, D))


@pytest.mark.parametrize("fused", [False, True])
def test_fold_into_preceding_linear(fused):
    torch.manual_seed(1)
    model = Attention(fused=fused).double()
    if fused:  # only the v rows of the fused projection feed o_proj
        _outliers(model.qkv, [2 * D + 3, 2 * D + 11])
        target = FoldTarget("linear", "qkv", rows=(2 * D, 3 * D))
    else:
        _outliers(model.v_proj, [3, 11])
        target = FoldTarget("linear", "v_proj")
    batches = [torch.randn(3, 6, D, dtype=torch.float64) for _ in range(3)]
    group = SmoothingGroup(["o_proj"], fold_into=target)
    ref = _smooth(model, [group], batches)
    assert rel_err(_outputs(model, batches), _outputs(ref, batches)) < 1e-10
    _check_balanced(model, group, batches)
    if fused:  # q and k rows untouched
        assert torch.equal(model.qkv.weight[:2 * D], ref.qkv.weight[:2 * D])


def test_fold_rows_must_match_the_smoothed_channels():
    model = Attention(fused=True).double()
    batches = [torch.randn(2, 4, D, dtype=torch.float64)]
    with pytest.raises(ValueError, match=r"rows \(0, 8\) of 'qkv'.*16 input channels"):
        _smooth(model, [SmoothingGroup(["o_proj"], fold_into=FoldTarget("linear", "qkv", rows=(0, 8)))], batches)


# ------------------------------------------------------------------------------- adaLN modulation


class AdaLNBlock(nn.Module):
    """DiT block MLP half: h = LN(x)·(offset + scale) + shift from a conditioning Linear, then fc1."""

    def __init__(self, offset: float, bias: bool):
        super().__init__()
        self.offset = offset
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(8, 3 * D, bias=bias)  # shift | scale | gate
        self.fc1, self.fc2 = nn.Linear(D, 32), nn.Linear(32, D)

    def forward(self, x, c):
        shift, scale, gate = self.modulation(F.silu(c)).chunk(3, -1)
        h = self.norm(x) * (self.offset + scale[:, None]) + shift[:, None]
        return x + gate[:, None] * self.fc2(F.gelu(self.fc1(h)))


@pytest.mark.parametrize("offset, bias", [(1.0, True), (1.0, False), (0.0, True)])
def test_fold_into_adaln_modulation(offset, bias):
    torch.manual_seed(2)
    model = AdaLNBlock(offset, bias).double()
    _outliers(model.modulation, [D + 2, D + 9], 10.0)  # two large scale channels
    batches = [(torch.randn(3, 5, D, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)) for _ in range(3)]
    group = SmoothingGroup(["fc1"], fold_into=FoldTarget("modulation", "modulation", rows=(D, 2 * D),
                                                         shift_rows=(0, D), scale_offset=offset))
    ref = _smooth(model, [group], batches)
    assert rel_err(_outputs(model, batches), _outputs(ref, batches)) < 1e-10
    _check_balanced(model, group, batches)
    assert torch.equal(model.modulation.weight[2 * D:], ref.modulation.weight[2 * D:])  # gate untouched
    if not bias and offset:
        assert model.modulation.bias is not None  # the (1 + scale) share needed one


def test_modulation_algebra_by_hand():
    """scale' = scale/s + offset·(1/s − 1) and shift' = shift/s, written out on one channel."""
    lin = nn.Linear(1, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.3], [-0.7]]))  # rows: shift, scale
        lin.bias.copy_(torch.tensor([0.2, 0.4]))
    s = torch.tensor([4.0])
    c = torch.tensor([[1.5]], dtype=torch.float64)
    with torch.no_grad():
        shift, scale = lin(c)[0].tolist()
        T.scale_modulation_output(lin, s, (1, 2), (0, 1), offset=1.0)
        shift2, scale2 = lin(c)[0].tolist()
    assert math.isclose(shift2, shift / 4, rel_tol=1e-12)
    assert math.isclose(scale2, scale / 4 + (1 / 4 - 1), rel_tol=1e-12)
    assert math.isclose(1 + scale2, (1 + scale) / 4, rel_tol=1e-12)


# ------------------------------------------------------------------------------- online


class ViTMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, 32), nn.Linear(32, D)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def test_online_scale_when_nothing_can_absorb_it():
    torch.manual_seed(3)
    model = ViTMLP().double()
    _outliers(model.fc1, [4, 20], 40.0)  # after the GELU: no weight upstream can take 1/s
    batches = [torch.randn(4, 6, D, dtype=torch.float64) for _ in range(3)]
    group = SmoothingGroup(["fc2"], fold_into=FoldTarget("online"))
    ref = _smooth(model, [group], batches)
    assert isinstance(model.fc2, QuantLinear) and isinstance(model.fc2.input_transform, T.ChannelScale)
    assert rel_err(_outputs(model, batches), _outputs(ref, batches)) < 1e-10
    _check_balanced(model, group, batches)
    # the scale is part of the saved model: rebuilt from its config and tensors it computes the same
    rebuilt = module_from_config(model.fc2.to_config(), dtype=torch.float64)
    rebuilt.load_state_dict(model.fc2.state_dict())
    rebuilt.check_loaded()
    x = torch.randn(3, 32, dtype=torch.float64)
    assert torch.equal(rebuilt(x), model.fc2(x))


def test_fold_target_is_checked_when_declared():
    with pytest.raises(ValueError, match="fold kind 'gamma' not allowed"):
        FoldTarget("gamma", "n")
    with pytest.raises(ValueError, match="needs the name"):
        FoldTarget("linear")
    with pytest.raises(ValueError, match="needs rows"):
        FoldTarget("modulation", "mod")
    with pytest.raises(ValueError, match="overlap"):
        FoldTarget("modulation", "mod", rows=(0, 8), shift_rows=(4, 12))
    with pytest.raises(ValueError, match="fold_into= or norm="):
        SmoothingGroup(["a"])
