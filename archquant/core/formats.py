"""Quantization formats: the spec that describes one, and the math that applies it.

A :class:`QuantSpec` says *what* to quantize to (integer of some width, fp8, the
micro-scaled 4-bit formats, or a plug-in format) and *at what granularity* the
scales are shared.  A :class:`Format` turns an observed range into parameters
("params", a dict of tensors so they can be saved in safetensors) and maps
tensors to codes and back.

Shapes
------
Everything that holds one value per scale group (observed ranges, scales, zero
points) has the *range shape* of the spec, chosen so it broadcasts against the
*scale view* of ``x`` (see :func:`scale_view`):

=========== ============================================ =========================
granularity range shape                                  scale view of ``x``
=========== ============================================ =========================
tensor      ``()``                                       ``x``
channel     ``x.ndim`` dims, 1 everywhere but ``axis``   ``x``
token       ``x.shape[:-1] + (1,)``                      ``x``
group       ``x.shape[:-1] + (n_groups, 1)``             ``x.shape[:-1] + (n_groups, group_size)``
=========== ============================================ =========================

Codes always have the shape of ``x`` itself, whatever the granularity.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "GRANULARITIES",
    "INT_MIN_SCALE",
    "E2M1_GRID",
    "QuantSpec",
    "Format",
    "register_format",
    "get_format",
    "format_names",
    "scale_view",
    "granular_reduce",
    "observe_range",
    "compute_params",
    "params_from_tensor",
    "quantize",
    "dequantize",
    "fake_quantize",
    "qrange",
    "range_shape",
    "check_stored",
]

GRANULARITIES = ("tensor", "channel", "token", "group")

# Scales are clamped away from zero so all-zero channels/groups do not divide by zero.
#: smallest scale of the int formats (public: kernels that quantize like the core clamp to it too)
INT_MIN_SCALE = 1e-8
_FP8_MIN_SCALE = 1e-12


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class QuantSpec:
    """Description of one quantizer (see the module docstring for the shapes).

    Constructing a spec does not validate it, so a spec naming a plug-in format can
    exist before that format is registered; call :meth:`validate` (the top-level
    functions of this module do) to check it.
    """

    format: str = "int"
    bits: int = 8
    symmetric: bool = True
    granularity: str = "tensor"
    axis: int = 0
    group_size: int = 0

    @classmethod
    def mxfp4(cls) -> QuantSpec:
        """OCP MXFP4: E2M1 elements, one power-of-two (E8M0) scale per 32 values."""
        return cls(format="mxfp4", bits=4, granularity="group", group_size=32)

    @classmethod
    def nvfp4(cls) -> QuantSpec:
        """NVFP4: E2M1 elements, an e4m3 scale per 16 values and an fp32 tensor scale."""
        return cls(format="nvfp4", bits=4, granularity="group", group_size=16)

    def validate(self) -> QuantSpec:
        """Return ``self`` if the spec is usable, else raise a one-line ``ValueError``."""
        _check_type(self, "format", str)
        _check_type(self, "bits", int)
        _check_type(self, "symmetric", bool)
        _check_type(self, "granularity", str)
        _check_type(self, "axis", int)
        _check_type(self, "group_size", int)
        fmt = get_format(self.format)  # raises for unknown names, listing the known ones
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantSpec.granularity={self.granularity!r} not allowed: "
                f"allowed {_quoted(GRANULARITIES)}"
            )
        if self.group_size < 0:
            raise ValueError(f"QuantSpec.group_size={self.group_size} not allowed: allowed >= 0")
        if self.granularity == "group" and self.group_size == 0:
            raise ValueError(
                "QuantSpec.group_size=0 not allowed for granularity 'group': allowed > 0"
            )
        fmt.check_spec(self)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping, validate: bool = True) -> QuantSpec:
        """Inverse of :meth:`to_dict`; missing keys take their defaults.

        ``validate=False`` allows loading a spec whose plug-in format is not yet
        registered (e.g. before the module defining it is imported).
        """
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(
                    f"QuantSpec has no field {key!r}: allowed {_quoted(sorted(known))}"
                )
        spec = cls(**dict(d))
        return spec.validate() if validate else spec


def _check_type(spec: QuantSpec, field: str, typ: type) -> None:
    value = getattr(spec, field)
    # bool is a subclass of int, but bits=True is certainly a mistake.
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ValueError(
            f"QuantSpec.{field}={value!r} not allowed: must be of type {typ.__name__}"
        )


def _quoted(names) -> str:
    return ", ".join(repr(n) for n in names)


# --------------------------------------------------------------------------- shapes


def _channel_axis(x: Tensor, spec: QuantSpec) -> int:
    """``spec.axis`` normalised to a non-negative axis of ``x``."""
    if not -x.ndim <= spec.axis < x.ndim:
        raise ValueError(
            f"QuantSpec.axis={spec.axis} out of range for a tensor of shape {tuple(x.shape)}"
        )
    return spec.axis % x.ndim


def scale_view(x: Tensor, spec: QuantSpec) -> Tensor:
    """View of ``x`` that the spec's range-shaped tensors broadcast against.

    Only "group" changes anything: the last axis is split into
    ``(n_groups, group_size)``.  Formats call this in ``quantize``/``dequantize`` and
    reshape the result back to ``x.shape``.
    """
    if spec.granularity != "tensor" and x.ndim == 0:
        raise ValueError(f"granularity {spec.granularity!r} needs a tensor with at least 1 dim")
    if spec.granularity != "group":
        return x
    size = x.shape[-1]
    if size % spec.group_size:
        raise ValueError(
            f"last dim {size} is not divisible by QuantSpec.group_size={spec.group_size}"
        )
    return x.reshape(*x.shape[:-1], size // spec.group_size, spec.group_size)


def granular_reduce(x: Tensor, spec: QuantSpec, reduce: Callable[..., Tensor]) -> Tensor:
    """Reduce ``x`` over each scale group, giving a tensor of the spec's range shape.

    ``reduce`` is a torch reduction taking ``dim`` and ``keepdim`` (``torch.amin``,
    ``torch.sum``...).  Observers use it with ``torch.sum`` to get per-group errors.
    """
    if x.numel() == 0:
        raise ValueError(f"cannot reduce an empty tensor of shape {tuple(x.shape)}")
    if spec.granularity == "tensor":
        return reduce(x.reshape(-1), dim=0)
    xv = scale_view(x, spec)
    if spec.granularity == "channel":
        axis = _channel_axis(x, spec)
        dims = tuple(d for d in range(x.ndim) if d != axis)
        # A 1-D tensor has nothing to reduce: each channel is a single value.
        return reduce(xv, dim=dims, keepdim=True) if dims else xv.clone()
    return reduce(xv, dim=-1, keepdim=True)  # token, group


def observe_range(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Min and max of ``x`` (as float32) per scale group of ``spec``."""
    spec.validate()
    x = x.detach().to(torch.float32)
    return granular_reduce(x, spec, torch.amin), granular_reduce(x, spec, torch.amax)


