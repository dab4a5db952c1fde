"""The transform steps of a recipe: smoothing and rotations, fused into weights where possible.

Each is exact in floating point (the model's outputs do not change); they only move outliers
out of the way before ``Quantize`` runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable

import torch
from torch import nn

from . import transforms as T
from .calibration import collect_stats
from .modules import QuantLinear
from .observers import ChannelAbsMaxObserver
from .recipe import Context, Step, check_value, get_submodule, register_step, set_submodule
from .structure import FoldTarget


def _untie(modules: Iterable[nn.Module]) -> None:
    """Give every weight its own storage: fusing into one of two tied weights must not touch the other."""
    seen: set[int] = set()
    for m in modules:
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter):
            if id(w) in seen:
                m.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
            seen.add(id(m.weight))


def _fold_norm(model: nn.Module, target: FoldTarget, s: torch.Tensor, linears: list[str]) -> None:
    norm = get_submodule(model, target.name)
    if getattr(norm, "weight", None) is None:
        raise ValueError(f"smoothing group {linears}: norm {target.name!r} has no affine weight to absorb the "
                         "scale; declare the group with FoldTarget('modulation', ...) or FoldTarget('online')")
    T.scale_norm_output(norm, s)


def _fold_linear(model: nn.Module, target: FoldTarget, s: torch.Tensor, linears: list[str]) -> None:
    producer = _linear(model, target.name, f"smoothing group {linears}: fold target")
    rows = target.rows or (0, producer.out_features)
    _check_rows(rows, s, producer, target.name, linears)
    T.scale_linear_output(producer, s, rows)


def _fold_modulation(model: nn.Module, target: FoldTarget, s: torch.Tensor, linears: list[str]) -> None:
    modulation = _linear(model, target.name, f"smoothing group {linears}: fold target")
    for rows in (target.rows, target.shift_rows):
        if rows is not None:
            _check_rows(rows, s, modulation, target.name, linears)
    T.scale_modulation_output(modulation, s, target.rows, target.shift_rows, target.scale_offset)


def _fold_online(model: nn.Module, target: FoldTarget, s: torch.Tensor, linears: list[str]) -> None:
    for name in linears:  # each reader divides its own input: a kept ChannelScale in front of it
        lin = get_submodule(model, name)
        if isinstance(lin, QuantLinear):
            if lin.input_transform is not None:
                raise ValueError(f"smoothing group {linears}: {name!r} already has an online "
                                 f"{lin.input_transform.kind} transform; smooth before rotating it")
            lin.input_transform = T.ChannelScale(s)
        else:
            set_submodule(model, name, QuantLinear.from_float(lin, input_transform=T.ChannelScale(s)))


#: FoldTarget.kind → how 1/s is absorbed (the Linears always take W·diag(s))
_FOLDS = {"norm": _fold_norm, "linear": _fold_linear, "modulation": _fold_modulation, "online": _fold_online}


def _linear(model: nn.Module, name: str, what: str) -> nn.Linear:
    lin = get_submodule(model, name)
    if not isinstance(lin, nn.Linear):
        raise ValueError(f"{what} {name!r} is a {type(lin).__name__}, expected nn.Linear")
    return lin


def _check_rows(rows: tuple[int, int], s: torch.Tensor, lin: nn.Linear, name: str, linears: list[str]) -> None:
    if rows[1] > lin.out_features or rows[1] - rows[0] != s.numel():
        raise ValueError(f"smoothing group {linears}: rows {tuple(rows)} of {name!r} (out_features="
                         f"{lin.out_features}) do not match the {s.numel()} input channels being smoothed")


@dataclass
class AlphaSmoothing(Step):
    """A smoothing step's migration strength ``alpha`` in [0, 1] (s = amax_x^α / amax_w^(1-α));
    it needs activation statistics. A base for SmoothQuant and family variants, not a step itself."""

    alpha: float = 0.5

    def validate(self, where: str) -> None:
        check_value(f"{where}.alpha", self.alpha, minimum=0.0, maximum=1.0)

    def needs_calibration(self) -> bool:
        return True


@register_step
@dataclass
class SmoothQuant(AlphaSmoothing):
    """Move activation outliers into the weights: the Linears take W·diag(s), and 1/s goes where the
    structure's ``SmoothingGroup.fold_into`` says (a norm's γ, a producer Linear's rows, an adaLN
    modulation, or an online per-channel scale)."""

    kind: ClassVar[str] = "smoothquant"

    def apply(self, model: nn.Module, ctx: Context) -> None:
        groups = ctx.structure.smoothing_groups()
        stats = {g.linears[0]: ChannelAbsMaxObserver(axis=-1) for g in groups}
        collect_stats(model, ctx.batches(self.kind), stats, forward_fn=ctx.forward_fn,
                      desc="smoothing statistics", progress=ctx.progress)
        absorbers = [g.fold_into.name for g in groups if g.fold_into.kind in ("linear", "modulation")]
        _untie([get_submodule(model, n) for g in groups for n in g.linears] + [get_submodule(model, n) for n in absorbers])
        for g in groups:
            linears = [get_submodule(model, n) for n in g.linears]
            w_amax = torch.stack([lin.weight.detach().abs().amax(dim=0).float() for lin in linears]).amax(0)
            s = T.smoothquant_scales(stats[g.linears[0]].amax, w_amax, self.alpha)
            _FOLDS[g.fold_into.kind](model, g.fold_into, s, g.linears)
            for name in g.linears:  # after the fold: an online fold may have wrapped the Linear
                T.scale_linear_input(get_submodule(model, name), s)


@dataclass
class _OfflineRotation(Step):
    """A rotation fused into weights: which one (``rotation``, a data-dependent kind needs
    calibration) and its seed. Not a step itself."""

    rotation: str = "random_hadamard"
    seed: int = 0

    def validate(self, where: str) -> None:
        check_value(f"{where}.rotation", self.rotation, allowed=T.ROTATION_KINDS)

    def needs_calibration(self) -> bool:
        return self.rotation in T.DATA_DEPENDENT_ROTATIONS


@register_step
@dataclass
class RotateResidual(_OfflineRotation):
    """QuaRot-style rotation Q of the residual stream, fused into the weights (exact in FP).

    Norms' γ are folded into the Linears they feed first; then embeddings emit e·Q, readers
    accept x·Q (W ← W·Q) and writers emit y·Q (W ← Qᵀ·W).
    """

    kind: ClassVar[str] = "rotate_residual"

    def apply(self, model: nn.Module, ctx: Context) -> None:
        s = ctx.structure
        if s.norm_kind != "rms":
            raise ValueError(f"residual rotation needs RMSNorm-style norms, model has norm_kind={s.norm_kind!r}")
        touched = [get_submodule(model, n) for n in s.embeddings + s.residual_writers]
        touched += [get_submodule(model, n) for g in s.residual_readers for n in g.linears]
        _untie(touched)
        for g in s.residual_readers:
            if g.norm is not None:
                T.fold_norm_into_linears(get_submodule(model, g.norm), [get_submodule(model, n) for n in g.linears])
        cov = None
        if self.rotation in T.DATA_DEPENDENT_ROTATIONS:
            # MambaQuant: one K for the whole stream, from the first reader's (normalised) input
            first = s.residual_readers[0].linears[0]
            cov = collect_stats(model, ctx.batches(self.kind), {first: T.RunningCovariance()},
                                forward_fn=ctx.forward_fn, desc="residual covariance",
                                progress=ctx.progress)[first].covariance()
        q = T.rotation_matrix(self.rotation, s.hidden_size, self.seed, covariance=cov)
        for name in s.embeddings:
            emb = get_submodule(model, name)
            if isinstance(emb, nn.Embedding):
                T.rotate_embedding(emb, q)
            else:
                T.rotate_linear_output(emb, q)
        for g in s.residual_readers:
            for name in g.linears:
                T.rotate_linear_input(get_submodule(model, name), q)
        for name in s.residual_writers:
            T.rotate_linear_output(get_submodule(model, name), q)


@register_step
@dataclass
class OnlineHadamard(Step):
    """Rotate the input of chosen Linears online by H (randomised by ``seed``), W ← W·H.

    Used where no neighbouring weight can absorb the rotation (after a nonlinearity or a
    scan), e.g. Quamba's Hadamard at Mamba's out_proj input. ``sites=None`` takes the
    adapter's ``online_rotation_sites``.
    """

    kind: ClassVar[str] = "online_hadamard"
    sites: list[str] | None = None
    seed: int | None = None
    #: MambaQuant R2: T = K·H with K the KLT of each site's input covariance (a dense online matrix)
    klt: bool = False

    def needs_calibration(self) -> bool:
        return self.klt

    def apply(self, model: nn.Module, ctx: Context) -> None:
        sites = self.sites if self.sites is not None else ctx.structure.online_rotation_sites
        linears = {}
        for name in sites:
            lin = get_submodule(model, name)
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"online rotation site {name!r} is a {type(lin).__name__}, expected nn.Linear")
            linears[name] = lin
        covs = {}
        if self.klt:
            covs = collect_stats(model, ctx.batches(self.kind), {n: T.RunningCovariance() for n in linears},
                                 forward_fn=ctx.forward_fn, desc="site covariances", progress=ctx.progress)
        for name, lin in linears.items():
            if self.klt:
                matrix = T.rotation_matrix("klt_hadamard", lin.in_features, self.seed or 0,
                                           covariance=covs[name].covariance())
                transform = T.MatrixTransform(matrix, name="klt_hadamard")
            else:
                transform = T.HadamardTransform(lin.in_features, seed=self.seed)
            T.rotate_linear_input(lin, transform.matrix())
            set_submodule(model, name, QuantLinear.from_float(lin, input_transform=transform))


@register_step
@dataclass
class RotatePairs(_OfflineRotation):
    """Rotate the tensor between each producer → consumer pair of the structure, offline.

    The producer's output rows get Qᵀ, the consumer's input gets Q (MambaQuant's R5 on the dt
    path). ``klt_hadamard`` takes K from the consumer's input covariance.
    """

    kind: ClassVar[str] = "rotate_pairs"

    def apply(self, model: nn.Module, ctx: Context) -> None:
        pairs = ctx.structure.linear_pairs
        covs = {}
        if self.rotation in T.DATA_DEPENDENT_ROTATIONS:
            covs = collect_stats(model, ctx.batches(self.kind), {p.consumer: T.RunningCovariance() for p in pairs},
                                 forward_fn=ctx.forward_fn, desc="pair covariances", progress=ctx.progress)
        for p in pairs:
            producer, consumer = get_submodule(model, p.producer), get_submodule(model, p.consumer)
            rows = p.rows or (0, producer.out_features)
            cov = covs[p.consumer].covariance() if covs else None
            q = T.rotation_matrix(self.rotation, rows[1] - rows[0], self.seed, covariance=cov)
            T.rotate_linear_output_rows(producer, q, rows)
            T.rotate_linear_input(consumer, q)
