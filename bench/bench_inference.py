"""Inference benchmark: prints where the time of one restored image goes. Not a test.

By default builds full-size Stable Diffusion 1.x and CLIP ViT-L/14 shapes with random weights
(the speed of real weights is the same), or uses folders given with --base-model/--clip-model.

    python bench/bench_inference.py [--steps 20] [--resolution 512] [--threads N]
    python bench/bench_inference.py --tile-memory 64    # one UNet + SCB step's activation memory

--tile-memory SIDE measures, in this fresh process, how far resident memory rises during one
UNet + SCB step on a SIDE x SIDE latent (sampled every 2 ms); tiling.py sizes tiles from it.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time

import torch
from PIL import Image


def full_size_base(device: torch.device, dtype: torch.dtype):
    """SD-1.x-shaped UNet/VAE and CLIP-L-shaped vision tower with random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from diffplugin_cli.loading import BaseModels

    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14, image_size=224))
    scheduler_config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon"}
    for model in (unet, vae, clip):
        torch.nn.Module.to(model, device, dtype).eval().requires_grad_(False)
    return BaseModels(vae, unet, clip, CLIPImageProcessorPil(), scheduler_config, "random SD-1.x shapes", "random CLIP-L shapes", device, dtype)


def full_size_plugin():
    from diffplugin_cli.models import SpatialComplementBranch, TaskPromptBranch
    from diffplugin_cli.plugins import TaskPlugin

    tpb, scb = TaskPromptBranch(clip_v_dim=1024), SpatialComplementBranch(block_out_channels=(320,), norm_num_groups=32)
    for model in (tpb, scb):
        model.eval().requires_grad_(False)
    return TaskPlugin("bench", tpb, scb, "input", "-", None, {})


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def tile_memory(side: int) -> dict:
    """Peak rise of resident memory during one UNet + SCB step (fp32, batch 1) on a side x side latent."""
    from diffplugin_cli.models import predict_noise

    base, plugin = full_size_base(torch.device("cpu"), torch.float32), full_size_plugin()
    latents, prompt, t = torch.randn(1, 4, side, side), torch.randn(1, 256, 768), torch.tensor(500)

    def resident() -> int:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()

    peak, done = [resident()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident())
            time.sleep(0.002)

    before, sampler = resident(), threading.Thread(target=sample)
    sampler.start()
    with torch.no_grad():
        predict_noise(base.unet, latents, t, prompt, plugin.scb(t, prompt, latents))
    done.set()
    sampler.join()
    rise = peak[0] - before
    return {"latent_side": side, "step_rss_rise_mib": rise / 2**20, "bytes_per_latent_position": rise / side**2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeat", type=int, default=2, help="timed repetitions of each component")
    parser.add_argument("--base-model", help="use this SD-1.x folder instead of random shapes")
    parser.add_argument("--clip-model", help="use this CLIP vision folder instead of random shapes")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--tile-memory", type=int, metavar="SIDE", help="only measure one step's activation memory on a SIDE x SIDE latent")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tile_memory:
        print(json.dumps(tile_memory(args.tile_memory)))
        return

    from diffplugin_cli.loading import DTYPES, load_base_models
    from diffplugin_cli.models import predict_noise
    from diffplugin_cli.pipeline import DiffPluginPipeline

    device, dtype = torch.device("cpu"), DTYPES[args.dtype]
    load_start = time.perf_counter()
    if args.base_model:
        base = load_base_models(args.base_model, args.clip_model, device, dtype)
    else:
        base = full_size_base(device, dtype)
    pipe = DiffPluginPipeline(base)
    plugin = full_size_plugin()
    load_seconds = time.perf_counter() - load_start

    image = Image.new("RGB", (args.resolution, args.resolution), (120, 130, 140))
    size = args.resolution
    with torch.no_grad():
        hidden = pipe.clip_hidden_states([image])
        prompt = pipe.visual_prompt(plugin, hidden)
        cond = pipe.encode_condition([image])
        t = torch.tensor(999)
        latents = torch.randn_like(cond)
        residuals = plugin.scb(t, prompt, cond)
        figures = {
            "clip_vision_s": timed(lambda: pipe.clip_hidden_states([image]), args.repeat),
            "tpb_s": timed(lambda: pipe.visual_prompt(plugin, hidden), args.repeat),
            "vae_encode_s": timed(lambda: pipe.encode_condition([image]), args.repeat),
            "scb_step_s": timed(lambda: plugin.scb(t, prompt, cond), args.repeat),
            "unet_step_s": timed(lambda: predict_noise(base.unet, latents, t, prompt, residuals), args.repeat),
            "vae_decode_s": timed(lambda: pipe.decode(latents), args.repeat),
        }
    start = time.perf_counter()
    pipe([image], [plugin], [42], steps=args.steps, resolution=size)
    end_to_end = time.perf_counter() - start
    forwards = (
        figures["clip_vision_s"] + figures["tpb_s"] + figures["vae_encode_s"] + figures["vae_decode_s"]
        + args.steps * (figures["unet_step_s"] + figures["scb_step_s"])
    )
    figures |= {
        "model_setup_s": load_seconds,
        "end_to_end_s_per_image": end_to_end,
        "sum_of_forwards_s": forwards,
        "overhead_ratio": end_to_end / forwards,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    setup = {"resolution": size, "steps": args.steps, "dtype": args.dtype, "threads": torch.get_num_threads(), "torch": torch.__version__, "models": base.base_model}
    if args.json:
        print(json.dumps(setup | {k: round(v, 4) for k, v in figures.items()}))
        return
    print(" ".join(f"{k}={v}" for k, v in setup.items()))
    for key, value in figures.items():
        print(f"{key:>24}: {value:10.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
