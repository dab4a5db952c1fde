"""Sampling loops of the diffusion transformers we quantize, the way their diffusers pipelines do it.

Why our own loops: the reference models are pixel-space (no VAE), calibration must see every
denoising step, and every sample must come from its own seed so that FP and quantized models see
the same noise whatever the batch. The arithmetic is the pipelines':

* ``sample_class_conditional``: ``DiTPipeline``. Classifier-free guidance on a doubled batch (the
  null class is the model's last class id, DiTPipeline's 1000), guidance on the first
  ``in_channels`` output channels (a learned sigma is dropped), the scheduler's ``step``.
* ``sample_pixart``: ``PixArtSigmaPipeline`` / ``PixArtAlphaPipeline``. The negative prompt's T5
  features first, then the prompt's, in one doubled batch; ``added_cond_kwargs`` with the
  resolution and aspect ratio for transformers that use them (PixArt-alpha 1024), else None.
* ``sample_flux``: ``FluxPipeline``. Latents packed into 2x2 patches, flow-matching sigmas
  ``linspace(1, 1/steps)`` shifted by ``mu`` (from the image sequence length), the timestep given
  as t / 1000, distilled guidance as an embedding (FLUX.1-dev) or none (schnell); no true CFG.

Images come back in [0, 1], (B, C, H, W).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

StepHook = Callable[[int, int], None]


class SampleNoise:
    """Each sample's own random stream (a CPU generator per seed): its initial noise, then whatever
    noise a stochastic scheduler draws at each step (SDE samplers such as CogVideoX's DPM), as the
    pipelines do when given a list of generators. A sample's noise does not depend on its batch."""

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def initial(self, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
        """One Gaussian of ``shape`` per sample (diffusers' ``randn_tensor`` with the list of
        generators gives the same values)."""
        return torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in self.generators])

    def step_kwargs(self, scheduler) -> dict:
        """``generator=`` for a scheduler whose ``step`` draws noise, else nothing."""
        import inspect

        return {"generator": self.generators} if "generator" in inspect.signature(scheduler.step).parameters else {}


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """One Gaussian of ``shape`` per seed, each from its own generator."""
    return SampleNoise(seeds).initial(shape, dtype)


def decode_images(latents: torch.Tensor, vae: nn.Module | None) -> torch.Tensor:
    """Latents → images in [0, 1]: through the VAE (its scaling and, as FLUX's has, shift factor)
    or, pixel-space, directly from [-1, 1]."""
    if vae is not None:
        z = latents / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift:
            z = z + shift
        latents = vae.decode(z.to(_dtype(vae))).sample
    return ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu()  # metrics and grids work on the CPU


def _device(module: nn.Module) -> torch.device:
    """Where the transformer runs: noise is drawn on the CPU (the same per seed on every device)
    and moved there, with the text features and timesteps."""
    return next(module.parameters()).device


