"""Training Task-Plugins on the tiny conformance base: loss, exact resume, 2 processes, export, data checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from typer.testing import CliRunner

from diffplugin_cli import RunOptions, run
from diffplugin_cli.cli import app
from diffplugin_cli.errors import DiffPluginError
from diffplugin_cli.plugins import load_plugin, read_plugin
from diffplugin_cli.training import TrainOptions, build_plugin_models, plugin_loss, train_plugin
from diffplugin_cli.training_data import Pair, read_pairs, step_batch, synthesise

from .conftest import BASE, CLIP


@pytest.fixture(scope="module")
def clean_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clean")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"c{i}.png")
    return folder


def options(out: Path, pairs, **overrides) -> TrainOptions:
    values = dict(name="mylow", out_dir=out, pairs=pairs, base_model=BASE, clip_model=CLIP, init="noise", degrade="lowlight",
                  resolution=64, max_steps=20, batch_size=2, lr=1e-3, checkpoint_every=10, seed=0)
    return TrainOptions(**(values | overrides))


def weights(path: Path) -> dict[str, torch.Tensor]:
    plugin = read_plugin(path)
    return {f"tpb.{k}": v for k, v in plugin.tpb_state.items()} | {f"scb.{k}": v for k, v in plugin.scb_state.items()}


def test_training_lowers_the_loss_on_held_batches(tmp_path, clean_images, pipeline):
    pairs = read_pairs(targets=clean_images, degrade="lowlight")
    result = train_plugin(options(tmp_path / "out", pairs, max_steps=30, checkpoint_every=100), log=lambda line: None)
    base = pipeline.base
    scheduler = DDPMScheduler.from_config(base.scheduler_config)
    mean = torch.tensor(base.clip_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(base.clip_processor.image_std).view(1, 3, 1, 1)
    held = [step_batch(pairs, 10_000 + i, 0, 4, 64, "lowlight") for i in range(4)]  # steps training never drew

    def held_loss(tpb, scb) -> float:
        with torch.no_grad():
            return sum(plugin_loss(base, tpb, scb, batch, scheduler, mean, std, torch.float32).item() for batch in held) / len(held)

    untrained = build_plugin_models(base.unet, base.clip_vision, "zero", seed=0)
    trained = load_plugin(result.plugin)
    before, after = held_loss(*untrained), held_loss(trained.tpb, trained.scb)
    assert after < before - 0.01, (before, after)
    log = (tmp_path / "out/train_log.csv").read_text().splitlines()
    assert log[0] == "step,loss,lr,seconds" and len(log) == 31


def test_resume_continues_exactly(tmp_path, clean_images):
    pairs = read_pairs(targets=clean_images, degrade="lowlight")
    whole = train_plugin(options(tmp_path / "whole", pairs), log=lambda line: None)
    train_plugin(options(tmp_path / "split", pairs, max_steps=10), log=lambda line: None)
    resumed = train_plugin(options(tmp_path / "split", pairs, resume="latest"), log=lambda line: None)
    a, b = weights(whole.plugin), weights(resumed.plugin)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.losses[10:] == resumed.losses


def test_two_cpu_processes_average_gradients_like_one_process_with_the_global_batch(tmp_path, clean_images):
    common = ["train", "plugin", "--name", "two", "--targets", str(clean_images), "--degrade", "blur", "--max-steps", "3", "--resolution", "64",
              "--lr", "1e-3", "--base-model", BASE, "--clip-model", CLIP]
    # accelerate's multi-CPU mode: torchrun (--multi_gpu) with ACCELERATE_USE_CPU, gloo on 127.0.0.1.
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", "29517",
         str(Path(__file__).with_name("ddp_exit_probe.py")), *common, "--out", str(tmp_path / "two"), "--batch-size", "1"],
        capture_output=True, text=True, env=env, timeout=180,  # about 10-15 s; a hang at exit fails in 3 minutes, not 10
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "step 3/3" in launched.stderr
    assert all(f"rank {rank}: DDP wrappers alive at end_training: 0" in launched.stderr for rank in (0, 1)), launched.stderr[-3000:]
    single = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "one"), "--batch-size", "2"])
    assert single.exit_code == 0, single.output
    a, b = weights(tmp_path / "two/two.safetensors"), weights(tmp_path / "one/two.safetensors")
    initial = build_plugin_models(*_tiny_unet_and_clip(), "zero", seed=0)
    start = {f"tpb.{k}": v for k, v in initial[0].state_dict().items()} | {f"scb.{k}": v for k, v in initial[1].state_dict().items()}
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 1e-4  # training changed the weights
    # Equal up to float reduction order (measured 4e-6 after 3 steps that moved weights by 3e-3).
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-2 * moved


def _tiny_unet_and_clip():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionModel

    return UNet2DConditionModel.from_pretrained(BASE, subfolder="unet", use_safetensors=False), CLIPVisionModel.from_pretrained(CLIP)


def test_exported_plugin_runs_and_differs_from_the_untrained_one(tmp_path, clean_images, pipeline):
    pairs = read_pairs(targets=clean_images, degrade="lowlight")
    train_plugin(options(tmp_path / "untrained", pairs, max_steps=0), log=lambda line: None)
    train_plugin(options(tmp_path / "trained", pairs, max_steps=20, checkpoint_every=100), log=lambda line: None)
    metadata = read_plugin(tmp_path / "trained/mylow.safetensors").provenance
    assert metadata["init"] == "noise" and metadata["steps"] == "20" and metadata["base_model"] == BASE and len(metadata["data_sha256"]) == 64
    outputs = {}
    for kind in ("untrained", "trained"):
        run_options = RunOptions(output_dir=tmp_path / f"run-{kind}", tasks=["mylow"], plugin_dirs=[tmp_path / kind], steps=2, resolution=64,
                                 base_model=BASE, clip_model=CLIP, device="cpu", dtype="fp32")
        summary = run([str(clean_images / "c0.png")], run_options, pipeline=pipeline)
        assert summary.processed == 1
        outputs[kind] = np.asarray(Image.open(tmp_path / f"run-{kind}/c0.png")).astype(int)
    assert np.abs(outputs["trained"] - outputs["untrained"]).max() > 0


def test_bad_training_data_is_reported_up_front(tmp_path, clean_images):
    (tmp_path / "broken.png").write_text("not an image")
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text(f"input,target\nmissing_in.png,{clean_images}/c0.png\nbroken.png,{clean_images}/c1.png\n{clean_images}/c2.png,gone.png\n")
    result = CliRunner().invoke(app, ["train", "plugin", "--name", "x", "--out", str(tmp_path / "out"), "--data", str(csv_file),
                                      "--base-model", BASE, "--clip-model", CLIP, "--max-steps", "1"])
    assert result.exit_code == 2
    assert "3 problem(s) in 3 training pairs" in result.stderr
    assert "missing_in.png: input missing" in result.stderr and "broken.png: input unreadable" in result.stderr and "gone.png: target missing" in result.stderr
    (tmp_path / "inputs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "inputs/c0.png")
    with pytest.raises(DiffPluginError, match="7 file\\(s\\) have no partner"):
        read_pairs(inputs=tmp_path / "inputs", targets=clean_images)
    with pytest.raises(DiffPluginError, match="--degrade"):
        read_pairs(targets=clean_images)


def test_csv_layouts(tmp_path):
    (tmp_path / "a.csv").write_text("image,conditioning_image\ngt/1.png,in/1.png\n")
    (tmp_path / "b.csv").write_text("in/1.png,gt/1.png\n")
    (tmp_path / "c.csv").write_text("target,input\ngt/1.png,in/1.png\n")
    for name in ("a", "b", "c"):
        assert read_pairs(data=tmp_path / f"{name}.csv", data_root=tmp_path) == [Pair(tmp_path / "in/1.png", tmp_path / "gt/1.png")]


@pytest.mark.parametrize("kind", ["lowlight", "blur", "noise", "jpeg"])
def test_degradations(kind):
    clean = Image.fromarray(np.random.default_rng(1).integers(60, 255, (32, 32, 3), dtype=np.uint8))
    degraded = synthesise(clean, kind, np.random.default_rng(2))
    assert degraded.size == clean.size and degraded.mode == "RGB"
    difference = np.abs(np.asarray(degraded, dtype=int) - np.asarray(clean, dtype=int)).mean()
    assert difference > 1
    if kind == "lowlight":
        assert np.asarray(degraded).mean() < 0.5 * np.asarray(clean).mean()


def test_batches_are_a_function_of_seed_and_step(clean_images):
    pairs = read_pairs(targets=clean_images, degrade="noise")
    a, b = step_batch(pairs, 5, 0, 2, 32, "noise"), step_batch(pairs, 5, 0, 2, 32, "noise")
    assert torch.equal(a["input"], b["input"]) and torch.equal(a["target"], b["target"])
    halves = [step_batch(pairs, 5, 0, 1, 32, "noise", process_index=p, num_processes=2) for p in (0, 1)]
    assert torch.equal(torch.cat([h["target"] for h in halves]), a["target"])
    assert a["input"].shape == (2, 3, 32, 32) and a["input"].min() >= -1 and a["input"].max() <= 1


def test_bf16_mixed_precision_trains_on_cpu(tmp_path, clean_images):
    """Frozen models in bf16, trained branches in fp32 (a dtype mismatch used to fail here).

    Its own process: accelerate's precision is fixed once per process.
    """
    done = subprocess.run([sys.executable, "-m", "diffplugin_cli", "train", "plugin", "--name", "b", "--targets", str(clean_images), "--degrade", "noise",
                           "--max-steps", "3", "--resolution", "64", "--mixed-precision", "bf16", "--out", str(tmp_path / "bf16"),
                           "--base-model", BASE, "--clip-model", CLIP], capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    losses = [float(line.split(",")[1]) for line in (tmp_path / "bf16/train_log.csv").read_text().splitlines()[1:]]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert all(v.dtype == torch.float32 for v in weights(tmp_path / "bf16/b.safetensors").values())


def test_accumulation_checkpointing_validation_and_unet_init(tmp_path, clean_images, pipeline):
    pairs = read_pairs(targets=clean_images, degrade="blur")
    result = train_plugin(options(tmp_path / "out", pairs, max_steps=2, grad_accum=2, gradient_checkpointing=True, scb_init="unet",
                                  validate_every=1, validation_images=[clean_images / "c0.png"], validation_steps=2), log=lambda line: None)
    assert len(result.losses) == 2
    for step in (1, 2):
        assert Image.open(tmp_path / f"out/validation/step-{step}/c0.png").size == (64, 64)
    unet_block = pipeline.base.unet.down_blocks[0].resnets[0].conv1.weight
    untouched = build_plugin_models(pipeline.base.unet, pipeline.base.clip_vision, "unet")[1]
    assert torch.equal(untouched.down_blocks[0].resnets[0].conv1.weight, unet_block)
    assert not torch.equal(weights(result.plugin)["scb.down_blocks.0.resnets.0.conv1.weight"], torch.zeros_like(unet_block))
