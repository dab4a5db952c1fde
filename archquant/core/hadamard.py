"""Hadamard matrices: the single source of truth for every rotation in archquant.

Offline weight fusion and the online (Triton) kernels must agree bit-for-bit on
which matrix "H_n" is, so everything here is deterministic and built from first
principles (no stored tables, no randomness except the explicitly seeded signs).

Conventions
-----------
* Sizes.  A size ``n`` is supported when ``n = K * 2^m`` with ``K == 1`` (pure
  power of two) or ``K`` in :data:`SUPPORTED_K`.  :func:`factor_size` returns
  ``(K, 2^m)``.

* Kronecker order.  ``H_n = kron(H_K, H_P)`` with ``P = 2^m``.  Index
  ``i = a * P + b`` with ``a < K`` (the slow, "outer" index) and ``b < P``
  (the fast, "inner" index), so ``H_n[a*P + b, c*P + d] = H_K[a, c] * H_P[b, d]``.
  A vector of length ``n`` is therefore reshaped to ``(K, P)`` (row-major).

* Power-of-two factor.  ``H_P`` is the Sylvester matrix in natural order:
  ``H_1 = [1]``, ``H_2P = [[H_P, H_P], [H_P, -H_P]]``, i.e.
  ``H_P[i, j] = (-1)^popcount(i & j)``.  It is symmetric.

* Base tables ``H_K`` (see :func:`hadamard_base`) are unnormalised ±1 matrices
  with ``H_K @ H_K.T == K * I``.  They are NOT symmetric in general, hence
  ``transpose=`` on the apply functions.

* Normalisation.  ``hadamard_matrix(n)`` is divided by ``sqrt(n)`` by default,
  which makes it orthogonal: ``H @ H.T == I``.  The inverse of ``y = x @ H`` is
  ``x = y @ H.T``.

* Row-vector convention.  All "apply" functions compute ``x @ M`` along the
  last axis of ``x`` (activations are row vectors, as in ``nn.Linear``).

Base-table constructions (deterministic rule, first one that applies):

1. Paley I   if ``q = K - 1`` is a prime power with ``q % 4 == 3``;
2. Paley II  if ``q = K/2 - 1`` is a prime power with ``q % 4 == 1``;
3. Sylvester doubling ``kron(H_2, H_{K/2})`` otherwise (only K = 40 uses it).

GF(q) for ``q = p^k`` is built as GF(p)[x]/(f) with ``f`` the smallest monic
irreducible polynomial of degree k (coefficients compared as the base-p
integer ``c_0 + c_1 p + ... + c_{k-1} p^{k-1}``).  Field element number ``i`` is
the polynomial whose coefficient digits are the base-p digits of ``i``; rows of
the Paley tables follow this element order.  :func:`hadamard_info` reports the
construction so it can be serialised next to a checkpoint.
"""

from __future__ import annotations

import math
import operator
from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "SUPPORTED_K",
    "hadamard_base",
    "factor_size",
    "is_supported",
    "hadamard_matrix",
    "hadamard_info",
    "random_signs",
    "random_hadamard_matrix",
    "block_hadamard_matrix",
    "apply_hadamard",
    "apply_block_hadamard",
]

# Base orders K of the non-power-of-two tables.  Every K except 40 has an odd
# K/4, so for a given n at most one of them fits n = K * 2^m -- except the pair
# 20 / 40 (see factor_size).  All are multiples of 4 up to 252 reachable by the
# Paley constructions; 92, 116, 156, 172, 188, 236 are missing because they
# need Williamson-type constructions (notably 11008 = 172 * 64, the Llama-2-7B
# MLP width: use a block-Hadamard transform there).
SUPPORTED_K: tuple[int, ...] = (
    12, 20, 28, 36, 40, 44, 52, 60, 68, 76, 84, 100, 108, 124, 132, 140, 148,
    164, 180, 196, 204, 212, 220, 228, 244, 252,
)

# Dense matrices are cached (as int8 ±1 patterns, 16 at most) only up to this
# size; a bigger one is rebuilt on every call so that a sweep over sizes cannot
# pin gigabytes of memory.  4096^2 int8 = 16 MiB.
_DENSE_CACHE_MAX_N = 4096


# --------------------------------------------------------------------------
# Small number theory / finite-field helpers
# --------------------------------------------------------------------------

