"""From model outputs to metrics: decoding, the trivial baselines, and the alignment used for pictures."""
from __future__ import annotations

import math

import torch

from archquant.eval.reconstruction_eval import (align_prediction, decode_predictions, identity_pose_extrinsics,
                                                scene_metrics, trivial_baselines)
from archquant.models.synthetic_scenes import render_scene
from archquant.models.vggt.camera import extrinsics_intrinsics_to_pose_encoding


def rotation(axis: int, degrees: float) -> torch.Tensor:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [k for k in range(3) if k != axis]
    r = torch.eye(3, dtype=torch.float64)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def test_a_perfect_prediction_scores_perfectly_and_beats_the_baselines():
    s = render_scene(2_000_000_007, num_frames=3, height=28, width=28, background_valid=False)
    pose = extrinsics_intrinsics_to_pose_encoding(s.extrinsics, s.intrinsics, (28, 28))
    out = {"pose_enc": pose[None], "depth": (2.0 * s.depth)[None, ..., None], "depth_conf": torch.ones(1, 3, 28, 28),
           "world_points": s.world_points[None], "world_points_conf": torch.ones(1, 3, 28, 28)}
    pred = {k: v[0] for k, v in decode_predictions(out, (28, 28)).items()}
    gt = {"extrinsics": s.extrinsics, "depth": s.depth, "world_points": s.world_points}
    m = scene_metrics(pred, gt, s.valid)
    assert m["auc30"] > 0.99 and m["rra15"] == 1.0 and m["rta15"] == 1.0
    assert m["abs_rel"] < 1e-6 and m["delta_1_25"] == 1.0  # depth at twice the scale: median alignment undoes it
    assert m["chamfer"] < 1e-4
    base = trivial_baselines(gt, s.valid)
    assert base["auc30"] < m["auc30"] and base["abs_rel"] > 0.05


def test_identity_baseline_errors_are_the_true_relative_rotations():
    ext = torch.stack([torch.cat([rotation(1, a).float(), torch.tensor([[a / 10.0], [0.0], [1.0]])], 1)
                       for a in (0.0, 20.0)])
    m = trivial_baselines({"extrinsics": ext, "depth": torch.ones(2, 4, 4)})
    assert m["rra15"] == 0.0  # the one pair is 20 degrees apart
    assert torch.equal(identity_pose_extrinsics(3)[:, :, :3], torch.eye(3).expand(3, 3, 3))


def test_alignment_recovers_a_known_similarity_for_points_and_cameras():
    s = render_scene(2_000_000_011, num_frames=2, height=14, width=14)
    scale, q, u = 0.37, rotation(2, 33.0) @ rotation(0, -12.0), torch.tensor([0.5, -2.0, 1.25], dtype=torch.float64)
    # the prediction lives in another frame: x_pred = (q^T (x - u)) / scale; its cameras too
    world = s.world_points.double()
    pred_points = ((world - u) @ q) / scale
    r, t = s.extrinsics[..., :3].double(), s.extrinsics[..., 3].double()
    pred_ext = torch.cat([r @ q, (t + (r @ u[:, None])[..., 0])[..., None] / scale], dim=-1)
    pred = {"world_points": pred_points.float(), "extrinsics": pred_ext.float(), "intrinsics": s.intrinsics}
    aligned = align_prediction(pred, s.world_points)
    torch.testing.assert_close(aligned["world_points"], s.world_points, atol=1e-4, rtol=1e-5)
    # the moved cameras see the aligned points where the true cameras see the true points
    def project(ext, pts):
        cam = pts.double() @ ext[..., :3].double().transpose(-1, -2) + ext[..., 3].double()[:, None, None]
        return cam[..., :2] / cam[..., 2:]
    torch.testing.assert_close(project(aligned["extrinsics"], aligned["world_points"].flatten(1, 2)[:, None]),
                               project(s.extrinsics, s.world_points.flatten(1, 2)[:, None]), atol=1e-4, rtol=1e-4)


def test_camera_frame_puts_the_first_camera_at_the_origin_and_keeps_projections():
    from archquant.eval.reconstruction_eval import in_camera_frame

    s = render_scene(2_000_000_013, num_frames=2, height=14, width=14)
    moved = in_camera_frame({"world_points": s.world_points, "extrinsics": s.extrinsics}, s.extrinsics[0])
    torch.testing.assert_close(moved["extrinsics"][0], torch.cat([torch.eye(3), torch.zeros(3, 1)], 1),
                               atol=1e-5, rtol=0)
    # camera 0's view of a point is unchanged: its camera coordinates are now its world coordinates
    cam0 = s.world_points[0].double() @ s.extrinsics[0, :, :3].double().T + s.extrinsics[0, :, 3].double()
    torch.testing.assert_close(moved["world_points"][0].double(), cam0, atol=1e-4, rtol=1e-5)
    r1, t1 = moved["extrinsics"][1, :, :3].double(), moved["extrinsics"][1, :, 3].double()
    orig1 = s.world_points[1].double() @ s.extrinsics[1, :, :3].double().T + s.extrinsics[1, :, 3].double()
    torch.testing.assert_close(moved["world_points"][1].double() @ r1.T + t1, orig1, atol=1e-4, rtol=1e-5)
