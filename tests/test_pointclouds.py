"""Point-cloud outputs (archquant.eval.pointclouds): PLY files checked byte by byte and by round trip,
point maps to clouds, frusta against an independent projection, and the rendered PNG."""
import numpy as np
import pytest
import torch

from archquant.eval import pointclouds as pc
from archquant.eval.pointclouds import (
    camera_frustum,
    pointmap_to_cloud,
    read_ply,
    render_clouds_png,
    write_ply,
)

PROPERTY_LINES = [b"property float x", b"property float y", b"property float z",
                  b"property uchar red", b"property uchar green", b"property uchar blue"]


def random_cloud(n=50, seed=0):
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(n, 3)) * np.array([1e-3, 1.0, 1e4])  # tiny, plain and large magnitudes
    colors = rng.integers(0, 256, size=(n, 3), dtype=np.uint8)
    return points, colors


def random_rotation(rng) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q if np.linalg.det(q) > 0 else -q


# --------------------------------------------------------------------------------------------
# PLY
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "ascii"])
def test_ply_round_trip_is_exact(tmp_path, binary):
    points, colors = random_cloud()
    path = write_ply(tmp_path / "cloud.ply", points, colors, binary=binary)
    got_points, got_colors = read_ply(path)
    assert got_points.dtype == np.float32 and got_colors.dtype == np.uint8
    np.testing.assert_array_equal(got_points, points.astype(np.float32))
    np.testing.assert_array_equal(got_colors, colors)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "ascii"])
def test_header_is_what_a_standard_ply_reader_expects(tmp_path, binary):
    points, colors = random_cloud(n=3)
    data = write_ply(tmp_path / "c.ply", points, colors, binary=binary).read_bytes()
    fmt = b"format binary_little_endian 1.0" if binary else b"format ascii 1.0"
    header = b"\n".join([b"ply", fmt, b"element vertex 3", *PROPERTY_LINES, b"end_header"]) + b"\n"
    assert data.startswith(header)
    body = data[len(header):]
    if binary:
        assert len(body) == 3 * 15  # 3 float32 + 3 uchar, no padding
        assert np.frombuffer(body[:4], "<f4")[0] == np.float32(points[0, 0])
    else:
        rows = body.decode().splitlines()
        assert len(rows) == 3 and [int(v) for v in rows[0].split()[3:]] == colors[0].tolist()


def test_torch_inputs_and_empty_cloud(tmp_path):
    points, colors = random_cloud(n=4)
    write_ply(tmp_path / "t.ply", torch.from_numpy(points).to(torch.bfloat16), torch.from_numpy(colors))
    got, got_colors = read_ply(tmp_path / "t.ply")
    np.testing.assert_array_equal(got, torch.from_numpy(points).to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(got_colors, colors)
    for binary in (True, False):
        write_ply(tmp_path / "e.ply", np.zeros((0, 3)), np.zeros((0, 3)), binary=binary)
        got, got_colors = read_ply(tmp_path / "e.ply")
        assert got.shape == (0, 3) and got_colors.shape == (0, 3)


def test_non_finite_points_are_dropped_with_their_colours(tmp_path):
    points, colors = random_cloud(n=6)
    points[1, 0] = np.nan
    points[3, 2] = np.inf
    points[4, 1] = 1e300  # finite in float64, inf in float32
    write_ply(tmp_path / "c.ply", points, colors)
    got, got_colors = read_ply(tmp_path / "c.ply")
    keep = [0, 2, 5]
    np.testing.assert_array_equal(got, points[keep].astype(np.float32))
    np.testing.assert_array_equal(got_colors, colors[keep])
    assert (tmp_path / "c.ply").read_bytes().count(b"element vertex 3\n") == 1


def test_float_colours_become_round_255x_clipped(tmp_path):
    values = np.array([0.0, 0.2, 0.5, 1.0, -0.1, 1.3, 0.999, 0.001, np.nan])
    colors = np.repeat(values[:, None], 3, axis=1).astype(np.float32)
    write_ply(tmp_path / "c.ply", np.zeros((len(values), 3)), colors)
    _, got = read_ply(tmp_path / "c.ply")
    expected = [round(255 * min(max(float(v), 0.0), 1.0)) for v in values[:-1].astype(np.float32)] + [0]
    assert got[:, 0].tolist() == expected
    assert (got == got[:, :1]).all()


def test_write_errors_name_the_argument(tmp_path):
    points, colors = random_cloud(n=5)
    with pytest.raises(ValueError, match=r"^points must have shape \(N, 3\)"):
        write_ply(tmp_path / "x.ply", points[:, :2], colors)
    with pytest.raises(ValueError, match=r"^colors must have shape \(N, 3\) with N=5"):
        write_ply(tmp_path / "x.ply", points, colors[:4])
    with pytest.raises(ValueError, match=r"^colors must be floats in \[0, 1\] or uint8"):
        write_ply(tmp_path / "x.ply", points, colors.astype(np.int64))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "c.ply"
    path.write_bytes(b"old")

    def fail(f, vertices, binary):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pc, "_write_vertices", fail)
    with pytest.raises(OSError, match="disk full"):
        write_ply(path, *random_cloud(n=3))
    assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == b"old"


