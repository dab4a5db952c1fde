"""Run archquant.run as one rank of a torchrun job, with a failure planted on rank 1's evaluation of
the quantized model (tests/test_distributed.py): the job must stop on every rank, no rank may hang."""
import os
import sys

from archquant.adapters.dit import DiTAdapter
from archquant.run import main

original = DiTAdapter.evaluate_items


def failing(self, model, data, ctx):
    if os.environ.get("RANK") == "1" and ctx.label == "lrq_dit":
        raise ValueError("planted failure on rank 1")
    return original(self, model, data, ctx)


DiTAdapter.evaluate_items = failing
sys.exit(main(sys.argv[1:]))
