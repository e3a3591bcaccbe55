"""Training a new Task-Plugin (TPB + SCB) on a frozen base model, through Hugging Face accelerate.

The objective is the paper's (Eq. 3): epsilon-prediction MSE with DDPM noise on the ground
truth's latent at uniform timesteps, conditioned on the degraded input (its CLIP features feed
the TPB, its VAE latent the SCB). AdamW, constant learning rate, gradient clipping. One process,
many GPUs or many machines: `accelerate launch -m diffplugin_cli train plugin ...`; the batch
size is per process, and gradients are averaged over processes.

Every random draw (samples, crops, flips, noise, timesteps) is a function of (seed, step,
process), so `--resume` continues exactly where a run stopped.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import __version__
from .errors import DiffPluginError
from .models import SpatialComplementBranch, TaskPromptBranch, predict_noise
from .plugins import PluginWeights, TaskPlugin, write_plugin
from .training_data import Pair, check_pairs, step_batch

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainOptions:
    name: str
    out_dir: Path
    pairs: Sequence[Pair]
    base_model: str
    clip_model: str
    init: str = "input"
    degrade: str | None = None
    resolution: int = 512
    max_steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-5
    grad_accum: int = 1
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    validate_every: int = 0
    validation_images: Sequence[Path] = field(default_factory=list)
    validation_steps: int = 20
    seed: int = 0
    scb_init: str = "zero"
    max_grad_norm: float = 1.0
    resume: str | None = None


@dataclass
class TrainResult:
    plugin: Path
    steps: int
    losses: list[float]


def build_plugin_models(unet, clip_vision, scb_init: str = "zero", seed: int = 0) -> tuple[TaskPromptBranch, SpatialComplementBranch]:
    """A TPB sized for the image encoder and an SCB shaped like the UNet's first down block.

    scb_init 'zero': zero output convs, so training starts from the unchanged base model (the
    paper); 'unet': additionally copy the UNet's first down block and time embedding.
    """
    if scb_init not in ("zero", "unet"):
        raise DiffPluginError(f"--scb-init {scb_init!r}: expected zero or unet")
    torch.manual_seed(seed)
    config = unet.config
    heads = config.attention_head_dim if isinstance(config.attention_head_dim, int) else config.attention_head_dim[0]
    tpb = TaskPromptBranch(clip_v_dim=clip_vision.config.hidden_size, out_dim=config.cross_attention_dim, clip_layer=clip_vision.config.num_hidden_layers)
    scb = SpatialComplementBranch(
        in_channels=config.in_channels,
        flip_sin_to_cos=config.flip_sin_to_cos,
        freq_shift=config.freq_shift,
        down_block_types=(config.down_block_types[0],),
        block_out_channels=(config.block_out_channels[0],),
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        norm_eps=config.norm_eps,
        cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=heads,
    )
    if scb_init == "unet":
        scb.down_blocks[0].load_state_dict(unet.down_blocks[0].state_dict(), strict=False)
        scb.time_embedding.load_state_dict(unet.time_embedding.state_dict())
    return tpb, scb


def plugin_loss(base, tpb, scb, batch: dict, noise_scheduler, clip_mean: torch.Tensor, clip_std: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Eq. 3 on one batch; each sample's latent draw, noise and timestep come from its own seed."""
    device = clip_mean.device
    generators = [torch.Generator().manual_seed(int(seed)) for seed in batch["sample_seeds"]]
    degraded = batch["input"].to(device, dtype)
    clean = batch["target"].to(device, dtype)

    def per_sample(shape):
        return torch.cat([torch.randn((1, *shape), generator=g) for g in generators]).to(device, dtype)

    with torch.no_grad():
        scale = base.vae.config.scaling_factor
        posterior = base.vae.encode(clean).latent_dist
        latents = scale * (posterior.mean + posterior.std * per_sample(posterior.mean.shape[1:]))
        cond_latents = scale * base.vae.encode(degraded).latent_dist.mean
        size = base.clip_vision.config.image_size
        pixels = F.interpolate((degraded + 1) / 2, size=(size, size), mode="bilinear", align_corners=False)
        hidden = base.clip_vision(((pixels - clip_mean) / clip_std).to(dtype), output_hidden_states=True).hidden_states
    noise = per_sample(latents.shape[1:])
    timesteps = torch.cat([torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), generator=g) for g in generators]).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    # The trained branches stay in fp32 and read fp32; the frozen UNet reads its own dtype.
    prompt = tpb(tuple(h.float() for h in hidden))
    prediction = predict_noise(base.unet, noisy, timesteps, prompt, scb(timesteps, prompt, cond_latents.float()))
    return F.mse_loss(prediction.float(), noise.float())


