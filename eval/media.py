"""Videos and frame strips people look at: MP4 (imageio with imageio-ffmpeg's bundled ffmpeg), an
animated GIF beside it (plays anywhere, e.g. inline in a Markdown viewer), and PNG strips of frames
with one row per model.

Frames are float tensors (F, C, H, W) in [0, 1], C = 1 or 3; small frames are enlarged by whole
pixels (nearest) so that a 16 x 16 clip is still visible; MP4 frames get black borders up to a multiple of 16
(the codec's macro blocks).
"""
from __future__ import annotations

from pathlib import Path

import torch

#: frames are enlarged to about this many pixels on their longer side (whole-pixel factor)
DISPLAY_SIDE = 128


def _uint8_rgb(frames: torch.Tensor) -> "numpy.ndarray":  # noqa: F821
    """(F, C, H, W) in [0, 1] → (F, H*k, W*k, 3) uint8, k a whole enlargement factor."""
    frames = frames.detach().float().clamp(0, 1).cpu()
    if frames.shape[1] == 1:
        frames = frames.expand(-1, 3, -1, -1)
    k = max(1, DISPLAY_SIDE // max(frames.shape[-2:]))
    if k > 1:
        frames = frames.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)
    return (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _pad_to_macro_blocks(pixels: "numpy.ndarray", block: int = 16) -> "numpy.ndarray":  # noqa: F821
    """Black borders that bring (F, H, W, 3) frames to a multiple of ``block`` on both sides (centred):
    what H.264 players expect. Done here rather than by imageio, which would rescale the frames
    (blurring whole-pixel enlargements) and warn for every clip."""
    import numpy as np

    h, w = pixels.shape[1:3]
    dh, dw = -h % block, -w % block
    if not dh and not dw:
        return pixels
    return np.pad(pixels, ((0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2), (0, 0)))


def write_video(path: Path, frames: torch.Tensor, fps: int = 8) -> list[Path]:
    """``path``.mp4 and ``path``.gif of one clip; returns the files written."""
    import imageio.v2 as iio

    pixels = _uint8_rgb(frames)
    mp4, gif = Path(path).with_suffix(".mp4"), Path(path).with_suffix(".gif")
    iio.mimwrite(mp4, _pad_to_macro_blocks(pixels), fps=fps, codec="libx264", macro_block_size=16, quality=8,
                 ffmpeg_log_level="error")
    iio.mimwrite(gif, pixels, duration=1000 / fps, loop=0)
    return [mp4, gif]


def write_strip(path: Path, rows: list[tuple[str, torch.Tensor]], title: str) -> Path:
    """A PNG with one row of frames per (label, frames (F, C, H, W)), e.g. FP above quantized."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(frames) for _, frames in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 1.0 + 0.4), squeeze=False)
    for r, (label, frames) in enumerate(rows):
        for i in range(n):
            ax = axes[r][i]
            ax.set_xticks([]), ax.set_yticks([])
            if i < len(frames):
                img = frames[i].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
                ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            if r == 0:
                ax.set_title(f"t{i}", fontsize=6)
            if i == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
