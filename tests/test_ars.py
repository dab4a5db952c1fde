"""LRQ-DiT's adaptive rotation (core/ars.py): DuQuant transform, J-based branch choice, FP-exactness."""
import pytest
import torch

import archquant as aq
from archquant.core import ars
from archquant.core import transforms as T
from archquant.core.formats import QuantSpec
from archquant.core.modules import QuantLinear
from archquant.core.recipe import Quantize, Recipe

from conftest import rel_err


def outlier_activations(rows=512, c=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, c, generator=g)
    x[:, 7] *= 40
    x[:, c - 1 - c // 5] *= 25
    return x


def test_duquant_is_an_orthogonal_transform_equal_to_its_matrix():
    x = outlier_activations()
    d = ars.DuQuantTransform.fit(x, block_size=128)
    m = d.matrix()
    assert torch.allclose(m @ m.T, torch.eye(256, dtype=torch.float64), atol=1e-6)
    assert rel_err(d(x), x.double() @ m) < 1e-6
    assert sorted(d.perm.tolist()) == list(range(256))


def test_duquant_spreads_salient_channels():
    x = outlier_activations()
    d = ars.DuQuantTransform.fit(x, block_size=128)
    assert float(d(x).abs().max()) < 0.2 * float(x.abs().max())
    # each greedy rotation keeps its best prefix: never worse than no rotation at all
    r1 = ars.greedy_block_rotation(x, 128)
    y = torch.einsum("rnb,nbc->rnc", x.double().reshape(-1, 2, 128), r1).reshape(-1, 256)
    assert float(y.abs().max()) <= float(x.abs().max())


def test_zigzag_deals_the_largest_channels_to_different_blocks():
    perm = ars.zigzag_permutation(torch.tensor([9.0, 1, 8, 2, 7, 3, 6, 4]), block_size=4)
    # by size: 9 8 7 6 4 3 2 1 (channels 0 2 4 6 7 5 3 1), dealt to blocks 0 1 1 0 0 1 1 0
    assert perm.tolist() == [0, 6, 7, 1, 2, 4, 5, 3]
    blocks = perm.reshape(2, 4)
    assert {int(blocks[0, 0]), int(blocks[1, 0])} == {0, 2}  # the two largest lead different blocks


def test_chain_config_roundtrips_and_reloads_bit_identically():
    x = outlier_activations(64)
    c = ars.ChainTransform([T.ChannelScale(torch.rand(256) + 0.5), ars.DuQuantTransform.fit(x)],
                           label={"ars": "duquant", "J": 1.5})
    rebuilt = T.build_online_transform(c.to_config())
    rebuilt.load_state_dict(c.state_dict())
    rebuilt.check_loaded()
    assert torch.equal(rebuilt(x), c(x)) and rebuilt.to_config() == c.to_config()
    assert rel_err(c(x), x.double() @ c.matrix()) < 1e-6
    broken = T.build_online_transform(c.to_config())
    broken.load_state_dict({**c.state_dict(), "parts.1.perm": torch.zeros(256, dtype=torch.long)})
    with pytest.raises(ValueError, match="parts.1.perm"):
        broken.check_loaded("m.")


def test_fluctuation_is_the_rms_of_the_smoothed_activations():
    x = outlier_activations(100, 16)
    s = torch.rand(16) + 0.5
    st = ars.InputStatistics(max_rows=10)
    st.update(x[:60])
    st.update(x[60:])
    expected = float(((x / s) ** 2).mean().sqrt())
    assert ars.fluctuation(st.sumsq, st.rows, s) == pytest.approx(expected, rel=1e-6)
    # the sample is 10 rows drawn from both calls, not the first 10 rows
    assert st.sample.shape == (10, 16)
    drawn = [int((x == row).all(dim=1).nonzero()[0]) for row in st.sample]
    assert len(set(drawn)) == 10 and max(drawn) >= 60


def test_fp_exact_and_the_branch_follows_j(toy_model, toy_batches):
    x = torch.cat(toy_batches)
    # plant salient channels in one layer's input (a few fixed channels, huge in every token, as
    # DiT's are): smoothing tames them by sqrt(ratio), not fully, so that layer's J stays high
    layer = toy_model.layers[0]
    with torch.no_grad():
        layer.norm.weight[[3, 17]] *= 300.0
        fp = toy_model(x)
    recipe = Recipe("ars", [ars.AdaptiveRotation(threshold=1.0, block_size=32)])
    aq.quantize_(toy_model, recipe, calib_data=toy_batches, progress=False)
    with torch.no_grad():
        assert rel_err(toy_model(x), fp) < 1e-5  # every rotation is FP-exact
    chosen = {n: m.input_transform.label for n, m in toy_model.named_modules()
              if isinstance(m, QuantLinear) and isinstance(m.input_transform, ars.ChainTransform)}
    assert chosen, "no Linear got an ARS transform"
    # layer 0's Linears see the planted channels (down_proj through up_proj's output); layer 1 reads
    # the residual through its own norm and stays mild
    planted = [n for n in chosen if n.startswith("layers.0.")]
    assert planted and all(chosen[n]["ars"] == "duquant" and chosen[n]["J"] >= 1.0 for n in planted)
    assert all(c["ars"] == "hadamard" and c["J"] < 1.0 for n, c in chosen.items() if n not in planted)


def test_force_overrides_j_and_bad_options_are_refused():
    step = ars.AdaptiveRotation(force={"re:.*down_proj": "duquant"})
    assert step.branch("layers.1.down_proj", 0.1) == "duquant" and step.branch("layers.1.up_proj", 0.1) == "hadamard"
    with pytest.raises(ValueError, match="force"):
        ars.AdaptiveRotation(force={"*": "quarot"}).validate()
    with pytest.raises(ValueError, match="alpha"):
        ars.AdaptiveRotation(alpha=2.0).validate()


def test_ars_then_w4a8_quantization_saves_and_reloads_bit_identically(toy_model, toy_batches, tmp_path):
    x = torch.cat(toy_batches)
    recipe = Recipe("ars_w4a8", [
        ars.AdaptiveRotation(block_size=32),
        Quantize(weight=QuantSpec(format="twinlog", bits=4, granularity="channel", axis=0),
                 weight_observer="twinlog_mse",
                 activation=QuantSpec(bits=8, granularity="token", axis=-1), dynamic=True),
    ])
    aq.quantize_(toy_model, recipe, calib_data=toy_batches, progress=False)
    with torch.no_grad():
        before = toy_model(x)
    aq.save_quantized(toy_model, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(aq.load_quantized(tmp_path / "ckpt")(x), before)


def test_lrq_dit_steps_are_written_in_yaml_and_validated_per_step():
    from archquant.core.recipe import steps_from_config

    tlq = {"format": "twinlog", "bits": 4, "granularity": "channel"}
    steps = steps_from_config([{"AdaptiveRotation": {"force": {"re:.*attn2.to_q": "duquant"}}},
                               {"Quantize": {"weight": tlq, "weight_observer": "twinlog_mse"}}])
    assert isinstance(steps[0], ars.AdaptiveRotation) and steps[1].weight.format == "twinlog"
    with pytest.raises(ValueError, match=r"recipe.steps\[0\].AdaptiveRotation.force\['\*'\]='quarot' not allowed"):
        steps_from_config([{"AdaptiveRotation": {"force": {"*": "quarot"}}}])
    with pytest.raises(ValueError, match=r"recipe.steps\[0\].Quantize.weight_observer is 'minmax'.*twinlog_mse"):
        steps_from_config([{"Quantize": {"weight": tlq}}])
