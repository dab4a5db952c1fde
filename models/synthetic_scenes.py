"""Synthetic scenes: procedurally textured 3D scenes rendered from known cameras by a pure-torch
ray caster, the offline ground truth for a small VGGT-style multi-view reconstruction model.

Every scene comes from one integer seed (``render_scene(seed)``) and carries, per view, the image,
the z-depth, the world point of every pixel, a validity mask and the cameras, so that a
reconstruction (depth, point map, camera) can be scored against exact values and a model can be
trained or calibrated on the same distribution without downloading a data set.

Scene content (see ``make_scene_spec``):

* a ground plane ``z = 0`` (the world is z-up) with a checkerboard texture;
* 1-3 spheres and 1-3 boxes resting on the ground (boxes turned about the vertical axis), and
  with some probability one floating box with an arbitrary 3D rotation;
* a background: a large sphere of radius ``BACKGROUND_RADIUS`` centred on the origin that encloses
  the cameras. It is real geometry, so every pixel has a finite depth and a world point and,
  by default, ``valid`` is True everywhere (``render_scene(..., background_valid=False)`` marks
  its pixels invalid instead, for a model that should not be scored on the "sky"). It is drawn
  unshaded (emissive) and casts no shadows.

Textures are functions of a surface point in the primitive's own frame (checkerboards, stripes,
smooth colour noise from a few random sinusoids, always with a little noise on top so that no two
places look alike), hence view-independent. Shading is Lambertian with one directional light,
ambient term and hard shadows; it depends on the normal and the light only, so it too is
view-independent and a surface point has (up to sampling) the same colour in every view — the
property multi-view correspondence needs.

Conventions:

* cameras are OpenCV pinhole cameras: ``x_cam = R x_world + t`` (``extrinsics`` = [R|t],
  camera-from-world), the camera looks along +z with x right and y down;
* pixel (row v, column u) has its centre at image coordinates (u, v) — integer pixel centres, as
  in ``meshgrid(arange(W), arange(H))`` — so the principal point at the image centre is
  ((W - 1) / 2, (H - 1) / 2); focal lengths fx = fy = W / (2 tan(fov / 2)) (square pixels, ``fov``
  horizontal);
* ``depth`` is the z coordinate in the camera frame, not the ray length.

Splits are seed ranges far apart (``scene_seeds``); ``scene_digest`` hashes content so callers can
check calibration and evaluation scenes are distinct by content, not just by label.
"""
from __future__ import annotations

import colorsys
import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_HEIGHT = 112
DEFAULT_WIDTH = 112
DEFAULT_FRAMES = 4
DEFAULT_FOV_DEGREES = 60.0
#: radius of the enclosing background sphere, centred on the world origin; cameras stay well inside
BACKGROUND_RADIUS = 12.0
#: the point the cameras look at (up to a small jitter): the middle of the objects, above the ground
SCENE_CENTRE = (0.0, 0.0, 0.45)
#: first seed of each split; each split owns SPLIT_SIZE consecutive seeds, so the ranges never meet
SPLIT_OFFSETS = {"train": 0, "calibration": 1_000_000_000, "evaluation": 2_000_000_000}
SPLIT_SIZE = 1_000_000_000
#: ambient share of the light; the rest is the Lambertian term of the directional light
AMBIENT = 0.35

_F64 = torch.float64
# below this a ray parameter is taken as "at the origin" (self-hits of shadow rays, glancing rays)
_T_MIN = 1e-6
_SHADOW_OFFSET = 1e-4


# --------------------------------------------------------------------------- scene description


@dataclass(frozen=True)
class Texture:
    """A procedural, view-independent albedo: a pattern (``kind``) of two colours plus smooth
    colour noise (a sum of sinusoids of the local 3D point) that keeps repeated patterns apart."""

    kind: str  # "checker" | "stripes" | "noise"
    colour_a: tuple[float, float, float]
    colour_b: tuple[float, float, float]
    scale: float  # checker cells per unit length, or stripe periods per unit length
    direction: tuple[float, float, float]  # stripe direction (unit), local frame
    noise_freqs: tuple[tuple[float, float, float], ...]  # K angular frequency vectors
    noise_phases: tuple[float, ...]  # K phases
    noise_amps: tuple[tuple[float, float, float], ...]  # K per-channel amplitudes
    noise_mix: float = 1.0  # weight of the noise added to the pattern


