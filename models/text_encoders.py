"""The text side of text-to-image DiTs: tokenizers and frozen text encoders, outside the quantized model.

PixArt reads T5 features per token (with their attention mask); FLUX reads T5 features per token
and one pooled CLIP vector. The encoders are never quantized, and in a real pipeline they are the
largest part (PixArt's and FLUX's T5-XXL encoder has 4.7 B parameters), so a quantized checkpoint
does not carry them: ``PromptEncoder`` is not an ``nn.Module`` (it is not in the model's
``state_dict`` or ``named_modules``), and it records where it was read from (``source``) so that
a reloaded checkpoint reads the same files again.

Each prompt is encoded alone and its features are cached: a prompt gets the same features whatever
batch it is in, and FP and quantized models (which share one ``PromptEncoder``: a deep copy of
the model keeps it) encode each prompt once.

Tokenizers are read with ``AutoTokenizer`` (``tokenizer.json`` / SentencePiece files: no pickle);
encoders with ``from_pretrained(use_safetensors=True)``.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .pipeline_files import read_json, require_safetensors

#: text kind -> its (tokenizer folder, encoder folder) pairs in the pipeline folder, in pipeline order
TEXT_COMPONENTS = {
    "t5": (("tokenizer", "text_encoder"),),  # PixArt: masked T5 features and the mask
    "clip_t5": (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),  # FLUX
    "umt5": (("tokenizer", "text_encoder"),),  # Wan: masked UMT5, trimmed to the prompt and zero-padded
    "t5_unmasked": (("tokenizer", "text_encoder"),),  # CogVideoX: T5 over the padded ids, no mask
}
#: encoder classes we load (transformers), by the ``architectures`` entry of their config
ENCODER_CLASSES = ("T5EncoderModel", "UMT5EncoderModel", "CLIPTextModel", "CLIPTextModelWithProjection")
#: the CLIP tokenizer length diffusers' FluxPipeline falls back to
CLIP_MAX_LENGTH = 77


def word_tokenizer(words, max_length: int):
    """A T5 (Unigram) tokenizer built in memory whose pieces are ``words`` (the reference models'
    caption words); other text is spelled out in letters and digits, so any prompt tokenizes.
    ``max_length`` is saved with it: the loader's default prompt length."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in sorted(words)]
    vocab += [("▁", -3.0)] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.model_max_length = max_length
    return tokenizer


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def _encoder_class(folder: Path) -> type:
    import transformers

    config_path = folder / "config.json"
    config = read_json(config_path, "text encoder config")
    names = [n for n in (config.get("architectures") or []) if n in ENCODER_CLASSES]
    if not names:
        raise ValueError(f"{config_path}: text encoder {config.get('architectures')} is not supported: supported "
                         f"{', '.join(ENCODER_CLASSES)}")
    return getattr(transformers, names[0])


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"cannot read the tokenizer in {folder}: {_one_line(e)}") from None


def _load_encoder(folder: Path, dtype: torch.dtype):
    if not folder.is_dir():
        raise FileNotFoundError(f"text encoder folder not found: {folder}")
    require_safetensors(folder, "text encoder")
    cls = _encoder_class(folder)
    try:
        with _quiet_loading():
            return cls.from_pretrained(str(folder), use_safetensors=True, dtype=dtype).eval().requires_grad_(False)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot load the text encoder in {folder}: {_one_line(e)}") from None


