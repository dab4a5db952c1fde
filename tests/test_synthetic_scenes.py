"""Synthetic multi-view scenes (``archquant.models.synthetic_scenes``): geometry checked against
independent computations (unprojection, cross-view reprojection, analytic intersections), cameras,
determinism, splits and digests (CPU, a few seconds)."""
from __future__ import annotations

import functools
import math

import pytest
import torch

from archquant.models import synthetic_scenes as ss

H, W = 64, 80  # not square, so a swapped height/width shows


@pytest.fixture(scope="module")
def scene() -> ss.Scene:
    return ss.render_scene(11, num_frames=5, height=H, width=W)


def _pixel_grid(h: int, w: int) -> torch.Tensor:
    """(H, W, 3) homogeneous pixel coordinates (u = column, v = row, 1), float64."""
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.stack([u, v, torch.ones_like(u)], dim=-1)


def _project(points: torch.Tensor, k: torch.Tensor, ext: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v) pixel coordinates (..., 2) and camera z (...) of world ``points`` (..., 3)."""
    cam = points.double() @ ext[:, :3].double().T + ext[:, 3].double()
    pix = cam @ k.double().T
    return pix[..., :2] / pix[..., 2:], cam[..., 2]


def test_shapes_dtypes_ranges():
    s = ss.render_scene(3)
    f, h, w = ss.DEFAULT_FRAMES, ss.DEFAULT_HEIGHT, ss.DEFAULT_WIDTH
    assert (f, h, w) == (4, 112, 112)
    assert s.seed == 3
    assert s.images.shape == (f, 3, h, w) and s.images.dtype == torch.float32
    assert s.depth.shape == (f, h, w) and s.depth.dtype == torch.float32
    assert s.world_points.shape == (f, h, w, 3) and s.world_points.dtype == torch.float32
    assert s.valid.shape == (f, h, w) and s.valid.dtype == torch.bool
    assert s.intrinsics.shape == (f, 3, 3) and s.extrinsics.shape == (f, 3, 4)
    assert s.object_ids.shape == (f, h, w) and s.object_ids.dtype == torch.int64
    assert 0.0 <= s.images.min() and s.images.max() <= 1.0
    assert s.images.std() > 0.1  # textured, not a flat colour
    # the enclosing background sphere: every pixel hits something at a finite, positive depth
    assert s.valid.all()
    assert torch.isfinite(s.depth).all() and (s.depth > 0).all()
    assert s.depth.max() < 2 * ss.BACKGROUND_RADIUS
    assert torch.isfinite(s.world_points).all()
    # more than ground and background are seen
    assert len(s.object_ids.unique()) >= 3
    d = s.as_dict()
    assert set(d) >= {"images", "depth", "world_points", "valid", "intrinsics", "extrinsics", "seed"}


def test_intrinsics_pinhole_at_image_centre(scene):
    focal = W / (2 * math.tan(math.radians(ss.DEFAULT_FOV_DEGREES) / 2))
    expected = torch.tensor([[focal, 0, (W - 1) / 2], [0, focal, (H - 1) / 2], [0, 0, 1]], dtype=torch.float32)
    for k in scene.intrinsics:
        torch.testing.assert_close(k, expected)


def test_unprojected_depth_reproduces_world_points(scene):
    grid = _pixel_grid(H, W)
    for k, ext, depth, points, valid in zip(scene.intrinsics, scene.extrinsics, scene.depth, scene.world_points,
                                            scene.valid):
        rays = grid @ torch.linalg.inv(k.double()).T  # (H, W, 3), z = 1
        cam = rays * depth.double()[..., None]
        rot, t = ext[:, :3].double(), ext[:, 3].double()
        world = (cam - t) @ rot  # R^T (x_cam - t), R orthonormal
        err = (world - points.double()).norm(dim=-1)[valid]
        scale = points.double().norm(dim=-1)[valid].clamp_min(1.0)
        assert (err / scale).max() < 1e-4


def test_depth_is_z_not_ray_length(scene):
    ext = scene.extrinsics[0].double()
    cam = scene.world_points[0].double() @ ext[:, :3].T + ext[:, 3]
    torch.testing.assert_close(cam[..., 2], scene.depth[0].double(), rtol=1e-5, atol=1e-5)
    centre_ray = (cam[..., :3].norm(dim=-1) - scene.depth[0].double())
    assert centre_ray.max() > 0.05  # off-axis pixels: ray length exceeds z-depth


@functools.lru_cache(maxsize=None)
def _cached_scene(seed: int) -> ss.Scene:
    return ss.render_scene(seed, num_frames=5, height=H, width=W)


@pytest.mark.parametrize("seed", [11, 2, 7])
@pytest.mark.parametrize("i,j", [(0, 1), (1, 2), (2, 3), (0, 2)])
def test_cross_view_reprojection_colours_agree(seed, i, j):
    scene = _cached_scene(seed)
    k_j, ext_j = scene.intrinsics[j], scene.extrinsics[j]
    points = scene.world_points[i][scene.valid[i]]
    colours_i = scene.images[i].permute(1, 2, 0)[scene.valid[i]]
    uv, z = _project(points, k_j, ext_j)
    col, row = uv[:, 0].round().long(), uv[:, 1].round().long()
    inside = (z > 0) & (col >= 0) & (col < W) & (row >= 0) & (row < H)
    assert inside.float().mean() > 0.3, "the views should overlap"
    col, row, z, colours_i = col[inside], row[inside], z[inside], colours_i[inside]
    depth_j = scene.depth[j][row, col].double()
    visible = (z - depth_j).abs() < 0.01 * z
    assert visible.float().mean() > 0.2
    assert visible.sum() > 500
    diff = (colours_i[visible] - scene.images[j].permute(1, 2, 0)[row[visible], col[visible]]).abs().amax(-1)
    # nearest-pixel sampling of sharp checker/stripe edges mismatches a few pixels; the bulk agrees
    assert diff.median() < 0.03
    assert torch.quantile(diff, 0.75) < 0.08
    # the visible ones really are the same surface point, not just the same depth
    same = (scene.world_points[j][row[visible], col[visible]].double() - points[inside][visible].double()).norm(dim=-1)
    assert torch.quantile(same, 0.9) < 0.05 * z[visible].median()
    # occluded ones are genuinely behind something in view j
    occluded = z - depth_j > 0.01 * z
    assert (depth_j[occluded] < z[occluded]).all()


def _camera_at_origin(h: int, w: int, fov: float = 40.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One camera at the world origin looking along world +z (identity extrinsics)."""
    k = ss.intrinsics_matrix(h, w, fov)[None].float()
    ext = torch.cat([torch.eye(3), torch.zeros(3, 1)], dim=1)[None]
    return k, ext


