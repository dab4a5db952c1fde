"""What an adapter's evaluation receives and returns, for every family.

* ``Metric``: a metric's metadata (direction, unit, whether it is measured against the FP model,
  whether it is bit-reproducible). The report renders from it; the reload check uses it.
* ``EvalContext``: what one evaluation may use and produce. The FP evaluation runs first and may
  ``keep`` its outputs (logits, images, poses); every quantized evaluation (the saved model,
  each baseline, the real-kernel copy) then gets them as ``ctx.fp``, so FP outputs are computed
  once per run and FP-relative metrics (PSNR vs FP, pose error vs FP) cost no second FP pass.
  Evaluations may write files (sample grids, videos, point clouds) with ``ctx.artifact_path``;
  they land in the run's output directory and the report links them.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Metric:
    name: str
    #: True: lower is better (perplexity); False: higher is better (accuracy); None: neither
    lower_is_better: bool | None = None
    unit: str = ""
    #: measured against the FP model's outputs: only quantized rows have it
    relative_to_fp: bool = False
    #: bit-identical when the same model is evaluated twice; False (e.g. a sampler on
    #: nondeterministic kernels) keeps the metric out of the reload check's equality test
    reproducible: bool = True
    description: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def metric_table(metrics: "list[Metric] | tuple[Metric, ...]") -> dict[str, dict]:
    """name → metadata, in declared order (what the report stores)."""
    return {m.name: m.to_dict() for m in metrics}


_LABEL = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class EvalContext:
    """One evaluation's inputs besides the model and data, and what it leaves behind.

    label: which model is evaluated: "fp", the recipe's name, "real", "reload", a baseline's name.
    fp: what the FP evaluation kept (None while evaluating the FP model itself).
    output_dir: the run's (staging) output directory, or None (no artifacts, e.g. from the Python API).
    """

    label: str = "fp"
    fp: Any = None
    output_dir: Path | None = None
    artifacts: list[dict] = field(default_factory=list)
    #: what the report should say about this evaluation (e.g. a metric skipped, and why)
    notes: list[str] = field(default_factory=list)
    #: per-item results (one dict per image, video, ...), for families that score items one by one;
    #: the report keeps them, and a sharded run merges its ranks' items
    items: list[dict] | None = None
    kept: Any = None
    #: set by ``keep``: whether the FP evaluation kept anything
    has_kept: bool = False

    @property
    def is_fp(self) -> bool:
        return self.label == "fp"

    def keep(self, outputs: Any) -> None:
        """Called by the FP evaluation: outputs every quantized evaluation receives as ``ctx.fp``."""
        self.kept, self.has_kept = outputs, True

    def note(self, text: str) -> None:
        """Say something in the report about this evaluation, e.g. why a metric is absent (a metric
        that cannot be computed is left out and explained, never made up)."""
        if text not in self.notes:
            self.notes.append(text)

    def artifact_path(self, name: str) -> Path | None:
        """Where to write the file ``name`` of this evaluation (``artifacts/<label>/<name>``), or None when
        the run keeps no files; the caller then ``add_artifact``s it so the report links it."""
        if self.output_dir is None:
            return None
        directory = Path(self.output_dir) / "artifacts" / (_LABEL.sub("_", self.label) or "model")
        directory.mkdir(parents=True, exist_ok=True)
        return directory / name

    def add_artifact(self, path: Path, title: str, row: str | None = None, column: str | None = None) -> None:
        """Link ``path`` from the report. Files of one item in several forms (a video's MP4, GIF and
        frame strip) say their ``row`` (the item) and ``column`` (the form): the report then shows one
        table per model, a row per item, rather than a line per file."""
        rel = Path(path).resolve().relative_to(Path(self.output_dir).resolve())
        entry = {"path": rel.as_posix(), "title": title, "model": self.label}
        if row is not None and column is not None:
            entry.update(row=row, column=column)
        self.artifacts.append(entry)


def mean_over_items(rows: list[dict[str, float]], key: str) -> float:
    """The mean of one per-item metric, summed in item order (the same on any split of the items
    once they are gathered back in order)."""
    return float(sum(r[key] for r in rows) / len(rows))


def merge_item_means(rows: list[dict]) -> dict[str, float]:
    """Each metric's mean over per-item rows, summed in item order (so any sharding, gathered back
    in order, gives the same bits); the ``item`` index and a metric some item lacks are left out."""
    keys = [k for k in rows[0] if k != "item" and all(k in r for r in rows)] if rows else []
    return {k: mean_over_items(rows, k) for k in keys}


def snr_db(reference: Any, approx: Any) -> float:
    """Signal-to-noise ratio of ``approx`` against ``reference`` in dB (inf when identical)."""
    ref = reference.double()
    noise = float((approx.double() - ref).pow(2).sum())
    signal = float(ref.pow(2).sum())
    if math.isnan(noise) or math.isinf(noise):
        return math.nan if math.isnan(noise) else -math.inf
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf
