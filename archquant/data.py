"""Calibration / evaluation data as seen by the runner.

Every split carries the identities of its items (file paths, document ids, sample seeds).
The runner compares them before anything is calibrated: calibrating on the evaluation set
is the commonest way PTQ papers flatter themselves, and archquant refuses to do it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable


@dataclass
class DataSplit:
    """Batches ready for the model's forward function, plus the identity of every item in them."""

    description: str
    batches: list[Any]
    item_ids: frozenset[Hashable] = field(default_factory=frozenset)
    #: anything else an adapter's evaluation needs (e.g. a last-token task built from the split)
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.batches)


class DataOverlapError(ValueError):
    """Calibration and evaluation data share items."""


def check_disjoint(calibration: DataSplit, evaluation: DataSplit) -> None:
    """Raise ``DataOverlapError`` if any calibration item is also an evaluation item."""
    common = calibration.item_ids & evaluation.item_ids
    if common:
        example = sorted(map(str, common))[0]
        raise DataOverlapError(
            f"calibration data ({calibration.description}) and evaluation data ({evaluation.description}) "
            f"overlap in {len(common)} item(s), e.g. {example}: use disjoint sources or splits")
