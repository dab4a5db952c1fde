"""LRQ-DiT's Adaptive Rotation Scheme (ARS, arXiv 2508.03485) and the DuQuant transform it uses.

Per quantized Linear, on its calibration inputs X (tokens x C):

1. SmoothQuant scaling (alpha = 0.5): x -> x / s, W -> W diag(s);
2. the fluctuation J = ||X / s||_F / sqrt(tokens * C), the RMS of the smoothed activations;
3. J < threshold: a random Hadamard rotation; otherwise the DuQuant transform R1 . P . R2
   (greedy outlier-aware block rotations around a zigzag channel permutation), fitted to the
   smoothed activations;
4. the inverse goes into the weight, so with quantization off the layer computes what it did.

The reference code hard-codes which layers take DuQuant; here J decides (the paper's Eq. 12), and
``force`` keeps the reference lists available as presets. The online transform of every layer is a
:class:`ChainTransform` (channel scale, then the rotation) whose config records the branch and J.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from . import matching
from . import transforms as T
from .calibration import collect_stats
from .modules import QuantLinear
from .observers import add_sampled_rows
from .recipe import (Context, Step, check_target_patterns, get_submodule, register_step, set_submodule,
                     target_sites)


# --------------------------------------------------------------------------- DuQuant


def _uniform_first_row(n: int) -> torch.Tensor:
    """An orthogonal n x n matrix whose first row (and column) is 1/sqrt(n) everywhere: the
    Householder reflection taking e0 to the uniform unit vector. x @ H spreads x's channel 0
    evenly over all n channels."""
    u = torch.full((n,), 1.0 / math.sqrt(n), dtype=torch.float64)
    v = -u
    v[0] += 1.0
    if float(v.norm()) < 1e-12:  # n == 1
        return torch.eye(n, dtype=torch.float64)
    return torch.eye(n, dtype=torch.float64) - 2.0 * torch.outer(v, v) / float(v @ v)


def greedy_block_rotation(x: torch.Tensor, block_size: int, max_steps: int = 256) -> torch.Tensor:
    """Block-diagonal rotation (n_blocks, b, b) fitted greedily to the activations ``x`` (rows, C).

    Each step takes the channel with the largest |x|, swaps it to the front of its block and
    applies the uniform-first-row matrix there, spreading that channel over its block; of all
    step prefixes, the one with the smallest peak max|x| is kept (DuQuant's rotation)."""
    x = x.double().clone()
    c = x.shape[1]
    nb = c // block_size
    h = _uniform_first_row(block_size)
    blocks = torch.eye(block_size, dtype=torch.float64).repeat(nb, 1, 1)
    best_peak, best = float(x.abs().max()), blocks.clone()
    for _ in range(max_steps):
        channel = int(x.abs().amax(dim=0).argmax())
        b, local = divmod(channel, block_size)
        step = torch.eye(block_size, dtype=torch.float64)
        step[[0, local]] = step[[local, 0]]  # swap the channel to position 0
        step = step @ h
        cols = slice(b * block_size, (b + 1) * block_size)
        x[:, cols] = x[:, cols] @ step
        blocks[b] = blocks[b] @ step
        peak = float(x.abs().max())
        if peak < best_peak:
            best_peak, best = peak, blocks.clone()
    return best


def zigzag_permutation(channel_max: torch.Tensor, block_size: int) -> torch.Tensor:
    """Order channels by decreasing max|x| and deal them to the blocks in zigzag order (0, 1, ...,
    n-1, n-1, ..., 0, 0, 1, ...), so every block gets a share of the large ones. Returns ``perm``
    with x_permuted = x[..., perm]."""
    c = channel_max.numel()
    nb = c // block_size
    order = torch.argsort(channel_max, descending=True, stable=True).tolist()
    dealt: list[list[int]] = [[] for _ in range(nb)]
    for i, ch in enumerate(order):
        lap, pos = divmod(i, nb)
        dealt[pos if lap % 2 == 0 else nb - 1 - pos].append(ch)
    return torch.tensor([ch for block in dealt for ch in block], dtype=torch.long)


def _block_diag(blocks: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*blocks)


@T.register_online_transform
class DuQuantTransform(T.OnlineTransform):
    """x -> ((x R1)[..., perm]) R2 with R1, R2 block-diagonal rotations (n_blocks, b, b)."""

    kind: ClassVar[str] = "duquant"

    def __init__(self, r1: torch.Tensor, perm: torch.Tensor, r2: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("r1", r1.detach().float().clone(memory_format=torch.contiguous_format))
        self.register_buffer("perm", perm.detach().long().clone())
        self.register_buffer("r2", r2.detach().float().clone(memory_format=torch.contiguous_format))

    @classmethod
    def fit(cls, x: torch.Tensor, block_size: int = 128, max_steps: int = 256) -> "DuQuantTransform":
        """Fit to activations ``x`` (rows, C); ``block_size`` shrinks to a divisor of C."""
        c = x.shape[1]
        b = max(d for d in range(1, min(block_size, c) + 1) if c % d == 0)
        r1 = greedy_block_rotation(x, b, max_steps)
        y = torch.einsum("rnb,nbc->rnc", x.double().reshape(-1, c // b, b), r1).reshape(-1, c)
        perm = zigzag_permutation(y.abs().amax(dim=0), b)
        r2 = greedy_block_rotation(y[:, perm], b, max_steps)
        return cls(r1, perm, r2)

    @property
    def size(self) -> int:
        return int(self.perm.numel())

    @property
    def block_size(self) -> int:
        return int(self.r1.shape[-1])

    def _blockwise(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        # one (rows x b) @ (b x b) GEMM per block (a batched matmul over blocks), not rows x blocks
        # matrix-vector products
        shape = x.shape
        blocks = x.reshape(-1, shape[-1] // self.block_size, self.block_size).transpose(0, 1)
        return torch.bmm(blocks, r.to(x)).transpose(0, 1).reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._blockwise(x.float(), self.r1)[..., self.perm]
        return self._blockwise(y, self.r2).to(x.dtype)

    def matrix(self) -> torch.Tensor:
        p = torch.zeros(self.size, self.size, dtype=torch.float64)
        p[self.perm, torch.arange(self.size)] = 1.0  # (x P)_j = x_perm[j]
        return _block_diag(self.r1.double()) @ p @ _block_diag(self.r2.double())

    def to_config(self) -> dict:
        return {"type": self.kind, "size": self.size, "block_size": self.block_size}

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype = torch.float32) -> "DuQuantTransform":
        n, b = config.get("size"), config.get("block_size")
        if type(n) is not int or type(b) is not int or b < 1 or n < 1 or n % b:
            raise ValueError(f"duquant size={n!r} block_size={b!r} not allowed: positive integers, "
                             "size a multiple of block_size")
        eye = torch.eye(b).repeat(n // b, 1, 1)
        return cls(eye, torch.arange(n), eye.clone())

    def check_loaded(self, prefix: str = "") -> None:
        n, b = self.size, self.block_size
        if not torch.equal(torch.sort(self.perm).values, torch.arange(n)):
            raise ValueError(f"tensor {prefix + 'perm'!r} is not a permutation of 0..{n - 1}")
        for name in ("r1", "r2"):
            r = getattr(self, name)
            if tuple(r.shape) != (n // b, b, b) or not bool(torch.isfinite(r).all()):
                raise ValueError(f"tensor {prefix + name!r} must be {n // b} finite {b}x{b} blocks")
            eye = torch.eye(b, dtype=torch.float64).expand(n // b, b, b)
            if not torch.allclose(r.double() @ r.double().transpose(-1, -2), eye, atol=1e-4):
                raise ValueError(f"tensor {prefix + name!r} is not orthogonal")


@T.register_online_transform
class ChainTransform(T.OnlineTransform):
    """Several online transforms one after the other (x T1 T2 ...); ``label`` is descriptive
    (ARS records its branch and J there)."""

    kind: ClassVar[str] = "chain"

    def __init__(self, parts: list[T.OnlineTransform], label: dict | None = None) -> None:
        super().__init__()
        if not parts or len({p.size for p in parts}) != 1:
            raise ValueError("a chain needs at least one transform, all of one size")
        self.parts = nn.ModuleList(parts)
        self.label = dict(label or {})

    @property
    def orthogonal(self) -> bool:  # type: ignore[override]
        return all(p.orthogonal for p in self.parts)

    @property
    def size(self) -> int:
        return self.parts[0].size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for p in self.parts:
            x = p(x)
        return x

    def matrix(self) -> torch.Tensor:
        m = self.parts[0].matrix()
        for p in self.parts[1:]:
            m = m @ p.matrix()
        return m

    def to_config(self) -> dict:
        return {"type": self.kind, "size": self.size, "parts": [p.to_config() for p in self.parts],
                "label": self.label}

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype = torch.float32) -> "ChainTransform":
        parts = config.get("parts")
        if not isinstance(parts, list) or not parts:
            raise ValueError("chain transform needs a non-empty list 'parts'")
        return cls([T.build_online_transform(p) for p in parts], label=config.get("label"))

    def check_loaded(self, prefix: str = "") -> None:
        for i, p in enumerate(self.parts):
            p.check_loaded(f"{prefix}parts.{i}.")


# --------------------------------------------------------------------------- the step


class InputStatistics:
    """Per-channel max|x| and sum of x^2 over every row seen, and a uniform sample of at most
    ``max_rows`` rows over all calls (what DuQuant is fitted to). Calibration runs whole sampler
    trajectories, so the sample spans every timestep rather than the first forward pass (the
    reference code's choice). Bottom-k sampling with seeded random keys: the same data gives the
    same sample."""

    def __init__(self, max_rows: int, seed: int = 0) -> None:
        self.max_rows = max_rows
        self.amax = self.sumsq = None
        self.rows = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._sample: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None

    @property
    def sample(self) -> torch.Tensor:
        return self._sample

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        amax, sumsq = x.abs().amax(dim=0), x.double().square().sum(dim=0)
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
        self.sumsq = sumsq if self.sumsq is None else self.sumsq + sumsq
        self.rows += x.shape[0]
        self._sample, self._keys = add_sampled_rows(self._sample, self._keys, x, self._generator, self.max_rows)


def fluctuation(sumsq: torch.Tensor, rows: int, scale: torch.Tensor | None = None) -> float:
    """J = ||X / s||_F / sqrt(rows * C) from per-channel sums of squares (s = 1 when None)."""
    s2 = sumsq if scale is None else sumsq / scale.double().square()
    return math.sqrt(float(s2.sum()) / (rows * sumsq.numel()))


#: "none": smoothing only (the SmoothQuant baseline with an online scale)
BRANCHES = ("hadamard", "duquant", "none")


@register_step
@dataclass
class AdaptiveRotation(Step):
    """LRQ-DiT's ARS on the inputs of ``targets`` (patterns over the structure's quantize list;
    None: all of it, minus its skips and ``ignore``). ``force`` maps patterns to a branch, taking
    the choice away from J (the reference code's hard-coded layer lists)."""

    kind: ClassVar[str] = "adaptive_rotation"
    alpha: float = 0.5
    #: False: no SmoothQuant scaling (QuaRot-style rotation only); J is then measured on X itself
    smooth: bool = True
    threshold: float = 1.0
    block_size: int = 128
    max_steps: int = 256
    seed: int = 0
    max_rows: int = 2048
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)
    force: dict = field(default_factory=dict)

    def validate(self, where: str = "adaptive_rotation") -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"{where}.alpha={self.alpha} not allowed: must be in [0, 1]")
        for key in ("block_size", "max_rows"):
            if type(getattr(self, key)) is not int or getattr(self, key) < 1:
                raise ValueError(f"{where}.{key}={getattr(self, key)!r} not allowed: an integer >= 1")
        for pattern, branch in self.force.items():
            matching.check_pattern(pattern, f"{where}.force")
            if branch not in BRANCHES:
                raise ValueError(f"{where}.force[{pattern!r}]={branch!r} not allowed: allowed "
                                 f"{', '.join(map(repr, BRANCHES))}")
        check_target_patterns(self, where)

    def needs_calibration(self) -> bool:
        return True

    def branch(self, name: str, j: float) -> str:
        forced = [b for p, b in self.force.items() if matching.matches_any(name, [p])]
        if forced:
            return forced[-1]
        return "hadamard" if j < self.threshold else "duquant"

    def apply(self, model: nn.Module, ctx: Context) -> None:
        sites = target_sites(self, model, ctx.structure)
        stats = collect_stats(model, ctx.batches(self.kind), {n: InputStatistics(self.max_rows) for n in sites},
                              forward_fn=ctx.forward_fn, desc="ARS statistics", progress=ctx.progress)
        for name in sites:
            lin, st = get_submodule(model, name), stats[name]
            if self.smooth:
                s = T.smoothquant_scales(st.amax, lin.weight.detach().abs().amax(dim=0), self.alpha)
            else:
                s = torch.ones(lin.in_features)
            j = fluctuation(st.sumsq, st.rows, s)
            branch = self.branch(name, j)
            rotation = None
            if branch == "hadamard":
                rotation = T.HadamardTransform(lin.in_features, seed=self.seed)
            elif branch == "duquant":
                rotation = DuQuantTransform.fit(st.sample / s, self.block_size, self.max_steps)
            parts = ([T.ChannelScale(s)] if self.smooth else []) + ([rotation] if rotation is not None else [])
            if not parts:
                continue  # neither smoothing nor rotation: nothing to do here
            transform = ChainTransform(parts, label={"ars": branch, "J": round(j, 6)})
            # x -> x T online with T = diag(1/s) R; the weight takes T^-T = diag(s) R (R orthogonal),
            # so the product is unchanged. diag(s) R is R's rows scaled (the same values as the
            # product, without an n^3 matmul: minutes at DiT-XL/2's 4608-wide inputs)
            fold = torch.diag(s.double()) if rotation is None else s.double()[:, None] * rotation.matrix()
            T.rotate_linear_input(lin, fold)
            set_submodule(model, name, QuantLinear.from_float(lin, input_transform=transform))