def train_plugin(options: TrainOptions, log: Callable[[str], None] = print) -> TrainResult:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from .loading import load_base_models

    if options.init not in ("input", "noise"):
        raise DiffPluginError(f"--init-noise {options.init!r}: expected input or noise")
    problems = check_pairs(options.pairs)
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:10])
        raise DiffPluginError(f"{len(problems)} problem(s) in {len(options.pairs)} training pairs:\n{shown}" + ("\n  ..." if len(problems) > 10 else ""))

    accelerator = Accelerator(gradient_accumulation_steps=options.grad_accum, mixed_precision=options.mixed_precision)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(options.mixed_precision, torch.float32)
    base = load_base_models(options.base_model, options.clip_model, accelerator.device, weight_dtype)
    noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
    tpb, scb = build_plugin_models(base.unet, base.clip_vision, options.scb_init, options.seed)
    if options.gradient_checkpointing:
        scb.enable_gradient_checkpointing()
        base.unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW([*tpb.parameters(), *scb.parameters()], lr=options.lr)
    tpb, scb, optimizer = accelerator.prepare(tpb, scb, optimizer)
    processor = base.clip_processor
    clip_mean = torch.tensor(processor.image_mean, device=accelerator.device).view(1, 3, 1, 1)
    clip_std = torch.tensor(processor.image_std, device=accelerator.device).view(1, 3, 1, 1)

    out = Path(options.out_dir)
    start = _resume(accelerator, out, options.resume) if options.resume else 0
    log_path = out / "train_log.csv"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if start == 0:
            log_path.write_text("step,loss,lr,seconds\n")
    losses: list[float] = []
    tpb.train()
    scb.train()
    for step in range(start, options.max_steps):
        started = time.perf_counter()
        step_losses = []
        for micro in range(options.grad_accum):
            batch = step_batch(options.pairs, step * options.grad_accum + micro, options.seed, options.batch_size, options.resolution,
                               options.degrade, accelerator.process_index, accelerator.num_processes)
            with accelerator.accumulate(tpb, scb):
                with accelerator.autocast():
                    loss = plugin_loss(base, tpb, scb, batch, noise_scheduler, clip_mean, clip_std, weight_dtype)
                accelerator.backward(loss)
                if accelerator.sync_gradients and options.max_grad_norm:
                    accelerator.clip_grad_norm_([*tpb.parameters(), *scb.parameters()], options.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            step_losses.append(accelerator.gather(loss.detach().reshape(1)).mean().item())
        losses.append(sum(step_losses) / len(step_losses))
        done = step + 1
        if accelerator.is_main_process:
            with open(log_path, "a") as handle:
                csv.writer(handle).writerow([done, f"{losses[-1]:.6f}", options.lr, f"{time.perf_counter() - started:.3f}"])
            if done % 10 == 0 or done == options.max_steps:
                log(f"step {done}/{options.max_steps}: loss {losses[-1]:.4f}")
        if done % options.checkpoint_every == 0 or done == options.max_steps:
            _checkpoint(accelerator, out, done)
        if options.validate_every and done % options.validate_every == 0 and accelerator.is_main_process:
            _validate(base, accelerator.unwrap_model(tpb), accelerator.unwrap_model(scb), options, out / "validation" / f"step-{done}")
    plugin_path = out / f"{options.name}.safetensors"
    if accelerator.is_main_process:
        export_plugin(accelerator.unwrap_model(tpb), accelerator.unwrap_model(scb), plugin_path, options, options.max_steps)
    accelerator.wait_for_everyone()
    # Free the DDP wrappers while the process group is still registered, so that end_training, not
    # DDP's reducer, drops its last reference: the reducer does so holding the GIL, and gloo's
    # destructor then waits for a worker thread that needs the GIL (a 2-process run hung so at exit).
    del tpb, scb, optimizer
    accelerator.free_memory()
    accelerator.end_training()
    return TrainResult(plugin_path, options.max_steps, losses)


def export_plugin(tpb, scb, path: Path, options: TrainOptions, steps: int) -> Path:
    """Our single-file plugin with its provenance (data hash, steps, base model)."""
    listing = "".join(f"{p.input}\t{p.target}\t{p.target.stat().st_size}\n" for p in options.pairs)
    provenance = {
        "name": options.name,
        "task": options.name,
        "init": options.init,
        "source": "trained with diffplugin",
        "version": f"diffplugin {__version__}",
        "base_model": options.base_model,
        "steps": str(steps),
        "data_sha256": hashlib.sha256(listing.encode()).hexdigest(),
    }
    return write_plugin(PluginWeights.from_models(tpb, scb, provenance), path)


def _checkpoint(accelerator, out: Path, step: int) -> None:
    """Model, optimizer and RNG state (accelerate) plus the step reached."""
    folder = out / CHECKPOINTS / f"step-{step:08d}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        (folder / STATE_FILE).write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()


def _resume(accelerator, out: Path, resume: str) -> int:
    if resume == "latest":
        found = sorted((out / CHECKPOINTS).glob("step-*"))
        if not found:
            raise DiffPluginError(f"--resume latest: no checkpoint under {out / CHECKPOINTS}")
        folder = found[-1]
    else:
        folder = Path(resume)
    if not (folder / STATE_FILE).is_file():
        raise DiffPluginError(f"{folder}: not a training checkpoint (no {STATE_FILE})")
    accelerator.load_state(str(folder))
    return json.loads((folder / STATE_FILE).read_text())["step"]


def _validate(base, tpb, scb, options: TrainOptions, folder: Path) -> None:
    """Render the validation images with the real inference pipeline and the current weights."""
    from PIL import Image

    from .pipeline import DiffPluginPipeline

    folder.mkdir(parents=True, exist_ok=True)
    plugin = TaskPlugin(options.name, copy.deepcopy(tpb).eval(), copy.deepcopy(scb).eval(), options.init, "-", folder, {})
    pipeline = DiffPluginPipeline(base)
    for path in options.validation_images:
        image = Image.open(path).convert("RGB")
        output = pipeline([image], [plugin], [options.seed], steps=options.validation_steps, resolution=options.resolution)[0]
        output.save(folder / f"{Path(path).stem}.png")
