"""The VGGT family: feed-forward multi-view 3D reconstruction (facebook/VGGT-1B and smaller models
of the same architecture), judged by its cameras, depth and point maps.

What it declares:
* model: a checkpoint folder (``model.path``: ``model.pt`` or ``model.safetensors`` in the
  official key layout, optional ``config.json`` of sizes) or the committed reference model
  (``model.options.reference``), loaded by ``models.vggt.model.load_vggt``;
* data, one scene per item, every scene's frames at one size:
  - ``source: synthetic``: procedurally generated scenes (``models.synthetic_scenes``), the
    section's ``split`` choosing a seed range (train / calibration / evaluation never share a
    seed), ``num_samples`` scenes from the ``seed``-th on, ``options.num_frames`` views of
    ``options.image_size`` px with exact depth, world points and cameras;
  - ``source: co3d`` (``options.co3d_dir`` + ``options.co3d_anno_dir``) and ``source: seven_scenes``
    (``options.root``): real data sets read by ``eval.reconstruction_datasets``;
  every frame is hashed (its pixels as the model sees them) so that the runner refuses calibration
  scenes that share a frame with an evaluation scene;
* structure: the four Linears (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) of every frame
  and global block are quantized; the patch embedding, the heads, attention products and norms
  stay FP (``model.options.quantize_also`` adds Linears of the patch embed or heads by pattern).
  The blocks, in execution order frame 0, global 0, frame 1, ..., are the unit of block-wise
  calibration; each runs on the tokens it sees in the model (a global block on all frames' tokens
  together). NFDS's frame features are the last aggregator layer's tokens of each frame;
* metrics, per scene (``torchrun`` shards scenes): pose AUC@30, RRA@15, RTA@15 over all frame
  pairs; depth AbsRel and delta<1.25 after per-image median scaling; point-map Accuracy,
  Completeness and Chamfer after Umeyama Sim(3) alignment; each against ground truth, and the
  headline ones against the FP model's predictions too (``*_vs_fp``).
Outputs: a PLY point cloud per visualised scene and model (coloured by the input pixels), and a
PNG with FP and quantized clouds side by side with the cameras drawn.
"""
from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.blocks import BlockCall
from ..core.structure import LinearGroup, ModelStructure
from ..core import matching
from ..data import DataSplit, digest_tensor, label_digests
from ..evaluation import EvalContext, Metric, merge_item_means
from ..models import existing_reference_dir
from ..options import Option
from . import vggt_recipes
from .base import FamilyAdapter, register_adapter

BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
#: metrics also measured against the FP model's predictions
FP_RELATIVE = ("auc30", "abs_rel", "chamfer")


def _metrics() -> tuple[Metric, ...]:
    base = (
        Metric("auc30", lower_is_better=False, description="camera pose AUC@30 over all frame pairs (fraction)"),
        Metric("rra15", lower_is_better=False, description="share of frame pairs with rotation error < 15 deg"),
        Metric("rta15", lower_is_better=False, description="share of frame pairs with translation angle < 15 deg"),
        Metric("abs_rel", lower_is_better=True, description="depth AbsRel after per-image median scaling"),
        Metric("delta_1_25", lower_is_better=False, description="share of pixels with depth ratio < 1.25"),
        Metric("accuracy", lower_is_better=True, description="point map: mean distance to the nearest GT point "
                                                              "after Umeyama Sim(3) alignment (scene units)"),
        Metric("completeness", lower_is_better=True, description="point map: mean distance from GT points"),
        Metric("chamfer", lower_is_better=True, description="point map: (accuracy + completeness) / 2"),
    )
    rel = tuple(Metric(f"{m.name}_vs_fp", lower_is_better=m.lower_is_better, relative_to_fp=True,
                       description=f"{m.description}, against the FP model's prediction")
                for m in base if m.name in FP_RELATIVE)
    return base + rel


