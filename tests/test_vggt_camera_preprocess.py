"""VGGT camera pose encoding and image preprocessing (archquant.models.vggt)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.spatial.transform import Rotation

from archquant.models.vggt.camera import (
    extrinsics_intrinsics_to_pose_encoding,
    matrix_to_quaternion,
    pose_encoding_to_extrinsics_intrinsics,
    quaternion_to_matrix,
)
from archquant.models.vggt.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalize,
    preprocess_images,
)


# ----------------------------------------------------------------------------- camera


def _random_cameras(batch, frames, height, width, seed, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    n = batch * frames
    rot = Rotation.random(n, random_state=seed).as_matrix()
    trans = rng.normal(scale=3.0, size=(n, 3))
    extr = np.concatenate([rot, trans[:, :, None]], axis=-1).reshape(batch, frames, 3, 4)
    fx, fy = rng.uniform(100, 1000, size=n), rng.uniform(100, 1000, size=n)
    intr = np.zeros((n, 3, 3))
    intr[:, 0, 0], intr[:, 1, 1] = fx, fy
    intr[:, 0, 2], intr[:, 1, 2], intr[:, 2, 2] = width / 2, height / 2, 1.0
    intr = intr.reshape(batch, frames, 3, 3)
    return torch.tensor(extr, dtype=dtype), torch.tensor(intr, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pose_encoding_round_trip(dtype):
    height, width = 392, 518
    extr, intr = _random_cameras(2, 5, height, width, seed=0, dtype=dtype)
    enc = extrinsics_intrinsics_to_pose_encoding(extr, intr, (height, width))
    assert enc.shape == (2, 5, 9) and enc.dtype == dtype
    # the encoding's pieces, checked against independent formulas
    torch.testing.assert_close(enc[..., :3], extr[..., :3, 3])
    q_scipy = Rotation.from_matrix(extr[..., :3, :3].reshape(-1, 3, 3).double().numpy()).as_quat()
    q = enc[..., 3:7].reshape(-1, 4).double().numpy()
    assert np.all(q[:, 3] >= 0)
    sign_free = np.minimum(np.abs(q - q_scipy).max(1), np.abs(q + q_scipy).max(1))
    assert sign_free.max() < 1e-5
    fov_h = 2 * torch.atan(height / 2 / intr[..., 1, 1])
    torch.testing.assert_close(enc[..., 7], fov_h)

    extr_back, intr_back = pose_encoding_to_extrinsics_intrinsics(enc, (height, width))
    assert extr_back.shape == (2, 5, 3, 4) and intr_back.shape == (2, 5, 3, 3)
    assert extr_back.dtype == dtype and intr_back.dtype == dtype
    torch.testing.assert_close(extr_back, extr, atol=1e-5, rtol=0)
    # float32 focal lengths up to 1000: an absolute 1e-5 is below float32 resolution there
    torch.testing.assert_close(intr_back, intr, atol=1e-5, rtol=1e-5 if dtype == torch.float32 else 0)


def test_pose_encoding_leading_dims_and_low_precision():
    extr, intr = _random_cameras(1, 4, 100, 200, seed=1)
    # no batch dim, and a 3-D batch, agree with the (B, S) result
    enc = extrinsics_intrinsics_to_pose_encoding(extr[0], intr[0], (100, 200))
    assert enc.shape == (4, 9)
    enc3 = extrinsics_intrinsics_to_pose_encoding(extr[None], intr[None], (100, 200))
    torch.testing.assert_close(enc3[0, 0], enc)
    # bfloat16 in -> computed in float32 -> bfloat16 out
    enc_bf16 = extrinsics_intrinsics_to_pose_encoding(extr[0].bfloat16(), intr[0].bfloat16(), (100, 200))
    assert enc_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(enc_bf16.double(), enc, atol=0.05, rtol=0.02)


def test_identity_camera_and_known_fov():
    height, width = 392, 518
    f = (width / 2) / math.tan(math.radians(30))
    extr = torch.cat([torch.eye(3), torch.tensor([[1.0], [2.0], [3.0]])], dim=1)[None]
    intr = torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]])[None]
    enc = extrinsics_intrinsics_to_pose_encoding(extr, intr, (height, width))[0]
    torch.testing.assert_close(enc[:3], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(enc[3:7], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert math.degrees(enc[8].item()) == pytest.approx(60.0, abs=1e-4)
    assert math.degrees(enc[7].item()) == pytest.approx(math.degrees(2 * math.atan(height / 2 / f)), abs=1e-4)


def test_matrix_to_quaternion_matches_scipy():
    rot = Rotation.random(200, random_state=3)
    q = matrix_to_quaternion(torch.tensor(rot.as_matrix())).numpy()
    q_scipy = rot.as_quat()  # scalar-last
    assert np.all(q[:, 3] >= 0)
    assert np.minimum(np.abs(q - q_scipy).max(1), np.abs(q + q_scipy).max(1)).max() < 1e-10
    # and back: scipy's matrix of our quaternion
    r_back = quaternion_to_matrix(torch.tensor(q)).numpy()
    np.testing.assert_allclose(r_back, Rotation.from_quat(q).as_matrix(), atol=1e-10)


@pytest.mark.parametrize(
    "axis", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1), (1, -2, 0.5)], ids=["x", "y", "z", "diag", "other"]
)
@pytest.mark.parametrize("angle_deg", [180.0, 179.999, 180.001])
def test_quaternion_robust_near_180_degrees(axis, angle_deg):
    axis = np.asarray(axis, dtype=np.float64)
    axis /= np.linalg.norm(axis)
    rotvec = axis * math.radians(angle_deg)
    rot_np = Rotation.from_rotvec(rotvec).as_matrix()
    rot = torch.tensor(rot_np, dtype=torch.float32)
    q = matrix_to_quaternion(rot)
    assert q.dtype == torch.float32 and q[3] >= 0
    assert torch.linalg.norm(q).item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(quaternion_to_matrix(q), rot, atol=1e-5, rtol=0)
    q_scipy = Rotation.from_matrix(rot_np).as_quat()
    assert min(np.abs(q.numpy() - q_scipy).max(), np.abs(q.numpy() + q_scipy).max()) < 1e-5


def test_quaternion_to_matrix_is_a_rotation_and_normalises():
    q = torch.randn(50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    r = quaternion_to_matrix(q)
    eye = torch.eye(3, dtype=torch.float64).expand(50, 3, 3)
    torch.testing.assert_close(r @ r.transpose(-1, -2), eye)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(50, dtype=torch.float64))
    torch.testing.assert_close(quaternion_to_matrix(-q), r)


# ----------------------------------------------------------------------------- preprocessing


def _smooth_image(height, width, seed=0, low=0.0, high=1.0):
    """A smooth uint8 RGB image (gradients and low-frequency waves), as an HxWx3 array."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    chans = []
    for _ in range(3):
        fy, fx, phase = rng.uniform(1, 4, 3)
        c = 0.5 + 0.25 * np.sin(2 * np.pi * fy * yy / height + phase) + 0.25 * np.cos(2 * np.pi * fx * xx / width)
        chans.append(c)
    img = low + (high - low) * np.clip(np.stack(chans, -1), 0, 1)
    return np.round(img * 255).astype(np.uint8)


