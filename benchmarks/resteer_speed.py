"""Time Attention Re-steering steps on SD 1.5- and SDXL-shaped UNets with random weights.

One step = UNet forward with the cross-attention probes active, the L2 loss, backward, clipping
off, AdamW update: exactly what `resteer` does per step (text encoding and VAE work excluded,
they happen once). Full real shapes on a GPU; on CPU the same architectures at tiny widths
(--tiny, the default there), because a full SD UNet step takes minutes on two cores.

    python benchmarks/resteer_speed.py                       # CPU: tiny shapes
    python benchmarks/resteer_speed.py --device cuda --dtype bf16 --train xattn lora unet

Prints one Markdown table row per (shape, train mode) and writes all results as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from forget_me_not.attention import install_probes
from forget_me_not.concepts import TokenMask
from forget_me_not.methods.fmn.config import FmnConfig
from forget_me_not.methods.fmn.trainable import UnetTrainable

SD15 = dict(
    sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SDXL = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# Same block structure, tiny widths and latents: runs in a fraction of a second per step.
TINY = {
    "sd15": dict(SD15, sample_size=16, block_out_channels=(32, 32, 64, 64), cross_attention_dim=64,
                 attention_head_dim=4, norm_num_groups=16),
    "sdxl": dict(SDXL, sample_size=16, block_out_channels=(32, 64, 64), cross_attention_dim=64,
                 attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 2, 2),
                 norm_num_groups=16, addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 32),
}
FULL = {"sd15": SD15, "sdxl": SDXL}


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def bench(shape: str, train: str, steps: int, tiny: bool, device: torch.device,
          dtype: str) -> dict:
    torch.manual_seed(0)
    config = (TINY if tiny else FULL)[shape]
    unet = UNet2DConditionModel(**config).to(device)
    unet.requires_grad_(False)
    lr = 1e-4 if train == "lora" else 2e-6  # paper-lora / paper
    cfg = FmnConfig(train=train, steps=steps, lr=lr, mixed_precision=dtype)
    trainer = UnetTrainable(unet, cfg)
    params = trainer.setup()
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    probes = install_probes(unet)

    side = config["sample_size"]
    latents = torch.randn(1, 4, side, side, device=device)
    embeds = torch.randn(1, 77, config["cross_attention_dim"], device=device)
    added = None
    if shape == "sdxl":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config[
            "addition_time_embed_dim"]
        px = side * 8
        added = {"text_embeds": torch.randn(1, pooled, device=device),
                 "time_ids": torch.tensor([[px, px, 0, 0, px, px]], device=device,
                                          dtype=torch.float32)}
    mask = TokenMask.from_positions([[5, 6]], 77)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if dtype == "bf16"
                               else torch.float16) if dtype != "no" else None)

    def step() -> float:
        probes.activate(mask)
        t = torch.randint(0, 1000, (1,), device=device)
        if autocast is not None:
            with autocast:
                unet(latents, t, encoder_hidden_states=embeds, added_cond_kwargs=added)
                loss = probes.loss()
        else:
            unet(latents, t, encoder_hidden_states=embeds, added_cond_kwargs=added)
            loss = probes.loss()
        loss.backward()
        probes.deactivate()
        optim.step()
        optim.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm-up: allocations, kernels
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    probes.remove()
    trainer.restore()
    n_params = sum(p.numel() for p in params)
    return {
        "shape": shape, "tiny": tiny, "train": train, "steps": steps, "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(), "precision": dtype,
        "trainable_params": n_params,
        "ms_per_step": 1000 * sum(times) / len(times),
        "ms_per_step_min": 1000 * min(times),
        "total_s": sum(times),
        "peak_mb": _peak_mb(device),
        "torch": torch.__version__,
    }


def row(r: dict) -> str:
    size = "tiny" if r["tiny"] else "full"
    return (f"| {r['shape']} ({size}) | {r['train']} | {r['device_name']} ({r['device']}) | "
            f"{r['precision']} | {r['ms_per_step']:.1f} | {r['total_s']:.2f} | "
            f"{r['peak_mb']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", choices=("sd15", "sdxl"), default=["sd15", "sdxl"])
    parser.add_argument("--train", nargs="+", choices=("lora", "xattn", "unet"),
                        default=["lora", "xattn", "unet"])
    parser.add_argument("--steps", type=int, default=35)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("no", "bf16", "fp16"), default=None,
                        help="autocast precision (default: bf16 on cuda, none on cpu)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", dest="tiny", action="store_true", default=None,
                      help="tiny widths (default on CPU)")
    size.add_argument("--full", dest="tiny", action="store_false", help="real shapes")
    parser.add_argument("--json", type=Path, default=Path("resteer_speed.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    tiny = device.type == "cpu" if args.tiny is None else args.tiny
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "no")
    results = []
    print("| UNet | train | device | precision | ms/step | total s (35 steps) | peak MB |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shape:
        for train in args.train:
            r = bench(shape, train, args.steps, tiny, device, dtype)
            results.append(r)
            print(row(r), flush=True)
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
