"""Point clouds from multi-view 3D reconstructions (VGGT), as files people open and pictures they look at.

* ``write_ply`` / ``read_ply``: coloured point clouds as PLY (binary little-endian by default, or
  ASCII), vertex properties ``float x, y, z`` and ``uchar red, green, blue``, the layout that
  MeshLab, CloudCompare, Open3D and plyfile read. ``read_ply`` reads exactly that layout back
  (tests, and a quick check of a written file); it is not a general PLY reader.
* ``pointmap_to_cloud``: a predicted point map (S, H, W, 3) and its images (S, 3, H, W) to one
  coloured cloud, keeping valid, finite points and optionally a seeded subsample.
* ``render_clouds_png``: FP and quantized clouds side by side in one PNG, with the same axis limits
  in every panel (so differences are differences of the reconstruction, not of the view) and
  optionally the predicted cameras as wireframe frusta (``camera_frustum``).

Conventions follow ``archquant.eval.reconstruction_metrics``: extrinsics are OpenCV
camera-from-world ``[R|t]`` (``x_cam = R x_world + t``; the camera looks along +z, x right, y down),
shape (S, 3, 4) or (S, 4, 4); intrinsics are (S, 3, 3) pixel matrices. Inputs may be torch tensors
or numpy arrays; outputs are numpy arrays. Files are written atomically (a temporary file in the
same folder, then ``os.replace``), so a failed write never leaves a half-written file behind.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

#: one PLY vertex as write_ply stores it (little-endian, no padding: 15 bytes)
_VERTEX_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                          ("red", "u1"), ("green", "u1"), ("blue", "u1")])
_PROPERTY_LINES = ("property float x", "property float y", "property float z",
                   "property uchar red", "property uchar green", "property uchar blue")
_FORMATS = {True: "binary_little_endian 1.0", False: "ascii 1.0"}
# 9 significant digits identify every float32 exactly, so ASCII files round-trip bit for bit.
_ASCII_ROW = "%.9g %.9g %.9g %d %d %d"

#: frustum depth as a fraction of the plotted scene extent: visible, without hiding the points
FRUSTUM_FRACTION = 0.08
#: the first camera (the reference frame of a VGGT prediction) is drawn in this colour, others in grey
_FIRST_CAMERA_COLOR, _CAMERA_COLOR = "red", "0.25"
#: wireframe edges between camera_frustum's rows: apex (0) to each corner, then the image rectangle
_FRUSTUM_EDGES = ((0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (2, 3), (3, 4), (4, 1))
#: percentiles of the axis limits: a few stray points must not squash the view of the rest
_LIMIT_PERCENTILES = (1.0, 99.0)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def _to_numpy(x) -> np.ndarray:
    """A numpy view of a tensor or array. torch is not imported: numpy-only callers need not have it."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_floating_point() and x.element_size() < 4:
            x = x.float()  # numpy has no bfloat16; fp32 holds bf16/fp16 values exactly
        return x.numpy()
    return np.asarray(x)


def _points(points, name: str = "points") -> np.ndarray:
    p = _to_numpy(points)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3), got {tuple(p.shape)}")
    return p


def _colors_uint8(colors, n: int, name: str = "colors") -> np.ndarray:
    """(N, 3) uint8 from uint8 colours or floats in [0, 1] (clipped, round(255 x), NaN as 0)."""
    c = _to_numpy(colors)
    if c.shape != (n, 3):
        raise ValueError(f"{name} must have shape (N, 3) with N={n} like the points, got {tuple(c.shape)}")
    if c.dtype == np.uint8:
        return c
    if not np.issubdtype(c.dtype, np.floating):
        raise ValueError(f"{name} must be floats in [0, 1] or uint8, got dtype {c.dtype}")
    c = np.nan_to_num(c.astype(np.float64), nan=0.0)  # float64: 255 x rounds the same for any input dtype
    return np.round(np.clip(c, 0.0, 1.0) * 255.0).astype(np.uint8)


