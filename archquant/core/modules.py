"""Fake-quant module wrappers: Linear, depthwise Conv1d and activation matmul.

A wrapper carries everything needed to rebuild it: its weight spec, its activation
quantizers (spec, static/dynamic, observer) and its online input transform. Life cycle:

1. ``from_float``: wraps an FP module; the weight stays float.
2. calibration: activation quantizers in ``"calibrate"`` mode feed their observers.
3. ``freeze()``: static activation parameters are fixed from the observers and the weight is
   replaced by its integer/low-bit codes plus parameters. From then on the forward pass
   dequantizes those codes, so a model that is saved and loaded again computes exactly the
   same thing as the one in memory.

A wrapper rebuilt from its config and filled from a checkpoint is checked with
``check_loaded(prefix)``: every buffer its formats need is there and nothing else, with the
format's dtype and shape, finite positive scales, zero points and codes in range. A wrong
file fails then, with a ``ValueError`` naming the tensor, instead of at the first forward.
"""
from __future__ import annotations

from collections import ChainMap
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import formats
from .context_key import check_key, current_context_key
from .formats import QuantSpec
from .observers import build_observer
from .transforms import ONLINE_TRANSFORMS, OnlineTransform, build_online_transform


class _ParamBuffers(nn.Module):
    """Holds a format's parameter dict (scale, zero_point, …) as buffers.

    The set of names depends on the format, so buffers are (re)created when parameters are
    set or when a checkpoint supplies them (``_load_from_state_dict``).
    """

    def set(self, params: dict[str, torch.Tensor]) -> None:
        for name in list(self._buffers):
            del self._buffers[name]
        for name, value in params.items():
            self.register_buffer(name, value.detach().clone())

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self._buffers.items() if v is not None}

    def __len__(self) -> int:
        return len(self._buffers)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for key, value in state_dict.items():
            if key.startswith(prefix) and "." not in key[len(prefix):]:
                name = key[len(prefix):]
                if name not in self._buffers:
                    self.register_buffer(name, torch.empty_like(value))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class ActQuantizer(nn.Module):
    """Fake-quantizes an activation tensor.

    ``dynamic=True`` computes the parameters from every input (e.g. per-token); otherwise they
    are calibrated once by ``observer`` and frozen (e.g. Quamba's static per-tensor scales).
    Modes: ``"off"`` (identity), ``"calibrate"`` (observe, pass through), ``"quantize"``.

    ``clip_ratio`` r (dynamic only, 0 < r <= 1): each input's range is shrunk to r times its own
    (e.g. per token, scale = r·max|x_token| / qmax), so the few largest values saturate and the rest
    get a finer grid: a learned activation clip (``core.dsfq.LearnableClipping``, QuantVGGT's LAC).

    With ``observer="keyed"`` (``observers.KeyedRangeObserver``) a static quantizer keeps one set
    of parameters per context key seen in calibration (``core.context_key``, e.g. the diffusion
    timestep): ``keys`` lists them, ``key_params[i]`` holds key i's, and each call uses the current
    key's (a key it was not calibrated for is a ``ValueError``).
    """

    def __init__(self, spec: QuantSpec, dynamic: bool = False, observer: str = "minmax",
                 observer_kwargs: dict[str, Any] | None = None, clip_ratio: float = 1.0) -> None:
        super().__init__()
        self.spec = spec.validate()
        self.dynamic = dynamic
        self.clip_ratio = check_clip_ratio(clip_ratio, dynamic)
        self.observer_name = observer
        self.observer_kwargs = dict(observer_kwargs or {})
        self.mode = "quantize" if dynamic else "off"
        self.observer = None if dynamic else build_observer(observer, spec, **self.observer_kwargs)
        self.params = _ParamBuffers()
        self.keyed = observer == "keyed" and not dynamic
        if self.keyed:
            self._set_keys([])

    def _set_keys(self, keys: list) -> None:
        self.keys = [check_key(k) for k in keys]
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"context keys {self.keys} repeat a key")
        self.key_params = nn.ModuleList(_ParamBuffers() for _ in self.keys)
        self._key_index = {k: i for i, k in enumerate(self.keys)}

    def _current_params(self) -> dict[str, torch.Tensor]:
        if not self.keyed:
            return self.params.as_dict()
        key = current_context_key()
        if key is None:
            raise ValueError(f"this activation quantizer has parameters per context key ({self.keys}) but no key "
                             "is set: run the model inside archquant.core.context_key.context_key(key)")
        if key not in self._key_index:
            raise ValueError(f"no calibrated activation parameters for context key {key!r}: calibrated keys "
                             f"{self.keys}")
        return self.key_params[self._key_index[key]].as_dict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "calibrate":
            self.observer.update(x)
            return x
        if self.dynamic:
            if self.clip_ratio == 1.0:
                return formats.fake_quantize(x, self.spec)
            lo, hi = formats.observe_range(x, self.spec)
            r = self.clip_ratio
            return formats.fake_quantize(x, self.spec, formats.compute_params(self.spec, lo * r, hi * r))
        params = self._current_params()
        if not params:
            raise RuntimeError("static activation quantizer used before calibration (no scales)")
        return formats.fake_quantize(x, self.spec, params)

    def freeze(self) -> None:
        """Fix the static parameters from what the observer saw, then quantize from now on."""
        if not self.dynamic and self.observer is not None:  # a second freeze keeps the first scales
            if self.keyed:
                per_key = self.observer.params()
                self._set_keys(list(per_key))
                for buffers, params in zip(self.key_params, per_key.values()):
                    buffers.set(params)
            else:
                self.params.set(self.observer.params())
            self.observer = None
        self.mode = "quantize"

    def check_loaded(self, prefix: str = "", channels: int | None = None) -> None:
        """A dynamic quantizer holds no parameters; a static one exactly its format's, per context key
        when keyed (see module doc). ``channels``: the size of the last axis of the activations, when
        the owner knows it."""
        params = self.params.as_dict()
        if self.dynamic or self.keyed:
            if params:
                why = ("is dynamic (it computes its parameters from each input)" if self.dynamic
                       else "keeps its parameters per context key (key_params)")
                raise ValueError(f"tensor {prefix + 'params.' + sorted(params)[0]!r} is not expected: the quantizer "
                                 f"{why}")
            if self.dynamic:
                return
        if self.keyed:
            for i, buffers in enumerate(self.key_params):
                self._check_params(buffers.as_dict(), f"{prefix}key_params.{i}.", channels)
        else:
            self._check_params(params, prefix + "params.", channels)

    def _check_params(self, params: dict[str, torch.Tensor], params_prefix: str, channels: int | None) -> None:
        if not params:
            raise ValueError(f"tensor {params_prefix + 'scale'!r} is missing: a static activation quantizer "
                             "needs its calibrated parameters")
        formats.check_stored(self.spec, params, params_prefix=params_prefix)
        scale = params.get("scale")
        if (channels is not None and scale is not None and self.spec.granularity == "channel" and scale.ndim
                and self.spec.axis % scale.ndim == scale.ndim - 1 and scale.shape[-1] != channels):
            raise ValueError(f"tensor {params_prefix + 'scale'!r} has {scale.shape[-1]} channels, "
                             f"the activations {channels}")

    def to_config(self) -> dict:
        config = {"spec": self.spec.to_dict(), "dynamic": self.dynamic,
                  "observer": self.observer_name, "observer_kwargs": self.observer_kwargs}
        if self.keyed:
            config["keys"] = list(self.keys)
        if self.clip_ratio != 1.0:  # absent: 1.0, as every checkpoint written before clips existed
            config["clip_ratio"] = self.clip_ratio
        return config

    @classmethod
    def from_config(cls, config: dict) -> "ActQuantizer":
        q = cls(QuantSpec.from_dict(config["spec"]), dynamic=config["dynamic"],
                observer=config.get("observer", "minmax"), observer_kwargs=config.get("observer_kwargs"),
                clip_ratio=config.get("clip_ratio", 1.0))
        if q.keyed:
            keys = config.get("keys")
            if not isinstance(keys, list) or not keys:
                raise ValueError(f"a keyed activation quantizer needs its context keys (a non-empty list), "
                                 f"got keys={keys!r}")
            q._set_keys(keys)
        elif "keys" in config:
            raise ValueError("'keys' is only allowed for a static quantizer with observer 'keyed'")
        q.observer = None
        q.mode = "quantize"
        return q

    def extra_repr(self) -> str:
        kind = "dynamic" if self.dynamic else f"static/{self.observer_name}"
        keys = f" keys={len(self.keys)}" if self.keyed else ""
        clip = f" clip={self.clip_ratio:.4f}" if self.clip_ratio != 1.0 else ""
        return (f"{self.spec.format}{self.spec.bits if self.spec.format == 'int' else ''} {self.spec.granularity} "
                f"{kind}{keys}{clip} mode={self.mode}")


