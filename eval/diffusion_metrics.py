"""FP-relative fidelity of generated images and videos, per item (image or video), with torchmetrics.

A quantized model's sample is compared with the FP model's sample from the same class or prompt
and seed. Per item, so that items can be computed in different processes and merged exactly
(each item's value does not depend on which others are evaluated with it):

* ``psnr``: PSNR (data range 1) of each image, or of each video over all its frames together;
* ``frame_psnr``: videos: the mean over frames of each frame's PSNR;
* ``ssim``: SSIM of each image, or the mean over a video's frames;
* ``temporal_rmse``: videos: the RMS difference between the quantized and the FP video's
  frame-to-frame changes (x[t+1] - x[t]). Flicker that quantization adds shows up here, not in
  per-frame PSNR, which cannot tell a steady error from one that changes every frame.

Identical items have infinite PSNR; they count as ``PSNR_CAP`` dB so that one exact sample does not
make a mean infinite.
"""
from __future__ import annotations

import math

import torch

PSNR_CAP = 100.0


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    v = float(peak_signal_noise_ratio(a, b, data_range=1.0))
    return min(v, PSNR_CAP) if math.isfinite(v) else PSNR_CAP


def _ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of (N, C, H, W) images (the Gaussian window no larger than the image, odd)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    side = min(a.shape[-2:])
    kernel = min(11, side - (1 - side % 2))
    return float(structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=kernel))


def image_item_metrics(images: torch.Tensor, reference: torch.Tensor) -> list[dict[str, float]]:
    """Per image of (N, C, H, W) in [0, 1]: {"psnr", "ssim"} against ``reference``."""
    return [{"psnr": _psnr(a[None], b[None]), "ssim": _ssim(a[None], b[None])} for a, b in zip(images, reference)]


def video_item_metrics(videos: torch.Tensor, reference: torch.Tensor) -> list[dict[str, float]]:
    """Per video of (N, F, C, H, W) in [0, 1]: {"psnr", "frame_psnr", "ssim", "temporal_rmse"}."""
    rows = []
    for v, r in zip(videos.float(), reference.float()):
        frame_psnr = sum(_psnr(a[None], b[None]) for a, b in zip(v, r)) / len(v)
        change_error = (v[1:] - v[:-1]) - (r[1:] - r[:-1])
        temporal = float(change_error.square().mean().sqrt()) if len(v) > 1 else 0.0
        rows.append({"psnr": _psnr(v, r), "frame_psnr": frame_psnr, "ssim": _ssim(v, r), "temporal_rmse": temporal})
    return rows


