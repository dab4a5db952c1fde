"""Equivalence transforms: rotations, KLT, smoothing, and the helpers that fuse them into weights.

Every helper here keeps the network's function exact in floating point: for a Linear
y = x Wᵀ + b and an orthogonal Q, feeding it x·Q instead of x is undone by W ← W·Q; making
it emit y·Q is W ← Qᵀ·W, b ← b·Q. Fusion math runs in float64 and is cast back, so a
rotated FP model matches the original to ~1e-6 relative.

Online transforms (applied to activations at run time) are small ``nn.Module``s, one registered
class per kind (``ONLINE_TRANSFORMS``), that are serialised to a dict and rebuilt from it; the
Hadamard ones are rebuilt from ``core.hadamard`` (the single source of the matrices), data-derived
ones (a KLT matrix, a smoothing scale) carry their tensor as a buffer.
"""
from __future__ import annotations

from typing import ClassVar, Iterable

import torch
from torch import nn

from . import hadamard as had

# ----------------------------------------------------------------------------------------
# Weight fusion helpers (all in place, exact in FP)
# ----------------------------------------------------------------------------------------


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(dtype=param.dtype, device=param.device))


def rotate_linear_input(linear: nn.Linear, q: torch.Tensor) -> None:
    """Make ``linear`` accept x·Q in place of x: W ← W·Q (Q orthogonal, in_features × in_features)."""
    w = linear.weight.detach().double()
    _assign(linear.weight, w @ q.to(w))


def rotate_linear_output(linear: nn.Linear, q: torch.Tensor) -> None:
    """Make ``linear`` emit y·Q in place of y: W ← Qᵀ·W, b ← b·Q."""
    w = linear.weight.detach().double()
    q = q.to(w)
    _assign(linear.weight, q.T @ w)
    if linear.bias is not None:
        _assign(linear.bias, linear.bias.detach().double() @ q)


def rotate_linear_output_rows(linear: nn.Linear, q: torch.Tensor, rows: tuple[int, int]) -> None:
    """Rotate only output rows ``rows`` = (start, stop) of ``linear`` (a slice feeding one consumer)."""
    a, b = rows
    w = linear.weight.detach().double()
    q = q.to(w)
    with torch.no_grad():
        linear.weight[a:b] = (q.T @ w[a:b]).to(linear.weight.dtype)
        if linear.bias is not None:
            linear.bias[a:b] = (linear.bias.detach().double()[a:b] @ q).to(linear.bias.dtype)


def rotate_embedding(embedding: nn.Embedding, q: torch.Tensor) -> None:
    """Make an embedding table emit rows e·Q: E ← E·Q."""
    e = embedding.weight.detach().double()
    _assign(embedding.weight, e @ q.to(e))


def scale_linear_input(linear: nn.Linear, s: torch.Tensor) -> None:
    """Make ``linear`` accept x / s (per input channel) in place of x: W ← W·diag(s)."""
    w = linear.weight.detach().double()
    _assign(linear.weight, w * s.to(w)[None, :])


