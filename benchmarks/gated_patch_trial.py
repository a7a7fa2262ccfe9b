"""A patch applied to part of each sampling step only, scored as `suite_retention.py` scores it.

Three trial gates, each asking where a patch's cost to the other concepts arises:
- `--t-min T`: the patch acts at timesteps >= T (high noise, where the layout is drawn) and the
  base UNet denoises below it (where texture and detail are drawn);
- `--t-max T`: the converse, the patch acts below T only and the base UNet draws the layout;
- `--cond-only`: the patch acts on the prompted half of the classifier-free guidance batch and
  the base UNet gives the unprompted prediction, which guidance weighs in every sample.

Both need the base UNet at sampling time, so neither is a forgetting to ship as weights; they
measure where the cost lives.

    python benchmarks/gated_patch_trial.py PATCH star --t-min 500 --threads 1 \
        --cache runs/suite_retention_base_t1.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import runpy
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import forget_me_not.evaluate as evaluate

ungated_applied = evaluate.applied


def prediction(out: Any) -> torch.Tensor:
    return out.sample if hasattr(out, "sample") else out[0]


def with_prediction(out: Any, x: torch.Tensor) -> Any:
    if hasattr(out, "sample"):
        out.sample = x
        return out
    return (x,)


def gate(patched: Callable[..., Any], base: Callable[..., Any], t_min: float | None,
         t_max: float | None, cond_only: bool) -> Callable[..., Any]:
    """A UNet forward taking the patched prediction where the gate is open, the base's elsewhere."""

    def forward(sample: torch.Tensor, timestep: Any, *args: Any, **kw: Any) -> Any:
        t = torch.as_tensor(timestep, device=sample.device).float().flatten()
        open_ = torch.ones(sample.shape[0], dtype=torch.bool, device=sample.device)
        per_sample = t.expand(sample.shape[0]) if t.numel() == 1 else t
        if t_min is not None:
            open_ &= per_sample >= t_min
        if t_max is not None:
            open_ &= per_sample < t_max
        if cond_only:  # diffusers batches guidance as [unprompted, prompted]
            open_[: sample.shape[0] // 2] = False
        if bool(open_.all()) or not bool(open_.any()):  # one UNet for the whole batch
            return (patched if bool(open_.all()) else base)(sample, timestep, *args, **kw)
        out = patched(sample, timestep, *args, **kw)
        keep = base(sample, timestep, *args, **kw)
        mask = open_.view(-1, *([1] * (sample.dim() - 1)))
        return with_prediction(out, torch.where(mask, prediction(out), prediction(keep)))

    return forward


def wrapped_applied(wrap: Callable[[Any, Any, Any], Any],
                    apply_patches: bool = True,
                    prepare: Callable[[Any], Any] = lambda pipe: None) -> Callable[..., Any]:
    """`evaluate.applied` with the patched UNet's forward replaced by `wrap(prepared,
    patched_forward, base_forward)`: the base UNet an untouched copy, `prepared` what
    `prepare(pipe)` reads from the model before any patch is applied."""

    @contextlib.contextmanager
    def applied(pipe: Any, patches: Any) -> Iterator[None]:
        base = copy.deepcopy(pipe.unet)
        prepared = prepare(pipe)
        with ungated_applied(pipe, patches if apply_patches else []):
            pipe.unet.forward = wrap(prepared, pipe.unet.forward, base.forward)
            try:
                yield
            finally:
                del pipe.unet.forward  # the instance attribute: the class's forward again

    return applied


def gated_applied(t_min: float | None, t_max: float | None,
                  cond_only: bool) -> Callable[..., Any]:
    return wrapped_applied(lambda _, patched, base: gate(patched, base, t_min, t_max,
                                                              cond_only))


def run_suite_retention(applied: Callable[..., Any], patches: str, target: str,
                        rest: list[str]) -> None:
    """suite_retention.py's measure with `applied` in place of evaluate.applied."""
    evaluate.applied = applied
    sys.argv = ["suite_retention.py", patches, target, *rest]
    runpy.run_path(str(Path(__file__).with_name("suite_retention.py")), run_name="__main__")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("patches")
    p.add_argument("target")
    p.add_argument("--t-min", type=float, default=None)
    p.add_argument("--t-max", type=float, default=None)
    p.add_argument("--cond-only", action="store_true")
    a, rest = p.parse_known_args()  # the rest: suite_retention.py's options
    if a.t_min is None and a.t_max is None and not a.cond_only:
        raise SystemExit("pass --t-min T, --t-max T or --cond-only (otherwise use "
                         "suite_retention.py)")
    run_suite_retention(gated_applied(a.t_min, a.t_max, a.cond_only), a.patches, a.target, rest)


if __name__ == "__main__":
    main()
