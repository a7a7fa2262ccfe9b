"""Train the ConceptWorld text-to-image model: first the VAE, then UNet + text encoder.

Resumable: every `checkpoint_every` steps the stage's weights, optimizer and step count are
written (atomically) to the run folder; running the same command again continues from there.
The final pipeline is exported with `save_pretrained` (EMA weights), ready for `from_pretrained`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from forget_me_not.errors import FmnError
from forget_me_not.world import model as world_model
from forget_me_not.world import tokenizer as world_tokenizer
from forget_me_not.world import vocab
from forget_me_not.world.data import render_pool, to_unit_range
from forget_me_not.world.train_config import (
    TrainModelConfig,
    caption_weights,
    parse_boost,
    unet_lr_at,
)


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, meta: dict | None = None) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
        str(tmp),
        metadata={k: json.dumps(v) for k, v in (meta or {}).items()},
    )
    os.replace(tmp, path)


def _save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(opt.state_dict(), tmp)
    os.replace(tmp, path)


def _load_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    if path.exists():
        opt.load_state_dict(torch.load(path, weights_only=True))


def _state(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _write_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def train_vae(cfg: TrainModelConfig, pixels: torch.Tensor, log) -> torch.nn.Module:
    """Stage 1: reconstruction (L1 + MSE) with a tiny KL term, as LDM autoencoders are trained."""
    ckpt, state_path = cfg.run_dir / "vae.safetensors", cfg.run_dir / "vae_state.json"
    vae = world_model.build_vae(cfg.model).to(cfg.device)
    state = _state(state_path)
    if ckpt.exists():
        vae.load_state_dict(load_file(str(ckpt)))
    start = state.get("step", 0)
    if start >= cfg.vae_steps:
        return vae
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    _load_optimizer(opt, cfg.run_dir / "vae_opt.pt")
    gen = torch.Generator().manual_seed(cfg.seed + start)
    bar = tqdm(range(start, cfg.vae_steps), desc="vae", initial=start, total=cfg.vae_steps)
    for step in bar:
        idx = torch.randint(0, len(pixels), (cfg.batch_size,), generator=gen)
        x = to_unit_range(pixels[idx]).to(cfg.device)
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample(generator=None)).sample
        kl = post.kl().mean()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        psnr = 10 * math.log10(4.0 / max(F.mse_loss(recon, x).item(), 1e-10))
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.1f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            _save_atomic(vae.state_dict(), ckpt)
            _save_optimizer(opt, cfg.run_dir / "vae_opt.pt")
            _write_state(state_path, {"step": step + 1, "psnr": psnr,
                                      "leave_out": list(cfg.leave_out)})
            log({"stage": "vae", "step": step + 1, "loss": loss.item(), "psnr": psnr})
    return vae


@torch.no_grad()
def encode_pool(vae, pixels: torch.Tensor, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every pool image, so the UNet stage never runs the encoder."""
    means, stds = [], []
    for i in range(0, len(pixels), 256):
        dist = vae.encode(to_unit_range(pixels[i : i + 256]).to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)  # (N, 4, h, w) each


