"""Fuzz: a damaged or edited checkpoint loads bit-identically or raises ``CheckpointError``.

Five saved checkpoints (toy W8A8 dynamic, toy W8A8 static with activation scales, toy packed
W4 groups, Mamba1 Quamba, Mamba1 MambaQuant W4 with online Hadamard and S-SiLU) are damaged
in seeded, deterministic ways:

* **raw** (the issue's acceptance test): random bytes flipped in the safetensors length,
  header or data and in the JSON, truncated files, random JSON edits (numbers, bits,
  booleans, strings, deleted and added keys, swapped module names, dtype strings,
  format_version), a tensor replaced through safetensors (another dtype, shape or value,
  dropped, added, renamed), another checkpoint's weights. Every variant must either raise
  ``CheckpointError`` or load to a model whose outputs are ``torch.equal`` to the original's;
  any other exception, a crash at the forward, or other outputs fail the test.
* **resealed**: tensor and module-config edits whose checksums are then recomputed, as a
  buggy writer would. Such a checkpoint may legitimately describe another model, so the
  requirement is only: ``CheckpointError`` at load, or a model whose forward runs. (Left out:
  the config of a stand-alone online transform such as Mamba's state rotation, whose size only
  the model's forward can check.)

The counts are printed (``pytest -s``) and checked.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import archquant as aq
from archquant.core import serialization
from archquant.core.serialization import CONFIG_FILE, WEIGHTS_FILE, CheckpointError

from conftest import perturbed_mamba

pytestmark = pytest.mark.usefixtures("single_thread")

SEED = 9
RAW_PER_BASE = 100
SEALED_PER_BASE = 60


@dataclass
class Base:
    name: str
    weights: bytes
    config: bytes
    inputs: torch.Tensor
    expected: torch.Tensor


def _toy(recipe) -> tuple:
    from archquant.models.toy import ToyConfig, init_toy_model

    model = init_toy_model(ToyConfig(hidden_size=64, intermediate_size=128, num_layers=2, seed=0))
    calib = [torch.randn(64, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    aq.quantize_(model, recipe, calib_data=calib, progress=False)
    return model, torch.randn(8, 32, generator=torch.Generator().manual_seed(3))


def _mamba(recipe) -> tuple:
    model = perturbed_mamba("mamba1", num_layers=2, state_size=8)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 256, (2, 32), generator=g) for _ in range(2)]
    aq.quantize_(model, recipe, calib_data=calib, family="mamba", progress=False)
    return model, torch.randint(0, 256, (1, 16), generator=g)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> list[Base]:
    root = tmp_path_factory.mktemp("fuzz-bases")
    out = []
    for name, (model, x) in [
        ("toy-dynamic", _toy("rtn_dynamic")),
        ("toy-static", _toy("static_minmax")),
        ("toy-w4", _toy(aq.RecipeOptions(name="weight_only", w_group_size=32))),
        ("mamba-quamba", _mamba("quamba")),
        ("mamba-mambaquant-w4", _mamba(aq.RecipeOptions(name="mambaquant", w_bits=4))),
    ]:
        aq.save_quantized(model, root / name)
        with torch.no_grad():
            expected = model(x)
        out.append(Base(name, (root / name / WEIGHTS_FILE).read_bytes(),
                        (root / name / CONFIG_FILE).read_bytes(), x, expected))
    return out


# ---------------------------------------------------------------------------------- mutations
def _flip(rng: random.Random, data: bytes, lo: int, hi: int) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        out[rng.randrange(lo, hi)] ^= rng.randint(1, 255)
    return bytes(out)


def _paths(node, path=()) -> list[tuple]:
    """Every node of a JSON document, as a path of keys/indices (the root excluded)."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        out.append(path + (key,))
        out.extend(_paths(child, path + (key,)))
    return out


def _get(doc, path):
    for key in path:
        doc = doc[key]
    return doc


STRINGS = ["float16", "bfloat16", "int8", "int", "fp8_e4m3", "mxfp4", "nvfp4", "tensor", "channel", "group",
           "token", "int4x2", "minmax", "percentile", "hadamard", "matrix", "QuantLinear", "ActSite", "toy",
           "mamba", "mamba1", "", "x"]


def _new_value(rng: random.Random, value, bounded: bool):
    """Another value for a JSON leaf (``bounded``: small integer changes only, no huge sizes)."""
    if isinstance(value, bool):
        return rng.choice([not value, int(value), str(value).lower(), None])
    if isinstance(value, int):
        choices = [value + 1, value - 1, 0, 2 * value, -value, float(value), None]
        if not bounded:
            choices += [10**12, str(value), True]
        return rng.choice(choices)
    if isinstance(value, float):
        return rng.choice([value * 1.0000001, value + 1, 0.0, -value, float("nan"), float("inf"), int(value), None])
    if isinstance(value, str):
        return rng.choice([value + "x", value.upper(), rng.choice(STRINGS), None, 1])
    if value is None:
        return rng.choice([0, "", {}, [], "int4x2", True])
    if isinstance(value, list):
        return rng.choice([value[:-1], value + value[-1:], {}, None] if value else [[0], None])
    return rng.choice([[], None, "x"])


