"""Real-dataset loaders for multi-view 3D reconstruction evaluation (the VGGT family).

For users who already have the data sets on disk; nothing is downloaded. Each loader returns a
list of scene dicts (``iter_*`` variants yield them one at a time, to bound memory), with the keys
and conventions of the synthetic scenes (``archquant.models.synthetic_scenes.Scene``):

* ``name``: str, ``"{category}/{sequence}"`` (Co3D) or ``"{scene}/{seq-XX}"`` (7-Scenes);
* ``frame_ids``: list of str, the frames used, in the order of the tensors (Co3D: the annotation's
  ``filepath``; 7-Scenes: ``"frame-000040"``);
* ``images``: float32 (S, 3, H, W) in [0, 1];
* ``extrinsics``: float32 (S, 3, 4) OpenCV camera-from-world ``[R|t]``, ``x_cam = R x_world + t``
  (camera looks along +z, x right, y down);
* ``intrinsics``: float32 (S, 3, 3) pinhole matrix in pixels *of the returned image*, with pixel
  (row v, column u) centred at (u, v) (integer pixel centres, as in the synthetic scenes);
* ``depth``: float32 (S, H, W) camera z-depth in metres, 0 where invalid, or None;
* ``valid``: bool (S, H, W) or None;
* ``world_points``: float32 (S, H, W, 3), the depth unprojected with the cameras (0 where invalid),
  or None.

Every frame of a scene is resized as VGGT's ``load_and_preprocess_images`` does in crop mode
(``archquant.models.vggt.preprocess``): width ``image_size``, height rounded to a multiple of
``patch_size``, centre-cropped to ``image_size`` if taller. The intrinsics follow the resize and
the crop exactly; depth and validity are resized nearest-neighbour (interpolating depth would
invent points floating between a foreground edge and the background).

Co3Dv2 (``load_co3d``), in the layout of VGGT's evaluation (facebookresearch/vggt,
``evaluation/test_co3d.py``) and of the PoseDiffusion / RelPose++ annotation preprocessing::

    {co3d_dir}/{filepath}                  e.g. apple/110_13051_23361/images/frame000001.jpg
    {anno_dir}/{category}_{split}.jgz      gzip-compressed JSON:
        {sequence_name: [{"filepath", "R", "T", "focal_length", "principal_point", ...}, ...]}

``R``, ``T`` are PyTorch3D's row-vector world-to-view transform (``X_view = X_world @ R + T``,
view axes x left, y up, z forward). ``focal_length`` and ``principal_point`` are in PyTorch3D NDC;
CO3Dv2 stores them in the ``"ndc_isotropic"`` format (the shorter image side spans [-1, 1], both
axes share the scale ``min(H, W) / 2``), which is what is assumed unless a frame carries an
``"intrinsics_format"`` of ``"ndc_norm_image_bounds"`` (each side spans [-1, 1]). PyTorch3D's
screen space has the image borders at NDC +-1, i.e. pixel centres at half-integers; the loader
subtracts half a pixel to reach the integer-centre convention above. Co3D has no depth here.
Sequences with fewer than ``min_frames`` frames (VGGT: 50) or with an absurd translation (VGGT:
``T[0] + T[1] + T[2] > 1e5``) are skipped; ``num_frames`` frames are drawn per sequence with a
generator seeded from ``seed``, the category and the sequence name, so a sequence's frames do not
depend on which other sequences are loaded. The drawn order is kept (VGGT's first frame is the
reference view), as in VGGT's evaluation.

7-Scenes (``load_seven_scenes``), the original Microsoft layout::

    {root}/{scene}/seq-XX/frame-XXXXXX.color.png   RGB, 640x480
    {root}/{scene}/seq-XX/frame-XXXXXX.depth.png   uint16 millimetres, 65535 (and 0) = invalid
    {root}/{scene}/seq-XX/frame-XXXXXX.pose.txt    4x4 camera-to-world matrix, text

The intrinsics are the depth camera's calibration that the usual evaluation uses, fx = fy = 585
and principal point (320, 240), for the 640x480 images (others are refused). Note that the colour
and depth cameras of 7-Scenes are not registered; like the usual evaluation, this loader ignores
that. Frames are every ``stride``-th colour frame of a sequence, the first ``num_frames`` of them.

Errors are ``FileNotFoundError`` (something missing) or ``ValueError`` (something malformed), each
a single line that names the culprit path. Annotations are read as JSON only (never unpickled).
"""
from __future__ import annotations

