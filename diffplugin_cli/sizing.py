"""Size rules: the resolution an image is processed at."""

from __future__ import annotations

from PIL import Image

SIZE_RULES = ("square", "reference", "short-side", "native")


def rule_size(width: int, height: int, rule: str, resolution: int = 512) -> tuple[int, int]:
    """(width, height) an image is resized to before the VAE's floor to a multiple of 8.

    square      resolution x resolution (the paper's experiments)
    reference   the authors' infer.py: if a side is below `resolution`, the short side becomes
                `resolution` and the long side int(resolution / short * long); else unchanged
    short-side  the authors' demo: the short side always becomes `resolution`
    native      unchanged (large images are then processed in latent tiles, see tiling.py)
    """
    if rule == "square":
        return resolution, resolution
    if rule == "native":
        return width, height
    if rule == "reference" and width >= resolution and height >= resolution:
        return width, height
    if rule not in ("reference", "short-side"):
        raise ValueError(f"unknown size rule {rule!r}; expected one of {SIZE_RULES}")
    if width < height:
        return resolution, int(resolution / width * height)
    return int(resolution / height * width), resolution


def processed_size(width: int, height: int, rule: str, resolution: int = 512, multiple: int = 8) -> tuple[int, int]:
    """The size the models see: the rule's size floored to a multiple of the VAE's scale factor."""
    w, h = rule_size(width, height, rule, resolution)
    return w - w % multiple, h - h % multiple


def resize_for_rule(image: Image.Image, rule: str, resolution: int = 512) -> Image.Image:
    size = rule_size(*image.size, rule, resolution)
    # PIL's default filter (bicubic), as the reference; resize to the same size is a copy.
    return image.resize(size)
