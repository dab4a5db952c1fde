"""Image preprocessing for VGGT, as its ``load_and_preprocess_images`` does it.

Two modes, for a target size ``T`` (518 for the released model) and a patch size ``P`` (14):

* ``"crop"`` (default): the width becomes ``T`` and the height keeps the aspect ratio, rounded to
  a multiple of ``P`` (``round(h * T / w / P) * P``); a height above ``T`` is centre-cropped to
  ``T``. Every image of a scene must come out the same shape, otherwise a ``ValueError`` names the
  first image that differs (scenes with images of different sizes are refused, never padded).
* ``"pad"``: the longer side becomes ``T``, the shorter one keeps the aspect ratio, rounded to a
  multiple of ``P``, and the image is padded with white (1.0), centred, to ``T x T``.

Resizing is bicubic: Pillow's ``BICUBIC`` for PIL images and file paths, and
``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` (clamped to [0, 1]) for
tensors. RGBA inputs are composited on white, grayscale ones repeated to RGB. The result is
(S, 3, H, W) in [0, 1]; ImageNet normalisation (``normalize``) is left to the model, as VGGT
applies it inside its aggregator.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODES",
    "normalize",
    "preprocess_images",
    "target_shape",
    "load_image",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = ("crop", "pad")

ImageLike = Union[torch.Tensor, Image.Image, str, os.PathLike]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalise images (..., 3, H, W) in [0, 1]: ``(x - mean) / std`` per channel."""
    if images.dim() < 3 or images.shape[-3] != 3:
        raise ValueError(f"normalize expects (..., 3, H, W) images, got {tuple(images.shape)}")
    dtype = images.dtype if images.is_floating_point() else torch.float32
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=dtype, device=images.device).view(3, 1, 1)
    return (images.to(dtype) - mean) / std


def _check_sizes(target_size: int, patch_size: int) -> None:
    if not isinstance(target_size, int) or not isinstance(patch_size, int):
        raise ValueError(f"target_size and patch_size must be ints, got {target_size!r}, {patch_size!r}")
    if patch_size <= 0 or target_size <= 0:
        raise ValueError(f"target_size and patch_size must be positive, got {target_size}, {patch_size}")
    if target_size % patch_size != 0:
        raise ValueError(f"target_size {target_size} is not a multiple of patch_size {patch_size}")


def _round_to_patch(length: float, patch_size: int) -> int:
    # Python's round (half to even), as VGGT's reference code uses it
    return int(round(length / patch_size)) * patch_size


def target_shape(
    height: int, width: int, mode: str = "crop", target_size: int = 518, patch_size: int = 14
) -> tuple[int, int]:
    """(H, W) an image of ``height x width`` is *resized* to (before any crop or pad)."""
    _check_sizes(target_size, patch_size)
    if mode == "crop":
        new_w = target_size
        new_h = _round_to_patch(height * (target_size / width), patch_size)
    elif mode == "pad":
        if width >= height:
            new_w = target_size
            new_h = _round_to_patch(height * (target_size / width), patch_size)
        else:
            new_h = target_size
            new_w = _round_to_patch(width * (target_size / height), patch_size)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if new_h <= 0 or new_w <= 0:
        raise ValueError(
            f"a {height}x{width} image is too elongated for target_size {target_size}: "
            f"it would resize to {new_h}x{new_w}"
        )
    return new_h, new_w


def _output_shape(resized_hw: tuple[int, int], mode: str, target_size: int) -> tuple[int, int]:
    new_h, new_w = resized_hw
    if mode == "pad":
        return target_size, target_size
    return min(new_h, target_size), new_w


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    """Composite anything with transparency on white, convert the rest to RGB."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as an RGB PIL image (transparency composited on white)."""
    with Image.open(path) as img:
        img.load()
        return _pil_to_rgb(img)


