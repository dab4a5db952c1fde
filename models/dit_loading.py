"""Diffusion transformers from diffusers pipeline folders, as one module the core can quantize.

A pipeline folder is what ``DiffusionPipeline.save_pretrained`` writes: ``model_index.json`` and one
subfolder per component. We load the transformer, the scheduler, the VAE (if there is one) and,
for text-to-image models, the tokenizers and text encoders, each with its own class and
safetensors only: a folder holding only ``*.bin`` weights is refused rather than unpickled. A hub
id (``org/name``) is downloaded first when online. The reference models are pixel-space
(``"vae": [null, null]`` in ``model_index.json``).

``DiffusionModel`` holds the transformer (what gets quantized) and the VAE as submodules, the
scheduler as a config (schedulers are stateful, so each generation builds a fresh one) and the
text side as a ``PromptEncoder`` outside the module tree (never quantized, not saved in quantized
checkpoints; see ``text_encoders``). Its ``build_config()`` is JSON and rebuilds the same model: the
transformer and VAE skeletons from their configs (a checkpoint fills the weights), the text
encoders from the files they were read from.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .pipeline_files import read_json, require_safetensors
from .text_encoders import PromptEncoder

#: transformer classes this family understands, with the pipeline kind they are sampled as
SUPPORTED_TRANSFORMERS = {"DiTTransformer2DModel": "class_conditional", "PixArtTransformer2DModel": "pixart",
                          "FluxTransformer2DModel": "flux", "WanTransformer3DModel": "wan",
                          "CogVideoXTransformer3DModel": "cogvideox"}
#: what later versions add (named in the refusal, so users know it is planned, not broken)
PLANNED_TRANSFORMERS = ("LatteTransformer3DModel", "HunyuanVideoTransformer3DModel")
#: the kinds that generate videos (B, F, C, H, W) rather than images (B, C, H, W)
VIDEO_KINDS = ("wan", "cogvideox")
#: the text encoders each kind reads (``text_encoders.TEXT_COMPONENTS``)
TEXT_KINDS = {"pixart": "t5", "flux": "clip_t5", "wan": "umt5", "cogvideox": "t5_unmasked"}
#: the pipelines' default T5 length, by pipeline class (``model_index.json``'s _class_name), then by kind
DEFAULT_MAX_SEQUENCE_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300, "FluxPipeline": 512,
                               "WanPipeline": 512, "CogVideoXPipeline": 226,
                               "pixart": 300, "flux": 512, "wan": 512, "cogvideox": 226}
#: the pipeline class written for each kind by ``save_pipeline_folder``
PIPELINE_CLASSES = {"class_conditional": "DiTPipeline", "pixart": "PixArtSigmaPipeline", "flux": "FluxPipeline",
                    "wan": "WanPipeline", "cogvideox": "CogVideoXPipeline"}


def _diffusers():
    import diffusers

    return diffusers


def _component_class(folder: Path, config_name: str, what: str) -> str:
    cfg = read_json(folder / config_name, f"{what} config")
    name = cfg.get("_class_name")
    if not isinstance(name, str):
        raise ValueError(f"{folder / config_name} has no '_class_name'")
    return name


class DiffusionModel(nn.Module):
    """A diffusion transformer with what sampling it needs: ``transformer``, optional ``vae``,
    the scheduler's class and config, and for text-to-image kinds a ``prompt_encoder``."""

    def __init__(self, transformer: nn.Module, scheduler_class: str, scheduler_config: dict,
                 vae: nn.Module | None = None, prompt_encoder: PromptEncoder | None = None,
                 pipeline_class: str | None = None) -> None:
        super().__init__()
        self.transformer = transformer
        self.vae = vae
        self.scheduler_class = scheduler_class
        self.scheduler_config = dict(scheduler_config)
        name = type(transformer).__name__
        if name not in SUPPORTED_TRANSFORMERS:
            raise ValueError(unsupported_message(name))
        self.kind = SUPPORTED_TRANSFORMERS[name]
        if self.kind not in TEXT_KINDS and prompt_encoder is not None:
            raise ValueError(f"a {name} is class-conditional: it takes no text encoder")
        #: not a submodule: frozen, shared by copies of the model, kept out of quantized checkpoints
        self.prompt_encoder = prompt_encoder
        self.pipeline_class = pipeline_class or PIPELINE_CLASSES[self.kind]
        #: the digit classifier folder of a reference model (evaluation only; not a submodule)
        self.classifier_path: str | None = None

    def new_scheduler(self):
        cls = getattr(_diffusers(), self.scheduler_class)
        return cls.from_config(self.scheduler_config)

    @property
    def is_text_conditional(self) -> bool:
        return self.prompt_encoder is not None

    @property
    def num_classes(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm) if self.kind == "class_conditional" else 0

    @property
    def null_class(self) -> int:
        """The class id classifier-free guidance uses as "no class" (DiTPipeline's 1000)."""
        return self.num_classes

    @property
    def vae_factor(self) -> int:
        """Pixels per latent pixel (1 in pixel space)."""
        return vae_factor(None if self.vae is None else dict(self.vae.config))

    @property
    def is_video(self) -> bool:
        return self.kind in VIDEO_KINDS

    @property
    def native_resolution(self) -> int:
        """The (square) resolution the transformer was configured for: DiT / PixArt ``sample_size``
        latents, CogVideoX ``sample_height``; FLUX (1024) and Wan (480) have no fixed size and take
        their pipeline's default."""
        cfg = self.transformer.config
        if self.kind == "flux":
            return 128 * self.vae_factor
        if self.kind == "wan":
            return 480
        if self.kind == "cogvideox":
            return int(cfg.sample_height) * self.vae_factor
        return int(cfg.sample_size) * self.vae_factor

    @property
    def native_frames(self) -> int | None:
        """Frames a video model generates by default (Wan 81, CogVideoX ``sample_frames``)."""
        if self.kind == "wan":
            return 81
        if self.kind == "cogvideox":
            return int(self.transformer.config.sample_frames)
        return None

    def generate(self, seeds: list[int], *, num_steps: int, guidance_scale: float, class_labels=None,
                 prompts: list[str] | None = None, negative_prompt: str = "", resolution: int | None = None,
                 num_frames: int | None = None, progress=None) -> torch.Tensor:
        """Images in [0, 1], (B, C, H, W), or videos (B, F, C, H, W), one per seed, for class ids or prompts."""
        from . import diffusion, video_diffusion

        latent = (resolution or self.native_resolution) // self.vae_factor
        common = dict(num_steps=num_steps, guidance_scale=guidance_scale, vae=self.vae, progress=progress)
        if self.kind == "class_conditional":
            return diffusion.sample_class_conditional(self.transformer, self.new_scheduler(), class_labels, seeds,
                                                      null_class=self.null_class, latent_size=latent, **common)
        if self.prompt_encoder is None:  # e.g. a benchmark's bare transformer: it is called directly
            raise ValueError(f"this {type(self.transformer).__name__} was built without its text encoders: it "
                             "cannot generate from prompts")
        text = self.prompt_encoder.encode(list(prompts))
        if self.kind == "flux":
            return diffusion.sample_flux(self.transformer, self.new_scheduler(), text, seeds, latent_size=latent,
                                         **common)
        negative = self.prompt_encoder.encode([negative_prompt] * len(prompts)) if guidance_scale > 1 else None
        if self.kind == "pixart":
            return diffusion.sample_pixart(self.transformer, self.new_scheduler(), text, seeds, negative=negative,
                                           latent_size=latent, **common)
        sample = video_diffusion.sample_wan if self.kind == "wan" else video_diffusion.sample_cogvideox
        return sample(self.transformer, self.new_scheduler(), text, seeds, negative=negative, latent_size=latent,
                      num_frames=num_frames or self.native_frames, **common)

    def build_config(self) -> dict:
        return {
            "transformer_class": type(self.transformer).__name__,
            "transformer_config": json.loads(self.transformer.to_json_string()),
            "scheduler_class": self.scheduler_class,
            "scheduler_config": self.scheduler_config,
            "vae_class": None if self.vae is None else type(self.vae).__name__,
            "vae_config": None if self.vae is None else json.loads(self.vae.to_json_string()),
            "pipeline_class": self.pipeline_class,
            "text": None if self.prompt_encoder is None else self.prompt_encoder.describe(),
        }


