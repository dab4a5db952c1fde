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


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models: with two OpenMP threads on a busy 2-core box, thread hand-offs (not the
    arithmetic) dominate and a test file runs many times slower. One thread, same results.
    Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def perturbed_mamba(arch: str = "mamba1", seed: int = 0, noise_seed: int | None = None, scale: float = 0.1,
                    **config):
    """A small Mamba with the standard init, then Gaussian noise (``scale``) on every parameter
    (norms, A_log, D, biases included) so that no term of a formula hides behind a default value.
    Defaults: byte vocabulary, hidden 64, 2 layers; Mamba2 heads of 16 in 2 groups."""
    from archquant.models.mamba import MambaConfig, MambaLM, init_mamba_weights

    base = dict(arch=arch, vocab_size=256, hidden_size=64, num_layers=2)
    if arch == "mamba2":
        base.update(head_dim=16, n_groups=2)
    base.update(config)
    model = init_mamba_weights(MambaLM(MambaConfig(**base)), seed)
    g = torch.Generator().manual_seed(seed + 1 if noise_seed is None else noise_seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()
