"""VGGT's aggregator: a DINOv2 (or plain conv) patch embedder followed by alternating attention.

Parameter names match the released ``model.pt`` under its ``aggregator.`` prefix:

* ``camera_token`` (1, 2, 1, C) and ``register_token`` (1, 2, R, C): slot 0 is used by the first
  frame of every sequence, slot 1 by all the other frames;
* ``patch_embed.*``: for ``dinov2_vit{s,b,l}14_reg`` a DINOv2 ViT (``patch_embed.proj``,
  ``cls_token``, ``pos_embed``, ``register_tokens``, ``mask_token``, ``blocks.N.*``, ``norm``);
  for ``conv`` just ``patch_embed.proj``;
* ``frame_blocks.N.*`` and ``global_blocks.N.*``: blocks with QK-norm and 2D RoPE.

Data flow of :meth:`Aggregator.forward` for images (B, S, 3, H, W) in [0, 1]:

1. ImageNet normalisation, then the patch embedder on the B*S frames; with DINOv2 the patch
   tokens are its final-``norm``-ed outputs without the cls and register tokens;
2. each frame becomes ``[camera, registers (R), patches]`` so ``patch_start_idx = 1 + R``;
3. RoPE positions: patch (row, col) + 1; the special tokens sit at (0, 0);
4. ``depth / aa_block_size`` rounds; in each, for every attention type of ``aa_order``,
   ``aa_block_size`` blocks run, frame blocks on (B*S, P, C) and global blocks on (B, S*P, C).
   The output after every frame block and after every global block is kept as (B, S, P, C); the
   i-th frame output and the i-th global output of a round are concatenated on the channel axis.

``forward`` returns ``(outputs, patch_start_idx)`` where ``outputs`` holds ``depth`` tensors of
shape (B, S, P, 2C).

DINOv2 sizes are tied to the backbone name as in the official code (s: 384/12/6, b: 768/12/12,
l: 1024/24/16, all with MLP ratio 4). For small test models, ``dino_overrides`` (a dict with any
of ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``) replaces them; it is an archquant
extension that the released model never uses.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Block, PatchEmbed, RotaryPositionEmbedding2D, patch_positions
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["DINOV2_CONFIGS", "DinoVisionTransformer", "Aggregator", "select_frame_tokens"]

# name -> (embed_dim, depth, num_heads, mlp_ratio)
DINOV2_CONFIGS = {
    "dinov2_vits14_reg": (384, 12, 6, 4.0),
    "dinov2_vitb14_reg": (768, 12, 12, 4.0),
    "dinov2_vitl14_reg": (1024, 24, 16, 4.0),
}


class DinoVisionTransformer(nn.Module):
    """The DINOv2 ViT (with registers and LayerScale) as VGGT uses it as a patch embedder.

    Positional embeddings cover one cls token plus an ``(img_size / patch)^2`` square grid; other
    grids get them by bicubic, antialiased interpolation to the target size (no offset).
    ``forward`` returns a dict with ``x_norm_clstoken``, ``x_norm_regtokens``,
    ``x_norm_patchtokens`` and ``x_prenorm``.
    """

    def __init__(self, img_size: int = 518, patch_size: int = 14, in_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0,
                 num_register_tokens: int = 4, init_values: Optional[float] = 1.0,
                 interpolate_antialias: bool = True) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim))
        if num_register_tokens > 0:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        else:
            self.register_tokens = None
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, init_values=init_values, qk_norm=False,
                  rope=None, norm_eps=1e-6)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.mask_token.requires_grad_(False)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)

    def interpolated_pos_embed(self, grid_h: int, grid_w: int, dtype: torch.dtype) -> torch.Tensor:
        """Position embeddings (1, 1 + grid_h*grid_w, C) for a grid_h x grid_w patch grid."""
        n = self.pos_embed.shape[1] - 1
        side = int(round(math.sqrt(n)))
        if side * side != n:
            raise ValueError(f"pos_embed holds {n} patch positions, not a square grid")
        if grid_h == side and grid_w == side:
            return self.pos_embed.to(dtype)
        table = self.pos_embed.float()
        grid = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic",
                             antialias=self.interpolate_antialias)
        grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([table[:, :1], grid], dim=1).to(dtype)

    def forward(self, x: torch.Tensor) -> dict:
        n = x.shape[0]
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(n, -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self.interpolated_pos_embed(grid_h, grid_w, tokens.dtype)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(n, -1, -1).to(tokens.dtype)
            tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
        for blk in self.blocks:
            tokens = blk(tokens)
        normed = self.norm(tokens)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1:1 + r],
            "x_norm_patchtokens": normed[:, 1 + r:],
            "x_prenorm": tokens,
        }


def select_frame_tokens(tokens: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """(1, 2, X, C) special tokens -> (batch*frames, X, C): slot 0 for frame 0, slot 1 for others."""
    first = tokens[:, :1].expand(batch, 1, *tokens.shape[2:])
    rest = tokens[:, 1:2].expand(batch, frames - 1, *tokens.shape[2:])
    return torch.cat([first, rest], dim=1).reshape(batch * frames, *tokens.shape[2:])


class Aggregator(nn.Module):
    """VGGT's alternating-attention aggregator (see the module docstring)."""

    def __init__(self, img_size: int = 518, patch_size: int = 14, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0,
                 num_register_tokens: int = 4, qkv_bias: bool = True, proj_bias: bool = True,
                 ffn_bias: bool = True, patch_embed: str = "dinov2_vitl14_reg",
                 aa_order: Sequence[str] = ("frame", "global"), aa_block_size: int = 1,
                 qk_norm: bool = True, rope_freq: float = 100, init_values: Optional[float] = 0.01,
                 dino_overrides: Optional[dict] = None) -> None:
        super().__init__()
        for kind in aa_order:
            if kind not in ("frame", "global"):
                raise ValueError(f"unknown attention type {kind!r} in aa_order")
        if aa_block_size < 1 or depth % aa_block_size:
            raise ValueError(f"depth {depth} must be a multiple of aa_block_size {aa_block_size}")
        self._build_patch_embed(patch_embed, img_size, patch_size, embed_dim, num_register_tokens,
                                dino_overrides)

        self.rope = RotaryPositionEmbedding2D(frequency=rope_freq) if rope_freq > 0 else None
        self.frame_blocks = nn.ModuleList(self._make_block(embed_dim, num_heads, mlp_ratio, qkv_bias,
                                                           proj_bias, ffn_bias, init_values, qk_norm)
                                          for _ in range(depth))
        self.global_blocks = nn.ModuleList(self._make_block(embed_dim, num_heads, mlp_ratio, qkv_bias,
                                                            proj_bias, ffn_bias, init_values, qk_norm)
                                           for _ in range(depth))
        self.depth = depth
        self.aa_order = tuple(aa_order)
        self.aa_block_size = aa_block_size
        self.aa_block_num = depth // aa_block_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim

        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, embed_dim))
        self.register_token = nn.Parameter(torch.randn(1, 2, num_register_tokens, embed_dim))
        nn.init.normal_(self.camera_token, std=1e-6)
        nn.init.normal_(self.register_token, std=1e-6)
        self.patch_start_idx = 1 + num_register_tokens

        self.register_buffer("_resnet_mean", torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("_resnet_std", torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1),
                             persistent=False)

    def reset_normalisation_buffers(self) -> None:
        """Re-create the ImageNet statistics (not in the state dict), e.g. after building on the meta device."""
        self._resnet_mean = torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)
        self._resnet_std = torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)

    def _make_block(self, dim, heads, mlp_ratio, qkv_bias, proj_bias, ffn_bias, init_values, qk_norm):
        return Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias,
                     ffn_bias=ffn_bias, init_values=init_values, qk_norm=qk_norm, rope=self.rope)

    def _build_patch_embed(self, name, img_size, patch_size, embed_dim, num_register_tokens,
                           dino_overrides):
        if name == "conv":
            self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
            return
        if name not in DINOV2_CONFIGS:
            raise ValueError(f"unsupported patch_embed {name!r}; expected 'conv' or one of "
                             f"{sorted(DINOV2_CONFIGS)}")
        dim, depth, heads, ratio = DINOV2_CONFIGS[name]
        overrides = dict(dino_overrides or {})
        unknown = set(overrides) - {"embed_dim", "depth", "num_heads", "mlp_ratio"}
        if unknown:
            raise ValueError(f"unknown dino_overrides keys {sorted(unknown)}")
        dim = overrides.get("embed_dim", dim)
        if dim != embed_dim:
            raise ValueError(f"{name} produces {dim}-d tokens but embed_dim is {embed_dim}")
        self.patch_embed = DinoVisionTransformer(
            img_size=img_size, patch_size=patch_size, embed_dim=dim,
            depth=overrides.get("depth", depth), num_heads=overrides.get("num_heads", heads),
            mlp_ratio=overrides.get("mlp_ratio", ratio), num_register_tokens=num_register_tokens,
            init_values=1.0, interpolate_antialias=True,
        )

    def forward(self, images: torch.Tensor):
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"expected images (B, S, 3, H, W), got {tuple(images.shape)}")
        b, s, _, h, w = images.shape
        images = (images - self._resnet_mean.to(images.dtype)) / self._resnet_std.to(images.dtype)
        patches = self.patch_embed(images.reshape(b * s, 3, h, w))
        if isinstance(patches, dict):
            patches = patches["x_norm_patchtokens"]
        c = patches.shape[-1]
        camera = select_frame_tokens(self.camera_token, b, s).to(patches.dtype)
        registers = select_frame_tokens(self.register_token, b, s).to(patches.dtype)
        tokens = torch.cat([camera, registers, patches], dim=1)
        p = tokens.shape[1]

        pos = None
        if self.rope is not None:
            pos = patch_positions(b * s, h // self.patch_size, w // self.patch_size, images.device) + 1
            special = torch.zeros(b * s, self.patch_start_idx, 2, dtype=pos.dtype, device=pos.device)
            pos = torch.cat([special, pos], dim=1)
        frame_pos = pos
        global_pos = None if pos is None else pos.reshape(b, s * p, 2)

        frame_idx = global_idx = 0
        outputs = []
        for _ in range(self.aa_block_num):
            inter = {"frame": [], "global": []}
            for kind in self.aa_order:
                if kind == "frame":
                    tokens = tokens.reshape(b * s, p, c)
                    for _ in range(self.aa_block_size):
                        tokens = self.frame_blocks[frame_idx](tokens, pos=frame_pos)
                        frame_idx += 1
                        inter["frame"].append(tokens.reshape(b, s, p, c))
                else:
                    tokens = tokens.reshape(b, s * p, c)
                    for _ in range(self.aa_block_size):
                        tokens = self.global_blocks[global_idx](tokens, pos=global_pos)
                        global_idx += 1
                        inter["global"].append(tokens.reshape(b, s, p, c))
            for f_out, g_out in zip(inter["frame"], inter["global"]):
                outputs.append(torch.cat([f_out, g_out], dim=-1))
        return outputs, self.patch_start_idx
