"""Adapter for the toy residual-MLP family (``archquant.models.toy``).

It is the smallest family that has every fusion site the core knows about, and the one the
runner's tests and fallback demo use. Its structure table is the model's whole description.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.structure import LinearGroup, ModelStructure
from ..data import DataSplit, digest_tensor, label_digests
from ..models.toy import ToyConfig, ToyResMLP, toy_task, train_toy_model
from ..evaluation import EvalContext, Metric, snr_db
from .base import FamilyAdapter, register_adapter

# Seeds of the synthetic splits: different seeds are different (disjoint) samples.
SPLIT_SEEDS = {"train": 1_000_000, "calibration": 2_000_000, "evaluation": 3_000_000}


def save_toy_model(model: ToyResMLP, directory: str | Path) -> None:
    """Write a toy model as ``config.json`` + ``model.safetensors`` (its on-disk format)."""
    import json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"family": "toy", **model.config.to_dict()}, indent=2))


@register_adapter
class ToyAdapter(FamilyAdapter):
    name = "toy"
    model_options = {k: v for k, v in ToyConfig().to_dict().items()} | {"train_steps": 300}
    data_sources = ("synthetic",)
    metrics = (
        Metric("accuracy", lower_is_better=False, description="top-1 accuracy on the evaluation split"),
        Metric("cross_entropy", lower_is_better=True, unit="nats"),
        Metric("output_snr_vs_fp", lower_is_better=False, unit="dB", relative_to_fp=True,
               description="signal-to-noise ratio of the logits against the FP model's on the same inputs"),
        Metric("agreement_vs_fp", lower_is_better=False, relative_to_fp=True,
               description="fraction of samples whose predicted class is the FP model's"),
    )

    def load_model(self, path: str | None, options: dict[str, Any], dtype: str) -> tuple[nn.Module, dict]:
        options = dict(options)
        steps = int(options.pop("train_steps", 300))
        if path is None:
            cfg = ToyConfig.from_dict({**ToyConfig().to_dict(), **options})
            model = train_toy_model(cfg, steps=steps)
        else:
            import json

            directory = Path(path)
            cfg_file, weights = directory / "config.json", directory / "model.safetensors"
            for f in (cfg_file, weights):
                if not f.is_file():
                    raise FileNotFoundError(f"toy model file not found: {f}")
            raw = json.loads(cfg_file.read_text())
            raw.pop("family", None)
            cfg = ToyConfig.from_dict(raw)
            model = ToyResMLP(cfg)
            model.load_state_dict(load_file(str(weights)))
        model = model.to(getattr(torch, dtype)).eval()
        return model, cfg.to_dict()

    def build_model(self, model_config: dict) -> nn.Module:
        return ToyResMLP(ToyConfig.from_dict(model_config)).eval()

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, ToyResMLP)

    def structure(self, model: nn.Module) -> ModelStructure:
        n = len(model.layers)
        return ModelStructure(
            hidden_size=model.config.hidden_size,
            embeddings=["embed"],
            residual_readers=[LinearGroup(f"layers.{i}.norm", [f"layers.{i}.up_proj"]) for i in range(n)]
            + [LinearGroup("norm_f", ["head"])],
            residual_writers=[f"layers.{i}.down_proj" for i in range(n)],
            online_rotation_sites=[f"layers.{i}.down_proj" for i in range(n)],
            quantize=[f"layers.{i}.{p}" for i in range(n) for p in ("up_proj", "down_proj")],
            skip=["embed", "head"],
            blocks=[f"layers.{i}" for i in range(n)],
        )

    def load_data(self, data_cfg: dict, role: str, model_config: dict) -> DataSplit:
        source = data_cfg["source"]
        if source not in self.data_sources:
            raise ValueError(f"data source {source!r} not available for family toy: allowed {', '.join(self.data_sources)}")
        split = data_cfg.get("split") or role
        if split not in SPLIT_SEEDS:
            raise ValueError(f"toy data split {split!r} not allowed: allowed {', '.join(SPLIT_SEEDS)}")
        cfg = ToyConfig.from_dict(model_config)
        n, bs = int(data_cfg["num_samples"]), int(data_cfg["batch_size"])
        seed = SPLIT_SEEDS[split] + cfg.seed
        x, y = toy_task(cfg, n, split_seed=seed)
        batches = [x[i:i + bs] for i in range(0, n, bs)]
        labels = [y[i:i + bs] for i in range(0, n, bs)]
        # content identity: each input sample's tensor (a same-seed split repeats them all)
        digests = label_digests((digest_tensor(x[i]), f"synthetic/{split}[{i}]") for i in range(n))
        data = DataSplit(f"synthetic/{split}", batches if role == "calibration" else list(zip(batches, labels)),
                         frozenset((split, i) for i in range(n)), digests=digests)
        return data

    def validate_batch(self, model: nn.Module, batch: Any) -> None:
        """A batch is a float tensor of shape (..., in_features), or an (x, labels) tuple."""
        x = batch[0] if isinstance(batch, tuple) and batch else batch
        n = model.config.in_features
        if not torch.is_tensor(x):
            raise ValueError(f"expected a float tensor of shape (batch, {n}), got a {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"inputs must be a floating-point tensor, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != n or x.numel() == 0:
            raise ValueError(f"inputs must have shape (batch, {n}), got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("inputs hold NaN/Inf values")

    def forward(self, model: nn.Module, batch: Any) -> Any:
        x = batch[0] if isinstance(batch, tuple) else batch
        dtype = next(model.parameters()).dtype
        return model(x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x)

    def evaluate(self, model: nn.Module, data: DataSplit, ctx: EvalContext | None = None) -> dict[str, float]:
        dtype = next(model.parameters()).dtype
        with torch.no_grad():
            logits = torch.cat([model(x.to(dtype)).float() for x, _ in data.batches])
        labels = torch.cat([y for _, y in data.batches])
        metrics = {"accuracy": (logits.argmax(-1) == labels).float().mean().item(),
                   "cross_entropy": F.cross_entropy(logits, labels).item()}
        if ctx is None:
            return metrics
        if ctx.is_fp:
            ctx.keep(logits)  # a few KB: what every quantized row is compared with
        elif ctx.fp is not None:
            metrics["output_snr_vs_fp"] = snr_db(ctx.fp, logits)
            metrics["agreement_vs_fp"] = (logits.argmax(-1) == ctx.fp.argmax(-1)).float().mean().item()
            self._write_predictions(ctx, ctx.fp, logits, labels)
        return metrics

    @staticmethod
    def _write_predictions(ctx: EvalContext, fp: torch.Tensor, q: torch.Tensor, labels: torch.Tensor) -> None:
        """Per-sample FP vs quantized predictions, where they disagree first (a file to open, not to read)."""
        path = ctx.artifact_path("predictions.csv")
        if path is None:
            return
        fp_pred, q_pred = fp.argmax(-1), q.argmax(-1)
        order = sorted(range(len(labels)), key=lambda i: (bool(fp_pred[i] == q_pred[i]), i))
        rows = ["sample,label,fp_prediction,quantized_prediction,max_abs_logit_error"]
        rows += [f"{i},{int(labels[i])},{int(fp_pred[i])},{int(q_pred[i])},{float((q[i] - fp[i]).abs().max()):.6g}"
                 for i in order]
        path.write_text("\n".join(rows) + "\n")
        ctx.add_artifact(path, f"FP vs {ctx.label} predictions per sample (disagreements first)")
