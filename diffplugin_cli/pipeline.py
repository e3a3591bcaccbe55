"""The Diff-Plugin inference procedure (REFERENCE.md), batched.

Per image: F^p = TPB(CLIP-vision features of the original image); z_c = VAE mean latent of the
resized image; UniPC denoising where each step adds the SCB residuals to the UNet's first skip
connections; VAE decode. Several plugins run one after another, each on the previous output.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from diffusers import UniPCMultistepScheduler
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from .models import predict_noise
from .loading import BaseModels, load_base_models, resolve_device, resolve_dtype, speed_up
from .memory import release_mapped_weights
from .plugins import TaskPlugin
from .sizing import resize_for_rule
from .tiling import LatentTiling, choose_tile, vae_tiling

# The authors reset the latent to the noised input for every timestep at or above this.
TIME_THRESHOLD = 960

StepCallback = Callable[..., None]


class DiffPluginPipeline:
    """Restore images with one or more Task-Plugins on a frozen Stable Diffusion."""

    def __init__(self, base: BaseModels):
        self.base = base
        self.device, self.dtype = base.device, base.dtype
        self.image_processor = VaeImageProcessor(vae_scale_factor=base.vae_scale_factor, do_convert_rgb=True, do_normalize=True)
        self._placed: set[int] = set()
        self.decode_retried = False  # whether the last call had to redo a half-precision decode in fp32
        self.last_tiling: dict | None = None  # how the last call tiled a native-size batch, if it did
        # On CPU, the weights of a model that the next stages do not use leave RSS (memory.py):
        # CLIP vision once the features are computed, the UNet before each VAE decode. Off for
        # the bench's authors mode, which keeps every model resident as the authors' code does.
        self.release_idle_weights = True

    @classmethod
    def from_pretrained(
        cls, base_model: str, clip_model: str, device: str = "auto", dtype: str = "auto", base_revision: str | None = None, clip_revision: str | None = None,
        *, offload: str | None = None, compile_unet: bool = False, channels_last: bool = False,
    ) -> "DiffPluginPipeline":
        """Load the shared models; the keywords are the opt-in memory and speed settings (see loading.py)."""
        dev = resolve_device(device)
        base = load_base_models(base_model, clip_model, dev, resolve_dtype(dtype, dev), base_revision, clip_revision, offload)
        speed_up(base, compile_unet, channels_last)
        return cls(base)

    @torch.no_grad()
    def __call__(
        self,
        images: Sequence[Image.Image],
        plugins: Sequence[TaskPlugin],
        seeds: Sequence[int],
        steps: int = 20,
        chain_steps: int = 3,
        size_rule: str = "square",
        resolution: int = 512,
        callback: StepCallback | None = None,
        hidden_states: tuple[torch.Tensor, ...] | None = None,
        tile_size: int | None = None,
    ) -> list[Image.Image]:
        """Run `plugins` in order on RGB `images` (one seed each); returns images at the processed size.

        Every image of a batch must come out of the size rule at the same size. `callback`, if
        given, is called after every step with stage, step, timestep, latents, noise_pred and residuals.
        `hidden_states`: the images' `clip_hidden_states`, when the caller already has them.
        With size_rule "native", latents larger than a tile are denoised in overlapping tiles and
        the VAE tiles too; `tile_size` (pixels, a multiple of 64) or else free memory sets the tile.
        """
        if len(seeds) != len(images):
            raise ValueError("one seed per image is required")
        current = [resize_for_rule(image, size_rule, resolution) for image in images]
        if len({image.size for image in current}) > 1:
            raise ValueError("all images of a batch must have the same processed size")
        self.decode_retried = False
        self.last_tiling = None
        if not plugins:
            return current
        if hidden_states is None:
            hidden_states = self.clip_hidden_states(images)
        if self.release_idle_weights:
            release_mapped_weights(self.base.clip_vision)
        tiling = self._tiling(current[0].size, len(images), tile_size) if size_rule == "native" else None
        with vae_tiling(self.base.vae, tiling.tile * self.base.vae_scale_factor) if tiling else contextlib.nullcontext():
            for stage, plugin in enumerate(plugins):
                prompt_embeds = self.visual_prompt(plugin, hidden_states)
                cond_latents = self.encode_condition(current)
                stage_callback = (lambda *a, _s=stage, **kw: callback(_s, *a, **kw)) if callback else None
                latents = self.denoise(plugin, prompt_embeds, cond_latents, seeds, steps if stage == 0 else chain_steps, stage_callback, tiling)
                current = self.decode(latents)
        return current

    def _tiling(self, size: tuple[int, int], batch_size: int, tile_size: int | None) -> LatentTiling | None:
        """Latent tiling for a native-size batch, or None when one tile holds the whole latent."""
        scale = self.base.vae_scale_factor
        if tile_size is not None and (tile_size < 64 or tile_size % 64):
            raise ValueError(f"tile size must be a multiple of 64 pixels, got {tile_size}")
        tile, free_mib = (tile_size // scale, None) if tile_size else choose_tile(self.device, self.dtype, batch_size)
        tiling = LatentTiling(tile, tile // 4)
        height, width = size[1] // scale, size[0] // scale
        if tiling.covers(height, width):
            return None
        self.last_tiling = {"tile": tile * scale, "overlap": tiling.overlap * scale, "tiles": len(tiling.windows(height, width)),
                            "tile_from": "--tile-size" if tile_size else "free memory", "free_memory_mib": free_mib, "vae_tiling": True}
        return tiling

    @torch.no_grad()
    def clip_hidden_states(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, ...]:
        """CLIP-vision hidden states of the original images, shared by every plugin of a chain."""
        pixels = self.base.clip_processor(images=list(images), return_tensors="pt").pixel_values
        pixels = pixels.to(self.device, self.dtype)
        return self.base.clip_vision(pixels, output_hidden_states=True).hidden_states

    @torch.no_grad()
    def visual_prompt(self, plugin: TaskPlugin, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """F^p: the TPB output that stands in for the text prompt, [B, 256, 768]."""
        self._place(plugin)
        return plugin.tpb(hidden_states)

    @torch.no_grad()
    def encode_condition(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """z_c = scaling_factor x the VAE posterior mean (the processor floors sizes to a multiple of 8)."""
        width, height = images[0].size
        pixels = self.image_processor.preprocess(list(images), height=height, width=width)
        pixels = pixels.to(self.device, self.dtype)
        return self.base.vae.config.scaling_factor * self.base.vae.encode(pixels).latent_dist.mean

    @torch.no_grad()
    def denoise(
        self,
        plugin: TaskPlugin,
        prompt_embeds: torch.Tensor,
        cond_latents: torch.Tensor,
        seeds: Sequence[int],
        steps: int,
        callback: StepCallback | None = None,
        tiling: LatentTiling | None = None,
    ) -> torch.Tensor:
        self._place(plugin)
        # Last step to sigma(t=0), as the authors' diffusers did; the current default ends at sigma 0.
        scheduler = UniPCMultistepScheduler.from_config(self.base.scheduler_config, final_sigmas_type="sigma_min")
        scheduler.set_timesteps(steps, device=self.device)
        noise = initial_noise(seeds, cond_latents.shape[1:]).to(self.device, self.dtype)
        latents = noise
        for step, t in enumerate(scheduler.timesteps):
            if plugin.init == "input" and t >= TIME_THRESHOLD:
                latents = scheduler.add_noise(cond_latents, noise, t.reshape(1))
            noise_pred, residuals = self._predict(plugin, latents, t, prompt_embeds, cond_latents, tiling)
            latents = scheduler.step(noise_pred, t, latents).prev_sample
            if callback:
                callback(step=step, timestep=int(t), latents=latents, noise_pred=noise_pred, residuals=residuals)
        return latents

    def _predict(self, plugin, latents, t, prompt_embeds, cond_latents, tiling) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """The step's noise prediction and SCB residuals; tiled, the residuals are per tile and not returned."""
        if tiling is None:
            residuals = plugin.scb(t, prompt_embeds, cond_latents)
            return predict_noise(self.base.unet, latents, t, prompt_embeds, residuals), residuals

        def predict_tile(window: tuple[slice, slice]) -> torch.Tensor:
            rows, cols = window
            residuals = plugin.scb(t, prompt_embeds, cond_latents[..., rows, cols])
            return predict_noise(self.base.unet, latents[..., rows, cols], t, prompt_embeds, residuals)

        return tiling.blend(predict_tile, latents), None

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        if "unet" in self.base.offload_hooks:  # model offload: the UNet leaves the device before the VAE needs it
            self.base.offload_hooks["unet"].offload()
        if self.release_idle_weights:
            release_mapped_weights(self.base.unet)
        decoded, retried = decode_latents(self.base.vae, latents)
        self.decode_retried = self.decode_retried or retried
        return self.image_processor.postprocess(decoded.float(), output_type="pil")

    def _place(self, plugin: TaskPlugin) -> None:
        """Move a plugin to the pipeline's device and dtype the first time it is used."""
        if id(plugin) not in self._placed:
            for model in (plugin.tpb, plugin.scb):
                # nn.Module.to: ModelMixin.to warns on every dtype cast, even a no-op one.
                torch.nn.Module.to(model, self.device, self.dtype)
            self._placed.add(id(plugin))


def decode_latents(vae, latents: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """VAE decode; an fp16 decode that overflows (NaN/inf, the known SD VAE failure, which gives
    black images) is redone in fp32. Returns (images in [-1, 1], whether it was redone)."""
    scaled = latents / vae.config.scaling_factor
    decoded = vae.decode(scaled).sample
    if decoded.dtype != torch.float16 or torch.isfinite(decoded).all():
        return decoded, False
    vae.to(torch.float32)
    try:
        return vae.decode(scaled.float()).sample, True
    finally:
        vae.to(torch.float16)


def initial_noise(seeds: Sequence[int], latent_shape: Sequence[int]) -> torch.Tensor:
    """One draw per image from a CPU generator seeded with its seed, so an image's noise
    (and output) does not depend on batch size, batch position or device."""
    draws = [torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    return torch.cat(draws)
