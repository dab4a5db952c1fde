"""Text corpora for language-model calibration and evaluation.

The offline default is the Python standard library's own source: present on every machine
that runs archquant, never downloaded, never committed. It is split **by file** into train /
calibration / evaluation with a hash of each file's relative path, so the three splits are
disjoint by construction and stable across runs (for a given Python version, which the
reports record).

Other sources: local text files (each file one document) and, when online, HF datasets
(wikitext-2, pile validation), whose item identities are (dataset, split, row).
"""
from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

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


def stdlib_documents(split: str) -> list[Document]:
    """The ``split`` part of the standard library's ``*.py`` files, sorted by path."""
    if split not in STDLIB_SPLITS:
        raise ValueError(f"stdlib split {split!r} not allowed: allowed {', '.join(STDLIB_SPLITS)}")
    lo, hi = STDLIB_SPLITS[split]
    root = stdlib_root()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in path.parts or "__pycache__" in path.parts:
            continue
        if lo <= _bucket(rel) < hi:
            docs.append(Document(f"stdlib:{rel}", path.read_bytes()))
    if not docs:
        raise FileNotFoundError(f"no Python standard library sources found under {root}")
    return docs


def text_file_documents(path: str | Path) -> list[Document]:
    """Each text file under ``path`` (or ``path`` itself) is one document."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text data not found: {path}")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in
                                                 (".txt", ".md", ".py", ".jsonl", ".json", ".rst", ""))
    if not files:
        raise FileNotFoundError(f"no text files under {path}")
    return [Document(f"file:{p.resolve()}", p.read_bytes()) for p in files]


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