@register_adapter
class VGGTAdapter(FamilyAdapter):
    name = "vggt"
    model_options = {
        "reference": Option("vggt-scenes", help="committed reference model under models/reference/ (model.path=null)"),
        "quantize_also": Option([], type=list, items=str,
                                help="patterns (names, globs, re:) of further Linears to quantize, e.g. "
                                     "'re:aggregator\\.patch_embed\\..*' or 're:camera_head\\..*'"),
    }
    data_sources = ("synthetic", "co3d", "seven_scenes")
    data_options = {
        "num_frames": Option(4, minimum=1, help="views per scene"),
        "image_size": Option(None, type=int, minimum=14, help="image width in pixels (default: the model's img_size)"),
        "co3d_dir": Option(None, type=str, help="source co3d: the Co3Dv2 image root"),
        "co3d_anno_dir": Option(None, type=str, help="source co3d: the folder of {category}_{split}.jgz annotations"),
        "categories": Option([], type=list, items=str, help="source co3d: categories (empty: every annotated one)"),
        "co3d_split": Option("test", help="source co3d: which {category}_{split}.jgz annotations to read"),
        "min_frames": Option(50, minimum=2, help="source co3d: sequences with fewer frames are skipped (the protocol: 50)"),
        "root": Option(None, type=str, help="source seven_scenes: the 7-Scenes root folder"),
        "scenes": Option([], type=list, items=str, help="source seven_scenes: scene names (empty: all)"),
        "stride": Option(20, minimum=1, help="source seven_scenes: take every stride-th frame"),
        "visualise": Option(1, minimum=0, roles=("evaluation",),
                            help="scenes written as PLY point clouds and side-by-side PNGs"),
    }
    metrics = _metrics()
    presets = vggt_recipes.VGGT_PRESETS
    shards_evaluation = True

    # ------------------------------------------------------------------ model

    def load_model(self, path: str | None, options: dict[str, Any], dtype: str) -> tuple[nn.Module, dict]:
        from ..models.vggt.model import load_vggt

        if path is None:
            path = existing_reference_dir(options["reference"])
        model = load_vggt(path, dtype=getattr(torch, dtype))
        model.quantize_also = list(options.get("quantize_also") or [])
        return model, self.model_config(model)

    def model_config(self, model: nn.Module) -> dict:
        return {"vggt": model.config.to_dict(), "quantize_also": list(getattr(model, "quantize_also", []))}

    def build_model(self, model_config: dict) -> nn.Module:
        from ..models.vggt.model import VGGT, VGGTConfig

        model = VGGT(VGGTConfig.from_dict(model_config["vggt"], where="the checkpoint's model config"))
        model.quantize_also = list(model_config.get("quantize_also") or [])
        return model.eval()

    def matches(self, model: nn.Module) -> bool:
        from ..models.vggt.model import VGGT

        return isinstance(model, VGGT)

    def structure(self, model: nn.Module) -> ModelStructure:
        agg = model.aggregator
        blocks, quantize, readers = [], [], []
        for i in range(agg.depth):  # execution order: frame i, then global i
            for kind in ("frame", "global"):
                block = f"aggregator.{kind}_blocks.{i}"
                blocks.append(block)
                quantize += [f"{block}.{lin}" for lin in BLOCK_LINEARS]
                readers += [LinearGroup(f"{block}.norm1", [f"{block}.attn.qkv"]),
                            LinearGroup(f"{block}.norm2", [f"{block}.mlp.fc1"])]
        also = getattr(model, "quantize_also", None)
        chosen = set(quantize)
        extra = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in chosen
                       and matching.matches_any(n, also)) if also else []
        return ModelStructure(hidden_size=agg.embed_dim, quantize=quantize + extra, blocks=blocks,
                              residual_readers=readers, norm_kind="layer", frame_features=last_layer_frame_features,
                              per_frame_call=functools.partial(per_frame_global_call, agg.patch_start_idx))

    # ------------------------------------------------------------------ data

    def load_data(self, data_cfg: dict, role: str, model_config: dict) -> DataSplit:
        source = data_cfg["source"]
        if source not in self.data_sources:
            raise ValueError(f"{role}.source={source!r} not available for family vggt: allowed "
                             f"{', '.join(map(repr, self.data_sources))}")
        opts = self.data_options_of(data_cfg, role)
        cfg = model_config["vggt"]
        size = opts["image_size"] or cfg["img_size"]
        if size % cfg["patch_size"]:
            raise ValueError(f"{role}.options.image_size={size} is not a multiple of the patch size "
                             f"{cfg['patch_size']}")
        if role == "evaluation" and opts["num_frames"] < 2:
            raise ValueError(f"{role}.options.num_frames={opts['num_frames']}: camera poses are scored on frame "
                             f"pairs, so every evaluation scene needs at least 2 frames")
        scenes = _load_scenes(source, data_cfg, opts, role, size, cfg["patch_size"])
        if role == "evaluation":
            few = [s["name"] for s in scenes if s["images"].shape[0] < 2]
            if few:
                raise ValueError(f"evaluation scene {few[0]!r} has one frame: camera poses need at least 2")
        bs = int(data_cfg["batch_size"])
        batches = []
        for i in range(0, len(scenes), bs):
            chunk = scenes[i:i + bs]
            shapes = {tuple(s["images"].shape) for s in chunk}
            if len(shapes) > 1:
                raise ValueError(f"{role}: scenes {chunk[0]['name']!r} and {chunk[-1]['name']!r} differ in frames or "
                                 f"size and cannot share a batch: set {role}.batch_size: 1")
            batches.append({"images": torch.stack([s["images"] for s in chunk]), "scenes": chunk,
                            "items": list(range(i, i + len(chunk)))})
        digests = label_digests(frame_digests(scenes))
        return DataSplit(f"{source}/{role}", batches, frozenset(s["name"] for s in scenes),
                         extra={"visualise": opts.get("visualise", 0)}, digests=digests)

    def validate_batch(self, model: nn.Module, batch: Any) -> None:
        if not isinstance(batch, dict) or "images" not in batch:
            raise ValueError("a VGGT batch is a dict with 'images' (B, S, 3, H, W) in [0, 1]")
        images = batch["images"]
        if not torch.is_tensor(images) or images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"VGGT images must be (B, S, 3, H, W), got {tuple(getattr(images, 'shape', ()))}")
        p = model.config.patch_size
        if images.shape[-1] % p or images.shape[-2] % p:
            raise ValueError(f"image size {images.shape[-2]}x{images.shape[-1]} is not a multiple of the patch size {p}")

    def forward(self, model: nn.Module, batch: Any) -> Any:
        return model(batch["images"])

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, model: nn.Module, data: DataSplit, ctx: EvalContext | None = None) -> dict[str, float]:
        rows = self._score(model, data, ctx)
        if ctx is not None:
            ctx.items = rows
        return self.merge_items(rows)

    def evaluate_items(self, model: nn.Module, data: DataSplit, ctx: EvalContext) -> list[dict]:
        return self._score(model, data, ctx)

    def merge_items(self, rows: list[dict]) -> dict[str, float]:
        return merge_item_means(rows)

    @torch.no_grad()
    def _score(self, model: nn.Module, data: DataSplit, ctx: EvalContext | None) -> list[dict]:
        from tqdm import tqdm

        from ..eval.reconstruction_eval import decode_predictions, scene_metrics

        rows, kept = [], []
        fp = None if ctx is None or ctx.is_fp else ctx.fp
        for batch in tqdm(data.batches, desc="reconstructing", leave=False, disable=None):
            out = self.forward(model, batch)
            decoded = decode_predictions(out, tuple(batch["images"].shape[-2:]))
            for j, (item, scene) in enumerate(zip(batch["items"], batch["scenes"])):
                pred = {k: v[j] for k, v in decoded.items()}
                row = {"item": item, **scene_metrics(pred, scene, scene.get("valid"))}
                if fp is not None:
                    ref = fp[item]
                    rel = scene_metrics(pred, ref, ref.get("valid"))
                    row.update({f"{k}_vs_fp": v for k, v in rel.items() if k in FP_RELATIVE})
                rows.append(row)
                kept.append((item, {**pred, "valid": scene.get("valid")}))
                if ctx is not None and item < data.extra.get("visualise", 0):
                    _write_clouds(ctx, item, scene, pred, None if fp is None else fp[item])
        if ctx is not None and ctx.is_fp:
            ctx.keep(dict(kept))
        return rows


