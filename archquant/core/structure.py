"""How a family adapter describes a model to the core.

An adapter does not rotate or quantize anything itself: it names the places where the
generic moves apply (design.md: "adapters declare structure, the core acts on it").
All names are ``model.named_modules()`` paths.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .matching import matches_any

#: where a smoothing group's inverse scale can go (see ``FoldTarget``)
FOLD_KINDS = ("norm", "linear", "modulation", "online")


@dataclass
class LinearGroup:
    """Linears that read the same tensor; ``norm`` (if any) produces that tensor.

    A norm feeding Linears is where a norm's γ can be folded into them, where smoothing
    scales can be moved from the activation into their weights, and where a residual-stream
    rotation enters them.
    """

    norm: str | None
    linears: list[str]


@dataclass
class LinearPair:
    """A producer Linear whose output rows ``rows`` (all when None) are exactly the input of
    ``consumer``: a rotation or scaling between them fuses into both, offline.
    (Mamba: x_proj's dt rows → dt_proj.)"""

    producer: str
    consumer: str
    rows: tuple[int, int] | None = None


@dataclass
class FoldTarget:
    """Where a smoothing group puts 1/s so that its Linears can take W·diag(s) (exact in FP).

    kind:
      ``"norm"``: the affine weight (and bias) of norm ``name`` is divided by s (an RMSNorm's γ,
        a LayerNorm with ``elementwise_affine``).
      ``"linear"``: Linear ``name`` produces the Linears' input up to a per-channel linear map
        that commutes with a diagonal scale; its output rows ``rows`` (start, stop; all when
        None) and their bias are divided by s. E.g. attention's v_proj → o_proj: the attention
        output of channel j is Σ_t p_t·v_t,j, so v ÷ s gives o_proj's input ÷ s (one KV head per
        query head: with grouped-query attention the repeated heads would need tied scales).
      ``"modulation"``: adaLN. The Linears read h = LN(x)·(offset + scale) + shift, where
        ``scale`` and ``shift`` are rows ``rows`` and ``shift_rows`` of the output of
        modulation Linear ``name`` (``scale_offset`` = 1 for DiT's ``(1 + scale)``, 0 for a
        plain product). h / s needs (offset + scale') = (offset + scale) / s and shift' = shift / s,
        i.e. scale' = scale / s + offset·(1/s − 1): the scale rows' weight is divided by s and
        their bias becomes (b + offset) / s − offset (a bias is created when there is none);
        the shift rows' weight and bias are divided by s.
      ``"online"``: nothing can absorb 1/s (a norm without affine weight, a nonlinearity): every
        Linear gets an online per-channel scale x ↦ x / s in front of it (a module that is kept
        and saved, ``transforms.ChannelScale``).
    """

    kind: str
    name: str | None = None
    rows: tuple[int, int] | None = None
    shift_rows: tuple[int, int] | None = None
    scale_offset: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in FOLD_KINDS:
            raise ValueError(f"smoothing fold kind {self.kind!r} not allowed: allowed {', '.join(FOLD_KINDS)}")
        if self.kind != "online" and not self.name:
            raise ValueError(f"smoothing fold kind {self.kind!r} needs the name of the module that absorbs 1/s")
        if self.kind == "modulation" and self.rows is None:
            raise ValueError("smoothing fold kind 'modulation' needs rows=(start, stop) of the scale chunk")
        for key in ("rows", "shift_rows"):
            rows = getattr(self, key)
            if rows is not None and not (len(rows) == 2 and 0 <= rows[0] < rows[1]):
                raise ValueError(f"smoothing fold {key}={rows!r} not allowed: (start, stop) with 0 <= start < stop")
        if self.rows is not None and self.shift_rows is not None and not (
                self.shift_rows[1] <= self.rows[0] or self.rows[1] <= self.shift_rows[0]):
            raise ValueError(f"smoothing fold rows={self.rows} and shift_rows={self.shift_rows} overlap")


@dataclass
class SmoothingGroup:
    """Linears that read the same tensor, smoothed by one scale s whose inverse goes to ``fold_into``.

    ``norm="name"`` is short for ``fold_into=FoldTarget("norm", "name")`` (the form of ``LinearGroup``).
    """

    linears: list[str]
    fold_into: FoldTarget | None = None
    norm: str | None = None

    def __post_init__(self) -> None:
        if self.fold_into is None and self.norm is None:
            raise ValueError(f"smoothing group {self.linears}: give fold_into= or norm=")
        if self.fold_into is not None and self.norm is not None and self.fold_into != FoldTarget("norm", self.norm):
            raise ValueError(f"smoothing group {self.linears}: norm={self.norm!r} contradicts fold_into={self.fold_into}")
        if self.fold_into is None:
            self.fold_into = FoldTarget("norm", self.norm)
        elif self.fold_into.kind == "norm":
            self.norm = self.fold_into.name
        if not self.linears:
            raise ValueError("a smoothing group needs at least one Linear")


@dataclass
class ModelStructure:
    """The fusion sites of one model instance.

    hidden_size: width of the residual stream (size of a residual rotation).
    embeddings: ``nn.Embedding``s / ``nn.Linear``s whose outputs *start* the residual stream.
    residual_readers: norm → Linears groups that read the residual stream (final norm → head included).
    residual_writers: Linears whose outputs are *added* into the residual stream.
    norm_kind: "rms" (rotation commutes with the normaliser once γ is folded) or "layer".
    online_rotation_sites: Linears whose input can take an online Hadamard whose inverse is
        fused into their weight (Mamba's out_proj, an MLP's down projection).
    quantize: Linears (and depthwise Conv1d) that a quantization recipe wraps by default.
    skip: patterns (``core.matching``: names, globs, ``re:``) of modules never quantized (e.g. the LM head).
    act_inputs: modules whose *input* gets an activation quantizer; None = every ``quantize``
        target (a family lists only the inputs not already quantized upstream).
    act_outputs: modules whose *output* gets an activation quantizer.
    act_sites: ``ActSite`` points inside the model code that get an activation quantizer.
    optional_act_sites: ``ActSite`` points quantized only by recipes that ask for them
        (``Quantize.optional_sites``), e.g. Mamba's SSM state at the h·C readout.
    linear_pairs: producer → consumer Linears with nothing non-linear in between.
    smoothing: where SmoothQuant-style scales can go (``SmoothingGroup``); None = one group per
        residual reader with a norm (its γ absorbs 1/s), the LLM layout.
    blocks: the repeated blocks in execution order (``model.named_modules()`` names), the unit
        of block-wise calibration (``core.blocks``): Mamba's layers, a DiT's transformer blocks.
    weight_only: Linears a family keeps out of activation quantization (their ``skip``ped inputs
        stay in floating point, e.g. a DiT's adaLN modulation and embedders) whose *weights* a
        recipe may still store quantized (``QuantizeWeights``): a storage saving, not a speed one.
    frame_features: for multi-view models, ``fn(model, batch) -> (S, D)``: one feature vector per
        frame of the batch's single sample (frame 0 the reference view), computed by a forward
        pass that also runs every block of ``blocks`` (frame-aware calibration sampling, NFDS,
        ``core.calibration_select``); None: the family has no frames.
    per_frame_call: for multi-view models, ``fn(block_name, call) -> call | None``: a call of a
        block that attends over all frames at once, rewritten as the same tokens regrouped one frame
        per batch row (as a frame block sees them); None for a block that already sees one frame.
        Only for reproducing reference code that calibrates that way (QuantVGGT's pitfall P2,
        ``LearnableClipping.global_calls="per_frame"``).
    """

    hidden_size: int
    embeddings: list[str] = field(default_factory=list)
    residual_readers: list[LinearGroup] = field(default_factory=list)
    residual_writers: list[str] = field(default_factory=list)
    norm_kind: str = "rms"
    online_rotation_sites: list[str] = field(default_factory=list)
    quantize: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    act_inputs: list[str] | None = None
    act_outputs: list[str] = field(default_factory=list)
    act_sites: list[str] = field(default_factory=list)
    optional_act_sites: list[str] = field(default_factory=list)
    linear_pairs: list[LinearPair] = field(default_factory=list)
    smoothing: list[SmoothingGroup] | None = None
    blocks: list[str] = field(default_factory=list)
    weight_only: list[str] = field(default_factory=list)
    frame_features: Callable[[Any, Any], Any] | None = None
    per_frame_call: Callable[[str, Any], Any] | None = None

    def smoothing_groups(self) -> list[SmoothingGroup]:
        """The groups to smooth that feed a quantized Linear (smoothing the LM head would only untie
        it from the embedding for nothing): ``smoothing`` when declared, else every residual
        reader whose norm can absorb the scale."""
        if self.smoothing is not None:
            groups = self.smoothing
        else:
            groups = [SmoothingGroup(list(g.linears), norm=g.norm) for g in self.residual_readers if g.norm is not None]
        return [g for g in groups if any(not matches_any(n, self.skip) for n in g.linears)]
