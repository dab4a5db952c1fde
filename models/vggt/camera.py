"""VGGT's camera pose encoding ("absT_quaR_FoV") and quaternion <-> rotation-matrix conversion.

Conventions:

* extrinsics are OpenCV camera-from-world matrices ``[R | t]`` of shape (..., 3, 4):
  ``x_cam = R @ x_world + t``; the camera looks along +z, x points right and y down;
* intrinsics are pinhole matrices (..., 3, 3) ``[[f_x, 0, c_x], [0, f_y, c_y], [0, 0, 1]]``;
  the encoding keeps only the focal lengths (as fields of view) and decodes with the principal
  point at the image centre ``(W / 2, H / 2)``;
* quaternions are scalar-LAST ``(x, y, z, w)``, canonicalised to ``w >= 0``;
* the encoding of one frame is ``[t_x, t_y, t_z, q_x, q_y, q_z, q_w, fov_h, fov_w]`` with
  ``fov_h = 2 atan((H / 2) / f_y)`` and ``fov_w = 2 atan((W / 2) / f_x)`` in radians.

Every function accepts arbitrary leading batch dimensions, computes in at least float32 and
returns tensors in the dtype of its (first) input.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "POSE_ENCODING_DIM",
    "quaternion_to_matrix",
    "matrix_to_quaternion",
    "extrinsics_intrinsics_to_pose_encoding",
    "pose_encoding_to_extrinsics_intrinsics",
]

#: length of one frame's pose encoding: translation (3), quaternion (4), fov_h, fov_w
POSE_ENCODING_DIM = 9


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (half, bfloat16, float32, integers) is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _image_hw(image_size_hw: Sequence[int] | torch.Tensor) -> tuple[float, float]:
    if isinstance(image_size_hw, torch.Tensor):
        image_size_hw = image_size_hw.tolist()
    if len(image_size_hw) != 2:
        raise ValueError(f"image_size_hw must be (height, width), got {image_size_hw!r}")
    height, width = (float(v) for v in image_size_hw)
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size_hw must be positive, got {image_size_hw!r}")
    return height, width


def quaternion_to_matrix(q_xyzw: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) of quaternions (..., 4) in scalar-last (x, y, z, w) order.

    The quaternion need not be unit length: it is normalised first (q and -q give the same R).
    """
    if q_xyzw.shape[-1] != 4:
        raise ValueError(f"quaternions must have a last dimension of 4, got {tuple(q_xyzw.shape)}")
    out_dtype = q_xyzw.dtype if q_xyzw.is_floating_point() else torch.float32
    q = q_xyzw.to(_compute_dtype(q_xyzw.dtype))
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
    x, y, z, w = q.unbind(-1)
    xx, yy, zz = x * x, y * y, z * z
    xy, xz, yz = x * y, x * z, y * z
    wx, wy, wz = w * x, w * y, w * z
    rows = (
        1 - 2 * (yy + zz), 2 * (xy - wz), 2 * (xz + wy),
        2 * (xy + wz), 1 - 2 * (xx + zz), 2 * (yz - wx),
        2 * (xz - wy), 2 * (yz + wx), 1 - 2 * (xx + yy),
    )
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3).to(out_dtype)


def matrix_to_quaternion(matrix: torch.Tensor) -> torch.Tensor:
    """Scalar-last unit quaternions (..., 4) of rotation matrices (..., 3, 3), with ``w >= 0``.

    Uses the "largest diagonal" branch method: four candidate quaternions are formed, each
    divided by one of 4|w|, 4|x|, 4|y|, 4|z|, and per matrix the candidate whose divisor is the
    largest (so never close to zero) is kept. This stays accurate for rotations by (nearly)
    180 degrees, where ``w`` -> 0 and the trace-based formula alone breaks down.
    """
    if matrix.shape[-2:] != (3, 3):
        raise ValueError(f"rotation matrices must be (..., 3, 3), got {tuple(matrix.shape)}")
    out_dtype = matrix.dtype if matrix.is_floating_point() else torch.float32
    m = matrix.to(_compute_dtype(matrix.dtype))
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]

    # 4 w^2, 4 x^2, 4 y^2, 4 z^2 of a unit quaternion
    four_sq = torch.stack(
        (
            1 + m00 + m11 + m22,
            1 + m00 - m11 - m22,
            1 - m00 + m11 - m22,
            1 - m00 - m11 + m22,
        ),
        dim=-1,
    )
    # candidates in (x, y, z, w) order, each equal to (4 * component) * q for its own component
    cand_w = torch.stack((m21 - m12, m02 - m20, m10 - m01, four_sq[..., 0]), dim=-1)
    cand_x = torch.stack((four_sq[..., 1], m01 + m10, m02 + m20, m21 - m12), dim=-1)
    cand_y = torch.stack((m01 + m10, four_sq[..., 2], m12 + m21, m02 - m20), dim=-1)
    cand_z = torch.stack((m02 + m20, m12 + m21, four_sq[..., 3], m10 - m01), dim=-1)
    candidates = torch.stack((cand_w, cand_x, cand_y, cand_z), dim=-2)  # (..., 4, 4)

    best = four_sq.argmax(dim=-1)  # (...,)
    index = best[..., None, None].expand(*best.shape, 1, 4)
    q = candidates.gather(-2, index).squeeze(-2)
    # dividing by the norm is the same as dividing by 4 * |component| for an exact rotation, and
    # also projects slightly non-orthogonal inputs onto a unit quaternion
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
    q = torch.where(q[..., 3:4] < 0, -q, q)
    return q.to(out_dtype)


