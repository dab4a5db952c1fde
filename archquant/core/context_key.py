"""The current context key: which regime a forward pass is in, e.g. a diffusion timestep.

Activation ranges can differ by orders of magnitude between regimes (early vs late denoising
steps). Code that runs the model sets the key around each call, ``with context_key(t): model(x)``;
a ``KeyedObserver`` then keeps statistics per key during calibration, and a static activation
quantizer calibrated that way picks the parameters of the current key at run time. Outside any
``context_key`` the key is None and everything keyless behaves as before.

Keys are ints, finite floats or strings: they are written into checkpoint configs (JSON).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Union

Key = Union[int, float, str]

_CURRENT: ContextVar[Key | None] = ContextVar("archquant_context_key", default=None)


def check_key(key: object) -> Key:
    """``key`` if it can be a context key, else a one-line ``ValueError``."""
    ok = (isinstance(key, (int, str)) and not isinstance(key, bool)) or (isinstance(key, float) and math.isfinite(key))
    if not ok:
        raise ValueError(f"context key {key!r} not allowed: allowed an int, a finite float or a string")
    return key


@contextmanager
def context_key(key: Key) -> Iterator[Key]:
    """Run the enclosed forward passes under ``key`` (nested: the innermost key holds)."""
    token = _CURRENT.set(check_key(key))
    try:
        yield key
    finally:
        _CURRENT.reset(token)


def current_context_key() -> Key | None:
    return _CURRENT.get()
