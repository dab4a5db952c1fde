"""Recipes of the VGGT family: QuantVGGT (DSFQ + NFDS, arXiv 2509.21302), its parts and baselines.

Every preset quantizes weights per output channel (symmetric) and activations per token at run
time (symmetric), the granularity QuantVGGT argues for: the camera and register tokens are much
larger than patch tokens, and per-token scales give each its own range. Bit widths come from
``recipe.w_bits`` / ``recipe.a_bits`` (W8A8 runs on real int8 kernels with ``backend: real``; W6A6,
W4A8 and W4A4 are simulated).

* ``quantvggt``: NFDS picks the calibration scenes, then DSFQ (random Hadamard, then smoothing in
  the rotated space), optionally learnable clipping block by block;
* ``dsfq``: the same transform on a random draw of as many scenes (the baseline NFDS is compared with);
* baselines: ``rtn_dynamic``, ``smoothquant_online`` (smoothing alone), ``quarot`` (Hadamard alone),
  shared with the DiT family.
"""
from __future__ import annotations

from ..core.calibration_select import SelectCalibration
from ..core.dsfq import dsfq_steps
from ..core.presets import RecipeOptions, act_spec, register_preset, weight_spec
from ..core.recipe import Recipe
from ..options import Option
from . import dit_recipes  # noqa: F401  (registers quarot and smoothquant_online, shared baselines)

SAMPLING_OPTIONS = {
    "sampling": Option("nfds", allowed=("nfds", "random", "all"),
                       help="which calibration scenes the recipe uses: NFDS, a random draw of the same size, or all"),
    "num_samples": Option(16, minimum=1, help="calibration scenes kept from the pool (the paper: 40 of 400)"),
    "num_clusters": Option(4, minimum=1, help="NFDS: K-Means clusters (the paper: 8)"),
    "noise_rule": Option("top_p", allowed=("top_p", "iqr"),
                         help="NFDS: drop the top drop_fraction of noise scores (paper) or those above Q3 + 1.5 IQR "
                              "(reference code)"),
    "drop_fraction": Option(0.2, minimum=0.0, help="NFDS: share of the pool dropped as noisy (noise_rule top_p)"),
    "apply_filter": Option(True, help="NFDS: remove flagged samples (false: the reference code, which keeps them)"),
    "sampling_seed": Option(0, minimum=0, help="seed of the draws (random sampling; NFDS within clusters)"),
}
DSFQ_OPTIONS = {
    **SAMPLING_OPTIONS,
    "weight_max": Option("rotated", allowed=("rotated", "unrotated"),
                         help="smoothing's weight maximum: of W H (the paper) or of W (the reference code, pitfall P1)"),
    "order": Option("rotate_then_smooth", allowed=("rotate_then_smooth", "smooth_then_rotate"),
                    help="DSFQ's order (the paper's Table 4 ablation)"),
    "learnable_clipping": Option(False, help="block-wise calibration: learn per-row weight clips (LWC) against "
                                             "FP block outputs"),
    "act_clipping": Option(False, help="block-wise calibration: learn one activation clip per Linear (LAC); those "
                                       "Linears stay fake-quant under backend real"),
    "learnable_smoothing": Option(False, help="block-wise calibration: refine the smoothing scales"),
    "clipping_steps": Option(200, minimum=1, help="block-wise calibration: AdamW steps per block"),
    "global_calls": Option("global", allowed=("global", "per_frame"),
                           help="block-wise calibration of global blocks on their real calls (the paper) or on "
                                "per-frame token groups (the reference code, pitfall P2)"),
    "smoothing_lr": Option(1e-2, minimum=0.0, help="block-wise calibration: learning rate of the smoothing "
                                                   "refinement (a log-scale)"),
}


def _select(o: RecipeOptions, sampling: str) -> list:
    opts = o.options or {}
    sampling = opts.get("sampling", sampling)
    if sampling == "all":
        return []
    step = SelectCalibration(method=sampling, num_samples=int(opts.get("num_samples", 16)),
                             num_clusters=int(opts.get("num_clusters", 4)),
                             noise_rule=opts.get("noise_rule", "top_p"),
                             drop_fraction=float(opts.get("drop_fraction", 0.2)),
                             apply_filter=bool(opts.get("apply_filter", True)), seed=int(opts.get("sampling_seed", 0)))
    step.validate("recipe.options")
    return [step]


def _dsfq_steps(o: RecipeOptions) -> list:
    opts = o.options or {}
    return dsfq_steps(clip=bool(opts.get("learnable_clipping", False)), clip_steps=int(opts.get("clipping_steps", 200)),
                      act_clip=bool(opts.get("act_clipping", False)),
                      learn_smoothing=bool(opts.get("learnable_smoothing", False)),
                      smoothing_lr=float(opts.get("smoothing_lr", 1e-2)),
                      global_calls=opts.get("global_calls", "global"),
                      weight=weight_spec(o), activation=act_spec(o, "token"),
                      weight_observer=o.get("w_observer", "minmax"), where="recipe.options",
                      alpha=o.get("alpha", 0.5), seed=o.get("rotation_seed", 0),
                      weight_max=opts.get("weight_max", "rotated"), order=opts.get("order", "rotate_then_smooth"))


@register_preset("quantvggt", options=DSFQ_OPTIONS)
def quantvggt(o: RecipeOptions) -> Recipe:
    """QuantVGGT: NFDS calibration scenes, then DSFQ (random Hadamard, then smoothing in the rotated
    space; per-channel weights, per-token activations)."""
    return Recipe("quantvggt", _select(o, "nfds") + _dsfq_steps(o))


#: dsfq always draws at random: as a baseline in ``compare`` it takes the main recipe's shared options
#: (the same budget and seed), but not its sampling method
RANDOM_SAMPLING_OPTIONS = {k: v for k, v in DSFQ_OPTIONS.items()
                           if k not in ("sampling", "num_clusters", "noise_rule", "drop_fraction", "apply_filter")}


@register_preset("dsfq", options=RANDOM_SAMPLING_OPTIONS)
def dsfq(o: RecipeOptions) -> Recipe:
    """DSFQ on a random draw of calibration scenes, as many as QuantVGGT's NFDS keeps (the sampling
    baseline of QuantVGGT)."""
    return Recipe("dsfq", _select(o, "random") + _dsfq_steps(o))


VGGT_PRESETS = ("quantvggt", "dsfq", "rtn_dynamic", "smoothquant_online", "quarot")
