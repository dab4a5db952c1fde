"""Mamba recipe steps (weight fusions the generic core cannot know about) and the Mamba presets:
Quamba, Quamba2, MambaQuant and the baselines they are compared with."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core import transforms as T
from ..core.calibration import collect_stats
from ..core.formats import QuantSpec
from ..core.observers import ChannelAbsMaxObserver
from ..core.presets import RecipeOptions, act_spec, register_preset, static_quantize, weight_spec
from ..core.recipe import (Context, OnlineHadamard, Quantize, Recipe, RotatePairs, RotateResidual, Step,
                           check_value, get_submodule, register_step)
from ..core.transform_steps import AlphaSmoothing
from ..models.mamba import Mamba1Mixer, ScaledSiLU
from ..options import Option


# ----------------------------------------------------------------------------------------
# Mamba-specific recipe steps (weight fusions the generic core cannot know about)
# ----------------------------------------------------------------------------------------


@register_step
@dataclass
class MambaQuantSmooth(AlphaSmoothing):
    """MambaQuant's smooth-fused scales (S7, S2, S5, S4), all absorbed into weights (exact in FP).

    S7: x rows of in_proj ÷ s, conv1d taps × s (depthwise, so per channel). S2: z rows of in_proj
    ÷ s and the gate SiLU becomes S-SiLU x·σ(s·x) = SiLU(z)/s, out_proj columns × s. S5: dt rows
    of x_proj ÷ s, dt_proj columns × s. S4: B rows of x_proj ÷ s, C rows × s (h·C unchanged).
    s = max|X|^α / max|W|^(1−α) for S7/S2/S5 (clamped ≥ 1e-2), s = sqrt(max|B| / max|C|) for S4.
    Mamba1 only.
    """

    kind: ClassVar[str] = "mambaquant_smooth"
    architectures: ClassVar[tuple[str, ...]] = ("mamba1",)

    def apply(self, model: nn.Module, ctx: Context) -> None:
        mixers = {n: m for n, m in model.named_modules() if isinstance(m, Mamba1Mixer)}
        if not mixers:
            raise ValueError("mambaquant_smooth applies to Mamba1 mixers; this model has none")
        # per-channel max|·| of in_proj's output (x | z), x_proj's output (dt_low | B | C) and out_proj's
        # input, all in one pass over the calibration data
        sites = [f"{n}.{p}" for n in mixers for p in ("in_proj:output", "x_proj:output", "out_proj:input")]
        stats = collect_stats(model, ctx.batches(self.kind), {s: ChannelAbsMaxObserver() for s in sites},
                              forward_fn=ctx.forward_fn, desc="smoothing statistics", progress=ctx.progress)
        for n, mixer in mixers.items():
            self._smooth_mixer(mixer, stats[f"{n}.in_proj:output"].amax, stats[f"{n}.out_proj:input"].amax,
                               stats[f"{n}.x_proj:output"].amax)

    def _scale(self, act_amax: torch.Tensor, w_amax: torch.Tensor) -> torch.Tensor:
        return T.smoothquant_scales(act_amax, w_amax, self.alpha, min_scale=1e-2)

    def _smooth_mixer(self, m: nn.Module, xz_amax, y_amax, dbc_amax) -> None:
        d, r, n = m.d_inner, m.dt_rank, m.state_size
        with torch.no_grad():
            # S7: in_proj x rows → conv1d (depthwise: channel c only sees channel c)
            s7 = self._scale(xz_amax[:d], m.conv1d.weight.detach().abs().reshape(d, -1).amax(1))
            m.in_proj.weight[:d] /= s7[:, None]
            if m.in_proj.bias is not None:
                m.in_proj.bias[:d] /= s7
            m.conv1d.weight.mul_(s7[:, None, None])
            # S2: gate z rows ÷ s, S-SiLU, out_proj columns × s
            s2 = self._scale(y_amax, m.out_proj.weight.detach().abs().amax(0))
            m.in_proj.weight[d:] /= s2[:, None]
            if m.in_proj.bias is not None:
                m.in_proj.bias[d:] /= s2
            m.gate_act = ScaledSiLU(s2)
            T.scale_linear_input(m.out_proj, s2)
            # S5: x_proj dt rows → dt_proj
            s5 = self._scale(dbc_amax[:r], m.dt_proj.weight.detach().abs().amax(0))
            m.x_proj.weight[:r] /= s5[:, None]
            T.scale_linear_input(m.dt_proj, s5)
            # S4: balance B against C over the state dimension
            b_amax, c_amax = dbc_amax[r:r + n], dbc_amax[r + n:]
            s4 = torch.where((b_amax > 0) & (c_amax > 0), (b_amax / c_amax.clamp_min(1e-12)).sqrt(),
                             torch.ones_like(b_amax))
            m.x_proj.weight[r:r + n] /= s4[:, None]
            m.x_proj.weight[r + n:] *= s4[:, None]


@register_step
@dataclass
class StateRotation(Step):
    """MambaQuant R4: a random Hadamard on the state dimension of the h·C readout.

    C' = C·R comes out of x_proj (its C rows are rotated offline) and h is rotated online at
    the readout, so h·C = (h·R)·(C·R) is unchanged while both matmul inputs lose outliers.
    """

    kind: ClassVar[str] = "state_rotation"
    architectures: ClassVar[tuple[str, ...]] = ("mamba1",)
    seed: int = 0

    def apply(self, model: nn.Module, ctx: Context) -> None:
        for _, m in model.named_modules():
            if not isinstance(m, Mamba1Mixer):
                continue
            r, n = m.dt_rank, m.state_size
            transform = T.HadamardTransform(n, seed=self.seed)
            T.rotate_linear_output_rows(m.x_proj, transform.matrix(), (r + n, r + 2 * n))
            m.state_rotation = transform


@register_step
@dataclass
class Quamba2Quantize(Quantize):
    """Quantize with Quamba2's grouped scales for Mamba2's x | B | C (after conv + SiLU).

    x: heads are clustered into ``head_groups`` (agglomerative, Ward) by their channels' mean
    |x|, the channels of each head group into ``channel_groups`` (k-means); one scale per
    (SSD group × head group × channel group). B and C: one scale per SSD group each. The
    groups are computed from the calibration data; the channels are not physically reordered
    (the scale vector holds each channel's group scale, which is what matters numerically).
    """

    kind: ClassVar[str] = "quamba2_quantize"
    architectures: ClassVar[tuple[str, ...]] = ("mamba2",)
    head_groups: int = 4
    channel_groups: int = 4

    def validate(self, where: str) -> None:
        super().validate(where)
        check_value(f"{where}.head_groups", self.head_groups, minimum=1)
        check_value(f"{where}.channel_groups", self.channel_groups, minimum=1)

    def needs_calibration(self) -> bool:
        return True  # the groups come from the data even when every scale were dynamic

    def apply(self, model: nn.Module, ctx: Context) -> None:
        sites = [n for n in ctx.structure.act_sites if n.endswith("xbc_site")]
        stats = collect_stats(model, ctx.batches(self.kind), {n: _MeanAbs() for n in sites},
                              forward_fn=ctx.forward_fn, desc="channel statistics", progress=ctx.progress)
        spec = QuantSpec(format=self.activation.format, bits=self.activation.bits, granularity="channel", axis=-1)
        overrides = dict(self.overrides)
        for name in sites:
            mixer = get_submodule(model, name.rsplit(".", 1)[0])
            groups = quamba2_groups(stats[name].mean(), mixer.num_heads, mixer.head_dim, mixer.n_groups,
                                    mixer.state_size, self.head_groups, self.channel_groups)
            overrides[name] = {"observer": "grouped_minmax", "observer_kwargs": {"groups": groups},
                               "activation": spec.to_dict(), "dynamic": False}
        # the groups are data-derived: apply them through a copy, so the recipe object keeps
        # describing the method (and its dict stays small) rather than one calibration's result
        Quantize.apply(dataclasses.replace(self, overrides=overrides), model, ctx)


class _MeanAbs:
    def __init__(self) -> None:
        self.total, self.count = None, 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().abs().reshape(-1, x.shape[-1]).double()
        self.total = x.sum(0) if self.total is None else self.total + x.sum(0)
        self.count += x.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.total / self.count).float()


def quamba2_groups(mean_abs: torch.Tensor, num_heads: int, head_dim: int, n_groups: int, state_size: int,
                   head_groups: int, channel_groups: int) -> list[int]:
    """Group id per x | B | C channel (see ``Quamba2Quantize``)."""
    from sklearn.cluster import AgglomerativeClustering, KMeans

    d = num_heads * head_dim
    x_stat = mean_abs[:d].reshape(num_heads, head_dim).numpy()
    ids = torch.zeros(mean_abs.numel(), dtype=torch.long)
    heads_per_group = num_heads // n_groups
    next_id = 0
    for g in range(n_groups):
        heads = list(range(g * heads_per_group, (g + 1) * heads_per_group))
        feats = x_stat[heads]
        feats = feats.copy()
        feats.sort(axis=1)  # Quamba2 sorts channels inside each head before comparing heads
        k_heads = min(head_groups, len(heads))
        head_labels = (AgglomerativeClustering(n_clusters=k_heads, linkage="ward").fit_predict(feats)
                       if k_heads > 1 else [0] * len(heads))
        for hg in range(k_heads):
            members = [h for h, lab in zip(heads, head_labels) if lab == hg]
            chans = torch.tensor([h * head_dim + c for h in members for c in range(head_dim)])
            vals = mean_abs[chans].reshape(-1, 1).numpy()
            k_ch = min(channel_groups, len(chans))
            labels = KMeans(n_clusters=k_ch, n_init=4, random_state=0).fit_predict(vals) if k_ch > 1 else [0] * len(chans)
            ids[chans] = torch.as_tensor(labels, dtype=torch.long) + next_id
            next_id += k_ch
    for part in range(2):  # B then C: one id per SSD group
        base = d + part * n_groups * state_size
        for g in range(n_groups):
            ids[base + g * state_size: base + (g + 1) * state_size] = next_id
            next_id += 1
    return ids.tolist()


# ----------------------------------------------------------------------------------------
# Presets (registered in core.presets.PRESETS; the generic rtn_dynamic, static_minmax and
# smoothquant are shared with every family, with Mamba's defaults in MambaAdapter.preset_defaults)
# ----------------------------------------------------------------------------------------

# Quamba quantizes weights per tensor; the static baselines share that, so the ablation isolates
# the activation treatment (clipping, smoothing, Hadamard), as in the paper's Table.
PER_TENSOR_WEIGHTS = {"w_granularity": "tensor"}


@register_preset("quamba")
def quamba(o: RecipeOptions) -> Recipe:
    """Quamba W8A8: static per-tensor, percentile-clipped SSM input u, Hadamard before out_proj.

    ``rotation`` (off by default) adds Quamba2's residual-stream Hadamard rotation.
    """
    steps: list[Step] = []
    if o.rotation is not None:
        steps.append(RotateResidual(rotation=o.rotation, seed=o.get("rotation_seed", 0)))
    percentile_u = {"*.u_site": {"observer": "percentile", "observer_kwargs": {"alpha": o.get("percentile", 0.99999)}}}
    steps += [OnlineHadamard(), static_quantize(o, w_granularity=_PER_TENSOR, overrides=percentile_u)]
    return Recipe("quamba", steps)


_PER_TENSOR = PER_TENSOR_WEIGHTS["w_granularity"]
KLT_SITES = ("residual", "dt", "out")


def _check_klt_sites(value: str) -> str | None:
    bad = sorted({s.strip() for s in value.split(",") if s.strip()} - set(KLT_SITES))
    return f"{bad[0]!r} is not a site: allowed {', '.join(KLT_SITES)} (comma-separated)" if bad else None


MAMBAQUANT_OPTIONS = {
    "klt_sites": Option(None, type=str, check=_check_klt_sites,
                        help="comma-separated sites whose rotation is KLT-enhanced (K·H) rather than a plain "
                             "random Hadamard: residual (R1), dt (R5), out (R2); default: all three when "
                             "rotation is klt_hadamard (or unset), none otherwise"),
}


def klt_sites(o: RecipeOptions) -> set[str]:
    """Sites with a KLT-enhanced rotation. ``rotation=klt_hadamard`` (or unset) keeps the paper's
    default, all of R1/R5/R2; ``rotation=random_hadamard`` turns the KLT off everywhere unless
    ``options.klt_sites`` names sites."""
    named = o.options.get("klt_sites")
    if named is not None:
        return {s.strip() for s in named.split(",") if s.strip()}
    return set(KLT_SITES) if o.get("rotation", "klt_hadamard") == "klt_hadamard" else set()


@register_preset("mambaquant", options=MAMBAQUANT_OPTIONS)
def mambaquant(o: RecipeOptions) -> Recipe:
    """MambaQuant: smooth-fused scales, KLT-enhanced rotations R1 (residual), R5 (dt path), R2 (out_proj
    input, online), random Hadamard R4 on the state dimension; per-channel asymmetric weights; dynamic
    activations per token.

    The paper's reference code quantizes activations dynamically per tensor over the whole batch ×
    sequence, so one sequence's result depends on its neighbours in the batch and on how its prompt is
    chunked: ``a_granularity=tensor`` gives that setting (the h·C inputs stay per token), and the report
    flags it (``Quantize.notes``).
    """
    seed = o.get("rotation_seed", 0)
    klt = klt_sites(o)
    base = "random_hadamard" if o.rotation in (None, "klt_hadamard") else o.rotation
    rot = {site: "klt_hadamard" if site in klt else base for site in KLT_SITES}
    w = weight_spec(o, "channel")
    w = QuantSpec(format=w.format, bits=w.bits, symmetric=o.get("w_symmetric", False), granularity=w.granularity,
                  axis=0, group_size=w.group_size).validate()
    act = act_spec(o, "token")
    # the reference setting (per tensor) keeps the h·C inputs (the state and x_proj's C) per token
    token = dataclasses.replace(act, granularity="token").to_dict()
    per_token = {} if act.granularity == "token" else {"*.state_site": {"activation": token},
                                                       "*.x_proj:output": {"activation": token}}
    return Recipe("mambaquant", [
        MambaQuantSmooth(alpha=o.get("alpha", 0.5)),
        RotateResidual(rotation=rot["residual"], seed=seed),
        RotatePairs(rotation=rot["dt"], seed=seed),
        OnlineHadamard(seed=seed, klt=rot["out"] == "klt_hadamard"),
        StateRotation(seed=seed),
        Quantize(weight=w, activation=act, dynamic=True, weight_observer=o.get("w_observer", "minmax"),
                 optional_sites=["*.state_site"], overrides=per_token),
    ])


@register_preset("quamba2")
def quamba2(o: RecipeOptions) -> Recipe:
    """Quamba2 W8A8 for Mamba2: residual Hadamard rotation, online Hadamard before out_proj,
    grouped static scales for x | B | C, static per-tensor elsewhere, per-channel weights."""
    return Recipe("quamba2", [
        RotateResidual(rotation=o.get("rotation", "random_hadamard"), seed=o.get("rotation_seed", 0)),
        OnlineHadamard(),
        Quamba2Quantize(weight=weight_spec(o, "channel"), activation=act_spec(o, "tensor"), dynamic=False,
                        act_observer=o.get("a_observer", "minmax"), weight_observer=o.get("w_observer", "minmax")),
    ])


MAMBA_PRESETS = ("rtn_dynamic", "static_minmax", "smoothquant", "quamba", "mambaquant", "quamba2")
MAMBA_PRESET_DEFAULTS = {"static_minmax": PER_TENSOR_WEIGHTS, "smoothquant": PER_TENSOR_WEIGHTS}
