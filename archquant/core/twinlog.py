"""Twin-log quantization (TLQ, LRQ-DiT arXiv 2508.03485): a log2 codebook per row and per sign.

DiT weights are Gaussian-like with long tails, so a uniform grid spends most of its levels where
few weights are. TLQ quantizes the magnitude uniformly in the log domain, separately for the
positive and the negative weights of each output row:

    u = log2(|w| + eta)                                    (eta > 0 makes 0 representable)
    delta_s = (hi_s - lo_s) / (L - 1),  zero_s = round(lo_s / delta_s),  L = 2^(bits-1) levels
    q = clamp(round(u / delta_s) - zero_s, 0, L - 1)         (s = the weight's sign)
    w_hat = sign * (2^((q + zero_s) * delta_s) - eta)

with ``lo_s`` the smallest and ``hi_s`` a percentile of u over the row's weights of sign s. A code
is one sign bit plus ``bits - 1`` bits of log-magnitude (``code = q | negative << (bits - 1)``), so
it packs two per byte at 4 bits and below. Parameters, per row: ``eta`` and the two (delta, zero)
pairs.

The fit is data-free (:class:`TwinLogMSEObserver`, observer ``"twinlog_mse"``): a grid search over
eta x positive percentile x negative percentile that minimises the weight's squared error (the
reference code's 13 x 5 x 5 grid). One setting per layer, as the paper and the reference code do
(``per_row=True`` lets every row choose its own).

Where the reference code (``yanglianwei/LRQ-DiT``, ``StaticQuantizer``) differs:
* it gives the negative side one more level than the positive one (``clamp(..., 0, 2^(bits-1))``);
  the paper's Eq. 7 treats both signs alike, and so does this module (the extra level would not fit
  in ``bits`` bits);
* it takes the percentile over the whole row with the other sign's entries zero-filled, which pulls
  the clip point towards log2(eta) (u = 0); here the percentile is over the sign's own weights, and
  ``zero_filled_quantile=True`` reproduces the reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import formats
from .formats import Format, QuantSpec, register_format
from .observers import OBSERVERS, Observer, _check_kwarg

#: the reference code's grids (LRQ-DiT ``StaticQuantizer``)
ETA_GRID = (0.0, 0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
PERCENTILE_GRID = (0.98, 0.99, 0.999, 0.9999, 0.99999)
#: log2 of the smallest magnitude considered when eta = 0 (|w| = 0 would give -inf)
_LOG_FLOOR = -126.0
_MIN_DELTA = 1e-8
PARAM_NAMES = ("eta", "delta_pos", "zero_pos", "delta_neg", "zero_neg")


def _levels(spec: QuantSpec) -> int:
    return 2 ** (spec.bits - 1)


def _log_magnitude(w: Tensor, eta: Tensor) -> Tensor:
    return torch.log2(w.abs() + eta).clamp_min(_LOG_FLOOR)


def _level(u: Tensor, delta: Tensor, zero: Tensor, levels: int) -> Tensor:
    """The magnitude code q of log-magnitudes ``u`` on the grid (delta, zero)."""
    return (torch.round(u / delta) - zero).clamp_(0, levels - 1)


def _magnitude(q: Tensor, delta: Tensor, zero: Tensor, eta: Tensor) -> Tensor:
    """The magnitude code q stands for: 2^((q + zero) * delta) - eta, never below 0."""
    return (torch.exp2((q + zero) * delta) - eta).clamp_min_(0.0)


def _step_and_zero(lo: Tensor, hi: Tensor, present: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """(delta, zero) of a grid of ``levels`` levels from ``lo`` to ``hi``; rows without entries of
    the sign (``present`` False) get delta 1 and zero 0 (never used)."""
    delta = ((torch.maximum(hi, lo) - lo) / max(levels - 1, 1)).clamp_min(_MIN_DELTA)
    delta = torch.where(present, delta, torch.ones_like(delta))
    zero = torch.where(present, torch.round(lo / delta), torch.zeros_like(lo))
    return delta, zero


@register_format("twinlog")
class TwinLogFormat(Format):
    """Codes uint8 ``q | negative << (bits - 1)``; params ``eta``, ``delta_pos``, ``zero_pos``,
    ``delta_neg``, ``zero_neg`` (float32, one per row: granularity "channel" on axis 0)."""

    weight_observer = "twinlog_mse"

    def check_spec(self, spec: QuantSpec) -> None:
        if not 2 <= spec.bits <= 8:
            raise ValueError(f"QuantSpec.bits={spec.bits} not allowed for 'twinlog': allowed 2..8 "
                             "(one sign bit plus bits - 1 of log-magnitude)")
        if spec.granularity != "channel" or spec.axis != 0:
            raise ValueError(f"'twinlog' is per output row: granularity 'channel' with axis 0, got "
                             f"{spec.granularity!r} with axis {spec.axis}")

    def params_from_range(self, spec, lo, hi):
        raise ValueError("'twinlog' parameters are fitted to the weight itself, not to a range: use the "
                         "weight observer 'twinlog_mse'")

    def quantize(self, x, spec, params):
        x = x.float()
        negative = x < 0
        delta = torch.where(negative, params["delta_neg"], params["delta_pos"])
        zero = torch.where(negative, params["zero_neg"], params["zero_pos"])
        q = _level(_log_magnitude(x, params["eta"]), delta, zero, _levels(spec))
        return (q.to(torch.uint8) | (negative.to(torch.uint8) << (spec.bits - 1)))

    def dequantize(self, codes, spec, params, dtype=torch.float32):
        shift = spec.bits - 1
        negative = (codes >> shift).bool()
        q = (codes & (_levels(spec) - 1)).float()
        delta = torch.where(negative, params["delta_neg"], params["delta_pos"])
        zero = torch.where(negative, params["zero_neg"], params["zero_pos"])
        magnitude = _magnitude(q, delta, zero, params["eta"])
        return torch.where(negative, -magnitude, magnitude).to(dtype)

    def check_stored(self, spec, params, codes, shape, name):
        formats._expect_names("twinlog", spec, params, PARAM_NAMES, name)
        rows = None if shape is None else (shape[0],) + (1,) * (len(shape) - 1)
        for key in PARAM_NAMES:
            formats._expect_dtype(params[key], torch.float32, name(key))
            formats._expect_finite(params[key], name(key))
            if rows is not None:
                formats._expect_shape(params[key], rows, name(key))
        for key in ("delta_pos", "delta_neg"):
            if not bool((params[key] > 0).all()):
                raise ValueError(f"tensor {name(key)!r} has a non-positive step")
        if not bool((params["eta"] >= 0).all()):
            raise ValueError(f"tensor {name('eta')!r} is negative")
        if codes is not None:
            formats._expect_dtype(codes, torch.uint8, name("codes"))
            if shape is not None:
                formats._expect_shape(codes, shape, name("codes"))
            if codes.numel() and int(codes.max()) >= 2 ** spec.bits:
                raise ValueError(f"tensor {name('codes')!r} has codes above {2 ** spec.bits - 1}")


def _sorted_magnitudes(w: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """|w| of the entries under ``mask``, sorted ascending per row (the others pushed to the end
    as +inf), and how many each row has."""
    a = torch.where(mask, w.abs(), torch.full_like(w, float("inf")))
    return torch.sort(a, dim=1).values, mask.sum(dim=1, keepdim=True)


def _quantile_positions(count: Tensor, pct: float) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.quantile``'s linear interpolation over the first ``count`` sorted entries of each row:
    the two ranks to interpolate between and the weight of the upper one."""
    last = (count - 1).clamp_min(0)
    pos = pct * last.double()
    below = pos.floor().long()
    return below, torch.minimum(below + 1, last), (pos - below.double()).float()


