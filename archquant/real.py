"""Moved to :mod:`archquant.backends.real`; older imports of ``archquant.real`` get that module itself."""
import sys
from .backends import real as _real
sys.modules[__name__] = _real
