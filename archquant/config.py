"""Run configuration: YAML + ``key=value`` overrides (omegaconf), validated up front.

Validation happens before any model is loaded, and every problem is reported as a
one-line ``ConfigError`` naming the key, the bad value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .core.formats import format_names
from .core.observers import OBSERVERS
from .core.presets import PRESETS, RecipeOptions, recipe_from_options
from .core.transforms import ROTATION_KINDS
from .options import OptionError, validate_options


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message is one line."""


@dataclass
class ModelSection:
    #: local directory (or hub id, when online); None = the family's built-in default model
    path: Optional[str] = None
    dtype: str = "float32"
    #: family-specific options (see the family adapter's ``model_options``)
    options: dict = field(default_factory=dict)


@dataclass
class DataSection:
    """A calibration or evaluation split. What a sample *is* (a token window, a prompt and seed,
    a scene) is the family's business: its keys go under ``options`` (the adapter's ``data_options``)."""

    source: str = "synthetic"
    split: Optional[str] = None
    #: file or directory for file-based sources
    path: Optional[str] = None
    num_samples: int = 256
    batch_size: int = 32
    seed: int = 0
    #: family-specific options (see the family adapter's ``data_options``), e.g. Mamba's seq_len
    options: dict = field(default_factory=dict)


DATA_SECTIONS = ("calibration", "evaluation")


@dataclass
class RunConfig:
    family: str = "toy"
    model: ModelSection = field(default_factory=ModelSection)
    recipe: RecipeOptions = field(default_factory=RecipeOptions)
    calibration: DataSection = field(default_factory=lambda: DataSection(split="calibration"))
    evaluation: DataSection = field(default_factory=lambda: DataSection(split="evaluation", num_samples=1024))
    #: more recipe presets run on the same model and data and reported side by side (not saved)
    compare: list = field(default_factory=list)
    output_dir: str = "outputs/run"
    save: bool = True
    #: reload the saved checkpoint and check that it reproduces the quantized metrics
    verify_reload: bool = True
    #: "real": also convert a copy of the quantized model to int8 kernels and evaluate it
    backend: str = "fake"
    #: kernels of the real backend: "auto" (Triton on CUDA, torch's int8 CPU ops on a CPU) or
    #: "triton" (the Triton kernels everywhere; on a CPU through TRITON_INTERPRET=1, slow)
    real_kernels: str = "auto"
    seed: int = 0
    progress: bool = True


ALLOWED = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "backend": ("fake", "real"),
    "real_kernels": ("auto", "triton"),
    "recipe.w_granularity": ("tensor", "channel", "group"),
    "recipe.a_granularity": ("tensor", "token"),
    "recipe.rotation": ROTATION_KINDS,
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against a dataclass field type, allowing int→float; returns the value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _check_type(key, value, inner)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    if origin is list and args == (dict,):  # recipe.steps: each step is checked by steps_from_config
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list of steps such as [{{SmoothQuant: {{alpha: 0.5}}}}, "
                              f"{{Quantize: {{...}}}}], got {value!r}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key '{key}' must be a list of names, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}' has unsupported type {_type_name(tp)}")


