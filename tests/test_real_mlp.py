"""Row-chunked real MLPs (archquant/backends/mlp.py): VGGT's MLPs run over row chunks on the CPU,
with the same outputs as the unchunked real MLP, bit for bit, and only when every op is row-local."""
import copy

import pytest
import torch

from archquant.backends import convert_to_real
from archquant.backends.linear import RealQuantLinear
from archquant.backends.mlp import RowChunkedMlp, mlp_chunk_eligibility
from archquant.core.formats import QuantSpec
from archquant.core.recipe import Quantize, Recipe
from archquant.eval import bench_vggt as B
from archquant.models.vggt.layers import Mlp

pytestmark = pytest.mark.usefixtures("single_thread")


def quantized_aggregator(activation=None, dynamic=True):
    geo = B.geometry("tiny", 2, 112, 1, 1)  # 69 tokens a frame, 138 rows
    fp = B.build(geo)
    if activation is None:
        fake, _ = B.build_w8a8(fp)
    else:
        import archquant as aq
        recipe = Recipe("t", [Quantize(weight=QuantSpec(bits=8, granularity="channel", axis=0),
                                       activation=activation, dynamic=dynamic)])
        fake = aq.quantize_(copy.deepcopy(fp), recipe, structure=B.structure(fp), progress=False)
    return fp, fake, B.images(geo)


def test_vggt_mlps_become_row_chunked_and_give_the_unchunked_outputs_bit_for_bit(monkeypatch):
    _, fake, x = quantized_aggregator()
    real = convert_to_real(copy.deepcopy(fake))
    mlps = {n: m for n, m in real.named_modules() if isinstance(m, RowChunkedMlp)}
    assert sorted(mlps) == ["frame_blocks.0.mlp", "global_blocks.0.mlp"]  # the DINOv2 MLPs are not quantized
    summary = real._archquant_real
    assert summary["converted"] == 8 and not summary["kept"]
    assert summary["paths"]["frame_blocks.0.mlp"] == "RowChunkedMlp"
    mlp = mlps["global_blocks.0.mlp"]
    assert isinstance(mlp.fc1, RealQuantLinear) and isinstance(mlp.fc2, RealQuantLinear)
    h = torch.randn(1, 138, 64)
    with torch.no_grad():
        whole = mlp.fc2(mlp.act(mlp.fc1(h)))  # the unchunked real MLP
        assert torch.equal(mlp(h), whole)  # 138 rows <= 512: one piece
        calls = [0]
        forward = RealQuantLinear.forward
        monkeypatch.setattr(RealQuantLinear, "forward", lambda self, t: (calls.__setitem__(0, calls[0] + 1),
                                                                         forward(self, t))[1])
        mlp.chunk_rows = 32
        chunked = mlp(h)
        assert calls[0] == 2 * 5  # ceil(138 / 32) chunks, two Linears each
        assert torch.equal(chunked, whole) and chunked.shape == (1, 138, 64)
        # the whole model: chunked MLPs give the per-Linear conversion's outputs exactly
        for m in mlps.values():
            m.chunk_rows = 32
        monkeypatch.setattr(RealQuantLinear, "forward", forward)
        plain = convert_to_real(copy.deepcopy(fake))
        for name, m in plain.named_modules():
            if isinstance(m, RowChunkedMlp):
                m.chunk_rows = 10_000
        for a, b in zip(B.forward(real, x), B.forward(plain, x)):
            assert torch.equal(a, b)


def test_an_mlp_whose_rows_are_not_independent_is_not_chunked():
    # dynamic per-tensor activations: a row's codes depend on every row of the call
    _, fake, _ = quantized_aggregator(QuantSpec(bits=8, granularity="tensor"), dynamic=True)
    mlp = fake.get_submodule("frame_blocks.0.mlp")
    assert mlp_chunk_eligibility(mlp.fc1, mlp.fc2, "auto") == "fc1: its input quantization is not per token or static"
    real = convert_to_real(copy.deepcopy(fake))
    assert not any(isinstance(m, RowChunkedMlp) for m in real.modules())
    assert isinstance(real.get_submodule("frame_blocks.0.mlp.fc1"), RealQuantLinear)  # still real, one by one
    assert isinstance(real.get_submodule("frame_blocks.0.mlp"), Mlp)


def test_an_mlp_with_a_linear_left_in_floating_point_is_not_chunked():
    fp, _, _ = quantized_aggregator()
    mlp = fp.get_submodule("frame_blocks.0.mlp")
    assert mlp_chunk_eligibility(mlp.fc1, mlp.fc2, "auto") == "fc1 is not quantized"