def per_frame_global_call(patch_start_idx: int, block: str, call: BlockCall) -> BlockCall | None:
    """A global block's call ``(tokens (B, S·P, C), pos=(B, S·P, 2))`` regrouped one frame per row,
    ``(B·S, P, C)``, as the reference code calibrates global blocks (QuantVGGT's pitfall P2; see
    ``LearnableClipping.global_calls``). Frame blocks: None (they already see one frame). The frame
    count comes from the RoPE positions: each frame's ``patch_start_idx`` special tokens, and only
    they, sit at position (0, 0) (patch positions start at 1)."""
    if ".global_blocks." not in block:
        return None
    tokens, pos = call.args[0], call.kwargs.get("pos")
    if pos is None:
        raise ValueError(f"{block}: regrouping a global block's tokens per frame needs its RoPE positions (pos)")
    b, n, c = tokens.shape
    frames = int((pos[0] == 0).all(dim=-1).sum()) // patch_start_idx
    if frames < 1 or n % frames:
        raise ValueError(f"{block}: cannot split {n} tokens into frames of {patch_start_idx} special tokens each")
    p = n // frames
    return BlockCall((tokens.reshape(b * frames, p, c), *call.args[1:]),
                     {**call.kwargs, "pos": pos.reshape(b * frames, p, pos.shape[-1])})