import gzip
import json
import math
import os
import random
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from archquant.models.vggt.preprocess import preprocess_images, target_shape

__all__ = [
    "SEVEN_SCENES_FOCAL",
    "SEVEN_SCENES_PRINCIPAL_POINT",
    "SEVEN_SCENES_SIZE_WH",
    "iter_co3d",
    "iter_seven_scenes",
    "load_co3d",
    "load_seven_scenes",
    "ndc_to_pixel_intrinsics",
    "pytorch3d_to_opencv_extrinsics",
    "resize_intrinsics",
    "unproject_depth",
]

PathLike = str | os.PathLike

# --- Co3D protocol constants (VGGT evaluation/test_co3d.py)
#: a sequence with a frame whose T[0] + T[1] + T[2] exceeds this is skipped, as VGGT does
CO3D_ABSURD_TRANSLATION = 1e5
_CO3D_FRAME_KEYS = ("filepath", "R", "T", "focal_length", "principal_point")
_CO3D_FRAME_SHAPES = {"R": (3, 3), "T": (3,), "focal_length": (2,), "principal_point": (2,)}
_NDC_FORMATS = ("ndc_isotropic", "ndc_norm_image_bounds")

# --- 7-Scenes constants (the data set's published depth-camera calibration)
SEVEN_SCENES_FOCAL = 585.0
SEVEN_SCENES_PRINCIPAL_POINT = (320.0, 240.0)
SEVEN_SCENES_SIZE_WH = (640, 480)
_SEVEN_SCENES_INVALID_DEPTH = (0, 65535)
_SEQUENCE_DIR = re.compile(r"^seq-\d+$")
_COLOR_SUFFIX = ".color.png"


# --------------------------------------------------------------------------- camera conversions


def pytorch3d_to_opencv_extrinsics(rotation: Sequence, translation: Sequence) -> np.ndarray:
    """PyTorch3D world-to-view (R, T) -> OpenCV camera-from-world [R|t], float64 (3, 4).

    PyTorch3D multiplies row vectors from the right (``X_view = X_world @ R + T``) and its view
    axes point left and up, OpenCV's right and down; so the OpenCV rotation is ``F @ R.T`` and the
    translation ``F @ T`` with ``F = diag(-1, -1, 1)``.
    """
    rotation = np.asarray(rotation, dtype=np.float64).reshape(3, 3)
    translation = np.asarray(translation, dtype=np.float64).reshape(3)
    flip = np.array([-1.0, -1.0, 1.0])
    return np.concatenate([flip[:, None] * rotation.T, (flip * translation)[:, None]], axis=1)


def ndc_to_pixel_intrinsics(
    focal_length: Sequence[float],
    principal_point: Sequence[float],
    height: int,
    width: int,
    intrinsics_format: str = "ndc_isotropic",
) -> np.ndarray:
    """PyTorch3D NDC focal length / principal point -> pixel intrinsics (3, 3), float64, of an
    image ``height x width``, with integer pixel centres.

    NDC x points left and y up, so the principal point's signs flip. PyTorch3D maps NDC +-1 to
    the image *borders* (its screen space has pixel centres at half-integers), hence the -0.5.
    """
    if intrinsics_format == "ndc_isotropic":
        scale_x = scale_y = min(height, width) / 2.0
    elif intrinsics_format == "ndc_norm_image_bounds":
        scale_x, scale_y = width / 2.0, height / 2.0
    else:
        raise ValueError(f"unknown NDC intrinsics format {intrinsics_format!r}, expected one of {_NDC_FORMATS}")
    fx, fy = float(focal_length[0]) * scale_x, float(focal_length[1]) * scale_y
    cx = width / 2.0 - float(principal_point[0]) * scale_x - 0.5
    cy = height / 2.0 - float(principal_point[1]) * scale_y - 0.5
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class _ResizePlan:
    """How one ``height x width`` image becomes a ``out_h x out_w`` one in VGGT's crop mode:
    resized to ``resized_h x resized_w``, then rows ``top : top + out_h`` kept."""

    height: int
    width: int
    resized_h: int
    resized_w: int
    top: int
    out_h: int
    out_w: int


