"""Image-quality evaluation: FID/KID and CLIP-FID/CLIP-KID (distribution), PSNR/SSIM/LPIPS (pairs).

The metric code is torchmetrics'; only the feature network is chosen here:
- fid, kid: torchmetrics' Inception-v3 (needs `torch-fidelity` and its weights), or `--feature-model`.
- clip-fid, clip-kid: CLIP image features, as the authors' scripts (clean-fid with CLIP ViT-B/32);
  default `openai/clip-vit-base-patch32`, or `--feature-model` (a hub id or a local folder).
Resize policy: for features, each image's short side is resized (bicubic, antialiased) to the
network's input size and centre-cropped; for pairs, an output whose size differs from its
reference is resized (bicubic) to the reference's size. Grayscale and other modes become RGB.
KID is reported x100, as in the paper's tables; an infinite PSNR (identical images) is reported as null. SSIM is computed on the luma channel (Y of
ITU-R BT.601) by default, or on RGB (`--ssim-on rgb`): torchmetrics' SSIM map (11-tap Gaussian,
sigma 1.5) averaged without the 5-pixel border the window cannot cover, as Wang et al.'s reference
code and scikit-image do (torchmetrics' own mean includes a reflection-padded border).
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import __version__
from .errors import DiffPluginError
from .images import images_by_name

DISTRIBUTION_METRICS = ("fid", "kid", "clip-fid", "clip-kid")
PAIR_METRICS = ("psnr", "ssim", "lpips")
SSIM_BORDER = 5  # half of torchmetrics' 11-tap window for sigma 1.5
METRICS = DISTRIBUTION_METRICS + PAIR_METRICS
DEFAULT_CLIP = "openai/clip-vit-base-patch32"


class ClipFeatures(nn.Module):
    """CLIP image features of float images in [0, 1] ([N, 3, H, W], any size)."""

    def __init__(self, source: str):
        super().__init__()
        from transformers import AutoConfig, CLIPModel, CLIPVisionModel

        try:
            config = AutoConfig.from_pretrained(source)
            self.model = (CLIPModel if config.model_type == "clip" else CLIPVisionModel).from_pretrained(source).eval().requires_grad_(False)
        except (OSError, ValueError) as exc:
            raise DiffPluginError(f"cannot load the feature model {source!r} ({str(exc).splitlines()[0]}); pass --feature-model /path/to/local/clip") from None
        vision = self.model.config.vision_config if hasattr(self.model.config, "vision_config") else self.model.config
        self.size = vision.image_size
        self.register_buffer("mean", torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1))
        self.num_features = int(self.forward(torch.rand(1, 3, self.size, self.size)).shape[1])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        scale = self.size / min(height, width)
        resized = F.interpolate(images.float(), size=(max(self.size, round(height * scale)), max(self.size, round(width * scale))),
                                mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (resized.shape[-2] - self.size) // 2, (resized.shape[-1] - self.size) // 2
        pixels = (resized[..., top:top + self.size, left:left + self.size] - self.mean) / self.std
        if hasattr(self.model, "get_image_features"):
            features = self.model.get_image_features(pixel_values=pixels)
            return features if isinstance(features, torch.Tensor) else features.pooler_output
        return self.model(pixel_values=pixels).pooler_output


def as_tensor(path: Path) -> torch.Tensor:
    """[1, 3, H, W] float in [0, 1], any mode made RGB."""
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def distribution_metrics(names: Sequence[str], outputs: Sequence[Path], reference: Sequence[Path], feature_model: str | None = None) -> dict[str, tuple[float, str]]:
    """FID and KID (x100) between two image sets: {name: (value, feature network used)}.

    Metrics sharing a feature network share one model load and one pass over the images.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(outputs) < 2 or len(reference) < 2:
        raise DiffPluginError(f"{', '.join(names)} need(s) at least 2 images in each set (got {len(outputs)} outputs and {len(reference)} references)")
    by_network: dict[str, list[str]] = {}
    for name in names:
        by_network.setdefault(feature_model or (DEFAULT_CLIP if name.startswith("clip") else "inception"), []).append(name)
    results = {}
    for network, group in by_network.items():
        feature = 2048 if network == "inception" else ClipFeatures(network)
        try:
            metrics = {name: FrechetInceptionDistance(feature=feature, normalize=True) if name.endswith("fid") else
                       KernelInceptionDistance(feature=feature, normalize=True, subsets=100, subset_size=min(len(outputs), len(reference), 1000))
                       for name in group}
        except (ModuleNotFoundError, RuntimeError, OSError) as exc:
            raise DiffPluginError(f"{', '.join(group)}: the Inception network is not available ({str(exc).splitlines()[0]}); "
                                  "install torch-fidelity with its weights, or pass --feature-model /path/to/local/clip") from None
        for paths, real in ((reference, True), (outputs, False)):
            for path in paths:
                image = as_tensor(path)
                if network == "inception":
                    image = F.interpolate(image, size=(299, 299), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
                for metric in metrics.values():
                    metric.update(image, real=real)
        for name, metric in metrics.items():
            value = metric.compute()
            results[name] = (float(value[0]) * 100 if name.endswith("kid") else float(value), network)
    return results


@dataclass
class PairScores:
    rows: list[dict] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)


