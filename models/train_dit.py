"""Train the small class-conditional pixel-space DiT on scikit-learn's digits that the offline demo quantizes.

    python -m archquant.models.train_dit --out models/reference/dit-digits --steps 3000 --threads 1 --seed 0

Data: ``sklearn.datasets.load_digits`` (bundled with scikit-learn, no download), upsampled to 16x16
in [-1, 1] (``archquant.models.digits``), split by a seeded 20% hold-out. The diffusion model and
the judging classifier train on the same 80%; the classifier's test accuracy is on the other 20%.

Model: ``diffusers.DiTTransformer2DModel`` (1 channel, 16x16, patch 2 → 64 tokens, hidden 128,
4 heads, 4 layers, adaLN-Zero, 10 classes + the null class 10 for classifier-free guidance),
trained for DDPM epsilon prediction (1000 steps, linear betas) with an EMA of the weights; the EMA
weights are the ones saved. Class labels are replaced by the null class with probability
``--class-drop`` here, once per sample. diffusers' own label drop is switched off: its probability is
fixed at 0.1 inside ``AdaLayerNormZero`` (not a constructor argument; it is what gives the class
table its null row), it applies in train mode only, and every block (plus the output layer, which
reuses block 0's embedder) has its own embedder drawing its own drop.

Writes a diffusers-style pipeline folder: ``transformer/`` and ``scheduler/`` (the DDIM scheduler to
sample with: the training betas, ``clip_sample`` off), ``model_index.json``,
``classifier.safetensors`` + ``classifier.json``, ``samples.png`` (one row per class) and
``training.json`` (command, losses, the classifier's held-out accuracy, the class accuracy of FP
samples at the default sampling settings, wall time).
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
import torch.nn.functional as F

from archquant.models.diffusion import sample_class_conditional
from archquant.models.digits import (class_accuracy, load_digit_images, predict, save_classifier, split_indices,
                                     train_classifier)

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # diffusers' LabelEmbedding appends the null row after the real classes
MODEL_CONFIG = dict(in_channels=1, out_channels=1, sample_size=16, patch_size=2, num_embeds_ada_norm=NUM_CLASSES,
                    num_attention_heads=4, attention_head_dim=32, num_layers=4, norm_type="ada_norm_zero")
# The sampling settings the reference is judged (and quantized) with; recorded in training.json.
DEFAULT_SAMPLE_STEPS = 50
DEFAULT_GUIDANCE = 3.0


def build_transformer(seed: int):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**MODEL_CONFIG)
    for block in model.transformer_blocks:
        table = block.norm1.emb.class_embedder.embedding_table.weight
        if table.shape[0] != NUM_CLASSES + 1:
            raise RuntimeError(f"class embedding has {table.shape[0]} rows, expected {NUM_CLASSES} classes + null")
    # DiT's initialisation, which diffusers does not apply: the adaLN-Zero modulations (shift,
    # scale, gate) and the output layers start at zero, so every block starts as the identity and
    # the model as "predict zero noise". It trains much faster from there.
    with torch.no_grad():
        for block in model.transformer_blocks:
            block.norm1.linear.weight.zero_()
            block.norm1.linear.bias.zero_()
        for layer in (model.proj_out_1, model.proj_out_2):
            layer.weight.zero_()
            layer.bias.zero_()
    return model


def class_embedders(model):
    return [block.norm1.emb.class_embedder for block in model.transformer_blocks]


def make_schedulers():
    from diffusers import DDIMScheduler, DDPMScheduler

    train_sched = DDPMScheduler(num_train_timesteps=1000)
    # clip_sample off: DDIM clips its x0 estimate to [-1, 1] but keeps the model's epsilon, and
    # under classifier-free guidance that mismatch brightens every step's sample; with clipping
    # on, guidance 3 lost most of the class accuracy (the image is clamped to [0, 1] at the end
    # anyway).
    return train_sched, DDIMScheduler.from_config(train_sched.config, clip_sample=False)


def sample(model, ddim, labels: list[int], seeds: list[int], *, num_steps: int, guidance: float,
           batch: int = 100) -> torch.Tensor:
    out = []
    for i in range(0, len(labels), batch):
        out.append(sample_class_conditional(model, ddim, torch.tensor(labels[i:i + batch]), seeds[i:i + batch],
                                            num_steps=num_steps, guidance_scale=guidance, null_class=NULL_CLASS))
    return torch.cat(out)


def train(args):
    t_start = time.time()
    images, labels = load_digit_images(16)
    train_idx, test_idx = split_indices(len(labels), 0.2, seed=args.seed)
    x_train, y_train = images[train_idx], labels[train_idx]

    model = build_transformer(args.seed)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    train_sched, ddim = make_schedulers()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for emb in class_embedders(model):
        emb.eval()  # no per-block label drop: it is done once per sample below
    losses = []
    smooth = None
    t0 = time.time()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, x_train.shape[0], (args.batch_size,), generator=gen)
        x0, y = x_train[idx], y_train[idx].clone()
        y[torch.rand(y.shape, generator=gen) < args.class_drop] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, train_sched.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        xt = train_sched.add_noise(x0, noise, t)
        pred = model(xt, timestep=t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1.0 - decay)
        losses.append(loss.item())
        smooth = losses[-1] if smooth is None else 0.98 * smooth + 0.02 * losses[-1]
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {smooth:.4f}  lr {lr:.2e}  {time.time() - t0:.0f}s", flush=True)
    train_seconds = time.time() - t0

    # the judge: trained on the same 80% of real digits, tested on the held-out 20%
    t1 = time.time()
    classifier = train_classifier((x_train + 1) / 2, y_train, epochs=args.classifier_epochs, seed=args.seed)
    classifier_test_acc = class_accuracy(classifier, (images[test_idx] + 1) / 2, labels[test_idx])
    classifier_seconds = time.time() - t1
    print(f"classifier: held-out accuracy {classifier_test_acc:.4f} ({classifier_seconds:.0f}s)", flush=True)

    # FP samples: every class with seeds 0..n-1 (the same noise in each class's row)
    t2 = time.time()
    seeds = list(range(args.eval_seeds))
    want = [c for c in range(NUM_CLASSES) for _ in seeds]
    samples = sample(ema, ddim, want, seeds * NUM_CLASSES, num_steps=args.sample_steps, guidance=args.guidance)
    pred = predict(classifier, samples)
    want_t = torch.tensor(want)
    per_class = {str(c): float(pred[want_t == c].eq(c).float().mean()) for c in range(NUM_CLASSES)}
    sample_acc = float(pred.eq(want_t).float().mean())
    sample_seconds = time.time() - t2
    print(f"FP samples: class accuracy {sample_acc:.4f} ({args.sample_steps} DDIM steps, guidance "
          f"{args.guidance}, {len(want)} samples, {sample_seconds:.0f}s)  per class {per_class}", flush=True)

    import diffusers

    result = {
        "command": "python -m archquant.models.train_dit " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "model": "diffusers.DiTTransformer2DModel", "config": MODEL_CONFIG, "null_class": NULL_CLASS,
        "parameters": sum(p.numel() for p in ema.parameters()),
        "data": (f"sklearn.datasets.load_digits upsampled to 16x16 in [-1, 1]: {len(train_idx)} train / "
                 f"{len(test_idx)} held-out (seeded split, seed {args.seed})"),
        "objective": "DDPM epsilon prediction, DDPMScheduler(num_train_timesteps=1000), MSE; EMA weights saved",
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup, "ema": args.ema,
        "class_drop": args.class_drop, "seed": args.seed,
        "final_loss": float(sum(losses[-100:]) / len(losses[-100:])),
        "final_loss_note": "mean training loss of the last 100 steps",
        "classifier_test_accuracy": classifier_test_acc,
        "classifier_test_samples": len(test_idx),
        "sampling": {"scheduler": "DDIMScheduler (scheduler/)", "num_steps": args.sample_steps,
                     "guidance_scale": args.guidance, "seeds": f"0..{args.eval_seeds - 1} for each class",
                     "samples": len(want)},
        "sample_class_accuracy": sample_acc,
        "sample_class_accuracy_per_class": per_class,
        "train_seconds": round(train_seconds, 1),
        "classifier_seconds": round(classifier_seconds, 1),
        "sample_seconds": round(sample_seconds, 1),
        "wall_seconds": round(time.time() - t_start, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
    }
    grid = samples.view(NUM_CLASSES, args.eval_seeds, 1, 16, 16)[:, :args.grid_seeds]
    grid_pred = pred.view(NUM_CLASSES, args.eval_seeds)[:, :args.grid_seeds]
    return ema, ddim, classifier, result, grid, grid_pred


def save_grid(grid: torch.Tensor, pred: torch.Tensor, path: Path, title: str) -> None:
    """One row per class; a sample the classifier reads as another digit gets a red frame and its
    predicted class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = grid.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.8 + 0.5), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(grid[r, c, 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            wrong = int(pred[r, c]) != r
            for spine in ax.spines.values():
                spine.set_color("red" if wrong else "none")
                spine.set_linewidth(2)
            if wrong:
                ax.set_title(f"→{int(pred[r, c])}", fontsize=7, color="red", pad=1)
            if c == 0:
                ax.set_ylabel(str(r), rotation=0, labelpad=10, fontsize=11, va="center")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_pipeline(out: Path, transformer, ddim, classifier, result: dict, grid, grid_pred) -> None:
    import diffusers

    out.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(out / "transformer", safe_serialization=True)
    ddim.save_pretrained(out / "scheduler")
    index = {"_class_name": "DiTPipeline", "_diffusers_version": diffusers.__version__,
             "transformer": ["diffusers", "DiTTransformer2DModel"], "scheduler": ["diffusers", "DDIMScheduler"],
             "vae": [None, None]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    save_classifier(classifier, out)
    s = result["sampling"]
    save_grid(grid, grid_pred, out / "samples.png",
              f"dit-digits FP samples: {s['num_steps']} DDIM steps, guidance {s['guidance_scale']}, seeds 0-"
              f"{grid.shape[1] - 1}; class accuracy {result['sample_class_accuracy']:.3f} over {s['samples']} samples")
    # written twice so that the recorded size includes training.json itself
    result["folder_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    (out / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    result["folder_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    (out / "training.json").write_text(json.dumps(result, indent=2) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.998, help="EMA decay of the saved weights")
    p.add_argument("--class-drop", type=float, default=0.1, help="probability of training on the null class")
    p.add_argument("--classifier-epochs", type=int, default=15)
    p.add_argument("--sample-steps", type=int, default=DEFAULT_SAMPLE_STEPS, help="DDIM steps for the check")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance scale")
    p.add_argument("--eval-seeds", type=int, default=20, help="samples per class for the class accuracy")
    p.add_argument("--grid-seeds", type=int, default=10, help="samples per class in samples.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--log-every", type=int, default=250)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.grid_seeds = min(args.grid_seeds, args.eval_seeds)
    transformer, ddim, classifier, result, grid, grid_pred = train(args)
    out = Path(args.out)
    save_pipeline(out, transformer, ddim, classifier, result, grid, grid_pred)
    print(json.dumps({k: result[k] for k in ("final_loss", "classifier_test_accuracy", "sample_class_accuracy",
                                             "wall_seconds", "folder_bytes")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