def _colors_float(colors, n: int) -> np.ndarray:
    """(N, 3) floats in [0, 1] for matplotlib, from uint8 or float colours."""
    return _colors_uint8(colors, n).astype(np.float32) / 255.0


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Calls ``write`` on a temporary file beside ``path``, then renames it onto ``path``: readers see
    the old file or the complete new one, and a failure leaves neither a partial file nor the temporary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # same folder: os.replace is atomic
    # os.open with 0o666 honours the umask like open() does (tempfile would make the file owner-only)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _ply_header(n: int, binary: bool) -> bytes:
    lines = ["ply", f"format {_FORMATS[binary]}", f"element vertex {n}", *_PROPERTY_LINES, "end_header"]
    return ("\n".join(lines) + "\n").encode("ascii")


def _write_vertices(f: BinaryIO, vertices: np.ndarray, binary: bool) -> None:
    if binary:
        f.write(vertices.tobytes())
        return
    table = np.column_stack([vertices[k].astype(np.float64) for k in _VERTEX_DTYPE.names])
    np.savetxt(f, table, fmt=_ASCII_ROW)


def write_ply(path: str | os.PathLike, points, colors, *, binary: bool = True) -> Path:
    """Writes a coloured point cloud as PLY and returns the path.

    ``points``: (N, 3) floats, stored as float32. ``colors``: (N, 3) uint8, or floats in [0, 1]
    (clipped and stored as round(255 x)). Points that are not finite as float32 (NaN, inf, or beyond
    the float32 range) are dropped together with their colours, because most viewers reject or
    mis-scale such files. ``binary=False`` writes ``ascii 1.0`` instead of ``binary_little_endian 1.0``
    (larger, but readable in a text editor). The file is written atomically.
    """
    p = _points(points)
    c = _colors_uint8(colors, len(p))
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are dropped below
        p32 = p.astype(np.float32)
    keep = np.isfinite(p32).all(axis=1)
    vertices = np.empty(int(keep.sum()), dtype=_VERTEX_DTYPE)
    for i, axis in enumerate("xyz"):
        vertices[axis] = p32[keep, i]
    for i, channel in enumerate(("red", "green", "blue")):
        vertices[channel] = c[keep, i]

    def write(f: BinaryIO) -> None:
        f.write(_ply_header(len(vertices), binary))
        _write_vertices(f, vertices, binary)

    return _atomic_write(path, write)


def _parse_header(path: Path, header: list[str]) -> tuple[bool, int]:
    """(binary, vertex count) of a header in write_ply's layout; comment lines are allowed."""
    lines = [line.strip() for line in header if not line.startswith(("comment", "obj_info"))]
    formats = {f"format {v}": k for k, v in _FORMATS.items()}
    element = lines[2].split() if len(lines) > 2 else []
    ok = (len(lines) == 3 + len(_PROPERTY_LINES) and lines[0] == "ply" and lines[1] in formats
          and len(element) == 3 and element[:2] == ["element", "vertex"] and element[2].isdigit()
          and tuple(lines[3:]) == _PROPERTY_LINES)
    if not ok:
        raise ValueError(f"{path}: not a PLY in write_ply's layout (one vertex element with float x, y, z "
                         f"and uchar red, green, blue; binary_little_endian or ascii)")
    return formats[lines[1]], int(element[2])


