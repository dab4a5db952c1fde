"""FVD against the FP model's videos (``fvd_vs_fp``, ViDiT-Q's "FVD-FP16"): the Fréchet distance between
the I3D features of a quantized model's clips and those of the FP model's clips from the same prompts
and seeds.

The feature network is the Inception-v1 I3D of Carreira & Zisserman (2017), trained on Kinetics-400,
whose 400 logits are the features FVD (Unterthiner et al., 2018) uses. Its weights are not bundled
and never downloaded mid-run: ``evaluation.options.fvd_network`` names a local state dict in the
layout of the widely used PyTorch port (module names ``Conv3d_1a_7x7``, ``Mixed_3b`` ... ``Mixed_5c``,
``logits``; e.g. its ``rgb_imagenet.pt``), as safetensors or as a ``torch.load(weights_only=True)``
file. Without one the metric is absent and the report says why.

Clips (F, C, H, W) in [0, 1] are resized to 224 x 224 (bilinear), given 3 channels and scaled to
[-1, 1]. Unlike the reference network's fixed 2 x 7 x 7 average pool (which needs at least 9 frames),
the last features are averaged over all remaining positions, so clips as short as one frame work;
on clips of 16 frames and more the two poolings are close but not equal, so compare FVD values only
between runs of this code. With N clips the covariance of 400 features has rank below N: FVD of a
few dozen clips ranks models but is far from its large-sample value.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from archquant.evaluation import Metric

__all__ = ["InceptionI3d", "FVDvsFP", "load_i3d", "METRICS", "FEATURES"]

FEATURES = 400  # Kinetics-400 logits
INPUT_SIDE = 224

METRICS = (
    Metric("fvd_vs_fp", lower_is_better=True, relative_to_fp=True,
           description="FVD (I3D logits) between the model's clips and the FP model's from the same prompts and seeds"),
)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding of one axis (front, back): the output has ceil(size / stride) positions."""
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    t, h, w = x.shape[-3:]
    pads = [_same_padding(n, k, s) for n, k, s in zip((t, h, w), kernel, stride)]
    return F.pad(x, (*pads[2], *pads[1], *pads[0]))  # F.pad: last axis first


class Unit3D(nn.Module):
    """Conv3d with "SAME" padding, then batch norm and ReLU (the logits layer: a biased conv alone)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple = 1, stride: int | tuple = 1,
                 batch_norm: bool = True, activation: bool = True) -> None:
        super().__init__()
        self.kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        self.stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, bias=not batch_norm)
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01) if batch_norm else None
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class MaxPool3dSame(nn.Module):
    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # zero padding is harmless: the inputs come out of a ReLU
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four branches concatenated: 1x1x1; 1x1x1 then 3x3x3; 1x1x1 then 3x3x3; max pool then 1x1x1."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.b0 = Unit3D(in_channels, widths[0])
        self.b1a, self.b1b = Unit3D(in_channels, widths[1]), Unit3D(widths[1], widths[2], 3)
        self.b2a, self.b2b = Unit3D(in_channels, widths[3]), Unit3D(widths[3], widths[4], 3)
        self.b3a, self.b3b = MaxPool3dSame((3, 3, 3), (1, 1, 1)), Unit3D(in_channels, widths[5])
        self.out_channels = widths[0] + widths[2] + widths[4] + widths[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


#: (name, in_channels, branch widths) of the inception modules, in order
_MIXED = (("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)), ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
          ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)), ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
          ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)), ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
          ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)), ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
          ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)))


class InceptionI3d(nn.Module):
    """The RGB I3D: (B, 3, T, H, W) in [-1, 1] → (B, 400) logits, averaged over the last positions."""

    def __init__(self, num_classes: int = FEATURES) -> None:
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, 7, (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, 3)
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        for name, in_channels, widths in _MIXED:
            setattr(self, name, InceptionModule(in_channels, widths))
            if name == "Mixed_3c":
                self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
            if name == "Mixed_4f":
                self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        self.logits = Unit3D(1024, num_classes, batch_norm=False, activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():  # registration order is the network's order
            if layer is self.logits:
                break
            x = layer(x)
        x = F.adaptive_avg_pool3d(x, 1)
        return self.logits(x).flatten(1)


def load_i3d(path: str | Path) -> InceptionI3d:
    """An ``InceptionI3d`` holding the state dict at ``path`` (safetensors, or a plain tensor file read
    with ``torch.load(weights_only=True)``); ValueError (one line, naming the file) otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"fvd_network {path} does not exist (an I3D state dict, .safetensors or .pt)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"fvd_network {path}: cannot read it as a state dict ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError(f"fvd_network {path}: holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = InceptionI3d()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(f"fvd_network {path} is not an InceptionI3d state dict: {len(missing)} missing "
                         f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise ValueError(f"fvd_network {path}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
                         f"I3D's is {tuple(expected[wrong[0]].shape)}")
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


class FVDvsFP:
    """``fvd_vs_fp`` for one run: built once (loading the network: bad input fails here), then
    ``evaluate`` per model, the FP model first (its features are kept)."""

    def __init__(self, network: str | Path | nn.Module, batch_size: int = 4,
                 device: str | torch.device | None = None) -> None:
        self.network = network if isinstance(network, nn.Module) else load_i3d(network)
        self.batch_size = int(batch_size)
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        self.network.to(self.device)
        self._fp: tuple[torch.Tensor, torch.Tensor] | None = None  # FP clips and their features

    @torch.no_grad()
    def features(self, videos: torch.Tensor) -> torch.Tensor:
        """(N, F, C, H, W) in [0, 1] → (N, 400) float64 I3D logits."""
        if videos.dim() != 5 or videos.shape[2] not in (1, 3):
            raise ValueError(f"expected videos (N, F, 1 or 3, H, W), got {tuple(videos.shape)}")
        out = []
        for chunk in videos.split(self.batch_size):
            n, f = chunk.shape[:2]
            frames = chunk.flatten(0, 1).float().clamp(0, 1).to(self.device)
            frames = frames.expand(-1, 3, -1, -1) if frames.shape[1] == 1 else frames
            frames = F.interpolate(frames, size=(INPUT_SIDE, INPUT_SIDE), mode="bilinear", align_corners=False)
            clips = (frames * 2 - 1).view(n, f, 3, INPUT_SIDE, INPUT_SIDE).transpose(1, 2)  # (N, 3, F, H, W)
            out.append(self.network(clips).double().cpu())
        return torch.cat(out)

    def evaluate(self, videos: torch.Tensor, fp_videos: torch.Tensor | None = None) -> tuple[dict, list[str]]:
        from .image_metrics import frechet_distance

        features = self.features(videos)
        if fp_videos is None:  # the FP model: keep its features for the quantized models
            self._fp = (videos, features)
            return {}, []
        if len(videos) < 2:
            return {}, ["fvd_vs_fp skipped: it needs at least 2 clips per model"]
        if self._fp is not None and self._fp[0].shape == fp_videos.shape and torch.equal(self._fp[0], fp_videos):
            fp_features = self._fp[1]
        else:
            fp_features = self.features(fp_videos)
        return {"fvd_vs_fp": frechet_distance(fp_features, features)}, []
