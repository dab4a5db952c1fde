"""Twin-log quantization (core/twinlog.py): the codebook, the grid search, storage and checkpoints."""
import itertools
import math

import pytest
import torch

import archquant as aq
from archquant.core import formats, twinlog
from archquant.core.formats import QuantSpec
from archquant.core.modules import QuantLinear
from archquant.core.recipe import Quantize, Recipe

from conftest import rel_err


def spec(bits: int) -> QuantSpec:
    return QuantSpec(format="twinlog", bits=bits, granularity="channel", axis=0).validate()


def heavy_tailed(rows=48, cols=256, seed=0) -> torch.Tensor:
    """Gaussian-like with long tails, as DiT weights are (Student t, 4 degrees of freedom)."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, cols, generator=g)
    chi2 = torch.randn(rows, cols, 4, generator=g).pow(2).sum(-1)
    return 0.02 * normal / torch.sqrt(chi2 / 4)


def reference_dequantize(codes, bits, p):
    """The codebook written out element by element (independent of the vectorised format code)."""
    out = torch.empty(codes.shape)
    levels = 2 ** (bits - 1)
    for i in range(codes.shape[0]):
        for j in range(codes.shape[1]):
            c = int(codes[i, j])
            negative, q = c >= levels, c % levels
            side = "neg" if negative else "pos"
            delta, zero, eta = (float(p[f"delta_{side}"][i, 0]), float(p[f"zero_{side}"][i, 0]),
                                float(p["eta"][i, 0]))
            magnitude = max(2.0 ** ((q + zero) * delta) - eta, 0.0)
            out[i, j] = -magnitude if negative else magnitude
    return out


@pytest.mark.parametrize("bits", [3, 4])
def test_codes_are_a_sign_bit_and_a_log_magnitude(bits):
    w = heavy_tailed(6, 20)
    p = twinlog.fit_twinlog(w, spec(bits))
    codes = formats.quantize(w, spec(bits), p)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2 ** bits
    assert torch.equal(codes >= 2 ** (bits - 1), w < 0)  # the sign bit is the weight's sign
    deq = formats.dequantize(codes, spec(bits), p)
    assert torch.allclose(deq, reference_dequantize(codes, bits, p), rtol=1e-5, atol=1e-7)
    nonzero = deq != 0  # (a level below eta clamps to 0, which has no sign)
    assert torch.equal(formats.quantize(deq, spec(bits), p)[nonzero], codes[nonzero])  # codebook values map to themselves
    # each row and sign has at most 2^(bits-1) distinct magnitudes, on a log2 grid of step delta
    for i in range(w.shape[0]):
        for side, mask in (("pos", w[i] >= 0), ("neg", w[i] < 0)):
            values = deq[i][mask].abs().unique()
            assert len(values) <= 2 ** (bits - 1)
            values = values[values > 0]
            logs = torch.log2(values.double() + float(p["eta"][i, 0]))
            steps = logs / float(p[f"delta_{side}"][i, 0])
            assert torch.allclose(steps, steps.round(), atol=1e-3)


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_mse_is_below_uniform_rtn_at_the_same_bits(bits):
    w = heavy_tailed()
    tlq = formats.fake_quantize(w, spec(bits), twinlog.fit_twinlog(w, spec(bits)))
    rtn = formats.fake_quantize(w, QuantSpec(format="int", bits=bits, granularity="channel", axis=0))
    mse_tlq, mse_rtn = (tlq - w).pow(2).mean(), (rtn - w).pow(2).mean()
    assert mse_tlq < mse_rtn, (float(mse_tlq), float(mse_rtn))


def brute_force_best_error(w, bits, etas, pcts):
    """Every (eta, positive percentile, negative percentile) combination with torch.quantile over the
    sign's own entries, one setting for the whole layer: the smallest total squared error."""
    levels = 2 ** (bits - 1)
    best = math.inf
    for eta, pp, pn in itertools.product(etas, pcts, pcts):
        total = 0.0
        for row in w:
            for mask, pct in ((row >= 0, pp), (row < 0, pn)):
                a = row[mask].abs()
                if a.numel() == 0:
                    continue
                u = torch.log2(a + eta).clamp_min(-126.0)
                lo, hi = u.min(), torch.quantile(u, pct)
                delta = max(float(hi - lo) / (levels - 1), 1e-8)
                zero = round(float(lo) / delta)
                q = (torch.round(u / delta) - zero).clamp(0, levels - 1)
                total += float(((torch.exp2((q + zero) * delta) - eta).clamp_min(0) - a).pow(2).sum())
        best = min(best, total)
    return best


def test_the_grid_search_finds_the_best_combination():
    w = heavy_tailed(5, 40, seed=3)
    etas, pcts = (0.0, 0.01, 0.1, 0.5), (0.9, 0.99, 1.0)
    p = twinlog.fit_twinlog(w, spec(3), etas=etas, percentiles=pcts)
    got = float((formats.fake_quantize(w, spec(3), p) - w).pow(2).sum())
    assert got == pytest.approx(brute_force_best_error(w, 3, etas, pcts), rel=1e-4)
    assert min(abs(float(p["eta"][0, 0]) - e) for e in etas) < 1e-7
    assert bool((p["eta"] == p["eta"][0, 0]).all())  # one eta per layer