def fit_side(a_sorted: Tensor, count: Tensor, eta: Tensor, pct: float, levels: int) -> tuple[Tensor, Tensor]:
    """(delta, zero) per row for one sign, from its magnitudes sorted ascending (``count`` per row):
    ``lo`` is the smallest u = log2(|w| + eta), ``hi`` the ``pct`` quantile of u. u is increasing in
    |w|, so sorting |w| once serves every eta and only the ranks needed are taken to the log domain.
    A row without entries of the sign gets delta 1 and zero 0 (never used)."""
    present = count > 0
    below, above, frac = _quantile_positions(count, pct)
    lo = _log_magnitude(a_sorted[:, :1], eta)
    u_below = _log_magnitude(a_sorted.gather(1, below), eta)
    u_above = _log_magnitude(a_sorted.gather(1, above), eta)
    zeros = torch.zeros_like(lo)
    lo = torch.where(present, lo, zeros)
    hi = torch.where(present, u_below + (u_above - u_below) * frac, zeros)
    return _step_and_zero(lo, hi, present, levels)


def fit_side_zero_filled(u: Tensor, mask: Tensor, pct: float, levels: int) -> tuple[Tensor, Tensor]:
    """The reference code's variant: the percentile over the whole row with the other sign's
    entries set to 0 (u = 0, i.e. |w| = 1 - eta), the minimum over the sign's own entries."""
    present = mask.any(dim=1, keepdim=True)
    big = torch.finfo(u.dtype).max
    lo = torch.where(present, torch.where(mask, u, big).amin(dim=1, keepdim=True), torch.zeros_like(u[:, :1]))
    hi = torch.quantile(torch.where(mask, u, torch.zeros_like(u)), pct, dim=1, keepdim=True)
    return _step_and_zero(lo, hi, present, levels)