def _prime_power(q: int) -> tuple[int, int] | None:
    """Return (p, k) with q == p**k for a prime p, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)  # smallest prime factor
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_rem(num: list[int], den: list[int], p: int) -> list[int]:
    """Remainder of num / den over GF(p); coefficients low -> high, den monic."""
    rem = list(num)
    d = len(den) - 1
    for top in range(len(rem) - 1, d - 1, -1):
        c = rem[top]
        if c:
            for t in range(d + 1):
                rem[top - d + t] = (rem[top - d + t] - c * den[t]) % p
    return rem[:d]


def _monic_polys(degree: int, p: int):
    """All monic polynomials of a degree, in increasing base-p order of c_0..c_{d-1}."""
    for code in range(p ** degree):
        yield [(code // p ** t) % p for t in range(degree)] + [1]


def _is_irreducible(f: list[int], p: int) -> bool:
    """f (monic) is irreducible iff no monic polynomial of degree <= deg/2 divides it."""
    k = len(f) - 1
    for d in range(1, k // 2 + 1):
        for g in _monic_polys(d, p):
            if not any(_poly_rem(f, g, p)):
                return False
    return True


@lru_cache(maxsize=None)
def _field_modulus(p: int, k: int) -> tuple[int, ...]:
    """Smallest monic irreducible polynomial of degree k over GF(p) (low -> high)."""
    if k == 1:
        return (0, 1)  # x: GF(p) itself, the modulus is never used
    return tuple(next(f for f in _monic_polys(k, p) if _is_irreducible(f, p)))


def _poly_to_str(f: tuple[int, ...]) -> str:
    """Human-readable polynomial, highest degree first, e.g. (1, 2, 0, 1) -> 'x^3 + 2x + 1'."""
    terms = []
    for t in range(len(f) - 1, -1, -1):
        c = f[t]
        if c == 0:
            continue
        monomial = "" if t == 0 else ("x" if t == 1 else f"x^{t}")
        coeff = "" if (c == 1 and t > 0) else str(c)
        terms.append(coeff + monomial)
    return " + ".join(terms)


def _field_digits(q: int) -> tuple[np.ndarray, int, int]:
    """(q, k) array of base-p digits of the element numbers 0..q-1, plus p and k."""
    p, k = _prime_power(q)
    idx = np.arange(q)
    digits = np.stack([(idx // p ** t) % p for t in range(k)], axis=1)
    return digits, p, k


def _quadratic_character(q: int) -> np.ndarray:
    """chi[i] for element number i of GF(q): 0 for zero, +1 for squares, -1 otherwise."""
    digits, p, k = _field_digits(q)
    f = list(_field_modulus(p, k))
    chi = -np.ones(q, dtype=np.int64)
    chi[0] = 0
    for i in range(1, q):
        a = [int(c) for c in digits[i]]
        square = [0] * (2 * k - 1)
        for s, cs in enumerate(a):
            for t, ct in enumerate(a):
                square[s + t] = (square[s + t] + cs * ct) % p
        square = _poly_rem(square, f, p) if k > 1 else square
        chi[sum(c * p ** t for t, c in enumerate(square))] = 1
    return chi


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(a_i - a_j) over GF(q) (element order as in the module doc)."""
    digits, p, k = _field_digits(q)
    diff = (digits[:, None, :] - digits[None, :, :]) % p  # digit-wise subtraction
    diff_index = (diff * (p ** np.arange(k))).sum(axis=-1)
    return _quadratic_character(q)[diff_index]


# --------------------------------------------------------------------------
# Base tables
# --------------------------------------------------------------------------

def _recipe(k: int) -> tuple[str, int]:
    """Which construction builds H_k: ("paley1", q), ("paley2", q) or ("double", k/2)."""
    q = k - 1
    pk = _prime_power(q)
    if pk and q % 4 == 3:
        return "paley1", q
    if k % 2 == 0:
        q = k // 2 - 1
        pk = _prime_power(q)
        if pk and q % 4 == 1:
            return "paley2", q
        if k // 2 in SUPPORTED_K:
            return "double", k // 2
    raise ValueError(f"no construction known for Hadamard base order {k}")


def _paley1(q: int) -> np.ndarray:
    """Order q+1 for q = 3 (mod 4): H = I + [[0, 1^T], [-1, Q]] (skew part has S S^T = qI)."""
    n = q + 1
    s = np.zeros((n, n), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)  # antisymmetric because chi(-1) = -1
    return np.eye(n, dtype=np.int64) + s