def _build(cls: type, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}': allowed keys under "
                          f"'{prefix.rstrip('.') or '<root>'}' are {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp, value = hints[name], data[name]
        if dataclasses.is_dataclass(tp):
            default = getattr(cls(), name)  # keep section defaults, e.g. calibration.split
            merged = {**dataclasses.asdict(default), **(value or {})} if isinstance(value, dict) or value is None else value
            kwargs[name] = _build(tp, merged, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(f"{prefix}{name}", value, tp)
    return cls(**kwargs)


def _allowed(key: str, value: Any, allowed) -> None:
    if value is not None and value not in allowed:
        raise ConfigError(f"config key '{key}' has value {value!r}: allowed values are {', '.join(map(str, allowed))}")


def validate(cfg: RunConfig) -> RunConfig:
    """Family-independent value checks, then the family's own (options, recipe, data sources)."""
    from .adapters import families, get_adapter

    _allowed("family", cfg.family, families())
    for key, allowed in ALLOWED.items():
        section, _, name = key.rpartition(".")
        obj = getattr(cfg, section) if section else cfg
        _allowed(key, getattr(obj, name), allowed)
    for key in ("w_format", "a_format"):
        _allowed(f"recipe.{key}", getattr(cfg.recipe, key), format_names())
    for key in ("w_observer", "a_observer"):
        _allowed(f"recipe.{key}", getattr(cfg.recipe, key), sorted(OBSERVERS))
    try:
        cfg.recipe.validate()  # bits, group size, alpha, percentile: the same checks the Python API applies
    except ValueError as e:
        key, _, rest = str(e).partition(" ")  # "recipe.w_bits has value ..." -> "config key 'recipe.w_bits' has value ..."
        raise ConfigError(f"config key '{key}' {rest}") from None

    adapter = get_adapter(cfg.family)
    if cfg.recipe.steps is None:
        _allowed("recipe.name", cfg.recipe.preset, sorted(adapter.recipes()))
    for name in cfg.compare:
        _allowed("compare", name, sorted(adapter.recipes()))
    for options in (cfg.recipe, *(compare_options(cfg.recipe, name) for name in cfg.compare)):
        try:  # every step's values, and the named preset's own options (recipe.options)
            recipe_from_options(options, adapter.recipes(), family=cfg.family)
        except OptionError as e:
            raise ConfigError(str(e)) from None
        except ValueError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(("recipe.", "config key")) else f"config key 'recipe': {msg}") from None
    try:
        cfg.model.options = validate_options(cfg.model.options, adapter.model_options, "model.options",
                                             family=cfg.family)
        for section in DATA_SECTIONS:
            data: DataSection = getattr(cfg, section)
            data.options = validate_options(data.options, adapter.data_options, f"{section}.options",
                                            family=cfg.family, role=section)
    except OptionError as e:
        raise ConfigError(str(e)) from None
    for section in DATA_SECTIONS:
        data = getattr(cfg, section)
        _allowed(f"{section}.source", data.source, adapter.data_sources)
        for name in ("num_samples", "batch_size"):
            if getattr(data, name) <= 0:
                raise ConfigError(f"config key '{section}.{name}' must be positive, got {getattr(data, name)}")
        if data.path is not None and not Path(data.path).exists():
            raise ConfigError(f"file not found for '{section}.path': {data.path}")
    if cfg.model.path is not None and _looks_local(cfg.model.path) and not Path(cfg.model.path).exists():
        raise ConfigError(f"file not found for 'model.path': {cfg.model.path}")
    return cfg


def compare_options(recipe: RecipeOptions, name: str) -> RecipeOptions:
    """The options of baseline preset ``name`` in ``compare``: the main recipe's knobs (same bits,
    formats, granularities), without its steps; of its preset's own options, those the baseline's
    preset declares too (e.g. the same calibration budget), so that the comparison is like for like."""
    from .core.presets import PRESETS

    declared = PRESETS[name].options if name in PRESETS else {}
    shared = {k: v for k, v in (recipe.options or {}).items() if k in declared}
    return dataclasses.replace(recipe, name=name, steps=None, options=shared)


def _looks_local(path: str) -> bool:
    """A hub id is 'org/name'; anything else (absolute, ./, ~, more slashes) is a local path."""
    return path.startswith((".", "/", "~")) or path.count("/") != 1 or Path(path).exists()


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path``, apply dotlist overrides, check keys, types and values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    conf = _read_yaml(path)
    over = _parse_overrides(overrides) if overrides else OmegaConf.create({})
    # older data keys are moved into options in the file and in the overrides separately, so that
    # "calibration.seq_len=64" on the command line still overrides the file's options.seq_len
    family = over.get("family", conf.get("family", RunConfig.family))
    try:
        conf = OmegaConf.create(_move_recipe_options(_move_data_options(OmegaConf.to_container(conf, resolve=True),
                                                                        family)))
        over = OmegaConf.create(_move_recipe_options(_move_data_options(OmegaConf.to_container(over, resolve=True),
                                                                        family)))
        merged = OmegaConf.merge(conf, over)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot apply overrides {' '.join(overrides or [])}: {str(e).splitlines()[0]}") from None
    return validate(_build(RunConfig, OmegaConf.to_container(merged, resolve=True), ""))


