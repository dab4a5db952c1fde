"""Tests for archquant.core.formats."""

import pytest
import torch

from archquant.core import formats as F
from archquant.core.formats import QuantSpec

E2M1 = torch.tensor(F.E2M1_GRID)


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def per_element(t, x, spec):
    """Broadcast a range-shaped tensor ``t`` to one value per element of ``x``."""
    view = F.scale_view(torch.zeros_like(x), spec)
    return (view + t.float()).reshape(x.shape)


# Range shapes for a (2, 6, 32) tensor.
SHAPE = (2, 6, 32)
GRANULARITY_CASES = [
    (QuantSpec(granularity="tensor"), ()),
    (QuantSpec(granularity="channel", axis=0), (2, 1, 1)),
    (QuantSpec(granularity="channel", axis=1), (1, 6, 1)),
    (QuantSpec(granularity="channel", axis=-1), (1, 1, 32)),
    (QuantSpec(granularity="token"), (2, 6, 1)),
    (QuantSpec(granularity="group", group_size=8), (2, 6, 4, 1)),
]
FORMAT_VARIANTS = [
    {"format": "int", "symmetric": True},
    {"format": "int", "symmetric": False, "bits": 4},
    {"format": "fp8_e4m3"},
    {"format": "fp8_e5m2"},
]


def with_format(spec, variant):
    return QuantSpec(**{**spec.to_dict(), **variant})


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("variant", FORMAT_VARIANTS, ids=lambda v: str(v))
@pytest.mark.parametrize("base, range_shape", GRANULARITY_CASES)
def test_round_trip_shapes(base, range_shape, variant):
    spec = with_format(base, variant)
    x = randn(*SHAPE)
    lo, hi = F.observe_range(x, spec)
    assert lo.shape == range_shape and hi.shape == range_shape
    assert lo.dtype == torch.float32
    assert torch.all(lo <= hi)
    params = F.compute_params(spec, lo, hi)
    for value in params.values():
        assert isinstance(value, torch.Tensor) and value.shape == range_shape
    codes = F.quantize(x, spec, params)
    assert codes.shape == x.shape
    out = F.dequantize(codes, spec, params)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(F.fake_quantize(x, spec, params), out)


def test_observe_range_values_per_channel():
    x = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, 0.5]])
    lo, hi = F.observe_range(x, QuantSpec(granularity="channel", axis=0))
    assert lo.tolist() == [[-2.0], [-4.0]] and hi.tolist() == [[3.0], [5.0]]
    lo, hi = F.observe_range(x, QuantSpec(granularity="channel", axis=1))
    assert lo.tolist() == [[-4.0, -2.0, 0.5]] and hi.tolist() == [[1.0, 5.0, 3.0]]
    lo, hi = F.observe_range(x, QuantSpec(granularity="tensor"))
    assert lo.item() == -4.0 and hi.item() == 5.0


def test_fake_quantize_keeps_dtype_and_dynamic_params():
    x = randn(4, 16).to(torch.bfloat16)
    spec = QuantSpec(granularity="token")
    out = F.fake_quantize(x, spec)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.fake_quantize(x, spec, F.params_from_tensor(x, spec)))


# --------------------------------------------------------------------------- int


def test_int8_hand_example():
    x = torch.tensor([-1.0, 0.5, 0.25])
    spec = QuantSpec()
    params = F.params_from_tensor(x, spec)
    assert torch.isclose(params["scale"], torch.tensor(1 / 127))
    # 0.5 * 127 = 63.5 -> 64 and 0.25 * 127 = 31.75 -> 32.
    assert F.quantize(x, spec, params).tolist() == [-127, 64, 32]
    assert F.quantize(x, spec, params).dtype == torch.int8


def test_round_half_to_even():
    spec = QuantSpec()
    params = {"scale": torch.tensor(1.0)}
    codes = F.quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5]), spec, params)
    assert codes.tolist() == [0, 2, 2, 0, -2]


def test_qrange():
    assert F.qrange(QuantSpec(bits=8)) == (-127, 127)
    assert F.qrange(QuantSpec(bits=4)) == (-7, 7)
    assert F.qrange(QuantSpec(bits=2)) == (-1, 1)
    assert F.qrange(QuantSpec(bits=8, symmetric=False)) == (0, 255)
    assert F.qrange(QuantSpec(bits=3, symmetric=False)) == (0, 7)
    with pytest.raises(ValueError, match="format='int'"):
        F.qrange(QuantSpec(format="fp8_e4m3"))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("base", [case[0] for case in GRANULARITY_CASES])
