"""Real-dataset loaders (Co3Dv2, 7-Scenes) on tiny fake folders written here with known cameras.

The fake Co3D annotations are produced from known OpenCV cameras by an independent forward
conversion (OpenCV -> PyTorch3D R, T and NDC intrinsics) and the fake 7-Scenes depth maps are
ray-cast from a known plane, so the loaders' camera conventions are checked against geometry, not
against their own formulas.
"""
from __future__ import annotations

import gzip
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from archquant.eval.reconstruction_datasets import (
    SEVEN_SCENES_FOCAL,
    load_co3d,
    load_seven_scenes,
    ndc_to_pixel_intrinsics,
    pytorch3d_to_opencv_extrinsics,
    resize_intrinsics,
)

FLIP_XY = np.diag([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- geometry helpers


def rotation_from_quaternion(q) -> np.ndarray:
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def random_opencv_camera(rng: np.random.Generator, height: int, width: int):
    """A camera [R|t] (camera-from-world) that sees the origin, and a K with fx != fy and an
    off-centre principal point (integer pixel centres)."""
    rotation = rotation_from_quaternion(rng.normal(size=4))
    translation = np.array([rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2), rng.uniform(3.0, 4.0)])
    f = rng.uniform(0.9, 1.3) * max(height, width)
    intrinsics = np.array([
        [f, 0.0, (width - 1) / 2 + rng.uniform(-3, 3)],
        [0.0, f * rng.uniform(0.97, 1.03), (height - 1) / 2 + rng.uniform(-3, 3)],
        [0.0, 0.0, 1.0],
    ])
    return np.concatenate([rotation, translation[:, None]], axis=1), intrinsics


def opencv_to_co3d_frame(extrinsics: np.ndarray, intrinsics: np.ndarray, height: int, width: int) -> dict:
    """Independent forward conversion to Co3D's PyTorch3D annotation (ndc_isotropic): PyTorch3D
    view axes are OpenCV's with x, y negated, and it multiplies row vectors from the right."""
    rot_p3d = (FLIP_XY @ extrinsics[:, :3]).T
    trans_p3d = FLIP_XY @ extrinsics[:, 3]
    scale = min(height, width) / 2.0
    # OpenCV pixel centres are integers; PyTorch3D's screen space puts them at half-integers
    cx_screen, cy_screen = intrinsics[0, 2] + 0.5, intrinsics[1, 2] + 0.5
    return {
        "R": rot_p3d.tolist(),
        "T": trans_p3d.tolist(),
        "focal_length": [intrinsics[0, 0] / scale, intrinsics[1, 1] / scale],
        "principal_point": [(width / 2.0 - cx_screen) / scale, (height / 2.0 - cy_screen) / scale],
    }


def project_pytorch3d(point: np.ndarray, frame: dict, height: int, width: int) -> np.ndarray:
    """Pixel (u, v), integer centres, of a world point under a Co3D annotation, following
    PyTorch3D's own definitions (row-vector transform, NDC x left / y up, borders at +-1)."""
    view = point @ np.asarray(frame["R"]) + np.asarray(frame["T"])
    ndc = np.asarray(frame["focal_length"]) * view[:2] / view[2] + np.asarray(frame["principal_point"])
    scale = min(height, width) / 2.0
    return np.array([width / 2.0 - scale * ndc[0], height / 2.0 - scale * ndc[1]]) - 0.5


def project_opencv(point: np.ndarray, extrinsics: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    cam = extrinsics[:, :3] @ point + extrinsics[:, 3]
    pix = intrinsics @ (cam / cam[2])
    return pix[:2]


def to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


# --------------------------------------------------------------------------- fake Co3D


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_jgz(path, payload) -> None:
    with gzip.open(path, "wb") as fout:
        fout.write(json.dumps(payload).encode("utf-8"))


def write_fake_co3d(root, sequences: dict, image_hw=(42, 56), seed=0, images=None):
    """Co3D-style folders under ``root``: ``sequences`` maps category -> {sequence: frame count}.
    Every frame gets a random known OpenCV camera and a PNG (``images(extrinsics, intrinsics)``
    gives its uint8 array, a shared grey gradient otherwise). Returns (co3d_dir, anno_dir, cameras) with
    cameras[(category, filepath)] = (extrinsics, intrinsics)."""
    height, width = image_hw
    co3d_dir, anno_dir = root / "co3d", root / "annotations"
    anno_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    gradient = np.broadcast_to(np.linspace(0, 255, width, dtype=np.uint8)[None, :, None], (height, width, 3))
    shared = png_bytes(np.ascontiguousarray(gradient))
    cameras = {}
    for category, seqs in sequences.items():
        annotation = {}
        for seq, count in seqs.items():
            folder = co3d_dir / category / seq / "images"
            folder.mkdir(parents=True)
            frames = []
            for i in range(count):
                filepath = f"{category}/{seq}/images/frame{i + 1:06d}.png"
                extrinsics, intrinsics = random_opencv_camera(rng, height, width)
                data = shared if images is None else png_bytes(images(extrinsics, intrinsics))
                (co3d_dir / filepath).write_bytes(data)
                cameras[(category, filepath)] = (extrinsics, intrinsics)
                frames.append({"filepath": filepath, **opencv_to_co3d_frame(extrinsics, intrinsics, height, width),
                               "bbox": [0, 0, width, height]})
            annotation[seq] = frames
        write_jgz(anno_dir / f"{category}_test.jgz", annotation)
    return co3d_dir, anno_dir, cameras


# --------------------------------------------------------------------------- fake 7-Scenes

SEVEN_H, SEVEN_W = 480, 640
SEVEN_K = np.array([[585.0, 0.0, 320.0], [0.0, 585.0, 240.0], [0.0, 0.0, 1.0]])
PLANE_Z = 2.5  # the fake scene is the world plane z = PLANE_Z, seen by cameras near the origin


def plane_camera(index: int) -> np.ndarray:
    """Camera-to-world pose of frame ``index``: the first looks straight at the plane, the others
    are turned and moved, so the plane is tilted in their views."""
    if index == 0:
        return np.eye(4)
    angle_y, angle_x = np.deg2rad(8.0 * index), np.deg2rad(-4.0 * index)
    rot_y = np.array([[np.cos(angle_y), 0, np.sin(angle_y)], [0, 1, 0], [-np.sin(angle_y), 0, np.cos(angle_y)]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(angle_x), -np.sin(angle_x)], [0, np.sin(angle_x), np.cos(angle_x)]])
    pose = np.eye(4)
    pose[:3, :3] = rot_y @ rot_x
    pose[:3, 3] = [-0.25 * index, 0.1 * index, 0.2 * index]
    return pose


def plane_depth_mm(pose: np.ndarray) -> np.ndarray:
    """uint16 millimetre z-depth of the plane z = PLANE_Z for the 7-Scenes camera at ``pose``,
    with an invalid (65535) block and a zero block, as the sensor leaves holes."""
    v, u = np.meshgrid(np.arange(SEVEN_H, dtype=np.float64), np.arange(SEVEN_W, dtype=np.float64), indexing="ij")
    rays_cam = np.stack([(u - SEVEN_K[0, 2]) / SEVEN_K[0, 0], (v - SEVEN_K[1, 2]) / SEVEN_K[1, 1],
                         np.ones_like(u)], axis=-1)  # z = 1, so the ray parameter is the z-depth
    rays_world = rays_cam @ pose[:3, :3].T
    depth = (PLANE_Z - pose[2, 3]) / rays_world[..., 2]
    raw = np.round(depth * 1000.0).astype(np.uint16)
    raw[:60, :80] = 65535
    raw[-40:, -120:] = 0
    return raw


def write_fake_seven_scenes(root, layout: dict, depth_fn=None):
    """7-Scenes folders under ``root``: ``layout`` maps scene -> {sequence: frame count}. Frame i of
    a sequence has pose ``plane_camera(i)`` and the plane's depth (or ``depth_fn(i)``)."""
    colour = png_bytes(np.full((SEVEN_H, SEVEN_W, 3), 128, dtype=np.uint8))
    depth_cache = {}
    for scene, sequences in layout.items():
        for seq, count in sequences.items():
            folder = root / scene / seq
            folder.mkdir(parents=True)
            for i in range(count):
                stem = folder / f"frame-{i:06d}"
                pose = plane_camera(i)
                stem.with_name(stem.name + ".color.png").write_bytes(colour)
                if i not in depth_cache:
                    depth_cache[i] = png_bytes(plane_depth_mm(pose) if depth_fn is None else depth_fn(i))
                stem.with_name(stem.name + ".depth.png").write_bytes(depth_cache[i])
                stem.with_name(stem.name + ".pose.txt").write_text(
                    "\n".join("\t".join(f"{x:.9e}" for x in row) for row in pose) + "\n")
    return root


# --------------------------------------------------------------------------- Co3D tests


def test_co3d_shapes_dtypes_and_ranges(tmp_path):
    co3d_dir, anno_dir, _ = write_fake_co3d(tmp_path, {"apple": {"110_1_2": 6}, "bench": {"7_8_9": 6}})
    scenes = load_co3d(co3d_dir, anno_dir, num_frames=4, min_frames=5, image_size=56)
    assert [s["name"] for s in scenes] == ["apple/110_1_2", "bench/7_8_9"]
    for scene in scenes:
        assert set(scene) == {"name", "frame_ids", "images", "extrinsics", "intrinsics", "depth", "valid",
                              "world_points"}
        assert scene["images"].shape == (4, 3, 42, 56) and scene["images"].dtype == torch.float32
        assert 0.0 <= scene["images"].min() and scene["images"].max() <= 1.0
        assert scene["extrinsics"].shape == (4, 3, 4) and scene["extrinsics"].dtype == torch.float32
        assert scene["intrinsics"].shape == (4, 3, 3) and scene["intrinsics"].dtype == torch.float32
        assert scene["depth"] is None and scene["valid"] is None and scene["world_points"] is None
        assert len(scene["frame_ids"]) == len(set(scene["frame_ids"])) == 4
        assert all(f.startswith(scene["name"] + "/images/") for f in scene["frame_ids"])


def test_co3d_recovers_known_cameras_without_resize(tmp_path):
    # 56 wide, 42 high at image_size 56: preprocessing leaves the size alone, so the returned
    # camera must be the original OpenCV camera itself
    co3d_dir, anno_dir, cameras = write_fake_co3d(tmp_path, {"apple": {"s": 5}}, image_hw=(42, 56))
    (scene,) = load_co3d(co3d_dir, anno_dir, num_frames=5, min_frames=5, image_size=56)
    for i, filepath in enumerate(scene["frame_ids"]):
        extrinsics, intrinsics = cameras[("apple", filepath)]
        np.testing.assert_allclose(to_np(scene["extrinsics"][i]), extrinsics, atol=1e-5)
        np.testing.assert_allclose(to_np(scene["intrinsics"][i]), intrinsics, rtol=1e-6, atol=1e-5)


def test_co3d_conversion_helpers_match_pytorch3d_projection():
    rng = np.random.default_rng(3)
    for height, width in [(42, 56), (90, 60)]:
        extrinsics, intrinsics = random_opencv_camera(rng, height, width)
        frame = opencv_to_co3d_frame(extrinsics, intrinsics, height, width)
        got_e = pytorch3d_to_opencv_extrinsics(frame["R"], frame["T"])
        got_k = ndc_to_pixel_intrinsics(frame["focal_length"], frame["principal_point"], height, width)
        np.testing.assert_allclose(got_e, extrinsics, atol=1e-12)
        np.testing.assert_allclose(got_k, intrinsics, atol=1e-9)
        for point in rng.normal(scale=0.5, size=(5, 3)):
            np.testing.assert_allclose(project_opencv(point, got_e, got_k),
                                       project_pytorch3d(point, frame, height, width), atol=1e-9)


BLOB_POINT = np.array([0.05, -0.03, 0.02])


def blob_image(height: int, width: int, sigma: float = 5.0):
    """An image writer for ``write_fake_co3d``: a Gaussian blob where PyTorch3D's own projection
    of the annotation puts BLOB_POINT (so the loader's conversion is not used to draw it)."""
    v, u = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")

    def draw(extrinsics, intrinsics):
        frame = opencv_to_co3d_frame(extrinsics, intrinsics, height, width)
        centre = project_pytorch3d(BLOB_POINT, frame, height, width)
        blob = np.exp(-((u - centre[0]) ** 2 + (v - centre[1]) ** 2) / (2 * sigma**2))
        return np.repeat((255 * blob).round().astype(np.uint8)[..., None], 3, axis=-1)

    return draw


def test_co3d_intrinsics_follow_resize_and_crop(tmp_path):
    # 120 wide, 180 high at image_size 56: resized to 56 x 84, then 14 rows cropped at the top
    height, width = 180, 120
    co3d_dir, anno_dir, cameras = write_fake_co3d(tmp_path, {"apple": {"s": 3}}, image_hw=(height, width),
                                                  seed=11, images=blob_image(height, width))
    (scene,) = load_co3d(co3d_dir, anno_dir, num_frames=3, min_frames=3, image_size=56)
    assert scene["images"].shape == (3, 3, 56, 56)
    scale_x, scale_y, top = 56 / width, 84 / height, 14
    vv, uu = np.meshgrid(np.arange(56), np.arange(56), indexing="ij")
    for i, filepath in enumerate(scene["frame_ids"]):
        extrinsics, intrinsics = cameras[("apple", filepath)]
        u0, v0 = project_opencv(BLOB_POINT, extrinsics, intrinsics)
        # the original camera's pixel carried through the resize (pixel edges map to pixel edges,
        # so centres move by s (u + 0.5) - 0.5) and the crop
        expected = np.array([(u0 + 0.5) * scale_x - 0.5, (v0 + 0.5) * scale_y - 0.5 - top])
        got = project_opencv(BLOB_POINT, to_np(scene["extrinsics"][i]), to_np(scene["intrinsics"][i]))
        np.testing.assert_allclose(got, expected, atol=1e-4)
        np.testing.assert_allclose(to_np(scene["intrinsics"][i]),
                                   resize_intrinsics(intrinsics, (height, width), 56, 14), atol=1e-4)
        # and the blob really is there in the returned image
        weights = scene["images"][i, 0].double().numpy()
        weights = np.where(weights > 0.05, weights, 0.0)
        centroid = np.array([(weights * uu).sum(), (weights * vv).sum()]) / weights.sum()
        np.testing.assert_allclose(centroid, got, atol=0.05)  # a wrong half-pixel is off by 0.27


def test_co3d_frame_draw_is_seeded_and_independent_of_other_categories(tmp_path):
    co3d_dir, anno_dir, _ = write_fake_co3d(
        tmp_path, {"apple": {"a1": 12, "a2": 12}, "bench": {"b1": 12}}, image_hw=(14, 14))
    kwargs = {"num_frames": 4, "min_frames": 10, "image_size": 14}
    first = load_co3d(co3d_dir, anno_dir, seed=5, **kwargs)
    again = load_co3d(co3d_dir, anno_dir, seed=5, **kwargs)
    other = load_co3d(co3d_dir, anno_dir, seed=6, **kwargs)
    only_bench = load_co3d(co3d_dir, anno_dir, categories=["bench"], seed=5, **kwargs)
    assert [s["frame_ids"] for s in first] == [s["frame_ids"] for s in again]
    assert [s["frame_ids"] for s in first] != [s["frame_ids"] for s in other]
    assert only_bench[0]["frame_ids"] == first[2]["frame_ids"]
    # a sequence's draw differs from another sequence's with the same seed and length
    assert [f.rsplit("/", 1)[1] for f in first[0]["frame_ids"]] != \
        [f.rsplit("/", 1)[1] for f in first[1]["frame_ids"]]


def test_co3d_min_frames_and_max_sequences(tmp_path):
    co3d_dir, anno_dir, _ = write_fake_co3d(
        tmp_path, {"apple": {"short": 49, "long": 50, "long2": 50, "long3": 50}}, image_hw=(14, 14))
    names = [s["name"] for s in load_co3d(co3d_dir, anno_dir, num_frames=2, image_size=14)]
    assert names == ["apple/long", "apple/long2", "apple/long3"]  # default min_frames=50
    names = [s["name"] for s in load_co3d(co3d_dir, anno_dir, num_frames=2, min_frames=49, image_size=14)]
    assert "apple/short" in names
    picked = [s["name"] for s in load_co3d(co3d_dir, anno_dir, num_frames=2, max_sequences=2, image_size=14)]
    assert len(picked) == 2 and picked == sorted(picked) and "apple/short" not in picked
    assert picked == [s["name"] for s in load_co3d(co3d_dir, anno_dir, num_frames=2, max_sequences=2,
                                                   image_size=14)]


def test_co3d_skips_sequences_with_absurd_translations(tmp_path):
    co3d_dir, anno_dir, _ = write_fake_co3d(tmp_path, {"apple": {"ok": 3, "broken": 3}}, image_hw=(14, 14))
    path = anno_dir / "apple_test.jgz"
    with gzip.open(path, "rb") as fin:
        annotation = json.loads(fin.read())
    annotation["broken"][1]["T"] = [1e6, 0.0, 0.0]
    write_jgz(path, annotation)
    assert [s["name"] for s in load_co3d(co3d_dir, anno_dir, num_frames=2, min_frames=3,
                                         image_size=14)] == ["apple/ok"]


def test_co3d_errors_name_the_culprit(tmp_path):
    co3d_dir, anno_dir, _ = write_fake_co3d(tmp_path, {"apple": {"s": 4}}, image_hw=(14, 14))
    kwargs = {"num_frames": 4, "min_frames": 4, "image_size": 14}

    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_co3d(missing, anno_dir, **kwargs)

    empty = tmp_path / "empty_annotations"
    empty.mkdir()
    (empty / "apple_train.jgz").write_bytes(b"")  # another split does not count
    with pytest.raises(ValueError, match="Co3D folder without annotations: " + re.escape(str(empty))
                       + r".*\*_test\.jgz") as info:
        load_co3d(co3d_dir, empty, **kwargs)
    assert "\n" not in str(info.value)

    with pytest.raises(FileNotFoundError, match=re.escape(str(anno_dir / "pear_test.jgz"))):
        load_co3d(co3d_dir, anno_dir, categories=["pear"], **kwargs)

    image = co3d_dir / "apple/s/images/frame000002.png"
    image.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(image))):
        load_co3d(co3d_dir, anno_dir, **kwargs)

    corrupt = anno_dir / "apple_test.jgz"
    corrupt.write_bytes(b"\x1f\x8b this is not gzip")
    with pytest.raises(ValueError, match=re.escape(str(corrupt))) as info:
        load_co3d(co3d_dir, anno_dir, **kwargs)
    assert "\n" not in str(info.value)

    write_jgz(corrupt, {"s": [{"filepath": "apple/s/images/frame000001.png", "R": [[1, 0, 0]] * 3}]})
    with pytest.raises(ValueError, match=re.escape(str(corrupt)) + ".*T, focal_length, principal_point"):
        load_co3d(co3d_dir, anno_dir, num_frames=1, min_frames=1, image_size=14)

    write_jgz(corrupt, {"s": [{"filepath": "x.png", "R": [[1, 0, 0]] * 3, "T": [0, 0, "far"],
                               "focal_length": [1, 1], "principal_point": [0, 0]}]})
    with pytest.raises(ValueError, match=re.escape(str(corrupt)) + ".*frame 0 has a malformed T"):
        load_co3d(co3d_dir, anno_dir, num_frames=1, min_frames=1, image_size=14)

    with gzip.open(corrupt, "wb") as fout:
        fout.write(b"{not json")
    with pytest.raises(ValueError, match=re.escape(str(corrupt))):
        load_co3d(co3d_dir, anno_dir, **kwargs)


