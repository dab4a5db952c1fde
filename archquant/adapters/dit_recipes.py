"""Recipes of the DiT family: LRQ-DiT (twin-log weights + adaptive rotation), its ablations, baselines.

All activations are quantized dynamically per token (symmetric), as LRQ-DiT does; the bit widths
come from ``recipe.w_bits`` / ``recipe.a_bits`` (default W8A8; sub-8-bit settings are simulated).
"""
from __future__ import annotations

from ..core.ars import AdaptiveRotation
from ..core.formats import QuantSpec
from ..core.presets import RecipeOptions, act_spec, register_preset, weight_spec
from ..core.recipe import Quantize, Recipe
from ..options import Option

ARS_OPTIONS = {
    "threshold": Option(1.0, minimum=0.0, help="J at or above which a layer takes the DuQuant branch"),
    "block_size": Option(128, minimum=1, help="DuQuant's rotation block"),
    "force": Option({}, type=dict, help="pattern -> 'hadamard' | 'duquant' | 'none', overriding J"),
}


def twinlog_weights(o: RecipeOptions) -> QuantSpec:
    return QuantSpec(format="twinlog", bits=o.get("w_bits", 8), granularity="channel", axis=0).validate()


def _quantize(o: RecipeOptions, twinlog: bool) -> Quantize:
    if twinlog:
        return Quantize(weight=twinlog_weights(o), weight_observer="twinlog_mse",
                        activation=act_spec(o, "token"), dynamic=True)
    return Quantize(weight=weight_spec(o), activation=act_spec(o, "token"), dynamic=True,
                    weight_observer=o.get("w_observer", "minmax"))


def _ars(o: RecipeOptions, **kw) -> AdaptiveRotation:
    opts = o.options or {}
    step = AdaptiveRotation(alpha=o.get("alpha", 0.5), threshold=float(opts.get("threshold", 1.0)),
                            block_size=int(opts.get("block_size", 128)), seed=o.get("rotation_seed", 0),
                            force=dict(opts.get("force", {})), **kw)
    step.validate("recipe.options")
    return step


@register_preset("lrq_dit", options=ARS_OPTIONS)
def lrq_dit(o: RecipeOptions) -> Recipe:
    """LRQ-DiT: adaptive rotation (SmoothQuant, then Hadamard or DuQuant by J) + twin-log weights."""
    return Recipe("lrq_dit", [_ars(o), _quantize(o, twinlog=True)])


@register_preset("tlq_only")
def tlq_only(o: RecipeOptions) -> Recipe:
    """Ablation: twin-log weights, no rotation."""
    return Recipe("tlq_only", [_quantize(o, twinlog=True)])


@register_preset("ars_only", options=ARS_OPTIONS)
def ars_only(o: RecipeOptions) -> Recipe:
    """Ablation: adaptive rotation, uniform round-to-nearest weights per channel."""
    return Recipe("ars_only", [_ars(o), _quantize(o, twinlog=False)])


@register_preset("quarot")
def quarot(o: RecipeOptions) -> Recipe:
    """QuaRot-style baseline: a random Hadamard on every quantized input, no smoothing, RTN weights."""
    step = AdaptiveRotation(smooth=False, force={"*": "hadamard"}, seed=o.get("rotation_seed", 0))
    return Recipe("quarot", [step, _quantize(o, twinlog=False)])


@register_preset("smoothquant_online")
def smoothquant_online(o: RecipeOptions) -> Recipe:
    """SmoothQuant baseline for DiTs: per-channel scales applied online at each quantized input
    (DiT's norms are modulated per sample, so the scale is not folded), RTN weights."""
    step = AdaptiveRotation(alpha=o.get("alpha", 0.5), force={"*": "none"})
    return Recipe("smoothquant_online", [step, _quantize(o, twinlog=False)])


DIT_PRESETS = ("rtn_dynamic", "lrq_dit", "tlq_only", "ars_only", "quarot", "smoothquant_online")