def _plan_resize(height: int, width: int, image_size: int, patch_size: int) -> _ResizePlan:
    resized_h, resized_w = target_shape(height, width, "crop", image_size, patch_size)
    # the same centre crop as preprocess._finish: only a height above image_size is cropped
    top = (resized_h - image_size) // 2 if resized_h > image_size else 0
    out_h = min(resized_h, image_size)
    return _ResizePlan(height, width, resized_h, resized_w, top, out_h, resized_w)


def _resize_intrinsics_with_plan(intrinsics: np.ndarray, plan: _ResizePlan) -> np.ndarray:
    # A resize maps pixel edges to pixel edges: with integer pixel centres, u' + 0.5 = s (u + 0.5).
    scale_x = plan.resized_w / plan.width
    scale_y = plan.resized_h / plan.height
    out = np.array(intrinsics, dtype=np.float64, copy=True)
    out[0, :] *= scale_x
    out[1, :] *= scale_y
    out[0, 2] += 0.5 * scale_x - 0.5
    out[1, 2] += 0.5 * scale_y - 0.5 - plan.top
    return out


def resize_intrinsics(
    intrinsics: np.ndarray, original_hw: tuple[int, int], image_size: int = 518, patch_size: int = 14
) -> np.ndarray:
    """Intrinsics (3, 3) of a ``original_hw`` image -> those of the image that VGGT's crop-mode
    preprocessing (``preprocess_images(..., mode="crop")``) makes of it, float64."""
    return _resize_intrinsics_with_plan(intrinsics, _plan_resize(*original_hw, image_size, patch_size))


def _resize_nearest(array: np.ndarray, plan: _ResizePlan) -> np.ndarray:
    """Nearest-neighbour resize and crop of an (H, W) map: each output pixel takes the source
    pixel whose area holds the output pixel's centre (the same centre mapping as the images)."""
    rows = np.floor((np.arange(plan.resized_h) + 0.5) * plan.height / plan.resized_h).astype(np.int64)
    cols = np.floor((np.arange(plan.resized_w) + 0.5) * plan.width / plan.resized_w).astype(np.int64)
    rows = np.clip(rows, 0, plan.height - 1)[plan.top : plan.top + plan.out_h]
    cols = np.clip(cols, 0, plan.width - 1)
    return array[np.ix_(rows, cols)]


def unproject_depth(depth: torch.Tensor, intrinsics: torch.Tensor, extrinsics: torch.Tensor) -> torch.Tensor:
    """World points (S, H, W, 3) of z-depth maps (S, H, W) seen by OpenCV cameras (intrinsics
    (S, 3, 3), camera-from-world extrinsics (S, 3, 4)); computed in float64, returned float32."""
    depth64 = depth.to(torch.float64)
    num, height, width = depth64.shape
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                          torch.arange(width, dtype=torch.float64), indexing="ij")
    pixels = torch.stack([u, v, torch.ones_like(u)], dim=-1)  # (H, W, 3)
    rays = torch.einsum("sij,hwj->shwi", torch.linalg.inv(intrinsics.to(torch.float64)), pixels)
    cam_points = rays * depth64[..., None]
    homogeneous = torch.zeros(num, 4, 4, dtype=torch.float64)
    homogeneous[:, :3, :] = extrinsics.to(torch.float64)
    homogeneous[:, 3, 3] = 1.0
    # the exact inverse, so a pose that is not perfectly orthonormal still round-trips
    world_from_camera = torch.linalg.inv(homogeneous)
    world = torch.einsum("sij,shwj->shwi", world_from_camera[:, :3, :3], cam_points)
    return (world + world_from_camera[:, None, None, :3, 3]).to(torch.float32)