def _edit_json(rng: random.Random, doc: dict, *, within: tuple = (), bounded: bool = False) -> str:
    """One random edit of ``doc`` (in place) below the path ``within``; returns its description."""
    top = _get(doc, within)
    op = rng.choice(["value", "value", "value", "delete", "add", "swap_modules", "special"]) if not within \
        else rng.choice(["value", "value", "value", "delete", "add", "swap_modules"])
    if op == "swap_modules":
        mods = doc["modules"]
        if len(mods) >= 2:
            a, b = rng.sample(sorted(mods), 2)
            mods[a], mods[b] = mods[b], mods[a]
            return f"swap-modules: {a} <-> {b}"
        op = "value"
    if op == "special" and not within:
        field, value = rng.choice([("format_version", rng.choice([0, 1, 3, "2", 2.0, True, None])),
                                   ("dtype", rng.choice(["float16", "bfloat16", "float64", "int8", "torch.float32",
                                                         "", None])),
                                   ("family", rng.choice(["mamba", "toy", "nope", "", 3, None])),
                                   ("quant_method", rng.choice(["compressed-tensors", None]))])
        doc[field] = value
        return f"top-field: {field} = {value!r}"
    path = rng.choice(_paths(top))
    parent, key = _get(top, path[:-1]), path[-1]
    where = "/".join(map(str, within + path))
    if op == "delete" and isinstance(parent, dict):
        del parent[key]
        return f"delete: {where}"
    if op == "add":
        target = _get(top, path) if isinstance(_get(top, path), dict) else parent
        if isinstance(target, dict):
            target[rng.choice(["bogus", "scale", "zero_point", "packing", "bits"])] = rng.choice([1, "x", None, True])
            return f"add-key: under {where}"
    old = parent[key]
    parent[key] = _new_value(rng, old, bounded)
    return f"value: {where}: {old!r:.40} -> {parent[key]!r:.40}"


DTYPES = [torch.int32, torch.int8, torch.uint8, torch.int16, torch.float16, torch.bfloat16, torch.float64,
          torch.float32]


def _edit_tensors(rng: random.Random, weights: bytes) -> tuple[str, bytes]:
    """One tensor replaced, dropped, added… through safetensors; returns "op: what" and the new file."""
    tensors = {k: v.clone() for k, v in st_load(weights).items()}
    name = rng.choice(sorted(tensors))
    t = tensors[name]
    op = rng.choice(["dtype", "shape", "value", "value", "same", "drop", "add", "rename", "swap"])
    if op == "dtype":
        dtype = rng.choice([d for d in DTYPES if d != t.dtype])
        float8 = t.dtype.itemsize == 1 and t.is_floating_point()
        tensors[name] = (t.to(torch.float32) if float8 else t).to(dtype)
        what = f"{name} as {dtype}"
    elif op == "shape":
        choices = [t.reshape(-1), t.unsqueeze(0), t.reshape(-1)[: max(t.numel() - 1, 0)]]
        if t.ndim >= 2:
            choices.append(t.transpose(0, 1))
        tensors[name] = rng.choice(choices).contiguous()
        what = f"{name} reshaped to {tuple(tensors[name].shape)}"
    elif op == "value" and t.numel():
        flat = t.reshape(-1).clone()
        i = rng.randrange(flat.numel())
        if t.is_floating_point():
            v = rng.choice([float("nan"), float("inf"), 0.0, -1.0, 1e30, float(flat[i].float()) * 2 + 1])
            flat[i] = torch.tensor(v).to(t.dtype)
        elif t.dtype == torch.bool:
            flat[i] = ~flat[i]
        else:
            info = torch.iinfo(t.dtype)
            flat[i] = rng.choice([info.min, info.max, min(int(flat[i]) + 1, info.max), 0])
        tensors[name] = flat.reshape(t.shape)
        what = f"{name}[{i}] changed"
    elif op == "drop":
        del tensors[name]
        what = f"{name} dropped"
    elif op == "add":
        extra = rng.choice([name + "_copy", name.rsplit(".", 1)[0] + ".scale", "bogus.weight",
                            name.rsplit(".", 1)[0] + ".zero_point"])
        tensors[extra] = t.clone()
        what = f"{extra} added"
    elif op == "rename":
        other = rng.choice(sorted(tensors))
        tensors[other + "x"] = tensors.pop(other)
        what = f"{other} renamed"
    elif op == "swap":
        same = [k for k, v in tensors.items() if k != name and v.shape == t.shape and v.dtype == t.dtype]
        if same:
            other = rng.choice(same)
            tensors[name], tensors[other] = tensors[other], tensors[name]
            what = f"{name} <-> {other}"
        else:
            what = f"{name} re-saved"
    else:
        op, what = "same", "re-saved unchanged"
    return f"{op}: {what}", st_save(tensors, metadata={"format": "pt"})


