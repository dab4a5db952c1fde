"""The interface every model family implements, and the registry that finds them.

An adapter knows how to load its family's checkpoints, how to call the model on a batch,
where the fusion sites are (``structure``), which recipes make sense, and how to score the
model. It never rotates or quantizes anything itself: the core does that.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

from torch import nn

from ..core.recipe import Recipe
from ..core.structure import ModelStructure
from ..data import DataSplit


class FamilyAdapter(ABC):
    name: ClassVar[str]
    #: model.options accepted in a config, with their defaults
    model_options: ClassVar[dict[str, Any]] = {}
    #: data.source values this family can read
    data_sources: ClassVar[tuple[str, ...]] = ()
    #: metric names, first = the headline metric; and whether lower is better for each
    metrics: ClassVar[dict[str, bool]] = {}

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

    @abstractmethod
    def recipes(self) -> dict[str, Callable[..., Recipe]]:
        """Recipe presets by name: each builds a ``Recipe`` from the config's recipe options."""

    @abstractmethod
    def load_data(self, data_cfg: dict, role: str, model_config: dict) -> DataSplit:
        """A calibration or evaluation split (``role`` is "calibration" or "evaluation")."""

    @abstractmethod
    def evaluate(self, model: nn.Module, data: DataSplit) -> dict[str, float]:
        """Metrics of ``model`` on an evaluation split."""

    def forward(self, model: nn.Module, batch: Any) -> Any:
        """How to run one calibration batch through the model."""
        return model(batch)

    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter understands ``model`` (for ``quantize_`` without an explicit family)."""
        return False


_ADAPTERS: dict[str, FamilyAdapter] = {}


def register_adapter(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    _ADAPTERS[cls.name] = cls()
    return cls


def get_adapter(name: str) -> FamilyAdapter:
    if name not in _ADAPTERS:
        raise ValueError(f"unknown family {name!r}: allowed {', '.join(sorted(_ADAPTERS))}")
    return _ADAPTERS[name]


def adapter_for(model: nn.Module) -> FamilyAdapter:
    for adapter in _ADAPTERS.values():
        if adapter.matches(model):
            return adapter
    raise ValueError(f"no family adapter recognises a {type(model).__name__}: pass structure= explicitly "
                     f"or one of the families {', '.join(sorted(_ADAPTERS))}")


def families() -> list[str]:
    return sorted(_ADAPTERS)
