"""QuantVGGT's dual-smoothed fine-grained quantization (DSFQ, arXiv 2509.21302) and its block-wise
calibration, as two recipe steps.

VGGT's activations are heavy-tailed twice over: a few channels are large in every token, and a few
special tokens (camera and register tokens) are much larger than the patch tokens. DSFQ, per
quantized Linear y = x Wᵀ + b with calibration inputs X (tokens x C):

1. ``DualSmoothing``: a fixed random Hadamard H (sign-randomised, seeded) spreads the large
   channels and tokens over all channels, THEN SmoothQuant smoothing in the rotated space evens
   out what is left between channels:

       c_i = max|(XH)_i|^α / max|(WH)_i|^(1−α)   (max over calibration tokens / over output rows)
       x ↦ x H diag(1/c) online,   W ← W H diag(c)   (exact with quantization off)

   The online part is a ``ChainTransform([HadamardTransform, ChannelScale(c)])`` labelled
   ``{"dsfq": "rotate_then_smooth", ...}``; its inverse is folded into the weight, and the Linear
   becomes ``QuantLinear.from_float(lin, input_transform=chain)`` for the ``Quantize`` step to fill.
   (The project's seeded Hadamard is diag(v)·Ĥ, the paper writes Ĥ·diag(v): either is a random
   orthogonal Hadamard, only the seed → matrix map differs.)
   Options reproduce the paper's ablations (``order="smooth_then_rotate"``: Table 4's Scale→Rot,
   statistics on X and the chain ChannelScale then Hadamard, as ARS; ``rotate``/``smooth`` off:
   QuaRot-style rotation only, or SmoothQuant with an online scale) and two choices of the
   reference code (wlfeng0509/QuantVGGT) that differ from the paper:

   * pitfall P1 (``weight_max="unrotated"``): the reference takes max|W| of the weight BEFORE the
     rotation, so the weight side of c_i describes channel i of the un-rotated space while the
     activation side describes channel i of the rotated one;
   * the EMA statistic (``act_stat="ema"``): per forward call, the token max of |XH| per sample
     (max over the token axis −2), averaged over the samples of the call, then an EMA with
     momentum 0.95 over the calls of the first max(1, n // 5) of the n calibration batches
     (first call: the EMA starts at that call's value). The paper's statistic is the plain max
     over all calibration tokens (``act_stat="max"``, the default).

2. ``LearnableClipping``: the paper's block-wise calibration, block by block over
   ``ModelStructure.blocks``, of up to three kinds of parameters per quantized Linear:

   * LWC (``weight_clip``, on by default): per output row, γ = σ(θ) (θ starts at 4, σ(4) ≈ 0.982)
     clips the row's range: scale = γ·max|W_row| / qmax;
   * LAC (``act_clip``): one ratio r = σ(θ_a) per Linear shrinks each token's range to
     r·max|x_token| before the per-token quantization;
   * smoothing (``smoothing``): a refinement e^δ (δ per input channel, starting at 0) of the
     smoothing scale DualSmoothing gave the input: x ↦ x / e^δ, W ← W·diag(e^δ), exact in FP.

   They are trained with AdamW (clip logits at lr 1e-2, δ at ``smoothing_lr``; cosine to 1e-6) to
   minimise the MSE between the FP block's output and the block with fake-quantized weights and
   inputs (straight-through rounding), on the block's FP inputs captured from the calibration data
   (``core.blocks.block_inputs``: the block's real call arguments, so a VGGT global-attention block
   trains on its (B, S·P, C) calls, all frames at once, as the paper wants; the reference code's
   pitfall P2).

   It runs BEFORE ``Quantize``: ``Quantize`` freezes every weight into codes at once, and the FP
   weight the parameters are learned on is gone afterwards. What was learned is baked in: δ into the
   ChannelScale and the weight's columns, the weight clip into the FP weight (W ← clamp(W,
   ±γ·max|W_row|), so that a ``Quantize`` step with the same weight spec and the ``minmax`` weight
   observer finds exactly scale = γ·max|W_row| / qmax and the codes training simulated), and r as an
   attribute of the Linear that ``Quantize`` hands to the dynamic input quantizer it creates
   (``ActQuantizer.clip_ratio``, saved with the checkpoint). Save / reload stay bit-identical. A block
   whose learned loss is not below the plain one (what ``Quantize`` alone would give) keeps its
   weights and scales. No real kernel shrinks the per-token range, so under ``backend: real`` Linears
   with a learned activation clip stay fake-quant (the conversion summary says so).

A DSFQ W4A4 recipe (``dsfq_steps`` builds it with consistent specs)::

    [DualSmoothing(), LearnableClipping(weight=W4, activation=A4, act_clip=True, smoothing=True),
     Quantize(weight=W4, activation=A4, dynamic=True)]     # W4: int4 sym per output channel,
                                                            # A4: int4 sym per token, dynamic
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import transforms as T
from .ars import ChainTransform
from .blocks import block_inputs
from .calibration import collect_stats
from .formats import INT_MIN_SCALE, QuantSpec, fake_quantize, qrange
from .modules import QuantLinear
from .quantize_step import LEARNED_INPUT_CLIP, Quantize
from .recipe import (Context, Step, check_target_patterns, check_value, get_submodule, register_step, set_submodule,
                     target_sites)

ORDERS = ("rotate_then_smooth", "smooth_then_rotate")
WEIGHT_MAXES = ("rotated", "unrotated")
ACT_STATS = ("max", "ema")
GLOBAL_CALLS = ("global", "per_frame")


# --------------------------------------------------------------------------- DualSmoothing


class SmoothingStatistics:
    """Per-channel activation statistic of x (``rotation`` None) or of x·H (the rotated space).

    ``"max"``: max|x H| over every token of every call. ``"ema"``: the reference code's running
    statistic, per call: max over the token axis (−2) per sample, mean over the samples, then
    ``a ← momentum·a + (1 − momentum)·current`` (the first call sets a). A 2-D call (tokens, C)
    counts as one sample. The rotation runs on float32 rows (the online transform's own code, so
    the statistic sees what the layer will see).
    """

    def __init__(self, rotation: T.OnlineTransform | None, stat: str = "max", momentum: float = 0.95) -> None:
        self.rotation, self.stat, self.momentum = rotation, stat, momentum
        self.value: torch.Tensor | None = None
        self.calls = 0

    def update(self, x: torch.Tensor) -> None:
        y = x.detach().float()
        if self.rotation is not None:
            y = self.rotation(y)
        y = y.abs()
        self.calls += 1
        if self.stat == "max":
            cur = y.reshape(-1, y.shape[-1]).amax(dim=0)
            self.value = cur if self.value is None else torch.maximum(self.value, cur)
            return
        per_sample = y.amax(dim=-2) if y.dim() >= 2 else y  # (..., C): token max of each sample
        cur = per_sample.reshape(-1, y.shape[-1]).mean(dim=0)
        self.value = cur if self.value is None else self.momentum * self.value + (1.0 - self.momentum) * cur


@register_step
@dataclass
class DualSmoothing(Step):
    """DSFQ's dual smoothing (module doc) on the inputs of ``targets`` (patterns over the structure's
    quantize list; None: all of it, minus its skips and ``ignore``)."""

    kind: ClassVar[str] = "dual_smoothing"
    alpha: float = 0.5
    #: "rotate_then_smooth" (the paper), "smooth_then_rotate" (its Table 4 ablation, Scale→Rot)
    order: str = "rotate_then_smooth"
    rotate: bool = True
    smooth: bool = True
    #: whose max the weight side of c takes: "rotated" W·H (the paper) or "unrotated" W (the
    #: reference code, pitfall P1); only the rotate-then-smooth order has a choice
    weight_max: str = "rotated"
    #: "max" over all calibration tokens (the paper) or "ema" (the reference code's statistic)
    act_stat: str = "max"
    momentum: float = 0.95
    seed: int = 0
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)

    def validate(self, where: str = "dual_smoothing") -> None:
        check_value(f"{where}.alpha", self.alpha, minimum=0.0, maximum=1.0)
        check_value(f"{where}.order", self.order, allowed=ORDERS)
        check_value(f"{where}.weight_max", self.weight_max, allowed=WEIGHT_MAXES)
        check_value(f"{where}.act_stat", self.act_stat, allowed=ACT_STATS)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"{where}.momentum has value {self.momentum!r}: allowed values are in [0, 1)")
        if not (self.rotate or self.smooth):
            raise ValueError(f"{where}.rotate and {where}.smooth are both false: the step would do nothing")
        check_target_patterns(self, where)

    def needs_calibration(self) -> bool:
        return self.smooth

    def notes(self) -> list[str]:
        notes = []
        if self.smooth and self.rotate and self.order == "rotate_then_smooth" and self.weight_max == "unrotated":
            notes.append("dual_smoothing: weight_max='unrotated' reproduces the reference code's pitfall P1 "
                         "(the weight max of the un-rotated space in a rotated-space smoothing scale)")
        if self.smooth and self.act_stat == "ema":
            notes.append("dual_smoothing: act_stat='ema' reproduces the reference code's statistic (an EMA of "
                         "per-sample token maxima over the first fifth of the calibration batches), not the "
                         "paper's max over all tokens")
        return notes

    @property
    def arrangement(self) -> str:
        """What the chain does: one of ORDERS, or "rotate_only" / "smooth_only"."""
        if self.rotate and self.smooth:
            return self.order
        return "rotate_only" if self.rotate else "smooth_only"

    def _stats_in_rotated_space(self) -> bool:
        return self.rotate and self.order == "rotate_then_smooth"

    def _collect(self, model: nn.Module, ctx: Context, sites: list[str],
                 rotations: dict[int, T.HadamardTransform]) -> dict[str, SmoothingStatistics]:
        stats = {n: SmoothingStatistics(rotations[get_submodule(model, n).in_features]
                                        if self._stats_in_rotated_space() else None,
                                        self.act_stat, self.momentum) for n in sites}
        batches = ctx.batches(self.kind)
        # the reference's EMA only runs over the first fifth of the calibration batches
        limit = max(1, len(batches) // 5) if self.act_stat == "ema" else None
        return collect_stats(model, batches, stats, forward_fn=ctx.forward_fn, max_batches=limit,
                             desc="DSFQ statistics", progress=ctx.progress)

    def scales(self, weight: torch.Tensor, act: torch.Tensor, rotation: T.HadamardTransform | None) -> torch.Tensor:
        """c = act^α / max|W'|^(1−α) per input channel, W' = W·H (weight_max "rotated", rotate-then-
        smooth) or W. ``act`` is the activation statistic of the space c is applied in."""
        w = weight.detach().double()
        if self._stats_in_rotated_space() and self.weight_max == "rotated":
            w = w @ rotation.matrix()
        return T.smoothquant_scales(act, w.abs().amax(dim=0), self.alpha)

    def transform(self, c: torch.Tensor | None,
                  rotation: T.HadamardTransform | None) -> tuple[ChainTransform, torch.Tensor]:
        """The online chain T and the matrix M = T^-T the weight takes (W ← W·M, exact in FP)."""
        label = {"dsfq": self.arrangement}
        if c is not None:
            label.update(alpha=self.alpha, weight_max=self.weight_max, act_stat=self.act_stat)
        if c is None:  # T = H
            return ChainTransform([rotation], label), rotation.matrix()
        scale = T.ChannelScale(c)  # x ↦ x / c
        cd = c.double()
        if rotation is None:  # T = diag(1/c): M = diag(c)
            return ChainTransform([scale], label), torch.diag(cd)
        h = rotation.matrix()
        if self.order == "rotate_then_smooth":  # T = H diag(1/c): M = H diag(c), H's columns scaled
            return ChainTransform([rotation, scale], label), h * cd[None, :]
        return ChainTransform([scale, rotation], label), cd[:, None] * h  # T = diag(1/c) H: M = diag(c) H

    def apply(self, model: nn.Module, ctx: Context) -> None:
        sites = target_sites(self, model, ctx.structure)
        sizes = sorted({get_submodule(model, n).in_features for n in sites})
        rotations = {n: T.HadamardTransform(n, seed=self.seed) for n in sizes} if self.rotate else {}
        stats = self._collect(model, ctx, sites, rotations) if self.smooth else {}
        for name in sites:
            lin = get_submodule(model, name)
            rotation = rotations.get(lin.in_features)
            c = self.scales(lin.weight, stats[name].value, rotation) if self.smooth else None
            # each Linear gets its own transform module (a checkpoint rebuilds one per wrapper)
            own = None if rotation is None else T.HadamardTransform(lin.in_features, seed=self.seed)
            chain, fold = self.transform(c, own)
            T.rotate_linear_input(lin, fold)
            set_submodule(model, name, QuantLinear.from_float(lin, input_transform=chain))


# --------------------------------------------------------------------------- LearnableClipping


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def clipped_weight(w: torch.Tensor, theta: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Symmetric per-row int fake quantization of ``w`` (out, in) with the row range clipped to
    σ(θ)·max|W_row| (θ None: no clip, the minmax scale). Differentiable in θ through the scale;
    the forward equals ``Quantize``'s minmax codes of clamp(W, ±σ(θ)·max|W_row|)."""
    return clipped_activation(w, None if theta is None else torch.sigmoid(theta), bits)