def last_layer_frame_features(model: nn.Module, batch: Any) -> torch.Tensor:
    """NFDS's per-frame features of a one-scene batch: every token of the frame in the last
    aggregator layer ([frame, global] channels), channels and patch tokens pooled by 2 (the
    special tokens kept), flattened. Runs the aggregator only (every block, none of the heads)."""
    images = batch["images"]
    if images.shape[0] != 1:
        raise ValueError(f"NFDS describes one scene per calibration batch, got {images.shape[0]}: set "
                         f"calibration.batch_size: 1")
    tokens, start = model.aggregator(images)
    last = tokens[-1][0].float()  # (S, P, 2C)
    last = torch.nn.functional.avg_pool1d(last, 2) if last.shape[-1] >= 2 else last
    special, patches = last[:, :start], last[:, start:]
    if patches.shape[1] >= 2:
        patches = torch.nn.functional.avg_pool1d(patches.transpose(1, 2), 2).transpose(1, 2)
    return torch.cat([special, patches], dim=1).flatten(1)


def frame_digests(scenes: list[dict]):
    """(digest, label) of every frame: its pixels as the model sees them, quantised to 8 bits."""
    for s in scenes:
        frames = (s["images"].clamp(0, 1) * 255).round().to(torch.uint8)
        for i, frame in enumerate(frames):
            yield digest_tensor(frame), f"scene {s['name']} frame {s['frame_ids'][i]}"


