"""Tests for archquant.core.observers."""

import numpy as np
import pytest
import torch

from archquant.core import formats as F
from archquant.core import observers as O
from archquant.core.formats import QuantSpec


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def sq_error(x, spec, params):
    return ((x - F.fake_quantize(x, spec, params)) ** 2).sum().item()


# --------------------------------------------------------------------------- min/max


def test_minmax_two_batches_per_tensor():
    obs = O.MinMaxObserver(QuantSpec())
    obs.update(torch.tensor([[1.0, -2.0], [3.0, 0.0]]))
    obs.update(torch.tensor([[-5.0, 1.0], [2.0, 0.5]]))
    lo, hi = obs.range()
    assert lo.shape == () and lo.item() == -5.0 and hi.item() == 3.0
    assert torch.isclose(obs.params()["scale"], torch.tensor(5.0 / 127))


def test_minmax_channel_last_axis_across_batch_shapes():
    obs = O.MinMaxObserver(QuantSpec(granularity="channel", axis=-1))
    obs.update(torch.tensor([[[1.0, -2.0, 0.0], [3.0, 0.0, 1.0]]]))  # (1, 2, 3)
    obs.update(torch.tensor([[-5.0, 1.0, 0.5]]))  # (1, 3): another ndim, same channels
    lo, hi = obs.range()
    assert lo.shape == (1, 1, 3)  # ndim of the first batch
    assert lo.reshape(-1).tolist() == [-5.0, -2.0, 0.0]
    assert hi.reshape(-1).tolist() == [3.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="4 channels"):
        obs.update(torch.ones(2, 4))


def test_minmax_rejects_changing_token_shape():
    obs = O.MinMaxObserver(QuantSpec(granularity="token"))
    obs.update(torch.ones(2, 8))
    obs.update(torch.ones(2, 8))  # same shape: fine
    with pytest.raises(ValueError, match="'token' gives range shape .*axis=-1"):
        obs.update(torch.ones(3, 8))


def test_no_data_reset_and_input_handling():
    obs = O.MinMaxObserver(QuantSpec())
    with pytest.raises(RuntimeError, match="observer saw no data"):
        obs.range()
    x = torch.tensor([1.0, -2.0], dtype=torch.bfloat16, requires_grad=True)
    obs.update(x)
    lo, hi = obs.range()
    assert lo.dtype == torch.float32 and not lo.requires_grad
    obs.reset()
    with pytest.raises(RuntimeError, match="observer saw no data"):
        obs.params()
    with pytest.raises(ValueError, match="empty"):
        obs.update(torch.ones(0, 3))


# --------------------------------------------------------------------------- percentile


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 12345])
@pytest.mark.parametrize("q", [0.0, 0.01, 0.5, 0.9, 0.99, 0.99999, 1.0])
def test_kth_quantile_matches_numpy_lower(n, q):
    x = randn(n, seed=n)
    expected = np.quantile(x.numpy(), q, method="lower")
    assert O._kth_quantile(x, q).item() == expected


def test_percentile_ema_symmetric_by_hand():
    alpha, momentum = 0.99, 0.1
    a, b = randn(2000, seed=1), randn(50, 40, seed=2) * 3
    obs = O.PercentileObserver(QuantSpec(), alpha=alpha, momentum=momentum)
    obs.update(a)
    obs.update(b)
    v1 = np.quantile(np.abs(a.numpy()), alpha, method="lower")
    v2 = np.quantile(np.abs(b.numpy()), alpha, method="lower")
    v = v1 + momentum * (v2 - v1)
    lo, hi = obs.range()
    assert hi.item() == pytest.approx(v, rel=1e-6) and lo.item() == pytest.approx(-v, rel=1e-6)


def test_percentile_ema_asymmetric_by_hand():
    alpha, momentum = 0.95, 0.5
    a, b = randn(1000, seed=3) + 2, randn(300, seed=4) - 1
    obs = O.PercentileObserver(QuantSpec(symmetric=False), alpha=alpha, momentum=momentum)
    obs.update(a)
    obs.update(b)

    def quantiles(t):
        return (np.quantile(t.numpy(), 1 - alpha, method="lower"),
                np.quantile(t.numpy(), alpha, method="lower"))

    (lo1, hi1), (lo2, hi2) = quantiles(a), quantiles(b)
    lo, hi = obs.range()
    assert lo.item() == pytest.approx(lo1 + momentum * (lo2 - lo1), rel=1e-6)
    assert hi.item() == pytest.approx(hi1 + momentum * (hi2 - hi1), rel=1e-6)


