"""Recipes: an ordered list of steps (smoothing, rotation, quantization) applied to a model.

The shape follows llm-compressor's modifiers and torchao's config objects: a recipe is data
(serialisable to a dict / YAML), each step is one small handler, and ``apply_recipe`` runs
them in order against the structure that a family adapter declared. Steps that need data
(smoothing statistics, static activation scales) run the calibration batches themselves.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn

from .calibration import ForwardFn, calibration_batches, check_finite_parameters
from .formats import QuantSpec
from .modules import QUANT_MODULES
from .structure import ModelStructure


@dataclass
class Context:
    """What steps may need besides the model: its structure and the calibration batches.

    ``calib_batches`` is a list (``apply_recipe`` materialises any iterable once), so every step
    that calibrates sees all the batches, a generator included.
    """

    structure: ModelStructure
    calib_batches: list[Any] | None = None
    forward_fn: ForwardFn | None = None
    progress: bool = True
    timings: dict[str, float] = field(default_factory=dict)

    def batches(self, step: str) -> list[Any]:
        if self.calib_batches is None:  # only reached when a step's needs_calibration() said no
            raise ValueError(f"recipe step '{step}' needs calibration data, but none was given")
        if not self.calib_batches:
            raise ValueError(f"recipe step '{step}' needs calibration data, but calib_data is empty")
        return self.calib_batches


STEPS: dict[str, type["Step"]] = {}


def register_step(cls: type["Step"]) -> type["Step"]:
    STEPS[cls.kind] = cls
    return cls


@dataclass
class Step:
    kind: ClassVar[str] = "step"
    #: the model architectures this step is meant for, as the family adapter names them
    #: (``FamilyAdapter.architecture``, e.g. "mamba1"); None = any. A preset's support is the
    #: intersection over its steps (``Recipe.architectures``), checked by ``FamilyAdapter.check_model``.
    architectures: ClassVar[tuple[str, ...] | None] = None

    def apply(self, model: nn.Module, ctx: Context) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def needs_calibration(self) -> bool:
        """Whether ``apply`` runs calibration batches (asked before the model is touched, so that
        missing or malformed data is refused up front)."""
        return False

    def to_dict(self) -> dict:
        d = {"kind": self.kind}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = v.to_dict() if isinstance(v, QuantSpec) else v
        return d


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise KeyError(f"structure names module {name!r}, which the model does not have") from None


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@dataclass
class Recipe:
    """An ordered list of steps with a name, e.g. ``Recipe("smoothquant", [SmoothQuant(0.5), Quantize(...)])``."""

    name: str
    steps: list[Step]

    def to_dict(self) -> dict:
        return {"name": self.name, "steps": [s.to_dict() for s in self.steps]}

    def calibrating_steps(self) -> list[str]:
        """Kinds of the steps that run calibration batches (empty: the recipe needs no data)."""
        return [s.kind for s in self.steps if s.needs_calibration()]

    def architectures(self) -> tuple[str, ...] | None:
        """The architectures every step supports (see ``Step.architectures``); None = any."""
        allowed: tuple[str, ...] | None = None
        for step in self.steps:
            if step.architectures is not None:
                allowed = step.architectures if allowed is None else tuple(a for a in allowed if a in step.architectures)
        return allowed

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        steps = []
        for sd in d["steps"]:
            sd = dict(sd)
            kind = sd.pop("kind")
            if kind not in STEPS:
                raise ValueError(f"unknown recipe step {kind!r}: allowed {', '.join(STEPS)}")
            step_cls = STEPS[kind]
            for key in ("weight", "activation", "conv_weight"):
                if isinstance(sd.get(key), dict):
                    sd[key] = QuantSpec.from_dict(sd[key])
            steps.append(step_cls(**sd))
        return cls(d["name"], steps)


def check_something_to_quantize(model: nn.Module, recipe: Recipe, structure: ModelStructure) -> None:
    """Refuse a recipe whose Quantize steps find no target in ``structure`` (e.g. zero layers)."""
    quantizers = [s for s in recipe.steps if isinstance(s, Quantize)]
    if quantizers and not any(s.quantizes_anything(structure) for s in quantizers):
        raise ValueError(f"nothing to quantize: {type(model).__name__} has no layers to quantize "
                         f"(its structure names no target for recipe {recipe.name!r})")


def apply_recipe(model: nn.Module, recipe: Recipe, structure: ModelStructure, *,
                 calib_batches: Iterable[Any] | None = None, forward_fn: ForwardFn | None = None,
                 progress: bool = True, validate_batch: Callable[[nn.Module, Any], None] | None = None,
                 restore_on_failure: bool = True) -> dict[str, float]:
    """Run every step of ``recipe`` on ``model`` in place; returns seconds spent per step.

    Before the model is touched: a recipe with a ``Quantize`` step must have something to
    quantize (a model with zero layers has not), every parameter must be finite, and the
    calibration data is materialised once into a list (any iterable: a generator works, and
    every step sees all of its batches) and checked (see ``calibration_batches``; the batches
    are checked by ``validate_batch(model, batch)``, e.g. ``FamilyAdapter.validate_batch``).
    Data is demanded only when a step calibrates (``Recipe.calibrating_steps``).

    With ``restore_on_failure`` (the default), a step that fails leaves ``model`` exactly as it
    was (``ModelSnapshot``): this costs one copy of the model's parameters and buffers while the
    recipe runs. A caller that works on a throw-away copy anyway may pass False.
    """
    calibrating = recipe.calibrating_steps()
    check_something_to_quantize(model, recipe, structure)
    check_finite_parameters(model)
    batches = calibration_batches(
        calib_batches, needed_by=f"recipe {recipe.name!r} (step {calibrating[0]!r})" if calibrating else None,
        validate=None if validate_batch is None else (lambda batch: validate_batch(model, batch)))
    ctx = Context(structure, batches, forward_fn, progress)
    snapshot = ModelSnapshot(model) if restore_on_failure else None
    try:
        model.eval()
        for i, step in enumerate(recipe.steps):
            t0 = time.perf_counter()
            step.apply(model, ctx)
            ctx.timings[f"{i}:{step.kind}"] = time.perf_counter() - t0
    except BaseException:
        if snapshot is not None:
            snapshot.restore()
        raise
    return ctx.timings


class ModelSnapshot:
    """Everything a recipe may change in a model, taken so that a failure can be undone exactly.

    Taken: for every module of the tree, a shallow copy of its attribute dict and of the
    containers in it (children, parameters, buffers, hooks, ...), and for every parameter and
    buffer its storage and a clone of its values. ``restore()`` puts back the same module
    objects with the same children and attributes (modules, hooks and attributes added since
    are dropped) and the same ``Parameter`` objects on their original storage with bit-identical
    values, whatever was fused into them in place or assigned to ``.data`` meanwhile.

    Memory: one extra copy of all parameters and buffers (on their device, in their dtype),
    held until the snapshot is dropped. Not rolled back: objects outside the module tree's own
    containers that were mutated in place (e.g. a config object; no step does that).
    """

    _CONTAINERS = (dict, set, list)

    def __init__(self, model: nn.Module) -> None:
        self.modules = []
        tensors: dict[int, torch.Tensor] = {}
        for m in model.modules():
            attrs = dict(m.__dict__)
            containers = {k: (v, v.copy()) for k, v in attrs.items() if isinstance(v, self._CONTAINERS)}
            self.modules.append((m, attrs, containers))
            for t in list(m._parameters.values()) + list(m._buffers.values()):
                if t is not None:
                    tensors.setdefault(id(t), t)
        with torch.no_grad():
            self.tensors = [(t, t.data, t.detach().clone(), t.requires_grad) for t in tensors.values()]

    def restore(self) -> None:
        for m, attrs, containers in self.modules:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for original, saved in containers.values():
                original.clear()
                original.update(saved) if not isinstance(original, list) else original.extend(saved)
        with torch.no_grad():
            for t, storage, values, requires_grad in self.tensors:
                t.data = storage
                t.copy_(values)  # through t: its version counter moves, so caches keyed on it are dropped
                t.requires_grad_(requires_grad)


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name → quantized wrapper, the modules a checkpoint must describe."""
    types = tuple(QUANT_MODULES.values())
    found: dict[str, nn.Module] = {}
    for n, m in model.named_modules():  # parents come before their children
        if isinstance(m, types) and getattr(m, "is_quantized", True):
            if not any(n.startswith(p + ".") for p in found):  # a wrapper rebuilds its own children
                found[n] = m
    return found


# The steps live in their own modules; importing them here registers them and keeps
# ``from archquant.core.recipe import Quantize, SmoothQuant, ...`` working.
from .quantize_step import Quantize  # noqa: E402
from .transform_steps import OnlineHadamard, RotatePairs, RotateResidual, SmoothQuant  # noqa: E402

__all__ = ["Recipe", "Step", "SmoothQuant", "RotateResidual", "OnlineHadamard", "RotatePairs", "Quantize", "apply_recipe",
           "register_step", "STEPS", "Context", "ModelSnapshot",
           "quantized_modules"]
