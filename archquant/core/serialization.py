"""Quantized checkpoints: safetensors weights plus a JSON quantization config.

Layout of a checkpoint directory::

    model.safetensors           every tensor of the quantized model (codes, scales, FP params)
    quantization_config.json    family + model config (to rebuild the FP skeleton), the recipe,
                                and per quantized module: type, weight/activation formats,
                                granularities, observers and online transforms; plus the
                                checksums of all of it (``integrity``)

The JSON is in the spirit of compressed-tensors' ``quantization_config``: it alone says how
to rebuild every module, without the recipe's code. Nothing is ever unpickled.

Integrity (``format_version`` 2)::

    "integrity": {
      "algorithm": "sha256",
      "tensors": {"<name>": {"dtype": "I8", "shape": [128, 64], "sha256": "<hex>"}, ...},
      "config_sha256": "<hex>"
    }

``tensors`` lists every tensor of ``model.safetensors`` with the sha256 of its bytes.
``config_sha256`` is the sha256 of the canonical JSON (sorted keys, no spaces, ASCII) of every
field that determines what the model computes: ``format_version``, ``family``, ``model_config``,
``dtype``, ``modules`` and ``integrity.tensors``. Not covered, because they do not change the
outputs: ``quant_method`` (checked by value), ``recipe`` (a description of how the model was
made, kept for re-saving) and ``metadata`` (free-form notes); those may be edited.
Version 1 checkpoints (no checksums) are refused: re-quantize and save them again.

Loading (``read_checkpoint_config``, ``read_checkpoint_tensors``, ``restore_quantized``) stops
at the first problem with a one-line ``CheckpointError`` naming the file and the field, tensor
or module, before anything is built from a damaged part:

1. the config: JSON, version, field types, then ``config_sha256`` (an edited bit-width,
   granularity, symmetric flag… is "edited or corrupted");
2. the weights file, parsed here rather than trusted: header length within the file, JSON
   header without duplicate names, known dtypes, data offsets that tile the data exactly (no
   gaps, overlaps or bytes out of range), then the same tensors as ``integrity.tensors`` with
   the same dtype and shape, then every tensor's sha256;
3. the model: the family is known and ``model_config`` builds; every module rebuilds in a slot
   of the skeleton; the file holds exactly the model's tensors (missing and unexpected keys
   named); every tensor that is not a quantized module's codes/parameters has the model's
   dtype (never cast silently) and shape and is finite; every quantized module's buffers fit
   its declared format (``check_loaded`` in ``core.modules``: dtype, shape, finite positive
   scales, zero points and codes in range).

Writes go through ``core.safe_io.StagedDir``: a hidden staging directory next to the target is
renamed into place only when complete (a crash never leaves a checkpoint that looks whole), and
only a directory archquant wrote is ever replaced.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import save_model
from torch import nn

from .modules import _ParamBuffers, _QuantWeightMixin, check_replaces, module_from_config
from .safe_io import StagedDir, write_json_atomic
from .recipe import quantized_modules, set_submodule

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "quantization_config.json"
FORMAT_VERSION = 2

#: model dtypes a checkpoint may name (``dtype``)
MODEL_DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64")}
#: safetensors dtype names this reader accepts
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
             "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_HASHED_FIELDS = ("format_version", "family", "model_config", "dtype", "modules")
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
_HEX64 = re.compile(r"[0-9a-f]{64}")
_BUILD_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, RuntimeError)


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or corrupt."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, KeyError):
        text = f"no field {text}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines) if lines else type(e).__name__


# ---------------------------------------------------------------------------------- hashing
def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode()


def config_digest(qconfig: dict) -> str:
    """sha256 of the fields of ``qconfig`` that determine the model's outputs (see module doc)."""
    covered = {key: qconfig.get(key) for key in _HASHED_FIELDS}
    if "dtype_overrides" in qconfig:  # only models of mixed dtypes have it (older checkpoints hash as before)
        covered["dtype_overrides"] = qconfig["dtype_overrides"]
    covered["tensors"] = qconfig["integrity"]["tensors"]
    return hashlib.sha256(_canonical(covered)).hexdigest()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


