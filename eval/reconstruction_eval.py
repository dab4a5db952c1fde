"""From a VGGT-style model's outputs to reconstruction metrics, per scene.

``decode_predictions`` turns the raw outputs (pose encodings, depth, point maps) into cameras and
geometry; ``scene_metrics`` scores one scene's decoded prediction against a reference (ground
truth, or the FP model's prediction for the FP-relative metrics) with the protocol metrics of
``reconstruction_metrics``; ``trivial_baselines`` gives what a model that learned nothing scores
(identity cameras; each image's mean depth), the bar a reference model must clear.

Metric names (all per scene, then averaged over scenes as VGGT averages per category):
``auc30``, ``rra15``, ``rta15`` (fractions), ``abs_rel``, ``delta_1_25`` (median-aligned depth),
``accuracy``, ``completeness``, ``chamfer`` (point head's map after Umeyama Sim(3) alignment).
"""
from __future__ import annotations

import torch

from archquant.eval.reconstruction_metrics import (apply_sim3, depth_metrics, pointmap_metrics, pose_metrics,
                                                   umeyama_sim3)
from archquant.models.vggt.camera import pose_encoding_to_extrinsics_intrinsics

POSE_KEYS = ("auc30", "rra15", "rta15")
DEPTH_KEYS = ("abs_rel", "delta_1_25")
POINT_KEYS = ("accuracy", "completeness", "chamfer")
#: point metrics subsample this many correspondences per scene (seeded), for speed
MAX_POINTS = 20_000


def decode_predictions(out: dict, image_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Batched outputs -> {"extrinsics" (B, S, 3, 4), "intrinsics", "depth" (B, S, H, W),
    "world_points" (B, S, H, W, 3), and the confidences}, float32 on the CPU."""
    decoded: dict[str, torch.Tensor] = {}
    if "pose_enc" in out:
        ext, k = pose_encoding_to_extrinsics_intrinsics(out["pose_enc"].float(), image_hw)
        decoded["extrinsics"], decoded["intrinsics"] = ext.cpu(), k.cpu()
    if "depth" in out:
        decoded["depth"] = out["depth"][..., 0].float().cpu()
        decoded["depth_conf"] = out["depth_conf"].float().cpu()
    if "world_points" in out:
        decoded["world_points"] = out["world_points"].float().cpu()
        decoded["points_conf"] = out["world_points_conf"].float().cpu()
    return decoded


def scene_metrics(pred: dict, ref: dict, valid: torch.Tensor | None = None) -> dict[str, float]:
    """One scene (tensors without the batch axis): pred and ref with any of extrinsics (S, 3, 4),
    depth (S, H, W), world_points (S, H, W, 3); ``valid`` (S, H, W) restricts depth and points."""
    metrics: dict[str, float] = {}
    def both(key: str) -> bool:  # a data set without depth (Co3D) has None there
        return pred.get(key) is not None and ref.get(key) is not None

    if both("extrinsics"):
        metrics.update(pose_metrics(pred["extrinsics"], ref["extrinsics"]))
    if both("depth"):
        metrics.update(depth_metrics(pred["depth"], ref["depth"], valid, align="median"))
    if both("world_points"):
        metrics.update(pointmap_metrics(pred["world_points"], ref["world_points"], valid, max_points=MAX_POINTS))
    return metrics


def align_prediction(pred: dict, ref_points: torch.Tensor, valid: torch.Tensor | None = None) -> dict:
    """``pred``'s world points and cameras moved into ``ref_points``' frame by the Umeyama similarity
    fitted on the valid correspondences (what the point metrics do), for showing them side by side.
    A camera [R | t] of the old frame becomes [R Q^T | s t - R Q^T u] for x_new = s Q x_old + u (its
    camera coordinates scaled by s, which a pinhole projection ignores)."""
    pts = pred["world_points"]
    mask = torch.isfinite(pts).all(-1) & torch.isfinite(ref_points).all(-1)
    if valid is not None:
        mask &= valid
    s, q, u = umeyama_sim3(pts[mask].double(), ref_points[mask].double())
    out = {**pred, "world_points": apply_sim3(pts.double(), s, q, u).float()}
    if pred.get("extrinsics") is not None:
        r, t = pred["extrinsics"][..., :3].double(), pred["extrinsics"][..., 3].double()
        rq = r @ q.T
        out["extrinsics"] = torch.cat([rq, (s * t - rq @ u)[..., None]], dim=-1).float()
    return out


def in_camera_frame(geometry: dict, extrinsics0: torch.Tensor) -> dict:
    """``geometry``'s world points and cameras expressed in the frame of the camera ``extrinsics0``
    (3, 4): x -> R0 x + t0; a camera [R | t] becomes [R R0^T | t - R R0^T t0]. Pictures drawn in the
    first camera's frame stand upright as that camera saw them, whatever the world's up axis."""
    r0, t0 = extrinsics0[:, :3].double(), extrinsics0[:, 3].double()
    out = dict(geometry)
    if geometry.get("world_points") is not None:
        out["world_points"] = (geometry["world_points"].double() @ r0.T + t0).float()
    if geometry.get("extrinsics") is not None:
        r, t = geometry["extrinsics"][..., :3].double(), geometry["extrinsics"][..., 3].double()
        rr = r @ r0.T
        out["extrinsics"] = torch.cat([rr, (t - rr @ t0)[..., None]], dim=-1).float()
    return out


def identity_pose_extrinsics(num_frames: int) -> torch.Tensor:
    """Every camera at the first one's pose (a model that predicts no motion)."""
    return torch.cat([torch.eye(3), torch.zeros(3, 1)], dim=1).expand(num_frames, 3, 4).clone()


def trivial_baselines(gt: dict, valid: torch.Tensor | None = None) -> dict[str, float]:
    """Identity cameras (AUC@30, RRA, RTA) and a constant depth per image equal to its mean GT
    depth (AbsRel, delta<1.25)."""
    s = gt["extrinsics"].shape[0]
    out = pose_metrics(identity_pose_extrinsics(s), gt["extrinsics"])
    depth = gt["depth"]
    mask = torch.ones_like(depth, dtype=torch.bool) if valid is None else valid
    means = torch.stack([depth[i][mask[i]].mean() for i in range(depth.shape[0])])
    out.update(depth_metrics(means[:, None, None].expand_as(depth), depth, mask, align="none"))
    return out