# --------------------------------------------------------------------------- scene assembly


def _image_hw(path: Path) -> tuple[int, int]:
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            width, height = img.size
    except OSError as err:
        raise ValueError(f"unreadable image file {path}: {err}".replace("\n", " ")) from err
    return height, width


def _plans_for(name: str, paths: Sequence[Path], sizes: Sequence[tuple[int, int]],
               image_size: int, patch_size: int) -> list[_ResizePlan]:
    plans = [_plan_resize(h, w, image_size, patch_size) for h, w in sizes]
    first = (plans[0].out_h, plans[0].out_w)
    for path, plan in zip(paths, plans, strict=True):
        if (plan.out_h, plan.out_w) != first:
            raise ValueError(
                f"scene {name}: {path} preprocesses to {plan.out_h}x{plan.out_w} but {paths[0]} to "
                f"{first[0]}x{first[1]}; all frames of a scene must come out one size"
            )
    return plans


def _assemble_scene(
    name: str,
    frame_ids: list[str],
    image_paths: list[Path],
    sizes: list[tuple[int, int]],
    extrinsics: np.ndarray,
    intrinsics: np.ndarray,
    image_size: int,
    patch_size: int,
    depths: list[np.ndarray] | None = None,
    valids: list[np.ndarray] | None = None,
) -> dict:
    """Resize the frames of one scene and package them. ``sizes`` (H, W) and ``intrinsics``
    (S, 3, 3) are those of the original images; ``depths`` / ``valids`` (original size, metres /
    bool) are optional."""
    plans = _plans_for(name, image_paths, sizes, image_size, patch_size)
    images = preprocess_images([str(p) for p in image_paths], mode="crop",
                               target_size=image_size, patch_size=patch_size).to(torch.float32)
    # our plan must be the one preprocess_images followed, or the intrinsics would not match
    assert tuple(images.shape[-2:]) == (plans[0].out_h, plans[0].out_w), (images.shape, plans[0])
    new_intrinsics = np.stack([_resize_intrinsics_with_plan(k, p) for k, p in zip(intrinsics, plans, strict=True)])
    scene = {
        "name": name,
        "frame_ids": list(frame_ids),
        "images": images,
        "extrinsics": torch.from_numpy(np.asarray(extrinsics, dtype=np.float32).copy()),
        "intrinsics": torch.from_numpy(new_intrinsics.astype(np.float32)),
        "depth": None,
        "valid": None,
        "world_points": None,
    }
    if depths is not None:
        valid = np.stack([_resize_nearest(m, p) for m, p in zip(valids, plans, strict=True)])
        depth = np.stack([_resize_nearest(d, p) for d, p in zip(depths, plans, strict=True)])
        depth = np.where(valid, depth, 0.0)
        scene["depth"] = torch.from_numpy(depth.astype(np.float32))
        scene["valid"] = torch.from_numpy(valid.astype(bool))
        # unproject from the float64 cameras so float32 rounding of K and [R|t] does not add up
        points = unproject_depth(torch.from_numpy(depth), torch.from_numpy(new_intrinsics),
                                 torch.from_numpy(np.asarray(extrinsics, dtype=np.float64)))
        scene["world_points"] = torch.where(scene["valid"][..., None], points, torch.zeros(()))
    return scene


# --------------------------------------------------------------------------- deterministic draws


def _draw_without_replacement(rng: random.Random, population: int, count: int) -> list[int]:
    """``count`` distinct indices from ``range(population)`` in draw order: a partial
    Fisher-Yates shuffle on ``rng.random()`` only, whose stream Python keeps stable across
    versions (``sample`` / ``randrange`` have changed algorithms before)."""
    indices = list(range(population))
    for i in range(count):
        j = i + min(int(rng.random() * (population - i)), population - i - 1)
        indices[i], indices[j] = indices[j], indices[i]
    return indices[:count]


