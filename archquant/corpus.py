"""Moved to ``archquant.eval.corpus`` (it serves language models only); kept for older imports."""
from archquant.eval.corpus import *  # noqa: F401,F403
