"""Train the small pixel-space diffusion transformers on scikit-learn's digits that the offline demos quantize.

    python -m archquant.models.train_dit --out models/reference/dit-digits --steps 3000 --threads 1 --seed 0
    python -m archquant.models.train_dit --kind pixart --out models/reference/pixart-digits --steps 3000 --threads 1 --seed 0

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

``--kind pixart``: a text-conditional ``diffusers.PixArtTransformer2DModel`` of the same size
(4 blocks, hidden 128, cross-attention to the captions, one global adaLN-single) conditioned on
captions such as "a handwritten seven" or "the digit 7" (``CAPTION_TEMPLATES``, a template drawn per
sample), encoded by a tiny frozen ``T5EncoderModel`` (random weights, never trained: its features
only have to tell the captions apart) through a T5 tokenizer over the captions' words built in
memory. The caption is replaced by the empty prompt with probability ``--class-drop`` (the
unconditional branch of classifier-free guidance, PixArt's negative prompt "").

Writes a diffusers-style pipeline folder: ``transformer/`` and ``scheduler/`` (the DDIM scheduler to
sample with: the training betas, ``clip_sample`` off), ``model_index.json``, for PixArt
``tokenizer/`` and ``text_encoder/``,
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

from archquant.models.digits import (DIGIT_WORDS, class_accuracy, load_digit_images, predict, save_classifier,
                                     split_indices, train_classifier)
from archquant.models.dit_loading import DiffusionModel, save_pipeline_folder

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # diffusers' LabelEmbedding appends the null row after the real classes
MODEL_CONFIG = dict(in_channels=1, out_channels=1, sample_size=16, patch_size=2, num_embeds_ada_norm=NUM_CLASSES,
                    num_attention_heads=4, attention_head_dim=32, num_layers=4, norm_type="ada_norm_zero")
PIXART_CONFIG = dict(in_channels=1, out_channels=1, sample_size=16, patch_size=2, num_attention_heads=4,
                     attention_head_dim=32, num_layers=4, cross_attention_dim=128, caption_channels=64,
                     norm_type="ada_norm_single", use_additional_conditions=False)
#: the frozen caption encoder: a T5 encoder small enough to commit (about 0.2 M parameters)
T5_CONFIG = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                 dropout_rate=0.0)
#: T5 tokens per caption (the longest template is 9 with its end token)
MAX_SEQUENCE_LENGTH = 16
#: caption templates; {w} is the digit's word ("seven"), {n} its numeral ("7")
CAPTION_TEMPLATES = ("a handwritten {w}", "the digit {w}", "a drawing of a {w}", "the number {n}", "a {w}",
                     "an image of the digit {n}", "a picture of a handwritten {w}", "digit {n}")
# The sampling settings the reference is judged (and quantized) with; recorded in training.json.
DEFAULT_SAMPLE_STEPS = 50
DEFAULT_GUIDANCE = 3.0


def step_with_ema(model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor,
                  step: int, ema_decay: float) -> float:
    """One optimiser step (gradients clipped to norm 1), then the EMA copy, which is what the
    reference models save, moves towards the weights; the decay ramps up over the first steps so
    that the EMA does not keep the random initialisation. Returns the loss as a float."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)
    return loss.item()

def caption(template: str, digit: int) -> str:
    return template.format(w=DIGIT_WORDS[digit], n=digit)


def caption_tokenizer():
    """A T5 tokenizer whose pieces are the caption words (``text_encoders.word_tokenizer``); saved with
    the reference's prompt length, which the loader pads prompts to (not PixArt's 300)."""
    from archquant.models.text_encoders import word_tokenizer

    words = ({w for t in CAPTION_TEMPLATES for w in t.replace("{w}", "").replace("{n}", "").split()}
             | set(DIGIT_WORDS) | {str(d) for d in range(10)})
    return word_tokenizer(words, MAX_SEQUENCE_LENGTH)


def build_prompt_encoder(seed: int):
    from transformers import T5Config, T5EncoderModel

    from archquant.models.text_encoders import PromptEncoder

    tokenizer = caption_tokenizer()
    torch.manual_seed(seed + 1)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **T5_CONFIG)).eval().requires_grad_(False)
    return PromptEncoder("t5", [tokenizer], [encoder], MAX_SEQUENCE_LENGTH, {"path": "unsaved"})


