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
from collections.abc import Callable
from typing import Any

import torch
from gated_patch_trial import prediction, run_suite_retention, with_prediction, wrapped_applied

from forget_me_not.pipeline_io import encode_prompt


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
        own = prediction(out)
        return with_prediction(out, torch.cat([own[:half], own[half:] - eta * pull]))

    return forward_


def pushed_applied(prompt: str, eta: float, guidance_only: bool) -> Callable[..., Any]:
    def encoded(pipe: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The concept's prompt and the empty one, by the base text encoder."""
        with torch.no_grad():
            return (encode_prompt(pipe, prompt)[0].to(pipe.unet.device),
                    encode_prompt(pipe, "")[0].to(pipe.unet.device))

    def wrap(states: Any, forward: Callable[..., Any], base: Callable[..., Any]) -> Any:
        return pushed(forward, base, *states, eta)

    return wrapped_applied(wrap, apply_patches=not guidance_only, prepare=encoded)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("patches")
    p.add_argument("target")
    p.add_argument("--prompt", required=True, help="the concept's prompt whose pull is pushed")
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--guidance-only", action="store_true")
    a, rest = p.parse_known_args()  # the rest: suite_retention.py's options
    run_suite_retention(pushed_applied(a.prompt, a.eta, a.guidance_only), a.patches, a.target,
                        rest)


if __name__ == "__main__":
    main()