def pair_metrics(names: Sequence[str], outputs: dict[str, Path], reference: dict[str, Path], ssim_on: str = "y") -> PairScores:
    """PSNR (dB, on RGB in [0, 1]), SSIM and LPIPS per output/reference pair matched by name."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    lpips = _lpips() if "lpips" in names else None
    scores = PairScores(unmatched=sorted(set(outputs) ^ set(reference)))
    for key in sorted(set(outputs) & set(reference)):
        target = as_tensor(reference[key])
        produced = as_tensor(outputs[key])
        if produced.shape != target.shape:
            produced = F.interpolate(produced, size=target.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
        row = {"name": key}
        if "psnr" in names:
            row["psnr"] = float(peak_signal_noise_ratio(produced, target, data_range=1.0))
        if "ssim" in names:
            a, b = (_luma(produced), _luma(target)) if ssim_on == "y" else (produced, target)
            row["ssim"] = ssim_without_border(a, b)
        if lpips is not None:
            row["lpips"] = float(lpips(produced * 2 - 1, target * 2 - 1))
        scores.rows.append(row)
    return scores


def ssim_without_border(produced: torch.Tensor, target: torch.Tensor) -> float:
    """Mean SSIM over the positions the 11x11 window covers without padding (all of a smaller image)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _, ssim_map = structural_similarity_index_measure(produced, target, data_range=1.0, return_full_image=True)
    if min(ssim_map.shape[-2:]) > 2 * SSIM_BORDER:
        ssim_map = ssim_map[..., SSIM_BORDER:-SSIM_BORDER, SSIM_BORDER:-SSIM_BORDER]
    return float(ssim_map.mean())


def _luma(images: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def _lpips():
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        return LearnedPerceptualImagePatchSimilarity(net_type="alex")
    except (ModuleNotFoundError, RuntimeError, OSError) as exc:
        raise DiffPluginError(f"lpips needs torchvision and the LPIPS AlexNet weights ({str(exc).splitlines()[0]})") from None


def evaluate_folder(outputs_dir: str | Path, reference_dir: str | Path | None, metrics: Sequence[str], feature_model: str | None = None,
                    ssim_on: str = "y", csv_path: str | Path | None = None) -> dict:
    """Score one folder of outputs; the report records what was measured and how."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise DiffPluginError(f"--metric {', '.join(unknown)}: expected some of {', '.join(METRICS)}")
    if reference_dir is None:
        raise DiffPluginError("these metrics compare against references: give --reference DIR")
    outputs, reference = images_by_name(outputs_dir), images_by_name(reference_dir)
    report = {"outputs": str(outputs_dir), "reference": str(reference_dir), "counts": {"outputs": len(outputs), "reference": len(reference)},
              "metrics": {}, "feature_model": {}, "ssim_on": ssim_on, "version": __version__,
              "resize_policy": "features: short side to the network's input size (bicubic, antialiased), centre crop; pairs: output resized to its reference's size (bicubic)"}
    distribution = [m for m in metrics if m in DISTRIBUTION_METRICS]
    if distribution:
        for name, (value, network) in distribution_metrics(distribution, list(outputs.values()), list(reference.values()), feature_model).items():
            report["metrics"][name], report["feature_model"][name] = value, network
    pair_names = [m for m in metrics if m in PAIR_METRICS]
    if pair_names:
        scores = pair_metrics(pair_names, outputs, reference, ssim_on)
        if not scores.rows:
            raise DiffPluginError(f"no output in {outputs_dir} has a reference of the same name in {reference_dir}")
        report["pairs"] = len(scores.rows)
        report["unmatched"] = scores.unmatched
        for name in pair_names:
            mean = sum(row[name] for row in scores.rows) / len(scores.rows)
            report["metrics"][name] = mean if math.isfinite(mean) else None  # PSNR of identical images is infinite
        if csv_path:
            with open(csv_path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=["name", *pair_names])
                writer.writeheader()
                writer.writerows(scores.rows)
    return report


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), with scipy's sqrtm (the reference formula)."""
    from scipy import linalg

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def polynomial_mmd(x: np.ndarray, y: np.ndarray, degree: int = 3, coef: float = 1.0) -> float:
    """Unbiased MMD^2 with the kernel (x.y / d + coef)^degree (KID's estimator, one subset)."""
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + coef) ** degree for a, b in ((x, x), (y, y), (x, y)))
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())


def render_task_outputs(task: str, data: str | Path | None, cache_dir: str | Path | None, registry, **run_settings) -> tuple[Path, Path]:
    """Run `task`'s plugin over the test images into a cache folder (resumable); returns (outputs, data)."""
    from .install import plugin_home
    from .runner import RunOptions, run

    entry = registry.entry(task)
    data = Path(data) if data else (Path(entry.test_data) if entry.test_data else None)
    if data is None:
        raise DiffPluginError(f"no test set for {task!r}: pass --data TEST_DIR (and --reference REF_DIR), "
                              f"or set test_data = \"/path/to/inputs\" under [plugins.{task}] in the registry ({registry.path})")
    if not data.is_dir():
        raise DiffPluginError(f"{data}: test set folder not found (expected the degraded test inputs there)")
    digest = hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:12]
    cache = Path(cache_dir) if cache_dir else plugin_home() / "eval" / f"{task}-{digest}"
    summary = run([str(data)], RunOptions(output_dir=cache, tasks=[task], registry=registry.path, **run_settings))
    if summary.failed:
        raise DiffPluginError(f"{summary.failed} test image(s) failed to process; see {cache / 'diffplugin-run.json'}")
    return cache, data