def _as_tensor(array):
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0


def test_crop_mode_landscape_shape():
    img = _as_tensor(_smooth_image(480, 640))
    out = preprocess_images([img, img])
    assert out.shape == (2, 3, 392, 518) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    expected = F.interpolate(img[None], size=(392, 518), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(out[0], expected[0].clamp(0, 1))


def test_crop_mode_portrait_is_centre_cropped():
    img = _as_tensor(_smooth_image(640, 480, seed=1))
    out = preprocess_images([img])
    assert out.shape == (1, 3, 518, 518)
    # 640 * 518 / 480 = 690.67 -> 49.33 patches -> 686 rows, cropped by (686 - 518) // 2 = 84 on top
    full = F.interpolate(img[None], size=(686, 518), mode="bicubic", antialias=True, align_corners=False)[0]
    torch.testing.assert_close(out[0], full.clamp(0, 1)[:, 84 : 84 + 518])


def test_pad_mode_white_borders():
    dark = _smooth_image(480, 640, seed=2, high=0.5)
    out = preprocess_images([_as_tensor(dark)], mode="pad")
    assert out.shape == (1, 3, 518, 518)
    # content is 392 rows tall: (518 - 392) / 2 = 63 white rows above and below
    assert torch.all(out[0, :, :63] == 1.0) and torch.all(out[0, :, 518 - 63 :] == 1.0)
    content = out[0, :, 63 : 518 - 63]
    assert content.max() < 0.6  # the dark image, not white, fills the middle rows
    # portrait: white columns left and right, and images of different sizes are fine in pad mode
    portrait = _smooth_image(640, 480, seed=3, high=0.5)
    both = preprocess_images([Image.fromarray(dark), Image.fromarray(portrait)], mode="pad")
    assert both.shape == (2, 3, 518, 518)
    assert torch.all(both[1, :, :, :63] == 1.0) and torch.all(both[1, :, :, 518 - 63 :] == 1.0)
    assert torch.all(both[0, :, :63] == 1.0) and both[1, :, :, 63:455].max() < 0.6


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_tensor_and_pil_paths_agree(mode, tmp_path):
    array = _smooth_image(480, 640, seed=4)
    from_tensor = preprocess_images([_as_tensor(array)], mode=mode)
    from_pil = preprocess_images([Image.fromarray(array)], mode=mode)
    path = tmp_path / "frame.png"
    Image.fromarray(array).save(path)
    from_path = preprocess_images([str(path)], mode=mode)
    assert from_tensor.shape == from_pil.shape == from_path.shape
    torch.testing.assert_close(from_path, from_pil)
    assert (from_tensor - from_pil).abs().mean().item() < 0.02


def test_tiny_target_size():
    img = _as_tensor(_smooth_image(480, 640, seed=5))
    out = preprocess_images([img], target_size=112, patch_size=14)
    assert out.shape == (1, 3, 84, 112)  # 480 * 112 / 640 = 84 = 6 patches
    out = preprocess_images([img], mode="pad", target_size=112, patch_size=14)
    assert out.shape == (1, 3, 112, 112)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        preprocess_images([img], target_size=100, patch_size=14)
    with pytest.raises(ValueError, match="mode"):
        preprocess_images([img], mode="stretch")


def test_crop_mode_refuses_mixed_sizes():
    a = _as_tensor(_smooth_image(480, 640))
    b = _as_tensor(_smooth_image(640, 480))
    with pytest.raises(ValueError, match=r"image 2 \(640x480\)") as err:
        preprocess_images([a, a, b, a])
    assert "\n" not in str(err.value)
    # different input sizes with the same preprocessed shape are fine
    big = _as_tensor(_smooth_image(960, 1280))
    assert preprocess_images([a, big]).shape == (2, 3, 392, 518)


def test_rgba_composited_on_white_and_grayscale():
    rgba = np.zeros((392, 518, 4), dtype=np.uint8)
    rgba[:, :259] = (200, 0, 0, 255)  # opaque red on the left half
    rgba[:, 259:] = (0, 0, 0, 0)  # fully transparent black on the right half
    out_pil = preprocess_images([Image.fromarray(rgba, mode="RGBA")])[0]
    out_tensor = preprocess_images([torch.from_numpy(rgba).permute(2, 0, 1).float() / 255])[0]
    for out in (out_pil, out_tensor):
        assert out.shape == (3, 392, 518)
        torch.testing.assert_close(out[:, 200, 400], torch.ones(3))
        torch.testing.assert_close(out[:, 200, 100], torch.tensor([200 / 255, 0.0, 0.0]), atol=1e-5, rtol=0)

    gray = _smooth_image(480, 640, seed=6)[..., 0]
    out = preprocess_images([Image.fromarray(gray, mode="L"), torch.from_numpy(gray)[None].float() / 255])
    assert out.shape == (2, 3, 392, 518)
    for o in out:
        torch.testing.assert_close(o[0], o[1])
        torch.testing.assert_close(o[0], o[2])


def test_normalize():
    images = torch.rand(2, 3, 14, 14, generator=torch.Generator().manual_seed(0))
    out = normalize(images)
    for c in range(3):
        torch.testing.assert_close(out[:, c], (images[:, c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c])
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