def _paley2(q: int) -> np.ndarray:
    """Order 2(q+1) for q = 1 (mod 4) from the symmetric conference matrix C.

    C = [[0, 1^T], [1, Q]] satisfies C C^T = qI.  Each 0 of C becomes
    [[1, -1], [-1, -1]] and each +-1 becomes +-[[1, 1], [1, -1]]; the cross
    terms cancel because the two 2x2 blocks are orthogonal to each other.
    """
    n = q + 1
    c = np.zeros((n, n), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)  # symmetric because chi(-1) = +1
    on_nonzero = np.array([[1, 1], [1, -1]])
    on_zero = np.array([[1, -1], [-1, -1]])
    return np.kron(c, on_nonzero) + np.kron(np.eye(n, dtype=np.int64), on_zero)


@lru_cache(maxsize=None)
def _base_table(k: int) -> np.ndarray:
    """The ±1 int8 table H_k (checked: H H^T = kI); read-only, shared by all callers."""
    if k == 1:
        table = np.ones((1, 1), dtype=np.int64)
    else:
        kind, arg = _recipe(k)
        if kind == "paley1":
            table = _paley1(arg)
        elif kind == "paley2":
            table = _paley2(arg)
        else:  # Sylvester doubling [[H, H], [H, -H]] = kron(H_2, H_half)
            table = np.kron(np.array([[1, 1], [1, -1]]), _base_table(arg))
    # The checks are cheap for k <= 252 and turn a construction slip into an
    # immediate error instead of a silently wrong rotation.
    if table.shape != (k, k) or not np.all(np.abs(table) == 1):
        raise RuntimeError(f"Hadamard base table {k} is not a ±1 {k}x{k} matrix")
    if not np.array_equal(table @ table.T, k * np.eye(k, dtype=np.int64)):
        raise RuntimeError(f"Hadamard base table {k} is not orthogonal")
    table = table.astype(np.int8)
    table.setflags(write=False)
    return table


def _construction_name(k: int) -> str:
    if k == 1:
        return "sylvester"
    kind, arg = _recipe(k)
    if kind == "double":
        return f"sylvester_double({_construction_name(arg)})"
    return f"{kind}(q={arg})"


def hadamard_base(k: int) -> torch.Tensor:
    """Unnormalised ±1 base table H_K (float32, CPU, fresh tensor) with H H^T = K I.

    ``k`` must be 1 or in :data:`SUPPORTED_K`.  The table is built once and cached;
    the returned tensor is a copy, so callers may modify it.
    """
    if k != 1 and k not in SUPPORTED_K:
        raise ValueError(f"no Hadamard base table of order {k}: supported orders are 1 and {SUPPORTED_K}")
    return torch.from_numpy(_base_table(k).astype(np.float32))


# --------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------

def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _as_size(n) -> int | None:
    """n as a positive Python int (numpy/torch integers accepted), or None."""
    if isinstance(n, bool):
        return None
    try:
        n = operator.index(n)
    except TypeError:
        return None
    return n if n >= 1 else None


