"""Large images at their own size (`--size-rule native`): overlapping latent tiles, blended.

At every denoising step the UNet and the SCB see one latent tile at a time; the noise
predictions of overlapping tiles are averaged with weights that fall off towards tile edges, so
no seam shows, and the scheduler steps the whole latent at once. The VAE encodes and decodes
in tiles too (diffusers' AutoencoderKL tiling). The tile size comes from free memory unless given.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

# Latent tile sides tried from the largest: 64 is SD 1.x's training size (512 px).
TILE_CANDIDATES = (64, 48, 32)
# Peak activation bytes of one UNet + SCB step per latent position, per image, at 4 bytes a value:
# 59 to 69 kB in four measurements on full SD 1.x shapes on CPU, at 64 and 96 latent positions a side
# (`python bench/bench_inference.py --tile-memory SIDE`, one fresh process per side). choose_tile
# keeps a 2x margin.
ACTIVATION_BYTES_PER_LATENT_POSITION_FP32 = 64_000


@dataclass(frozen=True)
class LatentTiling:
    """Square latent tiles of side `tile` overlapping by `overlap` (both in latent positions)."""

    tile: int
    overlap: int

    def __post_init__(self) -> None:
        if self.tile < 8 or self.tile % 8:
            raise ValueError(f"tile side must be a positive multiple of 8 latent positions, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"overlap must be in [0, tile), got {self.overlap}")

    def windows(self, height: int, width: int) -> list[tuple[slice, slice]]:
        """(rows, columns) of every tile; together they cover the latent, the last ones flush with its edge."""
        return [(rows, cols) for rows in _spans(height, self.tile, self.overlap) for cols in _spans(width, self.tile, self.overlap)]

    def covers(self, height: int, width: int) -> bool:
        """Whether one tile holds the whole latent (then tiling changes nothing)."""
        return height <= self.tile and width <= self.tile

    def blend(self, predict: Callable[[tuple[slice, slice]], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Weighted average of `predict(window)` over all windows; `like` gives shape, device, dtype."""
        height, width = like.shape[-2:]
        total = torch.zeros_like(like, dtype=torch.float32)
        weight_sum = torch.zeros((height, width), device=like.device, dtype=torch.float32)
        for rows, cols in self.windows(height, width):
            weights = self._weights(rows.stop - rows.start, cols.stop - cols.start, like.device)
            total[..., rows, cols] += predict((rows, cols)).float() * weights
            weight_sum[rows, cols] += weights
        return (total / weight_sum).to(like.dtype)

    def _weights(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """1 in a tile's middle, falling linearly to 1/(overlap+1) over its last `overlap` positions."""

        def ramp(n: int) -> torch.Tensor:
            i = torch.arange(n, device=device, dtype=torch.float32)
            edge = torch.minimum(i + 1, n - i) / (self.overlap + 1)
            return edge.clamp(max=1.0)

        return ramp(height)[:, None] * ramp(width)[None, :]


def _spans(length: int, tile: int, overlap: int) -> list[slice]:
    if length <= tile:
        return [slice(0, length)]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return [slice(start, start + tile) for start in starts]


def choose_tile(device: torch.device, dtype: torch.dtype, batch_size: int, free_bytes: int | None = None) -> tuple[int, int]:
    """The largest candidate latent tile whose step fits in half the free memory; (tile, free MiB).

    The smallest candidate is returned when none fits: smaller tiles only cost more steps.
    """
    free = free_bytes if free_bytes is not None else free_memory(device)
    per_position = ACTIVATION_BYTES_PER_LATENT_POSITION_FP32 * torch.finfo(dtype).bits // 32 * batch_size
    for tile in TILE_CANDIDATES:
        if tile * tile * per_position <= free // 2:
            return tile, free // 2**20
    return TILE_CANDIDATES[-1], free // 2**20


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: CUDA's own count, else the system's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        with contextlib.suppress(OSError, ValueError):
            return _meminfo_available() or os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 8 * 2**30  # unknown: assume a modest machine


def _meminfo_available() -> int | None:
    """MemAvailable from /proc/meminfo (counts reclaimable cache, unlike free pages)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextlib.contextmanager
def vae_tiling(vae, tile_pixels: int) -> Iterator[None]:
    """diffusers' AutoencoderKL tiling with `tile_pixels` tiles, restored afterwards (the VAE is shared)."""
    saved = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = True, tile_pixels, tile_pixels // scale
    try:
        yield
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = saved
