"""Mamba1 / Mamba2 family: structure table, Quamba / Quamba2 / MambaQuant recipes, LM data and metrics.

Where the quantization points are (Quamba, ``../shared/specs/mamba.md`` §2.1), Mamba1 mixer:

    norm ─▶ in_proj ─▶ x ─▶ conv1d ─▶ SiLU ─▶ u ─▶ x_proj ─▶ dt_low │ B │ C      dt_proj ─▶ dt
           (input)    (output: x and z share a scale)   (u_site)   (output: one scale)  (output)
    y = scan(u, dt, B, C) · SiLU(z) ─▶ [online Hadamard] ─▶ out_proj (input)

so every scan input (u, dt, B, C, z) is quantized exactly once, where it is produced.
Mamba2: in_proj (input, output) → conv+SiLU → xbc_site (x | B | C; Quamba2's grouped scales)
→ SSD scan → gated norm → [online Hadamard] → out_proj (input).
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.presets import RecipeOptions
from ..core.quantize_step import QuantizeWeights
from ..core.recipe import Recipe
from ..core.structure import LinearGroup, LinearPair, ModelStructure
from ..eval.corpus import document_digests, hf_documents, stdlib_documents, text_file_documents, token_window_digests
from ..data import DataSplit
from ..eval import lm
from ..models.mamba import MambaConfig, MambaLM
from ..models.mamba_loading import load_mamba
from ..evaluation import EvalContext, Metric
from ..options import Option, validate_options
from .base import FamilyAdapter, register_adapter
from .mamba_recipes import MAMBA_PRESET_DEFAULTS, MAMBA_PRESETS

REFERENCE_MODELS = ("mamba1-byte", "mamba2-byte")


def reference_model_dir(name: str) -> Path:
    """Directory of a committed reference model (``models/reference/<name>``)."""
    from ..models import reference_dir

    return reference_dir(name)


# ----------------------------------------------------------------------------------------
# Adapter
# ----------------------------------------------------------------------------------------


@register_adapter
class MambaAdapter(FamilyAdapter):
    name = "mamba"
    presets = MAMBA_PRESETS
    preset_defaults = MAMBA_PRESET_DEFAULTS
    model_options = {
        "reference": Option("mamba1-byte", allowed=REFERENCE_MODELS,
                            help="the committed reference model used when model.path is null"),
        "tokenizer": Option(None, type=str, help="'bytes', a tokenizer directory or hub id; default: the one "
                                                 "saved in the model directory, else the config's"),
    }
    data_options = {
        "seq_len": Option(256, minimum=1, help="tokens per window"),
        "shuffle": Option(True, roles=("calibration",),
                          help="shuffle the documents before cutting calibration windows"),
        "task_examples": Option(256, minimum=0, roles=("evaluation",),
                                help="examples of the last-token (LAMBADA-style) task, 0 to skip it"),
        "lm_eval_tasks": Option([], items=str, roles=("evaluation",),
                                help="lm-evaluation-harness tasks (optional extra, online)"),
        "lm_eval_limit": Option(0, minimum=0, roles=("evaluation",), help="examples per lm-eval task, 0: all"),
    }
    #: recipe options every Mamba preset takes, on top of the preset's own
    head_options = {
        "lm_head": Option("fp", allowed=("fp", "int8"),
                          help="int8: store the LM head's weight in int8 per output channel (weight-only: its input "
                               "stays FP; a quarter of the bytes each decode step reads; perplexity in the report)"),
    }
    data_sources = ("stdlib", "text_files", "wikitext2", "pile_val")
    metrics = (
        Metric("perplexity", lower_is_better=True, description="exp of the mean next-token NLL"),
        Metric("last_token_accuracy", lower_is_better=False, description="LAMBADA-style last-word accuracy"),
    )
    architecture_names = {"mamba1": "Mamba1", "mamba2": "Mamba2"}

    def load_model(self, path: str | None, options: dict[str, Any], dtype: str) -> tuple[nn.Module, dict]:
        options = validate_options(options, self.model_options, "model.options", family=self.name)
        if path is None:
            path = str(reference_model_dir(options["reference"]))
        model = load_mamba(path, dtype=getattr(torch, dtype))
        return model, self.model_config(model)

    def model_config(self, model: nn.Module) -> dict:
        cfg = model.config.to_dict()
        # a residual rotation unties embedding and head: the skeleton must not re-tie them
        cfg["tie_embeddings"] = getattr(model.lm_head, "weight", None) is model.backbone.embeddings.weight
        return cfg

    def build_model(self, model_config: dict) -> nn.Module:
        return MambaLM(MambaConfig.from_dict(model_config)).eval()

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, MambaLM)

    def architecture(self, model: nn.Module) -> str | None:
        return model.config.arch

    def validate_batch(self, model: nn.Module, batch: Any) -> None:
        """A batch is a (batch, seq_len) tensor of token ids (int64 or int32) in [0, vocab_size)."""
        if not torch.is_tensor(batch):
            raise ValueError(f"expected a tensor of token ids of shape (batch, seq_len), got a {type(batch).__name__}")
        if batch.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token ids must be torch.int64 or torch.int32, got {batch.dtype}")
        if batch.dim() != 2 or batch.numel() == 0:
            hint = " (add the batch dimension: x[None])" if batch.dim() == 1 else ""
            raise ValueError(f"token ids must have shape (batch, seq_len) with both > 0, got {tuple(batch.shape)}{hint}")
        vocab = model.config.vocab_size
        lo, hi = int(batch.min()), int(batch.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the model's vocabulary [0, {vocab})")

    def recipes(self):
        """The family's presets, each also taking ``recipe.options.lm_head`` (``head_options``)."""
        return {name: functools.partial(self._with_head, build) for name, build in super().recipes().items()}

    def _with_head(self, build, o: RecipeOptions) -> Recipe:
        head = {k: v for k, v in (o.options or {}).items() if k in self.head_options}
        head = validate_options(head, self.head_options, "recipe.options", owner="the mamba family")
        recipe = build(dataclasses.replace(o, options={k: v for k, v in (o.options or {}).items()
                                                       if k not in self.head_options}))
        if head["lm_head"] == "int8":
            recipe.steps.append(QuantizeWeights(targets=["lm_head"]))
        return recipe

    def structure(self, model: nn.Module) -> ModelStructure:
        cfg = model.config
        layers = [f"backbone.layers.{i}" for i in range(cfg.num_layers)]
        mixers = [f"{p}.mixer" for p in layers]
        common = dict(
            hidden_size=cfg.hidden_size,
            embeddings=["backbone.embeddings"],
            residual_readers=[LinearGroup(f"{p}.norm", [f"{p}.mixer.in_proj"]) for p in layers]
            + [LinearGroup("backbone.norm_f", ["lm_head"])],
            residual_writers=[f"{m}.out_proj" for m in mixers],
            online_rotation_sites=[f"{m}.out_proj" for m in mixers],
            skip=["lm_head"],
            # out of activation quantization, but its weight may be stored in int8 (recipe.options.lm_head)
            weight_only=["lm_head"],
            blocks=layers,
        )
        if cfg.arch == "mamba1":
            return ModelStructure(
                **common,
                quantize=[f"{m}.{p}" for m in mixers for p in ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj")],
                act_inputs=[f"{m}.{p}" for m in mixers for p in ("in_proj", "out_proj")],
                act_outputs=[f"{m}.{p}" for m in mixers for p in ("in_proj", "x_proj", "dt_proj")],
                act_sites=[f"{m}.u_site" for m in mixers],
                optional_act_sites=[f"{m}.state_site" for m in mixers],  # Quamba keeps the state in fp32
                linear_pairs=[LinearPair(f"{m}.x_proj", f"{m}.dt_proj", (0, cfg.dt_rank)) for m in mixers],
            )
        return ModelStructure(
            **common,
            quantize=[f"{m}.{p}" for m in mixers for p in ("in_proj", "conv1d", "out_proj")],
            act_inputs=[f"{m}.{p}" for m in mixers for p in ("in_proj", "out_proj")],
            act_outputs=[f"{m}.in_proj" for m in mixers],
            act_sites=[f"{m}.xbc_site" for m in mixers],
        )

    # ------------------------------------------------------------------ data
    def _documents(self, data_cfg: dict, role: str):
        source, split = data_cfg["source"], data_cfg.get("split")
        if source == "stdlib":
            return stdlib_documents(split or role), f"stdlib/{split or role}"
        if source == "text_files":
            if not data_cfg.get("path"):
                raise ValueError(f"data source 'text_files' needs '{role}.path'")
            return text_file_documents(data_cfg["path"]), f"text_files:{data_cfg['path']}"
        default = {"calibration": "train", "evaluation": "test"}[role]
        return hf_documents(source, split or default), f"{source}/{split or default}"

    def load_data(self, data_cfg: dict, role: str, model_config: dict) -> DataSplit:
        opts = self.data_options_of(data_cfg, role)
        docs, desc = self._documents(data_cfg, role)
        tok = lm.get_tokenizer(model_config.get("tokenizer", "bytes"))
        if role == "calibration":
            windows, used = lm.calibration_windows(docs, tok, opts["seq_len"], data_cfg["num_samples"],
                                                   seed=data_cfg.get("seed", 0), shuffle=opts["shuffle"])
            # content identity: the documents that reached the windows, and the windows themselves
            digests = {**document_digests([d for d in docs if d.id in used]), **token_window_digests(windows, desc)}
            return DataSplit(desc, list(windows.split(data_cfg["batch_size"])), frozenset(used), digests=digests)
        windows = lm.eval_windows(docs, tok, opts["seq_len"], data_cfg["num_samples"])
        examples = lm.build_last_token_task(docs, tok, opts["task_examples"]) if opts["task_examples"] > 0 else []
        # every document (the last-token task may draw on any), and the inputs w[:-1] the model is fed
        digests = {**document_digests(docs), **token_window_digests(windows[:, :-1], desc)}
        return DataSplit(desc, list(windows.split(data_cfg["batch_size"])), frozenset(d.id for d in docs),
                         digests=digests,
                         extra={"examples": examples, "tokenizer": tok,
                                "lm_eval_tasks": opts["lm_eval_tasks"], "lm_eval_limit": opts["lm_eval_limit"] or None})

    def evaluate(self, model: nn.Module, data: DataSplit, ctx: EvalContext | None = None) -> dict[str, float]:
        windows = torch.cat(data.batches)
        bs = data.batches[0].shape[0]
        metrics = {"perplexity": lm.perplexity(model, windows, batch_size=bs)}
        examples = data.extra.get("examples") or []
        metrics["last_token_accuracy"] = lm.last_token_accuracy(model, examples) if examples else None
        if data.extra.get("lm_eval_tasks"):
            from ..eval.lm_eval_harness import run_lm_eval

            metrics.update(run_lm_eval(model, data.extra["tokenizer"], data.extra["lm_eval_tasks"],
                                       limit=data.extra.get("lm_eval_limit")))
        return metrics
