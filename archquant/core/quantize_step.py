"""The ``Quantize`` step: wrap Linears / depthwise Conv1d into fake-quant modules, add the
activation quantizers the structure names, calibrate the static ones, freeze."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from . import matching
from .calibration import calibrate
from .formats import QuantSpec, get_format
from .modules import ActQuantizer, ActSite, QuantConv1d, QuantLinear, act_quantizers, freeze_model
from .observers import OBSERVERS
from .recipe import Context, Step, get_submodule, quantized_modules, register_step, set_submodule
from .structure import ModelStructure

#: attribute an earlier step (``dsfq.LearnableClipping`` with ``act_clip``) leaves on a Linear: the clip
#: ratio its input quantizer is to use, which ``Quantize`` hands to the dynamic quantizer it creates
LEARNED_INPUT_CLIP = "learned_input_clip"


def _granularity(spec) -> str | None:
    if isinstance(spec, dict):
        return spec.get("granularity", QuantSpec().granularity)
    return None if spec is None else spec.granularity


def check_observer(name: str, where: str) -> None:
    if name not in OBSERVERS:
        raise ValueError(f"{where} has value {name!r}: allowed values are {', '.join(sorted(OBSERVERS))}")


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
    ActSite's module name — and ``overrides`` maps patterns over site names to
    ``{"observer": ..., "observer_kwargs": {...}, "activation": {spec dict}, "dynamic": bool}``
    (e.g. Quamba's percentile observer at ``"*.u_site"``). The last matching pattern wins.

    ``targets`` (default: the structure's ``quantize`` list) and ``ignore`` select among the
    structure's quantizable modules; ``ignore`` and the structure's ``skip`` also drop activation
    sites of the modules they name. All of them are patterns of ``core.matching`` (exact names,
    globs, ``re:`` regexes), and a pattern that selects nothing is refused: it is most often a typo
    that would silently quantize what was meant to stay in floating point.
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
    #: patterns of the structure's ``optional_act_sites`` to quantize too
    optional_sites: list[str] = field(default_factory=list)
    #: patterns over the structure's ``quantize`` list (None: all of it)
    targets: list[str] | None = None
    #: patterns of modules (and their activation sites) left in floating point
    ignore: list[str] = field(default_factory=list)

    _OVERRIDE_KEYS = ("observer", "observer_kwargs", "activation", "dynamic")

    def validate(self, where: str = "quantize") -> None:
        for key in ("targets", "ignore", "optional_sites"):
            for i, pattern in enumerate(getattr(self, key) or []):
                matching.check_pattern(pattern, f"{where}.{key}[{i}]")
        for pattern, over in self.overrides.items():
            matching.check_pattern(pattern, f"{where}.overrides")
            if not isinstance(over, dict):
                raise ValueError(f"{where}.overrides[{pattern!r}] must be a mapping of "
                                 f"{', '.join(self._OVERRIDE_KEYS)}, got {over!r}")
            bad = [k for k in over if k not in self._OVERRIDE_KEYS]
            if bad:
                raise ValueError(f"{where}.overrides[{pattern!r}]: unknown key {bad[0]!r}: allowed "
                                 f"{', '.join(self._OVERRIDE_KEYS)}")
            if isinstance(over.get("activation"), dict):
                QuantSpec.from_dict(over["activation"])
        check_observer(self.act_observer, f"{where}.act_observer")
        check_observer(self.weight_observer, f"{where}.weight_observer")
        fitted_by = None if self.weight is None else get_format(self.weight.format).weight_observer
        if fitted_by is not None and self.weight_observer != fitted_by:
            raise ValueError(f"{where}.weight_observer is {self.weight_observer!r}, but weight format "
                             f"{self.weight.format!r} is fitted by the observer {fitted_by!r}: set weight_observer: {fitted_by}")
        for over in self.overrides.values():
            if "observer" in over:
                check_observer(over["observer"], f"{where}.overrides.observer")

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

    def notes(self) -> list[str]:
        per_tensor = [c for c in self._site_configs()[:-1]
                      if c.get("dynamic") and _granularity(c.get("activation")) == "tensor"]
        if not per_tensor:
            return []
        return ["activations are quantized dynamically per tensor (one scale over batch × sequence), so a "
                "sample's result depends on the other samples in its batch and on how its input is chunked; "
                "per-token dynamic or calibrated static scales do not"]

    def _skipped(self, s: ModelStructure, name: str) -> bool:
        return matching.matches_any(name, s.skip) or matching.matches_any(name, self.ignore)

    def _targets(self, s: ModelStructure) -> list[str]:
        chosen = s.quantize if self.targets is None else matching.select(s.quantize, self.targets)
        return [n for n in chosen if not self._skipped(s, n)]

    def _optional(self, s: ModelStructure) -> list[str]:
        return matching.select(s.optional_act_sites, self.optional_sites)

    def _act_site_names(self, s: ModelStructure) -> tuple[list[str], list[str], list[str]]:
        """Modules whose input / output gets a quantizer, and the ActSites that do."""
        targets = self._targets(s)
        inputs = targets if s.act_inputs is None else [n for n in s.act_inputs if not self._skipped(s, n)]
        outputs = [n for n in s.act_outputs if not self._skipped(s, n)]
        sites = [n for n in s.act_sites + self._optional(s) if not self._skipped(s, n)]
        return inputs, outputs, sites

    def check_selections(self, s: ModelStructure, model: nn.Module) -> None:
        """Refuse a target, ignore or optional-site pattern that selects nothing in this model (asked
        before the model is touched, by ``check_something_to_quantize``). Override patterns are
        not checked: they are conditional by nature ("where there is a u_site, clip it"), and one
        recipe may serve architectures that have different sites."""
        modules = [n for n, _ in model.named_modules() if n]
        candidates = {"targets": s.quantize, "ignore": modules, "optional_sites": s.optional_act_sites}
        for key, names in candidates.items():
            bad = matching.unmatched(names, getattr(self, key) or [])
            if bad:
                example = f" (e.g. {', '.join(names[:3])})" if names and key != "ignore" else ""
                raise ValueError(f"{self.kind}.{key}: pattern {bad[0]!r} selects nothing in this model{example}")

    def quantizes_anything(self, s: ModelStructure) -> bool:
        """Whether this step has any weight or activation to quantize in a model of structure ``s``."""
        if self._targets(s):
            return True
        if self.activation is None and not self.overrides:
            return False
        return (any(not self._skipped(s, n) for n in (s.act_inputs or []) + s.act_outputs)
                or any(not self._skipped(s, n) for n in s.act_sites + self._optional(s)))

    def _act(self, site: str, clip_ratio: float | None = None) -> ActQuantizer | None:
        cfg = {"observer": self.act_observer, "observer_kwargs": dict(self.act_observer_kwargs),
               "activation": self.activation, "dynamic": self.dynamic}
        for pattern, over in self.overrides.items():
            if matching.matches(site, pattern):
                cfg.update(over)
        spec = cfg["activation"]
        if spec is None:
            return None
        if isinstance(spec, dict):
            spec = QuantSpec.from_dict(spec)
        if clip_ratio is not None and not cfg["dynamic"]:
            raise ValueError(f"{self.kind}: {site!r} has a learned activation clip (learnable_clipping with "
                             "act_clip), which only a dynamic activation quantizer can apply: set dynamic: true")
        return ActQuantizer(spec, dynamic=cfg["dynamic"], observer=cfg["observer"],
                            observer_kwargs=cfg["observer_kwargs"], clip_ratio=1.0 if clip_ratio is None else clip_ratio)

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
            if hasattr(mod, LEARNED_INPUT_CLIP):  # the input quantizer added later still needs it
                setattr(wrapped, LEARNED_INPUT_CLIP, getattr(mod, LEARNED_INPUT_CLIP))
        elif isinstance(mod, nn.Conv1d):
            wrapped = QuantConv1d(mod, weight_spec=self._conv_spec() if weight else None, **kw)
        else:
            raise TypeError(f"cannot quantize {name!r}: {type(mod).__name__} is not an nn.Linear or nn.Conv1d")
        set_submodule(model, name, wrapped)
        return wrapped

    def apply(self, model: nn.Module, ctx: Context) -> None:
        s = ctx.structure
        self.check_selections(s, model)
        for name in self._targets(s):
            self._wrap(model, name, weight=True)
        if self.activation is not None or self.overrides:
            inputs, outputs, sites = self._act_site_names(s)
            for name in inputs:
                wrapped = self._wrap(model, name, weight=False)  # it carries a Linear's learned clip over
                wrapped.input_quantizer = self._act(f"{name}:input", getattr(wrapped, LEARNED_INPUT_CLIP, None))
            for name in outputs:
                self._wrap(model, name, weight=False).output_quantizer = self._act(f"{name}:output")
            for name in sites:
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


@register_step
@dataclass
class QuantizeWeights(Step):
    """Store the weights of Linears that stay out of activation quantization in a low-bit format
    (weight-only: their inputs stay in floating point, the weight is dequantized for the product).

    ``targets`` select among the structure's ``weight_only`` Linears (None: all of them), e.g. a
    DiT's adaLN modulation and embedders, a third of DiT-XL's parameters and about 2 B of FLUX's
    12 B, which activation-quantizing recipes keep in floating point. The default is int8 per
    output channel. Run it after the ``Quantize`` step: it touches only Linears that are still plain
    ``nn.Linear``s."""

    kind: ClassVar[str] = "quantize_weights"
    weight: QuantSpec = field(default_factory=lambda: QuantSpec(bits=8, granularity="channel", axis=0))
    weight_observer: str = "minmax"
    weight_observer_kwargs: dict = field(default_factory=dict)
    targets: list[str] | None = None

    def validate(self, where: str = "quantize_weights") -> None:
        for i, pattern in enumerate(self.targets or []):
            matching.check_pattern(pattern, f"{where}.targets[{i}]")
        self.weight.validate()
        check_observer(self.weight_observer, f"{where}.weight_observer")
        fitted_by = get_format(self.weight.format).weight_observer
        if fitted_by is not None and self.weight_observer != fitted_by:
            raise ValueError(f"{where}.weight_observer is {self.weight_observer!r}, but weight format "
                             f"{self.weight.format!r} is fitted by the observer {fitted_by!r}")

    def _targets(self, s: ModelStructure) -> list[str]:
        return list(s.weight_only) if self.targets is None else matching.select(s.weight_only, self.targets)

    def quantizes_anything(self, s: ModelStructure) -> bool:
        return bool(self._targets(s))

    def check_selections(self, s: ModelStructure, model: nn.Module) -> None:
        bad = matching.unmatched(s.weight_only, self.targets or [])
        if bad:
            example = f" (e.g. {', '.join(s.weight_only[:3])})" if s.weight_only else " (it declares none)"
            raise ValueError(f"{self.kind}.targets: pattern {bad[0]!r} selects no weight-only Linear of this "
                             f"model{example}")

    def apply(self, model: nn.Module, ctx: Context) -> None:
        s = ctx.structure
        self.check_selections(s, model)
        for name in self._targets(s):
            mod = get_submodule(model, name)
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"weight-only target {name!r} is a {type(mod).__name__}, expected nn.Linear")
            wrapped = QuantLinear.from_float(mod, weight_spec=self.weight, weight_observer=self.weight_observer,
                                             weight_observer_kwargs=self.weight_observer_kwargs)
            wrapped.freeze_weight()
            set_submodule(model, name, wrapped)