def _flat_texture(colour=(1.0, 1.0, 1.0)) -> ss.Texture:
    return ss.Texture(kind="checker", colour_a=colour, colour_b=colour, scale=1.0, direction=(1.0, 0.0, 0.0),
                      noise_freqs=((1.0, 0.0, 0.0),), noise_phases=(0.0,), noise_amps=((0.0, 0.0, 0.0),))


def test_analytic_sphere_depth_silhouette_and_shading():
    d, r, n = 5.0, 1.0, 33  # odd size: the centre pixel is exactly on the optical axis
    sphere = ss.Primitive("sphere", (0.0, 0.0, d), (r, r, r), ss.IDENTITY, _flat_texture())
    spec = ss.SceneSpec(primitives=(sphere,), light_dir=(0.0, 0.0, -1.0))  # light from the camera
    k, ext = _camera_at_origin(n, n)
    out = ss.render_spec(spec, k, ext, n, n)
    c = n // 2
    assert out["depth"][0, c, c].item() == pytest.approx(d - r, abs=1e-5)
    # silhouette: a pixel's ray hits iff its distance to the centre line is below r
    rays = _pixel_grid(n, n) @ torch.linalg.inv(k[0].double()).T
    centre = torch.tensor([0.0, 0.0, d], dtype=torch.float64)
    dist = torch.linalg.cross(rays, centre.expand_as(rays), dim=-1).norm(dim=-1) / rays.norm(dim=-1)
    clear = (dist - r).abs() > 1e-6
    assert torch.equal(out["hit"][0][clear], (dist < r)[clear])
    assert 0 < out["hit"].sum() < n * n
    # depth matches the analytic near root of |t*ray - c| = r for every hit pixel (t = z-depth since ray z = 1)
    a, b = (rays * rays).sum(-1), rays @ centre
    t = (b - (b * b - a * (d * d - r * r)).clamp_min(0).sqrt()) / a
    hit = out["hit"][0]
    torch.testing.assert_close(out["depth"][0][hit].double(), t[hit], rtol=1e-5, atol=1e-5)
    # Lambertian: white albedo, shade = ambient + (1 - ambient) * max(0, n . l) with the analytic normal
    points = out["world_points"][0].double()
    normal = (points - centre) / r
    light = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)
    expected = ss.AMBIENT + (1 - ss.AMBIENT) * (normal @ light).clamp_min(0)
    got = out["images"][0].permute(1, 2, 0).double()
    torch.testing.assert_close(got[hit], expected[hit][:, None].expand(-1, 3), rtol=1e-4, atol=1e-4)
    assert got[c, c, 0] == pytest.approx(1.0, abs=1e-4)  # facing the light
    assert (~out["hit"]).any() and (out["object_ids"][0][~hit] == -1).all()


