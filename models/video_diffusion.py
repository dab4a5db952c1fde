"""Sampling loops of the video diffusion transformers, the way their diffusers pipelines do it.

As for images (``diffusion``): our own loops so that every sample comes from its own seed, pixel-space
reference models need no VAE, and calibration sees every step; the arithmetic is the pipelines'
(tests compare with them):

* ``sample_wan``: ``WanPipeline`` (Wan 2.1 T2V). Latents (B, C, F', H', W') with F' = (F - 1) / 4 + 1
  through the VAE; the conditional and unconditional passes are two calls (not a doubled batch), the
  VAE's per-channel latent mean and std undone before decoding.
* ``sample_cogvideox``: ``CogVideoXPipeline``. Latents frames-first (B, F', C, H', W'), the negative
  prompt's features first in a doubled batch, 3D rotary embeddings computed per resolution, the
  CogVideoX DPM scheduler's two-step update, CogVideoX 1.5's temporal patch padding.

Videos come back as (B, F, C, H, W) in [0, 1] on the CPU (diffusers' ``postprocess_video(...,
output_type="pt")`` layout).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .diffusion import SampleNoise, _device, _dtype, _one_seed_each, _required_negative, _steps


def temporal_factor(vae: nn.Module | None) -> int:
    """Frames per latent frame (1 in pixel space): Wan's ``scale_factor_temporal``, CogVideoX's
    ``temporal_compression_ratio``."""
    if vae is None:
        return 1
    cfg = vae.config
    return int(getattr(cfg, "scale_factor_temporal", None) or getattr(cfg, "temporal_compression_ratio", 4))


def latent_frames(num_frames: int, vae: nn.Module | None) -> int:
    return (num_frames - 1) // temporal_factor(vae) + 1


def _to_unit(video: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) in [-1, 1] → (B, F, C, H, W) in [0, 1] on the CPU (diffusers' denormalize)."""
    return (video.float().permute(0, 2, 1, 3, 4) * 0.5 + 0.5).clamp(0.0, 1.0).cpu()


def decode_wan(latents: torch.Tensor, vae: nn.Module | None) -> torch.Tensor:
    """Wan latents (B, C, F', H', W') → video; the VAE's latents_mean / latents_std undone first."""
    if vae is None:
        return _to_unit(latents)
    cfg = vae.config
    shape = (1, cfg.z_dim, 1, 1, 1)
    dtype = _dtype(vae)
    latents = latents.to(dtype)
    mean = torch.tensor(cfg.latents_mean).view(shape).to(latents.device, dtype)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(shape).to(latents.device, dtype)
    return _to_unit(vae.decode(latents / inv_std + mean).sample)


@torch.no_grad()
def sample_wan(transformer: nn.Module, scheduler, text: dict[str, torch.Tensor], seeds: Sequence[int], *,
               num_steps: int, guidance_scale: float, num_frames: int, latent_size: int,
               negative: dict[str, torch.Tensor] | None = None, vae: nn.Module | None = None,
               on_step: Callable | None = None, progress: Callable | None = None) -> torch.Tensor:
    """Videos for Wan text features ``text["embeds"]`` (B, L, D), one seed each."""
    batch = text["embeds"].shape[0]
    _one_seed_each(seeds, batch)
    dtype, device = _dtype(transformer), _device(transformer)
    shape = (transformer.config.in_channels, latent_frames(num_frames, vae), latent_size, latent_size)
    noise = SampleNoise(seeds)
    latents = noise.initial(shape).to(device)
    embeds = text["embeds"].to(device, dtype)
    guided = guidance_scale > 1.0
    if guided:
        negative_embeds = _required_negative(negative)["embeds"].to(device, dtype)
    scheduler.set_timesteps(num_steps, device=device)
    for i, t in enumerate(_steps(scheduler, progress)):
        if on_step is not None:
            on_step(i, int(t))
        model_in = latents.to(dtype)
        timestep = t.expand(batch)
        out = transformer(hidden_states=model_in, timestep=timestep, encoder_hidden_states=embeds).sample
        if guided:
            uncond = transformer(hidden_states=model_in, timestep=timestep,
                                 encoder_hidden_states=negative_embeds).sample
            out = uncond + guidance_scale * (out - uncond)
        latents = scheduler.step(out, t, latents, **noise.step_kwargs(scheduler)).prev_sample
    return decode_wan(latents, vae)


