"""Recipe presets: named recipes built from the config's ``recipe:`` options, all in one registry.

A preset is data: a name, a builder from options to a ``Recipe``, and the preset's own options
(``recipe.options``, declared as ``archquant.options.Option``). The generic presets are defined
here; a family registers its methods in the same registry (``register_preset``) and says which
presets it offers and with which defaults (``FamilyAdapter.presets`` / ``preset_defaults``), so a
preset that two families share is written once.

Options left unset (None) take the family's default for the preset, then the preset's own, so
``recipe.name=smoothquant`` alone is a complete recipe and ``recipe.alpha=0.8`` tweaks it. A recipe
can also be written out as steps (``recipe.steps``, see ``core.recipe.steps_from_config``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from ..options import Option, validate_options
from .formats import QuantSpec
from .recipe import OnlineHadamard, Quantize, Recipe, RotateResidual, SmoothQuant, steps_from_config

#: the preset used when a config names neither ``recipe.name`` nor ``recipe.steps``
DEFAULT_PRESET = "static_minmax"
#: the name a recipe written as steps gets when ``recipe.name`` is not given
CUSTOM_RECIPE = "custom"


@dataclass
class RecipeOptions:
    """The config's ``recipe:`` section: a preset ``name`` with its knobs, or explicit ``steps``."""

    name: str | None = None
    #: the recipe written out as steps: [{SmoothQuant: {alpha: 0.5}}, {Quantize: {...}}]; the knobs
    #: below then do not apply (each step carries its own values)
    steps: list[dict] | None = None
    #: options of the named preset (``Preset.options``), e.g. MambaQuant's klt_sites
    options: dict = field(default_factory=dict)
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

    #: the knobs a preset reads (everything but name, steps and options)
    KNOBS = ("w_bits", "a_bits", "w_format", "a_format", "w_granularity", "w_group_size", "w_symmetric",
             "w_observer", "a_granularity", "a_observer", "percentile", "alpha", "rotation", "rotation_seed")

    def get(self, name: str, default):
        value = getattr(self, name)
        return default if value is None else value

    @property
    def preset(self) -> str:
        return self.name or DEFAULT_PRESET

    def validate(self) -> "RecipeOptions":
        """Return ``self`` if the family-independent values are usable, else raise a one-line
        ``ValueError`` naming the option and what is allowed (``resolve_recipe`` calls it, so the
        Python API gets the same refusals as a config file)."""
        if self.steps is not None:
            given = [k for k in self.KNOBS if getattr(self, k) is not None] + (["options"] if self.options else [])
            if given:
                raise ValueError(f"recipe.{given[0]} has no effect beside recipe.steps: set it in the step it "
                                 f"belongs to (e.g. bits in the Quantize step's weight/activation)")
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


@dataclass(frozen=True)
class Preset:
    """A named recipe: ``build(options)`` makes the ``Recipe``; ``options`` declares ``recipe.options``."""

    name: str
    build: Callable[[RecipeOptions], Recipe]
    options: dict[str, Option] = field(default_factory=dict)

    @property
    def description(self) -> str:
        return (self.build.__doc__ or "").strip().split("\n\n")[0]

    def recipe(self, o: RecipeOptions, defaults: dict[str, Any] | None = None) -> Recipe:
        """The recipe for options ``o``; ``defaults`` (a family's ``preset_defaults``) fill unset knobs."""
        filled = {k: v for k, v in (defaults or {}).items() if getattr(o, k) is None}
        options = validate_options(o.options, self.options, "recipe.options", owner=f"preset {self.name!r}")
        return self.build(dataclasses.replace(o, name=self.name, options=options, **filled))

    __call__ = recipe  # a preset is also the builder adapters.recipes() used to return


#: every preset, generic and family-specific, by name
PRESETS: dict[str, Preset] = {}


def register_preset(name: str, options: dict[str, Option] | None = None):
    """Decorator: register ``build(options) -> Recipe`` as preset ``name``."""
    def register(build: Callable[[RecipeOptions], Recipe]):
        if name in PRESETS and PRESETS[name].build is not build:
            raise ValueError(f"recipe preset {name!r} is defined twice")
        PRESETS[name] = Preset(name, build, dict(options or {}))
        return build
    return register


def recipe_from_options(o: RecipeOptions, offered: dict[str, Callable[[RecipeOptions], Recipe]], *,
                        family: str) -> Recipe:
    """The ``Recipe`` a ``recipe:`` section describes: its steps, or the preset it names among
    ``offered`` (a family's ``recipes()``: name → builder with the family's defaults bound)."""
    o.validate()
    if o.steps is not None:
        return Recipe(o.name or CUSTOM_RECIPE, steps_from_config(o.steps))
    if o.preset not in offered:
        raise ValueError(f"unknown recipe {o.preset!r} for family {family!r}: allowed {', '.join(sorted(offered))}")
    return offered[o.preset](o)


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


def static_quantize(o: RecipeOptions, observer: str = "minmax", w_granularity: str = "channel",
                    overrides: dict | None = None) -> Quantize:
    """Static per-tensor activations (calibrated with ``observer``, or ``recipe.a_observer``)."""
    observer = o.get("a_observer", observer)
    kwargs = {"alpha": o.get("percentile", 0.99999)} if observer == "percentile" else {}
    return Quantize(weight=weight_spec(o, w_granularity), activation=act_spec(o, "tensor"), dynamic=False,
                    act_observer=observer, act_observer_kwargs=kwargs, weight_observer=o.get("w_observer", "minmax"),
                    overrides=dict(overrides or {}))


@register_preset("rtn_dynamic")
def rtn_dynamic(o: RecipeOptions) -> Recipe:
    """Round-to-nearest weights per channel, activations quantized per token at run time."""
    return Recipe("rtn_dynamic", [Quantize(weight=weight_spec(o), activation=act_spec(o, "token"), dynamic=True,
                                           weight_observer=o.get("w_observer", "minmax"))])


@register_preset("static_minmax")
def static_minmax(o: RecipeOptions) -> Recipe:
    """Static per-tensor activation scales from min/max, no clipping, no transform."""
    return Recipe("static_minmax", [static_quantize(o)])


@register_preset("smoothquant")
def smoothquant(o: RecipeOptions) -> Recipe:
    """SmoothQuant (scales s = max|X|^α / max|W|^(1−α) folded into norms) + static per-tensor W8A8."""
    return Recipe("smoothquant", [SmoothQuant(alpha=o.get("alpha", 0.5)), static_quantize(o)])


@register_preset("hadamard_static")
def hadamard_static(o: RecipeOptions) -> Recipe:
    """Residual rotation + online Hadamard at the adapter's sites + percentile-clipped static activations."""
    return Recipe("hadamard_static", [
        RotateResidual(rotation=o.get("rotation", "random_hadamard"), seed=o.get("rotation_seed", 0)),
        OnlineHadamard(),
        static_quantize(o, observer="percentile"),
    ])


@register_preset("weight_only")
def weight_only(o: RecipeOptions) -> Recipe:
    """Weights only (default W4, groups of 128), activations left in floating point."""
    return Recipe("weight_only", [Quantize(weight=weight_spec(o, "group", bits=4), activation=None,
                                           weight_observer=o.get("w_observer", "minmax"))])


#: the presets every family can offer (a family picks its own in ``FamilyAdapter.presets``)
GENERIC_PRESETS = ("rtn_dynamic", "static_minmax", "smoothquant", "hadamard_static", "weight_only")
