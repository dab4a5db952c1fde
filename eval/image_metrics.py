"""Optional image-quality metrics: FID, LPIPS and CLIP score, each computed when what it needs is
present, otherwise left out with a one-line note saying why (a skipped metric is absent, never faked).

* ``fid``: Fréchet distance of the images' Inception features (torchmetrics'
  ``FrechetInceptionDistance`` arithmetic, its Inception network from torch-fidelity) to those of
  a user-given folder of PNG/JPEG images (``fid_reference``). The folder's images are
  center-cropped to the generated images' aspect ratio and resized to their size (PIL bicubic), so
  both sets reach Inception at the same resolution, as reference batches for generative models are
  usually made.
* ``fid_vs_fp``: the same distance between a quantized model's images and the FP model's from the
  same seeds (needs ``min_fid_images`` images; no folder needed).
* ``lpips_vs_fp``: torchmetrics' LPIPS (``net_type`` from ``lpips``) against the FP model's image
  from the same seed, mean over images.
* ``clip_score``: torchmetrics' ``CLIPScore`` of the images against their prompts (text-to-image
  models only), CLIP loaded with transformers from a local folder or the hub id ``clip_model``:
  100 x the cosine of the image and text embeddings, averaged, then clamped at 0 (torchmetrics
  clamps the mean, not each image; with a real CLIP, image-prompt cosines are rarely negative).

Images are float tensors (N, C, H, W) in [0, 1], C = 1 (repeated to 3 channels) or 3.

One ``OptionalImageMetrics`` is built per run (its constructor lists the reference folder and decodes
each image once, raising ValueError, one line, on bad input) and ``evaluate`` is called for every model: first the FP model's
images (no ``fp_images``), then each quantized model's with the FP images. What is expensive is done
once and reused: the Inception and CLIP networks and LPIPS are loaded on first use (and a failed load
is not retried), the folder's features are computed once per image size, and the FP images'
features once (those of the call without ``fp_images`` are kept for it).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from archquant.evaluation import Metric

__all__ = ["OptionalImageMetrics", "ReferenceFolderError", "frechet_distance", "reference_images", "METRICS", "DEFAULT_CLIP_MODEL",
           "LPIPS_NETS", "IMAGE_SUFFIXES"]

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch16"
LPIPS_NETS = ("alex", "vgg", "squeeze")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: the file torch-fidelity downloads into torch.hub's checkpoint folder for torchmetrics' FID
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
#: the names FID notes use (one text for both metrics, so that the report shows it once)
_FID = "FID (fid, fid_vs_fp)"

METRICS = (
    Metric("fid", lower_is_better=True,
           description="FID against the fid_reference folder (Inception features, torchmetrics)"),
    Metric("fid_vs_fp", lower_is_better=True, relative_to_fp=True,
           description="FID between the model's images and the FP model's from the same seeds"),
    Metric("lpips_vs_fp", lower_is_better=True, relative_to_fp=True,
           description="LPIPS against the FP model's image from the same seed (mean)"),
    Metric("clip_score", lower_is_better=False,
           description="CLIP score of the images against their prompts (torchmetrics, mean then clamped at 0)"),
)


class OptionalImageMetrics:
    """FID / LPIPS / CLIP score for one run's models; see the module docstring.

    fid_reference: folder of reference PNG/JPEG images (searched recursively); None: no ``fid``.
    clip_model: local folder or hub id of a CLIP model (transformers ``CLIPModel`` + ``CLIPProcessor``);
        None: no ``clip_score``.
    lpips: LPIPS backbone, one of ``LPIPS_NETS``; None: no ``lpips_vs_fp``.
    fid_weights: a local copy of torch-fidelity's Inception weights (default: torch.hub's cache,
        downloaded there when online).
    feature_extractor: replaces Inception for FID: a module mapping float (N, 3, H, W) images in
        [0, 1] to (N, d) features (what the tests use; torch-fidelity is then not needed).
    min_fid_images: fewer generated images than this: no FID (torchmetrics needs at least 2).
    """

    def __init__(self, fid_reference: str | Path | None = None, clip_model: str | None = DEFAULT_CLIP_MODEL,
                 lpips: str | None = "alex", *, fid_weights: str | Path | None = None,
                 feature_extractor: nn.Module | None = None, min_fid_images: int = 2, batch_size: int = 32,
                 device: str | torch.device | None = None) -> None:
        if lpips is not None and lpips not in LPIPS_NETS:
            raise ValueError(f"lpips={lpips!r}: choose one of {', '.join(map(repr, LPIPS_NETS))} (or none)")
        if min_fid_images < 2:
            raise ValueError(f"min_fid_images={min_fid_images}: FID needs at least 2 images per set")
        if fid_reference in (None, ""):
            self.fid_reference = self.reference_files = None
        else:
            self.fid_reference = Path(fid_reference).expanduser()
            self.reference_files = reference_images(self.fid_reference)
        self.clip_model, self.lpips_net = clip_model or None, lpips
        self.fid_weights = None if fid_weights is None else str(Path(fid_weights).expanduser())
        self.min_fid_images, self.batch_size = int(min_fid_images), int(batch_size)
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        # loaded on first use: the object, or the note saying why it is not there
        self._extractor = feature_extractor
        self._extractor_note: str | None = None
        self._clip: object | None = None
        self._clip_note: str | None = None
        self._lpips: object | None = None
        self._lpips_note: str | None = None
        self._reference_fid: dict[tuple[int, int], object] = {}  # image size -> FID metric holding the folder
        self._fp: tuple[torch.Tensor, torch.Tensor] | None = None  # the FP images and their features
        self._fp_fid: tuple[torch.Tensor, object] | None = None  # the FP images and the FID metric holding them

    # ------------------------------------------------------------------ the one entry point

    def evaluate(self, images: torch.Tensor, fp_images: torch.Tensor | None = None,
                 prompts: Sequence[str] | None = None) -> tuple[dict[str, float], list[str]]:
        """Metrics of ``images`` (``fp_images``: the FP model's from the same seeds, None for the FP model
        itself; ``prompts``: one per image for text-to-image models) and the notes on those left out."""
        images = _rgb(images, "images")
        if fp_images is not None:
            fp_images = _rgb(fp_images, "fp_images")
            if fp_images.shape != images.shape:
                raise ValueError(f"fp_images {tuple(fp_images.shape)} do not match images {tuple(images.shape)}")
        if prompts is not None and len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        metrics: dict[str, float] = {}
        notes: list[str] = []
        self._fid(images, fp_images, metrics, notes)
        if fp_images is not None and self.lpips_net is not None:
            self._lpips_vs_fp(images, fp_images, metrics, notes)
        if prompts is not None and self.clip_model is not None:
            self._clip_score(images, list(prompts), metrics, notes)
        return metrics, notes

    # ------------------------------------------------------------------ FID

    def _fid(self, images: torch.Tensor, fp_images: torch.Tensor | None, metrics: dict, notes: list) -> None:
        wanted = []
        if self.reference_files is None:
            notes.append("fid skipped: no fid_reference folder given")
        else:
            wanted.append("fid")
        if fp_images is not None:
            wanted.append("fid_vs_fp")
        if not wanted:
            return
        if len(images) < self.min_fid_images:
            notes.append(f"{' and '.join(wanted)} skipped: {len(images)} generated image(s), FID needs at least "
                         f"{self.min_fid_images}")
            return
        if self._feature_extractor() is None:
            notes.append(f"{_FID} skipped: {self._extractor_note}")
            return
        known = self._fp is not None and _same(self._fp[0], images)
        features = self._fp[1] if known else _guarded(_FID, lambda: self._features(images), notes)
        if features is None:
            return
        if fp_images is None:  # the FP model's images: kept for the quantized models' fid_vs_fp
            self._fp = (images, features)
        if "fid" in wanted:
            _put(metrics, "fid", _guarded("fid", lambda: _frechet(self._reference_metric(images), features), notes))
        if "fid_vs_fp" in wanted:
            _put(metrics, "fid_vs_fp", _guarded("fid_vs_fp", lambda: _frechet(self._fp_metric(fp_images), features),
                                                notes))

    def _feature_extractor(self) -> nn.Module | None:
        if self._extractor is None and self._extractor_note is None:
            self._extractor, self._extractor_note = _load_inception(self.fid_weights)
        if self._extractor is not None:
            self._extractor = self._extractor.to(self.device).eval()
        return self._extractor

    @torch.inference_mode()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, d) float64 features of float RGB images in [0, 1], on the CPU."""
        out = []
        for i in range(0, len(images), self.batch_size):
            f = self._extractor(images[i:i + self.batch_size].to(self.device))
            out.append((f.unsqueeze(0) if f.dim() == 1 else f.reshape(f.shape[0], -1)).double().cpu())
        return torch.cat(out)

    def _reference_metric(self, images: torch.Tensor):
        """The FID metric whose real side holds the reference folder's images at the size of ``images``
        (read and featurized once per size)."""
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if size not in self._reference_fid:
            metric, files = None, self.reference_files
            for i in range(0, len(files), self.batch_size):
                batch = torch.stack([_read_image(p, size, self.fid_reference) for p in files[i:i + self.batch_size]])
                features = self._features(batch)
                metric = metric if metric is not None else _fid_metric(None, features.shape[1])
                metric.update(features, real=True)
            self._reference_fid[size] = metric
        return self._reference_fid[size]

    def _fp_metric(self, fp_images: torch.Tensor):
        """The FID metric whose real side holds the FP images (featurized once: by the FP model's call)."""
        if self._fp_fid is None or not _same(self._fp_fid[0], fp_images):
            known = self._fp is not None and _same(self._fp[0], fp_images)
            self._fp_fid = (fp_images, _fid_metric(self._fp[1] if known else self._features(fp_images)))
        return self._fp_fid[1]

    # ------------------------------------------------------------------ LPIPS

    def _lpips_vs_fp(self, images: torch.Tensor, fp_images: torch.Tensor, metrics: dict, notes: list) -> None:
        if self._lpips is None and self._lpips_note is None:
            try:
                from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

                self._lpips = LearnedPerceptualImagePatchSimilarity(net_type=self.lpips_net, normalize=True)
            except Exception as e:  # torchvision missing, its backbone weights not downloadable, ...
                self._lpips_note = f"LPIPS ({self.lpips_net}) could not be loaded: {_one_line(e)}"
        if self._lpips is None:
            notes.append(f"lpips_vs_fp skipped: {self._lpips_note}")
            return
        lpips = self._lpips.to(self.device)

        @torch.inference_mode()
        def compute() -> float:
            lpips.reset()
            for i in range(0, len(images), self.batch_size):
                lpips.update(images[i:i + self.batch_size].to(self.device),
                             fp_images[i:i + self.batch_size].to(self.device))
            return float(lpips.compute())

        _put(metrics, "lpips_vs_fp", _guarded("lpips_vs_fp", compute, notes))

    # ------------------------------------------------------------------ CLIP score

    def _clip_score(self, images: torch.Tensor, prompts: list[str], metrics: dict, notes: list) -> None:
        if self._clip is None and self._clip_note is None:
            self._clip, self._clip_note = _load_clip_score(self.clip_model)
        if self._clip is None:
            notes.append(f"clip_score skipped: {self._clip_note}")
            return
        clip = self._clip.to(self.device)
        pixels = (images * 255).round().to(torch.uint8)  # what CLIP's image processor expects

        @torch.inference_mode()
        def compute() -> float:
            clip.reset()
            for i in range(0, len(images), self.batch_size):
                clip.update(pixels[i:i + self.batch_size].to(self.device), prompts[i:i + self.batch_size])
            return float(clip.compute())

        _put(metrics, "clip_score", _guarded("clip_score", compute, notes))


