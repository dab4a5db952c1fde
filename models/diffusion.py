"""Sampling a class-conditional diffusion transformer, the way DiTPipeline does, on our own loop.

Why our own loop: the reference models are pixel-space (no VAE), calibration needs a hook per
denoising step (the timestep is the calibration context key), and every sample must come from its
own seed so that FP and quantized models see the same noise. The arithmetic is DiTPipeline's:
classifier-free guidance on a doubled batch (the null class is the model's last class id, as
DiTPipeline's 1000), the guided noise on the first ``in_channels`` output channels (a learned
sigma, if any, is dropped), and the scheduler's ``step``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

StepHook = Callable[[int, int], None]


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """One (C, H, W) Gaussian per seed, each from its own generator (a sample's noise does not
    depend on the batch it is in)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=dtype)
                        for s in seeds])


@torch.no_grad()
def sample_class_conditional(transformer: nn.Module, scheduler, class_labels: torch.Tensor, seeds: Sequence[int], *,
                             num_steps: int, guidance_scale: float, null_class: int, vae: nn.Module | None = None,
                             on_step: StepHook | None = None, progress: Callable | None = None) -> torch.Tensor:
    """Images in [0, 1], (B, C, H, W), for ``class_labels`` (B,) with one seed each.

    ``transformer`` is a ``DiTTransformer2DModel`` (or anything with its forward and config).
    ``on_step(i, t)`` is called before each denoising step (calibration sets its context key there);
    ``progress`` wraps the step iterator (e.g. tqdm)."""
    if len(seeds) != len(class_labels):
        raise ValueError(f"{len(seeds)} seeds for {len(class_labels)} class labels: give one seed per sample")
    cfg = transformer.config
    size = cfg.sample_size
    channels = cfg.in_channels
    latents = initial_noise(seeds, (channels, size, size))
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    labels = torch.as_tensor(class_labels, dtype=torch.long)
    guided = guidance_scale > 1.0
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, null_class)])
    scheduler.set_timesteps(num_steps)
    steps = scheduler.timesteps
    for i, t in enumerate(progress(steps) if progress is not None else steps):
        if on_step is not None:
            on_step(i, int(t))
        model_in = torch.cat([latents, latents]) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        timestep = torch.full((model_in.shape[0],), int(t), dtype=torch.long)
        out = transformer(model_in, timestep=timestep, class_labels=labels).sample
        eps = out[:, :channels]
        if guided:
            cond, uncond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    if vae is not None:
        latents = vae.decode(latents / vae.config.scaling_factor).sample
    return ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0)