def _find_factor(n) -> tuple[int, int] | None:
    n = _as_size(n)
    if n is None:
        return None
    if _is_pow2(n):
        return 1, n
    # Largest K wins.  Only 20 and 40 can both fit (n = 20 * 2^m, m >= 1), and
    # 40 is then used, e.g. 5120 -> (40, 128).
    for k in sorted(SUPPORTED_K, reverse=True):
        if n % k == 0 and _is_pow2(n // k):
            return k, n // k
    return None


def _largest_supported_divisor(n: int) -> int:
    divisors = set()
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            divisors.update((d, n // d))
    return max(d for d in divisors if d < n and _find_factor(d)) if n > 1 else 1


def factor_size(n: int) -> tuple[int, int]:
    """Split n = K * 2^m into (K, 2^m).

    K == 1 when n is a power of two.  Otherwise K is the entry of SUPPORTED_K that
    divides n with a power-of-two quotient; if several do (only 20 and 40 can),
    the largest K is chosen, so e.g. 5120 -> (40, 128) and 1536 -> (12, 128).
    Raises ValueError for unsupported n.
    """
    found = _find_factor(n)
    if found is None:
        hint = ""
        if _as_size(n) is not None and n > 1:
            n = _as_size(n)
            block = _largest_supported_divisor(n)
            if block > 1:
                hint = f", e.g. block={block}"
        raise ValueError(
            f"no Hadamard matrix of size {n}: supported sizes are 2^k and K·2^k for K in "
            f"{SUPPORTED_K}; consider a block-Hadamard transform (block_hadamard_matrix / "
            f"apply_block_hadamard) with a supported block size dividing {n}{hint}"
        )
    return found


def is_supported(n: int) -> bool:
    """True when hadamard_matrix(n) exists (n = 2^m or K * 2^m with K in SUPPORTED_K)."""
    return _find_factor(n) is not None


def hadamard_info(n: int) -> dict:
    """JSON-serialisable description of H_n, e.g. for storing next to a checkpoint."""
    k, pow2 = factor_size(n)
    info = {
        "n": k * pow2,
        "K": k,
        "pow2": pow2,
        "construction": _construction_name(k),
        "kronecker": "kron(H_K, H_pow2), index i = a*pow2 + b",
        "pow2_construction": "sylvester_natural_order",
        "normalization": "1/sqrt(n) when normalized=True",
    }
    if k != 1:
        kind, arg = _recipe(k)
        while kind == "double":  # report the field of the underlying Paley table
            kind, arg = _recipe(arg)
        p, e = _prime_power(arg)
        if e > 1:
            info["gf_modulus"] = f"GF({p}^{e}) = GF({p})[x]/({_poly_to_str(_field_modulus(p, e))})"
    return info


# --------------------------------------------------------------------------
# Dense matrices
# --------------------------------------------------------------------------

def _sylvester(p: int) -> np.ndarray:
    """Sylvester H_p in natural order (int8), by doubling H_2h = [[H_h, H_h], [H_h, -H_h]]."""
    h = np.ones((1, 1), dtype=np.int8)
    while h.shape[0] < p:
        h = np.block([[h, h], [h, -h]])
    return h


@lru_cache(maxsize=16)
def _cached_signs(n: int) -> torch.Tensor:
    """±1 int8 matrix sqrt(n) * H_n for small n (shared: never modify it)."""
    k, p = factor_size(n)
    return torch.from_numpy(np.kron(_base_table(k), _sylvester(p)))


def _fresh_signs(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """±1 matrix sqrt(n) * H_n as a new tensor of the requested dtype/device."""
    if n <= _DENSE_CACHE_MAX_N:
        # copy=True: the cached pattern must never be aliased by a caller.
        return _cached_signs(n).to(device=device, dtype=dtype, copy=True)
    # Large n: build straight in the target dtype so only one n x n buffer is
    # allocated (these matrices reach hundreds of MiB).
    k, p = factor_size(n)
    h_p = torch.from_numpy(_sylvester(p)).to(device=device, dtype=dtype)
    if k == 1:
        return h_p
    return torch.kron(hadamard_base(k).to(device=device, dtype=dtype), h_p)


def hadamard_matrix(
    n: int, *, normalized: bool = True, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """Dense H_n = kron(H_K, H_{2^m}) (see module doc for the index order).

    With ``normalized=True`` (default) the matrix is divided by sqrt(n) and is
    orthogonal.  Every entry equals ±(1/sqrt(n)) rounded once to ``dtype``, so
    the result is identical to building in float64 and converting.  Always a
    fresh tensor.
    """
    if normalized and not dtype.is_floating_point:
        raise ValueError(f"normalized Hadamard matrix needs a floating dtype, got {dtype}")
    out = _fresh_signs(n, dtype, device)
    if normalized:
        # Round the scale once in float64 -> dtype; ±1 * scale is then exact.
        scale = torch.tensor(1.0 / math.sqrt(n), dtype=torch.float64).to(dtype=dtype, device=out.device)
        out.mul_(scale)  # in place: out is already a private copy
    return out


def random_signs(n: int, seed: int) -> torch.Tensor:
    """Deterministic ±1 float32 vector of length n (CPU) from a seeded torch.Generator.

    s[i] = 2 * randint(0, 2) - 1 drawn from torch's CPU generator seeded with
    ``seed``; the values for a given (n, seed) are pinned by a test, because saved
    rotations are reproduced from their seed.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    bits = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64)
    return (2 * bits - 1).to(torch.float32)


def random_hadamard_matrix(n: int, seed: int, **kw) -> torch.Tensor:
    """Randomised Hadamard rotation Q = diag(s) @ H_n with s = random_signs(n, seed).

    ``Q[i, j] = s[i] * H_n[i, j]``: row i of H_n is multiplied by s[i].  Hence
    ``x @ Q == (x * s) @ H_n`` (flip signs of the input first, then rotate) and
    the inverse is ``y @ Q.T == (y @ H_n.T) * s``.  Q is orthogonal when
    normalized=True.  Keyword arguments go to :func:`hadamard_matrix`.
    """
    h = hadamard_matrix(n, **kw)
    s = random_signs(n, seed).to(dtype=h.dtype, device=h.device)
    return s[:, None] * h


def block_hadamard_matrix(n: int, block: int, **kw) -> torch.Tensor:
    """Block-diagonal n x n matrix with n/block copies of hadamard_matrix(block, **kw)."""
    if not isinstance(block, int) or block < 1 or n % block != 0:
        raise ValueError(f"block-Hadamard size {n} is not a multiple of the block size {block}")
    h = hadamard_matrix(block, **kw)  # raises ValueError for an unsupported block
    return torch.block_diag(*([h] * (n // block)))


# --------------------------------------------------------------------------
# Fast application
# --------------------------------------------------------------------------

def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised x @ H_P along the last axis (Sylvester natural order, P = 2^m).

    Each pass applies H_2 to one bit of the index; H_P is the Kronecker product
    of those H_2's, and they commute because they act on different bits.
    """
    p = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(-1, p)
    h = 1
    while h < p:
        y = y.view(-1, p // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, p)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if not x.is_floating_point():
        raise TypeError(f"apply_hadamard needs a floating-point tensor, got {x.dtype}")
    # Half-precision butterflies lose bits at every pass, so they run in float32.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def apply_hadamard(
    x: torch.Tensor, n: int | None = None, *, normalized: bool = True, transpose: bool = False
) -> torch.Tensor:
    """x @ H_n (or x @ H_n.T with transpose=True) along the last axis, without a dense H_n.

    x is viewed as (..., K, 2^m) (i = a*2^m + b); a fast Walsh-Hadamard butterfly
    handles the 2^m axis and a K x K matmul the K axis.  Matches
    ``x @ hadamard_matrix(n)`` to float32 rounding.  ``n`` defaults to
    x.shape[-1] and must equal it if given.  Half/bfloat16 inputs are computed in
    float32 and returned in x.dtype.
    """
    if x.dim() == 0:
        raise ValueError("apply_hadamard needs a tensor with at least one dimension")
    if n is None:
        n = x.shape[-1]
    if x.shape[-1] != n:
        raise ValueError(f"apply_hadamard: last dimension of x {tuple(x.shape)} must be {n}")
    k, p = factor_size(n)
    work = _compute_dtype(x)
    # Index i = a*P + b: row-major (K, P) puts the H_K index a on axis -2.
    y = x.to(work).reshape(*x.shape[:-1], k, p)
    if p > 1:
        y = _fwht(y)
    if k > 1:
        h_k = hadamard_base(k).to(dtype=work, device=x.device)
        # kron(H_K, H_P) mixes the K axis by H_K: y[a', b] = sum_a H_K[a, a'] y[a, b],
        # i.e. H_K^T from the left.  x @ H^T = x @ kron(H_K^T, H_P) (H_P is
        # symmetric), so transpose=True uses H_K from the left instead.
        left = h_k if transpose else h_k.T
        y = torch.matmul(left, y)
    y = y.reshape(x.shape)
    if normalized:
        y = y * (1.0 / math.sqrt(n))
    out = y.to(x.dtype)
    # n == 1 with normalized=False is the identity: never hand back x itself.
    return out.clone() if out.data_ptr() == x.data_ptr() else out


def apply_block_hadamard(x: torch.Tensor, block: int, *, transpose: bool = False) -> torch.Tensor:
    """x @ block_hadamard_matrix(x.shape[-1], block) (normalised), without the dense matrix."""
    n = x.shape[-1] if x.dim() else 0
    if not isinstance(block, int) or block < 1 or n % block != 0:
        raise ValueError(f"block-Hadamard size {n} is not a multiple of the block size {block}")
    y = apply_hadamard(x.reshape(*x.shape[:-1], n // block, block), block, transpose=transpose)
    return y.reshape(x.shape)
