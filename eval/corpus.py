"""Text corpora for language-model calibration and evaluation.

The offline default is the Python standard library's own source: present on every machine
that runs archquant, never downloaded, never committed. It is split **by file** into train /
calibration / evaluation with a hash of each file's relative path, so the three splits are
disjoint by construction and stable across runs (for a given Python version, which the
reports record). Files with the same (normalized) text at several paths -- copies of one
``__main__.py``, of one ``__init__.py`` -- all go where the first of those paths (in sorted
order) goes, so the splits are disjoint by content too (see ``archquant.data``).

Other sources: local text files (each file one document; binary files are refused) and,
when online, HF datasets (wikitext-2, pile validation), whose item identities are
(dataset, split, row).

``document_digests`` and ``token_window_digests`` give a split's content digests.
"""
from __future__ import annotations

import functools
import hashlib
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from archquant.data import EMPTY_TEXT_DIGEST, digest_text, digest_tokens, label_digests

__all__ = [
    "STDLIB_SPLITS", "Document", "stdlib_root", "stdlib_documents", "MAX_NON_TEXT_FRACTION", "binary_content",
    "text_file_documents", "document_digests", "MIN_IDENTIFYING_TOKENS", "MIN_DISTINCT_TOKENS",
    "token_window_digests", "HF_DATASETS", "hf_documents", "describe_environment",
]

#: percent ranges of the path hash for each split
STDLIB_SPLITS = {"train": (0, 80), "calibration": (80, 90), "evaluation": (90, 100)}


@dataclass(frozen=True)
class Document:
    id: str  # stable identity, used to prove calibration and evaluation are disjoint
    text: bytes


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _bucket(relpath: str) -> int:
    return int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % 100


@functools.lru_cache(maxsize=2)
def _stdlib_buckets(root: Path) -> tuple[tuple[Path, str, int], ...]:
    """(path, relative path, bucket) of every standard-library source, sorted by path.

    The bucket is the hash of the relative path, except for a file whose non-empty normalized
    text an earlier path already has: it takes that path's bucket. Otherwise distinct files
    with one content (the stdlib has a few) could fall into calibration and evaluation and the
    content check would rightly refuse the default splits. Empty files are no content (and no
    digest), so they keep their own bucket. Cached: reading every file takes a fraction of a second.
    """
    first_bucket: dict[str, int] = {}
    files = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(root).as_posix()
        bucket = _bucket(rel)
        digest = digest_text(path.read_bytes())
        if digest != EMPTY_TEXT_DIGEST:
            bucket = first_bucket.setdefault(digest, bucket)
        files.append((path, rel, bucket))
    return tuple(files)


def stdlib_documents(split: str) -> list[Document]:
    """The ``split`` part of the standard library's ``*.py`` files, sorted by path."""
    if split not in STDLIB_SPLITS:
        raise ValueError(f"stdlib split {split!r} not allowed: allowed {', '.join(STDLIB_SPLITS)}")
    lo, hi = STDLIB_SPLITS[split]
    root = stdlib_root()
    docs = [Document(f"stdlib:{rel}", path.read_bytes()) for path, rel, bucket in _stdlib_buckets(root)
            if lo <= bucket < hi]
    if not docs:
        raise FileNotFoundError(f"no Python standard library sources found under {root}")
    return docs


#: control characters that plain text does not contain (tab, LF, VT, FF, CR and ESC are allowed)
_NON_TEXT_CHARS = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f\ufffd]")
#: above this fraction of undecodable bytes and control characters, a file is binary; below it,
#: a few stray bytes in a text file are tolerated (tokenizers replace them)
MAX_NON_TEXT_FRACTION = 0.05


def binary_content(data: bytes) -> str | None:
    """Why ``data`` is not text (``"ELF executable"``, ``"NUL bytes"``, ...), or None if it is text."""
    if data.startswith(b"\x7fELF"):
        return "ELF executable"
    if b"\x00" in data:
        return "NUL bytes"
    text = data.decode("utf-8", errors="replace")
    bad = len(_NON_TEXT_CHARS.findall(text))
    if text and bad / len(text) > MAX_NON_TEXT_FRACTION:
        return f"{100 * bad / len(text):.0f}% invalid UTF-8 or control characters"
    return None


def _read_text_file(path: Path) -> bytes:
    data = path.read_bytes()
    reason = binary_content(data)
    if reason is not None:
        raise ValueError(f"data file {path} is not text (binary content: {reason})")
    return data


def text_file_documents(path: str | Path) -> list[Document]:
    """Each text file under ``path`` (or ``path`` itself) is one document."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text data not found: {path}")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in
                                                 (".txt", ".md", ".py", ".jsonl", ".json", ".rst", ""))
    if not files:
        raise FileNotFoundError(f"no text files under {path}")
    return [Document(f"file:{p.resolve()}", _read_text_file(p)) for p in files]


# ------------------------------------------------------------------------------ content digests
def document_digests(docs: Sequence[Document]) -> dict[str, str]:
    """``{digest of the normalized text: document id}``; empty documents carry no content and are left out."""
    labelled = ((digest_text(d.text), d.id) for d in docs)
    return label_digests((digest, label) for digest, label in labelled if digest != EMPTY_TEXT_DIGEST)


#: a window shorter than this, or with fewer distinct tokens, is not evidence of a shared
#: source: 16 spaces or a ruler of "=" occur in any two code files at aligned offsets
MIN_IDENTIFYING_TOKENS = 64
MIN_DISTINCT_TOKENS = 8


def token_window_digests(windows: torch.Tensor, description: str) -> dict[str, str]:
    """``{digest of the token ids: "<description> window <i>"}`` for each row of ``windows`` (the
    exact token sequences fed to the model). Windows too short or too uniform to identify a
    source are left out (see ``MIN_IDENTIFYING_TOKENS``); the documents are still compared."""
    if windows.shape[-1] < MIN_IDENTIFYING_TOKENS:
        return {}
    return label_digests((digest_tokens(row), f"{description} window {i}") for i, row in enumerate(windows)
                         if row.unique().numel() >= MIN_DISTINCT_TOKENS)


HF_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text"),
    "pile_val": ("monology/pile-uncopyrighted", None, "text"),
}


def hf_documents(source: str, split: str) -> list[Document]:  # pragma: no cover - needs the network
    """Rows of an HF dataset (online only; needs the ``datasets`` package)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"data source {source!r} needs the 'datasets' package (pip install datasets) "
                         f"and network access") from None
    name, config, column = HF_DATASETS[source]
    try:
        kwargs = {"data_files": {"validation": "val.jsonl.zst"}} if source == "pile_val" else {}
        ds = datasets.load_dataset(name, config, split=split, **kwargs)
    except Exception as e:
        raise ValueError(f"cannot load dataset {name!r} split {split!r} ({type(e).__name__}): offline?") from None
    return [Document(f"{source}:{split}:{i}", row[column].encode()) for i, row in enumerate(ds) if row[column]]


def describe_environment() -> str:
    return f"Python {sys.version.split()[0]} standard library at {stdlib_root()}"