def test_per_row_fits_are_at_least_as_good_and_may_differ_by_row():
    w = torch.cat([heavy_tailed(4, 64), 10 * heavy_tailed(4, 64, seed=1)])
    layer = twinlog.fit_twinlog(w, spec(3))
    rows = twinlog.fit_twinlog(w, spec(3), per_row=True)
    err = {k: (formats.fake_quantize(w, spec(3), p) - w).pow(2).sum(1) for k, p in (("layer", layer), ("rows", rows))}
    assert bool((err["rows"] <= err["layer"] * (1 + 1e-6)).all())


def test_zero_filled_quantile_reproduces_the_reference_codes_clip_point():
    """The reference code takes the percentile over the whole row with the other sign zero-filled:
    with eta = 0 and |w| < 1 every u is negative, so the 99th percentile is 0 (the filled zeros),
    and the top code of the positive side lands at |w| = 2^0 = 1, far beyond the weights."""
    w = heavy_tailed(3, 200)
    kwargs = dict(etas=(0.0,), percentiles=(0.99,))
    ours = twinlog.fit_twinlog(w, spec(4), **kwargs)
    ref = twinlog.fit_twinlog(w, spec(4), zero_filled_quantile=True, **kwargs)
    top = lambda p: 2.0 ** ((7 + p["zero_pos"]) * p["delta_pos"])  # the largest positive magnitude
    assert torch.allclose(top(ref), torch.ones(3, 1), atol=0.1)
    assert bool((top(ours) < 0.5).all())
    err = lambda p: float((formats.fake_quantize(w, spec(4), p) - w).pow(2).sum())
    assert err(ours) < err(ref)


def test_rows_of_one_sign_and_zeros():
    w = torch.tensor([[0.5, 0.25, 0.0, 0.125], [-0.5, -0.1, -0.2, -0.3], [0.0, 0.0, 0.0, 0.0]])
    p = twinlog.fit_twinlog(w, spec(4))
    deq = formats.fake_quantize(w, spec(4), p)
    assert torch.isfinite(deq).all() and torch.equal(torch.sign(deq) * (w != 0), torch.sign(w))
    assert rel_err(deq, w) < 0.05


def test_bad_specs_and_observers_are_one_line_errors():
    with pytest.raises(ValueError, match="allowed 2..8"):
        QuantSpec(format="twinlog", bits=9, granularity="channel").validate()
    with pytest.raises(ValueError, match="per output row"):
        QuantSpec(format="twinlog", bits=4, granularity="tensor").validate()
    with pytest.raises(ValueError, match="twinlog_mse"):
        formats.fake_quantize(torch.randn(4, 8), spec(4))  # a range cannot give twin-log params
    with pytest.raises(ValueError, match="fitted by the observer 'twinlog_mse'"):
        Quantize(weight=spec(4)).validate()
    with pytest.raises(ValueError, match="fits the 'twinlog' format"):
        twinlog.TwinLogMSEObserver(QuantSpec(format="int", bits=4, granularity="channel"))


def tlq_recipe(bits):
    return Recipe("tlq", [Quantize(weight=spec(bits), weight_observer="twinlog_mse")])


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_quantized_linears_store_packed_codes_and_reload_bit_identically(toy_model, toy_batches, tmp_path, bits):
    x = torch.cat(toy_batches)
    with torch.no_grad():
        fp = toy_model(x)
    aq.quantize_(toy_model, tlq_recipe(bits), progress=False)
    linears = [m for m in toy_model.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.weight_spec.format == "twinlog" for m in linears)
    for m in linears:  # two codes per byte at 4 bits and below
        per_byte = 2 if bits <= 4 else 1
        assert m.weight_codes.dtype == torch.uint8
        assert m.weight_codes.numel() * per_byte == m.in_features * m.out_features
    with torch.no_grad():
        before = toy_model(x)
    assert rel_err(before, fp) < {3: 0.4, 4: 0.25, 8: 0.02}[bits]  # still roughly the same function
    aq.save_quantized(toy_model, tmp_path / "ckpt")
    loaded = aq.load_quantized(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(x), before)


def test_stored_parameters_that_twinlog_cannot_produce_are_refused_naming_them(toy_model):
    aq.quantize_(toy_model, tlq_recipe(4), progress=False)
    m = next(m for m in toy_model.modules() if isinstance(m, QuantLinear))
    m.check_loaded("layer.")
    params = m.weight_params
    for key, bad, message in (("delta_neg", -1.0, "non-positive step"), ("eta", -0.5, "is negative"),
                              ("zero_pos", float("nan"), "")):
        original = getattr(params, key).clone()
        getattr(params, key).fill_(bad)
        with pytest.raises(ValueError, match=f"weight_params.{key}") as e:
            m.check_loaded("layer.")
        assert message in str(e.value) and "\n" not in str(e.value)
        getattr(params, key).copy_(original)