# --------------------------------------------------------------------------- 7-Scenes tests


@pytest.fixture(scope="module")
def seven_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("seven")
    return write_fake_seven_scenes(root, {"chess": {"seq-01": 3, "seq-02": 2}, "fire": {"seq-01": 2}})


def test_seven_scenes_shapes_dtypes_and_ranges(seven_root):
    scenes = load_seven_scenes(seven_root, num_frames=2, stride=1, image_size=112)
    assert [s["name"] for s in scenes] == ["chess/seq-01", "chess/seq-02", "fire/seq-01"]
    scene = scenes[0]
    assert scene["frame_ids"] == ["frame-000000", "frame-000001"]
    assert scene["images"].shape == (2, 3, 84, 112) and scene["images"].dtype == torch.float32
    assert 0.0 <= scene["images"].min() and scene["images"].max() <= 1.0
    assert scene["depth"].shape == (2, 84, 112) and scene["depth"].dtype == torch.float32
    assert scene["valid"].shape == (2, 84, 112) and scene["valid"].dtype == torch.bool
    assert scene["world_points"].shape == (2, 84, 112, 3) and scene["world_points"].dtype == torch.float32
    assert scene["extrinsics"].shape == (2, 3, 4) and scene["intrinsics"].shape == (2, 3, 3)
    # invalid pixels (65535 and 0 in the file) are marked and zeroed, valid depth is positive
    invalid_share = (60 * 80 + 40 * 120) / (SEVEN_H * SEVEN_W)
    assert abs((~scene["valid"]).float().mean().item() - invalid_share) < 0.005
    assert (scene["depth"][~scene["valid"]] == 0).all() and (scene["depth"][scene["valid"]] > 1.0).all()
    assert (scene["world_points"][~scene["valid"]] == 0).all()
    # the fixed calibration scaled by 112 / 640 (pixel edges to pixel edges)
    np.testing.assert_allclose(to_np(scene["intrinsics"][0]),
                               [[SEVEN_SCENES_FOCAL * 0.175, 0, 320.5 * 0.175 - 0.5],
                                [0, SEVEN_SCENES_FOCAL * 0.175, 240.5 * 0.175 - 0.5], [0, 0, 1]], atol=1e-5)