def test_percentile_ignores_single_outlier():
    x = randn(100_000, seed=5)
    x[17] = 1000.0
    obs = O.PercentileObserver(QuantSpec())
    obs.update(x)
    assert obs.range()[1] < 10


def test_percentile_rejects_other_granularities():
    with pytest.raises(ValueError, match="'tensor' only"):
        O.PercentileObserver(QuantSpec(granularity="channel"))
    with pytest.raises(ValueError, match="alpha=1.5"):
        O.PercentileObserver(QuantSpec(), alpha=1.5)


# --------------------------------------------------------------------------- MSE


def test_mse_clips_outlier_and_beats_minmax():
    spec = QuantSpec(bits=4)
    x = randn(10_000, seed=0)
    x[5] = 10.0
    obs = O.MSEObserver(spec)
    obs.update(x)
    lo, hi = obs.range()
    assert hi < 0.5 * 10.0  # t well below 1
    assert torch.isclose(lo / x.min(), hi / x.max())  # one t for both ends
    assert sq_error(x, spec, obs.params()) < 0.5 * sq_error(x, spec, F.params_from_tensor(x, spec))


def test_mse_keeps_full_range_on_uniform_data():
    spec = QuantSpec(bits=8)
    x = torch.rand(10_000, generator=torch.Generator().manual_seed(1)) * 2 - 1
    obs = O.MSEObserver(spec)
    obs.update(x)
    lo, hi = obs.range()
    assert hi / x.max() > 0.97 and lo / x.min() > 0.97


def test_mse_per_channel_weight_is_independent_per_channel():
    spec = QuantSpec(bits=4, granularity="channel", axis=0)
    w = randn(3, 256, seed=2)
    w[0, 3] = 12.0  # outlier only in channel 0
    w[1] = torch.linspace(-1, 1, 256)  # uniform channel
    obs = O.MSEObserver(spec, grid=50)
    obs.update(w)
    lo, hi = obs.range()
    assert hi.shape == (3, 1)
    for c in range(3):
        single = O.MSEObserver(spec, grid=50)
        single.update(w[c : c + 1])
        assert torch.equal(single.range()[1].reshape(()), hi[c, 0])
    shrink = (hi / w.amax(dim=1, keepdim=True)).reshape(-1)
    assert shrink[0] < 0.8 and shrink[1] > 0.9


@pytest.mark.parametrize("spec", [
    QuantSpec(granularity="tensor"),
    QuantSpec(granularity="channel", axis=0),
    QuantSpec(granularity="channel", axis=1),
    QuantSpec(granularity="channel", axis=-1),
    QuantSpec(granularity="token", symmetric=False),
    QuantSpec(bits=4, granularity="group", group_size=8),
    QuantSpec(format="fp8_e4m3", granularity="channel", axis=0),
    QuantSpec.mxfp4(),
    QuantSpec.nvfp4(),
], ids=lambda s: f"{s.format}-{s.granularity}-{s.axis}")
def test_mse_single_weight_every_granularity(spec):
    w = randn(4, 3, 64, seed=3)
    obs = O.MSEObserver(spec, grid=10)
    obs.update(w)
    lo, hi = obs.range()
    mlo, mhi = F.observe_range(w, spec)
    assert lo.shape == mlo.shape and hi.shape == mhi.shape
    assert torch.all(hi <= mhi) and torch.all(lo >= mlo)  # only ever shrinks
    assert sq_error(w, spec, obs.params()) <= sq_error(w, spec, F.compute_params(spec, mlo, mhi))


def test_mse_weight_mode_accepts_one_tensor_only():
    obs = O.MSEObserver(QuantSpec(granularity="token"), grid=5)
    obs.update(torch.ones(2, 4))
    with pytest.raises(ValueError, match="cannot combine batches"):
        obs.update(torch.ones(2, 4))


def test_mse_activation_sample_is_bounded_and_deterministic():
    spec = QuantSpec(granularity="channel", axis=-1)

    def run():
        obs = O.MSEObserver(spec, grid=20, max_samples=64)
        for i in range(5):
            obs.update(randn(3, 10, 8, seed=i) * (i + 1))
        return obs

    a, b = run(), run()
    assert a._sample.shape == (8, 8)  # 64 elements = 8 rows of 8 channels
    lo, hi = a.range()
    assert lo.shape == (1, 1, 8)
    assert torch.equal(hi, b.range()[1]) and torch.equal(lo, b.range()[0])
    minmax = O.MinMaxObserver(spec)
    for i in range(5):
        minmax.update(randn(3, 10, 8, seed=i) * (i + 1))
    assert torch.all(hi <= minmax.range()[1]) and torch.all(lo >= minmax.range()[0])