def scale_linear_output(linear: nn.Linear, s: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
    """Make ``linear`` emit y / s (per output channel): W ← diag(1/s)·W, b ← b / s; only output
    rows ``rows`` = (start, stop) when given (s then has stop − start entries)."""
    a, b = rows if rows is not None else (0, linear.out_features)
    w = linear.weight.detach().double()
    s = s.to(w)
    with torch.no_grad():
        linear.weight[a:b] = (w[a:b] / s[:, None]).to(linear.weight.dtype)
        if linear.bias is not None:
            linear.bias[a:b] = (linear.bias.detach().double()[a:b] / s).to(linear.bias.dtype)


def scale_modulation_output(linear: nn.Linear, s: torch.Tensor, scale_rows: tuple[int, int],
                            shift_rows: tuple[int, int] | None = None, offset: float = 1.0) -> None:
    """Make an adaLN modulation emit h / s, for h = LN(x)·(offset + scale) + shift (per channel).

    ``scale`` / ``shift`` are output rows ``scale_rows`` / ``shift_rows`` of ``linear``. h / s means
    (offset + scale') = (offset + scale) / s, so scale' = scale / s + offset·(1/s − 1): the scale
    rows' W ← W / s and b ← (b + offset) / s − offset; and shift' = shift / s. The offset's share
    needs a bias, so one is created (zeros elsewhere) when ``linear`` has none.
    """
    if offset != 0 and linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                               device=linear.weight.device), requires_grad=linear.weight.requires_grad)
    a, b = scale_rows
    w = linear.weight.detach().double()
    sd = s.to(w)
    with torch.no_grad():
        linear.weight[a:b] = (w[a:b] / sd[:, None]).to(linear.weight.dtype)
        if linear.bias is not None:
            bias = linear.bias.detach().double()[a:b]
            linear.bias[a:b] = ((bias + offset) / sd - offset).to(linear.bias.dtype)
    if shift_rows is not None:
        scale_linear_output(linear, s, shift_rows)


def fold_norm_into_linears(norm: nn.Module, linears: Iterable[nn.Linear]) -> None:
    """Fold a norm's affine weight (and LayerNorm bias) into the Linears it feeds.

    Afterwards the norm is a plain normaliser (γ = 1, β = 0), which commutes with an orthogonal
    rotation of its input; that is what lets a residual-stream rotation pass through it.
    """
    gamma = getattr(norm, "weight", None)
    beta = getattr(norm, "bias", None)
    linears = list(linears)
    if gamma is None:
        return
    g = gamma.detach().double()
    for lin in linears:
        w = lin.weight.detach().double()
        if beta is not None:
            extra = w @ beta.detach().double()
            if lin.bias is None:
                lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
            _assign(lin.bias, lin.bias.detach().double() + extra)
        _assign(lin.weight, w * g[None, :])
    with torch.no_grad():
        gamma.fill_(1.0)
        if beta is not None:
            beta.zero_()


