"""Mamba1 and Mamba2 language models in plain PyTorch, with HF-compatible parameter names.

Why we own this code instead of calling ``transformers.MambaForCausalLM``: quantization needs
to reach *inside* the mixer (the SSM input u after conv+SiLU, the gate, the scan output y
before out_proj), and on a CPU we want a scan that is not a per-token Python loop over the
whole model. Parameter names and shapes are exactly those of transformers' ``Mamba`` /
``Mamba2`` checkpoints (``backbone.embeddings``, ``backbone.layers.{i}.norm``,
``backbone.layers.{i}.mixer.{in_proj, conv1d, x_proj, dt_proj, A_log, D, dt_bias, norm,
out_proj}``, ``backbone.norm_f``, ``lm_head``), so HF checkpoints load directly, and
mamba_ssm checkpoints after renaming one key (see ``models/mamba_loading.py``).

Shapes: batch b, length l, model width d_model, inner width d = expand·d_model, state n.
Mamba1 mixer (per token): in_proj → x | z; x → causal depthwise conv → SiLU = u;
x_proj(u) → dt_low | B | C; dt = softplus(dt_proj(dt_low)); selective scan with
A = −exp(A_log) and skip D; y · SiLU(z) → out_proj.
Mamba2 mixer: in_proj → z | xBC | dt; conv+SiLU on xBC → x | B | C (B, C shared by the heads
of a group); dt = softplus(dt + dt_bias); chunked SSD scan with a scalar A per head;
gated RMSNorm(y · SiLU(z)) → out_proj.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from archquant.core.modules import ActSite, register_module_type

from .layers import RMSNorm


@dataclass
class MambaConfig:
    arch: str = "mamba1"  # "mamba1" | "mamba2"
    vocab_size: int = 256
    hidden_size: int = 128
    num_layers: int = 2
    state_size: int = 16
    expand: int = 2
    conv_kernel: int = 4
    dt_rank: int = 0  # mamba1; 0 → ceil(hidden_size / 16)
    head_dim: int = 64  # mamba2
    n_groups: int = 1  # mamba2
    chunk_size: int = 64  # mamba2 SSD chunk length
    use_bias: bool = False
    use_conv_bias: bool = True
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    time_step_limit: tuple = (0.0, float("inf"))  # mamba2 dt clamp
    #: what the token ids mean: "bytes" (id = byte value) or a tokenizer name/path
    tokenizer: str = "bytes"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch not in ("mamba1", "mamba2"):
            raise ValueError(f"MambaConfig.arch={self.arch!r} not allowed: 'mamba1' or 'mamba2'")
        if self.dt_rank == 0:
            self.dt_rank = math.ceil(self.hidden_size / 16)
        self.time_step_limit = tuple(self.time_step_limit)
        if self.arch == "mamba2" and self.d_inner % self.head_dim:
            raise ValueError(f"mamba2: d_inner={self.d_inner} is not a multiple of head_dim={self.head_dim}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.hidden_size

    @property
    def num_heads(self) -> int:
        return self.d_inner // self.head_dim

    def to_dict(self) -> dict:
        d = asdict(self)
        d["time_step_limit"] = [x if math.isfinite(x) else None for x in self.time_step_limit]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MambaConfig":
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"unknown MambaConfig field {unknown[0]!r}")
        d = dict(d)
        if "time_step_limit" in d:
            d["time_step_limit"] = tuple(float("inf") if x is None else float(x) for x in d["time_step_limit"])
        return cls(**d)


class GatedRMSNorm(nn.Module):
    """Mamba2's norm(y · SiLU(z)), normalised per group of ``group_size`` channels."""

    def __init__(self, size: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        y = y.float() * F.silu(gate.float())
        g = y.view(*y.shape[:-1], -1, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.view_as(y).to(dtype)


@register_module_type
class ScaledSiLU(nn.Module):
    """MambaQuant's S-SiLU: x·sigmoid(s·x). With z' = z/s it equals SiLU(z)/s, which lets a
    smoothing scale s on the gate be absorbed (the 1/s goes into out_proj's weight)."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.scale.to(x.dtype) * x)

    def freeze(self) -> None:
        pass

    def to_config(self) -> dict:
        return {"type": "ScaledSiLU", "size": int(self.scale.numel())}

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype = torch.float32) -> "ScaledSiLU":
        return cls(torch.ones(config["size"]))


# ----------------------------------------------------------------------------------------
# Inference cache (recurrent decoding)
# ----------------------------------------------------------------------------------------


class MambaLayerState:
    """One layer's recurrent state: what a mixer needs to continue a sequence.

    ``conv_state`` (b, channels, k): the last k conv inputs, newest last (mamba_ssm's
    ``Mamba.step`` layout; zeros before the first token = the conv's zero padding).
    ``ssm_state``: Mamba1 (b, d, n), Mamba2 (b, heads, head_dim, n), fp32.
    Both are None until the first forward with this state; after that they are updated in
    place (the same tensors for the whole sequence, which is what CUDA-graph decoding needs).
    A real-quant mixer keeps its own kinds of tensors here (int8 conv codes); a state belongs
    to the model that filled it.
    """

    __slots__ = ("conv_state", "ssm_state")

    def __init__(self) -> None:
        self.conv_state: torch.Tensor | None = None
        self.ssm_state: torch.Tensor | None = None

    @property
    def empty(self) -> bool:
        return self.ssm_state is None

    def store(self, name: str, new: torch.Tensor) -> None:
        """Keep a new ``conv_state`` / ``ssm_state``: copied into the tensor already held (same
        shape and dtype), so the state tensors stay the same for the whole sequence."""
        old = getattr(self, name)
        if old is new:  # updated in place by a kernel
            return
        if old is not None and old.shape == new.shape and old.dtype == new.dtype:
            old.copy_(new)
        else:
            setattr(self, name, new.detach().clone())


class MambaCache:
    """Recurrent state of a whole model for incremental decoding::

        cache = MambaCache(model.config.num_layers)
        logits = model(prompt_ids, cache=cache)         # prefill: fills the states
        logits = model(next_id[:, None], cache=cache)   # one step: updates them in place

    Feeding a sequence in pieces gives the logits of feeding it whole (up to fp32 rounding).
    """

    def __init__(self, num_layers: int) -> None:
        self.layers = [MambaLayerState() for _ in range(num_layers)]
        self.seqlen_offset = 0  # tokens consumed so far


def causal_conv_silu(conv: nn.Module, x: torch.Tensor, state: MambaLayerState | None) -> torch.Tensor:
    """SiLU(causal depthwise conv(x)) for x (b, c, l), continuing from ``state.conv_state``.

    ``conv`` is the layer's ``nn.Conv1d`` (padding k-1) or its quantized twin. With a state, the
    last k-1 cached inputs are prepended, so output t sees inputs t-k+1..t across calls, and the
    state's window (the last k inputs, newest last) is updated in place.
    """
    l = x.shape[-1]
    if state is None:
        return F.silu(conv(x)[..., :l])
    k = conv.kernel_size[0] if isinstance(conv.kernel_size, tuple) else conv.kernel_size
    hist = (x.new_zeros(x.shape[0], x.shape[1], k) if state.conv_state is None
            else state.conv_state.to(x.dtype))
    xx = torch.cat([hist[..., 1:], x], dim=-1)  # (b, c, k-1+l)
    y = conv(xx)[..., k - 1:k - 1 + l]
    state.store("conv_state", xx[..., -k:])
    return F.silu(y)


def _ssm_params(mixer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A = -exp(A_log) in fp32, D in fp32) of a mixer.

    Without autograd they are computed once and kept until A_log or D change (in place, or by a
    move to another device/dtype): a decode step then does not spend three small kernels per
    layer recomputing them (which a CUDA-graph replay would also pay)."""
    A_log, D = mixer.A_log, mixer.D
    if (torch.is_grad_enabled() and (A_log.requires_grad or D.requires_grad)) or torch.compiler.is_compiling():
        return -torch.exp(A_log.float()), D.float()  # a compiled graph computes them itself (fused)
    key = (A_log.data_ptr(), A_log._version, A_log.dtype, D.data_ptr(), D._version, D.dtype)
    cached = mixer.__dict__.get("_ssm_cache")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, -torch.exp(A_log.float()), D.float())
        mixer.__dict__["_ssm_cache"] = cached
    return cached[1], cached[2]


# ----------------------------------------------------------------------------------------
# Scans (PyTorch references; fp32 state)
# ----------------------------------------------------------------------------------------


def selective_scan(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, h0: torch.Tensor | None = None,
                   return_state: bool = False, state_fn=None):
    """Mamba1 selective scan: h_t = exp(dt_t·A)·h_{t−1} + dt_t·B_t·u_t, y_t = h_t·C_t + D·u_t.

    u, dt: (b, l, d); A: (d, n); B, C: (b, l, n); D: (d,); h0: (b, d, n). fp32 inside.
    The recurrence is sequential in l, vectorised over (b, d, n). ``state_fn`` (if given)
    maps h_t to what the readout multiplies with C_t (a rotation and/or quantization of the
    h·C matmul's input); the recurrence itself always carries the exact fp32 state.
    """
    dtype = u.dtype
    u, dt, B, C = u.float(), dt.float(), B.float(), C.float()
    b, l, d = u.shape
    h = torch.zeros(b, d, A.shape[-1], dtype=torch.float32, device=u.device) if h0 is None else h0.float()
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (u, dt, A, B, C, D, h0))
    scan = _scan_autograd if grads else _scan_inference
    y, h = scan(u, dt, A.float(), B, C, h, state_fn)
    if D is not None:
        y = y + u * D.float()
    y = y.to(dtype)
    return (y, h) if return_state else y


def _scan_autograd(u, dt, A, B, C, h, state_fn):
    """Differentiable recurrence (training)."""
    dA = torch.exp(dt.unsqueeze(-1) * A)  # (b, l, d, n)
    dBu = (dt * u).unsqueeze(-1) * B.unsqueeze(2)  # (b, l, d, n)
    ys = []
    # unbind once: indexing [:, t] inside the loop would make autograd build a full-size
    # gradient tensor per step (l× the memory traffic)
    for dA_t, dBu_t, C_t in zip(dA.unbind(1), dBu.unbind(1), C.unbind(1)):
        h = dA_t * h + dBu_t
        ys.append(torch.bmm(h if state_fn is None else state_fn(h), C_t.unsqueeze(-1)).squeeze(-1))
    y = torch.stack(ys, dim=1) if ys else u.new_zeros(u.shape)
    return y, h


def _scan_inference(u, dt, A, B, C, h, state_fn, block: int = 64):
    """The same recurrence without autograd: in place, ``block`` time steps of the discretised
    A and B·u materialised at a time (cache-sized instead of (b, l, d, n) at once). ~3× faster."""
    b, l, d = u.shape
    y = u.new_empty(b, l, d)
    h = h.clone()
    for t0 in range(0, l, block):
        t1 = min(t0 + block, l)
        dA = torch.exp(dt[:, t0:t1].unsqueeze(-1) * A)
        dBu = (dt[:, t0:t1] * u[:, t0:t1]).unsqueeze(-1) * B[:, t0:t1].unsqueeze(2)
        for i in range(t1 - t0):
            h.mul_(dA[:, i]).add_(dBu[:, i])
            readout = h if state_fn is None else state_fn(h)
            y[:, t0 + i] = torch.bmm(readout, C[:, t0 + i].unsqueeze(-1)).squeeze(-1)
    return y, h


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = x[..., j+1] + … + x[..., i] for i ≥ j, −inf above the diagonal (stable form)."""
    T = x.shape[-1]
    xr = x.unsqueeze(-1).expand(*x.shape, T)  # xr[..., i, j] = x[..., i]
    strictly_lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    xr = xr.masked_fill(~strictly_lower, 0.0)
    out = torch.cumsum(xr, dim=-2)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~lower, float("-inf"))


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             chunk_size: int, D: torch.Tensor | None = None, h0: torch.Tensor | None = None,
             return_state: bool = False):
    """Mamba2 state-space duality scan, computed in chunks (fp32).

    x: (b, l, h, p); dt: (b, l, h) (already softplus'ed); A: (h,); B, C: (b, l, g, n) with
    h % g == 0; D: (h,); h0: (b, h, p, n). Equals the recurrence
    h_t = exp(dt_t·A)·h_{t−1} + dt_t·x_t ⊗ B_t, y_t = h_t·C_t + D·x_t.
    """
    dtype = x.dtype
    b, l, nh, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    B = B.repeat_interleave(nh // g, dim=2)  # (b, l, h, n)
    C = C.repeat_interleave(nh // g, dim=2)
    T = chunk_size
    pad = (-l) % T
    if pad:
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    L = l + pad
    c = L // T
    X = (x * dt.unsqueeze(-1)).view(b, c, T, nh, p)
    Adt = (dt * A.float()).view(b, c, T, nh).permute(0, 3, 1, 2)  # (b, h, c, T)
    Bc, Cc = B.view(b, c, T, nh, n), C.view(b, c, T, nh, n)
    A_cum = torch.cumsum(Adt, dim=-1)

    # within each chunk: y_t = Σ_{s≤t} C_t·B_s · exp(A_cum_t − A_cum_s) · X_s
    decay = torch.exp(_segsum(Adt))  # (b, h, c, T, T)
    y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, decay, X)

    # state at the end of each chunk, then carried across chunks
    decay_to_end = torch.exp(A_cum[..., -1:] - A_cum)  # (b, h, c, T)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_to_end, X)
    init = torch.zeros_like(states[:, :1]) if h0 is None else h0.float().unsqueeze(1)
    states = torch.cat([init, states], dim=1)  # (b, c+1, h, p, n)
    chunk_decay = torch.exp(_segsum(F.pad(A_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    states, final = states[:, :-1], states[:, -1]

    # contribution of the state entering each chunk
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, states, torch.exp(A_cum))
    y = y.reshape(b, L, nh, p)[:, :l]
    if D is not None:
        y = y + x[:, :l] * D.float()[:, None]
    y = y.to(dtype)
    return (y, final) if return_state else y


def ssd_step(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: torch.Tensor | None, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One Mamba2 recurrence step (decode): x (b, h, p), dt (b, h), B, C (b, g, n), h (b, h, p, n)
    fp32. Returns (y (b, h, p) in x's dtype, the new state); ``h`` itself is not modified."""
    nh, g = x.shape[1], B.shape[1]
    xf, dtf = x.float(), dt.float()
    Bh = B.float().repeat_interleave(nh // g, dim=1)  # (b, h, n)
    Ch = C.float().repeat_interleave(nh // g, dim=1)
    dA = torch.exp(dtf * A.float())[..., None, None]
    h = h.float() * dA + (dtf[..., None] * xf)[..., None] * Bh[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", h, Ch)
    if D is not None:
        y = y + xf * D.float()[:, None]
    return y.to(x.dtype), h


def ssd_scan_reference(x, dt, A, B, C, D=None):
    """Token-by-token recurrence of ``ssd_scan`` (for tests)."""
    b, l, nh, p = x.shape
    g = B.shape[-2]
    B = B.float().repeat_interleave(nh // g, dim=2)
    C = C.float().repeat_interleave(nh // g, dim=2)
    h = torch.zeros(b, nh, p, B.shape[-1])
    ys = []
    for t in range(l):
        dA = torch.exp(dt[:, t].float() * A.float())  # (b, h)
        h = dA[..., None, None] * h + (dt[:, t, :, None].float() * x[:, t].float())[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + x.float() * D.float()[:, None]
    return y


# ----------------------------------------------------------------------------------------
# Mixers
# ----------------------------------------------------------------------------------------


class Mamba1Mixer(nn.Module):
    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        d, n = cfg.d_inner, cfg.state_size
        self.d_inner, self.state_size, self.dt_rank = d, n, cfg.dt_rank
        self.in_proj = nn.Linear(cfg.hidden_size, 2 * d, bias=cfg.use_bias)
        self.conv1d = nn.Conv1d(d, d, cfg.conv_kernel, groups=d, padding=cfg.conv_kernel - 1, bias=cfg.use_conv_bias)
        self.x_proj = nn.Linear(d, cfg.dt_rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(cfg.dt_rank, d, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = nn.Linear(d, cfg.hidden_size, bias=cfg.use_bias)
        # Quantization points inside the mixer (identity until a recipe fills them):
        self.u_site = ActSite()  # SSM input u = SiLU(conv(x)); feeds x_proj and the scan
        self.gate_act = nn.SiLU()  # replaced by ScaledSiLU for smooth-fused gates
        # The h·C readout (MambaQuant quantizes both inputs of this matmul): an optional online
        # rotation of the state dimension (R4; its inverse is fused into x_proj's C rows) and
        # a quantization point for h_t.
        self.state_rotation: nn.Module | None = None
        self.state_site = ActSite()

    def _state_readout(self):
        if self.state_rotation is None and not self.state_site.is_quantized:
            return None

        def readout(h: torch.Tensor) -> torch.Tensor:  # h: (b, d, n)
            if self.state_rotation is not None:
                h = self.state_rotation(h)
            return self.state_site(h.reshape(h.shape[0], -1)).reshape(h.shape)  # per-token scale over d·n

        return readout

    def forward(self, hidden: torch.Tensor, state: MambaLayerState | None = None) -> torch.Tensor:
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        u = self.u_site(self.conv_silu(x.transpose(1, 2), state).transpose(1, 2))
        dt_low, B, C = self.x_proj(u).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        dt_raw = self.dt_proj(dt_low)
        A, D = _ssm_params(self)
        h0 = None if state is None else state.ssm_state
        y, h = self.gated_scan(u, dt_raw, A, D, B, C, z, h0, decode=state is not None and u.shape[1] == 1)
        if state is not None:
            state.store("ssm_state", h)
        return self.out_proj(y)

    # The two fusable pieces, as methods so that ``archquant.backends.fused`` can put kernels there.
    def conv_silu(self, x: torch.Tensor, state: MambaLayerState | None) -> torch.Tensor:
        """SiLU(causal conv1d(x)) for x (b, d, l): :func:`causal_conv_silu`."""
        return causal_conv_silu(self.conv1d, x, state)

    def gated_scan(self, u, dt_raw, A, D, B, C, z, h0, decode: bool):
        """``(scan(u, softplus(dt_raw), A, B, C, D, h0) · gate(z), final state)``; u, dt_raw, z
        (b, l, d), B, C (b, l, n); ``decode``: one token continuing a cached state."""
        y, h = selective_scan(u, F.softplus(dt_raw.float()), A, B, C, D, h0=h0,
                              return_state=True, state_fn=self._state_readout())
        return y * self.gate_act(z), h


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        d, n, g, h = cfg.d_inner, cfg.state_size, cfg.n_groups, cfg.num_heads
        self.d_inner, self.state_size, self.n_groups, self.num_heads = d, n, g, h
        self.head_dim, self.chunk_size = cfg.head_dim, cfg.chunk_size
        self.time_step_limit = cfg.time_step_limit
        self.conv_dim = d + 2 * g * n
        self.in_proj = nn.Linear(cfg.hidden_size, d + self.conv_dim + h, bias=cfg.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.conv_kernel, groups=self.conv_dim,
                                padding=cfg.conv_kernel - 1, bias=cfg.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(h))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, h + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(h))
        self.norm = GatedRMSNorm(d, group_size=d // g, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(d, cfg.hidden_size, bias=cfg.use_bias)
        self.xbc_site = ActSite()  # x | B | C after conv + SiLU: the scan's inputs

    def forward(self, hidden: torch.Tensor, state: MambaLayerState | None = None) -> torch.Tensor:
        b, l, _ = hidden.shape
        z, xbc, dt = self.in_proj(hidden).split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        xbc = self.xbc_site(self.conv_silu(xbc.transpose(1, 2), state).transpose(1, 2))
        gn = self.n_groups * self.state_size
        x, B, C = xbc.split([self.d_inner, gn, gn], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        lo, hi = self.time_step_limit
        if lo > 0.0 or math.isfinite(hi):
            dt = dt.clamp(lo, hi)
        x = x.reshape(b, l, self.num_heads, self.head_dim)
        B = B.reshape(b, l, self.n_groups, self.state_size)
        C = C.reshape(b, l, self.n_groups, self.state_size)
        A, D = _ssm_params(self)
        h0 = None if state is None else state.ssm_state
        if state is not None and l == 1:  # decode: one recurrence step, no chunk padding
            y, h = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D,
                            h0 if h0 is not None else x.new_zeros(b, self.num_heads, self.head_dim,
                                                                  self.state_size, dtype=torch.float32))
            y = y.unsqueeze(1)
        else:
            y, h = ssd_scan(x, dt, A, B, C, self.chunk_size, D=D, h0=h0, return_state=True)
        if state is not None:
            state.store("ssm_state", h)
        y = self.norm(y.reshape(b, l, self.d_inner), z)
        return self.out_proj(y)

    def conv_silu(self, x: torch.Tensor, state: MambaLayerState | None) -> torch.Tensor:
        """SiLU(causal conv1d(x | B | C)) (b, conv_dim, l): :func:`causal_conv_silu` (a fusable piece,
        see ``Mamba1Mixer.conv_silu``)."""
        return causal_conv_silu(self.conv1d, x, state)


# ----------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------


class MambaBlock(nn.Module):
    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mixer = Mamba1Mixer(cfg) if cfg.arch == "mamba1" else Mamba2Mixer(cfg)

    def forward(self, hidden: torch.Tensor, state: MambaLayerState | None = None) -> torch.Tensor:
        residual = hidden.float() if self.residual_in_fp32 else hidden
        normed = self.norm(hidden.to(self.norm.weight.dtype))
        out = self.mixer(normed) if state is None else self.mixer(normed, state)
        return (residual + out).to(residual.dtype)


class MambaBackbone(nn.Module):
    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MambaBlock(cfg) for _ in range(cfg.num_layers))
        self.norm_f = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, input_ids: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        h = self.embeddings(input_ids)
        if cache is not None and len(cache.layers) != len(self.layers):
            raise ValueError(f"cache has {len(cache.layers)} layers, the model {len(self.layers)}")
        for i, layer in enumerate(self.layers):
            h = layer(h) if cache is None else layer(h, cache.layers[i])
        if cache is not None:
            cache.seqlen_offset += input_ids.shape[1]
        return self.norm_f(h.to(self.norm_f.weight.dtype))


class MambaLM(nn.Module):
    """Mamba1/Mamba2 causal LM: ``forward(input_ids (b, l)) -> logits (b, l, vocab)``."""

    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = MambaBackbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    def forward(self, input_ids: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        """Logits (b, l, vocab). With a ``MambaCache`` the sequence continues from (and updates)
        its recurrent state: prefill with the prompt, then feed one token at a time."""
        h = self.backbone(input_ids, cache)
        # the head computes in the model's dtype (the embedding's: a quantized head has no float weight)
        return self.lm_head(h.to(self.backbone.embeddings.weight.dtype))

    def new_cache(self) -> MambaCache:
        return MambaCache(self.config.num_layers)


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding with the recurrent cache: one prefill, then one-token steps.
    Returns the generated ids (b, max_new_tokens). Works for FP, fake-quant and real-quant models."""
    cache = model.new_cache()
    logits = model(input_ids, cache=cache)
    out = []
    for _ in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        logits = model(nxt, cache=cache)
    return torch.cat(out, dim=1) if out else input_ids.new_empty(input_ids.shape[0], 0)


def init_mamba_weights(model: MambaLM, seed: int = 0) -> MambaLM:
    """Mamba's standard initialisation (dt bias from log-uniform [1e-3, 1e-1], S4D-real A), seeded.
    The same seed gives the same weights on every CPU; on a GPU it gives other (equally standard) ones."""
    cfg = model.config
    # the generator lives where the weights do (a model built on a GPU initialises there)
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.fill_(1.0)
            elif name.endswith(("A_log", ".D")):
                continue
            elif name.endswith("dt_proj.bias") or name.endswith("dt_bias"):
                dt = torch.exp(torch.rand(p.shape, generator=g, device=p.device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            elif name.endswith("dt_proj.weight"):
                std = cfg.dt_rank ** -0.5
                p.uniform_(-std, std, generator=g)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.zero_()
        for layer in model.backbone.layers:  # GPT-2-style rescale of the residual writers
            layer.mixer.out_proj.weight.div_(math.sqrt(cfg.num_layers))
    return model