def _tensor_to_rgb(img: torch.Tensor, index: int) -> torch.Tensor:
    """(C, H, W) or (H, W) tensor -> float (3, H, W) in [0, 1]; RGBA composited on white."""
    if img.dim() == 2:
        img = img[None]
    if img.dim() != 3 or img.shape[0] not in (1, 3, 4):
        raise ValueError(
            f"image {index}: tensors must be (C, H, W) with C in (1, 3, 4) or (H, W), got {tuple(img.shape)}"
        )
    if img.dtype == torch.uint8:
        img = img.float() / 255.0
    elif not img.is_floating_point():
        raise ValueError(f"image {index}: tensors must be float in [0, 1] or uint8, got {img.dtype}")
    elif img.dtype not in (torch.float32, torch.float64):
        img = img.float()
    if img.shape[0] == 4:
        rgb, alpha = img[:3], img[3:4]
        img = rgb * alpha + (1.0 - alpha)
    elif img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    array = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _resize_tensor(img: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    if tuple(img.shape[-2:]) == tuple(size_hw):
        return img.clone()
    out = F.interpolate(img[None], size=size_hw, mode="bicubic", antialias=True, align_corners=False)[0]
    return out.clamp_(0.0, 1.0)


def _finish(img: torch.Tensor, mode: str, target_size: int) -> torch.Tensor:
    """Centre-crop (crop mode) or white-pad (pad mode) a resized (3, h, w) image."""
    h, w = img.shape[-2:]
    if mode == "crop":
        if h > target_size:
            top = (h - target_size) // 2
            img = img[:, top : top + target_size, :]
        return img
    pad_h, pad_w = target_size - h, target_size - w
    top, left = pad_h // 2, pad_w // 2
    return F.pad(img, (left, pad_w - left, top, pad_h - top), mode="constant", value=1.0)


def preprocess_images(
    images: Sequence[ImageLike] | torch.Tensor,
    mode: str = "crop",
    target_size: int = 518,
    patch_size: int = 14,
) -> torch.Tensor:
    """Load, resize and crop / pad the images of one scene for VGGT.

    Args:
        images: a sequence of (3, H, W) tensors in [0, 1] (uint8 tensors, (1, H, W) grayscale and
            (4, H, W) RGBA are accepted too), PIL images or file paths; or one (S, C, H, W) tensor.
        mode: ``"crop"`` or ``"pad"`` (see the module docstring).
        target_size: the output width (crop) or side (pad); a multiple of ``patch_size``.
        patch_size: the model's patch size; output sides are multiples of it.

    Returns:
        float32 (S, 3, H, W) in [0, 1] (float64 if every input was a float64 tensor).

    Raises:
        ValueError: on an unknown mode, a ``target_size`` that is not a multiple of
            ``patch_size``, no images, an unsupported image, or (crop mode) images whose
            preprocessed shapes differ.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_sizes(target_size, patch_size)
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"a tensor of images must be (S, C, H, W), got {tuple(images.shape)}")
        images = list(images.unbind(0))
    else:
        images = list(images)
    if not images:
        raise ValueError("preprocess_images needs at least one image")

    # load and convert to RGB, then plan every shape before any resizing
    loaded: list[torch.Tensor | Image.Image] = []
    for i, img in enumerate(images):
        if isinstance(img, (str, os.PathLike)):
            loaded.append(load_image(img))
        elif isinstance(img, Image.Image):
            loaded.append(_pil_to_rgb(img))
        elif isinstance(img, torch.Tensor):
            loaded.append(_tensor_to_rgb(img, i))
        else:
            raise ValueError(f"image {i}: expected a tensor, a PIL image or a path, got {type(img).__name__}")

    resized_shapes = []
    for img in loaded:
        h, w = (img.height, img.width) if isinstance(img, Image.Image) else tuple(img.shape[-2:])
        resized_shapes.append(((h, w), target_shape(h, w, mode, target_size, patch_size)))
    if mode == "crop":
        first = _output_shape(resized_shapes[0][1], mode, target_size)
        for i, ((h, w), resized) in enumerate(resized_shapes):
            out = _output_shape(resized, mode, target_size)
            if out != first:
                raise ValueError(
                    f"image {i} ({h}x{w}) preprocesses to {out[0]}x{out[1]} but image 0 to "
                    f"{first[0]}x{first[1]}: crop mode needs all images of a scene to have one shape"
                )

    outputs = []
    for img, (_, (new_h, new_w)) in zip(loaded, resized_shapes):
        if isinstance(img, Image.Image):
            tensor = _pil_to_tensor(img.resize((new_w, new_h), Image.Resampling.BICUBIC))
        else:
            tensor = _resize_tensor(img, (new_h, new_w))
        outputs.append(_finish(tensor, mode, target_size))
    dtype = torch.float64 if all(t.dtype == torch.float64 for t in outputs) else torch.float32
    return torch.stack([t.to(dtype) for t in outputs])
