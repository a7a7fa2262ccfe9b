"""Tiny random-weight SD 1.x / 2.x / SDXL pipelines, built locally for tests (no downloads).

Shapes follow the real families (cross-attention layers named `attn2`, SD2's linear projections
and v-prediction, SDXL's two text encoders and "text_time" added conditioning) at a size that
runs a denoising step in milliseconds: 8x8 latents, 16 px images (VAE scale factor 2).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

FAMILIES = ("sd1", "sd2", "sdxl")

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77

# Words that become single tokens; anything else falls back to letters.
WORDS = (
    "a an the of in on with and photo portrait picture painting style drawing image by "
    "dog cat car tree house man woman person face nude naked "
    "van gogh monet picasso church parachute "
    "circle square triangle star heart cross moon arrow skull gun "
    "solid striped dotted checkered outlined "
    "red green blue yellow purple cyan "
    "zorbo milka tavi quenna brell wizard hat"
).split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SYMBOLS = "0123456789.,!?'\"-:;()<>_/*&+#@"


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE over `words` (each counted once) until every word is one symbol.

    Encoding a training word with merges applied in learned order reproduces the training
    segmentation, so each word ends up as exactly one token.
    """
    segs = [[*w[:-1], w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seg in segs:
            for pair in zip(seg, seg[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = max(counts, key=lambda p: (counts[p], p))  # ties broken deterministically
        merges.append(best)
        for i, seg in enumerate(segs):
            out, j = [], 0
            while j < len(seg):
                if j + 1 < len(seg) and (seg[j], seg[j + 1]) == best:
                    out.append(seg[j] + seg[j + 1])
                    j += 2
                else:
                    out.append(seg[j])
                    j += 1
            segs[i] = out


@cache
def _tokenizer_files() -> tuple[dict[str, int], tuple[str, ...]]:
    merges = _learn_merges(sorted(set(WORDS)))
    tokens = [BOS, EOS]
    for ch in LETTERS + SYMBOLS:
        tokens += [ch, ch + "</w>"]
    for a, b in merges:
        tokens.append(a + b)
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab, tuple(f"{a} {b}" for a, b in merges)


def write_tokenizer(folder: str | Path) -> Path:
    """Write vocab.json + merges.txt for the tiny CLIP tokenizer into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _tokenizer_files()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    return folder


def make_tokenizer() -> CLIPTokenizer:
    vocab, merges = _tokenizer_files()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m.split(" ")) for m in merges],
        model_max_length=MAX_LENGTH,
    )


def _text_config(tokenizer: CLIPTokenizer, hidden: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        layer_norm_eps=1e-5,
        **extra,
    )


def _vae() -> AutoencoderKL:
    # Two levels -> scale factor 2: 8x8 latents decode to 16x16 images.
    return AutoencoderKL(
        block_out_channels=(32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    )


_UNET_COMMON = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    sample_size=8,
    in_channels=4,
    out_channels=4,
    norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


def _sd1(seed: int) -> StableDiffusionPipeline:
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_UNET_COMMON, cross_attention_dim=32, attention_head_dim=4)
    vae = _vae()
    text_encoder = CLIPTextModel(_text_config(tokenizer, 32, hidden_act="quick_gelu"))
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sd2(seed: int) -> StableDiffusionPipeline:
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **_UNET_COMMON,
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
    )
    vae = _vae()
    # SD2 uses an OpenCLIP text tower (gelu) read at its penultimate layer.
    text_encoder = CLIPTextModel(_text_config(tokenizer, 64, hidden_act="gelu"))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="v_prediction",
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl(seed: int) -> StableDiffusionXLPipeline:
    tokenizer, tokenizer_2 = make_tokenizer(), make_tokenizer()
    torch.manual_seed(seed)
    time_dim, pooled_dim = 8, 32
    unet = UNet2DConditionModel(
        **_UNET_COMMON,
        cross_attention_dim=96,  # 32 (encoder 1) + 64 (encoder 2), concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # 6 size/crop numbers, each embedded to time_dim, plus encoder 2's pooled projection.
        projection_class_embeddings_input_dim=6 * time_dim + pooled_dim,
    )
    vae = _vae()
    text_encoder = CLIPTextModel(_text_config(tokenizer, 32, hidden_act="quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(
        # A width unlike encoder 1's, as in real SDXL (single-file loading tells them apart by it).
        _text_config(tokenizer_2, 64, hidden_act="gelu", projection_dim=pooled_dim)
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


_BUILDERS = {"sd1": _sd1, "sd2": _sd2, "sdxl": _sdxl}


def make_tiny_pipeline(family: str, seed: int = 0):
    """A tiny random-weight pipeline of `family` ("sd1", "sd2" or "sdxl") on CPU, float32."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    pipe = _BUILDERS[family](seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def unet_probe(pipe) -> torch.Tensor:
    """The UNet's output on one fixed (latent, timestep, text states) input of an SD 1.x/2.x
    tiny pipeline: equal outputs mean equal weights for what the tests compare."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ehs = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([300]), encoder_hidden_states=ehs).sample


def fmn_config(**kw):
    """An FMN config for 2-step tests: a LoRA at the paper-lora step unless told otherwise;
    train="tokens" gives the token_rows method's config."""
    from forget_me_not.methods.fmn.config import FmnConfig
    from forget_me_not.methods.token_rows.config import TokenRowsConfig

    if kw.get("train") == "tokens":
        kw.pop("train")
        for key in ("lora_rank", "lora_alpha", "lora_targets", "text_keep_weight"):
            kw.pop(key, None)
        return TokenRowsConfig(**{k: v for k, v in kw.items() if v is not None})
    base = {"train": "lora", "lr": 1e-4 if kw.get("train", "lora") == "lora" else 2e-6}
    return FmnConfig(**{**base, **{k: v for k, v in kw.items() if v is not None}})


def train_any(pipe, concepts, config=None, progress=False):
    """The method a config belongs to, trained (tests call methods directly)."""
    from forget_me_not.methods.token_rows.config import TokenRowsConfig

    config = config if config is not None else fmn_config()
    if isinstance(config, TokenRowsConfig):
        from forget_me_not.methods.token_rows.train import train
    else:
        from forget_me_not.methods.fmn.train import train
    return train(pipe, concepts, config, progress=progress)


def two_part_recipe(folder, scale: float = 0.5, steps: int = 2):
    """A recipe file like the embedded default: an FMN LoRA at `scale` beside token rows."""
    path = folder / "two_part.yaml"
    path.write_text(
        "description: test\nparts:\n"
        f"  - method: fmn\n    scale: {scale}\n    config: {{train: lora, lr: 1.0e-2, "
        f"lora_rank: 2, steps: {steps}, reference: noise}}\n"
        "  - method: token_rows\n    config: {steps: 3, reference: noise}\n")
    return path