def test_seven_scenes_extrinsics_invert_the_pose_files(seven_root):
    (scene,) = load_seven_scenes(seven_root, scenes=["chess"], sequences=["seq-01"], num_frames=3, stride=1,
                                 image_size=112)
    for i, frame_id in enumerate(scene["frame_ids"]):
        pose = np.loadtxt(seven_root / "chess" / "seq-01" / f"{frame_id}.pose.txt")
        extrinsics = np.vstack([to_np(scene["extrinsics"][i]), [0, 0, 0, 1]])
        np.testing.assert_allclose(np.linalg.inv(extrinsics), pose, atol=1e-5)


def test_seven_scenes_world_points_lie_on_the_plane_and_agree_across_views(seven_root):
    (scene,) = load_seven_scenes(seven_root, scenes=["chess"], sequences=[1], num_frames=3, stride=1,
                                 image_size=112)
    points, valid, depth = to_np(scene["world_points"]), scene["valid"].numpy(), to_np(scene["depth"])
    for i in range(3):
        np.testing.assert_allclose(points[i][valid[i]][:, 2], PLANE_Z, atol=3e-3)
    # points of view 0 reprojected into views 1 and 2 land where those views see the same depth
    height, width = depth.shape[1:]
    source = points[0][valid[0]]
    for j in (1, 2):
        extrinsics, intrinsics = to_np(scene["extrinsics"][j]), to_np(scene["intrinsics"][j])
        cam = source @ extrinsics[:, :3].T + extrinsics[:, 3]
        pix = cam @ intrinsics.T
        u = np.round(pix[:, 0] / pix[:, 2]).astype(int)
        v = np.round(pix[:, 1] / pix[:, 2]).astype(int)
        inside = (u >= 0) & (u < width) & (v >= 0) & (v < height)
        inside[inside] &= valid[j][v[inside], u[inside]]
        assert inside.sum() > 1000
        np.testing.assert_allclose(depth[j][v[inside], u[inside]], cam[inside, 2], atol=1e-2)
        # the point the other view sees there is the same surface point, up to a pixel's footprint
        gap = np.linalg.norm(points[j][v[inside], u[inside]] - source[inside], axis=-1)
        assert gap.max() < 0.05


