"""Python API: quantize a model in place from a recipe, save it, load it back.

    import archquant as aq
    aq.quantize_(model, aq.Recipe("w8a8", [aq.Quantize(weight=..., activation=..., dynamic=True)]))
    aq.quantize_(model, "smoothquant", calib_data=batches)       # a preset by name
    aq.save_quantized(model, "out/ckpt")
    model2 = aq.load_quantized("out/ckpt")                         # bit-identical outputs
"""
from __future__ import annotations

import os
from typing import Any, Iterable

from torch import nn

from .adapters import FamilyAdapter, adapter_for, families, get_adapter
from .core.calibration import ForwardFn
from .core.presets import RecipeOptions, recipe_from_options
from .core.recipe import Recipe, apply_recipe
from .core.serialization import (CONFIG_FILE, CheckpointError, read_checkpoint_config, read_checkpoint_tensors,
                                 restore_quantized, save_checkpoint)
from .core.structure import ModelStructure


def _adapter(model: nn.Module, family: str | None) -> FamilyAdapter:
    return get_adapter(family) if family is not None else adapter_for(model)


def resolve_recipe(recipe: Recipe | str | RecipeOptions, adapter: FamilyAdapter) -> Recipe:
    """A ``Recipe`` from a recipe object, a preset name, or ``RecipeOptions`` (a preset with its
    knobs, or explicit steps), validated first."""
    if isinstance(recipe, Recipe):
        return recipe
    if not isinstance(recipe, (str, RecipeOptions)):
        raise ValueError(f"recipe must be a Recipe, a preset name or RecipeOptions, got a {type(recipe).__name__}")
    options = RecipeOptions(name=recipe) if isinstance(recipe, str) else recipe
    return recipe_from_options(options, adapter.recipes(), family=adapter.name)


def quantize_(model: nn.Module, recipe: Recipe | str | RecipeOptions, *, calib_data: Iterable[Any] | None = None,
              family: str | None = None, structure: ModelStructure | None = None,
              forward_fn: ForwardFn | None = None, progress: bool = True) -> nn.Module:
    """Quantize ``model`` in place (torchao-style verb) and return it.

    The family adapter is found from the model's type unless ``family`` or an explicit
    ``structure`` is given; ``forward_fn(model, batch)`` defaults to the adapter's.
    ``calib_data`` is any iterable of batches (a generator too), needed only by recipes that
    calibrate.

    Everything is checked before the model is touched (a model the family does not recognise,
    a recipe meant for another architecture, NaN/Inf parameters, nothing to quantize, missing,
    empty or malformed calibration batches), and a failure in a later step restores the model
    exactly (see ``apply_recipe``: one extra copy of the parameters while the recipe runs).
    """
    try:
        adapter = _adapter(model, family)
    except ValueError:
        # an explicit structure + Recipe object works for any model, adapter or not
        if family is not None or structure is None or not isinstance(recipe, Recipe):
            raise
        adapter = None
    recipe = resolve_recipe(recipe, adapter) if adapter is not None else recipe
    # the family's own checks need a model of the family; an explicit structure= may describe any model
    recognised = adapter is not None and (structure is None or adapter.matches(model))
    if recognised:
        adapter.check_model(model, recipe)
    structure = structure or adapter.structure(model)
    # the family checks batches for its own forward; a caller's forward_fn may take anything
    validate_batch = adapter.validate_batch if recognised and forward_fn is None else None
    forward_fn = forward_fn or (adapter.forward if adapter is not None else None)
    apply_recipe(model, recipe, structure, calib_batches=calib_data, forward_fn=forward_fn, progress=progress,
                 validate_batch=validate_batch)
    model._archquant_recipe = recipe.to_dict()  # remembered so save_quantized can record it
    return model


def save_quantized(model: nn.Module, directory: str | os.PathLike, *, family: str | None = None,
                   model_config: dict | None = None, metadata: dict | None = None):
    """Save a quantized model (safetensors + quantization_config.json), atomically.

    The checkpoint names the model's family, whose adapter rebuilds the model at load time: a
    model quantized with an explicit ``structure=`` and no family cannot be saved this way."""
    try:
        adapter = _adapter(model, family)
    except ValueError as e:
        if family is not None:
            raise
        raise ValueError(f"cannot save a {type(model).__name__}: no family adapter recognises it, and "
                         f"load_quantized needs one to rebuild the model (families: "
                         f"{', '.join(families())}); pass family= or save its state_dict yourself") from e
    if model_config is None:
        try:
            model_config = adapter.model_config(model)  # asked now: a recipe may have untied weights
        except AttributeError:
            raise ValueError("model_config is required for a model without a .config.to_dict()") from None
    return save_checkpoint(model, directory, family=adapter.name, model_config=model_config,
                           recipe=getattr(model, "_archquant_recipe", None), metadata=metadata)


def load_quantized(directory: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by ``save_quantized``/the runner; outputs are bit-identical.

    A damaged or edited checkpoint raises a one-line ``CheckpointError`` naming the file and the
    field, tensor or module, before the model is used (checks: ``core.serialization``)."""
    qconfig = read_checkpoint_config(directory)
    tensors = read_checkpoint_tensors(directory, qconfig)  # every checksum verified before anything is built
    where, family = os.path.join(directory, CONFIG_FILE), qconfig["family"]
    try:
        adapter = get_adapter(family)
    except ValueError as e:
        raise CheckpointError(f"{where}: field 'family': {e}") from None
    try:
        skeleton = adapter.build_model(qconfig["model_config"])
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{where}: field 'model_config' does not describe a {family} model: "
                              f"{type(e).__name__}: {first}") from None
    model = restore_quantized(skeleton, qconfig, directory, tensors=tensors)
    model._archquant_recipe = qconfig.get("recipe")
    return model
