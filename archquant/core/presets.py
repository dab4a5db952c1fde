"""Family-agnostic recipe presets, built from a flat options object.

A config's ``recipe:`` section is a preset ``name`` plus options; options left unset (None)
take the preset's own default, so ``recipe.name=smoothquant`` alone is a complete recipe and
``recipe.alpha=0.8`` tweaks it. Family adapters reuse these and add their own presets.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

from .formats import QuantSpec
from .recipe import OnlineHadamard, Quantize, Recipe, RotateResidual, SmoothQuant


@dataclass
class RecipeOptions:
    name: str = "static_minmax"
    w_bits: int | None = None
    a_bits: int | None = None
    #: "int", "fp8_e4m3", "fp8_e5m2", "mxfp4", "nvfp4" (weights and activations alike)
    w_format: str | None = None
    a_format: str | None = None
    w_granularity: str | None = None
    w_group_size: int | None = None
    w_symmetric: bool | None = None
    w_observer: str | None = None
    a_granularity: str | None = None
    a_observer: str | None = None
    #: percentile observer quantile (Quamba's α)
    percentile: float | None = None
    #: SmoothQuant migration strength
    alpha: float | None = None
    rotation: str | None = None
    rotation_seed: int | None = None
    #: MambaQuant: comma-separated sites whose rotation is KLT-enhanced (K·H) rather than a plain
    #: random Hadamard: "residual" (R1), "dt" (R5), "out" (R2); the paper's default is all three
    klt_sites: str | None = None

    def get(self, name: str, default):
        value = getattr(self, name)
        return default if value is None else value

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _spec(fmt: str, bits: int, symmetric: bool, granularity: str, group_size: int = 0, axis: int = 0) -> QuantSpec:
    if fmt == "mxfp4":
        return QuantSpec.mxfp4()
    if fmt == "nvfp4":
        return QuantSpec.nvfp4()
    if granularity == "group" and group_size <= 0:
        group_size = 128
    return QuantSpec(format=fmt, bits=bits, symmetric=symmetric, granularity=granularity,
                     axis=axis, group_size=group_size if granularity == "group" else 0).validate()


def weight_spec(o: RecipeOptions, granularity: str = "channel", bits: int = 8) -> QuantSpec:
    return _spec(o.get("w_format", "int"), o.get("w_bits", bits), o.get("w_symmetric", True),
                 o.get("w_granularity", granularity), o.get("w_group_size", 0), axis=0)


def act_spec(o: RecipeOptions, granularity: str) -> QuantSpec:
    return _spec(o.get("a_format", "int"), o.get("a_bits", 8), True, o.get("a_granularity", granularity), axis=-1)


def _static_quantize(o: RecipeOptions, observer: str = "minmax", observer_kwargs: dict | None = None,
                     w_granularity: str = "channel") -> Quantize:
    observer = o.get("a_observer", observer)
    kwargs = dict(observer_kwargs or {})
    if observer == "percentile":
        kwargs["alpha"] = o.get("percentile", kwargs.get("alpha", 0.99999))
    return Quantize(weight=weight_spec(o, w_granularity), activation=act_spec(o, "tensor"), dynamic=False,
                    act_observer=observer, act_observer_kwargs=kwargs, weight_observer=o.get("w_observer", "minmax"))


def rtn_dynamic(o: RecipeOptions) -> Recipe:
    """Round-to-nearest weights per channel, activations quantized per token at run time."""
    return Recipe("rtn_dynamic", [Quantize(weight=weight_spec(o), activation=act_spec(o, "token"), dynamic=True,
                                           weight_observer=o.get("w_observer", "minmax"))])


def static_minmax(o: RecipeOptions) -> Recipe:
    """Static per-tensor activation scales from min/max, no clipping, no transform."""
    return Recipe("static_minmax", [_static_quantize(o)])


def smoothquant(o: RecipeOptions) -> Recipe:
    """SmoothQuant (scales s = max|X|^α / max|W|^(1−α) folded into norms) + static per-tensor W8A8."""
    return Recipe("smoothquant", [SmoothQuant(alpha=o.get("alpha", 0.5)), _static_quantize(o)])


def hadamard_static(o: RecipeOptions) -> Recipe:
    """Residual rotation + online Hadamard at the adapter's sites + percentile-clipped static activations."""
    return Recipe("hadamard_static", [
        RotateResidual(rotation=o.get("rotation", "random_hadamard"), seed=o.get("rotation_seed", 0)),
        OnlineHadamard(),
        _static_quantize(o, observer="percentile"),
    ])


def weight_only(o: RecipeOptions) -> Recipe:
    """Weights only (default W4, groups of 128), activations left in floating point."""
    return Recipe("weight_only", [Quantize(weight=weight_spec(o, "group", bits=4), activation=None,
                                           weight_observer=o.get("w_observer", "minmax"))])


GENERIC_PRESETS: dict[str, Callable[[RecipeOptions], Recipe]] = {
    "rtn_dynamic": rtn_dynamic,
    "static_minmax": static_minmax,
    "smoothquant": smoothquant,
    "hadamard_static": hadamard_static,
    "weight_only": weight_only,
}
