"""The ``Quantize`` step: wrap Linears / depthwise Conv1d into fake-quant modules, add the
activation quantizers the structure names, calibrate the static ones, freeze."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from .calibration import calibrate
from .formats import QuantSpec
from .modules import ActQuantizer, ActSite, QuantConv1d, QuantLinear, act_quantizers, freeze_model
from .recipe import Context, Step, get_submodule, quantized_modules, register_step, set_submodule
from .structure import ModelStructure


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
