"""Recipes of the DiT family: LRQ-DiT (twin-log weights + adaptive rotation), its ablations, baselines.

All activations are quantized dynamically per token (symmetric), as LRQ-DiT does; the bit widths
come from ``recipe.w_bits`` / ``recipe.a_bits`` (default W8A8; sub-8-bit settings are simulated).
"""
from __future__ import annotations

from ..core.ars import AdaptiveRotation
from ..core.formats import QuantSpec
from ..core.presets import RecipeOptions, act_spec, register_preset, weight_spec
from ..core.recipe import Quantize, QuantizeWeights, Recipe
from ..options import Option

#: every DiT preset's own option: weight-only storage of what stays out of activation quantization
FP_LAYER_OPTIONS = {
    "fp_layers_w_bits": Option(None, type=int, minimum=2, maximum=8, help="store the weights of the Linears kept out of "
                               "activation quantization (adaLN modulation, embedders, output) as int<bits> per "
                               "output channel, weight-only (null: keep them in floating point)"),
}
ARS_OPTIONS = {
    **FP_LAYER_OPTIONS,
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


def _recipe(name: str, o: RecipeOptions, steps: list) -> Recipe:
    """The preset's steps, then weight-only storage of the FP-kept Linears if asked for."""
    bits = (o.options or {}).get("fp_layers_w_bits")
    if bits is not None:
        steps.append(QuantizeWeights(weight=QuantSpec(bits=int(bits), granularity="channel", axis=0).validate()))
    return Recipe(name, steps)


@register_preset("lrq_dit", options=ARS_OPTIONS)
def lrq_dit(o: RecipeOptions) -> Recipe:
    """LRQ-DiT: adaptive rotation (SmoothQuant, then Hadamard or DuQuant by J) + twin-log weights."""
    return _recipe("lrq_dit", o, [_ars(o), _quantize(o, twinlog=True)])


@register_preset("tlq_only", options=FP_LAYER_OPTIONS)
def tlq_only(o: RecipeOptions) -> Recipe:
    """Ablation: twin-log weights, no rotation."""
    return _recipe("tlq_only", o, [_quantize(o, twinlog=True)])


@register_preset("ars_only", options=ARS_OPTIONS)
def ars_only(o: RecipeOptions) -> Recipe:
    """Ablation: adaptive rotation, uniform round-to-nearest weights per channel."""
    return _recipe("ars_only", o, [_ars(o), _quantize(o, twinlog=False)])


@register_preset("quarot", options=FP_LAYER_OPTIONS)
def quarot(o: RecipeOptions) -> Recipe:
    """QuaRot-style baseline: a random Hadamard on every quantized input, no smoothing, RTN weights."""
    step = AdaptiveRotation(smooth=False, force={"*": "hadamard"}, seed=o.get("rotation_seed", 0))
    return _recipe("quarot", o, [step, _quantize(o, twinlog=False)])


@register_preset("smoothquant_online", options=FP_LAYER_OPTIONS)
def smoothquant_online(o: RecipeOptions) -> Recipe:
    """SmoothQuant baseline for DiTs: per-channel scales applied online at each quantized input
    (DiT's norms are modulated per sample, so the scale is not folded), RTN weights."""
    step = AdaptiveRotation(alpha=o.get("alpha", 0.5), force={"*": "none"})
    return _recipe("smoothquant_online", o, [step, _quantize(o, twinlog=False)])


DIT_PRESETS = ("rtn_dynamic", "lrq_dit", "tlq_only", "ars_only", "quarot", "smoothquant_online")