def squared_error(w: Tensor, u: Tensor, negative: Tensor, eta: Tensor, pos: tuple[Tensor, Tensor],
                  neg: tuple[Tensor, Tensor], levels: int) -> tuple[Tensor, Tensor]:
    """Squared error per row of the positive and of the negative entries of ``w`` (u its
    log-magnitudes) under the two sides' (delta, zero)."""
    delta = torch.where(negative, neg[0], pos[0])
    zero = torch.where(negative, neg[1], pos[1])
    err = (w.abs() - _magnitude(_level(u, delta, zero, levels), delta, zero, eta)).square_()
    err_neg = torch.where(negative, err, 0.0).sum(dim=1, keepdim=True)
    return err.sum(dim=1, keepdim=True) - err_neg, err_neg


def fit_twinlog(w: Tensor, spec: QuantSpec, etas=ETA_GRID, percentiles=PERCENTILE_GRID,
                per_row: bool = False, zero_filled_quantile: bool = False) -> dict[str, Tensor]:
    """The grid search: for every eta, the positive and the negative percentile are chosen
    independently (the squared error is a sum over the two signs), then the best eta. Returns the
    params, each of shape (rows, 1, ...) to broadcast against ``w``."""
    w2 = w.detach().float().reshape(w.shape[0], -1)
    levels = _levels(spec)
    negative = w2 < 0
    masks = (~negative, negative)
    ordered = [_sorted_magnitudes(w2, mask) for mask in masks]
    best = None  # (total error, eta, delta_pos, zero_pos, delta_neg, zero_neg)
    for eta_value in etas:
        eta = torch.full((w2.shape[0], 1), float(eta_value))
        u = _log_magnitude(w2, eta)
        side_best: list = [None, None]  # per sign: (error, delta, zero)
        for pct in percentiles:
            if zero_filled_quantile:
                fits = [fit_side_zero_filled(u, mask, pct, levels) for mask in masks]
            else:
                fits = [fit_side(a_sorted, count, eta, pct, levels) for a_sorted, count in ordered]
            errors = squared_error(w2, u, negative, eta, fits[0], fits[1], levels)
            for i, (err, (delta, zero)) in enumerate(zip(errors, fits)):
                if not per_row:
                    err = err.sum().expand_as(err)
                if side_best[i] is None:
                    side_best[i] = (err, delta, zero)
                else:  # strictly better wins, so ties keep the earlier percentile
                    better = err < side_best[i][0]
                    side_best[i] = tuple(torch.where(better, new, old)
                                         for new, old in zip((err, delta, zero), side_best[i]))
        (err_p, dp, zp), (err_n, dn, zn) = side_best
        candidate = (err_p + err_n, eta, dp, zp, dn, zn)
        if best is None:
            best = candidate
        else:
            better = candidate[0] < best[0]
            best = tuple(torch.where(better, new, old) for new, old in zip(candidate, best))
    shape = (w.shape[0],) + (1,) * (w.dim() - 1)
    return {name: t.reshape(shape).contiguous() for name, t in zip(PARAM_NAMES, best[1:])}


class TwinLogMSEObserver(Observer):
    """Weight observer of the ``"twinlog"`` format: :func:`fit_twinlog` on the one tensor it sees.

    ``etas`` and ``percentiles`` are the search grids (default: the reference code's 13 x 5 x 5),
    ``per_row`` lets each row pick its own setting, ``zero_filled_quantile`` reproduces the
    reference code's percentile over zero-filled rows."""

    def __init__(self, spec: QuantSpec, etas: list[float] | None = None, percentiles: list[float] | None = None,
                 per_row: bool = False, zero_filled_quantile: bool = False):
        name = type(self).__name__
        self.etas = tuple(ETA_GRID if etas is None else etas)
        self.percentiles = tuple(PERCENTILE_GRID if percentiles is None else percentiles)
        _check_kwarg(name, "etas", self.etas, len(self.etas) > 0 and all(e >= 0 for e in self.etas),
                     "a non-empty list of values >= 0")
        _check_kwarg(name, "percentiles", self.percentiles,
                     len(self.percentiles) > 0 and all(0 < p <= 1 for p in self.percentiles),
                     "a non-empty list of values in (0, 1]")
        self.per_row, self.zero_filled_quantile = bool(per_row), bool(zero_filled_quantile)
        if spec.format != "twinlog":
            raise ValueError(f"observer 'twinlog_mse' fits the 'twinlog' format, not {spec.format!r}")
        super().__init__(spec)

    def reset(self) -> None:
        super().reset()
        self._params: dict[str, Tensor] | None = None

    def _update(self, x: Tensor) -> None:
        if self.num_batches:
            raise ValueError("observer 'twinlog_mse' fits one tensor (a weight) and cannot combine batches")
        self._params = fit_twinlog(x, self.spec, self.etas, self.percentiles, self.per_row,
                                   self.zero_filled_quantile)

    def params(self) -> dict[str, Tensor]:
        if self._params is None:
            raise RuntimeError("observer saw no data")
        return {k: v.clone() for k, v in self._params.items()}


OBSERVERS["twinlog_mse"] = TwinLogMSEObserver