def _dtype(module: nn.Module) -> torch.dtype:
    """The dtype inputs are cast to: a diffusers model's own ``dtype`` (the bulk of its weights, not a
    module it keeps in fp32, such as Wan's norms), else its first parameter's."""
    dtype = getattr(module, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(module.parameters()).dtype


def _one_seed_each(seeds: Sequence[int], count: int, what: str = "prompts") -> None:
    """Every sample is drawn from its own seed, so that it is the same alone or in any batch."""
    if len(seeds) != count:
        raise ValueError(f"{len(seeds)} seeds for {count} {what}: give one seed per sample")


def _required_negative(negative: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The negative prompt's features, which classifier-free guidance cannot do without."""
    if negative is None:
        raise ValueError("guidance_scale > 1 needs the negative prompt's features")
    return negative


def _steps(scheduler, progress: Callable | None):
    steps = scheduler.timesteps
    return progress(steps) if progress is not None else steps


def _guide(out: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on a batch whose first half is unconditional."""
    uncond, cond = out.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def sample_class_conditional(transformer: nn.Module, scheduler, class_labels: torch.Tensor, seeds: Sequence[int], *,
                             num_steps: int, guidance_scale: float, null_class: int, vae: nn.Module | None = None,
                             latent_size: int | None = None, on_step: StepHook | None = None,
                             progress: Callable | None = None) -> torch.Tensor:
    """Images for ``class_labels`` (B,) with one seed each; ``transformer`` is a
    ``DiTTransformer2DModel``. ``latent_size`` defaults to the model's ``sample_size``.
    ``on_step(i, t)`` is called before each denoising step; ``progress`` wraps the step iterator."""
    _one_seed_each(seeds, len(class_labels), "class labels")
    cfg = transformer.config
    device = _device(transformer)
    size = latent_size or cfg.sample_size
    channels = cfg.in_channels
    noise = SampleNoise(seeds)
    latents = noise.initial((channels, size, size)).to(device) * getattr(scheduler, "init_noise_sigma", 1.0)
    labels = torch.as_tensor(class_labels, dtype=torch.long).to(device)
    guided = guidance_scale > 1.0
    if guided:  # DiTPipeline's order: conditional half first, null class second
        labels = torch.cat([labels, torch.full_like(labels, null_class)])
    scheduler.set_timesteps(num_steps)
    for i, t in enumerate(_steps(scheduler, progress)):
        if on_step is not None:
            on_step(i, int(t))
        model_in = torch.cat([latents, latents]) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        timestep = torch.full((model_in.shape[0],), int(t), dtype=torch.long, device=device)
        eps = transformer(model_in, timestep=timestep, class_labels=labels).sample[:, :channels]
        if guided:
            cond, uncond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(eps, t, latents, **noise.step_kwargs(scheduler)).prev_sample
    return decode_images(latents, vae)


@torch.no_grad()
def sample_pixart(transformer: nn.Module, scheduler, text: dict[str, torch.Tensor], seeds: Sequence[int], *,
                  num_steps: int, guidance_scale: float, negative: dict[str, torch.Tensor] | None = None,
                  latent_size: int | None = None, vae: nn.Module | None = None, on_step: StepHook | None = None,
                  progress: Callable | None = None) -> torch.Tensor:
    """Images for T5 features ``text`` (``embeds`` (B, L, D), ``mask`` (B, L)) with one seed each;
    ``negative``: the negative prompt's features (B rows), needed when ``guidance_scale > 1``."""
    batch = text["embeds"].shape[0]
    _one_seed_each(seeds, batch)
    cfg = transformer.config
    size = latent_size or cfg.sample_size
    channels = cfg.in_channels
    dtype, device = _dtype(transformer), _device(transformer)
    noise = SampleNoise(seeds)
    latents = noise.initial((channels, size, size)).to(device) * getattr(scheduler, "init_noise_sigma", 1.0)
    guided = guidance_scale > 1.0
    embeds, mask = text["embeds"].to(device), text["mask"].to(device)
    if guided:
        negative = _required_negative(negative)
        embeds = torch.cat([negative["embeds"].to(device), embeds])
        mask = torch.cat([negative["mask"].to(device), mask])
    rows = embeds.shape[0]
    added = {"resolution": None, "aspect_ratio": None}
    if getattr(transformer, "use_additional_conditions", False):  # PixArt-alpha 1024: size conditioning
        pixels = size * (1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1))
        added = {"resolution": torch.tensor([[pixels, pixels]], dtype=dtype, device=device).repeat(rows, 1),
                 "aspect_ratio": torch.ones(rows, 1, dtype=dtype, device=device)}
    scheduler.set_timesteps(num_steps)
    for i, t in enumerate(_steps(scheduler, progress)):
        if on_step is not None:
            on_step(i, int(t))
        model_in = torch.cat([latents, latents]) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        timestep = torch.as_tensor(t, device=device).reshape(1).expand(rows)
        out = transformer(model_in.to(dtype), encoder_hidden_states=embeds.to(dtype), encoder_attention_mask=mask,
                          timestep=timestep, added_cond_kwargs=added).sample.float()
        if guided:
            out = _guide(out, guidance_scale)
        if cfg.out_channels // 2 == channels:  # learned sigma: keep the noise prediction
            out = out.chunk(2, dim=1)[0]
        latents = scheduler.step(out, t, latents, **noise.step_kwargs(scheduler)).prev_sample
    return decode_images(latents, vae)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2 * W/2, 4C): FLUX's 2x2 patches as tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a (h, w) latent."""
    b, _, channels = tokens.shape
    x = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, h, w)


def flux_image_ids(h: int, w: int) -> torch.Tensor:
    """(h/2 * w/2, 3) positions (0, row, column) of the packed tokens, for FLUX's RoPE."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def flux_mu(image_seq_len: int, config) -> float:
    """The timestep shift FluxPipeline derives from the image sequence length (``calculate_shift``)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + base_shift - m * base_len


@torch.no_grad()
def sample_flux(transformer: nn.Module, scheduler, text: dict[str, torch.Tensor], seeds: Sequence[int], *,
                num_steps: int, guidance_scale: float, latent_size: int, vae: nn.Module | None = None,
                on_step: StepHook | None = None, progress: Callable | None = None) -> torch.Tensor:
    """Images for FLUX text features ``text`` (``embeds`` (B, L, D), ``pooled`` (B, P)) with one
    seed each; ``latent_size`` (even) is the VAE latent's side."""
    batch = text["embeds"].shape[0]
    _one_seed_each(seeds, batch)
    import numpy as np

    cfg = transformer.config
    dtype, device = _dtype(transformer), _device(transformer)
    channels, size = cfg.in_channels // 4, latent_size
    noise = SampleNoise(seeds)
    latents = pack_latents(noise.initial((channels, size, size))).to(device, dtype)
    img_ids = flux_image_ids(size, size).to(device, dtype)
    txt_ids = torch.zeros(text["embeds"].shape[1], 3, dtype=dtype, device=device)
    embeds, pooled = text["embeds"].to(device, dtype), text["pooled"].to(device, dtype)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    if getattr(scheduler.config, "use_flow_sigmas", False):
        sigmas = None
    mu = flux_mu(latents.shape[1], scheduler.config)
    scheduler.set_timesteps(num_steps, device=device, sigmas=sigmas, mu=mu)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    guidance = (torch.full((batch,), float(guidance_scale), dtype=torch.float32, device=device)
                if cfg.guidance_embeds else None)
    for i, t in enumerate(_steps(scheduler, progress)):
        if on_step is not None:
            on_step(i, int(t))
        timestep = t.expand(batch).to(dtype)
        out = transformer(hidden_states=latents, timestep=timestep / 1000, guidance=guidance,
                          pooled_projections=pooled, encoder_hidden_states=embeds,
                          txt_ids=txt_ids, img_ids=img_ids).sample
        latents = scheduler.step(out, t, latents, **noise.step_kwargs(scheduler)).prev_sample
    return decode_images(unpack_latents(latents.float(), size, size), vae)
