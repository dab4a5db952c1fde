import json
import os

import pytest
import torch

import archquant as aq
from archquant.core import serialization
from archquant.core.serialization import CheckpointError

from conftest import rel_err

PRESETS = ["rtn_dynamic", "static_minmax", "smoothquant", "hadamard_static",
           aq.RecipeOptions(name="weight_only", w_group_size=32)]


@pytest.mark.parametrize("preset", PRESETS)
def test_save_load_is_bit_identical(toy_model, toy_batches, tmp_path, preset):
    x = torch.cat(toy_batches)
    fp = toy_model(x)
    aq.quantize_(toy_model, preset, calib_data=toy_batches, progress=False)
    with torch.no_grad():
        before = toy_model(x)
    assert rel_err(before, fp) < 0.2  # quantized, but still the same function roughly
    aq.save_quantized(toy_model, tmp_path / "ckpt")
    loaded = aq.load_quantized(tmp_path / "ckpt")
    with torch.no_grad():
        after = loaded(x)
    assert torch.equal(after, before)
    cfg = json.loads((tmp_path / "ckpt" / "quantization_config.json").read_text())
    assert cfg["family"] == "toy" and cfg["recipe"]["name"] == getattr(preset, "name", preset)
    assert all(m["type"] == "QuantLinear" for m in cfg["modules"].values())


@pytest.mark.parametrize("preset", ["rtn_dynamic", "hadamard_static"])
def test_a_model_with_column_major_weights_reloads_bit_identically(toy_model, toy_batches, tmp_path, preset):
    """Weights in another layout (a transpose's strides: same values) must not survive into the
    quantized model: a checkpoint reloads row-major, and x @ W takes another kernel for another
    layout (on some CPUs another summation order, so other bits)."""
    with torch.no_grad():
        for m in toy_model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.data = m.weight.data.t().contiguous().t()
    assert any(not p.is_contiguous() for p in toy_model.parameters())
    x = torch.cat(toy_batches)
    aq.quantize_(toy_model, preset, calib_data=toy_batches, progress=False)
    bad = [n for n, t in [*toy_model.named_parameters(), *toy_model.named_buffers()] if not t.is_contiguous()]
    assert not bad, bad
    with torch.no_grad():
        before = toy_model(x)
    aq.save_quantized(toy_model, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(aq.load_quantized(tmp_path / "ckpt")(x), before)


def test_checkpoint_describes_formats_and_transforms(toy_model, toy_batches, tmp_path):
    aq.quantize_(toy_model, "hadamard_static", calib_data=toy_batches, progress=False)
    aq.save_quantized(toy_model, tmp_path / "c")
    mods = json.loads((tmp_path / "c" / "quantization_config.json").read_text())["modules"]
    down = mods["layers.0.down_proj"]
    assert down["input_transform"]["type"] == "hadamard" and down["input_transform"]["size"] == 128
    assert down["weight"]["spec"]["granularity"] == "channel"
    assert down["input_quantizer"]["observer"] == "percentile" and not down["input_quantizer"]["dynamic"]


def test_int4_weights_and_fp_formats_roundtrip(toy_model, toy_batches, tmp_path):
    recipe = aq.Recipe("mixed", [aq.Quantize(weight=aq.QuantSpec(bits=4, granularity="group", group_size=32),
                                             activation=aq.QuantSpec(format="fp8_e4m3", granularity="token"),
                                             dynamic=True)])
    x = torch.cat(toy_batches)
    aq.quantize_(toy_model, recipe, progress=False)
    before = toy_model(x)
    aq.save_quantized(toy_model, tmp_path / "c")
    assert torch.equal(aq.load_quantized(tmp_path / "c")(x), before)


def test_load_errors_are_one_line_checkpoint_errors(toy_model, toy_batches, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        aq.load_quantized(tmp_path / "nope")
    aq.quantize_(toy_model, "rtn_dynamic", progress=False)
    ck = tmp_path / "c"
    aq.save_quantized(toy_model, ck)
    weights = ck / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="corrupt weights file"):
        aq.load_quantized(ck)
    weights.write_bytes(b"\x00" * 8 + b"garbage")
    with pytest.raises(CheckpointError, match="corrupt weights file"):
        aq.load_quantized(ck)
    (ck / "quantization_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        aq.load_quantized(ck)
    (ck / "quantization_config.json").write_text(json.dumps({"quant_method": "archquant", "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        aq.load_quantized(ck)
    (ck / "quantization_config.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        aq.load_quantized(ck)


def test_weights_from_another_model_are_refused(toy_model, tmp_path):
    from archquant.models.toy import ToyConfig, init_toy_model

    aq.quantize_(toy_model, "rtn_dynamic", progress=False)
    aq.save_quantized(toy_model, tmp_path / "a")
    other = init_toy_model(ToyConfig(hidden_size=64, intermediate_size=128, num_layers=3))
    aq.quantize_(other, "rtn_dynamic", progress=False)
    aq.save_quantized(other, tmp_path / "b")
    os.replace(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    with pytest.raises(CheckpointError, match="do not match"):
        aq.load_quantized(tmp_path / "a")


def test_failed_save_leaves_nothing_behind(toy_model, tmp_path, monkeypatch):
    aq.quantize_(toy_model, "rtn_dynamic", progress=False)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(serialization, "save_model", boom)
    with pytest.raises(OSError, match="disk full"):
        aq.save_quantized(toy_model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_saving_replaces_an_older_checkpoint_but_keeps_files_someone_added(toy_model, tmp_path):
    aq.quantize_(toy_model, "rtn_dynamic", progress=False)
    aq.save_quantized(toy_model, tmp_path / "ckpt")
    aq.save_quantized(toy_model, tmp_path / "ckpt")  # archquant's own checkpoint: replaced, nothing left over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    aq.save_quantized(toy_model, tmp_path / "ckpt")
    kept = [p for p in tmp_path.iterdir() if p.name != "ckpt"]
    assert [p.name.startswith("ckpt.kept-") for p in kept] == [True]
    assert sorted(p.name for p in kept[0].iterdir()) == ["notes.txt"]  # only the user's file, visibly kept
    assert (kept[0] / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "ckpt" / "notes.txt").exists()


def test_saving_refuses_a_directory_archquant_did_not_write(toy_model, tmp_path):
    aq.quantize_(toy_model, "rtn_dynamic", progress=False)
    step = tmp_path / "ckpt" / "step_1000"
    step.mkdir(parents=True)
    (step / "optimizer.pt").write_bytes(b"precious")
    with pytest.raises(aq.OutputExistsError, match="ckpt already holds files archquant did not write"):
        aq.save_quantized(toy_model, tmp_path / "ckpt")
    assert (step / "optimizer.pt").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
