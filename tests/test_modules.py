
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from archquant.core import formats
from archquant.core.calibration import NonFiniteActivationError, calibrate, collect_stats
from archquant.core.formats import QuantSpec
from archquant.core.modules import ActQuantizer, QuantConv1d, QuantLinear, QuantMatmul, module_from_config
from archquant.core.observers import ChannelAbsMaxObserver

W8 = QuantSpec(bits=8, granularity="channel", axis=0)
A8 = QuantSpec(bits=8, granularity="tensor")


def test_unquantized_wrapper_equals_linear():
    lin = nn.Linear(32, 16)
    q = QuantLinear.from_float(lin)
    x = torch.randn(4, 32)
    assert torch.equal(q(x), lin(x))


def test_weight_fake_quant_matches_format_and_freeze_is_bit_identical():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    q = QuantLinear.from_float(lin, weight_spec=W8)
    x = torch.randn(4, 32)
    expected = F.linear(x, formats.fake_quantize(lin.weight, W8), lin.bias)
    before = q(x)
    assert torch.equal(before, expected)
    q.freeze()
    assert q.frozen and not hasattr(q, "weight") and q.weight_codes.dtype == torch.int8
    assert torch.equal(q(x), before)


def test_static_act_quantizer_calibrates_then_quantizes():
    aq = ActQuantizer(A8, dynamic=False)
    x = torch.linspace(-2, 2, 101)
    assert torch.equal(aq(x), x)  # "off" until calibrated
    aq.mode = "calibrate"
    aq(x)
    aq(x * 0.5)
    aq.freeze()
    scale = aq.params.as_dict()["scale"]
    assert torch.allclose(scale, torch.tensor(2.0 / 127))
    assert torch.allclose(aq(x), formats.fake_quantize(x, A8, {"scale": scale}))


def test_static_act_quantizer_without_scales_refuses():
    aq = ActQuantizer(A8)
    aq.mode = "quantize"
    with pytest.raises(RuntimeError, match="before calibration"):
        aq(torch.randn(3))


def test_dynamic_per_token_act_quantizer():
    spec = QuantSpec(bits=8, granularity="token")
    aq = ActQuantizer(spec, dynamic=True)
    x = torch.randn(3, 5, 16)
    assert torch.equal(aq(x), formats.fake_quantize(x, spec))


def test_quant_conv1d_and_matmul():
    conv = nn.Conv1d(8, 8, 4, groups=8, padding=3)
    x = torch.randn(2, 8, 10)
    qc = QuantConv1d(conv)
    assert torch.equal(qc(x), conv(x))
    qc = QuantConv1d(conv, weight_spec=QuantSpec(bits=8, granularity="channel", axis=0))
    ref = F.conv1d(x, formats.fake_quantize(conv.weight, qc.weight_spec), conv.bias, padding=3, groups=8)
    assert torch.equal(qc(x), ref)
    rebuilt = module_from_config(qc.to_config())
    assert isinstance(rebuilt, QuantConv1d) and rebuilt.frozen
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    mm = QuantMatmul(ActQuantizer(QuantSpec(granularity="token"), dynamic=True))
    assert torch.equal(mm(a, b), formats.fake_quantize(a, QuantSpec(granularity="token")) @ b)


def test_calibrate_over_model_and_nonfinite_detection_names_module():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    model[0] = QuantLinear.from_float(model[0], weight_spec=W8, input_quantizer=ActQuantizer(A8))
    batches = [torch.randn(4, 8) for _ in range(3)]
    n = calibrate(model, batches, progress=False)
    assert n == 3 and model[0].frozen and model[0].input_quantizer.mode == "quantize"

    bad = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with torch.no_grad():
        bad[1].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteActivationError, match="module '1'"):
        collect_stats(bad, batches, {"0": ChannelAbsMaxObserver()}, progress=False)


def test_empty_calibration_data_is_an_error():
    model = nn.Sequential(QuantLinear.from_float(nn.Linear(4, 4), input_quantizer=ActQuantizer(A8)))
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, [], progress=False)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_weights_are_packed_two_per_byte_and_unchanged(symmetric):
    from archquant.core.modules import pack_nibbles, unpack_nibbles

    lo, hi = (-7, 8) if symmetric else (0, 16)
    codes = torch.randint(lo, hi, (5, 6), dtype=torch.int8 if symmetric else torch.uint8)
    packed = pack_nibbles(codes, symmetric)
    assert packed.shape == (5, 3) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed, symmetric), codes)
    # element 2i in the low nibble, 2i+1 in the high one, signed codes offset by +8
    assert int(packed[0, 0]) == (int(codes[0, 0]) + (8 if symmetric else 0)) | ((int(codes[0, 1]) + (8 if symmetric else 0)) << 4)

    torch.manual_seed(0)
    lin = nn.Linear(32, 8)
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity="group", group_size=16)
    q = QuantLinear.from_float(lin, weight_spec=spec)
    x = torch.randn(3, 32)
    before = q(x)
    q.freeze()
    assert q.weight_packed and q.weight_codes.numel() == 32 * 8 // 2
    assert torch.equal(q(x), before)
    rebuilt = module_from_config(q.to_config())
    rebuilt.load_state_dict(q.state_dict())
    assert torch.equal(rebuilt(x), before)
