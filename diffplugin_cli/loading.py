"""Load the frozen models every plugin shares, once per process, and pick device and dtype."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import DiffPluginError, ModelNotFoundError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OFFLOAD_MODES = ("model", "sequential")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cuda", "mps", "cpu") and not name.startswith("cuda:"):
        raise DiffPluginError(f"--device {name!r}: expected auto, cuda, cuda:N, mps or cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DiffPluginError(f"--device {name}: CUDA is not available on this machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise DiffPluginError("--device mps: MPS is not available on this machine")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is fp16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise DiffPluginError(f"--dtype {name!r}: expected auto, fp32, fp16 or bf16")
    return DTYPES[name]


@dataclass
class BaseModels:
    """The frozen base model parts the Diff-Plugin procedure uses, plus the image encoder."""

    vae: object
    unet: object
    clip_vision: object
    clip_processor: object
    scheduler_config: dict
    base_model: str
    clip_model: str
    device: torch.device
    dtype: torch.dtype
    # accelerate's hooks when models are offloaded per model ("model" mode), by attribute name
    offload_hooks: dict = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_base_models(
    base_model: str, clip_model: str, device: torch.device, dtype: torch.dtype, base_revision: str | None = None, clip_revision: str | None = None,
    offload: str | None = None,
) -> BaseModels:
    """Load VAE, UNet and scheduler config from `base_model` and CLIP vision from `clip_model`.

    Each may be a hub id (taken from the Hugging Face cache when offline, at the pinned revision
    if given) or a local folder. `offload` keeps the weights in CPU memory and moves them to
    `device` when used: per model ("model") or per layer ("sequential", least memory, slowest).
    """
    if offload not in (None, *OFFLOAD_MODES):
        raise DiffPluginError(f"--offload {offload!r}: expected model or sequential")
    pin = {"revision": base_revision} if base_revision else {}
    clip_pin = {"revision": clip_revision} if clip_revision else {}
    from diffusers import AutoencoderKL, UNet2DConditionModel, UniPCMultistepScheduler
    from transformers import CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vae = load_component(AutoencoderKL, base_model, "--base-model", subfolder="vae", torch_dtype=dtype, **pin)
    unet = load_component(UNet2DConditionModel, base_model, "--base-model", subfolder="unet", torch_dtype=dtype, **pin)
    scheduler_config = load_component(UniPCMultistepScheduler, base_model, "--base-model", subfolder="scheduler", **pin).config
    clip_vision = load_component(CLIPVisionModel, clip_model, "--clip-model", dtype=dtype, **clip_pin)
    for model in (vae, unet, clip_vision):
        model.to("cpu" if offload else device).eval().requires_grad_(False)
    base = BaseModels(
        vae=vae,
        unet=unet,
        clip_vision=clip_vision,
        # The PIL backend is the one the authors' outputs were produced with.
        clip_processor=CLIPImageProcessorPil(),
        scheduler_config=dict(scheduler_config),
        base_model=base_model,
        clip_model=clip_model,
        device=device,
        dtype=dtype,
    )
    if offload:
        apply_offload(base, offload)
    return base


def apply_offload(base: BaseModels, mode: str) -> None:
    """accelerate's CPU offloading, as diffusers' enable_model_cpu_offload / enable_sequential_cpu_offload.

    "model": CLIP -> VAE -> UNet, each moved to the device when called and back when the next
    one is; the pipeline sends the UNet back before decoding. "sequential": every layer's weights
    move to the device only for its own forward.
    """
    from accelerate import cpu_offload, cpu_offload_with_hook

    if mode == "sequential":
        for model in (base.clip_vision, base.vae, base.unet):
            cpu_offload(model, base.device, offload_buffers=len(model._parameters) > 0)
        return
    hook = None
    for name in ("clip_vision", "vae", "unet"):
        _, hook = cpu_offload_with_hook(getattr(base, name), base.device, prev_module_hook=hook)
        base.offload_hooks[name] = hook


def speed_up(base: BaseModels, compile_unet: bool = False, channels_last: bool = False) -> None:
    """Opt-in speed-ups. channels-last memory format for the UNet and VAE convolutions (helps on
    recent NVIDIA GPUs); torch.compile of the UNet, which does the bulk of the work, with dynamic
    shapes so that new image sizes and batch sizes do not each compile again."""
    if channels_last:
        for model in (base.unet, base.vae):
            model.to(memory_format=torch.channels_last)
    if compile_unet:
        base.unet.compile(dynamic=True)


def load_component(cls, source: str, flag: str, subfolder: str | None = None, **kwargs):
    """`cls.from_pretrained` with one clear error naming `flag` when the model cannot be had."""
    if subfolder:
        kwargs["subfolder"] = subfolder
    where = f"{source}/{subfolder}" if subfolder else source
    local = Path(where)
    if Path(source).exists():
        if not local.is_dir():
            raise ModelNotFoundError(f"{where}: folder missing; {flag} must point at a diffusers-layout model folder")
        if issubclass(cls, torch.nn.Module) and not any(local.glob("*.safetensors")):
            # Older checkpoints ship only .bin files (still read with weights_only=True).
            kwargs["use_safetensors"] = False
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        hint = (
            "the hub is offline (HF_HUB_OFFLINE) and it is not in the local cache"
            if offline and not Path(source).exists()
            else str(exc).splitlines()[0]
        )
        raise ModelNotFoundError(f"cannot load {where}: {hint}; pass {flag} /path/to/local/copy") from None
