"""Calibration / evaluation data as seen by the runner.

Every split carries the **content digests** of its items, each with a readable label, plus the
labels themselves (file paths, document ids, sample seeds) as ``item_ids``. The runner compares
them before anything is calibrated: calibrating on the evaluation set is the commonest way PTQ
papers flatter themselves, and archquant refuses to do it.

Labels alone prove nothing: the same file read through another source, a copy, a hardlink or a
symlink has another label. So the check compares what the items *are*. The digests are
family-neutral strings ``"<kind>:<sha256>"`` made by the ``digest_*`` helpers below:

* ``digest_text``   -- a document, after ``normalize_text`` (so a re-saved copy still matches);
* ``digest_bytes``  -- raw bytes (a file that is not text);
* ``digest_tokens`` -- a window of token ids fed to a model;
* ``digest_tensor`` -- any tensor sample (dtype, shape and values);
* ``digest_record`` -- any JSON-able identity: ``{"prompt": ..., "seed": ...}``,
  ``{"class": 3, "seed": 7}``, a 3D scene as ``{"files": {name: digest_bytes(...)}}``.

An adapter fills ``DataSplit.digests`` with ``{digest: label}``; ``check_disjoint`` refuses any
digest found in both splits, and refuses a split that has no digests at all (an adapter that
forgot to hash would otherwise make every pair of splits look disjoint).
"""
from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable

import torch

#: digest kind -> what it hashes, in the order a shared item is reported (documents before windows)
DIGEST_KINDS = {
    "text": "normalized document text",
    "bytes": "raw bytes",
    "record": "canonical JSON records",
    "tensor": "tensors (dtype, shape, values)",
    "tokens": "token-id windows",
}


# ------------------------------------------------------------------------------ digests
def _digest(kind: str, payload: bytes) -> str:
    return f"{kind}:{hashlib.sha256(payload).hexdigest()}"


def digest_kind(digest: str) -> str:
    return digest.split(":", 1)[0]


def digest_bytes(data: bytes) -> str:
    return _digest("bytes", bytes(data))


def normalize_text(data: bytes | str) -> str:
    """The text with everything a re-save may change taken out.

    UTF-8 (stray invalid bytes replaced, a BOM dropped), CRLF / CR line ends as LF, trailing
    whitespace of each line removed, blank lines at the start and end removed, Unicode NFC.
    """
    text = data.decode("utf-8", errors="replace") if isinstance(data, (bytes, bytearray)) else data
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
    return unicodedata.normalize("NFC", text)


def digest_text(data: bytes | str) -> str:
    return _digest("text", normalize_text(data).encode("utf-8"))


#: the digest of a document with no content (empty, or only whitespace): not an item to compare
EMPTY_TEXT_DIGEST = digest_text("")


def _not_json(value: Any):
    raise TypeError(f"a record field of type {type(value).__name__} is not JSON: "
                    f"digest it first (digest_bytes, digest_tensor) and put the digest in the record")


def digest_record(record: Any) -> str:
    """Digest of a JSON-able value, independent of key order and formatting (tuples = lists)."""
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                           allow_nan=False, default=_not_json)
    return _digest("record", canonical.encode("utf-8"))


def _tensor_payload(tensor: torch.Tensor) -> bytes:
    t = tensor.detach().cpu().contiguous()
    header = f"{t.dtype}|{tuple(t.shape)}|".encode()
    # viewed as bytes, so every dtype (bfloat16 included, which numpy lacks) hashes the same way
    return header + t.reshape(-1).view(torch.uint8).numpy().tobytes()


def digest_tensor(tensor: torch.Tensor) -> str:
    return _digest("tensor", _tensor_payload(tensor))


def digest_tokens(token_ids) -> str:
    """Digest of a 1-D window of token ids; the integer dtype does not matter (always int64)."""
    return _digest("tokens", _tensor_payload(torch.as_tensor(token_ids).to(torch.int64).reshape(-1)))