def test_seven_scenes_depth_is_resized_nearest(tmp_path):
    def step_depth(i):
        raw = np.full((SEVEN_H, SEVEN_W), 1000, dtype=np.uint16)
        raw[:, 317:] = 3000  # an edge that bilinear resizing would smear into 2 m "flying" points
        return raw

    root = write_fake_seven_scenes(tmp_path, {"heads": {"seq-02": 1}}, depth_fn=step_depth)
    (scene,) = load_seven_scenes(root, num_frames=1, image_size=112)
    assert set(np.unique(scene["depth"].numpy()).tolist()) == {1.0, 3.0}
    assert scene["valid"].all()


def test_seven_scenes_frame_choice_is_stride_then_first(seven_root):
    (scene,) = load_seven_scenes(seven_root, scenes=["chess"], sequences=["seq-01"], num_frames=2, stride=2,
                                 image_size=56)
    assert scene["frame_ids"] == ["frame-000000", "frame-000002"]
    (scene,) = load_seven_scenes(seven_root, scenes=["chess"], sequences=["seq-01"], num_frames=None,
                                 stride=1, image_size=56)
    assert scene["frame_ids"] == ["frame-000000", "frame-000001", "frame-000002"]
    with pytest.raises(ValueError, match=re.escape(str(seven_root / "chess" / "seq-01"))):
        load_seven_scenes(seven_root, scenes=["chess"], sequences=["seq-01"], num_frames=3, stride=2,
                          image_size=56)


