"""3D reconstruction metrics for feed-forward multi-view models (VGGT), FP vs quantized.

Three families, following the VGGT / QuantVGGT evaluation protocols:

* **Camera pose** (``pose_metrics``): RRA@15, RTA@15 and AUC@30 over all frame pairs of a scene.
  A feed-forward model predicts cameras in the frame of its first input view and at an arbitrary
  scale, so the poses are first expressed relative to the first camera (which removes any global
  rigid transform) and only the *direction* of relative translations is scored (which removes the
  global scale).
* **Depth** (``depth_metrics``): AbsRel and delta<1.25 after median-scale or least-squares
  scale-and-shift alignment, because predicted depth is only defined up to scale.
* **Point maps** (``pointmap_metrics``): Accuracy, Completeness and Chamfer distance after a
  Umeyama similarity alignment (``umeyama_sim3``) of the predicted points to the ground truth,
  because predicted points live in an arbitrary similarity frame.

Conventions: extrinsics are OpenCV camera-from-world matrices ``[R|t]`` (``x_cam = R x_world + t``)
of shape (S, 3, 4) or (S, 4, 4) for S frames. Inputs are torch tensors; computation is done in
float64 (numpy / scipy) so that the metrics do not depend on the dtype the model ran in; scalar
results are Python floats.
"""
from __future__ import annotations

import numpy as np
import torch

# Thresholds of the VGGT protocol, in degrees.
POSE_THRESHOLD_DEG = 15.0
AUC_MAX_THRESHOLD_DEG = 30
DELTA_THRESHOLD = 1.25
DEFAULT_MAX_POINTS = 100_000

# A translation is treated as zero-length when its norm is below this fraction of the largest
# relative-translation norm in the same set (prediction or ground truth). Relative, so that the
# decision does not depend on the (arbitrary) scale of the reconstruction.
_ZERO_TRANSLATION_RTOL = 1e-9


# --------------------------------------------------------------------------------------------
# Homogeneous helpers
# --------------------------------------------------------------------------------------------
def _as_numpy64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """float64 numpy copy of a tensor: metrics must not inherit bf16/fp16 rounding of the input."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def to_homogeneous(extrinsics: torch.Tensor) -> torch.Tensor:
    """(S, 3, 4) or (S, 4, 4) extrinsics -> (S, 4, 4) float64, so that poses compose by matmul."""
    e = torch.as_tensor(extrinsics).detach().to("cpu", torch.float64)
    if e.ndim != 3 or e.shape[-1] != 4 or e.shape[-2] not in (3, 4):
        raise ValueError(f"extrinsics must have shape (S, 3, 4) or (S, 4, 4), got {tuple(e.shape)}")
    if e.shape[-2] == 4:
        return e.clone()
    out = torch.zeros(e.shape[0], 4, 4, dtype=torch.float64)
    out[:, :3, :] = e
    out[:, 3, 3] = 1.0
    return out


def invert_se3(poses: torch.Tensor) -> torch.Tensor:
    """Closed-form inverse of (S, 4, 4) rigid transforms ([R|t]^-1 = [R^T | -R^T t]).

    Exact for rigid poses and better conditioned than a generic matrix inverse.
    """
    r = poses[:, :3, :3]
    t = poses[:, :3, 3:]
    out = torch.zeros_like(poses)
    out[:, :3, :3] = r.transpose(1, 2)
    out[:, :3, 3:] = -r.transpose(1, 2) @ t
    out[:, 3, 3] = 1.0
    return out


def relative_to_first(extrinsics: torch.Tensor) -> torch.Tensor:
    """Camera-from-world poses re-expressed with the first camera as the world frame.

    ``T_i' = T_i T_0^{-1}``, so ``T_0' = I``. A global rigid change of world frame ``G``
    (``T_i -> T_i G``) cancels out, which is why prediction and ground truth can be compared
    without any registration. Returns (S, 4, 4) float64.
    """
    t = to_homogeneous(extrinsics)
    return t @ invert_se3(t[:1])


def _pair_indices(num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """All pairs i < j (the protocol scores every unordered pair once)."""
    i, j = np.triu_indices(num_frames, k=1)
    return i, j


def relative_pair_poses(extrinsics: torch.Tensor) -> torch.Tensor:
    """(S(S-1)/2, 4, 4) relative poses ``T_ij = T_i^{-1} T_j`` for all pairs i < j.

    Poses are first made relative to the first camera (see ``relative_to_first``); pairs are in
    ``np.triu_indices`` order.
    """
    t = relative_to_first(extrinsics)
    i, j = _pair_indices(t.shape[0])
    return invert_se3(t[i]) @ t[j]


# --------------------------------------------------------------------------------------------
# Pose errors and metrics
# --------------------------------------------------------------------------------------------
def _quaternions(rotations: np.ndarray) -> np.ndarray:
    """Unit quaternions of (N, 3, 3) rotations (scipy projects slightly non-orthonormal input)."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(rotations).as_quat()