def clipped_activation(x: torch.Tensor, ratio: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Symmetric int fake quantization of each row (last axis) of ``x`` with its range shrunk to
    ratio·max|x_row| (None: 1); a token of activations, or an output row of a weight. Differentiable
    in ``ratio`` through the scale and in ``x`` (straight-through); the forward equals a dynamic
    per-token ``ActQuantizer`` with ``clip_ratio=ratio``."""
    _, qmax = qrange(QuantSpec(bits=bits))
    amax = x.abs().amax(dim=-1, keepdim=True)
    top = amax if ratio is None else ratio * amax
    scale = (top / qmax).clamp_min(INT_MIN_SCALE)
    return torch.clamp(round_ste(x / scale), -qmax, qmax) * scale


def smoothing_scale(module: nn.Module) -> T.ChannelScale | None:
    """The ChannelScale applied last to ``module``'s input (DualSmoothing's c in the rotate-then-smooth
    order, or smoothing alone), whose learned refinement the weight can absorb column by column."""
    t = getattr(module, "input_transform", None)
    if isinstance(t, ChainTransform):
        t = t.parts[-1]
    return t if isinstance(t, T.ChannelScale) else None


class _TrainableLinear(nn.Module):
    """Stands in for a Linear (or an unfrozen QuantLinear and its online transform) while its block
    trains, in float32 (the output in the input's dtype):

        x ← T(x) / e^δ            (δ: the smoothing refinement, per input channel, starts at 0)
        y = Q_a(x; σ(θ_a)) · Q_w(W·diag(e^δ); σ(θ_w))ᵀ + b

    Q_w is ``clipped_weight`` per row, Q_a the activation as ``Quantize`` will quantize it
    (``clipped_activation`` when the clip is learned). ``learned = False`` gives what ``Quantize``
    does without this step (δ = 0, no clips)."""

    def __init__(self, module: nn.Module, weight_bits: int, act_spec: QuantSpec | None, init: float, *,
                 weight_clip: bool, act_clip: bool, smoothing: bool) -> None:
        super().__init__()
        self.transform = getattr(module, "input_transform", None)
        self.weight = module.weight.detach().float()
        self.bias = None if module.bias is None else module.bias.detach().float()
        self.weight_bits, self.act_spec = weight_bits, act_spec
        device = self.weight.device
        out_features, in_features = self.weight.shape
        self.weight_theta = (nn.Parameter(torch.full((out_features, 1), float(init), device=device))
                             if weight_clip else None)
        self.act_theta = (nn.Parameter(torch.tensor(float(init), device=device))
                          if act_clip and act_spec is not None else None)
        self.log_scale = nn.Parameter(torch.zeros(in_features, device=device)) if smoothing else None
        self.learned = True

    def clip_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.weight_theta, self.act_theta) if p is not None]

    def smoothed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The input and weight after the learned smoothing refinement (unchanged when not learned)."""
        if self.log_scale is None or not self.learned:
            return x, self.weight
        s = torch.exp(self.log_scale)
        return x / s, self.weight * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.transform is not None:
            x = self.transform(x)
        x, w = self.smoothed(x.float())
        if self.act_theta is not None:
            x = clipped_activation(x, torch.sigmoid(self.act_theta) if self.learned else None, self.act_spec.bits)
        elif self.act_spec is not None:
            x = x + (fake_quantize(x, self.act_spec) - x).detach()
        w = clipped_weight(w, self.weight_theta if self.learned else None, self.weight_bits)
        return F.linear(x, w, self.bias).to(dtype)

    @torch.no_grad()
    def bake(self, module: nn.Module) -> None:
        """Write what was learned into ``module`` (the Linear this stood in for), in place: the
        smoothing refinement into its ChannelScale and weight columns, the weight clip as a clamp of
        each row to σ(θ_w)·max|W_row| (which ``Quantize``'s minmax observer then finds), the
        activation clip as the ratio ``Quantize`` gives the input's dynamic quantizer."""
        w = module.weight
        if self.log_scale is not None:
            s = torch.exp(self.log_scale.detach())
            scale = smoothing_scale(module)
            scale.scale.mul_(s.to(scale.scale))
            w.mul_(s.to(w)[None, :])
        if self.weight_theta is not None:
            top = (torch.sigmoid(self.weight_theta.detach()) * w.float().abs().amax(dim=1, keepdim=True)).to(w.dtype)
            w.copy_(torch.maximum(torch.minimum(w, top), -top))
        if self.act_theta is not None:
            setattr(module, LEARNED_INPUT_CLIP, float(torch.sigmoid(self.act_theta.detach()).float()))


def _float_tensors(out: Any) -> list[torch.Tensor]:
    if torch.is_tensor(out):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _float_tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _float_tensors(o)]
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        return _float_tensors(out.to_tuple())
    return []


