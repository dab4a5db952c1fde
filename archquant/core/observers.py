"""Calibration observers: collect statistics of a tensor over batches and turn them
into a quantization range (and from it, params) for a :class:`QuantSpec`.

An observer is a plain python object holding a few float32 tensors whose size does
not grow with the number of batches.  Ranges have the shapes that
:func:`archquant.core.formats.observe_range` gives (see that module), except
:class:`ChannelAbsMaxObserver` whose range is 1-D.

Activations change their leading (batch) dims from batch to batch, so static
activation observers are meant for "tensor" granularity or "channel" on the last
axis; for "channel" the per-channel statistics are kept 1-D and reshaped to the
ndim of the first batch.  Other granularities work when every batch gives the same
range shape (e.g. a weight observed once) and otherwise raise ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable

import torch
from torch import Tensor

from archquant.core import formats
from archquant.core.context_key import current_context_key
from archquant.core.formats import QuantSpec

__all__ = [
    "Observer",
    "add_sampled_rows",
    "MinMaxObserver",
    "PercentileObserver",
    "MSEObserver",
    "ChannelAbsMaxObserver",
    "GroupedMinMaxObserver",
    "KeyedObserver",
    "KeyedRangeObserver",
    "OBSERVERS",
    "build_observer",
]


class Observer:
    """Base class.  Subclasses implement ``_update`` (float32, detached input) and
    ``_range``; the base handles casting, the "no data" error and params."""

    def __init__(self, spec: QuantSpec):
        self.spec = spec.validate()
        self.reset()

    def update(self, x: Tensor) -> None:
        """Consume one batch."""
        x = x.detach().to(torch.float32)
        if x.numel() == 0:
            raise ValueError(f"{type(self).__name__}.update got an empty tensor {tuple(x.shape)}")
        self._update(x)
        self.num_batches += 1

    def range(self) -> tuple[Tensor, Tensor]:
        if self.num_batches == 0:
            raise RuntimeError("observer saw no data")
        return self._range()

    def params(self) -> dict[str, Tensor]:
        return formats.compute_params(self.spec, *self.range())

    def reset(self) -> None:
        self.num_batches = 0

    def _update(self, x: Tensor) -> None:
        raise NotImplementedError

    def _range(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


# --------------------------------------------------------------------------- shapes


class _RangeShape:
    """Keeps per-batch range tensors of one observer consistent across batches.

    For "channel" granularity the range is stored 1-D (one value per channel) so that
    activations of different leading shapes can be combined; :meth:`restore` gives it
    back the keepdim shape of the first batch.  For the other granularities the range
    shape must be the same for every batch.
    """

    def __init__(self, spec: QuantSpec, owner: str):
        self.spec = spec
        self.owner = owner
        self.first_shape: torch.Size | None = None

    def store(self, r: Tensor) -> Tensor:
        """Shape-check ``r`` (range shape of one batch) and return its storage form."""
        if self.first_shape is None:
            self.first_shape = r.shape
        if self.spec.granularity == "channel":
            flat = r.reshape(-1)
            if flat.numel() != math.prod(self.first_shape):
                raise ValueError(
                    f"{self.owner}: batch has {flat.numel()} channels, earlier batches "
                    f"{math.prod(self.first_shape)}"
                )
            return flat
        if r.shape != self.first_shape:
            raise ValueError(
                f"{self.owner}: granularity {self.spec.granularity!r} gives range shape "
                f"{tuple(r.shape)} for this batch but {tuple(self.first_shape)} for earlier "
                "batches; for activations use 'tensor' or 'channel' with axis=-1"
            )
        return r

    def restore(self, stored: Tensor) -> Tensor:
        return stored.reshape(self.first_shape)


def _is_symmetric(spec: QuantSpec) -> bool:
    """Only "int" has an asymmetric variant; every other format uses max|x|."""
    return spec.symmetric if spec.format == "int" else True


def _check_kwarg(owner: str, name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{owner}: {name}={value!r} not allowed: allowed {allowed}")


# --------------------------------------------------------------------------- min/max


class MinMaxObserver(Observer):
    """Running min and max over all batches."""

    def reset(self) -> None:
        super().reset()
        self._shape = _RangeShape(self.spec, type(self).__name__)
        self._lo: Tensor | None = None
        self._hi: Tensor | None = None

    def _update(self, x: Tensor) -> None:
        lo, hi = formats.observe_range(x, self.spec)
        lo, hi = self._shape.store(lo), self._shape.store(hi)
        if self._lo is None:
            self._lo, self._hi = lo, hi
        else:
            self._lo = torch.minimum(self._lo, lo)
            self._hi = torch.maximum(self._hi, hi)

    def _range(self) -> tuple[Tensor, Tensor]:
        return self._shape.restore(self._lo), self._shape.restore(self._hi)


class GroupedMinMaxObserver(MinMaxObserver):
    """Per-channel min/max, then shared by the channels of each group (Quamba2's grouped scales).

    ``groups[c]`` is the group id of channel c (last axis). Every channel reports its group's
    range, so the per-channel scale vector holds one value per group: what a kernel with
    sorted, contiguous groups would use, without having to reorder the weights.
    """

    def __init__(self, spec: QuantSpec, groups: list[int] | None = None):
        if groups is None or len(groups) == 0:
            raise ValueError("observer 'grouped_minmax' needs groups=[group id per channel]")
        self.groups = torch.as_tensor(list(groups), dtype=torch.long)
        if spec.granularity != "channel" or spec.axis not in (-1,):
            raise ValueError("observer 'grouped_minmax' needs a per-channel spec on the last axis (axis=-1)")
        super().__init__(spec)

    def _range(self) -> tuple[Tensor, Tensor]:
        lo, hi = super()._range()
        shape = lo.shape
        lo, hi = lo.reshape(-1), hi.reshape(-1)
        if lo.numel() != self.groups.numel():
            raise ValueError(f"grouped_minmax: {self.groups.numel()} group ids for {lo.numel()} channels")
        groups = self.groups.to(lo.device)
        n = int(groups.max()) + 1
        g_lo = lo.new_full((n,), float("inf")).scatter_reduce(0, groups, lo, "amin")
        g_hi = hi.new_full((n,), float("-inf")).scatter_reduce(0, groups, hi, "amax")
        return g_lo[groups].reshape(shape), g_hi[groups].reshape(shape)


# --------------------------------------------------------------------------- percentile


def _kth_quantile(flat: Tensor, q: float) -> Tensor:
    """The q-quantile of a 1-D tensor without interpolation, via ``torch.kthvalue``
    (``torch.quantile`` refuses large inputs).

    Rank convention: the value at 0-based sorted index ``floor(q * (n - 1))``, i.e.
    numpy's ``quantile(..., method="lower")``.  Rounding down never picks a value
    above the requested quantile, so a single outlier is not selected for q < 1
    once ``n`` is large enough.
    """
    index = math.floor(q * (flat.numel() - 1))  # float64, like numpy
    return torch.kthvalue(flat, index + 1).values  # kthvalue's k is 1-based


class PercentileObserver(Observer):
    """Per-tensor percentile range with an EMA over batches (as in Quamba).

    Each batch gives the ``alpha``-quantile of ``|x|`` (symmetric specs; range
    ``(-v, v)``) or the ``(1 - alpha)``- and ``alpha``-quantiles of ``x``
    (asymmetric).  The first batch initialises the estimate; later ones move it by
    ``v += momentum * (current - v)``.
    """

    def __init__(self, spec: QuantSpec, alpha: float = 0.99999, momentum: float = 0.01):
        name = type(self).__name__
        _check_kwarg(name, "alpha", alpha, 0.0 < alpha <= 1.0, "0 < alpha <= 1")
        _check_kwarg(name, "momentum", momentum, 0.0 < momentum <= 1.0, "0 < momentum <= 1")
        if spec.granularity != "tensor":
            raise ValueError(
                f"{name} supports granularity 'tensor' only, got {spec.granularity!r}"
            )
        self.alpha = alpha
        self.momentum = momentum
        super().__init__(spec)

    def reset(self) -> None:
        super().reset()
        self._lo: Tensor | None = None
        self._hi: Tensor | None = None

    def _batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        flat = x.reshape(-1)
        if _is_symmetric(self.spec):
            v = _kth_quantile(flat.abs(), self.alpha)
            return -v, v
        return _kth_quantile(flat, 1.0 - self.alpha), _kth_quantile(flat, self.alpha)

    def _update(self, x: Tensor) -> None:
        lo, hi = self._batch_range(x)
        if self._lo is None:
            self._lo, self._hi = lo, hi
        else:
            self._lo = self._lo + self.momentum * (lo - self._lo)
            self._hi = self._hi + self.momentum * (hi - self._hi)

    def _range(self) -> tuple[Tensor, Tensor]:
        return self._lo.clone(), self._hi.clone()


# --------------------------------------------------------------------------- MSE


def _search_clip_range(
    x: Tensor, spec: QuantSpec, lo: Tensor, hi: Tensor, shrinks: Tensor, norm: float
) -> tuple[Tensor, Tensor]:
    """For each scale group independently, the clip range ``(lo * t, hi * t)`` with
    ``t`` from ``shrinks`` that minimises ``sum |x - fake_quantize(x)|**norm``.

    ``shrinks`` starts at 1.0 and a later ``t`` must be strictly better to win, so
    ties keep the widest (least clipping) range.
    """
    best_err = best_t = None
    for t in shrinks:
        params = formats.compute_params(spec, lo * t, hi * t)
        err = (x - formats.fake_quantize(x, spec, params)).abs_().pow_(norm)
        err = formats.granular_reduce(err, spec, torch.sum)
        if best_err is None:
            best_err, best_t = err, torch.full_like(err, float(t))
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_t = torch.where(better, t, best_t)
    return lo * best_t, hi * best_t


def add_sampled_rows(sample: Tensor | None, keys: Tensor | None, rows: Tensor, generator: torch.Generator,
                     capacity: int) -> tuple[Tensor, Tensor]:
    """A uniform sample without replacement of at most ``capacity`` rows over every call ("bottom-k"
    sampling: each row gets a random key from the seeded ``generator``, the largest keys stay).
    Returns the new (sample, keys); the caller's ``rows`` are never held on to."""
    new_keys = torch.rand(rows.shape[0], generator=generator).to(rows.device)
    if sample is not None:
        rows = torch.cat([sample, rows])
        new_keys = torch.cat([keys, new_keys])
    if rows.shape[0] > capacity:
        new_keys, index = torch.topk(new_keys, capacity, sorted=False)
        return rows[index], new_keys
    return rows.clone(), new_keys


class MSEObserver(Observer):
    """Clip range minimising the Lp error of fake quantization.

    The candidates are ``(lo * t, hi * t)`` with ``(lo, hi)`` the min/max range and
    ``t`` on ``grid`` points from 1.0 down to ``1 - max_shrink``; each scale group
    (channel, token, group; or the whole tensor) picks its own ``t``.

    Two modes, chosen by granularity:

    * "tensor", and "channel" on the last axis (activations): every batch updates
      the running min/max and a uniform random sample of rows (at most
      ``max_samples`` elements, from a seeded generator so results repeat) kept
      across batches; the search runs on the sample in :meth:`range`.  A single
      tensor of at most ``max_samples`` elements is therefore searched exactly.
    * everything else (weights: channel on another axis, token, group): the search
      runs in :meth:`update` on the full tensor and only its result is kept, so the
      observer accepts a single tensor.

    For "nvfp4" the per-tensor scale follows from the chosen group ranges, so it may
    differ slightly from the one each candidate was scored with.
    """

    def __init__(
        self,
        spec: QuantSpec,
        grid: int = 100,
        max_shrink: float = 0.8,
        norm: float = 2.0,
        max_samples: int = 2**20,
        seed: int = 0,
    ):
        name = type(self).__name__
        _check_kwarg(name, "grid", grid, isinstance(grid, int) and grid >= 1, "int >= 1")
        _check_kwarg(name, "max_shrink", max_shrink, 0.0 <= max_shrink < 1.0, "0 <= max_shrink < 1")
        _check_kwarg(name, "norm", norm, norm > 0, "norm > 0")
        _check_kwarg(
            name, "max_samples", max_samples,
            isinstance(max_samples, int) and max_samples >= 1, "int >= 1",
        )
        self.grid = grid
        self.max_shrink = max_shrink
        self.norm = norm
        self.max_samples = max_samples
        self.seed = seed
        super().__init__(spec)

    @property
    def shrinks(self) -> Tensor:
        return torch.linspace(1.0, 1.0 - self.max_shrink, self.grid)

    def reset(self) -> None:
        super().reset()
        self._minmax = MinMaxObserver(self.spec)
        self._sample: Tensor | None = None  # rows kept for the search (streaming mode)
        self._keys: Tensor | None = None  # random key of each kept row
        self._generator = torch.Generator().manual_seed(self.seed)
        self._result: tuple[Tensor, Tensor] | None = None  # cached/eager search result

    def _streaming(self, x: Tensor) -> bool:
        """Whether batches are sampled (activations) rather than searched whole."""
        if self.spec.granularity == "tensor":
            return True
        if self.spec.granularity != "channel":
            return False
        if not -x.ndim <= self.spec.axis < x.ndim:
            raise ValueError(
                f"QuantSpec.axis={self.spec.axis} out of range for a tensor of shape "
                f"{tuple(x.shape)}"
            )
        return self.spec.axis % x.ndim == x.ndim - 1

    def _update(self, x: Tensor) -> None:
        if not self._streaming(x):
            self._update_whole(x)
            return
        self._minmax.update(x)
        self._add_rows(self._rows(x))
        self._result = None

    def _update_whole(self, x: Tensor) -> None:
        if self.num_batches:
            raise ValueError(
                f"{type(self).__name__} with granularity {self.spec.granularity!r} "
                f"(axis={self.spec.axis}) searches one tensor (a weight) and cannot combine "
                "batches; for activations use 'tensor' or 'channel' with axis=-1"
            )
        lo, hi = formats.observe_range(x, self.spec)
        self._result = _search_clip_range(x, self.spec, lo, hi, self.shrinks, self.norm)

    def _rows(self, x: Tensor) -> Tensor:
        """Rows to sample: single elements for "tensor", full channel vectors for
        "channel" (so every kept row still has all channels)."""
        width = 1 if self.spec.granularity == "tensor" else x.shape[-1]
        return x.reshape(-1, width)

    def _add_rows(self, rows: Tensor) -> None:
        self._sample, self._keys = add_sampled_rows(self._sample, self._keys, rows, self._generator,
                                                    max(1, self.max_samples // rows.shape[1]))

    def _range(self) -> tuple[Tensor, Tensor]:
        if self._result is None:
            self._result = self._search_sample()
        lo, hi = self._result
        return lo.clone(), hi.clone()

    def _search_sample(self) -> tuple[Tensor, Tensor]:
        lo, hi = self._minmax.range()
        if self.spec.granularity == "tensor":
            return _search_clip_range(self._sample, self.spec, lo, hi, self.shrinks, self.norm)
        # Search the 2-D sample (rows, C) per channel, then restore the batch's shape.
        spec_2d = dataclasses.replace(self.spec, axis=-1)
        lo2, hi2 = _search_clip_range(
            self._sample, spec_2d, lo.reshape(1, -1), hi.reshape(1, -1), self.shrinks, self.norm
        )
        return lo2.reshape(lo.shape), hi2.reshape(hi.shape)


# --------------------------------------------------------------------------- channel abs max


class ChannelAbsMaxObserver(Observer):
    """Per-channel ``max|x|`` over all other dims and batches (the SmoothQuant statistic).

    ``spec`` is optional: it is only needed for :meth:`params`.  The range is
    ``(-amax, amax)`` with shape ``(C,)``.
    """

    def __init__(self, spec: QuantSpec | None = None, axis: int = -1):
        _check_kwarg(type(self).__name__, "axis", axis, isinstance(axis, int), "an int")
        self.axis = axis
        if spec is None:
            self.spec = None
            self.reset()
        else:
            super().__init__(spec)

    def reset(self) -> None:
        super().reset()
        self._amax: Tensor | None = None

    def _update(self, x: Tensor) -> None:
        if not -x.ndim <= self.axis < x.ndim:
            raise ValueError(
                f"{type(self).__name__}: axis={self.axis} out of range for shape {tuple(x.shape)}"
            )
        channels = x.movedim(self.axis, -1).reshape(-1, x.shape[self.axis])
        amax = channels.abs().amax(dim=0)
        if self._amax is None:
            self._amax = amax
        elif amax.shape != self._amax.shape:
            raise ValueError(
                f"{type(self).__name__}: batch has {amax.numel()} channels, earlier "
                f"batches {self._amax.numel()}"
            )
        else:
            self._amax = torch.maximum(self._amax, amax)

    @property
    def amax(self) -> Tensor:
        """1-D tensor of size C."""
        if self._amax is None:
            raise RuntimeError("observer saw no data")
        return self._amax.clone()

    def _range(self) -> tuple[Tensor, Tensor]:
        return -self._amax, self._amax.clone()

    def params(self) -> dict[str, Tensor]:
        if self.spec is None:
            raise ValueError("ChannelAbsMaxObserver.params() needs the observer to have a spec")
        return super().params()


# --------------------------------------------------------------------------- per context key


class KeyedObserver:
    """One statistic per context key (``core.context_key``), e.g. per diffusion timestep.

    ``factory()`` makes the statistic for a key the first time that key is seen (any object with
    ``update(x)``: an observer, ``ChannelAbsMaxObserver``, a covariance); ``update`` outside a
    ``context_key`` is a ``ValueError``, since the tensor would belong to no key.
    """

    def __init__(self, factory: Callable[[], Any]):
        self.factory = factory
        self.by_key: dict = {}

    def update(self, x: Tensor) -> None:
        key = current_context_key()
        if key is None:
            raise ValueError(f"{type(self).__name__} got a tensor outside any context key: run the calibration "
                             "forward passes inside archquant.core.context_key.context_key(key)")
        if key not in self.by_key:
            self.by_key[key] = self.factory()
        self.by_key[key].update(x)

    @property
    def keys(self) -> list:
        return list(self.by_key)

    def __getitem__(self, key):
        return self.by_key[key]

    def params(self) -> dict[Any, dict[str, Tensor]]:
        """key → the parameters its statistic gives, in the order the keys were first seen."""
        if not self.by_key:
            raise RuntimeError("observer saw no data")
        return {key: obs.params() for key, obs in self.by_key.items()}


class KeyedRangeObserver(KeyedObserver):
    """The registered form (``"keyed"``): per key, observer ``observer`` with ``observer_kwargs``,
    e.g. ``ActQuantizer(spec, observer="keyed", observer_kwargs={"observer": "minmax"})`` for
    static scales per timestep."""

    def __init__(self, spec: QuantSpec, observer: str = "minmax", observer_kwargs: dict | None = None):
        if observer == "keyed":
            raise ValueError("observer 'keyed' cannot nest another 'keyed' observer")
        kwargs = dict(observer_kwargs or {})
        build_observer(observer, spec, **kwargs)  # a bad name or option fails now, not at the first key
        self.spec = spec
        super().__init__(lambda: build_observer(observer, spec, **kwargs))


# --------------------------------------------------------------------------- registry

OBSERVERS: dict[str, type] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "channel_absmax": ChannelAbsMaxObserver,
    "grouped_minmax": GroupedMinMaxObserver,
    "keyed": KeyedRangeObserver,
}


def build_observer(name: str, spec: QuantSpec | None, **kwargs) -> Observer:
    """Observer ``name`` of :data:`OBSERVERS` for ``spec``, with its own options."""
    try:
        cls = OBSERVERS[name]
    except KeyError:
        raise ValueError(
            f"unknown observer {name!r}: allowed {', '.join(repr(n) for n in OBSERVERS)}"
        ) from None
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "spec")]
    for key in kwargs:
        if key not in allowed:
            raise ValueError(
                f"observer {name!r} has no option {key!r}: allowed {', '.join(map(repr, allowed))}"
            )
    return cls(spec, **kwargs)
