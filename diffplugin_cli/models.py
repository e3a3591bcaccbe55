"""The two branches of a Task-Plugin as diffusers-style models (config + weights).

Parameter names match the authors' checkpoints, so their state dicts load unchanged.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import get_down_block
from torch import nn


class TaskPromptBranch(ModelMixin, ConfigMixin):
    """TPB: maps CLIP-vision patch tokens to a visual prompt F^p that replaces the text prompt."""

    @register_to_config
    def __init__(self, clip_v_dim: int = 1024, num_cross_proj_layers: int = 2, out_dim: int = 768, clip_layer: int = 24):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(num_cross_proj_layers):
            layers += [nn.Linear(clip_v_dim, clip_v_dim), nn.LayerNorm(clip_v_dim), nn.LeakyReLU()]
        layers.append(nn.Linear(clip_v_dim, out_dim))
        self.visual_projection = nn.Sequential(*layers)

    def forward(self, clip_hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """`clip_hidden_states`: CLIPVisionModel(..., output_hidden_states=True).hidden_states."""
        patch_tokens = clip_hidden_states[self.config.clip_layer][:, 1:, :]
        return self.visual_projection(patch_tokens)

    @staticmethod
    def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict:
        """Recover the architecture from an authors' `tpb.pt`, which stores no config."""
        linear_ids = sorted(int(k.split(".")[1]) for k in state_dict if k.endswith("weight") and state_dict[k].ndim == 2)
        first, last = state_dict[f"visual_projection.{linear_ids[0]}.weight"], state_dict[f"visual_projection.{linear_ids[-1]}.weight"]
        return {"clip_v_dim": first.shape[1], "num_cross_proj_layers": len(linear_ids) - 1, "out_dim": last.shape[0]}


class SpatialComplementBranch(ModelMixin, ConfigMixin):
    """SCB: a ControlNet-like encoder of the input image's VAE latent.

    Unlike ControlNet it has no `conv_in`: the noisy latent is not an input, only the timestep,
    the condition latent z_c and the visual prompt F^p are.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",),
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (320,),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 768,
        attention_head_dim: int | tuple[int, ...] = 8,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
    ):
        super().__init__()
        n_blocks = len(down_block_types)
        if isinstance(only_cross_attention, bool):
            only_cross_attention = (only_cross_attention,) * n_blocks
        if isinstance(attention_head_dim, int):
            attention_head_dim = (attention_head_dim,) * n_blocks

        channels = block_out_channels[0]
        self.controlnet_cond_embedding = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1)
        time_embed_dim = channels * 4
        self.time_proj = Timesteps(channels, flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(channels, time_embed_dim, act_fn=act_fn)

        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([_zero_conv(channels)])
        output_channel = channels
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            is_final_block = i == n_blocks - 1
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    in_channels=input_channel,
                    out_channels=output_channel,
                    temb_channels=time_embed_dim,
                    add_downsample=not is_final_block,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    cross_attention_dim=cross_attention_dim,
                    # diffusers <= 0.17 (the authors') read attention_head_dim as the number of heads.
                    num_attention_heads=attention_head_dim[i],
                    attention_head_dim=output_channel // attention_head_dim[i],
                    downsample_padding=downsample_padding,
                    use_linear_projection=use_linear_projection,
                    only_cross_attention=only_cross_attention[i],
                    upcast_attention=upcast_attention,
                    resnet_time_scale_shift=resnet_time_scale_shift,
                )
            )
            skips = layers_per_block + (0 if is_final_block else 1)
            self.controlnet_down_blocks.extend(_zero_conv(output_channel) for _ in range(skips))

    def forward(self, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, cond_latent: torch.Tensor) -> list[torch.Tensor]:
        """Residuals for the UNet's first skip connections, one per `controlnet_down_blocks` conv."""
        timesteps = torch.as_tensor(timestep, device=cond_latent.device)
        timesteps = timesteps.reshape(-1).expand(cond_latent.shape[0])
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=cond_latent.dtype))

        sample = self.controlnet_cond_embedding(cond_latent)
        skips = [sample]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            skips.extend(res)
        return [conv(skip) for skip, conv in zip(skips, self.controlnet_down_blocks)]


def _zero_conv(channels: int) -> nn.Conv2d:
    """1x1 output conv initialised to zero, so an untrained SCB leaves the UNet unchanged."""
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def predict_noise(unet, latents: torch.Tensor, timestep, prompt_embeds: torch.Tensor, residuals: list[torch.Tensor]) -> torch.Tensor:
    """The UNet's epsilon with the SCB residuals added to its first skip connections.

    The remaining skips get zero, and so does the mid block: passing a mid-block residual keeps
    current diffusers on the ControlNet path (without it, it takes the residuals for T2I-Adapter ones).
    """
    zero = torch.zeros(1, device=latents.device, dtype=latents.dtype)
    skips = 1 + sum(len(block.resnets) + (1 if block.downsamplers else 0) for block in unet.down_blocks)
    padded = [r.to(latents.dtype) for r in residuals] + [zero] * (skips - len(residuals))
    return unet(latents, timestep, encoder_hidden_states=prompt_embeds.to(latents.dtype), down_block_additional_residuals=padded,
                mid_block_additional_residual=zero).sample