def _raw_variant(rng: random.Random, base: Base, bases: list[Base]) -> tuple[str, bytes, bytes]:
    w, c = base.weights, base.config
    n = int.from_bytes(w[:8], "little")
    kind = rng.choice(["flip-length", "flip-header", "flip-header", "flip-data", "flip-data", "flip-json",
                       "truncate-weights", "truncate-json", "json", "json", "json", "json", "tensor", "tensor",
                       "tensor", "foreign"])
    if kind == "flip-length":
        return kind, _flip(rng, w, 0, 8), c
    if kind == "flip-header":
        return kind, _flip(rng, w, 8, 8 + n), c
    if kind == "flip-data":
        return kind, _flip(rng, w, 8 + n, len(w)), c
    if kind == "flip-json":
        return kind, w, _flip(rng, c, 0, len(c))  # may well be invalid UTF-8
    if kind == "truncate-weights":
        return kind, w[:rng.randrange(len(w))], c
    if kind == "truncate-json":
        return kind, w, c[:rng.randrange(len(c))]
    if kind == "json":
        doc = json.loads(c)
        what = _edit_json(rng, doc)
        return f"json-{what}", w, json.dumps(doc, indent=2).encode()
    if kind == "tensor":
        what, w2 = _edit_tensors(rng, w)
        return f"tensor-{what}", w2, c
    other = rng.choice([b for b in bases if b is not base])
    return f"foreign: weights of {other.name}", other.weights, c


def _sealed_variant(rng: random.Random, base: Base) -> tuple[str, bytes, bytes]:
    doc = json.loads(base.config)
    w = base.weights
    if rng.random() < 0.6:
        what, w = _edit_tensors(rng, w)
        return f"tensor-{what}", w, base.config
    # Not the stand-alone online transforms (Mamba's state rotation): they fill a slot the FP model
    # leaves None, so nothing but the model's forward knows their size (checksums guard it).
    name = rng.choice(sorted(n for n, m in doc["modules"].items() if m.get("type") not in ("hadamard", "matrix")))
    what = _edit_json(rng, doc, within=("modules", name), bounded=True)
    return f"module-json-{what}", w, json.dumps(doc).encode()


def _reseal(directory: Path) -> None:
    cfg = json.loads((directory / CONFIG_FILE).read_text())
    if isinstance(cfg.get("integrity"), dict):
        try:
            cfg["integrity"]["tensors"] = serialization._tensor_table(directory / WEIGHTS_FILE)
        except CheckpointError:  # the edit made the file unreadable: nothing to seal
            return
        cfg["integrity"]["config_sha256"] = serialization.config_digest(cfg)
        (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))


def _outcome(directory: Path, base: Base) -> str:
    try:
        model = aq.load_quantized(directory)
    except CheckpointError:
        return "refused"
    with torch.no_grad():
        out = model(base.inputs)
    return "identical" if torch.equal(out, base.expected) else "different"


def _run(tmp_path: Path, bases: list[Base], sealed: bool) -> tuple[Counter, Counter, list[str]]:
    rng = random.Random(SEED + sealed)
    outcomes, kinds, failures = Counter(), Counter(), []
    directory = tmp_path / "variant"
    directory.mkdir()
    for base in bases:
        for i in range(SEALED_PER_BASE if sealed else RAW_PER_BASE):
            what, weights, config = _sealed_variant(rng, base) if sealed else _raw_variant(rng, base, bases)
            (directory / WEIGHTS_FILE).write_bytes(weights)
            (directory / CONFIG_FILE).write_bytes(config)
            if sealed:
                _reseal(directory)
            kinds[what.split(":")[0]] += 1
            try:
                result = _outcome(directory, base)
            except Exception as e:  # noqa: BLE001 - anything but CheckpointError is a failure
                result = "crashed"
                failures.append(f"{base.name} #{i} ({what}): {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            outcomes[result] += 1
            if result == "different" and not sealed:
                failures.append(f"{base.name} #{i} ({what}): loaded with different outputs")
    return outcomes, kinds, failures


def _fuzz(tmp_path, bases, sealed: bool) -> tuple[dict, int]:
    """Run every variant, print the tally (the numbers quoted in the README), assert no failure."""
    outcomes, kinds, failures = _run(tmp_path, bases, sealed=sealed)
    total = sum(outcomes.values())
    print(f"\n{'resealed' if sealed else 'raw'} fuzz: {total} variants, {outcomes['refused']} refused "
          f"(CheckpointError), {outcomes['identical']} loaded bit-identical, {outcomes['different']} loaded a "
          f"consistent other model; by kind {dict(sorted(kinds.items()))}")
    assert not failures, "\n".join(failures[:20])
    return outcomes, total


def test_raw_corruption_loads_identical_or_is_refused(bases, tmp_path):
    outcomes, total = _fuzz(tmp_path, bases, sealed=False)
    assert total >= 200 and outcomes["refused"] + outcomes["identical"] == total
    assert outcomes["identical"] > 0 and outcomes["refused"] > 0


def test_resealed_edits_are_refused_or_run(bases, tmp_path):
    outcomes, total = _fuzz(tmp_path, bases, sealed=True)
    assert outcomes["refused"] > total // 2
