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

    def validate(self) -> "RecipeOptions":
        """Return ``self`` if the family-independent values are usable, else raise a one-line
        ``ValueError`` naming the option and what is allowed (``resolve_recipe`` calls it, so the
        Python API gets the same refusals as a config file)."""
        for name in ("w_bits", "a_bits", "w_group_size", "rotation_seed"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"recipe.{name} has value {v!r}: allowed values are integers")
        for name in ("percentile", "alpha"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ValueError(f"recipe.{name} has value {v!r}: allowed values are numbers")
        for name in ("w_bits", "a_bits"):
            v = getattr(self, name)
            if v is not None and not 2 <= v <= 8:
                raise ValueError(f"recipe.{name} has value {v}: allowed values are 2..8")
        if self.w_group_size is not None and self.w_group_size <= 0:
            raise ValueError(f"recipe.w_group_size has value {self.w_group_size}: allowed values are positive "
                             f"integers (e.g. 64, 128; used with w_granularity=group)")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise ValueError(f"recipe.alpha has value {self.alpha}: allowed values are in [0, 1]")
        if self.percentile is not None and not 0 < self.percentile <= 1:
            raise ValueError(f"recipe.percentile has value {self.percentile}: allowed values are in (0, 1]")
        return self

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


#: group size of group-wise weights when ``recipe.w_group_size`` is unset
DEFAULT_GROUP_SIZE = 128


def _spec(fmt: str, bits: int, symmetric: bool, granularity: str, group_size: int | None = None,
          axis: int = 0) -> QuantSpec:
    """``group_size`` (None: ``DEFAULT_GROUP_SIZE``) applies to granularity "group" only; an invalid one
    is refused, never replaced."""
    if fmt == "mxfp4":
        return QuantSpec.mxfp4()
    if fmt == "nvfp4":
        return QuantSpec.nvfp4()
    if granularity != "group":
        group_size = 0
    elif group_size is None:
        group_size = DEFAULT_GROUP_SIZE
    elif isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"recipe.w_group_size has value {group_size!r}: allowed values are positive integers "
                         f"(e.g. 64, 128; used with w_granularity=group)")
    return QuantSpec(format=fmt, bits=bits, symmetric=symmetric, granularity=granularity,
                     axis=axis, group_size=group_size).validate()


def weight_spec(o: RecipeOptions, granularity: str = "channel", bits: int = 8) -> QuantSpec:
    return _spec(o.get("w_format", "int"), o.get("w_bits", bits), o.get("w_symmetric", True),
                 o.get("w_granularity", granularity), o.w_group_size, axis=0)


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
