"""Context-keyed calibration: statistics and static activation scales per key (e.g. per timestep)."""
import json

import pytest
import torch

from archquant.core import formats
from archquant.core.calibration import calibrate, collect_stats
from archquant.core.context_key import context_key, current_context_key
from archquant.core.formats import QuantSpec
from archquant.core.modules import ActQuantizer, QuantLinear
from archquant.core.observers import ChannelAbsMaxObserver, KeyedObserver

A8 = QuantSpec(bits=8, granularity="tensor")
A8_ASYM = QuantSpec(bits=8, symmetric=False, granularity="tensor")
#: the two regimes: the same inputs, "loud" twenty times larger (early vs late diffusion steps)
GAINS = {"quiet": 1.0, 7: 20.0}


def keyed_forward(model, batch):
    for key, gain in GAINS.items():
        with context_key(key):
            model(batch * gain)


def _wrap(model, observer_for_embed):
    """embed (reads the raw inputs, before any norm): keyed (or plain) static input quantizer;
    every up_proj: a plain one."""
    model.embed = QuantLinear.from_float(model.embed, input_quantizer=ActQuantizer(A8_ASYM, **observer_for_embed))
    for layer in model.layers:
        layer.up_proj = QuantLinear.from_float(layer.up_proj, input_quantizer=ActQuantizer(A8_ASYM))
    return model


def _inputs_by_key(model, batches, name):
    """Every tensor ``name`` receives, per key, recorded independently of the observers."""
    seen = {}

    def hook(_m, args):
        seen.setdefault(current_context_key(), []).append(args[0].detach().clone())

    h = model.get_submodule(name).register_forward_pre_hook(hook)
    with torch.no_grad():
        for b in batches:
            keyed_forward(model, b)
    h.remove()
    return {k: torch.cat([t.flatten() for t in v]) for k, v in seen.items()}


def _minmax_params(x, spec=A8_ASYM):
    return formats.compute_params(spec, x.min(), x.max())


def test_per_key_scales_are_each_keys_minmax(toy_model, toy_batches):
    model = _wrap(toy_model, {"observer": "keyed", "observer_kwargs": {"observer": "minmax"}})
    data = _inputs_by_key(model, toy_batches, "embed")
    calibrate(model, toy_batches, forward_fn=keyed_forward, progress=False)
    q = model.embed.input_quantizer
    assert q.keys == ["quiet", 7]
    for i, key in enumerate(q.keys):
        want = _minmax_params(data[key])
        got = q.key_params[i].as_dict()
        assert got.keys() == want.keys()
        assert all(torch.allclose(got[k].reshape(()).float(), want[k].reshape(()).float()) for k in want), key
    s_quiet, s_loud = (q.key_params[i].as_dict()["scale"] for i in range(2))
    assert float(s_loud / s_quiet) > 5  # the regimes really differ
    # at run time the current key picks its parameters
    x = torch.randn(4, 32) * 3
    for i, key in enumerate(q.keys):
        with context_key(key), torch.no_grad():
            assert torch.equal(q(x), formats.fake_quantize(x, A8_ASYM, q.key_params[i].as_dict()))


def test_unkeyed_quantizers_pool_every_key_as_before(toy_model, toy_batches):
    """A plain static quantizer calibrated under keys sees all the data, as without keys."""
    model = _wrap(toy_model, {})
    data = _inputs_by_key(model, toy_batches, "embed")
    calibrate(model, toy_batches, forward_fn=keyed_forward, progress=False)
    q = model.embed.input_quantizer
    assert not q.keyed and not hasattr(q, "key_params")
    want = _minmax_params(torch.cat(list(data.values())))
    assert torch.allclose(q.params.as_dict()["scale"].reshape(()), want["scale"].reshape(()))
    with torch.no_grad():  # and it needs no key at run time
        q(torch.randn(3, 32))


def test_keyed_quantizer_roundtrips_config_and_tensors(toy_model, toy_batches):
    model = _wrap(toy_model, {"observer": "keyed"})
    calibrate(model, toy_batches, forward_fn=keyed_forward, progress=False)
    lin = model.embed
    config = json.loads(json.dumps(lin.to_config()))  # what a checkpoint stores
    assert config["input_quantizer"]["keys"] == ["quiet", 7]
    rebuilt = QuantLinear.from_config(config)
    rebuilt.load_state_dict(lin.state_dict())
    rebuilt.check_loaded()
    x = torch.randn(5, 32)
    for key in GAINS:
        with context_key(key), torch.no_grad():
            assert torch.equal(rebuilt(x), lin(x))
    state = lin.state_dict()
    assert "input_quantizer.key_params.1.scale" in state and "input_quantizer.params.scale" not in state
    del state["input_quantizer.key_params.1.scale"]
    broken = QuantLinear.from_config(config)
    broken.load_state_dict(state, strict=False)
    with pytest.raises(ValueError, match="'input_quantizer.key_params.1.scale' is missing"):
        broken.check_loaded()


def test_keys_are_required_and_checked(toy_model, toy_batches):
    model = _wrap(toy_model, {"observer": "keyed"})
    with pytest.raises(ValueError, match="outside any context key"):
        calibrate(model, toy_batches, progress=False)
    model = _wrap(toy_model, {"observer": "keyed"})
    calibrate(model, toy_batches, forward_fn=keyed_forward, progress=False)
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="no key is set"):
        model(x)
    with context_key(3), pytest.raises(ValueError, match=r"context key 3: calibrated keys \['quiet', 7\]"):
        model(x)
    with pytest.raises(ValueError, match="context key True not allowed"):
        with context_key(True):
            pass
    with pytest.raises(ValueError, match="needs its context keys"):
        ActQuantizer.from_config({"spec": A8.to_dict(), "dynamic": False, "observer": "keyed", "observer_kwargs": {}})


def test_keyed_statistics_in_collect_stats(toy_model, toy_batches):
    """KeyedObserver wraps any statistic: per key it equals a separate collection of that key alone."""
    site = "embed:output"  # before any norm: the regimes differ here
    keyed = collect_stats(toy_model, toy_batches, {site: KeyedObserver(ChannelAbsMaxObserver)},
                          forward_fn=keyed_forward, progress=False)[site]
    assert keyed.keys == ["quiet", 7]
    for key, gain in GAINS.items():
        alone = collect_stats(toy_model, toy_batches, {site: ChannelAbsMaxObserver()},
                              forward_fn=lambda m, b, g=gain: m(b * g), progress=False)[site]
        assert torch.equal(keyed[key].amax, alone.amax)
    assert not torch.allclose(keyed["quiet"].amax, keyed[7].amax, rtol=0.1)


def test_context_key_nests_and_resets():
    assert current_context_key() is None
    with context_key(1):
        with context_key("b"):
            assert current_context_key() == "b"
        assert current_context_key() == 1
    assert current_context_key() is None


def test_keyed_model_checkpoint_reloads_bit_identical(toy_model, toy_batches, tmp_path):
    from archquant.api import load_quantized, save_quantized

    model = _wrap(toy_model, {"observer": "keyed"})
    calibrate(model, toy_batches, forward_fn=keyed_forward, progress=False)
    save_quantized(model, tmp_path / "ckpt", family="toy")
    loaded = load_quantized(tmp_path / "ckpt")
    x = torch.cat(toy_batches)
    for key in GAINS:
        with context_key(key), torch.no_grad():
            assert torch.equal(loaded(x), model(x))
