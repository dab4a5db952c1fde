"""The interface every model family implements, and the registry that finds them.

An adapter knows how to load its family's checkpoints, how to call the model on a batch,
where the fusion sites are (``structure``), which recipes make sense, and how to score the
model. It never rotates or quantizes anything itself: the core does that.
"""
from __future__ import annotations

import functools
import importlib
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

from torch import nn

from ..core.presets import GENERIC_PRESETS, PRESETS, RecipeOptions
from ..core.recipe import Recipe, check_something_to_quantize
from ..core.structure import ModelStructure
from ..data import DataSplit
from ..evaluation import EvalContext, Metric
from ..options import validate_options


class FamilyAdapter(ABC):
    """A family is this adapter, a model package and configs: the config loader, the runner and
    the report learn everything family-specific from the declarations below."""

    name: ClassVar[str]
    #: ``model.options`` accepted in a config: name → ``archquant.options.Option`` (or a plain default)
    model_options: ClassVar[dict[str, Any]] = {}
    #: ``calibration.options`` / ``evaluation.options``: name → ``Option`` (its ``roles`` say which section)
    data_options: ClassVar[dict[str, Any]] = {}
    #: data.source values this family can read
    data_sources: ClassVar[tuple[str, ...]] = ()
    #: what ``evaluate`` returns, first = the headline metric (``archquant.evaluation.Metric``)
    metrics: ClassVar[tuple[Metric, ...]] = ()
    #: how messages name the architectures that ``architecture`` returns (default: as returned)
    architecture_names: ClassVar[dict[str, str]] = {}
    #: the recipe presets this family offers (names in ``core.presets.PRESETS``; a family's own
    #: methods are registered there with ``register_preset`` by its recipes module)
    presets: ClassVar[tuple[str, ...]] = GENERIC_PRESETS
    #: per preset, the family's defaults for unset recipe knobs, e.g. {"static_minmax": {"w_granularity": "tensor"}}
    preset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    #: whether the family scores its evaluation items one by one (``evaluate_items`` / ``merge_items``),
    #: so that a ``torchrun`` job can split them across processes
    shards_evaluation: ClassVar[bool] = False

    @abstractmethod
    def load_model(self, path: str | None, options: dict[str, Any], dtype: str) -> tuple[nn.Module, dict]:
        """Load (or build) the FP model; returns it with a JSON-able config that ``build_model`` accepts."""

    def model_config(self, model: nn.Module) -> dict:
        """The config ``build_model`` needs to rebuild ``model``'s skeleton (asked again at save time,
        since a recipe can change it, e.g. untie an embedding from the head)."""
        return model.config.to_dict()

    @abstractmethod
    def build_model(self, model_config: dict) -> nn.Module:
        """An FP model skeleton from ``model_config`` (its weights are overwritten when loading a checkpoint)."""

    @abstractmethod
    def structure(self, model: nn.Module) -> ModelStructure:
        """Where the core may fold norms, rotate, smooth and quantize."""

    def recipes(self) -> dict[str, Callable[[RecipeOptions], Recipe]]:
        """The offered presets by name, each a builder ``RecipeOptions -> Recipe`` with this family's
        defaults bound."""
        missing = [n for n in self.presets if n not in PRESETS]
        if missing:
            raise ValueError(f"family {self.name!r} offers recipe preset {missing[0]!r}, which is not registered")
        return {n: functools.partial(PRESETS[n].recipe, defaults=self.preset_defaults.get(n)) for n in self.presets}

    @abstractmethod
    def load_data(self, data_cfg: dict, role: str, model_config: dict) -> DataSplit:
        """A calibration or evaluation split (``role`` is "calibration" or "evaluation")."""

    @abstractmethod
    def evaluate(self, model: nn.Module, data: DataSplit, ctx: EvalContext | None = None) -> dict[str, float]:
        """Metrics of ``model`` on an evaluation split (names and meaning: ``metrics``).

        The runner evaluates the FP model first with ``ctx.is_fp``; what it ``ctx.keep``s (its outputs
        on these inputs and seeds) comes back as ``ctx.fp`` to every quantized evaluation, for the
        FP-relative metrics. ``ctx.artifact_path`` gives files the report links (None: keep none).
        ``ctx`` is None when called outside the runner."""

    def evaluate_items(self, model: nn.Module, data: DataSplit, ctx: EvalContext) -> list[dict]:
        """(Families with ``shards_evaluation``.) One dict of metric values per item of ``data``, a
        rank's contiguous shard of the evaluation batches; each item's values must not depend on
        which other items are evaluated with it (its own seed, its own batch as in one process)."""
        raise NotImplementedError(f"family {self.name!r} does not score items one by one")

    def merge_items(self, rows: list[dict]) -> dict[str, float]:
        """(Families with ``shards_evaluation``.) The metrics of all items, given in item order;
        ``evaluate`` must give the same numbers from the same rows."""
        raise NotImplementedError(f"family {self.name!r} does not score items one by one")

    def probe_batch(self, data: DataSplit) -> Any:
        """A fixed batch whose outputs must be bit-identical between the saved and the reloaded
        model (``forward`` runs it): the first evaluation batch."""
        return data.batches[0]

    def data_options_of(self, data_cfg: dict, role: str) -> dict[str, Any]:
        """The validated ``options`` of a data section, defaults filled in. Keys of ``data_options``
        given at the top of the section (the older config form, or a direct caller's dict) count too."""
        raw = dict(data_cfg.get("options") or {})
        for key in self.data_options:
            if key in data_cfg and key not in raw:
                raw[key] = data_cfg[key]
        return validate_options(raw, self.data_options, f"{role}.options", family=self.name, role=role)

    def forward(self, model: nn.Module, batch: Any) -> Any:
        """How to run one calibration batch through the model."""
        return model(batch)

    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter understands ``model`` (for ``quantize_`` without an explicit family)."""
        return False

    def architecture(self, model: nn.Module) -> str | None:
        """The architecture of ``model`` within the family (e.g. "mamba1"), matched against the
        ``Step.architectures`` a recipe's steps declare; None: the family has one."""
        return None

    def validate_batch(self, model: nn.Module, batch: Any) -> None:
        """Raise ``ValueError`` (one line, no batch index: the caller adds it) when ``batch`` is not
        something ``forward(model, batch)`` can run, e.g. wrong dtype, rank or token ids out of
        vocabulary. Called for every calibration batch before the model is touched."""

    def check_model(self, model: nn.Module, recipe: Recipe) -> None:
        """Refuse, before anything is changed, a model this family does not recognise, a recipe
        meant for another architecture (``Recipe.architectures`` vs ``architecture(model)``), or
        one that finds nothing to quantize in it."""
        if not self.matches(model):
            raise ValueError(f"family {self.name!r} does not recognise a model of class {type(model).__name__}: "
                             f"pass a model of that family, or structure= with a Recipe object")
        allowed = recipe.architectures()
        arch = self.architecture(model)
        if allowed is not None and arch not in allowed:
            steps = [s.kind for s in recipe.steps if s.architectures is not None and arch not in s.architectures]
            if not allowed:
                raise ValueError(f"recipe {recipe.name!r} mixes steps meant for different architectures: "
                                 f"it fits no {type(model).__name__} model")
            names = self.architecture_names
            raise ValueError(f"recipe {recipe.name!r} is for {' / '.join(names.get(a, a) for a in allowed)} models "
                             f"(step {steps[0]!r}), but this {type(model).__name__} is a "
                             f"{names.get(arch, arch)} model")
        check_something_to_quantize(model, recipe, self.structure(model))


