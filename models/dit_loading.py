"""Diffusion transformers from diffusers pipeline folders, as one module the core can quantize.

A pipeline folder is what ``DiffusionPipeline.save_pretrained`` writes: ``model_index.json`` and one
subfolder per component. We load the transformer, the scheduler and (if there is one) the VAE with
their own classes, safetensors only: a folder holding only ``*.bin`` weights is refused rather than
unpickled. The reference models are pixel-space (``"vae": [null, null]`` in ``model_index.json``).

``DiffusionModel`` holds the transformer (what gets quantized) and the VAE as submodules and the
scheduler as a config (schedulers are stateful, so each generation builds a fresh one). Its
``build_config()`` is JSON and rebuilds the same skeleton without the folder, so a saved quantized
checkpoint reloads on its own.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: transformer classes this family understands, with the pipeline kind they are sampled as
SUPPORTED_TRANSFORMERS = {"DiTTransformer2DModel": "class_conditional"}
#: what later versions add (named in the refusal, so users know it is planned, not broken)
PLANNED_TRANSFORMERS = ("PixArtTransformer2DModel", "FluxTransformer2DModel")


def _diffusers():
    import diffusers

    return diffusers


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _component_class(folder: Path, config_name: str, what: str) -> str:
    cfg = _read_json(folder / config_name, f"{what} config")
    name = cfg.get("_class_name")
    if not isinstance(name, str):
        raise ValueError(f"{folder / config_name} has no '_class_name'")
    return name


def _require_safetensors(folder: Path, what: str) -> None:
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.glob("*.bin"))
    if pickled:
        raise ValueError(f"{what} in {folder} has only pickled weights ({pickled[0]}); archquant loads "
                         "safetensors only: re-save it with save_pretrained(..., safe_serialization=True)")
    raise FileNotFoundError(f"no weights (*.safetensors) for the {what} in {folder}")


class DiffusionModel(nn.Module):
    """A diffusion transformer with what sampling it needs: ``transformer``, optional ``vae``,
    and the scheduler's class and config."""

    def __init__(self, transformer: nn.Module, scheduler_class: str, scheduler_config: dict,
                 vae: nn.Module | None = None) -> None:
        super().__init__()
        self.transformer = transformer
        self.vae = vae
        self.scheduler_class = scheduler_class
        self.scheduler_config = dict(scheduler_config)
        name = type(transformer).__name__
        if name not in SUPPORTED_TRANSFORMERS:
            raise ValueError(unsupported_message(name))
        self.kind = SUPPORTED_TRANSFORMERS[name]
        #: the digit classifier folder of a reference model (evaluation only; not a submodule)
        self.classifier_path: str | None = None

    def new_scheduler(self):
        cls = getattr(_diffusers(), self.scheduler_class)
        return cls.from_config(self.scheduler_config)

    @property
    def num_classes(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    @property
    def null_class(self) -> int:
        """The class id classifier-free guidance uses as "no class" (DiTPipeline's 1000)."""
        return self.num_classes

    def build_config(self) -> dict:
        return {
            "transformer_class": type(self.transformer).__name__,
            "transformer_config": json.loads(self.transformer.to_json_string()),
            "scheduler_class": self.scheduler_class,
            "scheduler_config": self.scheduler_config,
            "vae_class": None if self.vae is None else type(self.vae).__name__,
            "vae_config": None if self.vae is None else json.loads(self.vae.to_json_string()),
        }


def unsupported_message(name: str) -> str:
    later = " (planned)" if name in PLANNED_TRANSFORMERS else ""
    return (f"transformer class {name!r}{later} is not supported: supported "
            f"{', '.join(repr(n) for n in SUPPORTED_TRANSFORMERS)}")


def _from_config(class_name: str, config: dict) -> nn.Module:
    cls = getattr(_diffusers(), class_name, None)
    if cls is None:
        raise ValueError(f"diffusers has no class {class_name!r}")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return cls.from_config(config)


def build_diffusion_model(config: dict) -> DiffusionModel:
    """The skeleton ``DiffusionModel.build_config()`` describes (random weights; a checkpoint fills them)."""
    if config.get("transformer_class") not in SUPPORTED_TRANSFORMERS:
        raise ValueError(unsupported_message(str(config.get("transformer_class"))))
    transformer = _from_config(config["transformer_class"], config["transformer_config"])
    vae = None if not config.get("vae_class") else _from_config(config["vae_class"], config["vae_config"])
    return DiffusionModel(transformer, config["scheduler_class"], config["scheduler_config"], vae).eval()


def load_pipeline_folder(path: str | Path, dtype: torch.dtype = torch.float32) -> DiffusionModel:
    """Load a pipeline folder (``save_pretrained`` layout); every problem is a one-line error naming
    the file or the class."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model.path {str(path)!r}: no such directory (a diffusers pipeline folder "
                                "with model_index.json and transformer/)")
    index = _read_json(folder / "model_index.json", "pipeline index (model_index.json)")
    tdir = folder / "transformer"
    if not tdir.is_dir():
        raise FileNotFoundError(f"{folder} has no transformer/ folder: not a diffusion transformer pipeline")
    name = _component_class(tdir, "config.json", "transformer")
    if name not in SUPPORTED_TRANSFORMERS:
        raise ValueError(unsupported_message(name))
    _require_safetensors(tdir, "transformer")
    diffusers = _diffusers()
    transformer = getattr(diffusers, name).from_pretrained(str(tdir), use_safetensors=True, torch_dtype=dtype,
                                                          low_cpu_mem_usage=False)
    sdir = folder / "scheduler"
    scheduler_class = _component_class(sdir, "scheduler_config.json", "scheduler")
    if getattr(diffusers, scheduler_class, None) is None:
        raise ValueError(f"{sdir / 'scheduler_config.json'}: diffusers has no scheduler class {scheduler_class!r}")
    scheduler_config = getattr(diffusers, scheduler_class).load_config(str(sdir))
    vae = None
    vae_entry = index.get("vae")
    if isinstance(vae_entry, list) and vae_entry and vae_entry[-1]:
        vdir = folder / "vae"
        vae_class = _component_class(vdir, "config.json", "vae")
        _require_safetensors(vdir, "vae")
        vae = getattr(diffusers, vae_class).from_pretrained(str(vdir), use_safetensors=True, torch_dtype=dtype,
                                                          low_cpu_mem_usage=False)
    return DiffusionModel(transformer.eval(), scheduler_class, dict(scheduler_config), vae).eval()


def save_pipeline_folder(model: DiffusionModel, path: str | Path) -> None:
    """Write ``model`` as a pipeline folder (what tests and the training script use)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    model.transformer.save_pretrained(str(folder / "transformer"), safe_serialization=True)
    model.new_scheduler().save_pretrained(str(folder / "scheduler"))
    index: dict[str, Any] = {"_class_name": "DiTPipeline", "_diffusers_version": _diffusers().__version__,
                             "transformer": ["diffusers", type(model.transformer).__name__],
                             "scheduler": ["diffusers", model.scheduler_class], "vae": [None, None]}
    if model.vae is not None:
        model.vae.save_pretrained(str(folder / "vae"), safe_serialization=True)
        index["vae"] = ["diffusers", type(model.vae).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
