"""The erase target applied at sampling time to every prompt, scored as `suite_retention.py`.

ESD trains the concept's prompts toward the unprompted prediction minus `eta` times the
concept's pull. Added to every prompted prediction at sampling time (the base UNet's pull for
the concept's prompt, read at each step's latent), the same push is what a forgetting that
learnt it for every prompt would do at best; what it costs the other concepts there, no
distilled patch of that target can avoid. It needs the base UNet's two extra predictions per
step, so it is a measure, not a patch.

    python benchmarks/negative_guidance_trial.py PATCH star --prompt "a photo of a star" \
        --eta 1 [--guidance-only] --threads 1 --cache runs/suite_retention_base_t1.json

With `--guidance-only` the patch file is not applied (the push alone).
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
from forget_me_not.pipeline_io import encode_prompt

patch_applied = evaluate.applied


def pushed(forward: Callable[..., Any], base: Callable[..., Any], concept: torch.Tensor,
           empty: torch.Tensor, eta: float) -> Callable[..., Any]:
    """A UNet forward whose prompted half (diffusers batches guidance as [unprompted,
    prompted]) is pushed away from the base UNet's pull for the concept's prompt."""

    def forward_(sample: torch.Tensor, timestep: Any, *args: Any, **kw: Any) -> Any:
        out = forward(sample, timestep, *args, **kw)
        half = sample.shape[0] // 2
        x = sample[half:]
        t = timestep[half:] if torch.is_tensor(timestep) and timestep.dim() else timestep
        with torch.no_grad():
            hidden = torch.cat([concept.expand(half, -1, -1), empty.expand(half, -1, -1)])
            pred = base(torch.cat([x, x]), t if not torch.is_tensor(t) or not t.dim()
                        else torch.cat([t, t]), encoder_hidden_states=hidden,
                        return_dict=False)[0]
        pull = pred[:half] - pred[half:]
        pred_out = out.sample if hasattr(out, "sample") else out[0]
        pred_out = torch.cat([pred_out[:half], pred_out[half:] - eta * pull])
        if hasattr(out, "sample"):
            out.sample = pred_out
            return out
        return (pred_out,)

    return forward_


def pushed_applied(prompt: str, eta: float, guidance_only: bool) -> Callable[..., Any]:
    @contextlib.contextmanager
    def applied(pipe: Any, patches: Any) -> Iterator[None]:
        base = copy.deepcopy(pipe.unet)
        with torch.no_grad():
            concept = encode_prompt(pipe, prompt)[0].to(pipe.unet.device)
            empty = encode_prompt(pipe, "")[0].to(pipe.unet.device)
        with patch_applied(pipe, [] if guidance_only else patches):
            pipe.unet.forward = pushed(pipe.unet.forward, base.forward, concept, empty, eta)
            try:
                yield
            finally:
                del pipe.unet.forward  # the instance attribute: the class's forward again

    return applied


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("patches")
    p.add_argument("target")
    p.add_argument("--prompt", required=True, help="the concept's prompt whose pull is pushed")
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--guidance-only", action="store_true")
    a, rest = p.parse_known_args()  # the rest: suite_retention.py's options
    evaluate.applied = pushed_applied(a.prompt, a.eta, a.guidance_only)
    sys.argv = ["suite_retention.py", a.patches, a.target, *rest]
    runpy.run_path(str(Path(__file__).with_name("suite_retention.py")), run_name="__main__")


if __name__ == "__main__":
    main()