def _seeded_rng(seed: int, *labels: str) -> random.Random:
    # str seeds hash with SHA-512 (not hash()), so this is stable across processes and versions
    return random.Random("/".join([str(seed), *labels]))


# --------------------------------------------------------------------------- Co3D


def _read_jgz(path: Path) -> dict:
    try:
        with gzip.open(path, "rb") as fin:
            annotation = json.loads(fin.read().decode("utf-8"))
    except (OSError, EOFError, zlib.error, ValueError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"corrupt Co3D annotation file {path}: {err}".replace("\n", " ")) from err
    if not isinstance(annotation, dict):
        raise ValueError(f"corrupt Co3D annotation file {path}: expected a JSON object of sequences, "
                         f"got {type(annotation).__name__}")
    return annotation


def _has_shape(value: object, shape: tuple[int, ...]) -> bool:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return array.shape == shape and bool(np.isfinite(array).all())


def _frame_problem(frame: object) -> str | None:
    """What is wrong with one annotated frame, or None."""
    if not isinstance(frame, dict):
        return "is not a JSON object"
    missing = [k for k in _CO3D_FRAME_KEYS if k not in frame]
    if missing:
        return f"lacks {', '.join(missing)}"
    for key, shape in _CO3D_FRAME_SHAPES.items():
        if not _has_shape(frame[key], shape):
            return f"has a malformed {key} (expected {shape} finite numbers)"
    if frame.get("intrinsics_format", "ndc_isotropic") not in _NDC_FORMATS:
        return f"has an unknown intrinsics_format {frame['intrinsics_format']!r}"
    return None


def _check_co3d_frames(path: Path, sequence: str, frames: object) -> list[dict]:
    if not isinstance(frames, list):
        raise ValueError(f"corrupt Co3D annotation file {path}: sequence {sequence} is not a list of frames")
    for index, frame in enumerate(frames):
        problem = _frame_problem(frame)
        if problem:
            raise ValueError(f"corrupt Co3D annotation file {path}: sequence {sequence} frame {index} {problem}")
    return frames


def _co3d_annotation_files(anno_dir: Path, categories: Sequence[str] | None, split: str) -> dict[str, Path]:
    suffix = f"_{split}.jgz"
    if categories is None:
        files = sorted(anno_dir.glob(f"*{suffix}"))
        if not files:
            raise ValueError(f"Co3D folder without annotations: {anno_dir} has no files matching '*{suffix}'")
        return {f.name[: -len(suffix)]: f for f in files}
    found = {}
    for category in categories:
        path = anno_dir / f"{category}{suffix}"
        if not path.is_file():
            raise FileNotFoundError(f"Co3D annotation file not found: {path}")
        found[category] = path
    return found


def _usable_sequence(frames: list[dict], min_frames: int) -> bool:
    if len(frames) < min_frames:
        return False
    # VGGT skips sequences whose translations are "ridiculous" (a broken reconstruction)
    return all(sum(float(x) for x in frame["T"]) <= CO3D_ABSURD_TRANSLATION for frame in frames)


def _co3d_scene(co3d_dir: Path, anno_path: Path, category: str, sequence: str, frames: list[dict],
                num_frames: int, seed: int, image_size: int, patch_size: int) -> dict:
    chosen = [frames[i] for i in _draw_without_replacement(
        _seeded_rng(seed, "co3d-frames", category, sequence), len(frames), num_frames)]
    paths = [co3d_dir / frame["filepath"] for frame in chosen]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"image file named by {anno_path} (sequence {sequence}) not found: {path}")
    sizes = [_image_hw(path) for path in paths]
    extrinsics = np.stack([pytorch3d_to_opencv_extrinsics(f["R"], f["T"]) for f in chosen])
    # the NDC intrinsics are relative to each image's own size, which only the image file knows
    intrinsics = np.stack([
        ndc_to_pixel_intrinsics(f["focal_length"], f["principal_point"], height, width,
                                f.get("intrinsics_format", "ndc_isotropic"))
        for f, (height, width) in zip(chosen, sizes, strict=True)
    ])
    return _assemble_scene(f"{category}/{sequence}", [f["filepath"] for f in chosen], paths, sizes,
                           extrinsics, intrinsics, image_size, patch_size)


