"""The diffusion-transformer family: image DiTs (DiT, PixArt, FLUX) and video DiTs (Wan, CogVideoX).

What it declares:
* model: a diffusers pipeline folder or hub id (``model.path``) or a committed reference model
  (``model.options.reference``), loaded as ``models.dit_loading.DiffusionModel``;
* data: ``source: classes`` (DiT): every (class id, seed) pair of ``options.class_ids`` x
  ``num_samples`` seeds from ``seed``; ``source: prompts`` (the text-conditioned models): every
  (prompt, seed) pair of ``options.prompts``. Generated with ``options.num_steps`` sampler steps at
  ``options.guidance_scale``, ``options.resolution`` and, for videos, ``options.num_frames``. A
  calibration pass samples whole trajectories, so activations are collected at every timestep of
  the sampler and every frame (timestep-aware calibration; the statistics are running ones, so a
  long clip costs no memory). Calibration and evaluation must not share a (class, seed) pair (the
  same noise and label) nor a prompt (whatever its seeds): the disjointness check refuses either;
* structure: per transformer class (``LAYOUTS``), the attention projections and feed-forward
  Linears of every block are quantized; the timestep / class / caption embedders, the adaLN
  modulation Linears, the patch embedding and the output projections stay in floating point
  (LRQ-DiT's and ViDiT-Q's skip list);
* metrics, per item (so that ``torchrun`` can shard them): PSNR and SSIM of every image or video
  against the FP model's from the same class or prompt and seed, for videos per frame and the error
  of frame-to-frame changes too, and, on the reference models, the share of samples (frames) their
  digit classifier assigns to the digit asked for, and for videos the share moving the asked way;
  set-level metrics in one process where their networks are present (FID, LPIPS, CLIP score; for
  videos FVD against the FP clips with ``options.fvd_network``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.structure import ModelStructure
from ..data import DataSplit, digest_record, digest_text, label_digests
from ..evaluation import EvalContext, Metric, merge_item_means
from ..models import existing_reference_dir
from ..models.dit_loading import (VIDEO_KINDS, DiffusionModel, build_diffusion_model, check_frames, check_resolution,
                                  load_pipeline_folder)
from ..eval.diffusion_metrics import image_item_metrics, video_item_metrics
from ..eval.fvd import METRICS as VIDEO_METRICS
from ..eval.image_metrics import METRICS as IMAGE_METRICS
from ..options import Option
from . import dit_recipes
from .base import FamilyAdapter, register_adapter


@dataclass(frozen=True)
class BlockLayout:
    """One list of repeated blocks of a transformer class: the Linears quantized in each block
    (attention projections, and feed-forward ones unless ``model.options.feed_forward`` is off)."""

    blocks: str
    attention: tuple[str, ...]
    feed_forward: tuple[str, ...]


_SELF_AND_CROSS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                   "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")  # attn2: cross-attention (PixArt)
_FF = ("ff.net.0.proj", "ff.net.2")
#: transformer class -> its block lists (diffusers' module names; a name a model lacks is skipped)
LAYOUTS = {
    "DiTTransformer2DModel": (BlockLayout("transformer_blocks", _SELF_AND_CROSS, _FF),),
    "PixArtTransformer2DModel": (BlockLayout("transformer_blocks", _SELF_AND_CROSS, _FF),),
    "FluxTransformer2DModel": (
        # joint attention: image (to_*) and text (add_*_proj, to_add_out) streams; their two MLPs
        BlockLayout("transformer_blocks",
                    ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                     "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
                    _FF + ("ff_context.net.0.proj", "ff_context.net.2")),
        # single blocks: q/k/v and the MLP read the same input; proj_out maps [attention, MLP] back
        BlockLayout("single_transformer_blocks", ("attn.to_q", "attn.to_k", "attn.to_v"), ("proj_mlp", "proj_out")),
    ),
    # Wan: self- and cross-attention (I2V adds add_k_proj / add_v_proj for the image), its MLP is ffn.*
    "WanTransformer3DModel": (BlockLayout("blocks", _SELF_AND_CROSS + ("attn2.add_k_proj", "attn2.add_v_proj"),
                                          ("ffn.net.0.proj", "ffn.net.2")),),
    # CogVideoX: one attention over text + video tokens, and the MLP
    "CogVideoXTransformer3DModel": (BlockLayout("transformer_blocks", _SELF_AND_CROSS[:4], _FF),),
}
#: kept in floating point by default (patterns over the model's module names): embedders, adaLN
#: modulation, patch embedding, output layers, caption projection, and the VAE
FP_BY_DEFAULT = ["re:.*\\.norm1\\.emb\\..*", "re:.*\\.norm[12](_context)?\\.linear", "re:.*\\.norm\\.linear",
                 "re:transformer\\.proj_out(_\\d)?", "re:transformer\\.norm_out\\..*", "re:.*pos_embed.*",
                 "re:transformer\\.(adaln_single|caption_projection|time_text_embed|condition_embedder)\\..*",
                 "re:transformer\\.(time_embedding|patch_embed)\\..*", "re:transformer\\.patch_embedding",
                 "re:transformer\\.(context_embedder|x_embedder)", "re:vae\\..*"]
#: the data source each sampling kind reads
SOURCES = {"class_conditional": "classes", "pixart": "prompts", "flux": "prompts", "wan": "prompts",
           "cogvideox": "prompts"}


@register_adapter
class DiTAdapter(FamilyAdapter):
    name = "dit"
    model_options = {
        "reference": Option("dit-digits", help="committed reference model under models/reference/ (model.path=null)"),
        "classifier": Option(None, type=str, help="digit classifier folder for class accuracy (default: the model folder)"),
        "max_sequence_length": Option(None, type=int, minimum=1,
                                      help="T5 tokens per prompt (default: the pipeline's, e.g. PixArt-Sigma 300)"),
        "feed_forward": Option(True, help="quantize feed-forward Linears too (false: attention only, as LRQ-DiT's "
                                          "FLUX scripts)"),
    }
    data_sources = ("classes", "prompts")
    data_options = {
        "class_ids": Option([], type=list, items=int, help="class ids to generate (empty: every class)"),
        "prompts": Option([], type=list, items=str, help="prompts to generate (source: prompts)"),
        "negative_prompt": Option("", help="PixArt's negative prompt for classifier-free guidance"),
        "num_steps": Option(25, minimum=1, help="sampler steps"),
        "guidance_scale": Option(3.0, minimum=0.0, help="classifier-free guidance scale (<= 1: none); FLUX: the "
                                                        "distilled guidance of guidance-embedding models"),
        "resolution": Option(None, type=int, minimum=1, help="image side in pixels (default: the model's own)"),
        "num_frames": Option(None, type=int, minimum=1, help="video models: frames per clip (default: the model's "
                                                             "own; 4k+1 through Wan's and CogVideoX's VAEs)"),
        # optional metrics: computed when what they need is present, else left out with a note
        "fid_reference": Option(None, type=str, roles=("evaluation",),
                                help="folder of real images for FID (needs torch-fidelity's Inception weights)"),
        "clip_model": Option("openai/clip-vit-base-patch16", type=str, roles=("evaluation",),
                             help="CLIP model (local folder, or a hub id in the HF cache) for the CLIP score of "
                                  "text-to-image samples; null: none"),
        "fvd_network": Option(None, type=str, roles=("evaluation",),
                              help="video models: a local I3D state dict (.safetensors or .pt; eval/fvd.py) for "
                                   "fvd_vs_fp; null: none"),
        "lpips": Option("alex", type=str, allowed=("alex", "vgg", "squeeze", None), roles=("evaluation",),
                        help="LPIPS backbone for lpips_vs_fp (needs torchvision's weights); null: none"),
    }
    metrics = (
        Metric("psnr_vs_fp", lower_is_better=False, unit="dB", relative_to_fp=True,
               description="PSNR of each image against the FP model's from the same class or prompt and seed (mean)"),
        Metric("ssim_vs_fp", lower_is_better=False, relative_to_fp=True,
               description="SSIM against the FP model's image from the same class or prompt and seed (mean)"),
        Metric("frame_psnr_vs_fp", lower_is_better=False, unit="dB", relative_to_fp=True,
               description="videos: mean over frames of each frame's PSNR against the FP frame"),
        Metric("temporal_rmse_vs_fp", lower_is_better=True, relative_to_fp=True,
               description="videos: RMS error of the frame-to-frame changes against the FP video's (flicker)"),
        Metric("class_accuracy", lower_is_better=False,
               description="share of samples (video frames) the reference classifier assigns to the requested digit"),
        Metric("direction_accuracy", lower_is_better=False,
               description="videos: share whose digit moves the requested way (centre of mass over frames)"),
        *IMAGE_METRICS,
        *VIDEO_METRICS,
    )
    presets = dit_recipes.DIT_PRESETS
    shards_evaluation = True

    # ------------------------------------------------------------------ model

    def load_model(self, path: str | None, options: dict[str, Any], dtype: str) -> tuple[nn.Module, dict]:
        if path is None:
            folder = existing_reference_dir(options["reference"])
            source = {"reference": options["reference"]}
        else:
            folder, source = Path(path).expanduser(), None
        model = load_pipeline_folder(folder if path is None else path, dtype=getattr(torch, dtype), text_source=source,
                                     max_sequence_length=options.get("max_sequence_length"))
        local = folder if folder.is_dir() else None
        default = str(local) if local is not None and (local / "classifier.safetensors").is_file() else None
        model.classifier_path = options.get("classifier") or default
        model.feed_forward = bool(options.get("feed_forward", True))
        return model, self.model_config(model)

    def model_config(self, model: nn.Module) -> dict:
        return {**model.build_config(), "classifier": getattr(model, "classifier_path", None),
                "feed_forward": getattr(model, "feed_forward", True)}

    def build_model(self, model_config: dict) -> nn.Module:
        model = build_diffusion_model(model_config)
        model.classifier_path = model_config.get("classifier")
        model.feed_forward = bool(model_config.get("feed_forward", True))
        return model

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, DiffusionModel)

    def structure(self, model: nn.Module) -> ModelStructure:
        names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        with_ff = getattr(model, "feed_forward", True)
        blocks, quantize = [], []
        for layout in LAYOUTS[type(model.transformer).__name__]:
            linears = layout.attention + (layout.feed_forward if with_ff else ())
            for i in range(len(getattr(model.transformer, layout.blocks))):
                block = f"transformer.{layout.blocks}.{i}"
                blocks.append(block)
                quantize += [f"{block}.{lin}" for lin in linears if f"{block}.{lin}" in names]
        cfg = model.transformer.config
        # what activation quantization leaves in FP may still have its weights stored in int8
        chosen = set(quantize)
        weight_only = sorted(n for n in names if n.startswith("transformer.") and n not in chosen)
        return ModelStructure(hidden_size=int(cfg.num_attention_heads * cfg.attention_head_dim),
                              quantize=quantize, skip=list(FP_BY_DEFAULT), blocks=blocks, weight_only=weight_only)

    # ------------------------------------------------------------------ data

    def load_data(self, data_cfg: dict, role: str, model_config: dict) -> DataSplit:
        source = data_cfg["source"]
        if source not in self.data_sources:
            raise ValueError(f"{role}.source={source!r} not available for family dit: allowed "
                             f"{', '.join(map(repr, self.data_sources))}")
        transformer_class = model_config["transformer_class"]
        kind = _kind(transformer_class)
        if source != SOURCES[kind]:
            what = "class-conditional" if kind == "class_conditional" else "text-to-image"
            raise ValueError(f"{role}.source={source!r} does not fit a {transformer_class}, which is {what}: use "
                             f"source {SOURCES[kind]!r}")
        opts = self.data_options_of(data_cfg, role)
        resolution, frames = opts["resolution"], opts["num_frames"]
        if resolution is not None:
            check_resolution(resolution, model_config, f"{role}.options.resolution")
        if frames is not None:
            if kind not in VIDEO_KINDS:
                raise ValueError(f"{role}.options.num_frames: a {transformer_class} generates images, not videos")
            check_frames(frames, model_config, f"{role}.options.num_frames")
        n, first, bs = int(data_cfg["num_samples"]), int(data_cfg.get("seed") or 0), int(data_cfg["batch_size"])
        common = {"num_steps": opts["num_steps"], "guidance_scale": opts["guidance_scale"], "resolution": resolution,
                  **({"num_frames": frames} if kind in VIDEO_KINDS else {})}
        if source == "classes":
            items, batches, digests = _class_items(opts, model_config, role, n, first, bs, common)
        else:
            items, batches, digests = _prompt_items(opts, role, n, first, bs, common)
        extra = {}
        if role == "evaluation":
            from ..eval.image_metrics import OptionalImageMetrics

            extra["classifier"] = _load_classifier(model_config.get("classifier"))
            extra["image_metrics"] = OptionalImageMetrics(fid_reference=opts["fid_reference"],
                                                          clip_model=opts["clip_model"], lpips=opts["lpips"])
            if kind in VIDEO_KINDS and opts["fvd_network"]:
                from ..eval.fvd import FVDvsFP

                extra["fvd"] = FVDvsFP(opts["fvd_network"])  # reads the network now: a bad file is bad input
        return DataSplit(f"{source}/{role}", batches, frozenset(items), extra=extra, digests=digests)

    def validate_batch(self, model: nn.Module, batch: Any) -> None:
        if not isinstance(batch, dict) or "seeds" not in batch:
            raise ValueError("a DiT batch is a dict with 'seeds' and 'class_labels' or 'prompts'")
        if model.is_text_conditional:
            prompts = batch.get("prompts")
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"a {type(model.transformer).__name__} batch needs 'prompts', a list of strings")
            count = len(prompts)
        else:
            if "class_labels" not in batch:
                raise ValueError(f"a {type(model.transformer).__name__} batch needs 'class_labels'")
            labels = torch.as_tensor(batch["class_labels"])
            if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < model.num_classes):
                raise ValueError(f"class ids must be in 0..{model.num_classes - 1}, got {labels.tolist()}")
            count = labels.numel()
        if len(batch["seeds"]) != count:
            raise ValueError(f"{len(batch['seeds'])} seeds for {count} samples")

    def forward(self, model: nn.Module, batch: Any) -> Any:
        return model.generate(batch["seeds"], num_steps=batch["num_steps"], guidance_scale=batch["guidance_scale"],
                              class_labels=batch.get("class_labels"), prompts=batch.get("prompts"),
                              negative_prompt=batch.get("negative_prompt", ""), resolution=batch.get("resolution"),
                              num_frames=batch.get("num_frames"))

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, model: nn.Module, data: DataSplit, ctx: EvalContext | None = None) -> dict[str, float]:
        """The metrics of every item merged (``merge_items(evaluate_items(...))``, what a sharded run
        computes from its ranks' items too), plus FID / LPIPS / CLIP score where their weights are
        present (set-level metrics, in one process only)."""
        rows, samples = self._generate_and_score(model, data, ctx)
        metrics = self.merge_items(rows)
        if ctx is not None:
            ctx.items = rows
            _optional_metrics(samples, data, ctx, metrics)
        return metrics

    def evaluate_items(self, model: nn.Module, data: DataSplit, ctx: EvalContext) -> list[dict]:
        """One row per image or video of ``data`` (a shard of the evaluation batches): its task
        results and, for a quantized model, its fidelity against the FP sample of the same item."""
        if data.extra.get("image_metrics") is not None:
            ctx.note("fid, lpips_vs_fp, clip_score and fvd_vs_fp are not computed when the evaluation is sharded "
                     "across processes (they need every sample in one place)")
        return self._generate_and_score(model, data, ctx)[0]

    def merge_items(self, rows: list[dict]) -> dict[str, float]:
        """Each metric's mean over the items, summed in item order (so any sharding, gathered back in
        order, gives the same bits); a metric some item lacks is left out."""
        return merge_item_means(rows)

    def _generate_and_score(self, model: nn.Module, data: DataSplit, ctx: EvalContext | None):
        from tqdm import tqdm

        samples = torch.cat([self.forward(model, b) for b in tqdm(data.batches, desc="generating", leave=False,
                                                                  disable=None)])
        video = samples.dim() == 5  # (N, F, C, H, W)
        items = _items(data.batches)
        rows = [{"item": index} for index, _, _ in items]
        for row, task in zip(rows, _task_results(samples, data, video)):
            row.update(task)
        if ctx is None:
            return rows, samples
        if ctx.is_fp:
            ctx.keep(samples)
        elif ctx.fp is not None:
            fidelity = (video_item_metrics if video else image_item_metrics)(samples, ctx.fp)
            for row, values in zip(rows, fidelity):
                row.update({f"{k}_vs_fp": v for k, v in values.items()})
        fp = None if ctx.is_fp else ctx.fp
        if video:
            _write_videos(ctx, samples, fp, items)
        else:
            _write_grid(ctx, samples, fp, [title for _, title, _ in items], part=items[0][0] if items else 0)
        return rows, samples


def _task_results(samples: torch.Tensor, data: DataSplit, video: bool) -> list[dict]:
    """Per item, what the reference models' digit classifier says: whether the image (the share of
    a video's frames) shows the asked digit, and whether a video's digit moves the asked way (centre
    of mass over frames). Nothing when there is no classifier or a prompt names no digit or no
    direction (never made up)."""
    n = len(samples)
    classifier = data.extra.get("classifier")
    if classifier is None:
        return [{} for _ in range(n)]
    if not video:
        labels = _requested_classes(data.batches)
        if labels is None:
            return [{} for _ in range(n)]
        from ..models.digits import predict

        return [{"class_accuracy": float(ok)} for ok in predict(classifier, samples).eq(labels).tolist()]
    from ..models.moving_digits import direction_accuracy, frame_class_accuracy, parse_video_prompt

    asked = [parse_video_prompt(p) for b in data.batches for p in b["prompts"]]
    rows: list[dict] = [{} for _ in range(n)]
    for row, video_i, (digit, direction) in zip(rows, samples.split(1), asked):
        if digit is not None:
            row["class_accuracy"] = float(frame_class_accuracy(classifier, video_i, [digit]))
        if direction is not None:
            row["direction_accuracy"] = float(direction_accuracy(video_i, [direction]))
    return rows


def _optional_metrics(samples: torch.Tensor, data: DataSplit, ctx: EvalContext, metrics: dict) -> None:
    """FID / LPIPS / CLIP score where their weights are present, else a note; videos are scored
    frame by frame (each frame with its video's prompt), and FVD against the FP clips when
    ``fvd_network`` is given."""
    optional = data.extra.get("image_metrics")
    if optional is None:
        return
    prompts = [p for b in data.batches for p in b["prompts"]] if "prompts" in data.batches[0] else None
    fp = None if ctx.is_fp else ctx.fp
    if samples.dim() == 5:  # videos
        fvd = data.extra.get("fvd")
        if fvd is None:
            ctx.note("fvd_vs_fp skipped: no fvd_network given (a local I3D state dict; see eval/fvd.py)")
        else:
            found, notes = fvd.evaluate(samples, fp)
            metrics.update(found)
            for note in notes:
                ctx.note(note)
        frames = samples.shape[1]
        samples, fp = samples.flatten(0, 1), None if fp is None else fp.flatten(0, 1)
        prompts = None if prompts is None else [p for p in prompts for _ in range(frames)]
    found, notes = optional.evaluate(samples, fp_images=fp, prompts=prompts)
    metrics.update(found)
    for note in notes:
        ctx.note(note)


def _kind(transformer_class: str) -> str:
    from ..models.dit_loading import SUPPORTED_TRANSFORMERS, unsupported_message

    if transformer_class not in SUPPORTED_TRANSFORMERS:
        raise ValueError(unsupported_message(transformer_class))
    return SUPPORTED_TRANSFORMERS[transformer_class]


def _class_items(opts: dict, model_config: dict, role: str, n: int, first: int, bs: int, common: dict):
    num_classes = int(model_config["transformer_config"]["num_embeds_ada_norm"])
    class_ids = list(opts["class_ids"]) or list(range(num_classes))
    bad = [c for c in class_ids if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"{role}.options.class_ids: class id {bad[0]} is outside the model's classes "
                         f"0..{num_classes - 1}")
    pairs = [(c, first + k) for k in range(n) for c in class_ids]
    batches = [{"class_labels": torch.tensor([c for c, _ in pairs[i:i + bs]]),
                "seeds": [s for _, s in pairs[i:i + bs]], "items": list(range(i, min(i + bs, len(pairs)))), **common}
               for i in range(0, len(pairs), bs)]
    # content identity: the same (class, seed) is the same label and the same initial noise
    digests = label_digests((digest_record({"class": c, "seed": s}), f"class {c} seed {s}") for c, s in pairs)
    return pairs, batches, digests


def normalize_prompt(prompt: str) -> str:
    """What makes two prompts the same prompt: case and runs of whitespace do not count."""
    return " ".join(prompt.lower().split())


def _prompt_items(opts: dict, role: str, n: int, first: int, bs: int, common: dict):
    prompts = list(opts["prompts"])
    if not prompts:
        raise ValueError(f"{role}.options.prompts is empty: give at least one prompt to generate")
    blank = [i for i, p in enumerate(prompts) if not p.strip()]
    if blank:
        raise ValueError(f"{role}.options.prompts[{blank[0]}] is blank: every prompt needs some text")
    pairs = [(p, first + k) for k in range(n) for p in prompts]
    batches = [{"prompts": [p for p, _ in pairs[i:i + bs]], "seeds": [s for _, s in pairs[i:i + bs]],
                "items": list(range(i, min(i + bs, len(pairs)))), "negative_prompt": opts["negative_prompt"], **common}
               for i in range(0, len(pairs), bs)]
    # content identity is the prompt itself, whatever the seed: calibrating on an evaluation prompt
    # is calibrating on the test set even with other noise
    digests = label_digests((digest_text(normalize_prompt(p)), f"prompt {p!r}") for p in prompts)
    return pairs, batches, digests


def _items(batches: list[dict]) -> list[tuple[int, str, int]]:
    """(item index in the whole split, class id or prompt, seed) of every sample, in order: what each
    image or video was asked for. Batches from ``load_data`` carry their items' indices (so a shard
    names them as the whole split does); a batch without them counts on from the previous one."""
    out: list[tuple[int, str, int]] = []
    for b in batches:
        asked = b["prompts"] if "prompts" in b else b["class_labels"]
        indices = b.get("items") or range(len(out), len(out) + len(asked))
        out += [(int(i), p if isinstance(p, str) else str(int(p)), int(s)) for i, p, s in zip(indices, asked, b["seeds"])]
    return out


def _requested_classes(batches: list[dict]) -> torch.Tensor | None:
    """The digit each sample was asked for: its class id, or the digit its prompt names (None when
    a prompt names none, so that no accuracy is made up)."""
    if all("class_labels" in b for b in batches):
        return torch.cat([torch.as_tensor(b["class_labels"]) for b in batches])
    from ..models.digits import digit_in_prompt

    digits = [digit_in_prompt(p) for b in batches for p in b["prompts"]]
    return None if any(d is None for d in digits) else torch.tensor(digits)


def _load_classifier(classifier_dir: str | None):
    """The reference model's digit classifier, read once with the evaluation data (None: no class metric)."""
    if not classifier_dir:
        return None
    from ..models.digits import load_classifier

    return load_classifier(classifier_dir)


