"""Calibration driver: run a model over calibration batches and collect statistics.

Two uses share one loop:
* ``collect_stats`` hooks chosen modules and feeds their inputs (or outputs) to
  statistic objects (channel absmax for smoothing, covariance for KLT, …) *before* the model
  is rewritten;
* ``calibrate`` switches the static activation quantizers of a fake-quant model to
  observation mode, runs the data, and freezes their parameters.

Statistics per regime (e.g. per diffusion timestep): the ``forward_fn`` runs each model call
inside ``core.context_key.context_key(key)``, and ``observers.KeyedObserver`` (or a static
quantizer with observer ``"keyed"``) keeps one statistic per key; everything else pools all keys.

Both check every module's output for NaN/Inf and name the first module that produced one,
because a silent NaN in calibration turns every scale downstream into garbage.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .modules import freeze_model, set_act_mode

ForwardFn = Callable[[nn.Module, Any], Any]


class NonFiniteActivationError(RuntimeError):
    """A module produced NaN or Inf during calibration."""


def default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _tensors(out: Any):
    if torch.is_tensor(out):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _tensors(o)
    elif isinstance(out, dict):
        for o in out.values():
            yield from _tensors(o)
    elif hasattr(out, "to_tuple"):  # transformers ModelOutput
        yield from _tensors(out.to_tuple())


@contextmanager
def nonfinite_guard(model: nn.Module):
    """Raise ``NonFiniteActivationError`` naming the first module whose output is not finite."""

    def make_hook(name: str):
        def hook(_module, _inp, out):
            for t in _tensors(out):
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise NonFiniteActivationError(
                        f"non-finite activation (NaN/Inf) in the output of module '{name or '<model>'}' during calibration")
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in model.named_modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def calibration_batches(data: Iterable[Any] | None, *, needed_by: str | None = None,
                        validate: Callable[[Any], None] | None = None) -> list[Any] | None:
    """The calibration data as a list, checked before any model is touched.

    ``data`` is None or any iterable of batches (list, tuple, generator, DataLoader, ...); it is
    iterated exactly once here, so a single-use generator serves every step of a recipe (the
    list holds all its batches in memory; a list passed in is only copied shallowly).
    ``needed_by`` names what needs the data ("recipe 'quamba' (step 'quantize')"): then None or
    no batch at all (an empty list, an exhausted generator) is a ``ValueError``; when None, the
    data is optional. ``validate(batch)`` raises ``ValueError`` saying what is wrong with one
    batch; the message is prefixed with the batch's index.
    """
    if data is None:
        if needed_by is not None:
            raise ValueError(f"{needed_by} needs calibration data, but calib_data is None")
        return None
    if torch.is_tensor(data):
        raise ValueError(f"calib_data is a single tensor of shape {tuple(data.shape)}: pass an iterable of batches, "
                         "e.g. [x] or list(x.split(batch_size))")
    try:
        it = iter(data)
    except TypeError:
        raise ValueError(f"calib_data must be an iterable of batches (a list, a generator, ...), "
                         f"got a {type(data).__name__}") from None
    one_shot = it is data  # a generator / iterator: it can be read once only
    batches = list(it)
    if not batches and needed_by is not None:
        what = ("the iterator yielded no batch (a generator can be read only once: pass a list, "
                "or a fresh generator per call)" if one_shot else f"got an empty {type(data).__name__}")
        raise ValueError(f"calibration data is empty: {needed_by} needs calibration batches, {what}")
    if validate is not None:
        for i, batch in enumerate(batches):
            try:
                validate(batch)
            except (ValueError, TypeError) as e:
                raise ValueError(f"calibration batch {i}: {e}") from None
    return batches


def check_finite_parameters(model: nn.Module) -> None:
    """Refuse a model with a NaN or Inf parameter, naming the first one: every scale, rotation
    and smoothing factor computed from it would be garbage (buffers are not checked: a mask
    buffer may hold -inf legitimately)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (p.is_floating_point() or p.is_complex()) and not bool(torch.isfinite(p).all()):
                bad = p.numel() - int(torch.isfinite(p).sum())
                if bad:
                    raise ValueError(f"parameter {name!r} of {type(model).__name__} has {bad} NaN/Inf value"
                                     f"{'s' if bad > 1 else ''} (of {p.numel()}): refusing to quantize a "
                                     f"non-finite model")


def run_batches(model: nn.Module, batches: Iterable[Any], forward_fn: ForwardFn | None = None,
                desc: str = "calibrating", max_batches: int | None = None, progress: bool = True) -> int:
    """Run ``model`` over ``batches`` without gradients, guarded against non-finite outputs."""
    forward_fn = forward_fn or default_forward
    count = 0
    total = None
    if max_batches is not None:
        total = max_batches
    elif hasattr(batches, "__len__"):
        total = len(batches)
    with torch.no_grad(), nonfinite_guard(model):
        for batch in tqdm(batches, desc=desc, total=total, disable=not progress, leave=False):
            if max_batches is not None and count >= max_batches:
                break
            forward_fn(model, batch)
            count += 1
    if count == 0:
        raise ValueError("calibration data is empty: no batch was run")
    return count


SITE_SIDES = ("input", "output")


def split_site(site: str, where: str = "input") -> tuple[str, str]:
    """``"<module>:input"`` / ``"<module>:output"`` → (module, side); a bare module name takes ``where``."""
    name, sep, side = site.rpartition(":")
    if not sep:
        return site, where
    if side not in SITE_SIDES:
        raise ValueError(f"site {site!r}: {side!r} not allowed after ':': allowed {', '.join(SITE_SIDES)}")
    return name, side


def collect_stats(model: nn.Module, batches: Iterable[Any], stats: dict[str, Any], *,
                  forward_fn: ForwardFn | None = None, where: str = "input", desc: str = "collecting statistics",
                  max_batches: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Feed tensors seen during one pass over ``batches`` to ``stats[site].update(tensor)``.

    A site is ``"<module>:input"`` (its first positional input) or ``"<module>:output"``; a bare
    module name means its ``where`` side. Inputs and outputs of any modules are collected in the
    same pass (each batch runs once), and ``stats`` is returned with its keys as given.
    """
    if where not in SITE_SIDES:
        raise ValueError(f"where={where!r} not allowed: 'input' or 'output'")
    modules = dict(model.named_modules())
    sites = {key: split_site(key, where) for key in stats}
    missing = [name for name, _ in sites.values() if name not in modules]
    if missing:
        raise KeyError(f"no module named {missing[0]!r} in the model")
    handles = []
    for key, (name, side) in sites.items():
        stat = stats[key]
        if side == "input":
            handles.append(modules[name].register_forward_pre_hook(lambda _m, args, s=stat: s.update(args[0])))
        else:
            handles.append(modules[name].register_forward_hook(lambda _m, _a, out, s=stat: s.update(out)))
    try:
        run_batches(model, batches, forward_fn, desc=desc, max_batches=max_batches, progress=progress)
    finally:
        for h in handles:
            h.remove()
    return stats


def calibrate(model: nn.Module, batches: Iterable[Any], *, forward_fn: ForwardFn | None = None,
              max_batches: int | None = None, progress: bool = True) -> int:
    """Observe static activation ranges over ``batches``, then freeze the whole model."""
    set_act_mode(model, "calibrate")
    try:
        n = run_batches(model, batches, forward_fn, desc="calibrating", max_batches=max_batches, progress=progress)
    except BaseException:
        set_act_mode(model, "off")
        raise
    freeze_model(model)
    return n
