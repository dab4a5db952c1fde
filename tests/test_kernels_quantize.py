"""archquant.kernels.quantize: Triton int8 quantization vs the core formats.

CPU CI runs the kernels in the Triton interpreter (the variable below must be set
before triton or the kernel modules are imported).  On a CUDA machine run
``TRITON_INTERPRET=0 pytest tests/test_kernels_*.py``: every test then runs on the
GPU, plus the ``gpu``-marked ones with larger shapes.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from archquant.core import formats as F  # noqa: E402
from kernel_testing import DEVICE, needs_gpu, requires_backend  # noqa: E402
from archquant.kernels.quantize import (  # noqa: E402
    quantize_per_token_int8,
    quantize_per_token_int8_reference,
    quantize_static_int8,
    quantize_static_int8_reference,
)

pytestmark = requires_backend
POISON_Q = -128  # never produced: the symmetric range is restricted to [-127, 127]


def activations(m, k, dtype=torch.float32, seed=0):
    """Rows of very different magnitudes with a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g).mul(10).add(0.01)
    x[:, torch.randint(0, k, (max(1, k // 50),), generator=g)] *= 20
    return x.to(dtype).to(DEVICE)


def poisoned(shape, dtype):
    fill = POISON_Q if dtype == torch.int8 else float("nan")
    return torch.full(shape, fill, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (5, 64), (33, 300), (3, 5000)])
def test_per_token_matches_core(shape, dtype):
    x = activations(*shape, dtype=dtype)
    q, s = quantize_per_token_int8(x, out=poisoned(shape, torch.int8),
                                   out_scale=poisoned((shape[0], 1), torch.float32))
    q_ref, s_ref = quantize_per_token_int8_reference(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (shape[0], 1)
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)


def test_per_token_small_blocks_loop_over_k():
    # Several K chunks with a ragged tail, and a ragged last row block.
    x = activations(9, 100, seed=1)
    q, s = quantize_per_token_int8(x, block_m=4, block_k=32, out=poisoned((9, 100), torch.int8))
    q_ref, s_ref = quantize_per_token_int8_reference(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_per_token_equals_core_spec_directly():
    x = activations(4, 48, dtype=torch.bfloat16, seed=2)
    spec = F.QuantSpec(bits=8, granularity="token")
    params = F.params_from_tensor(x, spec)
    q, s = quantize_per_token_int8(x)
    assert torch.equal(q, F.quantize(x, spec, params))
    assert torch.equal(s, params["scale"])


def test_round_half_to_even_ties():
    ties = torch.arange(-6, 6, dtype=torch.float32) + 0.5  # exact .5 values
    near = torch.tensor([0.49999997, -0.49999997, 2.5000002, -2.4999998, 126.5, -126.5])
    row = torch.cat([torch.tensor([127.0]), ties, near])  # amax 127 -> scale exactly 1
    x = torch.stack([row, -row, row * 0.5]).to(DEVICE)
    q, s = quantize_per_token_int8(x)
    assert torch.equal(s[:2].cpu(), torch.ones(2, 1))
    assert torch.equal(q[:2].float().cpu(), torch.round(x[:2].cpu()))
    assert torch.equal(q, quantize_per_token_int8_reference(x)[0])
    # Static scale 0.5: x / 0.5 hits the same ties.
    qs = quantize_static_int8(x * 0.5, 0.5)
    assert torch.equal(qs[:2].float().cpu(), torch.round(x[:2].cpu()))
    assert torch.equal(qs, quantize_static_int8_reference(x * 0.5, 0.5))


def test_zero_rows_get_min_scale():
    x = activations(3, 40)
    x[1] = 0.0
    q, s = quantize_per_token_int8(x)
    q_ref, s_ref = quantize_per_token_int8_reference(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert s[1].item() == torch.tensor(1e-8, dtype=torch.float32).item()
    assert torch.all(q[1] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["float", "0d", "per_token"])
def test_static_matches_core(kind, dtype):
    x = activations(17, 130, dtype=dtype, seed=3)
    if kind == "float":
        scale = 0.013  # small enough that the largest values saturate at ±127
    elif kind == "0d":
        scale = torch.tensor(0.05, device=DEVICE)
    else:
        scale = quantize_per_token_int8_reference(x)[1] * 0.7  # saturates some values
    q = quantize_static_int8(x, scale, out=poisoned((17, 130), torch.int8))
    q_ref = quantize_static_int8_reference(x, scale)
    assert torch.equal(q, q_ref)
    assert q.abs().max().item() == 127


def test_leading_dims_and_noncontiguous():
    base = activations(6, 80, seed=4)
    x3 = base.reshape(2, 3, 80)
    q, s = quantize_per_token_int8(x3)
    q_ref, s_ref = quantize_per_token_int8_reference(x3)
    assert q.shape == (2, 3, 80) and s.shape == (2, 3, 1)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    for x in (base[:, ::2], base.t()):  # strided columns, transposed
        q, s = quantize_per_token_int8(x)
        q_ref, s_ref = quantize_per_token_int8_reference(x)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
        assert torch.equal(quantize_static_int8(x, 0.1), quantize_static_int8_reference(x, 0.1))
    # Writing into a strided output view.
    big = poisoned((6, 160), torch.int8)
    quantize_per_token_int8(base, out=big[:, ::2])
    assert torch.equal(big[:, ::2], quantize_per_token_int8_reference(base)[0])
    assert torch.all(big[:, 1::2] == POISON_Q)


def test_empty_rows_and_bad_arguments():
    q, s = quantize_per_token_int8(torch.zeros(0, 8, device=DEVICE))
    assert q.shape == (0, 8) and s.shape == (0, 1)
    x = activations(4, 8)
    with pytest.raises(TypeError):
        quantize_per_token_int8(x.to(torch.int32))
    with pytest.raises(ValueError):
        quantize_per_token_int8(x, out=torch.empty(4, 8, dtype=torch.float32, device=DEVICE))
    with pytest.raises(ValueError):
        quantize_static_int8(x, torch.ones(3, device=DEVICE))  # neither 1 nor M values
    with pytest.raises(ValueError):
        quantize_per_token_int8(x, block_k=24)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_large_shapes_bit_exact(dtype):
    x = activations(4099, 4096 + 7, dtype=dtype, seed=5)
    q, s = quantize_per_token_int8(x, out=poisoned(x.shape, torch.int8))
    q_ref, s_ref = quantize_per_token_int8_reference(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    qs = quantize_static_int8(x, s_ref * 0.9)
    assert torch.equal(qs, quantize_static_int8_reference(x, s_ref * 0.9))
