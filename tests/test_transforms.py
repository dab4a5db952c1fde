import copy

import pytest
import torch
from torch import nn

from archquant.core import transforms as T
from archquant.core.recipe import OnlineHadamard, Recipe, RotateResidual, SmoothQuant, apply_recipe
from archquant.adapters import get_adapter
from archquant.models.toy import RMSNorm

from conftest import rel_err


def _linear(i, o, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(i, o, bias=bias)


def test_rotate_linear_input_and_output_are_exact():
    lin = _linear(48, 24)
    ref = copy.deepcopy(lin)
    q = T.rotation_matrix("random_hadamard", 48, seed=3)
    x = torch.randn(5, 48)
    T.rotate_linear_input(lin, q)
    assert rel_err(lin(x @ q.float()), ref(x)) < 1e-6
    lin2 = copy.deepcopy(ref)
    q2 = T.rotation_matrix("random_orthogonal", 24, seed=1)
    T.rotate_linear_output(lin2, q2)
    assert rel_err(lin2(x), ref(x) @ q2.float()) < 1e-6


def test_rotation_kinds_are_orthogonal_and_unknown_kind_is_refused():
    x = torch.randn(200, 40, dtype=torch.float64)
    for kind in T.ROTATION_KINDS:
        q = T.rotation_matrix(kind, 40, seed=5, covariance=torch.cov(x.T))
        assert torch.allclose(q @ q.T, torch.eye(40, dtype=torch.float64), atol=1e-10)
    with pytest.raises(ValueError, match="unknown rotation kind 'givens'"):
        T.rotation_matrix("givens", 8)
    with pytest.raises(ValueError, match="needs the covariance"):
        T.rotation_matrix("klt_hadamard", 8)


def test_fold_norm_into_linears_keeps_function():
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16) * 5)
    a, b = _linear(16, 8, 1), _linear(16, 4, 2, bias=False)
    x = torch.randn(3, 16)
    ref = (a(norm(x)), b(norm(x)))
    T.fold_norm_into_linears(norm, [a, b])
    assert torch.all(norm.weight == 1)
    assert rel_err(a(norm(x)), ref[0]) < 1e-6 and rel_err(b(norm(x)), ref[1]) < 1e-6


def test_fold_layernorm_bias_creates_linear_bias():
    ln = nn.LayerNorm(16)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2)
        ln.bias.uniform_(-1, 1)
    lin = _linear(16, 8, bias=False)
    x = torch.randn(4, 16)
    ref = lin(ln(x))
    T.fold_norm_into_linears(ln, [lin])
    assert lin.bias is not None and torch.all(ln.bias == 0)
    assert rel_err(lin(ln(x)), ref) < 1e-6


def test_smoothquant_scales_formula_and_degenerate_channels():
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = T.smoothquant_scales(act, w, alpha=0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5, 1.0, 1.0]))
    with pytest.raises(ValueError, match="alpha=1.5"):
        T.smoothquant_scales(act, w, alpha=1.5)


def test_running_covariance_matches_torch_cov_and_klt_diagonalises():
    torch.manual_seed(0)
    x = torch.randn(600, 12) @ torch.randn(12, 12)
    rc = T.RunningCovariance()
    for chunk in x.split(100):
        rc.update(chunk)
    cov = rc.covariance()
    assert torch.allclose(cov, torch.cov(x.double().T), atol=1e-8)
    k = T.klt_matrix(cov)
    assert torch.allclose(k.T @ k, torch.eye(12, dtype=torch.float64), atol=1e-10)
    d = k.T @ cov @ k
    assert torch.allclose(d, torch.diag(torch.diagonal(d)), atol=1e-8)


def test_hadamard_transform_module_matches_its_matrix_and_roundtrips_config():
    t = T.HadamardTransform(24, seed=7)
    x = torch.randn(3, 24)
    assert rel_err(t(x), x @ t.matrix().float()) < 1e-6
    t2 = T.build_online_transform(t.to_config())
    assert torch.equal(t2(x), t(x))
    with pytest.raises(ValueError, match="14"):
        T.HadamardTransform(14)


@pytest.mark.parametrize("rotation", T.ROTATION_KINDS)
def test_fused_rotations_keep_toy_model_exact(toy_model, toy_batches, rotation):
    """Acceptance: with quantization off, a rotated + smoothed model equals the original to 1e-5."""
    adapter = get_adapter("toy")
    ref = copy.deepcopy(toy_model)
    x = torch.cat(toy_batches)
    recipe = Recipe("fp_transforms", [SmoothQuant(alpha=0.5), RotateResidual(rotation=rotation, seed=1),
                                      OnlineHadamard(seed=2, klt=rotation == "klt_hadamard")])
    apply_recipe(toy_model, recipe, adapter.structure(toy_model), calib_batches=toy_batches, progress=False)
    with torch.no_grad():
        err = rel_err(toy_model(x), ref(x))
    assert err <= 1e-5
    # and the transforms really happened: weights changed, an online transform is in place
    assert not torch.allclose(toy_model.layers[0].up_proj.weight, ref.layers[0].up_proj.weight)
    assert toy_model.layers[0].down_proj.input_transform is not None