def _mse(out: Any, target: list[torch.Tensor]) -> torch.Tensor:
    got = _float_tensors(out)
    return sum(F.mse_loss(a.float(), b.float()) for a, b in zip(got, target))


@register_step
@dataclass
class LearnableClipping(Step):
    """Block-wise calibration (module doc): learned per-row weight clips (LWC), one activation clip
    per Linear (LAC, ``act_clip``) and a refinement of the smoothing scales (``smoothing``), trained
    block by block against the FP block outputs. Place it after DualSmoothing and BEFORE Quantize,
    with the weight / activation specs of that Quantize step (whose weight observer must be
    ``minmax``, so that the baked clip is the scale it finds, and whose activations are dynamic).

    Linears trained: the structure's quantize list (or ``targets``), minus skips and ``ignore``,
    inside a block of ``structure.blocks``. Inputs quantized in training: those of
    ``structure.act_inputs`` (None: every target), dynamically with ``activation`` (None: FP).
    Other activation sites (Linear outputs, ActSites, attention matmuls) stay FP in training.

    ``sequential=False``: every block's FP inputs come from one pass of the unchanged model and are
    held at once (on the model's device). ``sequential=True``: one block's inputs at a time, from a
    pass made when its turn comes (one pass over the calibration data per block), so they follow
    the parameters already baked into the blocks before it: the memory of one block, inputs that
    are no longer exactly FP.

    After ``apply``, ``block_losses[block]`` holds the block output MSE without ("plain": what
    ``Quantize`` gives without this step) and with ("learned") the learned parameters, and whether
    they were kept (only when they lower the loss).
    """

    kind: ClassVar[str] = "learnable_clipping"
    weight: QuantSpec = field(default_factory=lambda: QuantSpec(bits=4, granularity="channel", axis=0))
    activation: QuantSpec | None = field(default_factory=lambda: QuantSpec(bits=4, granularity="token", axis=-1))
    #: learn per-row weight clips (LWC)
    weight_clip: bool = True
    #: learn one clip ratio per Linear input (LAC); needs a symmetric int per-token ``activation``
    act_clip: bool = False
    #: learn a refinement e^δ of the smoothing scale each input already has (DualSmoothing's c)
    smoothing: bool = False
    steps: int = 200
    #: learning rate of the clip logits (the reference's 1e-2)
    lr: float = 1e-2
    #: learning rate of the smoothing refinement δ, a log-scale (the reference trains the raw scales at
    #: 1e-3; on log-scales 1e-2 lowered the test toy's block loss more than 1e-3 did)
    smoothing_lr: float = 1e-2
    min_lr: float = 1e-6
    weight_decay: float = 0.0
    #: θ's start value (weight and activation clips): σ(4) ≈ 0.982 (OmniQuant's and the reference's)
    init: float = 4.0
    #: captured block calls per optimisation step (their losses averaged)
    calls_per_step: int = 1
    sequential: bool = False
    #: how blocks that attend over all frames at once are calibrated: on their real calls ("global",
    #: the paper) or on the same tokens regrouped one frame per batch row ("per_frame": the reference
    #: code's pitfall P2, for reproduction; needs ``ModelStructure.per_frame_call``)
    global_calls: str = "global"
    seed: int = 0
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)

    def validate(self, where: str = "learnable_clipping") -> None:
        w = self.weight.validate()
        if w.format != "int" or not w.symmetric or w.granularity != "channel" or w.axis not in (0, -2):
            raise ValueError(f"{where}.weight must be a symmetric int spec per output channel (granularity: channel, "
                             f"axis: 0), got {w.to_dict()}")
        if self.activation is not None:
            a = self.activation.validate()
            if self.act_clip and (a.format != "int" or not a.symmetric or a.granularity != "token"):
                raise ValueError(f"{where}.act_clip needs a symmetric int activation spec per token, got "
                                 f"{a.to_dict()}")
        if not (self.weight_clip or self.act_clip or self.smoothing):
            raise ValueError(f"{where}.weight_clip, act_clip and smoothing are all false: the step would learn "
                             "nothing")
        for key in ("steps", "calls_per_step"):
            check_value(f"{where}.{key}", getattr(self, key), minimum=1)
        for key in ("lr", "smoothing_lr"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{where}.{key} has value {getattr(self, key)!r}: allowed values are > 0")
        check_value(f"{where}.min_lr", self.min_lr, minimum=0.0, maximum=min(self.lr, self.smoothing_lr))
        check_value(f"{where}.weight_decay", self.weight_decay, minimum=0.0)
        check_value(f"{where}.global_calls", self.global_calls, allowed=GLOBAL_CALLS)
        if not math.isfinite(self.init):
            raise ValueError(f"{where}.init has value {self.init!r}: allowed values are finite numbers")
        check_target_patterns(self, where)

    def needs_calibration(self) -> bool:
        return True

    def notes(self) -> list[str]:
        notes = ["learnable_clipping: the learned parameters are baked into the FP weights (and smoothing scales), "
                 "so the Quantize step after it must use the same weight spec and the minmax weight observer"]
        if self.act_clip:
            notes.append("learnable_clipping: Linears with a learned activation clip stay fake-quant under backend "
                         "real (no kernel shrinks the per-token range)")
        if self.global_calls == "per_frame":
            notes.append("learnable_clipping: global_calls='per_frame' reproduces the reference code's pitfall P2 "
                         "(global-attention blocks calibrated on per-frame token groups, not the calls they get)")
        return notes

    def _act_inputs(self, ctx: Context, sites: list[str]) -> set[str]:
        s = ctx.structure
        if self.activation is None:
            return set()
        return set(sites) if s.act_inputs is None else {n for n in sites if n in s.act_inputs}

    def _check_model(self, model: nn.Module, ctx: Context, sites: list[str]) -> None:
        frozen = [n for n in target_sites(self, model, ctx.structure, (QuantLinear,))
                  if get_submodule(model, n).frozen]
        if frozen:
            raise ValueError(f"{self.kind}: {frozen[0]!r} is already quantized (frozen): put LearnableClipping "
                             "before the Quantize step, which freezes the FP weights it learns on")
        if self.global_calls == "per_frame" and ctx.structure.per_frame_call is None:
            raise ValueError(f"{self.kind}.global_calls: 'per_frame' needs a family whose blocks see several "
                             "frames at once (ModelStructure.per_frame_call); this model's structure has none")
        if self.smoothing:
            bare = [n for n in sites if smoothing_scale(get_submodule(model, n)) is None]
            if bare:
                raise ValueError(f"{self.kind}.smoothing: {bare[0]!r} has no smoothing scale to refine: put "
                                 "DualSmoothing (smooth: true, order rotate_then_smooth) before this step")

    def apply(self, model: nn.Module, ctx: Context) -> None:
        sites = target_sites(self, model, ctx.structure, (nn.Linear, QuantLinear))
        self._check_model(model, ctx, sites)
        act_inputs = self._act_inputs(ctx, sites)
        blocks = ctx.structure.blocks
        if not blocks:
            raise ValueError(f"{self.kind}: the model's structure declares no blocks (ModelStructure.blocks)")
        self.block_losses: dict[str, dict] = {}
        generator = torch.Generator().manual_seed(self.seed)
        bar = tqdm(total=len(blocks), desc="block-wise calibration", disable=not ctx.progress, leave=False)
        for name, block, calls in block_inputs(model, ctx.batches(self.kind), blocks, ctx.forward_fn,
                                               sequential=self.sequential, progress=ctx.progress):
            inside = [n for n in sites if n.startswith(name + ".")]
            if inside:
                if self.global_calls == "per_frame":
                    calls = [ctx.structure.per_frame_call(name, c) or c for c in calls]
                self.block_losses[name] = self._train_block(model, block, calls, inside, act_inputs, generator)
            bar.update(1)
        bar.close()

    def _train_block(self, model: nn.Module, block: nn.Module, calls: list, names: list[str],
                     act_inputs: set[str], generator: torch.Generator) -> dict:
        with torch.no_grad():
            targets = [[t.detach().float() for t in _float_tensors(c.run(block))] for c in calls]
        originals = {n: get_submodule(model, n) for n in names}
        wrappers = {n: _TrainableLinear(m, self.weight.bits, self.activation if n in act_inputs else None, self.init,
                                        weight_clip=self.weight_clip, act_clip=self.act_clip, smoothing=self.smoothing)
                    for n, m in originals.items()}
        grads = [(p, p.requires_grad) for p in block.parameters()]
        try:
            for p, _ in grads:
                p.requires_grad_(False)
            for n, w in wrappers.items():
                set_submodule(model, n, w)
            self._train(block, calls, targets, list(wrappers.values()), generator)
            losses = {"plain": self._loss(block, calls, targets, wrappers, learned=False),
                      "learned": self._loss(block, calls, targets, wrappers, learned=True)}
        finally:
            for n, m in originals.items():
                set_submodule(model, n, m)
            for p, flag in grads:
                p.requires_grad_(flag)
        losses["kept"] = losses["learned"] < losses["plain"]
        if losses["kept"]:
            for n, w in wrappers.items():
                w.bake(originals[n])
        return losses

    def _train(self, block: nn.Module, calls: list, targets: list, wrappers: list[_TrainableLinear],
               generator: torch.Generator) -> None:
        groups = [{"params": [p for w in wrappers for p in w.clip_parameters()], "lr": self.lr},
                  {"params": [w.log_scale for w in wrappers if w.log_scale is not None], "lr": self.smoothing_lr}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.steps, eta_min=self.min_lr)
        order: list[int] = []
        with torch.enable_grad():
            for _ in range(self.steps):
                batch = []
                while len(batch) < min(self.calls_per_step, len(calls)):
                    if not order:  # a new epoch over the calls, in a seeded order
                        order = torch.randperm(len(calls), generator=generator).tolist()
                    batch.append(order.pop())
                loss = sum(_mse(calls[i].run(block), targets[i]) for i in batch) / len(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()

    @staticmethod
    def _loss(block: nn.Module, calls: list, targets: list, wrappers: dict, learned: bool) -> float:
        for w in wrappers.values():
            w.learned = learned
        with torch.no_grad():
            return float(sum(float(_mse(c.run(block), t)) for c, t in zip(calls, targets)) / len(calls))


# --------------------------------------------------------------------------- recipe helper


def dsfq_steps(w_bits: int = 4, a_bits: int = 4, clip: bool = True, clip_steps: int = 200, *,
               act_clip: bool = False, learn_smoothing: bool = False, smoothing_lr: float = 1e-2,
               global_calls: str = "global",
               weight: QuantSpec | None = None, activation: QuantSpec | None = None,
               weight_observer: str = "minmax", where: str | None = None, **dual_smoothing) -> list[Step]:
    """DSFQ's steps with one weight spec and one activation spec shared by LearnableClipping and
    Quantize (activations dynamic): ``weight`` / ``activation`` when given, else symmetric int
    ``w_bits`` per output channel and ``a_bits`` per token. ``dual_smoothing`` are DualSmoothing's
    options (alpha, order, weight_max, act_stat, ...); ``where`` names them in refusals."""
    weight = weight or QuantSpec(bits=w_bits, granularity="channel", axis=0).validate()
    activation = activation or QuantSpec(bits=a_bits, granularity="token", axis=-1).validate()
    smoothing = DualSmoothing(**dual_smoothing)
    smoothing.validate(*([where] if where else []))
    steps: list[Step] = [smoothing]
    if clip or act_clip or learn_smoothing:
        # before Quantize: it clamps the FP weights, and Quantize's min-max observer then finds the clip
        clipping = LearnableClipping(weight=weight, activation=activation, steps=clip_steps, weight_clip=clip,
                                     act_clip=act_clip, smoothing=learn_smoothing, smoothing_lr=smoothing_lr,
                                     global_calls=global_calls)
        clipping.validate(*([where] if where else []))
        steps.append(clipping)
    steps.append(Quantize(weight=weight, activation=activation, dynamic=True, weight_observer=weight_observer))
    return steps