def iter_co3d(
    co3d_dir: PathLike,
    anno_dir: PathLike,
    categories: Sequence[str] | None = None,
    split: str = "test",
    num_frames: int = 10,
    max_sequences: int | None = None,
    seed: int = 0,
    min_frames: int = 50,
    image_size: int = 518,
    patch_size: int = 14,
) -> Iterator[dict]:
    """Yield Co3Dv2 scenes one by one (see ``load_co3d``); the folders and every annotation file
    are checked before the first scene is yielded."""
    co3d_dir, anno_dir = Path(co3d_dir), Path(anno_dir)
    if not co3d_dir.is_dir():
        raise FileNotFoundError(f"Co3D image folder not found: {co3d_dir}")
    if not anno_dir.is_dir():
        raise FileNotFoundError(f"Co3D annotation folder not found: {anno_dir}")
    if num_frames < 1 or min_frames < num_frames:
        raise ValueError(f"need 1 <= num_frames <= min_frames, got num_frames={num_frames}, min_frames={min_frames}")
    work = []
    for category, anno_path in _co3d_annotation_files(anno_dir, categories, split).items():
        annotation = _read_jgz(anno_path)
        sequences = [s for s in sorted(annotation)
                     if _usable_sequence(_check_co3d_frames(anno_path, s, annotation[s]), min_frames)]
        if max_sequences is not None and len(sequences) > max_sequences:
            picks = _draw_without_replacement(_seeded_rng(seed, "co3d-sequences", category),
                                              len(sequences), max_sequences)
            sequences = [sequences[i] for i in sorted(picks)]
        work.extend((category, anno_path, s, annotation[s]) for s in sequences)

    def scenes() -> Iterator[dict]:
        for category, anno_path, sequence, frames in work:
            yield _co3d_scene(co3d_dir, anno_path, category, sequence, frames, num_frames, seed,
                              image_size, patch_size)

    return scenes()


def load_co3d(
    co3d_dir: PathLike,
    anno_dir: PathLike,
    categories: Sequence[str] | None = None,
    split: str = "test",
    num_frames: int = 10,
    max_sequences: int | None = None,
    seed: int = 0,
    min_frames: int = 50,
    image_size: int = 518,
    patch_size: int = 14,
) -> list[dict]:
    """Co3Dv2 scenes as VGGT's camera-pose evaluation samples them (see the module docstring).

    Args:
        co3d_dir: the Co3Dv2 root; images are at ``{co3d_dir}/{filepath}``.
        anno_dir: folder of ``{category}_{split}.jgz`` annotation files.
        categories: category names; None takes every ``*_{split}.jgz`` in ``anno_dir``.
        split: the annotation split, ``"test"`` or ``"train"``.
        num_frames: frames drawn per sequence (without replacement, seeded).
        max_sequences: at most this many sequences *per category* (a seeded pick, kept in name
            order), like VGGT's ``--fast_eval``; None keeps all.
        seed: seeds the frame and sequence draws.
        min_frames: sequences with fewer annotated frames are skipped.
        image_size, patch_size: VGGT's crop-mode preprocessing sizes.

    Returns:
        one scene dict per sequence, ordered by category then sequence name; depth, valid and
        world_points are None.

    Raises:
        FileNotFoundError: a missing folder, requested annotation file or image file.
        ValueError: an annotation folder without ``*_{split}.jgz``, a corrupt annotation file or
            image, or frames of one sequence that preprocess to different sizes.
    """
    return list(iter_co3d(co3d_dir, anno_dir, categories, split, num_frames, max_sequences, seed,
                          min_frames, image_size, patch_size))


