"""Training benchmark: seconds per Task-Plugin training step and peak memory at full SD-1.x size
(random weights), batch 1, for fp32 / bf16 with and without gradient checkpointing. Not a test.

    python bench/bench_training.py [--resolution 512] [--steps 2]

Each configuration runs in its own process, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def measure(precision: str, checkpointing: bool, resolution: int, steps: int) -> dict:
    import torch
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_inference import full_size_base

    from diffplugin_cli.training import build_plugin_models, plugin_loss

    accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision, cpu=True)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    base = full_size_base(torch.device("cpu"), dtype)
    tpb, scb = build_plugin_models(base.unet, base.clip_vision)
    if checkpointing:
        scb.enable_gradient_checkpointing()
        base.unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW([*tpb.parameters(), *scb.parameters()], lr=1e-5)
    tpb, scb, optimizer = accelerator.prepare(tpb, scb, optimizer)
    scheduler = DDPMScheduler.from_config(base.scheduler_config)
    mean = torch.tensor(base.clip_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(base.clip_processor.image_std).view(1, 3, 1, 1)
    generator = torch.Generator().manual_seed(0)
    batch = {"input": torch.rand(1, 3, resolution, resolution, generator=generator) * 2 - 1,
             "target": torch.rand(1, 3, resolution, resolution, generator=generator) * 2 - 1, "sample_seeds": torch.tensor([1])}

    def step() -> None:
        with accelerator.autocast():
            loss = plugin_loss(base, tpb, scb, batch, scheduler, mean, std, dtype)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return {"precision": precision, "gradient_checkpointing": checkpointing, "resolution": resolution, "batch": 1,
            "seconds_per_step": round((time.perf_counter() - start) / steps, 2),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--one", nargs=2, metavar=("PRECISION", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1] == "1", args.resolution, args.steps)))
        return
    print(f"{'precision':>9} {'checkpointing':>13} {'s/step':>8} {'peak RSS GiB':>12}")
    for precision, checkpointing in CONFIGS:
        done = subprocess.run([sys.executable, __file__, "--resolution", str(args.resolution), "--steps", str(args.steps),
                               "--one", precision, "1" if checkpointing else "0"], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{precision:>9} {str(checkpointing):>13} failed: {done.stderr.strip().splitlines()[-1]}")
            continue
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{precision:>9} {str(checkpointing):>13} {figures['seconds_per_step']:8.2f} {figures['peak_rss_gib']:12.2f}", flush=True)


if __name__ == "__main__":
    main()