def test_int_error_bound_and_code_range(base, bits, symmetric):
    spec = with_format(base, {"bits": bits, "symmetric": symmetric})
    x = randn(*SHAPE, seed=bits)
    params = F.params_from_tensor(x, spec)
    codes = F.quantize(x, spec, params)
    qmin, qmax = F.qrange(spec)
    assert codes.dtype == (torch.int8 if symmetric else torch.uint8)
    assert codes.min() >= qmin and codes.max() <= qmax
    err = (x - F.fake_quantize(x, spec, params)).abs()
    scale = per_element(params["scale"], x, spec)
    assert torch.all(err <= scale / 2 + 1e-6)


def test_int_values_outside_range_clamp():
    spec = QuantSpec(bits=4)
    params = {"scale": torch.tensor(0.1)}
    out = F.fake_quantize(torch.tensor([-5.0, 5.0]), spec, params)
    assert torch.allclose(out, torch.tensor([-0.7, 0.7]))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_asymmetric_zero_is_exact(bits):
    spec = QuantSpec(bits=bits, symmetric=False, granularity="token")
    x = torch.stack([
        torch.linspace(-0.3, 1.7, 9),  # mixed signs
        torch.linspace(0.2, 2.0, 9),  # positive only: range is widened to include 0
        torch.linspace(-3.0, -0.1, 9),  # negative only
    ])
    params = F.params_from_tensor(x, spec)
    zeros = torch.zeros_like(x)
    assert torch.all(F.fake_quantize(zeros, spec, params) == 0)
    assert params["zero_point"].dtype == torch.float32
    assert params["zero_point"][1].item() == 0.0
    assert params["zero_point"][2].item() == 2**bits - 1


def test_int_all_zero_channel_has_safe_scale():
    x = torch.zeros(3, 4)
    x[0] = 1.0
    for symmetric in (True, False):
        spec = QuantSpec(granularity="channel", axis=0, symmetric=symmetric)
        params = F.params_from_tensor(x, spec)
        assert torch.all(params["scale"] >= 1e-8)
        out = F.fake_quantize(x, spec, params)
        assert torch.all(torch.isfinite(out)) and torch.allclose(out, x)


# --------------------------------------------------------------------------- fp8


@pytest.mark.parametrize("fmt, dtype, bound", [
    ("fp8_e4m3", torch.float8_e4m3fn, 2.0**-4),
    ("fp8_e5m2", torch.float8_e5m2, 2.0**-3),
])
def test_fp8_relative_error(fmt, dtype, bound):
    spec = QuantSpec(format=fmt)
    x = randn(4096, seed=3, scale=5.0)
    params = F.params_from_tensor(x, spec)
    finfo = torch.finfo(dtype)
    assert torch.isclose(params["scale"], x.abs().max() / finfo.max)
    codes = F.quantize(x, spec, params)
    assert codes.dtype == dtype
    out = F.dequantize(codes, spec, params)
    normal = (x / params["scale"]).abs() >= finfo.smallest_normal
    assert normal.sum() > 4000
    rel = ((x - out).abs() / x.abs())[normal]
    assert rel.max() <= bound


def test_fp8_saturates_and_handles_zero():
    spec = QuantSpec(format="fp8_e4m3")
    params = F.params_from_tensor(torch.zeros(5), spec)
    assert params["scale"].item() == pytest.approx(1e-12)
    assert torch.all(F.fake_quantize(torch.zeros(5), spec, params) == 0)
    params = {"scale": torch.tensor(1.0)}
    assert F.fake_quantize(torch.tensor([1000.0, -1e6]), spec, params).tolist() == [448.0, -448.0]


# --------------------------------------------------------------------------- fp4


def half_spacing(mag):
    """Half the distance between neighbouring E2M1 values around magnitude ``mag``."""
    return torch.where(mag < 2, 0.25, torch.where(mag < 4, 0.5, 1.0))