# --------------------------------------------------------------------------- 7-Scenes


def _sequence_dirs(scene_dir: Path) -> list[Path]:
    return sorted(p for p in scene_dir.iterdir() if p.is_dir() and _SEQUENCE_DIR.match(p.name))


def _sequence_name(sequence: str | int) -> str:
    return f"seq-{sequence:02d}" if isinstance(sequence, int) else str(sequence)


def _seven_scenes_dirs(root: Path, scenes: Sequence[str] | None) -> list[Path]:
    if scenes is None:
        found = sorted(p for p in root.iterdir() if p.is_dir() and _sequence_dirs(p))
        if not found:
            raise ValueError(f"7-Scenes folder without scenes: {root} has no {{scene}}/seq-XX folders")
        return found
    found = []
    for scene in scenes:
        scene_dir = root / scene
        if not scene_dir.is_dir():
            raise FileNotFoundError(f"7-Scenes scene folder not found: {scene_dir}")
        if not _sequence_dirs(scene_dir):
            raise ValueError(f"7-Scenes scene folder without sequences: {scene_dir} has no seq-XX folders")
        found.append(scene_dir)
    return found


def _read_pose(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"7-Scenes pose file not found: {path}")
    try:
        values = [float(x) for x in path.read_text().split()]
    except ValueError as err:
        raise ValueError(f"corrupt 7-Scenes pose file {path}: {err}") from err
    if len(values) != 16 or not all(math.isfinite(x) for x in values):
        raise ValueError(f"corrupt 7-Scenes pose file {path}: expected 16 finite numbers (a 4x4 matrix)")
    pose = np.array(values).reshape(4, 4)
    if abs(np.linalg.det(pose[:3, :3])) < 1e-6:
        raise ValueError(f"corrupt 7-Scenes pose file {path}: singular rotation")
    return pose