def _abs_max(lo: Tensor, hi: Tensor) -> Tensor:
    return torch.maximum(lo.abs(), hi.abs())


# --------------------------------------------------------------------------- registry


class Format(ABC):
    """One number format.  Subclasses are stateless; register them with :func:`register_format`.

    ``x`` given to ``quantize`` may have any float dtype; formats compute in float32.
    Params must be a ``dict[str, Tensor]`` (no python scalars) so they can be saved.
    """

    name: str = ""
    #: the weight observer that fits this format's params from the weight itself (None: params
    #: come from a range, so any range observer works)
    weight_observer: str | None = None

    def check_spec(self, spec: QuantSpec) -> None:
        """Raise ``ValueError`` if ``spec`` is unusable for this format (after the
        generic checks of :meth:`QuantSpec.validate`).  Default: anything goes."""

    @abstractmethod
    def params_from_range(self, spec: QuantSpec, lo: Tensor, hi: Tensor) -> dict[str, Tensor]:
        """Params for per-group ranges ``lo``/``hi`` (range shape of ``spec``)."""

    @abstractmethod
    def quantize(self, x: Tensor, spec: QuantSpec, params: dict[str, Tensor]) -> Tensor:
        """Codes for ``x``, with the shape of ``x``."""

    @abstractmethod
    def dequantize(
        self,
        codes: Tensor,
        spec: QuantSpec,
        params: dict[str, Tensor],
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Values that ``codes`` stand for, as ``dtype``."""

    def fake_quantize(self, x: Tensor, spec: QuantSpec, params: dict[str, Tensor]) -> Tensor:
        """``x`` rounded to the values the format can represent, in ``x.dtype``."""
        codes = self.quantize(x, spec, params)
        return self.dequantize(codes, spec, params, dtype=torch.float32).to(x.dtype)

    def check_stored(
        self,
        spec: QuantSpec,
        params: dict[str, Tensor],
        codes: Tensor | None,
        shape: tuple[int, ...] | None,
        name: Callable[[str], str],
    ) -> None:
        """Raise a one-line ``ValueError`` naming the tensor (``name("codes")``,
        ``name(param)``) if codes/params read from a checkpoint cannot be what this format
        produces (see :func:`check_stored`).  Default, for plug-in formats that know no
        better: codes have ``shape``, floating-point params are finite."""
        if codes is not None and shape is not None:
            _expect_shape(codes, shape, name("codes"))
        for key, value in params.items():
            if value.is_floating_point():
                _expect_finite(value, name(key))


_FORMATS: dict[str, Format] = {}


def register_format(name: str):
    """Class decorator that registers a :class:`Format` subclass under ``name``.

    Registering the same class again (e.g. on module reload) replaces it;
    registering a *different* class under a taken name is an error.
    """

    def decorator(cls: type[Format]) -> type[Format]:
        if not (isinstance(cls, type) and issubclass(cls, Format)):
            raise TypeError(f"register_format({name!r}) needs a Format subclass, got {cls!r}")
        old = _FORMATS.get(name)
        if old is not None and _qualname(type(old)) != _qualname(cls):
            raise ValueError(
                f"format {name!r} is already registered by {_qualname(type(old))}"
            )
        cls.name = name
        _FORMATS[name] = cls()
        return cls

    return decorator


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def get_format(name: str) -> Format:
    try:
        return _FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown quantization format {name!r}: allowed {_quoted(sorted(_FORMATS))}"
        ) from None


def format_names() -> list[str]:
    return sorted(_FORMATS)


# --------------------------------------------------------------------------- int


def qrange(spec: QuantSpec) -> tuple[int, int]:
    """Smallest and largest integer code of an "int" spec."""
    if spec.format != "int":
        raise ValueError(f"qrange needs QuantSpec.format='int', got {spec.format!r}")
    if spec.symmetric:
        # Restricted range (int8: -127..127) keeps the grid symmetric around zero.
        qmax = 2 ** (spec.bits - 1) - 1
        return -qmax, qmax
    return 0, 2**spec.bits - 1


@register_format("int")
class IntFormat(Format):
    """Uniform integer grid.  Symmetric: codes int8, params {"scale"}.  Asymmetric:
    codes uint8, params {"scale", "zero_point"} (zero point as float32)."""

    def check_spec(self, spec: QuantSpec) -> None:
        if not 2 <= spec.bits <= 8:
            raise ValueError(
                f"QuantSpec.bits={spec.bits} not allowed for format 'int': allowed 2..8"
            )

    def params_from_range(self, spec, lo, hi):
        qmin, qmax = qrange(spec)
        lo, hi = lo.to(torch.float32), hi.to(torch.float32)
        if spec.symmetric:
            scale = (_abs_max(lo, hi) / qmax).clamp_min(INT_MIN_SCALE)
            return {"scale": scale}
        # The range must contain 0 so that zero (padding, ReLU outputs) is exact.
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(INT_MIN_SCALE)
        # Rounding the zero point can shift the grid by up to half a step, so in rare
        # cases the very edge of the range clamps by one step; zero stays exact.
        zero_point = torch.round(-lo / scale).clamp(qmin, qmax)
        return {"scale": scale, "zero_point": zero_point}

    def quantize(self, x, spec, params):
        qmin, qmax = qrange(spec)
        xv = scale_view(x.to(torch.float32), spec)
        q = torch.round(xv / params["scale"])
        if spec.symmetric:
            return q.clamp(qmin, qmax).to(torch.int8).reshape(x.shape)
        q = q + params["zero_point"]
        return q.clamp(qmin, qmax).to(torch.uint8).reshape(x.shape)

    def dequantize(self, codes, spec, params, dtype=torch.float32):
        q = scale_view(codes.to(torch.float32), spec)
        if not spec.symmetric:
            q = q - params["zero_point"]
        return (q * params["scale"]).reshape(codes.shape).to(dtype)

    def check_stored(self, spec, params, codes, shape, name):
        qmin, qmax = qrange(spec)
        keys = ("scale",) if spec.symmetric else ("scale", "zero_point")
        _expect_names(self.name, spec, params, keys, name)
        _expect_range_layout(spec, params, keys, shape, name)
        _expect_scale(params["scale"], torch.float32, name("scale"))
        if not spec.symmetric:
            zp = params["zero_point"]
            _expect_dtype(zp, torch.float32, name("zero_point"))
            _expect_finite(zp, name("zero_point"))
            if not torch.equal(zp, torch.round(zp)):
                raise ValueError(f"tensor {name('zero_point')!r} holds a non-integer zero point")
            _expect_within(zp, qmin, qmax, name("zero_point"), "zero points")
        if codes is not None:
            _expect_dtype(codes, torch.int8 if spec.symmetric else torch.uint8, name("codes"))
            if shape is not None:
                _expect_shape(codes, shape, name("codes"))
            _expect_within(codes, qmin, qmax, name("codes"), f"{spec.bits}-bit codes")


# --------------------------------------------------------------------------- fp8


class _Fp8Format(Format):
    """Simulated fp8: the scaled tensor is cast to a torch float8 dtype (works on CPU)."""

    dtype: torch.dtype

    def params_from_range(self, spec, lo, hi):
        fmax = torch.finfo(self.dtype).max
        amax = _abs_max(lo.to(torch.float32), hi.to(torch.float32))
        return {"scale": (amax / fmax).clamp_min(_FP8_MIN_SCALE)}

    def quantize(self, x, spec, params):
        fmax = torch.finfo(self.dtype).max
        xv = scale_view(x.to(torch.float32), spec)
        # Clamp first: the cast alone may turn out-of-range values into NaN/inf.
        scaled = (xv / params["scale"]).clamp(-fmax, fmax)
        return scaled.to(self.dtype).reshape(x.shape)

    def dequantize(self, codes, spec, params, dtype=torch.float32):
        q = scale_view(codes.to(torch.float32), spec)
        return (q * params["scale"]).reshape(codes.shape).to(dtype)

    def check_stored(self, spec, params, codes, shape, name):
        _expect_names(self.name, spec, params, ("scale",), name)
        _expect_range_layout(spec, params, ("scale",), shape, name)
        _expect_scale(params["scale"], torch.float32, name("scale"))
        if codes is not None:
            _expect_dtype(codes, self.dtype, name("codes"))
            if shape is not None:
                _expect_shape(codes, shape, name("codes"))
            _expect_finite(codes, name("codes"))  # quantize clamps to ±max: never NaN or inf


@register_format("fp8_e4m3")
class Fp8E4M3Format(_Fp8Format):
    dtype = torch.float8_e4m3fn


@register_format("fp8_e5m2")
class Fp8E5M2Format(_Fp8Format):
    dtype = torch.float8_e5m2


# --------------------------------------------------------------------------- fp4 (E2M1)

# Magnitudes of E2M1, indexed by the 3 low bits of a code (2 exponent bits, 1 mantissa bit).
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_MAX = E2M1_GRID[-1]
_E2M1_MIDPOINTS = tuple((a + b) / 2 for a, b in zip(E2M1_GRID, E2M1_GRID[1:]))
_SIGN_BIT = 8


def _encode_e2m1(y: Tensor) -> Tensor:
    """4-bit codes (``sign << 3 | magnitude index``) of the E2M1 values nearest ``y``.

    Values beyond ±6 saturate.  Ties (a value exactly between two grid points) go
    to the even index, i.e. the even mantissa, as in IEEE round-half-to-even.
    Values that round to zero get code 0 (no negative zero), so codes are canonical.
    """
    mag = y.abs().clamp(max=_E2M1_MAX)
    mids = torch.tensor(_E2M1_MIDPOINTS, dtype=mag.dtype, device=mag.device)
    below = torch.bucketize(mag, mids, right=False)  # index when a tie goes down
    above = torch.bucketize(mag, mids, right=True)  # index when a tie goes up
    idx = torch.where(below % 2 == 0, below, above)  # differs from `below` only on ties
    negative = (y < 0) & (idx > 0)
    return (idx + negative.to(idx.dtype) * _SIGN_BIT).to(torch.uint8)


def _decode_e2m1(codes: Tensor) -> Tensor:
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=codes.device)
    c = codes.to(torch.long)
    mag = grid[c & (_SIGN_BIT - 1)]
    return torch.where((c & _SIGN_BIT) != 0, -mag, mag)


def _safe_div(x: Tensor, scale: Tensor) -> Tensor:
    """``x / scale``, but 0 where the scale is 0 (a group that underflowed to scale 0)."""
    nonzero = scale != 0
    return torch.where(nonzero, x / torch.where(nonzero, scale, torch.ones_like(scale)), 0.0)


class _E2M1Format(Format):
    """Shared code for formats with E2M1 elements and one scale per group on the last axis."""

    group_size: int

    def check_spec(self, spec: QuantSpec) -> None:
        helper = f"QuantSpec.{self.name}()"
        if spec.granularity != "group":
            raise ValueError(
                f"QuantSpec.granularity={spec.granularity!r} not allowed for format "
                f"{self.name!r}: allowed 'group' (use {helper})"
            )
        if spec.group_size != self.group_size:
            raise ValueError(
                f"QuantSpec.group_size={spec.group_size} not allowed for format "
                f"{self.name!r}: allowed {self.group_size} (use {helper})"
            )

    @abstractmethod
    def effective_scale(self, params: dict[str, Tensor]) -> Tensor:
        """The float32 per-group scale that multiplies an E2M1 value."""

    def quantize(self, x, spec, params):
        xv = scale_view(x.to(torch.float32), spec)
        return _encode_e2m1(_safe_div(xv, self.effective_scale(params))).reshape(x.shape)

    def dequantize(self, codes, spec, params, dtype=torch.float32):
        values = scale_view(_decode_e2m1(codes), spec) * self.effective_scale(params)
        return values.reshape(codes.shape).to(dtype)

    def _check_codes(self, codes, shape, name) -> None:
        if codes is not None:
            _expect_dtype(codes, torch.uint8, name("codes"))
            if shape is not None:
                _expect_shape(codes, shape, name("codes"))
            _expect_within(codes, 0, 15, name("codes"), "E2M1 codes")


@register_format("mxfp4")
class MxFp4Format(_E2M1Format):
    """OCP MXFP4: scale ``2**(floor(log2(amax)) - 2)`` per 32 values (E8M0).

    The exponent puts ``amax / scale`` in [4, 8): values above 6 saturate, as the
    OCP MX spec prescribes.  All-zero groups get the smallest scale, 2**-127.
    """

    group_size = 32
    _EMAX_ELEMENT = 2  # exponent of the largest E2M1 power of two (4 = 2**2)

    def params_from_range(self, spec, lo, hi):
        amax = _abs_max(lo.to(torch.float32), hi.to(torch.float32))
        # Clamping amax away from 0 avoids log2(0) = -inf; the exponent clamp then
        # maps such groups to 2**-127.
        exponent = torch.floor(torch.log2(amax.clamp_min(2.0**-126))) - self._EMAX_ELEMENT
        exponent = exponent.clamp(-127, 127)
        return {"scale": torch.ldexp(torch.ones_like(exponent), exponent)}

    def effective_scale(self, params):
        return params["scale"]

    def check_stored(self, spec, params, codes, shape, name):
        _expect_names(self.name, spec, params, ("scale",), name)
        _expect_range_layout(spec, params, ("scale",), shape, name)
        scale = params["scale"]
        _expect_scale(scale, torch.float32, name("scale"))
        mantissa, exponent = torch.frexp(scale)
        if not (bool((mantissa == 0.5).all()) and bool(((exponent >= -126) & (exponent <= 128)).all())):
            raise ValueError(f"tensor {name('scale')!r} holds a scale that is not a power of two "
                             "in [2**-127, 2**127] (E8M0)")
        self._check_codes(codes, shape, name)


@register_format("nvfp4")
class NvFp4Format(_E2M1Format):
    """NVFP4: an fp32 tensor scale ``amax / (448 * 6)`` and an e4m3 scale per 16 values.

    The tensor scale maps the largest group scale to 448, the e4m3 maximum, so the
    group scales use the whole e4m3 range.  A group whose scale underflows e4m3 to 0
    quantizes to all zeros.
    """

    group_size = 16
    _E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max

    def params_from_range(self, spec, lo, hi):
        amax = _abs_max(lo.to(torch.float32), hi.to(torch.float32))
        tiny = torch.finfo(torch.float32).tiny
        global_scale = (amax.amax() / (self._E4M3_MAX * _E2M1_MAX)).clamp_min(tiny)
        group_scale = (amax / _E2M1_MAX / global_scale).clamp(max=self._E4M3_MAX)
        return {"scale": group_scale.to(torch.float8_e4m3fn), "global_scale": global_scale}

    def effective_scale(self, params):
        return params["scale"].to(torch.float32) * params["global_scale"]

    def check_stored(self, spec, params, codes, shape, name):
        _expect_names(self.name, spec, params, ("scale", "global_scale"), name)
        _expect_range_layout(spec, params, ("scale",), shape, name)
        scale = params["scale"]
        _expect_dtype(scale, torch.float8_e4m3fn, name("scale"))
        _expect_finite(scale, name("scale"))
        if bool((scale.to(torch.float32) < 0).any()):  # 0 is allowed: a group that underflowed
            raise ValueError(f"tensor {name('scale')!r} holds a negative scale")
        gs = params["global_scale"]
        _expect_shape(gs, (), name("global_scale"))
        _expect_scale(gs, torch.float32, name("global_scale"))
        self._check_codes(codes, shape, name)


# --------------------------------------------------------------------------- top level


def compute_params(spec: QuantSpec, lo: Tensor, hi: Tensor) -> dict[str, Tensor]:
    """Params of ``spec`` for the per-group ranges ``lo``/``hi``."""
    spec.validate()
    return get_format(spec.format).params_from_range(
        spec, lo.detach().to(torch.float32), hi.detach().to(torch.float32)
    )


def params_from_tensor(x: Tensor, spec: QuantSpec) -> dict[str, Tensor]:
    """Params fitted to the full min/max range of ``x``."""
    return compute_params(spec, *observe_range(x, spec))


def quantize(x: Tensor, spec: QuantSpec, params: dict[str, Tensor]) -> Tensor:
    spec.validate()
    return get_format(spec.format).quantize(x, spec, params)


def dequantize(
    codes: Tensor, spec: QuantSpec, params: dict[str, Tensor], dtype: torch.dtype = torch.float32
) -> Tensor:
    spec.validate()
    return get_format(spec.format).dequantize(codes, spec, params, dtype=dtype)


def fake_quantize(x: Tensor, spec: QuantSpec, params: dict[str, Tensor] | None = None) -> Tensor:
    """Quantize-dequantize ``x``; ``params=None`` fits them to ``x`` itself (dynamic)."""
    if params is None:
        params = params_from_tensor(x, spec)
    spec.validate()
    return get_format(spec.format).fake_quantize(x, spec, params)



# --------------------------------------------------------------------------- stored tensors


def range_shape(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The range shape of ``spec`` (that of its scales, zero points) for a tensor of ``shape``."""
    shape = tuple(int(s) for s in shape)
    if spec.granularity == "tensor":
        return ()
    if not shape:
        raise ValueError(f"granularity {spec.granularity!r} needs a tensor with at least 1 dim")
    if spec.granularity == "channel":
        if not -len(shape) <= spec.axis < len(shape):
            raise ValueError(f"QuantSpec.axis={spec.axis} out of range for a tensor of shape {shape}")
        axis = spec.axis % len(shape)
        return tuple(s if i == axis else 1 for i, s in enumerate(shape))
    if spec.granularity == "token":
        return shape[:-1] + (1,)
    if shape[-1] % spec.group_size:
        raise ValueError(f"last dim {shape[-1]} is not divisible by QuantSpec.group_size={spec.group_size}")
    return shape[:-1] + (shape[-1] // spec.group_size, 1)


def check_stored(
    spec: QuantSpec,
    params: Mapping[str, Tensor],
    codes: Tensor | None = None,
    shape: tuple[int, ...] | None = None,
    *,
    codes_name: str = "codes",
    params_prefix: str = "",
) -> None:
    """Check codes and params read from a checkpoint against what ``spec`` produces.

    Raises a one-line ``ValueError`` naming the tensor (``codes_name``, or
    ``params_prefix + param``) for: a missing or unexpected param, a wrong dtype or shape,
    a NaN/Inf, a scale that is not > 0 (and, per format, not a power of two, not e4m3…),
    a zero point or code outside the format's range.  ``shape`` is the shape of the
    quantized tensor (a weight): codes must have it and params its range shape.  For the
    params of a static *activation* quantizer (``shape=None``) only their layout is checked,
    since their range shape follows the activations.
    """
    spec.validate()

    def name(key: str) -> str:
        return codes_name if key == "codes" else params_prefix + key

    get_format(spec.format).check_stored(spec, dict(params), codes, None if shape is None else tuple(shape), name)


def _expect_names(fmt: str, spec: QuantSpec, params: Mapping[str, Tensor], keys, name) -> None:
    for key in keys:
        if key not in params:
            raise ValueError(f"tensor {name(key)!r} is missing (format {fmt!r} needs {_quoted(keys)})")
    for key in sorted(params):
        if key not in keys:
            raise ValueError(f"tensor {name(key)!r} is not expected (format {fmt!r} has only {_quoted(keys)})")


def _expect_dtype(t: Tensor, dtype: torch.dtype, what: str) -> None:
    if t.dtype != dtype:
        raise ValueError(f"tensor {what!r} is {str(t.dtype).removeprefix('torch.')}, "
                         f"the format stores {str(dtype).removeprefix('torch.')}")


def _expect_shape(t: Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"tensor {what!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _expect_finite(t: Tensor, what: str) -> None:
    values = t.to(torch.float32) if t.element_size() == 1 else t  # float8: no isfinite of its own
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"tensor {what!r} holds NaN or Inf values")


def _expect_scale(t: Tensor, dtype: torch.dtype, what: str) -> None:
    _expect_dtype(t, dtype, what)
    _expect_finite(t, what)
    if t.numel() and not bool((t > 0).all()):
        raise ValueError(f"tensor {what!r} holds a scale <= 0 ({float(t.min()):g}): scales must be finite and > 0")


def _expect_within(t: Tensor, lo: int, hi: int, what: str, kind: str) -> None:
    if t.numel() == 0:
        return
    tmin, tmax = t.min().item(), t.max().item()
    if tmin < lo or tmax > hi:
        bad = tmin if tmin < lo else tmax
        raise ValueError(f"tensor {what!r} holds {bad:g}, outside the range of {kind} [{lo}, {hi}]")


def _expect_range_layout(spec: QuantSpec, params: Mapping[str, Tensor], keys, shape, name) -> None:
    """Params of ``keys`` have the range shape of ``spec`` for ``shape`` (a weight), or, for
    an activation (``shape`` None), a layout that broadcasts like one: () per tensor, one
    non-1 dim at ``axis`` per channel, the same shape for every param."""
    if shape is not None:
        want = range_shape(spec, shape)
        for key in keys:
            _expect_shape(params[key], want, name(key))
        return
    first = tuple(params[keys[0]].shape)
    for key in keys:
        got = tuple(params[key].shape)
        if got != first:
            raise ValueError(f"tensor {name(key)!r} has shape {got}, but {name(keys[0])!r} has {first}")
    if spec.granularity == "tensor":
        if first != ():
            raise ValueError(f"tensor {name(keys[0])!r} has shape {first}, expected () (granularity 'tensor')")
        return
    if not first or 0 in first:
        raise ValueError(f"tensor {name(keys[0])!r} has shape {first}, which does not fit "
                         f"granularity {spec.granularity!r}")
    if spec.granularity == "channel":
        axes = [i for i, s in enumerate(first) if s != 1]
        if not -len(first) <= spec.axis < len(first) or any(i != spec.axis % len(first) for i in axes):
            raise ValueError(f"tensor {name(keys[0])!r} has shape {first}, expected one value per channel "
                             f"on axis {spec.axis}")
    elif spec.granularity == "group" and (len(first) < 2 or first[-1] != 1):
        raise ValueError(f"tensor {name(keys[0])!r} has shape {first}, expected (..., n_groups, 1)")
