"""Recipes: an ordered list of steps (smoothing, rotation, quantization) applied to a model.

The shape follows llm-compressor's modifiers and torchao's config objects: a recipe is data
(serialisable to a dict / YAML), each step is one small handler, and ``apply_recipe`` runs
them in order against the structure that a family adapter declared. Steps that need data
(smoothing statistics, static activation scales) run the calibration batches themselves.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from . import transforms as T
from .calibration import ForwardFn, calibrate, collect_stats
from .formats import QuantSpec
from .modules import QUANT_MODULES, ActQuantizer, QuantLinear, freeze_model
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
        q = T.rotation_matrix(self.rotation, s.hidden_size, self.seed)
        touched = [get_submodule(model, n) for n in s.embeddings + s.residual_writers]
        touched += [get_submodule(model, n) for g in s.residual_readers for n in g.linears]
        _untie(touched)
        for g in s.residual_readers:
            if g.norm is not None:
                T.fold_norm_into_linears(get_submodule(model, g.norm), [get_submodule(model, n) for n in g.linears])
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

    def apply(self, model: nn.Module, ctx: Context) -> None:
        for name in self.sites if self.sites is not None else ctx.structure.online_rotation_sites:
            lin = get_submodule(model, name)
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"online Hadamard site {name!r} is a {type(lin).__name__}, expected nn.Linear")
            transform = T.HadamardTransform(lin.in_features, seed=self.seed)
            T.rotate_linear_input(lin, transform.matrix())
            set_submodule(model, name, QuantLinear.from_float(lin, input_transform=transform))


@register_step
@dataclass
class Quantize(Step):
    """Wrap Linears into fake-quant ``QuantLinear``s, calibrate static activations, freeze.

    weight / activation: the specs (None leaves that side in FP). ``dynamic`` activations get
    their scales per call (e.g. per-token); static ones are calibrated with ``act_observer``.
    ``targets`` defaults to the adapter's ``quantize`` list; ``ignore`` adds names to skip.
    """

    kind: ClassVar[str] = "quantize"
    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    dynamic: bool = False
    act_observer: str = "minmax"
    act_observer_kwargs: dict = field(default_factory=dict)
    weight_observer: str = "minmax"
    weight_observer_kwargs: dict = field(default_factory=dict)
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)

    def _act(self) -> ActQuantizer | None:
        if self.activation is None:
            return None
        return ActQuantizer(self.activation, dynamic=self.dynamic, observer=self.act_observer,
                            observer_kwargs=self.act_observer_kwargs)

    def apply(self, model: nn.Module, ctx: Context) -> None:
        skip = set(ctx.structure.skip) | set(self.ignore)
        names = self.targets if self.targets is not None else ctx.structure.quantize
        for name in names:
            if name in skip:
                continue
            mod = get_submodule(model, name)
            if isinstance(mod, QuantLinear):  # already wrapped (e.g. by OnlineHadamard): keep its transform
                mod.weight_spec = None if self.weight is None else self.weight.validate()
                mod.weight_observer, mod.weight_observer_kwargs = self.weight_observer, dict(self.weight_observer_kwargs)
                mod.input_quantizer = self._act()
            elif isinstance(mod, nn.Linear):
                set_submodule(model, name, QuantLinear.from_float(
                    mod, weight_spec=self.weight, input_quantizer=self._act(),
                    weight_observer=self.weight_observer, weight_observer_kwargs=self.weight_observer_kwargs))
            else:
                raise TypeError(f"cannot quantize {name!r}: {type(mod).__name__} is not an nn.Linear")
        # Weights are quantized once, before activation calibration: observers then see the
        # activations the deployed model produces, and no weight is re-quantized per batch.
        for mod in quantized_modules(model).values():
            if hasattr(mod, "freeze_weight"):
                mod.freeze_weight()
        if self.activation is not None and not self.dynamic:
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
            for key in ("weight", "activation"):
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
    return {n: m for n, m in model.named_modules() if isinstance(m, types)}


__all__ = ["Recipe", "Step", "SmoothQuant", "RotateResidual", "OnlineHadamard", "Quantize", "apply_recipe",
           "register_step", "STEPS", "Context", "quantized_modules"]
