"""VGGT's prediction heads: the camera head and the DPT dense heads (depth, point map).

Parameter names follow the released ``model.pt`` under ``camera_head.``, ``depth_head.`` and
``point_head.``:

* camera head: ``token_norm``, ``trunk.N.*`` (plain pre-norm blocks with LayerScale, no QK-norm,
  no RoPE: attention runs over the S camera tokens of a sequence), ``trunk_norm``,
  ``empty_pose_tokens``, ``embed_pose``, ``poseLN_modulation.1`` (adaLN: SiLU then a Linear to
  shift, scale and gate), ``pose_branch.fc1/fc2``;
* DPT head: ``norm``, ``projects.0-3`` (1x1 convs), ``resize_layers.{0,1,3}`` (4x and 2x
  transposed convs, identity, a stride-2 conv), ``scratch.layer{1-4}_rn``,
  ``scratch.refinenet{1-4}.*`` (feature fusion: residual conv units, bilinear upsampling, 1x1
  out conv; the deepest has no skip input), ``scratch.output_conv1`` and ``scratch.output_conv2``.

The camera head refines its 9-D ``absT_quaR_FoV`` encoding over ``num_iterations`` rounds: each
round embeds the previous estimate (a learned empty pose in the first), modulates the normalised
camera tokens with it, runs the trunk and adds a predicted delta. Activations: translation and
quaternion linear, field of view ReLU. DPT outputs ``(prediction, confidence)`` with ``exp``
(depth) or ``inv_log`` (points, sign(y)(e^|y| - 1)) and confidence 1 + e^c.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Block, Mlp

__all__ = ["CameraHead", "DPTHead", "activate_pose", "activate_dense"]

POSE_DIM = 9  # absT_quaR_FoV: translation (3), quaternion xyzw (4), field of view h, w (2)


def _activate(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "linear":
        return x
    if kind == "relu":
        return F.relu(x)
    if kind == "exp":
        return torch.exp(x)
    if kind == "inv_log":
        return torch.sign(x) * torch.expm1(x.abs())
    raise ValueError(f"unknown activation {kind!r}")


def activate_pose(enc: torch.Tensor, trans_act: str = "linear", quat_act: str = "linear",
                  fl_act: str = "relu") -> torch.Tensor:
    return torch.cat([_activate(enc[..., :3], trans_act), _activate(enc[..., 3:7], quat_act),
                      _activate(enc[..., 7:], fl_act)], dim=-1)


def activate_dense(out: torch.Tensor, activation: str, conf_activation: str = "expp1"):
    """(N, C+1, H, W) head output -> prediction (N, H, W, C), confidence (N, H, W)."""
    fmap = out.permute(0, 2, 3, 1)
    pred, conf = _activate(fmap[..., :-1], activation), fmap[..., -1]
    if conf_activation == "expp1":
        conf = 1 + conf.exp()
    elif conf_activation != "linear":
        raise ValueError(f"unknown confidence activation {conf_activation!r}")
    return pred, conf


class CameraHead(nn.Module):
    def __init__(self, dim_in: int = 2048, trunk_depth: int = 4, num_heads: int = 16, mlp_ratio: float = 4.0,
                 init_values: float = 0.01) -> None:
        super().__init__()
        self.trunk = nn.Sequential(*[Block(dim_in, num_heads, mlp_ratio=mlp_ratio, init_values=init_values)
                                     for _ in range(trunk_depth)])
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, POSE_DIM))
        self.embed_pose = nn.Linear(POSE_DIM, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, out_features=POSE_DIM)

    def forward(self, aggregated_tokens: Sequence[torch.Tensor], num_iterations: int = 4) -> list[torch.Tensor]:
        """The pose encoding (B, S, 9) after each refinement round; the last is the prediction."""
        tokens = self.token_norm(aggregated_tokens[-1][:, :, 0])  # the camera token of every frame
        b, s, _ = tokens.shape
        pred, preds = None, []
        for _ in range(num_iterations):
            # the previous estimate conditions the next round, without gradients through it
            prev = self.empty_pose_tokens.expand(b, s, -1) if pred is None else pred.detach()
            shift, scale, gate = self.poseLN_modulation(self.embed_pose(prev)).chunk(3, dim=-1)
            x = gate * (self.adaln_norm(tokens) * (1 + scale) + shift) + tokens
            delta = self.pose_branch(self.trunk_norm(self.trunk(x)))
            pred = delta if pred is None else pred + delta
            preds.append(activate_pose(pred))
        return preds


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the released model applies its first ReLU in place, so its skip connection carries relu(x)
        x = F.relu(x)
        return x + self.conv2(F.relu(self.conv1(x)))


class FeatureFusionBlock(nn.Module):
    """Adds the (refined) skip features, refines, upsamples bilinearly to ``size`` (x2 by default)."""

    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.has_residual = has_residual
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None, size=None) -> torch.Tensor:
        if self.has_residual:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            size = (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        return self.out_conv(x)


def uv_grid(width: int, height: int, aspect_ratio: float, dtype=None, device=None) -> torch.Tensor:
    """(height, width, 2) coordinates centred on 0, spanning the image's aspect ratio, normalised
    so the diagonal has length ~2 (pixel centres, so the edges sit half a step inside)."""
    diag = (aspect_ratio ** 2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diag, 1.0 / diag
    xs = torch.linspace(-span_x * (width - 1) / width, span_x * (width - 1) / width, width, dtype=dtype,
                        device=device)
    ys = torch.linspace(-span_y * (height - 1) / height, span_y * (height - 1) / height, height, dtype=dtype,
                        device=device)
    u, v = torch.meshgrid(xs, ys, indexing="xy")
    return torch.stack((u, v), dim=-1)


def sincos_embed(positions: torch.Tensor, dim: int, omega_0: float = 100.0) -> torch.Tensor:
    """sin/cos features (M, dim) of scalar positions (M,) at ``dim / 2`` geometric frequencies."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    angles = positions.reshape(-1).double()[:, None] * (1.0 / omega_0 ** omega)[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def grid_embedding(grid: torch.Tensor, dim: int) -> torch.Tensor:
    """(H, W, 2) grid -> (H, W, dim): half the channels for x, half for y."""
    h, w, _ = grid.shape
    flat = grid.reshape(-1, 2)
    return torch.cat([sincos_embed(flat[:, 0], dim // 2), sincos_embed(flat[:, 1], dim // 2)], dim=-1).view(h, w, dim)


class DPTHead(nn.Module):
    """Dense prediction from four aggregator layers (``intermediate_layer_idx``)."""

    def __init__(self, dim_in: int, patch_size: int = 14, output_dim: int = 4, activation: str = "inv_log",
                 conf_activation: str = "expp1", features: int = 256,
                 out_channels: Sequence[int] = (256, 512, 1024, 1024),
                 intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23), pos_embed: bool = True) -> None:
        super().__init__()
        if len(out_channels) != 4 or len(intermediate_layer_idx) != 4:
            raise ValueError("DPT head needs exactly 4 out_channels and 4 intermediate_layer_idx")
        self.patch_size = patch_size
        self.activation, self.conf_activation = activation, conf_activation
        self.pos_embed = pos_embed
        self.intermediate_layer_idx = list(intermediate_layer_idx)
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, oc, 1) for oc in out_channels)
        oc = list(out_channels)
        # the four layers go to 4x, 2x, 1x and 1/2x of the patch grid
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(oc[0], oc[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(oc[1], oc[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(oc[3], oc[3], kernel_size=3, stride=2, padding=1),
        ])
        self.scratch = nn.Module()
        for i, c in enumerate(oc, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(c, features, 3, padding=1, bias=False))
        self.scratch.refinenet1 = FeatureFusionBlock(features)
        self.scratch.refinenet2 = FeatureFusionBlock(features)
        self.scratch.refinenet3 = FeatureFusionBlock(features)
        self.scratch.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        self.scratch.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        self.scratch.output_conv2 = nn.Sequential(nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(),
                                                  nn.Conv2d(32, output_dim, 1))

    def _add_pos_embed(self, x: torch.Tensor, width: int, height: int, ratio: float = 0.1) -> torch.Tensor:
        grid = uv_grid(x.shape[-1], x.shape[-2], aspect_ratio=width / height, dtype=torch.float32, device=x.device)
        embed = grid_embedding(grid, x.shape[1]).to(x.dtype) * ratio
        return x + embed.permute(2, 0, 1)[None]

    def forward(self, aggregated_tokens: Sequence[torch.Tensor], images: torch.Tensor, patch_start_idx: int):
        """-> prediction (B, S, H, W, C), confidence (B, S, H, W)."""
        b, s, _, h, w = images.shape
        ph, pw = h // self.patch_size, w // self.patch_size
        feats = []
        for i, layer in enumerate(self.intermediate_layer_idx):
            x = aggregated_tokens[layer][:, :, patch_start_idx:]
            x = self.norm(x.reshape(b * s, -1, x.shape[-1]))
            x = x.permute(0, 2, 1).reshape(b * s, x.shape[-1], ph, pw)
            x = self.projects[i](x)
            if self.pos_embed:
                x = self._add_pos_embed(x, w, h)
            feats.append(self.resize_layers[i](x))
        sc = self.scratch
        l1, l2, l3, l4 = (getattr(sc, f"layer{i}_rn")(f) for i, f in enumerate(feats, start=1))
        out = sc.refinenet4(l4, size=l3.shape[2:])
        out = sc.refinenet3(out, l3, size=l2.shape[2:])
        out = sc.refinenet2(out, l2, size=l1.shape[2:])
        out = sc.output_conv1(sc.refinenet1(out, l1))
        out = F.interpolate(out, size=(ph * self.patch_size, pw * self.patch_size), mode="bilinear",
                            align_corners=True)
        if self.pos_embed:
            out = self._add_pos_embed(out, w, h)
        pred, conf = activate_dense(sc.output_conv2(out), self.activation, self.conf_activation)
        return pred.view(b, s, *pred.shape[1:]), conf.view(b, s, *conf.shape[1:])
