"""3D reconstruction metrics (archquant.eval.reconstruction_metrics), checked against independent oracles:
rotation angles from the trace of a rotation matrix, translation angles from a plain dot product,
hand-computed AUC / depth values, and brute-force torch.cdist nearest neighbours."""
import math

import pytest
import torch

from archquant.eval.reconstruction_metrics import (
    auc_from_errors,
    depth_metrics,
    pointmap_metrics,
    pose_errors,
    pose_metrics,
    relative_to_first,
    umeyama_sim3,
)


def axis_angle(axis, deg) -> torch.Tensor:
    """Rodrigues' formula: rotation by ``deg`` degrees about ``axis`` (float64)."""
    k = torch.tensor(axis, dtype=torch.float64)
    k = k / k.norm()
    kx = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=torch.float64)
    a = math.radians(deg)
    return torch.eye(3, dtype=torch.float64) + math.sin(a) * kx + (1 - math.cos(a)) * kx @ kx


def random_rotation(gen) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def make_pose(r, t) -> torch.Tensor:
    out = torch.eye(4, dtype=torch.float64)
    out[:3, :3] = r
    out[:3, 3] = torch.as_tensor(t, dtype=torch.float64)
    return out


def random_cameras(n, gen) -> torch.Tensor:
    return torch.stack([make_pose(random_rotation(gen), torch.randn(3, generator=gen, dtype=torch.float64) * 2)
                        for _ in range(n)])


def trace_angle(r) -> float:
    return math.degrees(math.acos(max(-1.0, min(1.0, (float(torch.trace(r)) - 1) / 2))))


# ---------------------------------------------------------------------------------------------- poses
def test_identical_poses_are_perfect():
    gen = torch.Generator().manual_seed(0)
    cams = random_cameras(5, gen)
    m = pose_metrics(cams[:, :3, :], cams)  # 3x4 and 4x4 inputs mix
    assert m == {"rra15": 1.0, "rta15": 1.0, "auc30": 1.0}


def test_relative_to_first_makes_first_camera_identity():
    gen = torch.Generator().manual_seed(1)
    rel = relative_to_first(random_cameras(3, gen))
    torch.testing.assert_close(rel[0], torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("deg", [20.0, 170.0])
def test_rotation_error_of_known_axis_rotation(deg):
    # Frame 1 of the prediction is rotated by `deg` about an axis relative to the ground truth.
    gen = torch.Generator().manual_seed(2)
    gt = random_cameras(2, gen)
    pred = gt.clone()
    pred[1, :3, :3] = axis_angle([1.0, 2.0, -0.5], deg) @ gt[1, :3, :3]
    rot, _ = pose_errors(pred, gt)
    # Independent oracle: the angle of R_hat^T R from its trace, on the pair's relative rotations.
    rel_p, rel_g = relative_to_first(pred), relative_to_first(gt)
    pr = rel_p[0, :3, :3].T @ rel_p[1, :3, :3]
    gr = rel_g[0, :3, :3].T @ rel_g[1, :3, :3]
    oracle = trace_angle(pr.T @ gr)
    assert rot.shape == (1,)
    assert rot[0].item() == pytest.approx(oracle, abs=1e-6)
    assert rot[0].item() == pytest.approx(deg, abs=1e-6)
    assert pose_metrics(pred, gt)["rra15"] == (1.0 if deg < 15 else 0.0)


def test_pose_metrics_invariant_to_global_similarity_of_prediction():
    gen = torch.Generator().manual_seed(3)
    gt = random_cameras(6, gen)
    # A noisy prediction so that the metrics are not trivially 1.
    pred = torch.stack([make_pose(axis_angle(torch.randn(3, generator=gen).tolist(), 12 * float(torch.rand(1, generator=gen)))
                                  @ c[:3, :3], c[:3, 3] + 0.8 * torch.randn(3, generator=gen, dtype=torch.float64))
                        for c in gt])
    g = make_pose(random_rotation(gen), torch.randn(3, generator=gen, dtype=torch.float64) * 5)
    moved = pred @ g  # world frame changed by a rigid transform: x_world = G x_world'
    moved[:, :3, 3] *= 7.5  # and units changed by a global scale
    r0, t0 = pose_errors(pred, gt)
    r1, t1 = pose_errors(moved, gt)
    torch.testing.assert_close(r1, r0, atol=1e-6, rtol=0)
    torch.testing.assert_close(t1, t0, atol=1e-6, rtol=0)
    assert pose_metrics(moved, gt) == pytest.approx(pose_metrics(pred, gt))
    assert 0 < pose_metrics(pred, gt)["auc30"] < 1


@pytest.mark.parametrize("deg, folded", [(10.0, 10.0), (100.0, 80.0), (170.0, 10.0), (180.0, 0.0)])
def test_translation_angle_is_folded(deg, folded):
    # Identity rotations: the pair's relative translation is frame 1's translation itself.
    t = torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)
    axis = torch.linalg.cross(t, torch.tensor([0.3, -1.0, 0.2], dtype=torch.float64))  # perpendicular to t
    t_hat = axis_angle(axis.tolist(), deg) @ t * 3.0
    gt = torch.stack([make_pose(torch.eye(3), torch.zeros(3)), make_pose(torch.eye(3), t)])
    pred = torch.stack([make_pose(torch.eye(3), torch.zeros(3)), make_pose(torch.eye(3), t_hat)])
    rot, trans = pose_errors(pred, gt)
    cos = float(t_hat @ t / (t_hat.norm() * t.norm()))
    theta = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
    assert trans[0].item() == pytest.approx(min(theta, 180 - theta), abs=1e-5)
    assert trans[0].item() == pytest.approx(folded, abs=1e-5)
    assert rot[0].item() == pytest.approx(0.0, abs=1e-6)


