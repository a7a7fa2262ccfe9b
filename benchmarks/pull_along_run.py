"""The target's remaining pull at five noise levels along a re-steering run: the evidence
behind `stop_pull` (BENCHMARKS.md, "Stopping when the pull is gone").

For every training seed and K, trains the recipe for K steps (the state of a longer run at step
K, see resteer_trajectory.py) and prints one JSON line: for the target and each concept named
in --others, the projection of (prompt - empty prompt) noise prediction on the base model's,
over 8 latents the base model draws for its prompts, at t = 100, 300, 500, 700, 900, and their
mean (1: the base model's pull; 0: none). No sampling: G at the same seeds and steps is in
resteer_trajectory.py's rows.

    python benchmarks/pull_along_run.py conceptworld-robust star --seeds 0,1 \
        --steps 60,70,80,90,100,110,120 --threads 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from forget_me_not.api import forget
from forget_me_not.evaluate import applied
from forget_me_not.models import load_pipeline
from forget_me_not.pipeline_io import draw_latents, encode_prompt
from forget_me_not.presets import world_concepts

TIMESTEPS = (100, 300, 500, 700, 900)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("recipe")
    p.add_argument("target")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", default="100")
    p.add_argument("--others", default="triangle,moon")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    pipe = load_pipeline("embedded")
    names = [a.target, *a.others.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        prompts = {c.name: c.prompts() for c in world_concepts(names, Path(tmp))}
    empty = encode_prompt(pipe, "")[0]
    fixed = {}
    for name in names:  # 8 latents per concept, its prompts in turn, and their noise
        chosen = [prompts[name][i % len(prompts[name])] for i in range(8)]
        latents = draw_latents(pipe, chosen, 10, 123)
        noise = torch.randn((len(TIMESTEPS), *latents.shape),
                            generator=torch.Generator().manual_seed(7))
        states = torch.cat([encode_prompt(pipe, q)[0] for q in chosen])
        fixed[name] = (latents, noise, states)

    def pulls(name: str) -> torch.Tensor:
        latents, noise, states = fixed[name]
        out = []
        with torch.no_grad():
            for k, t in enumerate(TIMESTEPS):
                tt = torch.full((len(latents),), t)
                x = pipe.scheduler.add_noise(latents, noise[k], tt)
                with_prompt = pipe.unet(x, tt, encoder_hidden_states=states).sample
                without = pipe.unet(x, tt, encoder_hidden_states=empty.expand_as(states)).sample
                out.append((with_prompt - without).flatten(1))
        return torch.stack(out)  # (T, N, D)

    base = {name: pulls(name) for name in names}
    for seed in (int(s) for s in a.seeds.split(",")):
        for steps in (int(k) for k in a.steps.split(",")):
            sets = [*a.sets, f"fmn.steps={steps}", f"fmn.seed={seed}"]
            with tempfile.TemporaryDirectory() as tmp:
                concepts = world_concepts([a.target], Path(tmp))
                patch = forget(pipe, concepts, recipe=a.recipe, sets=sets, progress=False)
            with applied(pipe, [patch]):
                now = {name: pulls(name) for name in names}
            row: dict = {"recipe": a.recipe, "sets": a.sets, "seed": seed, "steps": steps}
            for name in names:
                b = base[name]
                share = (b * now[name]).sum(-1) / b.pow(2).sum(-1)  # (T, N)
                row[name] = {"t": list(TIMESTEPS),
                             "pull": [round(float(v), 3) for v in share.mean(1)],
                             "mean": round(float(share.mean()), 3)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