def build_transformer(seed: int, kind: str = "dit"):
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    torch.manual_seed(seed)
    if kind == "pixart":
        model = PixArtTransformer2DModel(**PIXART_CONFIG)
        # PixArt's initialisation (as DiT's): the timestep modulation and the output start at zero
        with torch.no_grad():
            for layer in (model.adaln_single.linear, model.proj_out):
                layer.weight.zero_()
                layer.bias.zero_()
        return model
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
    return [block.norm1.emb.class_embedder for block in getattr(model, "transformer_blocks", [])
            if hasattr(block.norm1, "emb")]


def make_schedulers():
    from diffusers import DDIMScheduler, DDPMScheduler

    train_sched = DDPMScheduler(num_train_timesteps=1000)
    # clip_sample off: DDIM clips its x0 estimate to [-1, 1] but keeps the model's epsilon, and
    # under classifier-free guidance that mismatch brightens every step's sample; with clipping
    # on, guidance 3 lost most of the class accuracy (the image is clamped to [0, 1] at the end
    # anyway).
    return train_sched, DDIMScheduler.from_config(train_sched.config, clip_sample=False)


class Conditioning:
    """What a training batch is conditioned on, with the label drop of classifier-free guidance."""

    def __init__(self, kind: str, prompt_encoder=None):
        self.kind, self.prompt_encoder = kind, prompt_encoder

    def draw(self, y: torch.Tensor, drop: float, gen: torch.Generator) -> dict:
        if self.kind == "dit":
            y = y.clone()
            y[torch.rand(y.shape, generator=gen) < drop] = NULL_CLASS
            return {"class_labels": y}
        templates = torch.randint(0, len(CAPTION_TEMPLATES), y.shape, generator=gen)
        dropped = torch.rand(y.shape, generator=gen) < drop
        captions = ["" if d else caption(CAPTION_TEMPLATES[int(t)], int(c)) for c, t, d in zip(y, templates, dropped)]
        text = self.prompt_encoder.encode(captions)
        return {"encoder_hidden_states": text["embeds"], "encoder_attention_mask": text["mask"],
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def pipeline_model(transformer, ddim, prompt_encoder=None) -> DiffusionModel:
    return DiffusionModel(transformer, "DDIMScheduler", dict(ddim.config), None, prompt_encoder).eval()


def sample(model: DiffusionModel, labels: list[int], seeds: list[int], *, num_steps: int, guidance: float,
           batch: int = 100, template: str = CAPTION_TEMPLATES[0]) -> torch.Tensor:
    """Samples of the digits ``labels`` (class ids, or for PixArt captions from ``template``)."""
    out = []
    for i in range(0, len(labels), batch):
        chunk = labels[i:i + batch]
        cond = ({"prompts": [caption(template, c) for c in chunk]} if model.is_text_conditional
                else {"class_labels": torch.tensor(chunk)})
        out.append(model.generate(seeds[i:i + batch], num_steps=num_steps, guidance_scale=guidance, **cond))
    return torch.cat(out)


def train(args):
    t_start = time.time()
    images, labels = load_digit_images(16)
    train_idx, test_idx = split_indices(len(labels), 0.2, seed=args.seed)
    x_train, y_train = images[train_idx], labels[train_idx]

    prompt_encoder = build_prompt_encoder(args.seed) if args.kind == "pixart" else None
    conditioning = Conditioning(args.kind, prompt_encoder)
    model = build_transformer(args.seed, args.kind)
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
        x0 = x_train[idx]
        cond = conditioning.draw(y_train[idx], args.class_drop, gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, train_sched.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        xt = train_sched.add_noise(x0, noise, t)
        pred = model(xt, timestep=t, **cond).sample
        loss = F.mse_loss(pred, noise)
        losses.append(step_with_ema(model, ema, opt, loss, step, args.ema))
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

    # FP samples: every class with seeds 0..n-1 (the same noise in each class's row); PixArt: the
    # first caption template, and the per-template accuracy on a few seeds
    t2 = time.time()
    pipe = pipeline_model(ema, ddim, prompt_encoder)
    seeds = list(range(args.eval_seeds))
    want = [c for c in range(NUM_CLASSES) for _ in seeds]
    samples = sample(pipe, want, seeds * NUM_CLASSES, num_steps=args.sample_steps, guidance=args.guidance)
    pred = predict(classifier, samples)
    want_t = torch.tensor(want)
    per_class = {str(c): float(pred[want_t == c].eq(c).float().mean()) for c in range(NUM_CLASSES)}
    sample_acc = float(pred.eq(want_t).float().mean())
    per_template = {}
    if args.kind == "pixart":
        few = list(range(1000, 1005))
        few_want = [c for c in range(NUM_CLASSES) for _ in few]
        for template in CAPTION_TEMPLATES:
            got = predict(classifier, sample(pipe, few_want, few * NUM_CLASSES, num_steps=args.sample_steps,
                                             guidance=args.guidance, template=template))
            per_template[template] = float(got.eq(torch.tensor(few_want)).float().mean())
    sample_seconds = time.time() - t2
    print(f"FP samples: class accuracy {sample_acc:.4f} ({args.sample_steps} DDIM steps, guidance "
          f"{args.guidance}, {len(want)} samples, {sample_seconds:.0f}s)  per class {per_class}"
          + (f"  per template {per_template}" if per_template else ""), flush=True)

    import diffusers

    dit = args.kind == "dit"
    result = {
        "command": "python -m archquant.models.train_dit " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "model": "diffusers.DiTTransformer2DModel" if dit else "diffusers.PixArtTransformer2DModel",
        "config": MODEL_CONFIG if dit else PIXART_CONFIG,
        **({"null_class": NULL_CLASS} if dit else {
            "text_encoder": {"model": "transformers.T5EncoderModel (random, frozen)", "config": T5_CONFIG,
                             "parameters": sum(p.numel() for p in prompt_encoder.encoders[0].parameters()),
                             "max_sequence_length": MAX_SEQUENCE_LENGTH},
            "captions": list(CAPTION_TEMPLATES), "negative_prompt": ""}),
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
                     "samples": len(want), **({} if dit else {"prompt": CAPTION_TEMPLATES[0]})},
        "sample_class_accuracy": sample_acc,
        "sample_class_accuracy_per_class": per_class,
        **({"sample_class_accuracy_per_template": per_template, "per_template_seeds": "1000..1004 for each class"}
           if per_template else {}),
        "train_seconds": round(train_seconds, 1),
        "classifier_seconds": round(classifier_seconds, 1),
        "sample_seconds": round(sample_seconds, 1),
        "wall_seconds": round(time.time() - t_start, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
    }
    grid = samples.view(NUM_CLASSES, args.eval_seeds, 1, 16, 16)[:, :args.grid_seeds]
    grid_pred = pred.view(NUM_CLASSES, args.eval_seeds)[:, :args.grid_seeds]
    return pipe, classifier, result, grid, grid_pred


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


def save_pipeline(out: Path, pipe: DiffusionModel, classifier, result: dict, grid, grid_pred) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_pipeline_folder(pipe, out)
    save_classifier(classifier, out)
    s = result["sampling"]
    what = f"prompt '{s['prompt']}'" if "prompt" in s else "class ids"
    save_grid(grid, grid_pred, out / "samples.png",
              f"{out.name} FP samples ({what}): {s['num_steps']} DDIM steps, guidance {s['guidance_scale']}, seeds 0-"
              f"{grid.shape[1] - 1};\nclass accuracy {result['sample_class_accuracy']:.3f} over {s['samples']} samples")
    # written twice so that the recorded size includes training.json itself
    result["folder_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    (out / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    result["folder_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    (out / "training.json").write_text(json.dumps(result, indent=2) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--kind", choices=("dit", "pixart"), default="dit",
                   help="dit: class-conditional DiT; pixart: text-conditional PixArt with a frozen T5 encoder")
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
    pipe, classifier, result, grid, grid_pred = train(args)
    save_pipeline(Path(args.out), pipe, classifier, result, grid, grid_pred)
    print(json.dumps({k: result[k] for k in ("final_loss", "classifier_test_accuracy", "sample_class_accuracy",
                                             "wall_seconds", "folder_bytes")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