def vae_factor(vae_config: dict | None) -> int:
    """Pixels per latent pixel of a VAE config (1 without a VAE: pixel space; Wan's VAE says it)."""
    if not vae_config:
        return 1
    if vae_config.get("scale_factor_spatial"):
        return int(vae_config["scale_factor_spatial"])
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def vae_temporal_factor(vae_config: dict | None) -> int:
    """Frames per latent frame of a video VAE config (1 without a VAE)."""
    if not vae_config:
        return 1
    return int(vae_config.get("scale_factor_temporal") or vae_config.get("temporal_compression_ratio") or 1)


def check_frames(num_frames: int, config: dict, where: str) -> None:
    """Refuse a frame count the VAE's temporal compression does not allow (Wan, CogVideoX: 4k + 1),
    or whose latent frames Wan's temporal patch does not divide."""
    factor = vae_temporal_factor(config.get("vae_config"))
    if factor > 1 and (num_frames - 1) % factor:
        raise ValueError(f"{where}={num_frames} is not {factor}k+1 frames (the VAE's temporal factor is {factor}) "
                         f"for this {config['transformer_class']}")
    patch = config["transformer_config"].get("patch_size")
    if isinstance(patch, (list, tuple)) and int(patch[0]) > 1:  # Wan's (t, h, w) patch
        latent = (num_frames - 1) // factor + 1
        if latent % int(patch[0]):
            raise ValueError(f"{where}={num_frames} gives {latent} latent frames, which the temporal patch "
                             f"{int(patch[0])} does not divide, for this {config['transformer_class']}")


