"""Train the tiny text-to-video reference: a pixel-space Wan on scikit-learn's digits moving across a canvas.

    python -m archquant.models.train_video --out models/reference/wan-digits --steps 5000 --threads 1 --seed 0

Data (``archquant.models.moving_digits``): clips of 8 frames of 24x24 in [-1, 1], a 16x16 digit
from ``load_digit_images(16)`` moving 1 pixel per frame left, right, up or down on a dark canvas,
drawn afresh every step (random digit, direction and start position). Only the 80% of the digits
that the part-1 classifier trained on are used (the seeded split of ``models/reference/dit-digits``);
the other 20% give the ground-truth accuracy of the metrics. Captions: ``CAPTION_TEMPLATES``
("a three moving left", "the digit 3 moves left", ...), a template drawn per clip.

Model: ``diffusers.WanTransformer3DModel`` in pixel space (1 channel in and out, no VAE), patch
(2, 4, 4): 4 x 6 x 6 = 144 tokens per clip, hidden 128 (4 heads of 32), FFN 256, 4 blocks, rotary
positions over (frame, row, column). Text: a tiny frozen ``UMT5EncoderModel`` with random weights
(never trained: its features only have to tell the captions apart) behind a T5 tokenizer over the
caption words built in memory, read the way ``WanPipeline`` reads it (features of the prompt's
tokens, zeros after). The caption is replaced by "" with probability ``--caption-drop``: the
unconditional branch of classifier-free guidance (negative prompt "").

Objective: rectified flow as Wan is trained and sampled. x_t = (1 - sigma) x0 + sigma noise; the
transformer, given timestep sigma * 1000, predicts the velocity noise - x0 (MSE). sigma is drawn
uniformly then shifted by ``--flow-shift`` (sigma' = s sigma / (1 + (s - 1) sigma)), the
density of the sampler's own steps: ``UniPCMultistepScheduler(prediction_type="flow_prediction",
use_flow_sigmas=True, flow_shift=s)``, WanPipeline's scheduler, turns the prediction into
x0 = x_t - sigma * v and steps through the same shifted sigmas (timesteps sigma * 1000). An EMA of
the weights is what is saved.

After training, FP clips for every digit x direction x ``--eval-seeds`` seeds (first template), and
every template on another seed, are judged by the task metrics: the part-1 digit classifier on
every frame and the centre-of-mass direction. Writes a diffusers-style pipeline folder
(``transformer/``, ``scheduler/``, ``tokenizer/``, ``text_encoder/``, ``model_index.json``), the judge
copied from ``models/reference/dit-digits`` (``classifier.safetensors`` + ``classifier.json``, so the
folder is self-contained), ``samples.png`` (a frame strip: one row per prompt), ``samples.gif`` (every
digit x direction, animated) and ``training.json`` (command, configs, losses, accuracies, timings,
the sampling settings).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from archquant.models.digits import (CLASSIFIER_CONFIG, CLASSIFIER_WEIGHTS, DIGIT_WORDS, load_classifier,
                                     load_digit_images, split_indices)
from archquant.models.dit_loading import DiffusionModel, save_pipeline_folder
from archquant.models.train_dit import step_with_ema
from archquant.models.moving_digits import (CANVAS, CAPTION_TEMPLATES, DIGIT_SIZE, DIRECTIONS, FRAMES, STEP, caption,
                                            frame_predictions, motion_direction, moving_clips)

MODEL_CONFIG = dict(patch_size=(2, 4, 4), num_attention_heads=4, attention_head_dim=32, in_channels=1,
                    out_channels=1, text_dim=64, freq_dim=64, ffn_dim=256, num_layers=4, rope_max_seq_len=64)
#: the frozen caption encoder (about 0.1 M parameters)
UMT5_CONFIG = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                   dropout_rate=0.0)
#: UMT5 tokens per caption (the longest templates are 6 with the end token); the saved tokenizer
#: says so, and the loader pads prompts to it rather than to WanPipeline's 512. Short on purpose:
#: Wan attends to the zero padding too (no mask), and every pad row dilutes the caption's.
MAX_SEQUENCE_LENGTH = 8
#: the judge: the part-1 digit classifier and the seed of the split it was trained on
JUDGE = "dit-digits"
JUDGE_SPLIT_SEED = 0
# The sampling settings the reference is judged (and quantized) with; recorded in training.json.
DEFAULT_SAMPLE_STEPS = 20
DEFAULT_GUIDANCE = 5.0
DEFAULT_FLOW_SHIFT = 3.0


def caption_words() -> list[str]:
    fixed = {w for t in CAPTION_TEMPLATES for w in t.split() if "{" not in w}
    return sorted(fixed | set(DIGIT_WORDS) | {str(d) for d in range(10)} | set(DIRECTIONS))


def caption_tokenizer():
    """A T5 tokenizer whose pieces are the caption words (``text_encoders.word_tokenizer``)."""
    from archquant.models.text_encoders import word_tokenizer

    return word_tokenizer(caption_words(), MAX_SEQUENCE_LENGTH)


def build_prompt_encoder(seed: int):
    from transformers import UMT5Config, UMT5EncoderModel

    from archquant.models.text_encoders import PromptEncoder

    tokenizer = caption_tokenizer()
    torch.manual_seed(seed + 1)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **UMT5_CONFIG)).eval().requires_grad_(False)
    return PromptEncoder("umt5", [tokenizer], [encoder], MAX_SEQUENCE_LENGTH, {"path": "unsaved"})


def build_transformer(seed: int, config: dict):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**config)
    # Wan's initialisation of the head: the output projection starts at zero, so the model starts
    # as "velocity 0" and every block's contribution grows from there
    with torch.no_grad():
        model.proj_out.weight.zero_()
        model.proj_out.bias.zero_()
    return model


def make_scheduler(flow_shift: float):
    """WanPipeline's scheduler: multistep UniPC on flow-matching sigmas, velocity prediction."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                   use_flow_sigmas=True, flow_shift=flow_shift)