@dataclass(frozen=True)
class Primitive:
    """One surface. ``rotation`` (row-major 3x3) is world-from-local; the local frame is where the
    box's slabs are axis-aligned and where textures are evaluated. For a plane ``centre`` is a
    point on it and its normal is the local z axis; ``size`` is the sphere radius repeated or the
    box half-extents. ``emissive`` surfaces (the background) are drawn unshaded and cast no shadow."""

    kind: str  # "sphere" | "box" | "plane"
    centre: tuple[float, float, float]
    size: tuple[float, float, float]
    rotation: tuple[float, ...]
    texture: Texture
    emissive: bool = False


@dataclass(frozen=True)
class SceneSpec:
    """Everything that is rendered: the primitives, the direction towards the light (unit, world)
    and the point the cameras aim at."""

    primitives: tuple[Primitive, ...]
    light_dir: tuple[float, float, float]
    centre: tuple[float, float, float] = SCENE_CENTRE


@dataclass
class Scene:
    """A rendered scene: S views of H x W (float32 unless said otherwise).

    images (S, 3, H, W) in [0, 1]; depth (S, H, W) camera z-depth; world_points (S, H, W, 3);
    valid (S, H, W) bool; intrinsics (S, 3, 3); extrinsics (S, 3, 4) OpenCV camera-from-world;
    object_ids (S, H, W) int64 index into ``spec.primitives`` (-1 where nothing was hit)."""

    seed: int
    images: torch.Tensor
    depth: torch.Tensor
    world_points: torch.Tensor
    valid: torch.Tensor
    intrinsics: torch.Tensor
    extrinsics: torch.Tensor
    object_ids: torch.Tensor
    spec: SceneSpec | None = None

    def as_dict(self) -> dict:
        """The tensors and the seed, for code that wants a plain mapping (a data loader's batch)."""
        return {"seed": self.seed, "images": self.images, "depth": self.depth, "world_points": self.world_points,
                "valid": self.valid, "intrinsics": self.intrinsics, "extrinsics": self.extrinsics,
                "object_ids": self.object_ids}


IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _uniform(rng: random.Random, low: float, high: float) -> float:
    """A uniform draw built on ``random()`` only (and ``gauss``, pure Python on top of it), whose
    stream Python keeps stable across versions (unlike ``randrange``/``choice``, whose algorithms
    have changed), so a seed keeps meaning the same scene."""
    return low + (high - low) * rng.random()


def _below(rng: random.Random, n: int) -> int:
    """An integer in [0, n), see ``_uniform`` for why not ``randrange``."""
    return min(int(rng.random() * n), n - 1)


def _colour(rng: random.Random, saturation: tuple[float, float] = (0.35, 0.9),
            value: tuple[float, float] = (0.35, 0.95)) -> tuple[float, float, float]:
    """A random colour drawn in HSV, so colours are neither grey-dull nor blown out."""
    return colorsys.hsv_to_rgb(rng.random(), _uniform(rng, *saturation), _uniform(rng, *value))


def _random_rotation(rng: random.Random) -> tuple[float, ...]:
    """A uniformly random rotation (Shoemake's unit quaternion from three uniforms), row-major."""
    u1, u2, u3 = rng.random(), rng.random(), rng.random()
    a, b = math.sqrt(1 - u1), math.sqrt(u1)
    x, y, z, w = a * math.sin(2 * math.pi * u2), a * math.cos(2 * math.pi * u2), \
        b * math.sin(2 * math.pi * u3), b * math.cos(2 * math.pi * u3)
    return (1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y))


def _yaw_rotation(angle: float) -> tuple[float, ...]:
    """Rotation about the world z (up) axis: boxes resting on the ground stay flat on it."""
    c, s = math.cos(angle), math.sin(angle)
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


