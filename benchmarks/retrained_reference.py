"""The retrained reference: the embedded model trained again with concepts left out.

Unlearning is read against a model that never learnt the concept: what an attack draws from
it is what the attack can draw from the rest of the world (a face from the other faces, a
shape from the other shapes), not what a forgetting left behind. This runs the shipped model's
seven sittings (docs/world.md, "Retraining") with `--leave-out` for each, resumable: run the
same command again to continue from the last checkpoint, then the pipeline is exported.

    python benchmarks/retrained_reference.py --leave-out tavi --run-dir runs/world-without-tavi
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from forget_me_not.world.train_config import TrainModelConfig
from forget_me_not.world.train_model import train_model

# (unet_steps reached, cooldown_steps, peak lr, caption boost): the shipped model's sittings.
SITTINGS: tuple[tuple[int, int, float, dict[str, float]], ...] = (
    (8000, 1500, 5e-4, {}),
    (12000, 2500, 3e-4, {}),
    (14000, 1500, 2e-4, {}),
    (15000, 1000, 1e-4, {}),
    (16000, 1000, 1e-4, {"style": 2.5, "dotted": 1.5}),
    (17000, 1000, 1e-4, {"style": 2.5, "dotted": 1.5, "solid": 2.0}),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--leave-out", action="append", required=True, help="a world concept")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for steps, cooldown, lr, boost in SITTINGS:
        cfg = TrainModelConfig(run_dir=a.run_dir, unet_steps=steps, cooldown_steps=cooldown,
                               unet_lr=lr, caption_boost=boost, leave_out=tuple(a.leave_out),
                               device=a.device, export_dir=a.run_dir / f"pipeline-{steps}")
        print(f"sitting to {steps} steps: exported {train_model(cfg)}", flush=True)


if __name__ == "__main__":
    main()
