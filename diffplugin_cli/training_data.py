"""Training pairs (degraded input, ground truth): reading lists, checking them up front, and
building each step's batch deterministically from (seed, step), so a resumed run sees exactly
the batches an uninterrupted one would.

Synthetic degradations (`--degrade`, applied to the clean target to make the input; parameters
drawn uniformly per sample):
    lowlight  in = s * target ** g           (pixels in [0, 1]; g in [1.5, 3], s in [0.1, 0.5])
    blur      in = GaussianBlur(target, r)   (r in [1, 3] pixels)
    noise     in = target + N(0, sigma^2)     (sigma in [5, 25] / 255, clipped to [0, 1])
    jpeg      in = JPEG(target, quality q)   (q in [10, 40])
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter, UnidentifiedImageError

from .errors import DiffPluginError
from .images import images_by_name

DEGRADATIONS = ("lowlight", "blur", "noise", "jpeg")


@dataclass(frozen=True)
class Pair:
    input: Path | None  # None: synthesised from the target with --degrade
    target: Path


def read_pairs(
    data: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    inputs: str | os.PathLike | None = None,
    targets: str | os.PathLike | None = None,
    degrade: str | None = None,
) -> list[Pair]:
    """Pairs from a CSV (`input,target` header, the authors' `image,conditioning_image` = target,input,
    or no header = input,target), from two folders with matching names, or from targets alone with --degrade."""
    if degrade is not None and degrade not in DEGRADATIONS:
        raise DiffPluginError(f"--degrade {degrade!r}: expected one of {', '.join(DEGRADATIONS)}")
    if data:
        pairs = _pairs_from_csv(Path(data), Path(data_root) if data_root else Path(data).parent, degrade)
    elif targets:
        pairs = _pairs_from_folders(Path(inputs) if inputs else None, Path(targets), degrade)
    else:
        raise DiffPluginError("no training data: give --data FILE.csv or --targets DIR (with --inputs DIR or --degrade KIND)")
    if not pairs:
        raise DiffPluginError("no training pairs found")
    return pairs


def _pairs_from_csv(path: Path, root: Path, degrade: str | None) -> list[Pair]:
    try:
        rows = [row for row in csv.reader(path.read_text(encoding="utf-8").splitlines()) if row and any(c.strip() for c in row)]
    except OSError as exc:
        raise DiffPluginError(f"{path}: cannot read ({exc.strerror})") from None
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if {"image", "conditioning_image"} <= set(header):  # the authors' layout
        t, i = header.index("image"), header.index("conditioning_image")
        rows = rows[1:]
    elif {"input", "target"} <= set(header):
        i, t = header.index("input"), header.index("target")
        rows = rows[1:]
    else:
        i, t = 0, 1
    pairs = []
    for number, row in enumerate(rows, 2 if header else 1):
        if degrade:
            pairs.append(Pair(None, root / row[-1].strip()))
        elif len(row) < 2:
            raise DiffPluginError(f"{path}:{number}: expected two columns (input, target)")
        else:
            pairs.append(Pair(root / row[i].strip(), root / row[t].strip()))
    return pairs


def _pairs_from_folders(inputs: Path | None, targets: Path, degrade: str | None) -> list[Pair]:
    wanted = images_by_name(targets)
    if degrade or inputs is None:
        if not degrade:
            raise DiffPluginError("--targets without --inputs needs --degrade KIND to synthesise the inputs")
        return [Pair(None, path) for path in wanted.values()]
    have = images_by_name(inputs)
    unmatched = sorted(set(wanted) ^ set(have))
    if unmatched:
        raise DiffPluginError(f"{len(unmatched)} file(s) have no partner in the other folder, e.g. {', '.join(unmatched[:3])}")
    return [Pair(have[key], wanted[key]) for key in sorted(wanted)]


def check_pairs(pairs: Sequence[Pair]) -> list[str]:
    """Every problem with the data, found before training starts (file headers only, no decoding)."""
    problems = []
    for pair in pairs:
        for role, path in (("input", pair.input), ("target", pair.target)):
            if path is None:
                continue
            if not path.is_file():
                problems.append(f"{path}: {role} missing")
                continue
            try:
                with Image.open(path) as image:
                    image.size  # noqa: B018 - reading the header is the check
            except (UnidentifiedImageError, OSError) as exc:
                problems.append(f"{path}: {role} unreadable ({exc})")
    return problems


def load_pair(pair: Pair, degrade: str | None, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    target = Image.open(pair.target).convert("RGB")
    if pair.input is not None:
        return Image.open(pair.input).convert("RGB"), target
    return synthesise(target, degrade, rng), target


def synthesise(target: Image.Image, degrade: str | None, rng: np.random.Generator) -> Image.Image:
    """Make a degraded input from a clean image (formulas in the module docstring)."""
    if degrade == "blur":
        return target.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1, 3))))
    if degrade == "jpeg":
        buffer = io.BytesIO()
        target.save(buffer, format="JPEG", quality=int(rng.integers(10, 41)))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    pixels = np.asarray(target, dtype=np.float64) / 255.0
    if degrade == "lowlight":
        pixels = rng.uniform(0.1, 0.5) * pixels ** rng.uniform(1.5, 3.0)
    elif degrade == "noise":
        pixels = pixels + rng.normal(0.0, rng.uniform(5, 25) / 255.0, pixels.shape)
    else:
        raise DiffPluginError(f"--degrade {degrade!r}: expected one of {', '.join(DEGRADATIONS)}")
    return Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8))


def step_batch(pairs: Sequence[Pair], step: int, seed: int, batch_size: int, resolution: int, degrade: str | None,
               process_index: int = 0, num_processes: int = 1) -> dict[str, torch.Tensor]:
    """The batch of one process at one (micro-)step: a slice of a global batch drawn from (seed, step).

    Same short-side resize, random crop and flip for input and target; pixels in [-1, 1].
    """
    rng = np.random.default_rng([seed, step])
    global_size = batch_size * num_processes
    picks = rng.integers(0, len(pairs), global_size)
    plans = [(int(p), rng.random(), rng.random(), bool(rng.random() < 0.5), int(rng.integers(2**31))) for p in picks]
    inputs, targets, seeds = [], [], []
    for index, fx, fy, flip, sample_seed in plans[process_index * batch_size:(process_index + 1) * batch_size]:
        degraded, clean = load_pair(pairs[index], degrade, np.random.default_rng(sample_seed))
        inputs.append(_crop(degraded.resize(clean.size, Image.BICUBIC), resolution, fx, fy, flip))
        targets.append(_crop(clean, resolution, fx, fy, flip))
        seeds.append(sample_seed)
    # Each sample's own seed also draws its noise and timestep, so a sample trains the same
    # whichever process and batch position it lands in.
    return {"input": torch.stack(inputs), "target": torch.stack(targets), "sample_seeds": torch.tensor(seeds)}


def _crop(image: Image.Image, resolution: int, fx: float, fy: float, flip: bool) -> torch.Tensor:
    width, height = image.size
    scale = resolution / min(width, height)
    image = image.resize((max(resolution, round(width * scale)), max(resolution, round(height * scale))), Image.BICUBIC)
    left = int(fx * (image.width - resolution))
    top = int(fy * (image.height - resolution))
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return array / 127.5 - 1.0