def test_sphere_from_inside_gives_far_root():
    origins = torch.zeros(1, 3, dtype=torch.float64)
    dirs = torch.tensor([[0.0, 0.0, 2.0]], dtype=torch.float64)  # not unit: t scales accordingly
    t = ss.intersect_sphere(origins, dirs, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), 3.0)
    assert t.item() == pytest.approx(2.0)  # hits z = 4 at t = 4 / 2


def test_analytic_boxes_and_plane():
    o = torch.zeros(1, 3, dtype=torch.float64)
    d = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    centre = torch.tensor([0.0, 0.0, 4.0], dtype=torch.float64)
    half = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    assert ss.intersect_box(o, d, centre, half, torch.eye(3, dtype=torch.float64)).item() == pytest.approx(3.5)
    # turned 45 degrees about the camera's vertical (y) axis, an edge faces the camera
    c, s = math.cos(math.pi / 4), math.sin(math.pi / 4)
    rot = torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=torch.float64)
    assert ss.intersect_box(o, d, centre, half, rot).item() == pytest.approx(4.0 - 0.5 * math.sqrt(2))
    # a miss, and a ray pointing away
    assert math.isinf(ss.intersect_box(o, torch.tensor([[1.0, 0, 0]], dtype=torch.float64), centre, half,
                                       rot).item())
    assert math.isinf(ss.intersect_box(o, -d, centre, half, rot).item())
    # plane z = 0 seen from height 2 along a 45-degree downward ray: t = 2 (direction (1, 0, -1))
    o2 = torch.tensor([[0.0, 0.0, 2.0]], dtype=torch.float64)
    down = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    assert ss.intersect_plane(o2, down, torch.zeros(3, dtype=torch.float64), up).item() == pytest.approx(2.0)
    assert math.isinf(ss.intersect_plane(o2, -down, torch.zeros(3, dtype=torch.float64), up).item())
    # box normals: outward, on the face that was hit
    prim = ss.Primitive("box", (0.0, 0.0, 4.0), (0.5, 0.5, 0.5), ss.IDENTITY, _flat_texture())
    n = ss.surface_normal(prim, torch.tensor([[0.0, 0.1, 3.5], [0.5, 0.2, 4.1]], dtype=torch.float64))
    torch.testing.assert_close(n, torch.tensor([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0]], dtype=torch.float64))