def scale_norm_output(norm: nn.Module, s: torch.Tensor) -> None:
    """Make a norm emit x / s per channel by dividing its affine weight (and bias) by s."""
    with torch.no_grad():
        norm.weight.copy_((norm.weight.double() / s.double()).to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_((norm.bias.double() / s.double()).to(norm.bias.dtype))


# ----------------------------------------------------------------------------------------
# Data-derived transforms
# ----------------------------------------------------------------------------------------


def smoothquant_scales(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float = 0.5,
                       min_scale: float = 1e-5) -> torch.Tensor:
    """SmoothQuant migration strength: s_j = max|X_j|^α / max|W_j|^(1−α).

    ``weight_amax`` is the per-input-channel max over all consumer weights. Channels that are
    zero on either side get s = 1 (nothing to migrate) rather than 0 or inf.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha={alpha} not allowed: must be in [0, 1]")
    a = act_amax.double()
    w = weight_amax.double()
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where((a > 0) & (w > 0) & torch.isfinite(s), s, torch.ones_like(s))
    return s.clamp(min=min_scale).float()


class RunningCovariance:
    """Accumulates the covariance of the last axis of activations over calibration batches."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        if self.sum is None:
            self.sum = torch.zeros(x.shape[1], dtype=torch.float64)
            self.outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        self.sum += x.sum(0).cpu()
        self.outer += (x.T @ x).cpu()
        self.n += x.shape[0]

    def covariance(self) -> torch.Tensor:
        if self.n < 2:
            raise RuntimeError("covariance needs at least two calibration tokens")
        mean = self.sum / self.n
        return (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)


def klt_matrix(cov: torch.Tensor) -> torch.Tensor:
    """Karhunen–Loève transform: the orthonormal eigenbasis of a covariance (columns = eigenvectors).

    Eigenvalues come out ascending (``torch.linalg.eigh`` order). Multiplying by a Hadamard
    afterwards (R = K·H, MambaQuant) then spreads the variance evenly over channels.
    """
    cov = cov.double()
    cov = 0.5 * (cov + cov.T)  # symmetrise away accumulation round-off before eigh
    _, k = torch.linalg.eigh(cov)
    return k


# ----------------------------------------------------------------------------------------
# Online transforms
# ----------------------------------------------------------------------------------------

#: config "type" → class of every online transform a checkpoint can name (``register_online_transform``)
ONLINE_TRANSFORMS: dict[str, type["OnlineTransform"]] = {}


def register_online_transform(cls: type["OnlineTransform"]) -> type["OnlineTransform"]:
    """Make ``cls`` rebuildable from its config: as a Linear's ``input_transform`` and as a module
    placed on its own (``core.modules.QUANT_MODULES`` reads this table)."""
    ONLINE_TRANSFORMS[cls.kind] = cls
    return cls


class OnlineTransform(nn.Module):
    """x ↦ x·T on the last axis, applied to activations at run time (``forward``).

    A kind is one registered subclass: ``matrix()`` (T in float64, what offline fusion uses),
    ``to_config()`` / ``from_config(config)`` (the checkpoint form: tensors it holds come from the
    checkpoint's weights, so ``from_config`` only shapes them) and ``check_loaded(prefix)``.
    ``orthogonal``: T⁻¹ = Tᵀ, so ``rotate_linear_input(linear, T)`` undoes it in the next weight.
    """

    kind: ClassVar[str] = ""
    orthogonal: ClassVar[bool] = True
    size: int

    def matrix(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def to_config(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype = torch.float32) -> "OnlineTransform":  # pragma: no cover
        raise NotImplementedError

    def check_loaded(self, prefix: str = "") -> None:
        """Raise a ``ValueError`` naming the tensor if loaded buffers cannot be this transform's."""


@register_online_transform
class HadamardTransform(OnlineTransform):
    """Online (optionally sign-randomised, optionally block-diagonal) Hadamard rotation.

    The matrix is rebuilt from ``core.hadamard`` on load, so offline fusion and online
    application can never disagree. With ``seed`` set, T = diag(signs)·H.
    """

    kind: ClassVar[str] = "hadamard"

    def __init__(self, size: int, seed: int | None = None, block: int | None = None) -> None:
        super().__init__()
        if block is not None:
            had.block_hadamard_matrix(size, block)  # validates early with a clear message
        elif not had.is_supported(size):
            had.factor_size(size)  # raises the one-line ValueError
        self.size, self.seed, self.block = size, seed, block
        signs = had.random_signs(size, seed) if seed is not None else None
        self.register_buffer("signs", signs, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.signs is not None:
            x = x * self.signs.to(x)
        if self.block is not None:
            return had.apply_block_hadamard(x, self.block)
        return had.apply_hadamard(x, self.size)

    def matrix(self) -> torch.Tensor:
        if self.block is not None:
            h = had.block_hadamard_matrix(self.size, self.block, dtype=torch.float64)
        else:
            h = had.hadamard_matrix(self.size, dtype=torch.float64)
        if self.signs is not None:
            h = self.signs.double()[:, None] * h
        return h

    def to_config(self) -> dict:
        return {"type": self.kind, "size": self.size, "seed": self.seed, "block": self.block}

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype = torch.float32) -> "HadamardTransform":
        return cls(config["size"], seed=config.get("seed"), block=config.get("block"))

    def extra_repr(self) -> str:
        return f"size={self.size}, seed={self.seed}, block={self.block}"


@register_online_transform
class MatrixTransform(OnlineTransform):
    """Online rotation by an explicit (data-derived) matrix, e.g. a KLT·Hadamard product."""

    kind: ClassVar[str] = "matrix"

    def __init__(self, matrix: torch.Tensor, name: str = "matrix") -> None:
        super().__init__()
        self.name = name  # what the matrix is (e.g. "klt_hadamard"), kept in the config for readers
        # row-major whatever the input's strides (a QR factor is column-major): a reloaded
        # checkpoint is row-major, and x @ W takes another kernel for another layout
        self.register_buffer("weight", matrix.detach().float().clone(memory_format=torch.contiguous_format))

    @property
    def size(self) -> int:
        return int(self.weight.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() @ self.weight).to(x.dtype)

    def matrix(self) -> torch.Tensor:
        return self.weight.double()

    def to_config(self) -> dict:
        return {"type": self.kind, "size": self.size, "name": self.name}

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype = torch.float32) -> "MatrixTransform":
        n = int(config["size"])
        return cls(torch.zeros(n, n), name=config.get("name", "matrix"))


@register_online_transform
class ChannelScale(OnlineTransform):
    """x ↦ x / s per channel: a smoothing scale nothing upstream can absorb (``FoldTarget("online")``);
    the next Linear takes W·diag(s). T = diag(1/s) is not orthogonal."""

    kind: ClassVar[str] = "channel_scale"
    orthogonal: ClassVar[bool] = False

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().float().clone())

    @property
    def size(self) -> int:
        return int(self.scale.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale.to(x)

    def matrix(self) -> torch.Tensor:
        return torch.diag(1.0 / self.scale.double())

    def to_config(self) -> dict:
        return {"type": self.kind, "size": self.size}

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype = torch.float32) -> "ChannelScale":
        n = config["size"]
        if type(n) is not int or n < 1:
            raise ValueError(f"channel_scale size={n!r} not allowed: allowed integers >= 1")
        return cls(torch.ones(n))

    def check_loaded(self, prefix: str = "") -> None:
        s = self.scale
        if s.ndim != 1 or not bool((torch.isfinite(s) & (s > 0)).all()):
            raise ValueError(f"tensor {prefix + 'scale'!r} must hold one finite positive scale per channel")

    def extra_repr(self) -> str:
        return f"size={self.size}"


