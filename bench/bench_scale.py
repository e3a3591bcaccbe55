"""Batch-run benchmark, side by side with the authors' procedure. Prints figures; not a test.

    python bench/bench_scale.py [--images 2] [--batch-images 4] [--steps 20] [--configs ...]

Full-size SD 1.x and CLIP ViT-L/14 shapes with random weights, saved once as model folders under
--work (about 5 GB) and loaded from disk by every configuration, as real weights would be. Each
configuration runs in processes of its own on the same images:

  authors      the authors' procedure: one process per image that loads the models, restores the
               image in fp32 with batch 1 and exits (bench_scale.py --authors-one)
  fp32         `diffplugin run` over all images, models loaded once, fp32, batch 1
  bf16         the same in bf16
  fp32-batch4  fp32 with --batch-size 4 (over --batch-images images)
  channels-last, compile   optional: fp32 with --channels-last / --compile

Seconds per image are wall time over the whole command, model loading and start-up included;
peak RSS is the largest the process reached (the run's sidecars, or the authors' process itself).
RSS counts the weights, which safetensors maps from disk: those pages are file-backed and clean,
so the kernel can drop and re-read them. The anon and file columns split it, each the largest
value seen by sampling /proc/PID/status every 0.2 s (Linux only; short peaks can fall between
samples): anon is the memory the run itself allocated and needs in RAM.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIGS = ("authors", "fp32", "bf16", "fp32-batch4")
RUN_FLAGS = {
    "fp32": ["--dtype", "fp32"],
    "bf16": ["--dtype", "bf16"],
    "fp32-batch4": ["--dtype", "fp32", "--batch-size", "4"],
    "channels-last": ["--dtype", "fp32", "--channels-last"],
    "compile": ["--dtype", "fp32", "--compile"],
}


def prepare(work: Path, images: int) -> dict[str, Path]:
    """Model folders, the plugin file and input photos, made once and reused."""
    paths = {"base": work / "sd15-shapes", "clip": work / "clip-l-shapes", "plugins": work / "plugins", "inputs": work / "inputs"}
    if not (paths["base"] / "unet/config.json").is_file() or not (paths["clip"] / "config.json").is_file():
        import torch
        from diffusers import UniPCMultistepScheduler

        sys.path.insert(0, str(HERE))
        from bench_inference import full_size_base, full_size_plugin

        from diffplugin_cli.plugins import PluginWeights, write_plugin

        base = full_size_base(torch.device("cpu"), torch.float32)
        base.unet.save_pretrained(paths["base"] / "unet")
        base.vae.save_pretrained(paths["base"] / "vae")
        UniPCMultistepScheduler(**base.scheduler_config).save_pretrained(paths["base"] / "scheduler")
        base.clip_vision.save_pretrained(paths["clip"])
        plugin = full_size_plugin()
        write_plugin(PluginWeights.from_models(plugin.tpb, plugin.scb, {"name": "bench", "init": "input"}), paths["plugins"] / "bench.safetensors")
    paths["inputs"].mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        target = paths["inputs"] / f"photo{i:02d}.png"
        if not target.is_file():
            gradient = np.linspace(0, 255, 640)[None, :, None] * np.ones((480, 1, 3))
            Image.fromarray(np.clip(gradient + rng.normal(0, 25, (480, 640, 3)), 0, 255).astype(np.uint8)).save(target)
    return paths


def run_ours(paths: dict[str, Path], config: str, images: list[Path], steps: int, resolution: int, out: Path) -> dict:
    command = [sys.executable, "-m", "diffplugin_cli", "run", *map(str, images), "-o", str(out), "--task", "bench", "--plugin-dir", str(paths["plugins"]),
               "--base-model", str(paths["base"]), "--clip-model", str(paths["clip"]), "--device", "cpu", "--steps", str(steps),
               "--resolution", str(resolution), "--overwrite", "--quiet", "--json", *RUN_FLAGS[config]]
    start = time.perf_counter()
    done, split = run_sampled(command)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{config}: diffplugin run failed:\n{done.stderr[-2000:]}")
    sidecars = [json.loads(p.read_text()) for p in out.glob("*.json") if p.name != "diffplugin-run.json"]
    rss = max(s["peak_memory_mib"]["rss"] for s in sidecars) / 1024
    restore = sum(s["seconds"] for s in sidecars) / len(sidecars)
    return {"images": len(images), "s_per_image": wall / len(images), "restore_s_per_image": restore, "peak_rss_gib": rss, **split}


def run_authors(paths: dict[str, Path], images: list[Path], steps: int, resolution: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    walls, rss, splits = [], [], []
    for image in images:
        command = [sys.executable, __file__, "--authors-one", str(image), str(out / image.name), "--steps", str(steps), "--resolution", str(resolution), "--work", str(paths["base"].parent)]
        start = time.perf_counter()
        done, split = run_sampled(command)
        walls.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"authors: failed:\n{done.stderr[-2000:]}")
        rss.append(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_gib"])
        splits.append(split)
    return {"images": len(images), "s_per_image": sum(walls) / len(walls), "restore_s_per_image": None, "peak_rss_gib": max(rss),
            **{key: max(split[key] for split in splits) for key in splits[0]}}


def run_sampled(command: list[str]) -> tuple[subprocess.CompletedProcess, dict[str, float]]:
    """Run `command` to the end, sampling its anonymous and file-backed RSS every 0.2 s."""
    peaks = {"peak_anon_gib": 0.0, "peak_file_gib": 0.0}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        while True:
            sample_rss(process.pid, peaks)
            try:
                stdout, stderr = process.communicate(timeout=0.2)  # a timed-out call loses no output
                break
            except subprocess.TimeoutExpired:
                continue
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), peaks


def sample_rss(pid: int, peaks: dict[str, float]) -> None:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:  # not Linux, or the process has just exited
        return
    fields = dict(line.split(":", 1) for line in lines if line.startswith(("RssAnon:", "RssFile:")))
    for field, key in (("RssAnon", "peak_anon_gib"), ("RssFile", "peak_file_gib")):
        if field in fields:
            peaks[key] = max(peaks[key], int(fields[field].split()[0]) / 2**20)


def authors_one(image: Path, output: Path, paths: dict[str, Path], steps: int, resolution: int) -> None:
    """The authors' infer.py shape: load everything, one image, fp32, batch 1, exit."""
    from diffplugin_cli import DiffPluginPipeline, load_plugin

    pipe = DiffPluginPipeline.from_pretrained(str(paths["base"]), str(paths["clip"]), device="cpu", dtype="fp32")
    pipe.release_idle_weights = False  # the authors' code keeps every model resident
    plugin = load_plugin(paths["plugins"] / "bench.safetensors")
    pipe([Image.open(image).convert("RGB")], [plugin], [42], steps=steps, resolution=resolution)[0].save(output)
    print(json.dumps({"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2, help="images for the batch-1 configurations")
    parser.add_argument("--batch-images", type=int, default=4, help="images for fp32-batch4")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated, from: authors, {', '.join(RUN_FLAGS)}")
    parser.add_argument("--work", type=Path, default=Path("/tmp/diffplugin-bench"), help="models, inputs and outputs (reused)")
    parser.add_argument("--authors-one", nargs=2, metavar=("IMAGE", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    paths = prepare(args.work, max(args.images, args.batch_images))
    if args.authors_one:
        authors_one(Path(args.authors_one[0]), Path(args.authors_one[1]), paths, args.steps, args.resolution)
        return
    inputs = sorted(paths["inputs"].glob("*.png"))
    results = {}
    print(f"resolution={args.resolution} steps={args.steps} images={args.images} batch_images={args.batch_images}", flush=True)
    print(f"{'config':>14} {'images':>6} {'s/image':>9} {'restore s/img':>13} {'peak RSS GiB':>12} {'anon GiB':>8} {'file GiB':>8}", flush=True)
    for config in args.configs.split(","):
        count = args.batch_images if config == "fp32-batch4" else args.images
        out = args.work / "out" / config
        shutil.rmtree(out, ignore_errors=True)  # sidecars of an earlier run would count in this one's figures
        if config == "authors":
            figures = run_authors(paths, inputs[:count], args.steps, args.resolution, out)
        else:
            figures = run_ours(paths, config, inputs[:count], args.steps, args.resolution, out)
        results[config] = figures
        restore = "-" if figures["restore_s_per_image"] is None else f"{figures['restore_s_per_image']:.1f}"
        print(f"{config:>14} {figures['images']:>6} {figures['s_per_image']:9.1f} {restore:>13} {figures['peak_rss_gib']:12.2f}"
              f" {figures['peak_anon_gib']:8.2f} {figures['peak_file_gib']:8.2f}", flush=True)
    ratios = {}
    for name, (a, b) in {"bf16_over_fp32": ("bf16", "fp32"), "batch4_over_batch1": ("fp32-batch4", "fp32"), "authors_over_fp32": ("authors", "fp32"),
                         "channels_last_over_fp32": ("channels-last", "fp32"), "compile_over_fp32": ("compile", "fp32")}.items():
        if a in results and b in results:
            ratios[name] = results[a]["s_per_image"] / results[b]["s_per_image"]
            print(f"{name}: {ratios[name]:.3f}")
    print(json.dumps({"results": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
