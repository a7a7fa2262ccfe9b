"""Train the ConceptWorld judge on rendered scenes, calibrate it, and save it as safetensors."""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from forget_me_not.world.captions import random_scene
from forget_me_not.world.data import to_unit_range
from forget_me_not.world.judge_model import HEADS, JudgeNet, labels_for
from forget_me_not.world.rejects import failed_samples, make_rejects, model_samples, world_sampler
from forget_me_not.world.render import render


@dataclass
class TrainJudgeConfig:
    run_dir: Path = Path("runs/judge")
    out: Path | None = None  # final weights (None: run_dir/judge.safetensors)
    vae_dir: Path | None = None  # a world VAE (folder or checkpoint file): adds reconstructions
    seed: int = 0
    pool_size: int = 20_000
    val_size: int = 2_000
    steps: int = 3_000
    batch_size: int = 64
    lr: float = 2e-3
    checkpoint_every: int = 500
    device: str = "cpu"
    init: Path | None = None  # start from these weights (heads they lack start fresh)
    model_dir: Path | None = None  # a world pipeline: its one-step samples join the rejects
    reject_share: float = 0.25  # of each batch: images that show none of the concepts
    # The model's own finished samples that `init`'s heads read as their caption asks: taught as
    # kept, so the reject head learns a sample's texture is not a failure (needs model_dir, init).
    kept_samples: int = 0
    kept_share: float = 0.125  # of each batch, when kept_samples > 0
    sample_steps: int = 25  # denoising steps of those samples (the benchmark's)


def _render_set(n: int, seed: int, desc: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    rng = random.Random(seed)
    imgs, labels = [], {k: [] for k in HEADS}
    for _ in tqdm(range(n), desc=desc, leave=False):
        scene = random_scene(rng)
        imgs.append(np.asarray(render(scene)))
        for k, v in labels_for(scene).items():
            labels[k].append(v)
    pixels = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()  # (n, 3, H, W)
    return pixels, {k: torch.tensor(v) for k, v in labels.items()}


@torch.no_grad()
def _vae_roundtrip(vae, x: torch.Tensor) -> torch.Tensor:
    out = []
    for i in range(0, len(x), 256):
        out.append(vae.decode(vae.encode(x[i : i + 256]).latent_dist.mean).sample.clamp(-1, 1))
    return torch.cat(out)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur, shift, noise and slight tone changes: what a generated sample differs by."""
    b = x.shape[0]
    shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
    x = torch.roll(x, shifts=shift, dims=(2, 3))
    blur = torch.rand(b, 1, 1, 1, generator=gen) < 0.4
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    x = torch.where(blur, blurred, x)
    gain = 1 + 0.06 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    bias = 0.06 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    noise = torch.randn(x.shape, generator=gen) * 0.06 * torch.rand(b, 1, 1, 1, generator=gen)
    return (x * gain + bias + noise).clamp(-1, 1)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The softmax temperature minimising validation NLL (calibration by temperature scaling)."""
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.exp().item())


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    conf, pred = probs.max(-1)
    ece = 0.0
    for lo in range(bins):
        m = (conf > lo / bins) & (conf <= (lo + 1) / bins)
        if m.any():
            ece += m.float().mean().item() * abs(
                (pred[m] == labels[m]).float().mean().item() - conf[m].mean().item()
            )
    return ece


