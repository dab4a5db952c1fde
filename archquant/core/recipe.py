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
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from . import transforms as T
from .calibration import ForwardFn, calibrate, collect_stats
from .formats import QuantSpec
from .modules import (QUANT_MODULES, ActQuantizer, ActSite, QuantConv1d, QuantLinear, act_quantizers,
                      freeze_model)
from .observers import ChannelAbsMaxObserver
from .structure import ModelStructure


@dataclass
class Context:
    """What steps may need besides the model: its structure and the calibration batches."""

    structure: ModelStructure
    calib_batches: Iterable[Any] | None = None
    forward_fn: ForwardFn | None = None
    progress: bool = True
    timings: dict[str, float] = field(default_factory=dict)

    def batches(self, step: str) -> Iterable[Any]:
        if self.calib_batches is None:
            raise ValueError(f"recipe step '{step}' needs calibration data, but none was given")
        return self.calib_batches


STEPS: dict[str, type["Step"]] = {}


def register_step(cls: type["Step"]) -> type["Step"]:
    STEPS[cls.kind] = cls
    return cls


@dataclass
class Step:
    kind: ClassVar[str] = "step"

    def apply(self, model: nn.Module, ctx: Context) -> None:  # pragma: no cover - interface
        raise NotImplementedError

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
        targets = [n for n in (self.targets if self.targets is not None else s.quantize) if n not in skip]
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


def apply_recipe(model: nn.Module, recipe: Recipe, structure: ModelStructure, *,
                 calib_batches: Iterable[Any] | None = None, forward_fn: ForwardFn | None = None,
                 progress: bool = True) -> dict[str, float]:
    """Run every step of ``recipe`` on ``model`` in place; returns seconds spent per step."""
    ctx = Context(structure, calib_batches, forward_fn, progress)
    model.eval()
    for i, step in enumerate(recipe.steps):
        t0 = time.perf_counter()
        step.apply(model, ctx)
        ctx.timings[f"{i}:{step.kind}"] = time.perf_counter() - t0
    return ctx.timings


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
           "register_step", "STEPS", "Context", "quantized_modules"]
