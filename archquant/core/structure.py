"""How a family adapter describes a model to the core.

An adapter does not rotate or quantize anything itself: it names the places where the
generic moves apply (design.md: "adapters declare structure, the core acts on it").
All names are ``model.named_modules()`` paths.
"""
from __future__ import annotations

from dataclasses import dataclass, field


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
    skip: names never quantized (e.g. the LM head).
    act_inputs: modules whose *input* gets an activation quantizer; None = every ``quantize``
        target (a family lists only the inputs not already quantized upstream).
    act_outputs: modules whose *output* gets an activation quantizer.
    act_sites: ``ActSite`` points inside the model code that get an activation quantizer.
    optional_act_sites: ``ActSite`` points quantized only by recipes that ask for them
        (``Quantize.optional_sites``), e.g. Mamba's SSM state at the h·C readout.
    linear_pairs: producer → consumer Linears with nothing non-linear in between.
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

    def smoothing_groups(self) -> list[LinearGroup]:
        """Groups where a smoothing scale can hide in a norm's weight and that feed a quantized
        Linear (smoothing the LM head would only untie it from the embedding for nothing)."""
        return [g for g in self.residual_readers
                if g.norm is not None and any(n not in self.skip for n in g.linears)]
