"""Recipes: an ordered list of steps (smoothing, rotation, quantization) applied to a model.

The shape follows llm-compressor's modifiers and torchao's config objects: a recipe is data
(serialisable to a dict / YAML), each step is one small handler, and ``apply_recipe`` runs
them in order against the structure that a family adapter declared. Steps that need data
(smoothing statistics, static activation scales) run the calibration batches themselves.
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn

from . import transforms as T
from .calibration import ForwardFn, calibrate, calibration_batches, check_finite_parameters, collect_stats
from .formats import QuantSpec
from .modules import (QUANT_MODULES, ActQuantizer, ActSite, QuantConv1d, QuantLinear, act_quantizers,
                      freeze_model)
from .observers import ChannelAbsMaxObserver
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


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise KeyError(f"structure names module {name!r}, which the model does not have") from None


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _untie(modules: Iterable[nn.Module]) -> None:
    """Give every weight its own storage: fusing into one of two tied weights must not touch the other."""
    seen: set[int] = set()
    for m in modules:
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter):
            if id(w) in seen:
                m.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
            seen.add(id(m.weight))


@register_step
@dataclass
class SmoothQuant(Step):
    """Move activation outliers into the weights: X·diag(s)⁻¹ hides in the norm, diag(s) in W."""

    kind: ClassVar[str] = "smoothquant"
    alpha: float = 0.5

    def needs_calibration(self) -> bool:
        return True

    def apply(self, model: nn.Module, ctx: Context) -> None:
        groups = ctx.structure.smoothing_groups()
        stats = {g.linears[0]: ChannelAbsMaxObserver(axis=-1) for g in groups}
        collect_stats(model, ctx.batches(self.kind), stats, forward_fn=ctx.forward_fn,
                      desc="smoothing statistics", progress=ctx.progress)
        _untie([get_submodule(model, n) for g in groups for n in g.linears])
        for g in groups:
            linears = [get_submodule(model, n) for n in g.linears]
            w_amax = torch.stack([lin.weight.detach().abs().amax(dim=0).float() for lin in linears]).amax(0)
            s = T.smoothquant_scales(stats[g.linears[0]].amax, w_amax, self.alpha)
            T.scale_norm_output(get_submodule(model, g.norm), s)
            for lin in linears:
                T.scale_linear_input(lin, s)


@register_step
@dataclass
class RotateResidual(Step):
    """QuaRot-style rotation Q of the residual stream, fused into the weights (exact in FP).

    Norms' γ are folded into the Linears they feed first; then embeddings emit e·Q, readers
    accept x·Q (W ← W·Q) and writers emit y·Q (W ← Qᵀ·W).
    """

    kind: ClassVar[str] = "rotate_residual"
    rotation: str = "random_hadamard"
    seed: int = 0

    def needs_calibration(self) -> bool:
        return self.rotation in T.DATA_DEPENDENT_ROTATIONS

    def apply(self, model: nn.Module, ctx: Context) -> None:
        s = ctx.structure
        if s.norm_kind != "rms":
            raise ValueError(f"residual rotation needs RMSNorm-style norms, model has norm_kind={s.norm_kind!r}")
        touched = [get_submodule(model, n) for n in s.embeddings + s.residual_writers]
        touched += [get_submodule(model, n) for g in s.residual_readers for n in g.linears]
        _untie(touched)
        for g in s.residual_readers:
            if g.norm is not None:
                T.fold_norm_into_linears(get_submodule(model, g.norm), [get_submodule(model, n) for n in g.linears])
        cov = None
        if self.rotation in T.DATA_DEPENDENT_ROTATIONS:
            # MambaQuant: one K for the whole stream, from the first reader's (normalised) input
            first = s.residual_readers[0].linears[0]
            cov = collect_stats(model, ctx.batches(self.kind), {first: T.RunningCovariance()},
                                forward_fn=ctx.forward_fn, desc="residual covariance",
                                progress=ctx.progress)[first].covariance()
        q = T.rotation_matrix(self.rotation, s.hidden_size, self.seed, covariance=cov)
        for name in s.embeddings:
            emb = get_submodule(model, name)
            if isinstance(emb, nn.Embedding):
                T.rotate_embedding(emb, q)
            else:
                T.rotate_linear_output(emb, q)
        for g in s.residual_readers:
            for name in g.linears:
                T.rotate_linear_input(get_submodule(model, name), q)
        for name in s.residual_writers:
            T.rotate_linear_output(get_submodule(model, name), q)


@register_step
@dataclass
class OnlineHadamard(Step):
    """Rotate the input of chosen Linears online by H (randomised by ``seed``), W ← W·H.

    Used where no neighbouring weight can absorb the rotation (after a nonlinearity or a
    scan), e.g. Quamba's Hadamard at Mamba's out_proj input. ``sites=None`` takes the
    adapter's ``online_rotation_sites``.
    """

    kind: ClassVar[str] = "online_hadamard"
    sites: list[str] | None = None
    seed: int | None = None
    #: MambaQuant R2: T = K·H with K the KLT of each site's input covariance (a dense online matrix)
    klt: bool = False

    def needs_calibration(self) -> bool:
        return self.klt

    def apply(self, model: nn.Module, ctx: Context) -> None:
        sites = self.sites if self.sites is not None else ctx.structure.online_rotation_sites
        linears = {}
        for name in sites:
            lin = get_submodule(model, name)
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"online rotation site {name!r} is a {type(lin).__name__}, expected nn.Linear")
            linears[name] = lin
        covs = {}
        if self.klt:
            covs = collect_stats(model, ctx.batches(self.kind), {n: T.RunningCovariance() for n in linears},
                                 forward_fn=ctx.forward_fn, desc="site covariances", progress=ctx.progress)
        for name, lin in linears.items():
            if self.klt:
                matrix = T.rotation_matrix("klt_hadamard", lin.in_features, self.seed or 0,
                                           covariance=covs[name].covariance())
                transform = T.MatrixTransform(matrix, name="klt_hadamard")
            else:
                transform = T.HadamardTransform(lin.in_features, seed=self.seed)
            T.rotate_linear_input(lin, transform.matrix())
            set_submodule(model, name, QuantLinear.from_float(lin, input_transform=transform))


@register_step
@dataclass
class RotatePairs(Step):
    """Rotate the tensor between each producer → consumer pair of the structure, offline.

    The producer's output rows get Qᵀ, the consumer's input gets Q (MambaQuant's R5 on the dt
    path). ``klt_hadamard`` takes K from the consumer's input covariance.
    """

    kind: ClassVar[str] = "rotate_pairs"
    rotation: str = "random_hadamard"
    seed: int = 0

    def needs_calibration(self) -> bool:
        return self.rotation in T.DATA_DEPENDENT_ROTATIONS

    def apply(self, model: nn.Module, ctx: Context) -> None:
        pairs = ctx.structure.linear_pairs
        covs = {}
        if self.rotation in T.DATA_DEPENDENT_ROTATIONS:
            covs = collect_stats(model, ctx.batches(self.kind), {p.consumer: T.RunningCovariance() for p in pairs},
                                 forward_fn=ctx.forward_fn, desc="pair covariances", progress=ctx.progress)
        for p in pairs:
            producer, consumer = get_submodule(model, p.producer), get_submodule(model, p.consumer)
            rows = p.rows or (0, producer.out_features)
            cov = covs[p.consumer].covariance() if covs else None
            q = T.rotation_matrix(self.rotation, rows[1] - rows[0], self.seed, covariance=cov)
            T.rotate_linear_output_rows(producer, q, rows)
            T.rotate_linear_input(consumer, q)


@register_step
@dataclass
class Quantize(Step):
    """Wrap Linears / depthwise Conv1d into fake-quant modules, add activation quantizers,
    calibrate the static ones, freeze.

    weight / activation: the specs (None leaves that side in FP). ``dynamic`` activations get
    their parameters per call (e.g. per token); static ones are calibrated with
    ``act_observer``. ``conv_weight`` is the Conv1d weight spec (default: ``weight`` when its
    granularity suits a (C, 1, K) kernel, per-channel otherwise).

    Activation quantizers go where the adapter's structure says: the inputs of
    ``act_inputs`` (default: every target), the outputs of ``act_outputs``, and the
    ``act_sites``. Each has a site name — ``"<module>:input"``, ``"<module>:output"`` or the
    ActSite's module name — and ``overrides`` maps fnmatch patterns over site names to
    ``{"observer": ..., "observer_kwargs": {...}, "activation": {spec dict}, "dynamic": bool}``
    (e.g. Quamba's percentile observer at ``"*.u_site"``). The last matching pattern wins.
    """

    kind: ClassVar[str] = "quantize"
    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    dynamic: bool = False
    act_observer: str = "minmax"
    act_observer_kwargs: dict = field(default_factory=dict)
    weight_observer: str = "minmax"
    weight_observer_kwargs: dict = field(default_factory=dict)
    conv_weight: QuantSpec | None = None
    overrides: dict = field(default_factory=dict)
    #: fnmatch patterns of the structure's ``optional_act_sites`` to quantize too
    optional_sites: list[str] = field(default_factory=list)
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)

    def _site_configs(self) -> list[dict]:
        """The activation settings a site can end up with: the step's own, each override on top of
        them, and all of them in order (a site may match several patterns)."""
        base = {"activation": self.activation, "dynamic": self.dynamic}
        merged = dict(base)
        for over in self.overrides.values():
            merged.update(over)
        return [base, *({**base, **over} for over in self.overrides.values()), merged]

    def needs_calibration(self) -> bool:
        if self.activation is None and not self.overrides:
            return False
        return any(c.get("activation") is not None and not c.get("dynamic") for c in self._site_configs())

    def _targets(self, s: ModelStructure) -> list[str]:
        skip = set(s.skip) | set(self.ignore)
        return [n for n in (self.targets if self.targets is not None else s.quantize) if n not in skip]

    def quantizes_anything(self, s: ModelStructure) -> bool:
        """Whether this step has any weight or activation to quantize in a model of structure ``s``."""
        if self._targets(s):
            return True
        if self.activation is None and not self.overrides:
            return False
        skip = set(s.skip) | set(self.ignore)
        optional = [n for n in s.optional_act_sites if any(fnmatch.fnmatchcase(n, p) for p in self.optional_sites)]
        return any(n not in skip for n in (s.act_inputs or []) + s.act_outputs) or bool(s.act_sites or optional)

    def _act(self, site: str) -> ActQuantizer | None:
        cfg = {"observer": self.act_observer, "observer_kwargs": dict(self.act_observer_kwargs),
               "activation": self.activation, "dynamic": self.dynamic}
        for pattern, over in self.overrides.items():
            if fnmatch.fnmatchcase(site, pattern):
                cfg.update(over)
        spec = cfg["activation"]
        if spec is None:
            return None
        if isinstance(spec, dict):
            spec = QuantSpec.from_dict(spec)
        return ActQuantizer(spec, dynamic=cfg["dynamic"], observer=cfg["observer"],
                            observer_kwargs=cfg["observer_kwargs"])

    def _conv_spec(self) -> QuantSpec | None:
        if self.conv_weight is not None or self.weight is None:
            return self.conv_weight
        if self.weight.granularity in ("tensor", "channel") and self.weight.axis == 0:
            return self.weight
        return QuantSpec(format=self.weight.format, bits=self.weight.bits, symmetric=self.weight.symmetric,
                         granularity="channel", axis=0)

    def _wrap(self, model: nn.Module, name: str, weight: bool) -> nn.Module:
        """The quantized wrapper at ``name`` (wrapping the FP module first if needed)."""
        mod = get_submodule(model, name)
        if isinstance(mod, (QuantLinear, QuantConv1d)):
            if weight and isinstance(mod, QuantLinear) and not mod.frozen:
                mod.weight_spec = None if self.weight is None else self.weight.validate()
                mod.weight_observer, mod.weight_observer_kwargs = self.weight_observer, dict(self.weight_observer_kwargs)
            return mod
        kw = dict(weight_observer=self.weight_observer, weight_observer_kwargs=self.weight_observer_kwargs)
        if isinstance(mod, nn.Linear):
            wrapped = QuantLinear.from_float(mod, weight_spec=self.weight if weight else None, **kw)
        elif isinstance(mod, nn.Conv1d):
            wrapped = QuantConv1d(mod, weight_spec=self._conv_spec() if weight else None, **kw)
        else:
            raise TypeError(f"cannot quantize {name!r}: {type(mod).__name__} is not an nn.Linear or nn.Conv1d")
        set_submodule(model, name, wrapped)
        return wrapped

    def apply(self, model: nn.Module, ctx: Context) -> None:
        s = ctx.structure
        skip = set(s.skip) | set(self.ignore)
        targets = self._targets(s)
        for name in targets:
            self._wrap(model, name, weight=True)
        if self.activation is not None or self.overrides:
            inputs = targets if s.act_inputs is None else [n for n in s.act_inputs if n not in skip]
            for name in inputs:
                self._wrap(model, name, weight=False).input_quantizer = self._act(f"{name}:input")
            for name in s.act_outputs:
                if name not in skip:
                    self._wrap(model, name, weight=False).output_quantizer = self._act(f"{name}:output")
            optional = [n for n in s.optional_act_sites if any(fnmatch.fnmatchcase(n, p) for p in self.optional_sites)]
            for name in s.act_sites + optional:
                site = get_submodule(model, name)
                if not isinstance(site, ActSite):
                    raise TypeError(f"activation site {name!r} is a {type(site).__name__}, expected ActSite")
                site.quantizer = self._act(name)
        # Weights are quantized once, before activation calibration: observers then see the
        # activations the deployed model produces, and no weight is re-quantized per batch.
        for mod in quantized_modules(model).values():
            if hasattr(mod, "freeze_weight"):
                mod.freeze_weight()
        static = any(not q.dynamic for _, q in act_quantizers(model) if q.mode != "quantize")
        if static:
            calibrate(model, ctx.batches(self.kind), forward_fn=ctx.forward_fn, progress=ctx.progress)
        else:
            freeze_model(model)


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


__all__ = ["Recipe", "Step", "SmoothQuant", "RotateResidual", "OnlineHadamard", "RotatePairs", "Quantize", "apply_recipe",
           "register_step", "STEPS", "Context", "ModelSnapshot",
           "quantized_modules"]