def check_clip_ratio(ratio: Any, dynamic: bool) -> float:
    """A dynamic quantizer's clip ratio as a float in (0, 1]; a static one takes only 1.0 (its
    calibrated range is already where it should be)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"activation clip_ratio={ratio!r} not allowed: allowed numbers in (0, 1]")
    if float(ratio) != 1.0 and not dynamic:
        raise ValueError(f"activation clip_ratio={ratio!r} is only allowed for a dynamic quantizer")
    return float(ratio)


#: formats whose codes of <= 4 bits are stored two per byte
NIBBLE_FORMATS = ("int", "twinlog")


def _packable(spec: QuantSpec, shape: tuple[int, ...]) -> bool:
    """Codes of ≤ 4 bits are stored two per byte (when the last axis is even)."""
    return spec.format in NIBBLE_FORMATS and spec.bits <= 4 and len(shape) > 0 and shape[-1] % 2 == 0


def _signed_nibbles(spec: QuantSpec) -> bool:
    """Whether the codes are signed integers (symmetric int: stored offset by +8); twin-log codes
    (sign bit + magnitude) and asymmetric int codes are unsigned."""
    return spec.format == "int" and spec.symmetric


def pack_nibbles(codes: torch.Tensor, signed: bool) -> torch.Tensor:
    """Two 4-bit codes per uint8 along the last axis: element 2i in the low nibble, 2i+1 in the
    high one; signed codes are stored offset by +8 (compressed-tensors' int4 layout)."""
    u = (codes.to(torch.int16) + (8 if signed else 0)).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    lo, hi = packed & 0xF, packed >> 4
    u = torch.stack([lo, hi], dim=-1).flatten(-2)
    return (u.to(torch.int16) - 8).to(torch.int8) if signed else u


class _QuantWeightMixin:
    """Shared weight handling: float weight until frozen, then codes + format parameters."""

    weight_spec: QuantSpec | None

    def _init_weight(self, weight: torch.Tensor, weight_spec: QuantSpec | None, weight_observer: str,
                     weight_observer_kwargs: dict | None) -> None:
        self.weight_spec = weight_spec.validate() if weight_spec is not None else None
        self.weight_observer = weight_observer
        self.weight_observer_kwargs = dict(weight_observer_kwargs or {})
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.weight_params = _ParamBuffers()
        self.weight_shape = tuple(weight.shape)
        self.frozen = False
        self.weight_packed = False  # 4-bit codes stored two per byte once frozen

    def _weight_params(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        obs = build_observer(self.weight_observer, self.weight_spec, **self.weight_observer_kwargs)
        obs.update(w)
        return obs.params()

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass multiplies by (dequantized when quantized)."""
        if self.weight_spec is None:
            return self.weight
        if self.frozen:
            codes = self.weight_codes
            if self.weight_packed:
                codes = unpack_nibbles(codes, _signed_nibbles(self.weight_spec))
            return formats.dequantize(codes, self.weight_spec, self.weight_params.as_dict(), dtype=self.weight_dtype)
        return formats.fake_quantize(self.weight, self.weight_spec, self._weight_params(self.weight))

    def freeze_weight(self) -> None:
        if self.weight_spec is None or self.frozen:
            return
        w = self.weight.detach()
        params = self._weight_params(w)
        self.weight_params.set(params)
        codes = formats.quantize(w, self.weight_spec, params)
        self.weight_packed = _packable(self.weight_spec, tuple(codes.shape))
        if self.weight_packed:
            codes = pack_nibbles(codes, _signed_nibbles(self.weight_spec))
        self.register_buffer("weight_codes", codes)
        self.weight_dtype = w.dtype
        del self.weight
        self.frozen = True

    def _prepare_frozen(self, dtype: torch.dtype) -> None:
        """Turn a freshly built wrapper into an empty frozen one, ready for ``load_state_dict``."""
        if self.weight_spec is None:
            return
        del self.weight
        self.weight_dtype = dtype
        self.register_buffer("weight_codes", torch.empty(0))
        self.frozen = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight_codes"
        if self.frozen and key in state_dict:
            self.weight_codes = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_weight(self, prefix: str) -> None:
        params = self.weight_params.as_dict()
        if self.weight_spec is None:
            if params:
                raise ValueError(f"tensor {prefix + 'weight_params.' + sorted(params)[0]!r} is not expected: "
                                 "the weight is not quantized")
            return
        spec, shape, name = self.weight_spec, self.weight_shape, prefix + "weight_codes"
        codes = self.weight_codes
        if self.weight_packed:
            if not _packable(spec, shape):
                raise ValueError(f"tensor {name!r}: packing 'int4x2' needs an int or twinlog format of <= 4 bits and an "
                                 f"even last dim, the weight is {spec.format} {spec.bits}-bit of shape {shape}")
            packed_shape = shape[:-1] + (shape[-1] // 2,)
            if codes.dtype != torch.uint8 or tuple(codes.shape) != packed_shape:
                raise ValueError(f"tensor {name!r} is {str(codes.dtype).removeprefix('torch.')} of shape "
                                 f"{tuple(codes.shape)}, packed int4x2 codes are uint8 of shape {packed_shape}")
            codes = unpack_nibbles(codes, _signed_nibbles(spec))
        formats.check_stored(spec, params, codes=codes, shape=shape, codes_name=name,
                             params_prefix=prefix + "weight_params.")

    def _weight_config(self) -> dict:
        return {"weight": None if self.weight_spec is None else {
            "spec": self.weight_spec.to_dict(), "observer": self.weight_observer,
            "observer_kwargs": self.weight_observer_kwargs,
            "packing": "int4x2" if self.weight_packed else None}}


def _maybe(q: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if q is None else q(x)


def _int_field(config: dict, key: str, minimum: int) -> int:
    value = config[key]
    if type(value) is not int or value < minimum:
        raise ValueError(f"{key}={value!r} not allowed: allowed integers >= {minimum}")
    return value


def _packing(wcfg: dict | None) -> bool:
    """Whether a weight config says its codes are packed two per byte."""
    packing = (wcfg or {}).get("packing")
    if packing not in (None, "int4x2"):
        raise ValueError(f"unknown weight packing {packing!r}: allowed None, 'int4x2'")
    return packing == "int4x2"


def _check_quantizers(module: nn.Module, prefix: str, names: tuple[str, ...],
                      channels: tuple[int | None, ...] | None = None) -> None:
    for i, child in enumerate(names):
        q = getattr(module, child)
        if q is not None:
            q.check_loaded(f"{prefix}{child}.", channels=None if channels is None else channels[i])


class QuantLinear(_QuantWeightMixin, nn.Module):
    """y = Q_a(T(x)) · Q_w(W)ᵀ + b, with T an optional online transform.

    When T is an online rotation, the inverse must already be fused into W (see
    ``core.transforms.rotate_linear_input``) so that, with quantization off, the output equals
    the original Linear's.
    """

    def __init__(self, in_features: int, out_features: int, weight: torch.Tensor, bias: torch.Tensor | None,
                 weight_spec: QuantSpec | None = None, input_quantizer: ActQuantizer | None = None,
                 input_transform: OnlineTransform | None = None, output_quantizer: ActQuantizer | None = None,
                 weight_observer: str = "minmax", weight_observer_kwargs: dict | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_weight(weight, weight_spec, weight_observer, weight_observer_kwargs)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.input_transform = input_transform
        self.input_quantizer = input_quantizer
        self.output_quantizer = output_quantizer

    @classmethod
    def from_float(cls, linear: nn.Linear, **kwargs) -> "QuantLinear":
        return cls(linear.in_features, linear.out_features, linear.weight, linear.bias, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _maybe(self.input_transform, x)
        x = _maybe(self.input_quantizer, x)
        y = F.linear(x, self.effective_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return _maybe(self.output_quantizer, y)

    def freeze(self) -> None:
        self.freeze_weight()

    def check_loaded(self, prefix: str = "") -> None:
        """Raise a ``ValueError`` naming the tensor if the loaded buffers do not fit the config."""
        self._check_weight(prefix)
        if self.input_transform is not None:
            if self.input_transform.size != self.in_features:
                raise ValueError(f"its input transform has size {self.input_transform.size}, "
                                 f"in_features={self.in_features}")
            self.input_transform.check_loaded(prefix + "input_transform.")
        _check_quantizers(self, prefix, ("input_quantizer", "output_quantizer"), (self.in_features, self.out_features))

    def to_config(self) -> dict:
        return {"type": "QuantLinear", "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, **self._weight_config(),
                "input_transform": None if self.input_transform is None else self.input_transform.to_config(),
                "input_quantizer": None if self.input_quantizer is None else self.input_quantizer.to_config(),
                "output_quantizer": None if self.output_quantizer is None else self.output_quantizer.to_config()}

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype = torch.float32) -> "QuantLinear":
        wcfg = config["weight"]
        for key in ("in_features", "out_features"):
            _int_field(config, key, 1)
        m = cls(config["in_features"], config["out_features"],
                torch.zeros(config["out_features"], config["in_features"], dtype=dtype),
                torch.zeros(config["out_features"], dtype=dtype) if config["bias"] else None,
                weight_spec=None if wcfg is None else QuantSpec.from_dict(wcfg["spec"]),
                input_quantizer=_act_from_config(config.get("input_quantizer")),
                input_transform=None if config.get("input_transform") is None
                else build_online_transform(config["input_transform"]),
                output_quantizer=_act_from_config(config.get("output_quantizer")),
                weight_observer=(wcfg or {}).get("observer", "minmax"),
                weight_observer_kwargs=(wcfg or {}).get("observer_kwargs"))
        m._prepare_frozen(dtype)
        m.weight_packed = _packing(wcfg)
        return m

    def extra_repr(self) -> str:
        w = "fp" if self.weight_spec is None else f"{self.weight_spec.format}{self.weight_spec.bits if self.weight_spec.format == 'int' else ''}/{self.weight_spec.granularity}"
        return f"in={self.in_features}, out={self.out_features}, weight={w}, frozen={self.frozen}"


class QuantConv1d(_QuantWeightMixin, nn.Module):
    """Causal depthwise Conv1d (Mamba's short convolution) with quantized weight and input.

    Input layout (batch, channels, length), as ``nn.Conv1d``; ``padding`` is kept from the
    wrapped conv and the caller trims to the causal part, exactly as with the FP module.
    """

    def __init__(self, conv: nn.Conv1d, weight_spec: QuantSpec | None = None,
                 input_quantizer: ActQuantizer | None = None, output_quantizer: ActQuantizer | None = None,
                 weight_observer: str = "minmax", weight_observer_kwargs: dict | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.padding, self.groups = conv.kernel_size[0], conv.padding[0], conv.groups
        self._init_weight(conv.weight, weight_spec, weight_observer, weight_observer_kwargs)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.input_quantizer = input_quantizer
        self.output_quantizer = output_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _maybe(self.input_quantizer, x)
        w = self.effective_weight().to(x.dtype)
        y = F.conv1d(x, w, None if self.bias is None else self.bias.to(x.dtype), padding=self.padding, groups=self.groups)
        return _maybe(self.output_quantizer, y)

    def freeze(self) -> None:
        self.freeze_weight()

    def check_loaded(self, prefix: str = "") -> None:
        """Raise a ``ValueError`` naming the tensor if the loaded buffers do not fit the config."""
        self._check_weight(prefix)
        _check_quantizers(self, prefix, ("input_quantizer", "output_quantizer"))

    def to_config(self) -> dict:
        return {"type": "QuantConv1d", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "padding": self.padding, "groups": self.groups,
                "bias": self.bias is not None, **self._weight_config(),
                "input_quantizer": None if self.input_quantizer is None else self.input_quantizer.to_config(),
                "output_quantizer": None if self.output_quantizer is None else self.output_quantizer.to_config()}

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype = torch.float32) -> "QuantConv1d":
        for key, minimum in (("in_channels", 1), ("out_channels", 1), ("kernel_size", 1), ("padding", 0),
                             ("groups", 1)):
            _int_field(config, key, minimum)
        conv = nn.Conv1d(config["in_channels"], config["out_channels"], config["kernel_size"],
                         padding=config["padding"], groups=config["groups"], bias=config["bias"], dtype=dtype)
        wcfg = config["weight"]
        m = cls(conv, weight_spec=None if wcfg is None else QuantSpec.from_dict(wcfg["spec"]),
                input_quantizer=_act_from_config(config.get("input_quantizer")),
                output_quantizer=_act_from_config(config.get("output_quantizer")),
                weight_observer=(wcfg or {}).get("observer", "minmax"),
                weight_observer_kwargs=(wcfg or {}).get("observer_kwargs"))
        m._prepare_frozen(dtype)
        m.weight_packed = _packing(wcfg)
        return m


class QuantMatmul(nn.Module):
    """a @ b between two activations, each optionally fake-quantized (e.g. attention, SSM h·C)."""

    def __init__(self, a_quantizer: ActQuantizer | None = None, b_quantizer: ActQuantizer | None = None) -> None:
        super().__init__()
        self.a_quantizer, self.b_quantizer = a_quantizer, b_quantizer

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(_maybe(self.a_quantizer, a), _maybe(self.b_quantizer, b))

    def freeze(self) -> None:
        pass

    def check_loaded(self, prefix: str = "") -> None:
        _check_quantizers(self, prefix, ("a_quantizer", "b_quantizer"))

    def to_config(self) -> dict:
        return {"type": "QuantMatmul",
                "a_quantizer": None if self.a_quantizer is None else self.a_quantizer.to_config(),
                "b_quantizer": None if self.b_quantizer is None else self.b_quantizer.to_config()}

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype = torch.float32) -> "QuantMatmul":
        return cls(_act_from_config(config.get("a_quantizer")), _act_from_config(config.get("b_quantizer")))


class ActSite(nn.Module):
    """A named point inside a model where an activation can be quantized (identity until filled).

    Model code puts these where no Linear/Conv input or output is the right place, e.g.
    Mamba's SSM input u, which feeds both x_proj and the scan and must be quantized once.
    """

    def __init__(self, quantizer: ActQuantizer | None = None) -> None:
        super().__init__()
        self.quantizer = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _maybe(self.quantizer, x)

    def freeze(self) -> None:
        pass

    @property
    def is_quantized(self) -> bool:
        return self.quantizer is not None

    def check_loaded(self, prefix: str = "") -> None:
        _check_quantizers(self, prefix, ("quantizer",))

    def to_config(self) -> dict:
        return {"type": "ActSite", "quantizer": None if self.quantizer is None else self.quantizer.to_config()}

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype = torch.float32) -> "ActSite":
        return cls(_act_from_config(config.get("quantizer")))


def _act_from_config(config: dict | None) -> ActQuantizer | None:
    return None if config is None else ActQuantizer.from_config(config)


#: module types a checkpoint can name; model code may add its own (``register_module_type``). The
#: second map is the online-transform registry itself (keyed by config "type"), so a transform
#: placed on its own (e.g. a state-dimension rotation) is saved and rebuilt like a wrapper,
#: including kinds registered after this module was imported.
QUANT_MODULES: ChainMap[str, type] = ChainMap({"QuantLinear": QuantLinear, "QuantConv1d": QuantConv1d,
                                               "QuantMatmul": QuantMatmul, "ActSite": ActSite},
                                              ONLINE_TRANSFORMS)


def register_module_type(cls: type) -> type:
    """Let checkpoints rebuild ``cls`` (it needs ``to_config`` and ``from_config(config, dtype)``;
    an optional ``check_loaded(prefix)`` runs once its tensors are loaded, see the module doc)."""
    QUANT_MODULES[cls.__name__] = cls
    return cls


def module_from_config(config: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    kind = config.get("type")
    if kind not in QUANT_MODULES:
        raise ValueError(f"unknown quantized module type {kind!r}: allowed {', '.join(QUANT_MODULES)}")
    return QUANT_MODULES[kind].from_config(config, dtype=dtype)


def check_replaces(module: nn.Module, old: nn.Module | None) -> None:
    """Raise a ``ValueError`` if the rebuilt wrapper ``module`` cannot stand where a model has ``old``
    (a QuantLinear for a Linear of the same size, a QuantConv1d for the same conv, an ActSite for
    an ActSite). Other types are the model's business."""
    if isinstance(module, QuantLinear):
        if not isinstance(old, (nn.Linear, QuantLinear)):
            raise ValueError(f"a QuantLinear cannot replace the model's {type(old).__name__}")
        if (old.in_features, old.out_features) != (module.in_features, module.out_features):
            raise ValueError(f"QuantLinear in={module.in_features}, out={module.out_features} does not fit the "
                             f"model's Linear in={old.in_features}, out={old.out_features}")
    elif isinstance(module, QuantConv1d):
        if not isinstance(old, (nn.Conv1d, QuantConv1d)):
            raise ValueError(f"a QuantConv1d cannot replace the model's {type(old).__name__}")
        geometry = ("in_channels", "out_channels", "kernel_size", "padding", "groups")

        def get(m, key):
            v = getattr(m, key)
            return v[0] if isinstance(v, tuple) else v
        if any(get(old, k) != get(module, k) for k in geometry):
            raise ValueError("QuantConv1d (" + ", ".join(f"{k}={get(module, k)}" for k in geometry) + ") does not "
                             "fit the model's conv (" + ", ".join(f"{k}={get(old, k)}" for k in geometry) + ")")
    elif isinstance(module, ActSite) and not isinstance(old, ActSite):
        raise ValueError(f"an ActSite cannot replace the model's {type(old).__name__}")


def act_quantizers(model: nn.Module):
    """(name, quantizer) for every activation quantizer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ActQuantizer)]


def set_act_mode(model: nn.Module, mode: str) -> None:
    """Switch every static, not yet frozen activation quantizer to ``mode``."""
    for _, q in act_quantizers(model):
        if not q.dynamic and q.observer is not None:  # frozen quantizers keep quantizing
            q.mode = mode


def freeze_model(model: nn.Module) -> None:
    """Fix all activation parameters and replace every weight by its codes."""
    for _, q in act_quantizers(model):
        q.freeze()
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantConv1d)):
            m.freeze()