@pytest.mark.parametrize("spec", [QuantSpec.mxfp4(), QuantSpec.nvfp4()], ids=["mxfp4", "nvfp4"])
def test_fp4_grid_and_error_bound(spec):
    # Groups with very different magnitudes, including an all-zero group.
    x = randn(3, 4, 64, seed=7) * torch.logspace(-3, 3, 4).reshape(1, 4, 1)
    x[0, 0, :32] = 0.0
    params = F.params_from_tensor(x, spec)
    fmt = F.get_format(spec.format)
    scale = per_element(fmt.effective_scale(params), x, spec)
    codes = F.quantize(x, spec, params)
    assert codes.dtype == torch.uint8 and codes.max() <= 15
    out = F.dequantize(codes, spec, params)
    # nvfp4 group scales of tiny groups underflow e4m3 to 0: those groups are all zero.
    zero_scale = scale == 0
    assert torch.all(out[zero_scale] == 0)
    assert zero_scale.float().mean() < 0.5
    x, out, scale = x[~zero_scale], out[~zero_scale], scale[~zero_scale]
    assert torch.isin((out / scale).abs(), E2M1).all()
    y = x / scale
    inside = y.abs() <= 6
    err = (y - out / scale).abs()
    assert torch.all(err[inside] <= half_spacing(y.abs())[inside] + 1e-6)
    assert torch.all((out / scale).abs()[~inside] == 6)


def test_fp4_all_zero_group_stays_zero():
    for spec in (QuantSpec.mxfp4(), QuantSpec.nvfp4()):
        x = torch.zeros(2, 32)
        x[1] = randn(32)
        params = F.params_from_tensor(x, spec)
        assert torch.all(torch.isfinite(F.get_format(spec.format).effective_scale(params)))
        out = F.fake_quantize(x, spec, params)
        assert torch.all(out[0] == 0) and torch.all(torch.isfinite(out))
        assert torch.all(F.quantize(x, spec, params)[0] == 0)


def test_e2m1_ties_go_to_even_mantissa():
    spec = QuantSpec.mxfp4()
    params = {"scale": torch.ones(1, 1)}
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0])
    x = torch.cat([ties, torch.zeros(24)]).reshape(1, 32)
    out = F.fake_quantize(x, spec, params)[0, :8]
    assert out.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0]


def test_e2m1_codes():
    spec = QuantSpec.mxfp4()
    params = {"scale": torch.ones(1, 1)}
    x = torch.zeros(1, 32)
    x[0, :5] = torch.tensor([6.0, -6.0, 0.5, -0.1, -1.5])
    codes = F.quantize(x, spec, params)[0, :5]
    # sign << 3 | magnitude index; -0.1 rounds to +0 (code 0).
    assert codes.tolist() == [7, 15, 1, 0, 11]


def test_mxfp4_scale_is_power_of_two_from_group_amax():
    spec = QuantSpec.mxfp4()
    x = torch.zeros(4, 32)
    x[0, 0], x[1, 5], x[2, 31] = 3.0, -7.0, 0.01
    params = F.params_from_tensor(x, spec)
    scale = params["scale"].reshape(-1)
    # floor(log2(amax)) - 2: 3 -> 2**-1, 7 -> 2**0, 0.01 -> 2**-9, all-zero -> 2**-127.
    assert scale.tolist() == [2.0**-1, 2.0**0, 2.0**-9, 2.0**-127]
    out = F.fake_quantize(x, spec, params)
    assert out[0, 0] == 3.0 and out[1, 5] == -6.0 and out[3].abs().sum() == 0


def test_nvfp4_params():
    spec = QuantSpec.nvfp4()
    x = randn(8, 64, seed=11) * torch.logspace(-2, 1, 8).reshape(8, 1)
    params = F.params_from_tensor(x, spec)
    assert params["scale"].dtype == torch.float8_e4m3fn
    assert params["scale"].shape == (8, 4, 1)
    gs = params["global_scale"]
    assert gs.dtype == torch.float32 and gs.shape == ()
    assert torch.isclose(gs, x.abs().max() / (448 * 6))
    scale = params["scale"].float()
    # Exactly representable in e4m3: casting again changes nothing.
    assert torch.equal(scale.to(torch.float8_e4m3fn).float(), scale)
    assert scale.max() == 448  # the group holding the tensor max uses the full e4m3 range


