"""Checkpoints carry and check their integrity (issue 9).

Every example of the issue, one test each: a damaged or edited checkpoint raises a one-line
``CheckpointError`` naming the file and the tensor, module or field, at load time.

Some tests "reseal" an edited checkpoint: they recompute its checksums, as a buggy or foreign
writer would, so that the checks behind the checksums (buffers against their format, dtypes,
finiteness, keys) are the ones that must refuse it.
"""
import json
import math
import shutil

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import archquant as aq
from archquant.core import formats, serialization
from archquant.core.formats import QuantSpec
from archquant.core.serialization import CONFIG_FILE, WEIGHTS_FILE, CheckpointError

from conftest import perturbed_mamba

pytestmark = pytest.mark.usefixtures("single_thread")

X = torch.randn(16, 32, generator=torch.Generator().manual_seed(5))
CALIB = [torch.randn(64, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]


# ---------------------------------------------------------------------------------- helpers
def reseal(ck) -> None:
    """Recompute the checksums of ``ck`` after an edit, as a (buggy) writer that knows the format would."""
    cfg = json.loads((ck / CONFIG_FILE).read_text())
    cfg["integrity"]["tensors"] = serialization._tensor_table(ck / WEIGHTS_FILE)
    cfg["integrity"]["config_sha256"] = serialization.config_digest(cfg)
    (ck / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))


