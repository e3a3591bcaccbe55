"""`diffplugin eval`: metric correctness on fixed features and images, folders, pairing, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from diffplugin_cli.cli import app
from diffplugin_cli.errors import DiffPluginError
from diffplugin_cli.evaluation import evaluate_folder, frechet_distance, polynomial_mmd

from .conftest import BASE, CLIP, PLUGINS


class FixedFeatures(nn.Module):
    """Returns the 'images' themselves as features: [N, d, 1, 1] -> [N, d]."""

    num_features = 8

    def forward(self, images):
        return images.flatten(1).double()


def test_fid_and_kid_match_independent_formulas_on_fixed_features():
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(0)
    real = rng.normal(0.0, 1.0, (48, 8))
    fake = rng.normal(0.3, 1.2, (48, 8))
    fid = FrechetInceptionDistance(feature=FixedFeatures(), normalize=True)
    # One subset as large as both sets: it holds every sample, and the estimator ignores order.
    kid = KernelInceptionDistance(feature=FixedFeatures(), normalize=True, subsets=1, subset_size=48)
    for features, is_real in ((real, True), (fake, False)):
        tensor = torch.from_numpy(features).float().view(-1, 8, 1, 1)
        fid.update(tensor, real=is_real)
        kid.update(tensor, real=is_real)
    real32, fake32 = (torch.from_numpy(x).float().double().numpy() for x in (real, fake))
    expected_fid = frechet_distance(real32.mean(0), np.cov(real32, rowvar=False), fake32.mean(0), np.cov(fake32, rowvar=False))
    assert abs(float(fid.compute()) - expected_fid) <= 1e-4
    assert abs(float(kid.compute()[0]) - polynomial_mmd(real32, fake32)) <= 1e-4


def _folder(path: Path, images: dict[str, Image.Image]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(path / name)
    return path


def _noise(seed: int, size=(40, 30)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_psnr_and_ssim_on_fixed_images(tmp_path):
    clean = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    noisy = np.clip(clean.astype(int) + np.random.default_rng(1).integers(-20, 21, clean.shape), 0, 255).astype(np.uint8)
    reference = _folder(tmp_path / "ref", {"a.png": Image.fromarray(clean)})
    outputs = _folder(tmp_path / "out", {"a.png": Image.fromarray(noisy)})
    report = evaluate_folder(outputs, reference, ["psnr", "ssim"], csv_path=tmp_path / "pairs.csv")
    mse = ((clean / 255.0 - noisy / 255.0) ** 2).mean()
    assert abs(report["metrics"]["psnr"] - 10 * np.log10(1 / mse)) <= 1e-3
    assert 0 < report["metrics"]["ssim"] < 1
    rgb = evaluate_folder(outputs, reference, ["ssim"], ssim_on="rgb")["metrics"]["ssim"]
    assert rgb != report["metrics"]["ssim"]
    assert evaluate_folder(reference, reference, ["ssim"])["metrics"]["ssim"] == pytest.approx(1.0)
    assert (tmp_path / "pairs.csv").read_text().splitlines()[0] == "name,psnr,ssim"


def test_psnr_and_ssim_agree_with_scikit_image(tmp_path):
    skimage_metrics = pytest.importorskip("skimage.metrics")
    clean = np.random.default_rng(4).integers(0, 255, (48, 40, 3), dtype=np.uint8)
    noisy = np.clip(clean.astype(int) + np.random.default_rng(5).integers(-30, 31, clean.shape), 0, 255).astype(np.uint8)
    reference = _folder(tmp_path / "ref", {"a.png": Image.fromarray(clean)})
    outputs = _folder(tmp_path / "out", {"a.png": Image.fromarray(noisy)})
    a, b = clean / 255.0, noisy / 255.0
    gaussian = {"data_range": 1.0, "gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}
    luma = np.array([0.299, 0.587, 0.114])
    expected = {
        "psnr": skimage_metrics.peak_signal_noise_ratio(a, b, data_range=1.0),
        "ssim": skimage_metrics.structural_similarity(b @ luma, a @ luma, **gaussian),
        "ssim_rgb": skimage_metrics.structural_similarity(b, a, channel_axis=2, **gaussian),
    }
    ours = evaluate_folder(outputs, reference, ["psnr", "ssim"])["metrics"]
    ours["ssim_rgb"] = evaluate_folder(outputs, reference, ["ssim"], ssim_on="rgb")["metrics"]["ssim"]
    for name, value in expected.items():
        assert abs(ours[name] - value) <= 1e-5, (name, ours[name], value)


def test_grayscale_sizes_and_unmatched_names(tmp_path):
    base = _noise(3, (32, 32))
    reference = _folder(tmp_path / "ref", {"a.png": base.convert("L"), "b.png": base, "only_ref.png": base})
    outputs = _folder(tmp_path / "out", {"a.jpg": base.convert("L").convert("RGB"), "b.png": base.resize((64, 64)), "only_out.png": base})
    report = evaluate_folder(outputs, reference, ["psnr"])
    assert report["pairs"] == 2 and report["unmatched"] == ["only_out", "only_ref"]
    assert report["metrics"]["psnr"] > 20
    with pytest.raises(DiffPluginError, match="no output .* has a reference"):
        evaluate_folder(_folder(tmp_path / "x", {"zzz.png": base}), reference, ["psnr"])


def test_clip_fid_kid_with_a_local_feature_model(tmp_path):
    reference = _folder(tmp_path / "ref", {f"{i}.png": _noise(i) for i in range(4)})
    same = evaluate_folder(reference, reference, ["clip-fid", "clip-kid"], feature_model=CLIP)
    assert abs(same["metrics"]["clip-fid"]) < 1e-3 and same["feature_model"]["clip-fid"] == CLIP
    shifted = _folder(tmp_path / "out", {f"{i}.png": Image.new("RGB", (40, 30), (30 * i, 200, 40)) for i in range(4)})
    other = evaluate_folder(shifted, reference, ["clip-fid", "clip-kid"], feature_model=CLIP)
    assert other["metrics"]["clip-fid"] > same["metrics"]["clip-fid"] + 1e-3
    with pytest.raises(DiffPluginError, match="at least 2 images"):
        evaluate_folder(_folder(tmp_path / "one", {"0.png": _noise(9)}), reference, ["clip-fid"], feature_model=CLIP)


def test_eval_cli_compares_two_runs_and_runs_a_task(tmp_path):
    reference = _folder(tmp_path / "ref", {f"{i}.png": _noise(i) for i in range(2)})
    a = _folder(tmp_path / "a", {f"{i}.png": _noise(i + 10) for i in range(2)})
    runner = CliRunner()
    compared = runner.invoke(app, ["eval", "--outputs", str(a), "--outputs", str(reference), "--reference", str(reference), "--metric", "psnr", "--json"])
    assert compared.exit_code == 0, compared.output
    first, second = json.loads(compared.stdout)
    assert 0 < first["metrics"]["psnr"] < 20 and second["metrics"]["psnr"] is None  # identical images: infinite PSNR, null in JSON
    inputs = _folder(tmp_path / "inputs", {f"{i}.png": _noise(i + 20) for i in range(2)})
    ran = runner.invoke(app, ["eval", "--task", "desnow", "--data", str(inputs), "--reference", str(reference), "--metric", "psnr", "--metric", "clip-kid",
                              "--feature-model", CLIP, "--cache-dir", str(tmp_path / "cache"), "--plugin-dir", str(PLUGINS), "--base-model", BASE,
                              "--clip-model", CLIP, "--steps", "2", "--resolution", "64", "--device", "cpu", "--json"])
    assert ran.exit_code == 0, ran.output
    report = json.loads(ran.stdout)
    assert report["counts"] == {"outputs": 2, "reference": 2} and set(report["metrics"]) == {"psnr", "clip-kid"}
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.png")) == ["0.png", "1.png"]
    missing = runner.invoke(app, ["eval", "--task", "derain", "--metric", "fid"])
    assert missing.exit_code == 2 and "test_data" in missing.stderr and "--data" in missing.stderr
    assert runner.invoke(app, ["eval", "--outputs", str(a), "--reference", str(reference), "--metric", "sharpness"]).exit_code == 2