def build_online_transform(config: dict) -> OnlineTransform:
    """Rebuild an online transform from ``to_config()`` (tensors it holds come from the checkpoint)."""
    kind = config.get("type")
    if kind not in ONLINE_TRANSFORMS:
        raise ValueError(f"unknown online transform type {kind!r}: allowed "
                         f"{', '.join(repr(k) for k in ONLINE_TRANSFORMS)}")
    return ONLINE_TRANSFORMS[kind].from_config(config)


ROTATION_KINDS = ("hadamard", "random_hadamard", "random_orthogonal", "klt_hadamard")
#: rotations that need the covariance of the activations they rotate
DATA_DEPENDENT_ROTATIONS = ("klt_hadamard",)


def rotation_matrix(kind: str, size: int, seed: int = 0, covariance: torch.Tensor | None = None) -> torch.Tensor:
    """An orthogonal size×size matrix (float64) for a fused rotation.

    ``hadamard``: the normalised H_n; ``random_hadamard``: diag(±1)·H_n from ``seed`` (QuaRot);
    ``random_orthogonal``: Q from the QR of a seeded Gaussian matrix, signs fixed by R's diagonal;
    ``klt_hadamard``: MambaQuant's R = K·diag(±1)·H, K the KLT of ``covariance``: K decorrelates
    into the eigenbasis, H then spreads the (now separated) variances evenly over channels.
    """
    if kind == "klt_hadamard":
        if covariance is None:
            raise ValueError("rotation 'klt_hadamard' needs the covariance of the rotated activations")
        return klt_matrix(covariance) @ had.random_hadamard_matrix(size, seed, dtype=torch.float64)
    if kind == "hadamard":
        return had.hadamard_matrix(size, dtype=torch.float64)
    if kind == "random_hadamard":
        return had.random_hadamard_matrix(size, seed, dtype=torch.float64)
    if kind == "random_orthogonal":
        g = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(size, size, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))[None, :]
    raise ValueError(f"unknown rotation kind {kind!r}: allowed {', '.join(ROTATION_KINDS)}")