def _write_videos(ctx: EvalContext, videos: torch.Tensor, fp: torch.Tensor | None,
                  items: list[tuple[int, str, int]]) -> None:
    """For every (prompt, seed): the model's clip as MP4 + GIF, and beside a quantized model's clip a
    PNG strip of frames, FP above quantized; all linked from the report."""
    if ctx.output_dir is None:
        return
    from ..eval.media import write_strip, write_video

    name = "FP" if ctx.is_fp else ctx.label
    for i, (index, prompt, seed) in enumerate(items):
        stem = f"item{index:03d}_seed{seed}"
        row = f"{prompt!r}, seed {seed}"
        for path in write_video(ctx.artifact_path(stem), videos[i]):
            kind = path.suffix[1:].upper()
            ctx.add_artifact(path, f"{name} {kind}: {row}", row=row, column=kind)
        if fp is not None:
            strip = write_strip(ctx.artifact_path(f"{stem}_strip.png"), [("FP", fp[i]), (name, videos[i])],
                                f"FP (top) vs {name}: {prompt!r}, seed {seed}")
            ctx.add_artifact(strip, f"FP vs {name} frames: {row}", row=row, column="frames, FP above")


def _write_grid(ctx: EvalContext, images: torch.Tensor, fp: torch.Tensor | None, titles: list[str],
                part: int = 0) -> None:
    """A PNG of the samples (FP above the quantized model's when there is an FP row), method named on
    it, each column titled with the class or prompt asked for. A shard of a sharded run (its first
    item ``part`` > 0) writes its own ``samples_from<part>.png``."""
    path = ctx.artifact_path("samples.png" if part == 0 else f"samples_from{part:03d}.png")
    if path is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(images), 20)
    rows = [("FP", fp)] if fp is not None else []
    rows.append(("FP" if ctx.is_fp else ctx.label, images))
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 1.0 + 0.4), squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for i in range(n):
            ax = axes[r][i]
            img = imgs[i].permute(1, 2, 0).numpy()
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                title = titles[i] if len(titles[i]) <= 18 else titles[i][:17] + "…"
                ax.set_title(title, fontsize=5 if len(title) > 3 else 7)
            if i == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle(f"{'FP' if ctx.is_fp else 'FP (top) vs ' + ctx.label} samples, requested class or prompt on top",
                 fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    ctx.add_artifact(path, "FP samples" if ctx.is_fp else f"FP vs {ctx.label} samples (same class or prompt and seed)")
