"""Reading input images safely and writing outputs atomically.

Every reading problem becomes an ImageError with a one-line reason, so a batch can go on.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .atomic import atomic_path
from .errors import DiffPluginError, ImageError

DEFAULT_MAX_PIXELS = 80_000_000
IMAGE_EXTENSIONS = {
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".dib", ".tif", ".tiff",
    ".gif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k", ".avif", ".heic",
}
OUTPUT_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "bmp": "BMP", "tif": "TIFF"}
SAME_EXT = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".jpe": "jpg", ".jfif": "jpg", ".webp": "webp",
            ".bmp": "bmp", ".tif": "tif", ".tiff": "tif"}
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass
class LoadedImage:
    """An input decoded to RGB (EXIF orientation applied), with its alpha kept aside."""

    rgb: Image.Image
    alpha: Image.Image | None
    mode: str
    format: str | None
    sha256: str

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.size


def looks_like_image(path: Path) -> bool:
    """Whether a file found in a folder walk is an image: by extension (any case) or by content."""
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    try:
        with Image.open(path):
            return True
    except Exception:
        return False


def images_by_name(folder: str | os.PathLike) -> dict[str, Path]:
    """Images under `folder` (recursive, hidden files skipped) keyed by relative path without
    extension: how outputs pair with references, and inputs with ground truths."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DiffPluginError(f"{folder}: no such folder")
    return {p.relative_to(folder).with_suffix("").as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and looks_like_image(p)}


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read file ({exc.strerror or exc})") from None
    if not data:
        raise ImageError("empty file (0 bytes)")
    Image.MAX_IMAGE_PIXELS = None  # our own limit, checked below before decoding, replaces PIL's
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    input_format = image.format
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"{width}x{height} = {width * height} pixels is over --max-pixels {max_pixels}")
    if width == 0 or height == 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"truncated or corrupt image ({exc})") from None
    rgb, alpha = _to_rgb(image)
    return LoadedImage(rgb, alpha, image.mode, input_format, hashlib.sha256(data).hexdigest())


def _to_rgb(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """Split any supported mode into 8-bit RGB and an optional 8-bit alpha channel."""
    mode = image.mode
    if mode in _HIGH_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if mode != "I" or values.max() > 255 else 1.0
        gray = Image.fromarray(np.clip(np.round(values / scale), 0, 255).astype(np.uint8))
        return gray.convert("RGB"), None
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        values = values * 255.0 if values.max() <= 1.0 else values
        return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8)).convert("RGB"), None
    if (mode == "P" and "transparency" in image.info) or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A")
    try:
        return image.convert("RGB"), None
    except (ValueError, OSError) as exc:
        raise ImageError(f"unsupported image mode {mode} ({exc})") from None


def output_extension(ext: str, source: Path) -> str:
    """'same' keeps the input's file type (by its extension) where we can write it, else PNG."""
    if ext == "same":
        return SAME_EXT.get(source.suffix.lower(), "png")
    return ext


def save_image(image: Image.Image, alpha: Image.Image | None, path: Path) -> None:
    """Write atomically; alpha is re-attached where the format keeps it (not JPEG)."""
    fmt = OUTPUT_FORMATS[path.suffix.lower().lstrip(".")]
    if alpha is not None and fmt != "JPEG":
        image = image.convert("RGBA")
        image.putalpha(alpha.resize(image.size, Image.LANCZOS) if alpha.size != image.size else alpha)
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **options)
