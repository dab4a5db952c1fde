"""Tests for archquant.core.hadamard (CPU, fast)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from archquant.core.hadamard import (
    SUPPORTED_K,
    apply_block_hadamard,
    apply_hadamard,
    block_hadamard_matrix,
    factor_size,
    hadamard_base,
    hadamard_info,
    hadamard_matrix,
    is_supported,
    random_hadamard_matrix,
    random_signs,
)

# Fingerprints of the base tables.  Kernels and saved checkpoints depend on the
# exact matrices, so any change to a construction must be deliberate: update
# these only together with a format/version bump.
BASE_TABLE_SHA256 = {
    1: "4bf5122f344554c5",
    12: "db7478025ce74776",
    20: "d04b560308676ee7",
    28: "3ec6c53133760a03",
    36: "1a7aed2f42a8c71d",
    40: "3c2e966aff899a31",
    44: "7608149d896734a0",
    52: "f50db5d0f93762d3",
    60: "91a505ae266d3871",
    68: "90f5a68830fdaf41",
    76: "290dc2c593bbcba4",
    84: "698e79250ff2545a",
    100: "89d400ecb6ea82c8",
    108: "7deb180ca8331131",
    124: "afa026e6da7dbf96",
    132: "1a068e9d8c241a50",
    140: "902eb66771c67a6b",
    148: "1a8964dfe75c61f5",
    164: "4f5d6f926990bd87",
    180: "a86da22a8b87e572",
    196: "1a89befa215d90f6",
    204: "53e0e2c5ecf0e989",
    212: "65c4da76bec47226",
    220: "f0261f6dad43abfd",
    228: "53d30d0b137cb7de",
    244: "30376ac95cbdb348",
    252: "38d86fa7cb27be6a",
}

UNSUPPORTED = [0, -4, 3, 6, 7, 14, 92, 116, 156, 172, 11008, 3 * 5 * 7 * 4]


def _sweep_sizes() -> list[int]:
    sizes = {2**e for e in range(13)}  # 1 .. 4096
    for k in SUPPORTED_K:
        m = k
        while m <= 8192:
            sizes.add(m)
            m *= 2
    sizes.update({1536, 5120})  # Mamba-130m / Mamba-2.8b d_inner
    return sorted(sizes)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.to(torch.int8).numpy().tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------- base tables

def test_supported_k_contains_required_orders():
    assert {12, 20, 28, 36, 40, 52, 60, 108, 140, 148} <= set(SUPPORTED_K)
    assert list(SUPPORTED_K) == sorted(set(SUPPORTED_K))
    assert all(k % 4 == 0 for k in SUPPORTED_K)


@pytest.mark.parametrize("k", (1,) + SUPPORTED_K)
def test_base_table_is_hadamard(k):
    h = hadamard_base(k)
    assert h.shape == (k, k) and h.dtype == torch.float32
    assert torch.all(h.abs() == 1)
    # Integer-valued float32 products are exact for k <= 252.
    assert torch.equal(h @ h.T, k * torch.eye(k))


def test_base_tables_are_pinned():
    assert set(BASE_TABLE_SHA256) == {1, *SUPPORTED_K}
    for k, digest in BASE_TABLE_SHA256.items():
        assert _sha(hadamard_base(k)) == digest, f"H_{k} changed"


def test_base_table_is_a_copy():
    h = hadamard_base(12)
    h.zero_()
    assert torch.all(hadamard_base(12).abs() == 1)


def test_paley1_prime_matches_textbook_formula():
    # Independent re-derivation for a prime q: chi(x) by Euler's criterion.
    q = 11
    chi = [0] + [1 if pow(x, (q - 1) // 2, q) == 1 else -1 for x in range(1, q)]
    s = torch.zeros(q + 1, q + 1)
    s[0, 1:] = 1
    s[1:, 0] = -1
    for i in range(q):
        for j in range(q):
            s[1 + i, 1 + j] = chi[(i - j) % q]
    assert torch.equal(hadamard_base(12), torch.eye(q + 1) + s)


def test_doubled_table():
    h20 = hadamard_base(20)
    assert torch.equal(hadamard_base(40), torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), h20))


def test_hadamard_base_rejects_unknown_order():
    with pytest.raises(ValueError, match="92"):
        hadamard_base(92)


# ----------------------------------------------------------------- sizes

def test_factor_size():
    assert factor_size(1) == (1, 1)
    assert factor_size(4096) == (1, 4096)
    assert factor_size(1536) == (12, 128)
    assert factor_size(5120) == (40, 128)  # 40 preferred over 20 * 256
    assert factor_size(20) == (20, 1)
    assert factor_size(14336) == (28, 512)
    assert factor_size(13824) == (108, 128)
    for k in SUPPORTED_K:
        assert factor_size(k * 4) == ((k, 4) if k != 20 else (40, 2))


@pytest.mark.parametrize("n", UNSUPPORTED)
def test_unsupported_sizes_raise(n):
    assert not is_supported(n)
    with pytest.raises(ValueError) as err:
        factor_size(n)
    msg = str(err.value)
    assert str(n) in msg and "block" in msg.lower() and "\n" not in msg
    with pytest.raises(ValueError, match=str(n)):
        hadamard_matrix(n)


def test_unsupported_message_suggests_block():
    with pytest.raises(ValueError, match="block=256"):
        factor_size(11008)


def test_hadamard_info():
    info = hadamard_info(1536)
    assert (info["n"], info["K"], info["pow2"]) == (1536, 12, 128)
    assert info["construction"] == "paley1(q=11)"
    assert hadamard_info(4096)["construction"] == "sylvester"
    assert hadamard_info(36)["construction"] == "paley2(q=17)"
    assert hadamard_info(5120)["construction"] == "sylvester_double(paley1(q=19))"
    assert "gf_modulus" in hadamard_info(28)
    json.dumps(hadamard_info(28))


# ----------------------------------------------------------------- dense matrices

@pytest.mark.parametrize("n", _sweep_sizes())
def test_normalized_matrix_is_orthogonal(n):
    if n <= 1024:
        h = hadamard_matrix(n, dtype=torch.float64)
        assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-5, rtol=0)
        return
    # Large n: a dense n^3 product is too slow for CI, so H^T (H v) = v is
    # checked on random probes instead: any error E = H^T H - I != 0 moves a
    # random Gaussian probe.  (Single-vector mv: much faster than an n x 2 matmul.)
    h = hadamard_matrix(n, dtype=torch.float64)
    gen = torch.Generator().manual_seed(n)
    for _ in range(2):
        v = torch.randn(n, generator=gen, dtype=torch.float64)
        assert torch.allclose(torch.mv(h.T, torch.mv(h, v)), v, atol=1e-5, rtol=0)


def test_kronecker_order_and_sylvester_natural_order():
    p = 16
    expected = torch.tensor([[(-1) ** bin(i & j).count("1") for j in range(p)] for i in range(p)])
    assert torch.equal(hadamard_matrix(p, normalized=False), expected.float())
    n = 12 * p
    h = hadamard_matrix(n, normalized=False)
    assert torch.equal(h, torch.kron(hadamard_base(12), expected.float()))
    a, b, c, d = 5, 3, 7, 11
    assert h[a * p + b, c * p + d] == hadamard_base(12)[a, c] * expected[b, d]


def test_dense_matrix_dtype_device_and_determinism():
    h64 = hadamard_matrix(1536, dtype=torch.float64)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(hadamard_matrix(1536, dtype=dtype), h64.to(dtype))
    assert torch.equal(hadamard_matrix(1536), hadamard_matrix(1536))
    assert hadamard_matrix(12, device="cpu").device.type == "cpu"
    m = hadamard_matrix(64, normalized=False, dtype=torch.int8)
    m.zero_()  # must not corrupt the cache
    assert torch.all(hadamard_matrix(64, normalized=False).abs() == 1)


def test_random_signs_and_random_hadamard():
    s = random_signs(1024, 0)
    assert s.dtype == torch.float32 and torch.all(s.abs() == 1)
    assert _sha(s) == "15f0cb51143ed50f"  # pinned: rotations are saved by seed
    n = 1536
    q0 = random_hadamard_matrix(n, 0, dtype=torch.float64)
    assert torch.allclose(q0 @ q0.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    assert torch.equal(q0, random_hadamard_matrix(n, 0, dtype=torch.float64))
    assert not torch.equal(q0, random_hadamard_matrix(n, 1, dtype=torch.float64))
    # Convention: Q = diag(s) H, so x @ Q flips signs first, then rotates.
    signs = random_signs(n, 0).double()
    assert torch.equal(q0, signs[:, None] * hadamard_matrix(n, dtype=torch.float64))
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(x @ q0, apply_hadamard(x * signs), atol=1e-10)


def test_block_hadamard_matrix_structure():
    n, block = 96, 32
    m = block_hadamard_matrix(n, block)
    h = hadamard_matrix(block)
    for i in range(n // block):
        for j in range(n // block):
            blk = m[i * block:(i + 1) * block, j * block:(j + 1) * block]
            assert torch.equal(blk, h if i == j else torch.zeros_like(h))
    assert torch.allclose(m @ m.T, torch.eye(n), atol=1e-5)
    assert block_hadamard_matrix(120, 12, normalized=False).abs().sum() == 120 * 12


@pytest.mark.parametrize("n, block", [(96, 7), (100, 12), (14, 7), (64, 0)])
def test_block_hadamard_errors(n, block):
    with pytest.raises(ValueError):
        block_hadamard_matrix(n, block)
    with pytest.raises(ValueError):
        apply_block_hadamard(torch.randn(2, n), block)


# ----------------------------------------------------------------- fast apply

def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("n", [1, 2, 12, 40, 1536, 4096, 5120, 148 * 8])
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
def test_apply_hadamard_matches_dense(n, lead):
    torch.manual_seed(n)
    x = torch.randn(*lead, n)
    h = hadamard_matrix(n)
    y = apply_hadamard(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert _rel_err(y, x @ h) < 1e-5
    assert _rel_err(apply_hadamard(x, n, transpose=True), x @ h.T) < 1e-5
    assert _rel_err(apply_hadamard(y, transpose=True), x) < 1e-5
    hu = hadamard_matrix(n, normalized=False)
    assert _rel_err(apply_hadamard(x, normalized=False), x @ hu) < 1e-5


def test_apply_hadamard_dtypes_and_layout():
    n = 1536
    x = torch.randn(4, n, dtype=torch.float64)
    assert torch.allclose(apply_hadamard(x), x @ hadamard_matrix(n, dtype=torch.float64), atol=1e-12)
    xh = torch.randn(4, n).half()
    yh = apply_hadamard(xh)
    assert yh.dtype == torch.float16
    ref = (xh.float() @ hadamard_matrix(n)).half()
    assert torch.allclose(yh.float(), ref.float(), atol=2e-3, rtol=2e-3)
    xt = torch.randn(n, 3).T  # non-contiguous
    assert _rel_err(apply_hadamard(xt), xt @ hadamard_matrix(n)) < 1e-5


def test_apply_hadamard_errors():
    with pytest.raises(ValueError):
        apply_hadamard(torch.randn(3, 12), 24)
    with pytest.raises(ValueError, match="92"):
        apply_hadamard(torch.randn(3, 100 - 8))
    with pytest.raises(TypeError):
        apply_hadamard(torch.ones(4, 12, dtype=torch.int32))


# 2752 = 172 * 16 has no Hadamard matrix of its own: the block form still works.
@pytest.mark.parametrize("n, block", [(1536, 128), (2752, 16), (96, 12), (64, 64)])
def test_apply_block_hadamard(n, block):
    x = torch.randn(2, 3, n)
    m = block_hadamard_matrix(n, block)
    y = apply_block_hadamard(x, block)
    assert _rel_err(y, x @ m) < 1e-5
    assert _rel_err(apply_block_hadamard(x, block, transpose=True), x @ m.T) < 1e-5
    assert _rel_err(apply_block_hadamard(y, block, transpose=True), x) < 1e-5


def test_documented_index_convention_holds():
    """The module doc's conventions, checked on the matrix: H_n[a*P + b, c*P + d] = H_K[a, c] * H_P[b, d]
    with H_P[b, d] = (-1)^popcount(b & d), and every entry of the normalised matrix is ±1/sqrt(n)."""
    k, p = 12, 8
    h = hadamard_matrix(k * p, normalized=False, dtype=torch.float64)
    hk = hadamard_base(k).double()
    for a, b, c, d in [(0, 0, 0, 0), (3, 5, 7, 2), (11, 7, 11, 7), (5, 1, 2, 6)]:
        h_p = (-1.0) ** bin(b & d).count("1")
        assert h[a * p + b, c * p + d].item() == hk[a, c].item() * h_p
    assert torch.equal(h, torch.kron(hk, torch.tensor([[(-1.0) ** bin(i & j).count("1") for j in range(p)]
                                                        for i in range(p)], dtype=torch.float64)))
    assert torch.allclose(hadamard_matrix(12).abs(), torch.full((12, 12), 12 ** -0.5))


def test_edge_cases():
    x = torch.randn(3, 1)
    y = apply_hadamard(x, normalized=False)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    with pytest.raises(ValueError):
        apply_hadamard(torch.tensor(1.0))
    with pytest.raises(ValueError):
        hadamard_matrix(12, dtype=torch.int8)  # normalised int8 would be all zeros
    assert factor_size(np.int64(1536)) == (12, 128)
    assert not is_supported(12.0) and not is_supported(True)
