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