def random_texture(rng: random.Random, kind: str | None = None, *, scale: tuple[float, float] = (2.0, 5.0),
                   noise_freq: tuple[float, float] = (1.5, 6.0), noise_amp: float = 0.12) -> Texture:
    """A random texture; ``kind`` None draws one of the three patterns. The noise's amplitude is
    kept below the pattern contrast so edges stay visible yet every cell differs from the next."""
    kind = kind or ("checker", "stripes", "noise")[_below(rng, 3)]
    direction = [rng.gauss(0.0, 1.0) for _ in range(3)]
    norm = math.sqrt(sum(d * d for d in direction)) or 1.0
    freqs, phases, amps = [], [], []
    for _ in range(4):
        v = [rng.gauss(0.0, 1.0) for _ in range(3)]
        n = math.sqrt(sum(x * x for x in v)) or 1.0
        magnitude = _uniform(rng, *noise_freq)
        freqs.append(tuple(magnitude * x / n for x in v))
        phases.append(_uniform(rng, 0.0, 2 * math.pi))
        amps.append(tuple(_uniform(rng, -noise_amp, noise_amp) for _ in range(3)))
    return Texture(kind=kind, colour_a=_colour(rng), colour_b=_colour(rng), scale=_uniform(rng, *scale),
                   direction=tuple(d / norm for d in direction), noise_freqs=tuple(freqs),
                   noise_phases=tuple(phases), noise_amps=tuple(amps))


def _place(rng: random.Random, placed: list[tuple[float, float, float]], radius: float,
           spread: float = 1.6) -> tuple[float, float]:
    """A ground position (x, y) within ``spread`` of the origin that keeps clear of the objects
    already placed when it can (20 tries), so objects rarely merge into one blob."""
    for _ in range(20):
        r, a = spread * math.sqrt(rng.random()), _uniform(rng, 0.0, 2 * math.pi)
        x, y = r * math.cos(a), r * math.sin(a)
        if all(math.hypot(x - px, y - py) > radius + pr + 0.1 for px, py, pr in placed):
            break
    placed.append((x, y, radius))
    return x, y


def make_scene_spec(seed: int) -> SceneSpec:
    """The scene of ``seed``: ground, background, 1-3 spheres, 1-3 boxes and maybe a floating
    rotated box, their textures and the light. Drawn from its own random stream (separate from the
    cameras'), so the same seed is the same scene whatever the number of views or resolution."""
    rng = random.Random(f"archquant.synthetic_scenes/{int(seed)}/objects")
    ground = Primitive("plane", (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), IDENTITY,
                       random_texture(rng, "checker", scale=(0.8, 2.0), noise_freq=(0.8, 3.0)))
    background = Primitive("sphere", (0.0, 0.0, 0.0), (BACKGROUND_RADIUS,) * 3, _random_rotation(rng),
                           random_texture(rng, "noise", scale=(0.5, 1.5), noise_freq=(2.0, 8.0), noise_amp=0.2),
                           emissive=True)
    objects: list[Primitive] = []
    placed: list[tuple[float, float, float]] = []
    for _ in range(1 + _below(rng, 3)):
        radius = _uniform(rng, 0.25, 0.6)
        x, y = _place(rng, placed, radius)
        objects.append(Primitive("sphere", (x, y, radius), (radius,) * 3, _random_rotation(rng),
                                 random_texture(rng)))
    for _ in range(1 + _below(rng, 3)):
        half = (_uniform(rng, 0.15, 0.5), _uniform(rng, 0.15, 0.5), _uniform(rng, 0.15, 0.55))
        x, y = _place(rng, placed, math.hypot(half[0], half[1]))
        objects.append(Primitive("box", (x, y, half[2]), half, _yaw_rotation(_uniform(rng, 0.0, math.pi)),
                                 random_texture(rng)))
    if rng.random() < 0.5:
        half = (_uniform(rng, 0.15, 0.35), _uniform(rng, 0.15, 0.35), _uniform(rng, 0.15, 0.35))
        x, y = _place(rng, placed, max(half))
        objects.append(Primitive("box", (x, y, _uniform(rng, 1.1, 1.6)), half, _random_rotation(rng),
                                 random_texture(rng)))
    azimuth, elevation = _uniform(rng, 0.0, 2 * math.pi), math.radians(_uniform(rng, 35.0, 70.0))
    light = (math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth), math.sin(elevation))
    return SceneSpec(primitives=(ground, background, *objects), light_dir=light)


# --------------------------------------------------------------------------- cameras