def _read_depth(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(depth in metres, valid) of a 7-Scenes depth PNG."""
    if not path.is_file():
        raise FileNotFoundError(f"7-Scenes depth file not found: {path}")
    try:
        with Image.open(path) as img:
            raw = np.asarray(img).astype(np.int64)
    except OSError as err:
        raise ValueError(f"unreadable 7-Scenes depth file {path}: {err}".replace("\n", " ")) from err
    if raw.ndim != 2:
        raise ValueError(f"7-Scenes depth file {path} is not a single-channel 16-bit image")
    valid = ~np.isin(raw, _SEVEN_SCENES_INVALID_DEPTH)
    return raw.astype(np.float64) / 1000.0, valid


def _check_seven_scenes_size(path: Path, hw: tuple[int, int]) -> None:
    expected = SEVEN_SCENES_SIZE_WH[::-1]
    if tuple(hw) != expected:
        raise ValueError(f"7-Scenes file {path} is {hw[1]}x{hw[0]}, but the calibration is for "
                         f"{expected[1]}x{expected[0]} images")


def _seven_scenes_intrinsics() -> np.ndarray:
    cx, cy = SEVEN_SCENES_PRINCIPAL_POINT
    return np.array([[SEVEN_SCENES_FOCAL, 0.0, cx], [0.0, SEVEN_SCENES_FOCAL, cy], [0.0, 0.0, 1.0]])


def _seven_scenes_scene(scene_dir: Path, seq_dir: Path, num_frames: int | None, stride: int,
                        image_size: int, patch_size: int) -> dict:
    colours = sorted(seq_dir.glob(f"frame-*{_COLOR_SUFFIX}"))
    if not colours:
        raise ValueError(f"7-Scenes sequence folder without frames: {seq_dir} has no frame-*{_COLOR_SUFFIX}")
    chosen = colours[::stride]
    if num_frames is not None:
        if len(chosen) < num_frames:
            raise ValueError(f"7-Scenes sequence {seq_dir} has {len(colours)} frames: stride {stride} gives "
                             f"{len(chosen)}, fewer than num_frames={num_frames}")
        chosen = chosen[:num_frames]
    frame_ids = [p.name[: -len(_COLOR_SUFFIX)] for p in chosen]
    poses = [_read_pose(seq_dir / f"{f}.pose.txt") for f in frame_ids]
    depths, valids, sizes = [], [], []
    for frame_id, colour in zip(frame_ids, chosen, strict=True):
        depth_path = seq_dir / f"{frame_id}.depth.png"
        depth, valid = _read_depth(depth_path)
        sizes.append(_image_hw(colour))
        _check_seven_scenes_size(colour, sizes[-1])
        _check_seven_scenes_size(depth_path, depth.shape)
        depths.append(depth)
        valids.append(valid)
    # pose files are camera-to-world; the exact inverse gives camera-from-world
    extrinsics = np.stack([np.linalg.inv(p)[:3, :] for p in poses])
    intrinsics = np.repeat(_seven_scenes_intrinsics()[None], len(chosen), axis=0)
    return _assemble_scene(f"{scene_dir.name}/{seq_dir.name}", frame_ids, chosen, sizes, extrinsics,
                           intrinsics, image_size, patch_size, depths, valids)


def iter_seven_scenes(
    root: PathLike,
    scenes: Sequence[str] | None = None,
    sequences: Sequence[str | int] | None = None,
    num_frames: int | None = 10,
    stride: int = 20,
    image_size: int = 518,
    patch_size: int = 14,
) -> Iterator[dict]:
    """Yield 7-Scenes scenes one by one (see ``load_seven_scenes``); the folders are checked
    before the first scene is yielded."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"7-Scenes folder not found: {root}")
    if stride < 1 or (num_frames is not None and num_frames < 1):
        raise ValueError(f"need stride >= 1 and num_frames >= 1 (or None), got {stride}, {num_frames}")
    work = []
    for scene_dir in _seven_scenes_dirs(root, scenes):
        if sequences is None:
            work.extend((scene_dir, s) for s in _sequence_dirs(scene_dir))
            continue
        for sequence in sequences:
            seq_dir = scene_dir / _sequence_name(sequence)
            if not seq_dir.is_dir():
                raise FileNotFoundError(f"7-Scenes sequence folder not found: {seq_dir}")
            work.append((scene_dir, seq_dir))

    def scenes_() -> Iterator[dict]:
        for scene_dir, seq_dir in work:
            yield _seven_scenes_scene(scene_dir, seq_dir, num_frames, stride, image_size, patch_size)

    return scenes_()


def load_seven_scenes(
    root: PathLike,
    scenes: Sequence[str] | None = None,
    sequences: Sequence[str | int] | None = None,
    num_frames: int | None = 10,
    stride: int = 20,
    image_size: int = 518,
    patch_size: int = 14,
) -> list[dict]:
    """7-Scenes sequences as scenes with depth (see the module docstring).

    Args:
        root: the folder holding ``{scene}/seq-XX/`` (e.g. ``chess/seq-01``).
        scenes: scene names; None takes every sub-folder of ``root`` that has ``seq-XX`` folders.
        sequences: ``"seq-01"`` or ``1`` style, applied to every scene; None takes all.
        num_frames: frames per sequence (the first ones at ``stride``); None keeps all of them.
        stride: take every ``stride``-th colour frame, in file-name order.
        image_size, patch_size: VGGT's crop-mode preprocessing sizes.

    Returns:
        one scene dict per sequence, ordered by scene then sequence, with depth (metres), valid
        and world points.

    Raises:
        FileNotFoundError: a missing root, scene, sequence, depth or pose file.
        ValueError: a scene without ``seq-XX`` folders, a sequence without frames or with fewer
            than ``num_frames`` at ``stride``, a corrupt pose or depth file, an image not 640x480.
    """
    return list(iter_seven_scenes(root, scenes, sequences, num_frames, stride, image_size, patch_size))
