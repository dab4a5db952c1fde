"""The diffusion-transformer family: class-conditional DiTs from diffusers pipeline folders.

What it declares:
* model: a pipeline folder (``model.path``) or the committed reference model
  (``model.options.reference``), loaded as ``models.dit_loading.DiffusionModel``;
* data: ``source: classes``: every (class id, seed) pair of ``options.class_ids`` x ``num_samples``
  seeds from ``seed``, generated with ``options.num_steps`` sampler steps at
  ``options.guidance_scale``. A calibration pass samples the whole trajectory, so activations are
  collected at every timestep of the sampler (timestep-aware calibration). Calibration and
  evaluation pairs must differ: a shared (class, seed) is the same noise and label, and the
  disjointness check refuses it;
* structure: attention projections and feed-forward Linears of every block are quantized; the
  timestep / class embedders, the adaLN modulation Linears, the patch embedding and the output
  projections stay in floating point (LRQ-DiT's and ViDiT-Q's skip list);
* metrics: PSNR and SSIM of every image against the FP model's image from the same class and seed,
  and, on the reference model, the share of samples its digit classifier assigns to the asked class.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.structure import ModelStructure
from ..data import DataSplit, digest_record, label_digests
from ..evaluation import EvalContext, Metric
from ..models import reference_dir
from ..models.dit_loading import DiffusionModel, build_diffusion_model, load_pipeline_folder
from ..options import Option
from . import dit_recipes
from .base import FamilyAdapter, register_adapter

#: Linears quantized in every block (diffusers' names; attn2 is cross-attention where a model has it)
QUANTIZED_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                     "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
#: kept in floating point by default (patterns over the model's module names)
FP_BY_DEFAULT = ["re:.*\\.norm1\\.emb\\..*", "re:.*\\.norm1\\.linear", "re:.*proj_out.*", "re:.*pos_embed.*",
                 "re:vae\\..*"]


@register_adapter
class DiTAdapter(FamilyAdapter):
    name = "dit"
    model_options = {
        "reference": Option("dit-digits", help="committed reference model under models/reference/ (model.path=null)"),
        "classifier": Option(None, type=str, help="digit classifier folder for class accuracy (default: the model folder)"),
    }
    data_sources = ("classes",)
    data_options = {
        "class_ids": Option([], type=list, items=int, help="class ids to generate (empty: every class)"),
        "num_steps": Option(25, minimum=1, help="sampler steps"),
        "guidance_scale": Option(3.0, minimum=0.0, help="classifier-free guidance scale (<= 1: none)"),
    }
    metrics = (
        Metric("psnr_vs_fp", lower_is_better=False, unit="dB", relative_to_fp=True,
               description="PSNR of each image against the FP model's from the same class and seed (mean)"),
        Metric("ssim_vs_fp", lower_is_better=False, relative_to_fp=True,
               description="SSIM against the FP model's image from the same class and seed (mean)"),
        Metric("class_accuracy", lower_is_better=False,
               description="share of samples the reference classifier assigns to the requested class"),
    )
    presets = dit_recipes.DIT_PRESETS

    # ------------------------------------------------------------------ model

    def load_model(self, path: str | None, options: dict[str, Any], dtype: str) -> tuple[nn.Module, dict]:
        folder = Path(path).expanduser() if path is not None else reference_dir(options["reference"])
        if path is None and not folder.is_dir():
            raise FileNotFoundError(f"model.options.reference={options['reference']!r}: no reference model at "
                                    f"{folder}")
        model = load_pipeline_folder(folder, dtype=getattr(torch, dtype))
        default = str(folder) if (folder / "classifier.safetensors").is_file() else None
        model.classifier_path = options.get("classifier") or default
        return model, self.model_config(model)

    def model_config(self, model: nn.Module) -> dict:
        return {**model.build_config(), "classifier": getattr(model, "classifier_path", None)}

    def build_model(self, model_config: dict) -> nn.Module:
        model = build_diffusion_model(model_config)
        model.classifier_path = model_config.get("classifier")
        return model

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, DiffusionModel)

    def structure(self, model: nn.Module) -> ModelStructure:
        blocks = [f"transformer.transformer_blocks.{i}" for i in range(len(model.transformer.transformer_blocks))]
        names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        quantize = [f"{b}.{lin}" for b in blocks for lin in QUANTIZED_LINEARS if f"{b}.{lin}" in names]
        cfg = model.transformer.config
        return ModelStructure(hidden_size=int(cfg.num_attention_heads * cfg.attention_head_dim),
                              quantize=quantize, skip=list(FP_BY_DEFAULT), blocks=blocks)

    # ------------------------------------------------------------------ data

    def load_data(self, data_cfg: dict, role: str, model_config: dict) -> DataSplit:
        source = data_cfg["source"]
        if source not in self.data_sources:
            raise ValueError(f"{role}.source={source!r} not available for family dit: allowed "
                             f"{', '.join(map(repr, self.data_sources))}")
        opts = self.data_options_of(data_cfg, role)
        num_classes = int(model_config["transformer_config"]["num_embeds_ada_norm"])
        class_ids = list(opts["class_ids"]) or list(range(num_classes))
        bad = [c for c in class_ids if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"{role}.options.class_ids: class id {bad[0]} is outside the model's classes "
                             f"0..{num_classes - 1}")
        n, first, bs = int(data_cfg["num_samples"]), int(data_cfg.get("seed") or 0), int(data_cfg["batch_size"])
        pairs = [(c, first + k) for k in range(n) for c in class_ids]
        batches = [{"class_labels": torch.tensor([c for c, _ in pairs[i:i + bs]]),
                    "seeds": [s for _, s in pairs[i:i + bs]],
                    "num_steps": opts["num_steps"], "guidance_scale": opts["guidance_scale"]}
                   for i in range(0, len(pairs), bs)]
        # content identity: the same (class, seed) is the same label and the same initial noise
        digests = label_digests((digest_record({"class": c, "seed": s}), f"class {c} seed {s}") for c, s in pairs)
        extra = {"classifier": _load_classifier(model_config.get("classifier")) if role == "evaluation" else None}
        return DataSplit(f"classes/{role}", batches, frozenset(pairs), extra=extra, digests=digests)

    def validate_batch(self, model: nn.Module, batch: Any) -> None:
        if not isinstance(batch, dict) or "class_labels" not in batch or "seeds" not in batch:
            raise ValueError("a DiT batch is a dict with 'class_labels' and 'seeds'")
        labels = torch.as_tensor(batch["class_labels"])
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < model.num_classes):
            raise ValueError(f"class ids must be in 0..{model.num_classes - 1}, got {labels.tolist()}")
        if len(batch["seeds"]) != labels.numel():
            raise ValueError(f"{len(batch['seeds'])} seeds for {labels.numel()} class labels")

    def forward(self, model: nn.Module, batch: Any) -> Any:
        from ..models.diffusion import sample_class_conditional

        return sample_class_conditional(model.transformer, model.new_scheduler(), batch["class_labels"],
                                        batch["seeds"], num_steps=batch["num_steps"],
                                        guidance_scale=batch["guidance_scale"], null_class=model.null_class,
                                        vae=model.vae)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, model: nn.Module, data: DataSplit, ctx: EvalContext | None = None) -> dict[str, float]:
        from tqdm import tqdm

        images = torch.cat([self.forward(model, b) for b in tqdm(data.batches, desc="generating", leave=False,
                                                                 disable=None)])
        labels = torch.cat([b["class_labels"] for b in data.batches])
        metrics: dict[str, float] = {}
        classifier = data.extra.get("classifier")
        if classifier is not None:
            from ..models.digits import class_accuracy

            metrics["class_accuracy"] = float(class_accuracy(classifier, images, labels))
        if ctx is None:
            return metrics
        if ctx.is_fp:
            ctx.keep(images)
            _write_grid(ctx, images, None, labels)
        elif ctx.fp is not None:
            metrics["psnr_vs_fp"] = psnr_db(images, ctx.fp)
            metrics["ssim_vs_fp"] = ssim(images, ctx.fp)
            _write_grid(ctx, images, ctx.fp, labels)
        return metrics


def psnr_db(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of the PSNR (data range 1) against ``reference`` (torchmetrics); identical
    images count as 100 dB so that one exact sample does not make the mean infinite."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    values = [float(peak_signal_noise_ratio(a[None], b[None], data_range=1.0)) for a, b in zip(images, reference)]
    return float(sum(min(v, 100.0) if math.isfinite(v) else 100.0 for v in values) / len(values))


def ssim(images: torch.Tensor, reference: torch.Tensor) -> float:
    from torchmetrics.functional.image import structural_similarity_index_measure

    kernel = min(11, images.shape[-1] - (1 - images.shape[-1] % 2))  # odd, no larger than the image
    return float(structural_similarity_index_measure(images, reference, data_range=1.0, kernel_size=kernel))


def _load_classifier(classifier_dir: str | None):
    """The reference model's digit classifier, read once with the evaluation data (None: no class metric)."""
    if not classifier_dir:
        return None
    from ..models.digits import load_classifier

    return load_classifier(classifier_dir)


def _write_grid(ctx: EvalContext, images: torch.Tensor, fp: torch.Tensor | None, labels: torch.Tensor) -> None:
    """A PNG of the samples (FP above the quantized model's when there is an FP row), method named on it."""
    path = ctx.artifact_path("samples.png")
    if path is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(images), 20)
    rows = [("FP", fp)] if fp is not None else []
    rows.append(("FP" if ctx.is_fp else ctx.label, images))
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.8, len(rows) * 0.95 + 0.3), squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for i in range(n):
            ax = axes[r][i]
            ax.imshow(imgs[i].permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(str(int(labels[i])), fontsize=7)
            if i == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle(f"{'FP' if ctx.is_fp else 'FP (top) vs ' + ctx.label} samples, requested class on top", fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    ctx.add_artifact(path, "FP samples" if ctx.is_fp else f"FP vs {ctx.label} samples (same class and seed)")