def edit_config(ck, fn, sealed: bool = False) -> None:
    cfg = json.loads((ck / CONFIG_FILE).read_text())
    fn(cfg)
    (ck / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    if sealed:
        reseal(ck)


def edit_tensors(ck, fn, sealed: bool = True) -> None:
    tensors = load_file(str(ck / WEIGHTS_FILE))
    fn(tensors)
    save_file(tensors, str(ck / WEIGHTS_FILE), metadata={"format": "pt"})
    if sealed:
        reseal(ck)


def refused(ck, *fragments) -> str:
    with pytest.raises(CheckpointError) as ei:
        aq.load_quantized(ck)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name → (pristine checkpoint directory, outputs of the quantized model on X)."""
    from archquant.models.toy import ToyConfig, init_toy_model

    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, recipe in [("dynamic", "rtn_dynamic"), ("static", "static_minmax"),
                         ("w4", aq.RecipeOptions(name="weight_only", w_group_size=32)),
                         ("asym4", aq.RecipeOptions(name="weight_only", w_group_size=32, w_symmetric=False)),
                         ("mxfp4", aq.RecipeOptions(name="rtn_dynamic", w_format="mxfp4")),
                         ("nvfp4", aq.RecipeOptions(name="rtn_dynamic", w_format="nvfp4"))]:
        model = init_toy_model(ToyConfig(hidden_size=64, intermediate_size=128, num_layers=2, seed=0))
        aq.quantize_(model, recipe, calib_data=CALIB, progress=False)
        aq.save_quantized(model, root / name)
        with torch.no_grad():
            out[name] = (root / name, model(X))
    return out


@pytest.fixture
def ckpt(saved, tmp_path):
    """A fresh copy of one of the saved checkpoints: ``ckpt("static")``."""
    count = iter(range(1000))

    def copy(name: str = "dynamic"):
        dst = tmp_path / f"{name}-{next(count)}"
        shutil.copytree(saved[name][0], dst)
        return dst
    return copy


# ---------------------------------------------------------------------------------- the config
@pytest.mark.parametrize("name", ["dynamic", "static", "w4", "asym4", "mxfp4", "nvfp4"])
def test_pristine_checkpoints_load_bit_identical(saved, name):
    directory, expected = saved[name]
    with torch.no_grad():
        assert torch.equal(aq.load_quantized(directory)(X), expected)


def test_config_records_checksums_of_every_tensor(saved):
    directory, _ = saved["static"]
    cfg = json.loads((directory / CONFIG_FILE).read_text())
    assert cfg["format_version"] == 2
    integrity = cfg["integrity"]
    assert set(integrity) == {"algorithm", "tensors", "config_sha256"} and integrity["algorithm"] == "sha256"
    assert set(integrity["tensors"]) == set(load_file(str(directory / WEIGHTS_FILE)))
    entry = integrity["tensors"]["layers.0.up_proj.weight_codes"]
    assert entry["dtype"] == "I8" and entry["shape"] == [128, 64] and len(entry["sha256"]) == 64
    assert integrity["config_sha256"] == serialization.config_digest(cfg)


def test_edited_activation_bits_are_refused(ckpt):
    ck = ckpt("static")
    edit_config(ck, lambda c: c["modules"]["layers.0.up_proj"]["input_quantizer"]["spec"].update(bits=4))
    refused(ck, str(ck / CONFIG_FILE), "edited or corrupted")


@pytest.mark.parametrize("field,value", [("granularity", "tensor"), ("symmetric", False), ("axis", 1)])
def test_edited_weight_format_is_refused(ckpt, field, value):
    ck = ckpt("static")
    edit_config(ck, lambda c: c["modules"]["layers.1.down_proj"]["weight"]["spec"].update({field: value}))
    refused(ck, "edited or corrupted")


def test_recipe_and_metadata_are_not_covered_and_may_be_edited(ckpt, saved):
    ck = ckpt("static")
    edit_config(ck, lambda c: (c["recipe"].update(name="renamed"), c["metadata"].update(note="mine")))
    model = aq.load_quantized(ck)
    assert model._archquant_recipe["name"] == "renamed"
    with torch.no_grad():
        assert torch.equal(model(X), saved["static"][1])


def test_format_version_1_is_refused_with_a_clear_message(ckpt):
    ck = ckpt()
    edit_config(ck, lambda c: (c.update(format_version=1), c.pop("integrity")))
    refused(ck, "format_version 1", "no checksums", "save it")
    for bad in (True, "2", 2.0, 3):
        edit_config(ck, lambda c: c.update(format_version=bad))
        refused(ck, f"format_version {bad!r} not supported")


@pytest.mark.parametrize("field,value,needle", [
    ("family", "nope", "unknown family 'nope'"),
    ("family", 3, "must be a family name"),
    ("family", ["toy"], "must be a family name"),
    ("model_config", [1, 2], "must be a JSON object"),
    ("model_config", {"hidden_size": "wide"}, "does not describe a toy model"),
    ("model_config", {"colour": "red"}, "does not describe a toy model"),
    ("model_config", {"hidden_size": -4}, "does not describe a toy model"),
    ("dtype", "int8", "allowed 'float32'"),
    ("dtype", "Module", "allowed 'float32'"),
    ("dtype", None, "allowed 'float32'"),
])
def test_bad_family_model_config_or_dtype_is_a_checkpoint_error(ckpt, field, value, needle):
    ck = ckpt()
    edit_config(ck, lambda c: c.update({field: value}), sealed=True)  # even with matching checksums
    msg = refused(ck, str(ck / CONFIG_FILE), needle)
    assert repr(field) in msg


def test_missing_config_fields_and_malformed_integrity(ckpt):
    ck = ckpt()
    edit_config(ck, lambda c: c.pop("dtype"))
    refused(ck, "no 'dtype' entry")
    ck = ckpt()
    edit_config(ck, lambda c: c["integrity"].update(algorithm="md5"))
    refused(ck, "field 'integrity'", "md5")
    ck = ckpt()
    edit_config(ck, lambda c: c["integrity"]["tensors"]["head.bias"].update(sha256="0" * 10))
    refused(ck, "malformed entry for tensor 'head.bias'")


def test_a_module_in_a_slot_the_model_lacks_is_refused(ckpt):
    ck = ckpt()

    def move(c):
        c["modules"]["norm_f.weight"] = c["modules"].pop("layers.0.up_proj")
    edit_config(ck, move, sealed=True)
    refused(ck, "cannot rebuild module 'norm_f.weight'", "tensor of the model")
    ck = ckpt()
    edit_config(ck, lambda c: c["modules"].update({"layers.9.up_proj": c["modules"]["layers.0.up_proj"]}),
                sealed=True)
    refused(ck, "cannot rebuild module 'layers.9.up_proj'")


def test_unknown_packing_is_refused(ckpt):
    ck = ckpt("w4")
    edit_config(ck, lambda c: c["modules"]["layers.0.up_proj"]["weight"].update(packing="int2x4"), sealed=True)
    refused(ck, "cannot rebuild module 'layers.0.up_proj'", "packing 'int2x4'")
    ck = ckpt("dynamic")  # int8 codes declared packed
    edit_config(ck, lambda c: c["modules"]["layers.0.up_proj"]["weight"].update(packing="int4x2"), sealed=True)
    refused(ck, "module 'layers.0.up_proj'", "layers.0.up_proj.weight_codes", "int4x2")


# ---------------------------------------------------------------------------------- the weights file
def test_flipped_data_byte_is_refused_naming_the_tensor(ckpt):
    ck = ckpt()
    f = ck / WEIGHTS_FILE
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    begin, _ = header["layers.1.up_proj.weight_codes"]["data_offsets"]
    data[8 + n + begin + 3] ^= 0x10
    f.write_bytes(bytes(data))
    refused(ck, f"checkpoint {ck}: tensor 'layers.1.up_proj.weight_codes' does not match its checksum")


def _header(ck):
    data = (ck / WEIGHTS_FILE).read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write(ck, header: dict | bytes, body: bytes, length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    (ck / WEIGHTS_FILE).write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + body)


@pytest.mark.parametrize("how,needle", [
    ("empty", "too short"),
    ("truncated-length", "too short"),
    ("huge-length", "exceeds the file"),
    ("truncated-header", "exceeds the file"),
    ("truncated-data", "outside the file"),
    ("garbage-header", "not valid JSON"),
    ("not-utf8", "not valid JSON"),
    ("not-an-object", "not a JSON object"),
    ("duplicate-name", "duplicate key"),
    ("unknown-dtype", "unknown dtype 'F7'"),
    ("bad-shape", "malformed shape"),
    ("offsets-out-of-range", "outside the file"),
    ("overlap", "overlaps"),
    ("gap", "leaves a gap"),
    ("size-mismatch", "bytes of data"),
    ("extra-bytes", "bytes after the last tensor"),
    ("bad-metadata", "__metadata__"),
])
def test_malformed_safetensors_files_are_checkpoint_errors(ckpt, how, needle):
    ck = ckpt()
    header, body = _header(ck)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    first, second = names[0], names[1]
    raw = json.dumps(header).encode()
    if how == "empty":
        (ck / WEIGHTS_FILE).write_bytes(b"")
    elif how == "truncated-length":
        (ck / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00")
    elif how == "huge-length":
        _write(ck, header, body, length=2**63)
    elif how == "truncated-header":
        (ck / WEIGHTS_FILE).write_bytes(len(raw).to_bytes(8, "little") + raw[:50])
    elif how == "truncated-data":
        _write(ck, header, body[:-7])
    elif how == "garbage-header":
        _write(ck, b"{\"a\": [1, 2" + b" " * 20, body)
    elif how == "not-utf8":
        _write(ck, b"\xff\xfe" + raw[2:], body)
    elif how == "not-an-object":
        _write(ck, b"[1, 2, 3]", b"")
    elif how == "duplicate-name":
        entry = json.dumps(header[first])
        _write(ck, raw[:-1] + f', "{first}": {entry}}}'.encode(), body)
    elif how == "unknown-dtype":
        header[first]["dtype"] = "F7"
        _write(ck, header, body)
    elif how == "bad-shape":
        header[first]["shape"] = [2, -1]
        _write(ck, header, body)
    elif how == "offsets-out-of-range":
        header[first]["data_offsets"] = [0, 10**15]
        _write(ck, header, body)
    elif how == "overlap":
        b, e = header[second]["data_offsets"]
        header[second]["data_offsets"] = [b - 4, e - 4]
        _write(ck, header, body)
    elif how == "gap":
        header[first]["data_offsets"] = [4, header[first]["data_offsets"][1] + 4]
        _write(ck, header, body + b"\x00" * 4)
    elif how == "size-mismatch":
        header[first]["shape"] = header[first]["shape"] + [2]
        _write(ck, header, body)
    elif how == "extra-bytes":
        _write(ck, header, body + b"\x00" * 16)
    elif how == "bad-metadata":
        header["__metadata__"] = {"format": 3}
        _write(ck, header, body)
    refused(ck, f"corrupt weights file {ck / WEIGHTS_FILE}", needle)


def test_weights_holding_other_tensors_than_the_table_are_refused(ckpt):
    ck = ckpt()
    edit_tensors(ck, lambda t: t.update(extra=torch.zeros(3)), sealed=False)
    refused(ck, "do not match quantization_config.json", "'extra'")
    ck = ckpt()
    edit_tensors(ck, lambda t: t.update({"head.bias": t["head.bias"].double()}), sealed=False)
    refused(ck, "do not match quantization_config.json", "'head.bias' is F64")


# ---------------------------------------------------------------------------------- quantized buffers
def test_codes_in_the_wrong_dtype_are_refused(ckpt):
    key = "layers.0.up_proj.weight_codes"
    for dtype in (torch.int32, torch.int16, torch.uint8, torch.float32):
        ck = ckpt()
        edit_tensors(ck, lambda t: t.update({key: t[key].to(dtype)}))
        refused(ck, "module 'layers.0.up_proj'", f"tensor '{key}' is {str(dtype)[6:]}", "stores int8")


@pytest.mark.parametrize("name,value,needle", [("dynamic", float("nan"), "NaN"), ("dynamic", 0.0, "scale <= 0"),
                                              ("dynamic", -1.0, "scale <= 0"), ("dynamic", float("inf"), "Inf"),
                                              ("mxfp4", 0.3, "power of two")])
def test_bad_weight_scales_are_refused(ckpt, name, value, needle):
    ck = ckpt(name)
    key = "layers.1.down_proj.weight_params.scale"

    def poke(t):
        t[key] = t[key].clone()
        t[key].view(-1)[3] = value
    edit_tensors(ck, poke)
    refused(ck, "module 'layers.1.down_proj'", f"tensor '{key}'", needle)


@pytest.mark.parametrize("value,needle", [(float("nan"), "NaN"), (0.0, "scale <= 0")])
def test_bad_activation_scales_are_refused(ckpt, value, needle):
    ck = ckpt("static")
    key = "layers.0.down_proj.input_quantizer.params.scale"
    edit_tensors(ck, lambda t: t.update({key: torch.tensor(value)}))
    refused(ck, f"tensor '{key}'", needle)


def test_missing_activation_scale_fails_at_load_not_at_forward(ckpt):
    ck = ckpt("static")
    key = "layers.0.up_proj.input_quantizer.params.scale"
    edit_tensors(ck, lambda t: t.pop(key))
    refused(ck, "module 'layers.0.up_proj'", f"tensor '{key}' is missing")


def test_unexpected_parameter_buffers_are_refused(ckpt):
    ck = ckpt("dynamic")  # a dynamic quantizer has no parameters
    key = "layers.0.up_proj.input_quantizer.params.scale"
    edit_tensors(ck, lambda t: t.update({key: torch.tensor(0.5)}))
    refused(ck, f"tensor '{key}' is not expected", "dynamic")
    ck = ckpt("dynamic")  # symmetric int has no zero point
    key = "layers.0.up_proj.weight_params.zero_point"
    edit_tensors(ck, lambda t: t.update({key: torch.zeros(128, 1)}))
    refused(ck, f"tensor '{key}' is not expected")


def test_wrong_code_shape_is_refused(ckpt):
    ck = ckpt()
    key = "layers.0.up_proj.weight_codes"
    edit_tensors(ck, lambda t: t.update({key: t[key].reshape(64, 128).contiguous()}))
    refused(ck, f"tensor '{key}' has shape (64, 128), expected (128, 64)")
    ck = ckpt("w4")  # packed codes
    edit_tensors(ck, lambda t: t.update({key: t[key][:, :16].contiguous()}))
    refused(ck, f"tensor '{key}'", "int4x2")


def test_codes_out_of_range_are_refused(ckpt):
    ck = ckpt()
    key = "layers.0.up_proj.weight_codes"

    def poke(t):
        t[key] = t[key].clone()
        t[key][0, 0] = -128  # symmetric int8 is [-127, 127]
    edit_tensors(ck, poke)
    refused(ck, f"tensor '{key}' holds -128", "[-127, 127]")
    ck = ckpt("w4")  # signed nibble 0 is code -8, outside [-7, 7]

    def poke4(t):
        t[key] = t[key].clone()
        t[key][0, 0] = 0x80
    edit_tensors(ck, poke4)
    refused(ck, f"tensor '{key}' holds -8", "[-7, 7]")
    ck = ckpt("nvfp4")

    def poke_fp4(t):
        t[key] = t[key].clone()
        t[key][1, 2] = 16
    edit_tensors(ck, poke_fp4)
    refused(ck, f"tensor '{key}' holds 16", "[0, 15]")


def test_zero_points_are_checked(ckpt):
    key = "layers.0.up_proj.weight_params.zero_point"
    for value, needle in ((16.0, "outside"), (2.5, "non-integer"), (float("nan"), "NaN")):
        ck = ckpt("asym4")

        def poke(t):
            t[key] = t[key].clone()
            t[key].view(-1)[0] = value
        edit_tensors(ck, poke)
        refused(ck, f"tensor '{key}'", needle)


def test_nvfp4_scales_are_checked(ckpt):
    ck = ckpt("nvfp4")
    key = "layers.0.up_proj.weight_params.global_scale"
    edit_tensors(ck, lambda t: t.update({key: torch.tensor(0.0)}))
    refused(ck, f"tensor '{key}'", "scale <= 0")
    ck = ckpt("nvfp4")
    key = "layers.0.up_proj.weight_params.scale"
    edit_tensors(ck, lambda t: t.update({key: t[key].float()}))
    refused(ck, f"tensor '{key}' is float32", "float8_e4m3fn")


# ---------------------------------------------------------------------------------- plain tensors and keys
def test_int32_weight_is_not_cast_silently(ckpt):
    ck = ckpt()
    edit_tensors(ck, lambda t: t.update({"embed.weight": t["embed.weight"].round().to(torch.int32)}))
    refused(ck, "tensor 'embed.weight' is stored as int32", "float32")
    ck = ckpt()  # a float64 weight for a float32 model is not cast either
    edit_tensors(ck, lambda t: t.update({"layers.0.up_proj.bias": t["layers.0.up_proj.bias"].double()}))
    refused(ck, "tensor 'layers.0.up_proj.bias' is stored as float64")


@pytest.mark.parametrize("key", ["embed.weight", "layers.1.norm.weight", "layers.0.up_proj.bias"])
def test_nan_or_inf_weights_are_refused_with_their_name(ckpt, key):
    for value in (float("nan"), float("-inf")):
        ck = ckpt()

        def poke(t):
            t[key] = t[key].clone()
            t[key].view(-1)[0] = value
        edit_tensors(ck, poke)
        refused(ck, f"tensor '{key}' holds NaN or Inf")


def test_wrong_plain_shape_is_refused(ckpt):
    ck = ckpt()
    edit_tensors(ck, lambda t: t.update({"head.bias": torch.zeros(11)}))
    refused(ck, "tensor 'head.bias' has shape (11,)", "(10,)")


def test_strict_load_errors_name_the_missing_and_unexpected_keys(ckpt):
    ck = ckpt()

    def edit(t):
        del t["layers.1.norm.weight"]
        t["layers.7.norm.weight"] = torch.ones(64)
        for i in range(4):
            t[f"extra.{i}"] = torch.zeros(1)
    edit_tensors(ck, edit)
    msg = refused(ck, "do not match the model", "1 missing key ('layers.1.norm.weight')",
                  "5 unexpected keys ('extra.0', 'extra.1', 'extra.2', ...)")
    assert "Error(s) in loading state_dict" not in msg


def test_tied_weights_stored_twice_are_refused(tmp_path):
    model = perturbed_mamba("mamba1", num_layers=1)
    aq.quantize_(model, "rtn_dynamic", family="mamba", progress=False)
    aq.save_quantized(model, tmp_path / "c")
    edit_tensors(tmp_path / "c", lambda t: t.update({"lm_head.weight": t["backbone.embeddings.weight"].clone()}))
    refused(tmp_path / "c", "1 unexpected key ('lm_head.weight')")


def test_bfloat16_model_reloads_bit_identical_in_bfloat16(tmp_path):
    from archquant.models.toy import ToyConfig, init_toy_model

    model = init_toy_model(ToyConfig(hidden_size=64, intermediate_size=128, num_layers=2)).to(torch.bfloat16)
    aq.quantize_(model, "rtn_dynamic", progress=False)
    aq.save_quantized(model, tmp_path / "c")
    loaded = aq.load_quantized(tmp_path / "c")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    x = X.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ---------------------------------------------------------------------------------- saving
def test_full_disk_during_save_is_a_one_line_os_error(toy_model, tmp_path, monkeypatch):
    aq.quantize_(toy_model, "rtn_dynamic", progress=False)

    def full(model, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) '
                              f'at path "{filename}"')

    monkeypatch.setattr(serialization, "save_model", full)
    with pytest.raises(OSError) as ei:
        aq.save_quantized(toy_model, tmp_path / "ckpt")
    assert not isinstance(ei.value, SafetensorError) and ei.value.errno == 28
    msg = str(ei.value)
    assert "\n" not in msg and str(tmp_path / "ckpt" / WEIGHTS_FILE) in msg and "No space left on device" in msg
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("spec", [QuantSpec(granularity="tensor"), QuantSpec(granularity="channel", axis=0),
                                  QuantSpec(granularity="channel", axis=-1), QuantSpec(granularity="token"),
                                  QuantSpec(granularity="group", group_size=8),
                                  QuantSpec(bits=4, symmetric=False, granularity="group", group_size=8),
                                  QuantSpec(format="fp8_e4m3", granularity="channel"),
                                  QuantSpec(format="fp8_e5m2"), QuantSpec.mxfp4(), QuantSpec.nvfp4()])
@pytest.mark.parametrize("shape", [(6, 32), (2, 6, 32), (32,)])
def test_check_stored_accepts_what_the_format_produces(spec, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    params = formats.params_from_tensor(x, spec)
    for p in params.values():
        assert tuple(p.shape) in (formats.range_shape(spec, shape), ())
    formats.check_stored(spec, params, formats.quantize(x, spec, params), shape)
    if spec.granularity in ("tensor", "channel") and spec.axis == -1 or spec.granularity == "tensor":
        formats.check_stored(spec, params)  # as a static activation quantizer's parameters


def test_check_stored_names_the_tensor():
    spec = QuantSpec()
    params = {"scale": torch.tensor(0.0)}
    with pytest.raises(ValueError, match="tensor 'w.weight_params.scale' holds a scale <= 0"):
        formats.check_stored(spec, params, torch.zeros(2, 2, dtype=torch.int8), (2, 2),
                             codes_name="w.weight_codes", params_prefix="w.weight_params.")
    with pytest.raises(ValueError, match=r"tensor 'codes' has shape \(2, 3\), expected \(2, 2\)"):
        formats.check_stored(spec, {"scale": torch.tensor(1.0)}, torch.zeros(2, 3, dtype=torch.int8), (2, 2))
    assert math.isclose(float(formats.params_from_tensor(torch.ones(4), spec)["scale"]), 1 / 127, rel_tol=1e-6)


# ---------------------------------------------------------------------------------- the Mamba loader
@pytest.fixture
def hf_dir(tmp_path):
    from archquant.models.mamba_loading import save_mamba_hf

    model = perturbed_mamba("mamba1", num_layers=1)
    return model, save_mamba_hf(model, tmp_path / "hf")


def _mamba_error(directory, *fragments):
    from archquant.models.mamba_loading import MambaLoadError, load_mamba

    with pytest.raises(MambaLoadError) as ei:
        load_mamba(str(directory))
    msg = str(ei.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


class Payload:  # pickled by reference: torch's weights-only unpickler refuses it
    pass


@pytest.mark.parametrize("payload", ["object", "garbage"])
def test_mamba_pickle_errors_do_not_advise_running_untrusted_code(hf_dir, payload):
    model, d = hf_dir
    (d / "model.safetensors").unlink()
    f = d / "pytorch_model.bin"
    if payload == "object":
        torch.save({"backbone.embeddings.weight": Payload()}, f)
    else:
        f.write_bytes(b"not a zip or pickle")
    msg = _mamba_error(d, str(f), "cannot be read safely", "weights-only")
    assert "weights_only" not in msg and "likely succeed" not in msg and "trust" not in msg
    if payload == "object":
        assert "Payload" in msg


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_mamba_loader_refuses_integer_tensors_for_float_parameters(hf_dir, dtype):
    model, d = hf_dir
    state = load_file(str(d / "model.safetensors"))
    state["backbone.layers.0.mixer.D"] = state["backbone.layers.0.mixer.D"].round().to(dtype)
    save_file(state, str(d / "model.safetensors"))
    _mamba_error(d, "backbone.layers.0.mixer.D", f"stored as {str(dtype)[6:]}", "floating-point")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_mamba_loader_refuses_nan_or_inf_weights_by_name(hf_dir, value):
    model, d = hf_dir
    state = load_file(str(d / "model.safetensors"))
    state["backbone.layers.0.mixer.A_log"][1, 2] = value
    save_file(state, str(d / "model.safetensors"))
    _mamba_error(d, "backbone.layers.0.mixer.A_log", "NaN or Inf")


def test_mamba_loader_still_casts_float16_checkpoints(hf_dir):
    from archquant.models.mamba_loading import load_mamba

    model, d = hf_dir
    state = load_file(str(d / "model.safetensors"))
    save_file({k: v.half() for k, v in state.items()}, str(d / "model.safetensors"))
    loaded = load_mamba(str(d))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
