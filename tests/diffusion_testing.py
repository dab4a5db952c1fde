"""Tiny DiT, PixArt, FLUX, Wan and CogVideoX pipelines with random weights, built offline (tokenizers
in memory, text encoders and VAEs from small configs), and the text-to-image / video job the CLI tests
run on them, for the DiT family's tests."""
import json

import torch

from archquant.models.dit_loading import DiffusionModel
from archquant.models.text_encoders import PromptEncoder

WORDS = ("a", "an", "the", "handwritten", "digit", "drawing", "of", "photo", "red", "blue", "cat", "dog", "small",
         "big", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _signal(module: torch.nn.Module, scale: float = 0.05) -> None:
    """diffusers zero-initialises adaLN gates and output layers: give every weight some signal."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def t5_tokenizer():
    """A real T5 (Unigram) tokenizer over a small word list, built in memory."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]  # anything else spells out
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def t5_encoder(d_model: int = 24, seed: int = 0, vocab_size: int = 64):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, dropout_rate=0.0)
    return T5EncoderModel(cfg).eval()


def clip_tokenizer():
    """A CLIP BPE tokenizer over whole words (no merges needed), built in memory."""
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(specials + [w + "</w>" for w in WORDS] + list("abcdefghijklmnopqrstuvwxyz"))}
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = 16
    return tok


def clip_encoder(hidden: int = 20, seed: int = 0, vocab_size: int = 64, eos_token_id: int = 1):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=eos_token_id,
                         bos_token_id=0, pad_token_id=1)
    return CLIPTextModel(cfg).eval()


def tiny_vae(latent_channels: int = 4, flux: bool = False):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    extra = {"shift_factor": 0.1, "scaling_factor": 0.5} if flux else {}
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         latent_channels=latent_channels, norm_num_groups=8, layers_per_block=1, **extra).eval()


def tiny_dit(seed: int = 0, num_classes: int = 4) -> DiffusionModel:
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=1,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes)
    _signal(transformer)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    return DiffusionModel(transformer.eval(), "DDIMScheduler", dict(scheduler.config)).eval()


def tiny_pixart(seed: int = 0, with_vae: bool = True, max_sequence_length: int = 8) -> DiffusionModel:
    """A PixArt-Sigma-like pipeline: T5 features through cross-attention, one global adaLN, a
    learned-sigma output, a 2-level VAE (latents 4 x 8 x 8 for 16 x 16 images) or pixel space."""
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    torch.manual_seed(seed)
    channels = 4 if with_vae else 1
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=channels,
                                           out_channels=2 * channels, num_layers=2, cross_attention_dim=32,
                                           caption_channels=24, sample_size=8, patch_size=2,
                                           norm_type="ada_norm_single", use_additional_conditions=False)
    _signal(transformer)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000)
    text = PromptEncoder("t5", [t5_tokenizer()], [t5_encoder()], max_sequence_length, {"path": "unsaved"})
    return DiffusionModel(transformer.eval(), "DPMSolverMultistepScheduler", dict(scheduler.config),
                          tiny_vae() if with_vae else None, text, "PixArtSigmaPipeline").eval()