def test_mse_does_not_keep_the_callers_tensor():
    obs = O.MSEObserver(QuantSpec(), grid=5)
    x = randn(100, seed=4)
    obs.update(x)
    before = obs.range()
    x.mul_(100)
    obs._result = None  # force the search to run again on the kept sample
    assert torch.equal(obs.range()[1], before[1])


def test_mse_per_tensor_streaming_matches_single_batch_when_small():
    spec = QuantSpec(bits=4)
    x = randn(2, 500, seed=6)
    joined = O.MSEObserver(spec, grid=20)
    joined.update(x)
    split = O.MSEObserver(spec, grid=20)
    split.update(x[0])
    split.update(x[1])
    # Under max_samples every element is kept, so the sample order is all that differs.
    assert torch.allclose(joined.range()[1], split.range()[1])


# --------------------------------------------------------------------------- channel abs max


def test_channel_absmax_by_hand():
    obs = O.ChannelAbsMaxObserver()
    obs.update(torch.tensor([[1.0, -3.0, 0.0], [-2.0, 0.5, 0.25]]))
    obs.update(torch.tensor([[[0.5, 1.0, -4.0]]]))
    assert obs.amax.tolist() == [2.0, 3.0, 4.0]
    lo, hi = obs.range()
    assert lo.tolist() == [-2.0, -3.0, -4.0] and hi.shape == (3,)
    with pytest.raises(ValueError, match="needs the observer to have a spec"):
        obs.params()


def test_channel_absmax_other_axis_and_params():
    spec = QuantSpec(granularity="channel", axis=-1)
    obs = O.ChannelAbsMaxObserver(spec, axis=0)
    obs.update(torch.tensor([[1.0, -3.0], [-2.0, 0.5]]))
    assert obs.amax.tolist() == [3.0, 2.0]
    assert torch.allclose(obs.params()["scale"], torch.tensor([3.0, 2.0]) / 127)


# --------------------------------------------------------------------------- registry


def test_build_observer():
    assert set(O.OBSERVERS) == {"minmax", "percentile", "mse", "channel_absmax", "grouped_minmax", "keyed", "twinlog_mse"}
    obs = O.build_observer("percentile", QuantSpec(), alpha=0.9)
    assert isinstance(obs, O.PercentileObserver) and obs.alpha == 0.9
    assert isinstance(O.build_observer("channel_absmax", None), O.ChannelAbsMaxObserver)
    with pytest.raises(ValueError, match="unknown observer 'max': allowed 'minmax', 'percentile'"):
        O.build_observer("max", QuantSpec())
    with pytest.raises(ValueError, match="has no option 'alpha'"):
        O.build_observer("mse", QuantSpec(), alpha=0.9)
    with pytest.raises(ValueError, match="max_shrink=1.0"):
        O.build_observer("mse", QuantSpec(), max_shrink=1.0)
    with pytest.raises(ValueError, match="QuantSpec.bits=9"):
        O.build_observer("minmax", QuantSpec(bits=9))


def test_grouped_minmax_shares_range_within_groups():
    spec = QuantSpec(granularity="channel", axis=-1)
    obs = O.build_observer("grouped_minmax", spec, groups=[0, 1, 0, 1])
    obs.update(torch.tensor([[1.0, -2.0, -4.0, 0.5], [0.5, 3.0, 2.0, 0.0]]))
    lo, hi = obs.range()
    assert lo.flatten().tolist() == [-4.0, -2.0, -4.0, -2.0]
    assert hi.flatten().tolist() == [2.0, 3.0, 2.0, 3.0]
    assert torch.allclose(obs.params()["scale"].flatten(), torch.tensor([4.0, 3.0, 4.0, 3.0]) / 127)
    with pytest.raises(ValueError, match="needs groups"):
        O.build_observer("grouped_minmax", spec)
    with pytest.raises(ValueError, match="last axis"):
        O.build_observer("grouped_minmax", QuantSpec(), groups=[0])
    bad = O.build_observer("grouped_minmax", spec, groups=[0, 1])
    bad.update(torch.ones(2, 4))
    with pytest.raises(ValueError, match="2 group ids for 4 channels"):
        bad.range()
