import pytest
import torch

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