def tiny_flux(seed: int = 0, guidance_embeds: bool = True, max_sequence_length: int = 8) -> DiffusionModel:
    """A FLUX-like pipeline: one joint (double) block and one single block, CLIP pooled + T5
    features, a 2-level VAE with latent channels 4 (packed 2x2 into 16 channels per token)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                         pooled_projection_dim=20, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6))
    _signal(transformer)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    text = PromptEncoder("clip_t5", [clip_tokenizer(), t5_tokenizer()], [clip_encoder(), t5_encoder()],
                         max_sequence_length, {"path": "unsaved"})
    return DiffusionModel(transformer.eval(), "FlowMatchEulerDiscreteScheduler", dict(scheduler.config),
                          tiny_vae(flux=True), text, "FluxPipeline").eval()


def umt5_encoder(d_model: int = 16, seed: int = 0, vocab_size: int = 64):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                     relative_attention_num_buckets=8, dropout_rate=0.0)
    return UMT5EncoderModel(cfg).eval()


def tiny_wan(seed: int = 0, with_vae: bool = True, max_sequence_length: int = 8) -> DiffusionModel:
    """A Wan 2.1 T2V-like pipeline: UMT5 features through cross-attention, a tiny causal 3D VAE
    (spatial 8, temporal 4: 16 x 16 x 5 frames -> 4 x 2 x 2 x 2 latents) or pixel space, UniPC
    flow-matching scheduler as Wan 2.1's."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    torch.manual_seed(seed)
    channels = 4 if with_vae else 1
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=channels, out_channels=channels, text_dim=16, freq_dim=16,
                                        ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    _signal(transformer)
    vae = None
    if with_vae:
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], latents_mean=[0.1, -0.1, 0.0, 0.2],
                               latents_std=[1.5, 0.8, 1.0, 1.2]).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    text = PromptEncoder("umt5", [t5_tokenizer()], [umt5_encoder()], max_sequence_length, {"path": "unsaved"})
    return DiffusionModel(transformer.eval(), "UniPCMultistepScheduler", dict(scheduler.config), vae, text,
                          "WanPipeline").eval()


def tiny_cogvideox(seed: int = 0, dpm: bool = False, max_sequence_length: int = 8) -> DiffusionModel:
    """A CogVideoX-like pipeline: T5 features joined with the video tokens, 3D rotary embeddings, a
    tiny CogVideoX VAE (spatial 2, temporal 4)."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler,
                           CogVideoXTransformer3DModel)

    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                              out_channels=4, time_embed_dim=4, text_embed_dim=24, num_layers=2,
                                              sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=max_sequence_length,
                                              use_rotary_positional_embeddings=True)
    _signal(transformer)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 2,
                                 up_block_types=("CogVideoXUpBlock3D",) * 2, block_out_channels=(8, 16),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=4,
                                 temporal_compression_ratio=4).eval()
    scheduler = (CogVideoXDPMScheduler if dpm else CogVideoXDDIMScheduler)()
    text = PromptEncoder("t5_unmasked", [t5_tokenizer()], [t5_encoder()], max_sequence_length, {"path": "unsaved"})
    return DiffusionModel(transformer.eval(), type(scheduler).__name__, dict(scheduler.config), vae, text,
                          "CogVideoXPipeline").eval()


def write_prompt_job(tmp_path, folder, prompts, calibration_prompts, options, *, evaluation_options=None,
                     evaluation_batch_size=2, compare=("rtn_dynamic",), **overrides):
    """``tmp_path/job.json``: LRQ-DiT W4A8 (block 16) on the pipeline ``folder`` with ``source: prompts``,
    calibrated on ``calibration_prompts`` (seed 0) and evaluated on ``prompts`` (seed 100), one sample
    each, sampler ``options`` for both (``evaluation_options`` added to the evaluation's), written to
    ``tmp_path/out``; ``overrides`` replace top-level sections."""
    cfg = {
        "family": "dit",
        "model": {"path": str(folder), "options": {"max_sequence_length": 8}},
        "recipe": {"name": "lrq_dit", "w_bits": 4, "a_bits": 8, "options": {"block_size": 16}},
        "calibration": {"source": "prompts", "num_samples": 1, "batch_size": 2, "seed": 0,
                        "options": {**options, "prompts": list(calibration_prompts)}},
        "evaluation": {"source": "prompts", "num_samples": 1, "batch_size": evaluation_batch_size, "seed": 100,
                       "options": {**options, "prompts": list(prompts), **(evaluation_options or {})}},
        "compare": list(compare),
        "progress": False,
        "output_dir": str(tmp_path / "out"),
        **overrides,
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(cfg))
    return path
