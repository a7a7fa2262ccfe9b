"""The ConceptWorld text-to-image model: real diffusers parts, sized for a 2-core CPU.

Images are 32 px; the VAE halves them to 16x16x4 latents, where the UNet runs (a UNet at 32 px
in pixel space is 3-5x slower per step). Every level of the UNet has cross-attention, so
attention re-steering has the same layers to act on as in Stable Diffusion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from forget_me_not.world import vocab
from forget_me_not.world.tokenizer import MAX_LENGTH


@dataclass(frozen=True)
class WorldModelConfig:
    unet_channels: tuple[int, ...] = (32, 64)  # UNet width per level (both with cross-attn)
    unet_heads: int = 4  # attention heads in every UNet transformer block
    text_width: int = 64  # text encoder hidden size = the UNet's cross-attention dim
    text_layers: int = 2
    vae_channels: tuple[int, ...] = (32, 64)  # two levels: 32 px -> 16 px latents
    latent_channels: int = 4
    num_train_timesteps: int = 1000


def build_unet(cfg: WorldModelConfig) -> UNet2DConditionModel:
    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=vocab.IMAGE_SIZE // 2,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=cfg.text_width,
        attention_head_dim=cfg.unet_heads,
        norm_num_groups=32,
    )


def build_vae(cfg: WorldModelConfig) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=32,
        sample_size=vocab.IMAGE_SIZE,
    )


def build_text_encoder(cfg: WorldModelConfig, tokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_width,
        intermediate_size=cfg.text_width * 2,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=cfg.text_width,
    )
    return CLIPTextModel(config)


def train_scheduler(cfg: WorldModelConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        steps_offset=1,
    )


def sample_scheduler(cfg: WorldModelConfig) -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def config_dict(cfg: WorldModelConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