def _move_data_options(raw: dict, family: Any) -> dict:
    """Older configs put a family's data keys (Mamba's seq_len, task_examples, lm_eval_tasks, shuffle)
    beside ``source``; they are read as ``<section>.options.<key>``. A key the family does not
    declare is left for ``_build`` to refuse, with the section's allowed keys."""
    from .adapters import get_adapter

    try:
        declared = get_adapter(family).data_options
    except (ValueError, TypeError):
        return raw  # an unknown family is refused by validate(), naming the allowed ones
    generic = {f.name for f in dataclasses.fields(DataSection)}
    for section in DATA_SECTIONS:
        data = raw.get(section)
        if not isinstance(data, dict):
            continue
        moved = {k: data[k] for k in list(data) if k not in generic and k in declared}
        if not moved:
            continue
        options = data.get("options") or {}
        if not isinstance(options, dict):
            continue  # _build names the bad type
        twice = [k for k in moved if k in options]
        if twice:
            raise ConfigError(f"config key '{section}.{twice[0]}' is given twice: as '{section}.{twice[0]}' and "
                              f"'{section}.options.{twice[0]}' (its name now); keep the second")
        raw[section] = {**{k: v for k, v in data.items() if k not in moved}, "options": {**options, **moved}}
    return raw


def _move_recipe_options(raw: dict) -> dict:
    """Older configs put a preset's own options (MambaQuant's klt_sites) beside its name; they are
    read as ``recipe.options.<key>``, which the preset validates."""
    recipe = raw.get("recipe")
    if not isinstance(recipe, dict):
        return raw
    known = {f.name for f in dataclasses.fields(RecipeOptions)}
    declared = {k for p in PRESETS.values() for k in p.options}
    moved = {k: recipe[k] for k in list(recipe) if k not in known and k in declared}
    options = recipe.get("options") or {}
    if not moved or not isinstance(options, dict):
        return raw
    twice = [k for k in moved if k in options]
    if twice:
        raise ConfigError(f"config key 'recipe.{twice[0]}' is given twice: as 'recipe.{twice[0]}' and "
                          f"'recipe.options.{twice[0]}' (its name now); keep the second")
    raw["recipe"] = {**{k: v for k, v in recipe.items() if k not in moved}, "options": {**options, **moved}}
    return raw


def _read_yaml(path: Path):
    """The config file as an omegaconf mapping; every problem names the file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    if b"\0" in raw:
        raise ConfigError(f"config {path} is not a YAML text file (it holds binary data)")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not a YAML text file (not valid UTF-8)") from None
    try:
        conf = OmegaConf.load(path)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot read config {path}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # YAML syntax errors come from the yaml package
        if type(e).__module__.startswith("yaml"):
            raise ConfigError(f"cannot parse config {path}: {str(e).splitlines()[0]}") from None
        raise
    if not isinstance(conf, DictConfig):
        raise ConfigError(f"config {path} must be a mapping of keys (family, model, recipe, ...), "
                          f"got a {type(conf).__name__.removesuffix('Config').lower()}")
    if not conf:
        raise ConfigError(f"config {path} is empty: it needs at least 'family' and 'recipe' "
                          f"(see configs/ for examples)")
    return conf


def _parse_overrides(overrides: list[str]):
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
    for override in overrides:  # one at a time, so an error names the culprit
        try:
            OmegaConf.from_dotlist([override])
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"cannot parse override {override!r}: {first}") from None
    return OmegaConf.from_dotlist(overrides)


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