def test_seven_scenes_errors_name_the_culprit(tmp_path):
    root = write_fake_seven_scenes(tmp_path / "7scenes", {"chess": {"seq-01": 2}})
    kwargs = {"num_frames": 2, "stride": 1, "image_size": 56}

    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_seven_scenes(missing, **kwargs)

    (root / "office").mkdir()
    with pytest.raises(ValueError, match=re.escape(str(root / "office")) + ".*seq-XX") as info:
        load_seven_scenes(root, scenes=["office"], **kwargs)
    assert "\n" not in str(info.value)

    empty_root = tmp_path / "empty"
    (empty_root / "stairs").mkdir(parents=True)
    with pytest.raises(ValueError, match=re.escape(str(empty_root))):
        load_seven_scenes(empty_root, **kwargs)

    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "chess" / "seq-09"))):
        load_seven_scenes(root, sequences=[9], **kwargs)

    pose = root / "chess" / "seq-01" / "frame-000001.pose.txt"
    pose.write_text("1 0 0\n")
    with pytest.raises(ValueError, match=re.escape(str(pose))):
        load_seven_scenes(root, **kwargs)
    pose.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(pose))):
        load_seven_scenes(root, **kwargs)

    depth = root / "chess" / "seq-01" / "frame-000000.depth.png"
    depth.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(depth))):
        load_seven_scenes(root, num_frames=1, image_size=56)

    small = root / "chess" / "seq-02"
    small.mkdir()
    Image.new("RGB", (320, 240)).save(small / "frame-000000.color.png")
    (small / "frame-000000.depth.png").write_bytes(png_bytes(np.ones((240, 320), dtype=np.uint16)))
    (small / "frame-000000.pose.txt").write_text(" ".join(map(str, np.eye(4).ravel())))
    with pytest.raises(ValueError, match=re.escape(str(small / "frame-000000.color.png")) + ".*640x480"):
        load_seven_scenes(root, sequences=["seq-02"], num_frames=1, image_size=56)
