"""Quantized checkpoints: safetensors weights plus a JSON quantization config.

Layout of a checkpoint directory::

    model.safetensors           every tensor of the quantized model (codes, scales, FP params)
    quantization_config.json    family + model config (to rebuild the FP skeleton), the recipe,
                                and per quantized module: type, weight/activation formats,
                                granularities, observers and online transforms

The JSON is in the spirit of compressed-tensors' ``quantization_config``: it alone says how
to rebuild every module, without the recipe's code. Nothing is ever unpickled.

Writes go through ``core.safe_io.StagedDir``: a hidden staging directory next to the target is
renamed into place only when complete (a crash never leaves a checkpoint that looks whole), and
only a directory archquant wrote is ever replaced.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from .modules import module_from_config
from .safe_io import StagedDir, write_json_atomic
from .recipe import quantized_modules, set_submodule

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "quantization_config.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or corrupt."""


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
    """Save a quantized (frozen) model so that ``load_checkpoint`` rebuilds it bit-identically."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    modules = quantized_modules(model)
    unfrozen = [n for n, m in modules.items() if getattr(m, "frozen", True) is False and m.weight_spec is not None]
    if unfrozen:
        raise ValueError(f"module {unfrozen[0]!r} is not frozen: run calibration/freeze before saving")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    qconfig = {
        "quant_method": "archquant",
        "format_version": FORMAT_VERSION,
        "family": family,
        "model_config": model_config,
        "dtype": str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32",
        "recipe": recipe,
        "modules": {name: m.to_config() for name, m in modules.items()},
        "metadata": metadata or {},
    }
    with StagedDir(directory, legacy=is_legacy_checkpoint, what="checkpoint directory") as stage:
        save_model(model, str(stage.path / WEIGHTS_FILE), metadata={"format": "pt", "quant_method": "archquant"})
        write_json_atomic(stage.path / CONFIG_FILE, qconfig)
        stage.publish()
    return directory


def read_checkpoint_config(directory: str | os.PathLike) -> dict:
    """Read and sanity-check ``quantization_config.json``; one-line ``CheckpointError`` otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} is incomplete: {name} is missing")
    try:
        qconfig = json.loads((directory / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt {directory / CONFIG_FILE}: {e}") from None
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != "archquant":
        raise CheckpointError(f"{directory / CONFIG_FILE} is not an archquant quantization config")
    if qconfig.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory / CONFIG_FILE}: format_version {qconfig.get('format_version')!r} "
                              f"not supported (this archquant reads {FORMAT_VERSION})")
    for key in ("family", "model_config", "modules"):
        if key not in qconfig:
            raise CheckpointError(f"{directory / CONFIG_FILE} has no {key!r} entry")
    return qconfig


def restore_quantized(skeleton: nn.Module, qconfig: dict, directory: str | os.PathLike) -> nn.Module:
    """Swap the quantized wrappers named in ``qconfig`` into an FP ``skeleton`` and load the weights."""
    directory = Path(directory)
    dtype = getattr(torch, qconfig.get("dtype", "float32"))
    for name, cfg in qconfig["modules"].items():
        try:
            module = module_from_config(cfg, dtype=dtype)
            set_submodule(skeleton, name, module)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{directory / CONFIG_FILE}: cannot rebuild module {name!r}: {e}") from None
    try:
        load_model(skeleton, str(directory / WEIGHTS_FILE), strict=True)
    except SafetensorError as e:
        raise CheckpointError(f"corrupt weights file {directory / WEIGHTS_FILE}: {e}") from None
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"weights in {directory / WEIGHTS_FILE} do not match the model: {first}") from None
    skeleton.eval()
    return skeleton
