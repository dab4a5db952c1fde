"""Recipes: an ordered list of steps (smoothing, rotation, quantization) applied to a model.

The shape follows llm-compressor's modifiers and torchao's config objects: a recipe is data
(serialisable to a dict / YAML), each step is one small handler, and ``apply_recipe`` runs
them in order against the structure that a family adapter declared. Steps that need data
(smoothing statistics, static activation scales) run the calibration batches themselves.
"""
from __future__ import annotations

import time
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn

from . import matching
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

    def validate(self, where: str) -> None:
        """Raise a one-line ``ValueError`` (starting with ``where``) for a value the step cannot use;
        types are already checked by ``from_config``."""

    def notes(self) -> list[str]:
        """What a reader of the results should know about this step's choices (the report shows them)."""
        return []

    def check_calibration(self, num_batches: int) -> None:
        """Refuse, before any work, calibration data this step cannot use (one-line ``ValueError``),
        e.g. a selection larger than the pool; ``num_batches`` is the number of calibration batches."""

    @classmethod
    def from_config(cls, values: dict, where: str) -> "Step":
        """The step from a mapping of its fields (a YAML recipe's step), each checked against the
        field's type; unknown keys are refused naming the allowed ones."""
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ValueError(f"{where} must be a mapping of the step's options, got {values!r}")
        names = [f.name for f in fields(cls)]
        unknown = [k for k in values if k not in names]
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}: allowed "
                             f"{', '.join(names) if names else 'none (the step has no options)'}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
        step = cls(**kwargs)
        step.validate(where)
        return step

    def to_dict(self) -> dict:
        d = {"kind": self.kind}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = v.to_dict() if isinstance(v, QuantSpec) else v
        return d


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against a step field's type (int → float allowed; a QuantSpec from a mapping)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if tp is QuantSpec:
        if isinstance(value, QuantSpec):
            return value.validate()
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a quantization spec mapping (e.g. {{bits: 8, granularity: "
                             f"channel}}), got {value!r}")
        try:
            return QuantSpec.from_dict(value)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    checks = {bool: (lambda v: isinstance(v, bool), "true or false"),
              int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
              float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
              str: (lambda v: isinstance(v, str), "a string"),
              dict: (lambda v: isinstance(v, dict), "a mapping")}
    if tp in checks:
        ok, what = checks[tp]
        if not ok(value):
            raise ValueError(f"{where} must be {what}, got {value!r}")
        return float(value) if tp is float else value
    if origin is dict:
        return _coerce(value, dict, where)
    if tp is list or origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where} must be a list of names or patterns, got {value!r}")
        return list(value)
    raise TypeError(f"{where}: step field type {tp!r} has no config form")  # a step author's bug


def check_value(where: str, value: Any, *, allowed: Iterable | None = None, minimum: float | None = None,
                maximum: float | None = None) -> None:
    """One-line refusal of a step value outside ``allowed`` or [minimum, maximum] (for ``Step.validate``)."""
    if allowed is not None and value not in tuple(allowed):
        raise ValueError(f"{where} has value {value!r}: allowed values are {', '.join(map(str, allowed))}")
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        bounds = f"in [{minimum}, {maximum}]" if minimum is not None and maximum is not None else (
            f">= {minimum}" if minimum is not None else f"<= {maximum}")
        raise ValueError(f"{where} has value {value!r}: allowed values are {bounds}")


def step_class(name: str, where: str) -> type["Step"]:
    """A registered step by class name (``SmoothQuant``) or by kind (``smoothquant``)."""
    for cls in STEPS.values():
        if name in (cls.__name__, cls.kind):
            return cls
    raise ValueError(f"{where}: unknown recipe step {name!r}: allowed {', '.join(c.__name__ for c in STEPS.values())}")


def steps_from_config(items: Any, where: str = "recipe.steps") -> list["Step"]:
    """Steps written in YAML: ``[{SmoothQuant: {alpha: 0.5}}, {OnlineHadamard: {}}, {Quantize: {...}}]``,
    each validated on its own (errors name the step's position and name)."""
    if not isinstance(items, list) or not items:
        raise ValueError(f"{where} must be a non-empty list of steps such as [{{SmoothQuant: {{alpha: 0.5}}}}, "
                         f"{{Quantize: {{...}}}}], got {items!r}")
    steps = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if not isinstance(item, dict) or len(item) != 1:
            raise ValueError(f"{at} must be a mapping with one key, the step's name (e.g. {{OnlineHadamard: {{}}}}), "
                             f"got {item!r}")
        (name, values), = item.items()
        cls = step_class(str(name), at)
        steps.append(cls.from_config(values, f"{at}.{cls.__name__}"))
    return steps


def check_target_patterns(step: "Step", where: str) -> None:
    """One-line refusal of a malformed pattern in a step's ``targets`` or ``ignore``."""
    for key in ("targets", "ignore"):
        for i, pattern in enumerate(getattr(step, key) or []):
            matching.check_pattern(pattern, f"{where}.{key}[{i}]")


def target_sites(step: "Step", model: nn.Module, structure: ModelStructure,
                 kinds: tuple[type, ...] = (nn.Linear,)) -> list[str]:
    """The structure's quantize list (or the step's ``targets`` among it), minus the structure's
    skips and the step's ``ignore``, keeping modules of the classes ``kinds``: where a transform
    step acts."""
    chosen = structure.quantize if step.targets is None else matching.select(structure.quantize, step.targets)
    return [n for n in chosen if not matching.matches_any(n, structure.skip)
            and not matching.matches_any(n, step.ignore)
            and isinstance(get_submodule(model, n), kinds)]


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
    #: what the preset that built this recipe wants a reader of its results to know
    caveats: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {"name": self.name, "steps": [s.to_dict() for s in self.steps]}
        return {**d, "caveats": list(self.caveats)} if self.caveats else d

    def notes(self) -> list[str]:
        """The preset's caveats and each step's notes, for the report."""
        return [*self.caveats, *(n for s in self.steps for n in s.notes())]

    def check_calibration(self, num_batches: int) -> None:
        """Every step's refusal of calibration data it cannot use (``Step.check_calibration``)."""
        for step in self.steps:
            step.check_calibration(num_batches)

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
        """Inverse of ``to_dict`` (every step validated as in a YAML recipe)."""
        steps = []
        for i, sd in enumerate(d["steps"]):
            sd = dict(sd)
            step_cls = step_class(str(sd.pop("kind", None)), f"recipe.steps[{i}]")
            steps.append(step_cls.from_config(sd, f"recipe.steps[{i}].{step_cls.__name__}"))
        return cls(d["name"], steps, list(d.get("caveats") or []))


def check_something_to_quantize(model: nn.Module, recipe: Recipe, structure: ModelStructure) -> None:
    """Refuse a recipe whose Quantize steps find no target in ``structure`` (e.g. zero layers), or
    whose target / ignore / override patterns select nothing."""
    quantizers = [s for s in recipe.steps if isinstance(s, (Quantize, QuantizeWeights))]
    if quantizers and not any(s.quantizes_anything(structure) for s in quantizers):
        for step in quantizers if structure.quantize else []:
            step.check_selections(structure, model)  # a typo in targets says so, not "no layers"
        raise ValueError(f"nothing to quantize: {type(model).__name__} has no layers to quantize "
                         f"(its structure names no target for recipe {recipe.name!r})")
    for step in quantizers:
        step.check_selections(structure, model)


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
    if batches is not None:
        recipe.check_calibration(len(batches))
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
    make_tensors_contiguous(model)
    return ctx.timings


def make_tensors_contiguous(model: nn.Module) -> None:
    """Give every parameter and buffer the row-major layout a reloaded checkpoint has.

    A fused rotation or a cloned transpose can leave a tensor with other strides; the same values
    in another layout can take another GEMM kernel (another summation order), so the model in
    memory and the one reloaded from its checkpoint would differ in the last bits. Done after the
    steps, in place (same ``Parameter`` objects)."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and not p.is_contiguous():
                p.data = p.data.contiguous()
        for name, b in module._buffers.items():
            if b is not None and not b.is_contiguous():
                module._buffers[name] = b.contiguous()


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
from .quantize_step import Quantize, QuantizeWeights  # noqa: E402
from .transform_steps import OnlineHadamard, RotatePairs, RotateResidual, SmoothQuant  # noqa: E402

__all__ = ["Recipe", "Step", "steps_from_config", "step_class", "SmoothQuant", "RotateResidual", "OnlineHadamard", "RotatePairs", "Quantize", "QuantizeWeights",
           "apply_recipe",
           "register_step", "STEPS", "Context", "ModelSnapshot",
           "quantized_modules"]