def test_read_errors_name_the_file(tmp_path):
    points, colors = random_cloud(n=3)
    bad = tmp_path / "not_a.ply"
    bad.write_bytes(b"hello\n")
    with pytest.raises(ValueError, match=r"not_a\.ply: not a PLY file"):
        read_ply(bad)
    # another layout: double coordinates
    good = write_ply(tmp_path / "good.ply", points, colors).read_bytes()
    other = tmp_path / "double.ply"
    other.write_bytes(good.replace(b"property float x", b"property double x"))
    with pytest.raises(ValueError, match=r"double\.ply: not a PLY in write_ply's layout"):
        read_ply(other)
    big = tmp_path / "big.ply"
    big.write_bytes(good.replace(b"binary_little_endian", b"binary_big_endian"))
    with pytest.raises(ValueError, match=r"big\.ply: not a PLY in write_ply's layout"):
        read_ply(big)
    truncated = tmp_path / "truncated.ply"
    truncated.write_bytes(good[:-1])
    with pytest.raises(ValueError, match=r"truncated\.ply: .*truncated"):
        read_ply(truncated)
    # comments, which other writers add, are fine
    commented = tmp_path / "commented.ply"
    commented.write_bytes(good.replace(b"element vertex", b"comment made elsewhere\nelement vertex"))
    np.testing.assert_array_equal(read_ply(commented)[1], colors)


# --------------------------------------------------------------------------------------------
# Point maps
# --------------------------------------------------------------------------------------------
def pointmap(s=2, h=3, w=4):
    """Points whose x is the flat pixel index, and images whose red channel is the same index / 100,
    so every colour can be traced back to its point."""
    index = torch.arange(s * h * w, dtype=torch.float32).reshape(s, h, w)
    world = torch.stack([index, torch.zeros_like(index), torch.ones_like(index)], dim=-1)
    images = torch.stack([index / 100, torch.zeros_like(index), torch.ones_like(index)], dim=1)
    return world, images


def test_pointmap_to_cloud_keeps_valid_finite_points_with_their_colours():
    world, images = pointmap()
    world[0, 0, 1, 2] = float("nan")  # index 1
    world[1, 2, 3, 0] = float("inf")  # index 23
    valid = torch.ones(2, 3, 4, dtype=torch.bool)
    valid[0, 1, :] = False  # indices 4..7
    points, colors = pointmap_to_cloud(world, images, valid)
    expected = [i for i in range(24) if i not in (1, 23, 4, 5, 6, 7)]
    assert points.dtype == np.float32 and colors.dtype == np.float32
    assert points[:, 0].tolist() == expected
    np.testing.assert_allclose(colors[:, 0], points[:, 0] / 100, rtol=1e-6)
    assert (colors[:, 2] == 1).all()
    assert len(pointmap_to_cloud(world, images)[0]) == 22  # only the non-finite two without a mask


def test_pointmap_subsampling_is_deterministic_and_a_subset():
    world, images = pointmap(s=3, h=8, w=8)
    full, _ = pointmap_to_cloud(world, images)
    a, ca = pointmap_to_cloud(world, images, max_points=50, seed=1)
    b, _ = pointmap_to_cloud(world, images, max_points=50, seed=1)
    c, _ = pointmap_to_cloud(world, images, max_points=50, seed=2)
    assert len(a) == 50 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert set(a[:, 0].tolist()) <= set(full[:, 0].tolist())
    assert (np.diff(a[:, 0]) > 0).all()  # the order of frames and pixels is kept
    np.testing.assert_allclose(ca[:, 0], a[:, 0] / 100, rtol=1e-6)
    assert len(pointmap_to_cloud(world, images, max_points=10_000)[0]) == len(full)


