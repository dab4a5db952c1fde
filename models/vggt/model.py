"""The VGGT model (aggregator + camera, depth and point heads) and the loader of its checkpoints.

A checkpoint is a folder (or the file itself) holding the official bare state dict ``model.pt``
(read with ``torch.load(weights_only=True)``: tensors only, no pickled code) or a
``model.safetensors`` with the same keys, and optionally a ``config.json`` giving sizes with the
official constructors' argument names. Absent keys take VGGT-1B's values::

    {"img_size": 518, "patch_size": 14, "embed_dim": 1024, "depth": 24, "num_heads": 16,
     "mlp_ratio": 4.0, "num_register_tokens": 4, "patch_embed": "dinov2_vitl14_reg",
     "camera_head": {"trunk_depth": 4, "num_heads": 16},
     "dpt_head": {"features": 256, "out_channels": [256, 512, 1024, 1024],
                  "intermediate_layer_idx": [4, 11, 17, 23]},
     "enable_camera": true, "enable_depth": true, "enable_point": true, "enable_track": true}

``dino_overrides`` (archquant's extension) shrinks the DINOv2 patch embedder for tiny models.

The track head is not implemented: its keys (``track_head.*``) are skipped with one logged note.
Any other unknown or missing key, or a tensor whose shape does not fit the sizes, is a one-line
``ValueError`` naming the key and the file.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from .aggregator import Aggregator
from .heads import CameraHead, DPTHead

log = logging.getLogger(__name__)

__all__ = ["VGGTConfig", "VGGT", "load_vggt", "read_state_dict", "CHECKPOINT_NAMES", "TRACK_PREFIX"]

CHECKPOINT_NAMES = ("model.safetensors", "model.pt")
TRACK_PREFIX = "track_head."


@dataclass
class VGGTConfig:
    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    patch_embed: str = "dinov2_vitl14_reg"
    dino_overrides: Optional[dict] = None
    camera_head: dict = field(default_factory=lambda: {"trunk_depth": 4, "num_heads": 16})
    dpt_head: dict = field(default_factory=lambda: {"features": 256, "out_channels": [256, 512, 1024, 1024],
                                                    "intermediate_layer_idx": [4, 11, 17, 23]})
    enable_camera: bool = True
    enable_depth: bool = True
    enable_point: bool = True
    #: the official model has a track head; ours does not, so its keys are skipped when loading
    enable_track: bool = True

    @classmethod
    def from_dict(cls, values: dict, where: str = "config.json") -> "VGGTConfig":
        if not isinstance(values, dict):
            raise ValueError(f"{where}: expected a JSON object of sizes")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(known))})")
        base = cls()
        merged = {**asdict(base), **values}
        for sub in ("camera_head", "dpt_head"):  # nested dicts merge key by key over the defaults
            given = values.get(sub) or {}
            if not isinstance(given, dict):
                raise ValueError(f"{where}: {sub!r} must be an object")
            allowed = {"camera_head": {"trunk_depth", "num_heads", "mlp_ratio"},
                       "dpt_head": {"features", "out_channels", "intermediate_layer_idx"}}[sub]
            bad = sorted(set(given) - allowed)
            if bad:
                raise ValueError(f"{where}: unknown key {sub}.{bad[0]!r} (allowed: {', '.join(sorted(allowed))})")
            merged[sub] = {**getattr(base, sub), **given}
        cfg = cls(**merged)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "config") -> None:
        for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_register_tokens"):
            v = getattr(self, key)
            if type(v) is not int or v < (0 if key == "num_register_tokens" else 1):
                raise ValueError(f"{where}: {key}={v!r} must be a positive integer")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"{where}: embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        idx = self.dpt_head["intermediate_layer_idx"]
        if len(idx) != 4 or any(type(i) is not int or not 0 <= i < self.depth for i in idx):
            raise ValueError(f"{where}: dpt_head.intermediate_layer_idx={idx!r} must be 4 layer indices "
                             f"below depth={self.depth}")
        if len(self.dpt_head["out_channels"]) != 4:
            raise ValueError(f"{where}: dpt_head.out_channels must have 4 entries")

    def to_dict(self) -> dict:
        return asdict(self)


class VGGT(nn.Module):
    """images (S, 3, H, W) or (B, S, 3, H, W) in [0, 1] -> dict with ``pose_enc`` (B, S, 9),
    ``pose_enc_list``, ``depth`` (B, S, H, W, 1), ``depth_conf`` (B, S, H, W), ``world_points``
    (B, S, H, W, 3), ``world_points_conf`` and ``images`` (heads that are disabled are absent)."""

    def __init__(self, config: VGGTConfig | None = None) -> None:
        super().__init__()
        cfg = config or VGGTConfig()
        cfg.validate()
        self.config = cfg
        self.aggregator = Aggregator(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                                     depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                                     num_register_tokens=cfg.num_register_tokens, patch_embed=cfg.patch_embed,
                                     dino_overrides=cfg.dino_overrides)
        dim = 2 * cfg.embed_dim  # every aggregator output is [frame, global] concatenated
        ch = cfg.camera_head
        self.camera_head = CameraHead(dim, trunk_depth=ch["trunk_depth"], num_heads=ch["num_heads"],
                                      mlp_ratio=ch.get("mlp_ratio", 4.0)) if cfg.enable_camera else None
        dpt = dict(patch_size=cfg.patch_size, features=cfg.dpt_head["features"],
                   out_channels=cfg.dpt_head["out_channels"],
                   intermediate_layer_idx=cfg.dpt_head["intermediate_layer_idx"])
        self.depth_head = DPTHead(dim, output_dim=2, activation="exp", **dpt) if cfg.enable_depth else None
        self.point_head = DPTHead(dim, output_dim=4, activation="inv_log", **dpt) if cfg.enable_point else None

    def forward(self, images: torch.Tensor, num_iterations: int = 4) -> dict[str, Any]:
        if images.dim() == 4:
            images = images.unsqueeze(0)
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"expected images (S, 3, H, W) or (B, S, 3, H, W), got {tuple(images.shape)}")
        tokens, patch_start = self.aggregator(images)
        out: dict[str, Any] = {}
        if self.camera_head is not None:
            poses = self.camera_head(tokens, num_iterations=num_iterations)
            out["pose_enc"], out["pose_enc_list"] = poses[-1], poses
        if self.depth_head is not None:
            out["depth"], out["depth_conf"] = self.depth_head(tokens, images, patch_start)
        if self.point_head is not None:
            out["world_points"], out["world_points_conf"] = self.point_head(tokens, images, patch_start)
        out["images"] = images
        return out


# --------------------------------------------------------------------------- loading


def _checkpoint_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"VGGT checkpoint {path}: no such file or folder")
    for name in CHECKPOINT_NAMES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"VGGT checkpoint folder {path}: no {' or '.join(CHECKPOINT_NAMES)} in it")


def read_config(folder: Path) -> VGGTConfig:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return VGGTConfig()
    try:
        values = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    return VGGTConfig.from_dict(values, where=str(cfg_path))


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``file``: safetensors, or a torch file read with ``weights_only=True`` (a
    pickle that holds anything but tensors and plain containers is refused by torch)."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        # no mmap: the model must not change if the file is rewritten while it is loaded
        sd = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign files: say which, not a traceback
        raise ValueError(f"{file}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160]})") \
            from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # training checkpoints wrap the state dict
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise ValueError(f"{file}: not a state dict of named tensors")
    return sd


def check_state_dict(model: VGGT, sd: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor]:
    """The keys ``model`` takes, after refusing foreign keys, missing keys and wrong shapes."""
    expected = model.state_dict()
    skipped = [k for k in sd if k.startswith(TRACK_PREFIX)]
    if skipped:
        log.info("%s: skipped %d track-head tensors (archquant does not implement VGGT's track head)",
                 file, len(skipped))
    kept = {k: v for k, v in sd.items() if not k.startswith(TRACK_PREFIX)}
    unexpected = sorted(set(kept) - set(expected))
    if unexpected:
        raise ValueError(f"{file}: unexpected key {unexpected[0]!r} (not a key of a VGGT model with these sizes; "
                         f"{len(unexpected)} such keys)")
    missing = sorted(set(expected) - set(kept))
    if missing:
        raise ValueError(f"{file}: missing key {missing[0]!r} ({len(missing)} missing)")
    for key, tensor in kept.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, but the sizes of config.json "
                             f"(or VGGT-1B's defaults) give {tuple(expected[key].shape)}")
    return kept


def load_vggt(path: str | Path, dtype: torch.dtype = torch.float32) -> VGGT:
    """A VGGT from a checkpoint folder (``model.pt`` or ``model.safetensors`` + optional
    ``config.json``) or a checkpoint file (its folder's ``config.json`` is used)."""
    path = Path(path).expanduser()
    file = _checkpoint_file(path)
    cfg = read_config(file.parent)
    sd = read_state_dict(file)
    with torch.device("meta"):
        model = VGGT(cfg)
    kept = check_state_dict(model, sd, file)
    model.load_state_dict({k: v.to(dtype) for k, v in kept.items()}, assign=True)
    # buffers that are not in the state dict (ImageNet statistics) were made on the meta device
    model.aggregator.reset_normalisation_buffers()
    return model.eval()
