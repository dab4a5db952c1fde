"""Transformer building blocks of VGGT's aggregator (and of its DINOv2 patch embedder).

Attribute names follow the released VGGT checkpoint so that a state dict loads without renaming:

* ``LayerScale.gamma`` (dim,);
* ``Mlp.fc1`` / ``Mlp.fc2`` (GELU in between);
* ``Attention.qkv`` (one fused projection, with bias), ``Attention.q_norm`` / ``Attention.k_norm``
  (LayerNorm over the head dimension, only when ``qk_norm``; otherwise parameter-free
  identities), ``Attention.proj``;
* ``Block.norm1`` -> ``attn`` -> ``ls1`` (residual), ``norm2`` -> ``mlp`` -> ``ls2`` (residual);
* ``PatchEmbed.proj`` (a Conv2d with kernel = stride = patch size).

The 2D rotary embedding (:class:`RotaryPositionEmbedding2D`) splits every head's features into two
halves: the first half is rotated by the token's row (y) coordinate, the second half by its column
(x) coordinate. Inside each half the usual "rotate-half" RoPE is used with frequencies
``base ** (-2i / d)``, ``d`` being the size of that half. Positions are integers; a token at
position (0, 0) is left unrotated, which is how the aggregator treats its camera and register
tokens (patch coordinates are shifted by one so that no patch sits at 0).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "LayerScale",
    "Mlp",
    "RotaryPositionEmbedding2D",
    "patch_positions",
    "Attention",
    "Block",
    "PatchEmbed",
]


class LayerScale(nn.Module):
    """Per-channel learnable scaling ``x * gamma`` (``gamma`` starts at ``init_values``)."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """Two linear layers with a GELU between them (hidden width ``hidden_features``)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None, bias: bool = True) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def patch_positions(batch: int, grid_h: int, grid_w: int, device=None) -> torch.Tensor:
    """Integer (y, x) coordinates of a row-major ``grid_h x grid_w`` patch grid: (batch, h*w, 2)."""
    ys = torch.arange(grid_h, device=device)
    xs = torch.arange(grid_w, device=device)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(1, grid_h * grid_w, 2)
    return grid.expand(batch, -1, -1).clone()


class RotaryPositionEmbedding2D(nn.Module):
    """2D rotary position embedding (no parameters).

    ``forward(x, pos)`` takes ``x`` of shape (B, heads, N, D) with D divisible by 4 and integer
    positions ``pos`` of shape (B, N, 2) holding (y, x); it returns ``x`` rotated.
    """

    def __init__(self, frequency: float = 100.0, scaling_factor: float = 1.0) -> None:
        super().__init__()
        self.base_frequency = float(frequency)
        self.scaling_factor = float(scaling_factor)

    def _rotate_1d(self, feats: torch.Tensor, coord: torch.Tensor) -> torch.Tensor:
        # feats: (B, H, N, d); coord: (B, N)
        d = feats.shape[-1]
        exponents = torch.arange(0, d, 2, device=feats.device, dtype=torch.float32) / d
        inv_freq = 1.0 / (self.base_frequency ** exponents)  # (d/2,)
        angles = coord.to(torch.float32)[..., None] * inv_freq  # (B, N, d/2)
        angles = torch.cat([angles, angles], dim=-1).to(feats.dtype)
        cos = angles.cos()[:, None]
        sin = angles.sin()[:, None]
        first, second = feats.chunk(2, dim=-1)
        rotated_half = torch.cat([-second, first], dim=-1)
        return feats * cos + rotated_half * sin

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] % 4 != 0:
            raise ValueError(f"RoPE2D expects (B, heads, N, D) with D % 4 == 0, got {tuple(x.shape)}")
        if pos.dim() != 3 or pos.shape[-1] != 2 or pos.shape[1] != x.shape[2]:
            raise ValueError(f"positions must be (B, N, 2) matching x, got {tuple(pos.shape)}")
        rows, cols = x.chunk(2, dim=-1)
        return torch.cat([self._rotate_1d(rows, pos[..., 0]), self._rotate_1d(cols, pos[..., 1])], dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection, optional QK-LayerNorm and RoPE."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True,
                 qk_norm: bool = False, norm_layer=nn.LayerNorm,
                 rope: Optional[RotaryPositionEmbedding2D] = None) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.rope = rope

    def project_qkv(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None):
        """q, k, v as (B, heads, N, head_dim), after QK-norm and RoPE (exposed for tests)."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = self.q_norm(q)
        k = self.k_norm(k)
        if self.rope is not None and pos is not None:
            q = self.rope(q, pos)
            k = self.rope(k, pos)
        return q, k, v

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.project_qkv(x, pos)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches.

    ``norm_eps`` is 1e-5 (``nn.LayerNorm``'s default) for VGGT's frame/global blocks and 1e-6 for
    the DINOv2 backbone blocks. ``init_values`` of None/0 drops LayerScale (identities).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, init_values: Optional[float] = None,
                 qk_norm: bool = False, rope: Optional[RotaryPositionEmbedding2D] = None,
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
                              qk_norm=qk_norm, rope=rope)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patchify: (B, C, H, W) -> (B, (H/p)*(W/p), embed_dim), row-major."""

    def __init__(self, img_size: int = 518, patch_size: int = 14, in_chans: int = 3,
                 embed_dim: int = 1024) -> None:
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = self.patch_size
        if h % ph or w % pw:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw}")
        return self.proj(x).flatten(2).transpose(1, 2)