def spatial_patch(transformer_config: dict) -> int:
    """The transformer's spatial patch (Wan gives (t, h, w))."""
    patch = transformer_config.get("patch_size") or 1
    return int(patch[1] if isinstance(patch, (list, tuple)) else patch)


def check_resolution(resolution: int, config: dict, where: str) -> None:
    """Refuse a resolution that the VAE factor times the patch size (times 2 for FLUX's 2x2 packing
    of latents; its transformer's own patch is 1) does not divide; ``config`` is a
    ``DiffusionModel.build_config()``."""
    factor = vae_factor(config.get("vae_config"))
    patch = spatial_patch(config["transformer_config"])
    flux = SUPPORTED_TRANSFORMERS.get(config["transformer_class"]) == "flux"
    multiple = factor * patch * (2 if flux else 1)
    if resolution % multiple:
        why = f"VAE factor {factor} x patch size {patch}" + (" x FLUX's 2x2 latent packing" if flux else "")
        raise ValueError(f"{where}={resolution} is not a multiple of {multiple} ({why}) for this "
                         f"{config['transformer_class']}")


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


def resolve_source(source: dict) -> Path:
    """The folder a text source names: ``{"path": ...}``, ``{"reference": name}`` (a committed
    reference model) or ``{"hub": repo id}`` (downloaded or taken from the hub cache)."""
    if "reference" in source:
        from . import reference_dir

        return reference_dir(source["reference"])
    if "hub" in source:
        return download_pipeline(source["hub"])
    return Path(source["path"])


def build_diffusion_model(config: dict) -> DiffusionModel:
    """The model ``DiffusionModel.build_config()`` describes: transformer and VAE skeletons (random
    weights; a checkpoint fills them), text encoders read again from their source."""
    if config.get("transformer_class") not in SUPPORTED_TRANSFORMERS:
        raise ValueError(unsupported_message(str(config.get("transformer_class"))))
    transformer = _from_config(config["transformer_class"], config["transformer_config"])
    vae = None if not config.get("vae_class") else _from_config(config["vae_class"], config["vae_config"])
    text, encoder = config.get("text"), None
    if text:
        folder = resolve_source(text["source"])
        if not folder.is_dir():
            raise ValueError(f"the text encoders of this model were read from {folder}, which is gone: the "
                             "checkpoint does not carry them (restore that folder)")
        text_dtype = getattr(torch, text.get("dtype", "float32"))
        encoder = PromptEncoder.from_folder(folder, text["kind"], text["max_sequence_length"], text["source"],
                                            text_dtype)
    return DiffusionModel(transformer, config["scheduler_class"], config["scheduler_config"], vae, encoder,
                          config.get("pipeline_class")).eval()


def looks_like_hub_id(path: str) -> bool:
    parts = str(path).split("/")
    return len(parts) == 2 and all(parts) and not str(path).startswith((".", "~")) and not Path(path).exists()


#: what a hub download fetches: configs, safetensors weights, tokenizer files (no pickles)
HUB_PATTERNS = ["model_index.json", "*/config.json", "*/*.json", "*/*.safetensors", "*/*.safetensors.index.json",
                "*/spiece.model", "*/*.txt", "scheduler/*"]