def test_zero_translations_do_not_give_nan():
    still = torch.stack([torch.eye(4, dtype=torch.float64)] * 3)
    _, trans = pose_errors(still, still)
    assert torch.equal(trans, torch.zeros(3, dtype=torch.float64))
    moving = still.clone()
    moving[1, :3, 3] = torch.tensor([1.0, 0.0, 0.0])
    _, trans = pose_errors(moving, still)  # only the prediction moves in pairs (0,1) and (1,2)
    assert trans.tolist() == [90.0, 0.0, 90.0]
    assert pose_metrics(moving, still)["rta15"] == pytest.approx(1 / 3)


def test_auc_of_hand_built_errors():
    rot = torch.tensor([0.5, 5.2, 12.0, 40.0])
    trans = torch.tensor([0.2, 7.5, 3.0, 1.0])
    # max errors 0.5, 7.5, 12, 40; fraction below k: k=1..7 -> 1/4, k=8..12 -> 2/4, k=13..30 -> 3/4
    expected = (7 * 0.25 + 5 * 0.5 + 18 * 0.75) / 30
    assert auc_from_errors(rot, trans) == pytest.approx(expected)
    assert auc_from_errors(torch.zeros(3), torch.zeros(3)) == pytest.approx(1.0)
    assert auc_from_errors(torch.full((3,), 31.0), torch.zeros(3)) == 0.0


@pytest.mark.parametrize("frames", [0, 1])
def test_pose_metrics_need_two_frames(frames):
    cams = torch.eye(4).repeat(frames, 1, 1)
    with pytest.raises(ValueError, match="at least 2 frames"):
        pose_metrics(cams, cams)


# ---------------------------------------------------------------------------------------------- depth
def _depth(gen, shape=(2, 8, 10)):
    return 1.0 + 9.0 * torch.rand(*shape, generator=gen, dtype=torch.float64)


def test_depth_up_to_scale_needs_median_alignment():
    gt = _depth(torch.Generator().manual_seed(4))
    pred = 3.0 * gt
    m = depth_metrics(pred, gt, align="median")
    assert m["abs_rel"] == pytest.approx(0.0, abs=1e-12)
    assert m["delta_1_25"] == 1.0
    raw = depth_metrics(pred, gt, align="none")
    assert raw["abs_rel"] == pytest.approx(2.0)  # |3d - d| / d
    assert raw["delta_1_25"] == 0.0


def test_median_alignment_is_per_image():
    gt = _depth(torch.Generator().manual_seed(5))
    pred = gt * torch.tensor([2.0, 5.0], dtype=torch.float64)[:, None, None]
    assert depth_metrics(pred, gt)["abs_rel"] == pytest.approx(0.0, abs=1e-12)


def test_scale_shift_recovers_affine_prediction():
    gt = _depth(torch.Generator().manual_seed(6))
    pred = (gt - 0.7) / 2.5
    m = depth_metrics(pred, gt, align="scale_shift")
    assert m["abs_rel"] == pytest.approx(0.0, abs=1e-10)
    assert m["delta_1_25"] == 1.0
    assert depth_metrics(pred, gt, align="median")["abs_rel"] > 1e-3