def _ascii_vertices(path: Path, body: bytes, n: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = body.split()
    if len(tokens) != 6 * n:
        raise ValueError(f"{path}: expected {n} vertices of 6 values, found {len(tokens)} values")
    try:
        table = np.array(tokens).astype(np.float64).reshape(n, 6)
    except ValueError:
        raise ValueError(f"{path}: vertex data is not numeric") from None
    rgb = table[:, 3:]
    if not np.array_equal(rgb, np.clip(np.round(rgb), 0, 255)):
        raise ValueError(f"{path}: colours must be integers in 0..255")
    return table[:, :3].astype(np.float32), rgb.astype(np.uint8)


def read_ply(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(points float32 (N, 3), colors uint8 (N, 3)) of a PLY written by ``write_ply`` (either format).

    Other layouts (more elements or properties, other types, big-endian) raise a one-line ValueError
    naming the file.
    """
    path = Path(path)
    data = path.read_bytes()
    end = data.find(b"end_header")
    newline = data.find(b"\n", end)
    if not data.startswith(b"ply") or end < 0 or newline < 0:
        raise ValueError(f"{path}: not a PLY file (no 'ply' magic or no end_header line)")
    header = data[:end].decode("ascii", errors="replace").splitlines()  # the lines before end_header
    binary, n = _parse_header(path, header)
    body = data[newline + 1:]
    if not binary:
        return _ascii_vertices(path, body, n)
    if len(body) != n * _VERTEX_DTYPE.itemsize:
        raise ValueError(f"{path}: {len(body)} bytes of vertex data, expected {n * _VERTEX_DTYPE.itemsize} "
                         f"for {n} vertices (truncated or extra data)")
    v = np.frombuffer(body, dtype=_VERTEX_DTYPE, count=n)
    points = np.stack([v["x"], v["y"], v["z"]], axis=1).astype(np.float32)  # native-endian copy
    return points, np.stack([v["red"], v["green"], v["blue"]], axis=1)


# --------------------------------------------------------------------------------------------
# Point maps
# --------------------------------------------------------------------------------------------
def _subsample_indices(n: int, max_points: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of a seeded subsample of ``max_points`` out of ``n`` (None: keep all). Sorted,
    so the cloud keeps its frame / pixel order."""
    if max_points is None or n <= max_points:
        return None
    if max_points < 0:
        raise ValueError(f"max_points must be >= 0 or None, got {max_points}")
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def pointmap_to_cloud(world_points, images, valid=None, *, max_points: int | None = None,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(points float32 (N, 3), colors (N, 3)) from a point map and the images it was predicted from.

    ``world_points``: (S, H, W, 3); ``images``: (S, 3, H, W) floats in [0, 1] (or uint8); ``valid``:
    optional bool (S, H, W), e.g. ``confidence > threshold``. Pixels that are invalid or whose point is
    not finite are left out. Colours keep the images' values: float32 in [0, 1], or uint8 for uint8
    images. ``max_points`` keeps a random subset of that size, the same for the same ``seed``.
    """
    pts = _to_numpy(world_points)
    if pts.ndim != 4 or pts.shape[-1] != 3:
        raise ValueError(f"world_points must have shape (S, H, W, 3), got {tuple(pts.shape)}")
    s, h, w = pts.shape[:3]
    imgs = _to_numpy(images)
    if imgs.shape != (s, 3, h, w):
        raise ValueError(f"images must have shape (S, 3, H, W) = {(s, 3, h, w)} like world_points, "
                         f"got {tuple(imgs.shape)}")
    keep = np.isfinite(pts).all(axis=-1)
    if valid is not None:
        mask = _to_numpy(valid)
        if mask.shape != (s, h, w) or mask.dtype != np.bool_:
            raise ValueError(f"valid must be a bool mask of shape (S, H, W) = {(s, h, w)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        keep &= mask
    points = pts[keep].astype(np.float32)
    colors = np.moveaxis(imgs, 1, -1)[keep]
    colors = colors if colors.dtype == np.uint8 else colors.astype(np.float32)
    idx = _subsample_indices(len(points), max_points, seed)
    return (points, colors) if idx is None else (points[idx], colors[idx])


# --------------------------------------------------------------------------------------------
# Cameras
# --------------------------------------------------------------------------------------------
def _extrinsics(extrinsics) -> np.ndarray:
    e = _to_numpy(extrinsics).astype(np.float64)
    if e.ndim != 3 or e.shape[1:] not in ((3, 4), (4, 4)):
        raise ValueError(f"extrinsics must have shape (S, 3, 4) or (S, 4, 4), got {tuple(e.shape)}")
    return e[:, :3, :]


def _camera_centres(e: np.ndarray) -> np.ndarray:
    """(S, 3) camera centres C = -R^T t of (S, 3, 4) extrinsics: where x_cam = R C + t is 0."""
    return -np.einsum("sji,sj->si", e[:, :, :3], e[:, :, 3])


def camera_frustum(extrinsics, intrinsics, image_size: tuple[int, int], depth: float) -> np.ndarray:
    """World-space frusta of S cameras: (S, 5, 3), the camera centre ``C = -R^T t`` followed by the image
    corners (0, 0), (W, 0), (W, H), (0, H) (pixel-edge coordinates) unprojected to camera depth
    ``depth`` (z_cam = depth). Projecting corner k with the camera gives that pixel back."""
    e = _extrinsics(extrinsics)
    k = _to_numpy(intrinsics).astype(np.float64)
    if k.shape != (len(e), 3, 3):
        raise ValueError(f"intrinsics must have shape (S, 3, 3) with S={len(e)}, got {tuple(k.shape)}")
    h, w = image_size
    r, t = e[:, :, :3], e[:, :, 3]
    pixels = np.array([[0, 0, 1], [w, 0, 1], [w, h, 1], [0, h, 1]], dtype=np.float64)  # (4, 3)
    rays = np.einsum("sij,kj->ski", np.linalg.inv(k), pixels)  # (S, 4, 3), z = 1 for a pixel matrix
    cam = depth * rays / rays[..., 2:3]  # exactly z_cam = depth, even if K's last row is scaled
    corners = np.einsum("sji,skj->ski", r, cam - t[:, None, :])  # x_world = R^T (x_cam - t)
    return np.concatenate([_camera_centres(e)[:, None, :], corners], axis=1)


def _camera_set(cameras) -> dict | None:
    if cameras is None:
        return None
    if not isinstance(cameras, dict) or not {"extrinsics", "intrinsics", "image_size"} <= cameras.keys():
        raise ValueError("cameras entries must be None or dicts with 'extrinsics', 'intrinsics' and "
                         "'image_size' (H, W)")
    return cameras


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _plot_xyz(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV world (x right, y down, z forward) to matplotlib's z-up axes as (x, z, -y): the scene
    stands upright as the first camera saw it, depth running into the picture."""
    return p[..., 0], p[..., 2], -p[..., 1]


def _limits(clouds: list[np.ndarray], centres: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """(centre, half side) of one cube for all panels: robust percentiles of all points, widened to
    keep the camera centres in view; a cube, so that all three axes share one scale."""
    pts = np.concatenate([c for c in clouds if len(c)] or [np.zeros((1, 3))])
    lo, hi = np.percentile(pts, _LIMIT_PERCENTILES, axis=0)
    if centres:
        cams = np.concatenate(centres)
        lo, hi = np.minimum(lo, cams.min(axis=0)), np.maximum(hi, cams.max(axis=0))
    half = float((hi - lo).max()) / 2 * 1.05
    return (lo + hi) / 2, half if half > 0 else 1.0


def _draw_frusta(ax, frusta: np.ndarray) -> None:
    """Wireframes: apex to each corner, and the image rectangle."""
    for i, f in enumerate(frusta):
        color = _FIRST_CAMERA_COLOR if i == 0 else _CAMERA_COLOR
        for a, b in _FRUSTUM_EDGES:
            ax.plot(*_plot_xyz(f[[a, b]]), color=color, linewidth=0.8)


def _panel(ax, points: np.ndarray, colors: np.ndarray, centre: np.ndarray, half: float,
           frusta: np.ndarray | None, title: str | None, elev: float, azim: float) -> None:
    inside = (np.abs(points - centre) <= half).all(axis=1)  # clipped points would draw outside the axes
    ax.scatter(*_plot_xyz(points[inside]), c=colors[inside], s=2.0, marker=".", linewidths=0,
               depthshade=False)
    if frusta is not None:
        _draw_frusta(ax, frusta)
    for setter, lo_hi in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim),
                             _plot_xyz(np.stack([centre - half, centre + half]))):
        setter(sorted(lo_hi))
    ax.set_box_aspect((1, 1, 1))
    ax.set_xlabel("x", fontsize=7), ax.set_ylabel("z", fontsize=7), ax.set_zlabel("-y", fontsize=7)
    ax.tick_params(labelsize=5)
    ax.view_init(elev=elev, azim=azim)
    if title:
        ax.set_title(title, fontsize=9)


def render_clouds_png(path: str | os.PathLike, clouds: Sequence[tuple], cameras: Sequence | None = None, *,
                      titles: Sequence[str] | None = None, max_points: int = 20000, elev: float = 20.0,
                      azim: float = -70.0, dpi: int = 110) -> Path:
    """A PNG with one 3D scatter panel per cloud, side by side (e.g. FP and W4A4); returns the path.

    ``clouds``: a sequence of (points (N, 3), colors (N, 3) uint8 or floats in [0, 1]). All panels share
    one set of axis limits, from the 1st-99th percentiles of all clouds (so that a few outliers do not
    squash the view), with equal aspect. Each cloud is drawn from at most ``max_points`` points (seeded
    subsample). ``cameras``: None, or one entry per panel, each None or a dict with ``extrinsics``
    (S, 3, 4) OpenCV camera-from-world, ``intrinsics`` (S, 3, 3) and ``image_size`` (H, W); the cameras
    are drawn as wireframe frusta, the first one in red. The OpenCV world is shown with x to the right,
    z into the picture and -y up. ``elev`` / ``azim`` set the view (degrees, matplotlib's convention;
    the default looks over the first camera's shoulder). The file is written atomically.
    """
    if not clouds:
        raise ValueError("clouds must hold at least one (points, colors) pair")
    cameras = [None] * len(clouds) if cameras is None else list(cameras)
    titles = [None] * len(clouds) if titles is None else list(titles)
    for name, values in (("cameras", cameras), ("titles", titles)):
        if len(values) != len(clouds):
            raise ValueError(f"{name} must have one entry per cloud ({len(clouds)}), got {len(values)}")
    shown = []
    for points, colors in clouds:
        p = _points(points).astype(np.float64)
        c = _colors_float(colors, len(p))
        finite = np.isfinite(p).all(axis=1)
        p, c = p[finite], c[finite]
        idx = _subsample_indices(len(p), max_points, seed=0)
        shown.append((p, c) if idx is None else (p[idx], c[idx]))
    cams = [_camera_set(c) for c in cameras]
    centres = [_camera_centres(_extrinsics(c["extrinsics"])) for c in cams if c is not None]
    centre, half = _limits([p for p, _ in shown], centres)
    depth = FRUSTUM_FRACTION * 2 * half
    frusta = [None if c is None else camera_frustum(c["extrinsics"], c["intrinsics"], c["image_size"], depth)
              for c in cams]
    return _atomic_write(path, lambda f: _save_figure(f, shown, frusta, titles, centre, half, elev, azim, dpi))


def _save_figure(f: BinaryIO, shown, frusta, titles, centre, half, elev, azim, dpi) -> None:
    # The object-oriented API with an explicit Agg canvas: no display needed, and unlike
    # matplotlib.use("Agg") it leaves the backend of an interactive session (pyplot, Jupyter) alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(shown), 4.4))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.0, right=0.97, bottom=0.02, top=0.95, wspace=0.05)  # 3D axes pad themselves
    for i, ((p, c), fr, title) in enumerate(zip(shown, frusta, titles)):
        ax = fig.add_subplot(1, len(shown), i + 1, projection="3d")
        _panel(ax, p, c, centre, half, fr, title, elev, azim)
    fig.savefig(f, format="png", dpi=dpi)