def test_fp4_rejects_indivisible_last_dim():
    with pytest.raises(ValueError, match="last dim 48 .*group_size=32"):
        F.fake_quantize(torch.ones(2, 48), QuantSpec.mxfp4())


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs, pattern", [
    ({"bits": 9}, r"QuantSpec.bits=9 not allowed for format 'int': allowed 2..8"),
    ({"bits": 1}, r"QuantSpec.bits=1"),
    ({"bits": "8"}, r"QuantSpec.bits='8'"),
    ({"symmetric": 1}, r"QuantSpec.symmetric=1"),
    ({"granularity": "row"}, r"QuantSpec.granularity='row' .*'tensor', 'channel'"),
    ({"format": "int3"}, r"unknown quantization format 'int3': allowed .*'fp8_e4m3'.*'int'"),
    ({"granularity": "group"}, r"QuantSpec.group_size=0 .*> 0"),
    ({"group_size": -1}, r"QuantSpec.group_size=-1"),
    ({"format": "mxfp4"}, r"QuantSpec.granularity='tensor' .*'mxfp4'.*QuantSpec.mxfp4\(\)"),
    ({"format": "mxfp4", "granularity": "group", "group_size": 16},
     r"QuantSpec.group_size=16 .*'mxfp4': allowed 32"),
    ({"format": "nvfp4", "granularity": "group", "group_size": 32},
     r"QuantSpec.group_size=32 .*'nvfp4': allowed 16"),
])
def test_validation_errors_name_the_field(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        QuantSpec(**kwargs).validate()


def test_validate_returns_self_and_helpers_are_valid():
    spec = QuantSpec(bits=4, granularity="group", group_size=64)
    assert spec.validate() is spec
    assert QuantSpec.mxfp4().validate().group_size == 32
    assert QuantSpec.nvfp4().validate().group_size == 16
    # bits is ignored by non-int formats.
    QuantSpec(format="fp8_e4m3", bits=12).validate()


def test_channel_axis_out_of_range():
    with pytest.raises(ValueError, match="QuantSpec.axis=3"):
        F.observe_range(torch.ones(2, 3), QuantSpec(granularity="channel", axis=3))


def test_dict_round_trip():
    for spec in [QuantSpec(), QuantSpec.nvfp4(),
                 QuantSpec(bits=3, symmetric=False, granularity="channel", axis=-1)]:
        assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert QuantSpec.from_dict({"bits": 4}) == QuantSpec(bits=4)
    with pytest.raises(ValueError, match="'bitz'"):
        QuantSpec.from_dict({"bitz": 4})
    with pytest.raises(ValueError, match="QuantSpec.bits=12"):
        QuantSpec.from_dict({"bits": 12})
    assert QuantSpec.from_dict({"format": "later"}, validate=False).format == "later"


# --------------------------------------------------------------------------- plug-ins


class Codebook4(F.Format):
    """Tiny non-uniform format: 4 levels {-1, -0.25, 0.25, 1} times a scale (= amax)."""

    LEVELS = torch.tensor([-1.0, -0.25, 0.25, 1.0])

    def params_from_range(self, spec, lo, hi):
        return {"scale": torch.maximum(lo.abs(), hi.abs()).clamp_min(1e-8)}

    def quantize(self, x, spec, params):
        y = F.scale_view(x.float(), spec) / params["scale"]
        codes = (y.unsqueeze(-1) - self.LEVELS).abs().argmin(dim=-1)
        return codes.to(torch.uint8).reshape(x.shape)

    def dequantize(self, codes, spec, params, dtype=torch.float32):
        values = F.scale_view(self.LEVELS[codes.long()], spec) * params["scale"]
        return values.reshape(codes.shape).to(dtype)


@pytest.fixture
def codebook_format():
    name = "test_codebook4"
    F.register_format(name)(Codebook4)
    yield name
    F._FORMATS.pop(name)


def test_plugin_format(codebook_format):
    assert codebook_format in F.format_names()
    spec = QuantSpec(format=codebook_format, granularity="channel", axis=0).validate()
    x = torch.tensor([[2.0, -2.0, 0.4, 0.6], [-0.1, 0.05, 0.1, 0.0]])
    params = F.params_from_tensor(x, spec)
    assert params["scale"].reshape(-1).tolist() == pytest.approx([2.0, 0.1])
    codes = F.quantize(x, spec, params)
    assert codes.tolist() == [[3, 0, 2, 2], [0, 2, 3, 1]]
    expected = torch.tensor([[2.0, -2.0, 0.5, 0.5], [-0.1, 0.025, 0.1, -0.025]])
    assert torch.allclose(F.dequantize(codes, spec, params), expected)
    assert torch.allclose(F.fake_quantize(x, spec), expected)
    spec_dict = QuantSpec.from_dict(spec.to_dict())
    assert spec_dict.format == codebook_format


def test_register_format_conflicts(codebook_format):
    F.register_format(codebook_format)(Codebook4)  # same class again: allowed

    class Other(Codebook4):
        pass

    with pytest.raises(ValueError, match="already registered"):
        F.register_format(codebook_format)(Other)
    with pytest.raises(TypeError):
        F.register_format("not_a_format")(object)