def _cogvideox_rotary(transformer: nn.Module, latent_size: int, num_latent_frames: int, device):
    """CogVideoXPipeline._prepare_rotary_positional_embeddings for a square latent of ``latent_size``."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    cfg = transformer.config
    p, p_t = cfg.patch_size, cfg.patch_size_t
    grid = latent_size // p
    base_w, base_h = cfg.sample_width // p, cfg.sample_height // p
    if p_t is None:  # CogVideoX 1.0
        crops = get_resize_crop_region_for_grid((grid, grid), base_w, base_h)
        return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=crops, grid_size=(grid, grid),
                                       temporal_size=num_latent_frames, device=device)
    return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=(grid, grid),
                                   temporal_size=(num_latent_frames + p_t - 1) // p_t, grid_type="slice",
                                   max_size=(base_h, base_w), device=device)


@torch.no_grad()
def sample_cogvideox(transformer: nn.Module, scheduler, text: dict[str, torch.Tensor], seeds: Sequence[int], *,
                     num_steps: int, guidance_scale: float, num_frames: int, latent_size: int,
                     negative: dict[str, torch.Tensor] | None = None, vae: nn.Module | None = None,
                     on_step: Callable | None = None, progress: Callable | None = None) -> torch.Tensor:
    """Videos for CogVideoX text features ``text["embeds"]`` (B, L, D), one seed each."""
    from diffusers import CogVideoXDPMScheduler

    batch = text["embeds"].shape[0]
    _one_seed_each(seeds, batch)
    cfg = transformer.config
    dtype, device = _dtype(transformer), _device(transformer)
    frames = latent_frames(num_frames, vae)
    extra = 0  # CogVideoX 1.5: the latent frames are padded to a multiple of the temporal patch
    if cfg.patch_size_t is not None and frames % cfg.patch_size_t:
        extra = cfg.patch_size_t - frames % cfg.patch_size_t
        frames = latent_frames(num_frames + extra * temporal_factor(vae), vae)
    noise = SampleNoise(seeds)
    latents = noise.initial((frames, cfg.in_channels, latent_size, latent_size)).to(device, dtype)
    latents = latents * scheduler.init_noise_sigma
    embeds = text["embeds"].to(device, dtype)
    guided = guidance_scale > 1.0
    if guided:
        embeds = torch.cat([_required_negative(negative)["embeds"].to(device, dtype), embeds])
    rotary = _cogvideox_rotary(transformer, latent_size, frames, device) if cfg.use_rotary_positional_embeddings \
        else None
    scheduler.set_timesteps(num_steps, device=device)
    timesteps = scheduler.timesteps
    dpm = isinstance(scheduler, CogVideoXDPMScheduler)
    old_x0 = None
    for i, t in enumerate(_steps(scheduler, progress)):
        if on_step is not None:
            on_step(i, int(t))
        model_in = torch.cat([latents, latents]) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        out = transformer(hidden_states=model_in, encoder_hidden_states=embeds, timestep=t.expand(model_in.shape[0]),
                          image_rotary_emb=rotary).sample.float()
        if guided:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        if dpm:  # an SDE sampler: two-step update, noise from each sample's generator
            latents, old_x0 = scheduler.step(out, old_x0, t, timesteps[i - 1] if i > 0 else None, latents,
                                             return_dict=False, **noise.step_kwargs(scheduler))
        else:
            latents = scheduler.step(out, t, latents, **noise.step_kwargs(scheduler)).prev_sample
        latents = latents.to(dtype)
    latents = latents[:, extra:].permute(0, 2, 1, 3, 4)  # (B, C, F', H', W')
    if vae is None:
        return _to_unit(latents)
    latents = 1 / vae.config.scaling_factor * latents.to(_dtype(vae))  # the pipeline's order
    return _to_unit(vae.decode(latents).sample)