@contextmanager
def _quiet_loading():
    """No per-tensor "Loading weights" bar from transformers (the runner names the stage; a bar on
    stderr would also precede a one-line input error found later)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class PromptEncoder:
    """Frozen tokenizers + text encoders of one pipeline; ``encode(prompts)`` gives what the
    transformer reads.

    ``kind`` "t5" (PixArt): ``{"embeds": (B, L, D), "mask": (B, L)}``; "clip_t5" (FLUX):
    ``{"embeds": (B, L, D), "pooled": (B, P)}``; "umt5" (Wan) and "t5_unmasked" (CogVideoX):
    ``{"embeds": (B, L, D)}``. ``L`` is ``max_sequence_length`` (padded, as the pipelines pad). ``source`` is how to find the files again (``{"path": folder}``,
    ``{"reference": name}`` or ``{"hub": repo id}``); it goes into the model's build config.
    """

    def __init__(self, kind: str, tokenizers: list, encoders: list, max_sequence_length: int, source: dict):
        if kind not in TEXT_COMPONENTS:
            raise ValueError(f"text kind {kind!r} not supported: {', '.join(TEXT_COMPONENTS)}")
        self.kind, self.tokenizers, self.encoders = kind, list(tokenizers), list(encoders)
        self.max_sequence_length, self.source = int(max_sequence_length), dict(source)
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    @classmethod
    def from_folder(cls, folder: Path, kind: str, max_sequence_length: int, source: dict,
                    dtype: torch.dtype = torch.float32, *, cap_to_tokenizer: bool = False) -> "PromptEncoder":
        """Read the tokenizers and encoders of ``kind`` from a pipeline folder. ``cap_to_tokenizer``:
        ``max_sequence_length`` is a default, lowered to the T5 tokenizer's ``model_max_length``
        (a small model's folder says how long its prompts are)."""
        tokenizers, encoders = [], []
        for tok_dir, enc_dir in TEXT_COMPONENTS[kind]:
            tokenizers.append(_load_tokenizer(folder / tok_dir))
            encoders.append(_load_encoder(folder / enc_dir, dtype))
        if cap_to_tokenizer:
            max_sequence_length = min(max_sequence_length, int(getattr(tokenizers[-1], "model_max_length",
                                                                       max_sequence_length)))
        return cls(kind, tokenizers, encoders, max_sequence_length, source)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoders[-1].parameters()).dtype

    def describe(self) -> dict[str, Any]:
        """JSON: enough to read the same encoders again (``source``, in the same ``dtype``) and
        encode the same way."""
        return {"kind": self.kind, "source": self.source, "max_sequence_length": self.max_sequence_length,
                "dtype": str(self.dtype).removeprefix("torch.")}

    def __deepcopy__(self, memo) -> "PromptEncoder":
        return self  # frozen and never quantized: copies of a model share it (and its cache)

    def _tokens(self, tokenizer, prompt: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                      return_tensors="pt")
        return t.input_ids, t.attention_mask

    @torch.no_grad()
    def _encode_one(self, prompt: str) -> dict[str, torch.Tensor]:
        if self.kind == "t5":  # PixArt: T5 features with their mask
            ids, mask = self._tokens(self.tokenizers[0], prompt, self.max_sequence_length)
            embeds = self.encoders[0](ids, attention_mask=mask)[0]
            return {"embeds": embeds[0].float(), "mask": mask[0]}
        if self.kind == "umt5":  # Wan: cleaned text, masked UMT5, the prompt's rows then zeros (WanPipeline)
            from diffusers.pipelines.wan.pipeline_wan import prompt_clean

            ids, mask = self._tokens(self.tokenizers[0], prompt_clean(prompt), self.max_sequence_length)
            embeds = self.encoders[0](ids, mask).last_hidden_state[0].float()
            embeds[int(mask[0].gt(0).sum()):] = 0.0
            return {"embeds": embeds}
        if self.kind == "t5_unmasked":  # CogVideoX: T5 over the padded ids without a mask
            ids, _ = self._tokens(self.tokenizers[0], prompt, self.max_sequence_length)
            return {"embeds": self.encoders[0](ids)[0][0].float()}
        # FLUX: pooled CLIP (no mask) + T5 features (no mask), as FluxPipeline.encode_prompt
        clip_tok = self.tokenizers[0]
        clip_len = min(int(getattr(clip_tok, "model_max_length", CLIP_MAX_LENGTH)), CLIP_MAX_LENGTH)
        ids, _ = self._tokens(clip_tok, prompt, clip_len)
        pooled = self.encoders[0](ids, output_hidden_states=False).pooler_output
        ids2, _ = self._tokens(self.tokenizers[1], prompt, self.max_sequence_length)
        embeds = self.encoders[1](ids2, output_hidden_states=False)[0]
        return {"embeds": embeds[0].float(), "pooled": pooled[0].float()}

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The features of ``prompts``, stacked (each computed alone once, then cached)."""
        rows = []
        for prompt in prompts:
            if prompt not in self._cache:
                self._cache[prompt] = self._encode_one(prompt)
            rows.append(self._cache[prompt])
        return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}