def test_rotation_handles_tied_weights():
    """Embedding and head sharing one weight: fusing the final norm must not corrupt the embedding."""
    from archquant.core.structure import LinearGroup, ModelStructure

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 16)
            self.norm = RMSNorm(16)
            self.head = nn.Linear(16, 20, bias=False)
            self.head.weight = self.emb.weight
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 3)

        def forward(self, ids):
            return self.head(self.norm(self.emb(ids)))

    m = Tied()
    ref = copy.deepcopy(m)
    s = ModelStructure(hidden_size=16, embeddings=["emb"], residual_readers=[LinearGroup("norm", ["head"])])
    apply_recipe(m, Recipe("r", [RotateResidual("random_hadamard", 0)]), s, progress=False)
    ids = torch.arange(20)
    assert rel_err(m(ids), ref(ids)) < 1e-5


def test_rotation_refuses_layernorm_models(toy_model):
    s = get_adapter("toy").structure(toy_model)
    s.norm_kind = "layer"
    with pytest.raises(ValueError, match="RMSNorm"):
        apply_recipe(toy_model, Recipe("r", [RotateResidual()]), s, progress=False)


# ------------------------------------------------------------------------------- online-transform registry


@pytest.mark.parametrize("make", [lambda: T.HadamardTransform(24, seed=7), lambda: T.HadamardTransform(48, block=12),
                                  lambda: T.MatrixTransform(T.rotation_matrix("random_orthogonal", 12, seed=4),
                                                            name="klt_hadamard"),
                                  lambda: T.ChannelScale(torch.rand(12) + 0.5)],
                         ids=["hadamard", "block_hadamard", "matrix", "channel_scale"])
def test_every_registered_kind_roundtrips_its_config_and_matches_its_matrix(make):
    t = make()
    assert T.ONLINE_TRANSFORMS[t.to_config()["type"]] is type(t)
    x = torch.randn(3, t.size)
    assert rel_err(t(x), x @ t.matrix().float()) < 1e-6
    rebuilt = T.build_online_transform(t.to_config())
    rebuilt.load_state_dict(t.state_dict())
    rebuilt.check_loaded()
    assert type(rebuilt) is type(t) and rebuilt.to_config() == t.to_config()
    assert torch.equal(rebuilt(x), t(x))


def test_configs_written_before_the_registry_still_rebuild():
    """The exact dicts older checkpoints hold (tests/test_mamba_recipes.py checks the same forms)."""
    h = T.build_online_transform({"type": "hadamard", "size": 24, "seed": 3, "block": None})
    assert isinstance(h, T.HadamardTransform) and torch.equal(h.matrix(), T.HadamardTransform(24, seed=3).matrix())
    m = T.build_online_transform({"type": "matrix", "size": 8, "name": "klt_hadamard"})
    assert isinstance(m, T.MatrixTransform) and m.size == 8 and m.to_config()["name"] == "klt_hadamard"


def test_unknown_online_transform_kind_names_the_registered_ones():
    with pytest.raises(ValueError, match="unknown online transform type 'givens': allowed 'hadamard', 'matrix', "
                                         "'channel_scale'"):
        T.build_online_transform({"type": "givens", "size": 4})


def test_a_new_kind_is_one_registered_class(monkeypatch):
    """A transform registered later is rebuilt as a Linear's input transform and on its own, with no
    change to modules.py."""
    from archquant.core.modules import QUANT_MODULES, QuantLinear, module_from_config

    class Negate(T.OnlineTransform):
        kind = "negate_test"

        def __init__(self, size):
            super().__init__()
            self.size = size

        def forward(self, x):
            return -x

        def matrix(self):
            return -torch.eye(self.size, dtype=torch.float64)

        def to_config(self):
            return {"type": self.kind, "size": self.size}

        @classmethod
        def from_config(cls, config, dtype=torch.float32):
            return cls(config["size"])

    monkeypatch.setitem(T.ONLINE_TRANSFORMS, "negate_test", Negate)
    assert QUANT_MODULES["negate_test"] is Negate
    lin = _linear(6, 3)
    q = QuantLinear.from_float(copy.deepcopy(lin), input_transform=Negate(6))
    T.rotate_linear_input(q, q.input_transform.matrix())
    x = torch.randn(2, 6)
    assert rel_err(q(x), lin(x)) < 1e-6
    rebuilt = module_from_config(q.to_config())
    rebuilt.load_state_dict(q.state_dict())
    assert isinstance(rebuilt.input_transform, Negate) and torch.equal(rebuilt(x), q(x))
    assert isinstance(module_from_config({"type": "negate_test", "size": 6}), Negate)


def test_loaded_channel_scale_must_be_positive():
    from archquant.core.modules import QuantLinear

    q = QuantLinear.from_float(_linear(4, 2), input_transform=T.ChannelScale(torch.ones(4)))
    with torch.no_grad():
        q.input_transform.scale[2] = -1.0
    with pytest.raises(ValueError, match="'input_transform.scale' must hold one finite positive scale"):
        q.check_loaded()