def rotation_angle_errors(pred_rotations: torch.Tensor, gt_rotations: torch.Tensor) -> torch.Tensor:
    """Geodesic angle in degrees between (N, 3, 3) rotation pairs, via quaternions.

    ``theta = arccos(1 - 2 (1 - <q_hat, q>^2))``: squaring the dot product makes the result blind
    to the ``q`` / ``-q`` sign ambiguity; the argument is clamped to [-1, 1] so that rounding near
    0 or 180 degrees cannot produce NaN.
    """
    qp = _quaternions(_as_numpy64(pred_rotations))
    qg = _quaternions(_as_numpy64(gt_rotations))
    dot = np.sum(qp * qg, axis=-1)
    cos = np.clip(1.0 - 2.0 * (1.0 - dot**2), -1.0, 1.0)
    return torch.from_numpy(np.degrees(np.arccos(cos)))


def translation_angle_errors(pred_translations: torch.Tensor, gt_translations: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between (N, 3) translation directions, folded to ``min(theta, 180 - theta)``.

    Only directions are compared because feed-forward reconstructions have no metric scale. The
    fold makes the error blind to the sign of the direction (the protocol of VGGT / PoseDiffusion),
    so it lies in [0, 90].

    Zero-length translations (norm below ``1e-9`` times the largest norm in the same set) have no
    direction: the error is 0 when both are zero (the prediction agrees that the camera did not
    move) and 90, the largest folded error, when only one is (no direction can be credited).
    """
    tp = _as_numpy64(pred_translations)
    tg = _as_numpy64(gt_translations)
    npn = np.linalg.norm(tp, axis=-1)
    ngn = np.linalg.norm(tg, axis=-1)
    zp = npn <= _ZERO_TRANSLATION_RTOL * (npn.max() if npn.size else 0.0)
    zg = ngn <= _ZERO_TRANSLATION_RTOL * (ngn.max() if ngn.size else 0.0)
    up = tp / np.where(zp, 1.0, npn)[:, None]
    ug = tg / np.where(zg, 1.0, ngn)[:, None]
    cos = np.clip(np.sum(up * ug, axis=-1), -1.0, 1.0)
    theta = np.degrees(np.arccos(cos))
    err = np.minimum(theta, 180.0 - theta)
    err = np.where(zp & zg, 0.0, np.where(zp | zg, 90.0, err))
    return torch.from_numpy(err)


def pose_errors(pred_extrinsics: torch.Tensor, gt_extrinsics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair (rotation, translation) angular errors in degrees, over all pairs i < j.

    Both inputs are (S, 3, 4) or (S, 4, 4) camera-from-world extrinsics of the same S frames.
    """
    pred_h = to_homogeneous(pred_extrinsics)
    gt_h = to_homogeneous(gt_extrinsics)
    if pred_h.shape != gt_h.shape:
        raise ValueError(f"pred and gt extrinsics differ in shape: {tuple(pred_h.shape)} vs {tuple(gt_h.shape)}")
    if pred_h.shape[0] < 2:
        raise ValueError(f"pose metrics need at least 2 frames, got {pred_h.shape[0]}")
    rp = relative_pair_poses(pred_h)
    rg = relative_pair_poses(gt_h)
    rot = rotation_angle_errors(rp[:, :3, :3], rg[:, :3, :3])
    trans = translation_angle_errors(rp[:, :3, 3], rg[:, :3, 3])
    return rot, trans


def accuracy_below(errors: torch.Tensor, threshold_deg: float = POSE_THRESHOLD_DEG) -> float:
    """Fraction of errors strictly below ``threshold_deg`` (RRA / RTA at that threshold)."""
    e = _as_numpy64(errors).reshape(-1)
    if e.size == 0:
        raise ValueError("accuracy_below needs at least one error")
    return float(np.mean(e < threshold_deg))


def auc_from_errors(rot_errors: torch.Tensor, trans_errors: torch.Tensor,
                    max_threshold_deg: int = AUC_MAX_THRESHOLD_DEG) -> float:
    """Pose AUC: mean over k = 1..max of the fraction of pairs with max(rot, trans) error < k.

    One number that rewards both accurate rotation and translation across all tolerances. Computed
    as VGGT does, with a histogram on integer bins; the last bin is closed, so an error of exactly
    ``max_threshold_deg`` counts at k = max (only that edge differs from a strict "< k").
    """
    r = _as_numpy64(rot_errors).reshape(-1)
    t = _as_numpy64(trans_errors).reshape(-1)
    if r.shape != t.shape or r.size == 0:
        raise ValueError("auc_from_errors needs equally many (>= 1) rotation and translation errors")
    err = np.maximum(r, t)
    hist = np.histogram(err, bins=np.arange(max_threshold_deg + 1))[0] / err.size
    return float(np.cumsum(hist).mean())


def pose_metrics(pred_extrinsics: torch.Tensor, gt_extrinsics: torch.Tensor) -> dict[str, float]:
    """RRA@15, RTA@15 and AUC@30 (fractions in [0, 1]) of one scene's predicted cameras.

    Raises ValueError for fewer than 2 frames: the metrics are defined on frame pairs.
    """
    rot, trans = pose_errors(pred_extrinsics, gt_extrinsics)
    return {
        "rra15": accuracy_below(rot, POSE_THRESHOLD_DEG),
        "rta15": accuracy_below(trans, POSE_THRESHOLD_DEG),
        "auc30": auc_from_errors(rot, trans, AUC_MAX_THRESHOLD_DEG),
    }


# --------------------------------------------------------------------------------------------
# Depth
# --------------------------------------------------------------------------------------------
def _as_depth_batch(x: torch.Tensor, name: str) -> np.ndarray:
    """(H, W), (S, H, W) or (S, H, W, 1) -> (S, H, W) float64 (VGGT emits a trailing channel)."""
    a = _as_numpy64(x)
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{name} must have shape (H, W), (S, H, W) or (S, H, W, 1), got {tuple(x.shape)}")
    return a


def median_scale(pred: np.ndarray, gt: np.ndarray) -> float:
    """Scale ``median(gt) / median(pred)`` that fixes the unknown global depth scale robustly.

    Falls back to 1 (no alignment) when the predicted median is not positive and finite, so that a
    broken prediction is scored as broken instead of raising or producing inf.
    """
    mp = float(np.median(pred))
    s = float(np.median(gt)) / mp if mp > 0 else float("nan")
    return s if np.isfinite(s) and s > 0 else 1.0


def scale_shift(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Least-squares ``(s, b)`` minimising ``||s pred + b - gt||^2`` (for affine-invariant depth)."""
    a = np.stack([pred, np.ones_like(pred)], axis=1)
    (s, b), *_ = np.linalg.lstsq(a, gt, rcond=None)
    return float(s), float(b)


def depth_metrics(pred: torch.Tensor, gt: torch.Tensor, valid_mask: torch.Tensor | None = None,
                  align: str = "median") -> dict[str, float]:
    """AbsRel and delta<1.25 of predicted depth against ground truth.

    Shapes: (H, W), (S, H, W) or (S, H, W, 1); ``valid_mask`` broadcastable to the depth shape.
    A pixel counts only where gt > 0, gt is finite and the mask is true.

    ``align``: "median" (per-image ``median(gt)/median(pred)`` scale), "scale_shift" (per-image
    least-squares scale and shift) or "none". With a batch, each image is aligned on its own valid
    pixels (a feed-forward model's per-frame depth need not share one scale); the metrics are then
    pooled over all valid pixels of all images (each pixel weighs the same, not each image).
    Images without valid pixels are skipped; if no image has any, ValueError is raised.

    AbsRel = mean(|d_hat - d| / d). delta<1.25 = fraction of pixels with
    ``max(d_hat/d, d/d_hat) < 1.25``; a non-positive aligned prediction counts as a miss.
    """
    if align not in ("median", "scale_shift", "none"):
        raise ValueError(f"align must be 'median', 'scale_shift' or 'none', got {align!r}")
    p = _as_depth_batch(pred, "pred")
    g = _as_depth_batch(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt depth differ in shape: {p.shape} vs {g.shape}")
    valid = np.isfinite(g) & (g > 0)
    if valid_mask is not None:
        m = _as_depth_batch(torch.as_tensor(valid_mask), "valid_mask").astype(bool)
        valid &= np.broadcast_to(m, g.shape)

    rel_errors, hits = [], []
    for pi, gi, vi in zip(p, g, valid):
        if not vi.any():
            continue
        dp, dg = pi[vi], gi[vi]
        if align == "median":
            dp = dp * median_scale(dp, dg)
        elif align == "scale_shift":
            s, b = scale_shift(dp, dg)
            dp = s * dp + b
        rel_errors.append(np.abs(dp - dg) / dg)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.maximum(dp / dg, dg / dp)
        hits.append((dp > 0) & (ratio < DELTA_THRESHOLD))
    if not rel_errors:
        raise ValueError("depth metrics need at least one valid pixel (gt > 0 and mask true)")
    return {
        "abs_rel": float(np.concatenate(rel_errors).mean()),
        "delta_1_25": float(np.concatenate(hits).mean()),
    }


# --------------------------------------------------------------------------------------------
# Point maps
# --------------------------------------------------------------------------------------------
def umeyama_sim3(source: torch.Tensor, target: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Least-squares similarity ``y ≈ s R x + t`` mapping (N, 3) ``source`` onto ``target`` (Umeyama 1991).

    Sigma = Y_c^T X_c / N = U D V^T, S = diag(1, 1, sign(det U det V)), R = U S V^T,
    s = tr(D S) / sigma_X^2, t = mu_Y - s R mu_X. The sign correction keeps R a proper rotation
    (det +1) even when the best orthogonal fit would be a reflection. Computed in float64; R and t
    are returned in the source's floating dtype.
    """
    x = _as_numpy64(source)
    y = _as_numpy64(target)
    if x.ndim != 2 or x.shape[-1] != 3 or x.shape != y.shape:
        raise ValueError(f"source and target must both be (N, 3), got {tuple(x.shape)} and {tuple(y.shape)}")
    mu_x, mu_y = x.mean(0), y.mean(0)
    xc, yc = x - mu_x, y - mu_y
    var_x = float((xc**2).sum(1).mean())
    if not var_x > 0:
        raise ValueError("umeyama_sim3 needs source points that are not all identical")
    cov = yc.T @ xc / x.shape[0]
    u, d, vt = np.linalg.svd(cov)
    sgn = np.ones(3)
    sgn[2] = np.sign(np.linalg.det(u) * np.linalg.det(vt))
    r = (u * sgn) @ vt
    s = float((d * sgn).sum() / var_x)
    t = mu_y - s * r @ mu_x
    dtype = source.dtype if isinstance(source, torch.Tensor) and source.is_floating_point() else torch.float64
    return s, torch.from_numpy(r).to(dtype), torch.from_numpy(t).to(dtype)


def apply_sim3(points: torch.Tensor, s: float, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``s R x + t`` for points of shape (..., 3)."""
    return s * points @ r.to(points.dtype).T + t.to(points.dtype)


def nearest_neighbour_distances(query: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Distance from each (N, 3) query point to its nearest (M, 3) reference point (KD-tree)."""
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(reference).query(query, k=1)
    return dist


def pointmap_metrics(pred_points: torch.Tensor, gt_points: torch.Tensor, valid_mask: torch.Tensor | None = None,
                     align: bool = True, max_points: int | None = DEFAULT_MAX_POINTS,
                     seed: int = 0) -> dict[str, float]:
    """Accuracy, Completeness and Chamfer distance of a predicted point map, in gt units.

    ``pred_points`` and ``gt_points`` are per-pixel correspondences of shape (..., 3), e.g.
    (S, H, W, 3); ``valid_mask`` has shape (...). Points count where the mask is true and both
    points are finite (KD-trees cannot hold NaN; a masked-out or NaN point is dropped).

    With ``align`` the prediction is first mapped onto the ground truth by the Umeyama similarity
    fitted on all valid correspondences (predicted points have arbitrary scale and frame). Then,
    for speed, at most ``max_points`` correspondences are kept (the same random subset for both
    clouds, fixed ``seed`` so that results are reproducible; ``None`` keeps all).

    Accuracy = mean distance of each predicted point to the nearest gt point (are predicted points
    on the surface?); Completeness = mean distance of each gt point to the nearest predicted point
    (is the surface covered?); Chamfer = (Accuracy + Completeness) / 2.
    """
    p = _as_numpy64(pred_points)
    g = _as_numpy64(gt_points)
    if p.shape != g.shape or p.shape[-1] != 3:
        raise ValueError(f"pred and gt points must share a shape (..., 3), got {p.shape} and {g.shape}")
    p, g = p.reshape(-1, 3), g.reshape(-1, 3)
    valid = np.isfinite(p).all(1) & np.isfinite(g).all(1)
    if valid_mask is not None:
        m = _as_numpy64(torch.as_tensor(valid_mask)).astype(bool)
        valid &= np.broadcast_to(m, pred_points.shape[:-1]).reshape(-1)
    p, g = p[valid], g[valid]
    if p.shape[0] == 0:
        raise ValueError("pointmap metrics need at least one valid point")
    if align:
        s, r, t = umeyama_sim3(p, g)
        p = s * p @ r.numpy().T + t.numpy()
    if max_points is not None and p.shape[0] > max_points:
        keep = np.random.default_rng(seed).choice(p.shape[0], size=max_points, replace=False)
        p, g = p[keep], g[keep]
    acc = float(nearest_neighbour_distances(p, g).mean())
    comp = float(nearest_neighbour_distances(g, p).mean())
    return {"accuracy": acc, "completeness": comp, "chamfer": (acc + comp) / 2.0}