_ADAPTERS: dict[str, FamilyAdapter] = {}
#: family name -> module that registers it, imported on first use: ``import archquant`` loads no
#: family (and so no model code and no Triton) until one is asked for. A new family adds a line.
FAMILY_MODULES: dict[str, str] = {
    "mamba": "archquant.adapters.mamba",
    "toy": "archquant.adapters.toy",
    "dit": "archquant.adapters.dit",
    "vggt": "archquant.adapters.vggt",
}


def register_adapter(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    _ADAPTERS[cls.name] = cls()
    return cls


def register_family(name: str, module: str) -> None:
    """Declare a family living outside this package (a plugin): ``module`` registers it on import."""
    FAMILY_MODULES[name] = module


def get_adapter(name: str) -> FamilyAdapter:
    if name not in _ADAPTERS and name in FAMILY_MODULES:
        importlib.import_module(FAMILY_MODULES[name])
    if name not in _ADAPTERS:
        raise ValueError(f"unknown family {name!r}: allowed {', '.join(families())}")
    return _ADAPTERS[name]


def adapter_for(model: nn.Module) -> FamilyAdapter:
    for name in families():
        adapter = get_adapter(name)
        if adapter.matches(model):
            return adapter
    raise ValueError(f"no family recognises a model of class {type(model).__name__} "
                     f"(families: {', '.join(families())}): "
                     f"pass structure= with a Recipe object to quantize it")


def families() -> list[str]:
    return sorted(set(FAMILY_MODULES) | set(_ADAPTERS))