def download_pipeline(repo_id: str) -> Path:
    """A hub pipeline's folder (from the cache when present); a one-line error offline."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, gated, unknown repo: all are "cannot get it", said in one line
        first = " ".join(str(e).split())[:200]
        raise FileNotFoundError(f"model.path {repo_id!r}: not a local folder, and the hub download failed "
                                f"({type(e).__name__}: {first})") from None


def load_pipeline_folder(path: str | Path, dtype: torch.dtype = torch.float32, *, text_source: dict | None = None,
                         max_sequence_length: int | None = None) -> DiffusionModel:
    """Load a pipeline folder (``save_pretrained`` layout) or hub id; every problem is a one-line
    error naming the file or the class. ``text_source`` is how a reloaded checkpoint finds the
    text encoders again (default: this folder's absolute path, or the hub id)."""
    if looks_like_hub_id(str(path)):
        text_source = text_source or {"hub": str(path)}
        path = download_pipeline(str(path))
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model.path {str(path)!r}: no such directory (a diffusers pipeline folder "
                                "with model_index.json and transformer/)")
    index = read_json(folder / "model_index.json", "pipeline index (model_index.json)")
    tdir = folder / "transformer"
    if not tdir.is_dir():
        raise FileNotFoundError(f"{folder} has no transformer/ folder: not a diffusion transformer pipeline")
    name = _component_class(tdir, "config.json", "transformer")
    if name not in SUPPORTED_TRANSFORMERS:
        raise ValueError(unsupported_message(name))
    require_safetensors(tdir, "transformer")
    diffusers = _diffusers()
    # low_cpu_mem_usage (through accelerate, a dependency): diffusers needs it to keep Wan's norms and
    # time embedder in fp32 when the rest is loaded in 16 bits (``_keep_in_fp32_modules``)
    transformer = getattr(diffusers, name).from_pretrained(str(tdir), use_safetensors=True, torch_dtype=dtype,
                                                          low_cpu_mem_usage=True)
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
        require_safetensors(vdir, "vae")
        vae = getattr(diffusers, vae_class).from_pretrained(str(vdir), use_safetensors=True, torch_dtype=dtype,
                                                          low_cpu_mem_usage=True).eval()
    kind = SUPPORTED_TRANSFORMERS[name]
    pipeline_class = index.get("_class_name") if isinstance(index.get("_class_name"), str) else None
    encoder = None
    if kind in TEXT_KINDS:
        default = DEFAULT_MAX_SEQUENCE_LENGTH.get(pipeline_class or "", DEFAULT_MAX_SEQUENCE_LENGTH[kind])
        source = text_source or {"path": str(folder.resolve())}
        encoder = PromptEncoder.from_folder(folder, TEXT_KINDS[kind], max_sequence_length or default, source, dtype,
                                            cap_to_tokenizer=max_sequence_length is None)
    return DiffusionModel(transformer.eval(), scheduler_class, dict(scheduler_config), vae, encoder,
                          pipeline_class).eval()


def save_pipeline_folder(model: DiffusionModel, path: str | Path) -> None:
    """Write ``model`` as a pipeline folder (what tests and the training scripts use)."""
    from .text_encoders import TEXT_COMPONENTS

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    model.transformer.save_pretrained(str(folder / "transformer"), safe_serialization=True)
    model.new_scheduler().save_pretrained(str(folder / "scheduler"))
    index: dict[str, Any] = {"_class_name": model.pipeline_class, "_diffusers_version": _diffusers().__version__,
                             "transformer": ["diffusers", type(model.transformer).__name__],
                             "scheduler": ["diffusers", model.scheduler_class], "vae": [None, None]}
    if model.vae is not None:
        model.vae.save_pretrained(str(folder / "vae"), safe_serialization=True)
        index["vae"] = ["diffusers", type(model.vae).__name__]
    if model.prompt_encoder is not None:
        pe = model.prompt_encoder
        for (tok_dir, enc_dir), tokenizer, encoder in zip(TEXT_COMPONENTS[pe.kind], pe.tokenizers, pe.encoders):
            tokenizer.save_pretrained(str(folder / tok_dir))
            encoder.save_pretrained(str(folder / enc_dir), safe_serialization=True)
            index[tok_dir] = ["transformers", type(tokenizer).__name__]
            index[enc_dir] = ["transformers", type(encoder).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