def label_digests(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """``{digest: label}`` from ``(digest, label)`` pairs; an item repeated in a split keeps its first label."""
    labelled: dict[str, str] = {}
    for digest, label in items:
        labelled.setdefault(digest, label)
    return labelled


# ------------------------------------------------------------------------------ splits
@dataclass
class DataSplit:
    """Batches ready for the model's forward function, plus the identity of every item in them."""

    description: str
    batches: list[Any]
    #: readable labels of the items (paths, document ids, sample seeds): what the report counts
    item_ids: frozenset[Hashable] = field(default_factory=frozenset)
    #: anything else an adapter's evaluation needs (e.g. a last-token task built from the split)
    extra: dict[str, Any] = field(default_factory=dict)
    #: content digest (``digest_*``) of every item -> a readable label of that item
    digests: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.batches)


class DataOverlapError(ValueError):
    """Calibration and evaluation data share items."""


class MissingContentDigestsError(RuntimeError):
    """A split cannot be compared by content: a bug in its family adapter, not in the user's input.

    A RuntimeError on purpose, so the runner shows the traceback instead of a one-line user error.
    """


def _require_digests(calibration: DataSplit, evaluation: DataSplit) -> set[str]:
    """The digest kinds both splits have; raises if either has none or they have none in common."""
    for role, split in (("calibration", calibration), ("evaluation", evaluation)):
        if not split.digests:
            raise MissingContentDigestsError(
                f"{role} data ({split.description}) has no content digests, so it cannot be checked disjoint "
                f"from the other split: its family adapter's load_data must fill DataSplit.digests")
    calibration_kinds = {digest_kind(d) for d in calibration.digests}
    evaluation_kinds = {digest_kind(d) for d in evaluation.digests}
    common = calibration_kinds & evaluation_kinds
    if not common:
        raise MissingContentDigestsError(
            f"calibration data ({calibration.description}) is hashed as {', '.join(sorted(calibration_kinds))} "
            f"and evaluation data ({evaluation.description}) as {', '.join(sorted(evaluation_kinds))}: "
            f"no kind in common to compare")
    return common


def _kind_rank(kind: str) -> int:
    return list(DIGEST_KINDS).index(kind) if kind in DIGEST_KINDS else len(DIGEST_KINDS)


def _overlap_error(calibration: DataSplit, evaluation: DataSplit, count: int, example: str) -> DataOverlapError:
    return DataOverlapError(
        f"calibration data ({calibration.description}) and evaluation data ({evaluation.description}) "
        f"overlap in {count} item(s), e.g. {example}: use disjoint sources or splits")


def check_disjoint(calibration: DataSplit, evaluation: DataSplit) -> dict[str, Any]:
    """Raise ``DataOverlapError`` if any calibration item is also an evaluation item, by content or by label.

    Returns what was compared, for the report::

        {"calibration_items": 140, "evaluation_items": 243,
         "compared_by": "sha256 of normalized document text and of token-id windows"}

    (items = distinct content digests of each split). Raises ``MissingContentDigestsError``
    when a split has no digests, or none of a kind the other split has.
    """
    kinds = _require_digests(calibration, evaluation)
    shared = [d for d in calibration.digests if d in evaluation.digests]  # in calibration's order
    if shared:
        first = min(shared, key=lambda d: _kind_rank(digest_kind(d)))  # a shared document says more than a window
        example = (f"calibration {calibration.digests[first]} has the same content as "
                   f"evaluation {evaluation.digests[first]}")
        raise _overlap_error(calibration, evaluation, len(shared), example)
    shared_labels = calibration.item_ids & evaluation.item_ids
    if shared_labels:
        raise _overlap_error(calibration, evaluation, len(shared_labels), sorted(map(str, shared_labels))[0])
    described = [DIGEST_KINDS.get(k, k) for k in sorted(kinds, key=lambda k: (_kind_rank(k), k))]
    return {"calibration_items": len(calibration.digests), "evaluation_items": len(evaluation.digests),
            "compared_by": "sha256 of " + " and of ".join(described)}
