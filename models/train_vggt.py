"""Train the small VGGT reference model on synthetic scenes (offline, CPU).

    python -m archquant.models.train_vggt --out models/reference/vggt-scenes --steps 2000 --threads 1 --seed 0 \
        --camera-weight 5 --keep-order

Data: ``models.synthetic_scenes``: ``--train-scenes`` scenes of the "train" seed range, rendered
once at ``--image-size`` px with ``--frames`` views each (procedural shapes and textures, a
ground plane and an enclosing background sphere; exact depth, world points and cameras). Each
step draws ``--batch-size`` scenes; their views are shuffled, so any view can be the reference
frame (frame 0), unless ``--keep-order`` keeps them in their order along the camera arc, as the
evaluation scenes come (the committed model: with shuffled views a 2,500-step run stalled at a
camera loss of 0.46 and learned little more than a mean pose). The calibration and evaluation
seed ranges are never seen.

Targets, as VGGT is trained: the world is moved into frame 0's camera (its extrinsics become
[I | 0]) and scaled so that the mean distance of the valid world points from that camera is 1;
the cameras are encoded as ``absT_quaR_FoV`` vectors.

Model: the VGGT architecture (``models.vggt.model.VGGT``) at toy size: 112 px, patch 14 (8 x 8
patches), a conv patch embedding (VGGT's ``patch_embed="conv"``), embed dim 128, 4 frame + 4
global blocks of 4 heads, a 1-block camera trunk and DPT heads with 32 features over all 4
layers.

Losses: L1 on the pose encoding after every refinement round (later rounds weigh more: 0.8^k),
times ``--camera-weight``;
confidence-weighted L1 on depth and on world points, conf * |err| - ``--conf-alpha`` * log(conf),
as VGGT's aleatoric losses. AdamW with warm-up and cosine decay; an EMA of the weights is saved.

After training, the EMA model is scored on ``--eval-scenes`` scenes of the evaluation split with
the project's metrics (pose AUC@30 / RRA / RTA, depth AbsRel / delta<1.25 after median scaling,
point-map Chamfer after Umeyama alignment) next to the trivial baselines the reference must beat
(identity poses; each image's mean depth). Writes ``model.safetensors`` (float16, which is what is evaluated) + ``config.json`` (the
loader's layout, official key names), ``training.json`` (command, losses, metrics, timings) and
``samples.png`` (GT and predicted depth of a few evaluation scenes).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from archquant.models.synthetic_scenes import render_scene, scene_seeds
from archquant.models.vggt.camera import extrinsics_intrinsics_to_pose_encoding
from archquant.models.vggt.model import VGGT, VGGTConfig

MODEL_CONFIG = {"img_size": 112, "patch_size": 14, "embed_dim": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0,
                "num_register_tokens": 4, "patch_embed": "conv", "camera_head": {"trunk_depth": 1, "num_heads": 4},
                "dpt_head": {"features": 32, "out_channels": [32, 64, 128, 128], "intermediate_layer_idx": [0, 1, 2, 3]},
                "enable_track": False}


def normalise_targets(extrinsics: torch.Tensor, intrinsics: torch.Tensor, world_points: torch.Tensor,
                      depth: torch.Tensor, valid: torch.Tensor, image_hw: tuple[int, int]) -> dict:
    """Targets in frame 0's camera, unit mean point distance: pose encodings (B, S, 9), depth
    (B, S, H, W), world points (B, S, H, W, 3). Inputs are batched (B, S, ...)."""
    r0, t0 = extrinsics[:, 0, :, :3], extrinsics[:, 0, :, 3]
    pts = torch.einsum("bij,bshwj->bshwi", r0, world_points) + t0[:, None, None, None]
    m = valid.float()
    scale = (pts.norm(dim=-1) * m).sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3)).clamp_min(1)
    scale = scale.clamp_min(1e-6)
    # E_i' = E_i E_0^-1: R_i R_0^T, t_i - R_i R_0^T t_0; then translations scaled like the points
    r = extrinsics[..., :3] @ r0.transpose(-1, -2)[:, None]
    t = extrinsics[..., 3] - (r @ t0[:, None, :, None])[..., 0]
    ext = torch.cat([r, (t / scale[:, None, None])[..., None]], dim=-1)
    pose = extrinsics_intrinsics_to_pose_encoding(ext, intrinsics, image_hw)
    return {"pose_enc": pose, "depth": depth / scale[:, None, None, None], "world_points": pts / scale[:, None, None,
                                                                                                     None, None],
            "valid": valid, "scale": scale}


def confidence_l1(pred: torch.Tensor, conf: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                  alpha: float) -> torch.Tensor:
    err = (pred - target).abs()
    if err.dim() == conf.dim() + 1:
        err = err.sum(dim=-1)
    m = valid.float()
    return ((conf * err - alpha * conf.log()) * m).sum() / m.sum().clamp_min(1)


def pose_loss(pose_list: list[torch.Tensor], target: torch.Tensor, gamma: float = 0.8) -> torch.Tensor:
    n = len(pose_list)
    return sum(gamma ** (n - 1 - i) * (p - target).abs().mean() for i, p in enumerate(pose_list))


class SceneBank:
    """Pre-rendered training scenes (uint8 images, float32 geometry) and a batch sampler."""

    def __init__(self, seeds: list[int], frames: int, size: int, progress: bool = True) -> None:
        scenes, t0 = [], time.time()
        for i, seed in enumerate(seeds):
            s = render_scene(seed, num_frames=frames, height=size, width=size)
            scenes.append(((s.images * 255).round().to(torch.uint8), s.depth, s.world_points, s.valid, s.intrinsics,
                           s.extrinsics))
            if progress and (i + 1) % 200 == 0:
                print(f"rendered {i + 1}/{len(seeds)} training scenes ({time.time() - t0:.0f} s)", flush=True)
        self.fields = [torch.stack(f) for f in zip(*scenes)]

    def batch(self, size: int, gen: torch.Generator, shuffle: bool = True) -> dict:
        idx = torch.randint(len(self.fields[0]), (size,), generator=gen)
        frames = self.fields[0].shape[1]
        order = torch.stack([torch.randperm(frames, generator=gen) if shuffle else torch.arange(frames)
                             for _ in range(size)])
        take = [f[idx] for f in self.fields]
        take = [torch.stack([t[b, order[b]] for b in range(size)]) for t in take]
        images, depth, points, valid, k, ext = take
        return {"images": images.float() / 255, "depth": depth, "world_points": points, "valid": valid,
                "intrinsics": k, "extrinsics": ext}


def training_loss(model: VGGT, batch: dict, conf_alpha: float, camera_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    hw = tuple(batch["images"].shape[-2:])
    tgt = normalise_targets(batch["extrinsics"], batch["intrinsics"], batch["world_points"], batch["depth"],
                            batch["valid"], hw)
    out = model(batch["images"])
    parts = {"camera": pose_loss(out["pose_enc_list"], tgt["pose_enc"]),
             "depth": confidence_l1(out["depth"][..., 0], out["depth_conf"], tgt["depth"], tgt["valid"], conf_alpha),
             "points": confidence_l1(out["world_points"], out["world_points_conf"], tgt["world_points"],
                                     tgt["valid"], conf_alpha)}
    total = camera_weight * parts["camera"] + parts["depth"] + parts["points"]
    return total, {k: float(v.detach()) for k, v in parts.items()}


def learning_rate(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    config = VGGTConfig.from_dict(MODEL_CONFIG, where="train_vggt.MODEL_CONFIG")
    model = VGGT(config)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    t0 = time.time()
    bank = SceneBank(scene_seeds("train", args.train_scenes), args.frames, args.image_size)
    render_s = time.time() - t0
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    history, t1 = [], time.time()
    running: dict[str, float] = {}
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args)
        loss, parts = training_loss(model, bank.batch(args.batch_size, gen, shuffle=not args.keep_order),
                                    args.conf_alpha, args.camera_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - args.ema)
        for k, v in parts.items():
            running[k] = running.get(k, v) * 0.98 + v * 0.02
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.time() - t1
            row = {"step": step + 1, **{k: round(v, 4) for k, v in running.items()}, "seconds": round(elapsed, 1)}
            history.append(row)
            eta = elapsed / (step + 1) * (args.steps - step - 1)
            print(f"step {step + 1}/{args.steps} " + " ".join(f"{k} {v:.4f}" for k, v in running.items())
                  + f" ({elapsed:.0f} s, eta {eta:.0f} s)", flush=True)
    return {"model": ema, "config": config, "history": history, "render_seconds": round(render_s, 1),
            "train_seconds": round(time.time() - t1, 1)}


@torch.no_grad()
def baseline_and_model_metrics(model: VGGT, seeds: list[int], frames: int, size: int) -> dict:
    """Mean metrics of ``model`` and of the trivial baselines on the given scenes (foreground
    pixels: ground and objects, not the background sphere)."""
    from archquant.eval.reconstruction_eval import decode_predictions, scene_metrics, trivial_baselines
    from archquant.evaluation import merge_item_means

    model.eval()
    rows, base = [], []
    for seed in seeds:
        s = render_scene(seed, num_frames=frames, height=size, width=size, background_valid=False)
        gt = {"extrinsics": s.extrinsics, "depth": s.depth, "world_points": s.world_points}
        pred = {k: v[0] for k, v in decode_predictions(model(s.images[None]), (size, size)).items()}
        rows.append(scene_metrics(pred, gt, s.valid))
        base.append(trivial_baselines(gt, s.valid))
    return {"scenes": len(seeds), "model": merge_item_means(rows), "baselines": merge_item_means(base)}


@torch.no_grad()
def save_depth_samples(model: VGGT, seeds: list[int], frames: int, size: int, path: Path) -> None:
    """A PNG: per scene, its views, the GT depth and the predicted depth (each row one scene)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(seeds), 3 * frames, figsize=(1.2 * 3 * frames, 1.3 * len(seeds)), squeeze=False)
    for r, seed in enumerate(seeds):
        s = render_scene(seed, num_frames=frames, height=size, width=size)
        depth = model(s.images[None])["depth"][0, ..., 0]
        for f in range(frames):
            axes[r, f].imshow(s.images[f].permute(1, 2, 0).numpy())
            axes[r, frames + f].imshow(s.depth[f].numpy(), cmap="viridis")
            axes[r, 2 * frames + f].imshow(depth[f].numpy(), cmap="viridis")
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].set_title("views", loc="left", fontsize=7)
    axes[0, frames].set_title("GT depth", loc="left", fontsize=7)
    axes[0, 2 * frames].set_title("predicted depth (scale-free)", loc="left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save(out: Path, model: VGGT, config: VGGTConfig, info: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(MODEL_CONFIG, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--conf-alpha", type=float, default=0.2)
    p.add_argument("--camera-weight", type=float, default=1.0, help="weight of the camera loss")
    p.add_argument("--keep-order", action="store_true",
                   help="keep each scene's views in their order along the camera arc (default: shuffled, so any "
                        "view can be frame 0)")
    p.add_argument("--train-scenes", type=int, default=1000)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--eval-scenes", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)
    result = train(args)
    # the committed weights are float16 (half the size); what is evaluated here is exactly them
    with torch.no_grad():
        for t in result["model"].state_dict().values():
            t.copy_(t.half().float())
    out = Path(args.out)
    metrics = baseline_and_model_metrics(result["model"], scene_seeds("evaluation", args.eval_scenes),
                                         args.frames, args.image_size)
    info = {"command": "python -m archquant.models.train_vggt " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "model_config": MODEL_CONFIG, "args": vars(args), "history": result["history"],
            "render_seconds": result["render_seconds"], "train_seconds": result["train_seconds"],
            "evaluation": metrics}
    save(out, result["model"], result["config"], info)
    save_depth_samples(result["model"], scene_seeds("evaluation", 4), args.frames, args.image_size,
                       out / "samples.png")
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