# ---------------------------------------------------------------------------------- safetensors
@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _is_count(x: Any) -> bool:
    return type(x) is int and x >= 0


def _read_header(f: BinaryIO, path: Path) -> tuple[list[_Entry], int]:
    """The tensors of a safetensors file (sorted by offset) and where their data starts.

    Everything is checked against the file's size before anything is allocated: a truncated
    file, a header length beyond the file, garbage instead of JSON, unknown dtypes, offsets
    that leave gaps, overlap or point past the end all raise a ``CheckpointError``."""
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"corrupt weights file {path}: {why}")

    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        raise corrupt(f"{size} bytes, too short for a safetensors header")
    n = int.from_bytes(head, "little")
    if n > size - 8:
        raise corrupt(f"header length {n} exceeds the file's {size} bytes (truncated?)")
    if n > _MAX_HEADER:
        raise corrupt(f"header length {n} exceeds the limit of {_MAX_HEADER} bytes")
    raw = f.read(n)
    if len(raw) != n:
        raise corrupt("truncated header")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise corrupt(f"header is not valid JSON ({_one_line(e)})") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data_len = size - 8 - n
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            if not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise corrupt("__metadata__ is not a map of strings")
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise corrupt(f"tensor {name!r} has a malformed header entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ST_DTYPES:
            raise corrupt(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise corrupt(f"tensor {name!r} has a malformed shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1] <= data_len):
            raise corrupt(f"tensor {name!r} has data offsets {offsets!r} outside the file's {data_len} data bytes")
        nbytes = math.prod(shape) * ST_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise corrupt(f"tensor {name!r} has {offsets[1] - offsets[0]} bytes of data, "
                          f"its shape {tuple(shape)} of {dtype} needs {nbytes}")
        entries.append(_Entry(name, dtype, tuple(shape), offsets[0], offsets[1]))
    entries.sort(key=lambda e: (e.begin, e.end))
    pos = 0
    for e in entries:
        if e.begin != pos:
            raise corrupt(f"tensor {e.name!r} data at bytes {e.begin}..{e.end} "
                          f"{'overlaps the previous tensor' if e.begin < pos else 'leaves a gap before it'}")
        pos = e.end
    if pos != data_len:
        raise corrupt(f"{data_len - pos} bytes after the last tensor's data")
    return entries, 8 + n


def _tensor_table(path: Path) -> dict[str, dict]:
    """``integrity.tensors`` of a safetensors file just written: dtype, shape, sha256 per tensor."""
    table = {}
    with open(path, "rb") as f:
        entries, start = _read_header(f, path)
        for e in entries:
            f.seek(start + e.begin)
            digest, left = hashlib.sha256(), e.end - e.begin
            while left:
                chunk = f.read(min(left, 1 << 24))
                if not chunk:
                    raise OSError(f"{path} changed while it was hashed")
                digest.update(chunk)
                left -= len(chunk)
            table[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "sha256": digest.hexdigest()}
    return dict(sorted(table.items()))


def _tensor_from(buf: bytearray, e: _Entry, path: Path) -> torch.Tensor:
    dtype = ST_DTYPES[e.dtype]
    if not buf:
        return torch.empty(e.shape, dtype=dtype)
    t = torch.frombuffer(buf, dtype=dtype).reshape(e.shape)
    if dtype is torch.bool and int(t.view(torch.uint8).max()) > 1:
        raise CheckpointError(f"corrupt weights file {path}: tensor {e.name!r} holds bytes that are not booleans")
    return t


def read_checkpoint_tensors(directory: str | os.PathLike, qconfig: dict) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors``, each checked against ``qconfig``'s checksum table.

    ``qconfig`` must come from ``read_checkpoint_config`` (which checked the table's own
    checksum). A file that is malformed, holds other tensors than the table, or whose bytes
    do not hash to the table's sha256 raises a one-line ``CheckpointError``."""
    directory = Path(directory)
    path = directory / WEIGHTS_FILE
    table = qconfig["integrity"]["tensors"]
    tensors: dict[str, torch.Tensor] = {}
    try:
        with open(path, "rb") as f:
            entries, start = _read_header(f, path)
            names = {e.name for e in entries}
            extra, absent = sorted(names - set(table)), sorted(set(table) - names)
            if extra or absent:
                raise CheckpointError(f"weights in {path} do not match {CONFIG_FILE}: "
                                      + _key_summary(("{n} {noun} not in its tensor table", extra),
                                                     ("{n} {noun} of its tensor table missing", absent),
                                                     noun="tensor"))
            for e in entries:
                want = table[e.name]
                if want["dtype"] != e.dtype or tuple(want["shape"]) != e.shape:
                    raise CheckpointError(f"weights in {path} do not match {CONFIG_FILE}: tensor {e.name!r} is "
                                          f"{e.dtype} {e.shape} in the file, {want['dtype']} "
                                          f"{tuple(want['shape'])} in its tensor table")
            for e in entries:
                f.seek(start + e.begin)
                buf = bytearray(e.end - e.begin)
                if f.readinto(buf) != len(buf):
                    raise CheckpointError(f"corrupt weights file {path}: tensor {e.name!r} is truncated")
                if hashlib.sha256(buf).hexdigest() != table[e.name]["sha256"]:
                    raise CheckpointError(f"checkpoint {directory}: tensor {e.name!r} does not match its "
                                          "checksum (file corrupted?)")
                tensors[e.name] = _tensor_from(buf, e, path)
    except OSError as e:
        raise CheckpointError(f"cannot read weights file {path}: {e.strerror or e}") from None
    return tensors


def _key_summary(*groups: tuple[str, list[str]], noun: str = "key", shown: int = 3) -> str:
    """``1 missing key ('a'); 5 unexpected keys ('c', 'd', 'e', ...)``: one part per non-empty group,
    each a template with ``{n}`` and ``{noun}`` and its keys."""
    parts = []
    for template, keys in groups:
        if keys:
            keys = sorted(keys)
            names = ", ".join(repr(k) for k in keys[:shown]) + (", ..." if len(keys) > shown else "")
            parts.append(template.format(n=len(keys), noun=noun + ("s" if len(keys) != 1 else "")) + f" ({names})")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------- save
def is_legacy_checkpoint(directory: Path) -> bool:
    """A checkpoint written before archquant marked its directories: only our two files, ours."""
    try:
        entries = set(os.listdir(directory))
        if not entries or not entries <= {WEIGHTS_FILE, CONFIG_FILE} or CONFIG_FILE not in entries:
            return False
        return json.loads((Path(directory) / CONFIG_FILE).read_text()).get("quant_method") == "archquant"
    except (OSError, ValueError, AttributeError):
        return False


def save_checkpoint(model: nn.Module, directory: str | os.PathLike, *, family: str, model_config: dict,
                    recipe: dict | None = None, metadata: dict | None = None) -> Path:
    """Save a quantized (frozen) model so that ``load_quantized`` rebuilds it bit-identically.

    A failed write (a full disk…) raises a one-line ``OSError`` naming the file and leaves
    nothing behind."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    modules = quantized_modules(model)
    unfrozen = [n for n, m in modules.items() if getattr(m, "frozen", True) is False and m.weight_spec is not None]
    if unfrozen:
        raise ValueError(f"module {unfrozen[0]!r} is not frozen: run calibration/freeze before saving")
    dtype, overrides = _model_dtypes(model, tuple(modules))
    qconfig = {
        "quant_method": "archquant",
        "format_version": FORMAT_VERSION,
        "family": family,
        "model_config": model_config,
        "dtype": dtype,
        **({"dtype_overrides": overrides} if overrides else {}),
        "recipe": recipe,
        "modules": {name: m.to_config() for name, m in modules.items()},
        "metadata": metadata or {},
    }
    qconfig = json.loads(json.dumps(qconfig, default=str))  # exactly what the file will hold, for hashing
    with StagedDir(directory, legacy=is_legacy_checkpoint, what="checkpoint directory") as stage:
        _save_weights(model, stage.path / WEIGHTS_FILE, directory / WEIGHTS_FILE)
        qconfig["integrity"] = {"algorithm": "sha256", "tensors": _tensor_table(stage.path / WEIGHTS_FILE)}
        qconfig["integrity"]["config_sha256"] = config_digest(qconfig)
        write_json_atomic(stage.path / CONFIG_FILE, qconfig)
        stage.publish()
    return directory


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _float_tensors(model: nn.Module, skip: tuple[str, ...] = ()):
    """(name, tensor) of every floating parameter and buffer outside the modules named in ``skip``."""
    items = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if b is not None]
    prefixes = tuple(f"{m}." for m in skip)
    return [(n, t) for n, t in items if t.is_floating_point() and not n.startswith(prefixes)]


def _model_dtypes(model: nn.Module, quantized: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """The model's dtype (the one most parameter elements have) and the tensors outside its quantized
    modules that are in another one: a model loaded in 16 bits may keep some modules in fp32
    (diffusers' ``_keep_in_fp32_modules``, e.g. Wan's norms, time embedder and rotary tables), and a
    reload must rebuild exactly that. (Quantized modules rebuild their own tensors from their config.)"""
    counts: dict[torch.dtype, int] = {}
    for _, p in model.named_parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if not counts:
        return "float32", {}
    main = max(counts, key=counts.get)
    return _name(main), {n: _name(t.dtype) for n, t in _float_tensors(model, quantized) if t.dtype != main}


def _cast_skeleton(skeleton: nn.Module, dtype: torch.dtype, overrides: dict, directory: Path) -> None:
    """Cast the FP skeleton's floating tensors to the saved model's dtype, except those the
    checkpoint says were kept in another (``dtype_overrides``), which take that dtype straight from
    the skeleton's own values (a table computed in fp32 stays exact)."""
    if not isinstance(overrides, dict) or not all(isinstance(v, str) for v in overrides.values()):
        raise CheckpointError(f"{directory / CONFIG_FILE}: field 'dtype_overrides' must map tensor names to dtypes")
    bad = [(n, d) for n, d in overrides.items() if d not in MODEL_DTYPES]
    if bad:
        raise CheckpointError(f"{directory / CONFIG_FILE}: field 'dtype_overrides': {bad[0][0]!r} has dtype "
                              f"{bad[0][1]!r}: allowed {', '.join(map(repr, MODEL_DTYPES))}")
    tensors = dict(_float_tensors(skeleton))
    unknown = [n for n in overrides if n not in tensors]
    if unknown:
        raise CheckpointError(f"{directory / CONFIG_FILE}: field 'dtype_overrides' names {unknown[0]!r}, which is "
                              "not a tensor of the model")
    for name, t in tensors.items():
        t.data = t.data.to(MODEL_DTYPES[overrides.get(name, _name(dtype))])


def _save_weights(model: nn.Module, path: Path, target: Path) -> None:
    """``save_model``, with safetensors' I/O errors (a full disk…) as a one-line ``OSError``."""
    try:
        save_model(model, str(path), metadata={"format": "pt", "quant_method": "archquant"})
    except SafetensorError as e:
        text = _one_line(e)
        m = re.search(r"\(os error (\d+)\)", text)
        if m is None:
            raise OSError(f"cannot write {target}: {text}") from None
        code = int(m.group(1))
        raise OSError(code, f"cannot write {target}: {os.strerror(code)}") from None


# ---------------------------------------------------------------------------------- load
def read_checkpoint_config(directory: str | os.PathLike) -> dict:
    """Read and check ``quantization_config.json`` (types, version, ``config_sha256``).

    One-line ``CheckpointError`` naming the file and the field otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} is incomplete: {name} is missing")
    path = directory / CONFIG_FILE
    try:
        qconfig = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"corrupt {path}: {_one_line(e)}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != "archquant":
        raise CheckpointError(f"{path} is not an archquant quantization config")
    version = qconfig.get("format_version")
    if type(version) is int and version == 1:
        raise CheckpointError(f"{path}: format_version 1 has no checksums and is no longer loaded: "
                              f"quantize the model again and save it with this archquant (format_version "
                              f"{FORMAT_VERSION})")
    if type(version) is not int or version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} not supported (this archquant reads "
                              f"{FORMAT_VERSION})")
    for key in ("family", "model_config", "dtype", "modules", "integrity"):
        if key not in qconfig:
            raise CheckpointError(f"{path} has no {key!r} entry")

    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: field {field!r} {why}")

    if not isinstance(qconfig["family"], str) or not qconfig["family"]:
        raise bad("family", f"must be a family name, got {qconfig['family']!r}")
    if not isinstance(qconfig["model_config"], dict):
        raise bad("model_config", f"must be a JSON object, got {type(qconfig['model_config']).__name__}")
    if not isinstance(qconfig["dtype"], str) or qconfig["dtype"] not in MODEL_DTYPES:
        raise bad("dtype", f"has value {qconfig['dtype']!r}: allowed {', '.join(map(repr, MODEL_DTYPES))}")
    modules = qconfig["modules"]
    if not isinstance(modules, dict) or not all(isinstance(m, dict) for m in modules.values()):
        raise bad("modules", "must map module names to JSON objects")
    _check_integrity_entry(qconfig["integrity"], bad)
    if config_digest(qconfig) != qconfig["integrity"]["config_sha256"]:
        raise CheckpointError(f"{path} was edited or corrupted: its contents do not match "
                              "integrity.config_sha256")
    return qconfig


def _check_integrity_entry(integrity: Any, bad) -> None:
    if not (isinstance(integrity, dict) and set(integrity) == {"algorithm", "tensors", "config_sha256"}):
        raise bad("integrity", "must hold exactly 'algorithm', 'tensors' and 'config_sha256'")
    if integrity["algorithm"] != "sha256":
        raise bad("integrity", f"has algorithm {integrity['algorithm']!r}: allowed 'sha256'")
    if not (isinstance(integrity["config_sha256"], str) and _HEX64.fullmatch(integrity["config_sha256"])):
        raise bad("integrity", "has a malformed config_sha256")
    if not isinstance(integrity["tensors"], dict):
        raise bad("integrity", "has a malformed tensor table")
    for name, t in integrity["tensors"].items():
        if not (isinstance(t, dict) and set(t) == {"dtype", "shape", "sha256"}
                and isinstance(t["dtype"], str) and t["dtype"] in ST_DTYPES
                and isinstance(t["shape"], list) and all(_is_count(d) for d in t["shape"])
                and isinstance(t["sha256"], str) and _HEX64.fullmatch(t["sha256"])):
            raise bad("integrity", f"has a malformed entry for tensor {name!r}")


_MISSING = object()


def _check_slot(skeleton: nn.Module, name: str) -> nn.Module | None:
    """``name`` is a module slot of the skeleton (a module, or an attribute left None for one);
    returns what the slot holds."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = skeleton.get_submodule(parent_name) if parent_name else skeleton
    except AttributeError:
        raise ValueError(f"the model has no module {parent_name!r}") from None
    if not child or child in parent._parameters or child in parent._buffers:
        raise ValueError("it names a tensor of the model, not a module")
    current = getattr(parent, child, _MISSING)
    if current is _MISSING:
        raise ValueError(f"the model has no module {name!r}")
    if current is not None and not isinstance(current, nn.Module):
        raise ValueError(f"{name!r} is a {type(current).__name__} of the model, not a module")
    return current


def restore_quantized(skeleton: nn.Module, qconfig: dict, directory: str | os.PathLike,
                      tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Swap the quantized wrappers named in ``qconfig`` into an FP ``skeleton`` and load the weights.

    ``qconfig`` comes from ``read_checkpoint_config``; ``tensors`` from ``read_checkpoint_tensors``
    (read here when not given). Every check of the module doc (3.) runs before this returns."""
    directory = Path(directory)
    weights = directory / WEIGHTS_FILE
    if tensors is None:
        tensors = read_checkpoint_tensors(directory, qconfig)
    dtype = MODEL_DTYPES[qconfig["dtype"]]
    # the saved model's dtype (a no-op for float32 skeletons of float32 models), and its exceptions
    _cast_skeleton(skeleton, dtype, qconfig.get("dtype_overrides") or {}, directory)
    for name, cfg in qconfig["modules"].items():
        try:
            old = _check_slot(skeleton, name)
            module = module_from_config(cfg, dtype=dtype)
            check_replaces(module, old)
            set_submodule(skeleton, name, module)
        except _BUILD_ERRORS as e:
            raise CheckpointError(f"{directory / CONFIG_FILE}: cannot rebuild module {name!r}: "
                                  f"{_one_line(e)}") from None
    state = skeleton.state_dict(keep_vars=True)
    _check_keys(skeleton, state, tensors, weights)
    # codes of frozen quantized weights take the file's dtype and shape: their module checks them
    placeholders = {f"{n}.weight_codes" if n else "weight_codes" for n, m in skeleton.named_modules()
                    if isinstance(m, _QuantWeightMixin) and m.weight_spec is not None and m.frozen}
    unchecked = []
    for key, t in tensors.items():
        ref = state.get(key)
        if ref is None or key in placeholders:
            unchecked.append(key)
            continue
        if t.dtype != ref.dtype:
            raise CheckpointError(f"checkpoint {directory}: tensor {key!r} is stored as "
                                  f"{str(t.dtype).removeprefix('torch.')}, the model's is "
                                  f"{str(ref.dtype).removeprefix('torch.')} (it is never cast)")
        if t.shape != ref.shape:
            raise CheckpointError(f"weights in {weights} do not match the model: tensor {key!r} has shape "
                                  f"{tuple(t.shape)}, the model's is {tuple(ref.shape)}")
        _check_finite(t, key, directory)
    try:
        skeleton.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {weights} do not match the model: {_one_line(e)}") from None
    for name in qconfig["modules"]:
        check = getattr(skeleton.get_submodule(name), "check_loaded", None)
        if callable(check):
            try:
                check(f"{name}.")
            except (ValueError, TypeError, RuntimeError) as e:
                raise CheckpointError(f"checkpoint {directory}: module {name!r}: {_one_line(e)}") from None
    for key in unchecked:  # after the modules' own checks: codes and parameters of plug-in formats
        _check_finite(tensors[key], key, directory)
    skeleton.eval()
    return skeleton


def _check_finite(t: torch.Tensor, key: str, directory: Path) -> None:
    if t.is_floating_point():
        values = t.to(torch.float32) if t.element_size() == 1 else t  # float8: no isfinite of its own
        if not bool(torch.isfinite(values).all()):
            raise CheckpointError(f"checkpoint {directory}: tensor {key!r} holds NaN or Inf values")


def _check_keys(skeleton: nn.Module, state: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                weights: Path) -> None:
    """The file holds exactly the model's tensors: one name per tied group, and parameter
    buffers only where a quantized module keeps them; else name the missing/unexpected keys."""
    groups: dict[int, list[str]] = {}
    for key, value in state.items():  # tied weights: one tensor under several names
        groups.setdefault(id(value), []).append(key)
    missing, unexpected = [], []
    for names in groups.values():
        present = sorted(n for n in names if n in tensors)
        if not present:
            missing.append(sorted(names)[0])
        unexpected.extend(present[1:])
    param_buffers = {f"{n}." for n, m in skeleton.named_modules() if isinstance(m, _ParamBuffers)}
    for key in tensors:
        if key not in state and key.rpartition(".")[0] + "." not in param_buffers:
            unexpected.append(key)
    if missing or unexpected:
        raise CheckpointError(f"weights in {weights} do not match the model: "
                              + _key_summary(("{n} missing {noun}", missing), ("{n} unexpected {noun}", unexpected)))