def test_depth_ignores_invalid_pixels():
    gt = torch.tensor([[1.0, 2.0, 0.0, 4.0]])
    pred = torch.tensor([[1.1, 2.0, 100.0, 4.0]])
    m = depth_metrics(pred, gt, align="none")  # gt = 0 is skipped: errors 0.1, 0, 0
    assert m["abs_rel"] == pytest.approx(0.1 / 3)
    assert m["delta_1_25"] == 1.0
    mask = torch.tensor([[False, True, True, True]])
    m = depth_metrics(pred, gt, valid_mask=mask, align="none")
    assert m["abs_rel"] == pytest.approx(0.0)
    # Garbage at invalid pixels does not disturb the median alignment either.
    gt = _depth(torch.Generator().manual_seed(7), (6, 6))
    pred = 2.0 * gt
    gt[0, :4] = 0.0
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[3:, 3:] = False
    pred[0, :4] = 1e6
    pred[3:, 3:] = -50.0
    m = depth_metrics(pred, gt, valid_mask=mask)
    assert m == {"abs_rel": pytest.approx(0.0, abs=1e-12), "delta_1_25": 1.0}
    with pytest.raises(ValueError, match="valid pixel"):
        depth_metrics(pred, torch.zeros(6, 6))


# ---------------------------------------------------------------------------------------------- points
def test_umeyama_recovers_known_similarity():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    r = random_rotation(gen)
    s, t = 2.7, torch.tensor([0.5, -3.0, 1.25], dtype=torch.float64)
    y = s * x @ r.T + t
    s_hat, r_hat, t_hat = umeyama_sim3(x, y)
    assert s_hat == pytest.approx(s, abs=1e-5)
    torch.testing.assert_close(r_hat, r, atol=1e-5, rtol=0)
    torch.testing.assert_close(t_hat, t, atol=1e-5, rtol=0)
    assert torch.det(r_hat).item() == pytest.approx(1.0, abs=1e-9)


def test_umeyama_returns_proper_rotation_for_mirrored_points():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    y = x * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)  # a reflection: no rotation fits exactly
    _, r_hat, _ = umeyama_sim3(x, y)
    assert torch.det(r_hat).item() == pytest.approx(1.0, abs=1e-9)
    torch.testing.assert_close(r_hat.T @ r_hat, torch.eye(3, dtype=torch.float64), atol=1e-9, rtol=0)


def test_pointmap_of_similar_copy_is_zero_after_alignment():
    gen = torch.Generator().manual_seed(10)
    gt = torch.randn(2, 12, 16, 3, generator=gen, dtype=torch.float64)
    r = random_rotation(gen)
    pred = 0.3 * gt @ r.T + torch.tensor([4.0, -1.0, 2.0], dtype=torch.float64)
    m = pointmap_metrics(pred, gt)
    assert max(m.values()) < 1e-6
    assert pointmap_metrics(pred, gt, align=False)["accuracy"] > 0.1


def test_pointmap_shift_without_alignment_matches_brute_force():
    # Points on a unit grid (well separated): shifting by 0.1 keeps each point's nearest neighbour.
    g = torch.arange(5, dtype=torch.float64)
    gt = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    offset = torch.tensor([0.06, 0.0, 0.08], dtype=torch.float64)  # |offset| = 0.1
    pred = gt + offset
    m = pointmap_metrics(pred, gt, align=False)
    d = torch.cdist(pred, gt)
    assert m["accuracy"] == pytest.approx(d.min(1).values.mean().item())
    assert m["completeness"] == pytest.approx(d.min(0).values.mean().item())
    assert m["accuracy"] == pytest.approx(0.1)
    assert m["chamfer"] == pytest.approx(0.1)


def test_pointmap_random_clouds_match_brute_force_and_mask():
    gen = torch.Generator().manual_seed(11)
    gt = torch.randn(300, 3, generator=gen, dtype=torch.float64)
    pred = torch.randn(300, 3, generator=gen, dtype=torch.float64) * 1.5
    mask = torch.rand(300, generator=gen) > 0.3
    pred_garbage = pred.clone()
    pred_garbage[~mask] = 1e3
    pred_garbage[(~mask).nonzero()[:5, 0]] = float("nan")
    m = pointmap_metrics(pred_garbage, gt, valid_mask=mask, align=False)
    d = torch.cdist(pred[mask], gt[mask])
    assert m["accuracy"] == pytest.approx(d.min(1).values.mean().item())
    assert m["completeness"] == pytest.approx(d.min(0).values.mean().item())
    assert m["chamfer"] == pytest.approx((m["accuracy"] + m["completeness"]) / 2)


def test_pointmap_subsampling_is_deterministic():
    gen = torch.Generator().manual_seed(12)
    gt = torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    pred = gt + 0.01 * torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    a = pointmap_metrics(pred, gt, max_points=1000)
    b = pointmap_metrics(pred, gt, max_points=1000)
    full = pointmap_metrics(pred, gt, max_points=None)
    assert a == b
    assert a["accuracy"] != full["accuracy"]
    assert a["accuracy"] == pytest.approx(full["accuracy"], rel=0.5)