def test_pointmap_errors_name_the_argument():
    world, images = pointmap()
    with pytest.raises(ValueError, match=r"^world_points must have shape"):
        pointmap_to_cloud(world[..., :2], images)
    with pytest.raises(ValueError, match=r"^images must have shape \(S, 3, H, W\)"):
        pointmap_to_cloud(world, images.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"^valid must be a bool mask"):
        pointmap_to_cloud(world, images, torch.ones(2, 3, 4))


# --------------------------------------------------------------------------------------------
# Cameras and rendering
# --------------------------------------------------------------------------------------------
def cameras(s=3, seed=0, h=24, w=32):
    rng = np.random.default_rng(seed)
    extrinsics = np.stack([np.concatenate([random_rotation(rng), rng.normal(size=(3, 1))], axis=1)
                           for _ in range(s)])
    intrinsics = np.stack([np.array([[f, 0, w / 2 + dx], [0, f * 1.1, h / 2 - dx], [0, 0, 1]])
                           for f, dx in zip(rng.uniform(20, 40, s), rng.uniform(-2, 2, s))])
    return {"extrinsics": extrinsics, "intrinsics": intrinsics, "image_size": (h, w)}


def test_frustum_apex_is_the_centre_and_corners_project_to_the_image_corners():
    cams = cameras()
    h, w = cams["image_size"]
    frusta = camera_frustum(cams["extrinsics"], cams["intrinsics"], cams["image_size"], depth=0.7)
    assert frusta.shape == (3, 5, 3)
    for e, k, f in zip(cams["extrinsics"], cams["intrinsics"], frusta):
        r, t = e[:, :3], e[:, 3]
        np.testing.assert_allclose(r @ f[0] + t, 0, atol=1e-5)  # the apex is the camera centre
        cam = f[1:] @ r.T + t  # x_cam = R x_world + t
        np.testing.assert_allclose(cam[:, 2], 0.7, atol=1e-5)
        uv = cam @ k.T
        np.testing.assert_allclose(uv[:, :2] / uv[:, 2:], [[0, 0], [w, 0], [w, h], [0, h]], atol=1e-5)
    # (S, 4, 4) extrinsics and torch tensors give the same frusta
    e44 = np.tile(np.eye(4), (3, 1, 1))
    e44[:, :3] = cams["extrinsics"]
    same = camera_frustum(torch.from_numpy(e44), torch.from_numpy(cams["intrinsics"]), (h, w), 0.7)
    np.testing.assert_allclose(same, frusta, atol=1e-12)


def read_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def test_render_writes_one_panel_per_cloud(tmp_path):
    rng = np.random.default_rng(0)
    points = rng.normal(size=(300, 3)) + [0, 0, 4]
    points[:3] = 1e6  # outliers must not break the limits
    colors = rng.uniform(size=(300, 3))
    fp = (points, colors)
    w4 = (torch.from_numpy(points + rng.normal(size=points.shape) * 0.05), (colors * 255).astype(np.uint8))
    two = render_clouds_png(tmp_path / "two.png", [fp, w4], [cameras(), None], titles=["FP", "W4A4"],
                            max_points=200, dpi=40)
    one = render_clouds_png(tmp_path / "one.png", [fp], max_points=200, dpi=40)
    assert two == tmp_path / "two.png"
    img_two, img_one = read_png(two), read_png(one)
    assert img_two.shape[0] == img_one.shape[0] and img_two.shape[1] > 1.5 * img_one.shape[1]
    assert img_two[..., :3].std() > 0  # something was drawn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "two.png"]  # no temporaries left


def test_render_limits_are_robust_and_shared():
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, size=(1000, 3))
    a[0] = [1e6, 0, 0]  # one stray point
    centre, half = pc._limits([a, a * 0.5], [])
    assert half < 1.2 and np.abs(centre).max() < 0.1
    cam_centre = np.array([[0.0, 0.0, -3.0]])  # cameras stay in view
    centre, half = pc._limits([a], [cam_centre])
    assert centre[2] - half <= -3.0


def test_render_errors(tmp_path):
    cloud = (np.zeros((4, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"^titles must have one entry per cloud \(2\)"):
        render_clouds_png(tmp_path / "x.png", [cloud, cloud], titles=["FP"])
    with pytest.raises(ValueError, match=r"^cameras must have one entry per cloud \(1\)"):
        render_clouds_png(tmp_path / "x.png", [cloud], [None, None])
    with pytest.raises(ValueError, match=r"^cameras entries must be None or dicts"):
        render_clouds_png(tmp_path / "x.png", [cloud], [np.zeros((1, 3, 4))])
    with pytest.raises(ValueError, match=r"^clouds must hold at least one"):
        render_clouds_png(tmp_path / "x.png", [])
    assert list(tmp_path.iterdir()) == []
