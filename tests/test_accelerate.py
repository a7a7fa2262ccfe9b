"""Data-parallel evaluation: `accelerate launch` with 2 CPU processes equals one process.

The test runs the worker once in-process and once as this file under accelerate launch with two
processes, and compares the results.json both wrote. Sample i always has seed base + i and whole
batches are dealt to processes, so every number must match exactly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _worker(out_dir: str) -> None:
    import torch

    torch.set_num_threads(1)  # same arithmetic in every process
    from forget_me_not.bench import run_bench
    from forget_me_not.judges.base import BaseJudge
    from tiny_pipelines import make_tiny_pipeline

    class BrightnessJudge(BaseJudge):
        name = "bright"

        def probabilities(self, images, concept):
            return np.array([np.asarray(i, dtype=np.float64).mean() / 255 for i in images])

    class DimmingPatch:
        """Halves the UNet's output conv: a deterministic 'forgetting' of star."""

        metadata = {"concepts": [{"name": "star"}]}

        def apply(self, pipe):
            pipe.unet.conv_out.weight.data *= 0.5

        def remove(self, pipe):
            pipe.unet.conv_out.weight.data *= 2.0

    pipe = make_tiny_pipeline("sd1")
    run_bench(pipe, "world", ["star", "moon"], [DimmingPatch()], out_dir,
              judge=BrightnessJudge(threshold=0.559), n=5, steps=2, batch_size=2, budget=2,
              progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _results(folder: Path) -> dict:
    data = json.loads((folder / "results.json").read_text())

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if "seconds" not in k}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return strip(data["concepts"]), data["settings"]["processes"]


def test_two_processes_equal_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                         os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    script = str(Path(__file__).resolve())
    one, two = tmp_path / "one", tmp_path / "two"
    import torch

    threads = torch.get_num_threads()
    try:
        _worker(str(one))  # the one-process run, here (saves a process start)
    finally:
        torch.set_num_threads(threads)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    done = subprocess.run([*launch, script, str(two)], env=env, timeout=300, cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (c1, p1), (c2, p2) = _results(one), _results(two)
    assert (p1, p2) == (1, 2)
    assert c1 == c2
    star = next(c for c in c1 if c["key"] == "star")
    assert star["before"]["inversion"] is not None and star["after"]["inversion"] is not None
    assert len(star["before"]["generation"]["probabilities"]) == 5
    # only the main process wrote: one report, no stray temp folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _worker(sys.argv[1])