def shifted_sigmas(n: int, shift: float, gen: torch.Generator) -> torch.Tensor:
    """Noise levels in (0, 1): uniform, then shifted as the scheduler shifts its steps (a larger
    shift spends more of training, as of sampling, at high noise, where the digit and its path are decided)."""
    u = torch.rand(n, generator=gen).clamp(1e-3, 1.0)
    return shift * u / (1 + (shift - 1) * u)


class ClipSampler:
    """Training batches: random digits of the training split, directions, start positions and
    caption templates, the caption dropped to "" with probability ``drop``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, prompt_encoder, drop: float, gen: torch.Generator,
                 clip_shape: dict):
        self.images, self.labels, self.encoder, self.drop, self.gen = images, labels, prompt_encoder, drop, gen
        self.clip_shape = clip_shape  # canvas, frames, step

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, self.images.shape[0], (size,), generator=self.gen)
        directions = [DIRECTIONS[int(i)] for i in torch.randint(0, len(DIRECTIONS), (size,), generator=self.gen)]
        clips = moving_clips(self.images[idx], directions, generator=self.gen, **self.clip_shape)  # (B, F, 1, S, S)
        templates = torch.randint(0, len(CAPTION_TEMPLATES), (size,), generator=self.gen)
        dropped = torch.rand(size, generator=self.gen) < self.drop
        captions = ["" if d else caption(int(c), direction, int(t))
                    for c, direction, t, d in zip(self.labels[idx], directions, templates, dropped)]
        return clips.permute(0, 2, 1, 3, 4).contiguous(), self.encoder.encode(captions)["embeds"]  # Wan: (B, C, F, H, W)


def flow_matching_loss(model, x0: torch.Tensor, text: torch.Tensor, shift: float, gen: torch.Generator) -> torch.Tensor:
    sigma = shifted_sigmas(x0.shape[0], shift, gen)
    noise = torch.randn(x0.shape, generator=gen)
    s = sigma.view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    pred = model(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=text).sample
    return F.mse_loss(pred, noise - x0)


def model_config(args) -> dict:
    return {**MODEL_CONFIG, "patch_size": tuple(args.patch), "num_layers": args.layers}


def clip_shape(args) -> dict:
    return {"canvas": args.canvas, "frames": args.frames, "step": args.step}


class CaptionProbe:
    """Is the caption read? The flow loss of a fixed batch at one noise level with its own
    caption, the wrong digit, the opposite direction and no caption: a model that ignores a part of
    the caption scores the same with it wrong."""

    OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}

    def __init__(self, images, labels, prompt_encoder, clip_shape: dict, sigma: float = 0.8, size: int = 32):
        gen = torch.Generator().manual_seed(12345)
        idx = torch.randint(0, images.shape[0], (size,), generator=gen)
        digits = [int(c) for c in labels[idx]]
        directions = [DIRECTIONS[int(i)] for i in torch.randint(0, len(DIRECTIONS), (size,), generator=gen)]
        x0 = moving_clips(images[idx], directions, generator=gen, **clip_shape).permute(0, 2, 1, 3, 4)
        noise = torch.randn(x0.shape, generator=gen)
        self.xt, self.target, self.sigma = (1 - sigma) * x0 + sigma * noise, noise - x0, sigma
        captions = {"caption": [caption(c, d) for c, d in zip(digits, directions)],
                    "wrong_digit": [caption((c + 5) % 10, d) for c, d in zip(digits, directions)],
                    "wrong_direction": [caption(c, self.OPPOSITE[d]) for c, d in zip(digits, directions)],
                    "empty": [""] * size}
        self.text = {k: prompt_encoder.encode(v)["embeds"] for k, v in captions.items()}

    @torch.no_grad()
    def __call__(self, model) -> dict:
        t = torch.full((self.xt.shape[0],), self.sigma * 1000)
        return {k: round(F.mse_loss(model(hidden_states=self.xt, timestep=t, encoder_hidden_states=text).sample,
                                    self.target).item(), 4) for k, text in self.text.items()}


def learning_rate(step: int, args) -> float:
    """Linear warm-up, then cosine down to 5%."""
    return args.lr * min(1.0, (step + 1) / args.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))


def generate(model: DiffusionModel, prompts: list[str], seeds: list[int], args, batch: int = 40) -> torch.Tensor:
    """Clips (N, F, 1, S, S) in [0, 1] for ``prompts``, one seed each, at the default sampling settings."""
    out = []
    for i in range(0, len(prompts), batch):
        out.append(model.generate(seeds[i:i + batch], num_steps=args.sample_steps, guidance_scale=args.guidance,
                                  prompts=prompts[i:i + batch], resolution=args.canvas, num_frames=args.frames))
    return torch.cat(out)


def judge(classifier, clips01: torch.Tensor, digits: list[int], directions: list[str], digit_size: int) -> dict:
    """The task metrics of clips asked for ``digits`` moving ``directions``: per-frame class
    accuracy, direction accuracy, and both per digit and per direction."""
    pred = frame_predictions(classifier, clips01, window=digit_size)
    got_dir = motion_direction(clips01)
    correct_class = pred.eq(torch.tensor(digits).view(-1, 1)).float().mean(1)  # per clip
    correct_dir = torch.tensor([g == d for g, d in zip(got_dir, directions)], dtype=torch.float32)
    digits_t = torch.tensor(digits)
    per_digit = {str(c): {"class": float(correct_class[digits_t == c].mean()),
                          "direction": float(correct_dir[digits_t == c].mean())}
                 for c in sorted(set(digits))}
    per_direction = {d: {"class": float(correct_class[[x == d for x in directions]].mean()),
                         "direction": float(correct_dir[[x == d for x in directions]].mean())}
                     for d in DIRECTIONS if d in directions}
    return {"class_accuracy": float(correct_class.mean()), "direction_accuracy": float(correct_dir.mean()),
            "clips": len(digits), "per_digit": per_digit, "per_direction": per_direction,
            "predictions": pred, "directions_read": got_dir}


def ground_truth_metrics(classifier, images: torch.Tensor, labels: torch.Tensor, args) -> dict:
    """The metrics on real clips of the held-out digits: the ceiling a perfect generator reaches."""
    directions = [DIRECTIONS[i % len(DIRECTIONS)] for i in range(images.shape[0])]
    clips = moving_clips(images, directions, generator=torch.Generator().manual_seed(args.seed), **clip_shape(args))
    result = judge(classifier, clips * 0.5 + 0.5, labels.tolist(), directions, args.digit_size)
    return {"class_accuracy": result["class_accuracy"], "direction_accuracy": result["direction_accuracy"],
            "clips": result["clips"]}


def evaluate(pipe: DiffusionModel, classifier, args) -> tuple[dict, torch.Tensor, dict]:
    """FP clips: every digit x direction with seeds 0..eval_seeds-1 and the first template; every
    template on seed 1000. Returns the metrics, the first-template clips (digit, direction, seed)
    and their judgements."""
    grid = [(c, d, s) for s in range(args.eval_seeds) for c in range(10) for d in DIRECTIONS]
    digits, directions, seeds = (list(v) for v in zip(*grid))
    prompts = [caption(c, d, 0) for c, d in zip(digits, directions)]
    t0 = time.time()
    clips = generate(pipe, prompts, seeds, args)
    main = judge(classifier, clips, digits, directions, args.digit_size)
    per_template = {}
    for t, template in enumerate(CAPTION_TEMPLATES):
        pairs = [(c, d) for c in range(10) for d in DIRECTIONS]
        got = judge(classifier, generate(pipe, [caption(c, d, t) for c, d in pairs], [1000] * len(pairs), args),
                    [c for c, _ in pairs], [d for _, d in pairs], args.digit_size)
        per_template[template] = {"class": got["class_accuracy"], "direction": got["direction_accuracy"]}
    metrics = {k: v for k, v in main.items() if k not in ("predictions", "directions_read")}
    metrics["per_template"] = per_template
    metrics["per_template_seed"] = 1000
    metrics["seconds"] = round(time.time() - t0, 1)
    shape = (args.eval_seeds, 10, len(DIRECTIONS))
    views = {"clips": clips.view(*shape, *clips.shape[1:]), "predictions": main["predictions"].view(*shape, -1),
             "directions_read": [main["directions_read"][i:i + len(DIRECTIONS)]
                                 for i in range(0, len(grid), len(DIRECTIONS))]}
    return metrics, views, {"prompt_template": CAPTION_TEMPLATES[0], "seeds": f"0..{args.eval_seeds - 1}"}


def time_one_batch(pipe: DiffusionModel, args, batch: int = 20) -> float:
    """Seconds for one call generating ``batch`` clips at the default settings (threads as set)."""
    prompts = [caption(i % 10, DIRECTIONS[i % 4], 1) for i in range(batch)]
    t0 = time.time()
    pipe.generate(list(range(batch)), num_steps=args.sample_steps, guidance_scale=args.guidance, prompts=prompts,
                  resolution=args.canvas, num_frames=args.frames)
    return round(time.time() - t0, 2)


def train(args):
    t_start = time.time()
    images, labels = load_digit_images(args.digit_size)
    train_idx, test_idx = split_indices(len(labels), 0.2, seed=JUDGE_SPLIT_SEED)
    prompt_encoder = build_prompt_encoder(args.seed)
    model = build_transformer(args.seed, model_config(args))
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(args.seed)
    data = ClipSampler(images[train_idx], labels[train_idx], prompt_encoder, args.caption_drop, gen, clip_shape(args))
    probe = CaptionProbe(images[train_idx], labels[train_idx], prompt_encoder, clip_shape(args))
    model.train()
    losses, curve, probes, smooth = [], [], [], None
    t0 = time.time()
    for step in range(args.steps):
        lr = learning_rate(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        x0, text = data.batch(args.batch_size)
        loss = flow_matching_loss(model, x0, text, args.train_shift, gen)
        losses.append(step_with_ema(model, ema, opt, loss, step, args.ema))
        smooth = losses[-1] if smooth is None else 0.98 * smooth + 0.02 * losses[-1]
        if step % args.log_every == 0 or step == args.steps - 1:
            curve.append([step, round(smooth, 5)])
            probes.append({"step": step, **probe(ema)})
            print(f"step {step:5d}  loss {smooth:.4f}  lr {lr:.2e}  {time.time() - t0:.0f}s  EMA probe {probes[-1]}",
                  flush=True)
    train_seconds = time.time() - t0

    classifier_path = Path(args.classifier)
    classifier = load_classifier(classifier_path)
    truth = ground_truth_metrics(classifier, images[test_idx], labels[test_idx], args)
    print(f"ground truth (held-out digits): class {truth['class_accuracy']:.4f}  direction "
          f"{truth['direction_accuracy']:.4f}", flush=True)

    pipe = DiffusionModel(ema, "UniPCMultistepScheduler", dict(make_scheduler(args.flow_shift).config), None,
                          prompt_encoder, "WanPipeline").eval()
    metrics, views, eval_set = evaluate(pipe, classifier, args)
    print(f"FP clips: class {metrics['class_accuracy']:.4f}  direction {metrics['direction_accuracy']:.4f}  "
          f"({metrics['clips']} clips, {metrics['seconds']:.0f}s)  per template {metrics['per_template']}", flush=True)
    batch_seconds = time_one_batch(pipe, args)

    import diffusers

    judge_info = json.loads((classifier_path / "training.json").read_text()) if (classifier_path / "training.json").is_file() else {}
    result = {
        "command": "python -m archquant.models.train_video " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "model": "diffusers.WanTransformer3DModel (pixel space, no VAE)",
        "config": {**model_config(args), "patch_size": list(args.patch)},
        "text_encoder": {"model": "transformers.UMT5EncoderModel (random, frozen)", "config": UMT5_CONFIG,
                         "parameters": sum(p.numel() for p in prompt_encoder.encoders[0].parameters()),
                         "max_sequence_length": MAX_SEQUENCE_LENGTH},
        "captions": list(CAPTION_TEMPLATES), "directions": list(DIRECTIONS), "negative_prompt": "",
        "parameters": sum(p.numel() for p in ema.parameters()),
        "data": (f"archquant.models.moving_digits: {args.frames} frames of {args.canvas}x{args.canvas} in [-1, 1], a "
                 f"load_digit_images({args.digit_size}) digit moving {args.step} px per frame; digits of the judge's training split "
                 f"({len(train_idx)} digits, split seed {JUDGE_SPLIT_SEED}); {len(test_idx)} held out"),
        "objective": (f"rectified flow: x_t = (1 - sigma) x0 + sigma noise, target noise - x0, timestep sigma * 1000, "
                      f"sigma uniform shifted by {args.train_shift}; MSE; EMA weights saved"),
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup, "ema": args.ema,
        "caption_drop": args.caption_drop, "train_shift": args.train_shift, "seed": args.seed,
        "final_loss": float(sum(losses[-100:]) / len(losses[-100:])),
        "final_loss_note": "mean training loss of the last 100 steps",
        "loss_curve": curve,
        "caption_probe": {"what": f"EMA flow loss of {probe.xt.shape[0]} fixed training clips at sigma {probe.sigma} "
                                  "with their caption, the wrong digit, the opposite direction, no caption",
                          "history": probes},
        "judge": {"classifier": f"models/reference/{JUDGE}/{CLASSIFIER_WEIGHTS} (copied here)",
                  "held_out_accuracy": judge_info.get("classifier_test_accuracy"),
                  "metrics": "moving_digits.frame_class_accuracy (every frame, a 16x16 crop at its centre of "
                             "mass) and moving_digits.direction_accuracy (centre-of-mass slope)",
                  "ground_truth_held_out_clips": truth},
        "sampling": {"scheduler": "UniPCMultistepScheduler (scheduler/), flow_prediction, flow sigmas",
                     "flow_shift": args.flow_shift, "num_steps": args.sample_steps, "guidance_scale": args.guidance,
                     "negative_prompt": "", "num_frames": args.frames, "resolution": args.canvas,
                     "max_sequence_length": MAX_SEQUENCE_LENGTH, **eval_set},
        "sample_class_accuracy": metrics["class_accuracy"],
        "sample_direction_accuracy": metrics["direction_accuracy"],
        "sample_metrics": metrics,
        "train_seconds": round(train_seconds, 1),
        "sample_seconds": metrics["seconds"],
        "seconds_per_batch_of_20_clips": batch_seconds,
        "wall_seconds": round(time.time() - t_start, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
    }
    return pipe, result, views


def _frame_image(clip: torch.Tensor, scale: int, gap: int) -> torch.Tensor:
    return F.pad(clip.repeat_interleave(scale, -1).repeat_interleave(scale, -2), (0, gap, 0, gap), value=0.35)


def save_gif(views: dict, path: Path, scale: int = 2, gap: int = 2, fps: int = 4) -> None:
    """Seed 0's clips animated in a grid: one row per direction, one column per digit; the frame
    around a clip turns red where the classifier misreads that frame."""
    import imageio.v2 as imageio

    clips = views["clips"][0]  # (10 digits, 4 directions, F, 1, S, S)
    pred = views["predictions"][0]
    frames = []
    for f in range(clips.shape[2]):
        rows = []
        for d in range(len(DIRECTIONS)):
            tiles = []
            for c in range(10):
                tile = _frame_image(clips[c, d, f, 0], scale, gap).unsqueeze(-1).repeat(1, 1, 3)
                if int(pred[c, d, f]) != c:
                    tile[-gap:, :] = torch.tensor([1.0, 0.0, 0.0])
                    tile[:, -gap:] = torch.tensor([1.0, 0.0, 0.0])
                tiles.append(tile)
            rows.append(torch.cat(tiles, dim=1))
        frames.append((torch.cat(rows, dim=0) * 255).round().byte().numpy())
    imageio.mimsave(path, frames, duration=1000 / fps, loop=0)


def save_strip(views: dict, path: Path, title: str) -> None:
    """A frame strip: one row per prompt (each digit, the directions in turn, seed 0), one column
    per frame; a frame the classifier reads as another digit gets a red border and its reading,
    and each row is labelled with the prompt and the direction read from the clip."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clips, pred, read = views["clips"][0], views["predictions"][0], views["directions_read"]
    frames = clips.shape[2]
    fig, axes = plt.subplots(10, frames, figsize=(frames * 0.75 + 2.2, 10 * 0.75 + 0.6), squeeze=False)
    for c in range(10):
        d = c % len(DIRECTIONS)
        got = read[c][d]  # seed 0's rows come first in the evaluation grid
        for f in range(frames):
            ax = axes[c][f]
            ax.imshow(clips[c, d, f, 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            wrong = int(pred[c, d, f]) != c
            for spine in ax.spines.values():
                spine.set_color("red" if wrong else "none")
                spine.set_linewidth(2)
            if wrong:
                ax.set_title(f"→{int(pred[c, d, f])}", fontsize=7, color="red", pad=1)
        label = caption(c, DIRECTIONS[d], 0) + ("" if got == DIRECTIONS[d] else f"\n(read: {got})")
        axes[c][0].set_ylabel(label, rotation=0, labelpad=4, fontsize=7, ha="right", va="center",
                              color="black" if got == DIRECTIONS[d] else "red")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_outputs(out: Path, pipe: DiffusionModel, result: dict, views: dict, classifier: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_pipeline_folder(pipe, out)
    for name in (CLASSIFIER_WEIGHTS, CLASSIFIER_CONFIG):  # the judge travels with the model
        shutil.copyfile(classifier / name, out / name)
    s = result["sampling"]
    save_strip(views, out / "samples.png",
               f"{out.name} FP clips (seed 0): {s['num_steps']} UniPC steps, guidance {s['guidance_scale']}; class "
               f"accuracy {result['sample_class_accuracy']:.3f} (frames), direction "
               f"{result['sample_direction_accuracy']:.3f} over {result['sample_metrics']['clips']} clips")
    save_gif(views, out / "samples.gif")
    # written twice so that the recorded size includes training.json itself
    for _ in range(2):
        result["folder_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        (out / "training.json").write_text(json.dumps(result, indent=2) + "\n")


def main(argv=None) -> int:
    from archquant.models import reference_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--canvas", type=int, default=CANVAS, help="clip side in pixels")
    p.add_argument("--frames", type=int, default=FRAMES)
    p.add_argument("--digit-size", type=int, default=DIGIT_SIZE, help="side of the digits drawn (load_digit_images)")
    p.add_argument("--step", type=int, default=STEP, help="pixels the digit moves per frame")
    p.add_argument("--patch", type=lambda s: tuple(int(v) for v in s.split(",")), default=MODEL_CONFIG["patch_size"],
                   help="Wan patch (frames, rows, columns), e.g. 2,2,2")
    p.add_argument("--layers", type=int, default=MODEL_CONFIG["num_layers"], help="Wan blocks")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.998, help="EMA decay of the saved weights")
    p.add_argument("--caption-drop", type=float, default=0.1, help="probability of training on the empty caption")
    p.add_argument("--flow-shift", type=float, default=DEFAULT_FLOW_SHIFT, help="the sampler's sigma shift (scheduler/)")
    p.add_argument("--train-shift", type=float, default=None,
                   help="shift of the training sigmas (default: --flow-shift, the sampler's own density)")
    p.add_argument("--sample-steps", type=int, default=DEFAULT_SAMPLE_STEPS, help="UniPC steps for the check")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance scale")
    p.add_argument("--eval-seeds", type=int, default=3, help="clips per (digit, direction) for the accuracies")
    p.add_argument("--classifier", default=str(reference_dir(JUDGE)), help="folder of the judging digit classifier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)
    if args.train_shift is None:
        args.train_shift = args.flow_shift
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe, result, views = train(args)
    save_outputs(Path(args.out), pipe, result, views, Path(args.classifier))
    print(json.dumps({k: result[k] for k in ("final_loss", "sample_class_accuracy", "sample_direction_accuracy",
                                             "wall_seconds", "folder_bytes")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
