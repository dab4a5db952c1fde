import os

import torch

# Triton kernels run through the interpreter on machines without a GPU. The variable is read
# when a kernel is decorated, so it must be set before any test module imports a kernel.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from archquant.models.toy import ToyConfig, init_toy_model, toy_task


@pytest.fixture
def toy_model():
    """An untrained (but deterministic) toy model with outlier norm channels."""
    return init_toy_model(ToyConfig(hidden_size=64, intermediate_size=128, num_layers=2, seed=0))


@pytest.fixture
def toy_batches():
    cfg = ToyConfig(hidden_size=64, intermediate_size=128, num_layers=2, seed=0)
    x, _ = toy_task(cfg, 256, split_seed=123)
    return list(x.split(64))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