# ---------------------------------------------------------------------- the reference folder

def reference_images(folder: str | Path) -> list[Path]:
    """The PNG/JPEG files under ``folder`` (sorted), each checked to decode; ValueError (one line,
    naming the folder) when the folder is missing, holds fewer than 2 images, or one cannot be read."""
    from PIL import Image

    root = Path(folder).expanduser()
    if not root.exists():
        raise ReferenceFolderError(f"fid_reference folder {root} does not exist")
    if not root.is_dir():
        raise ReferenceFolderError(f"fid_reference {root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise ReferenceFolderError(f"fid_reference folder {root} holds {len(files)} PNG/JPEG image(s): FID needs "
                                   f"at least 2")
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            raise ReferenceFolderError(f"fid_reference folder {root}: cannot read {path.relative_to(root)} "
                                       f"({_one_line(e)})") from None
    return files


def _read_image(path: Path, size: tuple[int, int], root: Path) -> torch.Tensor:
    """One reference image as float RGB (3, H, W) in [0, 1]: the largest centered crop with the
    aspect ratio of ``size``, resized to it (bicubic)."""
    import numpy as np
    from PIL import Image

    h, w = size
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except Exception as e:
        raise ReferenceFolderError(f"fid_reference folder {root}: cannot read {path.relative_to(root)} "
                                   f"({_one_line(e)})") from None
    width, height = im.size
    if width * h > height * w:  # too wide: crop the sides
        cw = max(1, round(height * w / h))
        box = ((width - cw) // 2, 0, (width - cw) // 2 + cw, height)
    else:
        ch = max(1, round(width * h / w))
        box = (0, (height - ch) // 2, width, (height - ch) // 2 + ch)
    im = im.resize((w, h), Image.BICUBIC, box=box)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


# ---------------------------------------------------------------------- loaders (each: object or note)

def _torch_fidelity_installed() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


class _Inception(nn.Module):
    """torchmetrics' Inception v3 (torch-fidelity's FID weights), fed as ``FrechetInceptionDistance(
    normalize=True)`` feeds it: [0, 1] floats to uint8 (it resizes to 299 x 299 itself)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images * 255).byte())


def _load_inception(weights: str | None) -> tuple[nn.Module | None, str | None]:
    if not _torch_fidelity_installed():
        return None, ("torchmetrics' FID needs the torch-fidelity package for its Inception network: "
                      "pip install torch-fidelity (it needs a torchvision built for this torch)")
    try:
        from torchmetrics.image import fid as tm_fid
    except Exception as e:  # e.g. torch-fidelity installed but its torchvision does not load
        return None, f"torchmetrics' FID cannot be imported: {_one_line(e)}"
    try:
        net = tm_fid.NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                        feature_extractor_weights_path=weights)
    except Exception as e:
        where = weights or str(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS)
        return None, (f"torch-fidelity's Inception weights could not be loaded from {where} "
                      f"({type(e).__name__}: {_one_line(e)}); download {INCEPTION_WEIGHTS} from torch-fidelity's "
                      f"v0.2.0 release there, or give its path as fid_weights")
    return _Inception(net), None


class _Embeddings(nn.Module):
    """A CLIPModel whose ``get_*_features`` return the embedding tensor, as torchmetrics' CLIPScore
    expects (transformers >= 5 returns a model output whose ``pooler_output`` holds it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.model.get_text_features(*args, **kwargs))


def _tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _load_clip_score(name: str) -> tuple[object | None, str | None]:
    """torchmetrics' CLIPScore over the CLIP model ``name`` (a local folder, or a hub id found in the
    Hugging Face cache; nothing is downloaded)."""
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor
    except Exception as e:
        return None, f"CLIP score cannot be imported: {_one_line(e)}"
    path = Path(name).expanduser()
    kwargs: dict = {}
    what = "could not be loaded"
    if path.is_dir():
        source = str(path)
    elif name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return None, f"clip_model folder {path} does not exist"
    else:
        from huggingface_hub import constants, try_to_load_from_cache

        source = name
        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            # "when its weights are present": never a download in the middle of an evaluation
            return None, (f"CLIP model {name!r} is not in the Hugging Face cache: download it once "
                          f"(huggingface-cli download {name}), or give clip_model a local folder")
        kwargs["local_files_only"] = True  # no network access at all
    try:
        model = CLIPModel.from_pretrained(source, **kwargs).eval()
        processor = CLIPProcessor.from_pretrained(source, **kwargs)
        return CLIPScore(model_name_or_path=lambda: (_Embeddings(model), processor)), None
    except Exception as e:
        return None, f"CLIP model {name!r} {what} ({type(e).__name__}: {_one_line(e)})"


# ---------------------------------------------------------------------- small helpers

class _Given(nn.Module):
    """The FID metric's feature network when the features are computed beforehand: the identity."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _fid_metric(real: torch.Tensor | None, num_features: int | None = None):
    """torchmetrics' FrechetInceptionDistance over given features; ``real`` fills (and keeps) its real side."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    d = int(real.shape[1]) if real is not None else int(num_features)
    metric = FrechetInceptionDistance(feature=_Given(d), reset_real_features=False, normalize=True)
    if real is not None:
        metric.update(real, real=True)
    return metric


def frechet_distance(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """The Fréchet distance between two sets of (N, d) features (torchmetrics' FID arithmetic, float64)."""
    return _frechet(_fid_metric(real_features.double()), fake_features.double())


def _frechet(metric, fake: torch.Tensor) -> float:
    metric.reset()  # the fake side only: reset_real_features=False
    metric.update(fake, real=False)
    return float(metric.compute())


class ReferenceFolderError(ValueError):
    """The fid_reference folder is bad input (a ValueError: the caller's user error, not a skipped metric)."""


def _guarded(name: str, compute, notes: list):
    """compute(), or None and a note when it fails: an optional metric never stops a run, nor is made up
    (except for a bad reference folder, which is the user's input)."""
    try:
        return compute()
    except ReferenceFolderError:
        raise
    except Exception as e:
        notes.append(f"{name} failed: {type(e).__name__}: {_one_line(e)}")
        return None


def _put(metrics: dict, name: str, value: float | None) -> None:
    if value is not None:
        metrics[name] = value


def _rgb(images: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{what}: expected float images (N, 1 or 3, H, W) in [0, 1], got {shape}")
    images = images.float().clamp(0, 1)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and torch.equal(a, b.to(a.device)))


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"