@torch.no_grad()
def evaluate(net: JudgeNet, x: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict:
    net.eval()
    logits = {k: [] for k in HEADS}
    for i in range(0, len(x), 256):
        for k, v in net(x[i : i + 256]).items():
            logits[k].append(v)
    out = {k: torch.cat(v) for k, v in logits.items()}
    net.train()
    return out


def _load_vae(path: Path):
    """A world VAE from a pipeline's `vae` folder or from a training checkpoint file."""
    if path.is_file():
        from forget_me_not.world.model import WorldModelConfig, build_vae

        vae = build_vae(WorldModelConfig())
        vae.load_state_dict(load_file(str(path)))
        return vae.eval()
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(path).eval()


def well_drawn(net: JudgeNet, x: torch.Tensor, pairs: list) -> torch.Tensor:
    """Which samples every head reads as their caption asks: the subject (and hat) always, the
    style and colour where the caption names them. (N,) bool."""
    device = next(net.parameters()).device
    with torch.no_grad():
        parts = [net.eval().probabilities(x[i : i + 256].to(device))
                 for i in range(0, len(x), 256)]
    net.train()
    read = {k: torch.cat([p[k].cpu() for p in parts]) for k in HEADS}
    ok = []
    for i, (text, scene) in enumerate(pairs):
        want = labels_for(scene)
        words = set(text.replace(",", " ").split())
        heads = ["subject", "hat"] + (["style"] if scene.style in words else []) + (
            ["colour"] if scene.colour in words else [])
        ok.append(all(float(read[h][i, want[h]]) >= 0.9 for h in heads))
    return torch.tensor(ok, dtype=torch.bool)


def _kept_samples(cfg: TrainJudgeConfig, pipe, net: JudgeNet, n: int, seed: int
                  ) -> torch.Tensor:
    x, pairs = model_samples(pipe, n, seed, cfg.sample_steps)
    return x[well_drawn(net, x, pairs)]


def train_judge(cfg: TrainJudgeConfig) -> Path:
    torch.manual_seed(cfg.seed)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    pixels, labels = _render_set(cfg.pool_size, cfg.seed, "rendering judge pool")
    x_all = to_unit_range(pixels)
    val_px, val_labels = _render_set(cfg.val_size, cfg.seed + 1, "rendering validation")
    x_val = to_unit_range(val_px)
    x_recon = x_val_recon = None
    if cfg.vae_dir is not None:
        vae = _load_vae(cfg.vae_dir)
        x_recon = _vae_roundtrip(vae, x_all)
        x_val_recon = _vae_roundtrip(vae, x_val)
    sampler = world_sampler(str(cfg.model_dir)) if cfg.model_dir else None
    failed = failed_samples(sampler, 512, cfg.seed) if sampler is not None else None
    net = JudgeNet().to(cfg.device)
    if cfg.init is not None:
        state = load_file(str(cfg.init))
        own = net.state_dict()
        net.load_state_dict({k: v for k, v in state.items() if k in own
                             and v.shape == own[k].shape}, strict=False)
    kept = kept_val = None
    if cfg.kept_samples > 0:
        if cfg.init is None or cfg.model_dir is None:
            raise ValueError("kept samples need init (its heads pick the well-drawn samples) "
                             "and model_dir (the model that draws them)")
        # Seeds far from the benchmark's (1000+, 51000+), so no scored sample is trained on.
        kept = _kept_samples(cfg, sampler, net, cfg.kept_samples, 200_000 + cfg.seed)
        kept_val = _kept_samples(cfg, sampler, net, max(64, cfg.kept_samples // 4),
                                 300_000 + cfg.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    ckpt, state_path = cfg.run_dir / "judge-ckpt.safetensors", cfg.run_dir / "state.json"
    start = 0
    if ckpt.exists() and state_path.exists():
        net.load_state_dict(load_file(str(ckpt)))
        start = json.loads(state_path.read_text())["step"]
        for _ in range(start):
            sched.step()
    gen = torch.Generator().manual_seed(cfg.seed + start)
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), desc="judge", initial=start, total=cfg.steps)
    for step in bar:
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=gen)
        x = x_all[idx]
        if x_recon is not None:  # a third of each batch: the VAE's reconstructions
            use = torch.rand(cfg.batch_size, 1, 1, 1, generator=gen) < 0.33
            x = torch.where(use, x_recon[idx], x)
        n_bad = int(cfg.batch_size * cfg.reject_share)
        bad = make_rejects(x[:n_bad], labels["subject"][idx[:n_bad]], gen, failed)
        good = x[:0]
        if kept is not None:
            pick = torch.randint(0, len(kept), (int(cfg.batch_size * cfg.kept_share),),
                                 generator=gen)
            good = kept[pick]
        x = torch.cat([augment(x, gen), bad, good]).to(cfg.device)
        logits = net(x)
        valid = {k: labels[k][idx].to(cfg.device) for k in HEADS if k != "reject"}
        # A reject image has no subject, style or colour: only the reject head learns from it;
        # a kept sample's labels are its caption's, which need not name them all: likewise.
        loss = sum(F.cross_entropy(logits[k][: cfg.batch_size], v) for k, v in valid.items())
        is_bad = torch.cat([torch.zeros(cfg.batch_size), torch.ones(n_bad),
                            torch.zeros(len(good))]).long()
        loss = loss + F.cross_entropy(logits["reject"], is_bad.to(cfg.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg.checkpoint_every == 0:
            tmp = ckpt.with_suffix(".tmp")
            save_file(net.state_dict(), str(tmp))
            os.replace(tmp, ckpt)
            state_path.write_text(json.dumps({"step": step + 1}))
    # Calibrate on renders and reconstructions together, then report accuracy on each.
    cal_x = x_val if x_val_recon is None else torch.cat([x_val, x_val_recon])
    cal_labels = {k: v if x_val_recon is None else torch.cat([v, v]) for k, v in val_labels.items()}
    logits = evaluate(net, cal_x, cal_labels)
    gen_val = torch.Generator().manual_seed(cfg.seed + 7)
    bad_val = make_rejects(x_val, val_labels["subject"], gen_val, failed)
    said = evaluate(net, bad_val, val_labels)["reject"]
    # The reject head is calibrated on both kinds: on valid images alone its labels are all "no".
    logits["reject"] = torch.cat([logits["reject"], said])
    cal_labels["reject"] = torch.cat([cal_labels["reject"], torch.ones(len(said)).long()])
    temps = [fit_temperature(logits[k], cal_labels[k]) for k in HEADS]
    net.temperature.copy_(torch.tensor(temps))
    metrics: dict = {"minutes": (time.time() - t0) / 60, "steps": cfg.steps}
    for name, xs in (("renders", x_val), ("vae_reconstructions", x_val_recon)):
        if xs is None:
            continue
        lg = evaluate(net, xs, val_labels)
        metrics[name] = {
            k: float((lg[k].argmax(-1) == val_labels[k]).float().mean()) for k in HEADS
        }
    metrics["rejects_recognised"] = float((said.argmax(-1) == 1).float().mean())
    if kept_val is not None:
        lg = evaluate(net, kept_val, {})["reject"]
        metrics["model_samples_kept"] = float((lg.argmax(-1) == 0).float().mean())
        metrics["kept_samples"] = {"train": len(kept), "held_out": len(kept_val)}
    metrics["ece"] = {
        k: expected_calibration_error(torch.softmax(logits[k] / temps[i], -1), cal_labels[k])
        for i, k in enumerate(HEADS)
    }
    metrics["temperature"] = dict(zip(HEADS, temps, strict=True))
    out = cfg.out or cfg.run_dir / "judge.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()},
        str(tmp),
        metadata={
            "metrics": json.dumps(metrics),
            "seed": str(cfg.seed),
            "heads": json.dumps(HEADS),
        },
    )
    os.replace(tmp, out)
    (cfg.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return out


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run-dir", type=Path, default=Path("runs/judge"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--vae-dir", type=Path, default=None)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(
        train_judge(
            TrainJudgeConfig(
                run_dir=a.run_dir, out=a.out, vae_dir=a.vae_dir, steps=a.steps, seed=a.seed
            )
        )
    )
