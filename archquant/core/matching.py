"""One language for selecting modules and activation sites, wherever a recipe selects them.

A pattern is one of (as llm-compressor's ``targets``):

* an exact name: ``layers.0.mixer.in_proj``;
* an fnmatch glob, when it holds ``*``, ``?`` or ``[``: ``*.u_site``, ``layers.*.mixer.out_proj``;
* a regular expression after ``re:``, matched against the whole name: ``re:.*(embedder|adaLN).*``.

Quantize targets, ignores and per-site overrides, and the structure's skips all use it. Site names
are module names, or ``<module>:input`` / ``<module>:output`` for a module's input or output.
"""
from __future__ import annotations

import fnmatch
import re
from functools import lru_cache
from typing import Iterable

_GLOB_CHARS = set("*?[")


def check_pattern(pattern: str, where: str) -> str:
    """``pattern`` if it is usable, else a one-line ``ValueError`` naming ``where`` (e.g. a bad regex)."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{where}: a pattern must be a non-empty string (an exact name, a glob such as "
                         f"'*.u_site', or 're:<regex>'), got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            _regex(pattern[3:])
        except re.error as e:
            raise ValueError(f"{where}: pattern {pattern!r} is not a valid regular expression: {e}") from None
    return pattern


@lru_cache(maxsize=512)
def _regex(body: str) -> re.Pattern:
    return re.compile(body)


def matches(name: str, pattern: str) -> bool:
    """Whether ``name`` is selected by ``pattern`` (see the module docstring)."""
    if pattern.startswith("re:"):
        return _regex(pattern[3:]).fullmatch(name) is not None
    if _GLOB_CHARS & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(matches(name, p) for p in patterns)


def select(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The names selected by any of ``patterns``, in the order of ``names``."""
    patterns = list(patterns)
    return [n for n in names if matches_any(n, patterns)]


def unmatched(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The patterns that select none of ``names`` (most often a typo)."""
    names = list(names)
    return [p for p in patterns if not any(matches(n, p) for n in names)]