def look_at(position: Sequence[float], target: Sequence[float],
            up: Sequence[float] = (0.0, 0.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV camera-from-world (R, t) of a camera at ``position`` aiming at ``target``, without
    roll: its x axis (right) is horizontal, y (down) points as far down as it can, z forward.
    Rows of R are the camera axes in world coordinates; t = -R position."""
    pos, tgt, upv = (torch.tensor(list(v), dtype=_F64) for v in (position, target, up))
    forward = tgt - pos
    forward = forward / forward.norm()
    right = torch.linalg.cross(forward, upv)
    if right.norm() < 1e-9:
        raise ValueError("the viewing direction is parallel to the up vector: roll is undefined")
    right = right / right.norm()
    down = torch.linalg.cross(forward, right)
    rot = torch.stack([right, down, forward])
    return rot, -rot @ pos


def intrinsics_matrix(height: int, width: int, fov_degrees: float = DEFAULT_FOV_DEGREES) -> torch.Tensor:
    """Pinhole K (float64): square pixels, horizontal field of view ``fov_degrees``, principal
    point at the image centre ((W - 1) / 2, (H - 1) / 2) with integer pixel centres."""
    focal = width / (2.0 * math.tan(math.radians(fov_degrees) / 2.0))
    return torch.tensor([[focal, 0.0, (width - 1) / 2.0], [0.0, focal, (height - 1) / 2.0], [0.0, 0.0, 1.0]],
                        dtype=_F64)


def make_cameras(seed: int, num_frames: int, height: int, width: int, *, fov_degrees: float = DEFAULT_FOV_DEGREES,
                 centre: Sequence[float] = SCENE_CENTRE) -> tuple[torch.Tensor, torch.Tensor]:
    """(intrinsics (S, 3, 3), extrinsics (S, 3, 4)), float64, of ``num_frames`` views of scene
    ``seed``: spread evenly along an arc of 90-200 degrees (a random span, so baselines vary but
    consecutive views always overlap) around ``centre``, each jittered in azimuth, distance
    (4.5 +- 15 %), height (1.2-3.0 above the ground) and aim point (+- 0.15 per axis)."""
    rng = random.Random(f"archquant.synthetic_scenes/{int(seed)}/cameras")
    span = math.radians(_uniform(rng, 90.0, 200.0))
    start = _uniform(rng, 0.0, 2 * math.pi)
    step = span / max(num_frames - 1, 1)
    k = intrinsics_matrix(height, width, fov_degrees)
    extrinsics = []
    for i in range(num_frames):
        azimuth = start + i * step + _uniform(rng, -0.15, 0.15) * step
        distance = 4.5 * _uniform(rng, 0.85, 1.15)
        height_above = _uniform(rng, 1.2, 3.0)
        position = (centre[0] + distance * math.cos(azimuth), centre[1] + distance * math.sin(azimuth), height_above)
        target = [c + _uniform(rng, -0.15, 0.15) for c in centre]
        rot, trans = look_at(position, target)
        extrinsics.append(torch.cat([rot, trans[:, None]], dim=1))
    return k.expand(num_frames, 3, 3).clone(), torch.stack(extrinsics)


# --------------------------------------------------------------------------- ray casting


def intersect_sphere(origins: torch.Tensor, dirs: torch.Tensor, centre: torch.Tensor, radius: float,
                     t_min: float = _T_MIN) -> torch.Tensor:
    """Ray parameter t (N,) of the first hit in front of the origin of rays o + t d with a sphere,
    inf on a miss. ``dirs`` need not be unit (the quadratic keeps |d|^2), and a ray starting
    inside (the background sphere) gets the far root."""
    oc = origins - centre
    a = (dirs * dirs).sum(-1)
    b = (oc * dirs).sum(-1)
    c = (oc * oc).sum(-1) - radius * radius
    disc = b * b - a * c
    root = disc.clamp_min(0.0).sqrt()
    near, far = (-b - root) / a, (-b + root) / a
    inf = torch.full_like(near, math.inf)
    t = torch.where(near > t_min, near, torch.where(far > t_min, far, inf))
    return torch.where(disc >= 0, t, inf)


def intersect_box(origins: torch.Tensor, dirs: torch.Tensor, centre: torch.Tensor, half: torch.Tensor,
                  rotation: torch.Tensor, t_min: float = _T_MIN) -> torch.Tensor:
    """Ray parameter t (N,) of the first hit with an oriented box (slab method in the box's frame,
    world-from-local ``rotation``), inf on a miss. Rotating the ray rather than the box keeps the
    slabs axis-aligned; t is unchanged by the rotation."""
    o_local = (origins - centre) @ rotation  # R^T (o - c) for row vectors
    d_local = dirs @ rotation
    tiny = torch.where(d_local >= 0, 1e-300, -1e-300)
    inv = 1.0 / torch.where(d_local.abs() < 1e-300, tiny, d_local)  # never 0 * inf = nan
    t1, t2 = (-half - o_local) * inv, (half - o_local) * inv
    near = torch.minimum(t1, t2).amax(-1)
    far = torch.maximum(t1, t2).amin(-1)
    t = torch.where(near > t_min, near, far)  # from inside a box: its exit
    hit = (near <= far) & (far > t_min)
    return torch.where(hit, t, torch.full_like(t, math.inf))


def intersect_plane(origins: torch.Tensor, dirs: torch.Tensor, point: torch.Tensor, normal: torch.Tensor,
                    t_min: float = _T_MIN) -> torch.Tensor:
    """Ray parameter t (N,) where rays meet the plane through ``point`` with ``normal``, inf for
    rays parallel to it or meeting it behind their origin."""
    denom = dirs @ normal
    t = ((point - origins) @ normal) / torch.where(denom.abs() < 1e-12, torch.full_like(denom, 1e-12), denom)
    return torch.where((denom.abs() >= 1e-12) & (t > t_min), t, torch.full_like(t, math.inf))


def _tensors(prim: Primitive) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(centre (3,), size (3,), world-from-local rotation (3, 3)) of ``prim`` as float64 tensors."""
    return (torch.tensor(prim.centre, dtype=_F64), torch.tensor(prim.size, dtype=_F64),
            torch.tensor(prim.rotation, dtype=_F64).view(3, 3))


def intersect(prim: Primitive, origins: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Ray parameters (N,) of the first hit of each ray with ``prim`` (inf on a miss)."""
    centre, size, rotation = _tensors(prim)
    if prim.kind == "sphere":
        return intersect_sphere(origins, dirs, centre, float(size[0]))
    if prim.kind == "box":
        return intersect_box(origins, dirs, centre, size, rotation)
    if prim.kind == "plane":
        return intersect_plane(origins, dirs, centre, rotation[:, 2])
    raise ValueError(f"unknown primitive kind {prim.kind!r}")


def surface_normal(prim: Primitive, points: torch.Tensor) -> torch.Tensor:
    """Outward unit normals (M, 3) of ``prim`` at surface ``points`` (M, 3). For a box, the face is
    the local axis where the point is relatively farthest out (its slab)."""
    centre, size, rotation = _tensors(prim)
    if prim.kind == "sphere":
        n = points - centre
        return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if prim.kind == "box":
        local = (points - centre) @ rotation
        axis = (local.abs() / size).argmax(-1)
        n_local = torch.nn.functional.one_hot(axis, 3).to(points.dtype) * torch.sign(local)
        return n_local @ rotation.T
    if prim.kind == "plane":
        return rotation[:, 2].expand_as(points)
    raise ValueError(f"unknown primitive kind {prim.kind!r}")


def evaluate_texture(texture: Texture, local: torch.Tensor) -> torch.Tensor:
    """Albedo (M, 3) in [0, 1] at ``local`` points (M, 3) in the primitive's frame. Only the point
    enters, never the ray, which is what makes colours view-independent."""
    a = torch.tensor(texture.colour_a, dtype=local.dtype)
    b = torch.tensor(texture.colour_b, dtype=local.dtype)
    if texture.kind == "checker":
        parity = torch.remainder(torch.floor(local * texture.scale).sum(-1), 2.0)
        base = torch.where(parity[:, None] > 0.5, a, b)
    elif texture.kind == "stripes":
        phase = 2 * math.pi * texture.scale * (local @ torch.tensor(texture.direction, dtype=local.dtype))
        base = torch.where((torch.sin(phase) > 0)[:, None], a, b)
    elif texture.kind == "noise":
        direction = torch.tensor(texture.direction, dtype=local.dtype)
        blend = 0.5 + 0.5 * torch.sin(2 * math.pi * texture.scale * (local @ direction))
        base = a + (b - a) * blend[:, None]
    else:
        raise ValueError(f"unknown texture kind {texture.kind!r}")
    freqs = torch.tensor(texture.noise_freqs, dtype=local.dtype)  # (K, 3)
    phases = torch.tensor(texture.noise_phases, dtype=local.dtype)
    amps = torch.tensor(texture.noise_amps, dtype=local.dtype)  # (K, 3)
    noise = torch.sin(local @ freqs.T + phases) @ amps  # (M, 3)
    return (base + texture.noise_mix * noise).clamp(0.0, 1.0)


def pixel_rays(intrinsics: torch.Tensor, extrinsics: torch.Tensor, height: int,
               width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """World ray origins and directions (S, H*W, 3), float64, one per pixel centre (u, v) =
    (column, row). Directions are R^T K^-1 (u, v, 1): not unit, but with camera z component 1, so
    the ray parameter of a hit is its z-depth."""
    k = intrinsics.to(_F64)
    ext = extrinsics.to(_F64)
    rot, trans = ext[..., :3], ext[..., 3]
    v, u = torch.meshgrid(torch.arange(height, dtype=_F64), torch.arange(width, dtype=_F64), indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1).reshape(-1, 3)  # (HW, 3)
    cam = pix @ torch.linalg.inv(k).transpose(-1, -2)  # (S, HW, 3)
    dirs = cam @ rot  # R^T d for row vectors
    origins = -(rot.transpose(-1, -2) @ trans[..., None])[..., 0]  # (S, 3)
    return origins[:, None, :].expand_as(dirs), dirs


def _in_shadow(spec: SceneSpec, points: torch.Tensor, normals: torch.Tensor, light: torch.Tensor) -> torch.Tensor:
    """(M,) bool: whether a non-emissive primitive blocks the light from ``points``. Shadow rays
    start a hair off the surface, along the normal, so a surface does not shadow itself."""
    origins = points + _SHADOW_OFFSET * normals
    dirs = light.expand_as(points)
    blocked = torch.zeros(points.shape[0], dtype=torch.bool)
    for prim in spec.primitives:
        if not prim.emissive:
            blocked |= torch.isfinite(intersect(prim, origins, dirs))
    return blocked


def render_spec(spec: SceneSpec, intrinsics: torch.Tensor, extrinsics: torch.Tensor, height: int, width: int, *,
                shadows: bool = True, ambient: float = AMBIENT) -> dict[str, torch.Tensor]:
    """Ray-cast ``spec`` from the given cameras (S of them): float32 ``images`` (S, 3, H, W),
    ``depth`` (S, H, W), ``world_points`` (S, H, W, 3), bool ``hit`` (S, H, W) and int64
    ``object_ids`` (S, H, W), -1 where no primitive was hit (depth and points are 0 there).
    All rays go through every primitive at once (N = S*H*W rays); the nearest hit wins."""
    s = extrinsics.shape[0]
    origins, dirs = pixel_rays(intrinsics, extrinsics, height, width)
    origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    ts = torch.stack([intersect(p, origins, dirs) for p in spec.primitives])  # (P, N)
    t, ids = ts.min(0)
    hit = torch.isfinite(t)
    ids = torch.where(hit, ids, torch.full_like(ids, -1))
    points = origins + torch.where(hit, t, torch.zeros_like(t))[:, None] * dirs
    albedo = torch.zeros_like(points)
    normals = torch.zeros_like(points)
    emissive = torch.zeros_like(hit)
    for index, prim in enumerate(spec.primitives):
        mask = ids == index
        if not mask.any():
            continue
        centre, _, rotation = _tensors(prim)
        p = points[mask]
        local = (p - centre) @ rotation
        if prim.kind == "plane":  # on the plane local z is 0 up to rounding, whose sign would flip checker cells
            local = local * torch.tensor([1.0, 1.0, 0.0], dtype=_F64)
        albedo[mask] = evaluate_texture(prim.texture, local)
        normals[mask] = surface_normal(prim, p)
        emissive[mask] = prim.emissive
    light = torch.tensor(spec.light_dir, dtype=_F64)
    light = light / light.norm()
    lit = hit & ~emissive
    lambert = (normals @ light).clamp_min(0.0)
    if shadows and lit.any():
        shadowed = torch.zeros_like(hit)
        shadowed[lit] = _in_shadow(spec, points[lit], normals[lit], light)
        lambert = torch.where(shadowed, torch.zeros_like(lambert), lambert)
    shade = torch.where(lit, ambient + (1.0 - ambient) * lambert, torch.ones_like(lambert))
    colours = (albedo * shade[:, None]).clamp(0.0, 1.0)
    ext = extrinsics.to(_F64)
    cam = points.view(s, -1, 3) @ ext[..., :3].transpose(-1, -2) + ext[:, None, :, 3]
    depth = torch.where(hit.view(s, -1), cam[..., 2], torch.zeros_like(cam[..., 2]))
    return {"images": colours.view(s, height, width, 3).permute(0, 3, 1, 2).contiguous().float(),
            "depth": depth.view(s, height, width).float(),
            "world_points": points.view(s, height, width, 3).float(),
            "hit": hit.view(s, height, width),
            "object_ids": ids.view(s, height, width)}


# --------------------------------------------------------------------------- public entry points


def render_scene(seed: int, num_frames: int = DEFAULT_FRAMES, height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH,
                 *, fov_degrees: float = DEFAULT_FOV_DEGREES, shadows: bool = True,
                 background_valid: bool = True) -> Scene:
    """Scene ``seed`` seen from ``num_frames`` cameras at ``height`` x ``width``; bit-identical for
    the same arguments. ``background_valid`` False excludes the background sphere from ``valid``
    (it always has finite depth; whether it counts is the caller's evaluation choice)."""
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError(f"need at least one frame and one pixel, got {num_frames} frames of {height}x{width}")
    spec = make_scene_spec(seed)
    k, ext = make_cameras(seed, num_frames, height, width, fov_degrees=fov_degrees, centre=spec.centre)
    # the float32 cameras handed out are the ones rendered with, so outputs agree with them exactly
    k, ext = k.float(), ext.float()
    out = render_spec(spec, k, ext, height, width, shadows=shadows)
    valid = out["hit"]
    if not background_valid:
        background = [i for i, p in enumerate(spec.primitives) if p.emissive]
        valid = valid & ~torch.isin(out["object_ids"], torch.tensor(background, dtype=torch.long))
    return Scene(seed=int(seed), images=out["images"], depth=out["depth"], world_points=out["world_points"],
                 valid=valid, intrinsics=k, extrinsics=ext, object_ids=out["object_ids"], spec=spec)


def scene_seeds(split: str, count: int, start: int = 0) -> list[int]:
    """``count`` seeds of ``split`` ("train", "calibration" or "evaluation") from its ``start``-th
    on. Each split owns a block of SPLIT_SIZE seeds, so splits can never share a seed."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_OFFSETS)}")
    if count < 0 or start < 0 or start + count > SPLIT_SIZE:
        raise ValueError(f"seeds {start}..{start + count} do not fit a split of {SPLIT_SIZE}")
    return [SPLIT_OFFSETS[split] + start + i for i in range(count)]


def scene_digest(scene: Scene) -> str:
    """sha256 hex of a scene's content, not its seed: the images quantised to 8 bits plus the
    cameras rounded to 1e-5 (quantised so last-bit float differences between machines do not
    change it), with their shapes. Two scenes that look the same from the same cameras collide,
    which is what an overlap check between calibration and evaluation wants."""
    h = hashlib.sha256(b"archquant.synthetic_scenes/v1")
    images = (scene.images.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    h.update(str(tuple(images.shape)).encode())
    h.update(images.numpy().tobytes())
    for cams in (scene.intrinsics, scene.extrinsics):
        q = (cams.detach().cpu().double() * 1e5).round().to(torch.int64).contiguous()
        h.update(str(tuple(q.shape)).encode())
        h.update(q.numpy().tobytes())
    return h.hexdigest()


def stack_scenes(scenes: Sequence[Scene]) -> dict:
    """A batch: every tensor of ``scenes`` stacked on a new leading dimension (B, S, ...) and the
    seeds as a (B,) int64 tensor; the scenes must share frame count and resolution."""
    keys = ("images", "depth", "world_points", "valid", "intrinsics", "extrinsics", "object_ids")
    batch = {k: torch.stack([getattr(s, k) for s in scenes]) for k in keys}
    batch["seed"] = torch.tensor([s.seed for s in scenes], dtype=torch.int64)
    return batch


def save_scene_grid(scene: Scene, path) -> None:
    """A PNG for eyeballing: one column per view, rows image / depth / object ids."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = scene.images.shape[0]
    fig, axes = plt.subplots(3, s, figsize=(2.2 * s, 6.6), squeeze=False)
    for i in range(s):
        axes[0, i].imshow(scene.images[i].permute(1, 2, 0).numpy())
        axes[1, i].imshow(scene.depth[i].numpy(), cmap="viridis")
        axes[2, i].imshow(scene.object_ids[i].numpy(), cmap="tab10", interpolation="nearest")
        for row in range(3):
            axes[row, i].axis("off")
    axes[0, 0].set_title(f"seed {scene.seed}", loc="left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
