"""A tiny pre-norm residual MLP classifier: the runner's smallest end-to-end family.

It has the structure every family in archquant shares (an input projection writing a
residual stream, RMSNorm → Linear readers, Linear writers back into the stream, a final
norm and a head), so it exercises norm folding, residual rotation, online Hadamard and
smoothing on a model that trains in about a second on a CPU.

Like real LLMs, the first norm of each block carries a few large γ channels
("outlier channels"), which are kept fixed during training: they make per-tensor
activation quantization hard and give smoothing and rotation something to fix.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm


@dataclass
class ToyConfig:
    in_features: int = 32
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_classes: int = 10
    outlier_channels: int = 4
    outlier_scale: float = 30.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ToyConfig":
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"unknown toy model option {unknown[0]!r}: allowed {', '.join(sorted(allowed))}")
        return cls(**d)


class ToyBlock(nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down_proj(F.gelu(self.up_proj(self.norm(x))))


class ToyResMLP(nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Linear(cfg.in_features, cfg.hidden_size)
        self.layers = nn.ModuleList(ToyBlock(cfg) for _ in range(cfg.num_layers))
        self.norm_f = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.head = nn.Linear(cfg.hidden_size, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm_f(h))


def init_toy_model(cfg: ToyConfig) -> ToyResMLP:
    """Deterministic initialisation from ``cfg.seed``, with the outlier γ channels in place."""
    g = torch.Generator().manual_seed(cfg.seed)
    model = ToyResMLP(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:  # weights: scaled Gaussian; biases start at zero
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            else:
                p.zero_()
        for layer in model.layers:
            layer.norm.weight.fill_(1.0)
            idx = torch.randperm(cfg.hidden_size, generator=g)[: cfg.outlier_channels]
            layer.norm.weight[idx] = cfg.outlier_scale
        model.norm_f.weight.fill_(1.0)
    return model


def toy_task(cfg: ToyConfig, n: int, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` labelled samples of the toy task: Gaussian inputs, labels from a fixed random teacher.

    The teacher depends only on ``cfg.seed``; the inputs on ``split_seed``, so disjoint seeds
    give disjoint data.
    """
    teacher_gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    teacher = torch.randn(cfg.in_features, cfg.num_classes, generator=teacher_gen)
    gen = torch.Generator().manual_seed(split_seed)
    x = torch.randn(n, cfg.in_features, generator=gen)
    y = (torch.tanh(x) @ teacher).argmax(-1)
    return x, y


def train_toy_model(cfg: ToyConfig, steps: int = 300, batch_size: int = 256, lr: float = 3e-3) -> ToyResMLP:
    """Train the toy model (norm γ frozen, to keep the outlier channels) on the train split."""
    torch.manual_seed(cfg.seed)
    model = init_toy_model(cfg)
    params = [p for n, p in model.named_parameters() if "norm" not in n]
    opt = torch.optim.Adam(params, lr=lr)
    x, y = toy_task(cfg, steps * batch_size, split_seed=1_000_000 + cfg.seed)
    model.train()
    for i in range(steps):
        sl = slice(i * batch_size, (i + 1) * batch_size)
        loss = F.cross_entropy(model(x[sl]), y[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model