def test_box_in_front_of_background_render():
    """A hand-made scene: a box occluding the enclosing background; depth d - h on the axis, the
    background's z-depth elsewhere, and every pixel hit."""
    n = 21
    box = ss.Primitive("box", (0.0, 0.0, 3.0), (0.5, 0.5, 0.5), ss.IDENTITY, _flat_texture((0.2, 0.4, 0.6)))
    bg = ss.Primitive("sphere", (0.0, 0.0, 0.0), (10.0,) * 3, ss.IDENTITY, _flat_texture((0.9, 0.9, 0.9)),
                      emissive=True)
    spec = ss.SceneSpec(primitives=(bg, box), light_dir=(0.0, 0.0, -1.0))
    k, ext = _camera_at_origin(n, n, fov=90.0)
    out = ss.render_spec(spec, k, ext, n, n)
    assert out["hit"].all()
    assert out["depth"][0, n // 2, n // 2].item() == pytest.approx(2.5, abs=1e-5)
    assert out["object_ids"][0, n // 2, n // 2] == 1 and out["object_ids"][0, 0, 0] == 0
    corner = out["world_points"][0, 0, 0].double()
    assert corner.norm().item() == pytest.approx(10.0, abs=1e-4)
    torch.testing.assert_close(out["images"][0, :, 0, 0], torch.tensor([0.9, 0.9, 0.9]))  # unshaded background
    torch.testing.assert_close(out["images"][0, :, n // 2, n // 2], torch.tensor([0.2, 0.4, 0.6]))  # lit face-on


def test_extrinsics_are_rotations_looking_at_scene_centre():
    for seed in range(5):
        s = ss.render_scene(seed, num_frames=8, height=H, width=W)
        for k, ext in zip(s.intrinsics, s.extrinsics):
            rot = ext[:, :3].double()
            torch.testing.assert_close(rot @ rot.T, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
            assert torch.linalg.det(rot).item() == pytest.approx(1.0, abs=1e-6)
            uv, z = _project(torch.tensor(ss.SCENE_CENTRE), k, ext)
            assert z > 0
            assert abs(uv[0] - (W - 1) / 2) < 0.1 * W and abs(uv[1] - (H - 1) / 2) < 0.1 * H
            # roll-free: the camera's x axis is horizontal, its y axis points downwards
            assert abs(rot[0, 2].item()) < 1e-6 and rot[1, 2].item() < 0
            centre_world = -rot.T @ ext[:, 3].double()
            assert centre_world[2] > 0.5  # above the ground
            assert centre_world.norm() < ss.BACKGROUND_RADIUS / 2  # well inside the background


def test_look_at_convention():
    rot, t = ss.look_at((0.0, -5.0, 0.0), (0.0, 0.0, 0.0))  # looking along +y, z up
    torch.testing.assert_close(rot, torch.tensor([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=torch.float64))
    torch.testing.assert_close(rot @ torch.tensor([0.0, -5.0, 0.0], dtype=torch.float64) + t,
                               torch.zeros(3, dtype=torch.float64))


def test_determinism_and_distinct_seeds():
    a = ss.render_scene(5, num_frames=2, height=32, width=40)
    b = ss.render_scene(5, num_frames=2, height=32, width=40)
    for key in ("images", "depth", "world_points", "valid", "intrinsics", "extrinsics", "object_ids"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert ss.scene_digest(a) == ss.scene_digest(b)
    c = ss.render_scene(6, num_frames=2, height=32, width=40)
    assert not torch.equal(a.images, c.images)
    assert ss.scene_digest(a) != ss.scene_digest(c)
    # the scene does not depend on how many views are asked for or the resolution
    assert ss.make_scene_spec(5) == ss.make_scene_spec(5) != ss.make_scene_spec(6)
    more = ss.render_scene(5, num_frames=3, height=32, width=40)
    assert more.spec == a.spec


def test_splits_disjoint_and_digests_distinct():
    splits = {name: ss.scene_seeds(name, 2000) for name in ("train", "calibration", "evaluation")}
    assert all(len(set(s)) == 2000 for s in splits.values())
    names = list(splits)
    for x in range(3):
        for y in range(x + 1, 3):
            assert not set(splits[names[x]]) & set(splits[names[y]])
    assert ss.scene_seeds("evaluation", 3) == ss.scene_seeds("evaluation", 3)
    assert ss.scene_seeds("train", 2, start=5) == ss.scene_seeds("train", 7)[5:]
    with pytest.raises(ValueError):
        ss.scene_seeds("test", 1)
    with pytest.raises(ValueError):
        ss.scene_seeds("train", ss.SPLIT_SIZE + 1)
    calib = {ss.scene_digest(ss.render_scene(s, num_frames=2, height=24, width=24))
             for s in ss.scene_seeds("calibration", 3)}
    evals = {ss.scene_digest(ss.render_scene(s, num_frames=2, height=24, width=24))
             for s in ss.scene_seeds("evaluation", 3)}
    assert len(calib) == 3 and len(evals) == 3 and not calib & evals


def test_background_valid_option_and_stacking():
    s = ss.render_scene(2, num_frames=2, height=32, width=32, background_valid=False)
    background = [i for i, p in enumerate(s.spec.primitives) if p.emissive]
    is_bg = torch.isin(s.object_ids, torch.tensor(background))
    assert is_bg.any() and (~is_bg).any()
    assert torch.equal(s.valid, ~is_bg)
    batch = ss.stack_scenes([s, ss.render_scene(3, num_frames=2, height=32, width=32)])
    assert batch["images"].shape == (2, 2, 3, 32, 32) and batch["seed"].tolist() == [2, 3]


def test_save_scene_grid(tmp_path):
    s = ss.render_scene(1, num_frames=2, height=24, width=24)
    path = tmp_path / "grid.png"
    ss.save_scene_grid(s, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