def extrinsics_intrinsics_to_pose_encoding(
    extrinsics: torch.Tensor,
    intrinsics: torch.Tensor,
    image_size_hw: Sequence[int] | torch.Tensor,
) -> torch.Tensor:
    """Encode cameras as VGGT's 9-D "absT_quaR_FoV" vectors.

    Args:
        extrinsics: (..., S, 3, 4) camera-from-world ``[R | t]`` (a (..., 4, 4) homogeneous
            matrix is accepted too; its last row is ignored).
        intrinsics: (..., S, 3, 3) pinhole intrinsics; only ``f_x = K[0, 0]`` and
            ``f_y = K[1, 1]`` are encoded.
        image_size_hw: (H, W) of the images the intrinsics refer to, in pixels.

    Returns:
        (..., S, 9) ``[t (3), q_xyzw (4), fov_h, fov_w]`` in the dtype of ``extrinsics``.
    """
    if extrinsics.shape[-2:] not in ((3, 4), (4, 4)):
        raise ValueError(f"extrinsics must be (..., 3, 4) or (..., 4, 4), got {tuple(extrinsics.shape)}")
    if intrinsics.shape[-2:] != (3, 3):
        raise ValueError(f"intrinsics must be (..., 3, 3), got {tuple(intrinsics.shape)}")
    if extrinsics.shape[:-2] != intrinsics.shape[:-2]:
        raise ValueError(
            f"extrinsics {tuple(extrinsics.shape)} and intrinsics {tuple(intrinsics.shape)} "
            "have different batch dimensions"
        )
    height, width = _image_hw(image_size_hw)
    out_dtype = extrinsics.dtype if extrinsics.is_floating_point() else torch.float32
    compute = _compute_dtype(extrinsics.dtype)
    extr = extrinsics[..., :3, :].to(compute)
    intr = intrinsics.to(compute)

    translation = extr[..., :3, 3]
    quaternion = matrix_to_quaternion(extr[..., :3, :3])
    fov_h = 2 * torch.atan((height / 2) / intr[..., 1, 1])
    fov_w = 2 * torch.atan((width / 2) / intr[..., 0, 0])
    encoding = torch.cat((translation, quaternion, fov_h[..., None], fov_w[..., None]), dim=-1)
    return encoding.to(out_dtype)


def pose_encoding_to_extrinsics_intrinsics(
    pose_encoding: torch.Tensor,
    image_size_hw: Sequence[int] | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode VGGT's 9-D pose encodings into (extrinsics (..., S, 3, 4), intrinsics (..., S, 3, 3)).

    The quaternion is normalised before use; the principal point is the image centre
    ``(W / 2, H / 2)`` and the focal lengths are ``f_y = (H / 2) / tan(fov_h / 2)``,
    ``f_x = (W / 2) / tan(fov_w / 2)``.
    """
    if pose_encoding.shape[-1] != POSE_ENCODING_DIM:
        raise ValueError(
            f"pose encodings must have a last dimension of {POSE_ENCODING_DIM}, "
            f"got {tuple(pose_encoding.shape)}"
        )
    height, width = _image_hw(image_size_hw)
    out_dtype = pose_encoding.dtype if pose_encoding.is_floating_point() else torch.float32
    enc = pose_encoding.to(_compute_dtype(pose_encoding.dtype))

    translation = enc[..., :3]
    rotation = quaternion_to_matrix(enc[..., 3:7])
    extrinsics = torch.cat((rotation, translation[..., None]), dim=-1)

    fov_h, fov_w = enc[..., 7], enc[..., 8]
    f_y = (height / 2) / torch.tan(fov_h / 2)
    f_x = (width / 2) / torch.tan(fov_w / 2)
    intrinsics = torch.zeros(*enc.shape[:-1], 3, 3, dtype=enc.dtype, device=enc.device)
    intrinsics[..., 0, 0] = f_x
    intrinsics[..., 1, 1] = f_y
    intrinsics[..., 0, 2] = width / 2
    intrinsics[..., 1, 2] = height / 2
    intrinsics[..., 2, 2] = 1.0
    return extrinsics.to(out_dtype), intrinsics.to(out_dtype)
