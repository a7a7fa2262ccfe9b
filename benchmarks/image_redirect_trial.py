"""A trial: image-side redirect. On the concept's reference images, whatever the conditioning
(its prompts, or the empty prompt), the whole UNet is trained to predict what the base model
predicts for the same prompt with the concept swapped for another of its kind (an ID for
another ID); on the base model's own samples of every other world concept, at every timestep,
under their prompts and the empty prompt, the base model's prediction is held. The aim: the
UNet, not the word, lets go, so no learnt token finds the concept again.

Prints G, the four lowest retentions (16 samples) and textual inversion (budget 150, lr 5e-3)
with the forgetting's own references as anchors and with renders at seed 7 it never saw.

    python benchmarks/image_redirect_trial.py tavi --steps 600 --lr 2e-4 --t-min 400
"""
import argparse
import copy
import json
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from forget_me_not.attacks import AttackSettings
from forget_me_not.attacks.report import attack_all
from forget_me_not.data import model_resolution
from forget_me_not.judges.world import WorldJudge
from forget_me_not.methods.fmn.references import build_references
from forget_me_not.models import load_pipeline
from forget_me_not.pipeline_io import draw_latents, encode_plain, freeze
from forget_me_not.presets import world_concepts
from forget_me_not.world import concepts as wc
from forget_me_not.world import vocab
from forget_me_not.world.scoring import score_concepts

p = argparse.ArgumentParser()
p.add_argument("target")
p.add_argument("--steps", type=int, default=300)
p.add_argument("--lr", type=float, default=1e-4)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--keep-weight", type=float, default=1.0)
p.add_argument("--n", type=int, default=16)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--empty", type=float, default=1.0,
               help="weight of the empty prompt among the forget rows' conditionings "
               "(the concept's prompts weigh 1)")
p.add_argument("--others", type=float, default=0.0,
               help="weight of other world prompts (target: the base model's own)")
p.add_argument("--keep-n", type=int, default=128)
p.add_argument("--attacks", default="inversion")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--t-min", type=int, default=0)
p.add_argument("--x0", action="store_true")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)
rng = random.Random(a.seed)
pipe = load_pipeline("embedded")
freeze(pipe)
unet = pipe.unet
base_unet = copy.deepcopy(unet).eval()
tmp = Path(tempfile.mkdtemp())
concept = world_concepts([a.target], tmp)[0]
held = world_concepts([a.target], tmp / "held", seed=7)[0]
target_wc = wc.get(a.target)
res = model_resolution(pipe)
gen = torch.Generator().manual_seed(a.seed)
refs = build_references(pipe, [concept], "images", res, 4, 25, a.seed)
# anchors: the same prompt with the concept swapped for another of its kind
if target_wc.kind == "id":
    others = [i for i in vocab.IDS if i != a.target]
elif target_wc.kind == "style":
    others = ["solid"]
else:
    others = [s for s in vocab.SHAPES if s != a.target]
prompts = list(concept.prompts())
def swap(prompt):
    return prompt.replace(a.target, rng.choice(others))
keep_prompts = list(wc.retention_prompts([a.target], per_kind=6))
print("keep prompts", len(keep_prompts), flush=True)
t0 = time.time()
keep_pool = [keep_prompts[i % len(keep_prompts)] for i in range(a.keep_n)]
keep_lat = draw_latents(pipe, keep_pool, 25, a.seed + 5)
keep_rows = encode_plain(pipe, keep_pool)
print("kept latents", keep_lat.shape, round(time.time() - t0, 1), flush=True)
encoded: dict[str, torch.Tensor] = {}


def embeds_of(prompt: str) -> torch.Tensor:
    """A prompt's text states, encoded once (the text encoder is frozen)."""
    if prompt not in encoded:
        encoded[prompt] = encode_plain(pipe, [prompt])[0].embeds
    return encoded[prompt]


empty = embeds_of("")
sched = DDPMScheduler.from_config(pipe.scheduler.config)
T = sched.config.num_train_timesteps

params = list(unet.parameters())
for q in params:
    q.requires_grad_(True)
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
t0 = time.time()
for step in range(a.steps):
    B = a.batch
    lat = torch.cat([refs.sample(0, gen)[0] for _ in range(B)])
    noise = torch.randn(lat.shape, generator=gen)
    t = torch.randint(a.t_min, T, (B,), generator=gen)
    x = sched.add_noise(lat, noise, t)
    conds, targets_c = [], []
    for _ in range(B):
        u = rng.random()
        pr = rng.choice(prompts)
        if u < a.empty / (1 + a.empty + a.others):
            conds.append(empty)
        elif u < (a.empty + a.others) / (1 + a.empty + a.others):
            op = rng.choice(keep_prompts)
            conds.append(embeds_of(op))
            targets_c.append(None)
            continue
        else:
            conds.append(embeds_of(pr))
        targets_c.append(embeds_of(swap(pr)))
    c = torch.cat(conds)
    tc = torch.cat([tc if tc is not None else conds[i] for i, tc in enumerate(targets_c)])
    with torch.no_grad():
        target = base_unet(x, t, encoder_hidden_states=tc).sample
    own = unet(x, t, encoder_hidden_states=c).sample
    if a.x0:
        ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        w = ((1 - ab) / ab).clamp(max=20.0)
        forget = (w * (own - target) ** 2).mean()
    else:
        forget = F.mse_loss(own, target)
    # retention: kept images, their prompts and the empty prompt, every timestep
    idx = torch.randint(0, keep_lat.shape[0], (B,), generator=gen)
    kl = keep_lat[idx]
    kn = torch.randn(kl.shape, generator=gen)
    kt = torch.randint(0, T, (B,), generator=gen)
    kx = sched.add_noise(kl, kn, kt)
    kc = torch.cat([keep_rows[i].embeds if j % 2 == 0 else empty
                    for j, i in enumerate(idx.tolist())])
    with torch.no_grad():
        ktarget = base_unet(kx, kt, encoder_hidden_states=kc).sample
    keep = F.mse_loss(unet(kx, kt, encoder_hidden_states=kc).sample, ktarget)
    loss = forget + a.keep_weight * keep
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0 or step == a.steps - 1:
        print(f"step {step} forget {forget.item():.4f} keep {keep.item():.4f} "
              f"{time.time() - t0:.0f}s", flush=True)
for q in params:
    q.requires_grad_(False)
forget_s = time.time() - t0
unet.eval()
judge = WorldJudge()
names = [c.name for c in wc.all_concepts()]
after = score_concepts(pipe, judge, names, n=a.n, progress=False, avoid=[a.target])
# base scores: swap weights
sd = copy.deepcopy(unet.state_dict())
unet.load_state_dict(base_unet.state_dict())
base = score_concepts(pipe, judge, names, n=a.n, progress=False, avoid=[a.target])
unet.load_state_dict(sd)
kept = {k: after[k]["rate"] / base[k]["rate"] for k in names
        if k != a.target and base[k]["rate"] > 0}
row = {"args": vars(a), "forget_s": round(forget_s, 1), "G": after[a.target]["rate"],
       "lowest": sorted(kept.items(), key=lambda kv: kv[1])[:4],
       "mean_ret": sum(kept.values()) / len(kept)}
print(json.dumps(row), flush=True)
settings = AttackSettings(n=a.n, budget=150, lr=5e-3)
for label, c in (("refs", concept), ("held", held)):
    r = attack_all(pipe, [], c, judge, a.attacks.split(","), settings)
    row[label] = {n: x.rate for n, x in r["attacks"].items()}
    print(label, row[label], flush=True)
print(json.dumps(row), flush=True)
