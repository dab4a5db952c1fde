"""Options a family declares for its config sections (``model.options``, ``calibration.options``,
``evaluation.options``), and the one validation every family gets.

A family says what it accepts with defaults, types and allowed values::

    data_options = {
        "seq_len": Option(256, minimum=1, help="tokens per window"),
        "task_examples": Option(256, minimum=0, roles=("evaluation",)),
        "guidance_scale": Option(4.0, minimum=0.0),
        "sampler": Option("ddim", allowed=("ddim", "euler")),
    }

and the config loader refuses an unknown key or a bad value with one line naming the key and
what is allowed, before any model is loaded. ``config.py`` never needs to learn a family's keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping


class OptionError(ValueError):
    """A bad option key or value; the message is one line naming the config key."""


#: the type names messages use
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "a mapping"}


@dataclass(frozen=True)
class Option:
    """One declared option.

    default: the value when the key is absent (its type is the option's type unless ``type`` is given;
        a default of None needs ``type``, and then None stays allowed).
    allowed: the values allowed (None: any value of the type).
    minimum / maximum: bounds for numbers.
    items: the type of list items (``type=list``).
    roles: for data options, the sections that accept the key ("calibration", "evaluation").
    check: extra check returning a problem ("must be even") or None.
    """

    default: Any
    type: type | None = None
    allowed: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    items: type | None = None
    roles: tuple[str, ...] = ("calibration", "evaluation")
    check: Callable[[Any], str | None] | None = None
    help: str = ""

    @property
    def value_type(self) -> type | None:
        return self.type if self.type is not None else (None if self.default is None else type(self.default))

    def coerce(self, key: str, value: Any) -> Any:
        """``value`` checked against this option (int → float allowed); raises ``OptionError``."""
        tp = self.value_type
        if value is None:
            if self.default is None:
                return None
            raise OptionError(f"config key '{key}' must be {_TYPE_NAMES.get(tp, tp.__name__)}, got null")
        if tp is not None:
            value = _coerce_type(key, value, tp, self.items)
        if self.allowed is not None and value not in self.allowed:
            raise OptionError(f"config key '{key}' has value {value!r}: allowed values are "
                              f"{', '.join(map(str, self.allowed))}")
        if self.minimum is not None and value < self.minimum:
            raise OptionError(f"config key '{key}' has value {value!r}: allowed values are >= {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise OptionError(f"config key '{key}' has value {value!r}: allowed values are <= {self.maximum}")
        if self.check is not None and (problem := self.check(value)):
            raise OptionError(f"config key '{key}' has value {value!r}: {problem}")
        return value


def _coerce_type(key: str, value: Any, tp: type, items: type | None) -> Any:
    bad = OptionError(f"config key '{key}' must be {_TYPE_NAMES.get(tp, tp.__name__)}, got {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
    elif tp is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        value = [_coerce_type(f"{key}[{i}]", v, items, None) for i, v in enumerate(value)] if items else list(value)
    elif not isinstance(value, tp):
        raise bad
    return value


def as_option(spec: Any) -> Option:
    """An ``Option`` as is; a plain value is an option with that default (the older, shorter form)."""
    return spec if isinstance(spec, Option) else Option(spec)


def validate_options(values: Mapping[str, Any] | None, schema: Mapping[str, Any], where: str, *,
                     family: str | None = None, role: str | None = None, owner: str | None = None) -> dict[str, Any]:
    """``values`` checked against ``schema`` (name → ``Option`` or default), with defaults filled in.

    ``where`` is the config path of the mapping ("evaluation.options"); ``role`` the section a data
    option is given in, refused where the option does not apply. Messages name the schema's owner:
    ``owner`` ("preset 'mambaquant'") or else ``family``."""
    owner = owner or f"family {family!r}"
    values = dict(values or {})
    schema = {k: as_option(v) for k, v in schema.items()}
    accepted = sorted(k for k, o in schema.items() if role is None or role in o.roles)
    for key in values:
        if key not in schema:
            allowed = ", ".join(accepted) if accepted else "none"
            raise OptionError(f"unknown config key '{where}.{key}' for {owner}: allowed keys are {allowed}")
        if role is not None and role not in schema[key].roles:
            raise OptionError(f"config key '{where}.{key}' is only meaningful under "
                              f"{' / '.join(repr(r) for r in schema[key].roles)}")
    out = {}
    for key in accepted:
        out[key] = schema[key].coerce(f"{where}.{key}", values[key]) if key in values else schema[key].default
    return out


def describe(schema: Mapping[str, Any]) -> dict[str, dict]:
    """A JSON-able description of a schema (for docs and ``--help`` listings)."""
    out = {}
    for key, spec in schema.items():
        o = as_option(spec)
        tp = o.value_type
        out[key] = {"default": o.default, "type": None if tp is None else tp.__name__,
                    **({"allowed": list(o.allowed)} if o.allowed else {}),
                    **({"roles": list(o.roles)} if o.roles != ("calibration", "evaluation") else {}),
                    **({"help": o.help} if o.help else {})}
    return out