def _load_scenes(source: str, data_cfg: dict, opts: dict, role: str, size: int, patch: int) -> list[dict]:
    n, first = int(data_cfg["num_samples"]), int(data_cfg.get("seed") or 0)
    if source == "synthetic":
        from ..models.synthetic_scenes import SPLIT_OFFSETS, render_scene, scene_seeds

        split = data_cfg.get("split") or role
        if split not in SPLIT_OFFSETS:
            raise ValueError(f"{role}.split={split!r} not available for synthetic scenes: allowed "
                             f"{', '.join(map(repr, SPLIT_OFFSETS))}")
        scenes = []
        for seed in scene_seeds(split, n, start=first):  # square frames: the synthetic cameras' aspect is 1
            s = render_scene(seed, num_frames=opts["num_frames"], height=size, width=size, background_valid=False)
            scenes.append({"name": f"synthetic/{seed}", "frame_ids": list(range(opts["num_frames"])),
                           "images": s.images, "extrinsics": s.extrinsics, "intrinsics": s.intrinsics,
                           "depth": s.depth, "world_points": s.world_points, "valid": s.valid})
        return scenes
    from ..eval import reconstruction_datasets as datasets

    if source == "co3d":
        for key in ("co3d_dir", "co3d_anno_dir"):
            if not opts[key]:
                raise ValueError(f"{role}.options.{key} is required for source co3d")
        # lazily: the first num_samples sequences with enough frames, not the whole split in memory
        found = datasets.iter_co3d(opts["co3d_dir"], opts["co3d_anno_dir"], categories=opts["categories"] or None,
                                   split=opts["co3d_split"], num_frames=opts["num_frames"], seed=first,
                                   min_frames=opts["min_frames"], image_size=size, patch_size=patch)
    else:
        if not opts["root"]:
            raise ValueError(f"{role}.options.root is required for source seven_scenes")
        found = datasets.iter_seven_scenes(opts["root"], scenes=opts["scenes"] or None, num_frames=opts["num_frames"],
                                           stride=opts["stride"], image_size=size, patch_size=patch)
    scenes = list(itertools.islice(found, n))
    if not scenes:
        raise ValueError(f"{role}: source {source} found no scene with enough frames")
    return scenes


def _write_clouds(ctx: EvalContext, item: int, scene: dict, pred: dict, fp: dict | None) -> None:
    """PLY of this model's point map (coloured by the input pixels, in its own frame) and a PNG of
    it beside its reference (the ground truth for the FP model, the FP prediction for a quantized
    one), both moved into the ground truth's frame by the Umeyama similarity where there is one,
    with their cameras."""
    if ctx.output_dir is None or pred.get("world_points") is None:
        return
    from ..eval.pointclouds import pointmap_to_cloud, render_clouds_png, write_ply
    from ..eval.reconstruction_eval import align_prediction, in_camera_frame

    name = "FP" if ctx.is_fp else ctx.label
    valid, images = scene.get("valid"), scene["images"]
    pts, cols = pointmap_to_cloud(pred["world_points"], images, valid, max_points=50_000)
    ply = write_ply(ctx.artifact_path(f"scene{item:03d}_points.ply"), pts, cols)
    ctx.add_artifact(Path(ply), f"{name} point cloud: scene {scene['name']}", row=scene["name"], column="PLY")

    gt_points = scene.get("world_points")
    shown = [("ground truth", {"world_points": gt_points, "extrinsics": scene["extrinsics"],
                               "intrinsics": scene["intrinsics"]})] if fp is None else [("FP", fp)]
    if fp is None and gt_points is None:
        return  # nothing to show it beside
    shown.append((name, pred))
    if gt_points is not None:  # everything in the ground truth's frame and units
        shown = [(t, p if t == "ground truth" else align_prediction(p, gt_points, valid)) for t, p in shown]
    if shown[0][1].get("extrinsics") is not None:  # drawn as the reference's first camera sees the scene
        first = shown[0][1]["extrinsics"][0]
        shown = [(t, in_camera_frame(p, first)) for t, p in shown]
    size = tuple(images.shape[-2:])
    clouds = [pointmap_to_cloud(p["world_points"], images, valid, max_points=50_000) for _, p in shown]
    cameras = [None if p.get("extrinsics") is None else
               {"extrinsics": p["extrinsics"], "intrinsics": p["intrinsics"], "image_size": size} for _, p in shown]
    titles = [t for t, _ in shown]
    png = render_clouds_png(ctx.artifact_path(f"scene{item:03d}_clouds.png"), clouds, cameras, titles=titles)
    ctx.add_artifact(Path(png), f"{titles[0]} vs {titles[1]}: scene {scene['name']}", row=scene["name"],
                     column="PNG")