def train_unet(
    cfg: TrainModelConfig,
    captions: list[str],
    mean: torch.Tensor,
    std: torch.Tensor,
    scaling: float,
    tokenizer,
    log,
):
    """Stage 2: UNet and text encoder learn together (epsilon prediction, EMA kept)."""
    unet = world_model.build_unet(cfg.model).to(cfg.device)
    text = world_model.build_text_encoder(cfg.model, tokenizer).to(cfg.device)
    params = list(unet.parameters()) + list(text.parameters())
    ckpt, state_path = cfg.run_dir / "unet.safetensors", cfg.run_dir / "unet_state.json"
    ema_path = cfg.run_dir / "ema.safetensors"
    state = _state(state_path)
    start = state.get("step", 0)
    if ckpt.exists():
        weights = load_file(str(ckpt))
        unet.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("unet.")})
        text.load_state_dict(
            {k[5:]: v for k, v in weights.items() if k.startswith("text.")}, strict=False
        )
    ema = {f"unet.{k}": v.detach().clone() for k, v in unet.state_dict().items()}
    ema |= {f"text.{k}": v.detach().clone() for k, v in text.state_dict().items()}
    if ema_path.exists():
        ema.update(load_file(str(ema_path)))
    if start >= cfg.unet_steps:
        return unet, text, ema
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    _load_optimizer(opt, cfg.run_dir / "unet_opt.pt")
    sched = world_model.train_scheduler(cfg.model)
    ids = tokenizer(
        captions,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    empty = tokenizer(
        "", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids[0]
    gen = torch.Generator().manual_seed(cfg.seed + 10_000 + start)
    sample_weights = caption_weights(captions, cfg.caption_boost) if cfg.caption_boost else None
    t0 = time.time()
    bar = tqdm(range(start, cfg.unet_steps), desc="unet", initial=start, total=cfg.unet_steps)
    for step in bar:
        if sample_weights is None:
            idx = torch.randint(0, len(captions), (cfg.batch_size,), generator=gen)
        else:
            idx = torch.multinomial(sample_weights, cfg.batch_size, replacement=True, generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        batch_ids = ids[idx].clone()
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.cond_drop
        batch_ids[drop] = empty
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        noisy = sched.add_noise(latents, noise, t)
        hidden = text(batch_ids.to(cfg.device))[0]  # (B, T, D)
        pred = unet(noisy.to(cfg.device), t.to(cfg.device), hidden).sample
        loss = F.mse_loss(pred, noise.to(cfg.device))
        for g in opt.param_groups:
            g["lr"] = unet_lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for prefix, module in (("unet.", unet), ("text.", text)):
                for k, v in module.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[prefix + k].mul_(decay).add_(v.cpu(), alpha=1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        out_of_time = cfg.max_minutes is not None and (time.time() - t0) > cfg.max_minutes * 60
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.unet_steps or out_of_time:
            weights = {f"unet.{k}": v for k, v in unet.state_dict().items()}
            weights |= {f"text.{k}": v for k, v in text.state_dict().items()}
            _save_atomic(weights, ckpt)
            _save_atomic(ema, ema_path)
            _save_optimizer(opt, cfg.run_dir / "unet_opt.pt")
            _write_state(state_path, {"step": step + 1, "loss": loss.item()})
            log(
                {
                    "stage": "unet",
                    "step": step + 1,
                    "loss": loss.item(),
                    "minutes": (time.time() - t0) / 60,
                }
            )
        if out_of_time:
            break
    return unet, text, ema


def export_pipeline(
    cfg: TrainModelConfig,
    vae,
    unet,
    text,
    ema: dict,
    tokenizer,
    scaling: float,
    out: Path,
    extra: dict,
) -> Path:
    """Write the EMA weights as a `StableDiffusionPipeline` folder (atomically replaced)."""
    from diffusers import StableDiffusionPipeline

    unet.load_state_dict({k[5:]: v for k, v in ema.items() if k.startswith("unet.")})
    text.load_state_dict({k[5:]: v for k, v in ema.items() if k.startswith("text.")}, strict=False)
    vae.register_to_config(scaling_factor=scaling)
    pipe = StableDiffusionPipeline(
        vae=vae.cpu(),
        text_encoder=text.cpu(),
        tokenizer=tokenizer,
        unet=unet.cpu(),
        scheduler=world_model.sample_scheduler(cfg.model),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp)
    marker = {
        "family": "embedded",
        "world": "conceptworld",
        "image_size": vocab.IMAGE_SIZE,
        "default_steps": 25,
        "default_guidance": 7.5,
        "model": world_model.config_dict(cfg.model),
    } | extra
    (tmp / "conceptworld.json").write_text(json.dumps(marker, indent=1))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _cached_pool(cfg: TrainModelConfig) -> tuple[list[str], torch.Tensor]:
    """The rendered pool, cached in the run folder so a resumed run skips re-rendering."""
    without = "".join(f"-without-{w}" for w in cfg.leave_out)
    path = cfg.run_dir / f"pool-{cfg.seed}-{cfg.pool_size}{without}.safetensors"
    if path.exists():
        data = load_file(str(path))
        return json.loads(bytes(data["captions"].tolist()).decode()), data["pixels"]
    captions, pixels = render_pool(cfg.pool_size, cfg.seed, leave_out=frozenset(cfg.leave_out))
    blob = torch.tensor(list(json.dumps(captions).encode()), dtype=torch.uint8)
    _save_atomic({"captions": blob, "pixels": pixels}, path)
    return captions, pixels


def check_resume(cfg: TrainModelConfig) -> None:
    """Refuse to train the VAE further once the UNet has learnt its latents, or to go on with
    other concepts left out than the run began with."""
    began = _state(cfg.run_dir / "vae_state.json").get("leave_out", [])
    if _state(cfg.run_dir / "vae_state.json") and list(cfg.leave_out) != began:
        flags = " ".join(f"--leave-out {w}" for w in began) or "no --leave-out"
        raise FmnError(f"{cfg.run_dir} was begun with {flags}; pass the same to resume, or "
                       "train in a new --run-dir")
    vae_done = _state(cfg.run_dir / "vae_state.json").get("step", 0)
    unet_done = _state(cfg.run_dir / "unet_state.json").get("step", 0)
    if unet_done > 0 and vae_done < cfg.vae_steps:
        raise FmnError(
            f"{cfg.run_dir} holds a UNet trained for {unet_done} steps on the VAE of step "
            f"{vae_done}; training the VAE further would change its latents: pass "
            f"--vae-steps {vae_done} to resume"
        )


def train_model(cfg: TrainModelConfig) -> Path:
    torch.manual_seed(cfg.seed)
    check_resume(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = cfg.run_dir / "log.jsonl"

    def log(row: dict) -> None:
        with log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    tok_dir = cfg.run_dir / "tokenizer-src"
    if not (tok_dir / "vocab.json").exists():
        # Built once per run: the BPE trainer breaks ties between equally frequent pairs in no
        # fixed order, so a rebuilt vocabulary can swap token ids under a trained text encoder.
        world_tokenizer.build_tokenizer_files(tok_dir)
    tokenizer = world_tokenizer.load_tokenizer(tok_dir)
    captions, pixels = _cached_pool(cfg)
    started = time.time()
    vae = train_vae(cfg, pixels, log)
    vae.eval().requires_grad_(False)
    mean, std = encode_pool(vae, pixels, cfg.device)
    scaling = float(1.0 / mean.std())
    unet, text, ema = train_unet(cfg, captions, mean, std, scaling, tokenizer, log)
    out = cfg.export_dir or cfg.run_dir / "pipeline"
    extra = {
        "seed": cfg.seed,
        "train": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in asdict(cfg).items()
            if k != "model"
        },
        "unet_steps_done": _state(cfg.run_dir / "unet_state.json").get("step"),
        "vae_psnr": _state(cfg.run_dir / "vae_state.json").get("psnr"),
        "minutes_this_run": (time.time() - started) / 60,
    }
    return export_pipeline(cfg, vae, unet, text, ema, tokenizer, scaling, out, extra)


def export_from_checkpoints(
    cfg: TrainModelConfig, out: Path, pool_subset: int | None = None, raw: bool = False
) -> Path:
    """Export the latest checkpoints of a run (possibly still training) as a pipeline.

    The latent scaling is recomputed over the whole pool, exactly as training did; a
    `pool_subset` estimates it from fewer images (a quick look, not a release).
    """
    tokenizer = world_tokenizer.load_tokenizer(cfg.run_dir / "tokenizer-src")
    vae = world_model.build_vae(cfg.model)
    vae.load_state_dict(load_file(str(cfg.run_dir / "vae.safetensors")))
    vae.eval().requires_grad_(False)
    captions, pixels = _cached_pool(cfg)
    mean, _ = encode_pool(vae, pixels[:pool_subset], cfg.device)
    unet = world_model.build_unet(cfg.model)
    text = world_model.build_text_encoder(cfg.model, tokenizer)
    # raw: the latest trained weights instead of their moving average (better when training
    # stopped while the model was still improving quickly, as the EMA lags behind it)
    ema = load_file(str(cfg.run_dir / ("unet.safetensors" if raw else "ema.safetensors")))
    state = _state(cfg.run_dir / "unet_state.json")
    extra = {
        "seed": cfg.seed,
        "unet_steps_done": state.get("step"),
        "weights": "raw" if raw else "ema",
        "vae_psnr": _state(cfg.run_dir / "vae_state.json").get("psnr"),
    }
    return export_pipeline(
        cfg, vae, unet, text, ema, tokenizer, float(1.0 / mean.std()), out, extra
    )


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run-dir", type=Path, default=Path("runs/world-model"))
    p.add_argument("--export-dir", type=Path, default=None)
    p.add_argument("--unet-steps", type=int, default=8000)
    p.add_argument("--vae-steps", type=int, default=500)
    p.add_argument("--cooldown-steps", type=int, default=1500, help="decay the lr over the last N")
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--export-only", type=Path, default=None, help="export checkpoints here")
    p.add_argument("--pool-subset", type=int, default=None, help="estimate scaling from fewer")
    p.add_argument("--raw", action="store_true", help="export the raw weights, not the EMA")
    p.add_argument("--boost", action="append", default=[], help="WORD=W caption sampling weight")
    p.add_argument("--leave-out", action="append", default=[], help="a concept never shown")
    a = p.parse_args()
    if a.export_only:
        cfg = TrainModelConfig(run_dir=a.run_dir, seed=a.seed)
        print(export_from_checkpoints(cfg, a.export_only, a.pool_subset, a.raw))
        raise SystemExit(0)
    print(
        train_model(
            TrainModelConfig(
                run_dir=a.run_dir,
                export_dir=a.export_dir,
                unet_steps=a.unet_steps,
                vae_steps=a.vae_steps,
                max_minutes=a.max_minutes,
                ema_decay=a.ema_decay,
                cooldown_steps=a.cooldown_steps,
                unet_lr=a.unet_lr,
                device=a.device,
                seed=a.seed,
                caption_boost=parse_boost(a.boost),
                leave_out=tuple(a.leave_out),
            )
        )
    )
